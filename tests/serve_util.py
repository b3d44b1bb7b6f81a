"""A real sf-serve process on loopback for the serving tests (protocol and browser)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import websockets

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120


class ServerProcess:
    """``python -m sf_sdk.serve --port 0 ...`` in a subprocess; ``url`` once it listens."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "sf_sdk.serve", "--port", "0", "--threads", "1", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
        self.output: list[str] = []
        deadline = time.monotonic() + START_TIMEOUT_S
        self.url = None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.output.append(line)
            m = re.search(r"(http://[^\s]+/)", line)
            if m:
                self.url = m.group(1)
                break
        if self.url is None:
            self.proc.kill()
            raise RuntimeError("sf-serve did not start:\n" + "".join(self.output))
        self.ws_url = self.url.replace("http://", "ws://") + "ws"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self.output.extend(self.proc.stdout.read().splitlines(keepends=True))
        return rc


async def connect(url: str, *, tiny_buffer: bool = False, **kwargs):
    """A WebSocket client; ``tiny_buffer``: a 1 KiB receive buffer (a client that falls behind fast)."""
    if tiny_buffer:
        host, port = re.match(r"ws://([^:/]+):(\d+)", url).groups()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        sock.connect((host, int(port)))
        return await websockets.connect(url, sock=sock, max_queue=1, **kwargs)
    return await websockets.connect(url, **kwargs)


async def recv_json(ws, kind: str | None = None, timeout: float = 30) -> dict:
    """The next control message (of type ``kind``), skipping frames."""
    deadline = time.monotonic() + timeout
    while True:
        msg = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
        if isinstance(msg, str):
            data = json.loads(msg)
            if kind is None or data["type"] == kind or data["type"] == "error" and kind != "stats":
                return data


async def send(ws, **msg) -> None:
    await ws.send(json.dumps(msg))
