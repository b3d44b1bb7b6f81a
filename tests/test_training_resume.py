"""Exact resume: N steps in one go equal N/2 steps, a restart, and N/2 more, bit for bit
(weights, optimizer moments, EMA), for the teacher and the self-forcing stages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.train import compose, run
from training.utils.config import TrainConfig

STEPS = 4


def _config(run_dir: Path, *overrides: str) -> TrainConfig:
    return compose("smoke", [f"run_dir={run_dir}", *overrides])


def _run(run_dir: Path, *overrides: str) -> None:
    run(_config(run_dir, *overrides))


def _assert_same(a: Path, b: Path) -> None:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs between {a} and {b}"


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("resume") / "base"
    _run(run_dir, "stages=[vae,teacher,ode_init]", "vae.steps=1", "teacher.steps=1", "ode_init.steps=1")
    return run_dir


def _copy(base: Path, dest: Path, drop: str) -> Path:
    import shutil

    shutil.copytree(base, dest, ignore=shutil.ignore_patterns(drop))
    return dest


@pytest.mark.parametrize("stage", ["teacher", "self_forcing"])
def test_resume_is_exact(base_run: Path, tmp_path: Path, stage: str) -> None:
    straight = _copy(base_run, tmp_path / "straight", stage)
    resumed = _copy(base_run, tmp_path / "resumed", stage)
    _run(straight, f"stages=[{stage}]", f"{stage}.steps={STEPS}")
    _run(resumed, f"stages=[{stage}]", f"{stage}.steps={STEPS // 2}")
    assert (resumed / stage / "checkpoints" / f"ckpt-{STEPS // 2:08d}.safetensors").is_file()
    _run(resumed, f"stages=[{stage}]", f"{stage}.steps={STEPS}")  # the same command, a larger budget
    name = f"ckpt-{STEPS:08d}.safetensors"
    _assert_same(straight / stage / "checkpoints" / name, resumed / stage / "checkpoints" / name)
    _assert_same(straight / stage / "final" / "dit.safetensors", resumed / stage / "final" / "dit.safetensors")


def test_resume_changes_nothing_when_done(base_run: Path) -> None:
    before = load_file(base_run / "teacher" / "final" / "dit.safetensors")
    _run(base_run, "stages=[teacher]", "teacher.steps=1")  # finished: skipped
    after = load_file(base_run / "teacher" / "final" / "dit.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unknown_config_key_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="no_such_field|not in struct|unknown keys"):
        _config(tmp_path, "teacher.no_such_field=1")
