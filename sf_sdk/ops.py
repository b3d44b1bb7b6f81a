"""Custom ops for cache-aware streaming attention: ``sf_sdk::`` ops with kernels from ``csrc/``.

Ops (schemas defined here with :mod:`torch.library`, so they exist, run and trace on every
machine, with or without a compiled build):

* ``sf_sdk::cache_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor kv_len) -> Tensor``:
  q ``[B, Lq, H, D]`` attends over the cache slots ``[0, kv_len)`` of k/v_cache
  ``[B, capacity, H, D]``; ``kv_len`` is a 0-dim integer tensor (CPU, or on the device of q).
* ``sf_sdk::cache_write(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slots)``:
  in place ``k_cache[:, slots] = k`` and ``v_cache[:, slots] = v`` (k/v ``[B, n, H, D]``,
  slots int64 ``[n]``): a chunk's ring write, wrapping around the end of the ring or not.
* ``sf_sdk::cache_write_rope(..., Tensor cos, Tensor sin)``: the same with Wan's complex-pair
  rotary applied to k on the way (channels ``(2p, 2p+1)`` of token ``i`` rotated by the angle with
  cosine ``cos[i, p]`` and sine ``sin[i, p]``; tables ``[n, D/2]`` float32/float64).
* The DiT block's elementwise chains, float32 CPU: ``modulated_layer_norm``, ``grouped_rms_norm``,
  ``gelu_tanh_`` (:func:`block_kernels_available`).
* ``sf_sdk::dit_block_step(...)`` / ``sf_sdk::dit_block_write_kv(...)``: one DiT block's call on a
  streaming chunk (or its cache pass) as one op, float32 CPU (:func:`reference_dit_block_step`;
  the CPU kernel runs the eager block's ops in the same order from C++, so an eager stream gives
  the same bits either way, without Python's per-op cost).

Each op has a fake implementation (torch.compile / torch.export), a pure-PyTorch reference
registered as the ``CompositeExplicitAutograd`` kernel (the fallback on every device and the test
oracle), and compiled kernels that override the reference on their device once loaded: C++ for
the CPU (``csrc/cpu``) and CUDA (``csrc/cuda``, bf16/fp16/fp32, sm_80 and sm_90).

Build: nothing is compiled at ``pip install`` time. The kernels are compiled on first use with
:func:`torch.utils.cpp_extension.load` (ninja) into ``$SF_SDK_KERNEL_CACHE`` (default
``~/.cache/sf_sdk/kernels``), one directory per torch version, Python version, CPU instruction set
and source hash; ``python -m sf_sdk.ops build`` builds them up front (CI does this once).
Concurrent builds are serialized by an ``flock`` on the build directory (released by the kernel if
a builder dies, so no stale lock survives). ``SF_SDK_NO_CPU_KERNELS=1`` / ``SF_SDK_NO_CUDA_KERNELS=1``
skip the CPU / CUDA kernels. The CUDA kernels build only when torch has CUDA and ``nvcc`` exists.
A missing or failed build falls back to the reference with one logged warning.

When the kernel is used by default (``set_backend("auto")``; ``"kernel"`` always uses it): see
:func:`kernel_available`. The rule comes from ``benchmarks/attention.py`` on this project's CPU
machines.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from sf_sdk.reference import reference_cache_attention

__all__ = [
    "KERNEL_DTYPES",
    "build",
    "cache_attention",
    "cache_write",
    "cache_write_rope",
    "kernel_available",
    "fused_write_available",
    "block_kernels_available",
    "reference_modulated_layer_norm",
    "reference_grouped_rms_norm",
    "reference_gelu_tanh_",
    "reference_dit_block_step",
    "reference_dit_block_write_kv",
    "BLOCK_STEP_WEIGHTS",
    "loaded_libraries",
    "unavailable_reason",
    "reference_cache_write",
    "reference_cache_write_rope",
]

log = logging.getLogger(__name__)

# Dtypes the compiled cache_attention kernels accept (they accumulate in float32).
KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
# Dtypes the reference rotary write computes in (the wider of the inputs).
_ROPE_TABLE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)

_NAMESPACE = "sf_sdk"
_CSRC_ENV = "SF_SDK_CSRC"
_CACHE_ENV = "SF_SDK_KERNEL_CACHE"
_NO_CPU_ENV = "SF_SDK_NO_CPU_KERNELS"
_NO_CUDA_ENV = "SF_SDK_NO_CUDA_KERNELS"
_BUILD_HINT = ("build them with `python -m sf_sdk.ops build` (needs a C++ compiler and ninja; the CUDA "
               f"kernels also need torch with CUDA and nvcc), and unset {_NO_CPU_ENV} / {_NO_CUDA_ENV}")
# GPU targets of the CUDA build: Ampere and Hopper SASS, plus Hopper PTX for newer GPUs.
_CUDA_GENCODE: tuple[str, ...] = (
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
)


# --------------------------------------------------------------------------------------------
# Argument checks (the fake and reference implementations; the C++ side has the same rules)
# --------------------------------------------------------------------------------------------


def _check_layout(t: Tensor, name: str, layout: str) -> None:
    if t.dim() != 4:
        raise ValueError(f"{name} must be a 4-D tensor {layout}, got shape {tuple(t.shape)}")
    if t.shape[3] > 1 and t.stride(3) != 1:
        raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension, got strides "
                         f"{t.stride()}; call .contiguous() on it first")


def _check_same(a: Tensor, a_name: str, b: Tensor, b_name: str) -> None:
    if a.dtype != b.dtype:
        raise ValueError(f"{a_name} ({a.dtype}) and {b_name} ({b.dtype}) must have the same dtype; cast one "
                         "of them")
    if a.device != b.device:
        raise ValueError(f"{a_name} ({a.device}) and {b_name} ({b.device}) must be on the same device")


def _check_cache_attention_args(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_len: Tensor) -> None:
    _check_layout(q, "q", "[B, Lq, H, D]")
    _check_layout(k_cache, "k_cache", "[B, capacity, H, D]")
    _check_layout(v_cache, "v_cache", "[B, capacity, H, D]")
    _check_same(q, "q", k_cache, "k_cache")
    _check_same(q, "q", v_cache, "v_cache")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must have the "
                         "same shape")
    if (q.shape[0], q.shape[2], q.shape[3]) != (k_cache.shape[0], k_cache.shape[2], k_cache.shape[3]):
        raise ValueError(f"q [B, Lq, H, D] = {tuple(q.shape)} does not match the cache [B, capacity, H, D] = "
                         f"{tuple(k_cache.shape)} in batch, heads or head_dim")
    if kv_len.dim() != 0:
        raise ValueError(f"kv_len must be a 0-dim integer tensor, got shape {tuple(kv_len.shape)}")
    if kv_len.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"kv_len must be an int64 (or int32) tensor, got {kv_len.dtype}")
    if kv_len.device.type != "cpu" and kv_len.device != q.device:
        raise ValueError(f"kv_len must be on the CPU or on the device of q ({q.device}), got {kv_len.device}")


def _check_cache_write_args(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor) -> None:
    _check_layout(k_cache, "k_cache", "[B, capacity, H, D]")
    _check_layout(v_cache, "v_cache", "[B, capacity, H, D]")
    _check_layout(k, "k", "[B, n, H, D]")
    _check_layout(v, "v", "[B, n, H, D]")
    _check_same(k_cache, "k_cache", v_cache, "v_cache")
    _check_same(k_cache, "k_cache", k, "k")
    _check_same(k_cache, "k_cache", v, "v")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must have the "
                         "same shape")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if (k.shape[0], k.shape[2], k.shape[3]) != (k_cache.shape[0], k_cache.shape[2], k_cache.shape[3]):
        raise ValueError(f"k [B, n, H, D] = {tuple(k.shape)} does not match the cache [B, capacity, H, D] = "
                         f"{tuple(k_cache.shape)} in batch, heads or head_dim")
    if slots.dim() != 1 or slots.shape[0] != k.shape[1]:
        raise ValueError(f"slots must be a 1-D tensor with one cache slot per token ({k.shape[1]}), got shape "
                         f"{tuple(slots.shape)}")
    if slots.dtype != torch.int64:
        raise ValueError(f"slots must be an int64 tensor, got {slots.dtype}")
    if slots.device != k.device:
        raise ValueError(f"slots ({slots.device}) must be on the device of k ({k.device})")


def _check_rope_tables(cos: Tensor, sin: Tensor, k: Tensor) -> None:
    head_dim = k.shape[3]
    if head_dim % 2:
        raise ValueError(f"rotary needs an even head_dim, got {head_dim}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 2 or tuple(t.shape) != (k.shape[1], head_dim // 2):
            raise ValueError(f"{name} must have shape [n, D/2] = [{k.shape[1]}, {head_dim // 2}], got "
                             f"{tuple(t.shape)}")
        if t.dtype not in _ROPE_TABLE_DTYPES:
            raise ValueError(f"{name} must be float32 or float64, got {t.dtype}")
        if t.device != k.device:
            raise ValueError(f"{name} ({t.device}) must be on the device of k ({k.device})")
    if cos.dtype != sin.dtype:
        raise ValueError(f"cos ({cos.dtype}) and sin ({sin.dtype}) must have the same dtype")


# --------------------------------------------------------------------------------------------
# Pure-PyTorch references (the CompositeExplicitAutograd kernels and the test oracles)
# --------------------------------------------------------------------------------------------


def reference_cache_write(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor) -> None:
    """``k_cache[:, slots] = k`` and ``v_cache[:, slots] = v``, in place."""
    _check_cache_write_args(k_cache, v_cache, k, v, slots)
    k_cache.index_copy_(1, slots, k)
    v_cache.index_copy_(1, slots, v)


def _rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Wan's complex-pair rotary of x [B, n, H, D] with tables [n, D/2], in the wider float dtype."""
    acc = torch.float64 if torch.float64 in (x.dtype, cos.dtype) else torch.float32
    pairs = x.to(acc).unflatten(-1, (-1, 2))  # [B, n, H, D/2, 2]
    c = cos.to(acc)[None, :, None, :]  # [1, n, 1, D/2]
    s = sin.to(acc)[None, :, None, :]  # [1, n, 1, D/2]
    x0, x1 = pairs[..., 0], pairs[..., 1]  # [B, n, H, D/2] each
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)  # [B, n, H, D]


