"""The export backends of :class:`sf_sdk.StreamingGenerator`, registered on import.

=================  =====================================================================
``compile``        torch.compile of the chunk and decode steps (CPU and CUDA); options:
                   the fields of :class:`export.compile.CompileSettings`
``aoti``           AOTInductor packages from ``python -m export.aoti``;
                   ``{"artifact_dir": DIR}``
``onnxruntime``    ONNX graphs from ``python -m export.onnx`` on ONNX Runtime;
                   ``{"artifact_dir": DIR, "providers": [...], "threads": N}``
``tensorrt``       TensorRT engines from ``python -m export.trt`` (CUDA);
                   ``{"artifact_dir": DIR, "precision": ..., "cache_dir": ...}``
``torch_tensorrt`` Torch-TensorRT (dynamo IR) of the chunk step (CUDA), saved to and reloaded
                   from ``{"artifact_dir": DIR}`` without recompiling
=================  =====================================================================

Artifact backends also take ``"check_weights": False`` to skip the check that the artifacts
were exported from the generator's weights. Each backend registers an availability check
(``sf_sdk.generator.backend_status(name)``: None, or what is missing here), and a backend that
cannot run raises :class:`export.runtime.BackendUnavailable` (a RuntimeError) saying what is
missing.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from export.runtime import BackendUnavailable
from export.settings import ChunkShapes, DecodeShapes
from sf_sdk.generator import Backend, StreamingGenerator, register_backend

__all__ = ["BACKENDS", "BackendUnavailable"]

log = logging.getLogger(__name__)


def _take(name: str, options: dict[str, Any], allowed: dict[str, Any]) -> dict[str, Any]:
    """``allowed`` defaults updated by ``options``; unknown keys are an error."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {name} backend options {unknown}; valid: {sorted(allowed)}")
    return {**allowed, **options}


def _artifact_dir(name: str, opts: dict[str, Any], exporter: str) -> Path:
    if opts["artifact_dir"] is None:
        raise ValueError(f"backend {name!r} needs backend_options={{'artifact_dir': DIR}}, a folder written by "
                         f"`python -m export.{exporter} --model ... --out DIR`")
    return Path(opts["artifact_dir"])


def _decode_shapes(gen: StreamingGenerator) -> DecodeShapes | None:
    if gen.vae is None:
        return None
    return DecodeShapes.from_vae(gen.vae, gen.streaming, batch=1, dtype=gen.dtype)


def _compile_backend(gen: StreamingGenerator, options: dict[str, Any]) -> Backend:
    from export.compile import CompileSettings, compile_steps

    settings = CompileSettings.from_options(options)
    model, make_decoder = compile_steps(gen.dit, None, settings, vae=gen.vae, decode_shapes=_decode_shapes(gen))
    return Backend("compile", model, make_decoder)


def _aoti_backend(gen: StreamingGenerator, options: dict[str, Any]) -> Backend:
    from export.aoti import BACKEND, load_aoti
    from export.manifest import read_manifest

    opts = _take("aoti", options, {"artifact_dir": None, "check_weights": True})
    manifest = read_manifest(_artifact_dir("aoti", opts, "aoti"), BACKEND)
    _check_device(manifest.settings["device"], gen, "aoti")
    manifest.check_generator(gen.dit, gen.streaming, vae=gen.vae, check_weights=opts["check_weights"])
    model, make_decoder = load_aoti(manifest, gen.dit, device=gen.device)
    return Backend("aoti", model, make_decoder)


def _onnxruntime_backend(gen: StreamingGenerator, options: dict[str, Any]) -> Backend:
    from export.manifest import read_manifest
    from export.onnx import BACKEND, load_onnxruntime

    opts = _take("onnxruntime", options, {"artifact_dir": None, "check_weights": True, "providers": None,
                                          "threads": None})
    manifest = read_manifest(_artifact_dir("onnxruntime", opts, "onnx"), BACKEND)
    manifest.check_generator(gen.dit, gen.streaming, vae=gen.vae, check_weights=opts["check_weights"])
    model, make_decoder = load_onnxruntime(manifest, gen.dit, device=gen.device, providers=opts["providers"],
                                           threads=opts["threads"])
    return Backend("onnxruntime", model, make_decoder)


