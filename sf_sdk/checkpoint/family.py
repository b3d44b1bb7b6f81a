"""The Self-Forcing family: released checkpoints of the causal Wan2.1-1.3B DiT and how each streams.

Every member keeps the Self-Forcing architecture (so the DiT loads into :class:`~sf_sdk.models.dit.WanDiT`
unchanged) and the Wan2.1-T2V-1.3B folder (VAE, umT5, tokenizer); they differ in where their
weights sit in the file and in how their authors stream them. A :class:`Family` records both:

* the layout: the pickle entry the authors' inference reads (``generator_ema`` or ``generator``;
  a flat state dict for Reward Forcing) and the wrapper prefixes on the keys (``model.``, FSDP's
  ``_fsdp_wrapped_module.``, torch.compile's ``_orig_mod.``), all stripped;
* the streaming defaults of the authors' inference config (chunk size, denoising steps, a
  first chunk's own steps, window, sinks, EMA sinks, rotary positions, Rolling Forcing's joint
  denoising window), as a
  :class:`~sf_sdk.config.StreamingConfig`;
* for LongLive, the LoRA released beside the base weights (merged at load, see
  :mod:`sf_sdk.checkpoint.lora`).

Which family a file is: the ``family=`` argument when given, else the released file name and
folder (:func:`detect_family`: ``self_forcing_dmd.pt``, ``chunkwise/causal_forcing.pt``,
``chunkwise/longvideo.pt``, ``causal-forcing++/framewise-2step.pt``, ``longlive_base.pt``,
``rewardforcing.pt``, ``rolling_forcing_dmd.pt``, ...). The
keys cannot tell the members apart (they are all the same network), so a renamed file needs
``family=``; without either, a file loads as Self-Forcing, with a warning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from sf_sdk.checkpoint.weights import CheckpointError, StateDict, _torch_load, open_state_dict
from sf_sdk.config import StreamingConfig

__all__ = ["Family", "FAMILIES", "DEFAULT_FAMILY", "detect_family", "resolve_family", "open_family_state",
           "normalize_key", "family_names"]

log = logging.getLogger(__name__)

# Wrapper prefixes that training code leaves on DiT keys: stripped wherever they occur.
_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
# Leading prefixes of the wrapper modules (Self-Forcing's WanDiffusionWrapper.model, DDP's module.).
_LEADING = ("model.", "module.")
# Entries of a training checkpoint that hold the generator, and the ones that never do.
_GENERATOR_ENTRIES = ("generator_ema", "generator", "model")

_WAN = "https://huggingface.co/Wan-AI/Wan2.1-T2V-1.3B"


@dataclass(frozen=True)
class Family:
    """One released checkpoint: its layout, its authors' streaming defaults and where it comes from."""

    name: str
    title: str
    streaming: StreamingConfig
    use_ema: bool | None  # the entry the authors' inference reads: True generator_ema, False generator,
    #                       None: a flat state dict (no entries)
    files: tuple[str, ...]  # the released paths (tails) that identify it
    source: str  # where the weights are published
    license: str
    lora_file: str | None = None  # a LoRA released beside the base weights, merged at load

    def entry(self, use_ema: bool | None) -> str | None:
        """The pickle entry to read: ``use_ema`` (None: the authors' choice) -> an entry name."""
        if self.use_ema is None:
            return None
        ema = self.use_ema if use_ema is None else use_ema
        return "generator_ema" if ema else "generator"


