"""benchmarks/cpu_eager.py runs both sides of each comparison and writes the JSON it promises (no
timing assertions: the two layouts really differ, the kernel switch really switches, and every chunk
after a stream's first is counted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_cpu_eager", REPO / "benchmarks" / "cpu_eager.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("compare", "sides"), [("layout", {"standard", "transposed"}),
                                               ("block-kernels", {"torch ops", "fused kernels"}),
                                               ("attention", {"kernel", "sdpa"})])
def test_cpu_eager_benchmark_times_both_sides(tmp_path: Path, compare: str, sides: set[str]) -> None:
    from sf_sdk import ops

    if compare in ("block-kernels", "attention") and ops.build(("cpu",))["cpu"] is None:
        pytest.skip(f"the CPU kernels are not built: {ops.unavailable_reason('cpu')}")
    bench = _bench()
    out = tmp_path / "bench.json"
    assert bench.main(["--compare", compare, "--config", "tiny", "--chunks", "3", "--rounds", "2",
                       "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["sides"]) == sides and result["compare"] == compare
    assert ops.block_kernels_available is bench._BLOCK_KERNELS_RULE  # the switch is put back
    for side in result["sides"].values():
        assert side["chunks"] == 2 * (3 - 1) and len(side["chunk_wall_s"]) == side["chunks"]
        assert side["median_s"] > 0
    assert result["speedup"] == pytest.approx(result["sides"][result["baseline"]]["median_s"]
                                              / result["sides"][result["chosen"]]["median_s"])
    if compare == "attention":  # the sides really run different attention, on one video
        assert 0 < result["latents_max_abs_diff"] < 1e-3


def test_standard_layout_undoes_the_generators_layout() -> None:
    from sf_sdk import StreamingGenerator

    bench = _bench()
    gen = StreamingGenerator.from_pretrained("shapes-tiny", backend="eager", load_text_encoder=False)
    assert bench._layout_of(gen) == "transposed"
    assert bench._layout_of(bench.standard_layout(gen)) == "standard"


def test_cpu_eager_benchmark_refuses_a_stream_with_nothing_to_count(capsys) -> None:
    with pytest.raises(SystemExit):
        _bench().main(["--chunks", "1"])
    assert "--chunks must be at least 2" in capsys.readouterr().err


def test_the_kernel_switch_switches(monkeypatch) -> None:
    from sf_sdk import ops

    bench = _bench()
    monkeypatch.setattr(ops, "block_kernels_available", ops.block_kernels_available)  # restored after the test
    monkeypatch.setattr(bench, "_BLOCK_KERNELS_RULE", lambda x: "rule")
    bench._block_kernels(False)
    assert ops.block_kernels_available(None) is False
    bench._block_kernels(True)
    assert ops.block_kernels_available(None) == "rule"
