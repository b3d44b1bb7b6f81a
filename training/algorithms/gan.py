"""A GAN loss on the critic's features (the paper's Self Forcing + GAN variant).

Discriminator = the critic DiT (bidirectional, initialised from the teacher) + a small
:class:`DiscriminatorHead`. The head reads the **hidden states of chosen critic blocks**
(``[B, F*T, dim]`` token features of the noised latent, captured with forward hooks, so the DiT
code is untouched): one learnable register token per block cross-attends over that block's
tokens and is refined by an FFN, then the pooled tokens go through an MLP to one logit per
sample. The defaults read blocks at 14/30, 22/30 and 30/30 of the depth (layers 13, 21 and 29 of
Wan-1.3B, the official choice). Critic features rather than raw latents: the critic already
understands noisy video at every timestep and the prompt (cross-attention), so a small head
suffices.

Both players see latents noised to the same score timestep (official): fake = the student's
rollout, real = ground-truth clean latents (VAE-encoded data, or teacher ODE samples: the GAN
is not data-free). With ``relativistic=True`` (default) the pairing is

    generator:     softplus(-(D(fake) - D(real)))
    discriminator: softplus(-(D(real) - D(fake)))

(otherwise the non-saturating losses), scaled by the official weights (0.01). Optional R1 / R2
penalties use the official finite-difference form ``((D(x + s e) - D(x)) / s)^2``.
Gradients: :meth:`RelativisticGAN.generator_loss` reaches only the student (critic and head are
frozen during it); :meth:`RelativisticGAN.critic_loss` reaches only the critic and the head
(samples detached). Every critic evaluation is one batched forward (DDP-friendly).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from sf_sdk.config import DiTConfig
from sf_sdk.scheduler import FlowMatchSchedule
from training.algorithms.dmd import check_score_range, score_timesteps
from training.algorithms.flow import frozen, match_batch, noise_like, unwrap

__all__ = ["DiscriminatorHead", "GANConfig", "RelativisticGAN", "critic_features", "default_feature_layers"]

# Depth fractions of the official feature blocks (13, 21, 29 of 30 layers).
OFFICIAL_FEATURE_DEPTHS = (14 / 30, 22 / 30, 30 / 30)


def default_feature_layers(num_layers: int) -> tuple[int, ...]:
    """Block indices at the official depth fractions for a DiT of ``num_layers`` blocks."""
    return tuple(max(0, round(frac * num_layers) - 1) for frac in OFFICIAL_FEATURE_DEPTHS)


@dataclass(frozen=True)
class GANConfig:
    """GAN hyperparameters (official ``model/gan.py`` defaults; relativistic pairing on)."""

    generator_weight: float = 1e-2
    discriminator_weight: float = 1e-2
    relativistic: bool = True
    r1_weight: float = 0.0
    r2_weight: float = 0.0
    r1_sigma: float = 0.01
    r2_sigma: float = 0.01
    min_step: float = 0.02
    max_step: float = 0.98
    timestep_shift: float | None = None  # None: the schedule's shift

    def __post_init__(self) -> None:
        check_score_range(self.min_step, self.max_step, self.timestep_shift)
        if min(self.r1_weight, self.r2_weight) < 0 or min(self.r1_sigma, self.r2_sigma) <= 0:
            raise ValueError("R1/R2 weights must be >= 0 and their sigmas > 0")


class _TokenPool(nn.Module):
    """A register token cross-attends over one block's tokens, then an FFN: [B, L, D] -> [B, D]."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, eps: float) -> None:
        super().__init__()
        self.norm_features = nn.LayerNorm(dim, eps=eps)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_ffn = nn.LayerNorm(dim, eps=eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))

    def forward(self, features: Tensor, token: Tensor) -> Tensor:
        kv = self.norm_features(features)  # [B, L, D]
        token = token + self.attn(token, kv, kv, need_weights=False)[0]  # [B, 1, D]
        token = token + self.ffn(self.norm_ffn(token))
        return token[:, 0]  # [B, D]


class DiscriminatorHead(nn.Module):
    """Logit per sample from the hidden states of ``layers`` blocks of a critic DiT."""

    def __init__(self, dim: int, layers: Sequence[int], num_heads: int, ffn_dim: int, eps: float = 1e-6
                 ) -> None:
        super().__init__()
        if not layers:
            raise ValueError("the discriminator head needs at least one feature layer")
        self.layers = tuple(int(i) for i in layers)
        n = len(self.layers)
        self.registers = nn.Parameter(torch.randn(n, dim) * 0.02)
        self.register_norm = nn.RMSNorm(dim, eps=eps)
        self.pools = nn.ModuleList([_TokenPool(dim, num_heads, ffn_dim, eps) for _ in range(n)])
        self.classifier = nn.Sequential(nn.LayerNorm(n * dim, eps=eps), nn.Linear(n * dim, dim), nn.SiLU(),
                                        nn.Linear(dim, 1))

    @classmethod
    def for_critic(cls, cfg: DiTConfig, layers: Sequence[int] | None = None) -> DiscriminatorHead:
        """A head sized for a critic with config ``cfg`` (default layers: official depths)."""
        layers = default_feature_layers(cfg.num_layers) if layers is None else layers
        bad = [i for i in layers if not 0 <= i < cfg.num_layers]
        if bad:
            raise ValueError(f"feature layers {bad} do not exist in a {cfg.num_layers}-block critic")
        return cls(cfg.dim, layers, cfg.num_heads, cfg.dim * 2, cfg.eps)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """features: one [B, L, dim] tensor per layer (in ``self.layers`` order) -> logits [B]."""
        if len(features) != len(self.pools):
            raise ValueError(f"expected {len(self.pools)} feature tensors, got {len(features)}")
        b = features[0].shape[0]
        tokens = self.register_norm(self.registers)  # [n, D]
        pooled = [pool(x, tokens[i].expand(b, 1, -1).to(x.dtype))
                  for i, (pool, x) in enumerate(zip(self.pools, features))]  # n x [B, D]
        return self.classifier(torch.cat(pooled, dim=1)).squeeze(1)  # [B]


