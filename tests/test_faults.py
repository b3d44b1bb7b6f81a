"""Fault tests: a process killed with SIGKILL (no handler, no cleanup) while it writes an MP4
leaves, under the output name, the previous file or no file, never a cut one; and the next run
writing that name takes the dead run's .part over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sf_sdk.video import Mp4Writer, read_video

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
PROMPT = "a red circle moving left"


def _wait_for_growth(proc: subprocess.Popen, part: Path, size: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not (part.exists() and part.stat().st_size > size):
        assert proc.poll() is None, f"the writer ended first (exit {proc.returncode})"
        assert time.monotonic() < deadline, f"{part} did not grow past {size} bytes"
        time.sleep(0.05)


def _previous(path: Path) -> bytes:
    with Mp4Writer(path, fps=8) as writer:
        writer.write(np.full((3, 16, 16, 3), 200, np.uint8))
    return path.read_bytes()


def _stream(model: Path, out: Path, frames: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sf_sdk", PROMPT, "--frames", str(frames), "--model", str(model),
                             "--output", str(out), "--overwrite", "--no-progress", "--threads", "1"], cwd=REPO,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_when_grown(proc: subprocess.Popen, part: Path, size: int) -> None:
    try:
        _wait_for_growth(proc, part, size)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_during_a_stream_never_leaves_a_cut_video(tiny_model_dir: Path, tmp_path: Path) -> None:
    """sf-generate killed a few chunks in: first with no file under the name (none is left), then,
    after a run that finished, over that file (it is left whole)."""
    out = tmp_path / "video.mp4"
    part = tmp_path / ".video.mp4.part"
    _kill_when_grown(_stream(tiny_model_dir, out, 3993), part, 3000)
    assert not out.exists()
    # The frames so far are not lost: the .part is a playable MP4 (its last fragment may be cut).
    assert read_video(part, allow_truncated=True).shape[1:] == (16, 16, 3)
    # The next run of the same output removes the dead run's .part and finishes.
    finished = _stream(tiny_model_dir, out, 9)
    _, err = finished.communicate(timeout=300)
    assert finished.returncode == 0, err
    assert "left by a writer" in err and read_video(out).shape[0] == 9 and not part.exists()
    before = out.read_bytes()
    _kill_when_grown(_stream(tiny_model_dir, out, 3993), part, 3000)
    assert out.read_bytes() == before


_WRITE_FOREVER = """
import sys
import numpy as np
from sf_sdk.video import Mp4Writer
rng = np.random.default_rng(0)
with Mp4Writer(sys.argv[1], fps=8) as writer:
    while True:  # noise frames: every write is a few kB, so a kill lands mid-write often
        writer.write(rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8))
"""


def test_sigkill_while_writing_frames_keeps_the_previous_file(tmp_path: Path) -> None:
    """A process that does nothing but write: killed at two sizes, the output is the previous
    video, whole, each time."""
    out = tmp_path / "clip.mp4"
    before = _previous(out)
    for size in (20_000, 400_000):
        proc = subprocess.Popen([sys.executable, "-c", _WRITE_FOREVER, str(out)], cwd=REPO, env=ENV)
        _kill_when_grown(proc, tmp_path / ".clip.mp4.part", size)
        assert out.read_bytes() == before, f"killed past {size} bytes"
        assert read_video(out).shape[0] == 3
