"""``backend="torch_tensorrt"``: Torch-TensorRT (dynamo IR) compilation of the chunk step.

The chunk step is captured with ``torch.export`` (functional: updated caches are outputs) and
compiled by ``torch_tensorrt.dynamo.compile``: TensorRT runs the subgraphs it supports, PyTorch
the rest. The ``sf_sdk::`` custom ops (the cache-attention kernel, captured when
``attention="kernel"``) are always left to PyTorch (``torch_executed_ops``), and so is float64
(``truncate_double``). The compiled program is saved with ``torch_tensorrt.save`` into the
artifact folder and reloaded from there by later runs, without recompiling (the file name carries
the GPU, compute capability, Torch-TensorRT version and config hash). CUDA only.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from export.runtime import BackendUnavailable, StepChunkModel
from export.settings import (
    AttentionImpl,
    ChunkShapes,
    ExportModel,
    ExportSettings,
    attention_backend,
    config_hash,
)
from export.steps import chunk_step_graph
from sf_sdk.config import StreamingConfig, to_dict
from sf_sdk.models.dit import WanDiT

__all__ = ["TorchTRTSettings", "torch_trt_blockers", "load_or_compile", "CUSTOM_OPS"]

log = logging.getLogger(__name__)

# Ops TensorRT never sees: PyTorch runs them between TensorRT engines.
CUSTOM_OPS = ("torch.ops.sf_sdk.cache_attention.default", "torch.ops.sf_sdk.cache_write.default",
              "torch.ops.sf_sdk.cache_write_rope.default")


@dataclass(frozen=True)
class TorchTRTSettings:
    """Torch-TensorRT options. ``min_block_size``: smallest subgraph handed to TensorRT.
    ``attention="auto"`` captures the ``sf_sdk::cache_attention`` kernel where it is built and
    faster (it then runs in PyTorch between engines), the plain PyTorch attention otherwise."""

    attention: AttentionImpl = "auto"
    min_block_size: int = 3
    optimization_level: int = 3
    workspace_gib: float = 4.0

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in dataclasses.fields(cls)}


def torch_trt_blockers() -> list[str]:
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False"
                       + (": this torch build has no CUDA" if torch.version.cuda is None else "") + ")")
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError:
        missing.append("the torch-tensorrt package (pip install '.[tensorrt]', matching your torch version)")
    return missing


def _artifact_name(dit: WanDiT, stream: StreamingConfig, shapes: ChunkShapes, settings: TorchTRTSettings) -> str:
    import torch_tensorrt

    major, minor = torch.cuda.get_device_capability()
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    key = config_hash(to_dict(dit.config), to_dict(stream), shapes.to_dict(), dataclasses.asdict(settings),
                      torch_tensorrt.__version__, torch.__version__)
    return f"chunk_step-{gpu}-sm{major}{minor}-{key}.ep"


def _compile(dit: WanDiT, stream: StreamingConfig, shapes: ChunkShapes, settings: TorchTRTSettings) -> Any:
    import torch_tensorrt

    model = ExportModel(dit, stream)
    export_settings = ExportSettings(batch_size=shapes.batch, dtype=str(shapes.dtype).removeprefix("torch."),
                                     device="cuda", attention=settings.attention)
    graph = chunk_step_graph(model, export_settings, functional=True)
    with torch.no_grad(), attention_backend(settings.attention):
        program = torch.export.export(graph.module, graph.args, strict=False)
        wanted = {"arg_inputs": list(graph.args), "min_block_size": settings.min_block_size,
                  "torch_executed_ops": set(CUSTOM_OPS), "truncate_double": True,
                  "optimization_level": settings.optimization_level,
                  "workspace_size": int(settings.workspace_gib * (1 << 30)), "use_explicit_typing": True}
        accepted = inspect.signature(torch_tensorrt.dynamo.compile).parameters
        kwargs = {k: v for k, v in wanted.items() if k in accepted}
        compiled = torch_tensorrt.dynamo.compile(program, **kwargs)
    return compiled, graph.args


def load_or_compile(dit: WanDiT, stream: StreamingConfig, shapes: ChunkShapes, settings: TorchTRTSettings,
                    artifact_dir: Path | None) -> StepChunkModel:
    """A chunk model over the Torch-TensorRT program: loaded from ``artifact_dir`` if it holds one for this
    GPU and config, else compiled (and saved there)."""
    missing = torch_trt_blockers()
    if missing:
        raise BackendUnavailable(f"the torch_tensorrt backend needs {', '.join(missing)}")
    import torch_tensorrt

    if dit.patch_embedding.weight.device.type != "cuda":
        raise BackendUnavailable("the torch_tensorrt backend runs on CUDA: load the generator with device='cuda'")
    if settings.attention != "reference":
        import sf_sdk.ops  # noqa: F401  (the custom ops the program calls)
    path = artifact_dir / _artifact_name(dit, stream, shapes, settings) if artifact_dir is not None else None
    t0 = time.perf_counter()
    if path is not None and path.is_file():
        module = torch_tensorrt.load(str(path)).module()
        log.info("loaded the Torch-TensorRT program %s in %.1f s (no recompilation)", path.name,
                 time.perf_counter() - t0)
    else:
        compiled, args = _compile(dit, stream, shapes, settings)
        log.info("Torch-TensorRT compiled the chunk step in %.1f s", time.perf_counter() - t0)
        module = compiled
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch_tensorrt.save(compiled, str(path), output_format="exported_program", arg_inputs=list(args))
            path.with_suffix(".json").write_text(json.dumps({"shapes": shapes.to_dict(),
                                                             "settings": dataclasses.asdict(settings)},
                                                            indent=2) + "\n")
            log.info("saved %s", path)

    def run(args: list[Tensor], k_out: Tensor, v_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # The program allocates its outputs; they become the cache buffers (no copy).
        with attention_backend(settings.attention):
            flow, new_k, new_v = module(*args)
        return flow, new_k, new_v

    return StepChunkModel(dit, shapes, name="Torch-TensorRT", functional=run)
