"""StreamingGenerator: prompt in, video frames out, chunk by chunk.

Stages of one stream (each a method, in this order):

1. ``_check_request``   — validate prompt / embeddings / lengths / seed / initial video;
2. ``_padded_embeds``   — text encoder -> the prompt embedding (its cross-attention K/V per chunk);
3. the stream's pool    — a :class:`~sf_sdk.pool.StreamPool` of one (its KV cache kept between
   streams), a fresh streaming VAE decoder and noise generator per stream;
4. the per-chunk step   — :func:`sf_sdk.sampling.denoise_chunk` and :func:`~sf_sdk.sampling.cache_pass`
   (the code training runs), then the streaming VAE decode of just that chunk;
5. frames are yielded as soon as they exist (:mod:`sf_sdk.stream`).

One stream at a time per :meth:`StreamingGenerator.stream` (starting a stream supersedes an
unfinished one); many at once, batched, through :meth:`StreamingGenerator.pool`.

Backends (:mod:`sf_sdk.backends`): ``backend="auto"`` (the default, :mod:`export.auto`) runs
each component on the fastest backend measured for the device, exported on first use into an
artifact cache; ``backend="eager"`` runs the PyTorch modules; other names (``compile``, ``aoti``,
``onnxruntime``, ``tensorrt``, ``torch_tensorrt``) are provided by the ``export`` package and
registered under the same API (:func:`register_backend`). Results are in :mod:`sf_sdk.results`.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sf_sdk.backends import (
    DEFAULT_BACKEND,
    Backend,
    backend_names,
    backend_status,
    register_backend,
    resolve_backend,
)
from sf_sdk.checkpoint import BUNDLED_MODELS, DEFAULT_FPS, LoadedModel, load_pretrained, resolve_dtype
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
from sf_sdk.models.dit import WanDiT
from sf_sdk.pool import PooledStream, StreamPool, StreamRequest
from sf_sdk.precision import choose_dtype, is_auto
from sf_sdk.results import (
    DEFAULT_SPATIAL_STRIDE,
    DEFAULT_TEMPORAL_STRIDE,
    ChunkTiming,
    Video,
    VideoChunk,
    latent_frames_floor,
    latent_frames_for_video,
    to_uint8,
    video_frames_for_latents,
)
from sf_sdk.sampling import ChunkSchedule
from sf_sdk.stream import VideoStream

__all__ = ["StreamingGenerator", "VideoChunk", "Video", "ChunkTiming", "VideoStream", "StreamPool", "PooledStream",
           "Backend", "register_backend", "backend_names", "backend_status", "video_frames_for_latents",
           "latent_frames_for_video", "cpu_threads", "to_uint8", "DEFAULT_TEMPORAL_STRIDE",
           "DEFAULT_SPATIAL_STRIDE"]

log = logging.getLogger(__name__)

# The largest decoder pass (pixel frames x height x width) the CPU decodes a chunk in at once.
CPU_DECODE_PASS_PIXELS = 1 << 20


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


def _auto_dtype(cfg: DiTConfig, stream: StreamingConfig, device: torch.device, backend: str,
                backend_options: dict[str, Any] | None) -> torch.dtype:
    """``dtype="auto"`` (sf_sdk.precision), logged with its reason."""
    choice = choose_dtype(cfg, stream, device, backend=backend, backend_options=backend_options)
    log.info("dtype auto: %s (%s)", str(choice.dtype).removeprefix("torch."), choice.why)
    return choice.dtype


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
        backend: str = DEFAULT_BACKEND,
        backend_options: dict[str, Any] | None = None,
        tiny_decoder: torch.nn.Module | None = None,
        decoder: str = "wan",
    ) -> None:
        self.dit = dit.eval().use_cpu_matmul_layout()
        self.streaming = streaming
        self.vae = vae.eval() if vae is not None else None
        self.text_encoder = text_encoder
        self.fps = int(fps)
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.steps = ChunkSchedule.from_config(streaming)
        if self.vae is not None and self.vae.config.z_dim != dit.config.in_dim:
            raise ValueError(f"VAE z_dim {self.vae.config.z_dim} != DiT in_dim {dit.config.in_dim}")
        self.tiny_decoder = tiny_decoder.eval() if tiny_decoder is not None else None
        self.decoder = _check_decoder(decoder, self.tiny_decoder, self.vae, dit)
        _, ph, pw = dit.config.patch_size
        if streaming.latent_height % ph or streaming.latent_width % pw:
            raise ValueError(f"latent size {streaming.latent_height}x{streaming.latent_width} is not "
                             f"divisible by the DiT patch size {ph}x{pw}: change latent_height/latent_width")
        self._solo: StreamPool | None = None  # the pool of one that stream() runs in
        self._solo_key: tuple | None = None
        self._active: VideoStream | None = None
        # Held while a stream() chunk is computed and while a stream starts: streams of one generator
        # used from several threads never interleave inside a chunk (the newest supersedes the others
        # between chunks; they raise at their next chunk). Many streams at once: pool().
        self._lock = threading.RLock()
        self._vae_float32: tuple[torch.nn.Module, torch.nn.Module] | None = None  # image encoding (I2V)
        self.backend = Backend("none", dit, None)
        self.use_backend(backend, backend_options)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "auto",
        streaming: dict[str, Any] | StreamingConfig | None = None,
        backend: str = DEFAULT_BACKEND,
        backend_options: dict[str, Any] | None = None,
        load_text_encoder: bool = True,
        text_dtype: str | torch.dtype | None = None,
        wan_dir: str | os.PathLike | None = None,
        use_ema: bool | None = None,
        dit_config: DiTConfig | None = None,
        vae_config: VAEConfig | None = None,
        text_config: TextEncoderConfig | None = None,
        decoder: str = "wan",
        decoder_path: str | os.PathLike | None = None,
        family: str | None = None,
        lora: str | os.PathLike | None = None,
        lora_scale: float = 1.0,
    ) -> StreamingGenerator:
        """Load a model: one of our folders, a bundled name, or an official checkpoint.

        Official: the ``self_forcing_dmd.pt`` file with ``wan_dir=`` (the ``Wan2.1-T2V-1.3B``
        folder; found automatically beside the file), or a folder holding both. ``use_ema``
        picks ``generator_ema`` over ``generator``; ``dit_config`` / ``vae_config`` /
        ``text_config`` describe official-layout files of other shapes.

        The Self-Forcing family (Causal Forcing(++), LongLive, Reward Forcing) loads the same way,
        each with its authors' streaming defaults: the member comes from the released file name, or
        ``family=`` (:data:`sf_sdk.checkpoint.FAMILIES`; see docs/models.md). ``use_ema=None``
        reads the weights its authors' inference reads. ``lora`` (a PEFT / LongLive LoRA; LongLive's
        is found beside its base) is merged into the DiT weights at load, times ``lora_scale``.

        ``decoder="tiny"`` decodes with the model folder's tiny streaming decoder (TAEHV,
        :mod:`sf_sdk.models.taehv`) instead of the Wan VAE decoder, or with the TAEHV file
        ``decoder_path`` (``taew2_1.pth`` / ``.safetensors`` for the released Self-Forcing
        checkpoints, whose latents are Wan2.1's).

        ``streaming`` overrides fields of the saved streaming config (e.g.
        ``{"local_attn_size": 6, "num_frame_per_block": 1}``). ``dtype="auto"`` (the default) is
        bfloat16 where it is measured faster (CUDA; CPUs with AMX for DiTs big enough to be
        matmul-bound) and float32 otherwise (:mod:`sf_sdk.precision`; logged with its reason).
        ``text_dtype`` (default: ``dtype``) is the text encoder's dtype.
        """
        dev = _parse_device(device)
        auto = is_auto(dtype)
        dt = torch.float32 if auto else _parse_dtype(dtype)  # auto: load in float32, then decide
        loaded = load_pretrained(name_or_path, device=dev, dtype=dt, text_dtype=text_dtype,
                                 load_text_encoder=load_text_encoder, wan_dir=wan_dir, use_ema=use_ema,
                                 dit_config=dit_config, vae_config=vae_config, text_config=text_config,
                                 family=family, lora=lora, lora_scale=lora_scale)
        if auto:
            dt = _auto_dtype(loaded.dit_config, _override_streaming(loaded.streaming, streaming), dev, backend,
                             backend_options)
            if dt != torch.float32:
                loaded.dit.to(dt)
                if loaded.vae is not None:
                    loaded.vae.to(dt)
                if loaded.text_encoder is not None and text_dtype is None:
                    loaded.text_encoder.to(dt)
        tiny = _load_tiny_decoder(name_or_path, decoder, decoder_path, dev, dt)
        return cls.from_loaded(loaded, streaming=streaming, backend=backend, backend_options=backend_options,
                               decoder=decoder, tiny_decoder=tiny)

    @classmethod
    def from_loaded(
        cls,
        loaded: LoadedModel,
        *,
        streaming: dict[str, Any] | StreamingConfig | None = None,
        backend: str = DEFAULT_BACKEND,
        backend_options: dict[str, Any] | None = None,
        decoder: str = "wan",
        tiny_decoder: torch.nn.Module | None = None,
    ) -> StreamingGenerator:
        """A generator over components loaded by :func:`sf_sdk.checkpoint.load_pretrained`
        (``decoder="tiny"`` needs ``tiny_decoder``, see :func:`sf_sdk.checkpoint.taehv.load_taehv`)."""
        stream = _override_streaming(loaded.streaming, streaming)
        text = None
        if loaded.text_encoder is not None:
            from sf_sdk.models.text import PromptTokenizer, TextEncoder

            tok = PromptTokenizer(loaded.tokenizer_dir, text_len=loaded.text_config.text_len)
            text = TextEncoder(loaded.text_encoder, tok)
        return cls(loaded.dit, stream, vae=loaded.vae, text_encoder=text, fps=loaded.fps, backend=backend,
                   backend_options=backend_options, tiny_decoder=tiny_decoder, decoder=decoder)

    @classmethod
    def from_config(
        cls,
        dit: DiTConfig | str = "tiny",
        streaming: StreamingConfig | None = None,
        *,
        vae: VAEConfig | str | None = None,
        text_encoder: TextEncoderConfig | str | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "auto",
        seed: int = 0,
        fps: int = DEFAULT_FPS,
        backend: str = DEFAULT_BACKEND,
        backend_options: dict[str, Any] | None = None,
        tokenizer_dir: str | os.PathLike | None = None,
        tiny_decoder: Any | None = None,
        decoder: str = "wan",
    ) -> StreamingGenerator:
        """Random-weight models from configs or preset names (for timing and tests); ``tiny_decoder``
        a :class:`~sf_sdk.models.taehv.TAEHVConfig` or preset name (``decoder="tiny"`` decodes with it)."""
        dev = _parse_device(device)
        dcfg = _preset(DIT_PRESETS, dit, "DiT")
        dt = (_auto_dtype(dcfg, streaming or StreamingConfig(), dev, backend, backend_options) if is_auto(dtype)
              else _parse_dtype(dtype))
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
        tiny = None
        if tiny_decoder is not None:
            from sf_sdk.models.taehv import TAEHV_PRESETS, TAEHVDecoder

            tiny = TAEHVDecoder(_preset(TAEHV_PRESETS, tiny_decoder, "tiny decoder")).to(dev, dt)
        return cls(model, streaming or StreamingConfig(), vae=vae_model, text_encoder=text, fps=fps,
                   backend=backend, backend_options=backend_options, tiny_decoder=tiny, decoder=decoder)

    def make_streaming_decoder(self) -> Any:
        """A fresh eager streaming decoder of the chosen ``decoder`` (None without one)."""
        if self.decoder == "tiny":
            return self.tiny_decoder.streaming_decoder()
        return self.vae.streaming_decoder(latents_per_pass=self.decode_latents_per_pass) if self.vae is not None \
            else None

    @property
    def decode_latents_per_pass(self) -> int:
        """Latent frames per pass of the eager Wan VAE decoder: a whole chunk on the CPU while one
        pass stays small (its pixels at most ``CPU_DECODE_PASS_PIXELS``: shapes-tiny decodes 1.3-1.55x
        faster than frame by frame, 2.5e-6 apart; docs/performance.md), else one latent frame per
        pass, the official decode, whose activations are a chunk's third."""
        c = self.streaming.num_frame_per_block
        h, w = self.frame_size
        if self.device.type == "cpu" and h * w * self.temporal_stride * c <= CPU_DECODE_PASS_PIXELS:
            return c
        return 1

    def use_backend(self, name: str, options: dict[str, Any] | None = None) -> None:
        """Run later streams on backend ``name`` (``"auto"``, ``"eager"``, or one from the export package)."""
        backend = resolve_backend(name)(self, dict(options or {}))
        if self.decoder == "tiny" and backend.name != "eager" and backend.components is None:
            backend.make_decoder = _tiny_backend_decoder(self, backend, dict(options or {}))
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
        c, f = self.streaming.num_frame_per_block, self.streaming.first_chunk_frames
        lat = f + max(0, math.ceil((latent_frames_floor(near, self.temporal_stride) - f) / c) * c)
        cands = {video_frames_for_latents(x, self.temporal_stride) for x in (lat - c, lat, lat + c) if x >= f}
        return sorted(cands, key=lambda n: (abs(n - near), n))[:count]

    def round_up_frames(self, num_frames: int) -> int:
        """The smallest valid video frame count (whole chunks) that is at least ``num_frames``."""
        c, s, f = self.streaming.num_frame_per_block, self.temporal_stride, self.streaming.first_chunk_frames
        latents = 1 + math.ceil((max(num_frames, 1) - 1) / s)
        return video_frames_for_latents(f + max(0, math.ceil((latents - f) / c)) * c, s)

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
        image: str | os.PathLike | np.ndarray | Tensor | None = None,
    ) -> VideoStream:
        """Start a stream. Iterate it for :class:`VideoChunk` objects; ``close()`` (or leave its
        ``with`` block) to stop early. ``num_frames`` counts video frames, initial ones included
        (``None``: unbounded, needs a rolling window). ``initial_latent`` [F, C, h, w] (normalized)
        or ``initial_frames`` uint8 [T, H, W, 3] extend a given video: its chunks come first,
        unchanged, then the stream continues from it.

        ``image`` (image-to-video; a path, or uint8 [H, W, 3] of any size, resized and
        centre-cropped to :attr:`frame_size`, see :mod:`sf_sdk.image`) becomes the first latent
        frame, encoded by the VAE in float32; the stream continues from it. It needs a frame-wise
        model (one latent frame per chunk, e.g. Causal Forcing frame-wise); its first chunk is the
        image's decoded frame."""
        if image is not None:
            if initial_latent is not None or initial_frames is not None:
                raise ValueError("give image, initial_latent or initial_frames, not several")
            initial_latent = self._image_latent(image)
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

    def pool(self, max_streams: int, *, max_frames: int | None = None) -> StreamPool:
        """A pool of ``max_streams`` streams advanced together in one batched DiT call per step
        (see :mod:`sf_sdk.pool`). ``max_frames`` (video frames): under global attention the longest
        stream the pool holds (default: the streaming config's ``global_cache_frames``); under a
        rolling window, when shorter than the window, the KV cache holds only that many frames and
        longer streams are refused (default: the window, unbounded streams). A pool is independent
        of :meth:`stream` (its own KV cache)."""
        capacity = None
        if max_frames is not None:
            if not isinstance(max_frames, int) or isinstance(max_frames, bool) or max_frames <= 0:
                raise ValueError(f"max_frames must be a positive int (video frames), got {max_frames!r}")
            capacity = latent_frames_floor(max_frames, self.temporal_stride)
            c = self.streaming.num_frame_per_block
            capacity = math.ceil(capacity / c) * c
        elif not self.streaming.rolling:
            capacity = self.streaming.global_cache_frames
        return StreamPool(self, max_streams, latent_capacity=capacity, fit=True)

    # ------------------------------------------------------------------ stages
    def _image_latent(self, image: Any) -> Tensor:
        """The conditioning image as one normalized latent frame [1, C, h, w] (model dtype), encoded
        by a float32 VAE (a float32 copy of a half-precision VAE is made once)."""
        from sf_sdk.image import fit_image

        if self.vae is None:
            raise ValueError("image-to-video encodes the image with the VAE: this model has none (pass "
                             "initial_latent, one normalized latent frame, instead)")
        if self.streaming.first_chunk_frames != 1:
            c = self.streaming.num_frame_per_block
            raise ValueError(f"image-to-video conditions the first latent frame alone: it needs a frame-wise model "
                             f"(num_frame_per_block=1; e.g. Causal Forcing frame-wise) or a first frame of its own "
                             f"(independent_first_frame=True); this one has chunks of {c} (change either only "
                             f"if the model was trained so)")
        pixels = fit_image(image, self.frame_size)  # [H, W, 3] uint8
        video = pixels.permute(2, 0, 1)[None, :, None].to(self.device, torch.float32) / 127.5 - 1  # [1, 3, 1, H, W]
        vae = self.vae
        if vae.dtype != torch.float32:
            if self._vae_float32 is None or self._vae_float32[0] is not vae:
                import copy

                self._vae_float32 = (vae, copy.deepcopy(vae).float())
            vae = self._vae_float32[1]
        with torch.inference_mode():
            latent = vae.normalize(vae.encode(video))  # [1, C, 1, h, w]
        return latent[0].transpose(0, 1).to(self.dtype)  # [1, C, h, w]

    def _check_prompt(self, prompt: Any) -> None:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError("prompt is empty: describe the video to generate")

    def _check_request(self, prompt, prompt_embeds, num_frames, seed, decode, initial_latent,
                       initial_frames) -> StreamRequest:
        prompt_embeds = self._check_prompt_args(prompt, prompt_embeds)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if not -(2**63) <= seed < 2**64:  # what torch.Generator.manual_seed takes
            raise ValueError(f"seed must lie in [-2**63, 2**64 - 1], got {seed}")
        if not isinstance(decode, bool):
            raise ValueError(f"decode must be True or False, got {decode!r}")
        if decode and self.vae is None and self.decoder != "tiny":
            raise ValueError("this model has no VAE: stream with decode=False to get latents")
        c = self.streaming.num_frame_per_block
        latent_total = None
        if num_frames is not None:
            if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames <= 0:
                raise ValueError(f"num_frames must be a positive int (video frames) or None, got {num_frames!r}")
            ok = (num_frames - 1) % self.temporal_stride == 0
            latent_total = latent_frames_floor(num_frames, self.temporal_stride)
            if not ok or not self.streaming.whole_chunks(latent_total):
                raise ValueError(f"{num_frames} video frames is not a whole number of chunks "
                                 f"({c} latent frames = {self.chunk_frames} video frames each, the first "
                                 f"chunk {video_frames_for_latents(self.streaming.first_chunk_frames, self.temporal_stride)}); nearest "
                                 f"valid: "
                                 f"{self.valid_num_frames(num_frames)}")
        elif not self.streaming.rolling:
            raise ValueError("unbounded streams need a rolling KV cache: pass num_frames, or load the model "
                             "with streaming={'local_attn_size': N} (latent frames)")
        init, init_frames = self._initial_latents(initial_latent, initial_frames)
        if init is not None and latent_total is not None and init.shape[0] >= latent_total:
            raise ValueError(f"the initial video already has {init.shape[0]} latent frames "
                             f"({video_frames_for_latents(init.shape[0], self.temporal_stride)} video frames); "
                             f"num_frames = {num_frames} asks for {latent_total} in total: ask for more")
        return StreamRequest(prompt, prompt_embeds, latent_total, seed, decode, init, init_frames)

    def _check_prompt_args(self, prompt: Any, prompt_embeds: Any) -> Tensor | None:
        """Exactly one of a text prompt (this model must have a text encoder) or embeddings;
        returns the checked embeddings (None for a text prompt)."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("give exactly one of prompt (a string) or prompt_embeds ([L, text_dim])")
        if prompt is not None:
            self._check_prompt(prompt)
            if self.text_encoder is None:
                raise ValueError("this model has no text encoder: pass prompt_embeds instead of a prompt")
            return None
        return self._check_embeds(prompt_embeds)

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
            latents = latent_frames_floor(t, s)
            if (t - 1) % s or not self.streaming.whole_chunks(latents):
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
        if not self.streaming.whole_chunks(initial_latent.shape[0]):
            raise ValueError(f"the initial video has {initial_latent.shape[0]} latent frames, not a multiple of "
                             f"the chunk size {c}: trim or extend it (video frames 1 + 4k with k+1 a multiple "
                             f"of {c})")
        if not torch.isfinite(initial_latent).all():
            raise ValueError("initial_latent holds NaN or infinite values: give finite normalized latents"
                             if initial_frames is None else "the VAE encoded initial_frames to NaN or infinite "
                             "latents: check the VAE weights and dtype")
        return initial_latent.to(self.device, self.dtype), kept_frames

    def _padded_embeds(self, prompt: str | None, prompt_embeds: Tensor | None) -> Tensor:
        """The prompt (a string, or checked embeddings) as a zero-padded [text_len, text_dim]
        embedding on the model's device and dtype."""
        emb = self._check_prompt_args(prompt, prompt_embeds)
        if emb is None:
            with torch.inference_mode():
                emb = self.text_encoder.encode(prompt)[0]
        emb = emb.to(self.device, self.dtype)
        from sf_sdk.models.text import pad_prompt_embeds

        return pad_prompt_embeds([emb], self.dit.config.text_len)[0]  # [text_len, text_dim]

    def _solo_pool_for(self, req: StreamRequest) -> StreamPool:
        """The pool of one that single streams run in, kept while its geometry and backend stay."""
        st, frames = self.streaming, req.latent_frames
        if st.rolling and (frames is None or frames >= st.local_attn_size):
            frames = None  # the window (a bounded stream shorter than it gets a cache of its own length)
        key = (frames, self.streaming, self.dtype, self.device, id(self.backend))
        if self._solo is None or self._solo_key != key:
            self._solo = None  # the old cache is freed before the new one is allocated
            self._solo = StreamPool(self, 1, latent_capacity=frames, fit=True)
            self._solo_key = key
        return self._solo

    def _open_solo(self, stream: VideoStream) -> PooledStream:
        if self._active is not None and self._active is not stream and not self._active.closed:
            log.debug("a new stream supersedes the running one (they share the KV cache)")
            self._active._superseded = True
            if self._active._handle is not None:
                self._active._handle.close()
        self._active = stream
        return self._solo_pool_for(stream._req)._open(stream._req)

    def _close_active(self) -> None:
        if self._active is not None:
            self._active.close()
            self._active = None


