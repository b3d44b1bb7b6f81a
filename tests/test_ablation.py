"""benchmarks/ablation.py on toy sizes: the grid trains, exports, scores, resumes and tabulates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The smoke recipe at the shapes domain's 64x64 (the evaluator scores that size only).
DOMAIN = ["data.height=64", "data.width=64", "data.min_size=10", "data.max_size=14", "data.start_margin=16",
          "stream.latent_height=8", "stream.latent_width=8", "stream.local_attn_size=6"]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_ablation_grid_trains_scores_and_resumes(tmp_path: Path) -> None:
    base, out = tmp_path / "base", tmp_path / "grid"
    _run("-m", "training.train", "--config-name", "smoke", f"run_dir={base}", "stages=[vae,teacher]", *DOMAIN)
    cmd = ["benchmarks/ablation.py", "--base", str(base), "--out", str(out), "--config", "smoke", "--steps", "1",
           "--seeds", "0", "--layouts", "chunk", "--modes", "teacher_forcing", "self_forcing", "--frames", "9",
           "--captions", "1", "--json", str(tmp_path / "rows.json"), "--", *DOMAIN]
    table = _run(*cmd).stdout
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [r["row"] for r in rows] == ["chunk-TF-s0", "chunk-SF-s0"]
    for row in rows:
        assert 0.0 <= row["scores"]["9"] <= 1.0 and row["sec_per_iteration"] > 0
        assert (out / row["row"] / "model" / "model_index.json").is_file()
        assert (out / row["row"] / "ode_init").is_symlink()  # one ODE initialisation per layout
    assert "| TF + DMD | chunk-wise |" in table and "| SF + DMD | chunk-wise |" in table
    # The same command again trains and scores nothing: every stage and score is done.
    before = {p: p.stat().st_mtime for p in out.rglob("score-*.json")}
    assert _run(*cmd).stdout == table
    assert {p: p.stat().st_mtime for p in out.rglob("score-*.json")} == before


def test_lengths_that_are_not_whole_chunks_fail_before_training(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "benchmarks/ablation.py", "--base", str(tmp_path), "--out",
                           str(tmp_path / "grid"), "--frames", "33", "1000"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "--frames 1000 is not a whole number of chunks" in proc.stderr and "1005" in proc.stderr
    assert not (tmp_path / "grid").exists()  # nothing was started
