"""Stage ``ode_init``: teacher ODE trajectories, then the causal student regresses their ends.

1. ``num_pairs`` trajectories (captions cycled over the whole prompt set, noise from the run
   seed) are integrated by the frozen teacher with CFG (``training.algorithms.ode``), keeping
   the latents at the student's warped timesteps and the final sample. Shards in
   ``ode_init/pairs/`` (resumable, split over ranks).
2. The student (the same :class:`~sf_sdk.models.dit.WanDiT`, initialised from the teacher) is
   trained with ``ode_regression_loss``: the whole clip under the block-causal mask of the
   streaming config (chunks, window), per-chunk timesteps, regressing the final sample.
3. ``final/`` holds the student's EMA weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from sf_sdk.models.dit import WanDiT
from sf_sdk.models.vae import WanVAE
from training.algorithms import EMA, ode_regression_loss, rollout, sample_ode_trajectory, student_timesteps
from training.stages.common import PromptTable, load_dit, prompt_table, save_dit
from training.stages.teacher import decode_to_mp4, load_teacher
from training.stages.vae import load_trained_vae
from training.utils.checkpoint import TrainState, atomic_save_file
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

__all__ = ["run_ode_init", "sample_student", "latent_frames"]

log = logging.getLogger(__name__)


def latent_frames(cfg: TrainConfig, video_frames: int) -> int:
    return 1 + (video_frames - 1) // cfg.vae_model.temporal_stride


@torch.no_grad()
def build_pairs(cfg: TrainConfig, dist: DistInfo, teacher: WanDiT, prompts: PromptTable, folder: Path
                ) -> dict[str, Tensor]:
    """Teacher trajectories, sharded by ``batch_size`` pairs; returns them all (rank-local copy)."""
    st = cfg.ode_init
    frames = latent_frames(cfg, cfg.teacher.num_frames)
    keep = student_timesteps(cfg.stream)
    num_shards = -(-st.num_pairs // st.batch_size)
    for shard in range(dist.rank, num_shards, dist.world_size):
        path = folder / f"shard-{shard:04d}.safetensors"
        if path.is_file():
            continue
        first = shard * st.batch_size
        ids = list(range(first, min(first + st.batch_size, st.num_pairs)))
        captions = [prompts.captions[i % len(prompts.captions)] for i in ids]
        gen = step_generator(cfg.seed, "ode-pairs", shard)
        noise = torch.randn((len(ids), frames, cfg.dit.in_dim, cfg.stream.latent_height,
                             cfg.stream.latent_width), generator=gen).to(dist.device)
        traj = sample_ode_trajectory(teacher, noise, prompts.lookup(captions), prompts.uncond, steps=st.ode_steps,
                                     shift=cfg.stream.timestep_shift, cfg=st.guidance, keep_timesteps=keep,
                                     num_train_timesteps=cfg.stream.num_train_timesteps)
        atomic_save_file(traj, path, {"captions": json.dumps(captions)})
        log.info("ode pairs: shard %d of %d", shard + 1, num_shards)
    barrier()
    out, captions = read_pairs(folder, num_shards)
    out["cond"] = prompts.lookup(captions)  # [N, text_len, text_dim]
    return out


def read_pairs(folder: Path, num_shards: int | None = None) -> tuple[dict[str, Tensor], list[str]]:
    """The teacher trajectories :func:`build_pairs` wrote into ``folder`` (its first ``num_shards``
    shards; None: every one there): ``noisy`` [N, kept steps, F, C, h, w], ``timesteps`` [N, kept
    steps], ``x0`` [N, F, C, h, w], and each trajectory's caption."""
    paths = ([folder / f"shard-{shard:04d}.safetensors" for shard in range(num_shards)] if num_shards is not None
             else sorted(folder.glob("shard-*.safetensors")))
    parts: dict[str, list[Tensor]] = {}
    captions: list[str] = []
    for path in paths:
        with safe_open(str(path), "pt") as f:
            for k in f.keys():
                parts.setdefault(k, []).append(f.get_tensor(k))
            captions.extend(json.loads(f.metadata()["captions"]))
    return {k: torch.cat(v) for k, v in parts.items()}, captions


