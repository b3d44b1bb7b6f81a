"""Two checks the models' eager fast paths share: whether a graph is being traced, and a key of
parameter tensors that changes whenever one of them does (for weights derived from them)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["tracing", "weights_key"]

_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.5 has it


def tracing() -> bool:
    """Inside torch.compile / torch.export / jit tracing (graphs keep standard, real-valued ops:
    ONNX and TensorRT have no complex tensors, and derived weights are computed in the graph)."""
    return torch.compiler.is_compiling() or _is_exporting() or torch.jit.is_tracing()


def weights_key(params: Iterable[Tensor]) -> tuple:
    """Storage, in-place version (inference tensors have none: they cannot be updated in place
    outside inference mode), dtype and device of each tensor: equal keys, equal values."""
    return tuple((p.data_ptr(), None if p.is_inference() else p._version, p.dtype, p.device) for p in params)
