"""StreamingGenerator: prompt in, video frames out, chunk by chunk.

Stages of one stream (each a method, in this order):

1. ``_check_request``   — validate prompt / embeddings / lengths / seed / initial video;
2. ``_encode_prompt``   — text encoder (with its prompt cache) -> the DiT's cross-attention K/V;
3. ``_prepare``         — reset the KV cache and the streaming VAE decoder, seed the noise;
4. the per-chunk loop   — :func:`sf_sdk.sampling.denoise_chunk` (the same code training runs), then
   the streaming VAE decode of just that chunk;
5. frames are yielded as soon as they exist.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from sf_sdk.cache import KVCache
from sf_sdk.checkpoint import CheckpointError, load_into, load_state_dict, read_index
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

__all__ = ["StreamingGenerator", "VideoChunk", "Video", "ChunkTiming", "VideoStream", "register_backend",
           "video_frames_for_latents", "latent_frames_for_video"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class ChunkTiming:
    """Wall-clock seconds spent on one chunk (host clock, after the work finished)."""

    dit_s: float  # denoising steps + cache pass
    decode_s: float  # streaming VAE decode (0 when decode=False)

    @property
    def total_s(self) -> float:
        return self.dit_s + self.decode_s


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


def video_frames_for_latents(latent_frames: int, temporal_stride: int = 4) -> int:
    """Pixel frames decoded from ``latent_frames`` causal latent frames (1 + 4 (T - 1))."""
    return 0 if latent_frames <= 0 else 1 + temporal_stride * (latent_frames - 1)


def latent_frames_for_video(video_frames: int, temporal_stride: int = 4) -> int:
    if video_frames <= 0 or (video_frames - 1) % temporal_stride:
        raise ValueError(f"{video_frames} video frames is not 1 + {temporal_stride}k")
    return (video_frames - 1) // temporal_stride + 1


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
_BACKENDS: dict[str, BackendFactory] = {}
# Backends living in the export package, imported on first use.
_LAZY_BACKENDS = {
    "compile": "export.backends",
    "aoti": "export.backends",
    "onnxruntime": "export.backends",
    "tensorrt": "export.backends",
    "torch_tensorrt": "export.backends",
}


def register_backend(name: str, factory: BackendFactory) -> None:
    """Make ``StreamingGenerator(..., backend=name)`` build its backend with ``factory``."""
    _BACKENDS[name] = factory


def _eager_backend(gen: StreamingGenerator, options: dict[str, Any]) -> Backend:
    if options:
        raise ValueError(f"the eager backend takes no options, got {sorted(options)}")
    make = gen.vae.streaming_decoder if gen.vae is not None else None
    return Backend("eager", gen.dit, make)


register_backend("eager", _eager_backend)


def _resolve_backend(name: str) -> BackendFactory:
    if name not in _BACKENDS and name in _LAZY_BACKENDS:
        importlib.import_module(_LAZY_BACKENDS[name])
    if name not in _BACKENDS:
        known = sorted(set(_BACKENDS) | set(_LAZY_BACKENDS))
        raise ValueError(f"unknown backend {name!r}; choose one of {known}")
    return _BACKENDS[name]


# --------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------


def _parse_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here: use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: use 'cpu' or 'cuda'")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float64": torch.float64}


def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


class StreamingGenerator:
    """Streams video from a causal Wan DiT with a rolling KV cache and a streaming VAE decoder.

    Build it with :meth:`from_pretrained` (a model folder, a bundled model name such as
    ``"shapes-tiny"``) or :meth:`from_config` (random weights, for timing and tests).
    """

    def __init__(
        self,
        dit: WanDiT,
        streaming: StreamingConfig,
        *,
        vae: torch.nn.Module | None = None,
        text_encoder: Any | None = None,
        fps: int = 16,
        backend: str = "eager",
        backend_options: dict[str, Any] | None = None,
    ) -> None:
        self.dit = dit.eval()
        self.streaming = streaming
        self.vae = vae.eval() if vae is not None else None
        self.text_encoder = text_encoder
        self.fps = int(fps)
        self.steps = ChunkSchedule.from_config(streaming)
        if self.vae is not None and self.vae.config.z_dim != dit.config.in_dim:
            raise ValueError(f"VAE z_dim {self.vae.config.z_dim} != DiT in_dim {dit.config.in_dim}")
        self._cache: KVCache | None = None
        self._cache_key: tuple | None = None
        self.backend = _resolve_backend(backend)(self, dict(backend_options or {}))

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
    ) -> StreamingGenerator:
        """Load an sf-sdk model folder or a bundled model (``"shapes-tiny"``).

        ``streaming`` overrides fields of the saved streaming config (e.g.
        ``{"local_attn_size": 6, "num_frame_per_block": 1}``).
        """
        dev, dt = _parse_device(device), _parse_dtype(dtype)
        files = read_index(name_or_path)
        stream = files.streaming
        if isinstance(streaming, StreamingConfig):
            stream = streaming
        elif streaming:
            stream = from_dict(StreamingConfig, dict(streaming), base=stream)
        dit = _build(WanDiT, files.dit, files.path("dit.safetensors"), "DiT", dev, dt)
        vae = None
        if files.vae is not None:
            from sf_sdk.models.vae import WanVAE

            vae = _build(WanVAE, files.vae, files.path("vae.safetensors"), "VAE", dev, dt)
        text = None
        if load_text_encoder and files.text_encoder is not None:
            from sf_sdk.models.text import PromptTokenizer, TextEncoder, UMT5Encoder

            enc = _build(UMT5Encoder, files.text_encoder, files.path("text_encoder.safetensors"),
                         "text encoder", dev, torch.float32)
            tok = PromptTokenizer(files.path("tokenizer"), text_len=files.text_encoder.text_len)
            text = TextEncoder(enc, tok, device=dev, dtype=torch.float32)
        return cls(dit, stream, vae=vae, text_encoder=text, fps=int(files.extra.get("fps", 16)),
                   backend=backend, backend_options=backend_options)

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
        backend: str = "eager",
        backend_options: dict[str, Any] | None = None,
        tokenizer_dir: str | os.PathLike | None = None,
    ) -> StreamingGenerator:
        """Random-weight models from configs or preset names (for timing and tests)."""
        dev, dt = _parse_device(device), _parse_dtype(dtype)
        dcfg = DIT_PRESETS[dit] if isinstance(dit, str) else dit
        torch.manual_seed(seed)
        model = WanDiT(dcfg).to(dev, dt)
        vae_model = None
        if vae is not None:
            from sf_sdk.models.vae import WanVAE

            vcfg = VAE_PRESETS[vae] if isinstance(vae, str) else vae
            vae_model = WanVAE(vcfg).to(dev, dt)
        text = None
        if text_encoder is not None:
            from sf_sdk.models.text import PromptTokenizer, TextEncoder, UMT5Encoder

            tcfg = TEXT_PRESETS[text_encoder] if isinstance(text_encoder, str) else text_encoder
            if tokenizer_dir is None:
                raise ValueError("a text encoder needs tokenizer_dir (a Hugging Face tokenizer folder)")
            text = TextEncoder(UMT5Encoder(tcfg).to(dev), PromptTokenizer(tokenizer_dir, text_len=tcfg.text_len),
                               device=dev, dtype=torch.float32)
        return cls(model, streaming or StreamingConfig(), vae=vae_model, text_encoder=text,
                   backend=backend, backend_options=backend_options)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.dit.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.dit.dtype

    @property
    def temporal_stride(self) -> int:
        return self.vae.config.temporal_stride if self.vae is not None else 4

    @property
    def spatial_stride(self) -> int:
        return self.vae.config.spatial_stride if self.vae is not None else 8

    @property
    def frame_size(self) -> tuple[int, int]:
        """(height, width) of decoded frames."""
        s = self.spatial_stride
        return self.streaming.latent_height * s, self.streaming.latent_width * s

    def valid_num_frames(self, near: int, count: int = 2) -> list[int]:
        """Video frame counts this model can produce (whole chunks), around ``near``."""
        c = self.streaming.num_frame_per_block
        lat = max(c, math.ceil(latent_frames_for_video_safe(near, self.temporal_stride) / c) * c)
        cands = {video_frames_for_latents(x, self.temporal_stride) for x in (lat - c, lat, lat + c) if x > 0}
        return sorted(cands, key=lambda n: (abs(n - near), n))[:count]

    # ------------------------------------------------------------------ public API
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
        ``with`` block) to stop early. ``num_frames`` counts video frames (``None``: unbounded,
        needs a rolling window)."""
        req = self._check_request(prompt, prompt_embeds, num_frames, seed, decode, initial_latent,
                                  initial_frames)
        return VideoStream(self, req)

    def generate(self, prompt: str | None = None, *, num_frames: int, **kwargs: Any) -> Video:
        """Generate a whole video of ``num_frames`` video frames."""
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
    def _check_request(self, prompt, prompt_embeds, num_frames, seed, decode, initial_latent,
                       initial_frames) -> _Request:
        cfg = self.dit.config
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("give exactly one of prompt (a string) or prompt_embeds ([L, text_dim])")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
            if not prompt.strip():
                raise ValueError("prompt is empty: describe the video to generate")
            if self.text_encoder is None:
                raise ValueError("this model has no text encoder: pass prompt_embeds instead of a prompt")
        if prompt_embeds is not None:
            if not isinstance(prompt_embeds, Tensor) or not prompt_embeds.is_floating_point():
                raise ValueError("prompt_embeds must be a floating tensor [L, text_dim] or [1, L, text_dim]")
            if prompt_embeds.dim() == 3 and prompt_embeds.shape[0] == 1:
                prompt_embeds = prompt_embeds[0]
            if prompt_embeds.dim() != 2 or prompt_embeds.shape[1] != cfg.text_dim:
                raise ValueError(f"prompt_embeds must be [L, text_dim={cfg.text_dim}], got "
                                 f"{tuple(prompt_embeds.shape)}")
            if not 0 < prompt_embeds.shape[0] <= cfg.text_len:
                raise ValueError(f"prompt_embeds must have 1..{cfg.text_len} rows, got {prompt_embeds.shape[0]}")
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
            latent_total = latent_frames_for_video_safe(num_frames, self.temporal_stride)
            if not ok or latent_total % c:
                raise ValueError(f"{num_frames} video frames is not a whole number of chunks "
                                 f"({c} latent frames each); nearest valid: "
                                 f"{self.valid_num_frames(num_frames)}")
        elif not self.streaming.rolling:
            raise ValueError("unbounded streams need a rolling KV cache: pass num_frames, or load the model "
                             "with streaming={'local_attn_size': N} (latent frames)")
        init = self._initial_latents(initial_latent, initial_frames)
        if init is not None and latent_total is not None and init.shape[0] >= latent_total:
            raise ValueError(f"the initial video already has {init.shape[0]} latent frames, num_frames asks "
                             f"for {latent_total} in total")
        return _Request(prompt, prompt_embeds, latent_total, seed, decode, init)

    def _initial_latents(self, initial_latent, initial_frames) -> Tensor | None:
        if initial_latent is not None and initial_frames is not None:
            raise ValueError("give initial_latent or initial_frames, not both")
        cfg, st = self.dit.config, self.streaming
        c = st.num_frame_per_block
        if initial_frames is not None:
            if self.vae is None:
                raise ValueError("initial_frames needs a VAE; pass initial_latent instead")
            frames = torch.as_tensor(np.asarray(initial_frames))
            h, w = self.frame_size
            if frames.dim() != 4 or frames.shape[-1] != 3 or tuple(frames.shape[1:3]) != (h, w):
                raise ValueError(f"initial_frames must be uint8 [T, {h}, {w}, 3], got {tuple(frames.shape)}")
            if frames.dtype != torch.uint8:
                raise ValueError(f"initial_frames must be uint8, got {frames.dtype}")
            video = frames.permute(3, 0, 1, 2).unsqueeze(0).to(self.device, self.dtype) / 127.5 - 1
            with torch.no_grad():
                initial_latent = self.vae.normalize(self.vae.encode(video))[0].transpose(0, 1)  # [F, C, h, w]
        if initial_latent is None:
            return None
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
        return initial_latent.to(self.device, self.dtype)

    def _encode_prompt(self, req: _Request) -> CrossAttnCache:
        if req.prompt_embeds is not None:
            emb = req.prompt_embeds
        else:
            emb = self.text_encoder.encode(req.prompt)[0]  # [L, text_dim]
        with torch.no_grad():
            return self.dit.encode_context(emb.to(self.device, self.dtype).unsqueeze(0))

    def _kv_cache(self, latent_total: int | None) -> KVCache:
        frames = None if self.streaming.rolling else latent_total
        key = (frames, self.streaming)
        if self._cache is None or self._cache_key != key:
            self._cache = self.dit.new_cache(self.streaming, 1, num_frames=frames)
            self._cache_key = key
        self._cache.reset()
        return self._cache