def reference_cache_write_rope(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor,
                               cos: Tensor, sin: Tensor) -> None:
    """:func:`reference_cache_write` of ``rotary(k)`` and ``v``."""
    _check_cache_write_args(k_cache, v_cache, k, v, slots)
    _check_rope_tables(cos, sin, k)
    k_cache.index_copy_(1, slots, _rotate_pairs(k, cos, sin).to(k_cache.dtype))
    v_cache.index_copy_(1, slots, v)


def _cache_attention_composite(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_len: Tensor) -> Tensor:
    _check_cache_attention_args(q, k_cache, v_cache, kv_len)
    if kv_len.device.type == "cpu":  # a host scalar: slice the valid prefix, no mask
        n = int(kv_len)
        if not 0 <= n <= k_cache.shape[1]:
            raise ValueError(f"kv_len must lie in [0, capacity = {k_cache.shape[1]}], got {n}")
        return reference_cache_attention(q, k_cache, v_cache, n).contiguous()
    return reference_cache_attention(q, k_cache, v_cache, kv_len).contiguous()


def reference_modulated_layer_norm(x: Tensor, shift: Tensor, scale1: Tensor, eps: float) -> Tensor:
    """adaLN per frame: ``layer_norm(x) * scale1 + shift`` (no affine weights); x [B, N, D], shift and
    scale1 [B, F, 1, D] with F dividing N -> [B, N, D]."""
    _check_modulated_layer_norm_args(x, shift, scale1)
    b, n, d = x.shape
    normed = F.layer_norm(x, (d,), eps=eps).view(b, shift.shape[1], n // shift.shape[1], d)
    return torch.addcmul(shift, normed, scale1).view(b, n, d)


def reference_grouped_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``x / rms(x) * weight[g]`` over the last dim; x [B, L, G, D], weight [G, D] -> contiguous."""
    _check_grouped_rms_norm_args(x, weight)
    return (F.rms_norm(x, x.shape[-1:], None, eps) * weight).contiguous()


def reference_gelu_tanh_(y: Tensor) -> None:
    """In place ``y = gelu(y, approximate="tanh")``."""
    y.copy_(F.gelu(y, approximate="tanh"))


def _check_modulated_layer_norm_args(x: Tensor, shift: Tensor, scale1: Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, D], got shape {tuple(x.shape)}")
    b, n, d = x.shape
    if shift.dim() != 4 or shift.shape != scale1.shape or shift.shape[0] != b or shift.shape[2] != 1 \
            or shift.shape[3] != d:
        raise ValueError(f"shift and scale1 must both be [B, F, 1, D] = [{b}, F, 1, {d}], got "
                         f"{tuple(shift.shape)} and {tuple(scale1.shape)}")
    if shift.shape[1] == 0 or n % shift.shape[1]:
        raise ValueError(f"x's {n} tokens are not whole frames of the {shift.shape[1]} frames of shift / scale1")


def _check_grouped_rms_norm_args(x: Tensor, weight: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be [B, L, G, D], got shape {tuple(x.shape)}")
    if tuple(weight.shape) != tuple(x.shape[2:]):
        raise ValueError(f"weight must be [G, D] = {list(x.shape[2:])}, got {tuple(weight.shape)}")


def _modulated_layer_norm_fake(x: Tensor, shift: Tensor, scale1: Tensor, eps: float) -> Tensor:
    _check_modulated_layer_norm_args(x, shift, scale1)
    return x.new_empty(x.shape)


def _grouped_rms_norm_fake(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    _check_grouped_rms_norm_args(x, weight)
    return x.new_empty(x.shape)


def _gelu_tanh_fake(y: Tensor) -> None:
    return None


def _cache_attention_fake(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_len: Tensor) -> Tensor:
    _check_cache_attention_args(q, k_cache, v_cache, kv_len)
    return q.new_empty(q.shape)  # [B, Lq, H, D], contiguous like the kernels' output


def _cache_write_fake(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor) -> None:
    _check_cache_write_args(k_cache, v_cache, k, v, slots)


def _cache_write_rope_fake(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor, cos: Tensor,
                           sin: Tensor) -> None:
    _check_cache_write_args(k_cache, v_cache, k, v, slots)
    _check_rope_tables(cos, sin, k)


# The block's projections as ``dit_block_step`` takes them, in this order (weight, bias each).
BLOCK_STEP_WEIGHTS: tuple[str, ...] = ("qkv_w", "qkv_b", "o_w", "o_b", "cross_q_w", "cross_q_b", "cross_o_w",
                                       "cross_o_b", "ffn1_w", "ffn1_b", "ffn2_w", "ffn2_b")


def _check_block_step_args(x: Tensor, e0: Tensor, modulation: Tensor, num_heads: int) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, dim], got shape {tuple(x.shape)}")
    b, n, d = x.shape
    if e0.dim() != 4 or e0.shape[0] != b or e0.shape[2:] != (6, d):
        raise ValueError(f"e0 must be [B, F, 6, dim] = [{b}, F, 6, {d}], got {tuple(e0.shape)}")
    if n % e0.shape[1]:
        raise ValueError(f"x's {n} tokens are not whole frames of e0's {e0.shape[1]} frames")
    if tuple(modulation.shape) != (1, 6, d):
        raise ValueError(f"modulation must be [1, 6, dim] = [1, 6, {d}], got {tuple(modulation.shape)}")
    if num_heads <= 0 or d % num_heads or (d // num_heads) % 2:
        raise ValueError(f"num_heads = {num_heads} must divide dim = {d} into an even head dim")


def _block_modulation(modulation: Tensor, e0: Tensor) -> tuple[Tensor, ...]:
    shift1, scale1, gate1, shift2, scale2, gate2 = (modulation.unsqueeze(1) + e0).unsqueeze(3).unbind(2)
    return shift1, 1 + scale1, gate1, shift2, 1 + scale2, gate2  # each [B, F, 1, dim]


def _block_qkv(h: Tensor, w: Tensor, b: Tensor, qk_norm: Tensor | None, num_heads: int, eps: float
               ) -> tuple[Tensor, Tensor, Tensor]:
    bsz, n, d = h.shape
    heads = (bsz, n, num_heads, d // num_heads)
    qkv = F.linear(h, w, b).view(bsz, n, 3, d)
    qk = qkv[:, :, :2] if qk_norm is None else reference_grouped_rms_norm(qkv[:, :, :2], qk_norm, eps)
    return qk[:, :, 0].reshape(heads), qk[:, :, 1].reshape(heads), qkv[:, :, 2].reshape(heads)


def _block_gated_add(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    b, n, d = x.shape
    per_frame = (b, gate.shape[1], n // gate.shape[1], d)
    return torch.addcmul(x.view(per_frame), y.reshape(per_frame), gate).view(b, n, d)


def reference_dit_block_step(x: Tensor, e0: Tensor, modulation: Tensor, weights: Sequence[Tensor],
                             qk_norm: Tensor | None, norm3_weight: Tensor | None, norm3_bias: Tensor | None,
                             cross_q_norm: Tensor | None, cross_k: Tensor, cross_v: Tensor, k_cache: Tensor,
                             v_cache: Tensor, layer: int, rows: int, slots: Tensor, cos: Tensor, sin: Tensor,
                             freqs: Tensor, kv_len: int, num_heads: int, eps: float) -> Tensor:
    """One DiT block's call on a streaming chunk (``sf_sdk.models.dit.Block`` with a uniform
    ``StepAttention``): adaLN self-attention over the cache (the chunk's keys rotated by cos / sin
    and written into ``slots`` of rows ``[0, rows)`` of layer ``layer``; queries rotated by the
    complex table ``freqs`` [N, 1, D/2]; slots ``[0, kv_len)`` attended), cross-attention to the
    prompt's ``cross_k`` / ``cross_v`` [B, Lt, H, D], the FFN. ``weights``: the
    :data:`BLOCK_STEP_WEIGHTS`. Returns the block's output [B, N, dim]."""
    _check_block_step_args(x, e0, modulation, num_heads)
    if len(weights) != len(BLOCK_STEP_WEIGHTS):
        raise ValueError(f"weights must be the block's {len(BLOCK_STEP_WEIGHTS)} projection tensors "
                         f"{BLOCK_STEP_WEIGHTS}, got {len(weights)}")
    qkv_w, qkv_b, o_w, o_b, cq_w, cq_b, co_w, co_b, f1_w, f1_b, f2_w, f2_b = weights
    shift1, scale1, gate1, shift2, scale2, gate2 = _block_modulation(modulation, e0)
    q, k, v = _block_qkv(reference_modulated_layer_norm(x, shift1, scale1, eps), qkv_w, qkv_b, qk_norm,
                         num_heads, eps)
    kc, vc = k_cache[layer, :rows], v_cache[layer, :rows]
    reference_cache_write_rope(kc, vc, k, v, slots, cos, sin)
    q = torch.view_as_real(torch.view_as_complex(q.unflatten(-1, (-1, 2))) * freqs).flatten(-2)
    y = reference_cache_attention(q, kc, vc, kv_len)
    x = _block_gated_add(x, F.linear(y.flatten(2), o_w, o_b), gate1)
    xn = x if norm3_weight is None else F.layer_norm(x, x.shape[-1:], norm3_weight, norm3_bias, eps)
    cq = F.linear(xn, cq_w, cq_b)
    if cross_q_norm is not None:
        cq = reference_grouped_rms_norm(cq.unsqueeze(2), cross_q_norm.unsqueeze(0), eps).squeeze(2)
    cross = reference_cache_attention(cq.unflatten(-1, (num_heads, -1)), cross_k, cross_v, cross_k.shape[1])
    x = x + F.linear(cross.flatten(2), co_w, co_b)
    y = F.gelu(F.linear(reference_modulated_layer_norm(x, shift2, scale2, eps), f1_w, f1_b), approximate="tanh")
    return _block_gated_add(x, F.linear(y, f2_w, f2_b), gate2)


