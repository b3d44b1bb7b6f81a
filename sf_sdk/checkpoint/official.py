"""The official release: the Self-Forcing checkpoint and the Wan2.1-T2V-1.3B folder.

The release (:func:`load_official`) is two things:

* the Self-Forcing checkpoint ``self_forcing_dmd.pt``: a torch pickle holding the state dicts
  ``generator``, ``generator_ema`` and ``critic``; the DiT keys carry a ``model.`` prefix;
* the ``Wan2.1-T2V-1.3B/`` folder: ``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth``,
  the tokenizer folder ``google/umt5-xxl/`` and ``config.json`` (the DiT's shape).

:func:`convert_official` turns it into one of our model folders (:mod:`sf_sdk.checkpoint.folder`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch

from sf_sdk.checkpoint.family import FAMILIES, Family, open_family_state, resolve_family
from sf_sdk.checkpoint.folder import INDEX, save_pretrained
from sf_sdk.checkpoint.weights import (
    DEFAULT_FPS,
    CheckpointError,
    LoadedModel,
    build_module,
    open_state_dict,
    resolve_dtype,
)
from sf_sdk.config import (
    DIT_PRESETS,
    TEXT_PRESETS,
    DiTConfig,
    StreamingConfig,
    TextEncoderConfig,
    VAEConfig,
    from_dict,
)

__all__ = [
    "load_official",
    "official_dit_config",
    "find_official",
    "convert_official",
    "SELF_FORCING_STREAMING",
    "SELF_FORCING_FILE",
    "SELF_FORCING_PREFIX",
    "SELF_FORCING_EMA_KEY",
    "SELF_FORCING_KEY",
    "WAN_VAE_FILE",
    "WAN_T5_FILE",
    "WAN_TOKENIZER_DIR",
    "WAN_CONFIG_FILE",
    "WAN_DIR_NAME",
]

log = logging.getLogger(__name__)

WAN_VAE_FILE = "Wan2.1_VAE.pth"
WAN_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_TOKENIZER_DIR = "google/umt5-xxl"
WAN_CONFIG_FILE = "config.json"
WAN_DIR_NAME = "Wan2.1-T2V-1.3B"
SELF_FORCING_FILE = "self_forcing_dmd.pt"
SELF_FORCING_PREFIX = "model."
SELF_FORCING_EMA_KEY = "generator_ema"
SELF_FORCING_KEY = "generator"
# Keys of the Wan config.json that describe the file, not the DiT's shape.
_WAN_CONFIG_METADATA = frozenset({"_class_name", "_diffusers_version", "model_type", "window_size"})
_WAN_GLOBAL_WINDOW = [-1, -1]
# How many levels below a folder to look for the Wan folder / the checkpoint.
_SEARCH_DEPTH = 2
# The Self-Forcing streaming defaults: chunks of 3 latent frames, the 4 steps [1000, 750, 500,
# 250] warped through the shift-5 schedule, global attention, 480x832 pixels = 60x104 latents.
SELF_FORCING_STREAMING = StreamingConfig()


def official_dit_config(wan_dir: str | os.PathLike | None) -> DiTConfig:
    """The DiT config of a Wan folder: the ``wan2.1-t2v-1.3b`` preset, overridden by the fields
    its ``config.json`` gives (``dim``, ``num_heads``, ``num_layers``, ...)."""
    base = DIT_PRESETS["wan2.1-t2v-1.3b"]
    path = Path(wan_dir) / WAN_CONFIG_FILE if wan_dir is not None else None
    if path is None or not path.is_file():
        return base
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    model_type = data.get("model_type", "t2v")
    if model_type != "t2v":
        raise CheckpointError(f"{path} describes a {model_type!r} Wan model; Self-Forcing streams the "
                              f"text-to-video model (model_type 't2v', Wan2.1-T2V-1.3B)")
    if list(data.get("window_size", _WAN_GLOBAL_WINDOW)) != _WAN_GLOBAL_WINDOW:
        raise CheckpointError(f"{path}: window_size {data['window_size']} is not supported (only global "
                              f"attention, {_WAN_GLOBAL_WINDOW})")
    names = {f.name for f in dataclasses.fields(DiTConfig)}
    ignored = sorted(k for k in data if k not in names and k not in _WAN_CONFIG_METADATA)
    if ignored:
        log.warning("%s: ignoring keys that are not DiT settings: %s", path, ignored)
    try:
        return from_dict(DiTConfig, {k: v for k, v in data.items() if k in names}, base=base)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad DiT config ({exc})") from exc


def _check_wan_dir(wan_dir: Path, *, vae: bool, text: bool) -> None:
    if not wan_dir.is_dir():
        raise CheckpointError(f"Wan folder {wan_dir} does not exist: pass the {WAN_DIR_NAME} folder "
                              f"(with {WAN_VAE_FILE}, {WAN_T5_FILE}, {WAN_TOKENIZER_DIR}/)")
    need = ([WAN_VAE_FILE] if vae else []) + ([WAN_T5_FILE, f"{WAN_TOKENIZER_DIR}/tokenizer.json"]
                                               if text else [])
    missing = [n for n in need if not (wan_dir / n).is_file()]
    if missing:
        raise CheckpointError(f"Wan folder {wan_dir} lacks {missing}: download the official "
                              f"{WAN_DIR_NAME} folder (Wan-AI/{WAN_DIR_NAME} on Hugging Face)")


def load_official(
    checkpoint_path: str | os.PathLike,
    wan_dir: str | os.PathLike | None,
    *,
    use_ema: bool | None = None,
    device: torch.device | str = "cpu",
    dtype: str | torch.dtype = torch.float32,
    text_dtype: str | torch.dtype | None = None,
    load_vae: bool = True,
    load_text_encoder: bool = True,
    dit_config: DiTConfig | None = None,
    vae_config: VAEConfig | None = None,
    text_config: TextEncoderConfig | None = None,
    streaming: StreamingConfig | None = None,
    family: str | Family | None = None,
) -> LoadedModel:
    """Load a released checkpoint of the Self-Forcing family with the official Wan2.1-T2V-1.3B folder.

    ``family`` (:mod:`sf_sdk.checkpoint.family`; None: from the file name, else Self-Forcing)
    gives the layout and the streaming defaults. The DiT comes from ``generator_ema``
    (``use_ema=True``) or ``generator`` (``False``; None: the entry the family's authors read) of
    ``checkpoint_path``, or the file itself when it is a flat state dict, its wrapper prefixes
    (``model.``, ``_fsdp_wrapped_module.``) stripped; the ``critic`` is not loaded. The VAE,
    umT5-XXL encoder and tokenizer from ``wan_dir``. Configs: the DiT from ``config.json``
    (default: preset ``wan2.1-t2v-1.3b``), ``VAEConfig()``, the ``umt5-xxl`` text preset; pass
    ``dit_config`` / ``vae_config`` / ``text_config`` for files of other shapes. Streaming: the
    family's defaults (Self-Forcing: :data:`SELF_FORCING_STREAMING`). ``wan_dir`` may be None only when
    neither the VAE nor the text encoder is loaded. ``text_dtype`` defaults to ``dtype``.
    """
    from sf_sdk.models.dit import WanDiT

    ckpt = Path(checkpoint_path)
    dev = torch.device(device)
    dt = resolve_dtype(dtype)
    tdt = resolve_dtype(text_dtype) if text_dtype is not None else dt
    wan = Path(wan_dir) if wan_dir is not None else None
    if wan is None and (load_vae or load_text_encoder):
        raise CheckpointError(f"{ckpt.name} holds only the DiT: pass wan_dir= (the official {WAN_DIR_NAME} "
                              f"folder with the VAE, text encoder and tokenizer)")
    if wan is not None:
        _check_wan_dir(wan, vae=load_vae, text=load_text_encoder)
    dcfg = dit_config if dit_config is not None else official_dit_config(wan)
    fam = resolve_family(family, ckpt)
    state, where = open_family_state(ckpt, fam, use_ema=use_ema, device=dev, dtype=dt)
    dit = build_module(WanDiT, dcfg, state, what=f"DiT ({fam.title}: {where})", device=dev)
    loaded = LoadedModel(dit, dcfg, streaming if streaming is not None else fam.streaming,
                         fps=DEFAULT_FPS, source=where)
    if load_vae:
        from sf_sdk.models.vae import WanVAE

        vcfg = vae_config if vae_config is not None else VAEConfig()
        vstate = open_state_dict(wan / WAN_VAE_FILE, device=dev, dtype=dt)
        loaded.vae = build_module(WanVAE, vcfg, vstate, what=f"VAE ({WAN_VAE_FILE})", device=dev)
        loaded.vae_config = vcfg
    if load_text_encoder:
        from sf_sdk.models.text import UMT5Encoder

        tcfg = text_config if text_config is not None else TEXT_PRESETS["umt5-xxl"]
        tstate = open_state_dict(wan / WAN_T5_FILE, device=dev, dtype=tdt)
        loaded.text_encoder = build_module(UMT5Encoder, tcfg, tstate, what=f"text encoder ({WAN_T5_FILE})",
                                           device=dev)
        loaded.text_config = tcfg
        loaded.tokenizer_dir = wan / WAN_TOKENIZER_DIR
    log.info("loaded %s (DiT %.0fM parameters) with %s", ckpt.name,
             sum(p.numel() for p in dit.parameters()) / 1e6, wan)
    return loaded


def _is_wan_dir(folder: Path) -> bool:
    return (folder / WAN_VAE_FILE).is_file() or (folder / WAN_T5_FILE).is_file()


def _find_wan_dir(start: Path) -> Path | None:
    """``start`` itself or a folder up to two levels below it that holds the Wan files."""
    frontier = [start]
    for _ in range(_SEARCH_DEPTH + 1):
        for folder in frontier:
            if _is_wan_dir(folder):
                return folder
        frontier = sorted(p for f in frontier for p in _subfolders(f))
    return None


def _subfolders(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:  # unreadable folders are skipped
        return []


def _looks_like_checkpoint(path: Path) -> bool:
    return path.is_file() and path.suffix in (".pt", ".pth") and path.name not in (WAN_VAE_FILE, WAN_T5_FILE)


def find_official(path: str | os.PathLike, wan_dir: str | os.PathLike | None = None
                  ) -> tuple[Path, Path | None] | None:
    """Locate an official checkpoint and its Wan folder, or None if ``path`` is not one.

    ``path`` is the ``.pt`` file, or a folder holding it (directly or in ``checkpoints/``) and the
    Wan folder (itself, or up to two levels below: ``Wan2.1-T2V-1.3B/``,
    ``wan_models/Wan2.1-T2V-1.3B/``). For a ``.pt`` file without ``wan_dir``, the Wan folder is
    looked for beside the file and beside its folder (the Self-Forcing repository layout
    ``checkpoints/`` + ``wan_models/``); the second value is None when none is found.
    """
    p = Path(path)
    if p.is_file():
        if not _looks_like_checkpoint(p):
            return None
        if wan_dir is not None:
            return p, Path(wan_dir)
        for start in (p.parent, p.parent.parent):
            found = _find_wan_dir(start)
            if found is not None:
                return p, found
        return p, None
    if not p.is_dir() or (p / INDEX).is_file():
        return None
    candidates = [c for folder in (p, p / "checkpoints") if folder.is_dir()
                  for c in sorted(folder.iterdir()) if _looks_like_checkpoint(c)]
    if not candidates:
        return None
    bases = {Path(t).name for f in FAMILIES.values() for t in f.files}
    loras = {f.lora_file for f in FAMILIES.values() if f.lora_file}
    if len(candidates) > 1:  # a LoRA released beside its base is not a candidate
        candidates = [c for c in candidates if c.name not in loras] or candidates
    preferred = [c for c in candidates if c.name == SELF_FORCING_FILE] or \
        [c for c in candidates if c.name in bases]
    if len(preferred) == 1:
        ckpt = preferred[0]
    elif len(candidates) == 1:
        ckpt = candidates[0]
    else:
        raise CheckpointError(f"{p} holds several checkpoints {[c.name for c in candidates]}: pass the "
                              f"one to load")
    return ckpt, Path(wan_dir) if wan_dir is not None else _find_wan_dir(p)


def convert_official(
    checkpoint: str | os.PathLike,
    wan_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str | torch.dtype = torch.bfloat16,
    *,
    use_ema: bool | None = None,
    include_text_encoder: bool = True,
    dit_config: DiTConfig | None = None,
    vae_config: VAEConfig | None = None,
    text_config: TextEncoderConfig | None = None,
    family: str | Family | None = None,
    lora: str | os.PathLike | None = None,
    lora_scale: float = 1.0,
) -> Path:
    """Convert a released checkpoint of the Self-Forcing family into one of our model folders
    (stored in ``dtype``), with its family's streaming defaults.

    ``family`` / ``use_ema`` as :func:`load_official`; ``lora`` (LongLive: its ``lora.pt``, found
    beside the base when not given) is merged into the DiT weights, so the folder and what is
    exported from it need nothing else. The result loads with
    ``StreamingGenerator.from_pretrained(out_dir)``; the weights keep their licence, recorded in
    the index with where they came from.
    """
    from sf_sdk.checkpoint.lora import family_lora, merge_lora

    dt = resolve_dtype(dtype)
    fam = resolve_family(family, checkpoint)
    lora_path = family_lora(fam, checkpoint, lora)
    # With a LoRA, the DiT and VAE load in float32 (the merge at full precision), cast when written.
    loaded = load_official(checkpoint, wan_dir, use_ema=use_ema, device="cpu",
                           dtype=torch.float32 if lora_path is not None else dt, text_dtype=dt,
                           load_text_encoder=include_text_encoder, dit_config=dit_config,
                           vae_config=vae_config, text_config=text_config, family=fam)
    merged = merge_lora(loaded.dit, lora_path, scale=lora_scale) if lora_path is not None else None
    extra = {"fps": loaded.fps, "license": fam.license, "family": fam.name,
             "converted_from": {"checkpoint": Path(checkpoint).name, "source": fam.source,
                                "weights": loaded.source.rsplit("[", 1)[-1].rstrip("]")
                                if "[" in loaded.source else "state dict",
                                "wan_dir": Path(wan_dir).name}}
    if merged is not None:
        extra["converted_from"]["lora"] = {"file": Path(lora_path).name, "scale": lora_scale,
                                           "modules": len(merged)}
    out = save_pretrained(out_dir, dit=loaded.dit, dit_config=loaded.dit_config, streaming=loaded.streaming,
                          vae=loaded.vae, vae_config=loaded.vae_config, text_encoder=loaded.text_encoder,
                          text_config=loaded.text_config, tokenizer_dir=loaded.tokenizer_dir, dtype=dt,
                          extra=extra)
    log.info("converted %s (%s) + %s into %s (%s)", Path(checkpoint).name, fam.title, Path(wan_dir).name, out, dt)
    return out
