"""``dtype="auto"``, the default: the compute dtype a generator takes when none is named.

The rule, measured with ``benchmarks/dtype_auto.py`` and ``benchmarks/race_official.py`` (eager DiT
chunks, float32 against bfloat16, one thread, this project's 2-core CPU machines, which have AMX;
docs/performance.md):

* CUDA: bfloat16 where the GPU supports it (what the Self-Forcing family's authors run), float32
  where it does not, and float32 when ``backend="auto"`` will build a TensorRT engine (the engine
  is built from a float32 generator and runs fp16 kernels inside).
* CPU with AMX bfloat16 tiles (Sapphire Rapids and later): bfloat16 when one DiT call's block
  matmuls reach :data:`CPU_BF16_MIN_GFLOP` (0.5 GFLOP): a chunk of the 2-layer mid race config
  (195 GFLOP per call) runs 4.5x faster than in float32, 0.7-11 GFLOP calls 1.1-2.2x; below,
  eager per-op overhead dominates and eager bfloat16 gains nothing (the 0.18 GFLOP tiny race
  config: 0.8x-1.06x). Also bfloat16, at any size, when ``backend="auto"`` will run the DiT on
  AOTInductor (:func:`dit_runs_on_aoti`): its frozen graph multiplies bfloat16 through prepacked
  oneDNN weights and fuses the elementwise ops, so the overhead that keeps eager in float32 is
  gone; its bfloat16 chunk step is 1.3-1.5x its float32 one at the tiny race config and on the
  bundled shapes-tiny (0.04 GFLOP), whose strict shapes score is unchanged (docs/performance.md).
* Anything else: float32.

bfloat16 keeps 8 bits of mantissa: one mid-sized DiT call differs from float32 by about 1e-2 (the
``parity_default_max_abs`` of ``benchmarks/race_official.py``: 1.6e-2). Name ``dtype="float32"``
to opt out.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from sf_sdk.config import DiTConfig, StreamingConfig

__all__ = ["AUTO", "CPU_BF16_MIN_GFLOP", "DtypeChoice", "choose_dtype", "cpu_has_amx_bf16", "dit_call_gflop",
           "dit_runs_on_aoti", "is_auto"]

log = logging.getLogger(__name__)

AUTO = "auto"
CPU_BF16_MIN_GFLOP = 0.5


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    why: str


def is_auto(dtype: object) -> bool:
    return isinstance(dtype, str) and dtype.lower() == AUTO


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 on AMX tiles (oneDNN's fast bfloat16 path)."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:  # pragma: no cover - a torch build without the query
        return False


def dit_call_gflop(cfg: DiTConfig, stream: StreamingConfig) -> float:
    """GFLOP of one DiT call's block matmuls on a chunk (batch 1): self-attention q/k/v/o,
    cross-attention q/o and the FFN, 2 FLOPs per multiply-add (attention cores, the prompt's
    cross keys/values and the small embeddings left out)."""
    _, ph, pw = cfg.patch_size
    tokens = stream.num_frame_per_block * (stream.latent_height // ph) * (stream.latent_width // pw)
    per_token = 6 * cfg.dim * cfg.dim + 2 * cfg.dim * cfg.ffn_dim
    return 2.0 * tokens * per_token * cfg.num_layers / 1e9


def dit_runs_on_aoti(stream: StreamingConfig, backend: str, backend_options: Mapping[str, Any] | None = None,
                     *, compiler: bool | None = None) -> bool:
    """Whether a CPU generator with these settings runs its DiT on AOTInductor: ``backend="auto"``
    whose own rule (:func:`export.auto.dit_on_aoti`: the ``dit`` pin, the build mode, the stream's
    position mode, a C++ compiler) picks it for a bfloat16 DiT. ``compiler`` overrides the
    machine's compiler check (tests)."""
    if backend != "auto":
        return False
    try:
        from export.auto import Capabilities, dit_on_aoti
    except ImportError:  # pragma: no cover - the export package is not installed beside sf_sdk
        return False
    caps = None if compiler is None else Capabilities("cpu", frozenset({"aoti"} if compiler else ()))
    return dit_on_aoti(torch.device("cpu"), stream, dict(backend_options or {}), caps=caps)


def choose_dtype(cfg: DiTConfig, stream: StreamingConfig, device: torch.device, *,
                 backend: str = "auto", backend_options: Mapping[str, Any] | None = None,
                 has_amx: bool | None = None, tensorrt: bool | None = None,
                 cuda_bf16: bool | None = None, aoti: bool | None = None) -> DtypeChoice:
    """The ``dtype="auto"`` choice for a DiT of ``cfg`` streaming ``stream`` on ``device`` (see the
    module docstring). ``has_amx`` / ``tensorrt`` / ``cuda_bf16`` / ``aoti`` (the DiT runs on
    AOTInductor) override what this machine and these settings report (tests)."""
    if device.type == "cuda":
        if tensorrt is None:
            from sf_sdk.backends import backend_status

            tensorrt = backend == "auto" and backend_status("tensorrt") is None
        if tensorrt:
            return DtypeChoice(torch.float32, "backend='auto' builds a TensorRT engine from a float32 generator "
                                              "(fp16 kernels inside)")
        if cuda_bf16 is None:
            cuda_bf16 = torch.cuda.is_bf16_supported()
        if cuda_bf16:
            return DtypeChoice(torch.bfloat16, "bfloat16 on CUDA (as the model's authors run it)")
        return DtypeChoice(torch.float32, "this GPU has no bfloat16")
    if device.type == "cpu":
        amx = cpu_has_amx_bf16() if has_amx is None else has_amx
        gflop = dit_call_gflop(cfg, stream)
        if not amx:
            return DtypeChoice(torch.float32, "this CPU has no AMX bfloat16 tiles")
        if gflop >= CPU_BF16_MIN_GFLOP:
            return DtypeChoice(torch.bfloat16, f"AMX bfloat16 tiles and {gflop:.1f} GFLOP per DiT call")
        if aoti is None:
            aoti = dit_runs_on_aoti(stream, backend, backend_options)
        if aoti:
            return DtypeChoice(torch.bfloat16, f"AMX bfloat16 tiles and the DiT on AOTInductor (its bfloat16 step "
                                               f"is faster than its float32 one at {gflop:.2f} GFLOP per call)")
        return DtypeChoice(torch.float32, f"one DiT call is {gflop:.2f} GFLOP of matmuls (< "
                                          f"{CPU_BF16_MIN_GFLOP}) and no AOTInductor export: overhead-bound, "
                                          f"bfloat16 gains nothing")
    return DtypeChoice(torch.float32, f"no measured rule for {device.type}")