def _keep(store: dict[int, Tensor], index: int, module: nn.Module, args: Any, output: Tensor) -> None:
    store[index] = output


def critic_features(critic: nn.Module, x_t: Tensor, timestep: Tensor, context: Tensor,
                    layers: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
    """Run the critic (bidirectional) and return its flow and the outputs of blocks ``layers``
    ([B, F*T, dim] each), captured with forward hooks on ``unwrap(critic).blocks``."""
    blocks = unwrap(critic).blocks
    store: dict[int, Tensor] = {}
    handles = [blocks[i].register_forward_hook(functools.partial(_keep, store, i)) for i in set(layers)]
    try:
        flow = critic(x_t, timestep, match_batch(context, x_t.shape[0]), mask=None)
    finally:
        for h in handles:
            h.remove()
    return flow, [store[i] for i in layers]


class RelativisticGAN:
    """GAN losses with a critic DiT + :class:`DiscriminatorHead` as the discriminator."""

    def __init__(self, critic: nn.Module, head: nn.Module, schedule: FlowMatchSchedule,
                 config: GANConfig | None = None) -> None:
        self.critic = critic
        self.head = head
        self.schedule = schedule
        self.config = GANConfig() if config is None else config

    def _logits(self, critic: nn.Module, head: nn.Module, batches: list[Tensor], timestep: Tensor,
                cond: Tensor) -> tuple[list[Tensor], Tensor]:
        """One batched critic forward over ``batches`` (each [B, F, C, H, W]) -> logits [B] each,
        and a zero that touches the critic's flow output (keeps every parameter in the graph)."""
        n = len(batches)
        x = torch.cat(batches, dim=0)  # [n*B, F, C, H, W]
        flow, feats = critic_features(critic, x, timestep.repeat(n, 1), cond.repeat(n, 1, 1),
                                      unwrap(self.head).layers)
        logits = head(feats)  # [n*B]
        return list(logits.chunk(n)), flow.sum() * 0.0

    def _noised(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return self.schedule.add_noise(x0, noise, t)

    def generator_loss(self, x0: Tensor, real_latents: Tensor, cond: Tensor, *,
                       generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Any]]:
        """GAN loss of the student's samples ``x0`` against ``real_latents`` (both [B, F, C, H, W])."""
        cfg = self.config
        cond = match_batch(cond, x0.shape[0])
        with torch.no_grad():
            t = score_timesteps(cfg, self.schedule, x0, generator)
            noisy_real = self._noised(real_latents, noise_like(x0, generator), t)
            fake_noise = noise_like(x0, generator)
        noisy_fake = self._noised(x0, fake_noise, t)
        critic, head = unwrap(self.critic), unwrap(self.head)
        with frozen(critic, head):
            (fake, real), _ = self._logits(critic, head, [noisy_fake, noisy_real], t, cond)
        logit = fake - real.detach() if cfg.relativistic else fake
        loss = F.softplus(-logit.float()).mean() * cfg.generator_weight
        return loss, {"gan_g_loss": loss.detach(), "fake_logit": fake.detach().mean(),
                      "real_logit": real.detach().mean()}

    def critic_loss(self, x0: Tensor, real_latents: Tensor, cond: Tensor, *,
                    generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Any]]:
        """Discriminator loss (+ R1 / R2) for the critic and the head; ``x0`` is detached here."""
        cfg = self.config
        x0 = x0.detach()
        cond = match_batch(cond, x0.shape[0])
        with torch.no_grad():
            t = score_timesteps(cfg, self.schedule, x0, generator)
            noise = noise_like(x0, generator)
            batches = [self._noised(x0, noise, t), self._noised(real_latents.detach(), noise, t)]
            if cfg.r1_weight > 0:
                batches.append(batches[1] + cfg.r1_sigma * noise_like(x0, generator))
            if cfg.r2_weight > 0:
                batches.append(batches[0] + cfg.r2_sigma * noise_like(x0, generator))
        logits, touch = self._logits(self.critic, self.head, batches, t, cond)
        fake, real = logits[0], logits[1]
        if cfg.relativistic:
            d_loss = F.softplus(-(real - fake).float()).mean()
        else:
            d_loss = F.softplus(-real.float()).mean() + F.softplus(fake.float()).mean()
        loss = d_loss * cfg.discriminator_weight + touch
        metrics: dict[str, Any] = {"gan_d_loss": loss.detach(), "fake_logit": fake.detach().mean(),
                                   "real_logit": real.detach().mean()}
        extra = 2
        if cfg.r1_weight > 0:
            r1 = cfg.r1_weight * ((logits[extra] - real) / cfg.r1_sigma).float().pow(2).mean()
            loss, metrics["r1"], extra = loss + r1, r1.detach(), extra + 1
        if cfg.r2_weight > 0:
            r2 = cfg.r2_weight * ((logits[extra] - fake) / cfg.r2_sigma).float().pow(2).mean()
            loss, metrics["r2"] = loss + r2, r2.detach()
        return loss, metrics
