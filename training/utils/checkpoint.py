"""Training checkpoints: one safetensors file per step, written atomically, exact resume.

A checkpoint ``ckpt-{step:08d}.safetensors`` holds every tensor of the training state under
prefixed names (``model.*``, ``optim.<name>.<param index>.<state key>``, ``ema.*``, ``rng.*``)
and, in the safetensors metadata, the JSON parts: the step, the run config, optimizer
hyper-parameters and the Python / NumPy RNG states. Files are written to a temporary name in the
same folder, fsynced and renamed, so a crash never leaves a truncated checkpoint under a real
name. Each rank stores its own RNG states in ``rng-rank{r}-{step:08d}.safetensors``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

__all__ = ["TrainState", "save_checkpoint", "load_checkpoint", "latest_step", "module_state", "atomic_save_file",
           "capture_rng", "restore_rng"]

log = logging.getLogger(__name__)

_CKPT = re.compile(r"ckpt-(\d{8})\.safetensors$")

# Test hook (tests/test_training_faults.py): "NAME:POINT" kills this process with SIGKILL while it
# writes the file NAME, at POINT: "written" (the temporary file is complete, not yet renamed) or
# "renamed" (the file is in place, nothing after it done), as a crash there would.
FAULT_ENV = "SF_TRAINING_FAULT"


def _fault_point(path: Path, point: str) -> None:
    if os.environ.get(FAULT_ENV) == f"{path.name}:{point}":
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class TrainState:
    """What a stage checkpoints: named modules, named optimizers, extra tensors and JSON."""

    step: int = 0
    modules: dict[str, nn.Module] = field(default_factory=dict)
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    tensors: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # e.g. EMA shadows
    meta: dict[str, Any] = field(default_factory=dict)


def atomic_save_file(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors ``save_file`` to a temp name in the same folder, fsync, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        _fault_point(path, "written")
        os.replace(tmp, path)
        _fault_point(path, "renamed")
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------------------------
# RNG states
# --------------------------------------------------------------------------------------------


def capture_rng() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The torch (CPU and CUDA) RNG states as tensors, Python's and NumPy's as JSON."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------------------------
# Optimizer state flattening
# --------------------------------------------------------------------------------------------


def _flatten_optimizer(name: str, opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{name}.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(name: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    prefix = f"optim.{name}."
    for key, value in tensors.items():
        if key.startswith(prefix):
            idx, sub = key[len(prefix):].split(".", 1)
            state.setdefault(int(idx), {})[sub] = value
    for idx, extra in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(extra)
    return {"state": state, "param_groups": meta["param_groups"]}


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------


def _ckpt_path(folder: Path, step: int) -> Path:
    return folder / f"ckpt-{step:08d}.safetensors"


def _rng_path(folder: Path, step: int, rank: int) -> Path:
    return folder / f"rng-rank{rank}-{step:08d}.safetensors"


def latest_step(folder: str | os.PathLike) -> int | None:
    """The step of the newest complete checkpoint in ``folder`` (None if there is none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    steps = [int(m.group(1)) for p in folder.iterdir() if (m := _CKPT.match(p.name))]
    return max(steps) if steps else None


def module_state(source: str | os.PathLike, name: str, *, device: str = "cpu") -> tuple[dict[str, Tensor], Path]:
    """One module's weights (``name``: a key of the stage's ``TrainState.modules``, e.g. ``"critic"``)
    from a checkpoint: ``source`` a ``ckpt-*.safetensors`` file, or a folder holding them (its
    newest; a stage folder's ``checkpoints/`` is looked into). Returns (state dict, the file)."""
    path = Path(source)
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        step = latest_step(folder)
        if step is None:
            raise FileNotFoundError(f"{source}: no checkpoint (ckpt-*.safetensors) in {folder}")
        path = _ckpt_path(folder, step)
    if not path.is_file():
        raise FileNotFoundError(f"{source} does not exist: name a checkpoint file or a folder of them")
    prefix = f"model.{name}."
    with safe_open(str(path), "pt", device=device) as f:
        state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{path.name} holds no {name} module ({prefix}*)")
    return state, path


def save_checkpoint(folder: str | os.PathLike, state: TrainState, config: dict[str, Any], *, rank: int = 0,
                    keep: int = 2) -> Path:
    """Write the checkpoint of ``state.step`` (model and optimizer from rank 0, RNG per rank).

    Modules must be the unwrapped ones (not DDP wrappers). Older checkpoints beyond ``keep``
    are removed once the new one is in place.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng_tensors, rng_meta = capture_rng()
    atomic_save_file(rng_tensors, _rng_path(folder, state.step, rank),
                     {"rng": json.dumps(rng_meta), "step": str(state.step)})
    path = _ckpt_path(folder, state.step)
    if rank != 0:
        return path
    tensors: dict[str, Tensor] = {}
    optim_meta: dict[str, Any] = {}
    for name, module in state.modules.items():
        tensors.update({f"model.{name}.{k}": v for k, v in module.state_dict().items()})
    for name, opt in state.optimizers.items():
        t, m = _flatten_optimizer(name, opt)
        tensors.update(t)
        optim_meta[name] = m
    for name, group in state.tensors.items():
        tensors.update({f"extra.{name}.{k}": v for k, v in group.items()})
    metadata = {
        "step": str(state.step),
        "config": json.dumps(config),
        "optim": json.dumps(optim_meta),
        "meta": json.dumps(state.meta),
    }
    atomic_save_file(tensors, path, metadata)
    _prune(folder, keep)
    log.info("saved checkpoint %s", path)
    return path


def _prune(folder: Path, keep: int) -> None:
    steps = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _CKPT.match(p.name)))
    for step in steps[:-keep]:
        _ckpt_path(folder, step).unlink(missing_ok=True)
        for p in folder.glob(f"rng-rank*-{step:08d}.safetensors"):
            p.unlink(missing_ok=True)


def load_checkpoint(folder: str | os.PathLike, state: TrainState, *, step: int | None = None, rank: int = 0,
                    restore_rng_state: bool = True) -> bool:
    """Load the newest (or ``step``) checkpoint of ``folder`` into ``state``, in place.

    Returns False when there is no checkpoint (a fresh start).
    """
    folder = Path(folder)
    step = latest_step(folder) if step is None else step
    if step is None:
        return False
    path = _ckpt_path(folder, step)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name, module in state.modules.items():
        prefix = f"model.{name}."
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(sd, strict=True)
    optim_meta = json.loads(meta["optim"])
    for name, opt in state.optimizers.items():
        opt.load_state_dict(_unflatten_optimizer(name, tensors, optim_meta[name]))
    for name in list(state.tensors):
        prefix = f"extra.{name}."
        state.tensors[name] = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    state.step = int(meta["step"])
    state.meta = json.loads(meta["meta"])
    rng_file = _rng_path(folder, step, rank)
    if restore_rng_state and rng_file.is_file():
        with safe_open(str(rng_file), "pt") as f:
            restore_rng({k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["rng"]))
    elif restore_rng_state:
        log.warning("no RNG state for rank %d at step %d; continuing with fresh RNG", rank, step)
    log.info("resumed from %s (step %d)", path, state.step)
    return True
