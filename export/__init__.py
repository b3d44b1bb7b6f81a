"""Export of the streaming steps: torch.compile, AOTInductor, ONNX Runtime and TensorRT backends.

The DiT chunk step (:class:`sf_sdk.models.dit.ChunkStep`) and the VAE decode steps
(:class:`sf_sdk.models.vae.VAEDecodeStep`) are captured with their state (KV cache, conv cache)
as explicit tensors and static shapes, and run behind the same
:class:`~sf_sdk.StreamingGenerator` API as eager PyTorch (``backend="compile" | "aoti" |
"onnxruntime" | "tensorrt" | "torch_tensorrt"``; :mod:`export.backends` registers them).

Command line: ``python -m export.aoti``, ``export.onnx``, ``export.trt``, ``export.convert``,
``export.bench``; see ``docs/export.md``. Importing this package compiles and exports nothing.
"""

from __future__ import annotations

from export.manifest import Manifest, read_manifest
from export.runtime import BackendUnavailable, StepChunkModel, StepDecoder
from export.settings import (
    AOTISettings,
    ChunkShapes,
    DecodeShapes,
    ExportModel,
    ExportSettings,
    ONNXSettings,
    TRTSettings,
    load_export_model,
)

__all__ = [
    "AOTISettings",
    "BackendUnavailable",
    "ChunkShapes",
    "DecodeShapes",
    "ExportModel",
    "ExportSettings",
    "Manifest",
    "ONNXSettings",
    "StepChunkModel",
    "StepDecoder",
    "TRTSettings",
    "load_export_model",
    "read_manifest",
]
