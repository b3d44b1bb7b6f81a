"""StreamingGenerator on a tiny random model: streaming into an MP4, determinism, stopping and
restarting, frame-wise mode, video extension, prompt embeddings, input errors, backends, and
equality with a direct ``denoise_chunk`` loop."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from sf_sdk import StreamingGenerator
from sf_sdk.config import StreamingConfig
from sf_sdk.generator import Backend, backend_names, backend_status, register_backend
from sf_sdk.models.text import build_word_tokenizer
from sf_sdk.sampling import ChunkSchedule, denoise_chunk
from sf_sdk.video import Mp4Writer, read_video

# 2x2 latents (one DiT token per frame, 16x16 pixels) with a rolling window of 6 latent frames.
STREAM = StreamingConfig(latent_height=2, latent_width=2, local_attn_size=6)
TEXT_DIM = 32  # the tiny DiT's text_dim


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gen() -> StreamingGenerator:
    return StreamingGenerator.from_config("tiny", STREAM, vae="tiny", seed=0)


@pytest.fixture(scope="module")
def embeds() -> torch.Tensor:
    return torch.randn(5, TEXT_DIM, generator=torch.Generator().manual_seed(7))


def test_streams_200_frames_into_an_mp4(gen: StreamingGenerator, embeds: torch.Tensor, tmp_path: Path) -> None:
    target = 200
    path = tmp_path / "long.mp4"
    written, starts = 0, []
    with Mp4Writer(path, fps=gen.fps) as writer, gen.stream(prompt_embeds=embeds, seed=0) as stream:
        for chunk in stream:  # unbounded: the rolling cache evicts old frames
            starts.append(chunk.start_frame)
            assert chunk.frames.shape[1:] == (16, 16, 3) and chunk.frames.dtype == np.uint8
            assert chunk.frames.shape[0] == (9 if chunk.index == 0 else 12)
            take = chunk.frames[: target - written]
            writer.write(take)
            written += take.shape[0]
            if written == target:
                break
    assert starts == list(range(0, 3 * len(starts), 3)) and len(starts) == 17  # 9 + 16 * 12 >= 200
    video = read_video(path)
    assert video.shape == (target, 16, 16, 3)


def test_same_seed_same_video(gen: StreamingGenerator, embeds: torch.Tensor) -> None:
    a = gen.generate(prompt_embeds=embeds, num_frames=21, seed=3)
    b = gen.generate(prompt_embeds=embeds, num_frames=21, seed=3)
    c = gen.generate(prompt_embeds=embeds, num_frames=21, seed=4, decode=False)
    assert a.frames.shape == (21, 16, 16, 3) and a.latents.shape == (6, 16, 2, 2)
    np.testing.assert_array_equal(a.frames, b.frames)
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
    assert not torch.equal(a.latents, c.latents)
    # [1, L, D] embeddings are the same prompt as [L, D].
    d = gen.generate(prompt_embeds=embeds[None], num_frames=21, seed=3, decode=False)
    assert d.frames is None
    torch.testing.assert_close(d.latents, a.latents, rtol=0, atol=0)


def test_stream_stops_and_restarts(gen: StreamingGenerator, embeds: torch.Tensor) -> None:
    full = [c.latents for c in gen.stream(prompt_embeds=embeds, num_frames=33, seed=1, decode=False)]
    assert len(full) == 3
    # break, then a new stream starts from scratch
    for chunk in gen.stream(prompt_embeds=embeds, seed=1, decode=False):
        if chunk.index == 1:
            break
    # close() mid-way
    s = gen.stream(prompt_embeds=embeds, seed=1, decode=False)
    first = next(s)
    s.close()
    with pytest.raises(StopIteration):
        next(s)
    torch.testing.assert_close(first.latents, full[0], rtol=0, atol=0)
    # context manager exit, then a fresh stream gives the same video again
    with gen.stream(prompt_embeds=embeds, seed=1, decode=False) as s2:
        next(s2)
    assert s2.closed
    again = [c.latents for c in gen.stream(prompt_embeds=embeds, num_frames=33, seed=1, decode=False)]
    for x, y in zip(full, again):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    # a stream left open is superseded by the next one (they share the KV cache)
    old = gen.stream(prompt_embeds=embeds, seed=1, decode=False)
    next(old)
    new = gen.stream(prompt_embeds=embeds, seed=1, decode=False)
    next(new)
    with pytest.raises(RuntimeError, match="superseded"):
        next(old)
    new.close()


def test_grad_mode_is_not_changed_between_chunks(gen: StreamingGenerator, embeds: torch.Tensor) -> None:
    with gen.stream(prompt_embeds=embeds, seed=0, decode=False) as s:
        next(s)
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_framewise_mode(embeds: torch.Tensor) -> None:
    framewise = dataclasses.replace(STREAM, num_frame_per_block=1, local_attn_size=4)
    gen = StreamingGenerator.from_config("tiny", framewise, vae="tiny", seed=0)
    chunks = list(gen.stream(prompt_embeds=embeds, num_frames=13, seed=0))
    assert [c.frames.shape[0] for c in chunks] == [1, 4, 4, 4]
    assert [c.latents.shape[0] for c in chunks] == [1, 1, 1, 1]
    assert gen.generate(prompt_embeds=embeds, num_frames=5, seed=0).frames.shape[0] == 5


def test_equals_a_direct_denoise_chunk_loop(gen: StreamingGenerator, embeds: torch.Tensor) -> None:
    seed, chunks = 11, 4  # more chunks than the window: evictions included
    streamed = []
    with gen.stream(prompt_embeds=embeds, seed=seed, decode=False) as stream:
        for chunk in stream:
            streamed.append(chunk.latents)
            if len(streamed) == chunks:
                break
    dit, c = gen.dit, STREAM.num_frame_per_block
    steps = ChunkSchedule.from_config(STREAM)
    with torch.no_grad():
        cross = dit.encode_context(embeds[None])
        cache = dit.new_cache(STREAM, 1)
        rng = torch.Generator().manual_seed(seed)
        for i in range(chunks):
            noise = torch.randn(1, c, 16, 2, 2, generator=rng)
            x0 = denoise_chunk(dit, noise, cross, cache, i * c, steps, generator=rng)
            torch.testing.assert_close(streamed[i], x0[0], rtol=0, atol=0)


def test_video_extension_keeps_the_given_video(gen: StreamingGenerator, embeds: torch.Tensor) -> None:
    base = gen.generate(prompt_embeds=embeds, num_frames=21, seed=2)
    # From latents: the first chunk is the given one, the next continues from it.
    initial = base.latents[:3]
    chunks = list(gen.stream(prompt_embeds=embeds, num_frames=33, seed=5, initial_latent=initial))
    assert [c.is_initial for c in chunks] == [True, False, False]
    torch.testing.assert_close(chunks[0].latents, initial, rtol=0, atol=0)
    np.testing.assert_array_equal(chunks[0].frames, base.frames[:9])  # same latents, same decode
    assert sum(c.frames.shape[0] for c in chunks) == 33
    with torch.no_grad():  # what the continuation must be: the given chunk cached, then denoised
        cross = gen.dit.encode_context(embeds[None])
        cache = gen.dit.new_cache(STREAM, 1)
        gen.dit.forward_chunk(initial[None], torch.zeros(1, 3), cross, cache, 0)
        rng = torch.Generator().manual_seed(5)
        noise = torch.randn(1, 3, 16, 2, 2, generator=rng)
        expected = denoise_chunk(gen.dit, noise, cross, cache, 3, gen.steps, generator=rng)
    torch.testing.assert_close(chunks[1].latents, expected[0], rtol=0, atol=0)

    # From pixels: the given frames come back unchanged, then the video continues.
    frames = np.random.default_rng(0).integers(0, 256, (9, 16, 16, 3), dtype=np.uint8)
    video = gen.generate(prompt_embeds=embeds, num_frames=21, seed=5, initial_frames=frames)
    assert video.frames.shape == (21, 16, 16, 3)
    np.testing.assert_array_equal(video.frames[:9], frames)
    with torch.no_grad():
        pixels = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        encoded = gen.vae.normalize(gen.vae.encode(pixels))[0].transpose(0, 1)
    torch.testing.assert_close(video.latents[:3], encoded, rtol=0, atol=0)


def test_text_prompts(embeds: torch.Tensor, tmp_path: Path) -> None:
    tok = build_word_tokenizer(["a", "red", "circle", "moving", "left"], tmp_path / "tok")
    gen = StreamingGenerator.from_config("tiny", STREAM, vae="tiny", text_encoder="tiny", tokenizer_dir=tok)
    emb = gen.encode_prompt("a red circle moving left")
    assert emb.shape == (6, TEXT_DIM)  # 5 words + EOS
    a = gen.generate("a red circle moving left", num_frames=9, seed=0)
    b = gen.generate(prompt_embeds=emb, num_frames=9, seed=0)
    np.testing.assert_array_equal(a.frames, b.frames)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"prompt": "   "}, "prompt is empty"),
    ({"prompt": None}, "exactly one of prompt"),
    ({"prompt_embeds": torch.randn(5, 7)}, r"prompt_embeds must be \[L, text_dim=32\]"),
    ({"prompt_embeds": torch.randn(2, 5, 32)}, r"prompt_embeds must be \[L, text_dim=32\]"),
    ({"prompt_embeds": torch.randn(17, 32)}, r"1\.\.16 rows"),
    ({"prompt_embeds": torch.randn(5, 32), "num_frames": -9}, "num_frames must be a positive int"),
    ({"prompt_embeds": torch.randn(5, 32), "num_frames": 0}, "num_frames must be a positive int"),
    ({"prompt_embeds": torch.randn(5, 32), "num_frames": 20}, r"not a whole number of chunks.*nearest valid: \[21, 9\]"),
    ({"prompt_embeds": torch.randn(5, 32), "num_frames": 33, "initial_latent": torch.randn(2, 16, 2, 2)},
     "not a multiple of the chunk size 3"),
    ({"prompt_embeds": torch.randn(5, 32), "num_frames": 9, "initial_latent": torch.randn(3, 16, 2, 2)},
     "already has 3 latent frames"),
    ({"prompt_embeds": torch.randn(5, 32), "initial_frames": np.zeros((9, 8, 8, 3), np.uint8)},
     r"initial_frames must be uint8 \[T, 16, 16, 3\]"),
    ({"prompt_embeds": torch.randn(5, 32), "initial_frames": np.zeros((13, 16, 16, 3), np.uint8)},
     r"whole chunks .* one of \[9, 21"),
])
def test_bad_input_is_a_clear_error(gen: StreamingGenerator, kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        gen.stream(**kwargs)


def test_bad_setup_is_a_clear_error(gen: StreamingGenerator, embeds: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        StreamingGenerator.from_config("tiny", STREAM, device="tpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        StreamingGenerator.from_config("tiny", STREAM, dtype="float8")
    with pytest.raises(ValueError, match="no text encoder"):
        gen.stream("a red circle")
    glob = StreamingGenerator.from_config("tiny", dataclasses.replace(STREAM, local_attn_size=-1))
    with pytest.raises(ValueError, match="unbounded streams need a rolling KV cache"):
        glob.stream(prompt_embeds=embeds, decode=False)
    with pytest.raises(ValueError, match="no VAE"):
        glob.stream(prompt_embeds=embeds, num_frames=9)
    with pytest.raises(ValueError, match="backend 'nope' is not available"):
        gen.use_backend("nope")


class _CountingBackend:
    """A backend through the public seam: the eager DiT, counting its chunk calls."""

    def __init__(self, dit) -> None:
        self.dit = dit
        self.calls = 0

    def step_attention(self, cache, plan, impl=None):
        return self.dit.step_attention(cache, plan, impl)

    def forward_chunk(self, *args, **kwargs):
        self.calls += 1
        return self.dit.forward_chunk(*args, **kwargs)


def test_registered_backend_runs_the_stream(embeds: torch.Tensor) -> None:
    made: list[_CountingBackend] = []

    def factory(g: StreamingGenerator, options: dict) -> Backend:
        made.append(_CountingBackend(g.dit))
        return Backend("counting", made[-1], g.vae.streaming_decoder)

    register_backend("counting", factory, available=lambda: None)
    assert "counting" in backend_names() and backend_status("counting") is None
    gen = StreamingGenerator.from_config("tiny", STREAM, vae="tiny", backend="counting")
    eager = StreamingGenerator.from_config("tiny", STREAM, vae="tiny")
    a = gen.generate(prompt_embeds=embeds, num_frames=21, seed=0, decode=False)
    b = eager.generate(prompt_embeds=embeds, num_frames=21, seed=0, decode=False)
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
    assert made[-1].calls == 2 * (len(STREAM.denoising_step_list) + 1)  # 2 chunks: 4 steps + cache pass
    register_backend("unavailable", factory, available=lambda: "needs a GPU")
    assert backend_status("unavailable") == "needs a GPU"


def test_the_cpu_decoder_takes_a_chunk_per_pass_while_a_pass_stays_small() -> None:
    small = StreamingGenerator.from_config("tiny", StreamingConfig(latent_height=2, latent_width=2), vae="tiny",
                                           backend="eager")
    assert small.decode_latents_per_pass == 3
    assert small.make_streaming_decoder().latents_per_pass == 3
    # 480x832 frames: a 3-frame pass would hold 12 pixel frames per activation; one frame per pass.
    large = StreamingGenerator(small.dit, StreamingConfig(latent_height=60, latent_width=104), vae=small.vae,
                               backend="eager")
    assert large.decode_latents_per_pass == 1
    # The chunked decode gives the frames the official one-frame passes give.
    video = small.generate(prompt_embeds=torch.randn(4, small.dit.config.text_dim), num_frames=21, seed=1)
    z = small.vae.decode(video.latents.transpose(0, 1)[None])  # [1, 3, T, H, W], one frame per pass
    from sf_sdk.results import to_uint8

    official = to_uint8(z)
    assert np.abs(official.astype(int) - video.frames.astype(int)).max() <= 1
