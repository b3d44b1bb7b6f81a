"""A training stage killed with SIGKILL (mid-step at a random moment, and inside checkpoint writes)
and restarted with the same command ends with weights bit-identical to an uninterrupted run.

The stage is the smoke config's ``vae`` stage (tiny, a checkpoint every step). Kills inside a
write use the checkpoint module's test hook (``SF_TRAINING_FAULT=NAME:POINT``): after the
temporary file is complete but before its rename, and after a rename with nothing later done."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

from training.train import compose, run
from training.utils.checkpoint import FAULT_ENV, latest_step

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
OVERRIDES = ["stages=[vae]", f"vae.steps={STEPS}", "vae.ckpt_every_steps=1", "vae.stats_clips=1"]


def _command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "training.train", "--config-name", "smoke", f"run_dir={run_dir}", *OVERRIDES]


def _env(fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if fault is not None:
        env[FAULT_ENV] = fault
    return env


def _run_killed_by_hook(run_dir: Path, fault: str) -> None:
    proc = subprocess.run(_command(run_dir), cwd=REPO, env=_env(fault), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"expected a SIGKILL at {fault}, got {proc.returncode}: {proc.stderr[-2000:]}"


def _run_killed_after(run_dir: Path, first: int, last: int, rng: random.Random) -> None:
    """Start the stage; once checkpoint ``first`` exists, SIGKILL it after a random delay
    (somewhere in a training step or a checkpoint write), at the latest when checkpoint ``last``
    appears."""
    proc = subprocess.Popen(_command(run_dir), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = run_dir / "vae" / "checkpoints"
    deadline = time.monotonic() + 300
    while (latest_step(ckpts) or 0) < first and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    kill_at = time.monotonic() + rng.uniform(0.0, 1.0)
    while time.monotonic() < kill_at and (latest_step(ckpts) or 0) < last and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the stage finished before it could be killed"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _assert_identical(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys(), f"{a.name}: different tensors"
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{a.name}: {len(different)} tensors differ after the kills, e.g. {different[:3]}"


def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path: Path) -> None:
    straight, faulted = tmp_path / "straight", tmp_path / "faulted"
    run(compose("smoke", [f"run_dir={straight}", *OVERRIDES]))
    ckpts = faulted / "vae" / "checkpoints"
    rng = random.Random(18)

    # 1. inside the write of checkpoint 2: complete under its temporary name, never renamed
    _run_killed_by_hook(faulted, "ckpt-00000002.safetensors:written")
    assert latest_step(ckpts) == 1 and any(p.name.startswith(".ckpt-00000002") for p in ckpts.iterdir())
    # 2. at a random moment after checkpoint 3 (a training step, or the next write)
    _run_killed_after(faulted, 3, 5, rng)
    assert 3 <= (latest_step(ckpts) or 0) <= 5
    # 3. between the RNG file of step 6 and its checkpoint
    _run_killed_by_hook(faulted, "rng-rank0-00000006.safetensors:renamed")
    assert latest_step(ckpts) == 5 and (ckpts / "rng-rank0-00000006.safetensors").is_file()
    # 4. right after checkpoint 7 is in place, before the older ones are pruned
    _run_killed_by_hook(faulted, "ckpt-00000007.safetensors:renamed")
    assert latest_step(ckpts) == 7
    # 5. the same command once more: it resumes and finishes
    done = subprocess.run(_command(faulted), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    name = f"ckpt-{STEPS:08d}.safetensors"
    _assert_identical(straight / "vae" / "checkpoints" / name, ckpts / name)  # weights, optimizer, RNG
    _assert_identical(straight / "vae" / "final" / "vae.safetensors", faulted / "vae" / "final" / "vae.safetensors")
    assert (straight / "vae" / "final" / "vae_config.json").read_text() == \
        (faulted / "vae" / "final" / "vae_config.json").read_text()  # the latent statistics too
