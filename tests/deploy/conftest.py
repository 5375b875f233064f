"""Fixtures shared by the tests that run the real Serve application on a local Ray (127.0.0.1):
`free_port`, `local_serve` (start Ray + Serve with a config dict, shut both down after), and
`tiny_serving_model` (a random fp32 Llama folder with SmolLM2's tokenizer, fast enough for load tests)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """`free_port() -> int`: a TCP port free on 127.0.0.1 now."""

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick


@contextlib.contextmanager
def _local_serve(config: dict[str, Any], env: dict[str, str], num_cpus: int) -> Iterator[None]:
    import ray
    from ray import serve

    from deploy.cli import deploy, load_config, start_ray

    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        if ray.is_initialized():
            ray.shutdown()
        start_ray(None, num_cpus=num_cpus)
        try:
            deploy(load_config(config))
            yield
        finally:
            serve.shutdown()
            ray.shutdown()


@pytest.fixture(scope="session")
def local_serve() -> Callable[..., contextlib.AbstractContextManager[None]]:
    """`with local_serve(config, env={}, num_cpus=4):` a local Ray on loopback running the Serve config
    dict (`serve.run` returns once the applications are up), with `env` set for Ray's processes."""

    def start(
        config: dict[str, Any], env: dict[str, str] | None = None, num_cpus: int = 4
    ) -> contextlib.AbstractContextManager[None]:
        return _local_serve(config, env or {}, num_cpus)

    return start


@pytest.fixture(scope="session")
def tiny_serving_model(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer) -> Path:
    """A HF folder: random 2-layer Llama (hidden 64, context 4096) over SmolLM2's vocabulary, with its
    tokenizer (chat template, EOS); sharp logits so greedy paths are not near-ties."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(smollm2_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        eos_token_id=smollm2_tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    folder = tmp_path_factory.mktemp("serving") / "tiny-llama"
    model.save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder
