"""Image-to-video: the image (a path or a uint8 array of any size, resized and centre-cropped)
becomes the first latent frame, encoded in float32; decoded frame 0 is close to the image, the
frames after it move on; the continuation is the stream's own denoising from the cached image;
sf-generate --image; clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sf_sdk import StreamingGenerator
from sf_sdk.config import StreamingConfig
from sf_sdk.image import fit_image, read_image
from sf_sdk.sampling import cache_pass, denoise_chunk

PROMPT = "a red circle moving left"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def framewise() -> StreamingGenerator:
    """The bundled shapes model streamed frame-wise (one latent frame per chunk)."""
    return StreamingGenerator.from_pretrained("shapes-tiny", streaming={"num_frame_per_block": 1}, backend="eager")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A frame of the shapes world: what the bundled model's VAE knows how to encode."""
    video = StreamingGenerator.from_pretrained("shapes-tiny", backend="eager").generate(PROMPT, num_frames=9, seed=0)
    return video.frames[4]


def test_fit_image_resizes_and_centre_crops() -> None:
    wide = np.zeros((40, 120, 3), np.uint8)
    wide[:, :40, 0] = 255  # red | green | blue thirds
    wide[:, 40:80, 1] = 255
    wide[:, 80:, 2] = 255
    out = fit_image(wide, (20, 20))  # scaled to 20x60, the middle 20 columns kept: green
    assert out.shape == (20, 20, 3) and out.dtype == torch.uint8
    assert out[:, 2:-2, 1].min() == 255 and out[:, 2:-2, [0, 2]].max() == 0
    small = fit_image(torch.full((3, 5, 3), 9, dtype=torch.uint8), (30, 40))  # upscaled to cover
    assert small.shape == (30, 40, 3) and int(small.float().mean().round()) == 9
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        fit_image(np.zeros((4, 4, 3), np.float32), (8, 8))


def test_image_becomes_frame_0_and_the_video_moves_on(framewise: StreamingGenerator, image: np.ndarray) -> None:
    video = framewise.generate(PROMPT, num_frames=17, seed=1, image=image)
    frames = video.frames.astype(np.float64)
    assert video.frames.shape == (17, 64, 64, 3)
    err0 = np.abs(frames[0] - image).mean()
    assert err0 < 4.0, err0  # the VAE round trip of the image (measured 2.5 / 255)
    moved = [np.abs(frames[i] - frames[0]).mean() for i in range(1, 17)]
    assert min(moved[4:]) > 2 * err0, moved  # the frames after it differ from it
    # frame 0's latent is the float32 VAE encoding of the fitted image
    torch.testing.assert_close(video.latents[0:1], framewise._image_latent(image), rtol=0, atol=0)
    with torch.no_grad():
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1
        encoded = framewise.vae.normalize(framewise.vae.encode(pixels))[0].transpose(0, 1)
    torch.testing.assert_close(video.latents[0:1], encoded, rtol=0, atol=0)
    # the continuation: the image's cache pass, then the stream's own denoising from it
    with torch.no_grad():
        dit, st = framewise.dit, framewise.streaming
        cross = dit.encode_context(framewise.encode_prompt(PROMPT)[None])
        cache = dit.new_cache(st, 1)
        rng = torch.Generator().manual_seed(1)
        cache_pass(dit, encoded[None], cross, cache, 0, framewise.steps, generator=rng)
        noise = torch.randn(1, 1, 16, 8, 8, generator=rng)
        nxt = denoise_chunk(dit, noise, cross, cache, 1, framewise.steps, generator=rng)
    torch.testing.assert_close(video.latents[1:2], nxt[0], rtol=1e-5, atol=1e-5)


def test_chunkwise_model_with_a_first_frame_of_its_own(image: np.ndarray) -> None:
    # independent_first_frame: the image is frame 0 alone, then chunks of 3 continue from it
    gen = StreamingGenerator.from_pretrained("shapes-tiny", streaming={"independent_first_frame": True}, backend="eager")
    chunks = list(gen.stream(PROMPT, num_frames=25, seed=3, image=image))
    assert [c.latents.shape[0] for c in chunks] == [1, 3, 3] and [c.is_initial for c in chunks] == [True, False, False]
    assert np.abs(chunks[0].frames[0].astype(float) - image).mean() < 4.0
    latent = gen._image_latent(image)
    torch.testing.assert_close(chunks[0].latents, latent, rtol=0, atol=0)
    with torch.no_grad():
        dit = gen.dit
        cross = dit.encode_context(gen.encode_prompt(PROMPT)[None])
        cache = dit.new_cache(gen.streaming, 1)
        rng = torch.Generator().manual_seed(3)
        cache_pass(dit, latent[None], cross, cache, 0, gen.steps, generator=rng)
        nxt = denoise_chunk(dit, torch.randn(1, 3, 16, 8, 8, generator=rng), cross, cache, 1, gen.steps, generator=rng)
    torch.testing.assert_close(chunks[1].latents, nxt[0], rtol=1e-5, atol=1e-5)


