"""TensorRT: engines built from the ONNX export, run with device buffers on CUDA streams.

    python -m export.trt --model PATH_OR_PRESET [--random-init] --out DIR [--precision fp16|bf16|fp32]

1. exports the chunk and decode steps as ONNX (:mod:`export.onnx`) and rewrites their float64
   parts as float32 (TensorRT has no float64);
2. builds one engine per step with an optimization profile derived from the model config
   (static shapes per resolution / chunk / window; a batch range when asked), fp16 or bf16 with
   norms, softmax and the timestep embedding kept in fp32;
3. stores the engines in an engine cache keyed by GPU name, compute capability, TensorRT version
   and config hash, so a folder built on one GPU rebuilds (once) on another.

On a machine without a CUDA GPU, TensorRT or cuda-python it still writes the ONNX graphs, then
exits with code 2 and says what is missing (the ``tensorrt`` extra: ``pip install '.[tensorrt]'``).

``StreamingGenerator(..., backend="tensorrt", backend_options={"artifact_dir": DIR})`` runs the
engines: torch tensors are the device buffers (bound by address), the engines run on a CUDA stream
of their own (cuda-python) ordered against torch's stream with events, and the KV cache ping-pongs
between two buffers, so a chunk needs no host synchronization and no copy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from export.cli import base_parser, check_args, load_model_from_args, run_command_main, settings_kwargs
from export.manifest import Manifest, read_manifest, update_manifest
from export.onnx import export_onnx, strip_float64
from export.runtime import BackendUnavailable, DecoderFactory, StepChunkModel, StepDecoder
from export.settings import ChunkShapes, DecodeShapes, TensorSpec, TRTSettings, tolerance
from sf_sdk.exit_codes import check_output_folder
from sf_sdk.models.dit import CHUNK_BATCH_AXES

__all__ = ["export_trt", "build_engines", "load_tensorrt", "trt_blockers", "engine_key", "EngineProfile",
           "profiles_for", "main", "EXIT_UNAVAILABLE"]

log = logging.getLogger(__name__)

BACKEND = "tensorrt"
ENGINE_SUFFIX = ".engine"
TRT_ONNX_SUFFIX = ".trt.onnx"
# Exit code of `python -m export.trt` when the ONNX was written but engines cannot be built here.
EXIT_UNAVAILABLE = 2
_GIB = 1 << 30
# The dtype whose --verify tolerance applies to each engine precision.
# TensorRT 10 takes int64 engine inputs (write_slots, kv_len) and the dynamic-shape API used here.
MIN_TRT_MAJOR = 10
PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------
# What this machine has
# --------------------------------------------------------------------------------------------


def _cudart() -> Any:
    """The cuda-python runtime bindings (new and old module layouts)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart  # type: ignore[no-redef]
    return cudart


def trt_blockers() -> list[str]:
    """What is missing to build or run TensorRT engines here (empty when nothing is)."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False"
                       + (": this torch build has no CUDA" if torch.version.cuda is None else "") + ")")
    try:
        import tensorrt
    except ImportError:
        missing.append("the tensorrt Python package (pip install '.[tensorrt]')")
    else:
        if int(tensorrt.__version__.split(".")[0]) < MIN_TRT_MAJOR:
            missing.append(f"TensorRT >= {MIN_TRT_MAJOR} (int64 engine inputs; found {tensorrt.__version__})")
    try:
        _cudart()
    except ImportError:
        missing.append("cuda-python (pip install '.[tensorrt]')")
    return missing


# --------------------------------------------------------------------------------------------
# Profiles and the engine cache
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineProfile:
    """min / opt / max shape of every input of one engine (equal for static shapes)."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def to_dict(self) -> dict[str, list[list[int]]]:
        return {name: [list(s) for s in mmo] for name, mmo in self.shapes.items()}