def reference_dit_block_write_kv(x: Tensor, e0: Tensor, modulation: Tensor, qkv_w: Tensor, qkv_b: Tensor,
                                 qk_norm: Tensor | None, k_cache: Tensor, v_cache: Tensor, layer: int, rows: int,
                                 slots: Tensor, cos: Tensor, sin: Tensor, num_heads: int, eps: float) -> None:
    """Only the cache write of :func:`reference_dit_block_step` (a cache pass's last layer)."""
    _check_block_step_args(x, e0, modulation, num_heads)
    shift1, scale1 = _block_modulation(modulation, e0)[:2]
    _, k, v = _block_qkv(reference_modulated_layer_norm(x, shift1, scale1, eps), qkv_w, qkv_b, qk_norm,
                         num_heads, eps)
    reference_cache_write_rope(k_cache[layer, :rows], v_cache[layer, :rows], k, v, slots, cos, sin)


def _dit_block_step_fake(x: Tensor, e0: Tensor, modulation: Tensor, weights: Sequence[Tensor],
                         qk_norm: Tensor | None, norm3_weight: Tensor | None, norm3_bias: Tensor | None,
                         cross_q_norm: Tensor | None, cross_k: Tensor, cross_v: Tensor, k_cache: Tensor,
                         v_cache: Tensor, layer: int, rows: int, slots: Tensor, cos: Tensor, sin: Tensor,
                         freqs: Tensor, kv_len: int, num_heads: int, eps: float) -> Tensor:
    _check_block_step_args(x, e0, modulation, num_heads)
    return torch.empty_like(x)


