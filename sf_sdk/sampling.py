"""Few-step denoising of one chunk against the KV cache.

This is the one piece of code that both inference (:class:`sf_sdk.StreamingGenerator`) and the
Self-Forcing training rollout (``training``) run, so that what the model learns is exactly what
it does at inference:

1. start from noise at the first timestep of the (warped) step list;
2. at each step predict the flow, convert to x0, and unless this is the exit step re-noise x0
   with fresh noise to the next timestep;
3. the *cache pass*: run the chunk once more at timestep ``context_noise`` (default 0) on its
   clean prediction, so the keys/values left in the cache are those of the clean chunk. It never
   carries gradients.

Training draws an ``exit_step`` (stochastic gradient truncation) and runs only that step with
gradients; inference exits at the last step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from sf_sdk.cache import KVCache
from sf_sdk.models.dit import CrossAttnCache, StepAttention
from sf_sdk.scheduler import FlowMatchSchedule

__all__ = ["ChunkModel", "ChunkSchedule", "denoise_chunk"]


class ChunkModel(Protocol):
    """What :func:`denoise_chunk` needs of a model (eager DiT or an exported backend)."""

    def step_attention(self, cache: KVCache, plan) -> StepAttention: ...

    def forward_chunk(self, x: Tensor, timestep: Tensor, cross: CrossAttnCache, cache: KVCache,
                      start_frame: int, attend: StepAttention | None = None) -> Tensor: ...


@dataclass(frozen=True)
class ChunkSchedule:
    """The timesteps of one chunk: the denoising steps and the cache-pass timestep."""

    timesteps: tuple[float, ...]
    context_noise: float
    schedule: FlowMatchSchedule

    @classmethod
    def from_config(cls, stream) -> ChunkSchedule:
        sched = FlowMatchSchedule(shift=stream.timestep_shift, num_train_timesteps=stream.num_train_timesteps)
        steps = stream.denoising_step_list
        ts = tuple(sched.warp(steps)) if stream.warp_denoising_step else tuple(steps)
        return cls(ts, float(stream.context_noise), sched)


def denoise_chunk(
    model: ChunkModel,
    noise: Tensor,
    cross: CrossAttnCache,
    cache: KVCache,
    start_frame: int,
    steps: ChunkSchedule,
    *,
    generator: torch.Generator | None = None,
    exit_step: int | None = None,
    grad_at_exit: bool = False,
    update_cache: bool = True,
) -> Tensor:
    """Denoise the chunk ``noise`` [B, F, C, H, W] starting at latent frame ``start_frame``.

    Returns x0 at ``exit_step`` (default: the last step). With ``grad_at_exit`` only the exit
    step runs with autograd; every other call (and the cache pass) runs under ``no_grad``.
    """
    n = len(steps.timesteps)
    exit_step = n - 1 if exit_step is None else exit_step
    if not 0 <= exit_step < n:
        raise ValueError(f"exit_step must lie in [0, {n}), got {exit_step}")
    b, f = noise.shape[:2]
    plan = cache.plan_chunk(start_frame, f)
    with torch.no_grad():
        attend = model.step_attention(cache, plan)
    x = noise
    x0 = noise
    for i in range(exit_step + 1):
        t = torch.full((b, f), steps.timesteps[i], device=noise.device, dtype=noise.dtype)
        with torch.set_grad_enabled(grad_at_exit and i == exit_step and torch.is_grad_enabled()):
            flow = model.forward_chunk(x, t, cross, cache, start_frame, attend)
            x0 = steps.schedule.x0_from_flow(flow, x, t)
        if i < exit_step:
            fresh = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            t_next = torch.full((b, f), steps.timesteps[i + 1], device=noise.device, dtype=noise.dtype)
            x = steps.schedule.add_noise(x0, fresh, t_next)
    if update_cache:
        with torch.no_grad():
            clean = x0.detach()
            tc = torch.full((b, f), steps.context_noise, device=noise.device, dtype=noise.dtype)
            if steps.context_noise > 0:
                fresh = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
                clean = steps.schedule.add_noise(clean, fresh, tc)
            model.forward_chunk(clean, tc, cross, cache, start_frame, attend)
    return x0