DECODERS = ("wan", "tiny")


def _check_decoder(decoder: Any, tiny: torch.nn.Module | None, vae: torch.nn.Module | None, dit: WanDiT) -> str:
    """``decoder`` checked against the components: "tiny" needs a tiny decoder of the DiT's latents."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if decoder == "tiny":
        if tiny is None:
            raise ValueError("decoder='tiny' but this model has no tiny decoder: pass decoder_path= a TAEHV file "
                             "(taew2_1.pth for Wan2.1 latents), use a model folder that ships one, or decoder='wan'")
        cfg = tiny.config
        if cfg.z_dim != dit.config.in_dim:
            raise ValueError(f"the tiny decoder takes z_dim={cfg.z_dim} latents but the DiT makes {dit.config.in_dim}: "
                             f"it is a decoder for another model")
        if vae is not None and (cfg.temporal_stride, cfg.spatial_stride) != (vae.config.temporal_stride,
                                                                              vae.config.spatial_stride):
            raise ValueError(f"the tiny decoder upsamples {cfg.temporal_stride}x in time and {cfg.spatial_stride}x in "
                             f"space, the VAE {vae.config.temporal_stride}x and {vae.config.spatial_stride}x: it "
                             f"decodes another latent space")
    return decoder


def _tiny_backend_decoder(gen: StreamingGenerator, backend: Backend, options: dict[str, Any]) -> Any:
    """The tiny decoder under a non-eager backend: its ONNX Runtime steps where the backend is
    ``onnxruntime`` and its artifact folder holds them (``python -m export.tiny``), else eager."""
    if backend.name == "onnxruntime" and options.get("artifact_dir"):
        from export.tiny import tiny_onnxruntime_decoder

        make = tiny_onnxruntime_decoder(options["artifact_dir"], gen)
        if make is not None:
            return make
    log.info("the tiny decoder runs eagerly under the %s backend", backend.name)
    return gen.make_streaming_decoder


def _load_tiny_decoder(name_or_path: str | os.PathLike, decoder: str, decoder_path: str | os.PathLike | None,
                       device: torch.device, dtype: torch.dtype) -> torch.nn.Module | None:
    """The tiny decoder ``from_pretrained`` was asked for: ``decoder_path``, else the model folder's."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    from sf_sdk.checkpoint.taehv import load_folder_tiny_decoder, load_taehv

    if decoder_path is not None:
        if decoder != "tiny":
            raise ValueError("decoder_path is the tiny decoder's file: pass decoder='tiny' with it")
        return load_taehv(decoder_path, device=device, dtype=dtype)
    if decoder != "tiny":
        return None
    if os.path.isfile(name_or_path) or not (os.path.isdir(name_or_path) or str(name_or_path) in BUNDLED_MODELS):
        raise ValueError(f"decoder='tiny' for {name_or_path}: official checkpoints ship no tiny decoder; pass "
                         f"decoder_path= a TAEHV file (taew2_1.pth decodes Wan2.1 latents)")
    return load_folder_tiny_decoder(name_or_path, device=device, dtype=dtype)


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
