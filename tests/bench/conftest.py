"""Fixtures for bench tests: a tiny random fp32 Llama with SmolLM2's tokenizer (so chat templates, EOS
and transformers `generate` all work), random k = 1 and k = 2 drafters saved as checkpoints, and
torch on one thread (two threads on a shared 2-core machine spin and crawl)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer) -> Path:
    """A HF folder: random 2-layer Llama (hidden 64) over SmolLM2's vocabulary, with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = len(smollm2_tokenizer)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        eos_token_id=smollm2_tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # sharp logits: greedy paths are not near-ties
        model.lm_head.weight.mul_(20.0)
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model.save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


def save_random_drafter(folder: Path, out: Path, k: int, seed: int = 0, dtype: str = "fp32") -> Path:
    from transformers import AutoTokenizer

    from falcon_core.checkpoint import TargetIdentity, save_drafter
    from falcon_core.drafter import Drafter, DrafterConfig
    from falcon_core.target import DTYPES, TargetConfig

    cfg_t = TargetConfig.from_file(folder)
    torch.manual_seed(seed)
    config = DrafterConfig.from_target(cfg_t, block_size=k)
    drafter = Drafter(config).to(DTYPES[dtype]).eval()
    identity = TargetIdentity.of(folder.name, cfg_t, AutoTokenizer.from_pretrained(folder))
    return save_drafter(out, drafter, config, identity, {"note": "random, for tests"})


@pytest.fixture(scope="session")
def make_drafter():
    """`save_random_drafter(folder, out, k, seed=0, dtype="fp32") -> out`."""
    return save_random_drafter


@pytest.fixture(scope="session")
def drafter_dirs(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("drafters")
    return {
        "eagle": save_random_drafter(tiny_folder, root / "eagle-k1", k=1),
        "falcon": save_random_drafter(tiny_folder, root / "falcon-k2", k=2),
    }
