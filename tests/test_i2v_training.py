"""Image-to-video fine-tune (``self_forcing.image_conditioning``): the rollout writes a given clean
frame 0 by a cache pass exactly as inference writes ``image=``, the student generates the frames
after it (frame 0 alone, then chunks), frame 0 stays the data (no gradient); the smoke recipe
fine-tunes a finished run's student through the documented run-folder layout, exports a model
that streams frame 0 alone, and resumes exactly; bad combinations are clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dit_util import random_dit
from safetensors.torch import load_file

from sf_sdk import StreamingGenerator
from sf_sdk.config import DIT_PRESETS, StreamingConfig
from sf_sdk.models.dit import WanDiT
from sf_sdk.sampling import ChunkSchedule, cache_pass, denoise_chunk
from training.algorithms import rollout
from training.train import compose, run

TINY = DIT_PRESETS["tiny"]
H, W = 4, 6  # latent size: a 2 x 3 patch grid
FIRST_ALONE = StreamingConfig(latent_height=H, latent_width=W, independent_first_frame=True)
FIRST_ALONE_WINDOW = StreamingConfig(latent_height=H, latent_width=W, independent_first_frame=True, local_attn_size=6)
FINE_TUNE = ["stages=[self_forcing,export]", "self_forcing.image_conditioning=true",
             "stream.independent_first_frame=true", "self_forcing.num_latent_frames=3"]

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int, dtype: torch.dtype = torch.float32) -> WanDiT:
    return random_dit(seed=seed, dtype=dtype, eval_mode=False)


def latents(b: int, f: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(b, f, TINY.in_dim, H, W, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def context(b: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(b, TINY.text_len, TINY.text_dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------------------------
# The rollout
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [FIRST_ALONE, FIRST_ALONE_WINDOW], ids=["global", "window"])
def test_rollout_from_a_given_frame_is_the_inference_loop(stream: StreamingConfig) -> None:
    student = tiny_model(0)
    first, noise = latents(2, 1, seed=3), latents(2, 6, seed=1)  # frame 0, then two chunks of 3
    steps = ChunkSchedule.from_config(stream)
    with torch.no_grad():
        cross = student.encode_context(context(2, seed=2))
        cache = student.new_cache(stream, 2, num_frames=7)
        gen = torch.Generator().manual_seed(7)
        cache_pass(student, first, cross, cache, 0, steps, generator=gen)
        ref = torch.cat([first] + [denoise_chunk(student, noise[:, s - 1:s + 2], cross, cache, s, steps, generator=gen)
                                   for s in (1, 4)], dim=1)
        out = rollout(student, cross, noise, stream, mode="self_forcing", exit_step=len(steps.timesteps) - 1,
                      generator=torch.Generator().manual_seed(7), first_frame=first)
    assert out.shape == (2, 7, TINY.in_dim, H, W)
    assert torch.equal(out, ref)


def test_rollout_from_a_given_frame_equals_streaming_with_that_latent() -> None:
    """One denoising step (no re-noising draws), so the generator's stream draws exactly the
    chunk noise the rollout is given: the rollout is what ``generate(initial_latent=...)`` streams."""
    stream = StreamingConfig(latent_height=H, latent_width=W, independent_first_frame=True,
                             denoising_step_list=(1000.0,), local_attn_size=6)
    student = tiny_model(1)
    first, embeds = latents(1, 1, seed=4), context(1, seed=5)
    gen = StreamingGenerator(student, stream, backend="eager")
    video = gen.generate(prompt_embeds=embeds[0], num_frames=1 + 4 * 6, seed=11, decode=False,
                         initial_latent=first[0])
    rng = torch.Generator().manual_seed(11)
    noise = torch.cat([torch.randn((1, 3, TINY.in_dim, H, W), generator=rng) for _ in range(2)], dim=1)
    with torch.no_grad():
        out = rollout(student, student.encode_context(embeds), noise, stream, mode="self_forcing", exit_step=0,
                      generator=rng, first_frame=first)
    assert video.latents.shape == out.shape[1:]
    torch.testing.assert_close(video.latents, out[0], rtol=1e-5, atol=1e-5)


def test_given_frame_is_exact_and_gets_no_gradient() -> None:
    student = tiny_model(0)
    first = latents(1, 1, seed=3).requires_grad_(True)  # even a differentiable input stays data
    cross = student.encode_context(context(1, seed=2))  # with autograd, as the stage calls it
    out = rollout(student, cross, latents(1, 6, seed=1), FIRST_ALONE, mode="self_forcing", exit_step=1,
                  generator=torch.Generator().manual_seed(0), first_frame=first)
    assert torch.equal(out[:, :1], first.detach())
    assert out.requires_grad and out[:, :1].grad_fn is not None  # a slice of the clip, yet no path back
    out[:, :1].sum().backward(retain_graph=True)
    assert first.grad is None
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in student.parameters())
    out[:, 1:].square().sum().backward()
    assert first.grad is None
    assert student.patch_embedding.weight.grad.abs().sum() > 0
    for block in student.blocks:  # the generated frames' self-attention reads the given frame's keys
        assert block.self_attn.q.weight.grad.abs().sum() > 0


def test_rollout_input_errors() -> None:
    student = tiny_model(0)
    with torch.no_grad():
        cross = student.encode_context(context(1, seed=2))
    kwargs = dict(exit_step=0, generator=None)
    with pytest.raises(ValueError, match="after the given first frame do not split into chunks"):
        rollout(student, cross, latents(1, 4, 1), FIRST_ALONE, mode="self_forcing", first_frame=latents(1, 1, 3),
                **kwargs)
    with pytest.raises(ValueError, match="first_frame must be one clean latent frame per row"):
        rollout(student, cross, latents(1, 3, 1), FIRST_ALONE, mode="self_forcing", first_frame=latents(1, 2, 3),
                **kwargs)
    with pytest.raises(ValueError, match="runs in mode 'self_forcing'"):
        rollout(student, cross, latents(1, 3, 1), FIRST_ALONE, mode="teacher_forcing",
                clean_latents=latents(1, 3, 4), first_frame=latents(1, 1, 3), **kwargs)


# --------------------------------------------------------------------------------------------
# The stage, on the smoke recipe
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished smoke run (one step per stage): the run an I2V fine-tune starts from."""
    run_dir = tmp_path_factory.mktemp("i2v") / "base"
    run(compose("smoke", [f"run_dir={run_dir}", "stages=[vae,teacher,ode_init,self_forcing]", "vae.steps=1",
                          "teacher.steps=1", "ode_init.steps=1", "self_forcing.steps=1"]))
    return run_dir


