"""`falcon generate` (falcon_core/generate_cli.py) end to end on a tiny fp32 target with SmolLM2's tokenizer.

The flags of issue 3: `--model SPEC --drafter PATH|none --prompt TEXT | --prompts FILE.jsonl
--max-new-tokens N --temperature T --tree NAME|auto --dtype fp32|bf16|fp16 [--json]`, with `--json`
one object per prompt holding text, `token_ids` and `stats.tau`; `--drafter none` is plain decoding.
Runs go through the `falcon` dispatcher (`falcon_core.cli.main(["generate", ...])`), in process.
"""

from __future__ import annotations

import json

import pytest
import torch

import falcon_core.generate as generate_module
from falcon_core.checkpoint import TargetIdentity, save_drafter
from falcon_core.cli import main as falcon
from falcon_core.drafter import Drafter, DrafterConfig
from tests.falcon_core.test_generate import tiny_target

ACCEPTANCE = [[0.6, 0.2, 0.1], [0.5, 0.2], [0.4], [0.3], [0.2]]
"""A card's per-depth, per-rank acceptance: what `--tree auto` fits a tree to."""


@pytest.fixture(scope="module")
def model(tmp_path_factory, smollm2_tokenizer) -> str:
    """A tiny random Llama (full SmolLM2 vocabulary, sharp logits) saved with SmolLM2's tokenizer."""
    tmp = tmp_path_factory.mktemp("cli_model")
    tiny_target(tmp, vocab=len(smollm2_tokenizer), layers=2, seed=5)
    smollm2_tokenizer.save_pretrained(tmp / "target")
    return str(tmp / "target")


def save_random_drafter(model: str, folder, k: int, card: dict | None):
    from transformers import AutoTokenizer

    from falcon_core.target import load_target

    target = load_target(model, dtype="fp32")
    torch.manual_seed(k)
    cfg = DrafterConfig.from_target(target.config, block_size=k)
    identity = TargetIdentity.of(model, target.config, AutoTokenizer.from_pretrained(model))
    return save_drafter(folder, Drafter(cfg), cfg, identity, card)


