"""Fragmented-MP4 writer: chunked writes, reading a growing file, surviving a killed writer,
odd sizes and input validation."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from sf_sdk.video import Mp4Writer, read_video

REPO = Path(__file__).resolve().parents[1]


def _smooth_frames(num: int, height: int = 48, width: int = 64, start: int = 0) -> np.ndarray:
    """Gradients that shift per frame: easy to compress, so decoded pixels stay close."""
    t = np.arange(start, start + num)[:, None, None]
    y = np.arange(height)[None, :, None]
    x = np.arange(width)[None, None, :]
    red = (x * 3 + t * 8) % 256
    green = (y * 4 + t * 5) % 256
    blue = np.broadcast_to(128 + 0 * t, red.shape)
    frames = np.stack(np.broadcast_arrays(red, green, blue), axis=-1)  # [T, H, W, 3]
    return np.clip(frames, 16, 235).astype(np.uint8)


def _close_to(decoded: np.ndarray, frames: np.ndarray) -> None:
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(np.int16) - frames).mean() < 4.0


def test_chunks_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "clip.mp4"
    frames = _smooth_frames(15)
    with Mp4Writer(path, fps=16) as writer:
        writer.write(frames[:5])
        writer.write(torch.from_numpy(frames[5:12]))  # torch chunks too
        writer.write(frames[12:12])  # an empty chunk is a no-op
        writer.write(frames[12:])
        assert writer.frames_written == 15 and writer.frame_size == (48, 64)
    decoded = read_video(path)
    _close_to(decoded, frames)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == Fraction(16) and stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert abs(container.duration / av.time_base - 15 / 16) < 1e-3


def test_growing_file_is_readable_before_close(tmp_path: Path) -> None:
    path = tmp_path / "live.mp4"
    frames = _smooth_frames(24)
    writer = Mp4Writer(path, fps=16)
    for k in range(3):
        writer.write(frames[8 * k:8 * (k + 1)])
        decoded = read_video(path)
        # Every frame but the most recent one is in the file after each chunk.
        assert writer.frames_written - 1 <= len(decoded) <= writer.frames_written
        _close_to(decoded, frames[:len(decoded)])
    writer.close()
    assert len(read_video(path)) == 24


def test_killed_writer_leaves_a_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "killed.mp4"
    frames = _smooth_frames(12)
    np.save(tmp_path / "frames.npy", frames)
    script = textwrap.dedent(f"""
        import os
        import numpy as np
        from sf_sdk.video import Mp4Writer
        writer = Mp4Writer({str(path)!r}, fps=16)
        frames = np.load({str(tmp_path / "frames.npy")!r})
        for k in range(3):
            writer.write(frames[4 * k:4 * (k + 1)])
        os._exit(0)  # no close(), no trailer, no Python-level cleanup
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, env=env, timeout=120)
    decoded = read_video(path)
    assert 11 <= len(decoded) <= 12
    _close_to(decoded, frames[:len(decoded)])


def test_exception_inside_with_keeps_the_frames(tmp_path: Path) -> None:
    path = tmp_path / "error.mp4"
    with pytest.raises(KeyError), Mp4Writer(path) as writer:
        writer.write(_smooth_frames(6))
        raise KeyError("generator failed")
    assert len(read_video(path)) == 6


def test_odd_sizes(tmp_path: Path) -> None:
    frames = _smooth_frames(4, height=33, width=47)
    with Mp4Writer(tmp_path / "odd.mp4") as writer:
        writer.write(frames)
        assert writer.encoded_size == (34, 48)
    decoded = read_video(tmp_path / "odd.mp4")
    assert decoded.shape == (4, 34, 48, 3)
    _close_to(decoded[:, :33, :47], frames)
    # The padding repeats the last row and column.
    assert np.abs(decoded[:, 33].astype(int) - decoded[:, 32]).mean() < 4.0
    with pytest.raises(ValueError, match="even"), Mp4Writer(tmp_path / "strict.mp4", odd_size="error") as strict:
        strict.write(frames)
    assert not (tmp_path / "strict.mp4").exists()


def test_bad_input(tmp_path: Path) -> None:
    frames = _smooth_frames(2)
    writer = Mp4Writer(tmp_path / "bad.mp4")
    with pytest.raises(ValueError, match="uint8"):
        writer.write(frames.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        writer.write(torch.zeros(2, 48, 64, 3))
    with pytest.raises(ValueError, match="rank 4"):
        writer.write(frames[0])
    with pytest.raises(ValueError, match="3 RGB channels"):
        writer.write(np.zeros((2, 48, 64, 4), np.uint8))
    with pytest.raises(ValueError, match="3 RGB channels"):
        writer.write(np.zeros((2, 3, 48, 64), np.uint8))
    with pytest.raises(ValueError, match="numpy array or a torch tensor"):
        writer.write(frames.tolist())
    writer.write(frames)
    with pytest.raises(ValueError, match="size changed mid-stream"):
        writer.write(_smooth_frames(2, height=32))
    writer.write(frames)  # the stream is still usable after a rejected chunk
    writer.close()
    writer.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        writer.write(frames)
    assert len(read_video(tmp_path / "bad.mp4")) == 4
    for kwargs in ({"fps": 0}, {"crf": 60}, {"odd_size": "crop"}, {"keyframe_interval": 0}):
        with pytest.raises(ValueError):
            Mp4Writer(tmp_path / "x.mp4", **kwargs)


def test_unused_writer_leaves_no_file_and_read_errors(tmp_path: Path) -> None:
    with Mp4Writer(tmp_path / "empty.mp4"):
        pass
    assert not (tmp_path / "empty.mp4").exists()
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    with pytest.raises(av.error.FFmpegError):
        read_video(junk)