def fine_tune_dir(finished: Path, dest: Path) -> Path:
    """The documented layout: vae, text, teacher linked to the finished run's stages, ode_init to
    its self_forcing stage (the student the fine-tune starts from)."""
    dest.mkdir(parents=True)
    for stage in ("vae", "text", "teacher"):
        (dest / stage).symlink_to(finished / stage, target_is_directory=True)
    (dest / "ode_init").symlink_to(finished / "self_forcing", target_is_directory=True)
    return dest


def test_fine_tune_trains_on_cached_first_frames_and_exports(finished_run: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import training.stages.self_forcing as sf_stage
    from training.stages.teacher import load_latent_cache

    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (noise, first_frame, returned clip)
    real_rollout = sf_stage.rollout

    def recording_rollout(*args, **kwargs):
        x0 = real_rollout(*args, **kwargs)
        calls.append((args[2], kwargs["first_frame"], x0))
        return x0

    monkeypatch.setattr(sf_stage, "rollout", recording_rollout)
    run_dir = fine_tune_dir(finished_run, tmp_path / "i2v")
    model = run_dir / "model"
    run(compose("smoke", [f"run_dir={run_dir}", *FINE_TUNE, "self_forcing.steps=2", f"export.out_dir={model}"]))

    assert (run_dir / "self_forcing" / "final" / "DONE").is_file()
    assert len((run_dir / "self_forcing" / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (finished_run / "self_forcing" / "checkpoints" / "ckpt-00000002.safetensors").exists()
    cached = load_latent_cache(finished_run / "teacher" / "latents").latents[:, 0]  # [N, C, h, w]
    assert len(calls) == 4  # 2 steps x (1 generator + 1 critic rollout)
    for noise, first, clip in calls:
        assert noise.shape[1] == 2 and clip.shape[1] == 3  # smoke: 3 latent frames, the first given
        assert torch.equal(clip[:, :1], first)
        assert any(torch.equal(first[0, 0], c) for c in cached)  # frame 0 of a cached clip

    index = json.loads((model / "model_index.json").read_text())
    assert index["streaming"]["independent_first_frame"] is True
    assert index["trained_with"]["image_conditioning"] is True
    gen = StreamingGenerator.from_pretrained(model, backend="eager")
    assert gen.streaming.independent_first_frame
    image = gen.generate("a red circle moving left", num_frames=9, seed=0).frames[0]
    video = gen.generate("a red circle moving left", num_frames=9, seed=0, image=image)
    assert video.frames.shape == (9, 32, 32, 3)


def test_cached_clips_carry_their_captions(finished_run: Path) -> None:
    from training.data.shapes import make_clip
    from training.stages.common import prompt_table
    from training.stages.self_forcing import _ImageClips
    from training.stages.teacher import CACHE_INDEX_OFFSET, load_latent_cache

    cfg = compose("smoke", [f"run_dir={finished_run}"])
    prompts = prompt_table(cfg, torch.device("cpu"))
    clips = _ImageClips(load_latent_cache(finished_run / "teacher" / "latents"), prompts, keep_frames=1)
    assert len(clips) == cfg.teacher.cache_clips and clips.latents.shape[1] == 1
    for i in range(len(clips)):  # the caption each cached clip was rendered from
        assert clips.captions[i] == make_clip(cfg.seed, CACHE_INDEX_OFFSET + i, cfg.data).caption
        assert prompts.captions[int(clips.caption_index[i])] == clips.captions[i]


def test_fine_tune_resumes_exactly(finished_run: Path, tmp_path: Path) -> None:
    straight = fine_tune_dir(finished_run, tmp_path / "straight")
    resumed = fine_tune_dir(finished_run, tmp_path / "resumed")
    stages = ["stages=[self_forcing]", *FINE_TUNE[1:]]
    run(compose("smoke", [f"run_dir={straight}", *stages, "self_forcing.steps=2"]))
    run(compose("smoke", [f"run_dir={resumed}", *stages, "self_forcing.steps=1"]))
    assert (resumed / "self_forcing" / "checkpoints" / "ckpt-00000001.safetensors").is_file()
    run(compose("smoke", [f"run_dir={resumed}", *stages, "self_forcing.steps=2"]))  # a larger budget
    for name in ("checkpoints/ckpt-00000002.safetensors", "final/dit.safetensors"):
        a, b = load_file(straight / "self_forcing" / name), load_file(resumed / "self_forcing" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{k} of {name} differs after a resume"


@pytest.mark.parametrize(("overrides", "message"), [
    (["self_forcing.rollout_mode=teacher_forcing"], "image_conditioning needs rollout_mode=self_forcing"),
    (["self_forcing.long_rollout=2"], "image_conditioning needs long_rollout=1"),
])
def test_image_conditioning_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(Exception, match=message):
        compose("smoke", ["run_dir=/tmp/unused", "self_forcing.image_conditioning=true", *overrides])


@pytest.mark.parametrize(("overrides", "message"), [
    # chunks of 3 from frame 0: an exported model could not stream an image in the trained layout
    (["stream.num_frame_per_block=3", "stream.local_attn_size=6", "self_forcing.num_latent_frames=7"],
     "set stream.independent_first_frame=true"),
    (["stream.independent_first_frame=true", "stream.num_frame_per_block=3", "stream.local_attn_size=6",
      "self_forcing.num_latent_frames=6"], "must be 1 \\+ a positive multiple of 3, got 6 \\(e.g. 7\\)"),
    (["stream.independent_first_frame=true", "self_forcing.num_latent_frames=1"],
     "must be 1 \\+ a positive multiple of 1, got 1"),
])
def test_image_conditioning_frame_errors(finished_run: Path, tmp_path: Path, overrides: list[str],
                                         message: str) -> None:
    from training.stages.self_forcing import check_rollout_frames

    cfg = compose("smoke", [f"run_dir={tmp_path}", "self_forcing.image_conditioning=true", *overrides])
    with pytest.raises(ValueError, match=message):
        check_rollout_frames(cfg)
    run_dir = fine_tune_dir(finished_run, tmp_path / "i2v")  # the stage says so before it loads anything
    with pytest.raises(ValueError, match=message):
        run(compose("smoke", [f"run_dir={run_dir}", "stages=[self_forcing]", "self_forcing.image_conditioning=true",
                              *overrides]))
    assert not (run_dir / "self_forcing").exists()


def test_gan_with_image_conditioning_needs_clips_as_long_as_the_window(finished_run: Path, tmp_path: Path) -> None:
    run_dir = fine_tune_dir(finished_run, tmp_path / "i2v")
    with pytest.raises(ValueError, match="latent cache holds clips of 3 latent frames; self_forcing needs 4"):
        run(compose("smoke", [f"run_dir={run_dir}", *FINE_TUNE[:3], "self_forcing.num_latent_frames=4",
                              "self_forcing.gan_weight=0.1"]))