@pytest.fixture(scope="module")
def drafter(model, tmp_path_factory):
    return str(
        save_random_drafter(model, tmp_path_factory.mktemp("cli_d") / "k2", 2, {"acceptance": ACCEPTANCE})
    )


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_prompts") / "prompts.jsonl"
    rows = [
        {"question_id": 81, "turns": ["Write a haiku about the sea.", "Now in French."]},
        {"id": "raw", "prompt": "The capital of France is"},
        {"messages": [{"role": "user", "content": "Count to five."}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run(capsys, *args: str) -> tuple[int, list[str], str]:
    code = falcon(["generate", *args])
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err


def run_json(capsys, *args: str) -> list[dict]:
    code, lines, err = run(capsys, *args, "--json")
    assert code == 0, err
    return [json.loads(line) for line in lines]


def test_json_records_and_drafter_none_is_plain(capsys, model, drafter, prompts_file):
    common = ("--model", model, "--prompts", prompts_file, "--max-new-tokens", "16", "--dtype", "fp32")
    plain = run_json(capsys, *common, "--drafter", "none")
    assert [r["id"] for r in plain] == ["81", "raw", "2"]
    for r in plain:
        assert set(r) >= {"id", "text", "token_ids", "finish_reason", "stats"}
        assert len(r["token_ids"]) == 16 and r["finish_reason"] == "length" and r["text"]
        s = r["stats"]
        assert s["tau"] == 1.0 and s["speculative_steps"] == 0 and s["drafter_passes"] == 0
    for tree in ("kmask2_8layer_tree", "chain-3", "auto"):
        spec = run_json(capsys, *common, "--drafter", drafter, "--tree", tree)
        # lossless through the CLI: fp32 greedy with a drafter == plain greedy, token for token
        assert [r["token_ids"] for r in spec] == [r["token_ids"] for r in plain], tree
        assert [r["text"] for r in spec] == [r["text"] for r in plain]
        for r in spec:
            s = r["stats"]
            assert s["speculative_steps"] > 0 and s["drafter_passes"] > 0
            assert s["tau"] == s["decode_tokens"] / s["target_forwards"] >= 1.0
            assert len(s["acceptance_per_depth"]) == len(s["drafts_per_depth"]) > 0


def test_text_output_names_the_tree(capsys, model, drafter, tmp_path):
    common = ("--model", model, "--prompt", "Hello!", "--max-new-tokens", "6", "--dtype", "fp32")
    code, lines, err = run(capsys, *common, "--drafter", drafter, "--tree", "auto")
    assert code == 0 and lines and "tree auto" in err and "tau " in err  # fitted from the card
    code, _, err = run(capsys, *common, "--drafter", drafter, "--tree", "kmask2_8layer_tree_3")
    assert code == 0 and "tree kmask2_8layer_tree_3" in err
    bare = save_random_drafter(model, tmp_path / "nocard", 1, None)  # k = 1, no acceptance in the card
    code, _, err = run(capsys, *common, "--drafter", str(bare), "--tree", "auto")
    assert code == 0 and "tree chain-4" in err  # auto without statistics: the fallback chain
    code, _, err = run(capsys, *common, "--drafter", "none")
    assert code == 0 and "drafter none" in err


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_dtype_reaches_the_target(capsys, monkeypatch, model, drafter, dtype):
    seen = []
    real = generate_module.load_target

    def load_target(*args, **kwargs):
        seen.append(kwargs["dtype"])
        return real(*args, **kwargs)

    monkeypatch.setattr(generate_module, "load_target", load_target)
    args = ("--model", model, "--drafter", drafter, "--prompt", "Hi", "--max-new-tokens", "5")
    records = run_json(capsys, *args, "--dtype", dtype)
    assert seen == [dtype] and len(records[0]["token_ids"]) == 5


def test_sampling_flags_and_seed(capsys, model, drafter):
    args = ("--model", model, "--drafter", drafter, "--tree", "chain-3", "--prompt", "Hi", "--dtype", "fp32")
    sampled = ("--max-new-tokens", "8", "--temperature", "1.0", "--top-p", "0.9", "--top-k", "40")
    a = run_json(capsys, *args, *sampled, "--seed", "1")[0]["token_ids"]
    b = run_json(capsys, *args, *sampled, "--seed", "1")[0]["token_ids"]
    c = run_json(capsys, *args, *sampled, "--seed", "2")[0]["token_ids"]
    assert a == b and a != c


def test_errors_are_messages_with_exit_code_2(capsys, model, drafter, tmp_path):
    base = ("--model", model, "--max-new-tokens", "4", "--dtype", "fp32")
    cases = [
        (("--drafter", drafter, "--prompt", "Hi", "--tree", "no-such-tree"), "unknown tree"),
        (("--drafter", "none", "--prompt", "Hi", "--temperature", "-1"), "temperature"),
        (("--drafter", "none", "--prompt", "", "--raw"), "empty"),
        (("--drafter", "none", "--prompt", "x " * 600, "--raw"), "context limit"),
        (("--drafter", str(tmp_path / "missing"), "--prompt", "Hi"), "does not exist"),
    ]
    for args, message in cases:
        code, _, err = run(capsys, *base, *args)
        assert code == 2 and message in err and "Traceback" not in err, (args, err)
    code, _, err = run(
        capsys, "--model", model, "--prompt", "Hi", "--max-new-tokens", "0", "--drafter", "none"
    )
    assert code == 2 and "max_new_tokens" in err
    other = tmp_path / "other"
    tiny_target(other, vocab=512)
    cfg = DrafterConfig.from_target(load_cfg(other / "target"), block_size=2)
    save_drafter(tmp_path / "foreign", Drafter(cfg), cfg, TargetIdentity("tiny-512", 64, 512, "0" * 64))
    code, _, err = run(capsys, *base, "--drafter", str(tmp_path / "foreign"), "--prompt", "Hi")
    assert code == 2 and "trained for tiny-512" in err
    with pytest.raises(SystemExit) as exc:
        falcon(["generate", *base, "--prompt", "Hi", "--dtype", "int8"])
    assert exc.value.code == 2  # argparse: not one of fp32 | bf16 | fp16


def load_cfg(folder):
    from falcon_core.target import TargetConfig

    return TargetConfig.from_file(folder)
