"""What every stage runner shares: its folder, resume, periodic checkpoints, metrics, progress,
the optimizer with warmup, accumulation with DDP, autocast and per-step random generators."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from training.utils.checkpoint import TrainState, latest_step, load_checkpoint, save_checkpoint
from training.utils.config import StageConfig, TrainConfig, config_to_dict
from training.utils.dist import DistInfo, all_reduce_mean, barrier
from training.utils.metrics import MetricsLog, plot_losses

__all__ = ["StageRun", "step_generator", "make_optimizer", "autocast", "accumulate", "wrap_ddp",
           "unwrap"]

log = logging.getLogger(__name__)

# A logged value: a float, or a detached 0-d tensor read only when it is written.
Metric = float | Tensor


def step_generator(seed: int, *keys: int | str, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded from ``seed`` and ``keys`` (stage, step, rank, ...).

    Every random draw of a training step comes from such a generator, so a resumed run draws
    exactly what an uninterrupted one would, whatever happened before.
    """
    digest = hashlib.sha256(json.dumps([seed, *keys]).encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def make_optimizer(params: Iterator[nn.Parameter] | list[nn.Parameter], stage: StageConfig, lr: float | None = None
                   ) -> torch.optim.AdamW:
    return torch.optim.AdamW(list(params), lr=stage.lr if lr is None else lr, betas=tuple(stage.betas),
                             weight_decay=stage.weight_decay)


def set_lr(opt: torch.optim.Optimizer, base_lr: float, step: int, stage: StageConfig) -> None:
    """Linear warmup over ``stage.warmup_steps``, then constant, or a cosine decay to
    ``base_lr * stage.lr_final_ratio`` at ``stage.steps`` when that ratio is below 1 (from
    ``stage.decay_from_step`` if that comes after the warmup)."""
    scale = min(1.0, (step + 1) / stage.warmup_steps) if stage.warmup_steps else 1.0
    start = max(stage.warmup_steps, stage.decay_from_step)
    if stage.lr_final_ratio < 1.0 and step >= start:
        span = max(1, stage.steps - 1 - start)  # the last step gets the final lr
        progress = min(1.0, (step - start) / span)
        scale = stage.lr_final_ratio + (1 - stage.lr_final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    for group in opt.param_groups:
        group["lr"] = base_lr * scale


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast when ``precision=bf16`` (weights and optimizer stay fp32)."""
    if cfg.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def wrap_ddp(module: nn.Module, cfg: TrainConfig, dist: DistInfo) -> nn.Module:
    """DDP (or FSDP2 with ``fsdp=true``) around ``module`` when running under torchrun."""
    if not dist.distributed:
        return module
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in getattr(module, "blocks", []):
            fully_shard(block)
        return fully_shard(module)
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def optimizer_step(opt: torch.optim.Optimizer, params, grad_clip: float) -> Tensor | None:
    """Clip (when ``grad_clip`` > 0), step and clear the gradients; returns the pre-clip norm
    (a device scalar: reading it is left to the logger) or None."""
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip).detach() if grad_clip else None
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def accumulate(model: nn.Module, micro_losses: list[Callable[[], tuple[Tensor, dict[str, Metric]]]]
               ) -> dict[str, Metric]:
    """Backward each micro-batch loss (scaled by 1/n); DDP syncs gradients on the last only."""
    n = len(micro_losses)
    totals: dict[str, Metric] = {}
    for i, fn in enumerate(micro_losses):
        sync = i == n - 1 or not isinstance(model, nn.parallel.DistributedDataParallel)
        ctx = contextlib.nullcontext() if sync else model.no_sync()
        with ctx:
            loss, metrics = fn()
            (loss / n).backward()
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v / n
    return totals


class StageRun:
    """The folder, checkpoints, metrics and progress bar of one stage.

    Layout of ``<run_dir>/<stage>/``: ``checkpoints/`` (resume), ``metrics.jsonl``,
    ``losses.png``, ``samples/`` and ``final/`` (the stage's product; its presence marks the
    stage as done, so re-running the recipe skips it).
    """

    def __init__(self, cfg: TrainConfig, name: str, stage: StageConfig, dist: DistInfo) -> None:
        self.cfg = cfg
        self.name = name
        self.stage = stage
        self.dist = dist
        self.dir = Path(cfg.run_dir) / name
        self.ckpt_dir = self.dir / "checkpoints"
        self.final_dir = self.dir / "final"
        self.samples_dir = self.dir / "samples"
        self._last_save = time.monotonic()
        self._bar: tqdm | None = None
        self.metrics: MetricsLog | None = None
        self._t_step = time.monotonic()

    @property
    def done(self) -> bool:
        """The stage finished with at least ``steps`` steps (a larger ``steps`` resumes it)."""
        marker = self.final_dir / "DONE"
        if not marker.is_file():
            return False
        return int(json.loads(marker.read_text()).get("steps", 0)) >= self.stage.steps

    def mark_done(self, info: dict[str, Any]) -> None:
        if self.dist.is_main:
            self.final_dir.mkdir(parents=True, exist_ok=True)
            (self.final_dir / "DONE").write_text(json.dumps(info, indent=2) + "\n")
        barrier()

    def resume(self, state: TrainState) -> None:
        """Load the newest checkpoint into ``state`` (if any) and open the metrics log."""
        if latest_step(self.ckpt_dir) is not None:
            load_checkpoint(self.ckpt_dir, state, rank=self.dist.rank)
        self.metrics = MetricsLog(self.dir / "metrics.jsonl", state.step, enabled=self.dist.is_main)
        self._bar = tqdm(total=self.stage.steps, initial=state.step, desc=self.name,
                         disable=not self.dist.is_main, mininterval=5.0, dynamic_ncols=True)
        self._t_step = time.monotonic()

    def log_step(self, state: TrainState, metrics: dict[str, Metric], steps_done: int = 1) -> None:
        """Average metrics over ranks; write them every ``log_every`` steps (and the last).

        Metrics may be detached device scalars: they are read (a host sync) only here, on the
        steps that are written, not on every step."""
        now = time.monotonic()
        sec = (now - self._t_step) / max(steps_done, 1)
        self._t_step = now
        if self._bar is not None:
            self._bar.update(steps_done)
        if state.step % self.stage.log_every and state.step != self.stage.steps:
            return
        values = all_reduce_mean({k: float(v) for k, v in metrics.items()}, self.dist.device)
        values["sec_per_step"] = round(sec, 4)
        if self.metrics is not None:
            self.metrics.write(state.step, values)
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k.startswith("loss")})

    def maybe_checkpoint(self, state: TrainState, *, force: bool = False) -> None:
        """Checkpoint every ``ckpt_every_steps`` steps, every ``ckpt_every_minutes``, or when forced.

        The time rule is decided on rank 0 and broadcast, so every rank saves together.
        """
        st = self.stage
        due = force or (st.ckpt_every_steps and state.step % st.ckpt_every_steps == 0)
        if not due and st.ckpt_every_minutes:
            from training.utils.dist import broadcast_int

            elapsed = time.monotonic() - self._last_save >= 60 * st.ckpt_every_minutes
            due = bool(broadcast_int(int(elapsed), self.dist.device))
        if not due:
            return
        save_checkpoint(self.ckpt_dir, state, config_to_dict(self.cfg), rank=self.dist.rank,
                        keep=st.keep_checkpoints)
        self._last_save = time.monotonic()
        barrier()

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self.dist.is_main:
            plot_losses(self.dir / "metrics.jsonl", self.dir / "losses.png", f"{self.name} losses")