def _dit_block_write_kv_fake(x: Tensor, e0: Tensor, modulation: Tensor, qkv_w: Tensor, qkv_b: Tensor,
                             qk_norm: Tensor | None, k_cache: Tensor, v_cache: Tensor, layer: int, rows: int,
                             slots: Tensor, cos: Tensor, sin: Tensor, num_heads: int, eps: float) -> None:
    _check_block_step_args(x, e0, modulation, num_heads)


# --------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------

_SCHEMAS = {
    "cache_attention": "cache_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor kv_len) -> Tensor",
    "cache_write": "cache_write(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slots) -> ()",
    "cache_write_rope": ("cache_write_rope(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, "
                         "Tensor slots, Tensor cos, Tensor sin) -> ()"),
    "modulated_layer_norm": "modulated_layer_norm(Tensor x, Tensor shift, Tensor scale1, float eps) -> Tensor",
    "grouped_rms_norm": "grouped_rms_norm(Tensor x, Tensor weight, float eps) -> Tensor",
    "gelu_tanh_": "gelu_tanh_(Tensor(a!) y) -> ()",
    "dit_block_step": ("dit_block_step(Tensor x, Tensor e0, Tensor modulation, Tensor[] weights, Tensor? qk_norm, "
                       "Tensor? norm3_weight, Tensor? norm3_bias, Tensor? cross_q_norm, Tensor cross_k, "
                       "Tensor cross_v, Tensor(a!) k_cache, Tensor(b!) v_cache, int layer, int rows, Tensor slots, "
                       "Tensor cos, Tensor sin, Tensor freqs, int kv_len, int num_heads, float eps) -> Tensor"),
    "dit_block_write_kv": ("dit_block_write_kv(Tensor x, Tensor e0, Tensor modulation, Tensor qkv_w, Tensor qkv_b, "
                           "Tensor? qk_norm, Tensor(a!) k_cache, Tensor(b!) v_cache, int layer, int rows, "
                           "Tensor slots, Tensor cos, Tensor sin, int num_heads, float eps) -> ()"),
}
_IMPLS = {
    "cache_attention": (_cache_attention_composite, _cache_attention_fake),
    "cache_write": (reference_cache_write, _cache_write_fake),
    "cache_write_rope": (reference_cache_write_rope, _cache_write_rope_fake),
    "modulated_layer_norm": (reference_modulated_layer_norm, _modulated_layer_norm_fake),
    "grouped_rms_norm": (reference_grouped_rms_norm, _grouped_rms_norm_fake),
    "gelu_tanh_": (reference_gelu_tanh_, _gelu_tanh_fake),
    "dit_block_step": (reference_dit_block_step, _dit_block_step_fake),
    "dit_block_write_kv": (reference_dit_block_write_kv, _dit_block_write_kv_fake),
}


