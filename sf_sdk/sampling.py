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

Rolling Forcing's joint window (``denoise_window`` > 1, :func:`rolling_chunk`) denoises several
chunks in one call instead, each at its own step; a chunk that leaves it clean gets the same
cache pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from torch import Tensor

from sf_sdk.cache import ChunkPlan, KVCache
from sf_sdk.models.dit import ChunkTimesteps, CrossAttnCache, StepAttention, WanDiT
from sf_sdk.scheduler import FlowMatchSchedule

__all__ = ["ChunkModel", "ChunkSchedule", "Generators", "RollingWindow", "cache_pass", "denoise_chunk", "kept_frames",
           "recache", "randn_rows", "rolling_chunk"]

# One generator for the whole batch, one per row (None: that row draws nothing and gets zeros), or
# None (torch's default generator).
Generators = torch.Generator | Sequence[torch.Generator | None] | None


class ChunkModel(Protocol):
    """What :func:`denoise_chunk` needs of a model (eager DiT or an exported backend)."""

    def step_attention(self, cache: KVCache, plan: ChunkPlan, impl=None) -> StepAttention: ...

    def forward_chunk(self, x: Tensor, timestep: Tensor, cross: CrossAttnCache, cache: KVCache,
                      start_frame: int | ChunkPlan, attend: StepAttention | None = None) -> Tensor: ...


@dataclass(frozen=True)
class ChunkSchedule:
    """The timesteps of one chunk: the denoising steps and the cache-pass timestep.

    ``first_timesteps``: the steps of a stream's first chunk when they differ (``()``: the same
    as every chunk; the config's ``first_chunk_steps``)."""

    timesteps: tuple[float, ...]
    context_noise: float
    schedule: FlowMatchSchedule
    first_timesteps: tuple[float, ...] = ()
    # The sampler's timestep / sigma tables per (values, shape, dtype, device) (_chunk_timesteps).
    chunk_tables: dict[tuple, ChunkTimesteps] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_config(cls, stream) -> ChunkSchedule:
        sched = FlowMatchSchedule(shift=stream.timestep_shift, num_train_timesteps=stream.num_train_timesteps)

        def warped(steps: tuple[float, ...]) -> tuple[float, ...]:
            return tuple(sched.warp(steps)) if stream.warp_denoising_step and steps else tuple(steps)

        return cls(warped(stream.denoising_step_list), float(stream.context_noise), sched,
                   warped(stream.first_chunk_steps))

    def for_chunk(self, first: bool) -> tuple[float, ...]:
        """The denoising timesteps of a stream's first chunk (``first``) or of any later one."""
        return self.first_timesteps if first and self.first_timesteps else self.timesteps


def randn_rows(shape: Sequence[int], generator: Generators, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Gaussian noise of ``shape`` [B, ...]: from one generator at once, or row by row from one
    generator per row (a row draws exactly what it would draw alone: pooled streams stay equal
    to solo ones; a None row gets zeros and draws nothing)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]} rows")
    if len(generator) == 1 and generator[0] is not None:  # one row: its draw as it is (no copy)
        return torch.randn(tuple(shape), generator=generator[0], device=device, dtype=dtype)
    row = (1, *shape[1:])
    return torch.cat([torch.randn(row, generator=g, device=device, dtype=dtype) if g is not None
                      else torch.zeros(row, device=device, dtype=dtype) for g in generator])


def _plan(cache: KVCache, start: int | ChunkPlan, frames: int) -> ChunkPlan:
    return start if isinstance(start, ChunkPlan) else cache.plan_chunk(start, frames)


def _chunk_timesteps(attend: StepAttention, values: tuple[float, ...], like: Tensor,
                     steps: ChunkSchedule) -> ChunkTimesteps:
    """The timestep tensors of a chunk's calls at ``values`` (its steps, then the cache pass) and
    their sigmas, kept on ``attend`` for the chunk's calls (an eager DiT then embeds them in one
    call). Constants of the schedule, so made once per (values, shape, dtype, device) and kept on
    ``steps``: no host-to-device copy and no table lookup per chunk. Each chunk gets its own copy
    of the table, so what a model computes from it (the time embeddings) is never shared."""
    table = attend.timesteps
    if table is None or table.values != values or table.stacked.dtype != like.dtype:
        key = (values, *like.shape[:2], like.dim(), like.dtype, like.device)
        made = steps.chunk_tables.get(key)
        if made is None:
            made = ChunkTimesteps.make(values, *like.shape[:2], device=like.device, dtype=like.dtype)
            # sigma and 1 - sigma of each call, [S, B, F, 1, 1, 1]: the values and arithmetic of
            # schedule.x0_from_flow / add_noise, looked up once instead of once per call.
            sigma = steps.schedule.sigma(made.stacked)  # [S, B, F], float64
            sigma = sigma.reshape(*sigma.shape, *([1] * (like.dim() - 2))).to(like.dtype)
            made.sigmas = (sigma, 1 - sigma)
            if len(steps.chunk_tables) >= 64:  # bounded: the batch sizes and dtypes one generator sees
                steps.chunk_tables.clear()
            steps.chunk_tables[key] = made
        table = attend.timesteps = replace(made)  # never embedded itself: the copy starts without
    return table


