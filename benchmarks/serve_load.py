"""sf-serve under load: N WebSocket clients against a real server on loopback, side by side for
several N.

    python benchmarks/serve_load.py --clients 1,4,8 --seconds 30 --json out.json
    OMP_NUM_THREADS=2 python benchmarks/serve_load.py --clients 8 --seconds 60 --threads 2

For each client count N a fresh ``python -m sf_sdk.serve --max-sessions N`` starts on 127.0.0.1
(a subprocess; ``--threads`` is passed through, else torch chooses), N clients connect from this
process (``websockets``, one asyncio loop), each ``start``s its own shapes-domain prompt and
reads every message until the end. Nothing leaves 127.0.0.1 (proxies are bypassed) and every
wait has a timeout, so a run ends by itself. What each figure includes (also in the JSON under
"definitions"):

* Warm-up, excluded and reported apart: from ``start`` to the arrival of the client's whole first
  chunk (its first frame of chunk 1). The measured window opens when every client is past it and
  lasts ``--seconds``; all clients keep reading (and are counted) during the same window.
* ``fps``: frames that arrived in the window / the window's length (the server paces each client
  at the video's frame rate, so real time is that rate).
* ``interval_p50/p95/p99_ms``: gaps between consecutive frame arrivals in the window
  (``time.monotonic`` when ``recv()`` returned in this process: includes this process's own
  scheduling on a shared CPU).
* ``latency_p50/p95_ms``: arrival wall clock minus the header's ``ready`` (server wall clock when
  the chunk was ready, before JPEG encoding); same machine, same clock. It includes the JPEG
  encode, the server's real-time playout buffer (a chunk's frames are ready together and wait
  their turn at the frame rate behind the frames already queued), the transfer, and this process.
* ``dropped``: from the frame headers (frames the server dropped for this client so far);
  ``dropped_in_window``: the growth over the window. ``errors``: every ``error`` / ``busy`` /
  ``shutdown`` message and every disconnect that this benchmark did not ask for.
* Server: ``rss_start_mb`` (VmRSS of the server process once it listens: model loaded, before any
  client), ``rss_after_warmup_mb``, ``rss_end_mb`` (after the window and the prompt switches);
  ``/metrics`` totals at the end; CPU use (cores) of the server, of this process and of everything
  else on the machine over the window (the machine may be shared).
* ``where_time_goes``: ``/metrics`` deltas over the window: engine steps, the mean step
  (``sf_step_seconds``: batched DiT + every stream's VAE decode) and per step the DiT, decode and
  JPEG-encode seconds (``sf_stage_seconds``; encode is outside the step), against the real-time
  budget of one step (frames per chunk / FPS).
* ``switch``: on client 0, after the window, ``set_prompt`` (transition ``recache``) to another
  prompt, ``--switch-repeats`` times (alternating): ``total_ms`` from the send to the arrival of
  the first frame whose header ``version`` is the new one; split into ``reply_ms`` (the
  ``prompt_set`` answer: waits for the step in flight), ``ready_ms`` (send -> that frame's
  ``ready``: the step in flight plus the recache step) and ``playout_ms`` (its ``ready`` -> arrival:
  the old prompt's frames still queued ahead of it). Medians.

Goals (printed and in the JSON under "goals"): 8 clients each at real time (>= 15.5 FPS measured
for 16 FPS video: a tolerance of about 3% for the window edges and the host clock), p95 frame
interval <= 2x the median for every client, server RSS growth < 50 MB over each run (start -> end),
errors 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import queue
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from sf_sdk.serve.protocol import unpack_frame  # noqa: E402
from sf_sdk.stats import percentile  # noqa: E402

PROMPTS = ("a red circle moving right", "a blue square moving up", "a green triangle moving left",
           "a yellow circle moving down", "a cyan square moving right", "a magenta triangle moving up",
           "a red square moving left", "a blue triangle moving down")
SWITCH_PROMPT = "a green circle moving left"  # client 0 switches to it and back
HOST = "127.0.0.1"
START_TIMEOUT_S = 180.0  # the server process: imports, model load, listening
WARMUP_TIMEOUT_S = 180.0  # start -> every client's first chunk
SWITCH_TIMEOUT_S = 60.0  # set_prompt -> the first frame of the new prompt
STOP_TIMEOUT_S = 30.0  # SIGTERM -> exit, then SIGKILL
GOAL_CLIENTS, GOAL_FPS, REAL_TIME_FPS = 8, 15.5, 16
GOAL_INTERVAL_RATIO, GOAL_RSS_GROWTH_MB = 2.0, 50.0
DEFINITIONS = {
    "warmup_s": "start sent -> arrival of the client's first frame of chunk 1 (its whole first chunk received); "
                "excluded from every other figure",
    "ttff_s": "start sent -> arrival of the client's first frame",
    "window_s": "the measured window: opens when every client is past its warm-up, the same for all clients",
    "fps": "frames that arrived in the window / window_s (the server paces each client at the video's FPS)",
    "interval_ms": "gaps between consecutive frame arrivals in the window (monotonic clock when recv() returned "
                   "in the client process, so it includes that process's scheduling); p50 / p95 / p99",
    "latency_ms": "arrival wall clock - header 'ready' (server wall clock when the chunk was ready, before JPEG "
                  "encoding); same machine, same clock; includes JPEG encode, the server's real-time playout "
                  "buffer (queued frames sent at the frame rate), the transfer and the client process",
    "dropped": "header 'dropped' of the client's last frame (frames the server dropped for it so far); "
               "dropped_in_window: its growth over the window",
    "errors": "error / busy / shutdown messages and disconnects the benchmark did not ask for",
    "rss_mb": "VmRSS of the server process: start = listening (model loaded, no client), after_warmup, end = "
              "after the window and the prompt switches; rss_growth_mb = end - start (the goal: it includes the "
              "first steps' one-time allocations), rss_growth_after_warmup_mb = end - after_warmup (steady state)",
    "metrics": "the server's /metrics totals at the end of the run",
    "cpu_cores": "CPU seconds / wall seconds over the window: the server process, this client process, and the "
                 "rest of the machine (/proc/stat busy minus both)",
    "where_time_goes": "/metrics deltas over the window: engine steps, mean sf_step_seconds (batched DiT + every "
                       "stream's VAE decode) and sf_stage_seconds per step (dit, decode, encode = JPEG, outside "
                       "the step); budget_s = frames per chunk / FPS, the step time real time allows; "
                       "engine_busy = (step + encode seconds) / window",
    "switch": "client 0 after the window, set_prompt transition=recache: total_ms send -> arrival of the first "
              "frame with the new header version; reply_ms send -> prompt_set; ready_ms send -> that frame's "
              "'ready' (step in flight + recache step); playout_ms its 'ready' -> arrival (old frames queued "
              "ahead); medians of the repeats",
}


# --------------------------------------------------------------------------------------------
# The server process
# --------------------------------------------------------------------------------------------


class ServerProcess:
    """``python -m sf_sdk.serve --host 127.0.0.1 --port 0 ...``; ``url`` once it listens."""

    def __init__(self, model: str, max_sessions: int, threads: int | None) -> None:
        cmd = [sys.executable, "-m", "sf_sdk.serve", "--model", model, "--host", HOST, "--port", "0",
               "--max-sessions", str(max_sessions), "--quiet"]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + path if path else "")}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     cwd=REPO)
        self.output: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()  # keeps the pipe drained
        self.url = self._wait_for_url()
        self.ws_url = self.url.replace("http://", "ws://") + "ws"

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
            if m:
                return m.group(1)
        self.kill()
        raise RuntimeError("sf-serve did not start:\n" + "".join(self.output))

    def rss_mb(self) -> float | None:
        kb = _status_kb(self.proc.pid, "VmRSS")
        return kb / 1024 if kb is not None else None

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server process so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def get(self, route: str, timeout: float = 10.0) -> bytes:
        """GET a route of the server, never through a proxy."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(self.url + route, timeout=timeout) as resp:
            return resp.read()

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.get("metrics").decode())

    def stop(self) -> int:
        """SIGTERM (the server drains and exits 0), SIGKILL after STOP_TIMEOUT_S; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _status_kb(pid: int | str, name: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores; /proc/stat minus idle and iowait)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


# --------------------------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------------------------


@dataclass
class Client:
    index: int
    prompt: str
    ws: Any = None
    frames: list[tuple[float, float, dict[str, Any]]] = field(default_factory=list)  # (monotonic, wall, header)
    messages: list[tuple[float, dict[str, Any]]] = field(default_factory=list)  # (monotonic, message)
    errors: list[str] = field(default_factory=list)
    closing: bool = False
    start_sent: float = 0.0
    reader: asyncio.Task | None = None

    async def read(self) -> None:
        """Every message until the socket closes; frames and messages timestamped on arrival."""
        import websockets

        try:
            async for msg in self.ws:
                mono, wall = time.monotonic(), time.time()
                if isinstance(msg, bytes):
                    header, jpeg = unpack_frame(msg)
                    if jpeg[:2] != b"\xff\xd8":
                        self.errors.append(f"frame {header.get('frame')} is not a JPEG")
                    self.frames.append((mono, wall, header))
                    if len(self.frames) % 4 == 0:  # the protocol's flow control: acknowledge what arrived
                        await self.ws.send(json.dumps({"type": "ack", "frame": header["frame"]}))
                else:
                    data = json.loads(msg)
                    self.messages.append((mono, data))
                    if data.get("type") in ("error", "busy", "shutdown") and not self.closing:
                        self.errors.append(f"{data['type']}: {data.get('code', '')} {data.get('message', '')}")
        except websockets.ConnectionClosed as exc:
            if not self.closing:
                self.errors.append(f"disconnected: {exc}")
            return
        if not self.closing:
            self.errors.append("disconnected by the server")

    def message(self, kind: str, after: int = 0) -> tuple[float, dict[str, Any]] | None:
        return next(((t, m) for t, m in self.messages[after:] if m.get("type") == kind), None)

    def first_frame(self, after: int = 0, **match: Any) -> tuple[float, float, dict[str, Any]] | None:
        """The first frame from index ``after`` whose header fields are >= ``match``'s values."""
        return next((f for f in self.frames[after:] if all(f[2].get(k, -1) >= v for k, v in match.items())),
                    None)

    async def send(self, **msg: Any) -> None:
        await self.ws.send(json.dumps(msg))


