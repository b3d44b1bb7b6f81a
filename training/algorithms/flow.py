"""Flow-matching helpers shared by every training algorithm.

Conventions are those of :mod:`sf_sdk.scheduler`: ``x_t = (1 - sigma) x0 + sigma noise``, the
models predict the flow ``noise - x0``, ``x0 = x_t - sigma flow`` with the sigma of the nearest
entry of the schedule's table.

Models are called through their ``forward`` with the prompt embeddings ``[B, L, text_dim]``
(never a precomputed :class:`~sf_sdk.models.dit.CrossAttnCache`): the prompt is then encoded
inside the forward, which is what DDP / FSDP wrappers need, and costs little next to the video
tokens. Anything with the signature ``model(x [B, F, C, H, W], timestep [B, F], context,
mask=None) -> flow`` works (a :class:`~sf_sdk.models.dit.WanDiT`, a DDP wrapper of one, a toy).

Two timestep distributions:

* :func:`sample_train_timesteps` — an entry of the shifted 1000-step table, uniform over the
  table index (teacher / causal diffusion training, the official ``timesteps[randint(0, 1000)]``);
* :func:`sample_score_timesteps` — the score-distillation distribution of the official DMD / SiD
  code: an integer ``u ~ U{0, ..., N-1}``, shifted by ``shift * u / (1 + (shift - 1) u)`` (as
  fractions of ``N``) and clamped to ``[min_step, max_step] * N``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from sf_sdk.scheduler import FlowMatchSchedule

__all__ = [
    "drop_prompts",
    "flow_matching_loss",
    "frozen",
    "guided_flow",
    "guided_x0",
    "match_batch",
    "noise_like",
    "predict_x0",
    "sample_score_timesteps",
    "sample_train_timesteps",
    "unwrap",
]


# --------------------------------------------------------------------------------------------
# Model plumbing
# --------------------------------------------------------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def frozen(*modules: nn.Module | None) -> Iterator[None]:
    """Temporarily stop parameter gradients of ``modules`` (``requires_grad = False``).

    Gradients still flow *through* the modules to their inputs: this is how a generator loss
    back-propagates through a score network without touching the network's ``.grad``. Flags are
    restored on exit. Pass unwrapped modules (a DDP module whose parameters change
    ``requires_grad`` between iterations confuses its reducer).
    """
    params = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def noise_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise of ``x``'s shape, dtype and device, drawn from ``generator``
    (which may live on another device than ``x``)."""
    gen_device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)


def match_batch(context: Tensor, batch_size: int) -> Tensor:
    """Prompt embeddings [1 or B, L, D] -> [B, L, D] (a single prompt, e.g. the negative one,
    is broadcast over the batch)."""
    if context.dim() != 3:
        raise ValueError(f"prompt embeddings must be [B, L, text_dim], got shape {tuple(context.shape)}")
    if context.shape[0] == batch_size:
        return context
    if context.shape[0] == 1:
        return context.expand(batch_size, -1, -1)
    raise ValueError(f"prompt embeddings have batch {context.shape[0]}, the latents have batch "
                     f"{batch_size}: pass one prompt per sample or a single prompt")


def _wide(x: Tensor) -> Tensor:
    """float32 for half-precision tensors (losses are reduced in float32 or wider)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _pad_rows(context: Tensor, rows: int) -> Tensor:
    # zero rows are what the DiT pads prompts with anyway (up to text_len), so this is exact
    return F.pad(context, (0, 0, 0, rows - context.shape[1]))  # [B, rows, D]


def drop_prompts(cond: Tensor, uncond: Tensor, prob: float,
                 generator: torch.Generator | None = None) -> Tensor:
    """Prompt dropout for classifier-free guidance training.

    Each sample of ``cond`` [B, Lc, D] is replaced by ``uncond`` [1 or B, Lu, D] (the empty or
    negative prompt) with probability ``prob``. Returns [B, max(Lc, Lu), D]; the shorter one is
    zero-padded, which the DiT does itself up to ``text_len``.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prompt dropout probability must lie in [0, 1], got {prob}")
    b = cond.shape[0]
    uncond = match_batch(uncond, b).to(cond.dtype)
    rows = max(cond.shape[1], uncond.shape[1])
    cond, uncond = _pad_rows(cond, rows), _pad_rows(uncond, rows)
    gen_device = generator.device if generator is not None else cond.device
    drop = torch.rand(b, generator=generator, device=gen_device).to(cond.device) < prob  # [B]
    return torch.where(drop.view(b, 1, 1), uncond, cond)


