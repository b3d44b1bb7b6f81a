"""Score identity Distillation (SiD, arXiv 2404.04057), the official Self-Forcing variant.

Same players as :mod:`training.algorithms.dmd`: a frozen teacher with CFG (real score) and a
critic trained with flow matching on the student's samples (fake score; its loss is the DMD
critic loss). The generator loss differs: with ``x_t = add_noise(x0, noise, t)`` *not* detached,

    loss = mean( (x0_real - x0_fake) * ((x0_real - x0) - alpha (x0_real - x0_fake)) / n )

with ``n = mean|x0 - x0_real|`` per sample (no gradient), in float64. Gradients flow through both
score networks into ``x_t`` and so into the student; the networks' own parameters receive none
(they are :func:`~training.algorithms.flow.frozen` during the call). ``alpha = 1`` (official
``sid_alpha``) by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from sf_sdk.scheduler import FlowMatchSchedule
from training.algorithms.dmd import check_score_range, critic_denoising_loss, score_timesteps
from training.algorithms.flow import frozen, guided_x0, match_batch, noise_like, predict_x0, unwrap

__all__ = ["SiD", "SiDConfig"]


@dataclass(frozen=True)
class SiDConfig:
    """SiD hyperparameters (official ``configs/self_forcing_sid.yaml``). ``guidance_scale`` uses
    the official convention ``real = cond + g (cond - uncond)`` (standard CFG scale ``g + 1``)."""

    alpha: float = 1.0
    guidance_scale: float = 3.0
    min_step: float = 0.02
    max_step: float = 0.98
    timestep_shift: float | None = None  # None: the schedule's shift

    def __post_init__(self) -> None:
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        check_score_range(self.min_step, self.max_step, self.timestep_shift)


class SiD:
    """SiD generator and critic losses (teacher frozen, critic trainable; see :class:`DMD`)."""

    def __init__(self, teacher: nn.Module, critic: nn.Module, schedule: FlowMatchSchedule,
                 config: SiDConfig | None = None) -> None:
        self.teacher = teacher
        self.critic = critic
        self.schedule = schedule
        self.config = SiDConfig() if config is None else config

    def generator_loss(self, x0: Tensor, cond: Tensor, uncond: Tensor, *,
                       generator: torch.Generator | None = None,
                       gradient_mask: Tensor | None = None) -> tuple[Tensor, dict[str, Any]]:
        """SiD loss of the student's samples ``x0`` [B, F, C, H, W]; returns ``(loss, metrics)``.

        ``gradient_mask`` (bool, broadcastable to x0) restricts the loss to some elements, as
        :meth:`DMD.generator_loss`'s (e.g. the generated frames after a given first frame)."""
        cfg = self.config
        b = x0.shape[0]
        cond, uncond = match_batch(cond, b), match_batch(uncond, b)
        critic = unwrap(self.critic)
        with torch.no_grad():
            t = score_timesteps(cfg, self.schedule, x0, generator)
            noise = noise_like(x0, generator)
        x_t = self.schedule.add_noise(x0, noise, t)
        with frozen(critic, self.teacher):
            x0_fake = predict_x0(critic, x_t, t, cond, self.schedule)
            x0_real = guided_x0(self.teacher, x_t, t, cond, uncond, 1.0 + cfg.guidance_scale,
                                schedule=self.schedule)
        real, fake, x = x0_real.double(), x0_fake.double(), x0.double()
        per_element = (real - fake) * ((real - x) - cfg.alpha * (real - fake))
        with torch.no_grad():
            normalizer = (x - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)  # [B, 1, 1, 1, 1]
        per_element = torch.nan_to_num(per_element / normalizer)
        loss = per_element[gradient_mask.expand_as(x0)].mean() if gradient_mask is not None else per_element.mean()
        metrics = {
            "sid_loss": loss.detach(),
            "sid_timestep": t.float().mean(),
            "real_fake_gap": (real - fake).abs().mean().detach(),
        }
        return loss, metrics

    def critic_loss(self, x0: Tensor, cond: Tensor, *, generator: torch.Generator | None = None
                    ) -> tuple[Tensor, dict[str, Any]]:
        """Flow-matching loss of the critic on the student's samples (detached here)."""
        return critic_denoising_loss(self.critic, x0, cond, self.schedule, self.config, generator)
