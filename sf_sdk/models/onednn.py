"""Inference convs through oneDNN directly, for eager CPU paths (the tiny decoder's).

PyTorch's CPU conv reorders the weight into oneDNN's blocked layout on every call, and a ReLU
after it is a pass of its own. :class:`PackedConvs` calls oneDNN's conv op (the one Inductor's
frozen CPU graphs call) with each weight reordered once per input size, kept until the weight
changes, and the ReLU applied inside the conv (docs/performance.md, "The tiny decoder's convs
through oneDNN"). With a reordered weight oneDNN writes its output channels-last whatever the
input's layout: a caller whose other ops run on contiguous tensors pays for that (the Wan
decoder's 3D convs measured no faster this way), so callers keep their frames channels-last.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sf_sdk.models.graphs import tracing, weights_key

__all__ = ["PackedConvs"]

_ONEDNN_CONVS = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class PackedConvs:
    """Convs and transposed 2D convs through oneDNN with their weights reordered once.

    oneDNN's arithmetic: the same bits as the modules where PyTorch's conv is oneDNN's too
    (bfloat16 on this CPU; tests/test_taehv.py), float rounding apart where PyTorch picks its own
    kernel (small float32 shapes). For float32 or bfloat16 tensors on the CPU, without autograd and
    not traced (:meth:`usable`); the callers run their modules otherwise. Up to
    :attr:`SIZES_PER_CONV` input sizes are kept per conv (a stream's first chunk and the later ones
    differ in frames).
    """

    SIZES_PER_CONV = 4

    def __init__(self) -> None:
        # a conv module, or (name, index) -> {input size: (its weights' key, oneDNN weight)}
        self._packed: dict[object, dict[tuple[int, ...], tuple[tuple[object, ...], Tensor]]] = {}

    # A copy or a pickle starts without packed weights (oneDNN's opaque tensors neither copy nor
    # pickle, and the keys are the original's modules).
    def __deepcopy__(self, memo: dict) -> PackedConvs:
        return PackedConvs()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._packed = {}

    def __len__(self) -> int:
        """Packed weights held (all convs, all input sizes)."""
        return sum(len(sizes) for sizes in self._packed.values())

    @staticmethod
    def usable(x: Tensor) -> bool:
        return (_ONEDNN_CONVS and x.device.type == "cpu" and type(x) is Tensor and not torch.is_grad_enabled()
                and x.dtype in (torch.float32, torch.bfloat16) and x.dim() in (4, 5) and not tracing())

    def _weight(self, owner: object, key: tuple[object, ...], size: tuple[int, ...], make) -> Tensor:
        sizes = self._packed.setdefault(owner, {})
        cached = sizes.get(size)
        if cached is None or cached[0] != key:
            if cached is None and len(sizes) >= self.SIZES_PER_CONV:
                sizes.clear()
            cached = sizes[size] = (key, make())
        return cached[1]

    def __call__(self, conv: nn.Conv2d | nn.Conv3d, x: Tensor, *, relu: bool = False) -> Tensor:
        """``relu(conv(x))`` (or ``conv(x)``) for ``x`` that :meth:`usable` accepts."""
        weight, bias = conv.weight, conv.bias
        args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        size = tuple(x.shape)
        packed = self._weight(conv, weights_key((weight,) if bias is None else (weight, bias)), size,
                              lambda: torch.ops.mkldnn._reorder_convolution_weight(weight.detach(), *args, list(size)))
        return torch.ops.mkldnn._convolution_pointwise(x, packed, None if bias is None else bias.detach(), *args,
                                                       "relu" if relu else "none", [None], "")

    def transposed(self, index: int, weight: Tensor, sources: tuple[Tensor, ...], x: Tensor, *, stride: int,
                   padding: int) -> Tensor:
        """``conv_transpose2d(x, weight, stride=stride, padding=padding)`` (no bias) for ``x``
        [N, C_in, H, W], the weight [C_in, C_out, k, k] made from the parameters ``sources`` (the
        key: it is rebuilt when they change); ``index`` names it."""
        args = ([padding] * 2, [0, 0], [stride] * 2, [1, 1], 1)
        size = tuple(x.shape)
        packed = self._weight(("transposed", index), weights_key(sources), size,
                              lambda: torch.ops.mkldnn._reorder_convolution_transpose_weight(weight, *args, list(size)))
        return torch.ops.mkldnn._convolution_transpose_pointwise(x, packed, None, *args, "none", [None], "")
