"""The ``sf-serve`` command: load a model, serve it with uvicorn, stop cleanly on SIGTERM / Ctrl-C.

On the first SIGTERM or SIGINT the server stops taking sessions, the engine finishes the chunk in
flight, every client gets a ``shutdown`` message, recordings are closed (valid MP4s), then uvicorn
closes the connections and the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

log = logging.getLogger("sf_sdk.serve")

DEFAULT_WINDOW = 6
SHUTDOWN_GRACE_S = 0.5  # time the senders get to deliver the shutdown notice
SEND_BUFFER_BYTES = 32 * 1024  # kernel send buffer per connection (Linux doubles it)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"sf-serve: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sf-serve", description="Serve live video generation to the browser.")
    p.add_argument("--model", default="shapes-tiny", help="model folder or bundled name (default shapes-tiny)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", help="auto, float32 or bfloat16 (default auto: bfloat16 on CUDA and on AMX CPUs for DiTs "
                                  "big enough to gain, else float32; sf_sdk.precision)")
    p.add_argument("--backend", default="auto",
                   help="generator backend (default auto: the fastest per component, exported into the artifact "
                        "cache before serving on first use; eager, onnxruntime, ...)")
    p.add_argument("--max-sessions", type=int, default=4, help="streams served at once: the pool size (default 4)")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                   help=f"rolling attention window in latent frames (default {DEFAULT_WINDOW})")
    p.add_argument("--token", help="a secret clients must present (?token=...); required from every client when given")
    p.add_argument("--record", type=Path, metavar="DIR", help="also write each session to an MP4 in DIR")
    p.add_argument("--buffer-frames", type=int, default=32, help="frames queued per client before dropping (default 32)")
    p.add_argument("--warmup", type=int, default=2, metavar="STEPS",
                   help="steps of a full pool before serving (default 2; 0: none)")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--quiet", "-q", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name, value, lo in (("--max-sessions", args.max_sessions, 1), ("--window", args.window, 1),
                            ("--buffer-frames", args.buffer_frames, 1), ("--port", args.port, 0)):
        if value < lo:
            print(f"sf-serve: error: {name} must be >= {lo}, got {value}", file=sys.stderr)
            return 2
    if args.token is not None and not args.token.strip():
        print("sf-serve: error: --token is empty", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.token is None:
        log.warning("listening on %s without --token: anyone who can reach this address can use the GPU", args.host)
    try:
        import uvicorn

        from sf_sdk.serve.app import ServeConfig, create_app
        from sf_sdk.serve.engine import EngineConfig
        from sf_sdk.serve.protocol import Limits
    except ImportError as exc:
        print(f"sf-serve: error: {exc.name} is missing: pip install 'sf-sdk[serve]'", file=sys.stderr)
        return 2
    import torch

    from sf_sdk.generator import StreamingGenerator

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or "auto"
    try:
        # A server lives long: auto exports its pool's DiT before serving (once; later starts load it),
        # unless $SF_SDK_AUTO_BUILD says otherwise.
        options = None
        if args.backend == "auto":
            from export.auto import BUILD_ENV

            options = {"build": os.environ.get(BUILD_ENV) or "now", "streams": args.max_sessions}
        gen = StreamingGenerator.from_pretrained(args.model, device=device, dtype=dtype, backend=args.backend,
                                                 backend_options=options,
                                                 streaming={"local_attn_size": args.window})
        config = ServeConfig(engine=EngineConfig(max_sessions=args.max_sessions, buffer_frames=args.buffer_frames,
                                                 record_dir=args.record, warmup_steps=max(0, args.warmup)),
                             limits=Limits(), token=args.token, model_name=str(args.model))
        app = create_app(gen, config)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"sf-serve: error: {exc}", file=sys.stderr)
        return 2
    engine = app.state.engine

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # the first signal: drain, then stop
            if engine.accepting and not self.should_exit:
                log.info("stopping: finishing the chunk in flight and telling the clients")
                engine.begin_shutdown()
                threading.Timer(SHUTDOWN_GRACE_S, self._stop, (sig, frame)).start()
            else:
                self._stop(sig, frame)

        def _stop(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            # uvicorn re-raises captured signals once it has shut down (the process then dies by the
            # signal); a stop we handled ends with exit code 0 instead.
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    uv = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", ws="websockets-sansio",
                        ws_max_size=1 << 20, lifespan="on", timeout_graceful_shutdown=5)
    server = Server(uv)

    orig_startup = server.startup

    async def startup(sockets=None) -> None:
        await orig_startup(sockets=sockets)
        for s in server.servers:
            for sock in s.sockets:
                host, port = sock.getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                print(f"sf-serve: {args.model} on {device}, {args.max_sessions} sessions: http://{shown}:{port}/",
                      flush=True)

    server.startup = startup
    try:
        sock = _listen(args.host, args.port)
    except OSError as exc:
        print(f"sf-serve: error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    server.run(sockets=[sock])
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, with a bounded kernel send buffer that accepted connections inherit:
    what a client that stops reading can hold up in the kernel stays small, so its frames back up
    into its (bounded, dropping) frame buffer instead."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
    sock.bind(addr)
    sock.listen(128)
    sock.setblocking(False)
    return sock


if __name__ == "__main__":
    sys.exit(main())
