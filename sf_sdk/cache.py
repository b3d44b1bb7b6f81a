"""The KV cache of a streaming causal DiT: sink frames plus a ring window, fixed capacity.

Layout
------
One key and one value buffer for all layers, ``[num_layers, B, capacity, H, D]``, allocated
once. ``capacity = (sink_frames + ring_frames) * tokens_per_frame``. The first
``sink_frames`` frame slots hold the first frames of the stream forever; the remaining
``ring_frames`` slots are a ring: latent frame ``f >= sink_frames`` lives in frame slot
``sink_frames + (f - sink_frames) % ring_frames``.

Writing and eviction
--------------------
A chunk of frames ``[start, start + F)`` is written into its slots *before* its queries attend,
so the chunk attends to itself and to everything still cached, exactly as the official
implementation does. Writing a frame into a ring slot evicts the frame that was there (the
oldest non-sink frame): eviction is the overwrite itself, never a shifting copy. Calling the same
chunk again (the denoising steps, then the clean "cache pass") overwrites the same slots.

The valid slots always form a prefix ``[0, kv_len)`` of the buffer: sinks fill first, then
the ring in order, and once the ring has wrapped every slot is valid. Attention therefore reads
the buffer in place (``kv_len`` tokens), with no concatenation and no mask in eager mode.

The window therefore covers, for a chunk ending at frame ``e``: frames ``[0, min(S, e))`` and
``[max(S, e - R), e)``; :func:`frame_visibility` gives the same rule as a frame mask for the
full-sequence (training) forward.

Joint windows (``denoise_window`` > 1, Rolling Forcing): the cache holds clean frames only. A
window of ``W`` in-flight frames starting at frame ``s == end_frame`` is never written; it attends
to itself (unmasked) and to the cached frames :meth:`KVCache.window_context` names: the sinks and
the newest ``R - W`` ring frames (all of them under global attention), oldest first; its
oldest chunk, once clean, is written by the usual cache pass. :func:`window_visibility` gives the
rule as a frame mask.

EMA sinks (``sink_decay`` < 1, Reward Forcing): the sink slots start as the first frames;
each chunk that evicts ring frames first folds them into the sinks
(``sink = decay * sink + (1 - decay) * evicted``, frame by frame, keys unrotated:
``cache_relative`` positions), once per chunk when it is planned.

Positions
---------
``position_mode="absolute"`` (the official semantics): keys are stored after the rotary
embedding at their absolute frame index; the rotary angles are computed from the exact integer
position in float64, so streams are unbounded (no 1024-frame table) and do not lose precision.

``position_mode="cache_relative"``: keys are stored *before* the rotary embedding and rotated
at attention time by their position in the cache's logical order: sink frames keep positions
``0..S-1``, ring frames (oldest to newest, the chunk last) follow as ``S, S+1, ...``. Positions
never exceed the window, whatever the stream length (the KV-relative RoPE of long-video
streaming work). Without sinks the attention scores equal the absolute mode's, since RoPE only
sees relative offsets; with sinks the sink-to-chunk distance stays bounded.

Rows
----
Batch row ``b`` is one stream, with its own write position (``end_frames[b]``): a pool of streams
that joined at different times shares one cache. :meth:`KVCache.plan_rows` places one chunk per
row (per-row slots, valid lengths and positions; ``None`` for an idle row, computed and never
read); :meth:`KVCache.plan_chunk` is the single-position case. A call covers a prefix of the rows.

Ownership
---------
The cache does its own writes: :meth:`KVCache.write` in eager mode (rotating keys on the way, with
the fused ``sf_sdk::cache_write_rope`` op where it is faster), :func:`write_rows` (the same rule on
explicit buffers) inside captured graphs, and :meth:`KVCache.swap` when a functional graph's
outputs become the buffers. Nothing else assigns its buffers.

Bookkeeping (``end_frames``) is plain Python ints on the host: the per-chunk path needs no
``.item()`` and no device synchronisation.

Size
----
The window bounds what a stream can attend to, not what it must hold: a stream of known length
``n`` latent frames that ends before a window of ``W > n`` frames fills needs only ``n`` frames
(``CacheLayout.from_configs(..., fit=True)``: nothing would ever be evicted, so the attention is
the same). Unbounded streams hold the window. :func:`check_memory` compares a cache's bytes (and
the buffers that go with it) with the memory the device has free before anything is allocated.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sf_sdk.config import DiTConfig, StreamingConfig

__all__ = ["CacheLayout", "ChunkPlan", "KVCache", "frame_visibility", "window_visibility", "write_rows", "cache_nbytes",
           "available_memory", "check_memory", "OutOfMemoryRequest"]


@dataclass(frozen=True)
class CacheLayout:
    """Geometry of a cache: frame slots and tokens per frame."""

    grid_hw: tuple[int, int]  # patch grid of one latent frame (h', w')
    sink_frames: int
    ring_frames: int
    global_attention: bool = False  # True: no eviction, the ring is the whole stream

    def __post_init__(self) -> None:
        if min(self.grid_hw) <= 0:
            raise ValueError(f"grid_hw must be positive, got {self.grid_hw}")
        if self.sink_frames < 0 or self.ring_frames <= 0:
            raise ValueError(f"need sink_frames >= 0 and ring_frames > 0, got {self.sink_frames}, "
                             f"{self.ring_frames}")

    @property
    def tokens_per_frame(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    @property
    def capacity_frames(self) -> int:
        return self.sink_frames + self.ring_frames

    @property
    def capacity(self) -> int:
        return self.capacity_frames * self.tokens_per_frame

    def frame_slot(self, frame: int) -> int:
        """Frame slot of absolute latent frame ``frame``."""
        if frame < self.sink_frames:
            return frame
        return self.sink_frames + (frame - self.sink_frames) % self.ring_frames

    def token_slots(self, frames: Tensor) -> Tensor:
        """Token slots ``[..., F * T]`` of absolute latent frames ``frames`` ``[..., F]`` (int64):
        :meth:`frame_slot` of each frame, expanded to its tokens."""
        slots = torch.where(frames < self.sink_frames, frames,
                            self.sink_frames + (frames - self.sink_frames) % self.ring_frames)  # [..., F]
        tokens = torch.arange(self.tokens_per_frame, device=frames.device)  # [T]
        return (slots.unsqueeze(-1) * self.tokens_per_frame + tokens).flatten(-2)  # [..., F * T]

    def evicted(self, end_frame: int) -> int:
        """Number of non-sink frames evicted once frames ``[0, end_frame)`` were written."""
        return max(0, end_frame - self.capacity_frames)

    @classmethod
    def from_configs(cls, dit: DiTConfig, stream: StreamingConfig, num_frames: int | None = None, *,
                     fit: bool = False) -> CacheLayout:
        """The layout ``stream`` asks for. ``num_frames`` (latent frames): the capacity under global
        attention (default ``global_cache_frames``); with ``fit=True`` also under a rolling window
        it is the stream's length, and a stream shorter than the window gets a cache of its own
        length (nothing would be evicted: the same attention, ``window / num_frames`` times less
        memory); longer or unbounded streams get the window."""
        _, ph, pw = dit.patch_size
        if stream.latent_height % ph or stream.latent_width % pw:
            raise ValueError(f"latent size {stream.latent_height}x{stream.latent_width} is not divisible "
                             f"by the patch size {ph}x{pw}")
        grid = (stream.latent_height // ph, stream.latent_width // pw)
        if stream.rolling and fit and num_frames is not None and 0 < num_frames < stream.local_attn_size:
            return cls(grid, 0, num_frames, global_attention=True)
        if stream.rolling:
            return cls(grid, stream.sink_size, stream.local_attn_size - stream.sink_size)
        frames = stream.global_cache_frames if num_frames is None else num_frames
        return cls(grid, 0, frames, global_attention=True)


@dataclass
class ChunkPlan:
    """Where one chunk goes in the cache, row by row, and what it attends to.

    A cache row is one stream: rows of one plan may sit at different frame positions (pooled
    streams that joined at different times). The plan covers the first ``rows`` rows of the cache.
    Indices are small device tensors built from host ints (no device-to-host transfer). A plan is
    made once per chunk and reused for all its calls (denoising steps and cache pass).
    """

    start_frames: tuple[int, ...]  # per row: first latent frame of the chunk (idle rows: 0)
    num_frames: int
    write_slots: Tensor  # [rows, F * T] int64, token slots of each row's chunk
    kv_lens: tuple[int, ...]  # per row: valid prefix (tokens) after the chunk is written
    query_positions: Tensor  # [rows, F] int64, rotary frame position of each chunk frame
    key_positions: Tensor | None  # [rows, K] int64 (cache_relative): position of each valid frame slot
    active: tuple[bool, ...]  # per row: False for idle rows (computed, written to their own row, never read)
    kv_len_tensor: Tensor  # [rows] int64, kv_lens on the cache's device

    @property
    def rows(self) -> int:
        return len(self.start_frames)

    @property
    def uniform(self) -> bool:
        """Every row writes the same slots and reads the same prefix (one stream, or a batch of
        streams in lockstep): eager attention slices the cache instead of masking it."""
        return len(set(self.start_frames)) == 1

    @property
    def start_frame(self) -> int:
        if not self.uniform:
            raise ValueError(f"the rows of this plan start at different frames {self.start_frames}")
        return self.start_frames[0]

    @property
    def kv_len(self) -> int | Tensor:
        """A Python int when the rows agree (eager slicing), else the per-row ``[rows]`` tensor."""
        return self.kv_lens[0] if self.uniform else self.kv_len_tensor


def write_rows(buffer: Tensor, slots: Tensor, new: Tensor, *, inplace: bool) -> Tensor:
    """The cache's write rule: ``buffer[b, slots[b]] = new[b]`` for every row b.

    buffer ``[B, cap, H, D]`` (one layer), new ``[B, n, H, D]``; slots ``[n]`` (every row the
    same) or ``[B, n]`` (one slot list per row). ``inplace=False`` returns a new buffer and leaves
    ``buffer`` untouched (graphs whose caches are outputs: ONNX, TensorRT).
    """
    new = new.to(buffer.dtype)
    if slots.dim() == 1:
        return buffer.index_copy_(1, slots, new) if inplace else buffer.index_copy(1, slots, new)
    b, cap, h, d = buffer.shape
    n = slots.shape[1]
    rows = torch.arange(b, device=slots.device, dtype=slots.dtype).unsqueeze(1) * cap  # [B, 1]
    flat = (rows + slots).reshape(b * n)  # [B*n] token index into [B*cap]
    values = new.reshape(b * n, h, d)  # [B*n, H, D]
    if inplace:
        buffer.view(b * cap, h, d).index_copy_(0, flat, values)
        return buffer
    return buffer.reshape(b * cap, h, d).index_copy(0, flat, values).view(b, cap, h, d)


def cache_nbytes(layout: CacheLayout, num_layers: int, batch_size: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype) -> int:
    """Bytes of the key and value buffers of a :class:`KVCache` (what :meth:`KVCache.nbytes` will report)."""
    per = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * batch_size * layout.capacity * num_heads * head_dim * per


def available_memory(device: torch.device | str) -> int | None:
    """Bytes that can still be allocated on ``device``: free memory for CUDA
    (``torch.cuda.mem_get_info``), ``MemAvailable`` of ``/proc/meminfo`` on the CPU (free pages
    where that file is missing); None when it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


