"""Edge-keeping reconstruction terms for the VAE stages: pure functions, no I/O.

An autoencoder trained on per-pixel L1 / MSE alone blurs what it cannot place exactly: the edges
and corners of the shapes, which are a few pixels of each frame. :func:`gradient_l1` compares the
spatial finite differences of the reconstruction and the target instead (an L1 on the image
gradients, as in edge-aware losses of super-resolution): a blurred edge spreads one step of the
target over several pixels and pays for every one of them, and a rounded corner changes the
gradients along both of its sides.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["gradient_l1"]


def gradient_l1(recon: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Weighted mean of ``|d recon - d target|`` over horizontal and vertical pixel differences.

    ``recon`` and ``target``: ``[..., H, W]`` (a video ``[B, C, T, H, W]`` is differenced within each
    frame). ``weight``: ``[..., H, W]`` broadcastable to them, or None; a difference between two
    pixels weighs the larger of their two weights, and the mean is normalised by the weights, so a
    constant weight leaves the loss unchanged.
    """
    err = recon - target
    dx = (err[..., :, 1:] - err[..., :, :-1]).abs()  # [..., H, W-1]
    dy = (err[..., 1:, :] - err[..., :-1, :]).abs()  # [..., H-1, W]
    if weight is None:
        return (dx.mean() + dy.mean()) / 2
    wx = weight[..., :, 1:].maximum(weight[..., :, :-1]).expand_as(dx)  # [..., H, W-1]
    wy = weight[..., 1:, :].maximum(weight[..., :-1, :]).expand_as(dy)  # [..., H-1, W]
    return ((wx * dx).mean() / wx.mean() + (wy * dy).mean() / wy.mean()) / 2
