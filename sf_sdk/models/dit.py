"""The Wan2.1 diffusion transformer (DiT), made causal for streaming.

One set of weights, three ways to run it:

* :meth:`WanDiT.forward` with ``frame_mask=None`` — bidirectional over the whole clip (the
  teacher / critic of Self Forcing, and the original Wan2.1 model);
* :meth:`WanDiT.forward` with a ``frame_mask`` from :func:`block_causal_mask` — the whole
  sequence at once under the block-causal (optionally windowed, with sinks) mask, which training
  uses; it computes what streaming computes;
* :meth:`WanDiT.forward_chunk` — one chunk of latent frames against the KV cache
  (:mod:`sf_sdk.cache`) and the prompt's cross-attention cache;
* :meth:`WanDiT.forward_window` — Rolling Forcing's joint window of several in-flight chunks
  against the cache of clean frames, which it reads and never writes.

Parameter names are those of the official modules (``patch_embedding``, ``blocks.N.self_attn.q``,
``head.modulation``, ...), so released checkpoints load without renaming. Latents are frame-major
``[B, F, C, H, W]``; every frame carries its own timestep (``[B, F]``), which modulates the
frame's tokens (adaLN with 6 vectors per block, 2 for the head).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from sf_sdk import ops
from sf_sdk.attention import REFERENCE, CacheAttention, attention, select_cache_attention
from sf_sdk.cache import ChunkPlan, KVCache, frame_visibility, write_rows
from sf_sdk.config import DiTConfig, StreamingConfig
from sf_sdk.models.graphs import tracing as _tracing
from sf_sdk.models.graphs import weights_key

__all__ = [
    "WanDiT",
    "ChunkStep",
    "ChunkTimesteps",
    "ChunkInputs",
    "CHUNK_BATCH_AXES",
    "CHUNK_OUTPUTS",
    "RecacheAttention",
    "WindowAttention",
    "CrossAttnCache",
    "StepAttention",
    "RotaryEmbedding",
    "block_causal_mask",
    "sinusoidal_embedding",
]


# --------------------------------------------------------------------------------------------
# Small pieces
# --------------------------------------------------------------------------------------------


def sinusoidal_embedding(dim: int, position: Tensor) -> Tensor:
    """[N] timesteps -> [N, dim] (cos half, then sin half), computed in float64."""
    half = dim // 2
    pos = position.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=pos.device) / half)
    angles = torch.outer(pos, freqs)  # [N, half]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class RMSNorm(nn.Module):
    """RMS norm over the last dim, computed in float32 or wider."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / rms(x) * weight over the last dim (float32 or wider inside; rounded to x's dtype before
    the weight, as the official norm). ``weight`` broadcasts over x's trailing dims."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return F.rms_norm(x.float(), x.shape[-1:], None, eps).type_as(x) * weight
    if _fused_eager(x):  # one pass (the CPU kernel) instead of six ops
        if x.dim() == 4 and weight.shape == x.shape[2:]:  # [B, L, G, D] with [G, D]
            return torch.ops.sf_sdk.grouped_rms_norm(x, weight, eps)
        if x.dim() == 3 and weight.shape == x.shape[-1:]:  # [B, L, D] with [D]
            return torch.ops.sf_sdk.grouped_rms_norm(x.unsqueeze(2), weight.unsqueeze(0), eps).squeeze(2)
    if weight.shape == x.shape[-1:]:
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    return F.rms_norm(x, x.shape[-1:], None, eps) * weight