async def wait_until(predicate, timeout: float, what: str, clients: list[Client]) -> None:
    """Poll ``predicate`` until it holds; raise TimeoutError (saying what) after ``timeout`` or
    as soon as a client has an error."""
    deadline = time.monotonic() + timeout
    while not predicate():
        failed = [c for c in clients if c.errors]
        if failed:
            raise RuntimeError(f"client {failed[0].index}: {failed[0].errors[0]} (while waiting for {what})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:g} s")
        await asyncio.sleep(0.02)


async def connect(client: Client, url: str) -> None:
    import websockets

    # No proxy (loopback only); no client pings (browsers send none; the server pings).
    client.ws = await websockets.connect(url, proxy=None, ping_interval=None, open_timeout=30, max_size=1 << 22)
    client.reader = asyncio.create_task(client.read())


# --------------------------------------------------------------------------------------------
# One run: N clients against a fresh server
# --------------------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    """:func:`sf_sdk.stats.percentile` (the definition every benchmark uses); None for no values."""
    return percentile(values, q) if values else None


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


def client_figures(c: Client, t0: float, t1: float) -> dict[str, Any]:
    window = [f for f in c.frames if t0 <= f[0] < t1]
    gaps = [(b[0] - a[0]) * 1e3 for a, b in zip(window, window[1:])]
    lat = [(wall - h["ready"]) * 1e3 for _, wall, h in window]
    first = c.frames[0] if c.frames else None
    warm = c.first_frame(chunk=1)
    return {
        "client": c.index, "prompt": c.prompt, "frames": len(window), "fps": len(window) / (t1 - t0),
        "interval_p50_ms": _r(_pct(gaps, 50)), "interval_p95_ms": _r(_pct(gaps, 95)),
        "interval_p99_ms": _r(_pct(gaps, 99)), "interval_max_ms": _r(max(gaps, default=None)),
        "latency_p50_ms": _r(_pct(lat, 50)), "latency_p95_ms": _r(_pct(lat, 95)),
        "dropped": c.frames[-1][2]["dropped"] if c.frames else 0,
        "dropped_in_window": window[-1][2]["dropped"] - window[0][2]["dropped"] if window else 0,
        "ttff_s": _r(first[0] - c.start_sent, 3) if first else None,
        "warmup_s": _r(warm[0] - c.start_sent, 3) if warm else None,
        "frames_total": len(c.frames), "errors": len(c.errors), "error_messages": c.errors[:10],
    }


