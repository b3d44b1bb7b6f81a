"""Parity with reference tensors computed by the official implementation.

``python -m sf_sdk.parity DIR`` checks every ``*.safetensors`` file in DIR (format in
../shared/golden/README.md) and prints one line per file with its worst relative error. Each
checker returns ``{name: (max_abs_error, reference_scale)}``; the relative error is their ratio.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

__all__ = ["FileResult", "check_file", "check_dir", "tolerance", "read_golden"]

# README tolerances: float64 below 1e-6, float32 below 1e-3 relative to the tensor's scale.
TOLERANCES = {torch.float64: 1e-6, torch.float32: 1e-3}


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCES[dtype]


@dataclass
class FileResult:
    path: Path
    kind: str
    errors: dict[str, tuple[float, float]]  # name -> (max abs error, reference scale)
    status: str  # "ok", "mismatch", "not implemented", "error"
    detail: str = ""

    @property
    def max_rel_error(self) -> float:
        if not self.errors:
            return float("nan")
        return max(err / max(scale, 1e-12) for err, scale in self.errors.values())

    @property
    def worst(self) -> str:
        if not self.errors:
            return "-"
        return max(self.errors, key=lambda k: self.errors[k][0] / max(self.errors[k][1], 1e-12))


def read_golden(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(metadata, weights without the ``weights.`` prefix, other tensors) of a golden file."""
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("json", "{}"))
        weights, tensors = {}, {}
        for key in f.keys():
            if key.startswith("weights."):
                weights[key[len("weights."):]] = f.get_tensor(key)
            else:
                tensors[key] = f.get_tensor(key)
    return meta, weights, tensors


def _kind(path: Path, meta: dict, tensors: dict) -> str:
    if "calls" in meta:
        return "dit_causal"
    if "denoising_step_list" in meta or "sigmas" in tensors:
        return "scheduler"
    if "flow_pred" in tensors:
        return "dit_bidirectional"
    if "z" in tensors and "video" in tensors:
        return "vae"
    if "ids" in tensors and "hidden" in tensors:
        return "t5"
    return "unknown"


def _checker(kind: str) -> Callable | None:
    if kind in ("dit_causal", "dit_bidirectional"):
        from sf_sdk.parity import dit

        return dit.check
    if kind == "scheduler":
        from sf_sdk.parity import scheduler

        return scheduler.check
    try:
        if kind == "vae":
            from sf_sdk.parity import vae

            return vae.check
        if kind == "t5":
            from sf_sdk.parity import t5

            return t5.check
    except ImportError:
        return None
    return None


def check_file(path: Path, dtype: torch.dtype = torch.float64) -> FileResult:
    path = Path(path)
    meta, _, tensors = read_golden(path)
    kind = _kind(path, meta, tensors)
    check = _checker(kind)
    if check is None:
        status = "unknown format" if kind == "unknown" else "not implemented"
        return FileResult(path, kind, {}, status)
    try:
        errors = check(path, dtype=dtype)
    except Exception as exc:  # reported, never swallowed: the command fails on it
        return FileResult(path, kind, {}, "error", f"{type(exc).__name__}: {exc}")
    res = FileResult(path, kind, errors, "ok")
    if not errors or not res.max_rel_error <= tolerance(dtype):
        res.status = "mismatch"
    return res


def check_dir(directory: Path, dtype: torch.dtype = torch.float64) -> list[FileResult]:
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {directory}")
    return [check_file(p, dtype) for p in files]
