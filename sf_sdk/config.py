"""Typed configuration for every model and for streaming.

Every default lives here, once. Configs are frozen dataclasses validated in ``__post_init__``;
presets are built with :func:`dataclasses.replace` and looked up by name. YAML / Hydra / CLI
layers only override fields of these classes (see :func:`from_dict`, which rejects unknown keys).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union

__all__ = [
    "DiTConfig",
    "StreamingConfig",
    "VAEConfig",
    "TextEncoderConfig",
    "DIT_PRESETS",
    "VAE_PRESETS",
    "TEXT_PRESETS",
    "STREAMING_PRESETS",
    "WAN_LATENTS_MEAN",
    "WAN_LATENTS_STD",
    "from_dict",
    "to_dict",
    "check_fields",
    "check_value",
]

T = TypeVar("T")


def _positive(name: str, value: int | float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


# --------------------------------------------------------------------------------------------
# Field types
# --------------------------------------------------------------------------------------------


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def check_value(tp: Any, value: Any, name: str) -> Any:
    """``value`` checked against the annotation ``tp``, in the form the field stores.

    ``bool`` takes only bools; ``int`` takes ints (not bools); ``float`` takes finite ints and
    floats (NaN and infinities are errors: they pass every range check and end as black frames);
    ``tuple[X, ...]`` / ``tuple[X, Y]`` take a list or tuple of such values (returned as a
    tuple); ``Literal[...]`` one of its values; ``X | None`` None or an X; a dataclass type an
    instance of it. Other annotations (``Any``) are not checked. Raises ``ValueError`` naming
    ``name``, the value and the expected type.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def bad(expected: str) -> ValueError:
        return ValueError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")

    if tp is bool:
        if not isinstance(value, bool):
            raise bad("a bool (true or false)")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise bad("an int")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise bad("a number")
        if not math.isfinite(value):
            raise bad("a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if origin is Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            raise bad(f"one of {list(args)}")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        errors = []
        for kind in kinds:
            try:
                return check_value(kind, value, name)
            except ValueError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise bad(" or ".join(_type_name(k) for k in kinds) + (" or None" if type(None) in args else ""))
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise bad(f"a list of {_type_name(args[0]) if args else 'values'}")
        if len(args) == 2 and args[1] is Ellipsis:
            kinds = [args[0]] * len(value)
        else:
            if len(value) != len(args):
                raise bad(f"a list of {len(args)} values ({', '.join(_type_name(a) for a in args)})")
            kinds = list(args)
        return tuple(check_value(k, v, f"{name}[{i}]") for i, (k, v) in enumerate(zip(kinds, value)))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, tp):
            raise bad(f"a {tp.__name__}")
        return value
    return value


def check_fields(cfg: Any) -> None:
    """Check every field of the dataclass ``cfg`` against its declared type (:func:`check_value`),
    storing the checked form (lists as tuples, ints of float fields as floats). Called first in
    ``__post_init__``, so fields added later are covered without more code."""
    hints = _field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        checked = check_value(hints[f.name], value, f"{type(cfg).__name__}.{f.name}")
        if checked is not value:
            object.__setattr__(cfg, f.name, checked)