class OutOfMemoryRequest(MemoryError, ValueError):
    """A request whose buffers cannot fit in the device's free memory (raised before allocating;
    a ``ValueError`` too: the request, not the program, is what to change)."""


def check_memory(needed: int, device: torch.device | str, what: str, advice: str) -> None:
    """Raise :class:`OutOfMemoryRequest` before allocating ``needed`` bytes on ``device`` when it has
    less available (``what``: what the bytes are for; ``advice``: what to do instead)."""
    free = available_memory(device)
    if free is not None and needed > free:
        raise OutOfMemoryRequest(f"{what} needs {_size(needed)} ({needed} bytes), {torch.device(device)} has "
                                 f"{_size(free)} available: {advice}")


def frame_visibility(num_frames: int, chunk: int, sink_frames: int = 0, ring_frames: int | None = None,
                     device: torch.device | None = None) -> Tensor:
    """[F, F] bool: may query frame i see key frame j, under the streaming cache rules.

    Frame i belongs to chunk c = i // chunk, ending at e = (c + 1) * chunk; it sees frames j < e
    that are sinks (j < sink_frames) or within the ring (j >= e - ring_frames). ``ring_frames``
    None means global (block-causal) attention.
    """
    i = torch.arange(num_frames, device=device)
    end = (i // chunk + 1) * chunk  # [F]
    j = torch.arange(num_frames, device=device)
    vis = j.unsqueeze(0) < end.unsqueeze(1)  # [F, F]
    if ring_frames is not None:
        in_ring = j.unsqueeze(0) >= (end - ring_frames).unsqueeze(1)
        is_sink = (j < sink_frames).unsqueeze(0)
        vis = vis & (in_ring | is_sink)
    return vis


def window_visibility(clean_frames: int, window_frames: int, chunk: int, sink_frames: int = 0,
                      ring_frames: int | None = None, device: torch.device | None = None) -> Tensor:
    """[F, F] bool (F = clean_frames + window_frames): the frame mask of a joint denoising window
    (``denoise_window`` > 1) over ``window_frames`` frames that follow ``clean_frames`` cached ones.

    The clean frames see each other as the cache passes that wrote them did (:func:`frame_visibility`);
    every window frame sees the whole window and the cached frames it is given: the sinks
    (j < sink_frames) and the newest ``ring_frames - window_frames`` clean non-sink frames
    (``ring_frames`` None: global, every clean frame)."""
    n = clean_frames + window_frames
    vis = torch.zeros(n, n, dtype=torch.bool, device=device)
    if clean_frames:
        vis[:clean_frames, :clean_frames] = frame_visibility(clean_frames, chunk, sink_frames, ring_frames, device)
    j = torch.arange(clean_frames, device=device)
    seen = torch.ones(clean_frames, dtype=torch.bool, device=device)
    if ring_frames is not None:
        seen = (j < sink_frames) | ((j >= sink_frames) & (j >= clean_frames - max(0, ring_frames - window_frames)))
    vis[clean_frames:, :clean_frames] = seen
    vis[clean_frames:, clean_frames:] = True
    return vis


class KVCache:
    """Preallocated self-attention keys/values for every layer of a causal DiT.

    Use :meth:`plan_chunk` once per chunk, then pass the plan with every model call of that chunk.
    """

    def __init__(
        self,
        layout: CacheLayout,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        position_mode: str = "absolute",
        sink_decay: float = 1.0,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if position_mode not in ("absolute", "cache_relative"):
            raise ValueError(f"position_mode must be 'absolute' or 'cache_relative', got {position_mode!r}")
        self.layout = layout
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.position_mode = position_mode
        if not 0.0 <= sink_decay <= 1.0:
            raise ValueError(f"sink_decay must lie in [0, 1], got {sink_decay}")
        self.sink_decay = float(sink_decay)
        shape = (num_layers, batch_size, layout.capacity, num_heads, head_dim)
        self._k = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, cap, H, D]
        self._v = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, cap, H, D]
        self.end_frames = [0] * batch_size  # per row: frames [0, end) have been written
        self._last: ChunkPlan | None = None
        self._writers: tuple[Any, Any] | None = None  # how rotated keys are written (decided on first use)

    @classmethod
    def for_model(cls, dit: DiTConfig, stream: StreamingConfig, batch_size: int, *,
                  num_frames: int | None = None, fit: bool = False, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> KVCache:
        """A cache for ``dit`` streamed under ``stream`` (``num_frames`` / ``fit``: see
        :meth:`CacheLayout.from_configs`)."""
        layout = CacheLayout.from_configs(dit, stream, num_frames, fit=fit)
        return cls(layout, dit.num_layers, batch_size, dit.num_heads, dit.head_dim, dtype=dtype,
                   device=device, position_mode=stream.position_mode, sink_decay=stream.sink_decay)

    # ------------------------------------------------------------------ state
    @property
    def k(self) -> Tensor:
        """Key buffers ``[L, B, cap, H, D]`` (read-only from outside: :meth:`write`, :meth:`swap`)."""
        return self._k

    @property
    def v(self) -> Tensor:
        """Value buffers ``[L, B, cap, H, D]``."""
        return self._v

    @property
    def dtype(self) -> torch.dtype:
        return self._k.dtype

    @property
    def device(self) -> torch.device:
        return self._k.device

    @property
    def end_frame(self) -> int:
        """Frames written so far, when every row agrees (one stream, or streams in lockstep)."""
        if len(set(self.end_frames)) != 1:
            raise ValueError(f"the rows of this cache are at different frames {self.end_frames}: read "
                             f"end_frames[row]")
        return self.end_frames[0]

    def reset(self, rows: Sequence[int] | None = None) -> None:
        """Forget every frame of ``rows`` (default: all); buffers are kept, stale slots are never read."""
        for r in range(self.batch_size) if rows is None else rows:
            if not 0 <= r < self.batch_size:
                raise ValueError(f"row {r} does not exist: the cache has {self.batch_size} rows")
            self.end_frames[r] = 0
        self._last = None

    def row_view(self, row: int) -> KVCache:
        """A one-row cache over row ``row``'s buffers (views, no copy), for a call that covers that
        row alone; its writes land in this cache. Give its bookkeeping back with :meth:`absorb`."""
        if not 0 <= row < self.batch_size:
            raise ValueError(f"row {row} does not exist: the cache has {self.batch_size} rows")
        view = KVCache.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        view.batch_size = 1
        view._k, view._v = self._k[:, row:row + 1], self._v[:, row:row + 1]  # [L, 1, cap, H, D] views
        view.end_frames = [self.end_frames[row]]
        view._last = None
        return view

    def absorb(self, view: KVCache, row: int) -> None:
        """Take back the frames a :meth:`row_view` of row ``row`` wrote."""
        self.end_frames[row] = view.end_frames[0]
        self._last = None

    def window_context(self, row: int, window_frames: int) -> list[int]:
        """The cached frames a joint denoising window of ``window_frames`` frames starting at row
        ``row``'s end sees, oldest first: its sinks, then its newest ``ring_frames - window_frames``
        ring frames (every ring frame under global attention; :func:`window_visibility`)."""
        lay, end = self.layout, self.end_frames[row]
        sinks = list(range(min(lay.sink_frames, end)))
        ring = list(range(max(lay.sink_frames, end - lay.ring_frames), end))
        if not lay.global_attention:
            keep = max(0, lay.ring_frames - window_frames)
            ring = ring[len(ring) - keep:] if keep else []
        return sinks + ring

    def nbytes(self) -> int:
        return self._k.numel() * self._k.element_size() * 2

    def valid_tokens(self, row: int) -> int:
        """Tokens of row ``row`` that hold frames (a prefix of its buffer)."""
        return min(self.end_frames[row], self.layout.capacity_frames) * self.layout.tokens_per_frame

    # ------------------------------------------------------------------ writes
    def write(self, layer: int, k: Tensor, v: Tensor, plan: ChunkPlan,
              rope: tuple[Tensor, Tensor] | None = None) -> None:
        """Write a chunk's keys/values ``[rows, F*T, H, D]`` of ``layer`` into its slots, in place.

        ``rope`` (cos, sin tables of the plan): ``k`` is unrotated and is stored rotated. One
        stream's write (a uniform plan) then runs the fused ``sf_sdk::cache_write_rope`` op where
        it is faster (:func:`sf_sdk.ops.fused_write_available`); otherwise rotate, then copy.
        """
        rows = plan.rows
        kc, vc = self._k[layer, :rows], self._v[layer, :rows]  # [rows, cap, H, D], contiguous
        k, v = k.detach(), v.detach()
        if rope is not None:
            cos, sin = rope
            fused, rotate = self._rope_writers()
            if fused is not None and plan.uniform and cos.dim() == 2 and cos.dtype in (torch.float32, torch.float64):
                fused(kc, vc, k, v, plan.write_slots[0], cos, sin)  # it reads strided rows in place
                return
            k = rotate(k, cos, sin)
        slots = plan.write_slots[0] if plan.uniform else plan.write_slots
        write_rows(kc, slots, k, inplace=True)
        write_rows(vc, slots, v, inplace=True)

    def _rope_writers(self) -> tuple[Any, Any]:
        """(the fused rotary write op or None, the plain rotary function), decided once per cache."""
        if self._writers is None:
            from sf_sdk import ops
            from sf_sdk.models.dit import apply_rotary  # the rotary rule lives with the model

            fused = ops.cache_write_rope if ops.fused_write_available(self.device, self.dtype) else None
            self._writers = (fused, apply_rotary)
        return self._writers

    def swap(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Make ``k`` / ``v`` (same shape and dtype; the outputs of a functional step) the buffers;
        returns the previous ones, to be reused as the next call's outputs (ping-pong, no copy)."""
        if k.shape != self._k.shape or v.shape != self._v.shape or k.dtype != self.dtype or v.dtype != self.dtype:
            raise ValueError(f"swap needs buffers {tuple(self._k.shape)} of {self.dtype}, got "
                             f"{tuple(k.shape)} / {tuple(v.shape)} of {k.dtype} / {v.dtype}")
        old = (self._k, self._v)
        self._k, self._v = k, v
        return old

    # ------------------------------------------------------------------ planning
    def plan_chunk(self, start_frame: int, num_frames: int) -> ChunkPlan:
        """Reserve slots for frames ``[start_frame, start_frame + num_frames)`` in every row.

        A chunk is either the next one (``start_frame == end_frame``) or the last one again
        (same start and length: its slots are overwritten). Anything else is an error.
        """
        return self.plan_rows([start_frame] * self.batch_size, num_frames)

    def plan_rows(self, starts: Sequence[int | None], num_frames: int) -> ChunkPlan:
        """Reserve slots for one chunk of ``num_frames`` frames per row: row ``r`` writes frames
        ``[starts[r], starts[r] + num_frames)``; ``None`` marks an idle row (it is computed and
        written into its own slots, never read: its next stream starts with :meth:`reset`).

        The plan covers rows ``[0, len(starts))``. Each active row's chunk is its next one
        (``starts[r] == end_frames[r]``), or the whole plan repeats the last one.
        """
        lay = self.layout
        if num_frames <= 0:
            raise ValueError(f"a chunk needs at least one frame, got {num_frames}")
        if not 0 < len(starts) <= self.batch_size:
            raise ValueError(f"a plan covers 1..{self.batch_size} rows of this cache, got {len(starts)}")
        active = tuple(s is not None for s in starts)
        firsts = tuple(0 if s is None else int(s) for s in starts)
        last = self._last
        if (last is not None and firsts == last.start_frames and active == last.active
                and num_frames == last.num_frames):
            return last
        for r, (s, on) in enumerate(zip(firsts, active)):
            if on and s != self.end_frames[r]:
                raise ValueError(
                    f"chunks must be streamed in order: row {r} of the cache holds frames up to "
                    f"{self.end_frames[r]}, got a chunk starting at frame {s}; call reset() to start a new stream")
            end = s + num_frames
            if num_frames > lay.ring_frames and end > lay.sink_frames:
                raise ValueError(f"a chunk of {num_frames} frames does not fit the cache ring of "
                                 f"{lay.ring_frames} frames; raise local_attn_size")
            if on and lay.global_attention and end > lay.capacity_frames:
                raise ValueError(
                    f"global attention cache holds {lay.capacity_frames} latent frames, the stream reached "
                    f"{end}: give the stream length up front, or use a rolling window (local_attn_size)")
        dev = self.device
        ends = [s + num_frames for s in firsts]
        kv_frames = [min(e, lay.capacity_frames) for e in ends]
        kv_lens = tuple(n * lay.tokens_per_frame for n in kv_frames)
        # One host-to-device copy per plan: starts, valid lengths and ends of every row.
        host = torch.tensor([list(firsts), list(kv_lens), ends], dtype=torch.int64).to(dev)  # [3, R]
        start, kv_len_tensor, end_t = host[0].unsqueeze(1), host[1], host[2].unsqueeze(1)  # [R, 1], [R], [R, 1]
        frames = start + torch.arange(num_frames, device=dev)  # [R, F], absolute frame indices
        write = lay.token_slots(frames)  # [R, F * T]
        if self.sink_decay < 1.0:
            self._fold_evicted_into_sinks(firsts, active, write)
        if self.position_mode == "absolute":
            query_pos, key_pos = frames, None
        else:
            offset = (end_t - lay.capacity_frames).clamp(min=0)  # ring positions shift down by the evictions
            query_pos = torch.where(frames < lay.sink_frames, frames, frames - offset)
            s_idx = torch.arange(max(kv_frames), device=dev).unsqueeze(0)  # [1, K] valid frame slots
            r_idx = s_idx - lay.sink_frames
            # the newest frame f < end stored in ring slot r: (f - S) % R == r
            newest = end_t - 1 - (end_t - 1 - lay.sink_frames - r_idx) % lay.ring_frames
            key_pos = torch.where(s_idx < lay.sink_frames, s_idx, newest - offset)  # [R, K]
        plan = ChunkPlan(firsts, num_frames, write, kv_lens, query_pos, key_pos, active, kv_len_tensor)
        for r, on in enumerate(active):
            if on:
                self.end_frames[r] = ends[r]
        self._last = plan
        return plan

    def _fold_evicted_into_sinks(self, starts: Sequence[int], active: Sequence[bool], write: Tensor) -> None:
        """EMA sinks (``sink_decay`` < 1, Reward Forcing's EMA-Sink): before a new chunk overwrites
        ring frames, each sink frame's keys/values (all layers) become ``decay * sink + (1 - decay)
        * evicted``, evicted frame i folded into sink frame i. Runs once per chunk, at its plan."""
        lay, d = self.layout, self.sink_decay
        sink_tokens = lay.sink_frames * lay.tokens_per_frame
        for r, (s, on) in enumerate(zip(starts, active)):
            if not on or s - lay.ring_frames < lay.sink_frames:
                continue  # no ring frame is evicted by this chunk
            evicted = write[r]  # [F * T] token slots of the frames this chunk evicts, oldest first
            if evicted.numel() != sink_tokens:
                raise ValueError(f"EMA sinks fold a chunk of {evicted.numel() // lay.tokens_per_frame} frames into "
                                 f"{lay.sink_frames} sink frames: they need chunks of sink_size frames")
            for buf in (self._k, self._v):
                old = buf[:, r].index_select(1, evicted)  # [L, S*T, H, D]
                buf[:, r, :sink_tokens].mul_(d).add_(old, alpha=1.0 - d)

    # ------------------------------------------------------------------ checks
    def check_compatible(self, batch_size: int, num_layers: int, num_heads: int, head_dim: int,
                         grid_hw: tuple[int, int], dtype: torch.dtype, *, rows: int | None = None) -> None:
        """Raise a clear error when this cache cannot serve a call with these properties
        (``rows``: the call covers that many leading rows of the cache; default all)."""
        rows = self.batch_size if rows is None else rows
        if batch_size != rows:
            raise ValueError(f"the KV cache was built for batch size {self.batch_size}, the input has "
                             f"batch size {batch_size}: build a cache with KVCache.for_model(..., "
                             f"batch_size={batch_size})" if rows == self.batch_size else
                             f"the chunk plan covers {rows} rows of the KV cache, the input has batch size "
                             f"{batch_size}")
        if (num_layers, num_heads, head_dim) != (self.num_layers, self.num_heads, self.head_dim):
            raise ValueError(f"the KV cache has (layers, heads, head_dim) = "
                             f"{(self.num_layers, self.num_heads, self.head_dim)}, the model has "
                             f"{(num_layers, num_heads, head_dim)}")
        if tuple(grid_hw) != tuple(self.layout.grid_hw):
            raise ValueError(f"the KV cache was built for a {self.layout.grid_hw} patch grid per frame, "
                             f"the input has {tuple(grid_hw)}: latent height/width differ from the "
                             f"streaming config")
        if dtype != self.dtype:
            raise ValueError(f"the KV cache holds {self.dtype}, the model computes in {dtype}")
