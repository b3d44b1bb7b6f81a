"""Stage ``tiny_decoder``: a TAEHV tiny streaming decoder for the model's latents.

The encoder (the run's ``vae`` stage result, e.g. taken from ``init_vae=shapes-tiny``) is frozen:
the decoder learns to map exactly the latents the DiT was trained on back to video. Each step
renders shapes clips, encodes them (posterior mean plus ``latent_noise``, normalized as the DiT
sees them) and decodes them with the tiny decoder; the loss is the object-weighted L1 plus the
image-gradient L1 (from step ``grad_from_step``) against the rendered clip
(:func:`training.stages.vae.reconstruction_loss`, no MSE), and with ``wan_weight`` the same loss against the Wan decoder's frames of the same latents.

``final/`` holds ``tiny_decoder.safetensors`` (the released TAEHV key layout) and
``tiny_decoder_config.json``; :func:`sf_sdk.checkpoint.taehv.add_tiny_decoder` puts it into a
model folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from torch import Tensor

from sf_sdk.checkpoint.taehv import TINY_DECODER_FILE, load_folder_tiny_decoder, load_taehv
from sf_sdk.config import from_dict, to_dict
from sf_sdk.models.taehv import TAEHVConfig, TAEHVDecoder
from sf_sdk.models.vae import WanVAE
from sf_sdk.video import Mp4Writer
from training.data.shapes import ShapesDataset, tensor_to_frames
from training.stages.vae import finished_vae_dir, load_vae_dir, reconstruction_loss
from training.utils.checkpoint import TrainState, atomic_save_file
from training.utils.config import TrainConfig
from training.utils.dist import DistInfo
from training.utils.loop import (
    Metric,
    StageRun,
    accumulate,
    make_optimizer,
    optimizer_step,
    set_lr,
    step_generator,
    wrap_ddp,
)

__all__ = ["run_tiny_decoder", "load_trained_tiny_decoder", "TINY_CONFIG_FILE"]

log = logging.getLogger(__name__)

TINY_CONFIG_FILE = "tiny_decoder_config.json"
# Clip indices of the final sample, far beyond any training step's clips.
HELD_OUT = 30_000_000


def _frozen_vae(cfg: TrainConfig, dist: DistInfo) -> WanVAE:
    """The run's finished VAE (``vae_decoder`` if done, else ``vae``; frozen)."""
    folder = finished_vae_dir(cfg.run_dir)
    if folder is None:
        raise ValueError(f"{cfg.run_dir} has no finished VAE: run the vae stage first (stages=[vae,tiny_decoder]; "
                         f"with init_vae=shapes-tiny it takes the bundled model's VAE)")
    return load_vae_dir(folder, dist.device)


def _start_from(model: TAEHVDecoder, init: str) -> None:
    """Load ``init``'s tiny decoder (a model folder or bundled name) into the fresh ``model``."""
    start = load_folder_tiny_decoder(init)
    if start.config != model.config:
        raise ValueError(f"tiny_decoder.init={init!r} holds a tiny decoder of {to_dict(start.config)} but this run "
                         f"builds {to_dict(model.config)}: set tiny_decoder.widths / blocks_per_stage to match, or "
                         f"drop tiny_decoder.init to train from scratch")
    model.load_state_dict(start.state_dict())
    log.info("tiny_decoder: starting from the tiny decoder of %s", init)


def _clips(ds: ShapesDataset, step: int, micro: int, batch: int, dist: DistInfo, accum: int) -> Tensor:
    """The clips of one micro-batch: a pure function of (step, micro, rank), for exact resume."""
    first = ((step * accum + micro) * dist.world_size + dist.rank) * batch
    return torch.stack([ds[i]["video"] for i in range(first, first + batch)])  # [B, 3, T, H, W]


