"""The tests' random DiT: the tiny preset (or a variant) with every weight drawn from N(0, 0.2),
not the zero / identity initialisation, so that every path of a call matters; and OpNames, which
records the ops a call dispatched."""

from __future__ import annotations

import dataclasses

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sf_sdk.config import DIT_PRESETS
from sf_sdk.models.dit import WanDiT

TINY = DIT_PRESETS["tiny"]


def random_dit(*, seed: int | None = None, dtype: torch.dtype = torch.float64, eval_mode: bool = True,
               **overrides) -> WanDiT:
    """A tiny-preset DiT (``overrides``: DiTConfig fields) with random weights; ``seed`` seeds the
    global generator first (None: whatever state it is in)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = WanDiT(dataclasses.replace(TINY, **overrides) if overrides else TINY).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval() if eval_mode else model


class OpNames(TorchDispatchMode):
    """Inside ``with names:``, the name of every op dispatched (``names.names``): which kernels a
    call really ran."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))