def cache_pass(model: ChunkModel, clean: Tensor, cross: CrossAttnCache, cache: KVCache, start: int | ChunkPlan,
               steps: ChunkSchedule, *, generator: Generators = None, attend: StepAttention | None = None,
               attention: str | None = None) -> None:
    """Write a clean chunk ``clean`` [B, F, C, H, W] into the cache: one call at timestep
    ``context_noise`` (re-noised to it first when it is > 0), whose keys/values stay for the
    chunks after it. Inference, video extension and the training rollout all write with it. Never
    carries gradients."""
    b, f = clean.shape[:2]
    with torch.no_grad():
        plan = _plan(cache, start, f)
        if attend is None or attend.plan is not plan:
            attend = model.step_attention(cache, plan, attention)
        clean = clean.detach()
        table = attend.timesteps  # made by denoise_chunk for this chunk's calls, when it ran first
        tc = table.row(steps.context_noise) if table is not None else None
        if tc is None:
            tc = torch.full((b, f), steps.context_noise, device=clean.device, dtype=clean.dtype)
        if steps.context_noise > 0:
            fresh = randn_rows(clean.shape, generator, device=clean.device, dtype=clean.dtype)
            clean = steps.schedule.add_noise(clean, fresh, tc)
        # Eager DiTs skip what only feeds the discarded flow (WanDiT.write_cache); exported chunk
        # models run their whole step.
        write = getattr(model, "write_cache", None)
        (write or model.forward_chunk)(clean, tc, cross, cache, plan, attend)


def denoise_chunk(
    model: ChunkModel,
    noise: Tensor,
    cross: CrossAttnCache,
    cache: KVCache,
    start_frame: int | ChunkPlan,
    steps: ChunkSchedule,
    *,
    generator: Generators = None,
    exit_step: int | None = None,
    grad_at_exit: bool = False,
    update_cache: bool = True,
    attention: str | None = None,
    attend: StepAttention | None = None,
    first_chunk: bool | Sequence[bool] = False,
) -> Tensor:
    """Denoise the chunk ``noise`` [B, F, C, H, W] starting at latent frame ``start_frame`` (every
    row), or placed row by row by a :class:`~sf_sdk.cache.ChunkPlan` (pooled streams).

    ``first_chunk`` (one bool, or one per row): the chunk is its stream's first, denoised with
    ``steps.first_timesteps`` when the schedule has them. Rows whose step lists differ in length
    run together: a row that is done is computed on at its last timestep and keeps its x0,
    drawing no more noise (so a pooled row equals the same stream alone).

    Returns x0 at ``exit_step`` (default: the last step). With ``grad_at_exit`` only the exit
    step runs with autograd; every other call (and the cache pass) runs under ``no_grad``.
    ``generator``: see :data:`Generators`. ``attention``: the cache-attention implementation name
    (None: the default), chosen once for the chunk's calls; or ``attend``, the chunk's attention
    from ``model.step_attention`` (a caller that runs the cache pass itself reuses it there).
    """
    b, f = noise.shape[:2]
    firsts = [first_chunk] * b if isinstance(first_chunk, bool) else list(first_chunk)
    if len(firsts) != b:
        raise ValueError(f"first_chunk has {len(firsts)} entries for a batch of {b} rows")
    lists = [steps.for_chunk(x) for x in firsts]
    if len(set(lists)) > 1:
        if exit_step is not None or grad_at_exit:
            raise ValueError("exit_step / grad_at_exit need one step list for every row (no first chunks "
                             "with their own steps in the batch)")
        return _denoise_rows(model, noise, cross, cache, _plan(cache, start_frame, f), steps, lists, generator,
                             update_cache, attention, attend)
    timesteps = lists[0]
    n = len(timesteps)
    exit_step = n - 1 if exit_step is None else exit_step
    if not 0 <= exit_step < n:
        raise ValueError(f"exit_step must lie in [0, {n}), got {exit_step}")
    plan = _plan(cache, start_frame, f)
    if attend is None or attend.plan is not plan:
        with torch.no_grad():
            attend = model.step_attention(cache, plan, attention)
    table = _chunk_timesteps(attend, (*timesteps, steps.context_noise), noise, steps)
    ts = table.rows  # ts[-1]: the cache pass
    sigma, keep = table.sigmas
    x = noise
    x0 = noise
    for i in range(exit_step + 1):
        with torch.set_grad_enabled(grad_at_exit and i == exit_step and torch.is_grad_enabled()):
            flow = model.forward_chunk(x, ts[i], cross, cache, plan, attend)
            x0 = x - sigma[i] * flow  # steps.schedule.x0_from_flow(flow, x, ts[i])
        if i < exit_step:
            fresh = randn_rows(x0.shape, generator, device=x0.device, dtype=x0.dtype)
            x = keep[i + 1] * x0 + sigma[i + 1] * fresh  # steps.schedule.add_noise(x0, fresh, ts[i + 1])
    if update_cache:
        cache_pass(model, x0, cross, cache, plan, steps, generator=generator, attend=attend)
    return x0


