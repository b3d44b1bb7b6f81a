"""sf-serve over its real protocol, on loopback, without a browser: bad input is answered and
the session kept; a slow client loses frames, not the others; limits, tokens and shutdown."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from serve_util import ServerProcess, connect, recv_json, send  # noqa: E402

from sf_sdk.serve.protocol import unpack_frame  # noqa: E402

RED, BLUE = "a red circle moving right", "a blue square moving up"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess("--max-sessions", "2", "--buffer-frames", "16",
                        "--record", str(tmp_path_factory.mktemp("rec")))
    yield srv
    srv.stop()


def run(coro):
    return asyncio.run(coro)


async def _frames_for(ws, seconds: float) -> list[dict]:
    """Frame headers received within ``seconds`` (control messages skipped)."""
    headers, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            msg = await asyncio.wait_for(ws.recv(), deadline - time.monotonic())
        except asyncio.TimeoutError:
            break
        if isinstance(msg, bytes):
            header, jpeg = unpack_frame(msg)
            assert jpeg[:2] == b"\xff\xd8"  # a JPEG
            headers.append(header)
            await send(ws, type="ack", frame=header["frame"])
    return headers


def test_bad_messages_are_answered_and_the_session_kept(server) -> None:
    async def go():
        async with await connect(server.ws_url) as ws:
            hello = await recv_json(ws, "hello")
            assert hello["fps"] == 16 and hello["frame_size"] == [64, 64] and hello["max_sessions"] == 2
            cases = [("{not json", "bad_json"), ('["start"]', "bad_message"), ('{"type": "dance"}', "unknown_type"),
                     (json.dumps({"type": "start", "prompt": "x" * 501}), "prompt_too_long"),
                     (json.dumps({"type": "start", "prompt": "   "}), "bad_prompt"),
                     (json.dumps({"type": "start", "prompt": RED, "seed": -1}), "bad_seed"),
                     (json.dumps({"type": "set_prompt", "prompt": BLUE}), "not_started"),
                     (json.dumps({"type": "reset"}), "not_started"),
                     ("x" * 20000, "message_too_large"),
                     (json.dumps({"type": "ack", "frame": "last"}), "bad_frame")]
            for text, code in cases:
                await ws.send(text)
                reply = await recv_json(ws, "error")
                assert reply["type"] == "error" and reply["code"] == code, (text[:40], reply)
                assert reply["message"]
            await send(ws, type="start", prompt=RED, seed=3)
            assert (await recv_json(ws, "started"))["prompt"] == RED
            await send(ws, type="start", prompt=RED)
            assert (await recv_json(ws, "error"))["code"] == "already_started"
            await send(ws, type="set_prompt", prompt=BLUE, transition="fade")
            assert (await recv_json(ws, "error"))["code"] == "bad_transition"
            frames = await _frames_for(ws, 2.0)
            assert len(frames) >= 16  # still streaming after all of that
            assert [h["frame"] for h in frames] == list(range(frames[0]["frame"], frames[0]["frame"] + len(frames)))
            await send(ws, type="ping")
            assert (await recv_json(ws, "pong"))["type"] == "pong"
            await send(ws, type="stop")
            assert (await recv_json(ws, "stopped"))["type"] == "stopped"
    run(go())


def test_a_client_that_never_reads_loses_frames_not_the_others(server) -> None:
    async def go():
        lazy = await connect(server.ws_url, tiny_buffer=True)
        await send(lazy, type="start", prompt=BLUE, seed=1)
        async with await connect(server.ws_url) as ws:
            await recv_json(ws, "hello")
            await send(ws, type="start", prompt=RED, seed=0)
            await recv_json(ws, "started")
            await asyncio.sleep(1.0)  # the first chunk
            frames = await _frames_for(ws, 8.0)
        await lazy.close()
        return frames

    frames = run(go())
    span = frames[-1]["frame"] - frames[0]["frame"]
    assert len(frames) / 8.0 >= 13, len(frames)  # real time is 16 FPS
    assert span == len(frames) - 1 and frames[-1]["dropped"] == 0  # the reader lost nothing
    metrics = urllib.request.urlopen(server.url + "metrics").read().decode()
    dropped = float(next(line.split()[1] for line in metrics.splitlines() if line.startswith("sf_frames_dropped_total")))
    assert dropped > 0  # the slow client's oldest frames were dropped


def test_at_max_sessions_a_new_client_is_told_busy(server) -> None:
    async def go():
        clients = [await connect(server.ws_url) for _ in range(3)]
        try:
            for ws, prompt in zip(clients[:2], (RED, BLUE)):
                await send(ws, type="start", prompt=prompt)
                assert (await recv_json(ws, "started"))["type"] == "started"
            await send(clients[2], type="start", prompt=RED)
            busy = await recv_json(clients[2], "busy")
            assert busy["type"] == "busy" and busy["max_sessions"] == 2 and "try again" in busy["message"]
            await clients[0].close()  # a slot frees when a client leaves
            for _ in range(50):
                await send(clients[2], type="start", prompt=RED)
                reply = await recv_json(clients[2])
                if reply["type"] == "started":
                    break
                await asyncio.sleep(0.2)
            assert reply["type"] == "started"
        finally:
            for ws in clients:
                await ws.close()
    run(go())


def test_healthz_and_metrics(server) -> None:
    health = json.loads(urllib.request.urlopen(server.url + "healthz").read())
    assert health["status"] == "ok" and health["model"] == "shapes-tiny" and health["device"] == "cpu"
    assert health["max_sessions"] == 2 and health["uptime_s"] > 0 and "sessions" in health
    text = urllib.request.urlopen(server.url + "metrics").read().decode()
    for name in ("sf_sessions_connected", "sf_step_seconds_bucket", "sf_chunk_seconds_count", "sf_frames_sent_total",
                 "sf_frames_dropped_total", 'sf_stage_seconds_total{stage="dit"}'):
        assert name in text, name
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(server.url + "static/../../pyproject.toml")
    assert err.value.code == 404


def test_token_is_required_when_given() -> None:
    srv = ServerProcess("--token", "s3cret", "--max-sessions", "1")
    try:
        async def go():
            for query in ("", "?token=wrong"):
                ws = await connect(srv.ws_url + query)
                reply = await recv_json(ws)
                assert reply["code"] == "unauthorized"
                await asyncio.sleep(0.1)
                assert ws.close_code == 1008 or (await ws.wait_closed()) is None and ws.close_code == 1008
            async with await connect(srv.ws_url + "?token=s3cret") as ws:
                assert (await recv_json(ws, "hello"))["type"] == "hello"
        run(go())
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(srv.url + "metrics")
        assert err.value.code == 401
        req = urllib.request.Request(srv.url + "metrics", headers={"Authorization": "Bearer s3cret"})
        assert b"sf_frames_sent_total" in urllib.request.urlopen(req).read()
    finally:
        srv.stop()


def test_sigterm_tells_clients_and_leaves_playable_recordings(tmp_path) -> None:
    from sf_sdk.video import read_video

    rec = tmp_path / "rec"
    srv = ServerProcess("--max-sessions", "2", "--record", str(rec))

    async def go():
        clients = [await connect(srv.ws_url) for _ in range(2)]
        for ws, prompt in zip(clients, (RED, BLUE)):
            await send(ws, type="start", prompt=prompt)
            await recv_json(ws, "started")
        await asyncio.sleep(2.5)
        srv.proc.send_signal(signal.SIGTERM)
        notices = []
        for ws in clients:
            notices.append(await recv_json(ws, "shutdown", timeout=20))
        return notices

    notices = run(go())
    assert [n["type"] for n in notices] == ["shutdown", "shutdown"]
    assert srv.stop(timeout=30) == 0
    files = sorted(rec.glob("*.mp4"))
    assert len(files) == 2
    for f in files:
        video = read_video(f)
        assert video.shape[0] >= 9 and video.shape[1:] == (64, 64, 3)
