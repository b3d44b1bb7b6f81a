"""The one seam that picks an attention implementation.

Layout everywhere is ``[B, L, H, D]`` (tokens before heads), the layout of the KV cache.

* :func:`attention` — full-sequence attention with an optional boolean mask (training,
  bidirectional teacher / critic, block-causal forward, the re-cache pass).
* cache attention — a chunk's queries over the first ``kv_len`` slots of a KV cache buffer (the
  chunk's own keys are already written there). ``kv_len`` is a Python int in eager streaming (the
  cache is sliced, no copy), or an integer tensor in exported graphs and pooled streams (0-dim, or
  ``[B]``: one length per row; the whole capacity is read and slots ``>= kv_len`` are masked, so
  shapes stay static).

The implementation is chosen once, by :func:`select_cache_attention`, when a stream (or an
exported graph) is set up, and carried by the step's attention object
(:class:`sf_sdk.models.dit.StepAttention`); nothing reads a process-wide switch per call. The
names: ``"reference"`` (PyTorch SDPA), ``"kernel"`` (the compiled ``sf_sdk::`` ops from
``csrc/``; an error when they are missing) or ``"auto"`` (the kernel where it is available and
faster, the reference otherwise). :func:`set_backend` sets the name used when none is given.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from sf_sdk.reference import attention, reference_cache_attention

__all__ = ["attention", "cache_attention", "CacheAttention", "select_cache_attention", "set_backend", "get_backend",
           "default_backend", "reference_cache_attention", "BACKENDS"]

log = logging.getLogger(__name__)

Backend = Literal["auto", "reference", "kernel"]
BACKENDS: tuple[str, ...] = ("auto", "reference", "kernel")
_default: Backend = "auto"


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be 'auto', 'reference' or 'kernel', got {name!r}")


def set_backend(name: Backend) -> None:
    """The implementation name streams and graphs get when they are not given one."""
    global _default
    _check_name(name)
    _default = name


def get_backend() -> Backend:
    return _default


@contextlib.contextmanager
def default_backend(name: Backend) -> Iterator[None]:
    """``set_backend(name)`` inside the block, the previous name back after it."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


CacheAttentionFn = Callable[[Tensor, Tensor, Tensor, "int | Tensor"], Tensor]


@dataclass(frozen=True)
class CacheAttention:
    """A chosen cache-attention implementation: call it as ``impl(q, k_cache, v_cache, kv_len)``.

    ``kernel`` is the compiled op's entry point or None (the reference). Whatever was chosen, calls
    that need gradients (the kernels have no backward) and per-row ``[B]`` valid lengths (the kernels
    take one length) run the reference.
    """

    name: str
    kernel: CacheAttentionFn | None = None

    def __call__(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_len: int | Tensor) -> Tensor:
        if self.kernel is None:
            return reference_cache_attention(q, k_cache, v_cache, kv_len)
        if isinstance(kv_len, Tensor) and kv_len.dim() > 0:
            if kv_len.numel() != 1:  # the kernels take one valid length for the whole batch
                return reference_cache_attention(q, k_cache, v_cache, kv_len)
            kv_len = kv_len.reshape(())
        if torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad):
            return reference_cache_attention(q, k_cache, v_cache, kv_len)
        return self.kernel(q, k_cache, v_cache, kv_len)


REFERENCE = CacheAttention("reference")


def select_cache_attention(name: str | None, example_q: Tensor, *, masked: bool) -> CacheAttention:
    """Pick the cache attention for calls like ``example_q`` [B, Lq, H, D] (device, dtype and
    size decide; only its metadata is read). ``masked``: ``kv_len`` will be a tensor."""
    name = get_backend() if name is None else name
    _check_name(name)
    if name == "reference":
        return REFERENCE
    from sf_sdk import ops  # the extension is optional; ops never imports this module

    if ops.kernel_available(example_q, name == "kernel", masked=masked):
        return CacheAttention("kernel", ops.cache_attention)
    return REFERENCE


def cache_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, kv_len: int | Tensor, *,
                    backend: str | None = None) -> Tensor:
    """One cache-attention call with the implementation chosen for it (one-off calls and tests; the
    streaming path chooses once per stream with :func:`select_cache_attention`)."""
    impl = select_cache_attention(backend, q, masked=isinstance(kv_len, Tensor))
    return impl(q, k_cache, v_cache, kv_len)
