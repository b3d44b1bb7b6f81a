"""Convert a released checkpoint of the Self-Forcing family into an sf-sdk model folder.

    python -m export.convert --checkpoint self_forcing_dmd.pt --wan-dir Wan2.1-T2V-1.3B --out DIR
                             [--dtype bfloat16] [--no-ema] [--no-text-encoder]
                             [--family NAME] [--lora PATH --lora-scale X]

Causal Forcing(++), LongLive (its lora.pt beside the base is merged) and Reward Forcing files
convert the same way, with their authors' streaming defaults (the family comes from the
released file name, or --family; docs/models.md).

A thin command over :func:`sf_sdk.checkpoint.convert_official`. The folder it writes is what the
exporters (``python -m export.aoti / .onnx / .trt --model DIR``) and
``StreamingGenerator.from_pretrained(DIR)`` load, like the folders the training package writes:
training or conversion -> export -> generator is one path.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from export.cli import run_command_main
from sf_sdk.checkpoint.family import family_names
from sf_sdk.config import TEXT_PRESETS, VAE_PRESETS
from sf_sdk.exit_codes import CommandParser, check_output_folder

__all__ = ["main"]

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    p = CommandParser(prog="python -m export.convert", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="self_forcing_dmd.pt")
    p.add_argument("--wan-dir", required=True, type=Path, help="the Wan2.1-T2V-1.3B folder")
    p.add_argument("--out", required=True, type=Path, help="model folder to write")
    p.add_argument("--dtype", default="bfloat16", help="stored dtype: bfloat16 | float16 | float32")
    p.add_argument("--no-ema", action="store_true",
                   help="take 'generator' instead of 'generator_ema' (default: the entry the family's authors read)")
    p.add_argument("--family", choices=family_names(),
                   help="the checkpoint's family member (default: from its file name)")
    p.add_argument("--lora", type=Path, help="a LoRA (PEFT / LongLive) to merge into the DiT weights")
    p.add_argument("--lora-scale", type=float, default=1.0, help="LoRA strength (default 1)")
    p.add_argument("--no-text-encoder", action="store_true",
                   help="leave out the umT5 encoder (streams then need prompt embeddings)")
    p.add_argument("--vae-preset", choices=sorted(VAE_PRESETS),
                   help="VAE shape of the Wan folder's VAE file (default: the real Wan2.1 VAE)")
    p.add_argument("--text-preset", choices=sorted(TEXT_PRESETS),
                   help="text encoder shape of the Wan folder's umT5 file (default: umT5-XXL)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    return run_command_main(p.prog, lambda: _convert(args), verbose=args.verbose)


def _convert(args: argparse.Namespace) -> int:
    from sf_sdk.checkpoint import convert_official

    check_output_folder(args.out)
    out = convert_official(args.checkpoint, args.wan_dir, args.out, args.dtype,
                           use_ema=False if args.no_ema else None, family=args.family, lora=args.lora,
                           lora_scale=args.lora_scale, include_text_encoder=not args.no_text_encoder,
                           vae_config=VAE_PRESETS[args.vae_preset] if args.vae_preset else None,
                           text_config=TEXT_PRESETS[args.text_preset] if args.text_preset else None)
    log.info("wrote %s; export it with python -m export.aoti|onnx|trt --model %s --out ...", out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