def where_time_goes(m0: dict[str, float], m1: dict[str, float], window_s: float, fps: int,
                    chunk_frames: int | None) -> dict[str, Any]:
    def d(key: str) -> float:
        return m1.get(key, 0.0) - m0.get(key, 0.0)

    steps = d("sf_step_seconds_count")
    per = (lambda x: x / steps) if steps else (lambda x: None)
    step_s, enc = d("sf_step_seconds_sum"), d('sf_stage_seconds_total{stage="encode"}')
    return {
        "steps": int(steps), "steps_per_s": steps / window_s,
        "step_mean_s": _r(per(step_s), 4),
        "dit_per_step_s": _r(per(d('sf_stage_seconds_total{stage="dit"}')), 4),
        "decode_per_step_s": _r(per(d('sf_stage_seconds_total{stage="decode"}')), 4),
        "encode_per_step_s": _r(per(enc), 4),
        "budget_s": chunk_frames / fps if chunk_frames else None,
        "engine_busy": _r((step_s + enc) / window_s, 3),
        "frames_generated": int(d("sf_frames_generated_total")), "frames_sent": int(d("sf_frames_sent_total")),
        "frames_dropped": int(d("sf_frames_dropped_total")),
    }


async def switch_latency(c: Client, repeats: int, clients: list[Client]) -> dict[str, Any]:
    runs = []
    for r in range(repeats):
        prompt = SWITCH_PROMPT if r % 2 == 0 else c.prompt
        n_msgs, n_frames = len(c.messages), len(c.frames)
        sent_mono, sent_wall = time.monotonic(), time.time()
        await c.send(type="set_prompt", prompt=prompt, transition="recache")
        await wait_until(lambda n_msgs=n_msgs: c.message("prompt_set", n_msgs), SWITCH_TIMEOUT_S, "prompt_set",
                         clients)
        reply_t, reply = c.message("prompt_set", n_msgs)
        version = reply["version"]
        await wait_until(lambda n_frames=n_frames, version=version: c.first_frame(n_frames, version=version),
                         SWITCH_TIMEOUT_S,
                         f"frame of prompt version {version}", clients)
        mono, wall, header = c.first_frame(n_frames, version=version)
        runs.append({"prompt": prompt, "version": version, "total_ms": (mono - sent_mono) * 1e3,
                     "reply_ms": (reply_t - sent_mono) * 1e3, "ready_ms": (header["ready"] - sent_wall) * 1e3,
                     "playout_ms": (wall - header["ready"]) * 1e3})
    med = {k: _r(statistics.median(x[k] for x in runs), 1)
           for k in ("total_ms", "reply_ms", "ready_ms", "playout_ms")}
    return {"transition": "recache", "client": c.index, "repeats": repeats, **med,
            "runs": [{k: _r(v, 1) if isinstance(v, float) else v for k, v in x.items()} for x in runs]}


