"""benchmarks/gpu_check.py on the CPU: its CPU parts run and pass, every step is reached in a dry run,
the CUDA-only step skips with its reason, and a step past its time budget is reported as failed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _run(gpu_check, tmp_path: Path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "report.json"
    rc = gpu_check.main(["--cpu", "--json", str(out), *args])
    return rc, json.loads(out.read_text())


def test_cpu_parts_run_and_pass(gpu_check, tmp_path):
    rc, report = _run(gpu_check, tmp_path, "--steps", "environment,kernels_parity,stream_eager,preset_1.3b")
    steps = {s["step"]: s for s in report["steps"]}
    assert rc == 0 and report["ok"] and report["device"] == "cpu"
    assert list(steps) == ["environment", "kernels_parity", "stream_eager", "preset_1.3b"]
    assert steps["environment"]["result"]["torch"] == torch.__version__
    parity = steps["kernels_parity"]
    if parity["status"] == "skipped":  # no C++ compiler here: the reason says so
        assert "not loaded" in parity["reason"]
    else:
        assert parity["status"] == "ok" and parity["result"]["opcheck"] == "ok"
        errors, tol = parity["result"]["max_abs_error"], parity["result"]["tolerance"]
        assert sorted(errors) == ["bfloat16", "float16", "float32"]
        assert all(0 <= errors[d] <= tol[d] for d in errors)
        block = parity["result"]["block_ops_max_abs_error"]
        assert sorted(block) == ["gelu_tanh_", "grouped_rms_norm", "modulated_layer_norm"]
        assert all(0 <= e <= tol["float32"] for e in block.values())
    eager = steps["stream_eager"]
    assert eager["status"] == "ok" and eager["result"]["chunks"] == gpu_check.TINY_CHUNKS
    assert steps["preset_1.3b"]["status"] == "skipped" and "CUDA" in steps["preset_1.3b"]["reason"]
    assert all(s["seconds"] <= s["budget_s"] for s in report["steps"])


def test_dry_run_reaches_every_step(gpu_check, tmp_path):
    rc, report = _run(gpu_check, tmp_path, "--dry-run")
    assert rc == 0 and report["dry_run"]
    assert [s["step"] for s in report["steps"]] == [s.name for s in gpu_check.STEPS]
    for s in report["steps"]:
        assert s["status"] in ("ok", "skipped"), s
        if s["status"] == "skipped" and s["step"] != "environment":
            assert s["reason"].startswith("dry run") or "needs" in s["reason"], s
    # the CUDA-only step's configs are built in a dry run even without a GPU
    preset = next(s for s in report["steps"] if s["step"] == "preset_1.3b")
    assert preset["reason"].startswith("dry run: would stream wan2.1-t2v-1.3b")


def test_a_step_over_its_budget_fails(gpu_check, tmp_path):
    rc, report = _run(gpu_check, tmp_path, "--steps", "stream_eager", "--budget-scale", "0.0005")
    (step,) = report["steps"]
    assert rc == 1 and not report["ok"] and report["failed"] == ["stream_eager"]
    assert step["status"] == "failed" and "over budget" in step["error"]


def test_budgets_fit_eight_minutes(gpu_check):
    assert sum(s.budget_s for s in gpu_check.STEPS) <= 8 * 60


def test_unknown_step_is_an_error(gpu_check, tmp_path):
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--steps", "stream_eagr"])
    assert exc.value.code == 2
