"""Reading weights into modules: state dicts from safetensors files and torch pickles.

Loading is lazy: modules are built on the meta device, then take their tensors one at a time
from a memory-mapped file (safetensors, or a pickle opened with ``mmap=True``), each cast to
the requested dtype and device as it is read, so the peak memory is the loaded model plus one
tensor. Shapes are checked against the file's header before any weight is read, and a
mismatch names the missing, unexpected and wrongly-shaped keys and the config that would fit.
Pickles are always read with ``weights_only=True``; a pickle that would call code on load (the
way a malicious checkpoint runs commands) is refused with an error that says so and names the
callables, and never suggests loading it another way.

Both file formats (:mod:`sf_sdk.checkpoint.folder`, :mod:`sf_sdk.checkpoint.official`) load
through this module and return a :class:`LoadedModel`.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import pickle
import pickletools
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from sf_sdk.config import DiTConfig, StreamingConfig, TextEncoderConfig, VAEConfig

__all__ = [
    "CheckpointError",
    "LoadedModel",
    "StateDict",
    "open_state_dict",
    "load_state_dict",
    "load_into",
    "build_module",
    "non_finite_tensors",
    "config_hint",
    "resolve_dtype",
    "DEFAULT_FPS",
]

log = logging.getLogger(__name__)

DEFAULT_FPS = 16  # when a model folder does not say
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
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)} (or 'auto' where a generator "
                         f"is built: sf_sdk.precision)")
    return _DTYPES[dtype.lower()]


# --------------------------------------------------------------------------------------------
# What a load returns
# --------------------------------------------------------------------------------------------


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
        found = _pickle_globals(path)
        code = [name for name in found if _runs_code(name)]
        if code:
            raise CheckpointError(f"{path} tries to run code when it is loaded (its pickle calls "
                                  f"{', '.join(code[:5])}), which a weights file never does: it must not be "
                                  f"loaded. Delete it and get the weights from a source you trust (a .safetensors "
                                  f"file cannot run code)") from None
        detail = _unpickler_detail(exc)
        if "nsupported global" not in detail and not found:
            raise CheckpointError(f"cannot read {path}: not a valid weights pickle ({detail}): truncated, "
                                  f"corrupt, or not a weights file?") from None
        objects = ", ".join(found[:5]) or detail
        raise CheckpointError(f"{path} holds Python objects besides tensors ({objects}); sf-sdk reads only "
                              f"tensors from a pickle: save the weights with torch.save(module.state_dict()) or "
                              f"as .safetensors") from None
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
    """The reason inside torch's long weights-only error message (e.g. "Unsupported operand 149"),
    without its advice (which suggests loading with weights_only=False)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    reasons = [line.strip() for line in text.splitlines()
               if line.strip() and "weights_only" not in line and "Check the documentation" not in line]
    return reasons[0].split(". Please use")[0] if reasons else "a pickle the weights-only reader refuses"


# Globals a weights pickle may name: torch's tensor and storage rebuilders and OrderedDict.
_WEIGHTS_MODULES = ("torch", "collections")
# Modules whose callables run commands or code (os.system, eval, subprocess.Popen, ...).
_CODE_MODULES = {"os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy", "pty",
                 "code", "codeop", "pickle", "_pickle", "marshal", "ctypes", "webbrowser", "multiprocessing",
                 "asyncio", "pdb", "timeit", "operator", "functools", "types", "inspect", "platform", "signal",
                 "tempfile", "io", "_io", "commands", "popen2", "urllib", "http", "requests", "torch.hub"}
_CODE_BUILTINS = {"eval", "exec", "compile", "__import__", "getattr", "setattr", "delattr", "open", "input",
                  "breakpoint", "globals", "locals", "vars", "print", "exit", "quit", "help"}


def _runs_code(name: str) -> bool:
    """Whether a pickle global ("module.attr") is a callable that runs commands or code."""
    module, _, attr = name.rpartition(".")
    if module in ("builtins", "__builtin__"):
        return attr in _CODE_BUILTINS
    return module in _CODE_MODULES or module.split(".")[0] in _CODE_MODULES


def _pickle_globals(path: Path, limit: int = 64 << 20) -> list[str]:
    """The globals ("module.attr") a torch pickle names, other than torch's own and OrderedDict.

    Reads the opcodes only (``pickletools``, nothing is imported or called): the ``data.pkl`` of
    a zip checkpoint, or the leading pickles of a legacy one. A corrupt stream ends the scan.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                data = archive.read(member) if member is not None else b""
        else:
            with open(path, "rb") as f:
                data = f.read(limit)
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return []
    found: list[str] = []
    stream = io.BytesIO(data)
    while stream.tell() < len(data):  # a legacy file is several pickles in a row
        strings: list[str] = []
        memo: dict[Any, Any] = {}
        try:
            for op, arg, _ in pickletools.genops(stream):
                if isinstance(arg, str) and op.name.endswith(("UNICODE", "STRING", "UNICODE8")):
                    strings.append(arg)
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
                    memo[arg if op.name != "MEMOIZE" else len(memo)] = strings[-1] if strings else None
                elif op.name in ("BINGET", "LONG_BINGET", "GET") and isinstance(memo.get(arg), str):
                    strings.append(memo[arg])
                if op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
        except Exception:  # not a pickle (any more): tensor data, or a cut file
            break
    return list(dict.fromkeys(n for n in found if n.split(".")[0] not in _WEIGHTS_MODULES))


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
    module = module.to(device).eval().requires_grad_(False)
    # One pass over the loaded tensors, here and only here: NaN / Inf weights can only give NaN
    # frames (an all-black video), so they are an error at load, not a surprise at decode.
    bad = non_finite_tensors(module)
    if bad:
        shown = ", ".join(bad[:5]) + (f" ... (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        half = any(p.dtype == torch.float16 for p in module.parameters())
        hint = " (float16 holds at most 65504: load with dtype='bfloat16' or 'float32')" if half else ""
        raise CheckpointError(f"{what} weights hold NaN or infinite values in {len(bad)} tensor(s): {shown}{hint}; "
                              f"the checkpoint is corrupt or its training diverged: use an earlier checkpoint")
    return module


def non_finite_tensors(module: nn.Module) -> list[str]:
    """Names of the floating parameters and buffers of ``module`` holding NaN or infinite values.

    One read of each tensor (``aminmax``: NaN propagates to both ends, an infinity shows at one;
    ~10x faster than ``isfinite().all()``, which writes a mask first) and one host sync for all."""
    named = [(n, t) for n, t in [*module.named_parameters(), *module.named_buffers()]
             if t.is_floating_point() and not t.is_meta and t.numel()]
    if not named:
        return []
    flags = []
    for _, t in named:
        lo, hi = torch.aminmax(t.detach())
        flags.append(torch.isfinite(lo) & torch.isfinite(hi))
    ok = torch.stack([f.to(named[0][1].device) for f in flags]).tolist()
    return [name for (name, _), good in zip(named, ok) if not good]


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