def _define_ops() -> torch.library.Library | None:
    """Defines the schemas, fakes and references once per process (``python -m sf_sdk.ops`` runs
    this file a second time as ``__main__``)."""
    if hasattr(getattr(torch.ops, _NAMESPACE), "cache_attention"):
        return None
    lib = torch.library.Library(_NAMESPACE, "DEF")
    for name, schema in _SCHEMAS.items():
        lib.define(schema)
        reference, fake = _IMPLS[name]
        lib.impl(name, reference, "CompositeExplicitAutograd")
        torch.library.register_fake(f"{_NAMESPACE}::{name}", fake, lib=lib)
    return lib


_LIB = _define_ops()


# --------------------------------------------------------------------------------------------
# Build and load (torch.utils.cpp_extension.load, cached, lock-safe)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _BuildSpec:
    """One compiled library: its sources and flags (all part of the cache key)."""

    name: str
    sources: tuple[Path, ...]
    headers: tuple[Path, ...]
    cflags: tuple[str, ...]
    cuda_cflags: tuple[str, ...] = ()
    ldflags: tuple[str, ...] = ()
    tag: str = ""

    def key(self) -> str:
        digest = hashlib.sha256()
        for path in (*self.sources, *self.headers):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
        digest.update(json.dumps([self.cflags, self.cuda_cflags, self.ldflags, torch.__version__,
                                  sys.version_info[:2], platform.machine()]).encode())
        return digest.hexdigest()[:16]

    def directory(self) -> Path:
        py = f"py{sys.version_info[0]}{sys.version_info[1]}"
        return _cache_root() / f"{self.name}-torch{torch.__version__}-{py}-{self.tag}-{self.key()}"


