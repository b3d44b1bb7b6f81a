"""The flow-matching schedule used by Wan2.1 and Self Forcing.

Conventions (the official ones, which the released checkpoints depend on):

* ``x_t = (1 - sigma) * x0 + sigma * noise`` and the model predicts the flow ``noise - x0``;
* timesteps live in ``[0, num_train_timesteps]`` and ``timestep = sigma * num_train_timesteps``;
* the 1000-entry training table is ``sigma = shift * s / (1 + (shift - 1) * s)`` for ``s`` evenly
  spaced from ``sigma_max`` down to ``sigma_min`` (``extra_one_step``: 1001 points, the last one
  dropped);
* a timestep that is not in the table uses the sigma of the *nearest* table entry.

The table is kept in float64; lookups return the caller's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["FlowMatchSchedule"]


class FlowMatchSchedule:
    """Shifted flow-matching schedule with nearest-timestep lookups."""

    def __init__(
        self,
        shift: float = 5.0,
        num_train_timesteps: int = 1000,
        sigma_min: float = 0.0,
        sigma_max: float = 1.0,
        extra_one_step: bool = True,
    ) -> None:
        if shift <= 0:
            raise ValueError(f"shift must be positive, got {shift}")
        if num_train_timesteps <= 0:
            raise ValueError(f"num_train_timesteps must be positive, got {num_train_timesteps}")
        if not 0.0 <= sigma_min < sigma_max <= 1.0:
            raise ValueError(f"need 0 <= sigma_min < sigma_max <= 1, got {sigma_min}, {sigma_max}")
        self.shift = float(shift)
        self.num_train_timesteps = int(num_train_timesteps)
        n = self.num_train_timesteps
        if extra_one_step:
            s = torch.linspace(sigma_max, sigma_min, n + 1, dtype=torch.float64)[:-1]
        else:
            s = torch.linspace(sigma_max, sigma_min, n, dtype=torch.float64)
        self.sigmas = self.shift * s / (1 + (self.shift - 1) * s)  # [n], float64
        self.timesteps = self.sigmas * n  # [n], float64
        # Training weight: a bell over timesteps centred at n / 2, normalised to mean 1.
        bell = torch.exp(-2 * ((self.timesteps - n / 2) / n) ** 2)
        bell = bell - bell.min()
        self.weights = bell * (n / bell.sum())  # [n], float64
        # Device copies of the tables, made once: a lookup on the hot path must not copy
        # (and, from pageable host memory, synchronise) every call.
        self._on_device: dict[tuple[str, torch.device], Tensor] = {}

    def _table(self, name: str, device: torch.device) -> Tensor:
        key = (name, device)
        if key not in self._on_device:
            self._on_device[key] = getattr(self, name).to(device)
        return self._on_device[key]

    # ---------------------------------------------------------------- lookups
    def index(self, timestep: Tensor) -> Tensor:
        """Index of the nearest table timestep for each entry of ``timestep`` (any shape)."""
        table = self._table("timesteps", timestep.device)
        flat = timestep.reshape(-1, 1).to(torch.float64)  # [N, 1]
        return (flat - table.unsqueeze(0)).abs().argmin(dim=1).reshape(timestep.shape)

    def sigma(self, timestep: Tensor) -> Tensor:
        """sigma of the nearest table entry, same shape as ``timestep``, float64."""
        return self._table("sigmas", timestep.device)[self.index(timestep)]

    def training_weight(self, timestep: Tensor) -> Tensor:
        return self._table("weights", timestep.device)[self.index(timestep)]

    def warp(self, steps: tuple[float, ...] | list[float]) -> list[float]:
        """Map a few-step list (e.g. [1000, 750, 500, 250]) through the shifted table.

        Step ``t`` becomes ``timesteps[n - t]`` (with ``timesteps[n] = 0``), e.g. 750 -> 937.5 for
        shift 5: the same fraction of the *unshifted* range, spent where the shift puts the noise.
        """
        n = self.num_train_timesteps
        extended = torch.cat([self.timesteps, self.timesteps.new_zeros(1)])  # [n + 1]
        out = []
        for t in steps:
            if float(t) != int(t) or not 0 <= int(t) <= n:
                raise ValueError(f"warped denoising steps must be integers in [0, {n}], got {t}")
            out.append(float(extended[n - int(t)]))
        return out

    # ---------------------------------------------------------------- conversions
    @staticmethod
    def _expand(sigma: Tensor, like: Tensor) -> Tensor:
        # sigma [...] broadcast over the trailing (C, H, W) dims of ``like``
        return sigma.reshape(*sigma.shape, *([1] * (like.dim() - sigma.dim()))).to(like.dtype)

    def add_noise(self, x0: Tensor, noise: Tensor, timestep: Tensor) -> Tensor:
        """x_t = (1 - sigma) x0 + sigma noise. ``timestep`` has the leading dims of ``x0``
        (e.g. [B] for [B, C, H, W] or [B, F] for [B, F, C, H, W])."""
        if x0.shape != noise.shape:
            raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have one shape")
        sigma = self._expand(self.sigma(timestep), x0)
        return (1 - sigma) * x0 + sigma * noise

    def x0_from_flow(self, flow: Tensor, xt: Tensor, timestep: Tensor) -> Tensor:
        """x0 = x_t - sigma * flow (flow = noise - x0)."""
        return xt - self._expand(self.sigma(timestep), xt) * flow

    def flow_from_x0(self, x0: Tensor, xt: Tensor, timestep: Tensor) -> Tensor:
        """flow = (x_t - x0) / sigma; undefined at sigma = 0."""
        return (xt - x0) / self._expand(self.sigma(timestep), xt)

    def flow_target(self, x0: Tensor, noise: Tensor) -> Tensor:
        """The regression target of flow matching."""
        return noise - x0
