"""benchmarks/serve_load.py (a real sf-serve on loopback, one client) and benchmarks/transport.py run
in-process and write the JSON they promise. No timing assertions beyond frames having arrived."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_serve_load_one_client_json(tmp_path: Path) -> None:
    for name in ("websockets", "starlette", "uvicorn"):
        pytest.importorskip(name)
    out = tmp_path / "serve_load.json"
    bench = _bench("serve_load")
    code = bench.main(["--clients", "1", "--seconds", "3", "--threads", "1", "--switch-repeats", "1",
                       "--json", str(out)])
    data = json.loads(out.read_text())
    assert code == 0
    assert data["benchmark"] == "serve_load" and data["versions"]["websockets"]
    assert data["machine"]["cores"] >= 1 and data["config"]["host"] == "127.0.0.1"
    assert set(data["definitions"]) >= {"fps", "interval_ms", "latency_ms", "dropped", "errors", "rss_mb",
                                        "where_time_goes", "switch", "warmup_s"}
    run = data["runs"]["1"]
    assert "failure" not in run and run["errors"] == 0
    (client,) = run["clients"]
    assert client["errors"] == 0 and client["error_messages"] == []
    assert client["fps"] > 0 and client["frames"] == round(client["fps"] * run["window_s"])
    for key in ("interval_p50_ms", "interval_p95_ms", "interval_p99_ms", "latency_p50_ms", "latency_p95_ms",
                "ttff_s", "warmup_s"):
        assert client[key] is not None and client[key] > 0, key
    assert client["interval_p50_ms"] <= client["interval_p95_ms"] <= client["interval_p99_ms"]
    assert client["dropped"] >= 0 and run["chunk_frames"] == 12 and run["fps_video"] == 16
    server = run["server"]
    assert server["exit_code"] == 0 and server["device"] == "cpu" and server["threads"] == 1
    assert server["rss_start_mb"] > 0 and server["rss_end_mb"] > 0 and server["rss_growth_mb"] is not None
    assert run["metrics"]["frames_sent"] >= client["frames_total"] > 0 and run["metrics"]["frames_dropped"] >= 0
    work = run["where_time_goes"]
    assert work["steps"] > 0 and work["step_mean_s"] > 0 and work["budget_s"] == 12 / 16
    assert work["dit_per_step_s"] > 0 and work["decode_per_step_s"] > 0 and work["encode_per_step_s"] > 0
    switch = run["switch"]
    assert switch["repeats"] == 1 and switch["runs"][0]["version"] == 2 and switch["total_ms"] > 0
    goals = data["goals"]
    assert set(goals) == {"real_time", "smooth", "memory", "errors"}
    assert goals["errors"]["met"] is True and goals["real_time"]["met"] is None  # 8 clients were not run


def test_transport_json(tmp_path: Path) -> None:
    out = tmp_path / "transport.json"
    bench = _bench("transport")
    assert bench.main(["--chunks", "2", "--repeats", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    cfg = data["config"]
    assert cfg["chunk_sizes"] == [9, 12] and cfg["frames"] == 21 and cfg["frame_size"] == [64, 64]
    assert cfg["raw_bytes"] == 64 * 64 * 3 and cfg["fps"] == 16
    assert "out_of_scope" in data["definitions"] and data["versions"]["pillow"]
    assert set(data["images"]) == set(bench.IMAGE_CODECS)
    for name, r in data["images"].items():
        assert r["frames"] == 21 and r["encode_ms_p50"] > 0 and 0 < r["bytes_p50"] < cfg["raw_bytes"] * 2, name
        assert r["added_latency_s"] == 0
    assert data["images"]["png"]["lossless"] and data["images"]["webp_lossless"]["lossless"]
    assert data["images"]["jpeg_q90"]["psnr_db"] > 25 and not data["images"]["jpeg_q90"]["lossless"]
    mp4 = data["mp4"]
    assert mp4["chunks"] == 2 and mp4["chunk_frames"] == 12 and mp4["frames_written"] == 21
    assert mp4["encode_s_p50"] > 0 and mp4["bytes_per_chunk_p50"] > 0 and mp4["file_bytes"] > 0
    assert mp4["written_after_write"] == [9, 21] and len(mp4["readable_after_write"]) == 2
    assert mp4["added_latency_s"] == 12 / 16 and mp4["psnr_db"] > 25
