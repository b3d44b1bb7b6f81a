"""``python -m sf_sdk.parity DIR [--dtype float32|float64]``: check golden files, exit 1 on mismatch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sf_sdk.parity import check_dir, tolerance


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sf_sdk.parity", description=__doc__)
    parser.add_argument("directory", type=Path, help="folder of golden .safetensors files")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--allow-missing", action="store_true",
                        help="exit 0 when a file's module is not implemented yet (still reported)")
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        parser.error(f"{args.directory} is not a directory")
    dtype = getattr(torch, args.dtype)
    results = check_dir(args.directory, dtype)
    failed = False
    for r in results:
        if r.status == "ok" or r.status == "mismatch":
            line = (f"{r.status.upper():8s} {r.path.name:40s} max rel error {r.max_rel_error:.3e} "
                    f"(worst: {r.worst}; tolerance {tolerance(dtype):.0e}, {args.dtype})")
        else:
            line = f"{r.status.upper():8s} {r.path.name:40s} {r.detail}".rstrip()
        sys.stdout.write(line + "\n")
        if r.status == "not implemented" and args.allow_missing:
            continue
        failed |= r.status != "ok"
    sys.stdout.write(f"{sum(r.status == 'ok' for r in results)} of {len(results)} files match\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
