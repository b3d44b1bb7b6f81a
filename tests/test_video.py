"""Fragmented-MP4 writer: chunked writes, reading a growing file, surviving a killed writer,
odd sizes, input validation, and how the output file is written (a locked .part renamed at the
end: no overwrite unless asked, one writer per output, a full disk leaves nothing behind)."""

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
        assert not path.exists()  # the output name appears only when the video is finished
        decoded = read_video(writer.temp_path)
        # Every frame but the most recent one is in the file after each chunk.
        assert writer.frames_written - 1 <= len(decoded) <= writer.frames_written
        _close_to(decoded, frames[:len(decoded)])
    writer.close()
    assert len(read_video(path)) == 24 and not writer.temp_path.exists()


def test_killed_writer_leaves_a_valid_part_file(tmp_path: Path) -> None:
    """No close(): the output name never appears; the .part holds a playable video of the frames so
    far, and the next writer of that name takes the stale .part over."""
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
    assert not path.exists()
    part = path.with_name(".killed.mp4.part")
    decoded = read_video(part)
    assert 11 <= len(decoded) <= 12
    _close_to(decoded, frames[:len(decoded)])
    with Mp4Writer(path, fps=16) as writer:  # the dead writer's lock is gone: its .part is replaced
        writer.write(frames[:3])
    assert len(read_video(path)) == 3 and not part.exists()


def test_an_error_inside_with_leaves_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "error.mp4"
    with Mp4Writer(path) as writer:
        writer.write(_smooth_frames(4))
    before = path.read_bytes()
    with pytest.raises(KeyError), Mp4Writer(path) as writer:
        writer.write(_smooth_frames(6))
        raise KeyError("generator failed")
    assert path.read_bytes() == before and not writer.temp_path.exists()


def test_ctrl_c_inside_with_keeps_the_frames(tmp_path: Path) -> None:
    path = tmp_path / "stopped.mp4"
    with pytest.raises(KeyboardInterrupt), Mp4Writer(path) as writer:
        writer.write(_smooth_frames(6))
        raise KeyboardInterrupt
    assert len(read_video(path)) == 6 and not writer.temp_path.exists()


def test_overwrite_false_refuses_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "keep.mp4"
    with Mp4Writer(path) as writer:
        writer.write(_smooth_frames(2))
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        Mp4Writer(path, overwrite=False)
    # The name appearing while a video is written: the rename refuses it and the new video goes.
    late = tmp_path / "late.mp4"
    writer = Mp4Writer(late, overwrite=False)
    writer.write(_smooth_frames(3))
    late.write_bytes(before)
    with pytest.raises(FileExistsError, match="created by another program"):
        writer.close()
    assert late.read_bytes() == before and not writer.temp_path.exists()
    with Mp4Writer(path, overwrite=True) as writer:  # replaced only once the new one is finished
        writer.write(_smooth_frames(5))
        assert path.read_bytes() == before
    assert len(read_video(path)) == 5
    with pytest.raises(IsADirectoryError, match="is a folder"):
        Mp4Writer(tmp_path)


def test_one_writer_per_output(tmp_path: Path) -> None:
    """A second writer of the same output, in another process, fails at once while the first writes;
    once the first has finished, the name is free again."""
    path = tmp_path / "shared.mp4"
    first = Mp4Writer(path)
    first.write(_smooth_frames(2))
    script = f"from sf_sdk.video import Mp4Writer\nMp4Writer({str(path)!r})\n"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    second = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert second.returncode != 0 and "another process is writing" in second.stderr, second.stderr
    with pytest.raises(FileExistsError, match="another process is writing"):  # and in this process too
        Mp4Writer(path)
    first.close()
    assert len(read_video(path)) == 2
    with Mp4Writer(path) as again:
        again.write(_smooth_frames(3))
    assert len(read_video(path)) == 3


_FULL_DISK = """
import resource, signal, sys
import numpy as np
from sf_sdk.video import Mp4Writer
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
rng = np.random.default_rng(0)
with Mp4Writer(sys.argv[1]) as writer:
    for _ in range(100):
        writer.write(rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))  # noise: ~3 kB a frame
"""


@pytest.mark.parametrize("previous", [False, True])
def test_a_full_disk_leaves_no_cut_file(tmp_path: Path, previous: bool) -> None:
    """For real: the child process may write files of at most 20 kB (RLIMIT_FSIZE), so the MP4
    write fails with EFBIG, the error a full disk (ENOSPC) gives too, part-way through a frame."""
    path = tmp_path / "big.mp4"
    if previous:
        with Mp4Writer(path) as writer:
            writer.write(_smooth_frames(2))
        before = path.read_bytes()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", _FULL_DISK.format(limit=20_000), str(path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("OSError: [Errno 27] cannot write") and "File too large" in last, run.stderr
    assert ("the previous file is unchanged" if previous else "no file was left there") in last
    assert sorted(p.name for p in tmp_path.iterdir()) == (["big.mp4"] if previous else [])
    if previous:
        assert path.read_bytes() == before


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


def test_a_full_tmpfs_leaves_the_previous_file(tmp_path: Path) -> None:
    """ENOSPC for real: a 64 KiB tmpfs (where this process may mount one; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        path = disk / "v.mp4"
        path.write_bytes(b"the previous video")
        rng = np.random.default_rng(0)
        with pytest.raises(OSError) as err, Mp4Writer(path) as writer:
            for _ in range(100):
                writer.write(rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
        assert err.value.errno == 28 and "No space left on device" in str(err.value)
        assert "the previous file is unchanged" in str(err.value)
        assert [p.name for p in disk.iterdir()] == ["v.mp4"] and path.read_bytes() == b"the previous video"
    finally:
        subprocess.run(["umount", str(disk)], check=True)


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
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    with pytest.raises(av.error.FFmpegError):
        read_video(junk)
