"""Stage ``self_forcing``: the student trained on its own autoregressive rollouts (data-free).

Per generator update (one ``step``):

1. captions drawn from the shapes prompt set, noise for ``num_latent_frames`` frames. Teacher and
   diffusion forcing instead draw one of the ``ode_init`` stage's teacher trajectories: its
   caption is the prompt, its starting noise the rollout's noise and its end (``x0``) the ground
   truth of the context, so the student's own first chunk (which no context conditions) and the
   ground truth after it belong to one video (an unrelated clip's context makes the first chunk
   contradict the rest, and the students learn to leave it black). The GAN's real side (without a
   forcing mode) draws clips of the teacher's latent cache with their own captions as the prompts;
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
``long_rollout_plain`` keeps a share of the rollouts at the training length (window at frame 0),
the short-window loss beside the long one.

With ``image_conditioning`` (the image-to-video fine-tune) step 1 draws clips of the teacher's
latent cache instead: a clip's latent frame 0 is the given image and its caption the prompt. The
rollout writes that frame to the KV cache by a cache pass, as inference does with ``image=``, and
the student generates the ``num_latent_frames - 1`` frames after it in chunks (the stream's
``independent_first_frame`` layout); steps 4-5 score the whole clip, given frame included, so the
teacher judges the continuation against it, while the gradient reaches the generated frames only
(frame 0 is data: detached, and masked out of the generator loss).

The student is called through ``forward_chunk`` (not ``forward``), so it is never DDP-wrapped:
gradients of the student and the critic are all-reduced explicitly (:func:`sync_gradients`)
after the accumulated backward passes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
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
from training.stages.common import PromptTable, prompt_table, save_dit
from training.stages.ode_init import _ema_copy, load_student, read_pairs, sample_student
from training.stages.teacher import LatentCache, load_latent_cache, load_teacher
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

__all__ = ["run_self_forcing", "sync_gradients", "check_rollout_frames"]

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


def check_rollout_frames(cfg: TrainConfig) -> None:
    """The loss window's ``num_latent_frames`` must be whole chunks of the rollout's layout: chunks
    of ``num_frame_per_block``, or with ``image_conditioning`` the given frame 0 alone, then chunks;
    an image-conditioned model must also stream frame 0 alone after export."""
    st, k = cfg.self_forcing, cfg.stream.num_frame_per_block
    if not st.image_conditioning:
        if st.num_latent_frames % k:
            raise ValueError(f"self_forcing.num_latent_frames ({st.num_latent_frames}) must be a multiple of "
                             f"stream.num_frame_per_block ({k})")
        return
    if cfg.stream.first_chunk_frames != 1:
        raise ValueError(f"self_forcing.image_conditioning streams the image as frame 0 alone: set "
                         f"stream.independent_first_frame=true (chunks of {k} after it), so that the exported "
                         f"model streams image= in the layout it was trained in")
    if st.num_latent_frames < 1 + k or (st.num_latent_frames - 1) % k:
        near = 1 + k * max(1, round((st.num_latent_frames - 1) / k))
        raise ValueError(f"self_forcing.image_conditioning generates num_latent_frames - 1 frames after the given "
                         f"one in chunks of stream.num_frame_per_block ({k}): num_latent_frames must be 1 + a "
                         f"positive multiple of {k}, got {st.num_latent_frames} (e.g. {near})")


@dataclass
class _Draw:
    """What one rollout starts from: prompts [B, text_len, text_dim], noise [B, F, C, h, w] for the
    frames the student generates, ground truth for the GAN / forcing modes [B, frames, C, h, w]
    (or None), and with image conditioning the given frame 0 [B, 1, C, h, w] (else None)."""

    cond: Tensor
    noise: Tensor
    clean: Tensor | None
    first_frame: Tensor | None


def _caption_index(captions: list[str], prompts: PromptTable, what: str, stage: str) -> Tensor:
    """The index of each caption in the prompt table [N] (a clear error for captions outside it)."""
    known = {c: i for i, c in enumerate(prompts.captions)}
    unknown = sorted({c for c in captions if c not in known})
    if unknown:
        raise ValueError(f"{what} has captions outside the prompt set, e.g. {unknown[:3]}: it was built for another "
                         f"domain; rebuild it with {stage}")
    return torch.tensor([known[c] for c in captions])


class _ImageClips:
    """Ground-truth clips (an image-conditioned rollout's first frames, a forcing mode's context, the
    GAN's real side): the teacher's latent cache, each clip with the index of its caption in the
    prompt table (the cache stores every clip's caption)."""

    def __init__(self, cache: LatentCache, prompts: PromptTable, keep_frames: int) -> None:
        self.caption_index = _caption_index(cache.captions, prompts, "the latent cache", "the teacher stage")  # [N]
        self.latents = cache.latents[:, :keep_frames].clone()  # [N, keep_frames, C, h, w]
        self.captions = cache.captions

    def __len__(self) -> int:
        return self.latents.shape[0]

    def samples(self, count: int = 3) -> list[int]:
        """Fixed clips for the stage's sample videos, spread over the cache."""
        return [i * len(self) // count for i in range(count)]


def _trained_critic(source: str, device: torch.device) -> dict[str, torch.Tensor]:
    """The critic weights of a self_forcing checkpoint (``source``: the file, or a stage folder whose
    newest checkpoint is taken), for ``self_forcing.init_critic``."""
    from training.utils.checkpoint import module_state

    try:
        state, path = module_state(source, "critic", device=str(device))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"self_forcing.init_critic={source!r}: {exc}; name a self_forcing stage folder or "
                                f"one of its checkpoint files") from None
    except ValueError as exc:
        raise ValueError(f"self_forcing.init_critic={source!r}: {exc}: it is not a self_forcing checkpoint") from None
    log.info("self_forcing: the critic starts from %s", path)
    return state


def run_self_forcing(cfg: TrainConfig, dist: DistInfo) -> None:
    st = cfg.self_forcing
    run = StageRun(cfg, "self_forcing", st, dist)
    if run.done:
        log.info("stage self_forcing already done (%s)", run.final_dir)
        return
    check_rollout_frames(cfg)
    prompts = prompt_table(cfg, dist.device)
    teacher = load_teacher(cfg, dist.device)
    student = load_student(cfg, "ode_init", dist.device).train()
    student.gradient_checkpointing = cfg.gradient_checkpointing
    critic = WanDiT(cfg.dit).to(dist.device)
    critic.load_state_dict(teacher.state_dict() if not st.init_critic else _trained_critic(st.init_critic, dist.device))
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
    frames, k = st.num_latent_frames, cfg.stream.num_frame_per_block
    # Ground truth comes with its prompt (step 1 of the module docstring): a forcing mode's
    # context is a teacher trajectory's end, started from the rollout's own noise; the GAN's real
    # clips show what their captions say.
    real = images = pairs = None
    if st.image_conditioning:  # frame 0 of each clip, the whole clip for the GAN's real side
        keep = frames if gan is not None else 1
        images = _ImageClips(_real_clips(cfg, keep), prompts, keep)
    elif st.rollout_mode != "self_forcing":
        pairs = _OdePairs.load(Path(cfg.run_dir) / "ode_init" / "pairs", prompts, frames, cfg)
    elif gan is not None:
        real = _ImageClips(_real_clips(cfg, frames), prompts, frames)  # [N, frames, C, h, w] + captions
    opt_g = make_optimizer(student.parameters(), st)
    opt_c = make_optimizer(critic_params, st, lr=st.critic_lr)
    ema = EMA(student, decay=st.ema_decay, start_step=0)
    state = TrainState(modules=modules, optimizers={"generator": opt_g, "critic": opt_c},
                       tensors={"ema": ema.state_dict()})
    run.resume(state)
    ema.load_state_dict(state.tensors["ema"])
    vae = load_trained_vae(cfg.run_dir, dist.device) if dist.is_main else None
    n_caps = len(prompts.captions)
    # The generator loss skips the given frame: it is data, not the student's (official I2V mask).
    gen_mask = None
    if images is not None:
        gen_mask = torch.ones((1, frames, 1, 1, 1), dtype=torch.bool, device=dist.device)  # [1, F, 1, 1, 1]
        gen_mask[:, 0] = False

    def window_start(gen: torch.Generator) -> int:
        """Where this rollout's loss window starts (latent frames): a random chunk of the long
        rollout, or 0 for the ``long_rollout_plain`` share of rollouts (0 without ``long_rollout``,
        and then nothing is drawn; nor is the share's draw without a share)."""
        if st.long_rollout == 1:
            return 0
        if st.long_rollout_plain > 0 and float(torch.rand((), generator=gen)) < st.long_rollout_plain:
            return 0
        return int(torch.randint((st.long_rollout - 1) * frames // k + 1, (1,), generator=gen)) * k

    def draw(gen: torch.Generator, length: int) -> _Draw:
        """Prompts and noise for a rollout of ``length`` latent frames (all from ``gen``)."""
        latent = (cfg.dit.in_dim, cfg.stream.latent_height, cfg.stream.latent_width)
        if images is not None:  # a cached clip: its frame 0 is given, its caption the prompt
            idx = torch.randint(len(images), (st.batch_size,), generator=gen)
            noise = torch.randn((st.batch_size, length - 1, *latent), generator=gen).to(dist.device)
            clip = images.latents[idx].to(dist.device)  # [B, frames or 1, C, h, w]
            return _Draw(prompts.cond[images.caption_index[idx]], noise, clip if gan is not None else None,
                         clip[:, :1])
        if pairs is not None:  # teacher trajectories: their caption, starting noise and end
            idx = torch.randint(len(pairs), (st.batch_size,), generator=gen)
            return _Draw(prompts.cond[pairs.caption_index[idx]], pairs.noise[idx].to(dist.device),
                         pairs.x0[idx].to(dist.device), None)
        if real is not None:  # cached clips, their captions the prompts
            idx = torch.randint(len(real), (st.batch_size,), generator=gen)
            noise = torch.randn((st.batch_size, length, *latent), generator=gen).to(dist.device)
            return _Draw(prompts.cond[real.caption_index[idx]], noise, real.latents[idx].to(dist.device), None)
        idx = torch.randint(n_caps, (st.batch_size,), generator=gen)
        noise = torch.randn((st.batch_size, length, *latent), generator=gen).to(dist.device)
        return _Draw(prompts.cond[idx], noise, None, None)

    def roll(d: _Draw, start: int, exit_step: int, gen: torch.Generator) -> Tensor:
        """The x0 of the loss window ``[start, start + frames)`` of a rollout over ``d.noise`` (after
        the given frame, which the window starts with); the frames before the window run without
        gradients (gradient truncation keeps the cost bounded)."""
        x0 = rollout(student, student.encode_context(d.cond), d.noise, cfg.stream, mode=st.rollout_mode,
                     exit_step=exit_step, generator=gen, clean_latents=d.clean,
                     grad_frames=frames if start else None, first_frame=d.first_frame)
        return x0[:, start:]

    def sample(model: WanDiT, name: str, num_frames: int | None = None) -> None:
        """A sample MP4 of ``model`` (text-to-video, or continuing three cached clips' frame 0)."""
        path = run.samples_dir / name
        if images is None:
            sample_student(cfg, model, prompts, vae, path, num_frames=num_frames)
            return
        picks = images.samples()
        first = images.latents[picks, :1].to(dist.device)  # [3, 1, C, h, w]
        sample_student(cfg, model, prompts, vae, path, num_frames=num_frames or frames,
                       captions=[images.captions[i] for i in picks], first_frame=first)

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
            d = draw(gen, start + frames)
            with autocast(cfg, dist.device):
                x0 = roll(d, start, exit_step, gen)
                loss, m = loss_fn.generator_loss(x0, d.cond, prompts.uncond, generator=gen, gradient_mask=gen_mask)
                if gan is not None:
                    g_loss, gm = gan.generator_loss(x0, d.clean, d.cond, generator=gen)
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
                d = draw(gen, start + frames)
                with torch.no_grad(), autocast(cfg, dist.device):
                    x0 = roll(d, start, draw_exit_step(cfg.stream.num_steps, gen), gen)
                with autocast(cfg, dist.device):
                    c_loss, cm = loss_fn.critic_loss(x0, d.cond, generator=gen)
                    if gan is not None:
                        d_loss, dm = gan.critic_loss(x0, d.clean, d.cond, generator=gen)
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
            sample(_ema_copy(cfg, student, ema), f"sample-{state.step:06d}.mp4")
        run.maybe_checkpoint(state, force=state.step == st.steps)
    run.finish()
    if dist.is_main:
        final = _ema_copy(cfg, student, ema)
        save_dit(run.final_dir, final.state_dict(), cfg.dit)
        sample(final, "sample-final.mp4")
        long_frames = 4 * frames if images is None else 1 + 4 * (frames - 1)  # whole chunks of the layout
        sample(final, "sample-final-long.mp4", num_frames=long_frames)
    run.mark_done({"steps": state.step})


@dataclass
class _OdePairs:
    """The ``ode_init`` stage's teacher trajectories as forcing-mode ground truth: each one's
    caption (its index into the prompt table), starting noise [N, frames, C, h, w] (the trajectory
    at timestep ``num_train_timesteps``, sigma 1) and end ``x0`` [N, frames, C, h, w]."""

    caption_index: Tensor
    noise: Tensor
    x0: Tensor

    def __len__(self) -> int:
        return self.x0.shape[0]

    @classmethod
    def load(cls, folder: Path, prompts: PromptTable, frames: int, cfg: TrainConfig) -> _OdePairs:
        pairs, captions = read_pairs(folder)
        if not captions:
            raise ValueError(f"{folder} holds no teacher trajectories: teacher and diffusion forcing take their "
                             f"ground truth from the ode_init stage's pairs; run ode_init first")
        if not torch.all(pairs["timesteps"][:, 0] == cfg.stream.num_train_timesteps):
            raise ValueError(f"{folder}: its trajectories do not start at timestep {cfg.stream.num_train_timesteps} "
                             f"(pure noise); rebuild the pairs")
        if pairs["x0"].shape[1] < frames:
            raise ValueError(f"the teacher trajectories hold {pairs['x0'].shape[1]} latent frames; a forcing mode "
                             f"needs {frames} (self_forcing.num_latent_frames)")
        index = _caption_index(captions, prompts, f"{folder}", "the ode_init stage")
        return cls(index, pairs["noisy"][:, 0, :frames].contiguous(), pairs["x0"][:, :frames].contiguous())


def _real_clips(cfg: TrainConfig, frames: int) -> LatentCache:
    """Clean clips for the GAN, the forcing modes and image conditioning: the teacher's VAE-encoded
    latent cache ``[N, F, C, h, w]`` with each clip's caption; its clips must hold ``frames``."""
    cache = load_latent_cache(Path(cfg.run_dir) / "teacher" / "latents")
    have = cache.latents.shape[1]
    if have < frames:
        raise ValueError(f"the teacher's latent cache holds clips of {have} latent frames; self_forcing needs "
                         f"{frames} of ground truth (num_latent_frames, for the GAN or a forcing mode): lower "
                         f"self_forcing.num_latent_frames or rebuild the cache with a longer teacher.num_frames")
    return cache
