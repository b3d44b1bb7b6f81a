"""Parity of :class:`sf_sdk.models.text.UMT5Encoder` with the official umT5 encoder.

The golden file (``t5_encoder.safetensors``, see ../shared/golden/README.md) holds tiny random
weights under ``weights.<official name>``, padded prompts ``ids`` / ``mask`` [B, L] and the
official encoder's ``hidden`` [B, L, dim]. Only the real rows of each prompt (``mask == 1``)
are compared: padded rows are not used by Wan.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sf_sdk.config import TextEncoderConfig, from_dict
from sf_sdk.models.text import UMT5Encoder
from sf_sdk.parity import read_golden

__all__ = ["check"]


def check(path: Path, dtype: torch.dtype = torch.float64) -> dict[str, tuple[float, float]]:
    """Run the golden prompts through our encoder in ``dtype``.

    Returns ``{"hidden": (max_abs_error, reference_scale)}`` over the real rows, where
    ``reference_scale`` is the largest ``|reference|`` there. Expected: relative error below
    1e-6 in float64 and below 1e-3 in float32.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"golden file {path} does not exist; point at ../shared/golden/t5_encoder.safetensors")
    meta, weights, tensors = read_golden(path)
    config = from_dict(TextEncoderConfig, meta["config"])

    model = UMT5Encoder(config)
    model.load_state_dict(weights, strict=True)
    model = model.to(dtype).eval()
    ids, mask, reference = tensors["ids"], tensors["mask"], tensors["hidden"]
    with torch.no_grad():
        hidden = model(ids, mask)  # [B, L, dim]

    real = mask.bool()  # [B, L]
    ours = hidden[real].double()  # [real rows, dim]
    ref = reference[real].double()  # [real rows, dim]
    error = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    return {"hidden": (error, scale)}
