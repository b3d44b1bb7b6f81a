"""The sf-serve ASGI app (Starlette): the page, the session WebSocket, health and metrics.

Routes: ``GET /`` (the live page; ``/?prompt=...&seed=...&autostart=1`` starts a session on load),
``GET /app.js``, ``GET /healthz`` (JSON), ``GET /metrics`` (Prometheus text), ``WS /ws`` (one
session; protocol in :mod:`sf_sdk.serve.protocol`). Only the package's own two static files are
served, from memory: no part of a request names a file.

With a token, ``/ws`` and ``/metrics`` need it (``?token=...``, or ``Authorization: Bearer ...``
for ``/metrics``), compared in constant time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from sf_sdk.serve.engine import Engine, EngineConfig, Session, SessionError
from sf_sdk.serve.metrics import CONTENT_TYPE, ServeMetrics
from sf_sdk.serve.protocol import Limits, ProtocolError, parse_message

__all__ = ["ServeConfig", "create_app"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """Everything the app needs besides the generator."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    limits: Limits = field(default_factory=Limits)
    token: str | None = None
    model_name: str = "model"
    stats_interval_s: float = 1.0


def _static(name: str) -> bytes:
    return resources.files("sf_sdk.serve").joinpath("static", name).read_bytes()


def _token_ok(expected: str | None, given: str | None) -> bool:
    if expected is None:
        return True
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


def create_app(gen: Any, config: ServeConfig | None = None) -> Starlette:
    """The app over ``gen`` (a :class:`~sf_sdk.StreamingGenerator` with a rolling window and a
    text encoder). The engine thread starts with the app's lifespan and stops with it."""
    config = config or ServeConfig()
    if not gen.streaming.rolling:
        raise ValueError("serving streams without an end: load the model with a rolling window "
                         "(streaming={'local_attn_size': N}, or sf-serve --window N)")
    if gen.text_encoder is None:
        raise ValueError("serving text prompts needs a model with a text encoder")
    metrics = ServeMetrics()
    engine = Engine(gen, config.engine, metrics)
    page, script = _static("index.html"), _static("app.js")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        engine.start()
        app.state.engine = engine
        try:
            yield
        finally:
            engine.begin_shutdown()
            await asyncio.get_running_loop().run_in_executor(None, engine.join, 30.0)
            await asyncio.sleep(0.2)  # let the senders deliver the shutdown notices

    async def index(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8")

    async def app_js(request: Request) -> Response:
        return Response(script, media_type="text/javascript; charset=utf-8")

    async def healthz(request: Request) -> JSONResponse:
        ok = engine.error is None and (engine.running or not engine.accepting)
        body = {"status": "ok" if ok else "error", "model": config.model_name, "device": str(gen.device),
                "dtype": str(gen.dtype).removeprefix("torch."), "sessions": len(engine.sessions),
                "streaming": len(engine.pool.streams), "max_sessions": config.engine.max_sessions,
                "fps": gen.fps, "frame_size": list(gen.frame_size), "accepting": engine.accepting,
                "uptime_s": round(time.time() - engine.started_at, 3)}
        if engine.error is not None:
            body["error"] = f"{type(engine.error).__name__}: {engine.error}"
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics_route(request: Request) -> Response:
        given = request.query_params.get("token")
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:]
        if not _token_ok(config.token, given):
            return PlainTextResponse("unauthorized: pass the server's token", status_code=401)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def ws_endpoint(ws: WebSocket) -> None:
        await ws.accept()
        if not _token_ok(config.token, ws.query_params.get("token")):
            await ws.send_json({"type": "error", "code": "unauthorized",
                                "message": "missing or wrong token: open the page with ?token=..."})
            await ws.close(code=1008)
            return
        if not engine.accepting:
            await ws.send_json({"type": "shutdown", "message": "the server is shutting down"})
            await ws.close(code=1012)
            return
        session = Session(asyncio.get_running_loop(), config.engine.buffer_frames)
        await asyncio.wrap_future(engine.call(lambda: engine.add_session(session)))
        session.push_message({"type": "hello", "session": session.id, "model": config.model_name,
                              "fps": gen.fps, "frame_size": list(gen.frame_size),
                              "max_sessions": config.engine.max_sessions})
        sender = asyncio.create_task(_send_loop(ws, session, gen.fps, metrics, config.stats_interval_s,
                                                config.engine.max_in_flight))
        try:
            await _receive_loop(ws, session, engine, config.limits, metrics)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(engine.call(lambda: engine.remove_session(session)))
            if not engine.running:
                engine.sessions.pop(session.id, None)

    routes = [Route("/", index), Route("/app.js", app_js), Route("/healthz", healthz),
              Route("/metrics", metrics_route), WebSocketRoute("/ws", ws_endpoint)]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.engine = engine
    return app


