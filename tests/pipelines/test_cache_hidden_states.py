"""Hidden-state caching end to end on a local Ray (2 CPUs) with the real SmolLM2-135M.

50 ShareGPT conversations (truncated to 256 tokens) are cached once to a local folder (the clean run);
the other tests compare against it: a rerun, an S3 cache built in two steps as input is appended, and a
run whose driver is SIGKILLed midway and then rerun, must all end with the clean run's shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from falcon_core.data import read_sharegpt
from pipelines.cache_hidden_states import (
    CacheConfig,
    CacheOutputError,
    cache_hidden_states,
    check_output,
    main,
    resolve_inputs,
)
from pipelines.hidden_cache import MANIFEST_FILE, CacheMetadata, HiddenCacheReader, Manifest
from pipelines.stages import SKIP_NO_ASSISTANT, render_record

REPO = Path(__file__).resolve().parents[2]
N, MAX_LEN, SHARD_TOKENS = 50, 256, 1024
COMMON = {"max_seq_len": MAX_LEN, "shard_tokens": SHARD_TOKENS, "threads_per_actor": 2, "progress": False}
NO_LOGITS = torch.empty(0, dtype=torch.long)


@pytest.fixture(scope="module")
def ray_local(s3_endpoint):
    """One local Ray for the module, started after the S3 variables are set so workers inherit them."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def sharegpt():
    return read_sharegpt(max_records=N)


@pytest.fixture(scope="module")
def conversations(sharegpt):
    return sharegpt.conversations


@pytest.fixture(scope="module")
def clean_run(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "cache"
    summary = cache_hidden_states(CacheConfig(input="sharegpt", output=str(out), max_records=N, **COMMON))
    return out, summary


def _shards(url: str, storage_options=None) -> list[dict]:
    manifest = Manifest.load(url, storage_options)
    assert manifest is not None
    return [vars(s) for s in manifest.shards]


def _direct_hidden(target, ids: torch.Tensor) -> torch.Tensor:
    T = ids.shape[0]
    with torch.inference_mode():
        return target(ids.long()[None], torch.arange(T)[None], logits_index=NO_LOGITS).hidden[0]  # (T, H)


@pytest.mark.slow
def test_local_cache_equals_direct_forward(clean_run, sharegpt, smollm2_path, smollm2_tokenizer):
    from falcon_core.target import load_target

    out, summary = clean_run
    rendered = [render_record(smollm2_tokenizer, c.as_dicts(), MAX_LEN) for c in sharegpt.conversations]
    usable = [r for r in rendered if not r.skip]
    assert summary.records_read == N + sharegpt.stats.total_skipped
    assert summary.records_cached == len(usable) >= 30
    expected_skips = dict(sharegpt.stats.skipped)
    if len(usable) < N:
        expected_skips[SKIP_NO_ASSISTANT] = N - len(usable)
    assert summary.skipped == dict(sorted(expected_skips.items()))
    assert summary.shards_written == summary.shards > 5

    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["summary"]["complete"] and manifest["summary"]["records_cached"] == len(usable)
    meta = manifest["metadata"]
    assert (meta["max_seq_len"], meta["dtype"], meta["layer"], meta["topk"]) == (
        MAX_LEN,
        "bf16",
        "last_after_norm",
        0,
    )
    assert meta["target"]["hidden_size"] == 576 and meta["regenerate"] is None

    reader = HiddenCacheReader(str(out))
    records = list(reader.iter_records())
    assert len(records) == len(usable)
    for cached, source in zip(records, usable, strict=True):
        assert cached.input_ids.tolist() == source.input_ids.tolist()
        assert cached.loss_mask.tolist() == source.loss_mask.tolist()
    # the hidden states of each shard's shortest record (the most padded in its batch) and longest
    target = load_target(smollm2_path, dtype="bf16")
    checked = []
    for i in range(len(reader)):
        shard = list(reader.read_shard(i).records())
        by_length = sorted(shard, key=lambda r: r.input_ids.shape[0])
        checked += [by_length[0], by_length[-1]]
    for cached in checked:
        direct = _direct_hidden(target, cached.input_ids).float()  # (T, H)
        got = cached.hidden.float()  # (T, H)
        assert cached.hidden.dtype == torch.bfloat16 and got.shape == direct.shape
        # bf16 tolerance: padding in a batch may flip the last bits of a few values, no more
        assert (got - direct).norm() <= 1e-2 * direct.norm()
        assert (got - direct).abs().max() <= 2.0  # |hidden| reaches ~50; a bf16 step there is 0.25


@pytest.mark.slow
def test_rerun_keeps_every_shard(clean_run):
    out, summary = clean_run
    before = (out / MANIFEST_FILE).read_text()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = cache_hidden_states(CacheConfig(input="sharegpt", output=str(out), max_records=N, **COMMON))
    assert again.shards_written == 0 and again.shards == summary.shards
    assert (out / MANIFEST_FILE).read_text() == before
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != MANIFEST_FILE} == {
        k: v for k, v in mtimes.items() if k != MANIFEST_FILE
    }


