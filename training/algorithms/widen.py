"""Widen a trained Wan VAE decoder k times, keeping the function it computes.

A wider decoder trained from scratch first has to learn again what the narrow one knows (colours,
positions, the causal time upsampling); widened from it, it starts where the narrow one stands and
only has the extra capacity to learn. Every hidden channel ``c`` of the narrow decoder becomes the
``k`` channels ``k c .. k c + k - 1`` of the wide one (function-preserving widening, as in
Net2Net):

- an output channel is copied (weights and bias);
- an input channel's weights are divided by ``k``, since its value now arrives ``k`` times;
- ``RMSNorm`` needs nothing more: ``k`` copies of every channel have the same RMS, so the norm
  and its ``sqrt(C)`` scale give the same values;
- a layer whose output is ``g`` stacked groups of channels (the time conv of ``upsample3d``: two
  frames; an attention block's ``to_qkv``: q, k, v) is widened group by group;
- the single-head attention's scores ``q . k / sqrt(C)`` would grow by ``sqrt(k)`` (``k`` times
  the dot product, ``sqrt(k)`` times the scale): ``q`` is divided by ``sqrt(k)``.

The copies of a channel then get identical gradients and would stay copies forever, so
:func:`widen_decoder` adds a little noise (``noise`` times each tensor's std) to break the
symmetry: the wide decoder's output then differs from the narrow one's by a little.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from sf_sdk.models.vae import AttentionBlock, Resample, WanVAE

__all__ = ["widen_decoder"]


def _expand(t: Tensor, dim: int, new_size: int, groups: int) -> Tensor:
    """``t`` with axis ``dim`` grown to ``new_size`` by repeating each channel within each of
    ``groups`` stacked groups (new index -> group, then old channel ``within // k``)."""
    old = t.shape[dim]
    if old == new_size:
        return t
    if new_size % old or old % groups:
        raise ValueError(f"cannot widen an axis of {old} channels ({groups} groups) to {new_size}")
    k = new_size // old
    per_old, per_new = old // groups, new_size // groups
    j = torch.arange(new_size)
    index = (j // per_new) * per_old + (j % per_new) // k  # [new_size]
    return t.index_select(dim, index)


def widen_decoder(vae: WanVAE, decoder_dim: int, noise: float = 1e-3, seed: int = 0) -> WanVAE:
    """A copy of ``vae`` whose decoder is ``decoder_dim`` wide (a multiple of its width now), with
    the same encoder, ``conv1`` / ``conv2`` and latent statistics; see the module docstring."""
    old_width = vae.config.decoder_dim or vae.config.dim
    if decoder_dim % old_width:
        raise ValueError(f"decoder_dim={decoder_dim} must be a multiple of the decoder's width {old_width}")
    k = decoder_dim // old_width
    config = dataclasses.replace(vae.config, decoder_dim=decoder_dim if decoder_dim != vae.config.dim else None)
    wide = WanVAE(config).to(vae.conv2.weight.dtype)
    wide.load_state_dict({n: t for n, t in vae.state_dict().items() if not n.startswith("decoder.")}, strict=False)
    if k == 1:
        wide.decoder.load_state_dict(vae.decoder.state_dict())
        return wide

    groups: dict[str, int] = {}  # parameter name -> stacked output groups
    q_rows: dict[str, int] = {}  # to_qkv parameter name -> rows of q (scaled by 1/sqrt(k))
    for name, module in vae.decoder.named_modules():
        if isinstance(module, Resample) and hasattr(module, "time_conv"):
            groups[f"{name}.time_conv.weight"] = groups[f"{name}.time_conv.bias"] = 2
        if isinstance(module, AttentionBlock):
            groups[f"{name}.to_qkv.weight"] = groups[f"{name}.to_qkv.bias"] = 3
            q_rows[f"{name}.to_qkv.weight"] = q_rows[f"{name}.to_qkv.bias"] = module.to_qkv.out_channels // 3

    gen = torch.Generator().manual_seed(seed)
    target = wide.decoder.state_dict()
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, t in vae.decoder.state_dict().items():
            shape = target[name].shape
            w = _expand(t.float(), 0, shape[0], groups.get(name, 1))
            if name in q_rows:
                rows = q_rows[name] * k
                w[:rows] /= math.sqrt(k)
            if t.dim() > 1 and not name.endswith("gamma") and shape[1] != t.shape[1]:
                w = _expand(w, 1, shape[1], 1) / (shape[1] // t.shape[1])
            if noise and t.dim() > 1 and not name.endswith("gamma"):
                w = w + noise * w.std() * torch.randn(w.shape, generator=gen)
            out[name] = w.to(t.dtype)
    wide.decoder.load_state_dict(out)
    return wide

