"""Stage ``self_forcing``: the student trained on its own autoregressive rollouts (data-free).

Per generator update (one ``step``):

1. captions drawn from the shapes prompt set, noise for ``num_latent_frames`` frames;
2. one exit step drawn and broadcast from rank 0 (``draw_exit_step``), shared by every chunk;
3. the rollout (``training.algorithms.rollout``) runs the student chunk by chunk with the KV cache
   through ``sf_sdk.sampling.denoise_chunk`` exactly as inference does, the exit step with
   autograd, the cache pass without; ``rollout_mode`` switches to teacher / diffusion forcing;
4. the DMD (or SiD) generator loss on the rollout (teacher = real score with CFG, critic = fake
   score), optionally plus the GAN loss; EMA of the generator;
5. ``dfake_gen_update_ratio`` critic updates, each on a fresh no-grad rollout.

With ``long_rollout = K > 1`` (Self-Forcing++, LongLive) each rollout runs up to ``K`` times the
training length through the stream's rolling window and steps 4-5 see one random window of
``num_latent_frames`` of it (the teacher and the critic score a window as a clip): the student
learns what its own long videos look like at the frames where they go wrong, while the frames
before the window run without gradients, so the cost grows only by their forward passes.

The student is called through ``forward_chunk`` (not ``forward``), so it is never DDP-wrapped:
gradients of the student and the critic are all-reduced explicitly (:func:`sync_gradients`)
after the accumulated backward passes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as torch_dist
from safetensors import safe_open
from torch import Tensor, nn

from sf_sdk.models.dit import WanDiT
from sf_sdk.sampling import ChunkSchedule
from training.algorithms import (
    DMD,
    EMA,
    DiscriminatorHead,
    DMDConfig,
    GANConfig,
    RelativisticGAN,
    SiD,
    SiDConfig,
    draw_exit_step,
    rollout,
)
from training.stages.common import prompt_table, save_dit
from training.stages.ode_init import _ema_copy, load_student, sample_student
from training.stages.teacher import load_teacher
from training.stages.vae import load_trained_vae
from training.utils.checkpoint import TrainState
from training.utils.config import TrainConfig
from training.utils.dist import DistInfo
from training.utils.loop import (
    Metric,
    StageRun,
    autocast,
    make_optimizer,
    optimizer_step,
    set_lr,
    step_generator,
)

__all__ = ["run_self_forcing", "sync_gradients"]

log = logging.getLogger(__name__)


def sync_gradients(*modules: nn.Module) -> None:
    """Average the gradients of ``modules`` over ranks (no-op in a single process)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return
    world = torch_dist.get_world_size()
    for module in modules:
        for p in module.parameters():
            if p.grad is not None:
                torch_dist.all_reduce(p.grad)
                p.grad /= world


def _detached(metrics: dict[str, Metric]) -> dict[str, Metric]:
    return {k: v.detach() if isinstance(v, Tensor) else v for k, v in metrics.items()}


