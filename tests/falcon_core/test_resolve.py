"""Model spec resolution: the real default target through its alias, GGUF conversion, clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from falcon_core.home import falcon_home
from falcon_core.resolve import (
    ALIASES,
    DEFAULT_MODEL,
    ModelNotFoundError,
    converted_dir,
    missing_files,
    resolve_model,
)

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def test_falcon_home_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FALCON_HOME", str(tmp_path / "h"))
    assert falcon_home() == tmp_path / "h"
    monkeypatch.delenv("FALCON_HOME")
    assert falcon_home() == Path.home() / ".cache" / "falcon"


def test_alias_gives_complete_bf16_folder(smollm2_path):
    assert not missing_files(smollm2_path)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (smollm2_path / name).is_file(), name
    config = json.loads((smollm2_path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "bfloat16"
    assert config["hidden_size"] == 576 and config["num_hidden_layers"] == 30
    assert "<|im_start|>" in (smollm2_path / "chat_template.jinja").read_text()
    assert smollm2_path.parent == falcon_home().absolute() / "models"


def test_second_resolve_reuses_the_conversion(smollm2_path):
    start = time.perf_counter()
    again = resolve_model(DEFAULT_MODEL)
    assert again == smollm2_path
    assert time.perf_counter() - start < 2.0


def test_gguf_path_and_folder_specs_resolve_to_the_same_folder(smollm2_path):
    gguf = ALIASES[DEFAULT_MODEL]()
    assert resolve_model(str(gguf)) == smollm2_path
    assert resolve_model(smollm2_path) == smollm2_path


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_real_target_greedy_chat_is_deterministic_and_sensible(smollm2_path, device):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from falcon_core.chat import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.bfloat16).to(device).eval()
    ids = torch.tensor([prompt_ids(tokenizer, PROMPT)], device=device)  # (1, T)
    outputs = []
    for _ in range(2):
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=24, do_sample=False)  # (1, T + new)
        outputs.append(out[0, ids.shape[1] :].tolist())
    assert outputs[0] == outputs[1]
    reply = tokenizer.decode(outputs[0], skip_special_tokens=True)
    assert "Paris" in reply, reply


def test_unknown_alias_lists_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("smollm3-9b-instruct", cache_dir=tmp_path)
    message = str(info.value)
    assert "smollm3-9b-instruct" in message
    assert "alias: not one of ['smollm2-135m-instruct']" in message
    assert "does not exist" in message
    assert "hub id: not of the form 'org/name'" in message
    assert info.value.tried and isinstance(info.value, FileNotFoundError)


def test_missing_gguf_file(tmp_path):
    missing = tmp_path / "nowhere" / "model.Q4_0.gguf"
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(str(missing), cache_dir=tmp_path)
    assert f"{missing} does not exist" in str(info.value)
    assert "hub id: not tried for a .gguf path" in str(info.value)


def test_folder_without_weights_says_what_is_missing(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match=r"no weights .*no tokenizer"):
        resolve_model(str(tmp_path), cache_dir=tmp_path)


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ModelNotFoundError, match=r"not a \.gguf file nor a folder"):
        resolve_model(str(path), cache_dir=tmp_path)


def test_hub_id_without_network_or_unknown_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError, match=r"not found on the hub .* or no network"):
        resolve_model("falcon-spec-tests/no-such-model-0123", cache_dir=tmp_path)


@pytest.mark.slow
def test_killed_conversion_is_never_picked_up(tmp_path):
    """Kill a conversion once it has started writing; the destination must not exist afterwards."""
    gguf = ALIASES[DEFAULT_MODEL]()
    dest = converted_dir(gguf, tmp_path)
    code = (
        "import sys; from pathlib import Path; from falcon_core.resolve import resolve_model; "
        "resolve_model('smollm2-135m-instruct', cache_dir=Path(sys.argv[1]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    try:
        deadline = time.monotonic() + 300
        started = []
        while time.monotonic() < deadline and proc.poll() is None and not started:
            started = [p for p in dest.parent.glob(f".{dest.name}.tmp-*/config.json")]
            time.sleep(0.05)
        assert started, "the conversion never started writing its temporary folder"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not dest.exists()
    leftovers = list(dest.parent.iterdir())
    assert leftovers and all(p.name.startswith(f".{dest.name}.tmp-") for p in leftovers)
