"""Stage ``teacher``: a bidirectional Wan DiT trained with flow matching on cached VAE latents.

1. The frozen text encoder and tokenizer are written once (:mod:`training.stages.common`).
2. ``cache_clips`` shapes clips are encoded with the trained VAE into normalized latents
   ``[N, F, C, h, w]`` (shards in ``teacher/latents/``, resumable), so no step re-runs the VAE.
3. Each step draws clips from the cache, timesteps uniformly from the shifted table
   (``training.algorithms.flow.sample_train_timesteps``), drops ``prompt_dropout`` of the
   prompts to the negative prompt (classifier-free guidance), and regresses the flow
   ``noise - x0`` (``flow_matching_loss``, the model called with ``mask=None``).
4. ``final/`` holds the EMA weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from sf_sdk.checkpoint import load_pretrained
from sf_sdk.config import to_dict
from sf_sdk.models.dit import WanDiT
from sf_sdk.models.vae import WanVAE
from sf_sdk.scheduler import FlowMatchSchedule
from sf_sdk.video import Mp4Writer
from training.algorithms import (
    EMA,
    drop_prompts,
    flow_matching_loss,
    sample_ode_trajectory,
    sample_train_timesteps,
)
from training.data.shapes import ShapesDataset, tensor_to_frames
from training.stages.common import PromptTable, load_dit, prepare_text_encoder, prompt_table, save_dit
from training.stages.vae import check_latents_unmoved, load_trained_vae
from training.utils.checkpoint import TrainState, atomic_save_file, latest_step
from training.utils.config import TrainConfig
from training.utils.dist import DistInfo, barrier
from training.utils.loop import (
    Metric,
    StageRun,
    accumulate,
    autocast,
    make_optimizer,
    optimizer_step,
    set_lr,
    step_generator,
    wrap_ddp,
)

__all__ = ["run_teacher", "LatentCache", "build_latent_cache", "load_latent_cache", "load_teacher", "sample_teacher",
           "decode_to_mp4"]

log = logging.getLogger(__name__)

# The cache's clips start at this index of the data seed's stream (the VAE trained on the first
# indices; the teacher sees other clips).
CACHE_INDEX_OFFSET = 1_000_000


@dataclasses.dataclass
class LatentCache:
    """Normalized latents ``[N, F, C, h, w]`` (frame-major, as the DiT takes them) and captions."""

    latents: Tensor
    captions: list[str]

    def __len__(self) -> int:
        return self.latents.shape[0]


def _shard_path(folder: Path, shard: int) -> Path:
    return folder / f"shard-{shard:04d}.safetensors"


def _read_shard(path: Path) -> tuple[Tensor, list[str]]:
    """One shard's latents [n, F, C, h, w] and the caption of each clip (its metadata)."""
    with safe_open(str(path), "pt") as f:
        latents = f.get_tensor("latents")
        meta = f.metadata() or {}
    if "captions" not in meta:
        raise ValueError(f"{path} stores no captions: delete its folder and re-run the teacher stage to "
                         f"rebuild the latent cache")
    captions = json.loads(meta["captions"])
    if len(captions) != latents.shape[0]:
        raise ValueError(f"{path} holds {latents.shape[0]} clips but {len(captions)} captions: rebuild the "
                         f"latent cache (delete its folder, re-run the teacher stage)")
    return latents, captions


def load_latent_cache(folder: Path) -> LatentCache:
    """Every shard of a finished latent cache (``<run_dir>/teacher/latents``): clip ``i``'s
    latents and the caption it was rendered from."""
    paths = sorted(folder.glob("shard-*.safetensors"))
    if not paths:
        raise ValueError(f"{folder} holds no latents: run the teacher stage first")
    tensors, captions = [], []
    for path in paths:
        latents, caps = _read_shard(path)
        tensors.append(latents)
        captions.extend(caps)
    return LatentCache(torch.cat(tensors), captions)  # [N, F, C, h, w]