def _tensorrt_backend(gen: StreamingGenerator, options: dict[str, Any]) -> Backend:
    from export.manifest import read_manifest
    from export.trt import BACKEND, load_tensorrt, settings_from_manifest, trt_blockers

    opts = _take("tensorrt", options, {"artifact_dir": None, "check_weights": True, "precision": None,
                                       "cache_dir": None})
    missing = trt_blockers()
    if missing:
        raise BackendUnavailable(f"the tensorrt backend needs {', '.join(missing)}")
    manifest = read_manifest(_artifact_dir("tensorrt", opts, "trt"), BACKEND)
    overrides = {k: opts[k] for k in ("precision", "cache_dir") if opts[k] is not None}
    settings = settings_from_manifest(manifest, **overrides)
    # The engines are float32 graphs lowered by TensorRT: the generator runs its DiT in float32.
    manifest.check_generator(gen.dit, gen.streaming, vae=gen.vae, check_weights=opts["check_weights"])
    model, make_decoder = load_tensorrt(manifest, gen.dit, settings, device=gen.device)
    return Backend("tensorrt", model, make_decoder)


def _torch_tensorrt_backend(gen: StreamingGenerator, options: dict[str, Any]) -> Backend:
    from export.torch_trt import TorchTRTSettings, load_or_compile

    opts = _take("torch_tensorrt", options, {"artifact_dir": None, **TorchTRTSettings.defaults()})
    artifact_dir = opts.pop("artifact_dir")
    settings = TorchTRTSettings(**opts)
    shapes = ChunkShapes.from_configs(gen.dit.config, gen.streaming, batch=1, dtype=gen.dtype)
    model = load_or_compile(gen.dit, gen.streaming, shapes, settings,
                            Path(artifact_dir) if artifact_dir is not None else None)
    make_decoder = gen.vae.streaming_decoder if gen.vae is not None else None
    return Backend("torch_tensorrt", model, make_decoder)


def _check_device(exported: str, gen: StreamingGenerator, name: str) -> None:
    import torch

    if torch.device(exported).type != gen.device.type:
        raise ValueError(f"the {name} artifacts were compiled for {exported}, the generator runs on {gen.device}: "
                         f"export again with --device {gen.device.type}")


# --------------------------------------------------------------------------------------------
# Availability: None when a backend can run on this machine, else what is missing
# --------------------------------------------------------------------------------------------


def compiler_status() -> str | None:
    """None when inductor (torch.compile, an AOTInductor export) can build CPU code here, else why not."""
    if shutil.which("g++") is None and shutil.which("c++") is None and shutil.which("clang++") is None:
        return "torch.compile (inductor) needs a C++ compiler on the PATH (e.g. apt-get install g++)"
    return None


def _onnxruntime_status() -> str | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed (pip install '.[onnx]')"
    return None


def _tensorrt_status() -> str | None:
    from export.trt import trt_blockers

    missing = trt_blockers()
    return f"needs {'; '.join(missing)}" if missing else None


def _torch_tensorrt_status() -> str | None:
    from export.torch_trt import torch_trt_blockers

    missing = torch_trt_blockers()
    return f"needs {'; '.join(missing)}" if missing else None


BACKENDS = {
    "compile": (_compile_backend, compiler_status),
    "aoti": (_aoti_backend, None),
    "onnxruntime": (_onnxruntime_backend, _onnxruntime_status),
    "tensorrt": (_tensorrt_backend, _tensorrt_status),
    "torch_tensorrt": (_torch_tensorrt_backend, _torch_tensorrt_status),
}

for _name, (_factory, _status) in BACKENDS.items():
    register_backend(_name, _factory, available=_status)
