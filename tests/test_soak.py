"""benchmarks/soak.py in its short form: both parts run on shapes-tiny, every sample has its
figures, the frames counted are the frames the streams made, and no chunk holds NaN."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _soak():
    spec = importlib.util.spec_from_file_location("bench_soak", REPO / "benchmarks" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_soak_short_run_writes_its_samples(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    code = _soak().main(["--latent-frames", "24", "--sample-every", "12", "--pool-streams", "2", "--max-chunks", "3",
                         "--threads", "1", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["complete"] and report["device"]["type"] == "cpu"
    for name in ("stream", "pool"):
        part = report["parts"][name]
        assert part["nan_chunks"] == 0
        assert 24 <= part["frames"] < 24 + 2 * 3  # stops within a step of the goal
        assert [s["frames"] >= 12 * (i + 1) for i, s in enumerate(part["samples"])] == [True] * len(part["samples"])
        assert len(part["samples"]) == 2
        for s in part["samples"]:
            assert s["rss_mb"] > 0 and 0 < s["chunk_p50_ms"] <= s["chunk_p90_ms"] and s["chunk_cpu_p50_ms"] > 0
        assert part["rss_growth_mb"] == round(part["samples"][-1]["rss_mb"] - part["samples"][0]["rss_mb"], 1)
    assert report["parts"]["stream"]["chunks"] == 8  # 3 latent frames per chunk
    assert report["parts"]["pool"]["streams_opened"] >= 2