@torch.no_grad()
def build_latent_cache(cfg: TrainConfig, dist: DistInfo, vae: WanVAE, folder: Path) -> LatentCache:
    """Encode ``teacher.cache_clips`` clips (shards split over ranks; existing shards are kept)."""
    st = cfg.teacher
    data = dataclasses.replace(cfg.data, num_frames=st.num_frames)
    ds = ShapesDataset(data, seed=cfg.seed, rank=0, world_size=1)
    num_shards = -(-st.cache_clips // st.cache_shard)
    for shard in range(dist.rank, num_shards, dist.world_size):
        path = _shard_path(folder, shard)
        if path.is_file():
            continue
        start = shard * st.cache_shard
        stop = min(start + st.cache_shard, st.cache_clips)
        latents, captions = [], []
        for first in range(start, stop, st.encode_batch):
            items = [ds[CACHE_INDEX_OFFSET + i] for i in range(first, min(first + st.encode_batch, stop))]
            video = torch.stack([item["video"] for item in items]).to(vae.dtype)  # [b, 3, T, H, W]
            z = vae.normalize(vae.encode(video))  # [b, C, F, h, w]
            latents.append(z.transpose(1, 2))  # [b, F, C, h, w]
            captions.extend(item["caption"] for item in items)
        atomic_save_file({"latents": torch.cat(latents)}, path, {"captions": json.dumps(captions)})
        log.info("latent cache: shard %d of %d (%d clips)", shard + 1, num_shards, stop - start)
    barrier()
    tensors, captions = [], []
    for shard in range(num_shards):
        shard_latents, shard_captions = _read_shard(_shard_path(folder, shard))
        tensors.append(shard_latents)
        captions.extend(shard_captions)
    latents = torch.cat(tensors)  # [N, F, C, h, w]
    log.info("latent cache: %s, mean %.3f std %.3f", tuple(latents.shape), latents.mean().item(),
             latents.std().item())
    return LatentCache(latents, captions)


def run_teacher(cfg: TrainConfig, dist: DistInfo) -> None:
    st = cfg.teacher
    run = StageRun(cfg, "teacher", st, dist)
    if run.done:
        log.info("stage teacher already done (%s)", run.final_dir)
        return
    check_latents_unmoved(cfg.run_dir)
    prepare_text_encoder(cfg, dist)
    prompts = prompt_table(cfg, dist.device)
    vae = load_trained_vae(cfg.run_dir, dist.device)
    cache = build_latent_cache(cfg, dist, vae, run.dir / "latents")
    cond_all = prompts.lookup(cache.captions)  # [N, text_len, text_dim]

    torch.manual_seed(cfg.seed)
    model = WanDiT(cfg.dit)
    if st.init and latest_step(run.ckpt_dir) is None:  # a checkpoint of the run overwrites it anyway
        _start_from(model, st.init)
    model = model.to(dist.device)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    ddp = wrap_ddp(model, cfg, dist)
    opt = make_optimizer(model.parameters(), st)
    ema = EMA(model, decay=st.ema_decay, start_step=0)
    state = TrainState(modules={"dit": model}, optimizers={"opt": opt}, tensors={"ema": ema.state_dict()})
    run.resume(state)
    ema.load_state_dict(state.tensors["ema"])
    schedule = FlowMatchSchedule(shift=cfg.stream.timestep_shift, num_train_timesteps=cfg.stream.num_train_timesteps)
    log.info("teacher: %.2fM parameters, %d cached clips of %d latent frames", model.num_parameters() / 1e6,
             len(cache), cache.latents.shape[1])
    while state.step < st.steps:
        set_lr(opt, st.lr, state.step, st)
        gen = step_generator(cfg.seed, "teacher", state.step, dist.rank)

        def micro(gen: torch.Generator = gen) -> tuple[Tensor, dict[str, Metric]]:
            idx = torch.randint(len(cache), (st.batch_size,), generator=gen)
            x0 = cache.latents[idx].to(dist.device)  # [B, F, C, h, w]
            cond = drop_prompts(cond_all[idx], prompts.uncond, st.prompt_dropout, generator=gen)
            t = sample_train_timesteps(schedule, x0.shape[0], x0.shape[1], generator=gen, device=dist.device)
            with autocast(cfg, dist.device):
                loss, metrics = flow_matching_loss(ddp, x0, cond, t, schedule, generator=gen,
                                                   weighted=st.use_training_weight)
            return loss, {"loss_flow": metrics["loss"]}

        metrics = accumulate(ddp, [micro for _ in range(st.grad_accum)])
        if (norm := optimizer_step(opt, model.parameters(), st.grad_clip)) is not None:
            metrics["grad_norm"] = norm
        state.step += 1
        ema.update(model, state.step)
        state.tensors["ema"] = ema.shadow
        run.log_step(state, metrics)
        if st.sample_every and state.step % st.sample_every == 0 and dist.is_main:
            _sample(cfg, ema, model, prompts, vae, run.samples_dir / f"sample-{state.step:06d}.mp4")
        run.maybe_checkpoint(state, force=state.step == st.steps)
    run.finish()
    if dist.is_main:
        final = WanDiT(cfg.dit)
        final.load_state_dict(model.state_dict())
        ema.copy_to(final)
        save_dit(run.final_dir, final.state_dict(), cfg.dit)
        _sample(cfg, ema, model, prompts, vae, run.samples_dir / "sample-final.mp4")
    run.mark_done({"steps": state.step})


def _start_from(model: WanDiT, init: str) -> None:
    """Load the DiT of ``init`` (a model folder or bundled name) into the fresh ``model``."""
    start = load_pretrained(init, load_vae=False, load_text_encoder=False)
    if to_dict(start.dit_config) != to_dict(model.config):
        raise ValueError(f"teacher.init={init!r} holds a DiT of {to_dict(start.dit_config)} but this run's is "
                         f"{to_dict(model.config)}: set the run's dit.* fields to the model's, or drop teacher.init")
    model.load_state_dict(start.dit.state_dict())
    log.info("teacher: starting from the DiT of %s", start.source or init)


def load_teacher(cfg: TrainConfig, device: torch.device) -> WanDiT:
    """The teacher's EMA weights from ``<run_dir>/teacher/final``, frozen."""
    return load_dit(Path(cfg.run_dir) / "teacher" / "final", device, what="teacher").eval().requires_grad_(False)


@torch.no_grad()
def _sample(cfg: TrainConfig, ema: EMA, model: WanDiT, prompts: PromptTable, vae: WanVAE, path: Path) -> None:
    """A guided teacher sample (Euler ODE) of one caption per shape, decoded to an MP4."""
    st = cfg.teacher
    sampler = WanDiT(cfg.dit).to(next(model.parameters()).device)
    sampler.load_state_dict(model.state_dict())
    ema.copy_to(sampler)
    sampler.eval()
    captions = [prompts.captions[i] for i in (0, len(prompts.captions) // 3 + 5, 2 * len(prompts.captions) // 3 + 10)]
    frames = 1 + (st.num_frames - 1) // vae.config.temporal_stride
    x0 = sample_teacher(sampler, cfg, prompts, captions, frames, step_generator(cfg.seed, "teacher-sample"),
                        steps=st.sample_steps, guidance=st.sample_guidance)
    decode_to_mp4(vae, x0, path, cfg.data.fps)
    log.info("teacher sample %s (%s)", path, "; ".join(captions))


@torch.no_grad()
def sample_teacher(teacher: WanDiT, cfg: TrainConfig, prompts: PromptTable, captions: list[str], latent_frames: int,
                   generator: torch.Generator, *, steps: int, guidance: float) -> Tensor:
    """Guided Euler samples of the teacher over whole clips: normalized latents [B, F, C, h, w],
    one per caption (noise drawn on the CPU from ``generator``, so any device gives the same)."""
    noise = torch.randn((len(captions), latent_frames, cfg.dit.in_dim, cfg.stream.latent_height,
                         cfg.stream.latent_width), generator=generator)
    out = sample_ode_trajectory(teacher, noise.to(prompts.cond.device), prompts.lookup(captions), prompts.uncond,
                                steps=steps, shift=cfg.stream.timestep_shift, cfg=guidance,
                                keep_timesteps=[cfg.stream.num_train_timesteps],
                                num_train_timesteps=cfg.stream.num_train_timesteps)
    return out["x0"]


@torch.no_grad()
def decode_to_mp4(vae: WanVAE, latents: Tensor, path: Path, fps: int) -> None:
    """Normalized latents [B, F, C, h, w] -> one MP4 with the B videos side by side."""
    video = vae.decode(latents.transpose(1, 2).to(vae.dtype))  # [B, 3, T, H, W]
    row = torch.cat(list(video), dim=3)  # [3, T, H, B*W]
    path.parent.mkdir(parents=True, exist_ok=True)
    with Mp4Writer(path, fps=fps) as writer:
        writer.write(tensor_to_frames(row))
