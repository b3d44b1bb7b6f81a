"""benchmarks/long_motion.py and the evaluator's ``track``: positions as the strict checks see them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from training.data.shapes import ShapesConfig, make_clip, trajectory
from training.eval.shapes_bench import track

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import long_motion  # noqa: E402


def test_track_follows_the_rendered_trajectory() -> None:
    cfg = ShapesConfig(num_frames=81)
    clip = make_clip(0, 3, cfg, caption="a red square moving left")
    x, y = trajectory(clip.attributes, cfg)
    got = track(clip.frames)
    assert got.shape == (81, 2)
    np.testing.assert_allclose(got[:, 0], x, atol=0.3)
    np.testing.assert_allclose(got[:, 1], y, atol=0.3)
    blank = np.zeros((5, 64, 64, 3), dtype=np.uint8)
    assert np.isnan(track(blank)).all()


def test_axis_position_is_zero_at_the_captions_border() -> None:
    centroids = np.array([[2.0, 62.0], [62.0, 2.0]])
    np.testing.assert_allclose(long_motion.axis_position(centroids, "a red circle moving left"), [2 / 64, 62 / 64])
    np.testing.assert_allclose(long_motion.axis_position(centroids, "a red circle moving right"), [62 / 64, 2 / 64])
    np.testing.assert_allclose(long_motion.axis_position(centroids, "a red circle moving down"), [2 / 64, 62 / 64])
    s = long_motion.summarise(np.array([0.2, 0.6, np.nan, 0.7, 0.4]))
    assert s == {"far_half_share": 0.5, "middle_crossings": 2}


def test_the_benchmark_runs_the_bundled_model(tmp_path: Path) -> None:
    out, png = tmp_path / "m.json", tmp_path / "m.png"
    assert long_motion.main(["--models", "shapes-tiny", "--labels", "shipped", "--frames", "33", "--prompts", "a green circle moving up",
                             "--json", str(out), "--plot", str(png)]) == 0
    summary = json.loads(out.read_text())["summary"]
    assert set(summary) == {"rendered clip", "shipped"}
    for per in summary.values():
        entry = per["a green circle moving up"]
        assert 0.0 <= entry["far_half_share"] <= 1.0 and entry["middle_crossings"] >= 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_labels_must_name_each_model_once() -> None:
    for labels in (["a", "b"], ["rendered clip"]):
        with pytest.raises(SystemExit):
            long_motion.main(["--models", "shapes-tiny", "--labels", *labels])