def latent_frames_for_video_safe(video_frames: int, temporal_stride: int) -> int:
    """Latent frames covering ``video_frames`` (rounded down to the causal framing)."""
    return (max(video_frames, 1) - 1) // temporal_stride + 1


@dataclass
class _Request:
    prompt: str | None
    prompt_embeds: Tensor | None
    latent_frames: int | None
    seed: int
    decode: bool
    initial_latent: Tensor | None


class VideoStream:
    """An iterator of :class:`VideoChunk`; a context manager that stops the stream on exit."""

    def __init__(self, gen: StreamingGenerator, req: _Request) -> None:
        self._gen = gen
        self._req = req
        self._it: Iterator[VideoChunk] | None = None
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
        if self._it is None:
            self._it = self._run()
        try:
            chunk = next(self._it)
        except StopIteration:
            self.close()
            raise
        self.chunks_done += 1
        return chunk

    def close(self) -> None:
        """Stop the stream; the generator can start another one."""
        if self._it is not None:
            self._it.close()
        self.closed = True

    def _run(self) -> Iterator[VideoChunk]:
        gen, req = self._gen, self._req
        st, dev = gen.streaming, gen.device
        c = st.num_frame_per_block
        with torch.inference_mode():
            cross = gen._encode_prompt(req)
            cache = gen._kv_cache(req.latent_frames)
            decoder = gen.backend.make_decoder() if req.decode and gen.backend.make_decoder else None
            rng = torch.Generator(device=dev).manual_seed(req.seed)
            shape = (1, c, gen.dit.config.in_dim, st.latent_height, st.latent_width)
            index, start = 0, 0
            init = req.initial_latent
            while req.latent_frames is None or start < req.latent_frames:
                t0 = time.perf_counter()
                if init is not None and start < init.shape[0]:
                    latents = init[start:start + c].unsqueeze(0)  # [1, c, C, h, w]
                    tc = torch.full((1, c), gen.steps.context_noise, device=dev, dtype=gen.dtype)
                    gen.backend.dit.forward_chunk(latents, tc, cross, cache, start)
                    is_initial = True
                else:
                    noise = torch.randn(shape, generator=rng, device=dev, dtype=gen.dtype)
                    latents = denoise_chunk(gen.backend.dit, noise, cross, cache, start, gen.steps,
                                            generator=rng)
                    is_initial = False
                t1 = time.perf_counter()
                frames = None
                if decoder is not None:
                    pixels = decoder.decode(latents.transpose(1, 2))  # [1, 3, T, H, W]
                    frames = to_uint8(pixels)
                t2 = time.perf_counter()
                yield VideoChunk(index, start, latents[0], frames, ChunkTiming(t1 - t0, t2 - t1), is_initial)
                index += 1
                start += c


def _build(cls: type, cfg: Any, path: Path, what: str, device: torch.device, dtype: torch.dtype):
    """Build a module on the meta device and load weights straight into device/dtype."""
    if not path.is_file():
        raise CheckpointError(f"{what} weights {path} are missing from the model folder")
    with torch.device("meta"):
        module = cls(cfg)
    state = load_state_dict(path, device=device, dtype=dtype)
    load_into(module, state, what=what, config=cfg)
    # Non-persistent buffers (e.g. the VAE's latent statistics) are not in checkpoints: take them
    # from a real instance.
    meta_buffers = [name for name, buf in module.named_buffers() if buf.is_meta]
    if meta_buffers:
        real = dict(cls(cfg).named_buffers())
        for name in meta_buffers:
            owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            setattr(owner, name.rpartition(".")[2], real[name].to(device))
    return module.to(device).eval()

