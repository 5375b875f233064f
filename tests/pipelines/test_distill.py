"""`pipelines/distill.py` end to end: `--profile tiny` on a local Ray with 2 CPU workers (cache -> train ->
evaluate -> export), the exported drafter decoding losslessly, a rerun that finds the cache and the
finished run, and `ray job submit` against a local `ray start --head`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
DISTILL = REPO / "pipelines" / "distill.py"
TINY_BUDGET_S = 600


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`python pipelines/distill.py --profile tiny` into a fresh cache, storage and output folder."""
    tmp = tmp_path_factory.mktemp("tiny")
    argv = [
        "--profile", "tiny",
        "--data.cache_url", str(tmp / "cache"),
        "--ray.storage_path", str(tmp / "ray_results"),
        "--output.dir", str(tmp / "drafter"),
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(DISTILL), *argv], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=TINY_BUDGET_S + 120)  # fmt: skip
    seconds = time.perf_counter() - start
    return {"tmp": tmp, "argv": argv, "proc": proc, "seconds": seconds}


@pytest.mark.slow
def test_tiny_profile_end_to_end_exports_a_lossless_drafter(tiny_run, smollm2_path):
    from transformers import AutoTokenizer

    from falcon_core.checkpoint import TargetIdentity, load_drafter
    from falcon_core.generate import Engine
    from falcon_core.target import load_target
    from falcon_core.tree import get_tree
    from pipelines.evaluate import load_prompts

    proc = tiny_run["proc"]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert tiny_run["seconds"] < TINY_BUDGET_S, f"--profile tiny took {tiny_run['seconds']:.0f} s"
    out = tiny_run["tmp"] / "drafter"
    card = json.loads((out / "config.json").read_text())["card"]
    assert card["training"]["objective"] == "csgd" and card["training"]["workers"] == 2
    assert card["training"]["steps"] > 0 and card["data"]["records"] > 0
    assert len(card["heldout_top1"]) == 2 and card["heldout_positions"] > 0
    assert card["tau"] >= 1.0 and len(card["acceptance"]) == 4  # depths 1..2K for K = 2
    history = card["training"]["history"]  # the learning curve: one entry per epoch
    assert [h["epoch"] for h in history] == list(range(card["training"]["epochs"]))
    assert history[-1]["step"] == card["training"]["steps"]
    assert 0 < history[0]["tokens"] < history[-1]["tokens"] and all(
        len(h["heldout_top1"]) == 2 for h in history
    )
    from bench.learning_curve import main as learning_curve

    assert learning_curve(["--drafter", str(out), "--out", str(tiny_run["tmp"] / "curve")]) == 0
    curve = json.loads((tiny_run["tmp"] / "curve" / "learning_curve.json").read_text())
    assert [p["tokens"] for p in curve[0]["points"]] == [h["tokens"] for h in history]
    assert (tiny_run["tmp"] / "curve" / "learning_curve.png").stat().st_size > 1000
    print(f"tiny: {tiny_run['seconds']:.0f} s, held-out top-1 {card['heldout_top1']}, tau {card['tau']}")

    # the drafter loads against the target and decodes exactly as plain greedy decoding in fp32
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    target = load_target(smollm2_path, dtype="fp32")
    identity = TargetIdentity.of("smollm2-135m-instruct", target.config, tokenizer)
    drafter = load_drafter(out, expected_identity=identity).drafter.eval()
    spec = Engine(target, tokenizer, drafter, tree=get_tree("chain-4"))
    plain = Engine(target, tokenizer, None)
    for p in load_prompts("mtbench", 3):
        a = spec.generate(**p, max_new_tokens=32)
        b = plain.generate(**p, max_new_tokens=32)
        assert a.token_ids == b.token_ids
        assert a.stats.speculative_steps > 0  # the drafter was really used


