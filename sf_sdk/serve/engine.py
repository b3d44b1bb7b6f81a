"""The generation engine of sf-serve: one thread drives a stream pool for every session.

Every connected session that is streaming is a stream of ONE :class:`~sf_sdk.pool.StreamPool`:
each engine step advances all of them in one batched DiT call. The engine thread is the only
one that touches the pool (commands from the web side are queued and run between steps).

Flow control: each session has a bounded frame buffer (``buffer_frames``) that its sender drains
at the video's frame rate, while the client acknowledges what it received (at most
``max_in_flight`` frames unacknowledged). The engine steps when some streaming session's buffer has room for a
whole chunk, so generation runs ahead of playback by at most the buffer and never
waits for a slow client: a session whose buffer is full when new frames arrive drops its oldest
frames (counted, reported to the client, exported as a metric). Memory stays bounded by
``max_sessions x buffer_frames`` JPEG frames.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import io
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sf_sdk.pool import PooledStream, PoolFullError
from sf_sdk.serve.metrics import ServeMetrics
from sf_sdk.serve.protocol import pack_frame

__all__ = ["Engine", "EngineConfig", "Session", "SessionError"]

log = logging.getLogger(__name__)


class SessionError(RuntimeError):
    """A request the engine refuses; ``code`` is machine-readable, the message says what to do."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.extra = extra


