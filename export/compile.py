"""``backend="compile"``: torch.compile of the chunk step and the decode steps.

The chunk step (:class:`sf_sdk.models.dit.ChunkStep`, cache written in place) has static shapes
for a stream: ``kv_len`` is a 0-dim tensor, the slots and rotary tables are tensors, so every
chunk of a stream, before and after the window evicts, reuses one compiled graph (compiled on the
first call, never again). The decode steps compile once each (first frame, later frames).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from export.runtime import DecoderFactory, StepChunkModel, StepDecoder
from export.settings import AttentionImpl, ChunkShapes, DecodeShapes, attention_backend
from sf_sdk.models.dit import ChunkStep, WanDiT
from sf_sdk.models.vae import VAEDecodeStep

__all__ = ["CompileSettings", "compile_steps"]

log = logging.getLogger(__name__)

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


@dataclass(frozen=True)
class CompileSettings:
    """torch.compile options. ``fullgraph=True`` turns any graph break into an error;
    ``dynamic=False`` keeps every shape static (one graph per stream geometry)."""

    mode: CompileMode = "default"
    fullgraph: bool = True
    dynamic: bool = False
    attention: AttentionImpl = "reference"
    compile_decoder: bool = True
    backend: str = "inductor"

    def __post_init__(self) -> None:
        if self.mode not in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
            raise ValueError(f"unknown torch.compile mode {self.mode!r}")
        if self.attention not in ("reference", "kernel", "auto"):
            raise ValueError(f"attention must be 'reference', 'kernel' or 'auto', got {self.attention!r}")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> CompileSettings:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown compile backend options {unknown}; valid: {sorted(known)}")
        return cls(**options)

    def compile(self, module: torch.nn.Module) -> Any:
        return torch.compile(module, fullgraph=self.fullgraph, dynamic=self.dynamic,
                             mode=None if self.mode == "default" else self.mode, backend=self.backend)


class _WithAttention:
    """Calls a compiled module with the cache-attention implementation it was compiled for."""

    def __init__(self, fn: Any, attention: AttentionImpl) -> None:
        self.fn = fn
        self.attention = attention

    def __call__(self, *args: Tensor) -> Any:
        with attention_backend(self.attention):
            return self.fn(*args)


def _decode_runner(fn: Any):
    def run(z: Tensor, cache: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        pixels, new_cache = fn(z, *cache)
        return pixels, tuple(new_cache)

    return run


def compile_steps(dit: WanDiT, shapes: ChunkShapes | None, settings: CompileSettings, *,
                  vae: torch.nn.Module | None = None, decode_shapes: DecodeShapes | None = None
                  ) -> tuple[StepChunkModel, DecoderFactory | None]:
    """A chunk model (and a decoder factory) running torch.compile'd steps; compiled lazily, on
    the first call. ``shapes`` None skips the static-shape checks (any stream geometry; a new
    geometry compiles a new graph)."""
    step = settings.compile(ChunkStep(dit, functional=False).eval())
    model = StepChunkModel(dit, shapes, name="torch.compile", inplace=_WithAttention(step, settings.attention))
    make_decoder = None
    if vae is not None and decode_shapes is not None:
        if settings.compile_decoder:
            first = settings.compile(VAEDecodeStep(vae, first_frame=True).eval())
            later = settings.compile(VAEDecodeStep(vae).eval())
        else:
            first, later = VAEDecodeStep(vae, first_frame=True).eval(), VAEDecodeStep(vae).eval()
        first_run, later_run = _decode_runner(first), _decode_runner(later)
        device = vae.conv2.weight.device

        def make_decoder() -> StepDecoder:
            return StepDecoder(decode_shapes, first_run, later_run, device=device)
    return model, make_decoder
