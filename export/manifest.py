"""``export.json``: what an artifact folder holds and what it was exported from.

A backend that loads a folder checks the manifest against the generator it serves (model
config, stream geometry, dtype, weights), so a stale or mismatched artifact fails with a clear
message instead of computing something else.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from export.settings import (
    ChunkShapes,
    DecodeShapes,
    ExportModel,
    ExportSettings,
    config_hash,
    parse_dtype,
    weights_fingerprint,
)
from sf_sdk.config import DiTConfig, StreamingConfig, VAEConfig, from_dict, to_dict

__all__ = ["Manifest", "write_manifest", "read_manifest", "update_manifest", "MANIFEST", "versions"]

log = logging.getLogger(__name__)

MANIFEST = "export.json"
FORMAT = "sf-sdk-export"
VERSION = 1
# Streaming fields that shape a captured step (the denoising schedule runs outside it).
GRAPH_STREAM_FIELDS = ("num_frame_per_block", "latent_height", "latent_width", "local_attn_size", "sink_size",
                       "position_mode")


def versions() -> dict[str, str]:
    """Versions of the libraries an artifact depends on (those that are installed)."""
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("onnx", "onnxruntime", "onnxscript", "tensorrt", "torch_tensorrt"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        out[name] = getattr(module, "__version__", "?")
    return out


@dataclass
class Manifest:
    """The parsed ``export.json`` of an artifact folder."""

    root: Path
    backend: str
    files: dict[str, str]
    dit: DiTConfig
    streaming: StreamingConfig
    vae: VAEConfig | None
    settings: dict[str, Any]
    chunk_shapes: dict[str, Any]
    decode_shapes: dict[str, Any] | None
    weights: dict[str, str]
    config_hash: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return parse_dtype(self.settings["dtype"])

    def path(self, step: str) -> Path:
        if step not in self.files:
            raise FileNotFoundError(f"{self.root} has no {step!r} artifact (it has {sorted(self.files)})")
        return self.root / self.files[step]

    def check_generator(self, dit: torch.nn.Module, streaming: StreamingConfig, *, vae: torch.nn.Module | None,
                        check_weights: bool = True) -> None:
        """Raise a ValueError when the artifacts cannot stand in for this generator's modules."""
        where = f"the {self.backend} artifacts in {self.root}"
        if to_dict(dit.config) != to_dict(self.dit):
            diff = {k: (v, getattr(dit.config, k)) for k, v in to_dict(self.dit).items()
                    if to_dict(dit.config)[k] != v}
            raise ValueError(f"{where} were exported from another DiT config (exported, generator): {diff}")
        stream_now, stream_then = to_dict(streaming), to_dict(self.streaming)
        diff = {k: (stream_then[k], stream_now[k]) for k in GRAPH_STREAM_FIELDS if stream_now[k] != stream_then[k]}
        if diff:
            raise ValueError(f"{where} were exported for another stream geometry (exported, generator): {diff}; "
                             f"re-export with --latent-hw / --window / --chunk-frames, or load the generator "
                             f"with streaming={{...}} matching the export")
        if dit.dtype != self.dtype:
            raise ValueError(f"{where} compute in {self.dtype}, the generator's DiT is {dit.dtype}: load it with "
                             f"dtype={str(self.dtype).removeprefix('torch.')!r}")
        if check_weights and weights_fingerprint(dit) != self.weights.get("dit"):
            raise ValueError(f"{where} hold other DiT weights than the generator's (fingerprint mismatch): "
                             f"re-export from the same model folder, or pass backend_options="
                             f"{{'check_weights': False}} to use the exported weights anyway")
        if vae is not None and self.vae is not None and check_weights and \
                weights_fingerprint(vae) != self.weights.get("vae"):
            raise ValueError(f"{where} hold other VAE weights than the generator's (fingerprint mismatch)")

    def chunk_profile(self) -> ChunkShapes:
        d = dict(self.chunk_shapes)
        d["dtype"] = parse_dtype(d["dtype"])
        d["latent_hw"], d["grid_hw"] = tuple(d["latent_hw"]), tuple(d["grid_hw"])
        return ChunkShapes(**d)

    def decode_profile(self) -> DecodeShapes | None:
        if self.decode_shapes is None:
            return None
        d = dict(self.decode_shapes)
        d["dtype"] = parse_dtype(d["dtype"])
        d["latent_hw"], d["pixels_hw"] = tuple(d["latent_hw"]), tuple(d["pixels_hw"])
        d["cache"] = tuple((name, tuple(shape)) for name, shape in d["cache"])
        return DecodeShapes(**d)


