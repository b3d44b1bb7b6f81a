"""StreamingGenerator: prompt in, video frames out, chunk by chunk.

Stages of one stream (each a method, in this order):

1. ``_check_request``   — validate prompt / embeddings / lengths / seed / initial video;
2. ``_encode_prompt``   — text encoder (with its prompt cache) -> the DiT's cross-attention K/V;
3. ``_kv_cache``        — reset the KV cache; a fresh streaming VAE decoder; seed the noise;
4. the per-chunk loop   — :func:`sf_sdk.sampling.denoise_chunk` (the same code training runs), then
   the streaming VAE decode of just that chunk;
5. frames are yielded as soon as they exist.

A generator holds one KV cache, so one stream runs at a time: starting a stream supersedes the
previous one (which then raises if iterated again). Grad mode is only switched off while a chunk
is computed, never across a ``yield``, so the caller's code between chunks runs in its own mode.

Backends: ``backend="eager"`` runs the PyTorch modules; other names (``compile``, ``aoti``,
``onnxruntime``, ``tensorrt``, ``torch_tensorrt``) are provided by the ``export`` package and
registered under the same API (:func:`register_backend`).
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from sf_sdk.cache import KVCache
from sf_sdk.checkpoint import DEFAULT_FPS, LoadedModel, load_pretrained, resolve_dtype
from sf_sdk.config import (
    DIT_PRESETS,
    TEXT_PRESETS,
    VAE_PRESETS,
    DiTConfig,
    StreamingConfig,
    TextEncoderConfig,
    VAEConfig,
    from_dict,
)
from sf_sdk.models.dit import CrossAttnCache, WanDiT
from sf_sdk.sampling import ChunkModel, ChunkSchedule, denoise_chunk

__all__ = ["StreamingGenerator", "VideoChunk", "Video", "ChunkTiming", "VideoStream", "Backend",
           "register_backend", "backend_names", "backend_status", "video_frames_for_latents",
           "latent_frames_for_video", "cpu_threads"]

log = logging.getLogger(__name__)

# Without a VAE (latents only), frames are counted with the Wan2.1 VAE's strides.
DEFAULT_TEMPORAL_STRIDE = 4
DEFAULT_SPATIAL_STRIDE = 8


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


class ChunkTiming:
    """Seconds one chunk spent in the DiT (denoising steps + cache pass) and in the VAE decode
    (including the copy of the uint8 frames to the host; 0 when ``decode=False``).

    On the CPU these are host-clock readings taken after the work. On CUDA they come from CUDA
    events recorded around the work and are resolved when first read, which waits for the chunk's
    work to finish: streaming itself never synchronizes for timing.
    """

    def __init__(self, dit_s: float = 0.0, decode_s: float = 0.0, *,
                 events: tuple[Any, Any, Any] | None = None) -> None:
        self._dit_s = dit_s
        self._decode_s = decode_s
        self._events = events

    def _resolve(self) -> None:
        if self._events is not None:
            start, mid, end = self._events
            end.synchronize()
            self._dit_s = start.elapsed_time(mid) / 1e3
            self._decode_s = mid.elapsed_time(end) / 1e3
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


class _Clock:
    """Marks around a chunk's stages: host clock on the CPU, CUDA events on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def timing(self, start: Any, mid: Any, end: Any) -> ChunkTiming:
        if self.cuda:
            return ChunkTiming(events=(start, mid, end))
        return ChunkTiming(mid - start, end - mid)


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


@contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU thread count set to ``threads`` (None: left as it is) inside the block, the
    caller's count back after it (for command-line mains that may run in a longer-lived process)."""
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _latent_frames_floor(video_frames: int, temporal_stride: int) -> int:
    """Latent frames whose decode fits in ``video_frames`` (at least 1)."""
    return (max(video_frames, 1) - 1) // temporal_stride + 1


