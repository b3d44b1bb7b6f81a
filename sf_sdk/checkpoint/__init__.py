"""Loading and saving model weights: our own folder format, and the released official files.

:func:`load_pretrained` is the one entry point: a bundled model name, one of our model folders,
or an official checkpoint. The work is done in three modules, each importing only the ones
before it:

* :mod:`~sf_sdk.checkpoint.weights`: reading state dicts lazily (safetensors, torch pickles with
  ``weights_only=True``) and loading them into modules, with errors that say what would fit;
* :mod:`~sf_sdk.checkpoint.folder`: our folder format (``model_index.json`` + safetensors),
  :func:`save_pretrained` and the bundled models;
* :mod:`~sf_sdk.checkpoint.family`: the released checkpoints of the Self-Forcing family (Causal
  Forcing(++), LongLive, Reward Forcing): their layouts and their authors' streaming defaults;
* :mod:`~sf_sdk.checkpoint.official`: the Self-Forcing release (and the family's) with its
  Wan2.1-T2V-1.3B folder, and its conversion into our format;
* :mod:`~sf_sdk.checkpoint.lora`: LoRA adapters (PEFT, LongLive), merged into the DiT at load.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sf_sdk.checkpoint.family import FAMILIES, Family, detect_family, family_names, resolve_family
from sf_sdk.checkpoint.folder import (
    ASSETS_DIR,
    BUNDLED_MODELS,
    DIT_FILE,
    FORMAT,
    INDEX,
    TEXT_FILE,
    TOKENIZER_DIR,
    VAE_FILE,
    VERSION,
    ModelFiles,
    load_folder,
    read_index,
    resolve_model_path,
    save_pretrained,
)
from sf_sdk.checkpoint.lora import LoRA, extract_lora, family_lora, merge_lora, read_lora, save_lora
from sf_sdk.checkpoint.official import (
    SELF_FORCING_EMA_KEY,
    SELF_FORCING_FILE,
    SELF_FORCING_KEY,
    SELF_FORCING_PREFIX,
    SELF_FORCING_STREAMING,
    WAN_CONFIG_FILE,
    WAN_DIR_NAME,
    WAN_T5_FILE,
    WAN_TOKENIZER_DIR,
    WAN_VAE_FILE,
    convert_official,
    find_official,
    load_official,
    official_dit_config,
)
from sf_sdk.checkpoint.weights import (
    DEFAULT_FPS,
    CheckpointError,
    LoadedModel,
    StateDict,
    build_module,
    config_hint,
    load_into,
    load_state_dict,
    open_state_dict,
    resolve_dtype,
)
from sf_sdk.config import DiTConfig, TextEncoderConfig, VAEConfig

__all__ = [
    "CheckpointError",
    "ModelFiles",
    "LoadedModel",
    "StateDict",
    "save_pretrained",
    "read_index",
    "open_state_dict",
    "load_state_dict",
    "load_into",
    "build_module",
    "config_hint",
    "load_pretrained",
    "FAMILIES",
    "Family",
    "detect_family",
    "family_names",
    "resolve_family",
    "LoRA",
    "read_lora",
    "merge_lora",
    "extract_lora",
    "save_lora",
    "load_official",
    "official_dit_config",
    "find_official",
    "convert_official",
    "resolve_dtype",
    "resolve_model_path",
    "ASSETS_DIR",
    "BUNDLED_MODELS",
    "DEFAULT_FPS",
    "FORMAT",
    "VERSION",
    "INDEX",
    "DIT_FILE",
    "VAE_FILE",
    "TEXT_FILE",
    "TOKENIZER_DIR",
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


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: str | torch.dtype = torch.float32,
    text_dtype: str | torch.dtype | None = None,
    load_vae: bool = True,
    load_text_encoder: bool = True,
    wan_dir: str | os.PathLike | None = None,
    use_ema: bool | None = None,
    dit_config: DiTConfig | None = None,
    vae_config: VAEConfig | None = None,
    text_config: TextEncoderConfig | None = None,
    family: str | Family | None = None,
    lora: str | os.PathLike | None = None,
    lora_scale: float = 1.0,
) -> LoadedModel:
    """Load one of our model folders, a bundled model name, or an official checkpoint.

    An official checkpoint is a ``.pt`` file of the Self-Forcing family (with ``wan_dir=``, or a
    Wan folder found beside it) or a folder holding both (see :func:`find_official`); ``family``
    names its member when the file name does not (:mod:`sf_sdk.checkpoint.family`). ``wan_dir``,
    ``use_ema`` (None: the entry the family's authors read), ``family`` and the config overrides
    apply to official checkpoints only. ``lora`` (a LoRA file or PEFT folder; LongLive's own is
    found beside its base) is merged into the DiT weights, times ``lora_scale``
    (:mod:`sf_sdk.checkpoint.lora`).
    """
    dev = torch.device(device)
    dt = resolve_dtype(dtype)
    tdt = resolve_dtype(text_dtype) if text_dtype is not None else dt
    official = find_official(name_or_path, wan_dir) if Path(name_or_path).exists() else None
    if official is not None:
        ckpt, wan = official
        if wan is None and (load_vae or load_text_encoder):
            raise CheckpointError(f"found the checkpoint {ckpt} but no Wan folder beside it: pass wan_dir= "
                                  f"(CLI: --wan-dir), the official {WAN_DIR_NAME} folder with {WAN_VAE_FILE}, "
                                  f"{WAN_T5_FILE} and {WAN_TOKENIZER_DIR}/")
        fam = resolve_family(family, ckpt)
        loaded = load_official(ckpt, wan, use_ema=use_ema, device=dev, dtype=dt, text_dtype=tdt,
                               load_vae=load_vae, load_text_encoder=load_text_encoder, dit_config=dit_config,
                               vae_config=vae_config, text_config=text_config, family=fam)
        return _with_lora(loaded, family_lora(fam, ckpt, lora), lora_scale)
    given = [n for n, v in (("wan_dir", wan_dir), ("dit_config", dit_config), ("vae_config", vae_config),
                            ("text_config", text_config), ("family", family)) if v is not None]
    if given:
        raise CheckpointError(f"{given} apply to official checkpoints only; {name_or_path} is not one (a "
                              f"self_forcing_dmd.pt file or a folder holding it)")
    if Path(name_or_path).is_file():
        raise CheckpointError(f"{name_or_path} is a file but not a checkpoint this SDK reads: pass one of "
                              f"our model folders, or an official .pt checkpoint")
    files = read_index(name_or_path)
    loaded = load_folder(files, device=dev, dtype=dt, text_dtype=tdt, load_vae=load_vae,
                         load_text_encoder=load_text_encoder)
    return _with_lora(loaded, None if lora is None else Path(lora), lora_scale)


def _with_lora(loaded: LoadedModel, lora: Path | None, scale: float) -> LoadedModel:
    if lora is not None:
        merge_lora(loaded.dit, lora, scale=scale)
        loaded.source = f"{loaded.source} + LoRA {lora} (scale {scale:g})"
    return loaded