@pytest.mark.slow
def test_rerun_finds_the_cache_and_the_finished_run(tiny_run):
    assert tiny_run["proc"].returncode == 0
    out = tiny_run["tmp"] / "drafter"
    before = (out / "model.safetensors").read_bytes()
    again = subprocess.run([sys.executable, str(DISTILL), *tiny_run["argv"], "--eval.tau_prompts", "0"], cwd=REPO,
                           env=_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "complete and matching" in again.stdout and "[cache] plan" not in again.stdout
    assert (out / "model.safetensors").read_bytes() == before  # nothing left to train: same weights


@pytest.mark.slow
def test_ray_job_submit_against_a_local_head(tiny_run, tmp_path):
    """`ray start --head` (stopped by its own pid, not `ray stop`, which would stop every Ray on the
    machine) and `ray job submit --working-dir . -- python pipelines/distill.py --config X.yaml`."""
    assert tiny_run["proc"].returncode == 0
    tiny_cache = tiny_run["tmp"] / "cache"
    config = {
        "name": "job-submit",
        "data": {"cache_url": str(tiny_cache)},  # the tiny profile's cache: found complete, not rebuilt
        "train": {"max_steps": 2, "epochs": 1},
        "ray": {"storage_path": str(tmp_path / "ray_results")},
        "eval": {"tau_prompts": 0},
        "output": {"dir": str(tmp_path / "drafter")},
    }
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text(yaml.safe_dump(config))
    ray_bin = Path(sys.executable).parent / "ray"
    port, dash = _free_port(), _free_port()
    ray_tmp = Path(tempfile.mkdtemp(prefix="falcon-ray-", dir="/tmp"))  # unix socket paths must stay short
    # Ray 2.60's `ray start --head` turns on token authentication; the CLI sends the token only in token mode
    env = _env(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", RAY_AUTH_MODE="token"
    )
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--num-cpus", "2", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dash), "--temp-dir", str(ray_tmp)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while time.time() < deadline:
            probe = subprocess.run([str(ray_bin), "job", "list", "--address", address], env=env,
                                   capture_output=True, text=True)  # fmt: skip
            if probe.returncode == 0:
                break
            assert head.poll() is None, head.stdout.read() if head.stdout else "ray start exited"
            time.sleep(2)
        # the job API answers before the node's job agent is up; until then a submission is refused
        # with "No available agent" and nothing runs, so it is safe to resubmit (as a user would)
        for _ in range(30):
            submit = subprocess.run(
                [str(ray_bin), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
                 "python", "pipelines/distill.py", "--profile", "tiny", "--config", str(cfg_file)],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            log = submit.stdout + submit.stderr
            if submit.returncode == 0 or "No available agent" not in log:
                break
            time.sleep(2)
        assert submit.returncode == 0, log[-4000:]
        assert "succeeded" in log and "complete and matching" in log
        card = json.loads((tmp_path / "drafter" / "config.json").read_text())["card"]
        assert card["training"]["steps"] == 2
    finally:
        head.terminate()  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_export_to_s3_uploads_a_loadable_checkpoint(s3_endpoint, tmp_path):
    """`output.dir: s3://...` (the RayJob's setting): the drafter lands in the bucket, config.json last."""
    import boto3
    import fsspec

    from falcon_core.checkpoint import TargetIdentity, load_drafter
    from falcon_core.drafter import Drafter, DrafterConfig
    from pipelines.distill import export_drafter

    boto3.client("s3").create_bucket(Bucket="drafters")
    cfg = DrafterConfig(
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        vocab_size=64,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=128,
    )
    ident = TargetIdentity(name="tiny", hidden_size=32, vocab_size=64, tokenizer_hash="0" * 64)
    out = export_drafter("s3://drafters/run-1", Drafter(cfg), cfg, ident, {"tau": 1.0})
    assert out == "s3://drafters/run-1"
    fs = fsspec.filesystem("s3")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("drafters/run-1")) == [
        "config.json",
        "model.safetensors",
    ]
    fs.get("drafters/run-1/", str(tmp_path / "back") + "/", recursive=True)
    assert load_drafter(tmp_path / "back", expected_identity=ident).card == {"tau": 1.0}