async def drive(server: ServerProcess, n: int, args: argparse.Namespace) -> dict[str, Any]:
    clients = [Client(i, PROMPTS[i % len(PROMPTS)]) for i in range(n)]
    out: dict[str, Any] = {}
    try:
        await asyncio.gather(*(connect(c, server.ws_url) for c in clients))
        await wait_until(lambda: all(c.message("hello") for c in clients), 30, "hello", clients)
        hello = clients[0].message("hello")[1]
        fps = hello["fps"]
        out["extensions"] = clients[0].ws.response.headers.get("Sec-WebSocket-Extensions")
        for c in clients:
            c.start_sent = time.monotonic()
            await c.send(type="start", prompt=c.prompt, seed=c.index)
        await wait_until(lambda: all(c.message("started") for c in clients), WARMUP_TIMEOUT_S, "started", clients)
        await wait_until(lambda: all(c.first_frame(chunk=1) for c in clients), WARMUP_TIMEOUT_S,
                         "first chunk on every client", clients)
        out["rss_after_warmup_mb"] = server.rss_mb()
        loop = asyncio.get_running_loop()
        m0 = await loop.run_in_executor(None, server.metrics)
        cpu0 = (server.cpu_s(), self_cpu_s(), machine_busy_s())
        t0 = time.monotonic()
        await asyncio.sleep(args.seconds)
        t1 = time.monotonic()
        cpu1 = (server.cpu_s(), self_cpu_s(), machine_busy_s())
        m1 = await loop.run_in_executor(None, server.metrics)
        window_s = t1 - t0
        chunk_frames = sum(1 for f in clients[0].frames if f[2]["chunk"] == 1) or None
        srv, me, total = ((b - a) / window_s for a, b in zip(cpu0, cpu1))
        out.update(fps_video=fps, window_s=window_s, chunk_frames=chunk_frames,
                   where_time_goes=where_time_goes(m0, m1, window_s, fps, chunk_frames),
                   cpu_cores={"server": _r(srv), "client_process": _r(me),
                              "rest_of_machine": _r(max(0.0, total - srv - me)), "machine": _r(total),
                              "cores": os.cpu_count()})
        out["clients"] = [client_figures(c, t0, t1) for c in clients]
        out["switch"] = await switch_latency(clients[0], args.switch_repeats, clients) \
            if args.switch_repeats else None
        m2 = await loop.run_in_executor(None, server.metrics)
        out["metrics"] = {k: int(m2.get(f"sf_{k}_total", 0)) for k in ("frames_sent", "frames_dropped",
                                                                        "frames_generated")}
        out["rss_end_mb"] = server.rss_mb()
    except Exception as exc:  # a timeout, a refused connection, a client error: reported, the server stopped
        out["failure"] = f"{type(exc).__name__}: {exc}"
    finally:
        for c in clients:
            c.closing = True
        for c in clients:
            if c.ws is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(c.ws.close(), 10)
            if c.reader is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(c.reader, 10)
    if "clients" not in out:  # failed before the window: still report each client's errors
        out["clients"] = [{"client": c.index, "prompt": c.prompt, "fps": 0.0, "frames": 0,
                           "errors": max(1, len(c.errors)), "error_messages": c.errors[:10]} for c in clients]
    return out