# --------------------------------------------------------------------------------------------
# DiT
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiTConfig:
    """The Wan2.1 diffusion transformer. Field names follow the official constructor."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_dim: int = 16
    out_dim: int = 16
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "freq_dim",
                     "text_dim", "text_len"):
            _positive(name, getattr(self, name))
        if len(self.patch_size) != 3 or min(self.patch_size) <= 0:
            raise ValueError(f"patch_size must be three positive ints (t, h, w), got {self.patch_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = dim / num_heads must be even for RoPE, got {self.head_dim}")
        if self.head_dim < 6:
            raise ValueError(f"head_dim must be at least 6 for the 3-axis RoPE, got {self.head_dim}")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even, got {self.freq_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_axis_dims(self) -> tuple[int, int, int]:
        """Head-dim channels given to the (frame, height, width) rotary axes."""
        d = self.head_dim
        return (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch_size)


DIT_PRESETS: dict[str, DiTConfig] = {
    "wan2.1-t2v-1.3b": DiTConfig(),
    # Same shape as the official-implementation reference tensors in ../shared/golden.
    "tiny": DiTConfig(dim=96, ffn_dim=192, num_heads=4, num_layers=2, freq_dim=32, text_dim=32,
                      text_len=16),
    # Mid-size shapes for CPU benchmarks: the real width and heads, few layers.
    "mid": DiTConfig(num_layers=2),
}


# --------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------

PositionMode = Literal["absolute", "cache_relative"]


@dataclass(frozen=True)
class StreamingConfig:
    """How a causal DiT is streamed: chunking, denoising schedule and the KV cache window.

    ``local_attn_size`` is the attention window in latent frames *including* the chunk being
    denoised and the sink frames (the official meaning); ``-1`` means global attention over
    every generated frame, which needs a known stream length (the cache capacity).
    """

    num_frame_per_block: int = 3
    denoising_step_list: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    warp_denoising_step: bool = True
    timestep_shift: float = 5.0
    num_train_timesteps: int = 1000
    local_attn_size: int = -1
    sink_size: int = 0
    context_noise: float = 0.0
    position_mode: PositionMode = "absolute"
    # Latent geometry of the stream (pixels = latent * VAE stride).
    latent_height: int = 60
    latent_width: int = 104
    # Cache capacity in latent frames for global attention (local_attn_size == -1) when the
    # stream length is not given; the official code fixes 21 frames.
    global_cache_frames: int = 21
    # The first chunk's own denoising steps (warped like denoising_step_list); () = the same
    # steps as every chunk. Causal Forcing++'s 1- and 2-step models denoise their first frame
    # in the 4 steps [1000, 750, 500, 250] (their ``denoising_step_list_first_chunk``).
    first_chunk_steps: tuple[float, ...] = ()
    # How sink frames are formed. 1.0: the sinks are the stream's first sink_size frames, kept
    # as they are. Below 1 (Reward Forcing's EMA-Sink, 0.999): whenever a chunk evicts ring
    # frames, the sinks' cached keys/values become sink_decay * sinks + (1 - sink_decay) *
    # evicted, frame by frame; needs sink_size == num_frame_per_block, a ring of whole chunks
    # and position_mode "cache_relative" (keys cached before the rotary embedding).
    sink_decay: float = 1.0
    # The official independent_first_frame layout: latent frame 0 is a chunk of its own (denoised
    # alone, or the image of image-to-video), then chunks of num_frame_per_block: [1, c, c, ...].
    independent_first_frame: bool = False
    # A prompt switch's re-cache (transition="recache"): True re-encodes the sinks and the ring
    # under the new prompt, block-causally; False (LongLive's global_sink) keeps the sinks' keys and
    # values and re-encodes the ring frames only, attending to the sinks and to each other unmasked.
    recache_sinks: bool = True
    # Rolling Forcing's joint denoising window, in chunks. 1: each chunk is denoised alone, step by
    # step, then written to the cache (Self Forcing). N > 1 (one chunk per denoising step, so N ==
    # len(denoising_step_list)): N consecutive chunks are denoised together in one DiT call, the
    # oldest at the last step and the newest at the first; after each call every chunk moves one step
    # on (re-noised to its next timestep) and the oldest, now clean, leaves the window into the cache.
    # The window attends to itself without a mask, and to the cached sinks and as many recent cached
    # frames as local_attn_size leaves beside it (see sf_sdk.cache.window_visibility).
    denoise_window: int = 1

    def __post_init__(self) -> None:
        check_fields(self)
        _positive("num_frame_per_block", self.num_frame_per_block)
        _positive("num_train_timesteps", self.num_train_timesteps)
        _positive("timestep_shift", self.timestep_shift)
        _positive("latent_height", self.latent_height)
        _positive("latent_width", self.latent_width)
        _positive("global_cache_frames", self.global_cache_frames)
        if not self.denoising_step_list:
            raise ValueError("denoising_step_list must hold at least one timestep")
        steps = self.denoising_step_list
        if any(not 0 < t <= self.num_train_timesteps for t in steps):
            raise ValueError(f"denoising_step_list values must lie in (0, {self.num_train_timesteps}], "
                             f"got {steps}")
        if any(a <= b for a, b in zip(steps, steps[1:])):
            raise ValueError(f"denoising_step_list must be strictly decreasing, got {steps}")
        object.__setattr__(self, "first_chunk_steps", tuple(float(t) for t in self.first_chunk_steps))
        first = self.first_chunk_steps
        if any(not 0 < t <= self.num_train_timesteps for t in first) or any(a <= b for a, b in zip(first, first[1:])):
            raise ValueError(f"first_chunk_steps must be strictly decreasing values in (0, "
                             f"{self.num_train_timesteps}] (or () for the same steps as every chunk), got {first}")
        if not 0 <= self.context_noise < self.num_train_timesteps:
            raise ValueError(f"context_noise must lie in [0, {self.num_train_timesteps}), "
                             f"got {self.context_noise}")
        if self.sink_size < 0:
            raise ValueError(f"sink_size must be >= 0, got {self.sink_size}")
        if self.position_mode not in ("absolute", "cache_relative"):
            raise ValueError(f"position_mode must be 'absolute' or 'cache_relative', "
                             f"got {self.position_mode!r}")
        if self.local_attn_size == -1:
            if self.sink_size:
                raise ValueError("sink_size needs a rolling window: set local_attn_size (frames) too")
        else:
            if self.local_attn_size <= 0:
                raise ValueError(f"local_attn_size must be -1 (global) or a positive number of "
                                 f"latent frames, got {self.local_attn_size}")
            ring = self.local_attn_size - self.sink_size
            if ring < self.num_frame_per_block:
                raise ValueError(
                    f"local_attn_size ({self.local_attn_size}) minus sink_size ({self.sink_size}) "
                    f"leaves {ring} rolling frames, fewer than one chunk "
                    f"({self.num_frame_per_block} frames): raise local_attn_size or lower sink_size")
        if not 0.0 <= self.sink_decay <= 1.0:
            raise ValueError(f"sink_decay must lie in [0, 1] (1: fixed sinks), got {self.sink_decay}")
        if self.sink_decay < 1.0:
            c = self.num_frame_per_block
            if self.sink_size != c or (self.local_attn_size - self.sink_size) % c:
                raise ValueError(f"sink_decay < 1 (EMA sinks) folds each evicted chunk into the sinks: it needs "
                                 f"sink_size == num_frame_per_block ({c}) and a ring of whole chunks "
                                 f"(local_attn_size - sink_size a multiple of {c}), got sink_size "
                                 f"{self.sink_size}, local_attn_size {self.local_attn_size}")
            if self.position_mode != "cache_relative":
                raise ValueError("sink_decay < 1 (EMA sinks) averages cached keys of different frames: it needs "
                                 "position_mode='cache_relative' (keys cached before the rotary embedding)")
            if self.independent_first_frame:
                raise ValueError("sink_decay < 1 (EMA sinks) folds whole chunks into the sinks: it cannot be combined "
                                 "with independent_first_frame (a first chunk of one frame)")
        self._check_denoise_window()

    def _check_denoise_window(self) -> None:
        n = self.denoise_window
        if n < 1:
            raise ValueError(f"denoise_window must be >= 1 (chunks denoised jointly; 1: one chunk at a time), got {n}")
        if n == 1:
            return
        if n != self.num_steps:
            raise ValueError(f"denoise_window={n} holds one chunk per denoising step (Rolling Forcing), so it must equal "
                             f"len(denoising_step_list) = {self.num_steps}: set denoise_window={self.num_steps}, or "
                             f"give {n} denoising steps")
        unsupported = {"first_chunk_steps": self.first_chunk_steps != (),
                       "independent_first_frame": self.independent_first_frame,
                       "sink_decay < 1": self.sink_decay < 1.0}
        bad = [name for name, on in unsupported.items() if on]
        if bad:
            raise ValueError(f"denoise_window > 1 (Rolling Forcing's joint window) moves every chunk of the window "
                             f"one step per call, in chunks of num_frame_per_block frames: it does not support "
                             f"{', '.join(bad)}; use denoise_window=1 with them")
        frames = n * self.num_frame_per_block
        if self.rolling and self.local_attn_size - self.sink_size < frames:
            raise ValueError(f"the joint window of {n} chunks ({frames} latent frames) must fit in the attention window "
                             f"beside the sinks: local_attn_size ({self.local_attn_size}) - sink_size ({self.sink_size}) "
                             f"< {frames}; raise local_attn_size to at least {frames + self.sink_size}")

    @property
    def rolling(self) -> bool:
        return self.local_attn_size != -1

    @property
    def num_steps(self) -> int:
        return len(self.denoising_step_list)

    @property
    def window_frames(self) -> int:
        """Latent frames of a full joint denoising window (``denoise_window`` chunks)."""
        return self.denoise_window * self.num_frame_per_block

    @property
    def first_chunk_frames(self) -> int:
        """Latent frames of a stream's first chunk: 1 with independent_first_frame, else a chunk."""
        return 1 if self.independent_first_frame else self.num_frame_per_block

    def whole_chunks(self, latent_frames: int) -> bool:
        """Whether ``latent_frames`` is a whole number of chunks (the first one included)."""
        first = self.first_chunk_frames
        return latent_frames >= first and (latent_frames - first) % self.num_frame_per_block == 0


