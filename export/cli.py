"""The command-line options the exporters share (``python -m export.aoti / .onnx / .trt``).

Every export command ends with the project's exit codes (:mod:`sf_sdk.exit_codes`): 0 done, 1 a
failure (the export or its verification failed), 2 a mistake in the command (a bad value, a
missing model, an ``--out`` that is a file or not writable, an unknown or absent ``--device``),
130 / 143 stopped by SIGINT / SIGTERM; each error is one line on stderr (``-v`` logs the
traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from export.settings import ExportModel, load_export_model
from sf_sdk.exit_codes import EXIT_OK, CommandParser, StopSignals, UserError, check_output_folder, run_command

__all__ = ["base_parser", "check_args", "load_model_from_args", "run_command_main", "settings_kwargs",
           "setup_logging", "write_json"]

TRACEBACK_HINT = "rerun with -v for the traceback"


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = CommandParser(prog=prog, description=description)
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
    p.set_defaults(prog=prog)
    return p


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    # The ONNX exporter's passes log every rewrite at INFO.
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.WARNING)


def check_device(device: str, option: str = "--device") -> None:
    """A device this machine has (cpu, cuda, cuda:N), else :class:`UserError`."""
    from sf_sdk.generator import _parse_device

    try:
        _parse_device(device)
    except ValueError as exc:
        raise UserError(f"{option}: {exc}") from None


def check_args(args: argparse.Namespace) -> None:
    """The checks of the shared options that need no model: ``--out`` and ``--device``."""
    check_output_folder(args.out)
    check_device(args.device)


def run_command_main(prog: str, body: Callable[[], int], *, verbose: bool) -> int:
    """An export command's body under the project's exit codes (:func:`sf_sdk.exit_codes.run_command`)."""
    setup_logging(verbose)

    def run(signals: StopSignals) -> int:
        return body()

    return run_command(prog, run, traceback_hint=TRACEBACK_HINT)


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
    """The shared body of ``python -m export.aoti`` / ``export.onnx``: check the options, export,
    optionally verify (results recorded in the manifest); exit codes as in the module docstring
    (a failed verification is a failure, 1)."""
    from export.manifest import update_manifest
    from export.verify import report

    def body() -> int:
        check_args(args)
        settings = make_settings()
        model = load_model_from_args(args)
        manifest = export(model, args.out, settings)
        if args.verify:
            results = verify(model, manifest, settings, args.seed)
            update_manifest(args.out, verify=[r.to_dict() for r in results])
            report(results)
        logging.getLogger("export").info("wrote %s", args.out)
        return EXIT_OK

    return run_command_main(args.prog, body, verbose=args.verbose)