@dataclass
class _LoadState:
    """What happened when a device's kernels were requested (once per process)."""

    path: Path | None = None
    error: str | None = None


_state: dict[str, _LoadState] = {}
_state_lock = threading.Lock()


def _csrc_dir() -> Path:
    return Path(os.environ.get(_CSRC_ENV, Path(__file__).resolve().parents[1] / "csrc"))


def _cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sf_sdk" / "kernels"
    return Path(os.environ.get(_CACHE_ENV, default))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cpu_isa() -> str:
    """The instruction set the CPU kernels are compiled for: explicit AVX2+FMA+F16C on x86 CPUs
    that torch itself runs with AVX2 or better (never -march=native, so the binary does not pick
    up AVX-512 or newer extensions of the build host), the compiler's baseline otherwise. The ISA
    is part of the cache key."""
    capability = torch.backends.cpu.get_cpu_capability().upper()
    if platform.machine().lower() in ("x86_64", "amd64") and capability in ("AVX2", "AVX512"):
        return "avx2"
    return "baseline"


_ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "avx2": ("-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"),
    "baseline": (),
}


def _cpu_spec() -> _BuildSpec:
    csrc = _csrc_dir()
    isa = _cpu_isa()
    return _BuildSpec(
        name="sf_sdk_cpu",
        sources=tuple(sorted((csrc / "cpu").glob("*.cpp"))),
        headers=tuple(sorted(csrc.glob("*.h"))) + tuple(sorted((csrc / "cpu").glob("*.h"))),
        # -fopenmp: at::parallel_for is an inline OpenMP region in torch's headers; the library then
        # links libgomp.so.1, the same soname torch already loaded, so both share one thread pool.
        cflags=("-O3", "-DNDEBUG", "-fopenmp", *_ISA_FLAGS[isa]),
        ldflags=("-fopenmp",),
        tag=isa,
    )


def _cuda_spec() -> _BuildSpec:
    csrc = _csrc_dir()
    return _BuildSpec(
        name="sf_sdk_cuda",
        sources=(csrc / "cuda" / "binding.cpp", *sorted((csrc / "cuda").glob("*.cu"))),
        headers=tuple(sorted(csrc.glob("*.h"))) + tuple(sorted((csrc / "cuda").glob("*.h")))
        + tuple(sorted((csrc / "cuda").glob("*.cuh"))),
        cflags=("-O3", "-DNDEBUG"),
        cuda_cflags=("-O3", "-DNDEBUG", "-lineinfo", *_CUDA_GENCODE),
        tag="sm80-sm90",
    )


