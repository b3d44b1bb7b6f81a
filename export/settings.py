"""Export settings, shape profiles and the model an export starts from.

Everything an exported artifact depends on is written down here, as frozen dataclasses:

* :class:`ExportSettings` — batch size, dtype, device, attention implementation, what to export;
  the backend-specific settings (:class:`AOTISettings`, :class:`ONNXSettings`,
  :class:`TRTSettings`) extend it.
* :class:`ChunkShapes` / :class:`DecodeShapes` — the static shapes of the DiT chunk step and the
  VAE decode step, derived from the model and streaming configs (never typed in by hand). One
  artifact serves one resolution, chunk size and cache window: the KV cache capacity is part of
  the graph, ``kv_len`` is an input, so nothing changes shape from chunk to chunk.
* :class:`ExportModel` — the loaded DiT (and VAE) with their configs: from one of our model
  folders (what the training package writes with ``save_pretrained``), an official checkpoint,
  or a preset with random weights (``--random-init``, for tests and benchmarks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from sf_sdk import attention as attention_impl
from sf_sdk.cache import CacheLayout
from sf_sdk.config import (
    DIT_PRESETS,
    VAE_PRESETS,
    DiTConfig,
    StreamingConfig,
    VAEConfig,
    from_dict,
    to_dict,
)
from sf_sdk.models.dit import CHUNK_OUTPUTS, ChunkInputs

__all__ = [
    "ExportSettings",
    "AOTISettings",
    "ONNXSettings",
    "TRTSettings",
    "ChunkShapes",
    "DecodeShapes",
    "ExportModel",
    "PRESET_STREAMING",
    "PRESET_VAE",
    "load_export_model",
    "attention_backend",
    "parse_dtype",
    "config_hash",
    "tolerance",
]

log = logging.getLogger(__name__)

AttentionImpl = Literal["reference", "kernel", "auto"]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
# The canonical name of each dtype (what manifests record).
DTYPE_NAMES: dict[torch.dtype, str] = {torch.float32: "float32", torch.float16: "float16",
                                       torch.bfloat16: "bfloat16"}

# Largest acceptable max-abs difference between an exported artifact and eager PyTorch when both
# stream the same noise (``--verify``), by compute dtype.
VERIFY_TOLERANCE: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.float16: 5e-2,
                                              torch.bfloat16: 1e-1}

# Streaming geometry of the presets when a model is built with random weights: small latents and
# a window that evicts within a few chunks, so tests and benchmarks exercise the rolling cache.
PRESET_STREAMING: dict[str, StreamingConfig] = {
    "tiny": StreamingConfig(latent_height=8, latent_width=12, local_attn_size=6),
    "mid": StreamingConfig(latent_height=16, latent_width=16, local_attn_size=6),
    "wan2.1-t2v-1.3b": StreamingConfig(local_attn_size=12),
}
# The VAE that goes with each DiT preset (random weights).
PRESET_VAE: dict[str, str] = {"tiny": "tiny", "mid": "tiny", "wan2.1-t2v-1.3b": "wan2.1"}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"fp16"`` / ``"bfloat16"`` / ``torch.float32`` ... -> a torch dtype export supports."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"export supports {sorted(DTYPE_NAMES.values())}, got {dtype}")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def tolerance(dtype: torch.dtype) -> float:
    """The ``--verify`` threshold (max abs error) for a compute dtype."""
    return VERIFY_TOLERANCE[dtype]


@contextlib.contextmanager
def attention_backend(name: AttentionImpl) -> Iterator[None]:
    """Select the cache-attention implementation while capturing or running a graph.

    ``"reference"`` captures plain PyTorch ops (portable: ONNX, TensorRT, an AOTInductor package
    that needs no compiled extension); ``"kernel"`` / ``"auto"`` may capture the
    ``sf_sdk::cache_attention`` custom op.
    """
    with attention_impl.default_backend(name):
        yield


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportSettings:
    """What every export shares.

    ``num_frames`` sizes a global-attention cache (``local_attn_size == -1``); rolling caches
    are sized by the window. ``include_vae`` also exports the VAE decode steps (when the model
    has a VAE).
    """

    batch_size: int = 1
    dtype: str = "float32"
    device: str = "cpu"
    attention: AttentionImpl = "reference"
    num_frames: int | None = None
    include_vae: bool = True

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        parse_dtype(self.dtype)
        if self.attention not in ("reference", "kernel", "auto"):
            raise ValueError(f"attention must be 'reference', 'kernel' or 'auto', got {self.attention!r}")
        if self.num_frames is not None and self.num_frames <= 0:
            raise ValueError(f"num_frames must be positive (latent frames) or None, got {self.num_frames}")
        if torch.device(self.device).type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class AOTISettings(ExportSettings):
    """AOTInductor packaging. ``fast_compile`` trades run time for compile time (tests): no
    vectorized kernels, an unoptimized wrapper. ``freeze`` folds the weights into the graph
    (constant folding, prepacked GEMM weights on the CPU). ``autotune`` (CPU, not with
    ``fast_compile``): each GEMM timed as Inductor's C++ template (AMX / AVX-512 micro-kernels for
    this CPU) against the oneDNN call, the faster one compiled in; at the race's tiny config it
    roughly doubles the compile time and cuts a chunk step by ~20% (docs/performance.md)."""

    fast_compile: bool = False
    freeze: bool = True
    autotune: bool = True

    def inductor_configs(self) -> dict[str, Any]:
        configs: dict[str, Any] = {"freezing": self.freeze}
        if self.fast_compile:
            configs.update({"cpp.simdlen": 1, "aot_inductor.compile_wrapper_opt_level": "O0"})
        elif self.autotune and torch.device(self.device).type == "cpu":
            configs.update(_cpu_gemm_autotune())
        return configs


def _cpu_gemm_autotune() -> dict[str, Any]:
    """Inductor's settings for timing its C++ GEMM template against ATen's (oneDNN) GEMM, those
    this PyTorch has (the template came in 2.5; without it: none); the choice tables Inductor
    prints to stderr for every GEMM are switched off."""
    import importlib.util

    from torch._inductor import config

    if importlib.util.find_spec("torch._inductor.codegen.cpp_gemm_template") is None:
        return {}
    wanted = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
              "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}
    return {key: value for key, value in wanted.items() if hasattr(config, key)}


@dataclass(frozen=True)
class ONNXSettings(ExportSettings):
    """ONNX export with the dynamo exporter. Models over ``external_data_bytes`` of weights store
    them beside the graph (``*.onnx.data``), as protobuf caps a file at 2 GB."""

    opset: int | None = None
    external_data_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attention != "reference":
            raise ValueError("ONNX graphs hold standard ops only: attention must be 'reference' "
                             f"(got {self.attention!r})")


TRTPrecision = Literal["fp32", "fp16", "bf16"]


@dataclass(frozen=True)
class TRTSettings(ONNXSettings):
    """TensorRT engines built from the ONNX export.

    ``precision``: the kernels TensorRT may pick (fp16 / bf16 keep norms, softmax and the
    timestep embedding in fp32 through layer precision constraints). The ONNX graph is exported
    in float32 (``dtype``) and lowered by the builder. ``batch_range`` is the (min, opt, max)
    batch of the optimization profile; a range wider than one size exports a dynamic batch
    axis. ``cache_dir`` holds built engines keyed by GPU, compute capability, TensorRT version
    and config hash (default: ``<out>/engines``).
    """

    precision: TRTPrecision = "fp16"
    workspace_gib: float = 4.0
    builder_optimization_level: int = 3
    batch_range: tuple[int, int, int] | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"precision must be 'fp32', 'fp16' or 'bf16', got {self.precision!r}")
        if self.dtype != "float32":
            raise ValueError("TensorRT engines are built from a float32 ONNX graph: keep dtype='float32' and "
                             "choose the engine precision with precision='fp16' / 'bf16'")
        if self.attention != "reference":
            raise ValueError(f"TensorRT engines come from ONNX: attention must be 'reference', got "
                             f"{self.attention!r}")
        if not 0 <= self.builder_optimization_level <= 5:
            raise ValueError(f"builder_optimization_level must lie in [0, 5], got "
                             f"{self.builder_optimization_level}")
        if self.workspace_gib <= 0:
            raise ValueError(f"workspace_gib must be positive, got {self.workspace_gib}")
        if self.batch_range is not None:
            lo, opt, hi = self.batch_range
            if not 0 < lo <= opt <= hi:
                raise ValueError(f"batch_range must be (min, opt, max) with 0 < min <= opt <= max, got "
                                 f"{self.batch_range}")
            if not lo <= self.batch_size <= hi:
                raise ValueError(f"batch_size {self.batch_size} lies outside batch_range {self.batch_range}")

    @property
    def batches(self) -> tuple[int, int, int]:
        """(min, opt, max) batch of the optimization profile."""
        return self.batch_range if self.batch_range is not None else (self.batch_size,) * 3

    @property
    def dynamic_batch(self) -> bool:
        lo, _, hi = self.batches
        return hi > lo


# --------------------------------------------------------------------------------------------
# Shape profiles
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one graph input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch.")}


CHUNK_INPUTS: tuple[str, ...] = ChunkInputs._fields


@dataclass(frozen=True)
class ChunkShapes:
    """Static shapes of :class:`sf_sdk.models.dit.ChunkStep` for one stream geometry."""

    batch: int
    chunk_frames: int
    in_dim: int
    out_dim: int
    latent_hw: tuple[int, int]
    grid_hw: tuple[int, int]
    num_layers: int
    num_heads: int
    head_dim: int
    text_len: int
    cache_capacity: int  # tokens
    dtype: torch.dtype

    @classmethod
    def from_configs(cls, dit: DiTConfig, stream: StreamingConfig, *, batch: int = 1,
                     num_frames: int | None = None, dtype: torch.dtype = torch.float32) -> ChunkShapes:
        layout = CacheLayout.from_configs(dit, stream, num_frames)
        return cls(batch=batch, chunk_frames=stream.num_frame_per_block, in_dim=dit.in_dim, out_dim=dit.out_dim,
                   latent_hw=(stream.latent_height, stream.latent_width), grid_hw=layout.grid_hw,
                   num_layers=dit.num_layers, num_heads=dit.num_heads, head_dim=dit.head_dim,
                   text_len=dit.text_len, cache_capacity=layout.capacity, dtype=dtype)

    @property
    def chunk_tokens(self) -> int:
        return self.chunk_frames * self.grid_hw[0] * self.grid_hw[1]

    @property
    def cache_shape(self) -> tuple[int, ...]:
        return (self.num_layers, self.batch, self.cache_capacity, self.num_heads, self.head_dim)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.batch, self.chunk_frames, self.in_dim, *self.latent_hw)

    def inputs(self) -> list[TensorSpec]:
        b, f, dt = self.batch, self.chunk_frames, self.dtype
        cross = (self.num_layers, b, self.text_len, self.num_heads, self.head_dim)
        rope = (b, self.chunk_tokens, self.head_dim // 2)
        shapes = [self.latent_shape, (b, f), cross, cross, self.cache_shape, self.cache_shape,
                  (b, self.chunk_tokens), (b,), rope, rope]
        dtypes = [dt, dt, dt, dt, dt, dt, torch.int64, torch.int64, dt, dt]
        return [TensorSpec(n, s, d) for n, s, d in zip(CHUNK_INPUTS, shapes, dtypes)]

    def outputs(self) -> list[TensorSpec]:
        flow = (self.batch, self.chunk_frames, self.out_dim, *self.latent_hw)
        return [TensorSpec(n, s, self.dtype) for n, s in zip(CHUNK_OUTPUTS, (flow, self.cache_shape,
                                                                            self.cache_shape))]

    def with_batch(self, batch: int) -> ChunkShapes:
        return dataclasses.replace(self, batch=batch)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["dtype"] = DTYPE_NAMES[self.dtype]
        return out


@dataclass(frozen=True)
class DecodeShapes:
    """Static shapes of :class:`sf_sdk.models.vae.VAEDecodeStep` (one latent frame)."""

    batch: int
    z_dim: int
    latent_hw: tuple[int, int]
    pixels_hw: tuple[int, int]
    cache: tuple[tuple[str, tuple[int, ...]], ...]  # (conv name, shape) in call order
    frames_out_first: int
    frames_out: int
    dtype: torch.dtype

    @classmethod
    def from_vae(cls, vae: nn.Module, stream: StreamingConfig, *, batch: int = 1,
                 dtype: torch.dtype = torch.float32) -> DecodeShapes:
        h, w = stream.latent_height, stream.latent_width
        specs = vae.decoder_cache_spec(batch, h, w)
        s = vae.config.spatial_stride
        return cls(batch=batch, z_dim=vae.config.z_dim, latent_hw=(h, w), pixels_hw=(h * s, w * s),
                   cache=tuple((spec.name, tuple(spec.shape)) for spec in specs), frames_out_first=1,
                   frames_out=vae.config.temporal_stride, dtype=dtype)

    @property
    def input_names(self) -> list[str]:
        return ["z", *(f"cache_{i}" for i in range(len(self.cache)))]

    @property
    def output_names(self) -> list[str]:
        return ["pixels", *(f"new_cache_{i}" for i in range(len(self.cache)))]

    def inputs(self) -> list[TensorSpec]:
        z = TensorSpec("z", (self.batch, self.z_dim, 1, *self.latent_hw), self.dtype)
        return [z, *(TensorSpec(f"cache_{i}", shape, self.dtype) for i, (_, shape) in enumerate(self.cache))]

    def outputs(self, first_frame: bool) -> list[TensorSpec]:
        frames = self.frames_out_first if first_frame else self.frames_out
        pixels = TensorSpec("pixels", (self.batch, 3, frames, *self.pixels_hw), self.dtype)
        return [pixels, *(TensorSpec(f"new_cache_{i}", shape, self.dtype)
                          for i, (_, shape) in enumerate(self.cache))]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["dtype"] = DTYPE_NAMES[self.dtype]
        return out


# --------------------------------------------------------------------------------------------
# The model an export starts from
# --------------------------------------------------------------------------------------------


@dataclass
class ExportModel:
    """A DiT (and optionally its VAE) in eval mode, with the configs that shape the export."""

    dit: nn.Module  # sf_sdk.models.dit.WanDiT
    streaming: StreamingConfig
    vae: nn.Module | None = None  # sf_sdk.models.vae.WanVAE
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dit_config(self) -> DiTConfig:
        return self.dit.config

    @property
    def vae_config(self) -> VAEConfig | None:
        return self.vae.config if self.vae is not None else None

    def chunk_shapes(self, settings: ExportSettings) -> ChunkShapes:
        return ChunkShapes.from_configs(self.dit_config, self.streaming, batch=settings.batch_size,
                                        num_frames=settings.num_frames, dtype=settings.torch_dtype)

    def decode_shapes(self, settings: ExportSettings) -> DecodeShapes | None:
        """The decode steps' profile: one stream per call (each stream of a pool decodes with its
        own conv cache), whatever the chunk step's batch of streams."""
        if self.vae is None:
            return None
        return DecodeShapes.from_vae(self.vae, self.streaming, batch=1, dtype=settings.torch_dtype)


