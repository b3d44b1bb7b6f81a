"""benchmarks/cpu_layout.py runs both layouts and writes the JSON it promises (no timing
assertions: the two sides really differ in layout, and every chunk after a stream's first is counted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_cpu_layout", REPO / "benchmarks" / "cpu_layout.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_layout_benchmark_times_both_layouts(tmp_path: Path) -> None:
    bench = _bench()
    out = tmp_path / "layout.json"
    assert bench.main(["--config", "tiny", "--chunks", "3", "--rounds", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["sides"]) == {"standard", "transposed"}
    for side in result["sides"].values():
        assert side["chunks"] == 2 * (3 - 1) and len(side["chunk_wall_s"]) == side["chunks"]
        assert side["median_s"] > 0
    assert result["speedup"] == pytest.approx(result["sides"]["standard"]["median_s"]
                                              / result["sides"]["transposed"]["median_s"])


def test_standard_layout_undoes_the_generators_layout() -> None:
    from sf_sdk import StreamingGenerator

    bench = _bench()
    gen = StreamingGenerator.from_pretrained("shapes-tiny", backend="eager", load_text_encoder=False)
    assert bench._layout_of(gen) == "transposed"
    assert bench._layout_of(bench.standard_layout(gen)) == "standard"


def test_cpu_layout_benchmark_refuses_a_stream_with_nothing_to_count(capsys) -> None:
    with pytest.raises(SystemExit):
        _bench().main(["--chunks", "1"])
    assert "--chunks must be at least 2" in capsys.readouterr().err
