"""VideoStream: one stream of a generator, chunk by chunk, steerable while it runs.

A stream is a :class:`~sf_sdk.pool.StreamPool` of one underneath (the generator keeps that pool
and its KV cache between streams), so a stream alone and the same stream in a pool compute the
same chunks. A generator runs one stream at a time: starting a stream supersedes an unfinished
one (which then raises if iterated again). That holds across threads too: chunks are computed
under the generator's lock, so a stream started from another thread takes over between two
chunks, and the superseded one raises RuntimeError at its next chunk; no chunk is ever computed
from a mixed state. To serve several streams at once, use :meth:`StreamingGenerator.pool`. Grad mode is only switched off while a chunk is
computed, never across a ``yield``, so the caller's code between chunks runs in its own mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from sf_sdk.pool import DEFAULT_BLEND_CHUNKS, PooledStream, StreamRequest, check_transition
from sf_sdk.results import VideoChunk

if TYPE_CHECKING:  # pragma: no cover
    from sf_sdk.generator import StreamingGenerator

__all__ = ["VideoStream"]


class VideoStream:
    """An iterator of :class:`~sf_sdk.results.VideoChunk`; a context manager that stops the stream
    on exit. Each chunk is computed when it is asked for.

    ``set_prompt`` / ``reset`` steer it from the next chunk on (see :mod:`sf_sdk.pool`); called
    before the first chunk, a new prompt simply becomes the starting prompt.
    """

    def __init__(self, gen: StreamingGenerator, req: StreamRequest) -> None:
        self._gen = gen
        self._req = req
        self._handle: PooledStream | None = None
        self._superseded = False
        self._early: tuple | None = None  # a set_prompt before the first chunk
        self.chunks_done = 0
        self.closed = False

    def __enter__(self) -> VideoStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> VideoStream:
        return self

    def __next__(self) -> VideoChunk:
        if self.closed:
            raise StopIteration
        try:
            with self._gen._lock:  # one chunk of one stream of this generator at a time
                self._check_live("iterate")
                if self._handle is None:
                    self._handle = self._gen._open_solo(self)
                    if self._early is not None:
                        prompt, embeds = self._early
                        self._handle.set_prompt(prompt, prompt_embeds=embeds, transition="cut")
                if self._handle.closed:  # it produced all of its frames
                    self.close()
                    raise StopIteration
                chunk = self._handle._pool.step()[self._handle]
        except BaseException:
            self.close()
            raise
        self.chunks_done += 1
        return chunk

    # ------------------------------------------------------------------ steering
    def set_prompt(self, prompt: str | None = None, *, prompt_embeds: Tensor | None = None,
                   transition: str = "recache", chunks: int = DEFAULT_BLEND_CHUNKS) -> None:
        """Change the prompt at the next chunk boundary: ``transition`` is ``"recache"`` (the
        cached frames re-encoded under the new prompt), ``"blend"`` (the prompt embedding moves
        linearly to the new one over ``chunks`` chunks) or ``"cut"``."""
        self._check_live("set_prompt")
        if self._handle is None:
            check_transition(transition, chunks)  # validate now
            self._gen._padded_embeds(prompt, prompt_embeds)
            self._early = (prompt, prompt_embeds)
            return
        self._handle.set_prompt(prompt, prompt_embeds=prompt_embeds, transition=transition, chunks=chunks)

    def reset(self) -> None:
        """Start again at frame 0 from the next chunk on (cache and decoder cleared), same prompt."""
        self._check_live("reset")
        if self._handle is not None:
            self._handle.reset()

    @property
    def prompt(self) -> str | None:
        return self._handle.prompt if self._handle is not None else self._req.prompt

    def close(self) -> None:
        """Stop the stream; the generator can start another one."""
        with self._gen._lock:  # not in the middle of a chunk
            if self._handle is not None:
                self._handle.close()
            self.closed = True
            if self._gen._active is self:
                self._gen._active = None

    def _check_live(self, what: str) -> None:
        if self._superseded:
            raise RuntimeError("this stream was superseded by a newer stream of the same generator (one KV "
                               "cache per generator): finish or close a stream before starting the next")
        if self.closed and what != "iterate":
            raise RuntimeError(f"{what}() on a closed stream: start a new one with gen.stream(...)")
