"""The tiny decoder's decode steps (TAEHV, :mod:`sf_sdk.models.taehv`) as ONNX graphs, on ONNX Runtime.

    python -m export.tiny --model shapes-tiny --out DIR [--verify] [--decoder-path taew2_1.pth]

writes ``DIR/tiny_first.onnx`` (the stream's first latent frame, one pixel frame out),
``DIR/tiny_step.onnx`` (every later latent frame, ``temporal_stride`` frames out) and
``DIR/tiny_decoder.json`` (the decode profile, the weights' fingerprint). The steps are
:class:`~sf_sdk.models.taehv.TinyDecodeStep`: the signature of the Wan VAE's decode steps (one
latent frame, the MemBlocks' memory as explicit inputs and outputs), so the same runners
(:class:`export.onnx.OrtDecodeStep`, :class:`export.runtime.StepDecoder`) stream them.

The files may sit in the artifact folder of an ONNX export (``python -m export.onnx``): a generator
with ``decoder="tiny"`` and ``backend="onnxruntime"`` then decodes with them.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from export.settings import DecodeShapes, ExportModel, ONNXSettings, parse_dtype, weights_fingerprint
from export.steps import StepGraph
from export.verify import VerifyResult, verify_decoder
from sf_sdk.config import StreamingConfig
from sf_sdk.models.taehv import TAEHVDecoder, TinyDecodeStep

if TYPE_CHECKING:  # pragma: no cover
    from export.runtime import StepDecoder
    from sf_sdk.generator import StreamingGenerator

__all__ = ["TINY_STEP_FILES", "TINY_MANIFEST", "tiny_decode_shapes", "tiny_step_graphs", "export_tiny_onnx",
           "load_tiny_onnxruntime", "tiny_onnxruntime_decoder", "verify_tiny", "main"]

log = logging.getLogger(__name__)

TINY_STEP_FILES = {"tiny_first": "tiny_first.onnx", "tiny_step": "tiny_step.onnx"}
TINY_MANIFEST = "tiny_decoder.json"


def tiny_decode_shapes(tiny: TAEHVDecoder, streaming: StreamingConfig, *, dtype: torch.dtype = torch.float32
                       ) -> DecodeShapes:
    """The decode steps' static shapes: one stream, one latent frame per call."""
    return DecodeShapes.from_vae(tiny, streaming, batch=1, dtype=dtype)


def tiny_step_graphs(tiny: TAEHVDecoder, streaming: StreamingConfig, *, dtype: torch.dtype = torch.float32,
                     device: str = "cpu") -> list[StepGraph]:
    """The first-frame and later-frame tiny decode steps with example inputs."""
    shapes = tiny_decode_shapes(tiny, streaming, dtype=dtype)
    graphs = []
    for name, first in (("tiny_first", True), ("tiny_step", False)):
        step = TinyDecodeStep(tiny, first_frame=first).eval()
        z = torch.randn(shapes.inputs()[0].shape, device=device, dtype=dtype)
        memory = tuple(torch.rand(spec.shape, device=device, dtype=dtype) for spec in shapes.inputs()[1:])
        graphs.append(StepGraph(name, step, (z, *memory), shapes.input_names, shapes.output_names))
    return graphs