def _cuda_build_blocker() -> str | None:
    """Why the CUDA kernels cannot be built here, or None."""
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return "this torch build has no CUDA"
    if cpp_extension.CUDA_HOME is None or shutil.which("nvcc", path=str(Path(cpp_extension.CUDA_HOME) / "bin")) is None:
        return "nvcc was not found (set CUDA_HOME)"
    if not hasattr(torch.Stream, "native_handle"):
        return f"torch {torch.__version__} has no Stream.native_handle (torch >= 2.11 needed for the CUDA binding)"
    return None


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """Holds an exclusive flock on ``directory/build.flock``. The kernel drops it when the holder
    exits or dies, unlike cpp_extension's own lock file, which a killed build leaves behind."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: cpp_extension's own baton only
        yield
        return
    with open(directory / "build.flock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _build_and_load(spec: _BuildSpec, verbose: bool) -> Path:
    """Builds ``spec`` unless a complete build is cached, and loads it into this process."""
    from torch.utils import cpp_extension

    if not spec.sources or not all(path.is_file() for path in spec.sources):
        raise FileNotFoundError(f"kernel sources for {spec.name} not found under {_csrc_dir()} "
                                f"(set {_CSRC_ENV} to the repository's csrc/ directory)")
    directory = spec.directory()
    stamp = directory / "complete.json"
    with _exclusive(directory):
        if stamp.is_file():
            library = directory / json.loads(stamp.read_text())["library"]
            if library.is_file():
                torch.ops.load_library(str(library))
                return library
        # We hold the directory's flock, so a cpp_extension baton here is stale (a killed build).
        (directory / "lock").unlink(missing_ok=True)
        log.info("building the %s kernels in %s (once per source version; this takes a minute)",
                 spec.name, directory)
        built = cpp_extension.load(
            name=spec.name,
            sources=[str(path) for path in spec.sources],
            extra_cflags=list(spec.cflags),
            extra_cuda_cflags=list(spec.cuda_cflags),
            extra_ldflags=list(spec.ldflags),
            extra_include_paths=[str(_csrc_dir())],
            build_directory=str(directory),
            is_python_module=False,
            verbose=verbose,
        )
        library = Path(str(built))
        stamp.write_text(json.dumps({"library": library.name, "torch": torch.__version__,
                                     "cflags": spec.cflags, "cuda_cflags": spec.cuda_cflags}))
        return library


def _load(device_type: str, verbose: bool = False) -> _LoadState:
    """Loads (building if needed) the kernels for ``device_type`` once per process. A failure is
    logged once, as a warning, and remembered."""
    with _state_lock:
        if device_type in _state:
            return _state[device_type]
        state = _LoadState()
        if device_type == "cpu":
            disabled, blocker, spec_fn = _env_flag(_NO_CPU_ENV), None, _cpu_spec
        elif device_type == "cuda":
            disabled, blocker, spec_fn = _env_flag(_NO_CUDA_ENV), _cuda_build_blocker(), _cuda_spec
        else:
            disabled, blocker, spec_fn = False, f"sf_sdk has no kernels for device type {device_type!r}", None
        if disabled:
            state.error = f"the {device_type.upper()} kernels are disabled by the environment"
            log.info("sf_sdk %s kernels disabled by the environment; using the PyTorch reference", device_type)
        elif blocker is not None or spec_fn is None:
            state.error = blocker
            # A CPU-only torch cannot hold CUDA tensors: nothing falls back, nothing to warn about.
            level = logging.INFO if device_type == "cuda" and torch.version.cuda is None else logging.WARNING
            log.log(level, "sf_sdk %s kernels unavailable (%s); using the PyTorch reference", device_type, blocker)
        else:
            try:
                state.path = _build_and_load(spec_fn(), verbose)
            except Exception as exc:  # noqa: BLE001 - any build failure means "fall back"
                state.error = f"building the {device_type.upper()} kernels failed: {exc}"
                log.warning("sf_sdk %s kernels unavailable (%s); using the PyTorch reference. To see the "
                            "compiler output, run `python -m sf_sdk.ops build --verbose`", device_type,
                            str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__)
        _state[device_type] = state
        return state


@torch.compiler.assume_constant_result
def _kernels_loaded(device_type: str) -> bool:
    """True when the compiled kernels for ``device_type`` are loaded (a constant under tracing)."""
    return _load(device_type).path is not None


def loaded_libraries() -> dict[str, str | None]:
    """The loaded kernel library per device type requested so far (None: not available)."""
    return {device: str(state.path) if state.path else None for device, state in _state.items()}


def unavailable_reason(device_type: str) -> str | None:
    """Why the kernels for ``device_type`` are unavailable (loading them if not tried yet), or None."""
    return _load(device_type).error


def build(devices: Sequence[str] = ("cpu", "cuda"), verbose: bool = False) -> dict[str, str | None]:
    """Builds (or finds in the cache) and loads the kernels for ``devices``; returns the library
    path per device, or None where the kernels are unavailable (the reason is logged)."""
    return {device: str(state.path) if (state := _load(device, verbose)).path else None for device in devices}


# --------------------------------------------------------------------------------------------
# Kernel selection
# --------------------------------------------------------------------------------------------

def _kernel_is_faster(q: Tensor, masked: bool) -> bool:
    """The "auto" rule; see :func:`kernel_available`. On both device types the kernel takes the
    masked calls (a tensor ``kv_len``: pooled rows, static-shape graphs), where the reference would
    read and mask the whole capacity, and SDPA on the sliced view takes the rest (on GPUs
    unmeasured so far: flash attention on the view, no copy)."""
    return masked and q.device.type in ("cpu", "cuda")


def kernel_available(q: Tensor, required: bool, *, masked: bool = False) -> bool:
    """Whether ``cache_attention`` should run the compiled kernel for queries like ``q``.

    True when the kernel for q's device and dtype is loaded (building it on first use) and it is
    the faster path. With ``required`` (backend ``"kernel"``) the speed rule is skipped and a
    missing kernel raises a RuntimeError that says how to build it.

    The "faster" rule, from ``benchmarks/attention.py`` on this project's 2-core CPU machines
    (the reference is SDPA on the sliced cache view, already copy-free):

    * CPU, ``masked`` (kv_len is a tensor: the reference would read and mask the whole
      capacity): the kernel, which reads only the valid prefix.
    * CPU, ``kv_len`` an int: SDPA on the sliced view, at every size and dtype. At the mid preset
      (1170 queries over 2340 keys, one thread) it takes 162 ms against the kernel's 295 in
      float32, and 67 against 317 in bfloat16, where SDPA runs on the CPU's AMX tiles (the kernel
      converts each key block to float32 and computes there); at the race's tiny config (48
      queries, 4 heads of 64, over 96-336 keys) SDPA is 1.2-2.1x faster too, and a tiny eager
      chunk 1.03-1.06x (docs/performance.md). Only the tiniest calls (head_dim 24, 96 keys) are
      level.
    * CUDA: not measured on a GPU yet, so SDPA (flash attention on the view) stays the default
      except for ``masked`` calls (static-shape export graphs).
    """
    reason = None
    if q.device.type not in ("cpu", "cuda"):
        reason = f"sf_sdk has no kernels for device type {q.device.type!r}"
    elif q.dtype not in KERNEL_DTYPES:
        reason = f"the sf_sdk kernels support {[str(d) for d in KERNEL_DTYPES]}, not {q.dtype}"
    elif not required and not _kernel_is_faster(q, masked):
        return False
    elif not _kernels_loaded(q.device.type):
        reason = _state[q.device.type].error if q.device.type in _state else "the kernels are not loaded"
    if reason is None:
        return True
    if required:
        raise RuntimeError(f"attention backend 'kernel' requested but {reason}; {_BUILD_HINT}")
    return False


def block_kernels_available(x: Tensor) -> bool:
    """Whether the DiT block's elementwise chains on ``x`` should run the fused CPU kernels
    (``modulated_layer_norm``, ``grouped_rms_norm``, ``gelu_tanh_``): float32 CPU tensors, wherever
    the compiled CPU kernels are loaded. Callers use them only without autograd and outside traced
    graphs (exports keep standard ops).

    Measured with ``python benchmarks/cpu_eager.py --compare block-kernels``: 1.10-1.11x per eager
    chunk at the race's tiny config, 1.03-1.19x at shapes-tiny (docs/performance.md)."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    return _kernels_loaded("cpu")


