"""benchmarks/pool.py runs in-process on shapes-tiny and writes the JSON it promises (no timing
assertions: only that the figures exist, are positive, and count the frames the streams made)."""

from __future__ import annotations

import importlib.util
import json
from collections import defaultdict
from pathlib import Path

import torch

from sf_sdk.pool import TRANSITIONS, StreamPool

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_pool", REPO / "benchmarks" / "pool.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pool_benchmark_json_counts_the_frames_the_streams_produced(tmp_path: Path, monkeypatch) -> None:
    produced: dict[StreamPool, list[int]] = defaultdict(list)  # frames of every step, per pool
    step = StreamPool.step

    def counting_step(self: StreamPool):
        out = step(self)
        produced[self].append(sum(c.frames.shape[0] for c in out.values()))
        return out

    monkeypatch.setattr(StreamPool, "step", counting_step)
    out = tmp_path / "pool.json"
    code = _bench().main(["--model", "shapes-tiny", "--streams", "1,2", "--chunks", "2", "--warmup", "1",
                          "--backends", "eager", "--threads", "1", "--transition-streams", "1",
                          "--transition-repeats", "1", "--transition-before", "1", "--blend-chunks", "2",
                          "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["device"]["type"] == "cpu" and data["versions"]["torch"] == torch.__version__
    assert data["threads"] == 1 and data["config"]["model"] == "shapes-tiny"
    assert data["config"]["streaming"]["local_attn_size"] == 6 and set(data["definitions"]) >= {
        "aggregate_fps", "latency", "dit_p50_s", "decode_per_step_p50_s", "transitions"}
    sizes = data["results"]["eager"]["sizes"]
    assert set(sizes) == {"1", "2"}
    pools = list(produced)  # in creation order: N=1, N=2, then the transition pool
    chunk_frames = data["config"]["chunk_frames"]
    for n, pool in zip((1, 2), pools):
        r = sizes[str(n)]
        assert r["streams"] == n and r["steps"] == 2 and r["warmup_steps"] == 1
        timed = produced[pool][1:]  # after the warm-up step
        assert len(timed) == 2 and r["frames"] == sum(timed) == sum(r["frames_per_stream"]) == n * 2 * chunk_frames
        for key in ("wall_s", "aggregate_fps", "per_stream_fps", "latency_p50_s", "latency_p90_s", "step_p50_s",
                    "dit_p50_s", "decode_per_step_p50_s", "warmup_s", "speedup_vs_1", "dit_speedup_vs_1"):
            assert r[key] > 0, key
        assert r["latency_p50_s"] <= r["latency_p90_s"]
        assert abs(r["aggregate_fps"] - r["frames"] / r["wall_s"]) < 1e-9
        assert r["export_s"] is None
    assert sizes["1"]["speedup_vs_1"] == 1.0 and sizes["1"]["decode_bound_speedup"] > 0
    tr = data["transitions"]["sizes"]["1"]
    assert set(tr) == set(TRANSITIONS)
    assert tr["blend"]["blend_chunks"] == 2 and "blend_total_extra_ms" in tr["blend"]
    assert all(r["set_prompt_ms"] > 0 for r in tr.values())
    goal = data["goal"]["per_backend"]["eager"]
    assert goal["met"] is None and "N=8" in goal["why"]  # N=8 was not run