# 480x832 video: latents 60x104; 4 steps [1000, 750, 500, 250] warped through the shift-5 schedule.
_CHUNKWISE = StreamingConfig()
_FRAMEWISE = replace(_CHUNKWISE, num_frame_per_block=1)
_FOUR_STEPS = (1000.0, 750.0, 500.0, 250.0)
# Rolling Forcing (pipeline/rolling_forcing_inference.py): one chunk per step in a joint window; the
# attention spans 21 latent frames: the first chunk as a sink, rotated right before the oldest cached
# frame the window sees (cache-relative positions), the newest cached frames and the window itself.
_ROLLING = replace(_CHUNKWISE, local_attn_size=21, sink_size=3, position_mode="cache_relative")

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("self-forcing", "Self-Forcing (chunk-wise, 4 steps)", _CHUNKWISE, True,
           ("self_forcing_dmd.pt",), "https://huggingface.co/gdhe17/Self-Forcing (checkpoints/self_forcing_dmd.pt)",
           "CC-BY-NC-SA-4.0"),
    # Causal Forcing: configs/causal_forcing_dmd_{chunkwise,framewise}.yaml; the README's chunk-wise
    # command reads 'generator', the frame-wise ones pass --use_ema.
    Family("causal-forcing-chunkwise", "Causal Forcing (chunk-wise, 4 steps)", _CHUNKWISE, False,
           ("chunkwise/causal_forcing.pt",),
           "https://huggingface.co/zhuhz22/Causal-Forcing (chunkwise/causal_forcing.pt)", "Apache-2.0"),
    # Causal Forcing's long-video generator: long_video/configs/rolling_forcing_dmd.yaml (Rolling Forcing's
    # pipeline with the 4 steps), the README's command passes --use_ema.
    Family("causal-forcing-longvideo", "Causal Forcing long video (chunk-wise, Rolling Forcing's 4-chunk window)",
           replace(_ROLLING, denoise_window=4), True, ("chunkwise/longvideo.pt",),
           "https://huggingface.co/zhuhz22/Causal-Forcing (chunkwise/longvideo.pt)", "Apache-2.0"),
    Family("causal-forcing-framewise", "Causal Forcing (frame-wise, 4 steps; image-to-video)", _FRAMEWISE, True,
           ("framewise/causal_forcing.pt",),
           "https://huggingface.co/zhuhz22/Causal-Forcing (framewise/causal_forcing.pt)", "Apache-2.0"),
    # Causal Forcing++: configs/causal_forcing_dmd_framewise_{2,1}step.yaml, the first frame in 4 steps.
    Family("causal-forcing++-2step", "Causal Forcing++ (frame-wise, 2 steps)",
           replace(_FRAMEWISE, denoising_step_list=(1000.0, 500.0), first_chunk_steps=_FOUR_STEPS), True,
           ("causal-forcing++/framewise-2step.pt", "framewise-2step.pt"),
           "https://huggingface.co/zhuhz22/Causal-Forcing (causal-forcing++/framewise-2step.pt)", "Apache-2.0"),
    Family("causal-forcing++-1step", "Causal Forcing++ (frame-wise, 1 step)",
           replace(_FRAMEWISE, denoising_step_list=(1000.0,), first_chunk_steps=_FOUR_STEPS), True,
           ("causal-forcing++/framewise-1step.pt", "framewise-1step.pt"),
           "https://huggingface.co/zhuhz22/Causal-Forcing (causal-forcing++/framewise-1step.pt)", "Apache-2.0"),
    # LongLive: configs/longlive_inference.yaml: chunks of 3, a 12-frame window holding 3 sink frames,
    # keys rotated at absolute positions, use_ema false, the LoRA (rank 256, alpha 256) merged;
    # a prompt switch re-caches the window and keeps the sinks (global_sink: true).
    Family("longlive", "LongLive (chunk-wise, 3 sink frames + 9-frame window, base + LoRA)",
           replace(_CHUNKWISE, local_attn_size=12, sink_size=3, recache_sinks=False), False, ("longlive_base.pt",),
           "https://huggingface.co/Efficient-Large-Model/LongLive-1.3B (models/longlive_base.pt, models/lora.pt)",
           "Apache-2.0", lora_file="lora.pt"),
    # Reward Forcing: configs/reward_forcing.yaml: a 9-frame window of 3 EMA-sink frames (decay 0.999)
    # + 6 frames, keys cached unrotated and rotated by their place in the window; a flat state dict.
    Family("reward-forcing", "Reward Forcing (chunk-wise, 3 EMA-sink frames + 6-frame window)",
           replace(_CHUNKWISE, local_attn_size=9, sink_size=3, position_mode="cache_relative", sink_decay=0.999),
           None, ("rewardforcing.pt",),
           "https://huggingface.co/JaydenLu666/Reward-Forcing-T2V-1.3B (rewardforcing.pt)",
           "none stated on the model card (code: Apache-2.0)"),
    # Rolling Forcing: configs/rolling_forcing_dmd.yaml: 5 steps [1000, 800, 600, 400, 200] (warped), a window
    # of 5 chunks; the README's command passes --use_ema.
    Family("rolling-forcing", "Rolling Forcing (chunk-wise, 5 steps in a 5-chunk joint window)",
           replace(_ROLLING, denoising_step_list=(1000.0, 800.0, 600.0, 400.0, 200.0), denoise_window=5), True,
           ("rolling_forcing_dmd.pt",),
           "https://huggingface.co/TencentARC/RollingForcing (checkpoints/rolling_forcing_dmd.pt)",
           "License Terms of RollingForcing (Tencent; permissive, see its LICENSE)"),
)}
DEFAULT_FAMILY = "self-forcing"


def family_names() -> list[str]:
    return list(FAMILIES)


def detect_family(path: str | os.PathLike) -> Family | None:
    """The family a released file is, from its name and folder (None when the name is not one)."""
    parts = Path(path).parts
    for fam in FAMILIES.values():
        for tail in fam.files:
            want = Path(tail).parts
            if tuple(parts[-len(want):]) == want:
                return fam
    return None


