"""CSGD distillation on Ray Train: the per-worker train loop and the driver function that runs it.

Each Ray Train worker (a data-parallel rank, gloo on CPU or NCCL on GPU) loads the frozen target pieces
it needs (embedding and LM head; a target layer to initialise the drafter from), reads *its part* of
the hidden-state cache and trains the drafter with `pipelines.csgd`:
- Data. Records are numbered in manifest order. The last `eval.heldout_records` are held out; the rest
  are cut into `world_size` contiguous ranges, one per rank, so a rank reads only the shards its range
  touches. Each epoch a rank shuffles its records with a generator seeded by (seed, epoch, rank), sorts
  chunks of `bucket_batches` batches by length (less padding) and shuffles the batch order. Every rank
  runs the same number of steps per epoch (the smallest rank's count).
- Randomness. Each step draws offsets, noise, glances and sampled labels from a generator seeded by
  (seed, step, rank), so the data order and every draw are functions of the step: a run resumed from a
  checkpoint continues exactly as the uninterrupted run would have.
- Optimisation. AdamW with linear warmup then cosine / linear / constant decay (per step), bf16
  autocast of the forward (fp32 weights and optimizer), gradient clipping by value (the paper's 0.5) or
  norm; DDP, or DeepSpeed ZeRO (stage 1-3) with `train.deepspeed`.
- Checkpoints every `train.checkpoint_every` steps and at every epoch end, through
  `ray.train.report(metrics, checkpoint=...)` into the run's storage (local or `s3://`), keeping the
  last `train.keep_checkpoints`. A checkpoint holds `train_state.pt` (drafter, optimizer, scheduler,
  step; DeepSpeed: its own per-rank files under `deepspeed/`), `drafter/` in the falcon_core drafter
  format and `progress.json`. Running the same job again (same name and storage path) resumes from the
  latest checkpoint.
- Validation at every epoch end: top-1 agreement per block position on the held-out records (split
  across ranks, summed), and tau from decoding held-out prompts with the falcon_core engine (rank 0).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from falcon_core.checkpoint import TargetIdentity, save_drafter
from falcon_core.drafter import Drafter, DrafterConfig
from falcon_core.target import TargetConfig, load_target
from pipelines.config import DistillConfig
from pipelines.csgd import Batch, TokenHead, csgd_loss, glance_lambda, token_counts, training_vocabulary
from pipelines.hidden_cache import CachedRecord, HiddenCacheReader

STATE_FILE = "train_state.pt"
PROGRESS_FILE = "progress.json"
DRAFTER_DIR = "drafter"
DEEPSPEED_DIR = "deepspeed"


# ---------------------------------------------------------------------------------------------------
# What the driver hands to every worker


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs, as plain data (sent to every worker)."""

    config: dict[str, Any]
    """`DistillConfig.to_dict()`."""
    target_folder: str
    """Local HF folder of the target on the workers' machines."""
    cache_url: str
    identity: dict[str, Any]
    """`TargetIdentity` of the target (stored in drafter checkpoints)."""

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "target_folder": self.target_folder, "cache_url": self.cache_url,
                "identity": self.identity}  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Data: which records a rank reads, and in which order


