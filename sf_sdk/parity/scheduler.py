"""Golden check of the flow-matching schedule."""

from __future__ import annotations

from pathlib import Path

import torch

from sf_sdk.parity import read_golden
from sf_sdk.scheduler import FlowMatchSchedule


def _err(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    if ours.shape != ref.shape:
        raise ValueError(f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}")
    return float((ours.double() - ref.double()).abs().max()), float(ref.double().abs().max())


def check(path: Path, dtype: torch.dtype = torch.float64) -> dict[str, tuple[float, float]]:
    meta, _, t = read_golden(path)
    sched = FlowMatchSchedule(shift=meta["shift"], num_train_timesteps=meta["num_train_timesteps"],
                              sigma_min=meta["sigma_min"], extra_one_step=meta["extra_one_step"])
    out = {
        "timesteps": _err(sched.timesteps, t["timesteps"]),
        "sigmas": _err(sched.sigmas, t["sigmas"]),
        "training_weight": _err(sched.weights, t["training_weight"]),
    }
    steps = meta["denoising_step_list"]
    warped = sched.warp(steps) if meta.get("warp_denoising_step", True) else [float(s) for s in steps]
    out["warped_denoising_steps"] = _err(torch.tensor(warped, dtype=torch.float64),
                                         t["warped_denoising_steps"])
    noisy = sched.add_noise(t["add_noise.clean"].to(dtype), t["add_noise.noise"].to(dtype),
                            t["add_noise.timestep"])
    out["add_noise"] = _err(noisy, t["add_noise.out"])
    return out
