"""Golden checks of the DiT: causal call sequences (one model, one cache) and bidirectional."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from sf_sdk.config import DiTConfig, StreamingConfig
from sf_sdk.models.dit import WanDiT
from sf_sdk.parity import read_golden
from sf_sdk.scheduler import FlowMatchSchedule

_DIT_FIELDS = {f.name for f in dataclasses.fields(DiTConfig)}


def dit_config_from_official(cfg: dict) -> DiTConfig:
    """The official constructor arguments -> DiTConfig (streaming keys are ignored here)."""
    if cfg.get("model_type", "t2v") != "t2v":
        raise ValueError(f"only the t2v DiT is supported, got model_type={cfg['model_type']!r}")
    return DiTConfig(**{k: v for k, v in cfg.items() if k in _DIT_FIELDS})


def _model(cfg: DiTConfig, weights: dict, dtype: torch.dtype) -> WanDiT:
    model = WanDiT(cfg)
    model.load_state_dict(weights, strict=True)
    return model.to(dtype).eval()


def _err(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    if ours.shape != ref.shape:
        raise ValueError(f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}")
    return float((ours.double() - ref.double()).abs().max()), float(ref.double().abs().max())


def _merge(errors: dict, name: str, e: tuple[float, float]) -> None:
    old = errors.get(name)
    if old is None or e[0] / max(e[1], 1e-12) > old[0] / max(old[1], 1e-12):
        errors[name] = e


@torch.no_grad()
def check(path: Path, dtype: torch.dtype = torch.float64) -> dict[str, tuple[float, float]]:
    meta, weights, t = read_golden(path)
    cfg = dit_config_from_official(meta["config"])
    model = _model(cfg, weights, dtype)
    schedule = FlowMatchSchedule(shift=meta.get("timestep_shift", 5.0))
    context = t["context"].to(dtype)
    errors: dict[str, tuple[float, float]] = {}

    if "calls" not in meta:  # bidirectional
        flow = model(t["x"].to(dtype), t["timestep"].to(dtype), context)
        x0 = schedule.x0_from_flow(flow, t["x"].to(dtype), t["timestep"])
        return {"flow_pred": _err(flow, t["flow_pred"]), "x0_pred": _err(x0, t["x0_pred"])}

    calls = meta["calls"]
    chunk = int(meta["num_frame_per_block"])
    lh, lw = meta["latent_hw"]
    local = int(meta["config"].get("local_attn_size", -1))
    sink = int(meta["config"].get("sink_size", 0))
    total_frames = max(c["start_frame"] + t[f"call{i}.x"].shape[1] for i, c in enumerate(calls))
    stream = StreamingConfig(num_frame_per_block=chunk, local_attn_size=local, sink_size=sink,
                             latent_height=lh, latent_width=lw,
                             timestep_shift=meta.get("timestep_shift", 5.0))
    batch = context.shape[0]
    cache = model.new_cache(stream, batch, num_frames=total_frames)
    if cache.layout.tokens_per_frame != meta.get("frame_seq_length", cache.layout.tokens_per_frame):
        raise ValueError("frame_seq_length in the file disagrees with latent_hw and the patch size")
    cross = model.encode_context(context)
    for i, call in enumerate(calls):
        x = t[f"call{i}.x"].to(dtype)
        ts = t[f"call{i}.timestep"].to(dtype)
        flow = model.forward_chunk(x, ts, cross, cache, start_frame=int(call["start_frame"]))
        x0 = schedule.x0_from_flow(flow, x, t[f"call{i}.timestep"])
        _merge(errors, "flow_pred", _err(flow, t[f"call{i}.flow_pred"]))
        _merge(errors, "x0_pred", _err(x0, t[f"call{i}.x0_pred"]))
    return errors