def _batched(specs: list[TensorSpec], batches: tuple[int, int, int], batch_axis: dict[str, int | None]
             ) -> EngineProfile:
    out = {}
    for spec in specs:
        axis = batch_axis.get(spec.name, 0)
        shapes = []
        for b in batches:
            shape = list(spec.shape)
            if axis is not None and shape:
                shape[axis] = b
            shapes.append(tuple(shape))
        out[spec.name] = tuple(shapes)
    return EngineProfile(out)  # type: ignore[arg-type]


_CHUNK_BATCH_AXIS: dict[str, int | None] = dict(CHUNK_BATCH_AXES)


def profiles_for(chunk: ChunkShapes, decode: DecodeShapes | None, settings: TRTSettings) -> dict[str, EngineProfile]:
    """The optimization profile of each step, from the shape profiles of the configs."""
    batches = settings.batches
    out = {"chunk": _batched(chunk.inputs(), batches, _CHUNK_BATCH_AXIS)}
    if decode is not None:
        for name in ("vae_first", "vae_step"):
            out[name] = _batched(decode.inputs(), batches, {})
    return out


def engine_key(onnx_path: Path, profile: EngineProfile, settings: TRTSettings, device: int = 0) -> dict[str, Any]:
    """What an engine depends on: GPU name, compute capability, TensorRT version, config hash."""
    import tensorrt as trt

    digest = hashlib.sha256()
    with open(onnx_path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    data_file = onnx_path.with_name(onnx_path.name + ".data")
    if data_file.is_file():
        digest.update(str(data_file.stat().st_size).encode())
    config = {"onnx": digest.hexdigest()[:16], "profile": profile.to_dict(), "precision": settings.precision,
              "workspace_gib": settings.workspace_gib, "opt_level": settings.builder_optimization_level}
    major, minor = torch.cuda.get_device_capability(device)
    key = {"gpu": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}",
           "tensorrt": trt.__version__,
           "config_hash": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]}
    key["id"] = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return key


def _cache_dir(manifest_root: Path, settings: TRTSettings) -> Path:
    return Path(settings.cache_dir) if settings.cache_dir else manifest_root / "engines"


# --------------------------------------------------------------------------------------------
# Building engines
# --------------------------------------------------------------------------------------------


def _keep_fp32(network: Any, trt: Any) -> int:
    """Pin reductions, softmax, normalization and transcendental ops to fp32 (numerics of norms,
    attention and the timestep embedding); returns how many layers were pinned."""
    sensitive = {trt.LayerType.REDUCE, trt.LayerType.SOFTMAX, trt.LayerType.NORMALIZATION}
    unary_fp32 = {trt.UnaryOperation.EXP, trt.UnaryOperation.SQRT, trt.UnaryOperation.COS, trt.UnaryOperation.SIN,
                  trt.UnaryOperation.RECIP}
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        pin = layer.type in sensitive
        if layer.type == trt.LayerType.UNARY:
            layer.__class__ = trt.IUnaryLayer
            pin = layer.op in unary_fp32
        elif layer.type == trt.LayerType.ELEMENTWISE:
            layer.__class__ = trt.IElementWiseLayer
            pin = layer.op == trt.ElementWiseOperation.POW
        floating = all(layer.get_output(j).dtype in (trt.float16, trt.bfloat16, trt.float32)
                       for j in range(layer.num_outputs))
        if pin and floating:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def build_engine(onnx_path: Path, engine_path: Path, profile: EngineProfile, settings: TRTSettings) -> float:
    """Parse ``onnx_path`` and build a serialized engine into ``engine_path``; returns seconds."""
    import tensorrt as trt

    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_gib * _GIB))
    config.builder_optimization_level = settings.builder_optimization_level
    if settings.precision != "fp32":
        config.set_flag(trt.BuilderFlag.FP16 if settings.precision == "fp16" else trt.BuilderFlag.BF16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        log.info("%s: %d layers kept in fp32", onnx_path.name, _keep_fp32(network, trt))
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.shapes.items():
        tensor = next((network.get_input(i) for i in range(network.num_inputs)
                       if network.get_input(i).name == name), None)
        if tensor is None:
            continue  # an input the exporter pruned
        if any(d < 0 for d in tensor.shape):
            opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path.name} (see the log above)")
    engine_path.write_bytes(bytes(serialized))
    seconds = time.perf_counter() - t0
    log.info("TensorRT engine %s built in %.1f s", engine_path.name, seconds)
    return seconds