def _fused_eager(x: Tensor) -> bool:
    """Whether an eager call on x runs the fused CPU kernels of the block's elementwise chains
    (:func:`sf_sdk.ops.block_kernels_available`: float32 CPU tensors with the kernels loaded),
    which it does only without autograd and outside traced graphs."""
    return not torch.is_grad_enabled() and not _tracing() and ops.block_kernels_available(x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 or wider (affine or not)."""

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        weight = self.weight.to(xf.dtype) if self.weight is not None else None
        bias = self.bias.to(xf.dtype) if self.bias is not None else None
        return F.layer_norm(xf, self.normalized_shape, weight, bias, self.eps).type_as(x)


class RotaryEmbedding:
    """Wan's 3-axis rotary embedding (frame, height, width), computed from exact positions.

    The head dim is split into ``cfg.rope_axis_dims`` channels; channel pairs (2i, 2i+1) rotate by
    ``position * theta^(-2i / axis_dim)``. Angles are formed in float64 from integer positions, so
    any frame index works (the official 1024-entry table does not exist here).
    """

    def __init__(self, cfg: DiTConfig) -> None:
        self.axis_dims = cfg.rope_axis_dims
        self.theta = cfg.rope_theta
        self._inv_freqs: dict[tuple[int, str], Tensor] = {}
        self._hw_trig: dict[tuple, tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    def _inv_freq(self, axis: int, device: torch.device) -> Tensor:
        key = (axis, str(device))
        if key not in self._inv_freqs:  # the frame axis's is read every chunk: made once per device
            d = self.axis_dims[axis]
            self._inv_freqs[key] = self.theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
        return self._inv_freqs[key]  # [d/2]

    def _hw_tables(self, grid_hw: tuple[int, int], device: torch.device, dtype: torch.dtype
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """cos, sin of the height angles [h, dh/2] and of the width angles [w, dw/2] in ``dtype``,
        made once per grid: only the frame axis changes from chunk to chunk."""
        key = (grid_hw, str(device), dtype)
        if key not in self._hw_trig:
            h, w = grid_hw
            ah = torch.outer(torch.arange(h, dtype=torch.float64, device=device), self._inv_freq(1, device))
            aw = torch.outer(torch.arange(w, dtype=torch.float64, device=device), self._inv_freq(2, device))
            self._hw_trig[key] = (torch.cos(ah).to(dtype), torch.sin(ah).to(dtype),
                                  torch.cos(aw).to(dtype), torch.sin(aw).to(dtype))
        return self._hw_trig[key]

    def table(self, frame_positions: Tensor, grid_hw: tuple[int, int], dtype: torch.dtype
              ) -> tuple[Tensor, Tensor]:
        """cos, sin for frames at ``frame_positions`` and the full grid: [F*h*w, head_dim/2] for
        positions [F], or [R, F*h*w, head_dim/2] for positions [R, F] (one table per row).

        The channels of the three axes are concatenated, so each axis's cos/sin is taken on its own
        angles (the same float64 values, the same results as on the concatenated angles); the
        height and width ones are made once per grid."""
        device = frame_positions.device
        h, w = grid_hw
        rows = frame_positions.shape[:-1]  # () or (R,)
        af = frame_positions.to(torch.float64).unsqueeze(-1) * self._inv_freq(0, device)  # [..., F, df/2]
        nf = af.shape[-2]
        lead = (1,) * len(rows)

        def grid(f: Tensor, hh: Tensor, ww: Tensor) -> Tensor:
            return torch.cat([
                f.view(*rows, nf, 1, 1, -1).expand(*rows, nf, h, w, -1),
                hh.view(*lead, 1, h, 1, -1).expand(*rows, nf, h, w, -1),
                ww.view(*lead, 1, 1, w, -1).expand(*rows, nf, h, w, -1),
            ], dim=-1).reshape(*rows, nf * h * w, -1)  # [..., F*h*w, head_dim/2]

        ch, sh, cw, sw = self._hw_tables(grid_hw, device, dtype)
        return grid(torch.cos(af).to(dtype), ch, cw), grid(torch.sin(af).to(dtype), sh, sw)


def rotary_freqs(cos: Tensor, sin: Tensor) -> Tensor:
    """The complex form ``cos + i sin`` of rotary tables [..., L, D/2] -> [..., L, 1, D/2] (complex64,
    or complex128 for float64 tables), to rotate many tensors by the same angles."""
    real = torch.float64 if cos.dtype == torch.float64 else torch.float32
    return torch.complex(cos.to(real), sin.to(real)).unsqueeze(-2)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, freqs: Tensor | None = None) -> Tensor:
    """Rotate channel pairs of x [B, L, H, D] by angles whose cos/sin are [L, D/2] (every row the
    same) or [B, L, D/2] (one table per row).

    Eager calls multiply by the complex table ``freqs`` (:func:`rotary_freqs` of cos/sin, made here
    when not given): three ops instead of ten, computed in float32 (float64 for float64 x) and
    rounded to x's dtype. Traced graphs run the same rotation with real-valued ops."""
    if not _tracing():
        if freqs is None:
            freqs = rotary_freqs(cos, sin)
        real = torch.float64 if x.dtype == torch.float64 else torch.float32
        xc = torch.view_as_complex(x.to(real).unflatten(-1, (-1, 2)))  # [B, L, H, D/2]
        return torch.view_as_real(xc * freqs).flatten(-2).to(x.dtype)  # [B, L, H, D]
    b, n, h, d = x.shape
    xp = x.reshape(b, n, h, d // 2, 2)  # [B, L, H, D/2, 2]
    x0, x1 = xp.unbind(-1)
    rows = cos.shape[0] if cos.dim() == 3 else 1
    c, s = cos.view(rows, n, 1, -1), sin.view(rows, n, 1, -1)
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)  # [B, L, H, D/2, 2]
    return out.reshape(b, n, h, d)


def block_causal_mask(num_frames: int, tokens_per_frame: int, stream: StreamingConfig,
                      device: torch.device | None = None) -> Tensor:
    """[F*T, F*T] bool token mask of the streaming cache rules (chunks, window, sinks)."""
    if num_frames % stream.num_frame_per_block:
        raise ValueError(f"{num_frames} latent frames do not split into chunks of "
                         f"{stream.num_frame_per_block} frames")
    ring = stream.local_attn_size - stream.sink_size if stream.rolling else None
    vis = frame_visibility(num_frames, stream.num_frame_per_block, stream.sink_size, ring, device)
    return vis.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


# --------------------------------------------------------------------------------------------
# Attention strategies: how a block's self-attention sees keys
# --------------------------------------------------------------------------------------------


@dataclass
class SequenceAttention:
    """Whole-sequence self-attention with an optional token mask."""

    cos: Tensor  # [L, D/2]
    sin: Tensor  # [L, D/2]
    mask: Tensor | None  # [L, L] bool, True = attend

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q = apply_rotary(q, self.cos, self.sin)
        k = apply_rotary(k, self.cos, self.sin)
        return attention(q, k, v, self.mask)


@dataclass
class ChunkTimesteps:
    """The timesteps of one chunk's calls (its denoising steps and the cache pass), made once per
    chunk: ``rows[i]`` is the ``[B, F]`` timestep tensor of the call at ``values[i]`` (views of one
    ``[S, B, F]`` tensor, ``stacked``). The first call given one of these very tensors embeds all of
    them in one batched call; the chunk's later calls reuse those embeddings (without autograd
    only: a call with gradients embeds its own timestep)."""

    values: tuple[float, ...]
    stacked: Tensor  # [S, B, F]
    rows: tuple[Tensor, ...] = ()
    _embedded: tuple[Tensor, Tensor] | None = field(default=None, repr=False)  # [S, B, F, dim], [S, B, F, 6, dim]
    # The sampler's per-chunk memo of (sigma, 1 - sigma) of every call (sf_sdk.sampling).
    sigmas: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    @classmethod
    def make(cls, values: Sequence[float], batch: int, frames: int, *, device: torch.device, dtype: torch.dtype
             ) -> ChunkTimesteps:
        t = torch.tensor(values, dtype=dtype).to(device).view(-1, 1, 1).expand(-1, batch, frames)  # [S, B, F]
        return cls(tuple(values), t, tuple(t.unbind(0)))

    def row(self, value: float) -> Tensor | None:
        """The timestep tensor of ``value`` (None if the chunk has none)."""
        return self.rows[self.values.index(value)] if value in self.values else None

    def embedding(self, timestep: Tensor, embed) -> tuple[Tensor, Tensor] | None:
        """(e, e0) of ``timestep`` if it is one of :attr:`rows` (``embed``: the model's
        :meth:`WanDiT.embed_time`, run once for every row), else None."""
        if torch.is_grad_enabled():
            return None
        for i, row in enumerate(self.rows):
            if row is timestep:
                if self._embedded is None:
                    s, b, f = self.stacked.shape
                    e, e0 = embed(self.stacked.reshape(s * b, f))  # [S*B, F, dim], [S*B, F, 6, dim]
                    self._embedded = (e.unflatten(0, (s, b)), e0.unflatten(0, (s, b)))
                return self._embedded[0][i], self._embedded[1][i]
        return None


@dataclass
class StepAttention:
    """One chunk's self-attention through the KV cache (explicit tensors: export-ready).

    The chunk's keys/values are written into ``write_slots`` of layer ``layer``'s buffers (the
    cache's write rule, :func:`sf_sdk.cache.write_rows`; through :meth:`KVCache.write` in eager
    streaming), then its queries attend over each row's valid prefix ``[0, kv_len)`` with the
    implementation ``impl`` chosen when the step was set up. The cache never carries gradients:
    with autograd on, the chunk attends to a copy of the cache holding its own (differentiable)
    keys, while the buffer receives detached ones.

    Rows: the first ``write_slots.shape[0]`` rows of the buffers (one stream each). Per-row
    tensors (``write_slots`` [B, F*T], ``kv_len`` [B], rotary tables [B, F*T, D/2]) let pooled
    streams at different positions share one call; a uniform plan passes 1-D slots, an int
    ``kv_len`` and shared tables instead.
    """

    k_cache: Tensor  # [L, B, cap, H, D]
    v_cache: Tensor  # [L, B, cap, H, D]
    write_slots: Tensor  # [F*T] or [B, F*T] int64
    kv_len: int | Tensor  # int (eager, uniform rows) or int64 tensor, 0-dim or [B]
    cos_q: Tensor  # [F*T, D/2] or [B, F*T, D/2]
    sin_q: Tensor
    cos_k: Tensor | None = None  # [kv_len, D/2] or [B, K*T, D/2] (cache_relative: keys rotated at attention time)
    sin_k: Tensor | None = None
    impl: CacheAttention = REFERENCE
    rows: int | None = None  # rows of the buffers this call covers (None: all)
    # The eager cache object (writes go through KVCache.write) and its plan; None in captured graphs.
    cache: KVCache | None = None
    plan: ChunkPlan | None = None
    # functional=True (ONNX / TensorRT graphs): the buffers are not written in place; the updated
    # per-layer caches are collected in new_k / new_v instead.
    functional: bool = False
    new_k: list[Tensor] | None = None
    new_v: list[Tensor] | None = None
    _row_tables: tuple[Tensor, Tensor, Tensor] | None = field(default=None, repr=False)
    _freqs_q: Tensor | None = field(default=None, repr=False)
    # The chunk's timesteps (sf_sdk.sampling makes them once per chunk; None: each call embeds its own).
    timesteps: ChunkTimesteps | None = field(default=None, repr=False)
    # Whether the chunk's block calls can each run as one op (block_step), decided on first use;
    # and each layer's weights for it, gathered once per chunk.
    _one_op: bool | None = field(default=None, repr=False)
    _block_args: dict[int, tuple] = field(default_factory=dict, repr=False)

    def block_step(self, x: Tensor) -> bool:
        """Whether a block call on x runs as one op (``sf_sdk::dit_block_step``: :meth:`Block.forward`'s
        ops in the same order from C++, so the same result without Python's per-op cost): an eager
        float32 CPU stream with the CPU kernels loaded, one stream's plan (an int ``kv_len``, shared
        rotary tables of absolute positions), attention by SDPA (the ``"reference"`` choice, what
        ``"auto"`` picks there), no autograd, not traced. Anything else runs the ops one by one."""
        if self._one_op is None:
            cache, plan = self.cache, self.plan
            self._one_op = (cache is not None and plan is not None and plan.uniform and not self.functional
                            and self.cos_k is None and self.impl.kernel is None and isinstance(self.kv_len, int)
                            and self.cos_q.dim() == 2 and self.cos_q.dtype == torch.float32
                            and cache.dtype == torch.float32 and ops.fused_write_available(cache.device, cache.dtype)
                            and ops.block_kernels_available(self.cos_q))
        return self._one_op and x.dtype == torch.float32 and not torch.is_grad_enabled() and not _tracing()

    def freqs_q(self) -> Tensor | None:
        """The chunk's complex rotary table (:func:`rotary_freqs`), made once for all of its calls
        and layers; None in traced graphs (they rotate with real-valued ops)."""
        if _tracing():
            return None
        if self._freqs_q is None:
            self._freqs_q = rotary_freqs(self.cos_q, self.sin_q)
        return self._freqs_q

    def row_tables(self, rows: int) -> tuple[Tensor, Tensor, Tensor]:
        """Write slots [B, F*T] and rotary tables [B, F*T, D/2] with one row per stream (the graph
        inputs), expanded and made contiguous once per chunk, not once per call."""
        if self._row_tables is None or self._row_tables[0].shape[0] != rows:
            def per_row(t: Tensor, dims: int) -> Tensor:
                return (t if t.dim() == dims else t.expand(rows, *t.shape)).contiguous()

            self._row_tables = (per_row(self.write_slots, 2), per_row(self.cos_q, 3), per_row(self.sin_q, 3))
        return self._row_tables

    def _buffers(self, layer: int) -> tuple[Tensor, Tensor]:
        kc, vc = self.k_cache[layer], self.v_cache[layer]  # [B, cap, H, D]
        if self.rows is not None:
            kc, vc = kc[:self.rows], vc[:self.rows]  # a prefix of rows: still contiguous
        return kc, vc

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Only the cache write of :meth:`__call__` (no gradients; eager buffers): the keys/values
        of a call whose attention output is not needed (the last layer of a cache pass)."""
        if self.functional or torch.is_grad_enabled():
            raise RuntimeError("StepAttention.write is for eager calls without autograd")
        relative = self.cos_k is not None
        if self.cache is not None:
            self.cache.write(layer, k, v, self.plan, None if relative else (self.cos_q, self.sin_q))
            return
        if not relative:
            k = apply_rotary(k, self.cos_q, self.sin_q, self.freqs_q())
        kc, vc = self._buffers(layer)
        write_rows(kc, self.write_slots, k, inplace=True)
        write_rows(vc, self.write_slots, v, inplace=True)

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        relative = self.cos_k is not None
        freqs = self.freqs_q()
        q = apply_rotary(q, self.cos_q, self.sin_q, freqs)
        differentiable = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
        if self.cache is not None and not self.functional:
            # The cache stores keys rotated (absolute positions) or as they are (cache_relative).
            self.cache.write(layer, k, v, self.plan, None if relative else (self.cos_q, self.sin_q))
            kc, vc = self._buffers(layer)
            if differentiable and not relative:
                k = apply_rotary(k, self.cos_q, self.sin_q, freqs)
        else:
            if not relative:
                k = apply_rotary(k, self.cos_q, self.sin_q, freqs)
            kc, vc = self._buffers(layer)
            if self.functional:
                kc = write_rows(kc, self.write_slots, k, inplace=False)
                vc = write_rows(vc, self.write_slots, v, inplace=False)
                self.new_k = (self.new_k or []) + [kc]
                self.new_v = (self.new_v or []) + [vc]
            else:
                write_rows(kc, self.write_slots, k.detach(), inplace=True)
                write_rows(vc, self.write_slots, v.detach(), inplace=True)
        keys, values = kc, vc
        if not self.functional and differentiable:
            keys = write_rows(kc, self.write_slots, k, inplace=False)
            values = write_rows(vc, self.write_slots, v, inplace=False)
        if relative:
            n = self.cos_k.shape[-2]
            keys = apply_rotary(keys[:, :n], self.cos_k, self.sin_k)
            values = values[:, :n]
        return self.impl(q, keys, values, self.kv_len)


@dataclass
class RecacheAttention:
    """Re-cache pass: frames already in the cache, run again as one sequence, write their
    keys/values back into their slots and attend to each other block-causally.

    Used when a stream's prompt changes (``transition="recache"``): every kept frame (sinks and
    the ring, oldest first) is re-encoded under the new prompt, each attending to the kept frames
    of its own and earlier chunks. Keys are written as the cache stores them (rotated at their
    absolute positions, or unrotated in ``cache_relative`` mode).

    With ``sink_slots`` (``recache_sinks=False``, LongLive's global sink) the sequence is the ring
    frames only: the sinks keep their cached keys/values, and every ring frame attends to them and
    to all ring frames (``mask`` None: LongLive's re-cache runs unmasked).
    """

    cache: KVCache
    row: int
    write_slots: Tensor  # [N*T] token slots of the kept frames, in sequence order
    cos: Tensor  # [N*T, D/2] rotary tables of the sequence (attention positions)
    sin: Tensor
    mask: Tensor | None  # [N*T, N*T] bool (None: every key visible)
    store_rotated: bool
    sink_slots: Tensor | None = None  # [S*T] token slots of cached sinks attended as they are
    sink_rope: tuple[Tensor, Tensor] | None = None  # their cos, sin when cached unrotated

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q_rot = apply_rotary(q, self.cos, self.sin)
        k_rot = apply_rotary(k, self.cos, self.sin)
        kc = self.cache.k[layer, self.row:self.row + 1]  # [1, cap, H, D]
        vc = self.cache.v[layer, self.row:self.row + 1]
        write_rows(kc, self.write_slots, (k_rot if self.store_rotated else k).detach(), inplace=True)
        write_rows(vc, self.write_slots, v.detach(), inplace=True)
        if self.sink_slots is None:
            return attention(q_rot, k_rot, v, self.mask)
        ks, vs = kc[:, self.sink_slots], vc[:, self.sink_slots]  # [1, S*T, H, D], as cached
        if self.sink_rope is not None:
            ks = apply_rotary(ks, *self.sink_rope)
        return attention(q_rot, torch.cat([ks, k_rot], dim=1), torch.cat([vs, v], dim=1), self.mask)


@dataclass
class WindowAttention:
    """A joint denoising window (Rolling Forcing): the window's frames, each at its own timestep,
    attend to one another without a mask and to the clean cached frames ``context_slots`` (the
    sinks, then the newest ring frames, oldest first: :meth:`KVCache.window_context`), read as
    they are cached. Nothing is written: the window's keys are of noisy frames, and only a chunk
    that leaves the window clean enters the cache (through the cache pass).

    Rotary positions: with keys cached rotated (``absolute``) the window sits at its absolute
    frames; with keys cached unrotated (``cache_relative``) the context is rotated at 0..K-1 in
    its order and the window follows at K.., so the sinks sit right before the oldest frame the
    window sees (how Rolling Forcing rotates its attention sink).
    """

    cache: KVCache
    row: int
    context_slots: Tensor  # [K*T] token slots of the cached frames the window sees
    cos: Tensor  # [W*T, D/2] rotary tables of the window's frames
    sin: Tensor
    context_rope: tuple[Tensor, Tensor] | None  # [K*T, D/2] cos, sin of the context when cached unrotated

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q = apply_rotary(q, self.cos, self.sin)
        k = apply_rotary(k, self.cos, self.sin)
        kc = self.cache.k[layer, self.row:self.row + 1].index_select(1, self.context_slots)  # [1, K*T, H, D]
        vc = self.cache.v[layer, self.row:self.row + 1].index_select(1, self.context_slots)
        if self.context_rope is not None:
            kc = apply_rotary(kc, *self.context_rope)
        return attention(q, torch.cat([kc, k], dim=1), torch.cat([vc, v], dim=1), None)  # [1, W*T, H, D]


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


def _transposed_storage(w: Tensor) -> bool:
    """Whether a 2-D weight [out, in] is stored as its transpose (``w.t()`` contiguous)."""
    return w.dim() == 2 and w.shape[0] > 1 and w.stride() == (1, w.shape[0])


def _as_transposed_storage(w: Tensor) -> Tensor:
    """The same values and shape [out, in], stored as the row-major [in, out] matrix."""
    return w.t().contiguous().t()


class SelfAttention(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.dim, cfg.dim)
        self.v = nn.Linear(cfg.dim, cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)
        self.norm_q = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.qk_norm, self.eps = cfg.qk_norm, cfg.eps
        self._fused: tuple[tuple, Tensor, Tensor, Tensor | None] | None = None

    def fused_qkv(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """The q, k, v projections as one weight [3*dim, dim] and bias, and the q/k norm weights as
        one [2, dim] (None without qk_norm): a copy made on first use and remade whenever a
        parameter changes (new tensor, in-place update or dtype), so the state dict keeps the
        official q / k / v keys. Used without autograd only (gradients need the parameters)."""
        params = [self.q.weight, self.q.bias, self.k.weight, self.k.bias, self.v.weight, self.v.bias]
        if self.qk_norm:
            params += [self.norm_q.weight, self.norm_k.weight]
        key = weights_key(params)
        if self._fused is None or self._fused[0] != key:
            with torch.no_grad():
                w = torch.cat([self.q.weight, self.k.weight, self.v.weight])  # [3*dim, dim]
                if _transposed_storage(self.q.weight):  # the same memory layout as the parts
                    w = _as_transposed_storage(w)
                b = torch.cat([self.q.bias, self.k.bias, self.v.bias])  # [3*dim]
                nw = torch.stack([self.norm_q.weight, self.norm_k.weight]) if self.qk_norm else None  # [2, dim]
            self._fused = (key, w, b, nw)
        return self._fused[1:]

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, L, dim] -> q, k (normed), v, each [B, L, H, D]."""
        b, n, d = x.shape
        heads = (b, n, self.num_heads, self.head_dim)
        if torch.is_grad_enabled() or _tracing():
            q = self.norm_q(F.linear(x, self.q.weight, self.q.bias)).view(heads)  # [B, L, H, D]
            k = self.norm_k(F.linear(x, self.k.weight, self.k.bias)).view(heads)  # [B, L, H, D]
            return q, k, F.linear(x, self.v.weight, self.v.bias).view(heads)
        w, bias, norm_w = self.fused_qkv()
        qkv = F.linear(x, w, bias).view(b, n, 3, d)  # [B, L, 3, dim]
        qk = qkv[:, :, :2]  # [B, L, 2, dim]
        if norm_w is not None:
            qk = rms_norm(qk, norm_w, self.eps)  # both norms in one call
        return qk[:, :, 0].view(heads), qk[:, :, 1].view(heads), qkv[:, :, 2].view(heads)

    def forward(self, x: Tensor, attend: SequenceAttention | StepAttention, layer: int) -> Tensor:
        q, k, v = self.project(x)  # [B, L, H, D] each
        out = attend(layer, q, k, v)  # [B, L, H, D]
        return F.linear(out.flatten(2), self.o.weight, self.o.bias)  # [B, L, dim]


class CrossAttention(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.dim, cfg.dim)
        self.v = nn.Linear(cfg.dim, cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)
        self.norm_q = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()

    def project_context(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Embedded prompt [B, Lc, dim] -> keys, values [B, Lc, H, D] (cached per prompt)."""
        b, n, _ = context.shape
        k = self.norm_k(self.k(context)).view(b, n, self.num_heads, self.head_dim)  # [B, Lc, H, D]
        v = self.v(context).view(b, n, self.num_heads, self.head_dim)  # [B, Lc, H, D]
        return k, v

    def forward(self, x: Tensor, k: Tensor, v: Tensor) -> Tensor:
        b, n, _ = x.shape
        q = self.norm_q(F.linear(x, self.q.weight, self.q.bias)).view(b, n, self.num_heads, self.head_dim)
        return F.linear(attention(q, k, v).flatten(2), self.o.weight, self.o.bias)  # [B, L, dim]


_GELU_C = 2.0 * math.sqrt(2.0 / math.pi)


def gelu_tanh(y: Tensor) -> Tensor:
    """GELU with the tanh approximation, ``0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3)))``.

    Eager float32 / float64 CPU calls without autograd compute it as ``y sigmoid(2 sqrt(2/pi) (y +
    0.044715 y^3))`` (the same function: ``(1 + tanh(z)) / 2 = sigmoid(2z)``) in four in-place
    passes over ``y``, which they overwrite: PyTorch's CPU kernel for the tanh form is several times
    slower than its sigmoid (~4.8e-7 apart at the DiT's FFN sizes). Everything else (GPUs, half
    types, autograd, traced graphs) calls ``F.gelu``."""
    if y.device.type != "cpu" or y.dtype not in (torch.float32, torch.float64) or torch.is_grad_enabled() \
            or _tracing():
        return F.gelu(y, approximate="tanh")
    if y.is_contiguous() and ops.block_kernels_available(y):  # float32: one fused pass (CPU kernel)
        torch.ops.sf_sdk.gelu_tanh_(y)
        return y
    z = torch.mul(y, y)
    z.mul_(0.044715 * _GELU_C).add_(_GELU_C).mul_(y)  # 2 sqrt(2/pi) (y + 0.044715 y^3)
    return y.mul_(z.sigmoid_())


def _modulate(x: Tensor, shift: Tensor, scale1: Tensor, frames: int) -> Tensor:
    """adaLN per frame: x [B, F*T, dim], shift and 1 + scale [B, F, 1, dim] -> [B, F*T, dim]."""
    b, n, d = x.shape
    return torch.addcmul(shift, x.view(b, frames, n // frames, d), scale1).view(b, n, d)  # [B, F*T, dim]


def _norm_modulate(norm: nn.Module, x: Tensor, shift: Tensor, scale1: Tensor, frames: int) -> Tensor:
    """adaLN: ``_modulate(norm(x), ...)`` for the block's affine-free layer norms, in one fused pass
    where the CPU kernels run (:func:`_fused_eager`)."""
    if isinstance(norm, LayerNorm) and norm.weight is None and norm.bias is None and _fused_eager(x) \
            and shift.shape[0] == x.shape[0] and shift.dtype == x.dtype:
        return torch.ops.sf_sdk.modulated_layer_norm(x, shift, scale1, norm.eps)
    return _modulate(norm(x), shift, scale1, frames)


def _gated_add(x: Tensor, y: Tensor, gate: Tensor, frames: int) -> Tensor:
    """x + y * gate per frame: x, y [B, F*T, dim], gate [B, F, 1, dim] -> [B, F*T, dim]."""
    b, n, d = y.shape
    per_frame = (b, frames, n // frames, d)
    return torch.addcmul(x.view(per_frame), y.view(per_frame), gate).view(b, n, d)


class Block(nn.Module):
    """Self-attention, cross-attention to the prompt, FFN; adaLN-modulated per frame."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm1 = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg)
        self.norm3 = (LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm
                      else nn.Identity())
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def modulation_of(self, e: Tensor, dtype: torch.dtype) -> tuple[Tensor, ...]:
        """The block's adaLN vectors for time projections e [B, F, 6, dim]: (shift, 1 + scale, gate)
        for the self-attention, then for the FFN, each [B, F, 1, dim]."""
        mod = (self.modulation.unsqueeze(1) + e).to(dtype)  # [B, F, 6, dim]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unsqueeze(3).unbind(2)  # 6 x [B, F, 1, dim]
        return shift1, 1 + scale1, gate1, shift2, 1 + scale2, gate2

    def _step_args(self, attend: StepAttention, layer: int) -> tuple:
        """The block's tensors as ``sf_sdk::dit_block_step`` takes them, gathered once per chunk (kept
        on ``attend``): (the :data:`~sf_sdk.ops.BLOCK_STEP_WEIGHTS`, the q/k norm weights [2, dim] or
        None, the cross-attention layer norm's weight and bias or None, the cross q norm's weight or
        None)."""
        args = attend._block_args.get(layer)
        if args is None:
            sa, ca = self.self_attn, self.cross_attn
            qkv_w, qkv_b, qk_norm = sa.fused_qkv()
            ffn_in, _, ffn_out = self.ffn
            weights = [qkv_w, qkv_b, sa.o.weight, sa.o.bias, ca.q.weight, ca.q.bias, ca.o.weight, ca.o.bias,
                       ffn_in.weight, ffn_in.bias, ffn_out.weight, ffn_out.bias]
            norm3 = self.norm3 if isinstance(self.norm3, LayerNorm) else None
            args = attend._block_args[layer] = (
                weights, qk_norm, norm3.weight if norm3 is not None else None,
                norm3.bias if norm3 is not None else None, ca.norm_q.weight if sa.qk_norm else None)
        return args

    def forward(self, x: Tensor, e: Tensor, cross_k: Tensor, cross_v: Tensor,
                attend: SequenceAttention | StepAttention, layer: int) -> Tensor:
        # e: [B, F, 6, dim] time projection of each frame
        if isinstance(attend, StepAttention) and attend.block_step(x):
            weights, qk_norm, norm3_w, norm3_b, cross_q_norm = self._step_args(attend, layer)
            return torch.ops.sf_sdk.dit_block_step(
                x, e, self.modulation, weights, qk_norm, norm3_w, norm3_b, cross_q_norm, cross_k, cross_v,
                attend.k_cache, attend.v_cache, layer, attend.plan.rows, attend.write_slots, attend.cos_q,
                attend.sin_q, attend.freqs_q(), attend.kv_len, self.self_attn.num_heads, self.self_attn.eps)
        frames = e.shape[1]
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation_of(e, x.dtype)
        y = self.self_attn(_norm_modulate(self.norm1, x, shift1, scale1, frames), attend, layer)
        x = _gated_add(x, y, gate1, frames)
        x = x + self.cross_attn(self.norm3(x), cross_k, cross_v)
        ffn_in, _, ffn_out = self.ffn
        y = F.linear(_norm_modulate(self.norm2, x, shift2, scale2, frames), ffn_in.weight, ffn_in.bias)
        y = F.linear(gelu_tanh(y), ffn_out.weight, ffn_out.bias)  # [B, F*T, dim]
        return _gated_add(x, y, gate2, frames)


    def write_kv(self, x: Tensor, e: Tensor, attend: StepAttention, layer: int) -> None:
        """Only the part of :meth:`forward` that leaves something in the cache: the self-attention
        keys/values of x, written through ``attend`` (the rest of the block is not computed)."""
        if attend.block_step(x):
            weights, qk_norm = self._step_args(attend, layer)[:2]
            torch.ops.sf_sdk.dit_block_write_kv(
                x, e, self.modulation, weights[0], weights[1], qk_norm, attend.k_cache, attend.v_cache, layer,
                attend.plan.rows, attend.write_slots, attend.cos_q, attend.sin_q, self.self_attn.num_heads,
                self.self_attn.eps)
            return
        frames = e.shape[1]
        shift1, scale1 = self.modulation_of(e, x.dtype)[:2]
        _, k, v = self.self_attn.project(_norm_modulate(self.norm1, x, shift1, scale1, frames))
        attend.write(layer, k, v)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * cfg.patch_volume)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        # e: [B, F, dim] time embedding of each frame
        frames = e.shape[1]
        shift, scale = (self.modulation.unsqueeze(1) + e.unsqueeze(2)).to(x.dtype).unsqueeze(3).unbind(2)
        return self.head(_norm_modulate(self.norm, x, shift, 1 + scale, frames))  # [B, F*T, out*p]


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


