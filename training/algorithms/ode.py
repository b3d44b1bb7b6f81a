"""ODE initialisation (CausVid, arXiv 2412.07772, Sec. 4.3): teacher trajectories and regression.

1. :func:`sample_ode_trajectory` — the bidirectional teacher integrates the probability-flow ODE
   with Euler steps on the shifted grid (48 steps, shift 8, CFG 6 by default: the official
   ``scripts/generate_ode_pairs.py``), starting from ``noise``. It keeps the latents at the
   student's (warped) timesteps and the final sample. The official script keeps grid points 0,
   12, 24, 36, whose noise levels (shift 8) are not the student's timesteps (shift 5); here each
   kept latent is *exactly* on the Euler path at the student's noise level: the point of the
   Euler segment ``x_k + (sigma - sigma_k) v_k`` that contains it (no extra teacher calls, the
   trajectory itself is unchanged).
2. :func:`ode_regression_loss` — the causal student, run over the whole clip under the
   block-causal mask (the streaming rules, including the window), gets per chunk one of the
   kept noisy latents with its timestep (drawn independently per sample and chunk) and
   predicts x0 (flow converted with the student's schedule); loss = MSE to the final sample over
   frames whose timestep is not 0 (official).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from sf_sdk.config import StreamingConfig
from sf_sdk.models.dit import block_causal_mask
from sf_sdk.sampling import ChunkSchedule
from sf_sdk.scheduler import FlowMatchSchedule
from training.algorithms.flow import guided_flow, predict_x0, unwrap

__all__ = ["ODE_CFG", "ODE_SHIFT", "ODE_STEPS", "ode_regression_loss", "sample_ode_trajectory",
           "student_timesteps"]

# Official trajectory settings (scripts/generate_ode_pairs.py).
ODE_STEPS = 48
ODE_SHIFT = 8.0
ODE_CFG = 6.0


def student_timesteps(stream: StreamingConfig) -> tuple[float, ...]:
    """The timesteps the student denoises at (the warped step list): the ones to keep."""
    return ChunkSchedule.from_config(stream).timesteps


@torch.no_grad()
def sample_ode_trajectory(
    teacher: nn.Module,
    noise: Tensor,
    cond: Tensor,
    uncond: Tensor,
    steps: int = ODE_STEPS,
    shift: float = ODE_SHIFT,
    cfg: float = ODE_CFG,
    keep_timesteps: Sequence[float] | None = None,
    *,
    num_train_timesteps: int | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> dict[str, Tensor]:
    """Euler-integrate the teacher from ``noise`` [B, F, C, H, W] with CFG ``cfg`` (standard
    convention, on the flow; prompts [B or 1, L, text_dim]).

    keep_timesteps: timesteps in ``(0, num_train_timesteps]`` at which to store the latent;
        default: the student's timesteps of the default :class:`StreamingConfig`; pass
        ``student_timesteps(stream)`` for another stream.
    num_train_timesteps: the timestep range of the models (default: the StreamingConfig default,
        1000); the teacher gets timestep ``sigma * num_train_timesteps``.
    callback: called as ``callback(step, steps)`` after every Euler step (progress bars).

    Returns ``{"noisy": [B, K, F, C, H, W], "timesteps": [B, K], "x0": [B, F, C, H, W]}``,
    ordered like ``keep_timesteps``; every tensor has the batch first, so trajectories of
    several batches concatenate along dim 0.
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    if noise.dim() != 5:
        raise ValueError(f"noise must be [B, F, C, H, W], got shape {tuple(noise.shape)}")
    defaults = StreamingConfig()
    n = defaults.num_train_timesteps if num_train_timesteps is None else num_train_timesteps
    keep = student_timesteps(defaults) if keep_timesteps is None else tuple(float(t) for t in keep_timesteps)
    if not keep or any(not 0 < t <= n for t in keep):
        raise ValueError(f"keep_timesteps must be non-empty and lie in (0, {n}], got {keep}")
    b, f = noise.shape[:2]
    sigmas = FlowMatchSchedule(shift=shift, num_train_timesteps=steps).sigmas.tolist() + [0.0]  # [steps + 1]
    keep_sigmas = [t / n for t in keep]
    kept: list[Tensor | None] = [None] * len(keep)
    x = noise
    for i in range(steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        t = torch.full((b, f), s * n, device=noise.device, dtype=noise.dtype)
        v = guided_flow(teacher, x, t, cond, uncond, cfg)
        for j, ks in enumerate(keep_sigmas):
            if kept[j] is None and s_next < ks <= s:
                kept[j] = x + (ks - s) * v  # the Euler segment at noise level ks
        x = x + (s_next - s) * v
        if callback is not None:
            callback(i + 1, steps)
    times = torch.tensor(keep, device=noise.device, dtype=noise.dtype).expand(b, -1)  # [B, K]
    return {"noisy": torch.stack(kept, dim=1), "timesteps": times.contiguous(), "x0": x}


def ode_regression_loss(
    student: nn.Module,
    trajectory: dict[str, Tensor],
    cond: Tensor,
    stream: StreamingConfig,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Regression of the final sample from the kept noisy latents (see the module docstring).

    student: the causal WanDiT (or a DDP wrapper: it is called through ``forward`` with the
        block-causal mask of ``stream``); trajectory: the dict of :func:`sample_ode_trajectory`;
    cond: prompt embeddings [B or 1, L, text_dim]; generator: draws the kept index per chunk.
    Returns ``(loss, metrics)`` with detached tensor metrics.
    """
    noisy, times, target = trajectory["noisy"], trajectory["timesteps"], trajectory["x0"]
    if noisy.dim() != 6 or noisy.shape[0] != target.shape[0] or noisy.shape[2:] != target.shape[1:]:
        raise ValueError(f"trajectory 'noisy' must be [B, K, F, C, H, W] matching 'x0' [B, F, C, H, W], got "
                         f"{tuple(noisy.shape)} and {tuple(target.shape)}")
    b, k, f, c, h, w = noisy.shape
    chunk = stream.num_frame_per_block
    if f % chunk:
        raise ValueError(f"{f} latent frames do not split into chunks of num_frame_per_block={chunk}")
    gen_device = generator.device if generator is not None else "cpu"
    index = torch.randint(k, (b, f // chunk), generator=generator, device=gen_device)
    index = index.repeat_interleave(chunk, dim=1).to(noisy.device)  # [B, F]
    x = noisy.gather(1, index.view(b, 1, f, 1, 1, 1).expand(b, 1, f, c, h, w)).squeeze(1)  # [B, F, C, H, W]
    t = times.to(x.dtype).gather(1, index)  # [B, F]
    cfg = unwrap(student).config
    _, ph, pw = cfg.patch_size
    mask = block_causal_mask(f, (h // ph) * (w // pw), stream, device=x.device)
    schedule = FlowMatchSchedule(shift=stream.timestep_shift, num_train_timesteps=stream.num_train_timesteps)
    x0 = predict_x0(student, x, t, cond, schedule, mask=mask)
    diff = x0 - target
    if diff.dtype in (torch.float16, torch.bfloat16):
        diff = diff.float()
    per_frame = diff.pow(2).mean(dim=(2, 3, 4))  # [B, F]
    valid = (t > 0).to(per_frame.dtype)  # frames given the clean sample are not regressed
    loss = (per_frame * valid).sum() / valid.sum().clamp(min=1)
    return loss, {"ode_loss": loss.detach(), "ode_timestep": t.float().mean()}

