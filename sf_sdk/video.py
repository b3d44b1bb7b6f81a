"""Stream frames into an MP4 file as they are generated, and read videos back.

:class:`Mp4Writer` encodes H.264 (libx264, yuv420p, BT.601 limited range, tagged as such) into a
*fragmented* MP4: an empty ``moov`` header first, then one ``moof`` + ``mdat`` fragment per frame,
each pushed to the operating system as soon as it is complete. So the file is playable while it
grows, and a run that dies without :meth:`Mp4Writer.close` still leaves a valid file.

Files, exactly: frames go to a temporary file beside the output, ``.NAME.part`` in the same
folder, which :meth:`Mp4Writer.close` renames to the output (``os.replace``, atomic). So the
output name only ever holds a finished video: the previous file stays whole until the new one
is complete, a process killed mid-way (SIGKILL, a power cut) leaves the previous file or no
file under the name, and its ``.part`` (a valid MP4 of the frames so far, removed by the next
writer of that name). ``overwrite=False`` refuses an output that exists, when the writer is
created and again at the rename (a hard link, which fails if the name appeared meanwhile). The
writer holds an exclusive lock (``flock``) on its ``.part`` from creation to the rename, so two
writers of one output never both succeed: the second fails at once with ``FileExistsError``.
The kernel drops the lock when a process dies, which is how a stale ``.part`` is told apart
from a live one. A write error (a full disk, ENOSPC; the file size limit, EFBIG) removes the
``.part``, leaves the output as it was and raises ``OSError`` saying so; an exception inside a
``with`` block discards the new video too, except ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM in
the commands), which keeps the frames written so far. Call :meth:`Mp4Writer.close` to keep
them after another error.

Durability, exactly: the MP4 muxer closes a fragment when the next frame arrives, so when
:meth:`Mp4Writer.write` returns, every frame written so far *except the most recent one* is in the
file; the last one joins with the next chunk or at :meth:`Mp4Writer.close`. The encoder runs with
``tune=zerolatency`` (no B-frames, no lookahead), so it holds no frames back itself.

Odd sizes: yuv420p stores colour at half resolution and needs an even width and height. By default
(``odd_size="pad"``) an odd frame gets one extra row / column copied from its last one (and
:func:`read_video` returns the padded size); ``odd_size="error"`` raises instead.

    with Mp4Writer("out.mp4", fps=16) as writer:
        for chunk in chunks:          # uint8 [T, H, W, 3], numpy or torch
            writer.write(chunk)
    frames = read_video("out.mp4")    # uint8 [T, H, W, 3]
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import av
import numpy as np
import torch
from av.video.reformatter import ColorRange

__all__ = ["Mp4Writer", "read_video"]

log = logging.getLogger(__name__)

OddSize = Literal["pad", "error"]

# Fragment at every frame; the empty moov makes the header complete before any frame; fragments
# address their data relative to themselves (what browsers' Media Source Extensions expect).
_MOVFLAGS = "frag_every_frame+empty_moov+default_base_moof"
# FFmpeg's AVCOL_PRI / AVCOL_TRC / AVCOL_SPC code for SMPTE 170M (BT.601, 525 lines).
_BT601_CODE = 6
_PIX_FMT = "yuv420p"
_RGB_CHANNELS = 3


class Mp4Writer:
    """Append uint8 RGB chunks ``[T, H, W, 3]`` (numpy or torch) to a fragmented H.264 MP4.

    The video is encoded from the first :meth:`write` (the size is taken from it); every later
    chunk must have the same height and width. Use as a context manager, or call :meth:`close`; a
    writer closed before any frame was written leaves no file. See the module docstring for how
    the output is written (a locked ``.part`` renamed at the end) and what errors leave behind.

    Args:
        path: output file (parent folders are created).
        fps: frames per second (an int or a Fraction).
        crf: x264 constant rate factor (0 lossless .. 51 worst; 18 is visually near lossless).
        preset: x264 speed / size trade-off ("ultrafast" .. "veryslow").
        keyframe_interval: frames between keyframes (a reader can start decoding at each).
        odd_size: "pad" (copy the last row / column to reach even sizes) or "error".
        overwrite: replace an existing ``path`` when the video is finished (True), or refuse it
            with ``FileExistsError`` (False).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False, or another writer is
            writing ``path`` now.
    """

    def __init__(self, path: str | os.PathLike[str], fps: int | Fraction = 16, *, crf: int = 18,
                 preset: str = "veryfast", keyframe_interval: int = 32, odd_size: OddSize = "pad",
                 overwrite: bool = True) -> None:
        if Fraction(fps) <= 0:
            raise ValueError(f"fps must be positive, got {fps!r}")
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must lie in [0, 51] (x264), got {crf}")
        if keyframe_interval <= 0:
            raise ValueError(f"keyframe_interval must be positive, got {keyframe_interval}")
        if odd_size not in ("pad", "error"):
            raise ValueError(f"odd_size must be 'pad' or 'error', got {odd_size!r}")
        self.path = Path(path)
        self.fps = Fraction(fps)
        self.crf = crf
        self.preset = preset
        self.keyframe_interval = keyframe_interval
        self.odd_size = odd_size
        self.frames_written = 0
        self.frame_size: tuple[int, int] | None = None  # (height, width) of the input frames
        self.overwrite = overwrite
        self.temp_path = self.path.with_name(f".{self.path.name}.part")
        self._container: Any = None
        self._stream: Any = None
        self._closed = False
        if self.path.is_dir():
            raise IsADirectoryError(f"{self.path} is a folder: give a file name such as {self.path / 'video.mp4'}")
        if not overwrite and self.path.exists():
            raise FileExistsError(_exists_message(self.path))
        blocker = next((p for p in self.path.parents if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise NotADirectoryError(f"cannot write {self.path}: {blocker} is a file, not a folder")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise type(exc)(exc.errno, f"cannot create the folder {self.path.parent} for {self.path}: "
                                       f"{exc.strerror}") from None
        try:
            self._lock_fd = _reserve(self.path, self.temp_path)
        except FileExistsError:
            raise
        except OSError as exc:
            raise type(exc)(exc.errno, f"cannot write {self.path}: {exc.strerror} (creating {self.temp_path.name} "
                                       f"in that folder)") from None

    def __del__(self) -> None:
        # Dropped without close() or discard(): like a killed run, the .part stays, unlocked.
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            os.close(fd)
            self._lock_fd = None

    # -- context manager -------------------------------------------------------------------

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # A stop (Ctrl-C) keeps the frames written so far; an error leaves the output as it was.
        if exc is None or isinstance(exc, KeyboardInterrupt):
            self.close()
        else:
            self.discard()

    # -- writing ---------------------------------------------------------------------------

    @property
    def encoded_size(self) -> tuple[int, int] | None:
        """(height, width) in the file: the input size, padded to even numbers."""
        if self.frame_size is None:
            return None
        height, width = self.frame_size
        return height + height % 2, width + width % 2

    def write(self, frames: np.ndarray | torch.Tensor) -> None:
        """Encode a chunk of uint8 frames [T, H, W, 3] and push it to the file."""
        if self._closed:
            raise RuntimeError(f"Mp4Writer for {self.path} is closed: open a new writer to write more")
        chunk = self._check_frames(frames)
        if chunk.shape[0] == 0:
            return
        if self._container is None:
            self._open(chunk.shape[1], chunk.shape[2])
        chunk = self._pad_to_even(chunk)
        try:
            for image in chunk:
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame = frame.reformat(format=_PIX_FMT, dst_colorspace="smpte170m", dst_color_range="MPEG")
                frame.pts = self.frames_written
                for packet in self._stream.encode(frame):
                    self._container.mux(packet)
                self.frames_written += 1
        except OSError as exc:
            raise self._write_failed(exc) from exc

    def close(self) -> None:
        """Flush the encoder, finish the file and rename it to :attr:`path` (idempotent).

        Raises ``FileExistsError`` (and discards the video) when ``overwrite`` is False and
        :attr:`path` appeared while the video was written.
        """
        if self._closed:
            return
        self._closed = True
        if self._container is None:
            self._release(remove=True)
            return
        try:
            try:
                for packet in self._stream.encode(None):
                    self._container.mux(packet)
            finally:
                self._container.close()
        except OSError as exc:
            raise self._write_failed(exc) from exc
        except BaseException:
            self._release(remove=True)
            raise
        try:
            self._publish()
        finally:
            self._release(remove=True)
        log.debug("wrote %d frames to %s", self.frames_written, self.path)

    def discard(self) -> None:
        """Stop writing and remove the new video; :attr:`path` stays as it was (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._container is not None:
            try:
                self._container.close()
            except Exception as exc:  # the file is removed anyway
                log.debug("closing %s for removal: %s", self.temp_path, exc)
        self._release(remove=True)
        log.debug("discarded the video for %s after %d frames", self.path, self.frames_written)

    # -- helpers ---------------------------------------------------------------------------

    def _check_frames(self, frames: Any) -> np.ndarray:
        if isinstance(frames, torch.Tensor):
            if frames.dtype != torch.uint8:
                raise ValueError(f"frames must be uint8, got {frames.dtype}: convert [-1, 1] floats with "
                                 f"((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)")
            frames = frames.detach().cpu().numpy()
        if not isinstance(frames, np.ndarray):
            raise ValueError(f"frames must be a numpy array or a torch tensor, got {type(frames).__name__}")
        if frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8, got {frames.dtype}: convert [-1, 1] floats with "
                             f"((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8)")
        if frames.ndim != 4:
            raise ValueError(f"frames must be [T, H, W, 3] (rank 4), got shape {tuple(frames.shape)}; "
                             f"for one frame pass frames[None]")
        if frames.shape[-1] != _RGB_CHANNELS:
            raise ValueError(f"frames must have {_RGB_CHANNELS} RGB channels last ([T, H, W, 3]), got shape "
                             f"{tuple(frames.shape)}; for [T, 3, H, W] permute to channels-last first")
        height, width = frames.shape[1:3]
        if height == 0 or width == 0:
            raise ValueError(f"frames must be non-empty images, got shape {tuple(frames.shape)}")
        if self.frame_size is not None and (height, width) != self.frame_size:
            raise ValueError(f"frame size changed mid-stream: the stream is {self.frame_size[0]}x"
                             f"{self.frame_size[1]} (HxW), this chunk is {height}x{width}; start a new "
                             f"writer for a new size")
        if self.odd_size == "error" and (height % 2 or width % 2):
            raise ValueError(f"H.264 yuv420p needs an even height and width, got {height}x{width}: crop or "
                             f"pad the frames, or create the writer with odd_size='pad'")
        return np.ascontiguousarray(frames)

    def _write_failed(self, exc: OSError) -> OSError:
        """Discard after a write error; the error to raise, saying what is left where."""
        self._closed = True
        try:
            self._container.close()
        except Exception as close_exc:  # the same error again, most likely
            log.debug("closing %s after a write error: %s", self.temp_path, close_exc)
        self._release(remove=True)
        code = exc.errno or errno.EIO
        reason = os.strerror(code)
        hint = {errno.ENOSPC: "free space on that disk or write elsewhere",
                errno.EFBIG: "the file size limit (ulimit -f) or the file system's maximum file size is reached",
                errno.EDQUOT: "the disk quota is used up"}.get(code, "check the disk and the folder")
        old = "the previous file is unchanged" if self.path.exists() else "no file was left there"
        return OSError(code, f"cannot write {self.path} ({reason}) after {self.frames_written} frames: {hint}; "
                             f"{old}")

    def _publish(self) -> None:
        """Rename the finished ``.part`` to the output."""
        if self.overwrite:
            os.replace(self.temp_path, self.path)
            return
        try:  # a hard link fails if the name exists: no check-then-rename race
            os.link(self.temp_path, self.path)
        except FileExistsError:
            raise FileExistsError(f"{self.path} was created by another program while this video was written; it "
                                  f"was left as it is and this video discarded: write again with overwrite=True "
                                  f"(sf-generate --overwrite) or choose another name") from None
        except OSError:  # a file system without hard links
            if self.path.exists():
                raise FileExistsError(_exists_message(self.path)) from None
            os.replace(self.temp_path, self.path)

    def _release(self, *, remove: bool) -> None:
        """Remove the ``.part`` (if it is still there) and drop its lock."""
        if self._lock_fd is None:
            return
        try:
            if remove and _same_file(self._lock_fd, self.temp_path):
                os.unlink(self.temp_path)
        finally:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _pad_to_even(self, chunk: np.ndarray) -> np.ndarray:
        height, width = chunk.shape[1:3]
        if height % 2 == 0 and width % 2 == 0:
            return chunk
        return np.pad(chunk, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")  # [T, H', W', 3]

    def _open(self, height: int, width: int) -> None:
        self.frame_size = (height, width)
        if height % 2 or width % 2:
            log.info("padding %dx%d frames to %dx%d for yuv420p", height, width, *self.encoded_size)
        # flush_packets: hand every finished fragment to the OS at once, not when a buffer fills.
        container = av.open(str(self.temp_path), mode="w", format="mp4",
                            options={"movflags": _MOVFLAGS, "flush_packets": "1"})
        try:
            stream = container.add_stream("libx264", rate=self.fps)
            stream.height, stream.width = self.encoded_size
            stream.pix_fmt = _PIX_FMT
            stream.time_base = 1 / self.fps
            stream.codec_context.gop_size = self.keyframe_interval
            stream.codec_context.color_range = int(ColorRange.MPEG)
            stream.codec_context.colorspace = _BT601_CODE
            stream.codec_context.color_primaries = _BT601_CODE
            stream.codec_context.color_trc = _BT601_CODE
            stream.options = {"crf": str(self.crf), "preset": self.preset, "tune": "zerolatency"}
        except Exception:
            container.close()
            raise
        self._container, self._stream = container, stream


def _exists_message(path: Path) -> str:
    return (f"{path} exists: pass overwrite=True (sf-generate --overwrite) to replace it when the new video is "
            f"finished, or choose another name")


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _reserve(path: Path, temp: Path, attempts: int = 5) -> int:
    """Create ``temp`` and lock it (flock, exclusive); returns the open descriptor holding the lock.

    A ``temp`` that exists and is locked belongs to a live writer: ``FileExistsError``. One that is
    not locked was left by a process that died (the kernel drops its lock): it is removed and
    created anew. After locking, the name must still be the locked file (another writer may have
    renamed or removed it in between), else this tries again.
    """
    busy = FileExistsError(f"another process is writing {path} now (a writer holds the lock on {temp}): wait "
                           f"for it to finish or choose another name")
    for _ in range(attempts):
        try:
            fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            created = True
        except FileExistsError:
            try:
                fd = os.open(temp, os.O_RDWR)
            except FileNotFoundError:  # renamed or removed since: try again
                continue
            created = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise busy from None
        if not _same_file(fd, temp):
            os.close(fd)
            continue
        if created:
            return fd
        log.warning("removing %s, left by a writer of %s that was stopped before it finished", temp, path)
        os.unlink(temp)
        os.close(fd)
    raise busy


def read_video(path: str | os.PathLike[str], *, allow_truncated: bool = False) -> np.ndarray:
    """Decode the first video stream of a file to uint8 RGB [T, H, W, 3].

    With ``allow_truncated`` a decoding error after at least one frame (a file cut mid-fragment,
    e.g. while it is still being written) ends the read with the frames decoded so far.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no video file at {path}")
    frames: list[np.ndarray] = []
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        try:
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))  # [H, W, 3]
        except (av.error.FFmpegError, EOFError) as err:
            if not (allow_truncated and frames):
                raise
            log.warning("%s: stopped after %d frames at a decoding error (%s)", path, len(frames), err)
    if not frames:
        raise ValueError(f"{path} holds no decodable video frames")
    return np.stack(frames)  # [T, H, W, 3]