@dataclass(frozen=True)
class EngineConfig:
    max_sessions: int = 4
    buffer_frames: int = 32  # per session: frames queued for sending before the oldest are dropped
    max_in_flight: int = 48  # per session: frames sent but not acknowledged before sending pauses
    jpeg_quality: int = 90
    record_dir: Path | None = None
    warmup_steps: int = 2  # steps of a full pool before serving (0: none)

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {self.max_sessions}")
        if self.buffer_frames < 1:
            raise ValueError(f"buffer_frames must be >= 1, got {self.buffer_frames}")
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {self.max_in_flight}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must lie in [1, 100], got {self.jpeg_quality}")


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class Session:
    """One client: its stream handle (engine thread only), its outgoing buffers (thread-safe)."""

    _ids = itertools.count(1)

    def __init__(self, loop: asyncio.AbstractEventLoop, buffer_frames: int) -> None:
        self.id = f"s{next(self._ids)}"
        self.loop = loop
        self.buffer_frames = buffer_frames
        self._lock = threading.Lock()
        self._frames: collections.deque[tuple[int, bytes]] = collections.deque()  # (frame index, packet)
        self._messages: collections.deque[dict[str, Any]] = collections.deque()
        self._wake = asyncio.Event()
        self.handle: PooledStream | None = None
        self.prompt: str | None = None
        self.version = 0  # prompt version: bumped by every set_prompt
        self.frame_index = 0
        self.dropped = 0
        self.sent = 0
        self.writer: Any = None
        self.closed = False
        self.last_chunk_s = 0.0
        self._in_flight: collections.deque[int] = collections.deque()  # frame indices sent, not acknowledged

    @property
    def streaming(self) -> bool:
        return self.handle is not None and not self.handle.closed

    def queued(self) -> int:
        with self._lock:
            return len(self._frames)

    # ------------------------------------------------------------------ producer side (any thread)
    def push_frames(self, packets: list[tuple[int, bytes]]) -> int:
        """Queue (frame index, packet) pairs; drops the oldest beyond the buffer; returns how many
        were dropped."""
        dropped = 0
        with self._lock:
            self._frames.extend(packets)
            while len(self._frames) > self.buffer_frames:
                self._frames.popleft()
                dropped += 1
            self.dropped += dropped
        self._notify()
        return dropped

    def push_message(self, message: dict[str, Any]) -> None:
        with self._lock:
            self._messages.append(message)
        self._notify()

    def _notify(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    # ------------------------------------------------------------------ consumer side (the loop)
    async def next_item(self, frames_allowed: bool) -> tuple[str, Any]:
        """The next control message, else (when allowed) the next (frame index, packet); else waits until
        something happens (a message, frames, an acknowledgement) and returns ``("wake", None)``."""
        with self._lock:
            if self._messages:
                return "message", self._messages.popleft()
            if frames_allowed and self._frames:
                return "frame", self._frames.popleft()
            self._wake.clear()
        await self._wake.wait()
        return "wake", None

    # ------------------------------------------------------------------ acknowledgements (the loop)
    def mark_sent(self, frame: int) -> None:
        self._in_flight.append(frame)

    def ack(self, frame: int) -> None:
        """The client has every frame up to ``frame``: they are no longer in flight."""
        while self._in_flight and self._in_flight[0] <= frame:
            self._in_flight.popleft()
        self._wake.set()

    def in_flight(self) -> int:
        return len(self._in_flight)

    def drop_queued_frames(self) -> None:
        with self._lock:
            self._frames.clear()


class Engine:
    """Runs the pool in its own thread; the web side calls :meth:`call` to run commands there."""

    def __init__(self, gen: Any, config: EngineConfig, metrics: ServeMetrics) -> None:
        self.gen = gen
        self.config = config
        self.metrics = metrics
        self.pool = gen.pool(config.max_sessions)
        self.sessions: dict[str, Session] = {}
        self._commands: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="sf-serve-engine", daemon=True)
        self._stop = threading.Event()
        self._ready = threading.Event()  # set once the warm-up is done
        self.accepting = True
        self.started_at = time.time()
        self.chunk_frames = gen.chunk_frames
        if config.buffer_frames < self.chunk_frames:
            raise ValueError(f"buffer_frames ({config.buffer_frames}) must hold at least one chunk "
                             f"({self.chunk_frames} frames)")
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the engine thread; returns once its warm-up is done (it runs in that thread, whose
        memory arena then already holds what a full pool needs)."""
        self._thread.start()
        self._ready.wait()

    def warm_up(self, steps: int) -> None:
        """Run a full pool for a few steps before serving: the first clients get their first frames
        sooner, and the memory a full pool needs (caches, decoder states, kernels' workspaces) is
        taken at start, not while serving."""
        import torch

        t0 = time.perf_counter()
        embeds = torch.zeros(1, self.gen.dit.config.text_dim)
        handles = [self.pool.open(prompt_embeds=embeds, seed=i) for i in range(self.config.max_sessions)]
        for _ in range(steps):
            for chunk in self.pool.step().values():
                for frame in chunk.frames:
                    encode_jpeg(frame, self.config.jpeg_quality)
        for h in handles:
            h.close()
        log.info("warmed up %d sessions in %.1f s", len(handles), time.perf_counter() - t0)

    @property
    def running(self) -> bool:
        """The engine thread is alive (it stops on shutdown, or on an error kept in ``error``)."""
        return self._thread.is_alive()

    def begin_shutdown(self) -> None:
        """Stop taking sessions; the engine finishes the step in flight, then stops (idempotent)."""
        self.accepting = False
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self.begin_shutdown()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ commands
    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` in the engine thread between steps; its result (or error) in the future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if not self._thread.is_alive():
            fut.set_exception(SessionError("shutting_down", "the server is shutting down"))
            return fut
        self._commands.put((fn, fut))
        return fut

    def add_session(self, session: Session) -> None:
        self.sessions[session.id] = session
        self.metrics.sessions_connected.set(len(self.sessions))

    def start_stream(self, session: Session, prompt: str, seed: int) -> dict[str, Any]:
        if not self.accepting:
            raise SessionError("shutting_down", "the server is shutting down: no new sessions")
        if session.streaming:
            raise SessionError("already_started", "this session is already streaming: send set_prompt to change "
                                                  "the prompt, or stop first")
        try:
            session.handle = self.pool.open(prompt, seed=seed)
        except PoolFullError:
            raise SessionError("busy", f"all {self.config.max_sessions} sessions are in use; try again later",
                               sessions=len(self.pool.streams), max_sessions=self.config.max_sessions) from None
        session.prompt = prompt
        session.version += 1  # frame indices count on across restarts (acknowledgements stay valid)
        if self.config.record_dir is not None:
            from sf_sdk.video import Mp4Writer

            self.config.record_dir.mkdir(parents=True, exist_ok=True)
            path = self.config.record_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{session.id}.mp4"
            session.writer = Mp4Writer(path, fps=self.gen.fps)
            log.info("session %s records to %s", session.id, path)
        self._update_gauges()
        log.info("session %s started: %r (seed %d)", session.id, prompt, seed)
        return {"type": "started", "session": session.id, "prompt": prompt, "seed": seed,
                "version": session.version}

    def set_prompt(self, session: Session, prompt: str, transition: str, chunks: int) -> dict[str, Any]:
        if not session.streaming:
            raise SessionError("not_started", "set_prompt needs a running stream: send start first")
        session.handle.set_prompt(prompt, transition=transition, chunks=chunks)
        session.prompt = prompt
        session.version += 1
        return {"type": "prompt_set", "prompt": prompt, "transition": transition, "version": session.version}

    def reset(self, session: Session) -> dict[str, Any]:
        if not session.streaming:
            raise SessionError("not_started", "reset needs a running stream: send start first")
        session.handle.reset()
        return {"type": "reset_done"}

    def stop_stream(self, session: Session) -> dict[str, Any]:
        self._close_stream(session)
        return {"type": "stopped"}

    def remove_session(self, session: Session) -> None:
        """The client is gone: free its slot (before the next chunk)."""
        session.closed = True
        self._close_stream(session)
        self.sessions.pop(session.id, None)
        self.metrics.sessions_connected.set(len(self.sessions))

    def _close_stream(self, session: Session) -> None:
        if session.handle is not None:
            session.handle.close()
            session.handle = None
        if session.writer is not None:
            session.writer.close()
            session.writer = None
        session.drop_queued_frames()
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.sessions_streaming.set(len(self.pool.streams))

    # ------------------------------------------------------------------ the loop
    def _drain_commands(self, timeout: float) -> None:
        try:
            fn, fut = self._commands.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as exc:  # handed to the caller, the engine goes on
                    fut.set_exception(exc)
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return

    def _wants_frames(self) -> bool:
        """Some streaming session has room for a whole chunk (so a reader that keeps up never drops)."""
        room = self.config.buffer_frames - self.chunk_frames
        return any(s.streaming and s.queued() <= room for s in self.sessions.values())

    def _run(self) -> None:
        try:
            try:
                if self.config.warmup_steps:
                    self.warm_up(self.config.warmup_steps)
            finally:
                self._ready.set()
            while not self._stop.is_set():
                self._drain_commands(0.0 if self._wants_frames() else 0.01)
                if self._stop.is_set():
                    break
                if self._wants_frames():
                    self._step()
        except BaseException as exc:  # keep the reason for /healthz and the log
            self.error = exc
            log.exception("the generation engine stopped")
        finally:
            self._shutdown_sessions()
            while True:  # commands that arrived too late
                try:
                    _, fut = self._commands.get_nowait()
                except queue.Empty:
                    break
                if fut.set_running_or_notify_cancel():
                    fut.set_exception(SessionError("shutting_down", "the server is shutting down"))

    def _step(self) -> None:
        by_handle = {s.handle: s for s in self.sessions.values() if s.streaming}
        t0 = time.perf_counter()
        chunks = self.pool.step()
        t1 = time.perf_counter()
        ready = time.time()
        self.metrics.step_seconds.observe(t1 - t0)
        encode_s = 0.0
        for handle, chunk in chunks.items():
            session = by_handle.get(handle)
            if session is None or session.closed:
                continue
            self.metrics.stage_seconds.labels("dit").inc(chunk.timing.dit_s / max(1, len(chunks)))
            self.metrics.stage_seconds.labels("decode").inc(chunk.timing.decode_s)
            self.metrics.chunk_seconds.observe(chunk.timing.dit_s + chunk.timing.decode_s)
            session.last_chunk_s = chunk.timing.dit_s + chunk.timing.decode_s
            e0 = time.perf_counter()
            packets = []
            for frame in chunk.frames:
                header = {"frame": session.frame_index, "chunk": chunk.index, "ready": ready,
                          "version": session.version, "dropped": session.dropped}
                packets.append((session.frame_index, pack_frame(header, encode_jpeg(frame, self.config.jpeg_quality))))
                session.frame_index += 1
            encode_s += time.perf_counter() - e0
            if session.writer is not None:
                session.writer.write(chunk.frames)
            dropped = session.push_frames(packets)
            self.metrics.frames_generated.inc(len(packets))
            if dropped:
                self.metrics.frames_dropped.inc(dropped)
            if handle.closed:  # finished (a stream with a frame limit)
                session.handle = None
                session.push_message({"type": "stopped", "reason": "finished"})
        self.metrics.stage_seconds.labels("encode").inc(encode_s)
        self._update_gauges()

    def _shutdown_sessions(self) -> None:
        for session in list(self.sessions.values()):
            self._close_stream(session)
            session.push_message({"type": "shutdown", "message": "the server is shutting down"})
        self._update_gauges()