def build_engines(manifest: Manifest, settings: TRTSettings, *, device: int = 0) -> dict[str, Path]:
    """The engine of each step, from the engine cache or built now (and cached)."""
    cache = _cache_dir(manifest.root, settings)
    cache.mkdir(parents=True, exist_ok=True)
    profiles = profiles_for(manifest.chunk_profile(), manifest.decode_profile(), settings)
    engines = {}
    for step, profile in profiles.items():
        onnx_path = manifest.path(f"{step}_trt")
        key = engine_key(onnx_path, profile, settings, device)
        path = cache / f"{Path(manifest.files[step]).stem}-{key['id']}{ENGINE_SUFFIX}"
        meta = path.with_suffix(".json")
        if path.is_file() and meta.is_file() and json.loads(meta.read_text()).get("key") == key:
            log.info("engine cache hit: %s (%s, sm %s, TensorRT %s)", path.name, key["gpu"],
                     key["compute_capability"], key["tensorrt"])
        else:
            seconds = build_engine(onnx_path, path, profile, settings)
            meta.write_text(json.dumps({"key": key, "build_seconds": round(seconds, 1),
                                        "profile": profile.to_dict()}, indent=2) + "\n")
        engines[step] = path
    return engines


def export_trt(model, out_dir: str | os.PathLike, settings: TRTSettings | None = None) -> Manifest:
    """ONNX export plus the float32-only ONNX graphs TensorRT parses (no engine yet)."""
    settings = settings or TRTSettings()
    manifest = export_onnx(model, out_dir, settings, backend=BACKEND, dynamic_batch=settings.dynamic_batch)
    files = dict(manifest.files)
    for step, name in manifest.files.items():
        src = manifest.root / name
        dst = src.with_name(src.stem + TRT_ONNX_SUFFIX)
        rewrites = strip_float64(src, dst)
        log.info("%s: %d float64 tensors rewritten as float32 -> %s", name, rewrites, dst.name)
        files[f"{step}_trt"] = dst.name
    path = manifest.root / "export.json"
    data = json.loads(path.read_text())
    data["files"] = files
    data["trt_settings"] = {"precision": settings.precision, "workspace_gib": settings.workspace_gib,
                            "builder_optimization_level": settings.builder_optimization_level,
                            "batch_range": list(settings.batches)}
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return read_manifest(out_dir, BACKEND)


# --------------------------------------------------------------------------------------------
# Running engines
# --------------------------------------------------------------------------------------------


def _check(result: Any, what: str) -> Any:
    err = result[0] if isinstance(result, tuple) else result
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err} in {what}")
    return result[1] if isinstance(result, tuple) and len(result) > 1 else None