STREAMING_PRESETS: dict[str, StreamingConfig] = {
    "chunkwise": StreamingConfig(),
    "framewise": StreamingConfig(num_frame_per_block=1),
}


# --------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------

# The published Wan2.1 latent statistics (per latent channel).
WAN_LATENTS_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN_LATENTS_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)


@dataclass(frozen=True)
class VAEConfig:
    """The Wan2.1 causal video VAE. Field names follow the official constructor
    (``temperal_downsample`` keeps the official spelling)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = WAN_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN_LATENTS_STD
    # Not in Wan2.1 (whose decoder has the encoder's width): the decoder's base width when it
    # differs from ``dim``; None = ``dim``. A wider decoder over the same encoder keeps the latents.
    decoder_dim: int | None = None

    def __post_init__(self) -> None:
        check_fields(self)
        _positive("dim", self.dim)
        if self.decoder_dim is not None:
            _positive("decoder_dim", self.decoder_dim)
        _positive("z_dim", self.z_dim)
        _positive("num_res_blocks", self.num_res_blocks)
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temperal_downsample needs len(dim_mult) - 1 = {len(self.dim_mult) - 1} "
                             f"entries, got {len(self.temperal_downsample)}")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean and latents_std need z_dim = {self.z_dim} values each, got "
                             f"{len(self.latents_mean)} and {len(self.latents_std)}")
        if min(self.latents_std) <= 0:
            raise ValueError("latents_std values must be positive")

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(bool(t) for t in self.temperal_downsample)


VAE_PRESETS: dict[str, VAEConfig] = {
    "wan2.1": VAEConfig(),
    "tiny": VAEConfig(dim=8),
}


# --------------------------------------------------------------------------------------------
# Text encoder
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextEncoderConfig:
    """The umT5 encoder in Wan's checkpoint layout.

    ``num_buckets`` relative-position buckets are split between keys before and after the
    query (bidirectional); half of each side is exact distances, the rest log-spaced up to
    ``max_distance`` (T5's ``relative_attention_max_distance``, 128 in every released T5).
    ``shared_pos=False`` (umT5) gives every layer its own bucket table.
    """

    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    shared_pos: bool = False
    dropout: float = 0.0
    text_len: int = 512
    eps: float = 1e-6
    max_distance: int = 128

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("vocab", "dim", "dim_attn", "dim_ffn", "num_heads", "num_layers", "num_buckets",
                     "text_len", "eps"):
            _positive(name, getattr(self, name))
        if self.dim_attn % self.num_heads:
            raise ValueError(f"dim_attn ({self.dim_attn}) must be divisible by num_heads "
                             f"({self.num_heads})")
        if self.num_buckets < 4:
            raise ValueError(f"num_buckets must be at least 4 (two directions, each with exact and "
                             f"log-spaced buckets), got {self.num_buckets}")
        if self.max_distance <= self.num_buckets // 4:
            raise ValueError(f"max_distance ({self.max_distance}) must exceed the exact-bucket range "
                             f"num_buckets // 4 = {self.num_buckets // 4}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")


TEXT_PRESETS: dict[str, TextEncoderConfig] = {
    "umt5-xxl": TextEncoderConfig(),
    "tiny": TextEncoderConfig(vocab=101, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2,
                              text_len=16),
}


# --------------------------------------------------------------------------------------------
# Dict round trip (for JSON / YAML / Hydra overrides)
# --------------------------------------------------------------------------------------------


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    out = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def from_dict(cls: type[T], data: dict[str, Any], *, base: T | None = None, source: str | os.PathLike | None = None
              ) -> T:
    """Build ``cls`` from ``data``, starting from ``base`` (or the defaults).

    Unknown keys are an error, never silently dropped; values are checked against the field
    types (:func:`check_fields`). ``source`` (the file ``data`` was read from) starts every error.
    """
    try:
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__} must be a mapping of its fields, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid keys are {sorted(names)}")
        start = base if base is not None else cls()
        return dataclasses.replace(start, **data)  # type: ignore[type-var]
    except (TypeError, ValueError) as exc:
        if source is None:
            raise
        raise ValueError(f"{source}: {exc}") from exc

