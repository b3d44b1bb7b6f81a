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

Bookkeeping (``end_frame``) is plain Python ints on the host: the per-chunk path needs no
``.item()`` and no device synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sf_sdk.config import DiTConfig, StreamingConfig

__all__ = ["CacheLayout", "ChunkPlan", "KVCache", "frame_visibility"]


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

    def evicted(self, end_frame: int) -> int:
        """Number of non-sink frames evicted once frames ``[0, end_frame)`` were written."""
        return max(0, end_frame - self.capacity_frames)

    @classmethod
    def from_configs(cls, dit: DiTConfig, stream: StreamingConfig, num_frames: int | None = None
                     ) -> CacheLayout:
        _, ph, pw = dit.patch_size
        if stream.latent_height % ph or stream.latent_width % pw:
            raise ValueError(f"latent size {stream.latent_height}x{stream.latent_width} is not divisible "
                             f"by the patch size {ph}x{pw}")
        grid = (stream.latent_height // ph, stream.latent_width // pw)
        if stream.rolling:
            return cls(grid, stream.sink_size, stream.local_attn_size - stream.sink_size)
        frames = stream.global_cache_frames if num_frames is None else num_frames
        return cls(grid, 0, frames, global_attention=True)


@dataclass
class ChunkPlan:
    """Where one chunk goes in the cache and what it attends to.

    Indices are small device tensors built from host ints (no device-to-host transfer).

    A plan is made once per chunk and reused for all its calls (denoising steps and cache pass).
    """

    start_frame: int
    num_frames: int
    write_slots: Tensor  # [F * T] int64, token slots of the chunk
    kv_len: int  # valid prefix (tokens) after the chunk is written
    query_positions: Tensor  # [F] int64, rotary frame position of each chunk frame
    key_positions: Tensor | None  # [kv_len / T] int64 (cache_relative): position of each valid frame slot


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
        shape = (num_layers, batch_size, layout.capacity, num_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, cap, H, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, cap, H, D]
        self.end_frame = 0  # frames [0, end_frame) have been written
        self._last: ChunkPlan | None = None
        self._slot_base = torch.arange(layout.tokens_per_frame, device=device)  # [T]

    @classmethod
    def for_model(cls, dit: DiTConfig, stream: StreamingConfig, batch_size: int, *,
                  num_frames: int | None = None, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> KVCache:
        layout = CacheLayout.from_configs(dit, stream, num_frames)
        return cls(layout, dit.num_layers, batch_size, dit.num_heads, dit.head_dim, dtype=dtype,
                   device=device, position_mode=stream.position_mode)

    # ------------------------------------------------------------------ state
    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def reset(self) -> None:
        """Forget every frame (buffers are kept; stale slots are never read)."""
        self.end_frame = 0
        self._last = None

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    # ------------------------------------------------------------------ planning
    def plan_chunk(self, start_frame: int, num_frames: int) -> ChunkPlan:
        """Reserve slots for frames ``[start_frame, start_frame + num_frames)``.

        A chunk is either the next one (``start_frame == end_frame``) or the last one again
        (same start and length: its slots are overwritten). Anything else is an error.
        """
        lay = self.layout
        if num_frames <= 0:
            raise ValueError(f"a chunk needs at least one frame, got {num_frames}")
        last = self._last
        if last is not None and start_frame == last.start_frame and num_frames == last.num_frames:
            return last
        if start_frame != self.end_frame:
            raise ValueError(
                f"chunks must be streamed in order: the cache holds frames up to {self.end_frame}, "
                f"got a chunk starting at frame {start_frame}; call reset() to start a new stream")
        end = start_frame + num_frames
        if num_frames > lay.ring_frames and end > lay.sink_frames:
            raise ValueError(f"a chunk of {num_frames} frames does not fit the cache ring of "
                             f"{lay.ring_frames} frames; raise local_attn_size")
        if lay.global_attention and end > lay.capacity_frames:
            raise ValueError(
                f"global attention cache holds {lay.capacity_frames} latent frames, the stream reached "
                f"{end}: give the stream length up front, or use a rolling window (local_attn_size)")
        dev = self.device
        frames = torch.arange(start_frame, end, device=dev)  # [F], absolute frame indices
        slots = torch.where(frames < lay.sink_frames, frames,
                            lay.sink_frames + (frames - lay.sink_frames) % lay.ring_frames)  # [F]
        write = (slots.unsqueeze(1) * lay.tokens_per_frame + self._slot_base).reshape(-1)  # [F * T]
        kv_frames = min(end, lay.capacity_frames)
        if self.position_mode == "absolute":
            query_pos, key_pos = frames, None
        else:
            offset = lay.evicted(end)  # ring positions shift down by the evicted frame count
            query_pos = torch.where(frames < lay.sink_frames, frames, frames - offset)
            s = torch.arange(kv_frames, device=dev)  # valid frame slots
            r = s - lay.sink_frames
            # the newest frame f < end stored in ring slot r: (f - S) % R == r
            newest = end - 1 - (end - 1 - lay.sink_frames - r) % lay.ring_frames
            key_pos = torch.where(s < lay.sink_frames, s, newest - offset)
        plan = ChunkPlan(start_frame, num_frames, write, kv_frames * lay.tokens_per_frame, query_pos, key_pos)
        self.end_frame = end
        self._last = plan
        return plan

    # ------------------------------------------------------------------ checks
    def check_compatible(self, batch_size: int, num_layers: int, num_heads: int, head_dim: int,
                         grid_hw: tuple[int, int], dtype: torch.dtype) -> None:
        """Raise a clear error when this cache cannot serve a call with these properties."""
        if batch_size != self.batch_size:
            raise ValueError(f"the KV cache was built for batch size {self.batch_size}, the input has "
                             f"batch size {batch_size}: build a cache with KVCache.for_model(..., "
                             f"batch_size={batch_size})")
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