class TRTStep:
    """One engine with its execution context; runs on a private CUDA stream, ordered against torch's
    current stream with events (no host synchronization)."""

    def __init__(self, engine_path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 device: torch.device) -> None:
        import tensorrt as trt

        self.cudart = _cudart()
        self.device = device
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load {engine_path} (built by another TensorRT version?)")
        self.context = self.engine.create_execution_context()
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        self.inputs = [spec for spec in inputs if spec.name in names]
        self.outputs = outputs
        missing = [o.name for o in outputs if o.name not in names]
        if missing:
            raise ValueError(f"{engine_path.name} lacks outputs {missing}: rebuild it")
        cudart = self.cudart
        self.stream = _check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreate")
        flags = cudart.cudaEventDisableTiming
        self.ready = _check(cudart.cudaEventCreateWithFlags(flags), "cudaEventCreate")
        self.done = _check(cudart.cudaEventCreateWithFlags(flags), "cudaEventCreate")

    def run(self, inputs: Sequence[Tensor], outputs: Sequence[Tensor]) -> None:
        cudart, ctx = self.cudart, self.context
        for spec, t in zip(self.inputs, inputs):
            ctx.set_input_shape(spec.name, tuple(t.shape))
            ctx.set_tensor_address(spec.name, t.data_ptr())
        for spec, t in zip(self.outputs, outputs):
            ctx.set_tensor_address(spec.name, t.data_ptr())
        torch_stream = torch.cuda.current_stream(self.device).cuda_stream
        _check(cudart.cudaEventRecord(self.ready, torch_stream), "cudaEventRecord")
        _check(cudart.cudaStreamWaitEvent(self.stream, self.ready, 0), "cudaStreamWaitEvent")
        if not ctx.execute_async_v3(int(self.stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        _check(cudart.cudaEventRecord(self.done, self.stream), "cudaEventRecord")
        # torch's stream waits for the engine, so buffers freed afterwards are never reused early.
        _check(cudart.cudaStreamWaitEvent(torch_stream, self.done, 0), "cudaStreamWaitEvent")


class _InputsByName:
    """Select the engine's inputs (some may have been pruned) from the full input list."""

    def __init__(self, step: TRTStep, all_specs: list[TensorSpec]) -> None:
        kept = {s.name for s in step.inputs}
        self.index = [i for i, s in enumerate(all_specs) if s.name in kept]

    def __call__(self, values: Sequence[Tensor]) -> list[Tensor]:
        return [values[i] for i in self.index]


class TRTChunkStep:
    def __init__(self, step: TRTStep, shapes: ChunkShapes) -> None:
        self.step = step
        self.select = _InputsByName(step, shapes.inputs())
        self.flow_shape = shapes.outputs()[0].shape

    def __call__(self, args: Sequence[Tensor], k_out: Tensor, v_out: Tensor) -> Tensor:
        x = args[0]
        flow = torch.empty(self.flow_shape, dtype=x.dtype, device=x.device)
        self.step.run(self.select(args), (flow, k_out, v_out))
        return flow


class TRTDecodeStep:
    def __init__(self, step: TRTStep, shapes: DecodeShapes, first_frame: bool) -> None:
        self.step = step
        self.select = _InputsByName(step, shapes.inputs())
        self.pixels_shape = shapes.outputs(first_frame)[0].shape
        self._spare: tuple[Tensor, ...] | None = None

    def __call__(self, z: Tensor, cache: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        spare = self._spare
        if spare is None or any(s.data_ptr() == c.data_ptr() for s, c in zip(spare, cache)):
            spare = tuple(torch.empty_like(c) for c in cache)
        pixels = torch.empty(self.pixels_shape, dtype=z.dtype, device=z.device)
        self.step.run(self.select((z, *cache)), (pixels, *spare))
        self._spare = cache
        return pixels, spare


def load_tensorrt(manifest: Manifest, dit: torch.nn.Module, settings: TRTSettings, *,
                  device: torch.device | str = "cuda") -> tuple[StepChunkModel, DecoderFactory | None]:
    """The chunk model and decoder factory of a TensorRT folder (engines from the cache, or built)."""
    missing = trt_blockers()
    if missing:
        raise BackendUnavailable(f"the tensorrt backend needs {', '.join(missing)}")
    device = torch.device(device)
    if device.type != "cuda":
        raise BackendUnavailable(f"TensorRT engines run on CUDA devices, the generator is on {device}")
    engines = build_engines(manifest, settings, device=device.index or 0)
    shapes = manifest.chunk_profile()
    chunk = TRTStep(engines["chunk"], shapes.inputs(), shapes.outputs(), device)
    model = StepChunkModel(dit, shapes, name="TensorRT", functional=TRTChunkStep(chunk, shapes), device=device)
    make_decoder = None
    dshapes = manifest.decode_profile()
    if dshapes is not None and "vae_first" in engines:
        first = TRTDecodeStep(TRTStep(engines["vae_first"], dshapes.inputs(), dshapes.outputs(True), device),
                              dshapes, True)
        later = TRTDecodeStep(TRTStep(engines["vae_step"], dshapes.inputs(), dshapes.outputs(False), device),
                              dshapes, False)

        def make_decoder() -> StepDecoder:
            return StepDecoder(dshapes, first, later, device=device)
    return model, make_decoder


def settings_from_manifest(manifest: Manifest, **overrides: Any) -> TRTSettings:
    """The TRTSettings an artifact folder was exported with (engine options may be overridden)."""
    base = {k: v for k, v in manifest.settings.items() if k in TRTSettings.__dataclass_fields__}
    if base.get("batch_range") is not None:
        base["batch_range"] = tuple(base["batch_range"])
    base.update(overrides)
    return TRTSettings(**base)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser("python -m export.trt", "TensorRT engines of the streaming steps (via ONNX)")
    parser.add_argument("--precision", default="fp16", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--workspace-gib", type=float, default=4.0)
    parser.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0-5")
    parser.add_argument("--batch-range", nargs=3, type=int, metavar=("MIN", "OPT", "MAX"),
                        help="batch sizes of the optimization profile (dynamic batch axis)")
    parser.add_argument("--cache-dir", type=Path, help="engine cache (default: OUT/engines)")
    args = parser.parse_args(argv)
    return run_command_main(args.prog, lambda: _main(args), verbose=args.verbose)


def _main(args: argparse.Namespace) -> int:
    check_args(args)
    if args.cache_dir is not None:
        check_output_folder(args.cache_dir, "--cache-dir")
    kwargs = settings_kwargs(args)
    if kwargs["dtype"] != "float32":
        raise ValueError("--dtype must stay float32 for TensorRT (the ONNX graph); choose the engine "
                         "precision with --precision fp16 / bf16")
    settings = TRTSettings(**kwargs, precision=args.precision, workspace_gib=args.workspace_gib,
                           builder_optimization_level=args.opt_level,
                           batch_range=tuple(args.batch_range) if args.batch_range else None,
                           cache_dir=str(args.cache_dir) if args.cache_dir else None)
    model = load_model_from_args(args, dtype="float32")
    manifest = export_trt(model, args.out, settings)
    missing = trt_blockers()
    if missing:
        log.error("wrote the ONNX graphs to %s, but cannot build TensorRT engines here: missing %s. Run "
                  "`python -m export.trt` again on a machine with them (the engines are cached per GPU)",
                  args.out, "; ".join(missing))
        return EXIT_UNAVAILABLE
    engines = build_engines(manifest, settings)
    if args.verify:
        from export.verify import report, verify_chunk_model, verify_decoder

        chunk, make_decoder = load_tensorrt(manifest, model.dit.to("cuda"), settings)
        vsettings = TRTSettings(**{**kwargs, "device": "cuda"}, precision=args.precision)
        tol = tolerance(PRECISION_DTYPES[args.precision])
        model.dit = model.dit.to("cuda")
        if model.vae is not None:
            model.vae = model.vae.to("cuda")
        results = [verify_chunk_model(model, chunk, vsettings, seed=args.seed, tol=tol)]
        if make_decoder is not None:
            results.append(verify_decoder(model, make_decoder(), vsettings, seed=args.seed, tol=tol))
        update_manifest(args.out, verify=[r.to_dict() for r in results])
        report(results)  # a VerificationError: exit code 1
    log.info("engines: %s", {k: str(v) for k, v in engines.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
