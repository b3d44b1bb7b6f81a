"""Distribution Matching Distillation (DMD, arXiv 2311.18828 / 2405.14867) as Self Forcing uses it.

Two bidirectional score models judge the student's rollout ``x0`` [B, F, C, H, W]:

* the **real score** — the frozen teacher with classifier-free guidance;
* the **fake score** — the critic, initialised from the teacher and trained with the flow-matching
  (denoising) loss on the student's own samples (:meth:`DMD.critic_loss`), so that it tracks the
  student's distribution.

Generator update (:meth:`DMD.generator_loss`), with no gradient through either score:

1. ``t`` from :func:`~training.algorithms.flow.sample_score_timesteps` (one per sample);
   ``x_t = add_noise(x0, noise, t)``;
2. ``x0_real = cond + g (cond - uncond)`` on the teacher's x0 predictions (official
   convention: ``g = guidance_scale``, i.e. standard CFG scale ``g + 1``),
   ``x0_fake`` the critic's conditional x0 (plus its own guidance if ``fake_guidance_scale``);
3. ``grad = (x0_fake - x0_real) / mean|x0 - x0_real|`` (mean per sample, DMD eq. 8);
4. ``loss = 0.5 * mean((x0 - (x0 - grad).detach())^2)`` in float64, so ``d loss / d x0 =
   grad / numel``: gradient descent moves x0 towards the real score and away from the fake one.

Scores are computed through each model's ``forward`` (bidirectional, ``mask=None``), so DDP / FSDP
wrapped critics work; the generator loss calls the unwrapped critic, under ``no_grad``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from sf_sdk.scheduler import FlowMatchSchedule
from training.algorithms.flow import (
    flow_matching_loss,
    guided_x0,
    match_batch,
    noise_like,
    predict_x0,
    sample_score_timesteps,
    unwrap,
)

__all__ = ["DMD", "DMDConfig", "check_score_range", "critic_denoising_loss", "score_timesteps"]


def check_score_range(min_step: float, max_step: float, shift: float | None) -> None:
    """Validate the score-timestep fields shared by the DMD / SiD / GAN configs."""
    if not 0.0 <= min_step <= max_step <= 1.0:
        raise ValueError(f"need 0 <= min_step <= max_step <= 1 (fractions of the timestep range), "
                         f"got {min_step}, {max_step}")
    if shift is not None and shift <= 0:
        raise ValueError(f"timestep_shift must be positive, got {shift}")


def score_timesteps(config: Any, schedule: FlowMatchSchedule, like: Tensor,
                    generator: torch.Generator | None) -> Tensor:
    """[B, F] score timesteps for latents ``like`` [B, F, ...], one per sample (official), from a
    config with ``min_step``, ``max_step`` and ``timestep_shift`` (None: the schedule's shift)."""
    b, f = like.shape[:2]
    shift = schedule.shift if config.timestep_shift is None else config.timestep_shift
    return sample_score_timesteps(b, f, num_train_timesteps=schedule.num_train_timesteps, shift=shift,
                                  min_step=config.min_step, max_step=config.max_step,
                                  generator=generator, device=like.device, dtype=like.dtype)


@dataclass(frozen=True)
class DMDConfig:
    """DMD hyperparameters (official defaults of ``configs/self_forcing_dmd.yaml``).

    ``guidance_scale`` uses the official convention ``real = cond + g (cond - uncond)``: the
    default 3.0 is a standard CFG scale of 4.0. ``fake_guidance_scale`` likewise for the critic
    (0: conditional only).
    """

    guidance_scale: float = 3.0
    fake_guidance_scale: float = 0.0
    min_step: float = 0.02
    max_step: float = 0.98
    timestep_shift: float | None = None  # None: the schedule's shift (the student's, 5)
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.guidance_scale < 0 or self.fake_guidance_scale < 0:
            raise ValueError(f"guidance scales must be >= 0, got {self.guidance_scale}, "
                             f"{self.fake_guidance_scale}")
        check_score_range(self.min_step, self.max_step, self.timestep_shift)


def critic_denoising_loss(critic: nn.Module, x0: Tensor, cond: Tensor, schedule: FlowMatchSchedule,
                          config: Any, generator: torch.Generator | None
                          ) -> tuple[Tensor, dict[str, Any]]:
    """The fake score's loss (DMD and SiD): flow matching on the student's detached samples, at
    score timesteps (see :func:`score_timesteps`), unweighted (official ``denoising_loss_type:
    flow``)."""
    x0 = x0.detach()
    t = score_timesteps(config, schedule, x0, generator)
    loss, metrics = flow_matching_loss(critic, x0, cond, t, schedule, noise=noise_like(x0, generator))
    return loss, {"critic_loss": metrics["loss"], "critic_timestep": metrics["timestep"]}


class DMD:
    """DMD generator and critic losses.

    teacher: the real score (bidirectional WanDiT, frozen); critic: the fake score (trainable,
    may be DDP-wrapped); schedule: the flow-matching schedule of the student stream
    (``ChunkSchedule.from_config(stream).schedule``), used for noising and flow -> x0.
    Prompts are embeddings [B, L, text_dim]; ``uncond`` may have batch 1.
    """

    def __init__(self, teacher: nn.Module, critic: nn.Module, schedule: FlowMatchSchedule,
                 config: DMDConfig | None = None) -> None:
        self.teacher = teacher
        self.critic = critic
        self.schedule = schedule
        self.config = DMDConfig() if config is None else config

    @torch.no_grad()
    def dmd_gradient(self, x0: Tensor, x_t: Tensor, timestep: Tensor, cond: Tensor, uncond: Tensor
                     ) -> tuple[Tensor, Tensor, Tensor]:
        """The normalised DMD gradient [B, F, C, H, W] at ``x_t``, with ``x0_real`` and ``x0_fake``."""
        cfg = self.config
        critic = unwrap(self.critic)
        if cfg.fake_guidance_scale:
            x0_fake = guided_x0(critic, x_t, timestep, cond, uncond, 1.0 + cfg.fake_guidance_scale,
                                schedule=self.schedule)
        else:
            x0_fake = predict_x0(critic, x_t, timestep, cond, self.schedule)
        x0_real = guided_x0(self.teacher, x_t, timestep, cond, uncond, 1.0 + cfg.guidance_scale,
                            schedule=self.schedule)
        grad = x0_fake - x0_real
        if cfg.normalize:
            normalizer = (x0 - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)  # [B, 1, 1, 1, 1]
            grad = grad / normalizer
        return torch.nan_to_num(grad), x0_real, x0_fake

    def generator_loss(
        self,
        x0: Tensor,
        cond: Tensor,
        uncond: Tensor,
        *,
        generator: torch.Generator | None = None,
        gradient_mask: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Any]]:
        """DMD loss of the student's samples ``x0`` [B, F, C, H, W] (with autograd from the rollout).

        ``gradient_mask`` (bool, broadcastable to x0) restricts the loss to some elements, as the
        official mask that drops the first chunk. Returns ``(loss, metrics)`` with detached
        tensor metrics.
        """
        b = x0.shape[0]
        cond, uncond = match_batch(cond, b), match_batch(uncond, b)
        with torch.no_grad():
            t = score_timesteps(self.config, self.schedule, x0, generator)
            x_t = self.schedule.add_noise(x0.detach(), noise_like(x0, generator), t)
            grad, x0_real, x0_fake = self.dmd_gradient(x0.detach(), x_t, t, cond, uncond)
        x = x0.double()
        target = (x - grad.double()).detach()
        if gradient_mask is not None:
            mask = gradient_mask.expand_as(x0)
            loss = 0.5 * F.mse_loss(x[mask], target[mask])
        else:
            loss = 0.5 * F.mse_loss(x, target)
        metrics = {
            "dmd_loss": loss.detach(),
            "dmd_grad_norm": grad.abs().mean(),
            "dmd_timestep": t.float().mean(),
            "real_fake_gap": (x0_real - x0_fake).abs().mean(),
        }
        return loss, metrics

    def critic_loss(self, x0: Tensor, cond: Tensor, *, generator: torch.Generator | None = None
                    ) -> tuple[Tensor, dict[str, Any]]:
        """Flow-matching loss of the critic on the student's samples (detached here)."""
        return critic_denoising_loss(self.critic, x0, cond, self.schedule, self.config, generator)