def run_ode_init(cfg: TrainConfig, dist: DistInfo) -> None:
    st = cfg.ode_init
    run = StageRun(cfg, "ode_init", st, dist)
    if run.done:
        log.info("stage ode_init already done (%s)", run.final_dir)
        return
    prompts = prompt_table(cfg, dist.device)
    teacher = load_teacher(cfg, dist.device)
    pairs = build_pairs(cfg, dist, teacher, prompts, run.dir / "pairs")
    n = pairs["x0"].shape[0]

    student = WanDiT(cfg.dit).to(dist.device)
    student.load_state_dict(teacher.state_dict())
    student.gradient_checkpointing = cfg.gradient_checkpointing
    del teacher
    ddp = wrap_ddp(student, cfg, dist)
    opt = make_optimizer(student.parameters(), st)
    ema = EMA(student, decay=st.ema_decay, start_step=0)
    state = TrainState(modules={"dit": student}, optimizers={"opt": opt}, tensors={"ema": ema.state_dict()})
    run.resume(state)
    ema.load_state_dict(state.tensors["ema"])
    vae = load_trained_vae(cfg.run_dir, dist.device) if dist.is_main else None
    while state.step < st.steps:
        set_lr(opt, st.lr, state.step, st)
        gen = step_generator(cfg.seed, "ode_init", state.step, dist.rank)

        def micro(gen: torch.Generator = gen) -> tuple[Tensor, dict[str, Metric]]:
            idx = torch.randint(n, (st.batch_size,), generator=gen)
            traj = {k: pairs[k][idx] for k in ("noisy", "timesteps", "x0")}
            with autocast(cfg, dist.device):
                loss, metrics = ode_regression_loss(ddp, traj, pairs["cond"][idx], cfg.stream, generator=gen)
            return loss, {"loss_ode": metrics["ode_loss"]}

        metrics = accumulate(ddp, [micro for _ in range(st.grad_accum)])
        if (norm := optimizer_step(opt, student.parameters(), st.grad_clip)) is not None:
            metrics["grad_norm"] = norm
        state.step += 1
        ema.update(student, state.step)
        state.tensors["ema"] = ema.shadow
        run.log_step(state, metrics)
        if st.sample_every and state.step % st.sample_every == 0 and vae is not None:
            sample_student(cfg, _ema_copy(cfg, student, ema), prompts, vae,
                           run.samples_dir / f"sample-{state.step:06d}.mp4")
        run.maybe_checkpoint(state, force=state.step == st.steps)
    run.finish()
    if dist.is_main:
        final = _ema_copy(cfg, student, ema)
        save_dit(run.final_dir, final.state_dict(), cfg.dit)
        sample_student(cfg, final, prompts, vae, run.samples_dir / "sample-final.mp4")
    run.mark_done({"steps": state.step})


def _ema_copy(cfg: TrainConfig, model: WanDiT, ema: EMA) -> WanDiT:
    copy = WanDiT(cfg.dit).to(next(model.parameters()).device)
    copy.load_state_dict(model.state_dict())
    ema.copy_to(copy)
    return copy.eval()


def load_student(cfg: TrainConfig, stage: str, device: torch.device) -> WanDiT:
    return load_dit(Path(cfg.run_dir) / stage / "final", device, what=f"{stage} student")


@torch.no_grad()
def sample_student(cfg: TrainConfig, student: WanDiT, prompts: PromptTable, vae: WanVAE, path: Path,
                   num_frames: int | None = None, *, captions: list[str] | None = None,
                   first_frame: Tensor | None = None) -> None:
    """Stream three captions (or ``captions``) with the KV cache exactly as inference does, decode
    to an MP4 of ``num_frames`` latent frames. ``first_frame`` [B, 1, C, h, w] (image-to-video, one
    per caption): the given frame 0 the streams continue (``num_frames`` counts it)."""
    if captions is None:
        n = len(prompts.captions)
        captions = [prompts.captions[i] for i in (1, n // 3 + 6, 2 * n // 3 + 11)]
    frames = num_frames or latent_frames(cfg, cfg.teacher.num_frames)
    given = 0 if first_frame is None else 1
    gen = step_generator(cfg.seed, "student-sample")
    noise = torch.randn((len(captions), frames - given, cfg.dit.in_dim, cfg.stream.latent_height,
                         cfg.stream.latent_width), generator=gen).to(vae.latents_mean.device)
    was_training = student.training
    student.eval()
    cross = student.encode_context(prompts.lookup(captions))
    x0 = rollout(student, cross, noise, cfg.stream, mode="self_forcing", exit_step=cfg.stream.num_steps - 1,
                 generator=gen, first_frame=first_frame)
    student.train(was_training)
    decode_to_mp4(vae, x0, path, cfg.data.fps)
    log.info("student sample %s (%s)", path, "; ".join(captions))