def to_uint8(video: Tensor) -> np.ndarray:
    """[B=1, 3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    x = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [3, T, H, W]
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


class Decoder(Protocol):
    def decode(self, z: Tensor) -> Tensor: ...

    def reset(self) -> None: ...


@dataclass
class Backend:
    """What the streaming loop runs: a chunk model and a streaming decoder factory."""

    name: str
    dit: ChunkModel
    make_decoder: Callable[[], Decoder] | None


BackendFactory = Callable[["StreamingGenerator", dict[str, Any]], Backend]
# Returns None when the backend can run here, else the reason it cannot.
AvailabilityCheck = Callable[[], "str | None"]
_BACKENDS: dict[str, BackendFactory] = {}
_AVAILABLE: dict[str, AvailabilityCheck] = {}
# Backends living in the export package, imported on first use.
_LAZY_BACKENDS = {
    "compile": "export.backends",
    "aoti": "export.backends",
    "onnxruntime": "export.backends",
    "tensorrt": "export.backends",
    "torch_tensorrt": "export.backends",
}
_import_errors: dict[str, str] = {}


def register_backend(name: str, factory: BackendFactory, *, available: AvailabilityCheck | None = None
                     ) -> None:
    """Make ``StreamingGenerator(..., backend=name)`` build its backend with ``factory``.

    ``available`` (optional) returns None when the backend can run on this machine, else the
    reason it cannot (e.g. "tensorrt is not installed"); benchmarks use it to skip backends.
    """
    _BACKENDS[name] = factory
    if available is not None:
        _AVAILABLE[name] = available
    else:
        _AVAILABLE.pop(name, None)


def _eager_backend(gen: StreamingGenerator, options: dict[str, Any]) -> Backend:
    if options:
        raise ValueError(f"the eager backend takes no options, got {sorted(options)}")
    make = gen.vae.streaming_decoder if gen.vae is not None else None
    return Backend("eager", gen.dit, make)


register_backend("eager", _eager_backend)


def _import_backend_module(name: str) -> None:
    module = _LAZY_BACKENDS.get(name)
    if name in _BACKENDS or module is None or module in _import_errors:
        return
    try:
        importlib.import_module(module)
    except ImportError as exc:
        _import_errors[module] = f"{module} cannot be imported ({exc})"


def backend_names() -> list[str]:
    """Every backend name: registered ones and the ones the export package provides."""
    for name in _LAZY_BACKENDS:
        _import_backend_module(name)
    return ["eager"] + sorted((set(_BACKENDS) | set(_LAZY_BACKENDS)) - {"eager"})


def backend_status(name: str) -> str | None:
    """None when backend ``name`` can run here, else the reason it cannot."""
    _import_backend_module(name)
    if name not in _BACKENDS:
        module = _LAZY_BACKENDS.get(name)
        if module is None:
            return f"unknown backend {name!r}"
        return _import_errors.get(module, f"{module} does not register {name!r}")
    check = _AVAILABLE.get(name)
    if check is None:
        return None
    try:
        return check()
    except Exception as exc:  # an availability probe must not break listing
        return f"availability check failed: {type(exc).__name__}: {exc}"


def _resolve_backend(name: str) -> BackendFactory:
    _import_backend_module(name)
    if name not in _BACKENDS:
        reason = backend_status(name)
        known = sorted(set(_BACKENDS) | set(_LAZY_BACKENDS))
        raise ValueError(f"backend {name!r} is not available ({reason}); choose one of {known}")
    return _BACKENDS[name]


# --------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------


def _parse_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: use 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available here: use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return dev


def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    return resolve_dtype(dtype)


class StreamingGenerator:
    """Streams video from a causal Wan DiT with a rolling KV cache and a streaming VAE decoder.

    Build it with :meth:`from_pretrained` (one of our model folders, a bundled model name such
    as ``"shapes-tiny"``, or the official ``self_forcing_dmd.pt`` with its Wan folder) or
    :meth:`from_config` (random weights, for timing and tests).
    """

    def __init__(
        self,
        dit: WanDiT,
        streaming: StreamingConfig,
        *,
        vae: torch.nn.Module | None = None,
        text_encoder: Any | None = None,
        fps: int = DEFAULT_FPS,
        backend: str = "eager",
        backend_options: dict[str, Any] | None = None,
    ) -> None:
        self.dit = dit.eval()
        self.streaming = streaming
        self.vae = vae.eval() if vae is not None else None
        self.text_encoder = text_encoder
        self.fps = int(fps)
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.steps = ChunkSchedule.from_config(streaming)
        if self.vae is not None and self.vae.config.z_dim != dit.config.in_dim:
            raise ValueError(f"VAE z_dim {self.vae.config.z_dim} != DiT in_dim {dit.config.in_dim}")
        _, ph, pw = dit.config.patch_size
        if streaming.latent_height % ph or streaming.latent_width % pw:
            raise ValueError(f"latent size {streaming.latent_height}x{streaming.latent_width} is not "
                             f"divisible by the DiT patch size {ph}x{pw}: change latent_height/latent_width")
        self._cache: KVCache | None = None
        self._cache_key: tuple | None = None
        self._active: VideoStream | None = None
        self.backend = Backend("none", dit, None)
        self.use_backend(backend, backend_options)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        streaming: dict[str, Any] | StreamingConfig | None = None,
        backend: str = "eager",
        backend_options: dict[str, Any] | None = None,
        load_text_encoder: bool = True,
        text_dtype: str | torch.dtype | None = None,
        wan_dir: str | os.PathLike | None = None,
        use_ema: bool = True,
        dit_config: DiTConfig | None = None,
        vae_config: VAEConfig | None = None,
        text_config: TextEncoderConfig | None = None,
    ) -> StreamingGenerator:
        """Load a model: one of our folders, a bundled name, or an official checkpoint.

        Official: the ``self_forcing_dmd.pt`` file with ``wan_dir=`` (the ``Wan2.1-T2V-1.3B``
        folder; found automatically beside the file), or a folder holding both. ``use_ema``
        picks ``generator_ema`` over ``generator``; ``dit_config`` / ``vae_config`` /
        ``text_config`` describe official-layout files of other shapes.

        ``streaming`` overrides fields of the saved streaming config (e.g.
        ``{"local_attn_size": 6, "num_frame_per_block": 1}``). ``text_dtype`` (default: ``dtype``)
        is the text encoder's dtype.
        """
        dev, dt = _parse_device(device), _parse_dtype(dtype)
        loaded = load_pretrained(name_or_path, device=dev, dtype=dt, text_dtype=text_dtype,
                                 load_text_encoder=load_text_encoder, wan_dir=wan_dir, use_ema=use_ema,
                                 dit_config=dit_config, vae_config=vae_config, text_config=text_config)
        return cls.from_loaded(loaded, streaming=streaming, backend=backend, backend_options=backend_options)

    @classmethod
    def from_loaded(
        cls,
        loaded: LoadedModel,
        *,
        streaming: dict[str, Any] | StreamingConfig | None = None,
        backend: str = "eager",
        backend_options: dict[str, Any] | None = None,
    ) -> StreamingGenerator:
        """A generator over components loaded by :func:`sf_sdk.checkpoint.load_pretrained`."""
        stream = _override_streaming(loaded.streaming, streaming)
        text = None
        if loaded.text_encoder is not None:
            from sf_sdk.models.text import PromptTokenizer, TextEncoder

            tok = PromptTokenizer(loaded.tokenizer_dir, text_len=loaded.text_config.text_len)
            text = TextEncoder(loaded.text_encoder, tok)
        return cls(loaded.dit, stream, vae=loaded.vae, text_encoder=text, fps=loaded.fps, backend=backend,
                   backend_options=backend_options)

    @classmethod
    def from_config(
        cls,
        dit: DiTConfig | str = "tiny",
        streaming: StreamingConfig | None = None,
        *,
        vae: VAEConfig | str | None = None,
        text_encoder: TextEncoderConfig | str | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        seed: int = 0,
        fps: int = DEFAULT_FPS,
        backend: str = "eager",
        backend_options: dict[str, Any] | None = None,
        tokenizer_dir: str | os.PathLike | None = None,
    ) -> StreamingGenerator:
        """Random-weight models from configs or preset names (for timing and tests)."""
        dev, dt = _parse_device(device), _parse_dtype(dtype)
        dcfg = _preset(DIT_PRESETS, dit, "DiT")
        torch.manual_seed(seed)
        model = WanDiT(dcfg).to(dev, dt)
        vae_model = None
        if vae is not None:
            from sf_sdk.models.vae import WanVAE

            vae_model = WanVAE(_preset(VAE_PRESETS, vae, "VAE")).to(dev, dt)
        text = None
        if text_encoder is not None:
            from sf_sdk.models.text import PromptTokenizer, TextEncoder, UMT5Encoder

            tcfg = _preset(TEXT_PRESETS, text_encoder, "text encoder")
            if tokenizer_dir is None:
                raise ValueError("a text encoder needs tokenizer_dir (a Hugging Face tokenizer folder)")
            text = TextEncoder(UMT5Encoder(tcfg).to(dev), PromptTokenizer(tokenizer_dir, text_len=tcfg.text_len),
                               device=dev, dtype=torch.float32)
        return cls(model, streaming or StreamingConfig(), vae=vae_model, text_encoder=text, fps=fps,
                   backend=backend, backend_options=backend_options)

    def use_backend(self, name: str, options: dict[str, Any] | None = None) -> None:
        """Run later streams on backend ``name`` (``"eager"``, or one from the export package)."""
        backend = _resolve_backend(name)(self, dict(options or {}))
        self._close_active()
        self.backend = backend

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.dit.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.dit.dtype

    @property
    def temporal_stride(self) -> int:
        return self.vae.config.temporal_stride if self.vae is not None else DEFAULT_TEMPORAL_STRIDE

    @property
    def spatial_stride(self) -> int:
        return self.vae.config.spatial_stride if self.vae is not None else DEFAULT_SPATIAL_STRIDE

    @property
    def frame_size(self) -> tuple[int, int]:
        """(height, width) of decoded frames."""
        s = self.spatial_stride
        return self.streaming.latent_height * s, self.streaming.latent_width * s

    @property
    def chunk_frames(self) -> int:
        """Video frames of every chunk after the first (the first has ``1 + stride (c - 1)``)."""
        return self.temporal_stride * self.streaming.num_frame_per_block

    def valid_num_frames(self, near: int, count: int = 2) -> list[int]:
        """Video frame counts this model can produce (whole chunks), nearest to ``near``."""
        c = self.streaming.num_frame_per_block
        lat = max(c, math.ceil(_latent_frames_floor(near, self.temporal_stride) / c) * c)
        cands = {video_frames_for_latents(x, self.temporal_stride) for x in (lat - c, lat, lat + c) if x > 0}
        return sorted(cands, key=lambda n: (abs(n - near), n))[:count]

    def round_up_frames(self, num_frames: int) -> int:
        """The smallest valid video frame count (whole chunks) that is at least ``num_frames``."""
        c, s = self.streaming.num_frame_per_block, self.temporal_stride
        latents = 1 + math.ceil((max(num_frames, 1) - 1) / s)
        return video_frames_for_latents(math.ceil(latents / c) * c, s)

    # ------------------------------------------------------------------ public API
    def encode_prompt(self, prompt: str) -> Tensor:
        """The prompt's text embedding [L, text_dim] (what ``prompt_embeds`` takes)."""
        if self.text_encoder is None:
            raise ValueError("this model has no text encoder: pass prompt_embeds instead of a prompt")
        self._check_prompt(prompt)
        with torch.inference_mode():
            return self.text_encoder.encode(prompt)[0]

    def stream(
        self,
        prompt: str | None = None,
        *,
        prompt_embeds: Tensor | None = None,
        num_frames: int | None = None,
        seed: int = 0,
        decode: bool = True,
        initial_latent: Tensor | None = None,
        initial_frames: np.ndarray | Tensor | None = None,
    ) -> VideoStream:
        """Start a stream. Iterate it for :class:`VideoChunk` objects; ``close()`` (or leave its
        ``with`` block) to stop early. ``num_frames`` counts video frames, initial ones included
        (``None``: unbounded, needs a rolling window). ``initial_latent`` [F, C, h, w] (normalized)
        or ``initial_frames`` uint8 [T, H, W, 3] extend a given video: its chunks come first,
        unchanged, then the stream continues from it."""
        req = self._check_request(prompt, prompt_embeds, num_frames, seed, decode, initial_latent,
                                  initial_frames)
        return VideoStream(self, req)

    def generate(self, prompt: str | None = None, *, num_frames: int, **kwargs: Any) -> Video:
        """Generate a whole video of ``num_frames`` video frames (see :meth:`stream`)."""
        if num_frames is None:
            raise ValueError("generate() needs num_frames; use stream() for unbounded video")
        chunks: list[VideoChunk] = []
        with self.stream(prompt, num_frames=num_frames, **kwargs) as s:
            chunks.extend(s)
        frames = None
        if chunks and chunks[0].frames is not None:
            frames = np.concatenate([c.frames for c in chunks], axis=0)
        latents = torch.cat([c.latents for c in chunks], dim=0)
        return Video(frames, latents, self.fps, [c.timing for c in chunks])

    # ------------------------------------------------------------------ stages
    def _check_prompt(self, prompt: Any) -> None:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError("prompt is empty: describe the video to generate")

    def _check_request(self, prompt, prompt_embeds, num_frames, seed, decode, initial_latent,
                       initial_frames) -> _Request:
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("give exactly one of prompt (a string) or prompt_embeds ([L, text_dim])")
        if prompt is not None:
            self._check_prompt(prompt)
            if self.text_encoder is None:
                raise ValueError("this model has no text encoder: pass prompt_embeds instead of a prompt")
        if prompt_embeds is not None:
            prompt_embeds = self._check_embeds(prompt_embeds)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if decode and self.vae is None:
            raise ValueError("this model has no VAE: stream with decode=False to get latents")
        c = self.streaming.num_frame_per_block
        latent_total = None
        if num_frames is not None:
            if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames <= 0:
                raise ValueError(f"num_frames must be a positive int (video frames) or None, got {num_frames!r}")
            ok = (num_frames - 1) % self.temporal_stride == 0
            latent_total = _latent_frames_floor(num_frames, self.temporal_stride)
            if not ok or latent_total % c:
                raise ValueError(f"{num_frames} video frames is not a whole number of chunks "
                                 f"({c} latent frames = {self.chunk_frames} video frames each, the first "
                                 f"chunk {video_frames_for_latents(c, self.temporal_stride)}); nearest valid: "
                                 f"{self.valid_num_frames(num_frames)}")
        elif not self.streaming.rolling:
            raise ValueError("unbounded streams need a rolling KV cache: pass num_frames, or load the model "
                             "with streaming={'local_attn_size': N} (latent frames)")
        init, init_frames = self._initial_latents(initial_latent, initial_frames)
        if init is not None and latent_total is not None and init.shape[0] >= latent_total:
            raise ValueError(f"the initial video already has {init.shape[0]} latent frames "
                             f"({video_frames_for_latents(init.shape[0], self.temporal_stride)} video frames); "
                             f"num_frames = {num_frames} asks for {latent_total} in total: ask for more")
        return _Request(prompt, prompt_embeds, latent_total, seed, decode, init, init_frames)

    def _check_embeds(self, embeds: Any) -> Tensor:
        cfg = self.dit.config
        if not isinstance(embeds, Tensor) or not embeds.is_floating_point():
            raise ValueError("prompt_embeds must be a floating tensor [L, text_dim] or [1, L, text_dim]")
        if embeds.dim() == 3 and embeds.shape[0] == 1:
            embeds = embeds[0]
        if embeds.dim() != 2 or embeds.shape[1] != cfg.text_dim:
            raise ValueError(f"prompt_embeds must be [L, text_dim={cfg.text_dim}] (or [1, L, {cfg.text_dim}]), "
                             f"got {tuple(embeds.shape)}")
        if not 0 < embeds.shape[0] <= cfg.text_len:
            raise ValueError(f"prompt_embeds must have 1..{cfg.text_len} rows (text_len), got {embeds.shape[0]}")
        if not torch.isfinite(embeds).all():
            raise ValueError("prompt_embeds contains NaN or infinite values")
        return embeds

    def _initial_latents(self, initial_latent, initial_frames) -> tuple[Tensor | None, np.ndarray | None]:
        if initial_latent is not None and initial_frames is not None:
            raise ValueError("give initial_latent or initial_frames, not both")
        cfg, st = self.dit.config, self.streaming
        c = st.num_frame_per_block
        kept_frames = None
        if initial_frames is not None:
            if self.vae is None:
                raise ValueError("initial_frames needs a VAE; pass initial_latent instead")
            frames = torch.as_tensor(np.asarray(initial_frames.cpu() if isinstance(initial_frames, Tensor)
                                                else initial_frames))
            h, w = self.frame_size
            if frames.dim() != 4 or frames.shape[-1] != 3 or tuple(frames.shape[1:3]) != (h, w):
                raise ValueError(f"initial_frames must be uint8 [T, {h}, {w}, 3], got {tuple(frames.shape)}")
            if frames.dtype != torch.uint8:
                raise ValueError(f"initial_frames must be uint8, got {frames.dtype}")
            t, s = frames.shape[0], self.temporal_stride
            latents = _latent_frames_floor(t, s)
            if (t - 1) % s or latents % c:
                valid = [n for n in self.valid_num_frames(t, 3) if n >= 1]
                raise ValueError(f"initial_frames has {t} frames; it must be whole chunks of {c} latent frames "
                                 f"(1 + {s}k video frames): trim or extend it to one of {valid}")
            kept_frames = frames.numpy()
            video = frames.permute(3, 0, 1, 2).unsqueeze(0).to(self.device, self.dtype) / 127.5 - 1  # [1, 3, T, H, W]
            with torch.inference_mode():
                initial_latent = self.vae.normalize(self.vae.encode(video))[0].transpose(0, 1)  # [F, C, h, w]
        if initial_latent is None:
            return None, None
        if not isinstance(initial_latent, Tensor) or not initial_latent.is_floating_point():
            raise ValueError("initial_latent must be a floating tensor [F, C, h, w]")
        if initial_latent.dim() == 5 and initial_latent.shape[0] == 1:
            initial_latent = initial_latent[0]
        shape = (cfg.in_dim, st.latent_height, st.latent_width)
        if initial_latent.dim() != 4 or tuple(initial_latent.shape[1:]) != shape:
            raise ValueError(f"initial_latent must be [F, {shape[0]}, {shape[1]}, {shape[2]}] normalized "
                             f"latents, got {tuple(initial_latent.shape)}")
        if initial_latent.shape[0] % c:
            raise ValueError(f"the initial video has {initial_latent.shape[0]} latent frames, not a multiple of "
                             f"the chunk size {c}: trim or extend it (video frames 1 + 4k with k+1 a multiple "
                             f"of {c})")
        return initial_latent.to(self.device, self.dtype), kept_frames

    def _encode_prompt(self, req: _Request) -> CrossAttnCache:
        emb = req.prompt_embeds if req.prompt_embeds is not None else self.text_encoder.encode(req.prompt)[0]
        return self.dit.encode_context(emb.to(self.device, self.dtype).unsqueeze(0))  # K/V [L, 1, Lt, H, D]

    def _kv_cache(self, latent_total: int | None) -> KVCache:
        frames = None if self.streaming.rolling else latent_total
        key = (frames, self.streaming, self.dtype, self.device)
        if self._cache is None or self._cache_key != key:
            self._cache = self.dit.new_cache(self.streaming, 1, num_frames=frames)
            self._cache_key = key
        self._cache.reset()
        return self._cache

    def _cache_pass(self, clean: Tensor, cross: CrossAttnCache, cache: KVCache, start: int,
                    rng: torch.Generator) -> None:
        """Write a given (initial) chunk into the cache, as denoise_chunk's cache pass does."""
        b, f = clean.shape[:2]
        tc = torch.full((b, f), self.steps.context_noise, device=clean.device, dtype=clean.dtype)
        if self.steps.context_noise > 0:
            fresh = torch.randn(clean.shape, generator=rng, device=clean.device, dtype=clean.dtype)
            clean = self.steps.schedule.add_noise(clean, fresh, tc)
        self.backend.dit.forward_chunk(clean, tc, cross, cache, start)

    def _activate(self, stream: VideoStream) -> None:
        if self._active is not None and self._active is not stream and not self._active.closed:
            log.debug("a new stream supersedes the running one (they share the KV cache)")
            self._active._superseded = True
        self._active = stream

    def _close_active(self) -> None:
        if self._active is not None:
            self._active.close()
            self._active = None


