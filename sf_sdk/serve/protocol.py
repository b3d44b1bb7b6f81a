"""The sf-serve session protocol: control messages (JSON text) and frame packets (binary).

One WebSocket is one session. The client sends JSON objects with a ``type``:

* ``{"type": "start", "prompt": str, "seed": int = 0, "transition": ...}`` — open a stream;
* ``{"type": "set_prompt", "prompt": str, "transition": "recache" | "blend" | "cut", "chunks": int}``;
* ``{"type": "reset"}`` — start again at frame 0, same prompt;
* ``{"type": "stop"}`` — close the stream (the socket stays open; ``start`` again to restart);
* ``{"type": "ping"}`` — answered with ``pong``;
* ``{"type": "ack", "frame": int}`` — the newest frame the client has received (no answer). The
  server keeps at most ``max_in_flight`` frames sent but not acknowledged per client; a client
  that stops acknowledging (it stopped reading) gets no more frames, and its oldest queued ones
  are dropped. Acknowledge at least every 16 frames.

The server answers with JSON text messages (``hello``, ``started``, ``busy``, ``prompt_set``,
``reset_done``, ``stopped``, ``stats``, ``pong``, ``error``, ``shutdown``) and sends every frame as
one binary message: a 4-byte big-endian header length, a UTF-8 JSON header (``frame``: the
session's frame index, ``chunk``, ``ready``: server wall-clock seconds when the chunk was ready,
``version``: the prompt version the frame was generated under, ``dropped``: frames dropped so far)
and the frame as a JPEG image. Errors never close the socket, except an authorization failure
(close code 1008) and messages over the transport's hard limit.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from sf_sdk.pool import TRANSITIONS

__all__ = ["ProtocolError", "parse_message", "pack_frame", "unpack_frame", "MESSAGE_TYPES", "Limits"]

MESSAGE_TYPES = ("start", "set_prompt", "reset", "stop", "ping", "ack")


class ProtocolError(ValueError):
    """A client message that breaks the protocol; ``code`` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Limits:
    """What a client message may carry."""

    max_message_bytes: int = 16 * 1024
    max_prompt_chars: int = 500
    max_blend_chunks: int = 32

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_prompt_chars", "max_blend_chunks"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def _prompt(msg: dict[str, Any], limits: Limits) -> str:
    prompt = msg.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ProtocolError("bad_prompt", "'prompt' must be a non-empty string describing the video")
    if len(prompt) > limits.max_prompt_chars:
        raise ProtocolError("prompt_too_long", f"the prompt has {len(prompt)} characters; at most "
                                               f"{limits.max_prompt_chars} are accepted")
    return prompt.strip()


def _int(msg: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = msg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ProtocolError(f"bad_{key}", f"'{key}' must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def parse_message(text: str | bytes, limits: Limits) -> dict[str, Any]:
    """Validate one client message; returns a normalized dict (``type`` and its fields)."""
    size = len(text.encode() if isinstance(text, str) else text)
    if size > limits.max_message_bytes:
        raise ProtocolError("message_too_large", f"the message has {size} bytes; at most "
                                                 f"{limits.max_message_bytes} are accepted")
    if isinstance(text, bytes):
        raise ProtocolError("bad_message", "control messages are JSON text, not binary")
    try:
        msg = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError("bad_json", f"the message is not JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(msg, dict) or "type" not in msg:
        raise ProtocolError("bad_message", "a message is a JSON object with a 'type'")
    kind = msg["type"]
    if kind not in MESSAGE_TYPES:
        raise ProtocolError("unknown_type", f"unknown message type {kind!r}; expected one of {list(MESSAGE_TYPES)}")
    out: dict[str, Any] = {"type": kind}
    if kind == "start":
        out["prompt"] = _prompt(msg, limits)
        out["seed"] = _int(msg, "seed", 0, 0, 2**63 - 1)
    elif kind == "set_prompt":
        out["prompt"] = _prompt(msg, limits)
        transition = msg.get("transition", "recache")
        if transition not in TRANSITIONS:
            raise ProtocolError("bad_transition", f"'transition' must be one of {list(TRANSITIONS)}, got {transition!r}")
        out["transition"] = transition
        out["chunks"] = _int(msg, "chunks", 3, 1, limits.max_blend_chunks)
    elif kind == "ack":
        out["frame"] = _int(msg, "frame", -1, 0, 2**63 - 1)
    return out


def pack_frame(header: dict[str, Any], jpeg: bytes) -> bytes:
    """One binary frame message: header length (u32, big-endian), JSON header, JPEG bytes."""
    head = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack(">I", len(head)) + head + jpeg


def unpack_frame(data: bytes) -> tuple[dict[str, Any], bytes]:
    """The inverse of :func:`pack_frame` (clients and tests)."""
    (n,) = struct.unpack(">I", data[:4])
    return json.loads(data[4:4 + n]), data[4 + n:]
