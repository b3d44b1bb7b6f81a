"""Pure-PyTorch attention: the model's softmax attention and the reference cache attention.

Both :mod:`sf_sdk.attention` (the seam that picks an implementation) and :mod:`sf_sdk.ops` (the
custom ops, whose fallback and test oracle this is) import from here; neither imports the other's
internals.

Layout everywhere is ``[B, L, H, D]`` (tokens before heads), the layout of the KV cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["attention", "reference_cache_attention"]


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Softmax attention. q [B, Lq, H, D], k/v [B, Lk, H, D]; mask bool (True = attend), any shape
    that broadcasts to [B, H, Lq, Lk] (e.g. [Lq, Lk] or [B, 1, 1, Lk])."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )  # [B, H, Lq, D]
    return out.transpose(1, 2)  # [B, Lq, H, D]


def reference_cache_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_len: int | Tensor) -> Tensor:
    """q [B, Lq, H, D] over the slots [0, kv_len) of k/v_cache [B, cap, H, D] -> [B, Lq, H, D].

    ``kv_len``: a Python int (the cache is sliced, no copy), a 0-dim integer tensor, or a ``[B]``
    integer tensor (one valid length per batch row, e.g. pooled streams at different positions);
    tensors read the whole capacity and mask slots ``>= kv_len``, so shapes stay static. A row
    with ``kv_len == 0`` attends to nothing and gives zeros.
    """
    if isinstance(kv_len, Tensor):
        slots = torch.arange(k_cache.shape[1], device=k_cache.device)
        lens = kv_len.to(k_cache.device).reshape(-1, 1, 1, 1)  # [B or 1, 1, 1, 1]
        valid = slots.view(1, 1, 1, -1) < lens  # [B or 1, 1, 1, cap]
        out = attention(q, k_cache, v_cache, mask=valid)
        return torch.where(lens.view(-1, 1, 1, 1) > 0, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return attention(q, k_cache[:, :kv_len], v_cache[:, :kv_len])