@dataclass
class _Request:
    prompt: str | None
    prompt_embeds: Tensor | None
    latent_frames: int | None
    seed: int
    decode: bool
    initial_latent: Tensor | None
    initial_frames: np.ndarray | None  # uint8 [T, H, W, 3], returned as-is for the initial chunks


class VideoStream:
    """An iterator of :class:`VideoChunk`; a context manager that stops the stream on exit.

    Each chunk is computed when it is asked for. Starting another stream on the same generator
    supersedes this one (they share the KV cache): iterating it afterwards raises RuntimeError.
    """

    def __init__(self, gen: StreamingGenerator, req: _Request) -> None:
        self._gen = gen
        self._req = req
        self._it: Iterator[VideoChunk] | None = None
        self._superseded = False
        self.chunks_done = 0
        self.closed = False

    def __enter__(self) -> VideoStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> VideoStream:
        return self

    def __next__(self) -> VideoChunk:
        if self.closed:
            raise StopIteration
        if self._superseded:
            raise RuntimeError("this stream was superseded by a newer stream of the same generator (one KV "
                               "cache per generator): finish or close a stream before starting the next")
        if self._it is None:
            self._gen._activate(self)
            self._it = self._run()
        try:
            chunk = next(self._it)
        except BaseException:
            self.close()
            raise
        self.chunks_done += 1
        return chunk

    def close(self) -> None:
        """Stop the stream; the generator can start another one."""
        if self._it is not None:
            self._it.close()
        self.closed = True
        if self._gen._active is self:
            self._gen._active = None

    def _run(self) -> Iterator[VideoChunk]:
        gen, req = self._gen, self._req
        st, dev = gen.streaming, gen.device
        c = st.num_frame_per_block
        s = gen.temporal_stride
        clock = _Clock(dev)
        with torch.inference_mode():
            cross = gen._encode_prompt(req)
            cache = gen._kv_cache(req.latent_frames)
            decoder = gen.backend.make_decoder() if req.decode and gen.backend.make_decoder else None
            rng = torch.Generator(device=dev).manual_seed(req.seed)
        shape = (1, c, gen.dit.config.in_dim, st.latent_height, st.latent_width)
        init = req.initial_latent
        index, start = 0, 0
        while req.latent_frames is None or start < req.latent_frames:
            # Grad mode is switched off per chunk, never across the yield below.
            with torch.inference_mode():
                t0 = clock.mark()
                is_initial = init is not None and start < init.shape[0]
                if is_initial:
                    latents = init[start:start + c].unsqueeze(0)  # [1, c, C, h, w]
                    gen._cache_pass(latents, cross, cache, start, rng)
                else:
                    noise = torch.randn(shape, generator=rng, device=dev, dtype=gen.dtype)
                    latents = denoise_chunk(gen.backend.dit, noise, cross, cache, start, gen.steps,
                                            generator=rng)
                t1 = clock.mark()
                frames = None
                if decoder is not None:
                    pixels = decoder.decode(latents.transpose(1, 2))  # [1, 3, T, H, W]
                    frames = to_uint8(pixels)
                    if is_initial and req.initial_frames is not None:
                        first = video_frames_for_latents(start, s)
                        frames = req.initial_frames[first:first + frames.shape[0]]  # the given frames, as given
                t2 = clock.mark()
            yield VideoChunk(index, start, latents[0], frames, clock.timing(t0, t1, t2), is_initial)
            index += 1
            start += c


def _preset(presets: dict[str, Any], value: Any, what: str) -> Any:
    if not isinstance(value, str):
        return value
    if value not in presets:
        raise ValueError(f"unknown {what} preset {value!r}; choose one of {sorted(presets)}")
    return presets[value]


def _override_streaming(base: StreamingConfig, streaming: dict[str, Any] | StreamingConfig | None
                        ) -> StreamingConfig:
    if isinstance(streaming, StreamingConfig):
        return streaming
    if streaming:
        return from_dict(StreamingConfig, dict(streaming), base=base)
    return base
