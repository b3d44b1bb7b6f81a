"""Stage ``export``: the final student (EMA) with its VAE and text encoder in the SDK format.

Writes ``sf_sdk.checkpoint.save_pretrained`` folders (``model_index.json``, ``dit`` / ``vae`` /
``text_encoder`` safetensors, ``tokenizer/``) whose StreamingConfig is the training one (chunk
size, steps, window, latent size, ``independent_first_frame`` for an image-to-video fine-tune), so
``StreamingGenerator.from_pretrained(folder)`` streams exactly what was trained.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from sf_sdk.checkpoint import load_state_dict, save_pretrained
from sf_sdk.config import VAEConfig, from_dict, to_dict
from training.stages.common import DIT_CONFIG_FILE, DIT_FILE, TEXT_FILE, text_dir
from training.stages.vae import VAE_CONFIG_FILE, VAE_FILE, check_latents_unmoved, finished_vae_dir
from training.utils.config import TrainConfig
from training.utils.dist import DistInfo, barrier

__all__ = ["run_export", "export_model"]

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def export_model(cfg: TrainConfig, out_dir: str | os.PathLike, source: str) -> Path:
    run = Path(cfg.run_dir)
    check_latents_unmoved(run)  # a VAE whose encoder moved the latents this run's DiT was trained on
    dit_dir = run / source / "final"
    if not (dit_dir / DIT_FILE).is_file():
        raise ValueError(f"{dit_dir} holds no student: run the {source} stage first, or export "
                         f"export.source=ode_init")
    dit_cfg_data = json.loads((dit_dir / DIT_CONFIG_FILE).read_text())
    if dit_cfg_data != json.loads(json.dumps(to_dict(cfg.dit))):
        raise ValueError(f"the student in {dit_dir} was trained with another DiT config than this run's")
    # The decoder fine-tuned with the encoder frozen (stage vae_decoder), when it finished.
    vae_dir = finished_vae_dir(run) or run / "vae" / "final"
    vae_cfg = from_dict(VAEConfig, json.loads((vae_dir / VAE_CONFIG_FILE).read_text()),
                        source=vae_dir / VAE_CONFIG_FILE)
    folder = save_pretrained(
        out_dir,
        dit=load_state_dict(dit_dir / DIT_FILE),
        dit_config=cfg.dit,
        streaming=cfg.stream,
        vae=load_state_dict(vae_dir / VAE_FILE),
        vae_config=vae_cfg,
        text_encoder=load_state_dict(text_dir(cfg) / TEXT_FILE),
        text_config=cfg.text,
        tokenizer_dir=text_dir(cfg) / "tokenizer",
        dtype=DTYPES[cfg.export.dtype],
        extra={"fps": cfg.export.fps, "trained_with": {"source_stage": source, "vae_stage": vae_dir.parent.name, "run_dir_name": run.name,
                                                        "num_frames": cfg.teacher.num_frames,
                                                        "image_conditioning": source == "self_forcing"
                                                        and cfg.self_forcing.image_conditioning}},
    )
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    log.info("exported %s (%.1f MB) from %s", folder, size / 1e6, source)
    return folder


def run_export(cfg: TrainConfig, dist: DistInfo) -> None:
    if dist.is_main:
        out = cfg.export.out_dir or str(Path(cfg.run_dir) / "export" / "shapes-tiny")
        export_model(cfg, out, cfg.export.source)
    barrier()
