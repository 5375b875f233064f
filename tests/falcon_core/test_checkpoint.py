"""Drafter checkpoint format: round trip, own weights only, atomic save, tokenizer hash, every error path."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from falcon_core.checkpoint import TargetIdentity, load_drafter, save_drafter, tokenizer_hash
from falcon_core.drafter import Drafter, DrafterConfig
from falcon_core.target import TargetConfig

TARGET = TargetConfig(
    model_type="llama", vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
    num_kv_heads=1, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=64,
)  # fmt: skip
IDENTITY = TargetIdentity("tiny-llama", 16, 40, "ab" * 32)


def tiny_tokenizer(extra_merge=False):
    vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "c": 4, "ab": 5, "abc": 6}
    merges = [("a", "b"), ("ab", "c")]
    if extra_merge:
        vocab["bc"] = 7
        merges.append(("b", "c"))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def make(fusion="linear", seed=0):
    torch.manual_seed(seed)
    config = DrafterConfig.from_target(TARGET, fusion=fusion, block_size=2)
    return Drafter(config).eval(), config


@pytest.mark.parametrize("fusion", ["linear", "lstm"])
def test_round_trip(tmp_path, fusion):
    drafter, config = make(fusion)
    card = {"steps": 10, "data": "sharegpt"}
    save_drafter(tmp_path / "d", drafter, config, IDENTITY, card)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temporary folders left behind
    ck = load_drafter(tmp_path / "d", expected_identity=IDENTITY)
    assert ck.config == config and ck.identity == IDENTITY and ck.card == card
    x = torch.randn(1, 5, 16)
    pos = torch.arange(5)[None]
    with torch.no_grad():
        assert torch.equal(ck.drafter(x, x, pos), drafter(x, x, pos))
    meta = json.loads((tmp_path / "d" / "config.json").read_text())
    assert meta["format"] == "falcon-drafter" and meta["format_version"] == 1
    assert meta["target"] == {
        "name": "tiny-llama",
        "hidden_size": 16,
        "vocab_size": 40,
        "tokenizer_hash": "ab" * 32,
    }


def test_only_the_drafters_own_weights_are_saved(tmp_path):
    drafter, config = make()
    save_drafter(tmp_path / "d", drafter, config, IDENTITY)
    names = set(load_file(tmp_path / "d" / "model.safetensors"))
    assert names == set(drafter.state_dict())
    assert not any(n.startswith(("embed", "lm_head")) or "rotary" in n for n in names)


def test_save_replaces_an_existing_checkpoint(tmp_path):
    a, config = make(seed=0)
    b, _ = make(seed=1)
    save_drafter(tmp_path / "d", a, config, IDENTITY)
    save_drafter(tmp_path / "d", b, config, IDENTITY, {"v": 2})
    ck = load_drafter(tmp_path / "d")
    assert ck.card == {"v": 2} and torch.equal(ck.drafter.fusion.weight, b.fusion.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_load_dtype_and_device(tmp_path):
    drafter, config = make()
    save_drafter(tmp_path / "d", drafter, config, IDENTITY)
    ck = load_drafter(tmp_path / "d", dtype="bf16", device="cpu")
    assert ck.drafter.fusion.weight.dtype == torch.bfloat16


def test_tokenizer_hash_from_object_equals_from_folder_and_tracks_changes(tmp_path):
    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    h = tokenizer_hash(tok)
    assert len(h) == 64 and h == tokenizer_hash(tmp_path / "tok") == tokenizer_hash(str(tmp_path / "tok"))
    assert tokenizer_hash(tiny_tokenizer(extra_merge=True)) != h
    tok.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    assert tokenizer_hash(tok) != h
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        tokenizer_hash(tmp_path)
    ident = TargetIdentity.of("tiny", TARGET, tiny_tokenizer())
    assert (ident.hidden_size, ident.vocab_size, ident.tokenizer_hash) == (16, 40, h)


def test_target_mismatch_is_a_clear_error(tmp_path):
    drafter, config = make()
    save_drafter(tmp_path / "d", drafter, config, IDENTITY)
    other = TargetIdentity("SmolLM2-360M", 960, 49152, "cd" * 32)
    with pytest.raises(ValueError) as e:
        load_drafter(tmp_path / "d", expected_identity=other)
    msg = str(e.value)
    assert "drafter was trained for tiny-llama (hidden 16, vocab 40, tokenizer abababababab...)" in msg
    assert "but the target is SmolLM2-360M (hidden 960, vocab 49152, tokenizer cdcdcdcdcdcd...)" in msg
    same_shape_other_tokenizer = TargetIdentity("tiny-llama", 16, 40, "ef" * 32)
    with pytest.raises(ValueError, match="tokenizer efefefefefef"):
        load_drafter(tmp_path / "d", expected_identity=same_shape_other_tokenizer)
    with pytest.warns(UserWarning, match="target is named 'renamed'"):
        load_drafter(tmp_path / "d", expected_identity=TargetIdentity("renamed", 16, 40, "ab" * 32))


def test_missing_files(tmp_path):
    drafter, config = make()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_drafter(tmp_path / "nope")
    save_drafter(tmp_path / "d", drafter, config, IDENTITY)
    (tmp_path / "d" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no model\.safetensors"):
        load_drafter(tmp_path / "d")
    (tmp_path / "d" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        load_drafter(tmp_path / "d")


def test_corrupt_files_name_the_file(tmp_path):
    drafter, config = make()
    save_drafter(tmp_path / "d", drafter, config, IDENTITY)
    weights = tmp_path / "d" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        load_drafter(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load_drafter(tmp_path / "d")


def test_config_json_errors(tmp_path):
    drafter, config = make()
    save_drafter(tmp_path / "d", drafter, config, IDENTITY)
    path = tmp_path / "d" / "config.json"
    meta = json.loads(path.read_text())
    for change, msg in [
        ({"format": "eagle"}, "not a Falcon drafter checkpoint"),
        ({"format_version": 99}, "format_version 99"),
        ({"drafter": {**meta["drafter"], "block_size": 0}}, "block_size must be >= 1"),
        ({"drafter": {**meta["drafter"], "colour": "red"}}, "unknown DrafterConfig fields"),
        ({"target": {"name": "x"}}, "invalid drafter or target section"),
    ]:
        path.write_text(json.dumps({**meta, **change}))
        with pytest.raises(ValueError, match=msg):
            load_drafter(tmp_path / "d")


def test_missing_unexpected_and_misshapen_tensors(tmp_path):
    drafter, config = make()
    save_drafter(tmp_path / "d", drafter, config, IDENTITY)
    weights = tmp_path / "d" / "model.safetensors"
    state = load_file(weights)
    bad = {k: v for k, v in state.items() if k != "fusion.bias"} | {"embed.weight": torch.zeros(40, 16)}
    save_file(bad, weights)
    with pytest.raises(ValueError, match=r"missing tensors \['fusion.bias'\], unexpected \['embed.weight'\]"):
        load_drafter(tmp_path / "d")
    save_file(state | {"fusion.bias": torch.zeros(3)}, weights)
    with pytest.raises(ValueError, match=r"wrong shape.*fusion\.bias \(3,\) != \(16,\)"):
        load_drafter(tmp_path / "d")


def test_save_refuses_inconsistent_arguments(tmp_path):
    drafter, config = make()
    with pytest.raises(ValueError, match=r"does not match drafter\.config"):
        save_drafter(tmp_path / "d", drafter, DrafterConfig.from_target(TARGET, block_size=3), IDENTITY)
    with pytest.raises(ValueError, match="does not fit target"):
        save_drafter(tmp_path / "d", drafter, config, TargetIdentity("big", 32, 40, "ab" * 32))
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_smollm2_tokenizer_hash_object_equals_folder():
    from transformers import AutoTokenizer

    from falcon_core.resolve import resolve_model

    folder = resolve_model("smollm2-135m-instruct")
    assert tokenizer_hash(AutoTokenizer.from_pretrained(folder)) == tokenizer_hash(folder)