def run_one(n: int, args: argparse.Namespace) -> dict[str, Any]:
    t_launch = time.monotonic()
    server = ServerProcess(args.model, n, args.threads)
    try:
        startup_s = time.monotonic() - t_launch
        health = json.loads(server.get("healthz"))
        rss_start = server.rss_mb()
        load = os.getloadavg()
        result = asyncio.run(drive(server, n, args))
    finally:
        exit_code = server.stop()
    rss_end, rss_warm = result.pop("rss_end_mb", None), result.pop("rss_after_warmup_mb", None)
    errors = sum(c["errors"] for c in result["clients"]) + (1 if "failure" in result else 0)
    server_info = {"startup_s": round(startup_s, 2), "device": health.get("device"), "dtype": health.get("dtype"),
                   "frame_size": health.get("frame_size"), "threads": args.threads, "exit_code": exit_code,
                   "rss_start_mb": _r(rss_start, 1), "rss_after_warmup_mb": _r(rss_warm, 1),
                   "rss_end_mb": _r(rss_end, 1),
                   "rss_growth_mb": _r(rss_end - rss_start, 1) if rss_end is not None and rss_start else None,
                   "rss_growth_after_warmup_mb": _r(rss_end - rss_warm, 1)
                   if rss_end is not None and rss_warm else None,
                   "loadavg_at_start": [round(x, 2) for x in load]}
    return {"clients_n": n, "errors": errors, "server": server_info, **result}