def _row_generators(generator: Generators, rows: int) -> list[torch.Generator | None]:
    if generator is None or isinstance(generator, torch.Generator):
        if rows > 1 and generator is not None:
            raise ValueError("rows with different step lists need one generator per row (or None)")
        return [generator] * rows
    return list(generator)


@torch.no_grad()
def _denoise_rows(model: ChunkModel, noise: Tensor, cross: CrossAttnCache, cache: KVCache, plan: ChunkPlan,
                  steps: ChunkSchedule, lists: list[tuple[float, ...]], generator: Generators, update_cache: bool,
                  attention: str | None, attend: StepAttention | None) -> Tensor:
    """:func:`denoise_chunk` for rows with step lists of different lengths (inference only)."""
    b, f = noise.shape[:2]
    gens = _row_generators(generator, b)
    if attend is None or attend.plan is not plan:
        attend = model.step_attention(cache, plan, attention)
    x, x0 = noise, noise
    for i in range(max(len(ts) for ts in lists)):
        now = [ts[min(i, len(ts) - 1)] for ts in lists]
        t = torch.tensor(now, device=noise.device, dtype=noise.dtype).unsqueeze(1).expand(b, f)  # [B, F]
        pred = steps.schedule.x0_from_flow(model.forward_chunk(x, t, cross, cache, plan, attend), x, t)
        live = torch.tensor([i < len(ts) for ts in lists], device=noise.device).view(b, *[1] * (x.dim() - 1))
        x0 = torch.where(live, pred, x0)  # a row that is done keeps the x0 of its last step
        more = [i + 1 < len(ts) for ts in lists]  # rows re-noised to a next step
        if any(more):
            fresh = randn_rows(x0.shape, [g if m else None for g, m in zip(gens, more)], device=x0.device,
                               dtype=x0.dtype)
            t_next = torch.tensor([ts[min(i + 1, len(ts) - 1)] for ts in lists], device=noise.device,
                                  dtype=noise.dtype).unsqueeze(1).expand(b, f)
            x = steps.schedule.add_noise(x0, fresh, t_next)
    if update_cache:
        cache_pass(model, x0, cross, cache, plan, steps, generator=generator, attend=attend)
    return x0


@dataclass
class RollingWindow:
    """The in-flight chunks of one stream under a joint denoising window (``denoise_window`` > 1):
    their noisy latents, oldest first, and the step each is at. They start at the cache row's end
    frame (everything before them is clean and cached)."""

    x: Tensor | None = None  # [1, n*c, C, H, W], chunk j at timestep timesteps[steps[j]]
    steps: list[int] = field(default_factory=list)  # per chunk, oldest first: its step index

    @property
    def frames(self) -> int:
        return 0 if self.x is None else self.x.shape[1]

    def clear(self) -> None:
        self.x, self.steps = None, []