def fused_write_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a cache should write rotated keys with ``cache_write_rope`` (one fused pass) instead
    of ``apply_rotary`` then ``index_copy_``.

    ``benchmarks/cache_write.py`` on this project's 2-core CPU (float32, one thread): the fused
    kernel is 8-10x faster for the tiny model's chunk (48 tokens), a batch of 8 of them and a
    Wan-1.3B chunk at 480x832 (4680 tokens). So: wherever the compiled CPU kernel is loaded. CUDA is
    not measured yet: there the plain ops stay.
    """
    if device.type != "cpu" or dtype not in KERNEL_DTYPES:
        return False
    return _kernels_loaded("cpu")


# --------------------------------------------------------------------------------------------
# Python entry points
# --------------------------------------------------------------------------------------------


def _as_kv_len(kv_len: int | Tensor) -> Tensor:
    if isinstance(kv_len, Tensor):
        return kv_len
    return torch.tensor(kv_len, dtype=torch.int64)  # a 0-dim host scalar


def cache_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_len: int | Tensor) -> Tensor:
    """q [B, Lq, H, D] over cache slots [0, kv_len) of k/v_cache [B, capacity, H, D] -> [B, Lq, H, D].

    Runs ``sf_sdk::cache_attention``: the compiled kernel where it is loaded, the reference
    otherwise (a missing build is logged once). ``kv_len`` is an int or a 0-dim integer tensor
    (on the CPU, or on q's device: then it is read by the kernel, with no host sync).
    """
    if q.dtype not in KERNEL_DTYPES:
        return reference_cache_attention(q, k_cache, v_cache, kv_len)
    if q.device.type in ("cpu", "cuda"):
        _kernels_loaded(q.device.type)
    return torch.ops.sf_sdk.cache_attention(q, k_cache, v_cache, _as_kv_len(kv_len))


def cache_write(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor) -> None:
    """In place ``k_cache[:, slots] = k``, ``v_cache[:, slots] = v`` (k/v [B, n, H, D], slots int64
    [n], any order: a ring write that wraps around is one call)."""
    if k.device.type in ("cpu", "cuda"):
        _kernels_loaded(k.device.type)
    torch.ops.sf_sdk.cache_write(k_cache, v_cache, k, v, slots)


def cache_write_rope(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor, cos: Tensor,
                     sin: Tensor) -> None:
    """:func:`cache_write` with Wan's complex-pair rotary applied to ``k`` (tables [n, D/2])."""
    if k.device.type in ("cpu", "cuda"):
        _kernels_loaded(k.device.type)
    torch.ops.sf_sdk.cache_write_rope(k_cache, v_cache, k, v, slots, cos, sin)


# --------------------------------------------------------------------------------------------
# CLI: python -m sf_sdk.ops build
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sf_sdk.ops", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build_cmd = sub.add_parser("build", help="build (or find in the cache) and load the kernels")
    build_cmd.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    build_cmd.add_argument("--verbose", action="store_true", help="show the compiler output")
    build_cmd.add_argument("--require", action="store_true",
                           help="exit with an error if a requested device's kernels are unavailable")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    devices = ("cpu", "cuda") if args.device == "all" else (args.device,)
    result = build(devices, verbose=args.verbose)
    for device, path in result.items():
        log.info("%s kernels: %s", device, path or f"unavailable ({_state[device].error})")
    missing = [device for device, path in result.items() if path is None]
    return 1 if args.require and missing else 0


if __name__ == "__main__":
    sys.exit(main())
