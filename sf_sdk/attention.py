"""The one seam that picks an attention implementation.

Layout everywhere is ``[B, L, H, D]`` (tokens before heads), the layout of the KV cache.

* :func:`attention` — full-sequence attention with an optional boolean mask (training,
  bidirectional teacher / critic, block-causal forward).
* :func:`cache_attention` — a chunk's queries over the first ``kv_len`` slots of a KV cache
  buffer (the chunk's own keys are already written there). ``kv_len`` is a Python int in eager
  streaming (the cache is sliced, no copy) or a 0-dim integer tensor in exported graphs (the
  whole capacity is read and slots ``>= kv_len`` are masked, so shapes stay static).

The implementation is chosen by :func:`set_backend`: ``"reference"`` (PyTorch SDPA),
``"kernel"`` (the compiled ``sf_sdk::`` ops from ``csrc/``) or ``"auto"`` (the kernel where it is
available and faster, the reference otherwise).
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["attention", "cache_attention", "set_backend", "get_backend", "reference_cache_attention"]

log = logging.getLogger(__name__)

Backend = Literal["auto", "reference", "kernel"]
_backend: Backend = "auto"


def set_backend(name: Backend) -> None:
    """Select the cache-attention implementation for the whole process."""
    global _backend
    if name not in ("auto", "reference", "kernel"):
        raise ValueError(f"attention backend must be 'auto', 'reference' or 'kernel', got {name!r}")
    _backend = name


def get_backend() -> Backend:
    return _backend


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Softmax attention. q [B, Lq, H, D], k/v [B, Lk, H, D], mask [Lq, Lk] bool (True = attend)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )  # [B, H, Lq, D]
    return out.transpose(1, 2)  # [B, Lq, H, D]


def reference_cache_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_len: int | Tensor) -> Tensor:
    """Pure-PyTorch cache attention: the fallback and the test oracle of the kernels."""
    if isinstance(kv_len, Tensor):
        slots = torch.arange(k_cache.shape[1], device=k_cache.device)
        valid = (slots < kv_len).view(1, 1, 1, -1)  # [1, 1, 1, cap]
        return attention(q, k_cache, v_cache, mask=valid)
    return attention(q, k_cache[:, :kv_len], v_cache[:, :kv_len])


def cache_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_len: int | Tensor) -> Tensor:
    """q [B, Lq, H, D] over cache slots [0, kv_len) of k/v_cache [B, cap, H, D] -> [B, Lq, H, D]."""
    # The kernels have no backward: anything that needs gradients takes the reference path.
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad)
    if _backend != "reference" and not needs_grad:
        from sf_sdk import ops  # local import: the extension is optional

        # masked: a tensor kv_len, where the reference must read and mask the whole capacity.
        if ops.kernel_available(q, _backend == "kernel", masked=isinstance(kv_len, Tensor)):
            return ops.cache_attention(q, k_cache, v_cache, kv_len)
    return reference_cache_attention(q, k_cache, v_cache, kv_len)