# --------------------------------------------------------------------------------------------
# Timesteps
# --------------------------------------------------------------------------------------------


def _per_chunk(values: Tensor, num_frames: int, chunk: int | None) -> Tensor:
    """[B, n] values, one per chunk (or one per sample when chunk is None) -> [B, F]."""
    if chunk is None:
        return values.expand(-1, num_frames)
    return values.repeat_interleave(chunk, dim=1)


def _num_draws(num_frames: int, chunk: int | None) -> int:
    if chunk is None:
        return 1
    if chunk <= 0 or num_frames % chunk:
        raise ValueError(f"{num_frames} frames do not split into chunks of {chunk} frames")
    return num_frames // chunk


def sample_train_timesteps(
    schedule: FlowMatchSchedule,
    batch_size: int,
    num_frames: int,
    *,
    chunk: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """[B, F] timesteps drawn uniformly from the schedule's table (flow-matching training).

    ``chunk=None``: one timestep per sample, shared by all frames (the bidirectional teacher);
    ``chunk=k``: one per chunk of ``k`` frames (causal diffusion-forcing training).
    """
    n = _num_draws(num_frames, chunk)
    gen_device = generator.device if generator is not None else "cpu"
    index = torch.randint(schedule.num_train_timesteps, (batch_size, n), generator=generator,
                          device=gen_device)  # [B, n]
    t = schedule.timesteps.to(gen_device)[index]  # [B, n], float64
    return _per_chunk(t, num_frames, chunk).to(device=device, dtype=dtype)


def sample_score_timesteps(
    batch_size: int,
    num_frames: int,
    *,
    num_train_timesteps: int,
    shift: float,
    min_step: float,
    max_step: float,
    chunk: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """[B, F] timesteps of the official DMD / SiD score evaluation.

    ``u ~ U{0, ..., N-1}`` (N = ``num_train_timesteps``), ``s = u / N``, ``t = N * shift s / (1 +
    (shift - 1) s)`` (no shift when ``shift <= 1``), clamped to ``[min_step N, max_step N]``
    (``min_step``/``max_step`` are fractions, 0.02 / 0.98 officially, truncated to integers like
    the official ``int(0.02 * 1000)``). One timestep per sample (``chunk=None``) or per chunk.
    """
    if not 0.0 <= min_step <= max_step <= 1.0:
        raise ValueError(f"need 0 <= min_step <= max_step <= 1 (fractions of the timestep range), got "
                         f"{min_step}, {max_step}")
    n = _num_draws(num_frames, chunk)
    gen_device = generator.device if generator is not None else "cpu"
    u = torch.randint(num_train_timesteps, (batch_size, n), generator=generator,
                      device=gen_device).to(torch.float64)  # [B, n]
    if shift > 1:
        s = u / num_train_timesteps
        u = shift * s / (1 + (shift - 1) * s) * num_train_timesteps
    lo, hi = int(min_step * num_train_timesteps), int(max_step * num_train_timesteps)
    t = u.clamp(lo, hi)
    return _per_chunk(t, num_frames, chunk).to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Predictions
# --------------------------------------------------------------------------------------------


def predict_x0(model: nn.Module, x_t: Tensor, timestep: Tensor, context: Tensor,
               schedule: FlowMatchSchedule, *, mask: Tensor | None = None) -> Tensor:
    """x0 predicted by ``model`` (flow output converted with ``schedule``), [B, F, C, H, W]."""
    flow = model(x_t, timestep, match_batch(context, x_t.shape[0]), mask=mask)
    return schedule.x0_from_flow(flow, x_t, timestep)


def guided_flow(model: nn.Module, x_t: Tensor, timestep: Tensor, cond: Tensor, uncond: Tensor | None,
                scale: float, *, mask: Tensor | None = None) -> Tensor:
    """Classifier-free guided flow ``f_u + scale (f_c - f_u)`` (standard convention: ``scale=1``
    is the conditional model alone, and then ``uncond`` is not evaluated)."""
    b = x_t.shape[0]
    f_c = model(x_t, timestep, match_batch(cond, b), mask=mask)
    if scale == 1.0:
        return f_c
    if uncond is None:
        raise ValueError(f"guidance scale {scale} needs the unconditional (negative) prompt embedding")
    f_u = model(x_t, timestep, match_batch(uncond, b), mask=mask)
    return f_u + scale * (f_c - f_u)


def guided_x0(model: nn.Module, x_t: Tensor, timestep: Tensor, cond: Tensor, uncond: Tensor | None,
              scale: float, *, schedule: FlowMatchSchedule | None = None,
              mask: Tensor | None = None) -> Tensor:
    """CFG x0 prediction ``x0_u + scale (x0_c - x0_u)``, [B, F, C, H, W].

    x0 is linear in the flow at a fixed ``x_t``, so this equals guiding the flow and converting
    once. ``schedule`` (default: ``FlowMatchSchedule()``) gives the sigma of each timestep.
    Note the official DMD writes its real score as ``cond + g (cond - uncond)``, i.e. ``scale =
    g + 1`` here (see :class:`training.algorithms.dmd.DMDConfig`).
    """
    schedule = FlowMatchSchedule() if schedule is None else schedule
    flow = guided_flow(model, x_t, timestep, cond, uncond, scale, mask=mask)
    return schedule.x0_from_flow(flow, x_t, timestep)


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def flow_matching_loss(
    model: nn.Module,
    x0: Tensor,
    context: Tensor,
    timestep: Tensor,
    schedule: FlowMatchSchedule,
    *,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    mask: Tensor | None = None,
    weighted: bool = False,
) -> tuple[Tensor, dict[str, Any]]:
    """Denoising loss ``||model(x_t, t) - (noise - x0)||^2`` of a flow-matching model.

    x0 [B, F, C, H, W] clean latents (used as given: detach them to train only ``model``);
    timestep [B, F] (see :func:`sample_train_timesteps` / :func:`sample_score_timesteps`);
    ``mask``: token mask for the full-sequence forward (None: bidirectional). ``weighted``
    multiplies each frame's mean squared error by the schedule's training weight (the official
    teacher / causal-diffusion loss); unweighted it is the plain mean (the official critic loss).
    Returns ``(loss, metrics)``; metrics are detached tensors (no host sync).
    """
    if noise is None:
        noise = noise_like(x0, generator)
    if timestep.shape != x0.shape[:2]:
        raise ValueError(f"timestep must be [B, F] = {list(x0.shape[:2])}, got {list(timestep.shape)}")
    x_t = schedule.add_noise(x0, noise, timestep)
    flow = model(x_t, timestep, match_batch(context, x0.shape[0]), mask=mask)
    target = schedule.flow_target(x0, noise)
    per_frame = (_wide(flow) - _wide(target)).pow(2).mean(dim=(2, 3, 4))  # [B, F]
    if weighted:
        per_frame = per_frame * schedule.training_weight(timestep).to(per_frame.dtype)
    loss = per_frame.mean()
    return loss, {"loss": loss.detach(), "timestep": timestep.detach().float().mean()}