async def _receive_loop(ws: WebSocket, session: Session, engine: Engine, limits: Limits,
                        metrics: ServeMetrics) -> None:
    while True:
        try:
            raw = await ws.receive()
        except (WebSocketDisconnect, RuntimeError):
            return
        if raw["type"] == "websocket.disconnect":
            return
        text = raw.get("text") if raw.get("text") is not None else raw.get("bytes", b"")
        try:
            msg = parse_message(text, limits)
            reply = await _dispatch(msg, session, engine)
        except (ProtocolError, SessionError) as exc:
            metrics.errors.labels(exc.code).inc()
            reply = {"type": "busy" if exc.code == "busy" else "error", "code": exc.code, "message": str(exc),
                     **getattr(exc, "extra", {})}
        except ValueError as exc:  # the SDK's own checks (e.g. an unknown word in the prompt)
            metrics.errors.labels("invalid").inc()
            reply = {"type": "error", "code": "invalid", "message": str(exc)}
        if reply is not None:
            session.push_message(reply)


async def _dispatch(msg: dict[str, Any], session: Session, engine: Engine) -> dict[str, Any] | None:
    kind = msg["type"]
    if kind == "ping":
        return {"type": "pong", "time": time.time()}
    if kind == "ack":
        session.ack(msg["frame"])
        return None
    if kind == "start":
        call = lambda: engine.start_stream(session, msg["prompt"], msg["seed"])  # noqa: E731
    elif kind == "set_prompt":
        call = lambda: engine.set_prompt(session, msg["prompt"], msg["transition"], msg["chunks"])  # noqa: E731
    elif kind == "reset":
        call = lambda: engine.reset(session)  # noqa: E731
    else:
        call = lambda: engine.stop_stream(session)  # noqa: E731
    return await asyncio.wrap_future(engine.call(call))


async def _send_loop(ws: WebSocket, session: Session, fps: int, metrics: ServeMetrics, stats_every: float,
                     max_in_flight: int) -> None:
    """Control messages at once; frames at the video's frame rate (real-time playout), while fewer
    than ``max_in_flight`` sent frames wait for the client's acknowledgement."""
    period = 1.0 / fps
    due = time.monotonic()
    next_stats = time.monotonic() + stats_every
    sent_at_stats = 0
    while True:
        now = time.monotonic()
        window_open = session.in_flight() < max_in_flight  # else: wait for an acknowledgement
        allowed = now >= due and window_open
        wait = next_stats - now if allowed or not window_open else min(due - now, next_stats - now)
        try:
            kind, item = await asyncio.wait_for(session.next_item(frames_allowed=allowed), timeout=max(wait, 1e-3))
        except asyncio.TimeoutError:
            kind = None
        now = time.monotonic()
        if now >= next_stats:
            rate = (session.sent - sent_at_stats) / stats_every
            sent_at_stats, next_stats = session.sent, now + stats_every
            await ws.send_text(json.dumps({"type": "stats", "sent_fps": rate, "sent": session.sent,
                                           "dropped": session.dropped, "queued": session.queued(),
                                           "in_flight": session.in_flight(),
                                           "chunk_ms": round(session.last_chunk_s * 1e3, 1)}))
        if kind == "message":
            await ws.send_text(json.dumps(item))
            if item.get("type") == "shutdown":
                with contextlib.suppress(Exception):
                    await ws.close(code=1012)
                return
        elif kind == "frame":
            index, packet = item
            await ws.send_bytes(packet)
            session.mark_sent(index)
            session.sent += 1
            metrics.frames_sent.inc()
            due = max(due + period, time.monotonic() - period)  # no burst to catch up after a stall