def test_any_size_and_a_path(framewise: StreamingGenerator, image: np.ndarray, tmp_path: Path) -> None:
    pil = pytest.importorskip("PIL.Image")
    big = np.repeat(np.repeat(image, 3, axis=0), 3, axis=1)  # 192 x 192: resized back to 64 x 64
    path = tmp_path / "first.png"
    pil.fromarray(big).save(path)
    assert np.array_equal(read_image(path), big)
    from_path = framewise.generate(PROMPT, num_frames=5, seed=2, image=path)
    from_array = framewise.generate(PROMPT, num_frames=5, seed=2, image=torch.from_numpy(big))
    np.testing.assert_array_equal(from_path.frames, from_array.frames)
    assert np.abs(from_path.frames[0].astype(float) - image).mean() < 6.0


def test_a_half_precision_vae_encodes_in_float32(image: np.ndarray) -> None:
    stream = StreamingConfig(latent_height=8, latent_width=8, num_frame_per_block=1, local_attn_size=4)
    gen = StreamingGenerator.from_config("tiny", stream, vae="tiny", dtype="bfloat16", seed=0, backend="eager")
    latent = gen._image_latent(image)
    assert latent.dtype == torch.bfloat16 and gen._vae_float32[1].dtype == torch.float32
    with torch.no_grad():
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1
        vae32 = gen._vae_float32[1]
        expected = vae32.normalize(vae32.encode(pixels))[0].transpose(0, 1).to(torch.bfloat16)
    torch.testing.assert_close(latent, expected, rtol=0, atol=0)


def test_sf_generate_image(image: np.ndarray, tmp_path: Path, capsys) -> None:
    pil = pytest.importorskip("PIL.Image")
    from sf_sdk.cli import main
    from sf_sdk.video import read_video

    pil.fromarray(image).save(tmp_path / "in.png")
    out = tmp_path / "out.mp4"
    rc = main([PROMPT, "--model", "shapes-tiny", "--framewise", "--image", str(tmp_path / "in.png"), "--frames", "9",
               "--output", str(out), "--device", "cpu", "--backend", "eager", "--no-progress", "-q"])
    assert rc == 0
    assert read_video(out).shape[0] == 9
    rc = main([PROMPT, "--model", "shapes-tiny", "--image", str(tmp_path / "in.png"), "--frames", "9",
               "--output", str(tmp_path / "chunk.mp4"), "--device", "cpu", "--backend", "eager", "-q"])
    assert rc == 2 and "frame-wise" in capsys.readouterr().err
    rc = main([PROMPT, "--image", str(tmp_path / "missing.png"), "--output", str(tmp_path / "x.mp4"), "-q"])
    assert rc == 2 and "is not a file" in capsys.readouterr().err


def test_bad_image_requests_are_clear_errors(framewise: StreamingGenerator, image: np.ndarray) -> None:
    with pytest.raises(ValueError, match="not several"):
        framewise.stream(PROMPT, num_frames=5, image=image, initial_latent=torch.zeros(1, 16, 8, 8))
    chunkwise = StreamingGenerator.from_config("tiny", StreamingConfig(latent_height=8, latent_width=8,
                                                                       local_attn_size=6), vae="tiny", backend="eager")
    with pytest.raises(ValueError, match="needs a frame-wise model"):
        chunkwise.stream(prompt_embeds=torch.zeros(3, 32), num_frames=9, image=image)
    no_vae = StreamingGenerator.from_config("tiny", StreamingConfig(latent_height=8, latent_width=8,
                                                                    num_frame_per_block=1, local_attn_size=4), backend="eager")
    with pytest.raises(ValueError, match="has none"):
        no_vae.stream(prompt_embeds=torch.zeros(3, 32), num_frames=5, decode=False, image=image)
    with pytest.raises(ValueError, match="does not exist"):
        framewise.stream(PROMPT, num_frames=5, image="no/such/image.png")
