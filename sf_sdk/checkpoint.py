"""Loading and saving model weights: our own folder format, and the released official files.

Our format (:func:`save_pretrained`, loaded by :func:`load_pretrained`) is a folder::

    model_index.json        {"format": "sf-sdk", "version": 1, "dit": {...}, "streaming": {...},
                             "vae": {...}, "text_encoder": {...} | null, "fps": 16, ...}
    dit.safetensors         DiT weights, official parameter names, no prefix
    vae.safetensors         VAE weights (optional: a DiT-only folder streams latents)
    text_encoder.safetensors  umT5-layout encoder (optional: prompt embeddings can be given)
    tokenizer/              a Hugging Face tokenizer folder (tokenizer.json, ...)

The official release (:func:`load_official`) is two things:

* the Self-Forcing checkpoint ``self_forcing_dmd.pt``: a torch pickle holding the state dicts
  ``generator``, ``generator_ema`` and ``critic``; the DiT keys carry a ``model.`` prefix;
* the ``Wan2.1-T2V-1.3B/`` folder: ``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth``,
  the tokenizer folder ``google/umt5-xxl/`` and ``config.json`` (the DiT's shape).

Loading is lazy: modules are built on the meta device, then take their tensors one at a time
from a memory-mapped file (safetensors, or a pickle opened with ``mmap=True``), each cast to
the requested dtype and device as it is read, so the peak memory is the loaded model plus one
tensor. Shapes are checked against the file's header before any weight is read, and a
mismatch names the missing, unexpected and wrongly-shaped keys and the config that would fit.
Pickles are always read with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from sf_sdk.config import (
    DIT_PRESETS,
    TEXT_PRESETS,
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
    "LoadedModel",
    "StateDict",
    "save_pretrained",
    "read_index",
    "open_state_dict",
    "load_state_dict",
    "load_into",
    "build_module",
    "load_pretrained",
    "load_official",
    "official_dit_config",
    "find_official",
    "convert_official",
    "resolve_dtype",
    "ASSETS_DIR",
    "BUNDLED_MODELS",
    "SELF_FORCING_STREAMING",
    "resolve_model_path",
]

log = logging.getLogger(__name__)

FORMAT = "sf-sdk"
VERSION = 1
INDEX = "model_index.json"
DIT_FILE = "dit.safetensors"
VAE_FILE = "vae.safetensors"
TEXT_FILE = "text_encoder.safetensors"
TOKENIZER_DIR = "tokenizer"
DEFAULT_FPS = 16
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
# Models shipped inside the package, loadable by name.
BUNDLED_MODELS = ("shapes-tiny",)

# The official release.
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

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float64": torch.float64, "fp64": torch.float64}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says what is wrong and what would fit."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bf16"`` / ``"bfloat16"`` / ``torch.bfloat16`` ... -> a floating torch dtype."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        return dtype
    if not isinstance(dtype, str) or dtype.lower() not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype.lower()]


# --------------------------------------------------------------------------------------------
# What a load returns
# --------------------------------------------------------------------------------------------


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


@dataclass
class LoadedModel:
    """Built, weight-loaded components (eval mode, no gradients), from either format."""

    dit: nn.Module  # sf_sdk.models.dit.WanDiT
    dit_config: DiTConfig
    streaming: StreamingConfig
    vae: nn.Module | None = None  # sf_sdk.models.vae.WanVAE
    vae_config: VAEConfig | None = None
    text_encoder: nn.Module | None = None  # sf_sdk.models.text.UMT5Encoder
    text_config: TextEncoderConfig | None = None
    tokenizer_dir: Path | None = None
    fps: int = DEFAULT_FPS
    source: str = ""  # what was loaded, for logs and error messages


# --------------------------------------------------------------------------------------------
# Reading state dicts lazily
# --------------------------------------------------------------------------------------------


class StateDict(Mapping[str, Tensor]):
    """A checkpoint's tensors by name, read on access and cast to ``dtype`` on ``device``.

    Shapes (:meth:`shape`) come from the safetensors header or the memory-mapped pickle without
    reading tensor data. Integer tensors keep their dtype.
    """

    def __init__(self, path: Path, tensors: Mapping[str, Tensor] | None, handle: Any | None,
                 names: dict[str, str], *, device: torch.device, dtype: torch.dtype | None) -> None:
        self.path = path
        self._tensors = tensors  # a memory-mapped pickle's dict, or None
        self._handle = handle  # an open safetensors file, or None
        self._names = names  # our key -> the file's key
        self.device = device
        self.dtype = dtype

    def __getitem__(self, key: str) -> Tensor:
        name = self._names[key]
        t = self._handle.get_tensor(name) if self._handle is not None else self._tensors[name]
        dtype = self.dtype if self.dtype is not None and t.is_floating_point() else t.dtype
        return t.to(device=self.device, dtype=dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, key: str) -> tuple[int, ...]:
        name = self._names[key]
        if self._handle is not None:
            return tuple(self._handle.get_slice(name).get_shape())
        return tuple(self._tensors[name].shape)


def open_state_dict(path: str | os.PathLike, *, key: str | None = None, prefix: str = "",
                    device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> StateDict:
    """Open a ``.safetensors`` file (memory-mapped) or a torch pickle (``weights_only``, mmap).

    ``key`` selects a sub-dict of a pickle (e.g. ``generator_ema``); ``prefix`` is stripped from
    the keys that carry it (e.g. ``model.``). Nothing but the header is read until a tensor is
    accessed.
    """
    path = Path(path)
    device = torch.device(device)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file {path} is empty (0 bytes): download or write it again")
    tensors: Mapping[str, Tensor] | None = None
    handle = None
    try:
        if path.suffix == ".safetensors":
            if key is not None:
                raise CheckpointError(f"{path} is a safetensors file: it has no sub-dict {key!r}")
            handle = safe_open(str(path), "pt", device="cpu" if device.type == "cpu" else str(device))
            file_keys = list(handle.keys())
        else:
            obj = _torch_load(path)
            if key is not None:
                if not isinstance(obj, dict) or key not in obj:
                    have = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise CheckpointError(f"{path} has no {key!r} entry (it has {have})")
                obj = obj[key]
            if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
                what = type(obj).__name__ if not isinstance(obj, dict) else \
                    f"a dict with non-tensor entries {sorted(k for k, v in obj.items() if not isinstance(v, Tensor))[:5]}"
                raise CheckpointError(f"{path}{f' [{key!r}]' if key else ''} does not hold a state dict "
                                      f"of tensors (got {what})")
            tensors = obj
            file_keys = list(obj)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as exc:
        detail = _unpickler_detail(exc)
        if "Unsupported global" not in detail:
            raise CheckpointError(f"cannot read {path}: not a valid weights pickle ({detail}): truncated, "
                                  f"corrupt, or not a weights file?") from exc
        raise CheckpointError(f"{path} holds Python objects besides tensors ({detail}); sf-sdk reads pickles "
                              f"only with weights_only=True: re-save the state dicts with "
                              f"torch.save(module.state_dict()) from code you trust") from exc
    except Exception as exc:  # truncated / corrupt files surface here
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {_first_line(exc)} (truncated, "
                              f"corrupt, or not a weights file?)") from exc
    names = {(k[len(prefix):] if prefix and k.startswith(prefix) else k): k for k in file_keys}
    if len(names) != len(file_keys):
        raise CheckpointError(f"{path}: stripping the prefix {prefix!r} makes keys collide")
    return StateDict(path, tensors, handle, names, device=device, dtype=dtype)


def _torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``, memory-mapped when the file format allows."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        # Legacy (non-zip) pickles cannot be memory-mapped; read them whole.
        log.info("%s is not mmap-able (%s); reading it into memory", path, _first_line(exc))
        return torch.load(str(path), map_location="cpu", weights_only=True)


def _unpickler_detail(exc: BaseException) -> str:
    """The reason inside torch's long weights-only error message (e.g. "Unsupported global: ...")."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        rest = text.split(marker, 1)[1].strip()
        return rest.splitlines()[0].strip() if rest else _first_line(exc)
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_state_dict(path: str | os.PathLike, *, prefix: str = "", key: str | None = None,
                    device: torch.device | str = "cpu", dtype: torch.dtype | None = None
                    ) -> dict[str, Tensor]:
    """Read a whole state dict (see :func:`open_state_dict`), each tensor cast as it is read."""
    state = open_state_dict(path, key=key, prefix=prefix, device=device, dtype=dtype)
    return {k: state[k] for k in state}


