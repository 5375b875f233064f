"""Ray Train loop: record split and data order, lr schedule, DeepSpeed ZeRO-2 on CPU (gloo), and a run
killed after a checkpoint then resumed ending with the same weights as an uninterrupted run.

The slow tests train the real SmolLM2 drafter shape on a small cache made here from real target
hidden states (20 short ShareGPT conversations), written directly in the cache format.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipelines.train import RecordSplit, epoch_batches, lr_factor

REPO = Path(__file__).resolve().parents[2]
RECORDS, MAX_SEQ_LEN, TOPK = 20, 192, 16


def test_record_split_is_contiguous_per_rank_with_the_tail_held_out():
    s = RecordSplit.build(23, 3, 2)
    assert s.heldout == range(20, 23)
    assert s.ranges == (range(0, 10), range(10, 20))
    assert s.steps_per_epoch(4) == 2
    s3 = RecordSplit.build(23, 3, 3)
    assert [len(r) for r in s3.ranges] == [6, 7, 7] and s3.steps_per_epoch(3) == 2
    with pytest.raises(ValueError, match="fewer than the 4 workers"):
        RecordSplit.build(5, 2, 4)
    with pytest.raises(ValueError, match="lower the batch size"):
        RecordSplit.build(10, 0, 2).steps_per_epoch(6)


def test_a_rank_reads_only_the_shards_its_records_lie_in(tmp_path, monkeypatch):
    from pipelines.hidden_cache import HiddenCacheReader
    from pipelines.train import read_records
    from tests.pipelines.test_hidden_cache import _records, _write_cache

    shards = [_records([5, 6, 7], seed=s) for s in range(4)]  # records 0-2, 3-5, 6-8, 9-11
    _write_cache(str(tmp_path), shards)
    reader = HiddenCacheReader(str(tmp_path))
    opened: list[int] = []
    read_shard = reader.read_shard

    def counted(i: int):
        opened.append(i)
        return read_shard(i)

    monkeypatch.setattr(reader, "read_shard", counted)
    split = RecordSplit.build(12, heldout=2, world=2)  # ranks: records 0-4 and 5-9; held out: 10-11
    got = read_records(reader, split.ranges[1], max_len=6)
    assert opened == [1, 2, 3]  # record 5 lies in shard 1, record 9 in shard 3; shard 0 is not read
    expected = [r for s in shards for r in s][5:10]
    assert [r.input_ids.tolist() for r in got] == [r.input_ids[:6].tolist() for r in expected]
    opened.clear()
    assert len(read_records(reader, split.ranges[0], max_len=64)) == 5 and opened == [0, 1]


def test_epoch_batches_are_a_deterministic_function_of_the_seed():
    lengths = [5, 50, 7, 30, 12, 44, 9, 21, 18, 3, 60]
    a = epoch_batches(lengths, 2, 5, 2, seed=11)
    assert a == epoch_batches(lengths, 2, 5, 2, seed=11)
    assert a != epoch_batches(lengths, 2, 5, 2, seed=12)
    flat = [i for b in a for i in b]
    assert len(a) == 5 and all(len(b) == 2 for b in a) and len(set(flat)) == 10
    # bucketing: inside a chunk of 2 batches, records are sorted by length (longest first)
    for b in a:
        assert lengths[b[0]] >= lengths[b[1]]


def test_lr_factor_warmup_then_decay():
    f = [lr_factor(s, 4, 20, "cosine", 0.1) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1, abs=0.01)
    assert all(a >= b for a, b in itertools.pairwise(f[4:]))
    lin = [lr_factor(s, 0, 10, "linear", 0.0) for s in range(11)]
    assert lin[0] == 1.0 and lin[10] == pytest.approx(0.0) and lin[5] == pytest.approx(0.5)
    assert lr_factor(100, 5, 20, "constant", 0.1) == 1.0


# ---------------------------------------------------------------------------------------------------
# A small real cache


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, smollm2_path, smollm2_tokenizer) -> str:
    return make_small_cache(tmp_path_factory.mktemp("cache"), smollm2_path, smollm2_tokenizer)


def make_small_cache(folder: Path, smollm2_path: Path, smollm2_tokenizer) -> str:
    """RECORDS short ShareGPT conversations with the target's hidden states and top-TOPK, in 2 shards,
    written to `folder/small`; returns its URL."""
    from falcon_core import chat
    from falcon_core.checkpoint import TargetIdentity
    from falcon_core.data import read_sharegpt
    from falcon_core.target import load_target
    from pipelines.hidden_cache import (
        CachedRecord,
        CacheMetadata,
        Manifest,
        ShardData,
        ShardEntry,
        chat_template_hash,
        shard_name,
        write_shard,
    )

    url = str(folder / "small")
    target = load_target(smollm2_path, dtype="fp32")
    records = []
    torch.set_num_threads(1)
    for conv in read_sharegpt(max_records=200).conversations:
        try:
            r = chat.render(smollm2_tokenizer, conv.as_dicts())
        except ValueError:
            continue
        ids, mask = r.input_ids[:MAX_SEQ_LEN], r.loss_mask[:MAX_SEQ_LEN]
        if sum(mask) < 8 or len(ids) < 32:
            continue
        x = torch.tensor(ids)[None]
        with torch.no_grad():
            out = target(x, torch.arange(len(ids))[None])
        top = out.logits[0].float().log_softmax(-1).topk(TOPK, -1)
        records.append(
            CachedRecord(
                input_ids=x[0].int(),
                loss_mask=torch.tensor(mask, dtype=torch.uint8),
                hidden=out.hidden[0].bfloat16(),
                topk_ids=top.indices.int(),
                topk_logprobs=top.values.half(),
            )
        )
        if len(records) == RECORDS:
            break
    identity = TargetIdentity.of("smollm2-135m-instruct", target.config, smollm2_tokenizer)
    meta = CacheMetadata(identity, chat_template_hash(smollm2_tokenizer), MAX_SEQ_LEN, "bf16", topk=TOPK)
    entries, first = [], 0
    for i, part in enumerate((records[:12], records[12:])):
        shard = ShardData.from_records(part)
        w = write_shard(url, shard_name(i), shard)
        entries.append(ShardEntry(w.path, shard.num_records, shard.num_tokens, w.sha256, w.bytes,
                                  first, first + len(part), "00" * 32))  # fmt: skip
        first += len(part)
    summary = {
        "complete": True,
        "records_read": RECORDS,
        "records_cached": RECORDS,
        "tokens": sum(e.tokens for e in entries),
    }
    Manifest(meta, tuple(entries), summary).save(url)
    return url


def small_config(cache: str, tmp: Path, name: str, **overrides) -> list[str]:
    """Command-line options of a short run on the small cache (the cache stage finds it complete)."""
    opts = {
        "name": name,
        "data.cache_url": cache,
        "data.max_records": RECORDS,
        "data.max_seq_len": MAX_SEQ_LEN,
        "data.topk": TOPK,
        "objective.vocab_subset": 2048,
        "train.epochs": 2,
        "train.batch_size": 2,
        "train.max_len": MAX_SEQ_LEN,
        "train.warmup_steps": 2,
        "train.lr": 1e-3,
        "train.log_every": 1,
        "train.threads_per_worker": 1,
        "ray.num_workers": 2,
        "ray.local_num_cpus": 2,
        "ray.storage_path": str(tmp / "ray_results"),
        "eval.heldout_records": 2,
        "eval.tau_prompts": 0,
        "eval.acceptance_ranks": 2,
        "eval.threads": 1,
        "output.dir": str(tmp / "drafters" / name),
    }
    opts.update(overrides)
    argv = []
    for key, value in opts.items():
        argv += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    return argv


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return env


def run_distill(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "pipelines" / "distill.py"), *argv]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def start_distill(argv: list[str], log: Path) -> subprocess.Popen:
    """The distillation driver started in its own session, its output going to `log` (kill it with
    `_kill_tree`)."""
    with open(log, "w") as out:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, str(REPO / "pipelines" / "distill.py"), *argv], cwd=REPO,
                                env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def registered_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train's controller has registered for the run in `run_dir`.

    Ray Train resumes from these (listed in its snapshot), not from every folder that reached storage.
    """
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    text = snapshot.read_text() if snapshot.is_file() else ""
    return sorted({int(m) for m in re.findall(r"checkpoint_step(\d{7})", text)})


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and every process it started (by pid: the driver's local Ray included)."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        family = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.slow
def test_a_step_is_adamw_with_warmup_under_bf16_autocast_with_gradients_clipped_by_value(
    small_cache, smollm2_path, smollm2_tokenizer, tmp_path
):
    """One worker's optimizer steps (no Ray needed for a single rank): AdamW with the configured betas,
    the lr warming up linearly, the drafter's forward under bf16 autocast, every gradient element
    clipped to `train.grad_clip`."""
    from falcon_core.checkpoint import TargetIdentity
    from falcon_core.target import TargetConfig
    from pipelines.config import parse_config
    from pipelines.train import TrainJob, Worker

    opts = {"ray.num_workers": 1, "train.warmup_steps": 4, "train.grad_clip": 1e-4}
    cfg = parse_config(small_config(small_cache, tmp_path, "steps", **opts))
    identity = TargetIdentity.of(cfg.target.model, TargetConfig.from_file(smollm2_path), smollm2_tokenizer)
    job = TrainJob(cfg.to_dict(), str(smollm2_path), small_cache, dataclasses.asdict(identity))
    worker = Worker(job, rank=0, world=1)
    assert isinstance(worker.optimizer, torch.optim.AdamW)
    assert worker.optimizer.defaults["betas"] == (0.9, 0.95)
    forwards: list[tuple[bool, torch.dtype]] = []
    worker.drafter.register_forward_hook(
        lambda module, args, out: forwards.append((torch.is_autocast_enabled("cpu"), out.dtype))
    )
    lrs = []
    for _ in range(3):
        before = [p.detach().clone() for p in worker.drafter.parameters()]
        out = worker.train_step(worker.records[:2], epoch=0)
        worker.step += 1
        lrs.append(worker._lr())
        grads = [p.grad for p in worker.drafter.parameters() if p.grad is not None]
        assert grads and max(float(g.abs().max()) for g in grads) <= 1e-4
        assert torch.isfinite(out.loss) and any(
            not torch.equal(a, b) for a, b in zip(before, worker.drafter.parameters(), strict=True)
        )
    assert lrs == pytest.approx([0.5e-3, 0.75e-3, 1e-3])  # linear warmup over 4 steps to train.lr
    assert forwards and all(enabled and dtype == torch.bfloat16 for enabled, dtype in forwards)


@pytest.mark.slow
def test_killed_after_a_checkpoint_then_resumed_equals_uninterrupted(small_cache, tmp_path):
    # 18 training records / 2 workers / batch 2 = 4 steps per epoch, 8 in all; checkpoints every 2
    common = {"train.checkpoint_every": 2}
    done = run_distill(small_config(small_cache, tmp_path, "straight", **common))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "not rebuilt" in done.stdout

    argv = small_config(small_cache, tmp_path, "killed", **common)
    proc = start_distill(argv, tmp_path / "killed.log")
    run_dir = tmp_path / "ray_results" / "killed"
    # kill only once a checkpoint is registered (Ray Train resumes from those only)
    deadline = time.time() + 400
    try:
        while time.time() < deadline and proc.poll() is None and not registered_steps(run_dir):
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        assert registered_steps(run_dir), "no registered checkpoint within the deadline"
    finally:
        _kill_tree(proc)
    steps = registered_steps(run_dir)
    assert steps and steps[-1] < 8, f"killed too late: checkpoints at steps {steps}"
    assert not (tmp_path / "drafters" / "killed").exists()

    resumed = run_distill(argv)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed at step {steps[-1]}" in resumed.stdout + resumed.stderr
    a, b = _weights(tmp_path / "drafters" / "straight"), _weights(tmp_path / "drafters" / "killed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    card = json.loads((tmp_path / "drafters" / "killed" / "config.json").read_text())["card"]
    assert card["training"]["steps"] == 8 and len(card["heldout_top1"]) == 2


@pytest.mark.slow
def test_deepspeed_zero2_on_cpu_trains_checkpoints_to_s3_and_resumes(small_cache, tmp_path, s3_endpoint):
    """Two gloo ranks under ZeRO-2 each write their optimizer shard into one checkpoint in S3 (moto);
    a second fit of the same run restores both shards and continues."""
    import boto3
    import ray

    from falcon_core.checkpoint import TargetIdentity, load_drafter
    from falcon_core.resolve import resolve_model
    from falcon_core.target import TargetConfig
    from pipelines.config import parse_config
    from pipelines.train import DEEPSPEED_DIR, DRAFTER_DIR, TrainJob, run_training

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    os.environ.setdefault("DS_BUILD_OPS", "0")
    opts = {
        "train.deepspeed": True,
        "train.grad_clip_mode": "norm",
        "train.grad_clip": 1.0,
        "train.max_steps": 3,
    }
    cfg = parse_config(small_config(small_cache, tmp_path, "ds", **opts))
    folder = resolve_model(cfg.target.model)
    from transformers import AutoTokenizer

    identity = TargetIdentity.of(
        cfg.target.model, TargetConfig.from_file(folder), AutoTokenizer.from_pretrained(folder)
    )
    job = TrainJob(cfg.to_dict(), str(folder), small_cache, dataclasses.asdict(identity))
    boto3.client("s3").create_bucket(Bucket="falcon-train")
    storage = "s3://falcon-train/ray_results"
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        first = run_training(job, storage)
        ckpt = Path(first.checkpoint.to_directory(str(tmp_path / "ckpt3")))
        files = sorted(p.name for p in (ckpt / DEEPSPEED_DIR / "state").iterdir())
        assert any("zero_pp_rank_0" in f for f in files) and any("zero_pp_rank_1" in f for f in files), files
        assert json.loads((ckpt / "progress.json").read_text())["step"] == 3
        assert first.metrics["step"] == 3
        w3 = load_drafter(ckpt / DRAFTER_DIR).drafter.state_dict()
        # the same run asked for 2 more steps resumes from the DeepSpeed checkpoint at step 3
        cfg5 = cfg.replace({"train.max_steps": 5})
        second = run_training(dataclasses.replace(job, config=cfg5.to_dict()), storage)
        assert second.metrics["step"] == 5
        ckpt5 = Path(second.checkpoint.to_directory(str(tmp_path / "ckpt5")))
        w5 = load_drafter(ckpt5 / DRAFTER_DIR).drafter.state_dict()
        kept = boto3.client("s3").list_objects_v2(Bucket="falcon-train", Prefix="ray_results/ds/checkpoint_")
        names = {o["Key"].split("/")[2] for o in kept.get("Contents", [])} - {
            "checkpoint_manager_snapshot.json"
        }
        # steps 3 (max_steps), 4 (epoch end) and 5 were checkpointed; keep_checkpoints = 2 kept the last two
        assert names == {"checkpoint_step0000004", "checkpoint_step0000005"}, names
        assert any(not torch.equal(w3[k], w5[k]) for k in w3)
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_no_csgd_run_validates_every_epoch_with_heldout_top1_and_decoded_tau(small_cache, tmp_path):
    """`--no-csgd` (the EAGLE-style ablation) end to end, with validation at each epoch's end inside the
    Ray Train workers: top-1 per block position on held-out cached records, and tau from decoding a
    held-out prompt with the falcon_core engine; the card keeps both per epoch."""
    # 4 steps per epoch; max_steps 5 ends epoch 1 early, which validates too
    opts = {"train.max_steps": 5, "eval.tau_prompts": 1, "eval.tau_max_new_tokens": 8,
            "eval.tau_each_epoch": True}  # fmt: skip
    done = run_distill([*small_config(small_cache, tmp_path, "validated", **opts), "--no-csgd"])
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    card = json.loads((tmp_path / "drafters" / "validated" / "config.json").read_text())["card"]
    assert card["training"]["objective"] == "eagle"
    assert card["training"]["config"]["objective"]["csgd"] is False
    glanced = dict(re.findall(r"\[train\] step (\d)/5 .* glanced ([0-9.]+) ", log))  # a line may come twice
    assert sorted(glanced) == ["1", "2", "3", "4", "5"]
    assert {float(g) for g in glanced.values()} == {0.0}  # no glancing without CSGD
    history = card["training"]["history"]
    assert [(h["epoch"], h["step"]) for h in history] == [(0, 4), (1, 5)]
    for h in history:
        assert len(h["heldout_top1"]) == 2 and all(0.0 <= x <= 1.0 for x in h["heldout_top1"])
        assert h["tau"] >= 1.0 and len(h["acceptance_per_depth"]) >= 2
    assert set(re.findall(r"\[train\] epoch (\d) validation: .*'tau'", log)) == {"0", "1"}
    assert card["tau"] >= 1.0 and card["tau_setup"]["n"] == 1