@torch.no_grad()
def rolling_chunk(dit: WanDiT, window: RollingWindow, cross: CrossAttnCache, cache: KVCache, row: int,
                  steps: ChunkSchedule, chunk: int, *, end_frame: int | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """Rolling Forcing: advance the joint window of cache row ``row`` until its oldest chunk is clean,
    and return that chunk's x0 [1, chunk, C, H, W] (it leaves ``window``; the caller runs its cache pass).

    Each call of the loop: a new chunk of noise enters as the newest (at step 0, the first
    timestep) while the window holds fewer chunks than there are steps and the stream has frames
    left (``end_frame``: its length in latent frames, None: unbounded); one
    :meth:`~sf_sdk.models.dit.WanDiT.forward_window` call predicts every chunk's x0 at its own
    timestep; the chunk at the last step is done, the others are re-noised with fresh noise to
    their next timestep (one step on). At a stream's start the window fills (one call per step
    before the first chunk leaves), then one call per chunk; near a bounded stream's end it drains.
    Noise is drawn from ``generator``: the entering chunk's, then the re-noising, per call.
    """
    ts, n = steps.timesteps, len(steps.timesteps)
    start = cache.end_frames[row]
    cfg, (gh, gw) = dit.config, cache.layout.grid_hw
    shape = (1, chunk, cfg.in_dim, gh * cfg.patch_size[1], gw * cfg.patch_size[2])  # one chunk [1, c, C, H, W]
    dev, dt = cache.device, cache.dtype

    def per_frame(indices: list[int]) -> Tensor:  # step indices of chunks -> their frames' timesteps [1, k*c]
        return torch.tensor([ts[i] for i in indices], dtype=dt).repeat_interleave(chunk).unsqueeze(0).to(dev)

    while True:
        if len(window.steps) < n and (end_frame is None or start + window.frames < end_frame):
            noise = torch.randn(shape, generator=generator, device=dev, dtype=dt)
            window.x = noise if window.x is None else torch.cat([window.x, noise], dim=1)  # [1, n*c, C, H, W]
            window.steps.append(0)
        if window.x is None:
            raise ValueError(f"the stream has no frames left to denoise (it ends at latent frame {end_frame})")
        t = per_frame(window.steps)  # [1, n*c]
        x0 = steps.schedule.x0_from_flow(dit.forward_window(window.x, t, cross, cache, row), window.x, t)
        done = window.steps[0] == n - 1  # the oldest chunk took its last step
        first = chunk if done else 0
        later = [i + 1 for i in window.steps[1 if done else 0:]]
        if later:
            rest = x0[:, first:]
            fresh = torch.randn(rest.shape, generator=generator, device=dev, dtype=dt)
            window.x = steps.schedule.add_noise(rest, fresh, per_frame(later))
        else:
            window.x = None
        window.steps = later
        if done:
            return x0[:, :chunk]


def kept_frames(cache: KVCache, row: int, *, sinks: bool = True) -> list[int]:
    """The absolute latent frames row ``row`` of the cache holds, oldest first (sinks, then the
    ring's frames in order); ``sinks=False``: the ring's only."""
    lay, end = cache.layout, cache.end_frames[row]
    kept_sinks = list(range(min(lay.sink_frames, end))) if sinks else []
    ring = list(range(max(lay.sink_frames, end - lay.ring_frames), end))
    return kept_sinks + ring


@torch.no_grad()
def recache(dit: WanDiT, latents: Tensor, cross: CrossAttnCache, cache: KVCache, row: int, steps: ChunkSchedule,
            chunk: int, *, generator: torch.Generator | None = None, keep_sinks: bool = False) -> None:
    """Recompute the keys/values row ``row`` holds under a new prompt ``cross`` (batch 1).

    ``latents`` [N, C, H, W]: the clean latents of :func:`kept_frames` (same order). They run as
    one sequence at timestep ``context_noise`` (re-noised to it first when it is > 0), block-causal
    by chunk, and their keys/values replace the old ones in place: the next chunk continues the
    same frames under the new text (LongLive's KV re-cache). Cost: one forward over the window.

    ``keep_sinks`` (``recache_sinks=False``, LongLive's global sink): the sinks keep the keys and
    values of the prompt they were made under; ``latents`` are the ring frames'
    (``kept_frames(sinks=False)``), re-encoded attending to the sinks and to each other unmasked.
    """
    frames = kept_frames(cache, row, sinks=not keep_sinks)
    if latents.shape[0] != len(frames):
        raise ValueError(f"row {row} holds {len(frames)} frames, got latents for {latents.shape[0]}")
    if not frames:
        return
    x = latents.unsqueeze(0)  # [1, N, C, H, W]
    t = torch.full(x.shape[:2], steps.context_noise, device=x.device, dtype=x.dtype)
    if steps.context_noise > 0:
        fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = steps.schedule.add_noise(x, fresh, t)
    sinks = min(cache.layout.sink_frames, cache.end_frames[row]) if keep_sinks else 0
    dit.recache(x, t, cross, cache, row, torch.tensor(frames, device=x.device), chunk, cached_sinks=sinks)
