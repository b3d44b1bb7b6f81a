"""ONNX: the chunk and decode steps as ONNX graphs (dynamo exporter), run with ONNX Runtime.

    python -m export.onnx --model PATH_OR_PRESET [--random-init] --out DIR [--verify]

writes ``DIR/chunk_step.onnx`` (functional: the updated KV caches are outputs),
``DIR/vae_first.onnx``, ``DIR/vae_step.onnx`` and ``DIR/export.json``; every graph passes
``onnx.checker``. ``StreamingGenerator(..., backend="onnxruntime",
backend_options={"artifact_dir": DIR})`` streams with ONNX Runtime: inputs and outputs are bound
by pointer (I/O binding) to torch tensors, the caches ping-pong between two buffers, so nothing
is copied between calls.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from export.cli import base_parser, run_export, settings_kwargs
from export.manifest import Manifest, read_manifest, write_manifest
from export.runtime import BackendUnavailable, DecoderFactory, StepChunkModel, StepDecoder
from export.settings import (
    ChunkShapes,
    DecodeShapes,
    ExportModel,
    ONNXSettings,
    TensorSpec,
    attention_backend,
)
from export.steps import STEP_FILES, StepGraph, chunk_step_graph, decode_step_graphs
from export.verify import verify_chunk_model, verify_decoder
from sf_sdk.models.dit import CHUNK_BATCH_AXES

__all__ = ["export_onnx", "export_step_onnx", "load_onnxruntime", "OrtStep", "strip_float64", "main"]

log = logging.getLogger(__name__)

BACKEND = "onnx"
SUFFIX = ".onnx"


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_step_onnx(graph: StepGraph, path: Path, settings: ONNXSettings, *,
                     dynamic_batch: bool = False) -> float:
    """Export one step with the dynamo exporter, check it with onnx.checker; returns seconds."""
    import onnx

    t0 = time.perf_counter()
    large = _param_bytes(graph.module) > settings.external_data_bytes
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1024)
        dynamic_shapes = tuple(_batch_axes(name, arg, batch) for name, arg in zip(graph.input_names, graph.args))
    with torch.no_grad(), attention_backend(settings.attention):
        torch.onnx.export(graph.module, graph.args, str(path), dynamo=True, input_names=graph.input_names,
                          output_names=graph.output_names, opset_version=settings.opset, external_data=large,
                          dynamic_shapes=dynamic_shapes, optimize=True, verbose=False)
    onnx.checker.check_model(str(path), full_check=False)
    seconds = time.perf_counter() - t0
    log.info("ONNX %s -> %s in %.1f s%s", graph.name, path.name, seconds, " (external data)" if large else "")
    return seconds


def _batch_axes(name: str, arg: Tensor, batch: Any) -> dict[int, Any] | None:
    """The batch axis of each chunk-step / decode-step input (ChunkInputs declares the chunk step's)."""
    if name in CHUNK_BATCH_AXES:
        return {CHUNK_BATCH_AXES[name]: batch}
    return {0: batch}


def export_onnx(model: ExportModel, out_dir: str | os.PathLike, settings: ONNXSettings | None = None, *,
                backend: str = BACKEND, dynamic_batch: bool = False,
                extra: dict[str, Any] | None = None) -> Manifest:
    """Export the chunk step (and the decode steps) of ``model`` as ONNX into ``out_dir``."""
    settings = settings or ONNXSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # torch.export specializes size-1 dims: trace a dynamic batch axis with an example batch >= 2.
    example = dataclasses.replace(settings, batch_size=max(2, settings.batch_size)) if dynamic_batch else settings
    graphs = [chunk_step_graph(model, example, functional=True), *decode_step_graphs(model, example)]
    files, seconds = {}, {}
    for graph in graphs:
        name = STEP_FILES[graph.name] + SUFFIX
        seconds[graph.name] = round(export_step_onnx(graph, out / name, settings,
                                                     dynamic_batch=dynamic_batch), 2)
        files[graph.name] = name
    write_manifest(out, backend, model, settings, files, extra={"export_seconds": seconds, **(extra or {})})
    return read_manifest(out, backend)


def strip_float64(src: str | os.PathLike, dst: str | os.PathLike) -> int:
    """Rewrite every float64 tensor of an ONNX graph as float32 (TensorRT has no float64).

    The timestep embedding is computed in float64 in PyTorch; in float32 its angles (up to 1000
    rad) lose ~1e-4 rad, far below fp16/bf16 engine precision. Returns the number of rewrites.
    """
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(src), load_external_data=True)
    double, single = TensorProto.DOUBLE, TensorProto.FLOAT
    count = 0

    def fix_tensor(t: onnx.TensorProto) -> onnx.TensorProto:
        nonlocal count
        if t.data_type != double:
            return t
        count += 1
        arr = numpy_helper.to_array(t).astype("float32")
        return numpy_helper.from_array(arr, t.name)

    def fix_graph(g: onnx.GraphProto) -> None:
        nonlocal count
        for i, init in enumerate(g.initializer):
            g.initializer[i].CopyFrom(fix_tensor(init))
        for vi in (*g.input, *g.output, *g.value_info):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type == double:
                vi.type.tensor_type.elem_type = single
                count += 1
        for node in g.node:
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i == double:
                    attr.i = single
                    count += 1
                elif attr.type == onnx.AttributeProto.TENSOR:
                    attr.t.CopyFrom(fix_tensor(attr.t))
                elif attr.type == onnx.AttributeProto.GRAPH:
                    fix_graph(attr.g)
                elif attr.type == onnx.AttributeProto.INT and attr.name in ("dtype", "to") and attr.i == double:
                    attr.i = single
                    count += 1

    fix_graph(model.graph)
    for fn in model.functions:
        for node in fn.node:
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i == double:
                    attr.i = single
                    count += 1
    large = model.ByteSize() > (1 << 30)
    onnx.save(model, str(dst), save_as_external_data=large,
              location=Path(dst).name + ".data" if large else None)
    onnx.checker.check_model(str(dst), full_check=False)
    return count


