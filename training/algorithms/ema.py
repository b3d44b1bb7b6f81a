"""Exponential moving average of a model's parameters (the generator's ``generator_ema``).

Official semantics (``ema_weight`` 0.99, ``ema_start_step`` 200): the average starts as a copy of
the weights at the start step, then after every generator update
``shadow = decay * shadow + (1 - decay) * param``. The shadow is kept in float32 (or wider) on
the parameters' device. For sharded (FSDP2) models the shadow holds the same shards: save it the
way the model itself is saved.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from training.algorithms.flow import unwrap

__all__ = ["EMA"]


def _shadow_dtype(p: Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


class EMA:
    """EMA of ``model``'s named parameters (DDP / compile wrappers are unwrapped).

    decay: the weight of the old average (0 <= decay < 1); start_step: before (and at) this
    step :meth:`update` copies the weights instead of averaging them.
    """

    def __init__(self, model: nn.Module, decay: float = 0.99, start_step: int = 200) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        if start_step < 0:
            raise ValueError(f"EMA start_step must be >= 0, got {start_step}")
        self.decay = float(decay)
        self.start_step = int(start_step)
        with torch.no_grad():
            self.shadow: dict[str, Tensor] = {
                name: p.detach().clone().to(_shadow_dtype(p)) for name, p in unwrap(model).named_parameters()
            }

    def _pairs(self, model: nn.Module) -> list[tuple[Tensor, Tensor]]:
        params = dict(unwrap(model).named_parameters())
        if params.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - params.keys())
            extra = sorted(params.keys() - self.shadow.keys())
            raise ValueError(f"model parameters do not match the EMA: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")
        return [(self.shadow[name], p) for name, p in params.items()]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold the current weights in; ``step`` = generator updates done so far (this one included)."""
        pairs = self._pairs(model)
        if step <= self.start_step:
            for s, p in pairs:
                s.copy_(p.detach())
            return
        for s, p in pairs:
            s.lerp_(p.detach().to(s.dtype), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model`` (cast to its parameters' dtype)."""
        for s, p in self._pairs(model):
            p.copy_(s.to(p.dtype))

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged weights by parameter name (a flat tensor dict: safetensors-ready)."""
        return {name: s.detach().clone() for name, s in self.shadow.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore from :meth:`state_dict` (same names and shapes, or ValueError)."""
        if state.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - state.keys())
            extra = sorted(state.keys() - self.shadow.keys())
            raise ValueError(f"EMA state does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, s in self.shadow.items():
            if state[name].shape != s.shape:
                raise ValueError(f"EMA state {name!r} has shape {tuple(state[name].shape)}, expected "
                                 f"{tuple(s.shape)}")
            s.copy_(state[name])
