"""LoRA adapters for the DiT: read the layouts the family ships, merge into the weights at load.

A LoRA changes a Linear layer's weight by a low-rank product: ``W' = W + scale * (alpha / r) *
B @ A`` (``A`` = ``lora_A`` / ``lora_down`` [r, in], ``B`` = ``lora_B`` / ``lora_up`` [out, r]).
:func:`merge_lora` adds it to the weights once, at load, so the DiT runs as a plain DiT: every
backend (compile, AOTInductor, ONNX, TensorRT) exports the merged weights and needs nothing else.

Layouts read by :func:`read_lora`:

* PEFT: keys ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (an adapter name
  such as ``.default`` in between is accepted); a folder with ``adapter_config.json`` (``r``,
  ``lora_alpha``, ``use_rslora``) and ``adapter_model.safetensors`` / ``.bin``, or the file alone;
* LongLive's ``lora.pt``: the same PEFT keys under a ``generator_lora`` entry (its config has
  rank 256, alpha 256: a scale of 1);
* kohya / diffusers ``lora_down`` / ``lora_up`` keys with per-module ``.alpha`` scalars;
* ours (:func:`save_lora`): PEFT keys in a safetensors file whose metadata holds ``lora_alpha``.

The alpha of a layer comes from its ``.alpha`` key, else the ``alpha`` argument, else
``adapter_config.json`` or the file's metadata; a state dict that says nothing is taken with
``alpha = r`` (LongLive's setting), which is logged. Module names may carry the same wrapper
prefixes as DiT checkpoints (``model.``, ``_fsdp_wrapped_module.``).

:func:`extract_lora` makes a LoRA from a base and a fine-tuned DiT (the truncated SVD of each
weight difference), so a model trained with the training package ships as a small adapter.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from sf_sdk.checkpoint.family import Family, normalize_key
from sf_sdk.checkpoint.weights import CheckpointError, _torch_load

__all__ = ["LoRA", "LoRALayer", "read_lora", "merge_lora", "extract_lora", "save_lora", "family_lora",
           "PEFT_CONFIG", "PEFT_WEIGHTS"]

log = logging.getLogger(__name__)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PEFT_PREFIX = "base_model.model."
_LONGLIVE_ENTRY = "generator_lora"
# <module>.lora_A[.adapter].weight, <module>.lora_down.weight, <module>.alpha
_KEY = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.[^.]+)?\.weight$")
_ALPHA = re.compile(r"^(?P<module>.+?)\.alpha$")
_DOWN = {"lora_A": True, "lora_down": True, "lora_B": False, "lora_up": False}


@dataclass
class LoRALayer:
    """One adapted Linear layer: ``delta = scale * up @ down``."""

    down: Tensor  # [r, in]
    up: Tensor  # [out, r]
    scale: float  # alpha / r (alpha / sqrt(r) for rsLoRA)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight change [out, in], computed in ``dtype`` (float32 or wider)."""
        return (self.up.to(dtype) @ self.down.to(dtype)) * self.scale


@dataclass
class LoRA:
    """LoRA layers by module name (ours: ``blocks.0.self_attn.q``)."""

    layers: dict[str, LoRALayer]
    source: str = ""

    def __len__(self) -> int:
        return len(self.layers)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _module_name(raw: str) -> str:
    name = raw[len(_PEFT_PREFIX):] if raw.startswith(_PEFT_PREFIX) else raw
    return normalize_key(name)