# --------------------------------------------------------------------------------------------
# ONNX Runtime
# --------------------------------------------------------------------------------------------

_NP_TYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64", torch.float64: "float64"}


class OrtStep:
    """One ONNX graph in an ONNX Runtime session, run on torch tensors bound by pointer."""

    def __init__(self, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], *,
                 device: torch.device, providers: Sequence[Any] | None = None, threads: int | None = None) -> None:
        import numpy as np
        import onnxruntime as ort

        self.path = path
        self.device = device
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.log_severity_level = 3
        # Idle pool threads sleep instead of spinning: between the steps the eager decoder and the
        # sampler run on the same cores (spinning cost 1.5x end to end on 2 cores; docs/export.md).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if providers is None:
            if device.type == "cuda":
                stream = torch.cuda.current_stream(device).cuda_stream
                providers = [("CUDAExecutionProvider", {"device_id": device.index or 0,
                                                        "user_compute_stream": str(stream)})]
            else:
                providers = ["CPUExecutionProvider"]
        available = ort.get_available_providers()
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        missing = [n for n in names if n not in available]
        if missing:
            raise BackendUnavailable(f"ONNX Runtime here has no {missing} (available: {available}); install "
                                     f"onnxruntime-gpu for CUDA")
        self.session = ort.InferenceSession(str(path), opts, providers=list(providers))
        graph_inputs = {i.name for i in self.session.get_inputs()}
        graph_outputs = [o.name for o in self.session.get_outputs()]
        if graph_outputs != [o.name for o in outputs]:
            raise ValueError(f"{path.name} has outputs {graph_outputs}, expected {[o.name for o in outputs]}: "
                             f"re-export")
        # Inputs the exporter pruned (unused by the graph) are not bound.
        self.inputs = [(spec, spec.name in graph_inputs) for spec in inputs]
        self.outputs = outputs
        self._np = {dt: getattr(np, name) for dt, name in _NP_TYPES.items()}
        self._binding = self.session.io_binding()
        self._dev = ("cuda", device.index or 0) if device.type == "cuda" else ("cpu", 0)

    def _bind(self, bind, name: str, t: Tensor) -> None:
        if not t.is_contiguous():
            raise ValueError(f"{self.path.name}: {name} must be contiguous")
        bind(name, self._dev[0], self._dev[1], self._np[t.dtype], tuple(t.shape), t.data_ptr())

    def run(self, inputs: Sequence[Tensor], outputs: Sequence[Tensor]) -> None:
        """Run with ``inputs`` (in spec order) and write into the preallocated ``outputs``."""
        b = self._binding
        for (spec, used), t in zip(self.inputs, inputs):
            if used:
                self._bind(b.bind_input, spec.name, t)
        for spec, t in zip(self.outputs, outputs):
            self._bind(b.bind_output, spec.name, t)
        self.session.run_with_iobinding(b)


