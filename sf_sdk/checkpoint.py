"""Loading and saving model weights: our own folder format, and the released official files.

Our format (``save_pretrained`` / ``load_pretrained``) is a folder::

    model_index.json        {"format": "sf-sdk", "version": 1, "dit": {...}, "streaming": {...},
                             "vae": {...}, "text_encoder": {...} | null, "fps": 16, ...}
    dit.safetensors         DiT weights, official parameter names, no prefix
    vae.safetensors         VAE weights (optional: a DiT-only folder streams latents)
    text_encoder.safetensors  umT5-layout encoder (optional: prompt embeddings can be given)
    tokenizer/              a Hugging Face tokenizer folder (tokenizer.json, ...)

Safetensors files are memory-mapped and loaded lazily, straight into the requested dtype and
device. Pickled official checkpoints are always read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sf_sdk.config import (
    DiTConfig,
    StreamingConfig,
    TextEncoderConfig,
    VAEConfig,
    from_dict,
    to_dict,
)

__all__ = [
    "CheckpointError",
    "ModelFiles",
    "save_pretrained",
    "read_index",
    "load_state_dict",
    "load_into",
    "ASSETS_DIR",
    "BUNDLED_MODELS",
    "resolve_model_path",
]

log = logging.getLogger(__name__)

FORMAT = "sf-sdk"
VERSION = 1
INDEX = "model_index.json"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
# Models shipped inside the package, loadable by name.
BUNDLED_MODELS = ("shapes-tiny",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says what is wrong and what would fit."""


@dataclass
class ModelFiles:
    """What a model folder holds, with its configs."""

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
                f"the bundled model {name_or_path!r} is not present in this installation "
                f"({bundled}); it is produced by the training package (see README: training)")
        return bundled
    raise CheckpointError(f"{name_or_path!r} is neither a model folder nor a bundled model "
                          f"(bundled: {', '.join(BUNDLED_MODELS)})")


def _atomic_write_dir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


def save_pretrained(
    out_dir: str | os.PathLike,
    *,
    dit: nn.Module | dict[str, torch.Tensor],
    dit_config: DiTConfig,
    streaming: StreamingConfig,
    vae: nn.Module | dict[str, torch.Tensor] | None = None,
    vae_config: VAEConfig | None = None,
    text_encoder: nn.Module | dict[str, torch.Tensor] | None = None,
    text_config: TextEncoderConfig | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a model folder atomically (a temp folder renamed into place)."""
    out = Path(out_dir)
    if (vae is None) != (vae_config is None):
        raise ValueError("give vae and vae_config together")
    if (text_encoder is None) != (text_config is None):
        raise ValueError("give text_encoder and text_config together")
    tmp = _atomic_write_dir(out)
    try:
        def dump(obj: nn.Module | dict, name: str) -> None:
            sd = obj.state_dict() if isinstance(obj, nn.Module) else obj
            sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu()
                  .contiguous() for k, v in sd.items()}
            save_file(sd, str(tmp / name), metadata={"format": FORMAT})

        dump(dit, "dit.safetensors")
        if vae is not None:
            dump(vae, "vae.safetensors")
        if text_encoder is not None:
            dump(text_encoder, "text_encoder.safetensors")
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / "tokenizer")
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
    root = resolve_model_path(folder)
    path = root / INDEX
    if not path.is_file():
        raise CheckpointError(f"{root} has no {INDEX}: not an sf-sdk model folder (convert official "
                              f"checkpoints with `python -m export.convert`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the folder is corrupt") from exc
    if data.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {data.get('format')!r}, expected {FORMAT!r}")
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


def load_state_dict(path: str | os.PathLike, *, prefix: str = "", key: str | None = None,
                    device: torch.device | str = "cpu", dtype: torch.dtype | None = None
                    ) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors (mmap) or a torch pickle (``weights_only``).

    ``key`` selects a sub-dict of a pickle (e.g. ``generator_ema``); ``prefix`` is stripped from
    the keys that carry it (e.g. ``model.``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file {path} is empty")
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt", device=str(device)) as f:
                sd = {k: f.get_tensor(k) for k in f.keys()}
        else:
            obj = torch.load(str(path), map_location=device, weights_only=True, mmap=True)
            if key is not None:
                if not isinstance(obj, dict) or key not in obj:
                    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise CheckpointError(f"{path} has no {key!r} entry (it has {keys})")
                obj = obj[key]
            if not isinstance(obj, dict):
                raise CheckpointError(f"{path} does not hold a state dict (got {type(obj).__name__})")
            sd = obj
    except CheckpointError:
        raise
    except Exception as exc:  # truncated / corrupt files surface here
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {exc} (truncated or corrupt "
                              f"file?)") from exc
    if prefix:
        sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return sd


def load_into(module: nn.Module, state: dict[str, torch.Tensor], *, what: str, config: Any = None
              ) -> None:
    """Strict load with an error naming missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        def show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" ... (+{len(items) - 8})" if len(items) > 8 else "")

        parts = [f"{what} weights do not fit the model"]
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if shapes:
            parts.append(f"wrong shapes: {show(shapes)}")
        hint = _config_hint(state, config)
        if hint:
            parts.append(hint)
        raise CheckpointError("; ".join(parts))
    module.load_state_dict(state, strict=True, assign=True)


def _config_hint(state: dict[str, torch.Tensor], config: Any) -> str:
    """Infer the DiT config that the weights would fit, when they look like a Wan DiT."""
    if not isinstance(config, DiTConfig) or "patch_embedding.weight" not in state:
        return ""
    try:
        pe = state["patch_embedding.weight"]  # [dim, in_dim, pt, ph, pw]
        dim, in_dim = pe.shape[0], pe.shape[1]
        layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        ffn = state["blocks.0.ffn.0.weight"].shape[0]
        text_dim = state["text_embedding.0.weight"].shape[1]
        freq_dim = state["time_embedding.0.weight"].shape[1]
        out = state["head.head.weight"].shape[0] // (pe.shape[2] * pe.shape[3] * pe.shape[4])
    except (KeyError, ValueError, IndexError):
        return ""
    return (f"the weights fit DiTConfig(dim={dim}, ffn_dim={ffn}, num_layers={layers}, in_dim={in_dim}, "
            f"out_dim={out}, text_dim={text_dim}, freq_dim={freq_dim}, patch_size={tuple(pe.shape[2:])}) "
            f"with num_heads dividing {dim}")
