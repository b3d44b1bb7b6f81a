"""Conditioning images for image-to-video: read one, fit it to the model's frame size.

:func:`fit_image` takes a path (PNG, JPEG, WebP, ... decoded with PyAV, which the SDK already
needs for video) or a uint8 array / tensor ``[H, W, 3]`` of any size, and returns it resized
and centre-cropped to the model's ``(height, width)``: scaled (antialiased, bilinear) so that it
covers the frame with its aspect ratio kept, then the middle cut out. No PIL image is needed.
"""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["read_image", "fit_image", "ImageInput"]

ImageInput = str | os.PathLike | np.ndarray | Tensor


def read_image(path: str | os.PathLike) -> np.ndarray:
    """The first frame of an image file as uint8 [H, W, 3] (RGB)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"image {p} does not exist")
    try:
        with av.open(str(p)) as container:
            frame = next(container.decode(video=0))
            return frame.to_ndarray(format="rgb24")
    except (av.error.FFmpegError, StopIteration, ValueError) as exc:
        raise ValueError(f"cannot read {p} as an image ({type(exc).__name__}: {exc}): pass a PNG / JPEG / WebP file "
                         f"or a uint8 array [H, W, 3]") from exc


def fit_image(image: ImageInput, size: tuple[int, int]) -> Tensor:
    """``image`` resized to cover ``size`` = (height, width), aspect ratio kept, and centre-cropped
    to it: uint8 [height, width, 3]."""
    if isinstance(image, (str, os.PathLike)):
        image = read_image(image)
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, Tensor):
        raise ValueError(f"image must be a path or a uint8 array / tensor [H, W, 3], got {type(image).__name__}")
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[-1] != 3 or min(image.shape[:2]) == 0:
        raise ValueError(f"image must be uint8 [H, W, 3] (RGB), got {image.dtype} {tuple(image.shape)}")
    h, w = size
    ih, iw = image.shape[:2]
    scale = max(h / ih, w / iw)
    rh, rw = max(h, round(ih * scale)), max(w, round(iw * scale))
    x = image.permute(2, 0, 1).unsqueeze(0).float()  # [1, 3, H, W]
    if (rh, rw) != (ih, iw):
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (rh - h) // 2, (rw - w) // 2
    x = x[:, :, top:top + h, left:left + w]  # [1, 3, h, w]
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8)  # [h, w, 3]
