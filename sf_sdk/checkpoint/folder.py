"""Our model folder format: :func:`save_pretrained` writes it, :func:`load_folder` reads it.

A model folder::

    model_index.json        {"format": "sf-sdk", "version": 1, "dit": {...}, "streaming": {...},
                             "vae": {...}, "text_encoder": {...} | null, "fps": 16, ...}
    dit.safetensors         DiT weights, official parameter names, no prefix
    vae.safetensors         VAE weights (optional: a DiT-only folder streams latents)
    text_encoder.safetensors  umT5-layout encoder (optional: prompt embeddings can be given)
    tokenizer/              a Hugging Face tokenizer folder (tokenizer.json, ...)
    tiny_decoder.safetensors  a TAEHV tiny decoder (optional, for decoder="tiny"), its config
                            under "tiny_decoder" in the index (sf_sdk.checkpoint.taehv)

Models shipped inside the package (:data:`BUNDLED_MODELS`) are such folders under
:data:`ASSETS_DIR`, loadable by name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from sf_sdk.checkpoint.weights import DEFAULT_FPS, CheckpointError, LoadedModel, build_module, open_state_dict
from sf_sdk.config import DiTConfig, StreamingConfig, TextEncoderConfig, VAEConfig, from_dict, to_dict

__all__ = [
    "ModelFiles",
    "save_pretrained",
    "read_index",
    "load_folder",
    "resolve_model_path",
    "ASSETS_DIR",
    "BUNDLED_MODELS",
    "FORMAT",
    "VERSION",
    "INDEX",
    "DIT_FILE",
    "VAE_FILE",
    "TEXT_FILE",
    "TOKENIZER_DIR",
]

FORMAT = "sf-sdk"
VERSION = 1
INDEX = "model_index.json"
DIT_FILE = "dit.safetensors"
VAE_FILE = "vae.safetensors"
TEXT_FILE = "text_encoder.safetensors"
TOKENIZER_DIR = "tokenizer"
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"  # sf_sdk/assets
# Models shipped inside the package, loadable by name.
BUNDLED_MODELS = ("shapes-tiny",)


@dataclass
class ModelFiles:
    """What one of our model folders holds, with its configs (nothing loaded yet)."""

    root: Path
    dit: DiTConfig
    streaming: StreamingConfig
    vae: VAEConfig | None
    text_encoder: TextEncoderConfig | None
    extra: dict[str, Any] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.root / name


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A bundled model name (``shapes-tiny``) or a folder path -> the folder."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    if str(name_or_path) in BUNDLED_MODELS:
        bundled = ASSETS_DIR / str(name_or_path)
        if not (bundled / INDEX).is_file():
            raise CheckpointError(
                f"the bundled model {str(name_or_path)!r} is missing from this installation (expected "
                f"at {bundled}): it has not been trained yet. Train it with the training package "
                f"(`python -m training.train --config-name shapes_tiny`, see docs/training.md), or "
                f"pass a model folder or an official self_forcing_dmd.pt checkpoint instead")
        return bundled
    raise CheckpointError(f"{str(name_or_path)!r} is neither a model folder, a checkpoint file nor a "
                          f"bundled model (bundled: {', '.join(BUNDLED_MODELS)})")


def _atomic_write_dir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; a model folder is meant to be shared
    return tmp


def save_pretrained(
    out_dir: str | os.PathLike,
    *,
    dit: nn.Module | Mapping[str, Tensor],
    dit_config: DiTConfig,
    streaming: StreamingConfig,
    vae: nn.Module | Mapping[str, Tensor] | None = None,
    vae_config: VAEConfig | None = None,
    text_encoder: nn.Module | Mapping[str, Tensor] | None = None,
    text_config: TextEncoderConfig | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a model folder atomically (a temp folder renamed into place); returns it.

    ``dtype`` casts floating tensors on the way out (e.g. ``torch.bfloat16`` halves the files);
    ``extra`` adds JSON entries to the index (``fps``, provenance, ...).
    """
    out = Path(out_dir)
    if (vae is None) != (vae_config is None):
        raise ValueError("give vae and vae_config together")
    if (text_encoder is None) != (text_config is None):
        raise ValueError("give text_encoder and text_config together")
    if tokenizer_dir is not None and not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise ValueError(f"tokenizer_dir {tokenizer_dir} has no tokenizer.json (a Hugging Face tokenizer "
                         f"folder is expected)")
    reserved = {"format", "version", "dit", "streaming", "vae", "text_encoder"} & set(extra or {})
    if reserved:
        raise ValueError(f"extra must not override the index keys {sorted(reserved)}")
    tmp = _atomic_write_dir(out)
    try:
        def dump(obj: nn.Module | Mapping[str, Tensor], name: str) -> None:
            sd = obj.state_dict() if isinstance(obj, nn.Module) else obj
            sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu()
                  .contiguous() for k, v in sd.items()}
            save_file(sd, str(tmp / name), metadata={"format": FORMAT})

        dump(dit, DIT_FILE)
        if vae is not None:
            dump(vae, VAE_FILE)
        if text_encoder is not None:
            dump(text_encoder, TEXT_FILE)
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / TOKENIZER_DIR)
        index = {
            "format": FORMAT,
            "version": VERSION,
            "dit": to_dict(dit_config),
            "streaming": to_dict(streaming),
            "vae": to_dict(vae_config) if vae_config is not None else None,
            "text_encoder": to_dict(text_config) if text_config is not None else None,
            **(extra or {}),
        }
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if out.exists():
            backup = out.with_name(f".{out.name}.old")
            if backup.exists():
                shutil.rmtree(backup)
            out.rename(backup)
            tmp.rename(out)
            shutil.rmtree(backup)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_index(folder: str | os.PathLike) -> ModelFiles:
    """The configs of one of our model folders (or a bundled model name)."""
    root = resolve_model_path(folder)
    path = root / INDEX
    if not path.is_file():
        raise CheckpointError(f"{root} has no {INDEX}: not an sf-sdk model folder (official checkpoints "
                              f"load from the self_forcing_dmd.pt file with wan_dir=, or convert them with "
                              f"`python -m export.convert`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the folder is corrupt") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path} has format {got!r}, expected {FORMAT!r}")
    if int(data.get("version", 0)) > VERSION:
        raise CheckpointError(f"{path} is format version {data['version']}; this sf-sdk reads up to "
                              f"{VERSION}: upgrade sf-sdk")
    known = {"format", "version", "dit", "streaming", "vae", "text_encoder"}
    try:
        return ModelFiles(
            root=root,
            dit=from_dict(DiTConfig, data["dit"]),
            streaming=from_dict(StreamingConfig, data.get("streaming") or {}),
            vae=from_dict(VAEConfig, data["vae"]) if data.get("vae") else None,
            text_encoder=from_dict(TextEncoderConfig, data["text_encoder"]) if data.get("text_encoder")
            else None,
            extra={k: v for k, v in data.items() if k not in known},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad config ({exc})") from exc


def load_folder(files: ModelFiles, *, device: torch.device, dtype: torch.dtype, text_dtype: torch.dtype,
                load_vae: bool, load_text_encoder: bool) -> LoadedModel:
    """Build the components of a model folder (as :func:`read_index` describes it)."""
    from sf_sdk.models.dit import WanDiT

    def component(cls: type[nn.Module], cfg: Any, name: str, what: str, dt: torch.dtype) -> nn.Module:
        path = files.path(name)
        if not path.is_file():
            raise CheckpointError(f"{what} weights {path} are missing from the model folder, but "
                                  f"{INDEX} describes a {what}")
        state = open_state_dict(path, device=device, dtype=dt)
        return build_module(cls, cfg, state, what=f"{what} ({path.name})", device=device)

    dit = component(WanDiT, files.dit, DIT_FILE, "DiT", dtype)
    vae = text = tokenizer = None
    if load_vae and files.vae is not None:
        from sf_sdk.models.vae import WanVAE

        vae = component(WanVAE, files.vae, VAE_FILE, "VAE", dtype)
    if load_text_encoder and files.text_encoder is not None:
        from sf_sdk.models.text import UMT5Encoder

        text = component(UMT5Encoder, files.text_encoder, TEXT_FILE, "text encoder", text_dtype)
        tokenizer = files.path(TOKENIZER_DIR)
        if not (tokenizer / "tokenizer.json").is_file():
            raise CheckpointError(f"{tokenizer} (the tokenizer of the text encoder) is missing from the "
                                  f"model folder")
    return LoadedModel(dit, files.dit, files.streaming, vae, files.vae if vae is not None else None,
                       text, files.text_encoder if text is not None else None, tokenizer,
                       fps=int(files.extra.get("fps", DEFAULT_FPS)), source=str(files.root))