@dataclass
class CrossAttnCache:
    """The prompt's cross-attention keys/values for every layer, computed once per prompt."""

    k: Tensor  # [L, B, text_len, H, D]
    v: Tensor  # [L, B, text_len, H, D]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]


class WanDiT(nn.Module):
    """Wan2.1 DiT with per-frame timesteps, bidirectional, block-causal or streaming."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        if cfg.patch_size[0] != 1:
            raise ValueError(f"per-frame timesteps need a temporal patch size of 1, got {cfg.patch_size}")
        self.config = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        self.rope = RotaryEmbedding(cfg)
        self.gradient_checkpointing = False

    # ------------------------------------------------------------------ helpers
    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def use_cpu_matmul_layout(self) -> WanDiT:
        """Store every linear weight [out, in] of a CPU model as the row-major [in, out] matrix
        (``weight.t()`` contiguous), in place; a no-op for weights elsewhere.

        ``F.linear`` then hands the CPU GEMM a plain [in, out] operand instead of a transposed
        one, which is faster at the few rows of a streaming chunk: 48-row float32 matmuls of the
        race's tiny config ran 1.15-1.28x faster in a micro-benchmark, a whole eager chunk 1.11-1.13x
        on one thread and 1.03x on two (docs/performance.md). Values, shapes, parameter objects
        and the state dict's contents are unchanged (saving writes contiguous copies); an
        optimizer holding the parameters keeps them. The generator calls it for CPU models."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear) and module.weight.device.type == "cpu" \
                        and not _transposed_storage(module.weight):
                    module.weight.data = _as_transposed_storage(module.weight.data)
        return self

    def grid(self, height: int, width: int) -> tuple[int, int]:
        _, ph, pw = self.config.patch_size
        return height // ph, width // pw

    def _check_latents(self, x: Tensor, timestep: Tensor) -> Tensor:
        cfg = self.config
        if x.dim() != 5:
            raise ValueError(f"latents must be [B, F, C, H, W], got shape {tuple(x.shape)}")
        b, f, c, h, w = x.shape
        if c != cfg.in_dim:
            raise ValueError(f"latents have {c} channels, the model expects in_dim={cfg.in_dim} "
                             f"(layout [B, F, C, H, W])")
        _, ph, pw = cfg.patch_size
        if h % ph or w % pw:
            raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {ph}x{pw}")
        if not x.is_floating_point():
            raise ValueError(f"latents must be a floating tensor, got {x.dtype}")
        if x.dtype != self.dtype:
            raise ValueError(f"latents are {x.dtype} but the model weights are {self.dtype}: "
                             f"cast one to the other")
        if timestep.dim() == 1 and timestep.shape[0] == b:
            timestep = timestep.unsqueeze(1).expand(b, f)
        if tuple(timestep.shape) != (b, f):
            raise ValueError(f"timestep must be [B] or [B, F] = [{b}] or [{b}, {f}], got "
                             f"{tuple(timestep.shape)}")
        return timestep

    def embed_time(self, timestep: Tensor) -> tuple[Tensor, Tensor]:
        """[B, F] timesteps -> (e [B, F, dim], e0 [B, F, 6, dim]) in the model dtype."""
        b, f = timestep.shape
        sin = sinusoidal_embedding(self.config.freq_dim, timestep.reshape(-1)).to(self.dtype)  # [B*F, fd]
        e = self.time_embedding(sin)  # [B*F, dim]
        e0 = self.time_projection(e).view(b, f, 6, self.config.dim)  # [B, F, 6, dim]
        return e.view(b, f, self.config.dim), e0

    def encode_context(self, context: Tensor) -> CrossAttnCache:
        """Prompt embeddings [B, Lc <= text_len, text_dim] -> per-layer cross-attention K/V.

        Rows beyond Lc are zero-padded up to ``text_len`` and attended, unmasked (official).
        """
        cfg = self.config
        if context.dim() != 3 or context.shape[2] != cfg.text_dim:
            raise ValueError(f"prompt embeddings must be [B, L, text_dim={cfg.text_dim}], got "
                             f"{tuple(context.shape)}")
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"prompt embeddings have {context.shape[1]} rows, more than text_len="
                             f"{cfg.text_len}")
        context = F.pad(context.to(self.dtype), (0, 0, 0, cfg.text_len - context.shape[1]))  # [B, Lt, td]
        ctx = self.text_embedding(context)  # [B, text_len, dim]
        kv = [blk.cross_attn.project_context(ctx) for blk in self.blocks]
        return CrossAttnCache(torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv]))

    def _patchify(self, x: Tensor) -> Tensor:
        """The patch embedding (a Conv3d whose stride is its kernel) as one matmul over the patches."""
        b, f, c, h, w = x.shape
        _, ph, pw = self.config.patch_size
        patches = x.view(b, f, c, h // ph, ph, w // pw, pw).permute(0, 1, 3, 5, 2, 4, 6)  # [B, F, h, w, C, ph, pw]
        patches = patches.reshape(b, f * (h // ph) * (w // pw), c * ph * pw)  # [B, F*h*w, C*ph*pw]
        weight = self.patch_embedding.weight.view(self.config.dim, -1)  # [dim, C*1*ph*pw]
        return F.linear(patches, weight, self.patch_embedding.bias)  # [B, F*h*w, dim]

    def _unpatchify(self, tokens: Tensor, frames: int, grid_hw: tuple[int, int]) -> Tensor:
        cfg = self.config
        b = tokens.shape[0]
        h, w = grid_hw
        _, ph, pw = cfg.patch_size
        x = tokens.view(b, frames, h, w, ph, pw, cfg.out_dim)  # [B, F, h, w, ph, pw, C]
        x = x.permute(0, 1, 6, 2, 4, 3, 5)  # [B, F, C, h, ph, w, pw]
        return x.reshape(b, frames, cfg.out_dim, h * ph, w * pw)  # [B, F, C, H, W]

    def _run_blocks(self, x: Tensor, timestep: Tensor, cross: CrossAttnCache,
                    attend: SequenceAttention | StepAttention, grid_hw: tuple[int, int], *,
                    cache_only: bool = False) -> Tensor | None:
        frames = timestep.shape[1]
        table = attend.timesteps if isinstance(attend, StepAttention) else None
        embedded = table.embedding(timestep, self.embed_time) if table is not None else None
        e, e0 = embedded if embedded is not None else self.embed_time(timestep)
        tokens = self._patchify(x)  # [B, F*T, dim]
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            if cache_only and i == last:
                block.write_kv(tokens, e0, attend, i)  # nothing after its keys/values is kept
                return None
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, e0, cross.k[i], cross.v[i], attend, i,
                                    use_reentrant=False)
            else:
                tokens = block(tokens, e0, cross.k[i], cross.v[i], attend, i)
        return self._unpatchify(self.head(tokens, e), frames, grid_hw)

    # ------------------------------------------------------------------ modes
    def forward(self, x: Tensor, timestep: Tensor, context: Tensor | CrossAttnCache, *,
                mask: Tensor | None = None, start_frame: int = 0) -> Tensor:
        """Whole-sequence prediction of the flow ``noise - x0``.

        x [B, F, C, H, W]; timestep [B] or [B, F]; context: prompt embeddings
        [B, L, text_dim] or a :class:`CrossAttnCache`; mask [F*T, F*T] bool (None:
        bidirectional; see :func:`block_causal_mask`). Returns [B, F, C, H, W].
        """
        timestep = self._check_latents(x, timestep)
        cross = context if isinstance(context, CrossAttnCache) else self.encode_context(context)
        if cross.batch_size != x.shape[0]:
            raise ValueError(f"prompt batch {cross.batch_size} != latent batch {x.shape[0]}")
        b, f, _, h, w = x.shape
        grid_hw = self.grid(h, w)
        positions = torch.arange(start_frame, start_frame + f, device=x.device)
        cos, sin = self.rope.table(positions, grid_hw, x.dtype)
        n = f * grid_hw[0] * grid_hw[1]
        if mask is not None and tuple(mask.shape) != (n, n):
            raise ValueError(f"mask must be [{n}, {n}] for {f} frames of {n // f} tokens, got "
                             f"{tuple(mask.shape)}")
        return self._run_blocks(x, timestep, cross, SequenceAttention(cos, sin, mask), grid_hw)

    def step_attention(self, cache: KVCache, plan: ChunkPlan, impl: CacheAttention | str | None = None
                       ) -> StepAttention:
        """The attention of one chunk: rotary tables, slots, valid lengths and the cache-attention
        implementation (a chosen :class:`~sf_sdk.attention.CacheAttention`, or a name for
        :func:`~sf_sdk.attention.select_cache_attention`; None: the default name)."""
        grid_hw = cache.layout.grid_hw
        uniform = plan.uniform
        positions = plan.query_positions[0] if uniform else plan.query_positions  # [F] or [R, F]
        cos_q, sin_q = self.rope.table(positions, grid_hw, cache.dtype)
        cos_k = sin_k = None
        if plan.key_positions is not None:
            keys = plan.key_positions[0, :plan.kv_lens[0] // cache.layout.tokens_per_frame] if uniform \
                else plan.key_positions
            cos_k, sin_k = self.rope.table(keys, grid_hw, cache.dtype)
        if not isinstance(impl, CacheAttention):
            shape = (plan.rows, plan.write_slots.shape[1], self.config.num_heads, self.config.head_dim)
            example = torch.empty(1, dtype=cache.dtype, device=cache.device).expand(shape)  # metadata only
            impl = select_cache_attention(impl, example, masked=not uniform)
        slots = plan.write_slots[0] if uniform else plan.write_slots
        return StepAttention(cache.k, cache.v, slots, plan.kv_len, cos_q, sin_q, cos_k, sin_k, impl=impl,
                             rows=plan.rows, cache=cache, plan=plan)

    def forward_chunk(self, x: Tensor, timestep: Tensor, cross: CrossAttnCache, cache: KVCache,
                      start_frame: int | ChunkPlan, attend: StepAttention | None = None) -> Tensor:
        """Predict the flow of one chunk of frames starting at latent frame ``start_frame`` (every
        row), or placed by a :class:`~sf_sdk.cache.ChunkPlan` (rows at their own positions).

        The chunk's keys/values are written into the cache (overwriting the slots of the same
        chunk if it was called before). Pass ``attend`` (from :meth:`step_attention`) to reuse
        the chunk's rotary tables and attention implementation across its denoising steps.
        """
        timestep, attend = self._chunk_call(x, timestep, cross, cache, start_frame, attend)
        return self._run_blocks(x, timestep, cross, attend, cache.layout.grid_hw)

    def _chunk_call(self, x: Tensor, timestep: Tensor, cross: CrossAttnCache, cache: KVCache,
                    start_frame: int | ChunkPlan, attend: StepAttention | None) -> tuple[Tensor, StepAttention]:
        """The checks and the chunk's attention shared by :meth:`forward_chunk` and
        :meth:`write_cache`: (the [B, F] timestep, the StepAttention of the chunk's plan)."""
        timestep = self._check_latents(x, timestep)
        b, f, _, h, w = x.shape
        cfg = self.config
        plan = start_frame if isinstance(start_frame, ChunkPlan) else None
        rows = plan.rows if plan is not None else cache.batch_size
        cache.check_compatible(b, cfg.num_layers, cfg.num_heads, cfg.head_dim, self.grid(h, w), x.dtype,
                               rows=rows)
        if cross.batch_size != b:
            raise ValueError(f"prompt batch {cross.batch_size} != latent batch {b}")
        if plan is None:
            plan = cache.plan_chunk(start_frame, f)
        elif plan.num_frames != f:
            raise ValueError(f"the plan is for chunks of {plan.num_frames} frames, the latents have {f}")
        if attend is None or attend.plan is not plan:
            attend = self.step_attention(cache, plan, attend.impl if attend is not None else None)
        return timestep, attend

    @torch.no_grad()
    def write_cache(self, x: Tensor, timestep: Tensor, cross: CrossAttnCache, cache: KVCache,
                    start_frame: int | ChunkPlan, attend: StepAttention | None = None) -> None:
        """The cache pass: what :meth:`forward_chunk` leaves in the cache, without what it returns.

        Every layer's keys/values are written exactly as ``forward_chunk`` writes them (the same
        ops on the same inputs: bit for bit), but the last layer stops after its key/value
        projections and the head is not run: its attention, cross-attention and FFN only feed the
        flow, which a cache pass throws away (at 2 layers, ~45% of the call)."""
        timestep, attend = self._chunk_call(x, timestep, cross, cache, start_frame, attend)
        self._run_blocks(x, timestep, cross, attend, cache.layout.grid_hw, cache_only=True)

    def recache(self, x: Tensor, timestep: Tensor, cross: CrossAttnCache, cache: KVCache, row: int,
                frames: Tensor, chunk: int, *, cached_sinks: int = 0) -> None:
        """Re-encode the frames a cache row holds (see :class:`RecacheAttention`).

        x [1, N, C, H, W]: the clean latents of the kept frames, oldest first; ``frames`` [N]
        their absolute frame indices; ``chunk`` the frames per chunk (block-causal groups).
        ``cached_sinks`` > 0: ``x`` holds the ring frames only; that many sink frames keep their
        cached keys/values, which the ring frames attend to, unmasked (LongLive's global sink).
        """
        timestep = self._check_latents(x, timestep)
        lay = cache.layout
        n = x.shape[1]
        if tuple(frames.shape) != (n,):
            raise ValueError(f"frames must list the {n} frame indices of x, got shape {tuple(frames.shape)}")
        write = lay.token_slots(frames)  # [N*T]
        if cache.position_mode == "absolute":
            positions, rotated = frames, True
        else:  # the cache's logical order: sinks 0..S-1, then the ring frames in order
            positions, rotated = torch.arange(cached_sinks, cached_sinks + n, device=frames.device), False
        cos, sin = self.rope.table(positions, lay.grid_hw, x.dtype)
        if cached_sinks:
            sinks = torch.arange(cached_sinks, device=frames.device)
            rope = None if rotated else self.rope.table(sinks, lay.grid_hw, x.dtype)
            attend = RecacheAttention(cache, row, write, cos, sin, None, rotated, lay.token_slots(sinks), rope)
        else:
            blocks = frames // chunk  # [N]
            vis = blocks.unsqueeze(0) <= blocks.unsqueeze(1)  # [N, N] query frame i sees key frame j
            mask = vis.repeat_interleave(lay.tokens_per_frame, 0).repeat_interleave(lay.tokens_per_frame, 1)
            attend = RecacheAttention(cache, row, write, cos, sin, mask, rotated)
        self._run_blocks(x, timestep, cross, attend, lay.grid_hw)

    @torch.no_grad()
    def forward_window(self, x: Tensor, timestep: Tensor, cross: CrossAttnCache, cache: KVCache,
                       row: int = 0) -> Tensor:
        """Predict the flow of a joint denoising window (Rolling Forcing, ``denoise_window`` > 1).

        x [1, W, C, H, W]: the in-flight frames of cache row ``row``, which start at its end
        (``cache.end_frames[row]``: everything before them is clean and cached); timestep [1, W],
        one per frame. The window attends to itself unmasked and to the cached frames of
        :meth:`KVCache.window_context` (see :class:`WindowAttention`); the cache is left as it
        was. Returns the flow [1, W, C, H, W]. Inference only (no gradients).
        """
        timestep = self._check_latents(x, timestep)
        b, w, _, h, wd = x.shape
        cfg, lay = self.config, cache.layout
        if b != 1 or cross.batch_size != 1:
            raise ValueError(f"a joint window is one stream's: batch 1 (and one prompt), got latents of batch {b}, "
                             f"a prompt of batch {cross.batch_size}")
        if not 0 <= row < cache.batch_size:
            raise ValueError(f"row {row} does not exist: the cache has {cache.batch_size} rows")
        cache.check_compatible(1, cfg.num_layers, cfg.num_heads, cfg.head_dim, self.grid(h, wd), x.dtype, rows=1)
        if w > lay.ring_frames:
            raise ValueError(f"a joint window of {w} frames does not fit the cache ring of {lay.ring_frames} frames; "
                             f"raise local_attn_size")
        start = cache.end_frames[row]
        frames = torch.tensor(cache.window_context(row, w), dtype=torch.int64).to(x.device)  # [K]
        context = frames.numel()
        rope = None
        if cache.position_mode == "absolute":
            positions = torch.arange(start, start + w, device=x.device)
        else:
            positions = torch.arange(context, context + w, device=x.device)
            if context:
                rope = self.rope.table(torch.arange(context, device=x.device), lay.grid_hw, x.dtype)
        cos, sin = self.rope.table(positions, lay.grid_hw, x.dtype)
        attend = WindowAttention(cache, row, lay.token_slots(frames), cos, sin, rope)
        return self._run_blocks(x, timestep, cross, attend, lay.grid_hw)

    def new_cache(self, stream: StreamingConfig, batch_size: int, num_frames: int | None = None
                  ) -> KVCache:
        """An empty KV cache sized for this model and ``stream``."""
        return KVCache.for_model(self.config, stream, batch_size, num_frames=num_frames,
                                 dtype=self.dtype, device=self.patch_embedding.weight.device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, kv_tokens: int) -> float:
        """Approximate forward FLOPs per query token with ``kv_tokens`` keys (matmuls only)."""
        c = self.config
        per_layer = 2 * (4 * c.dim * c.dim + 2 * c.dim * c.ffn_dim + 2 * c.dim * c.dim)
        per_layer += 4 * c.dim * (kv_tokens + c.text_len)
        return c.num_layers * per_layer + 2 * c.dim * c.out_dim * math.prod(c.patch_size)


class ChunkInputs(NamedTuple):
    """The inputs of one chunk-step call, in graph order: the one declaration that eager
    streaming, torch.compile, AOTInductor, ONNX and TensorRT share (names, order, batch axes).

    Every tensor has a batch axis (:data:`CHUNK_BATCH_AXES`): one row per stream, so a pool of
    streams at different positions runs as one call. Shapes (T tokens per frame, cap the cache
    capacity in tokens, Lt text_len):
    """

    x: Tensor  # [B, F, C, H, W] latents
    timestep: Tensor  # [B, F]
    cross_k: Tensor  # [L, B, Lt, H, D] the prompt's cross-attention keys
    cross_v: Tensor  # [L, B, Lt, H, D]
    k_cache: Tensor  # [L, B, cap, H, D]
    v_cache: Tensor  # [L, B, cap, H, D]
    write_slots: Tensor  # [B, F*T] int64, each row's token slots
    kv_len: Tensor  # [B] int64, each row's valid prefix after the write
    cos_q: Tensor  # [B, F*T, D/2] rotary tables of each row's chunk
    sin_q: Tensor  # [B, F*T, D/2]

    @classmethod
    def from_plan(cls, x: Tensor, timestep: Tensor, cross: CrossAttnCache, cache: KVCache,
                  attend: StepAttention) -> ChunkInputs:
        """The graph inputs of one call of an eager plan (tables and slots expanded to every row)."""
        slots, cos, sin = attend.row_tables(x.shape[0])
        return cls(x.contiguous(), timestep.contiguous(), cross.k, cross.v, cache.k, cache.v, slots,
                   attend.plan.kv_len_tensor, cos, sin)


# Axis of the batch (stream) dimension of every ChunkInputs field.
CHUNK_BATCH_AXES: dict[str, int] = {"x": 0, "timestep": 0, "cross_k": 1, "cross_v": 1, "k_cache": 1,
                                    "v_cache": 1, "write_slots": 0, "kv_len": 0, "cos_q": 0, "sin_q": 0}
# Outputs of the functional chunk step, and their batch axes.
CHUNK_OUTPUTS: tuple[str, ...] = ("flow", "new_k_cache", "new_v_cache")
CHUNK_OUTPUT_BATCH_AXES: dict[str, int] = {"flow": 0, "new_k_cache": 1, "new_v_cache": 1}


class ChunkStep(nn.Module):
    """The per-chunk DiT call with all of its state as explicit tensors (:class:`ChunkInputs`).

    This is the graph that export backends capture (torch.export, ONNX, TensorRT): static shapes
    for a given resolution, chunk size and batch of streams, no Python-side state, no
    data-dependent control flow. Rows may sit at different positions (per-row slots, valid
    lengths and rotary tables); idle rows of a pool are computed and ignored.

    ``functional=False``: the cache buffers are updated in place and only the flow is returned.
    ``functional=True``: returns ``(flow, new_k_cache, new_v_cache)`` and leaves inputs untouched.
    ``attention``: the cache-attention implementation captured in the graph (None: the default).
    ``cache_only=True`` (in place only): the cache pass of :meth:`WanDiT.write_cache`, which writes
    the same keys/values and skips what only feeds the flow; it returns ``kv_len`` (a graph needs
    an output).
    """

    def __init__(self, model: WanDiT, functional: bool = False, attention: str | None = None, *,
                 cache_only: bool = False) -> None:
        super().__init__()
        if cache_only and functional:
            raise ValueError("the cache-only step writes the cache in place: functional=False")
        self.model = model
        self.functional = functional
        self.attention = attention
        self.cache_only = cache_only

    def forward(self, x: Tensor, timestep: Tensor, cross_k: Tensor, cross_v: Tensor, k_cache: Tensor,
                v_cache: Tensor, write_slots: Tensor, kv_len: Tensor, cos_q: Tensor, sin_q: Tensor):
        impl = REFERENCE
        if self.attention != "reference":
            cfg = self.model.config
            example = x.new_empty(1).expand(write_slots.shape[0], write_slots.shape[1], cfg.num_heads, cfg.head_dim)
            impl = select_cache_attention(self.attention, example, masked=True)
        attend = StepAttention(k_cache, v_cache, write_slots, kv_len, cos_q, sin_q, impl=impl,
                               functional=self.functional)
        grid_hw = self.model.grid(x.shape[3], x.shape[4])
        if self.cache_only:
            self.model._run_blocks(x, timestep, CrossAttnCache(cross_k, cross_v), attend, grid_hw, cache_only=True)
            return kv_len.clone()
        flow = self.model._run_blocks(x, timestep, CrossAttnCache(cross_k, cross_v), attend, grid_hw)
        if self.functional:
            return flow, torch.stack(attend.new_k), torch.stack(attend.new_v)
        return flow