def export_tiny_onnx(tiny: TAEHVDecoder, streaming: StreamingConfig, out_dir: str | os.PathLike,
                     settings: ONNXSettings | None = None) -> Path:
    """Export the two tiny decode steps as ONNX into ``out_dir``; returns the manifest's path."""
    from export.onnx import export_step_onnx

    settings = settings or ONNXSettings()
    if settings.batch_size != 1:
        raise ValueError("the tiny decode steps decode one stream per call: export them with batch_size=1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A copy in the default layout (a loaded decoder's CPU weights are channels-last).
    tiny = copy.deepcopy(tiny).to(settings.device, settings.torch_dtype, memory_format=torch.contiguous_format).eval()
    seconds = {}
    for graph in tiny_step_graphs(tiny, streaming, dtype=settings.torch_dtype, device=settings.device):
        seconds[graph.name] = round(export_step_onnx(graph, out / TINY_STEP_FILES[graph.name], settings), 2)
    shapes = tiny_decode_shapes(tiny, streaming, dtype=settings.torch_dtype)
    manifest = {"files": TINY_STEP_FILES, "decode_profile": shapes.to_dict(), "settings": settings.to_dict(),
                "weights": weights_fingerprint(tiny), "export_seconds": seconds}
    path = out / TINY_MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def _read_shapes(data: dict[str, Any]) -> DecodeShapes:
    d = dict(data)
    d["dtype"] = parse_dtype(d["dtype"])
    d["latent_hw"], d["pixels_hw"] = tuple(d["latent_hw"]), tuple(d["pixels_hw"])
    d["cache"] = tuple((name, tuple(shape)) for name, shape in d["cache"])
    return DecodeShapes(**d)


def load_tiny_onnxruntime(folder: str | os.PathLike, *, tiny: TAEHVDecoder | None = None,
                          device: torch.device | str = "cpu", threads: int | None = None,
                          providers: Sequence[Any] | None = None) -> tuple[DecodeShapes, Any]:
    """(profile, make_decoder) of the tiny decode steps in ``folder`` on ONNX Runtime; with ``tiny``
    the weights must be those exported (else a ValueError: re-export)."""
    from export.onnx import OrtDecodeStep, OrtStep
    from export.runtime import StepDecoder

    folder = Path(folder)
    path = folder / TINY_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no tiny decoder export ({TINY_MANIFEST}): run python -m export.tiny")
    manifest = json.loads(path.read_text())
    if tiny is not None and manifest["weights"] != weights_fingerprint(tiny):
        raise ValueError(f"the tiny decoder steps in {folder} were exported from other weights: re-export them "
                         f"with python -m export.tiny")
    shapes = _read_shapes(manifest["decode_profile"])
    device = torch.device(device)
    first, later = [OrtDecodeStep(OrtStep(folder / manifest["files"][name], shapes.inputs(), shapes.outputs(is_first),
                                          device=device, providers=providers, threads=threads), shapes, is_first)
                    for name, is_first in (("tiny_first", True), ("tiny_step", False))]

    def make_decoder() -> StepDecoder:
        return StepDecoder(shapes, first, later, device=device)

    return shapes, make_decoder


def tiny_onnxruntime_decoder(artifact_dir: str | os.PathLike, gen: StreamingGenerator) -> Any | None:
    """The ONNX Runtime tiny decoder factory of an artifact folder for ``gen`` (None when the folder
    has no tiny decoder export)."""
    if not (Path(artifact_dir) / TINY_MANIFEST).is_file():
        return None
    shapes, make = load_tiny_onnxruntime(artifact_dir, tiny=gen.tiny_decoder, device=gen.device)
    if shapes.latent_hw != (gen.streaming.latent_height, gen.streaming.latent_width) or shapes.dtype != gen.dtype:
        raise ValueError(f"the tiny decoder steps in {artifact_dir} decode {shapes.latent_hw} latents in "
                         f"{shapes.dtype}, the generator streams {gen.streaming.latent_height}x"
                         f"{gen.streaming.latent_width} in {gen.dtype}: re-export them for this stream")
    return make


def verify_tiny(tiny: TAEHVDecoder, streaming: StreamingConfig, folder: str | os.PathLike,
                settings: ONNXSettings | None = None, *, seed: int = 0) -> VerifyResult:
    """Stream latent chunks through the exported steps and the eager tiny decoder; max abs error."""
    settings = settings or ONNXSettings()
    _, make = load_tiny_onnxruntime(folder, tiny=tiny, device=settings.device)
    # ExportModel only carries the decoder here: verify_decoder reads its vae, decode_shapes.
    model = ExportModel(dit=None, streaming=streaming, vae=tiny)  # type: ignore[arg-type]
    return verify_decoder(model, make(), settings, seed=seed, name="tiny_decoder")


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from export.cli import run_command_main
    from sf_sdk.exit_codes import CommandParser

    p = CommandParser(prog="python -m export.tiny", description="ONNX export of the tiny decoder's decode steps")
    p.add_argument("--model", required=True, help="a model folder or bundled name (its streaming config; its tiny "
                                                  "decoder unless --decoder-path)")
    p.add_argument("--decoder-path", type=Path, help="a TAEHV file (taew2_1.pth / .safetensors) to export instead")
    p.add_argument("--out", required=True, type=Path, help="artifact folder to write")
    p.add_argument("--verify", action="store_true", help="stream latents through ONNX Runtime and eager PyTorch; "
                                                         "fail above 1e-4 max abs error")
    p.add_argument("--seed", type=int, default=0)
    args: argparse.Namespace = p.parse_args(argv)
    return run_command_main(p.prog, lambda: _export(args), verbose=False)


def _export(args) -> int:
    """The body of ``python -m export.tiny`` (exit codes: :mod:`sf_sdk.exit_codes`)."""
    from sf_sdk.checkpoint import read_index
    from sf_sdk.checkpoint.taehv import load_folder_tiny_decoder, load_taehv
    from sf_sdk.exit_codes import check_output_folder

    check_output_folder(args.out)
    streaming = read_index(args.model).streaming
    tiny = load_taehv(args.decoder_path) if args.decoder_path else load_folder_tiny_decoder(args.model)
    settings = ONNXSettings()
    path = export_tiny_onnx(tiny, streaming, args.out, settings)
    log.info("wrote %s", path)
    if args.verify:
        result = verify_tiny(tiny, streaming, args.out, settings, seed=args.seed)
        log.info("%s: max abs error %.3g (tolerance %.3g) %s", result.step, result.max_abs_error, result.tolerance,
                 "ok" if result.ok else "FAILED")
        return 0 if result.ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