# --------------------------------------------------------------------------------------------
# Goals, report
# --------------------------------------------------------------------------------------------


def goals(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def fps_goal() -> dict[str, Any]:
        run = runs.get(str(GOAL_CLIENTS))
        if run is None:
            return {"met": None, "why": f"{GOAL_CLIENTS} clients were not run"}
        worst = min(c["fps"] for c in run["clients"])
        return {"met": worst >= GOAL_FPS and run["errors"] == 0, "worst_fps": round(worst, 2)}

    ratios = {k: max((c["interval_p95_ms"] / c["interval_p50_ms"] for c in r["clients"]
                      if c.get("interval_p50_ms")), default=None) for k, r in runs.items()}
    growth = {k: r["server"]["rss_growth_mb"] for k, r in runs.items()}
    errs = {k: r["errors"] for k, r in runs.items()}
    return {
        "real_time": {"goal": f"{GOAL_CLIENTS} clients each at >= {REAL_TIME_FPS} FPS (real time), accepted as "
                              f">= {GOAL_FPS} FPS measured (about 3% for window edges and the host clock)",
                      **fps_goal()},
        "smooth": {"goal": f"every client's p95 frame interval <= {GOAL_INTERVAL_RATIO:g}x its median, every run",
                   "worst_ratio": {k: _r(v) for k, v in ratios.items()},
                   "met": all(v is not None and v <= GOAL_INTERVAL_RATIO for v in ratios.values())},
        "memory": {"goal": f"server RSS growth < {GOAL_RSS_GROWTH_MB:g} MB from start to end of each run",
                   "growth_mb": growth, "met": all(v is not None and v < GOAL_RSS_GROWTH_MB for v in growth.values())},
        "errors": {"goal": "errors 0 (error messages, unasked disconnects), every run", "errors": errs,
                   "met": all(v == 0 for v in errs.values())},
    }


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"
    return str(x)


def report(data: dict[str, Any]) -> str:
    runs = data["runs"]
    keys = list(runs)

    def agg(fn):
        return [fn(runs[k]) for k in keys]

    def cl(name, how):
        return lambda r: how([c[name] for c in r["clients"] if c.get(name) is not None]) \
            if any(c.get(name) is not None for c in r["clients"]) else None

    rows = [
        ("fps min / client", cl("fps", min)), ("fps median / client", cl("fps", statistics.median)),
        ("interval p50 ms (worst)", cl("interval_p50_ms", max)),
        ("interval p95 ms (worst)", cl("interval_p95_ms", max)),
        ("interval p99 ms (worst)", cl("interval_p99_ms", max)),
        ("latency p50 ms (median)", cl("latency_p50_ms", statistics.median)),
        ("latency p95 ms (worst)", cl("latency_p95_ms", max)),
        ("dropped (all clients)", cl("dropped", sum)), ("errors", lambda r: r["errors"]),
        ("warm-up s (worst)", cl("warmup_s", max)),
        ("switch total ms (median)", lambda r: (r.get("switch") or {}).get("total_ms")),
        ("  ready ms / playout ms", lambda r: "/".join(_fmt((r.get("switch") or {}).get(k))
                                                       for k in ("ready_ms", "playout_ms"))),
        ("RSS start MB", lambda r: r["server"]["rss_start_mb"]), ("RSS end MB", lambda r: r["server"]["rss_end_mb"]),
        ("RSS growth MB", lambda r: r["server"]["rss_growth_mb"]),
        ("  of which after warm-up", lambda r: r["server"]["rss_growth_after_warmup_mb"]),
        ("/metrics frames_sent", lambda r: r.get("metrics", {}).get("frames_sent")),
        ("/metrics frames_dropped", lambda r: r.get("metrics", {}).get("frames_dropped")),
        ("steps / s", lambda r: r.get("where_time_goes", {}).get("steps_per_s")),
        ("step mean s (budget)", lambda r: "{} ({})".format(*(_fmt(r.get("where_time_goes", {}).get(k))
                                                            for k in ("step_mean_s", "budget_s")))),
        ("  dit / decode / encode s", lambda r: "/".join(_fmt(r.get("where_time_goes", {}).get(k)) for k in
                                                        ("dit_per_step_s", "decode_per_step_s", "encode_per_step_s"))),
        ("engine busy", lambda r: r.get("where_time_goes", {}).get("engine_busy")),
        ("CPU cores srv/client/rest", lambda r: "/".join(_fmt(r.get("cpu_cores", {}).get(k))
                                                        for k in ("server", "client_process", "rest_of_machine"))),
    ]
    width = max(len(name) for name, _ in rows) + 2
    lines = [f"sf-serve load: {data['config']['model']}, {data['config']['seconds']:g} s window, server threads "
             f"{data['config']['threads'] or 'torch default'} (OMP_NUM_THREADS={data['machine']['omp_num_threads']}), "
             f"{data['machine']['cpu']} x{data['machine']['cores']}",
             "clients".ljust(width) + "".join(k.rjust(16) for k in keys)]
    for name, fn in rows:
        lines.append(name.ljust(width) + "".join(_fmt(v).rjust(16) for v in agg(fn)))
    for k in keys:
        if "failure" in runs[k]:
            lines.append(f"N={k} failed: {runs[k]['failure']}")
    lines.append("goals:")
    for g in data["goals"].values():
        met = {True: "MET", False: "NOT MET", None: "n/a"}[g["met"]]
        lines.append(f"  [{met}] {g['goal']}" + (f" ({g['why']})" if g.get("why") else ""))
    return "\n".join(lines)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("sf-sdk", "torch", "websockets", "starlette", "uvicorn", "numpy", "pillow"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"client counts must be >= 1, got {text!r}")
    return counts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=_counts, default=[1, 4, 8], help="client counts, comma-separated (1,4,8)")
    p.add_argument("--seconds", type=float, default=30.0, help="measured window per client count (30)")
    p.add_argument("--model", default="shapes-tiny", help="model for sf-serve (shapes-tiny)")
    p.add_argument("--threads", type=int, help="sf-serve --threads (default: torch chooses)")
    p.add_argument("--switch-repeats", type=int, default=3, help="set_prompt latency repeats on client 0 (3; 0: skip)")
    p.add_argument("--json", type=Path, help="write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seconds <= 0 or args.switch_repeats < 0:
        raise SystemExit("--seconds must be > 0 and --switch-repeats >= 0")
    try:
        import websockets  # noqa: F401
    except ImportError:
        raise SystemExit("serve_load needs the websockets package: pip install 'sf-sdk[serve]' websockets") from None
    runs = {}
    for n in args.clients:
        print(f"serve_load: {n} client(s), {args.seconds:g} s ...", file=sys.stderr, flush=True)
        runs[str(n)] = run_one(n, args)
    data = {
        "benchmark": "serve_load",
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "note": "server and clients share this machine (loopback); the machine may run other work: "
                            "see cpu_cores.rest_of_machine and loadavg_at_start"},
        "versions": versions(),
        "config": {"model": args.model, "clients": args.clients, "seconds": args.seconds, "threads": args.threads,
                   "switch_repeats": args.switch_repeats, "prompts": list(PROMPTS), "switch_prompt": SWITCH_PROMPT,
                   "seeds": "client index", "host": HOST, "server": "python -m sf_sdk.serve (defaults: window 6, "
                   "buffer 32 frames, JPEG quality 90)", "client": "websockets asyncio client, one process, "
                   "default compression offer, no client pings"},
        "definitions": DEFINITIONS,
        "runs": runs,
        "goals": goals(runs),
    }
    sys.stdout.write(report(data) + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0 if all(r["errors"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
