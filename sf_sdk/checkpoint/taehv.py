"""Loading the tiny decoder (:mod:`sf_sdk.models.taehv`): released TAEHV files and our folders.

Two places a tiny decoder comes from:

* a released TAEHV file (``taew2_1.pth`` or ``taew2_1.safetensors``): one state dict with the
  ``decoder.<i>...`` keys of the decoder (and ``encoder.<i>...`` keys, not used here). The
  config is read off the tensor shapes (:func:`taehv_config_from_state`): widths, MemBlocks per
  stage and which stages double the frames. :func:`load_taehv` loads one.
* one of our model folders: ``tiny_decoder.safetensors`` (the same key layout) with its config
  under ``"tiny_decoder"`` in ``model_index.json`` (:func:`load_folder_tiny_decoder`;
  :func:`add_tiny_decoder` writes both into a folder).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from sf_sdk.checkpoint.folder import INDEX, read_index
from sf_sdk.checkpoint.weights import CheckpointError, build_module, open_state_dict
from sf_sdk.config import from_dict, to_dict
from sf_sdk.models.taehv import TAEHVConfig, TAEHVDecoder

__all__ = ["TINY_DECODER_FILE", "TINY_DECODER_KEY", "taehv_config_from_state", "load_taehv",
           "load_folder_tiny_decoder", "add_tiny_decoder"]

log = logging.getLogger(__name__)

TINY_DECODER_FILE = "tiny_decoder.safetensors"
TINY_DECODER_KEY = "tiny_decoder"  # its config in model_index.json
_PREFIX = "decoder."
_ENCODER_PREFIX = "encoder."
_MEMBLOCK = re.compile(r"decoder\.(\d+)\.conv\.0\.weight$")
_TGROW = re.compile(r"decoder\.(\d+)\.conv\.weight$")


def taehv_config_from_state(state: Mapping[str, Tensor], *, where: str = "the weights") -> TAEHVConfig:
    """The decoder config a TAEHV state dict was saved from (its ``decoder.*`` keys' shapes).

    Spatial upsampling has no weights: every stage is taken to double height and width (as in
    every released TAEHV file).
    """
    def shape(key: str) -> tuple[int, ...]:
        return tuple(state.shape(key)) if hasattr(state, "shape") else tuple(state[key].shape)

    keys = list(state)
    if "decoder.1.weight" not in keys:
        raise CheckpointError(f"{where} hold no TAEHV decoder: no key 'decoder.1.weight' (the first conv; keys "
                              f"start with {sorted({k.split('.')[0] for k in keys})[:5]})")
    memblocks = sorted(int(m.group(1)) for k in keys if (m := _MEMBLOCK.match(k)))
    tgrows = sorted(int(m.group(1)) for k in keys if (m := _TGROW.match(k)))
    if not memblocks or not tgrows:
        raise CheckpointError(f"{where}: the TAEHV decoder has {len(memblocks)} MemBlocks and {len(tgrows)} TGrow "
                              f"layers; a TAEHV decoder has both (is it a different architecture, e.g. TAEHV "
                              f"'super'?)")
    stages = len(tgrows)
    if len(memblocks) % stages:
        raise CheckpointError(f"{where}: {len(memblocks)} MemBlocks do not split evenly over {stages} stages")
    widths, time_upscale = [], []
    for i in tgrows:
        out_c, in_c = shape(f"decoder.{i}.conv.weight")[:2]
        if out_c % in_c or out_c // in_c not in (1, 2):
            raise CheckpointError(f"{where}: decoder.{i}.conv.weight has shape {shape(f'decoder.{i}.conv.weight')}, "
                                  f"not a TGrow of stride 1 or 2")
        widths.append(in_c)
        time_upscale.append(out_c // in_c == 2)
    last = max(int(k.split(".")[1]) for k in keys if k.startswith(_PREFIX))
    widths.append(shape(f"decoder.{last}.weight")[1])
    z_dim = shape("decoder.1.weight")[1]
    try:
        return TAEHVConfig(z_dim=z_dim, widths=tuple(widths), blocks_per_stage=len(memblocks) // stages,
                           time_upscale=tuple(time_upscale), space_upscale=(True,) * stages)
    except ValueError as exc:
        raise CheckpointError(f"{where}: not a TAEHV decoder this SDK builds ({exc})") from exc


def load_taehv(path: str | os.PathLike, *, config: TAEHVConfig | None = None, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = torch.float32) -> TAEHVDecoder:
    """A released TAEHV file (``taew2_1.pth`` / ``.safetensors``) or our ``tiny_decoder.safetensors``
    -> the decoder (eval mode, no gradients). ``config`` (default: read off the shapes) must fit
    the file exactly; the encoder's keys are skipped."""
    path = Path(path)
    state = open_state_dict(path, device=device, dtype=dtype)
    decoder = {k: state[k] for k in state if k.startswith(_PREFIX)}
    skipped = [k for k in state if k.startswith(_ENCODER_PREFIX)]
    other = [k for k in state if not k.startswith((_PREFIX, _ENCODER_PREFIX))]
    if other:
        raise CheckpointError(f"{path} is not a TAEHV file: besides 'decoder.' / 'encoder.' keys it holds "
                              f"{other[:5]}{' ...' if len(other) > 5 else ''}")
    if skipped:
        log.info("%s: %d encoder tensors not used (only the tiny decoder is built)", path.name, len(skipped))
    cfg = config if config is not None else taehv_config_from_state(decoder, where=str(path))
    module = build_module(TAEHVDecoder, cfg, decoder, what=f"tiny decoder ({path.name})", device=device)
    if torch.device(device).type == "cpu":
        # oneDNN's CPU convolutions run channels-last weights without a reorder: ~20% faster decode
        # (benchmarks/vae_decode.py --tiny), the same values.
        module.to(memory_format=torch.channels_last)
    return module


def load_folder_tiny_decoder(folder: str | os.PathLike, *, device: torch.device | str = "cpu",
                             dtype: torch.dtype | None = torch.float32) -> TAEHVDecoder:
    """The tiny decoder of one of our model folders (or a bundled model name)."""
    files = read_index(folder)
    entry = files.extra.get(TINY_DECODER_KEY)
    path = files.path(TINY_DECODER_FILE)
    if not entry:
        raise CheckpointError(f"{files.root} has no tiny decoder ({INDEX} lists none under {TINY_DECODER_KEY!r}): "
                              f"use decoder='wan', pass decoder_path= a TAEHV file (taew2_1.pth for Wan2.1 "
                              f"latents), or train one (the training package's tiny_decoder stage)")
    if not path.is_file():
        raise CheckpointError(f"{INDEX} of {files.root} describes a tiny decoder but {path.name} is missing from "
                              f"the folder")
    try:
        cfg = from_dict(TAEHVConfig, dict(entry))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{files.root / INDEX}: bad {TINY_DECODER_KEY!r} config ({exc})") from exc
    return load_taehv(path, config=cfg, device=device, dtype=dtype)


def add_tiny_decoder(folder: str | os.PathLike, decoder: TAEHVDecoder) -> Path:
    """Write ``decoder`` into a model folder: ``tiny_decoder.safetensors`` and its config in
    ``model_index.json`` (every other entry and file left as it is). Returns the weights' path."""
    files = read_index(folder)
    if files.dit.in_dim != decoder.config.z_dim:
        raise ValueError(f"the tiny decoder takes z_dim={decoder.config.z_dim} latents but the model's DiT makes "
                         f"{files.dit.in_dim}")
    out = files.path(TINY_DECODER_FILE)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in decoder.state_dict().items()}
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    save_file(state, str(tmp), metadata={"format": "sf-sdk"})
    tmp.replace(out)
    index_path = files.path(INDEX)
    index = json.loads(index_path.read_text())
    index[TINY_DECODER_KEY] = to_dict(decoder.config)
    tmp = index_path.with_name(f".{INDEX}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    tmp.replace(index_path)
    return out