def config_hash(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (configs, settings, shapes)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def weights_fingerprint(module: nn.Module) -> str:
    """A hash of a module's parameter names, shapes and values (float64 sums of each tensor and of
    its absolute values, and a strided sample): tells apart different weights without hashing
    gigabytes byte by byte.

    The sums are rounded to 12 significant digits: a parallel reduction's order (and so its last
    bits) depends on the thread count, and the same weights must give the same fingerprint in a
    process with 1 thread or 16."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in module.state_dict().items():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)].to(torch.float64).cpu()
            stats = torch.stack([flat.to(torch.float64).sum(), flat.to(torch.float64).abs().sum()]).cpu()
            digest.update(name.encode())
            digest.update(str(tuple(p.shape)).encode())
            digest.update(" ".join(f"{v:.11e}" for v in stats.tolist()).encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def load_export_model(
    model: str | os.PathLike,
    *,
    random_init: bool = False,
    latent_hw: tuple[int, int] | None = None,
    window: int | None = None,
    sink: int | None = None,
    chunk_frames: int | None = None,
    include_vae: bool = True,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    wan_dir: str | os.PathLike | None = None,
    seed: int = 0,
) -> ExportModel:
    """Load what an export starts from.

    ``model`` is a preset name (``tiny``, ``mid``, ``wan2.1-t2v-1.3b``) with ``random_init=True``,
    one of our model folders (``save_pretrained``: what training writes, or ``export.convert``
    output), or an official checkpoint (with ``wan_dir``). ``latent_hw``, ``window``
    (``local_attn_size`` in latent frames, -1 for global), ``sink`` and ``chunk_frames`` override
    the streaming config.
    """
    dt, dev = parse_dtype(dtype), torch.device(device)
    name = str(model)
    if random_init:
        if name not in DIT_PRESETS:
            raise ValueError(f"--random-init needs a preset name ({sorted(DIT_PRESETS)}), got {name!r}")
        from sf_sdk.models.dit import WanDiT

        torch.manual_seed(seed)
        dit = WanDiT(DIT_PRESETS[name])
        vae = None
        if include_vae:
            from sf_sdk.models.vae import WanVAE

            vae = WanVAE(VAE_PRESETS[PRESET_VAE.get(name, "tiny")])
        stream = PRESET_STREAMING.get(name, StreamingConfig())
        loaded = ExportModel(dit, stream, vae, source=f"preset {name!r} (random weights, seed {seed})")
    else:
        if name in DIT_PRESETS and not Path(name).exists():
            raise ValueError(f"{name!r} is a preset: add --random-init to export it with random weights, or "
                             f"pass a model folder")
        from sf_sdk.checkpoint import load_pretrained

        lm = load_pretrained(model, device="cpu", dtype=dt, load_vae=include_vae, load_text_encoder=False,
                             wan_dir=wan_dir)
        loaded = ExportModel(lm.dit, lm.streaming, lm.vae, source=lm.source or name, extra={"fps": lm.fps})
    overrides: dict[str, Any] = {}
    if latent_hw is not None:
        overrides.update(latent_height=int(latent_hw[0]), latent_width=int(latent_hw[1]))
    if window is not None:
        overrides["local_attn_size"] = int(window)
        if window == -1:
            overrides["sink_size"] = 0
    if sink is not None:
        overrides["sink_size"] = int(sink)
    if chunk_frames is not None:
        overrides["num_frame_per_block"] = int(chunk_frames)
    if overrides:
        loaded.streaming = from_dict(StreamingConfig, overrides, base=loaded.streaming)
    loaded.dit = loaded.dit.to(dev, dt).eval().requires_grad_(False)
    if loaded.vae is not None:
        loaded.vae = loaded.vae.to(dev, dt).eval().requires_grad_(False)
    log.info("export model: %s; stream %s", loaded.source, to_dict(loaded.streaming))
    return loaded
