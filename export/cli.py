"""The command-line options the exporters share (``python -m export.aoti / .onnx / .trt``)."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from export.settings import ExportModel, load_export_model

__all__ = ["base_parser", "load_model_from_args", "settings_kwargs", "setup_logging", "write_json"]


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--model", required=True,
                   help="a model folder (save_pretrained / export.convert output), an official checkpoint, or a "
                        "preset name (tiny, mid, wan2.1-t2v-1.3b) with --random-init")
    p.add_argument("--random-init", action="store_true", help="build the preset with random weights")
    p.add_argument("--out", required=True, type=Path, help="artifact folder to write")
    p.add_argument("--verify", action="store_true",
                   help="stream >= 4 chunks (past the first eviction) through the artifact and eager PyTorch "
                        "with the same noise; fail above 1e-4 (fp32) max abs error")
    p.add_argument("--latent-hw", nargs=2, type=int, metavar=("H", "W"), help="latent height and width")
    p.add_argument("--window", type=int, help="local_attn_size in latent frames (-1: global attention)")
    p.add_argument("--sink", type=int, help="sink frames kept in the window")
    p.add_argument("--chunk-frames", type=int, help="latent frames per chunk (num_frame_per_block)")
    p.add_argument("--num-frames", type=int, help="latent frames of the stream (global attention cache size)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--device", default="cpu", help="cpu | cuda[:N]")
    p.add_argument("--no-vae", action="store_true", help="export the DiT chunk step only")
    p.add_argument("--wan-dir", type=Path, help="the Wan2.1-T2V-1.3B folder (official checkpoints only)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init weights and of --verify noise")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    # The ONNX exporter's passes log every rewrite at INFO.
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.WARNING)


def load_model_from_args(args: argparse.Namespace, *, dtype: str | None = None) -> ExportModel:
    return load_export_model(args.model, random_init=args.random_init, latent_hw=args.latent_hw,
                             window=args.window, sink=args.sink, chunk_frames=args.chunk_frames,
                             include_vae=not args.no_vae, dtype=dtype or args.dtype, device=args.device,
                             wan_dir=args.wan_dir, seed=args.seed)


def settings_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """ExportSettings fields given on the command line."""
    return {"batch_size": args.batch, "dtype": args.dtype, "device": args.device, "num_frames": args.num_frames,
            "include_vae": not args.no_vae}


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def run_export(args: argparse.Namespace, make_settings: Callable[[], Any],
               export: Callable[[ExportModel, Path, Any], Any],
               verify: Callable[[ExportModel, Any, Any, int], list]) -> int:
    """The shared body of ``python -m export.aoti`` / ``export.onnx``: export, optionally verify
    (results recorded in the manifest), and map failures to exit code 1."""
    from export.manifest import update_manifest
    from export.verify import VerificationError, report

    log = logging.getLogger("export")
    setup_logging(args.verbose)
    try:
        settings = make_settings()
        model = load_model_from_args(args)
        manifest = export(model, args.out, settings)
        if args.verify:
            results = verify(model, manifest, settings, args.seed)
            update_manifest(args.out, verify=[r.to_dict() for r in results])
            report(results)
    except (ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 1
    except VerificationError as exc:
        log.error("verification failed: %s", exc)
        return 1
    log.info("wrote %s", args.out)
    return 0
