"""Prometheus metrics of one sf-serve process (a registry of its own, so that several servers in
one process, as in tests, do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ServeMetrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)


class ServeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.sessions_connected = Gauge("sf_sessions_connected", "WebSocket sessions connected", registry=r)
        self.sessions_streaming = Gauge("sf_sessions_streaming", "sessions with a running stream", registry=r)
        self.step_seconds = Histogram("sf_step_seconds", "one pool step: every streaming session's chunk "
                                      "(batched DiT call, then each stream's VAE decode)",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.chunk_seconds = Histogram("sf_chunk_seconds", "one session's chunk: the batched DiT call plus its "
                                       "own VAE decode", buckets=_LATENCY_BUCKETS, registry=r)
        self.stage_seconds = Counter("sf_stage_seconds", "seconds spent per stage (dit: the batched call "
                                     "shared out per stream; decode; encode: JPEG)", ["stage"], registry=r)
        self.frames_generated = Counter("sf_frames_generated", "frames generated for sessions", registry=r)
        self.frames_sent = Counter("sf_frames_sent", "frames sent to clients", registry=r)
        self.frames_dropped = Counter("sf_frames_dropped", "frames dropped because a client's buffer was full",
                                      registry=r)
        self.errors = Counter("sf_protocol_errors", "client messages answered with an error", ["code"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