@dataclass(frozen=True)
class RecordSplit:
    """Global record numbers (manifest order) held out, and the contiguous training range of each rank."""

    num_records: int
    heldout: range
    ranges: tuple[range, ...]
    """Training records of each rank."""

    @classmethod
    def build(cls, num_records: int, heldout: int, world: int) -> RecordSplit:
        train = num_records - heldout
        if train < world:
            raise ValueError(
                f"the cache has {num_records} records: {heldout} held out leaves {train} to train on, "
                f"fewer than the {world} workers"
            )
        ranges = tuple(range(train * r // world, train * (r + 1) // world) for r in range(world))
        return cls(num_records, range(train, num_records), ranges)

    def steps_per_epoch(self, batch_size: int) -> int:
        steps = min(len(r) for r in self.ranges) // batch_size
        if steps == 0:
            raise ValueError(
                f"a worker holds {min(len(r) for r in self.ranges)} training records, fewer than "
                f"train.batch_size={batch_size}: lower the batch size or cache more records"
            )
        return steps


def read_records(reader: HiddenCacheReader, wanted: range, max_len: int) -> list[CachedRecord]:
    """Records `wanted` (global numbers) truncated to `max_len`, reading only the shards they lie in."""
    out: list[CachedRecord] = []
    first = 0
    for i, entry in enumerate(reader.shards):
        lo, hi = max(first, wanted.start), min(first + entry.records, wanted.stop)
        if lo < hi:
            shard = reader.read_shard(i)
            for j in range(lo - first, hi - first):
                out.append(_truncated(shard.record(j), max_len))
        first += entry.records
    return out


def _truncated(r: CachedRecord, n: int) -> CachedRecord:
    """A copy of the first n tokens (a copy, so the shard's buffers can be freed)."""
    topk = r.topk_ids is not None and r.topk_logprobs is not None
    return CachedRecord(
        input_ids=r.input_ids[:n].clone(),
        loss_mask=r.loss_mask[:n].clone(),
        hidden=r.hidden[:n].clone(),
        topk_ids=r.topk_ids[:n].clone() if topk else None,
        topk_logprobs=r.topk_logprobs[:n].clone() if topk else None,
    )


def epoch_batches(lengths: list[int], batch_size: int, steps: int, bucket: int, seed: int) -> list[list[int]]:
    """`steps` batches of local record indices for one epoch (shuffle, length buckets, shuffle batches)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g).tolist()[: steps * batch_size]
    chunk = batch_size * bucket
    batches = []
    for c in range(0, len(order), chunk):
        part = sorted(order[c : c + chunk], key=lambda i: -lengths[i])
        batches += [part[b : b + batch_size] for b in range(0, len(part), batch_size)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[p] for p in perm]


def _seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (stable across runs and machines)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


# ---------------------------------------------------------------------------------------------------
# Learning-rate schedule


def lr_factor(step: int, warmup: int, total: int, decay: str, min_ratio: float) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warmup, then decay to min_ratio."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if decay == "constant" or total <= warmup:
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    if decay == "linear":
        return 1.0 - (1.0 - min_ratio) * t
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


# ---------------------------------------------------------------------------------------------------
# The worker


def train_loop_per_worker(job_dict: dict[str, Any]) -> None:
    """Ray Train entry point (`TorchTrainer(train_loop_per_worker, train_loop_config=job.to_dict())`)."""
    import ray.train

    job = TrainJob(**job_dict)
    ctx = ray.train.get_context()
    worker = Worker(job, ctx.get_world_rank(), ctx.get_world_size())
    worker.restore(ray.train.get_checkpoint())
    worker.run()


def _device(use_gpu: bool) -> torch.device:
    """The worker's device: the GPU Ray Train assigned to it, or the CPU."""
    if not use_gpu:
        return torch.device("cpu")
    from ray.train.torch import get_device

    device = get_device()
    torch.cuda.set_device(device)
    return device


class Worker:
    """One data-parallel rank: frozen target pieces, its records, the drafter and its optimizer."""

    def __init__(self, job: TrainJob, rank: int, world: int) -> None:
        self.cfg = cfg = DistillConfig.from_dict(job.config)
        self.job, self.rank, self.world = job, rank, world
        t, o = cfg.train, cfg.objective
        threads = t.threads_per_worker or max(1, int(cfg.ray.cpus_per_worker))
        torch.set_num_threads(threads)
        self.device = _device(cfg.ray.use_gpu)
        self.K = cfg.drafter.block_size
        self.identity = TargetIdentity(**job.identity)

        # 1. data: this rank's training records and its share of the held-out ones
        reader = HiddenCacheReader(job.cache_url, expected_target=self.identity)
        self.split = RecordSplit.build(reader.num_records, cfg.eval.heldout_records, world)
        self.steps_per_epoch = self.split.steps_per_epoch(t.batch_size)
        full = cfg.train.epochs * self.steps_per_epoch
        self.total_steps = min(full, t.max_steps) if t.max_steps else full
        self.records = read_records(reader, self.split.ranges[rank], t.max_len)
        held = self.split.heldout
        self.heldout = [r for i, r in enumerate(read_records(reader, held, t.max_len)) if i % world == rank]
        self.lengths = [r.input_ids.shape[0] for r in self.records]

        # 2. frozen target pieces, the drafter, the training head
        target = load_target(job.target_folder, dtype="fp32", device="cpu")
        self.target_config: TargetConfig = target.config
        self.embed = target.embed.weight.detach().to(self.device)  # (V, H)
        lm_head = target.lm_head.weight.detach().to(self.device)  # (V, H)
        self.full_head = TokenHead.build(lm_head)
        self.head = self._training_head(lm_head, o.vocab_subset)
        # A drafter trained over a vocabulary subset drafts from it (its draft vocabulary, FR-Spec style).
        subset = self.head is not self.full_head
        self.drafter_config = DrafterConfig.from_target(
            target.config,
            block_size=self.K,
            num_layers=cfg.drafter.num_layers,
            fusion=cfg.drafter.fusion,
            draft_vocab_size=self.head.ids.numel() if subset else 0,
        )
        torch.manual_seed(t.seed)
        drafter = Drafter(self.drafter_config)
        if subset:
            drafter.set_draft_vocab(self.head.ids.cpu())
        if cfg.drafter.init_from_layer is not None:
            drafter.init_from_target_layer(target, cfg.drafter.init_from_layer % target.config.num_layers)
        del target
        self.drafter = drafter.to(self.device)

        # 3. optimisation
        self.engine: Any = None
        self.optimizer = torch.optim.AdamW(
            self.drafter.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, t.warmup_steps, self.total_steps, t.decay, t.min_lr_ratio),
        )
        if t.deepspeed:
            self.model = self._deepspeed()
        elif world > 1:
            ids = [self.device] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.drafter, device_ids=ids)
        else:
            self.model = self.drafter
        self.step = 0
        self.history: list[dict[str, Any]] = []
        """One entry per finished epoch: step, tokens trained on so far (all ranks), validation."""
        self.evaluator: Any = None

    def _training_head(self, lm_head: torch.Tensor, n: int) -> TokenHead:
        """Full vocabulary, or the n most frequent loss-masked tokens over every rank's training records."""
        if n == 0 or n >= lm_head.shape[0]:
            return self.full_head
        V = lm_head.shape[0]
        counts = token_counts(self.records, V)  # (V,)
        if self.world > 1:
            dist.all_reduce(counts)
        return TokenHead.build(lm_head, training_vocabulary(counts, n, self.target_config.eos_token_ids))

    def _deepspeed(self) -> Any:
        import deepspeed

        t = self.cfg.train
        for key, value in (("RANK", self.rank), ("WORLD_SIZE", self.world), ("LOCAL_RANK", self.rank)):
            os.environ.setdefault(key, str(value))
        ds_config = {
            "train_micro_batch_size_per_gpu": t.batch_size,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": t.zero_stage},
            "gradient_clipping": t.grad_clip,
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=self.drafter,
            optimizer=self.optimizer,
            lr_scheduler=self.scheduler,
            config=ds_config,
            dist_init_required=False,
        )
        self.engine, self.optimizer, self.scheduler = engine, optimizer, scheduler
        return engine

    # ----------------------------------------------------------------------------------------------
    # Checkpoints

    def restore(self, checkpoint: Any) -> None:
        """Continue from a Ray Train checkpoint (None: start fresh)."""
        if checkpoint is None:
            return
        with checkpoint.as_directory() as folder:
            progress = json.loads((Path(folder) / PROGRESS_FILE).read_text())
            if self.engine is not None:
                self.engine.load_checkpoint(str(Path(folder) / DEEPSPEED_DIR), tag="state")
            else:
                state = torch.load(Path(folder) / STATE_FILE, map_location=self.device, weights_only=True)
                self.drafter.load_state_dict(state["drafter"])
                self.optimizer.load_state_dict(state["optimizer"])
                self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(progress["step"])
        self.history = list(progress.get("history", []))
        self._log(f"resumed at step {self.step} from {checkpoint.path}")

    def save(self, folder: Path, metrics: dict[str, Any]) -> None:
        """Write this rank's part of a checkpoint into `folder`."""
        if self.engine is not None:
            self.engine.save_checkpoint(str(folder / DEEPSPEED_DIR), tag="state")
        elif self.rank == 0:
            state = {
                "drafter": self.drafter.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "step": self.step,
            }
            torch.save(state, folder / STATE_FILE)
        if self.rank == 0:
            card = {"steps": self.step, "epoch": metrics.get("epoch"), "objective": self._objective_name()}
            drafter = Drafter(self.drafter_config)
            drafter.load_state_dict(
                {
                    k: (v.float() if v.is_floating_point() else v).detach().cpu()
                    for k, v in self.drafter.state_dict().items()
                }
            )
            save_drafter(folder / DRAFTER_DIR, drafter, self.drafter_config, self.identity, card)
            (folder / PROGRESS_FILE).write_text(json.dumps({"step": self.step, **metrics}, indent=2) + "\n")

    def report(self, metrics: dict[str, Any], checkpoint: bool) -> None:
        import ray.train

        if not checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="falcon-ckpt-") as tmp:
            self.save(Path(tmp), metrics)
            has_files = any(Path(tmp).iterdir())
            ckpt = ray.train.Checkpoint.from_directory(tmp) if has_files else None
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_step{self.step:07d}")

    # ----------------------------------------------------------------------------------------------
    # Training

    def run(self) -> None:
        t = self.cfg.train
        window = _Window(self.K)
        start = time.perf_counter()
        while self.step < self.total_steps:
            epoch, index = divmod(self.step, self.steps_per_epoch)
            batches = epoch_batches(
                self.lengths,
                t.batch_size,
                self.steps_per_epoch,
                t.bucket_batches,
                _seed(t.seed, epoch, self.rank),
            )
            for b in batches[index:]:
                out = self.train_step([self.records[i] for i in b], epoch)
                window.add(out, sum(self.lengths[i] for i in b))
                self.step += 1
                last_of_epoch = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
                if self.step % t.log_every == 0 or last_of_epoch:
                    self._log(
                        window.line(
                            self.step, self.total_steps, epoch, self._lr(), time.perf_counter() - start
                        )
                    )
                every = t.checkpoint_every and self.step % t.checkpoint_every == 0
                if last_of_epoch:
                    validation = self.validate(epoch)
                    done = batches[: self.step - epoch * self.steps_per_epoch]
                    self._record_epoch(epoch, done, validation)
                    metrics = {"epoch": epoch, "step": self.step, **window.metrics(), **validation}
                    metrics["history"] = self.history
                    window = _Window(self.K)
                    self.report(metrics, checkpoint=True)
                elif every:
                    self.report({"epoch": epoch, "step": self.step, **window.metrics()}, checkpoint=True)
                if self.step >= self.total_steps:
                    break

    def _record_epoch(self, epoch: int, batches: list[list[int]], validation: dict[str, Any]) -> None:
        """Append the epoch to `history`: cumulative tokens over all ranks, and what validation found."""
        local = sum(self.lengths[i] for b in batches for i in b)
        tokens = torch.tensor([local], dtype=torch.long, device=self.device)  # (1,)
        if self.world > 1:
            dist.all_reduce(tokens)
        before = self.history[-1]["tokens"] if self.history else 0
        kept = ("heldout_top1", "tau", "acceptance_per_depth")
        entry = {"epoch": epoch, "step": self.step, "tokens": before + int(tokens.item())}
        self.history.append({**entry, **{k: validation[k] for k in kept if k in validation}})

    def train_step(self, records: list[CachedRecord], epoch: int) -> Any:
        t = self.cfg.train
        batch = Batch.collate(records, t.max_len).to(self.device)
        gen = torch.Generator().manual_seed(_seed(t.seed, self.step, self.rank))
        lam = glance_lambda(self.cfg.objective.lambda_schedule, min(epoch, t.epochs - 1), t.epochs)
        self.drafter.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16"):
            out = csgd_loss(self.model, self.embed, self.head, batch, self.cfg.objective, self.K, lam, gen)
        if self.engine is not None:
            self.engine.backward(out.loss)
            self.engine.step()
            return out
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if t.grad_clip > 0:
            if t.grad_clip_mode == "value":
                torch.nn.utils.clip_grad_value_(self.drafter.parameters(), t.grad_clip)
            else:
                torch.nn.utils.clip_grad_norm_(self.drafter.parameters(), t.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return out

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _objective_name(self) -> str:
        return "csgd" if self.cfg.objective.csgd else "eagle"

    # ----------------------------------------------------------------------------------------------
    # Validation

    def validate(self, epoch: int) -> dict[str, Any]:
        """Held-out top-1 per block position (all ranks) and tau by decoding (rank 0)."""
        from pipelines import evaluate

        e = self.cfg.eval
        self.drafter.eval()
        acc = evaluate.heldout_agreement(self.drafter, self.embed, self.full_head.weight, self.heldout,
                                         self.K, self.cfg.train.batch_size, self.cfg.train.max_len)  # fmt: skip
        counts = torch.stack([acc.correct, acc.total]).to(self.device)  # (2, K)
        if self.world > 1:
            dist.all_reduce(counts)
        metrics: dict[str, Any] = {
            "heldout_top1": [round(c / max(1, n), 4) for c, n in zip(*counts.tolist(), strict=True)],
            "heldout_positions": int(counts[1].sum()),
        }
        if e.tau_each_epoch and e.tau_prompts > 0 and self.rank == 0:
            if self.evaluator is None:
                self.evaluator = evaluate.TauEvaluator.load(self.job.target_folder, self.cfg, self.device)
            res = self.evaluator.measure(self.drafter)
            metrics.update({"tau": round(res.tau, 4), "acceptance_per_depth": res.acceptance_per_depth})
        self.drafter.train()
        self._log(f"epoch {epoch} validation: {metrics}")
        return metrics

    def _log(self, message: str) -> None:
        if self.rank == 0:
            print(f"[train] {message}", flush=True)


class _Window:
    """Running sums of losses and counts between two log lines."""

    def __init__(self, K: int) -> None:
        self.n = self.tokens = self.hamming = self.replaced = 0
        self.loss = self.feature = self.soft = self.hard = 0.0
        self.correct = torch.zeros(K, dtype=torch.long)
        self.total = torch.zeros(K, dtype=torch.long)
        self.start = time.perf_counter()

    def add(self, out: Any, tokens: int) -> None:
        self.n += 1
        self.tokens += tokens
        self.loss += float(out.loss.detach())
        self.feature += out.feature_loss
        self.soft += out.soft_loss
        self.hard += out.hard_loss
        self.correct += out.correct.cpu()
        self.total += out.total.cpu()
        self.hamming += out.hamming
        self.replaced += out.replaced

    def metrics(self) -> dict[str, Any]:
        n = max(1, self.n)
        top1 = [
            round(c / max(1, t), 4) for c, t in zip(self.correct.tolist(), self.total.tolist(), strict=True)
        ]
        seconds = time.perf_counter() - self.start
        return {
            "loss": round(self.loss / n, 5),
            "feature_loss": round(self.feature / n, 5),
            "soft_loss": round(self.soft / n, 5),
            "hard_loss": round(self.hard / n, 5),
            "train_top1": top1,
            "glanced_fraction": round(self.replaced / max(1, int(self.total.sum())), 4),
            "hamming_fraction": round(self.hamming / max(1, int(self.total.sum())), 4),
            "tokens_per_second": round(self.tokens / max(seconds, 1e-9), 1),
        }

    def line(self, step: int, total: int, epoch: int, lr: float, elapsed: float) -> str:
        m = self.metrics()
        return (
            f"step {step}/{total} epoch {epoch} loss {m['loss']:.4f} (feat {m['feature_loss']:.4f} "
            f"soft {m['soft_loss']:.3f} hard {m['hard_loss']:.3f}) top1 {m['train_top1']} "
            f"glanced {m['glanced_fraction']:.3f} lr {lr:.2e} {m['tokens_per_second']:.0f} tok/s/worker "
            f"{elapsed:.0f}s"
        )


# ---------------------------------------------------------------------------------------------------
# Driver side


@dataclass(frozen=True)
class TrainOutcome:
    checkpoint: Any
    """The latest `ray.train.Checkpoint` (its `drafter/` folder is the trained drafter)."""
    metrics: dict[str, Any]
    """The last reported metrics (rank 0)."""
    seconds: float


def storage_settings(path: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train: a local folder, or s3:// through s3fs (the
    AWS_* environment, endpoint included, as the cache uses)."""
    if not path.startswith("s3://"):
        Path(path).mkdir(parents=True, exist_ok=True)
        return str(Path(path).resolve()), None
    import pyarrow.fs
    import s3fs

    fs = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(s3fs.S3FileSystem()))
    return path.removeprefix("s3://"), fs


def run_training(job: TrainJob, storage_path: str) -> TrainOutcome:
    """Fit with `TorchTrainer` on the connected Ray cluster; resumes when the run already has checkpoints."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = DistillConfig.from_dict(job.config)
    path, filesystem = storage_settings(storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.to_dict(),
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers,
            use_gpu=cfg.ray.use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=path,
            storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
        ),
    )
    start = time.perf_counter()
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    return TrainOutcome(result.checkpoint, dict(result.metrics or {}), time.perf_counter() - start)