@pytest.mark.slow
def test_s3_cache_with_appended_input_equals_clean_run(clean_run, conversations, s3_endpoint):
    import boto3
    import s3fs

    out, _ = clean_run
    boto3.client("s3").create_bucket(Bucket="cache-test")
    fs = s3fs.S3FileSystem()
    lines = [json.dumps({"id": c.id, "messages": c.as_dicts()}) for c in conversations]
    fs.pipe_file("cache-test/in/part-0.jsonl", ("\n".join(lines[:30]) + "\n").encode())
    # two target actors here, one in the clean run: a shard's bytes do not depend on the actor pool
    config = CacheConfig(input="s3://cache-test/in/", output="s3://cache-test/cache", num_actors=2, **COMMON)
    assert resolve_inputs(config.input) == ["s3://cache-test/in/part-0.jsonl"]

    first = cache_hidden_states(config)
    assert first.records_read == 30
    fs.pipe_file("cache-test/in/part-1.jsonl", ("\n".join(lines[30:]) + "\n").encode())
    second = cache_hidden_states(config)
    assert second.records_read == N
    assert 0 < second.shards_written < second.shards  # closed shards of the first run were kept
    assert _shards("s3://cache-test/cache") == _shards(str(out))
    reader = HiddenCacheReader("s3://cache-test/cache")
    assert reader.num_records == second.records_cached and reader.metadata.max_seq_len == MAX_LEN