def write_manifest(out_dir: str | os.PathLike, backend: str, model: ExportModel, settings: ExportSettings,
                   files: dict[str, str], extra: dict[str, Any] | None = None) -> Path:
    """Write ``export.json`` into ``out_dir``; returns its path."""
    out = Path(out_dir)
    chunk = model.chunk_shapes(settings)
    decode = model.decode_shapes(settings) if settings.include_vae else None
    weights = {"dit": weights_fingerprint(model.dit)}
    if model.vae is not None:
        weights["vae"] = weights_fingerprint(model.vae)
    data = {
        "format": FORMAT,
        "version": VERSION,
        "backend": backend,
        "files": files,
        "source": model.source,
        "dit": to_dict(model.dit_config),
        "streaming": to_dict(model.streaming),
        "vae": to_dict(model.vae_config) if model.vae_config is not None and decode is not None else None,
        "settings": settings.to_dict(),
        "chunk_shapes": chunk.to_dict(),
        "decode_shapes": decode.to_dict() if decode is not None else None,
        "weights": weights,
        "config_hash": config_hash(to_dict(model.dit_config), to_dict(model.streaming), settings.to_dict(),
                                   weights),
        "versions": versions(),
        **(extra or {}),
    }
    path = out / MANIFEST
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def update_manifest(artifact_dir: str | os.PathLike, **fields: Any) -> None:
    """Add or replace top-level fields of ``export.json`` (e.g. the ``verify`` results)."""
    path = Path(artifact_dir) / MANIFEST
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def read_manifest(artifact_dir: str | os.PathLike, backend: str | None = None) -> Manifest:
    """Parse ``artifact_dir/export.json``; ``backend`` (if given) must match the exporter."""
    root = Path(artifact_dir)
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{root} holds no {MANIFEST}: export into it first (python -m export.aoti / "
                                f"export.onnx / export.trt --model ... --out {root})")
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path} is not an sf-sdk export manifest (format {data.get('format')!r})")
    if data.get("version") != VERSION:
        raise ValueError(f"{path} has manifest version {data.get('version')}, this sf-sdk reads {VERSION}: "
                         f"re-export")
    if backend is not None and data["backend"] != backend:
        raise ValueError(f"{root} holds {data['backend']!r} artifacts, not {backend!r}: export with "
                         f"python -m export.{_module_of(backend)}")
    known = {"format", "version", "backend", "files", "dit", "streaming", "vae", "settings", "chunk_shapes",
             "decode_shapes", "weights", "config_hash"}
    return Manifest(
        root=root, backend=data["backend"], files=dict(data["files"]),
        dit=from_dict(DiTConfig, data["dit"], source=path),
        streaming=from_dict(StreamingConfig, data["streaming"], source=path),
        vae=from_dict(VAEConfig, data["vae"], source=path) if data.get("vae") else None, settings=data["settings"],
        chunk_shapes=data["chunk_shapes"], decode_shapes=data.get("decode_shapes"), weights=data["weights"],
        config_hash=data["config_hash"], extra={k: v for k, v in data.items() if k not in known})


def _module_of(backend: str) -> str:
    return {"onnxruntime": "onnx", "tensorrt": "trt"}.get(backend, backend)