def run_self_forcing(cfg: TrainConfig, dist: DistInfo) -> None:
    st = cfg.self_forcing
    run = StageRun(cfg, "self_forcing", st, dist)
    if run.done:
        log.info("stage self_forcing already done (%s)", run.final_dir)
        return
    if st.num_latent_frames % cfg.stream.num_frame_per_block:
        raise ValueError(f"self_forcing.num_latent_frames ({st.num_latent_frames}) must be a multiple of "
                         f"stream.num_frame_per_block ({cfg.stream.num_frame_per_block})")
    prompts = prompt_table(cfg, dist.device)
    teacher = load_teacher(cfg, dist.device)
    student = load_student(cfg, "ode_init", dist.device).train()
    student.gradient_checkpointing = cfg.gradient_checkpointing
    critic = WanDiT(cfg.dit).to(dist.device)
    critic.load_state_dict(teacher.state_dict())
    critic.gradient_checkpointing = cfg.gradient_checkpointing
    schedule = ChunkSchedule.from_config(cfg.stream).schedule
    if st.loss == "dmd":
        loss_fn: DMD | SiD = DMD(teacher, critic, schedule, DMDConfig(
            guidance_scale=st.guidance - 1.0, min_step=st.min_step_fraction, max_step=st.max_step_fraction))
    else:
        loss_fn = SiD(teacher, critic, schedule, SiDConfig(
            guidance_scale=st.guidance - 1.0, min_step=st.min_step_fraction, max_step=st.max_step_fraction))
    critic_params = list(critic.parameters())
    gan = None
    modules: dict[str, nn.Module] = {"generator": student, "critic": critic}
    if st.gan_weight > 0:
        head = DiscriminatorHead.for_critic(cfg.dit).to(dist.device)
        gan = RelativisticGAN(critic, head, schedule, GANConfig(generator_weight=st.gan_weight,
                                                                discriminator_weight=st.gan_weight))
        critic_params += list(head.parameters())
        modules["disc_head"] = head
    opt_g = make_optimizer(student.parameters(), st)
    opt_c = make_optimizer(critic_params, st, lr=st.critic_lr)
    ema = EMA(student, decay=st.ema_decay, start_step=0)
    state = TrainState(modules=modules, optimizers={"generator": opt_g, "critic": opt_c},
                       tensors={"ema": ema.state_dict()})
    run.resume(state)
    ema.load_state_dict(state.tensors["ema"])
    real = _real_latents(cfg) if (gan is not None or st.rollout_mode != "self_forcing") else None
    vae = load_trained_vae(cfg.run_dir, dist.device) if dist.is_main else None
    frames, k = st.num_latent_frames, cfg.stream.num_frame_per_block
    n_caps = len(prompts.captions)

    def window_start(gen: torch.Generator) -> int:
        """Where this rollout's loss window starts (latent frames): a random chunk of the long
        rollout (0 without ``long_rollout``, and then nothing is drawn)."""
        if st.long_rollout == 1:
            return 0
        return int(torch.randint((st.long_rollout - 1) * frames // k + 1, (1,), generator=gen)) * k

    def draw(gen: torch.Generator, length: int) -> tuple[Tensor, Tensor, Tensor | None]:
        idx = torch.randint(n_caps, (st.batch_size,), generator=gen)
        shape = (st.batch_size, length, cfg.dit.in_dim, cfg.stream.latent_height, cfg.stream.latent_width)
        noise = torch.randn(shape, generator=gen).to(dist.device)
        clean = None
        if real is not None:
            clean = real[torch.randint(real.shape[0], (st.batch_size,), generator=gen)].to(dist.device)
            clean = clean[:, :frames]
        return prompts.cond[idx], noise, clean

    def roll(cond: Tensor, noise: Tensor, clean: Tensor | None, start: int, exit_step: int,
             gen: torch.Generator) -> Tensor:
        """The x0 of the loss window ``[start, start + frames)`` of a rollout over ``noise``; the
        frames before it run without gradients (gradient truncation keeps the cost bounded)."""
        x0 = rollout(student, student.encode_context(cond), noise, cfg.stream, mode=st.rollout_mode,
                     exit_step=exit_step, generator=gen, clean_latents=clean,
                     grad_frames=frames if start else None)
        return x0[:, start:]

    while state.step < st.steps:
        set_lr(opt_g, st.lr, state.step, st)
        set_lr(opt_c, st.critic_lr, state.step, st)
        gen = step_generator(cfg.seed, "self_forcing", state.step, dist.rank)
        exit_step = draw_exit_step(cfg.stream.num_steps, gen)
        metrics: dict[str, Metric] = {"exit_step": float(exit_step)}

        # ---- generator update
        for _ in range(st.grad_accum):
            start = window_start(gen)
            metrics["window_start"] = float(start)
            cond, noise, clean = draw(gen, start + frames)
            with autocast(cfg, dist.device):
                x0 = roll(cond, noise, clean, start, exit_step, gen)
                loss, m = loss_fn.generator_loss(x0, cond, prompts.uncond, generator=gen)
                if gan is not None:
                    g_loss, gm = gan.generator_loss(x0, clean, cond, generator=gen)
                    loss = loss + g_loss
                    m.update(gm)
            (loss / st.grad_accum).backward()
        sync_gradients(student)
        if (norm := optimizer_step(opt_g, student.parameters(), st.grad_clip)) is not None:
            metrics["grad_norm_generator"] = norm
        ema.update(student, state.step + 1)
        metrics["loss_generator"] = loss.detach()
        metrics.update({k: v for k, v in _detached(m).items() if not k.endswith("_loss")})

        # ---- critic updates on fresh rollouts
        for _ in range(st.dfake_gen_update_ratio):
            for _ in range(st.grad_accum):
                start = window_start(gen)
                cond, noise, clean = draw(gen, start + frames)
                with torch.no_grad(), autocast(cfg, dist.device):
                    x0 = roll(cond, noise, clean, start, draw_exit_step(cfg.stream.num_steps, gen), gen)
                with autocast(cfg, dist.device):
                    c_loss, cm = loss_fn.critic_loss(x0, cond, generator=gen)
                    if gan is not None:
                        d_loss, dm = gan.critic_loss(x0, clean, cond, generator=gen)
                        c_loss = c_loss + d_loss
                        cm.update(dm)
                (c_loss / st.grad_accum).backward()
            sync_gradients(*[modules[k] for k in modules if k != "generator"])
            optimizer_step(opt_c, critic_params, st.grad_clip)
        metrics["loss_critic"] = c_loss.detach()

        state.step += 1
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
        sample_student(cfg, final, prompts, vae, run.samples_dir / "sample-final-long.mp4",
                       num_frames=4 * st.num_latent_frames)
    run.mark_done({"steps": state.step})


def _real_latents(cfg: TrainConfig) -> Tensor:
    """Clean latents for the GAN and the forcing modes: the teacher's VAE-encoded latent cache."""
    folder = Path(cfg.run_dir) / "teacher" / "latents"
    tensors = []
    for path in sorted(folder.glob("shard-*.safetensors")):
        with safe_open(str(path), "pt") as f:
            tensors.append(f.get_tensor("latents"))
    if not tensors:
        raise ValueError(f"{folder} holds no latents: run the teacher stage first")
    return torch.cat(tensors)  # [N, F, C, h, w]