# --------------------------------------------------------------------------------------------
# Loading into modules, with errors that say what would fit
# --------------------------------------------------------------------------------------------


def _shape_of(state: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    return state.shape(key) if isinstance(state, StateDict) else tuple(state[key].shape)


def load_into(module: nn.Module, state: Mapping[str, Tensor], *, what: str, config: Any = None) -> None:
    """Strict load (tensors are assigned, so a meta-device module takes them as they are).

    A mismatch raises :class:`CheckpointError` naming the missing, unexpected and wrongly-shaped
    keys, and the config the weights would fit when it can be inferred.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: checkpoint {_shape_of(state, k)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if _shape_of(state, k) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        def show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" ... (+{len(items) - 8} more)" if len(items) > 8 else "")

        parts = [f"{what} weights do not fit the model built from {type(config).__name__ if config else 'its config'}"]
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if shapes:
            parts.append(f"wrong shapes: {show(shapes)}")
        prefix = _common_extra_prefix(set(own), unexpected)
        if prefix:
            parts.append(f"the checkpoint keys carry a {prefix!r} prefix: strip it")
        hint = config_hint(state, config)
        if hint:
            parts.append(hint)
        raise CheckpointError("; ".join(parts))
    module.load_state_dict({k: state[k] for k in own}, strict=True, assign=True)


def _common_extra_prefix(own: set[str], unexpected: list[str]) -> str:
    """A prefix (``model.``, ``_orig_mod.``) that, stripped, turns unexpected keys into ours."""
    if not unexpected:
        return ""
    first = unexpected[0].split(".")[0] + "."
    if all(k.startswith(first) for k in unexpected) and any(k[len(first):] in own for k in unexpected):
        return first
    return ""


def config_hint(state: Mapping[str, Tensor], config: Any) -> str:
    """The config the weights would fit, inferred from their shapes ("" when unknown)."""
    try:
        if isinstance(config, DiTConfig):
            return _dit_hint(state)
        if isinstance(config, TextEncoderConfig):
            return _text_hint(state)
        if isinstance(config, VAEConfig):
            return _vae_hint(state)
    except (KeyError, ValueError, IndexError):
        return ""
    return ""


def _layer_count(state: Mapping[str, Tensor], prefix: str) -> int:
    return 1 + max(int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix))


def _dit_hint(state: Mapping[str, Tensor]) -> str:
    pe = _shape_of(state, "patch_embedding.weight")  # [dim, in_dim, pt, ph, pw]
    dim, in_dim, patch = pe[0], pe[1], pe[2:]
    out_dim = _shape_of(state, "head.head.weight")[0] // (patch[0] * patch[1] * patch[2])
    return (f"the weights fit DiTConfig(dim={dim}, ffn_dim={_shape_of(state, 'blocks.0.ffn.0.weight')[0]}, "
            f"num_layers={_layer_count(state, 'blocks.')}, in_dim={in_dim}, out_dim={out_dim}, "
            f"text_dim={_shape_of(state, 'text_embedding.0.weight')[1]}, "
            f"freq_dim={_shape_of(state, 'time_embedding.0.weight')[1]}, patch_size={tuple(patch)}) with "
            f"num_heads dividing {dim} (the shapes do not tell the head count; Wan2.1-1.3B uses 12)")


def _text_hint(state: Mapping[str, Tensor]) -> str:
    vocab, dim = _shape_of(state, "token_embedding.weight")
    shared = "pos_embedding.embedding.weight" in state
    buckets, heads = _shape_of(state, "pos_embedding.embedding.weight" if shared
                               else "blocks.0.pos_embedding.embedding.weight")
    return (f"the weights fit TextEncoderConfig(vocab={vocab}, dim={dim}, "
            f"dim_attn={_shape_of(state, 'blocks.0.attn.q.weight')[0]}, "
            f"dim_ffn={_shape_of(state, 'blocks.0.ffn.fc1.weight')[0]}, num_heads={heads}, "
            f"num_layers={_layer_count(state, 'blocks.')}, num_buckets={buckets}, shared_pos={shared})")


def _vae_hint(state: Mapping[str, Tensor]) -> str:
    dim = _shape_of(state, "encoder.conv1.weight")[0]
    z_dim = _shape_of(state, "conv2.weight")[0]
    stages = _layer_count(state, "encoder.downsamples.")
    return (f"the weights fit VAEConfig(dim={dim}, z_dim={z_dim}, ...) with len(dim_mult) * "
            f"(num_res_blocks + 1) - 1 = {stages} encoder stages (Wan2.1: dim 96, z_dim 16, "
            f"dim_mult (1, 2, 4, 4), 2 res blocks)")


def build_module(cls: type[nn.Module], config: Any, state: Mapping[str, Tensor], *, what: str,
                 device: torch.device | str = "cpu") -> nn.Module:
    """Build ``cls(config)`` on the meta device and give it the tensors of ``state``.

    The tensors keep the dtype ``state`` gives them (see :func:`open_state_dict`). The module is
    returned on ``device``, in eval mode, without gradients.
    """
    device = torch.device(device)
    with torch.device("meta"):
        module = cls(config)
    load_into(module, state, what=what, config=config)
    _restore_nonpersistent_buffers(module, cls, config, device)
    return module.to(device).eval().requires_grad_(False)


def _restore_nonpersistent_buffers(module: nn.Module, cls: type[nn.Module], config: Any,
                                   device: torch.device) -> None:
    """Buffers that checkpoints do not hold are still on the meta device: rebuild them.

    A buffer named after a config field (the VAE's ``latents_mean`` / ``latents_std``) is taken
    from the config in float64; any other one from a freshly built instance.
    """
    meta = [name for name, buf in module.named_buffers() if buf.is_meta]
    if not meta:
        return
    fresh: dict[str, Tensor] | None = None
    for name in meta:
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if not owner_name and dataclasses.is_dataclass(config) and hasattr(config, leaf):
            value = torch.tensor(getattr(config, leaf), dtype=torch.float64)
        else:
            if fresh is None:
                fresh = dict(cls(config).named_buffers())
            value = fresh[name]
        owner.register_buffer(leaf, value.to(device), persistent=False)


# --------------------------------------------------------------------------------------------
# Our folder format
# --------------------------------------------------------------------------------------------


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


def _load_folder(files: ModelFiles, *, device: torch.device, dtype: torch.dtype, text_dtype: torch.dtype,
                 load_vae: bool, load_text_encoder: bool) -> LoadedModel:
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


# --------------------------------------------------------------------------------------------
# The official release
# --------------------------------------------------------------------------------------------


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
    use_ema: bool = True,
    device: torch.device | str = "cpu",
    dtype: str | torch.dtype = torch.float32,
    text_dtype: str | torch.dtype | None = None,
    load_vae: bool = True,
    load_text_encoder: bool = True,
    dit_config: DiTConfig | None = None,
    vae_config: VAEConfig | None = None,
    text_config: TextEncoderConfig | None = None,
    streaming: StreamingConfig | None = None,
) -> LoadedModel:
    """Load the released Self-Forcing checkpoint with the official Wan2.1-T2V-1.3B folder.

    The DiT comes from ``generator_ema`` (``use_ema=True``) or ``generator`` of
    ``checkpoint_path`` (its ``model.`` prefix stripped; the ``critic`` is not loaded); the VAE,
    umT5-XXL encoder and tokenizer from ``wan_dir``. Configs: the DiT from ``config.json``
    (default: preset ``wan2.1-t2v-1.3b``), ``VAEConfig()``, the ``umt5-xxl`` text preset; pass
    ``dit_config`` / ``vae_config`` / ``text_config`` for files of other shapes. Streaming: the
    Self-Forcing defaults (:data:`SELF_FORCING_STREAMING`). ``wan_dir`` may be None only when
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
    entry = SELF_FORCING_EMA_KEY if use_ema else SELF_FORCING_KEY
    try:
        state = open_state_dict(ckpt, key=entry, prefix=SELF_FORCING_PREFIX, device=dev, dtype=dt)
    except CheckpointError as exc:
        if use_ema and f"no {entry!r} entry" in str(exc):
            raise CheckpointError(f"{exc}; this checkpoint has no EMA weights: load it with "
                                  f"use_ema=False (CLI: --no-ema)") from exc
        raise
    dit = build_module(WanDiT, dcfg, state, what=f"DiT ({ckpt.name} [{entry!r}])", device=dev)
    loaded = LoadedModel(dit, dcfg, streaming if streaming is not None else SELF_FORCING_STREAMING,
                         fps=DEFAULT_FPS, source=f"{ckpt} [{entry}]")
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
    preferred = [c for c in candidates if c.name == SELF_FORCING_FILE]
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
    use_ema: bool = True,
    include_text_encoder: bool = True,
    dit_config: DiTConfig | None = None,
    vae_config: VAEConfig | None = None,
    text_config: TextEncoderConfig | None = None,
) -> Path:
    """Convert the official release into one of our model folders (stored in ``dtype``).

    The result loads with ``StreamingGenerator.from_pretrained(out_dir)``; the Self-Forcing
    weights keep their licence (CC-BY-NC-SA-4.0), recorded in the index.
    """
    dt = resolve_dtype(dtype)
    loaded = load_official(checkpoint, wan_dir, use_ema=use_ema, device="cpu", dtype=dt,
                           load_text_encoder=include_text_encoder, dit_config=dit_config,
                           vae_config=vae_config, text_config=text_config)
    extra = {"fps": loaded.fps, "license": "CC-BY-NC-SA-4.0",
             "converted_from": {"checkpoint": Path(checkpoint).name,
                                "weights": SELF_FORCING_EMA_KEY if use_ema else SELF_FORCING_KEY,
                                "wan_dir": Path(wan_dir).name}}
    out = save_pretrained(out_dir, dit=loaded.dit, dit_config=loaded.dit_config, streaming=loaded.streaming,
                          vae=loaded.vae, vae_config=loaded.vae_config, text_encoder=loaded.text_encoder,
                          text_config=loaded.text_config, tokenizer_dir=loaded.tokenizer_dir, dtype=dt,
                          extra=extra)
    log.info("converted %s + %s into %s (%s)", Path(checkpoint).name, Path(wan_dir).name, out, dt)
    return out


# --------------------------------------------------------------------------------------------
# One entry point for every source
# --------------------------------------------------------------------------------------------


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: str | torch.dtype = torch.float32,
    text_dtype: str | torch.dtype | None = None,
    load_vae: bool = True,
    load_text_encoder: bool = True,
    wan_dir: str | os.PathLike | None = None,
    use_ema: bool = True,
    dit_config: DiTConfig | None = None,
    vae_config: VAEConfig | None = None,
    text_config: TextEncoderConfig | None = None,
) -> LoadedModel:
    """Load one of our model folders, a bundled model name, or an official checkpoint.

    An official checkpoint is the ``.pt`` file (with ``wan_dir=``, or a Wan folder found beside
    it) or a folder holding both (see :func:`find_official`). ``wan_dir``, ``use_ema`` and the
    config overrides apply to official checkpoints only.
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
        return load_official(ckpt, wan, use_ema=use_ema, device=dev, dtype=dt, text_dtype=tdt,
                             load_vae=load_vae, load_text_encoder=load_text_encoder, dit_config=dit_config,
                             vae_config=vae_config, text_config=text_config)
    given = [n for n, v in (("wan_dir", wan_dir), ("dit_config", dit_config), ("vae_config", vae_config),
                            ("text_config", text_config)) if v is not None]
    if given:
        raise CheckpointError(f"{given} apply to official checkpoints only; {name_or_path} is not one (a "
                              f"self_forcing_dmd.pt file or a folder holding it)")
    if Path(name_or_path).is_file():
        raise CheckpointError(f"{name_or_path} is a file but not a checkpoint this SDK reads: pass one of "
                              f"our model folders, or an official .pt checkpoint")
    files = read_index(name_or_path)
    return _load_folder(files, device=dev, dtype=dt, text_dtype=tdt, load_vae=load_vae,
                        load_text_encoder=load_text_encoder)