def run_tiny_decoder(cfg: TrainConfig, dist: DistInfo) -> None:
    st = cfg.tiny_decoder
    run = StageRun(cfg, "tiny_decoder", st, dist)
    if run.done:
        log.info("stage tiny_decoder already done (%s)", run.final_dir)
        return
    vae = _frozen_vae(cfg, dist)
    tiny_cfg = TAEHVConfig.for_vae(vae.config, widths=st.widths, blocks_per_stage=st.blocks_per_stage)
    torch.manual_seed(cfg.seed)
    model = TAEHVDecoder(tiny_cfg).to(dist.device).train()
    if st.init:
        _start_from(model, st.init)
    ddp = wrap_ddp(model, cfg, dist)
    params = list(model.parameters())
    opt = make_optimizer(params, st)
    state = TrainState(modules={"tiny_decoder": model}, optimizers={"opt": opt})
    run.resume(state)
    ds = ShapesDataset(dataclasses.replace(cfg.data, num_frames=st.num_frames), seed=cfg.seed + 2, rank=0,
                       world_size=1)
    log.info("tiny_decoder: widths %s, %.3fM parameters, clips of %d frames, batch %d x %d x %d", st.widths,
             sum(p.numel() for p in params) / 1e6, st.num_frames, st.batch_size, st.grad_accum, dist.world_size)
    while state.step < st.steps:
        set_lr(opt, st.lr, state.step, st)
        gen = step_generator(cfg.seed, run.name, state.step, dist.rank)
        grad_weight = st.grad_weight if state.step >= st.grad_from_step else 0.0

        def micro(i: int, gen: torch.Generator = gen, grad_weight: float = grad_weight):
            def fn() -> tuple[Tensor, dict[str, Metric]]:
                video = _clips(ds, state.step, i, st.batch_size, dist, st.grad_accum).to(dist.device)
                with torch.no_grad():
                    mu = vae.encode(video)  # [B, z, t, h, w]
                    noise = torch.randn(mu.shape, generator=gen).to(dist.device)
                    z = vae.normalize(mu + st.latent_noise * noise)
                    wan = vae.decode(z, clamp=False) if st.wan_weight else None  # [B, 3, T, H, W]
                recon = ddp(z, clamp=False)  # [B, 3, T, H, W]
                loss, metrics = reconstruction_loss(recon, video, st.fg_weight, st.l1_weight, st.mse_weight, grad_weight)
                if wan is not None:
                    part, wan_metrics = reconstruction_loss(recon, wan, st.fg_weight, st.l1_weight, st.mse_weight,
                                                             grad_weight)
                    loss = loss + st.wan_weight * part
                    metrics["wan_psnr"] = wan_metrics["psnr"]
                return loss, metrics
            return fn

        metrics = accumulate(ddp, [micro(i) for i in range(st.grad_accum)])
        if (norm := optimizer_step(opt, params, st.grad_clip)) is not None:
            metrics["grad_norm"] = norm
        state.step += 1
        run.log_step(state, metrics)
        if st.sample_every and state.step % st.sample_every == 0 and dist.is_main:
            write_comparison(vae, model, ds, run.samples_dir / f"tiny-{state.step:06d}.mp4", cfg.data.fps)
        run.maybe_checkpoint(state, force=state.step == st.steps)
    run.finish()
    if dist.is_main:
        write_comparison(vae, model, ds, run.samples_dir / "tiny-final.mp4", cfg.data.fps)
        save_tiny_decoder(run.final_dir, model)
    run.mark_done({"steps": st.steps, "widths": list(st.widths)})


@torch.no_grad()
def write_comparison(vae: WanVAE, tiny: TAEHVDecoder, ds: ShapesDataset, path: Path, fps: int) -> None:
    """Side-by-side MP4 of a held-out clip: the clip, the Wan decoder's and the tiny decoder's frames."""
    was_training = tiny.training
    tiny.eval()
    video = ds[HELD_OUT]["video"][None].to(vae.dtype)  # [1, 3, T, H, W]
    z = vae.normalize(vae.encode(video))
    both = torch.cat([video, vae.decode(z), tiny.decode(z)], dim=4)[0]  # [3, T, H, 3W]
    path.parent.mkdir(parents=True, exist_ok=True)
    with Mp4Writer(path, fps=fps) as writer:
        writer.write(tensor_to_frames(both))
    tiny.train(was_training)


def save_tiny_decoder(folder: Path, model: TAEHVDecoder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                     folder / TINY_DECODER_FILE, {"format": "sf-sdk"})
    (folder / TINY_CONFIG_FILE).write_text(json.dumps(to_dict(model.config), indent=2) + "\n")


def load_trained_tiny_decoder(run_dir: str | Path, device: torch.device | str = "cpu") -> TAEHVDecoder:
    """The tiny decoder produced by the ``tiny_decoder`` stage of ``run_dir`` (frozen)."""
    folder = Path(run_dir) / "tiny_decoder" / "final"
    if not (folder / TINY_CONFIG_FILE).is_file():
        raise ValueError(f"{folder} holds no trained tiny decoder: run the tiny_decoder stage first")
    config = from_dict(TAEHVConfig, json.loads((folder / TINY_CONFIG_FILE).read_text()))
    return load_taehv(folder / TINY_DECODER_FILE, config=config, device=device)