def resolve_family(family: str | Family | None, path: str | os.PathLike) -> Family:
    """``family`` (a name or a :class:`Family`), else the one :func:`detect_family` finds, else
    Self-Forcing (logged: a renamed file of another family needs ``family=``)."""
    if isinstance(family, Family):
        return family
    if family is not None:
        if family not in FAMILIES:
            raise CheckpointError(f"unknown family {family!r}; choose one of {family_names()}")
        return FAMILIES[family]
    found = detect_family(path)
    if found is not None:
        log.info("%s: %s (from its file name; pass family= to choose another)", path, found.title)
        return found
    if Path(path).name != "self_forcing_dmd.pt":
        log.warning("%s is not a released file name of the Self-Forcing family: loading it with the Self-Forcing "
                    "streaming defaults; pass family= (one of %s) if it is another member", path, family_names())
    return FAMILIES[DEFAULT_FAMILY]


def normalize_key(key: str) -> str:
    """A DiT key as a training checkpoint stores it -> our name: wrapper prefixes stripped."""
    for w in _WRAPPERS:
        key = key.replace(w, "")
    for lead in _LEADING:
        if key.startswith(lead):
            key = key[len(lead):]
            break
    return key


def _is_lora_state(keys: list[str]) -> bool:
    return any(".lora_A." in k or ".lora_B." in k or ".lora_down." in k for k in keys[:200])


def open_family_state(path: str | os.PathLike, family: Family, *, use_ema: bool | None = None,
                      device: torch.device | str = "cpu", dtype: torch.dtype | None = None
                      ) -> tuple[StateDict, str]:
    """The DiT state dict of a family checkpoint (lazy, see :func:`~sf_sdk.checkpoint.open_state_dict`)
    and a description of where it was read (``file [entry]``).

    The entry is ``use_ema``'s (None: the family's); a flat state dict is read as it is. Keys
    are normalised with :func:`normalize_key`. Errors say what the file holds instead.
    """
    path = Path(path)
    if path.suffix == ".safetensors":  # our own / converted files: flat, maybe prefixed
        state = open_state_dict(path, device=device, dtype=dtype)
        names = {normalize_key(k): v for k, v in state._names.items()}
        if len(names) != len(state._names):
            raise CheckpointError(f"{path}: stripping the wrapper prefixes makes keys collide")
        return StateDict(path, None, state._handle, names, device=state.device, dtype=dtype), str(path)
    if not path.is_file() or path.stat().st_size == 0:
        open_state_dict(path)  # raises the missing / empty file error
    try:
        obj = _torch_load(path)
    except Exception:
        open_state_dict(path)  # raises the unreadable-file error that names the cause
        raise
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    entries = [k for k, v in obj.items() if isinstance(v, Mapping)]
    flat = [k for k, v in obj.items() if isinstance(v, Tensor)]
    if flat and not entries:
        if _is_lora_state(flat):
            raise CheckpointError(f"{path} is a LoRA (lora_A / lora_B keys), not a DiT checkpoint: load its base "
                                  f"weights and pass this file as lora=")
        if use_ema is not None:
            log.info("%s is a flat state dict (no generator / generator_ema entries): use_ema does not apply", path)
        return _renamed(obj, path, flat, dtype, device), str(path)
    if "generator_lora" in entries:
        raise CheckpointError(f"{path} is a LongLive LoRA ('generator_lora'), not a DiT checkpoint: load its base "
                              f"weights (longlive_base.pt) and pass this file as lora=")
    want = family.entry(use_ema)
    if want is None:  # a flat-layout family given a file with entries: the usual generator entry
        want = next((e for e in _GENERATOR_ENTRIES if e in entries), _GENERATOR_ENTRIES[0])
    if want not in entries:
        other = "generator" if want == "generator_ema" else "generator_ema"
        hint = ""
        if other in entries:
            hint = (": this checkpoint has no EMA weights, load it with use_ema=False (CLI: --no-ema)"
                    if want == "generator_ema" else ": load its EMA weights with use_ema=True")
        raise CheckpointError(f"{path} has no {want!r} entry (it has {sorted(map(str, obj))}){hint}")
    sub = obj[want]
    bad = sorted(str(k) for k, v in sub.items() if not isinstance(v, Tensor))
    if bad:
        raise CheckpointError(f"{path} [{want!r}] holds non-tensor entries {bad[:5]}: not a state dict")
    return _renamed(sub, path, list(sub), dtype, device), f"{path} [{want}]"


def _renamed(tensors: Mapping[str, Tensor], path: Path, file_keys: list[str], dtype: torch.dtype | None,
             device: torch.device | str) -> StateDict:
    names = {normalize_key(k): k for k in file_keys}
    if len(names) != len(file_keys):
        raise CheckpointError(f"{path}: stripping the wrapper prefixes {_LEADING + _WRAPPERS} makes keys collide")
    return StateDict(path, tensors, None, names, device=torch.device(device), dtype=dtype)