class OrtChunkStep:
    """The functional chunk step on ONNX Runtime: writes the new caches into the given buffers."""

    def __init__(self, step: OrtStep, shapes: ChunkShapes) -> None:
        self.step = step
        self.flow_shape = shapes.outputs()[0].shape

    def __call__(self, args: Sequence[Tensor], k_out: Tensor, v_out: Tensor) -> Tensor:
        x = args[0]
        flow = torch.empty(self.flow_shape, dtype=x.dtype, device=x.device)
        self.step.run(args, (flow, k_out, v_out))
        return flow


class OrtDecodeStep:
    """A decode step on ONNX Runtime; the conv cache ping-pongs between two sets of buffers."""

    def __init__(self, step: OrtStep, shapes: DecodeShapes, first_frame: bool) -> None:
        self.step = step
        self.pixels_shape = shapes.outputs(first_frame)[0].shape
        self._spare: tuple[Tensor, ...] | None = None

    def __call__(self, z: Tensor, cache: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        spare = self._spare
        if spare is None or any(s.data_ptr() == c.data_ptr() for s, c in zip(spare, cache)):
            spare = tuple(torch.empty_like(c) for c in cache)
        pixels = torch.empty(self.pixels_shape, dtype=z.dtype, device=z.device)
        self.step.run((z, *cache), (pixels, *spare))
        self._spare = cache
        return pixels, spare


def load_onnxruntime(manifest: Manifest, dit: torch.nn.Module, *, device: torch.device | str | None = None,
                     providers: Sequence[Any] | None = None, threads: int | None = None
                     ) -> tuple[StepChunkModel, DecoderFactory | None]:
    """The chunk model and (if exported) the streaming decoder of an ONNX folder, on ONNX Runtime."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailable("onnxruntime is not installed: pip install '.[onnx]'") from exc
    device = torch.device(device if device is not None else manifest.settings["device"])
    shapes = manifest.chunk_profile()
    if shapes.dtype not in _NP_TYPES:
        raise ValueError(f"ONNX Runtime runs float32 / float16 graphs, this one is {shapes.dtype}")
    t0 = time.perf_counter()
    step = OrtStep(manifest.path("chunk"), shapes.inputs(), shapes.outputs(), device=device, providers=providers,
                   threads=threads)
    model = StepChunkModel(dit, shapes, name="ONNX Runtime", functional=OrtChunkStep(step, shapes), device=device)
    make_decoder = None
    dshapes = manifest.decode_profile()
    if dshapes is not None:
        first, later = [OrtDecodeStep(OrtStep(manifest.path(name), dshapes.inputs(), dshapes.outputs(is_first),
                                              device=device, providers=providers, threads=threads),
                                      dshapes, is_first)
                        for name, is_first in (("vae_first", True), ("vae_step", False))]

        def make_decoder() -> StepDecoder:
            return StepDecoder(dshapes, first, later, device=device)
    log.info("ONNX Runtime sessions for %s ready in %.2f s", manifest.root, time.perf_counter() - t0)
    return model, make_decoder


def _verify(model: ExportModel, manifest: Manifest, settings: ONNXSettings, seed: int) -> list:
    chunk, make_decoder = load_onnxruntime(manifest, model.dit)
    results = [verify_chunk_model(model, chunk, settings, seed=seed)]
    if make_decoder is not None:
        results.append(verify_decoder(model, make_decoder(), settings, seed=seed))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser("python -m export.onnx", "ONNX export (dynamo) of the streaming steps, for ONNX Runtime")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    args = parser.parse_args(argv)
    return run_export(args, lambda: ONNXSettings(**settings_kwargs(args), opset=args.opset), export_onnx, _verify)


if __name__ == "__main__":
    sys.exit(main())