def _read_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file or a weights-only torch pickle."""
    if not path.is_file():
        raise CheckpointError(f"LoRA file {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"LoRA file {path} is empty (0 bytes)")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as exc:
            raise CheckpointError(f"cannot read the LoRA file {path}: {type(exc).__name__}: {exc}") from exc
    try:
        obj = _torch_load(path)
    except Exception as exc:
        raise CheckpointError(f"cannot read the LoRA file {path} as a weights-only torch pickle: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get(_LONGLIVE_ENTRY), Mapping):
        obj = obj[_LONGLIVE_ENTRY]  # LongLive's lora.pt
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        have = sorted(map(str, obj))[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{path} is not a LoRA state dict (a dict of tensors, or LongLive's "
                              f"{{'{_LONGLIVE_ENTRY}': ...}}); it holds {have}")
    return dict(obj), {}


def _peft_config(folder: Path) -> dict:
    path = folder / PEFT_CONFIG
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if cfg.get("alpha_pattern") or cfg.get("rank_pattern"):
        raise CheckpointError(f"{path} gives per-module alpha_pattern / rank_pattern, which sf-sdk does not read: "
                              f"merge the adapter with PEFT and load the merged weights")
    if cfg.get("use_dora"):
        raise CheckpointError(f"{path} is a DoRA adapter (use_dora): only plain LoRA merges here")
    return cfg


def read_lora(path: str | os.PathLike, *, alpha: float | None = None) -> LoRA:
    """Read a LoRA in any of the layouts of the module docstring (a file, or a PEFT folder)."""
    p = Path(path)
    cfg: dict = {}
    if p.is_dir():
        if not (p / PEFT_CONFIG).is_file():
            raise CheckpointError(f"{p} is a folder without {PEFT_CONFIG}: pass a LoRA file or a PEFT adapter folder")
        cfg = _peft_config(p)
        weights = next((p / n for n in PEFT_WEIGHTS if (p / n).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{p} has {PEFT_CONFIG} but no {' or '.join(PEFT_WEIGHTS)}")
        p = weights
    elif (p.parent / PEFT_CONFIG).is_file() and p.name in PEFT_WEIGHTS:
        cfg = _peft_config(p.parent)
    tensors, meta = _read_tensors(p)
    pairs: dict[str, dict[bool, Tensor]] = {}
    alphas: dict[str, float] = {}
    others = []
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m:
            pairs.setdefault(_module_name(m["module"]), {})[_DOWN[m["kind"]]] = value
            continue
        m = _ALPHA.match(key)
        if m and value.numel() == 1:
            alphas[_module_name(m["module"])] = float(value)
            continue
        others.append(key)
    if not pairs:
        raise CheckpointError(f"{p} holds no LoRA weights (keys ending in lora_A / lora_B / lora_down / lora_up "
                              f".weight); its keys look like {sorted(tensors)[:4]}")
    if others:
        raise CheckpointError(f"{p} holds keys that are not LoRA weights, which merging would drop: "
                              f"{sorted(others)[:6]}{' ...' if len(others) > 6 else ''} (DoRA magnitudes, "
                              f"modules_to_save, embeddings are not supported)")
    unpaired = sorted(m for m, d in pairs.items() if len(d) != 2)
    if unpaired:
        raise CheckpointError(f"{p}: LoRA modules with only one of lora_A / lora_B: {unpaired[:6]}")
    default = alpha
    rslora = bool(cfg.get("use_rslora", False))
    if default is None and "lora_alpha" in cfg:
        default = float(cfg["lora_alpha"])
    if default is None and "lora_alpha" in meta:
        default = float(meta["lora_alpha"])
    layers = {}
    assumed = False
    for name, d in sorted(pairs.items()):
        down, up = d[True], d[False]
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
            raise CheckpointError(f"{p}: LoRA {name}: lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)} are "
                                  f"not [r, in] and [out, r] of one rank r")
        r = down.shape[0]
        a = alphas.get(name, default)
        if a is None:
            a, assumed = float(r), True
        layers[name] = LoRALayer(down, up, a / (math.sqrt(r) if rslora else r))
    if assumed:
        log.info("%s gives no LoRA alpha: taking alpha = rank (scale 1, LongLive's setting); pass lora_scale to "
                 "change it", p)
    return LoRA(layers, str(p))


# --------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------


def merge_lora(dit: nn.Module, lora: LoRA | str | os.PathLike, *, scale: float = 1.0) -> list[str]:
    """Add ``scale`` times the LoRA's weight change to the matching Linear layers of ``dit``, in
    place (computed in float32, or float64 for a float64 model); returns the merged module names.

    Every layer is checked before any weight changes: a module the DiT does not have, one that is
    not a Linear, or a shape that does not fit raises :class:`CheckpointError` naming them.
    """
    lora = lora if isinstance(lora, LoRA) else read_lora(lora)
    if not math.isfinite(scale):
        raise CheckpointError(f"lora_scale must be a finite number, got {scale}")
    modules = dict(dit.named_modules())
    unknown = sorted(n for n in lora.layers if n not in modules)
    if unknown:
        near = sorted(n for n, m in modules.items() if isinstance(m, nn.Linear))[:3]
        raise CheckpointError(f"LoRA {lora.source}: {len(unknown)} module(s) the DiT does not have: {unknown[:6]}"
                              f"{' ...' if len(unknown) > 6 else ''}; the DiT's Linear layers are named like {near}")
    wrong = []
    for name, layer in lora.layers.items():
        mod = modules[name]
        if not isinstance(mod, nn.Linear):
            wrong.append(f"{name} is a {type(mod).__name__}, not a Linear layer")
            continue
        out_f, in_f = mod.weight.shape
        if layer.down.shape[1] != in_f or layer.up.shape[0] != out_f:
            wrong.append(f"{name}: lora_A {tuple(layer.down.shape)} / lora_B {tuple(layer.up.shape)} vs weight "
                         f"[{out_f}, {in_f}] (lora_A must be [r, {in_f}], lora_B [{out_f}, r])")
    if wrong:
        raise CheckpointError(f"LoRA {lora.source} does not fit this DiT (another model size?): "
                              + "; ".join(wrong[:6]) + (f" ... (+{len(wrong) - 6} more)" if len(wrong) > 6 else ""))
    with torch.no_grad():
        for name, layer in lora.layers.items():
            w = modules[name].weight
            wide = torch.float64 if w.dtype == torch.float64 else torch.float32
            delta = layer.delta(wide).to(w.device) * scale
            w.copy_((w.to(wide) + delta).to(w.dtype))
    log.info("merged LoRA %s into %d layers (scale %g, rank %s)", lora.source, len(lora.layers), scale,
             sorted({layer.rank for layer in lora.layers.values()}))
    return sorted(lora.layers)


def family_lora(family: Family, checkpoint: str | os.PathLike, lora: str | os.PathLike | None) -> Path | None:
    """The LoRA to merge: ``lora`` when given, else the one the family releases beside its base
    weights (LongLive's ``lora.pt``) when it is there (logged), else None."""
    if lora is not None:
        return Path(lora)
    if family.lora_file is None:
        return None
    beside = Path(checkpoint).parent / family.lora_file
    if beside.is_file():
        log.info("%s: merging the LoRA released beside it, %s (lora_scale=0 leaves it out)", family.title, beside)
        return beside
    log.warning("%s is meant to run with its LoRA (%s), which is not beside %s: pass lora=PATH", family.title,
                family.lora_file, checkpoint)
    return None


# --------------------------------------------------------------------------------------------
# Making and saving LoRAs
# --------------------------------------------------------------------------------------------


def extract_lora(base: Mapping[str, Tensor] | nn.Module, tuned: Mapping[str, Tensor] | nn.Module, rank: int, *,
                 prefix: str = "blocks.", atol: float = 0.0) -> LoRA:
    """A rank-``rank`` LoRA of ``tuned - base`` for every 2-D weight under ``prefix`` (the DiT
    blocks' Linear layers: attention, cross-attention and FFN, LongLive's targets) whose
    difference exceeds ``atol``: the truncated SVD, split evenly between the two factors.

    Other parameters (biases, norms, modulation, embeddings) cannot be a LoRA: a change in them
    is logged, with the largest one. The relative error of the truncation is logged per layer.
    """
    b = base.state_dict() if isinstance(base, nn.Module) else base
    t = tuned.state_dict() if isinstance(tuned, nn.Module) else tuned
    if set(b) != set(t):
        raise ValueError(f"base and tuned have different keys: {sorted(set(b) ^ set(t))[:6]}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    layers: dict[str, LoRALayer] = {}
    skipped: list[tuple[str, float]] = []
    worst = 0.0
    for key in sorted(b):
        diff = t[key].double() - b[key].double()
        change = float(diff.abs().max()) if diff.numel() else 0.0
        if change <= atol:
            continue
        if not (key.startswith(prefix) and key.endswith(".weight") and diff.dim() == 2):
            skipped.append((key, change))
            continue
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)
        r = min(rank, s.numel())
        root = s[:r].sqrt()
        down, up = root[:, None] * vh[:r], u[:, :r] * root  # [r, in], [out, r]
        err = float(torch.linalg.norm(diff - up @ down) / torch.linalg.norm(diff))
        worst = max(worst, err)
        layers[key[:-len(".weight")]] = LoRALayer(down.float(), up.float(), 1.0)
    if skipped:
        name, big = max(skipped, key=lambda x: x[1])
        log.warning("extract_lora: %d changed parameters are not block Linear weights and are left out "
                    "(largest change %.3g in %s)", len(skipped), big, name)
    log.info("extracted a rank-%d LoRA of %d layers (largest relative truncation error %.3g)", rank, len(layers),
             worst)
    return LoRA(layers, "extract_lora")


def save_lora(path: str | os.PathLike, lora: LoRA) -> Path:
    """Write ``lora`` as a safetensors file in the PEFT layout (``base_model.model.<module>.lora_A
    / lora_B.weight``), one alpha for all layers in its metadata; :func:`read_lora` and PEFT's
    key layout both read it. The layers must share one scale."""
    scales = {layer.scale for layer in lora.layers.values()}
    ranks = {layer.rank for layer in lora.layers.values()}
    if len(scales) != 1 or len(ranks) != 1:
        raise ValueError(f"save_lora writes one rank and one alpha for every layer, got ranks {sorted(ranks)} and "
                         f"scales {sorted(scales)}")
    rank, scale = ranks.pop(), scales.pop()
    tensors = {}
    for name, layer in lora.layers.items():
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = layer.down.detach().cpu().contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = layer.up.detach().cpu().contiguous()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"format": "peft-lora", "r": str(rank), "lora_alpha": repr(scale * rank)})
    return out