@pytest.mark.slow
def test_killed_run_resumes_to_the_clean_manifest(clean_run, tmp_path):
    out, summary = clean_run
    killed = tmp_path / "killed"
    cmd = [
        sys.executable, str(REPO / "pipelines" / "cache_hidden_states.py"),
        "--input", "sharegpt", "--output", str(killed), "--max-records", str(N),
        "--max-seq-len", str(MAX_LEN), "--shard-tokens", str(SHARD_TOKENS), "--threads-per-actor", "2",
    ]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 300
        listed = 0
        while time.monotonic() < deadline and proc.poll() is None:
            manifest = Manifest.load(str(killed)) if (killed / MANIFEST_FILE).exists() else None
            listed = len(manifest.shards) if manifest is not None else 0
            if listed >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, (
            f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        )
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(ProcessLookupError):  # Ray processes the driver started, if any outlived it
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stderr.close()
    partial = Manifest.load(str(killed))
    assert partial is not None and not partial.summary.get("complete")
    assert 2 <= len(partial.shards) < summary.shards

    rerun = cache_hidden_states(CacheConfig(input="sharegpt", output=str(killed), max_records=N, **COMMON))
    assert rerun.shards_written <= summary.shards - len(partial.shards)
    assert (killed / MANIFEST_FILE).read_text() == (out / MANIFEST_FILE).read_text()
    assert not [p for p in killed.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_regenerate_topk_and_malformed_input(
    ray_local, conversations, tmp_path, smollm2_path, smollm2_tokenizer
):
    from falcon_core.generate import Engine
    from falcon_core.target import load_target

    good = [c for c in conversations[:6] if c.messages[0]["role"] == "user"][:3]
    lines = [json.dumps({"id": c.id, "messages": c.as_dicts()}) for c in good]
    lines[1:1] = [
        "{not json",
        json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}),
        json.dumps({"x": 1}),
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "cache"
    config = CacheConfig(
        input=str(tmp_path / "in.jsonl"), output=str(out), max_seq_len=128, shard_tokens=10_000, topk=4,
        regenerate=True, regen_max_new_tokens=12, threads_per_actor=2, progress=False,
    )  # fmt: skip
    summary = cache_hidden_states(config)
    assert summary.records_read == 6 and summary.records_cached == 3
    assert summary.skipped == {"malformed JSON": 1, "bad role": 1, "unknown format": 1}
    meta = HiddenCacheReader(str(out)).metadata
    assert meta.regenerate == {
        "max_new_tokens": 12,
        "temperature": 0.0,
        "seed": 0,
        "batch_size": 1,
        "max_answers": None,
    }
    assert meta.topk == 4

    target = load_target(smollm2_path, dtype="bf16")
    engine = Engine(target, smollm2_tokenizer)
    for cached, conv in zip(HiddenCacheReader(str(out)).iter_records(), good, strict=True):
        # the first answer is the target's greedy answer to the first user turn
        first_user = [m for m in conv.as_dicts()[:2] if m["role"] == "user"][:1]
        expected = engine.generate(messages=first_user, max_new_tokens=12, speculative=False)
        ids, mask = cached.input_ids.tolist(), cached.loss_mask.tolist()
        start = mask.index(1)
        end = next((i for i in range(start, len(mask)) if not mask[i]), len(mask))
        answer = smollm2_tokenizer.decode(ids[start:end], skip_special_tokens=True)
        assert answer == expected.text
        # top-4 log-probabilities are the target's own
        logits = target.lm_head(_direct_hidden(target, cached.input_ids)).float()  # (T, V)
        top = logits.log_softmax(-1).topk(4, dim=-1)
        assert cached.topk_ids.shape == (len(ids), 4) and cached.topk_logprobs.dtype == torch.float16
        agree = (cached.topk_ids[:, 0] == top.indices[:, 0]).float().mean()
        assert agree >= 0.95  # bf16 near-ties may swap the top two
        assert (cached.topk_logprobs[:, 0].float() - top.values[:, 0]).abs().median() < 0.05


def test_unusable_output_fails_before_any_work(tmp_path, smollm2_path, capsys):
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("")
    args = ["--input", str(tmp_path / "in.jsonl"), "--model", str(smollm2_path), "--max-seq-len", "64"]
    start = time.perf_counter()
    assert main([*args, "--output", str(tmp_path / "busy")]) == 2
    assert "is not empty and holds no cache" in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "file" / "cache")]) == 2
    assert "is not writable" in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "out"), "--input", str(tmp_path / "none*.jsonl")]) == 2
    assert "matches no input files" in capsys.readouterr().err
    assert time.perf_counter() - start < 60  # no Ray, no model load

    # a cache made for another tokenizer or length is refused, naming what differs
    from transformers import AutoTokenizer

    from falcon_core.checkpoint import TargetIdentity
    from falcon_core.target import TargetConfig
    from pipelines.hidden_cache import chat_template_hash

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    identity = TargetIdentity.of("smollm2", TargetConfig.from_file(smollm2_path), tokenizer)
    ours = CacheMetadata(identity, chat_template_hash(tokenizer), max_seq_len=64)
    other = CacheMetadata(
        TargetIdentity("other", 576, 49152, "0" * 64), chat_template_hash(tokenizer), max_seq_len=128
    )
    Manifest(other).save(str(tmp_path / "old"))
    with pytest.raises(CacheOutputError, match=r"max_seq_len: 128 != 64.*target.tokenizer_hash"):
        check_output(str(tmp_path / "old"), ours)
    Manifest(ours).save(str(tmp_path / "same"))
    assert check_output(str(tmp_path / "same"), ours) == Manifest(ours)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST_FILE).write_text("{")
    with pytest.raises(CacheOutputError, match="unreadable manifest"):
        check_output(str(tmp_path / "bad"), ours)


