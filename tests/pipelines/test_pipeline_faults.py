"""The caching job and the training job SIGKILLed mid-run, on tiny real inputs (the real SmolLM2-135M).

1. Training (`pipelines/distill.py` in a subprocess with its own local Ray): one Ray Train worker
   process is killed after Ray Train registered a checkpoint. With the default `ray.max_failures` the
   worker group restarts from that checkpoint by itself, and the exported drafter equals an
   uninterrupted run's, tensor for tensor. (The whole driver killed, then rerun, is
   tests/pipelines/test_train.py's test.)
2. Caching (Ray Data; the driver is a subprocess joined to a local Ray of this process, which outlives
   it as a cluster outlives a job), compared with an uninterrupted run's manifest (shard names,
   sha256s, record and token counts, summary: the file's text). First the shard actor (`ShardStage`)
   is killed: Ray starts another, retries the lost shards, and the same driver goes on listing shards
   identical to the uninterrupted run's. Then the driver is killed while shards remain, and a torn file
   is planted under the name of a shard it had not listed (what a crash mid-write would leave without
   the temp-then-rename) next to a stale temp file. The rerun keeps exactly the listed shards, rewrites
   every other one (the torn file is never trusted), removes the temp file and ends with the
   uninterrupted manifest. (The driver killed with its whole local Ray is
   tests/pipelines/test_cache_hidden_states.py's test.)
Each test prints a `[faults]` line with its figures (pytest -s), quoted in README "Pipeline faults".
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from pipelines.cache_hidden_states import CacheConfig, cache_hidden_states
from pipelines.config import RaySection
from pipelines.hidden_cache import MANIFEST_FILE, Manifest
from tests.pipelines.test_train import (
    _kill_tree,
    _weights,
    make_small_cache,
    registered_steps,
    run_distill,
    small_config,
    start_distill,
)

REPO = Path(__file__).resolve().parents[2]
N, MAX_LEN, SHARD_TOKENS = 16, 128, 256
COMMON = {"max_seq_len": MAX_LEN, "shard_tokens": SHARD_TOKENS, "threads_per_actor": 1, "progress": False}
SHARD_ACTOR = "ray::MapWorker(MapBatches(ShardStage))"
TRAIN_WORKER = "ray::RayTrainWorker"


def ray_processes(root_pid: int, title: str) -> list[psutil.Process]:
    """Live descendants of `root_pid` whose process title (Ray sets `ray::<actor>[.<method>]`) starts
    with `title`, lowest pid first."""
    found = []
    for p in psutil.Process(root_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if " ".join(p.cmdline()).startswith(title):
                found.append(p)
    return sorted(found, key=lambda p: p.pid)


def _figures(name: str, **values: object) -> None:
    print(f"[faults] {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()), flush=True)


# ---------------------------------------------------------------------------------------------------
# 1. Training


@pytest.fixture(scope="module")
def train_cache(tmp_path_factory, smollm2_path, smollm2_tokenizer) -> str:
    return make_small_cache(tmp_path_factory.mktemp("cache"), smollm2_path, smollm2_tokenizer)


def _logged_steps(log: Path) -> list[int]:
    return [int(s) for s in re.findall(r"\[train\] step (\d+)/", log.read_text())]


@pytest.mark.slow
def test_train_worker_killed_after_a_checkpoint_restarts_to_the_same_weights(train_cache, tmp_path):
    assert RaySection().max_failures >= 1, "the default config must restart a failed worker group"
    # 18 training records / 2 workers / batch 2 = 4 steps per epoch, 8 in all; checkpoints every 2
    common = {"train.checkpoint_every": 2}
    start = time.monotonic()
    done = run_distill(small_config(train_cache, tmp_path, "straight", **common))
    straight_seconds = time.monotonic() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    argv = small_config(train_cache, tmp_path, "worker-killed", **common)
    log = tmp_path / "worker-killed.log"
    start = time.monotonic()
    proc = start_distill(argv, log)
    run_dir = tmp_path / "ray_results" / "worker-killed"
    try:
        deadline = time.monotonic() + 400
        workers: list[psutil.Process] = []
        while time.monotonic() < deadline and proc.poll() is None:
            # between two checkpoints: one registered, and a step after it logged
            workers = ray_processes(proc.pid, TRAIN_WORKER)
            checkpoints = registered_steps(run_dir)
            if checkpoints and len(workers) == 2 and max(_logged_steps(log), default=0) > checkpoints[-1]:
                break
            time.sleep(0.1)
        assert proc.poll() is None, (
            f"the run ended before a worker could be killed: {log.read_text()[-3000:]}"
        )
        checkpoints = registered_steps(run_dir)
        assert checkpoints and len(workers) == 2, f"checkpoints {checkpoints}, workers {workers}"
        step_at_kill = max(_logged_steps(log), default=0)
        victim = workers[-1]
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()

        resumed_at = resumed_step = None
        while time.monotonic() < deadline and proc.poll() is None and resumed_step is None:
            found = re.search(r"resumed at step (\d+)", log.read_text())
            if found:
                resumed_at, resumed_step = time.monotonic(), int(found.group(1))
            time.sleep(0.1)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert resumed_step is not None, f"no restart from a checkpoint: {text[-4000:]}"
    # from the latest checkpoint registered at the kill, or a later one registered before the restart
    assert checkpoints[-1] <= resumed_step < 8, (checkpoints, resumed_step)

    a, b = _weights(tmp_path / "drafters" / "straight"), _weights(tmp_path / "drafters" / "worker-killed")
    assert a.keys() == b.keys()
    identical = all(torch.equal(a[k], b[k]) for k in a)
    _figures(
        "train worker SIGKILL",
        step_at_kill=step_at_kill,
        resumed_step=resumed_step,
        steps_redone=max(0, step_at_kill - resumed_step),
        kill_to_resumed_s=round(resumed_at - killed_at, 1),
        run_s=round(time.monotonic() - start, 1),
        uninterrupted_s=round(straight_seconds, 1),
        identical=identical,
    )
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------------
# 2. Caching


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def clean_cache(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "cache"
    summary = cache_hidden_states(CacheConfig(input="sharegpt", output=str(out), max_records=N, **COMMON))
    assert summary.shards >= 5, "too few shards to kill a run between two of them"
    return out, summary


def _config(out: Path) -> CacheConfig:
    return CacheConfig(input="sharegpt", output=str(out), max_records=N, **COMMON)


def _listed(out: Path) -> int:
    manifest = Manifest.load(str(out))  # replaced whole: never read half-written
    return len(manifest.shards) if manifest is not None else 0


def _same_as_clean(out: Path, clean: Path) -> None:
    """The manifest's text equals the clean run's; every file is one it lists, with its sha256."""
    assert (out / MANIFEST_FILE).read_text() == (clean / MANIFEST_FILE).read_text()
    manifest = Manifest.load(str(out))
    assert manifest is not None and manifest.summary["complete"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST_FILE, *(e.path for e in manifest.shards)]
    )
    for e in manifest.shards:
        assert hashlib.sha256((out / e.path).read_bytes()).hexdigest() == e.sha256, e.path


@pytest.mark.slow
def test_cache_actor_then_driver_killed_midrun_rerun_equals_clean(clean_cache, ray_local, tmp_path):
    clean, clean_summary = clean_cache
    clean_entries = {e.path: e for e in Manifest.load(str(clean)).shards}
    out = tmp_path / "cache"
    cmd = [
        sys.executable, str(REPO / "pipelines" / "cache_hidden_states.py"),
        "--input", "sharegpt", "--output", str(out), "--max-records", str(N), "--max-seq-len", str(MAX_LEN),
        "--shard-tokens", str(SHARD_TOKENS), "--threads-per-actor", "1", "--ray-address", ray_local,
    ]  # fmt: skip
    log = tmp_path / "driver.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=err)
    at: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 300
        # 1. the shard actor (a worker of this process's Ray) once a shard is listed and 3+ are left
        while time.monotonic() < deadline and proc.poll() is None:
            actors = ray_processes(os.getpid(), SHARD_ACTOR)
            listed_at_actor_kill = _listed(out)
            if actors and 1 <= listed_at_actor_kill <= clean_summary.shards - 3:
                actors[0].send_signal(signal.SIGKILL)
                at["actor_killed"] = time.monotonic()
                break
            time.sleep(0.02)
        assert "actor_killed" in at, (
            f"the run ended before its shard actor was killed: {log.read_text()[-3000:]}"
        )
        # 2. Ray starts another actor and the same driver lists the next shard
        while time.monotonic() < deadline and proc.poll() is None and _listed(out) <= listed_at_actor_kill:
            if "new_actor" not in at and any(
                a.pid != actors[0].pid for a in ray_processes(os.getpid(), SHARD_ACTOR)
            ):
                at["new_actor"] = time.monotonic()
            time.sleep(0.02)
        at["next_shard"] = time.monotonic()
        # 3. the driver, while shards are left
        assert proc.poll() is None, f"the run ended before its driver was killed: {log.read_text()[-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        at["driver_killed"] = time.monotonic()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert "new_actor" in at, f"no actor replaced the killed one: {log.read_text()[-3000:]}"

    partial = Manifest.load(str(out))
    assert partial is not None and not partial.summary.get("complete")
    assert listed_at_actor_kill < len(partial.shards) < clean_summary.shards
    assert all(clean_entries[e.path] == e for e in partial.shards)  # listed shards are final ones
    # a torn file under the name of a shard the manifest does not list, and a writer's stale temp
    unlisted = sorted(set(clean_entries) - {e.path for e in partial.shards})
    (out / unlisted[0]).write_bytes((clean / unlisted[0]).read_bytes()[:4096])
    (out / f".{unlisted[-1]}.tmp-1-deadbeef").write_bytes(b"half a shard")

    rerun = cache_hidden_states(_config(out))
    assert rerun.shards_written == len(unlisted)  # exactly the unlisted shards, the torn one included
    _same_as_clean(out, clean)
    _figures(
        "cache actor then driver SIGKILL",
        shards=clean_summary.shards,
        listed_at_actor_kill=listed_at_actor_kill,
        actor_kill_to_next_shard_s=round(at["next_shard"] - at["actor_killed"], 1),
        listed_at_driver_kill=len(partial.shards),
        shards_rewritten=rerun.shards_written,
        rerun_s=round(rerun.seconds, 1),
        uninterrupted_s=round(clean_summary.seconds, 1),
        identical=True,
    )
