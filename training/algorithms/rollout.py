"""The Self-Forcing rollout: the student generates a clip chunk by chunk, exactly as at inference.

Every chunk is denoised by :func:`sf_sdk.sampling.denoise_chunk`, the function
:class:`sf_sdk.StreamingGenerator` runs, against a fresh KV cache from
``student.new_cache(stream, B, num_frames=F)``. Training differs from inference only by:

* **stochastic gradient truncation**: one exit step ``s`` per iteration (:func:`draw_exit_step`,
  identical on every rank), the same for all chunks (official ``same_step_across_blocks``);
  each chunk is denoised up to step ``s`` and only that step's model call runs with autograd
  (``denoise_chunk(..., exit_step=s, grad_at_exit=True)``); the cache pass never carries
  gradients;
* optionally only the last ``grad_frames`` frames get gradients (official
  ``start_gradient_frame_index = F - num_training_frames``): earlier chunks run entirely under
  ``no_grad``.

The rollout mode decides what fills each chunk's cache slots once it is denoised (the ablation of
the paper, Table 3):

* ``self_forcing`` — the chunk's own clean prediction (the cache pass of ``denoise_chunk``);
* ``teacher_forcing`` — the ground-truth clean latents of the chunk (at timestep
  ``stream.context_noise``, like the inference cache pass);
* ``diffusion_forcing`` — the ground truth noised to a random timestep per sample and chunk,
  drawn uniformly from the schedule's table.

The two forcing modes need ``clean_latents`` [B, F, C, H, W]. In the data-free DMD / SiD setting
there is no data: use the teacher's ODE samples (``training.algorithms.ode``, the ``x0`` of a
trajectory computed for the same prompt) and start the rollout from that trajectory's noise (what
the ``self_forcing`` stage does): the first chunk, which no context conditions, then lands near the
trajectory's first chunk, and the context after it continues the same video. Ground truth
unrelated to ``noise`` (a clip of the domain) makes the rolled-out video jump at the first chunk's
end.

Image-to-video (``first_frame``): a given clean latent frame is written to the cache first, by the
cache pass alone (no gradients), exactly as :class:`sf_sdk.StreamingGenerator` writes ``image=`` in
the ``independent_first_frame`` layout; the chunks of ``noise`` then start at latent frame 1 and
the result is the whole clip, the given frame first (detached: it is data, never the student's).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from sf_sdk.attention import get_backend, set_backend
from sf_sdk.cache import KVCache
from sf_sdk.config import StreamingConfig
from sf_sdk.models.dit import CrossAttnCache
from sf_sdk.sampling import ChunkModel, ChunkSchedule, cache_pass, denoise_chunk

__all__ = ["ROLLOUT_MODES", "draw_exit_step", "rollout"]

ROLLOUT_MODES = ("self_forcing", "teacher_forcing", "diffusion_forcing")


def _comm_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where a collective's tensor must live: CUDA for NCCL, the CPU otherwise (gloo)."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def draw_exit_step(
    num_steps: int,
    generator: torch.Generator | None = None,
    *,
    last_step_only: bool = False,
    group: dist.ProcessGroup | None = None,
) -> int:
    """The exit step of this iteration, uniform in ``[0, num_steps)``, identical on every rank.

    Every rank draws from its own ``generator`` (so every rank's random stream advances the same
    way), then rank 0's value is broadcast when :mod:`torch.distributed` is initialised.
    ``last_step_only`` always returns ``num_steps - 1`` (official option of that name).
    """
    if num_steps <= 0:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    gen_device = generator.device if generator is not None else "cpu"
    value = torch.randint(num_steps, (1,), generator=generator, device=gen_device)
    if last_step_only:
        value.fill_(num_steps - 1)
    if dist.is_available() and dist.is_initialized():
        shared = value.to(_comm_device(group))
        dist.broadcast(shared, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        value = shared.cpu()
    return int(value)


def _check_inputs(noise: Tensor, cross: CrossAttnCache, stream: StreamingConfig, mode: str,
                  clean_latents: Tensor | None, grad_frames: int | None, first_frame: Tensor | None) -> None:
    if mode not in ROLLOUT_MODES:
        raise ValueError(f"rollout mode must be one of {ROLLOUT_MODES}, got {mode!r}")
    if noise.dim() != 5:
        raise ValueError(f"noise must be [B, F, C, H, W], got shape {tuple(noise.shape)}")
    b, f = noise.shape[:2]
    k = stream.num_frame_per_block
    if f % k:
        after = " after the given first frame" if first_frame is not None else ""
        raise ValueError(f"{f} latent frames{after} do not split into chunks of num_frame_per_block={k}: "
                         f"use a multiple of {k}")
    if first_frame is not None:
        want = (b, 1, *noise.shape[2:])
        if tuple(first_frame.shape) != want:
            raise ValueError(f"first_frame must be one clean latent frame per row, {want}, got "
                             f"{tuple(first_frame.shape)}")
        if mode != "self_forcing":
            raise ValueError(f"a rollout from a given first frame runs in mode 'self_forcing', got {mode!r}: "
                             f"the forcing modes fill every chunk's cache from ground truth")
    if cross.batch_size != b:
        raise ValueError(f"the prompt cache has batch {cross.batch_size}, the noise has batch {b}")
    if stream.denoise_window > 1:
        raise ValueError(f"the rollout denoises chunk by chunk; stream.denoise_window={stream.denoise_window} (Rolling "
                         f"Forcing's joint window) is an inference option here: train with denoise_window=1")
    if mode != "self_forcing":
        if clean_latents is None:
            raise ValueError(f"rollout mode {mode!r} fills the cache from ground truth: pass clean_latents "
                             f"(VAE-encoded data, or the teacher's ODE samples when training data-free)")
        if clean_latents.shape != noise.shape:
            raise ValueError(f"clean_latents {tuple(clean_latents.shape)} must have the noise's shape "
                             f"{tuple(noise.shape)}")
    if grad_frames is not None and not 0 <= grad_frames <= f:
        raise ValueError(f"grad_frames must lie in [0, {f}] (frames from the end that get gradients), "
                         f"got {grad_frames}")


def _exit_steps(exit_step: int | Sequence[int], num_chunks: int, num_steps: int) -> list[int]:
    steps = [exit_step] * num_chunks if isinstance(exit_step, int) else [int(s) for s in exit_step]
    if len(steps) != num_chunks:
        raise ValueError(f"exit_step needs one value per chunk ({num_chunks}), got {len(steps)}")
    bad = [s for s in steps if not 0 <= s < num_steps]
    if bad:
        raise ValueError(f"exit steps must lie in [0, {num_steps}), got {bad}")
    return steps


@contextlib.contextmanager
def _differentiable_attention(needed: bool) -> Iterator[None]:
    """Use the reference (SDPA) cache attention while gradients are needed.

    The compiled ``sf_sdk::cache_attention`` kernels have no autograd formula: under the
    ``"auto"`` / ``"kernel"`` backends a differentiable chunk call would silently give the
    self-attention no gradient. Until :func:`sf_sdk.attention.cache_attention` picks the
    reference by itself when autograd needs it, the rollout switches the backend for its duration.
    """
    previous = get_backend()
    if not needed or previous == "reference":
        yield
        return
    set_backend("reference")
    try:
        yield
    finally:
        set_backend(previous)


@torch.no_grad()
def _write_ground_truth(student: ChunkModel, clean: Tensor, cross: CrossAttnCache, cache: KVCache,
                        start: int, steps: ChunkSchedule, mode: str,
                        generator: torch.Generator | None) -> None:
    """The cache pass of teacher / diffusion forcing: the chunk's slots get ground-truth K/V."""
    if mode == "teacher_forcing":  # the inference cache pass, on the ground truth
        cache_pass(student, clean, cross, cache, start, steps, generator=generator)
        return
    # diffusion_forcing: one random table timestep per sample for the whole chunk
    b, f = clean.shape[:2]
    sched = steps.schedule
    gen_device = generator.device if generator is not None else clean.device
    index = torch.randint(sched.num_train_timesteps, (b, 1), generator=generator, device=gen_device)
    t = sched.timesteps.to(gen_device)[index].to(clean.device, clean.dtype).expand(b, f)  # [B, F]
    fresh = torch.randn(clean.shape, generator=generator, device=gen_device, dtype=clean.dtype)
    context = sched.add_noise(clean, fresh.to(clean.device), t)
    student.forward_chunk(context, t, cross, cache, start)


