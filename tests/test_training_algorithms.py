"""training.algorithms: the rollout is the inference loop, gradients go where they should, losses
have the official semantics (toy score models with known x0 make them exact)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from dit_util import random_dit

from sf_sdk.attention import get_backend
from sf_sdk.cache import ChunkPlan
from sf_sdk.config import DIT_PRESETS, StreamingConfig
from sf_sdk.models.dit import WanDiT, block_causal_mask
from sf_sdk.sampling import ChunkSchedule, denoise_chunk
from sf_sdk.scheduler import FlowMatchSchedule
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
    drop_prompts,
    flow_matching_loss,
    ode_regression_loss,
    rollout,
    sample_ode_trajectory,
    sample_score_timesteps,
    student_timesteps,
)
from training.algorithms.gan import default_feature_layers

TINY = DIT_PRESETS["tiny"]
H, W = 4, 6  # latent size: a 2 x 3 patch grid, 6 tokens per frame
STREAM = StreamingConfig(latent_height=H, latent_width=W)
WINDOW = StreamingConfig(latent_height=H, latent_width=W, local_attn_size=6)
SCHED = ChunkSchedule.from_config(STREAM).schedule


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int, dtype: torch.dtype = torch.float64) -> WanDiT:
    return random_dit(seed=seed, dtype=dtype, eval_mode=False)


def latents(b: int, f: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(b, f, TINY.in_dim, H, W, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def prompts(b: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(b, 5, TINY.text_dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def frozen_cross(model: WanDiT, ctx: torch.Tensor):
    with torch.no_grad():
        return model.encode_context(ctx)


def grads(model: nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in model.parameters()]


def has_grad(model: nn.Module) -> bool:
    return any(g is not None and g.abs().sum() > 0 for g in grads(model))


def no_grad_at_all(model: nn.Module) -> bool:
    return all(g is None for g in grads(model))


class ToyScore(nn.Module):
    """A 'DiT' whose x0 prediction is known exactly: ``scale * target + mean(context)``.

    It returns the flow whose conversion (with ``schedule``, or ``sigma = t / 1000`` when
    ``schedule`` is None) gives that x0 for any noisy input.
    """

    def __init__(self, target: torch.Tensor, schedule: FlowMatchSchedule | None = SCHED) -> None:
        super().__init__()
        self.target = target
        self.schedule = schedule
        self.scale = nn.Parameter(torch.ones((), dtype=target.dtype))
        self.config = TINY
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def x0(self, context: torch.Tensor) -> torch.Tensor:
        return self.scale * self.target + context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)

    def forward(self, x, timestep, context, *, mask=None, start_frame=0):
        self.calls.append((x.detach(), timestep.detach()))
        x0 = self.x0(context)
        if self.schedule is None:
            return (x - x0) / (timestep / 1000.0).view(*timestep.shape, 1, 1, 1)
        return self.schedule.flow_from_x0(x0, x, timestep)


# --------------------------------------------------------------------------------------------
# Rollout
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [STREAM, WINDOW], ids=["global", "window"])
def test_rollout_equals_inference_loop(stream):
    student = tiny_model(0)
    noise = latents(2, 9, seed=1)
    cross = frozen_cross(student, prompts(2, seed=2))
    steps = ChunkSchedule.from_config(stream)
    last = len(steps.timesteps) - 1

    cache = student.new_cache(stream, 2, num_frames=9)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        ref = torch.cat([denoise_chunk(student, noise[:, s:s + 3], cross, cache, s, steps, generator=gen)
                         for s in range(0, 9, 3)], dim=1)
        out = rollout(student, cross, noise, stream, mode="self_forcing", exit_step=last,
                      generator=torch.Generator().manual_seed(7))
    assert torch.equal(out, ref)
    # with autograd on, the numbers are the same (only the exit call is differentiable)
    with_grad = rollout(student, cross, noise, stream, mode="self_forcing", exit_step=last,
                        generator=torch.Generator().manual_seed(7))
    assert with_grad.requires_grad
    torch.testing.assert_close(with_grad.detach(), ref, rtol=1e-12, atol=1e-12)
    # another seed gives another rollout (the generator drives the re-noising)
    with torch.no_grad():
        other = rollout(student, cross, noise, stream, mode="self_forcing", exit_step=last,
                        generator=torch.Generator().manual_seed(8))
    assert not torch.allclose(other, ref)


def _spy_forward_chunk(model: WanDiT) -> list[tuple[int, float, bool]]:
    """Record (start_frame, timestep, grad enabled) of every real DiT chunk call: forward_chunk and
    write_cache (the cache pass's call)."""
    calls: list[tuple[int, float, bool]] = []

    def spy(real):
        def recorded(x, timestep, cross, cache, start_frame, attend=None):
            start = start_frame.start_frame if isinstance(start_frame, ChunkPlan) else start_frame
            calls.append((start, float(timestep[0, 0]), torch.is_grad_enabled()))
            return real(x, timestep, cross, cache, start_frame, attend)
        return recorded

    model.forward_chunk = spy(model.forward_chunk)
    model.write_cache = spy(model.write_cache)
    return calls


@pytest.mark.parametrize("exit_step", [0, 2])
def test_rollout_gradient_only_through_exit_step(exit_step):
    # float32: the dtype of the compiled cache-attention kernels, which have no autograd formula
    student = tiny_model(0, torch.float32)
    calls = _spy_forward_chunk(student)
    steps = ChunkSchedule.from_config(STREAM)
    cache = student.new_cache(STREAM, 1, num_frames=9)
    cross = student.encode_context(prompts(1, 2, torch.float32))  # with grad: text weights train too
    backend = get_backend()
    out = rollout(student, cross, latents(1, 9, 1, torch.float32), STREAM, mode="self_forcing",
                  exit_step=exit_step, generator=torch.Generator().manual_seed(0), cache=cache)
    assert get_backend() == backend
    for start in (0, 3, 6):
        # the denoising steps up to the exit, then the cache pass (never with grad)
        timesteps = [t for s, t, _ in calls if s == start]
        with_grad = [g for s, _, g in calls if s == start]
        assert timesteps == pytest.approx([*steps.timesteps[:exit_step + 1], steps.context_noise], rel=1e-6)
        assert with_grad == [i == exit_step for i in range(exit_step + 1)] + [False]
    out.square().sum().backward()
    assert student.patch_embedding.weight.grad.abs().sum() > 0
    assert student.text_embedding[0].weight.grad.abs().sum() > 0
    for block in student.blocks:  # the self-attention is differentiable too
        assert block.self_attn.q.weight.grad.abs().sum() > 0
    assert not cache.k.requires_grad and cache.k.grad_fn is None and cache.v.grad_fn is None


def test_rollout_grad_frames_limits_gradient_to_the_last_chunks():
    student = tiny_model(0)
    calls = _spy_forward_chunk(student)
    cross = student.encode_context(prompts(1, seed=2))
    out = rollout(student, cross, latents(1, 9, seed=1), STREAM, mode="self_forcing", exit_step=1,
                  generator=torch.Generator().manual_seed(0), grad_frames=3)
    assert [s for s, _, g in calls if g] == [6]
    out[:, :6].sum().backward(retain_graph=True)  # frames outside the window: no gradient
    assert all(g is None or g.abs().sum() == 0 for g in grads(student))
    out[:, 6:].sum().backward()
    assert has_grad(student)


def test_teacher_forcing_cache_holds_ground_truth():
    student = tiny_model(0)
    noise, clean = latents(1, 9, seed=1), latents(1, 9, seed=3)
    ctx = prompts(1, seed=2)
    with torch.no_grad():
        cross = student.encode_context(ctx)
        kwargs = dict(exit_step=0, generator=torch.Generator().manual_seed(0))
        tf = rollout(student, cross, noise, STREAM, mode="teacher_forcing", clean_latents=clean, **kwargs)
        # independent oracle: the block-causal full-sequence forward over [GT context, noisy chunk]
        t0 = ChunkSchedule.from_config(STREAM).timesteps[0]
        x = torch.cat([clean[:, :6], noise[:, 6:]], dim=1)
        t = torch.tensor([[0.0] * 6 + [t0] * 3], dtype=x.dtype)
        flow = student(x, t, ctx, mask=block_causal_mask(9, 6, STREAM))
        x0_last = SCHED.x0_from_flow(flow[:, 6:], noise[:, 6:], t[:, 6:])
        sf = rollout(student, cross, noise, STREAM, mode="self_forcing", **kwargs)
    torch.testing.assert_close(tf[:, 6:], x0_last, rtol=1e-10, atol=1e-10)
    assert torch.equal(tf[:, :3], sf[:, :3])  # the first chunk has no context
    assert not torch.allclose(tf[:, 3:], sf[:, 3:])


@pytest.mark.parametrize("mode", ["teacher_forcing", "diffusion_forcing"])
def test_forcing_modes_depend_on_ground_truth(mode):
    student = tiny_model(0)
    noise = latents(2, 9, seed=1)
    with torch.no_grad():
        cross = student.encode_context(prompts(2, seed=2))

        def run(clean, mode=mode):
            return rollout(student, cross, noise, WINDOW, mode=mode, exit_step=3, clean_latents=clean,
                           generator=torch.Generator().manual_seed(5))

        a, b = run(latents(2, 9, seed=3)), run(latents(2, 9, seed=4))
        sf = run(None, mode="self_forcing")
    assert torch.equal(a[:, :3], b[:, :3]) and torch.equal(a[:, :3], sf[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])
    assert not torch.allclose(a[:, 3:], sf[:, 3:])
    with pytest.raises(ValueError, match="clean_latents"):
        run(None)


def test_diffusion_forcing_differs_from_teacher_forcing():
    student = tiny_model(0)
    noise, clean = latents(1, 6, seed=1), latents(1, 6, seed=3)
    with torch.no_grad():
        cross = student.encode_context(prompts(1, seed=2))
        out = {m: rollout(student, cross, noise, STREAM, mode=m, exit_step=0, clean_latents=clean,
                          generator=torch.Generator().manual_seed(5))
               for m in ("teacher_forcing", "diffusion_forcing")}
    assert not torch.allclose(out["teacher_forcing"][:, 3:], out["diffusion_forcing"][:, 3:])


def test_rollout_rejects_bad_inputs():
    student = tiny_model(0)
    cross = frozen_cross(student, prompts(1, seed=2))
    with pytest.raises(ValueError, match="mode"):
        rollout(student, cross, latents(1, 6, 1), STREAM, mode="selfforcing", exit_step=0, generator=None)
    with pytest.raises(ValueError, match="num_frame_per_block"):
        rollout(student, cross, latents(1, 5, 1), STREAM, mode="self_forcing", exit_step=0, generator=None)
    with pytest.raises(ValueError, match="exit steps"):
        rollout(student, cross, latents(1, 6, 1), STREAM, mode="self_forcing", exit_step=4, generator=None)


# --------------------------------------------------------------------------------------------
# Exit step across ranks
# --------------------------------------------------------------------------------------------


def _exit_step_worker(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        seed = 1000 + 7919 * rank  # every rank seeds differently
        gen = torch.Generator().manual_seed(seed)
        shared = [draw_exit_step(4, gen) for _ in range(16)]
        local_gen = torch.Generator().manual_seed(seed)
        local = [int(torch.randint(4, (1,), generator=local_gen)) for _ in range(16)]
        torch.save({"shared": shared, "local": local}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_exit_step_is_identical_on_every_rank(tmp_path):
    mp.spawn(_exit_step_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["local"] != r1["local"]  # the ranks' own draws differ...
    assert r0["shared"] == r1["shared"] == r0["local"]  # ...the broadcast makes them rank 0's
    assert set(r0["shared"]) <= {0, 1, 2, 3}


def test_exit_step_single_process():
    gen = torch.Generator().manual_seed(0)
    draws = {draw_exit_step(4, gen) for _ in range(64)}
    assert draws == {0, 1, 2, 3}
    assert draw_exit_step(4, gen, last_step_only=True) == 3
    with pytest.raises(ValueError):
        draw_exit_step(0)


# --------------------------------------------------------------------------------------------
# Flow helpers
# --------------------------------------------------------------------------------------------


def test_score_timesteps_follow_the_official_distribution():
    gen = torch.Generator().manual_seed(0)
    t = sample_score_timesteps(4096, 3, num_train_timesteps=1000, shift=5.0, min_step=0.02, max_step=0.98,
                               generator=gen)
    assert t.shape == (4096, 3) and torch.equal(t[:, :1].expand(-1, 3), t)
    assert t.min() >= 20 and t.max() <= 980
    # shifted: u ~ U[0, 1000) maps to 5u / (1 + 4u) -> median at u = 0.5, i.e. 833.3
    assert abs(float(t[:, 0].median()) - 5 * 0.5 / 3 * 1000) < 15


def test_flow_matching_loss_is_zero_for_the_exact_flow():
    x0, ctx = latents(2, 3, seed=0), prompts(2, seed=1)
    exact = ToyScore(x0 - ctx.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1))
    t = torch.full((2, 3), 400.0, dtype=torch.float64)
    loss, _ = flow_matching_loss(exact, x0, ctx, t, SCHED, generator=torch.Generator().manual_seed(0),
                                 weighted=True)
    assert float(loss) < 1e-20
    wrong = ToyScore(x0 + 1.0)
    loss, _ = flow_matching_loss(wrong, x0, ctx, t, SCHED, generator=torch.Generator().manual_seed(0))
    assert float(loss) > 0.1


def test_drop_prompts():
    cond, uncond = torch.ones(8, 5, 4), torch.zeros(1, 3, 4)
    assert torch.equal(drop_prompts(cond, uncond, 0.0), cond)
    assert torch.equal(drop_prompts(cond, uncond, 1.0), torch.zeros(8, 5, 4))
    mixed = drop_prompts(cond, uncond, 0.5, torch.Generator().manual_seed(0))
    assert 0 < int((mixed.sum(dim=(1, 2)) == 0).sum()) < 8


# --------------------------------------------------------------------------------------------
# DMD / SiD / GAN
# --------------------------------------------------------------------------------------------


def test_dmd_gradient_direction_with_exact_scores():
    b, f = 2, 3
    real_target, x0 = latents(b, f, seed=0), latents(b, f, seed=1)
    cond = torch.full((b, 4, TINY.text_dim), 0.5, dtype=torch.float64)  # mean 0.5
    uncond = torch.zeros(1, 4, TINY.text_dim, dtype=torch.float64)
    g = 3.0
    # official convention: real = cond + g (cond - uncond) = real_target + 0.5 + g * 0.5
    real = real_target + 0.5 * (1 + g)

    def loss_and_grad(critic_target):
        dmd = DMD(ToyScore(real_target), ToyScore(critic_target), SCHED, DMDConfig(guidance_scale=g))
        x = x0.clone().requires_grad_(True)
        loss, metrics = dmd.generator_loss(x, cond, uncond, generator=torch.Generator().manual_seed(0))
        loss.backward()
        return loss, x.grad, metrics

    # critic = the student's own sample: d loss / d x0 = (x0 - real) / mean|x0 - real| / numel
    loss, grad, _ = loss_and_grad(x0 - 0.5)
    norm = (x0 - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(grad, (x0 - real) / norm / x0.numel(), rtol=1e-9, atol=1e-12)
    assert float(loss) > 0
    stepped = x0 - 0.1 * grad / grad.abs().max()
    assert (stepped - real).abs().mean() < (x0 - real).abs().mean()  # descent moves x0 towards real
    # fake score == real score: nothing to learn
    loss, grad, metrics = loss_and_grad(real - 0.5)
    assert float(loss) < 1e-20 and float(grad.abs().max()) < 1e-12
    assert float(metrics["dmd_grad_norm"]) < 1e-12


def test_dmd_student_at_real_x0_gets_zero_gradient():
    real_target = latents(1, 3, seed=0)
    ctx = torch.zeros(1, 4, TINY.text_dim, dtype=torch.float64)
    x = real_target.clone().requires_grad_(True)  # the student outputs the real score's x0
    dmd = DMD(ToyScore(real_target), ToyScore(real_target), SCHED)  # a critic that tracks it
    loss, _ = dmd.generator_loss(x, ctx, ctx, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and float(loss) == 0.0 and float(x.grad.abs().max()) == 0.0


def test_sid_loss_matches_the_official_formula():
    b, f = 2, 3
    real_target, fake_target, x0 = latents(b, f, 0), latents(b, f, 1), latents(b, f, 2)
    ctx = torch.zeros(1, 4, TINY.text_dim, dtype=torch.float64)
    sid = SiD(ToyScore(real_target), ToyScore(fake_target), SCHED, SiDConfig(alpha=1.0, guidance_scale=3.0))
    loss, _ = sid.generator_loss(x0, ctx, ctx, generator=torch.Generator().manual_seed(0))
    norm = (x0 - real_target).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    d = real_target - fake_target
    expected = (d * ((real_target - x0) - d) / norm).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def players():
    student, teacher, critic = tiny_model(0, torch.float32), tiny_model(1, torch.float32), tiny_model(1, torch.float32)
    teacher.requires_grad_(False)
    return student, teacher, critic


def _student_sample(student: WanDiT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cond, uncond = prompts(2, 1, torch.float32), torch.zeros(1, 3, TINY.text_dim)
    cross = student.encode_context(cond)
    x0 = rollout(student, cross, latents(2, 6, 3, torch.float32), STREAM, mode="self_forcing",
                 exit_step=1, generator=torch.Generator().manual_seed(0))
    return x0, cond, uncond


@pytest.mark.parametrize("algo", ["dmd", "sid"])
def test_score_losses_train_the_right_players(players, algo):
    student, teacher, critic = players
    for m in players:
        m.zero_grad(set_to_none=True)
    cls = DMD if algo == "dmd" else SiD
    method = cls(teacher, critic, SCHED)
    x0, cond, uncond = _student_sample(student)
    loss, metrics = method.generator_loss(x0, cond, uncond, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(loss)
    loss.backward()
    assert has_grad(student) and no_grad_at_all(critic) and no_grad_at_all(teacher)
    assert all(p.requires_grad for p in critic.parameters())  # frozen only during the call
    student.zero_grad(set_to_none=True)
    loss, metrics = method.critic_loss(x0, cond, generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(loss) and "critic_loss" in metrics
    loss.backward()
    assert has_grad(critic) and no_grad_at_all(student) and no_grad_at_all(teacher)


def test_gan_losses_train_the_right_players(players):
    student, _, critic = players
    for m in players:
        m.zero_grad(set_to_none=True)
    head = DiscriminatorHead.for_critic(TINY)
    gan = RelativisticGAN(critic, head, SCHED, GANConfig(r1_weight=0.1, r2_weight=0.1))
    x0, cond, _ = _student_sample(student)
    real = latents(2, 6, 9, torch.float32)
    loss, _ = gan.generator_loss(x0, real, cond, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(loss)
    loss.backward()
    assert has_grad(student) and no_grad_at_all(critic) and no_grad_at_all(head)
    student.zero_grad(set_to_none=True)
    loss, metrics = gan.critic_loss(x0, real, cond, generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(loss) and {"r1", "r2"} <= metrics.keys()
    loss.backward()
    assert has_grad(critic) and has_grad(head) and no_grad_at_all(student)
    assert default_feature_layers(30) == (13, 21, 29)  # the official blocks of Wan-1.3B


# --------------------------------------------------------------------------------------------
# ODE initialisation
# --------------------------------------------------------------------------------------------


def test_ode_trajectory_is_exact_on_straight_paths():
    # a teacher whose x0 prediction does not depend on x_t: the ODE path is a straight line
    b, f = 2, 3
    base, noise = latents(b, f, 0), latents(b, f, 1)
    cond = torch.full((b, 4, TINY.text_dim), 0.25, dtype=torch.float64)
    uncond = torch.zeros(1, 4, TINY.text_dim, dtype=torch.float64)
    keep = student_timesteps(STREAM)
    traj = sample_ode_trajectory(ToyScore(base, schedule=None), noise, cond, uncond, steps=12, keep_timesteps=keep)
    x0 = base + 6.0 * 0.25  # CFG 6 (standard convention) on x0 = base + mean(context)
    torch.testing.assert_close(traj["x0"], x0, rtol=1e-10, atol=1e-10)
    for k, t in enumerate(keep):
        s = t / 1000.0
        torch.testing.assert_close(traj["noisy"][:, k], (1 - s) * x0 + s * noise, rtol=1e-10, atol=1e-10)
    assert traj["timesteps"].shape == (b, len(keep))


def test_ode_trajectory_shapes_with_a_dit_teacher():
    teacher = tiny_model(1, torch.float32)
    seen = []
    traj = sample_ode_trajectory(teacher, latents(2, 6, 0, torch.float32), prompts(2, 1, torch.float32),
                                 torch.zeros(1, 2, TINY.text_dim), steps=4,
                                 keep_timesteps=student_timesteps(STREAM), callback=lambda i, n: seen.append(i))
    assert traj["noisy"].shape == (2, 4, 6, TINY.in_dim, H, W)
    assert traj["x0"].shape == (2, 6, TINY.in_dim, H, W)
    assert traj["timesteps"][0].tolist() == pytest.approx(student_timesteps(STREAM))
    assert seen == [1, 2, 3, 4]
    assert torch.equal(traj["noisy"][:, 0], latents(2, 6, 0, torch.float32))  # t = 1000 is the noise


def test_ode_regression_exact_student_has_zero_loss():
    b, f = 2, 9
    target = latents(b, f, 0)
    keep = student_timesteps(STREAM)
    noisy = torch.stack([latents(b, f, 10 + k) for k in range(len(keep))], dim=1)
    traj = {"noisy": noisy, "timesteps": torch.tensor(keep, dtype=torch.float64).expand(b, -1), "x0": target}
    ctx = torch.zeros(b, 4, TINY.text_dim, dtype=torch.float64)
    exact = ToyScore(target)
    loss, _ = ode_regression_loss(exact, traj, ctx, STREAM, generator=torch.Generator().manual_seed(0))
    assert float(loss) < 1e-20
    # the student saw, per chunk, one stored latent with its own timestep
    x, t = exact.calls[-1]
    for i in range(b):
        for c in range(0, f, 3):
            k = keep.index(pytest.approx(float(t[i, c])))
            assert torch.equal(t[i, c:c + 3], t[i, c:c + 1].expand(3))
            assert torch.equal(x[i, c:c + 3], noisy[i, k, c:c + 3])
    off = ToyScore(target + 0.1)
    loss, _ = ode_regression_loss(off, traj, ctx, STREAM, generator=torch.Generator().manual_seed(0))
    assert float(loss) == pytest.approx(0.01, rel=1e-9)


def test_ode_regression_trains_a_causal_dit():
    student = tiny_model(0, torch.float32)
    teacher = tiny_model(1, torch.float32)
    cond = prompts(1, 1, torch.float32)
    traj = sample_ode_trajectory(teacher, latents(1, 6, 0, torch.float32), cond, torch.zeros(1, 2, TINY.text_dim),
                                 steps=4, keep_timesteps=student_timesteps(WINDOW))
    loss, metrics = ode_regression_loss(student, traj, cond, WINDOW, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and float(metrics["ode_loss"]) > 0
    loss.backward()
    assert has_grad(student) and no_grad_at_all(teacher)


# --------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------


def test_ema_math_and_state():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9, start_step=2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, step=1)  # before the start step: a copy
    assert torch.equal(ema.shadow["weight"], torch.ones(2, 3))
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update(model, step=2)
    assert torch.equal(ema.shadow["weight"], torch.full((2, 3), 2.0))
    with torch.no_grad():
        model.weight.fill_(4.0)
    ema.update(model, step=3)
    torch.testing.assert_close(ema.shadow["weight"], torch.full((2, 3), 0.9 * 2.0 + 0.1 * 4.0))
    ema.update(model, step=4)
    torch.testing.assert_close(ema.shadow["weight"], torch.full((2, 3), 0.9 * 2.2 + 0.1 * 4.0))

    restored = EMA(nn.Linear(3, 2), decay=0.9, start_step=2)
    restored.load_state_dict(ema.state_dict())
    target = nn.Linear(3, 2)
    restored.copy_to(target)
    assert torch.equal(target.weight, ema.shadow["weight"]) and torch.equal(target.bias, ema.shadow["bias"])
    with pytest.raises(ValueError, match="missing"):
        restored.load_state_dict({"weight": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)


def test_ema_keeps_float32_for_half_models():
    model = nn.Linear(3, 2).to(torch.bfloat16)
    ema = EMA(model, decay=0.5, start_step=0)
    assert ema.shadow["weight"].dtype == torch.float32
    ema.update(model, step=1)
    ema.copy_to(model)
    assert model.weight.dtype == torch.bfloat16