def test_command_line_flags_of_the_issue_map_onto_the_config():
    from pipelines.cache_hidden_states import build_parser, config_from_args

    argv = [
        "--model", "smollm2-135m-instruct", "--input", "s3://corpus/in/part-*.jsonl",
        "--output", "s3://corpus/cache", "--max-seq-len", "512", "--max-records", "100",
        "--shard-tokens", "4096", "--dtype", "fp32", "--regenerate", "--temperature", "0.7", "--seed", "3",
        "--num-actors", "2", "--batch-size", "4", "--gpus-per-actor", "1",
    ]  # fmt: skip
    c = config_from_args(build_parser().parse_args(argv))
    assert (c.model, c.input, c.output) == (argv[1], argv[3], argv[5])
    assert (c.max_seq_len, c.max_records, c.shard_tokens, c.dtype) == (512, 100, 4096, "fp32")
    assert (c.regenerate, c.regen_temperature, c.regen_seed) == (True, 0.7, 3)
    assert (c.num_actors, c.batch_size, c.gpus_per_actor) == (2, 4, 1.0)
    d = config_from_args(build_parser().parse_args(["--input", "in.jsonl", "--output", "out"]))
    defaults = (d.max_seq_len, d.max_records, d.dtype, d.regenerate, d.regen_temperature)
    assert defaults == (2048, None, "bf16", False, 0.0)


def test_one_gpu_per_target_actor_where_the_cluster_has_gpus():
    from pipelines.cache_hidden_states import ActorResources, actor_resources

    c = CacheConfig(input="in.jsonl", output="out", num_actors=2)
    assert actor_resources(c, {"CPU": 16.0, "GPU": 2.0}) == ActorResources(1.0, 8, "cuda")
    assert actor_resources(c, {"CPU": 2.0}) == ActorResources(0.0, 1, "cpu")
    forced = dataclasses.replace(c, gpus_per_actor=0.0, threads_per_actor=3)
    assert actor_resources(forced, {"CPU": 16.0, "GPU": 2.0}) == ActorResources(0.0, 3, "cpu")


def test_progress_lines_and_final_summary():
    from pipelines.cache_hidden_states import CacheSummary, _Progress

    lines: list[str] = []
    progress = _Progress(shards=4, records=40, tokens=4000, log=lines.append)
    progress.start -= 10.0  # as if the first shard took 10 s
    progress.update(records=10, tokens=1000, generated=0)
    assert lines[-1] == "shard 1/4: records 10/40 (1.0/s), tokens 1000/4000 (100/s), ETA 0m30s"

    summary = CacheSummary(
        output="out", records_read=53, records_cached=48, skipped={"malformed JSON": 3, SKIP_NO_ASSISTANT: 2},
        tokens_cached=12345, bytes_cached=2_500_000, shards=3, shards_written=2, tokens_written=8000,
        bytes_written=1_600_000, seconds=12.0, shard_seconds=8.0,
    )  # fmt: skip
    text = summary.format()
    assert f"records read 53, cached 48, skipped: 3 x malformed JSON, 2 x {SKIP_NO_ASSISTANT}" in text
    assert "tokens cached 12345, 2.5 MB in 3 shards" in text
    assert "2 shards written (1 kept), 8000 tokens, 1.6 MB, 1000 tokens/s over 8.0 s" in text
