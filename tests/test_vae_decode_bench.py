"""benchmarks/vae_decode.py --tiny runs every side it promises, in the generator's dtype and on ONNX
Runtime in float32 (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_tiny_decoder_benchmark_runs_every_side_with_onnx() -> None:
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "vae_decode.py"), "--tiny", "--chunks", "2",
                          "--streams", "1", "--repeats", "1", "--onnx", "--dtype", "bfloat16", "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["dtype"] == "bfloat16" and result["onnxruntime_dtype"] == "float32"
    assert set(result["seconds_per_chunk"]) == {"wan", "tiny", "wan_frame_passes", "wan_onnxruntime",
                                                "tiny_onnxruntime"}
    assert all(sec > 0 for sec in result["seconds_per_chunk"].values())
    assert result["psnr_tiny_vs_wan_db"] > 15  # the tiny decoder draws the same video