def rollout(
    student: ChunkModel,
    cross: CrossAttnCache,
    noise: Tensor,
    stream: StreamingConfig,
    *,
    mode: str,
    exit_step: int | Sequence[int],
    generator: torch.Generator | None,
    clean_latents: Tensor | None = None,
    grad_frames: int | None = None,
    cache: KVCache | None = None,
    first_frame: Tensor | None = None,
) -> Tensor:
    """Roll ``student`` out over ``noise`` [B, F, C, H, W]; returns the x0 of every chunk, [B, F, C, H, W]
    (with ``first_frame``: the given frame, then the chunks, [B, 1 + F, C, H, W]).

    student: a causal :class:`~sf_sdk.models.dit.WanDiT` (the module itself, not a DDP / FSDP
        wrapper: ``forward_chunk`` and ``new_cache`` are called directly);
    cross: the prompt's cross-attention cache, ``student.encode_context(cond)``, computed with
        autograd on so that the text / cross-attention weights get gradients too;
    stream: chunk size, denoising steps (warped like inference), window (``local_attn_size``:
        train with the window used for long videos) and ``context_noise``;
    mode: ``"self_forcing"``, ``"teacher_forcing"`` or ``"diffusion_forcing"`` (module docstring);
    exit_step: the step (index into the step list) whose call runs with gradients and whose x0
        is returned; one int for all chunks (``same_step_across_blocks``; draw it with
        :func:`draw_exit_step`) or one per chunk;
    generator: the source of every random draw (re-noising between steps, context noise);
    clean_latents: ground truth for the forcing modes;
    grad_frames: only the last ``grad_frames`` frames get gradients (None: all; chunks that
        start before ``F - grad_frames`` run without autograd);
    cache: a KV cache to reuse (it is reset); by default a new one sized for the clip's frames;
    first_frame: image-to-video, a clean normalized latent frame [B, 1, C, H, W] (the image): the
        cache pass writes it as frame 0 (no gradients, re-noised to ``context_noise`` like every
        cache pass), the chunks of ``noise`` follow from frame 1 (``independent_first_frame``
        layout) and the result starts with it, detached. ``mode`` must be ``"self_forcing"``.

    With autograd disabled, or ``grad_frames=0``, this is exactly the inference loop. With
    autograd on, cache attention runs on the differentiable reference implementation (see
    :func:`_differentiable_attention`).
    """
    _check_inputs(noise, cross, stream, mode, clean_latents, grad_frames, first_frame)
    b, f = noise.shape[:2]
    k = stream.num_frame_per_block
    given = 0 if first_frame is None else 1  # latent frames before the first chunk
    end = given + f
    steps = ChunkSchedule.from_config(stream)
    exits = _exit_steps(exit_step, f // k, len(steps.timesteps))
    if cache is None:
        cache = student.new_cache(stream, b, num_frames=end)
    else:
        cache.reset()
    grad_start = given if grad_frames is None else end - grad_frames  # first latent frame with gradients
    own_cache_pass = mode == "self_forcing"
    chunks = []
    with _differentiable_attention(torch.is_grad_enabled() and grad_start < end):
        if first_frame is not None:  # the image: the cache pass alone, as inference writes it
            cache_pass(student, first_frame, cross, cache, 0, steps, generator=generator)
            chunks.append(first_frame.detach())
        for c, start in enumerate(range(given, end, k)):
            x0 = denoise_chunk(student, noise[:, start - given:start - given + k], cross, cache, start, steps,
                               generator=generator, exit_step=exits[c], grad_at_exit=start >= grad_start,
                               update_cache=own_cache_pass)
            if not own_cache_pass:
                _write_ground_truth(student, clean_latents[:, start:start + k], cross, cache, start, steps,
                                    mode, generator)
            chunks.append(x0)
    return torch.cat(chunks, dim=1)  # [B, given + F, C, H, W]
