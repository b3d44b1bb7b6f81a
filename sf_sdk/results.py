"""What a stream gives back: chunks, whole videos, their timings, and the frame arithmetic of a
causal video VAE (``1 + stride (T - 1)`` video frames from ``T`` latent frames)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["ChunkTiming", "VideoChunk", "Video", "video_frames_for_latents", "latent_frames_for_video",
           "latent_frames_floor", "to_uint8", "Clock", "DEFAULT_TEMPORAL_STRIDE", "DEFAULT_SPATIAL_STRIDE"]

# Without a VAE (latents only), frames are counted with the Wan2.1 VAE's strides.
DEFAULT_TEMPORAL_STRIDE = 4
DEFAULT_SPATIAL_STRIDE = 8


class ChunkTiming:
    """Seconds one chunk spent in the DiT (denoising steps + cache pass) and in the VAE decode
    (including the copy of the uint8 frames to the host; 0 when ``decode=False``).

    On the CPU these are host-clock readings taken after the work. On CUDA they come from CUDA
    events recorded around the work and are resolved when first read, which waits for the chunk's
    work to finish: streaming itself never synchronizes for timing.
    """

    def __init__(self, dit_s: float = 0.0, decode_s: float = 0.0, *,
                 events: tuple[Any, ...] | None = None, decode_share: float = 1.0) -> None:
        self._dit_s = dit_s
        self._decode_s = decode_s * (decode_share if events is None else 1.0)
        self._events = events
        self._share = decode_share  # the part of a batched decode pass that is this stream's

    def _resolve(self) -> None:
        if self._events is not None:
            start, mid, *rest = self._events  # (start, mid, end) or (start, mid, decode start, end)
            decode_start, end = (mid, rest[0]) if len(rest) == 1 else rest
            end.synchronize()
            self._dit_s = start.elapsed_time(mid) / 1e3
            self._decode_s = decode_start.elapsed_time(end) / 1e3 * self._share
            self._events = None

    @property
    def dit_s(self) -> float:
        self._resolve()
        return self._dit_s

    @property
    def decode_s(self) -> float:
        self._resolve()
        return self._decode_s

    @property
    def total_s(self) -> float:
        return self.dit_s + self.decode_s

    def __repr__(self) -> str:
        return f"ChunkTiming(dit_s={self.dit_s:.4f}, decode_s={self.decode_s:.4f})"


class Clock:
    """Marks around a chunk's stages: host clock on the CPU, CUDA events on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def timing(self, start: Any, mid: Any, end: Any, decode_start: Any = None, decode_share: float = 1.0
               ) -> ChunkTiming:
        """DiT from ``start`` to ``mid``; decode from ``decode_start`` (default ``mid``) to ``end``,
        of which ``decode_share`` is this stream's (a decode pass batched over several streams)."""
        decode_start = mid if decode_start is None else decode_start
        if self.cuda:
            return ChunkTiming(events=(start, mid, decode_start, end), decode_share=decode_share)
        return ChunkTiming(mid - start, end - decode_start, decode_share=decode_share)


@dataclass
class VideoChunk:
    """One streamed chunk."""

    index: int
    start_frame: int  # first latent frame of the chunk
    latents: Tensor  # [F, C, h, w], normalized VAE latents
    frames: np.ndarray | None  # uint8 [T, H, W, 3] (None when decode=False)
    timing: ChunkTiming
    is_initial: bool = False  # True for chunks that replay a given initial video/latent


@dataclass
class Video:
    """A whole generated video."""

    frames: np.ndarray | None  # uint8 [T, H, W, 3]
    latents: Tensor  # [F, C, h, w]
    fps: int
    timings: list[ChunkTiming]


def video_frames_for_latents(latent_frames: int, temporal_stride: int = DEFAULT_TEMPORAL_STRIDE) -> int:
    """Pixel frames decoded from ``latent_frames`` causal latent frames (1 + 4 (T - 1))."""
    return 0 if latent_frames <= 0 else 1 + temporal_stride * (latent_frames - 1)


def latent_frames_for_video(video_frames: int, temporal_stride: int = DEFAULT_TEMPORAL_STRIDE) -> int:
    """Latent frames of a causal video of ``video_frames`` = 1 + 4k frames."""
    if video_frames <= 0 or (video_frames - 1) % temporal_stride:
        raise ValueError(f"{video_frames} video frames is not 1 + {temporal_stride}k")
    return (video_frames - 1) // temporal_stride + 1


def latent_frames_floor(video_frames: int, temporal_stride: int) -> int:
    """Latent frames whose decode fits in ``video_frames`` (at least 1)."""
    return (max(video_frames, 1) - 1) // temporal_stride + 1


def to_uint8(video: Tensor) -> np.ndarray:
    """[B=1, 3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    x = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [3, T, H, W]
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()
