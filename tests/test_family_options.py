"""The streaming options of the Self-Forcing family (first-chunk steps, EMA sinks): streaming
equals the full-sequence forward / a direct loop, and pooled rows equal solo streams."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from dit_util import random_dit

from sf_sdk import StreamingGenerator
from sf_sdk.config import DIT_PRESETS, StreamingConfig
from sf_sdk.models.dit import WanDiT, block_causal_mask
from sf_sdk.sampling import ChunkSchedule, denoise_chunk

TINY = DIT_PRESETS["tiny"]
GRID = {"latent_height": 4, "latent_width": 6}  # 2x3 tokens per frame


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model() -> WanDiT:
    return random_dit()


# --------------------------------------------------------------------------------------------
# EMA sinks (Reward Forcing)
# --------------------------------------------------------------------------------------------


def _stream_chunks(model: WanDiT, stream: StreamingConfig, x, t, ctx, noisy_first: bool = True):
    cross = model.encode_context(ctx)
    cache = model.new_cache(stream, x.shape[0])
    c, outs = stream.num_frame_per_block, []
    for s in range(0, x.shape[1], c):
        if noisy_first:  # a noisy call first: the fold must happen once per chunk, not per call
            model.forward_chunk(torch.randn_like(x[:, s:s + c]), t[:, s:s + c] * 0.5, cross, cache, s)
        outs.append(model.forward_chunk(x[:, s:s + c], t[:, s:s + c], cross, cache, s))
    return torch.cat(outs, dim=1), cache


def test_ema_sink_with_decay_0_is_a_plain_window():
    # decay 0: the sinks become the frames just evicted, so sinks + ring are the last
    # local_attn_size frames in order: a window of that size without sinks.
    model = tiny_model()
    ema = StreamingConfig(**GRID, local_attn_size=9, sink_size=3, position_mode="cache_relative", sink_decay=0.0)
    frames = 21  # 7 chunks: 4 of them evict
    x = torch.randn(2, frames, 16, 4, 6, dtype=torch.float64)
    t = torch.rand(2, frames, dtype=torch.float64) * 1000
    ctx = torch.randn(2, 5, TINY.text_dim, dtype=torch.float64)
    with torch.no_grad():
        out, _ = _stream_chunks(model, ema, x, t, ctx)
        window = StreamingConfig(**GRID, local_attn_size=9)
        full = model(x, t, ctx, mask=block_causal_mask(frames, 6, window))
    torch.testing.assert_close(out, full, rtol=1e-9, atol=1e-9)


def test_ema_sink_folds_each_evicted_chunk_once():
    model = tiny_model()
    decay = 0.7
    base = StreamingConfig(**GRID, local_attn_size=9, sink_size=3, position_mode="cache_relative")
    ema = dataclasses.replace(base, sink_decay=decay)
    frames = 15
    x = torch.randn(1, frames, 16, 4, 6, dtype=torch.float64)
    t = torch.full((1, frames), 400.0, dtype=torch.float64)
    ctx = torch.randn(1, 5, TINY.text_dim, dtype=torch.float64)
    with torch.no_grad():
        cross = model.encode_context(ctx)
        plain, folded = model.new_cache(base, 1), model.new_cache(ema, 1)
        tok = folded.layout.tokens_per_frame
        expected_sink = None
        for s in range(0, frames, 3):
            if s >= 9:  # this chunk evicts frames s-6 .. s-4: fold them in by hand
                evicted = folded.k[:, :, 3 * tok:6 * tok].clone() if s == 9 else folded.k[:, :, 6 * tok:9 * tok].clone()
                expected_sink = decay * folded.k[:, :, :3 * tok] + (1 - decay) * evicted
            a = model.forward_chunk(x[:, s:s + 3], t[:, s:s + 3], cross, plain, s)
            model.forward_chunk(torch.randn_like(x[:, s:s + 3]), t[:, s:s + 3], cross, folded, s)
            b = model.forward_chunk(x[:, s:s + 3], t[:, s:s + 3], cross, folded, s)
            if s < 9:  # nothing evicted yet: plain sinks
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
            else:
                torch.testing.assert_close(folded.k[:, :, :3 * tok], expected_sink, rtol=1e-12, atol=1e-12)
                assert not torch.allclose(a, b)
        # the plain cache's sinks are still the first chunk's keys
        assert not torch.allclose(plain.k[:, :, :3 * tok], folded.k[:, :, :3 * tok])


def test_ema_sink_needs_its_setting():
    with pytest.raises(ValueError, match="sink_size == num_frame_per_block"):
        StreamingConfig(local_attn_size=9, sink_size=1, position_mode="cache_relative", sink_decay=0.9)
    with pytest.raises(ValueError, match="cache_relative"):
        StreamingConfig(local_attn_size=9, sink_size=3, sink_decay=0.9)
    with pytest.raises(ValueError, match=r"sink_decay must lie in \[0, 1\]"):
        StreamingConfig(sink_decay=1.5)


# --------------------------------------------------------------------------------------------
# First-chunk steps (Causal Forcing++ 1- and 2-step models)
# --------------------------------------------------------------------------------------------

FRAMEWISE = StreamingConfig(latent_height=2, latent_width=2, num_frame_per_block=1, local_attn_size=4,
                            denoising_step_list=(1000.0,), first_chunk_steps=(1000.0, 750.0, 500.0, 250.0))


def test_first_chunk_steps_schedule():
    steps = ChunkSchedule.from_config(FRAMEWISE)
    assert steps.timesteps == (1000.0,)
    assert steps.for_chunk(True) == pytest.approx((1000.0, 937.5, 833.333, 625.0), abs=1e-3)  # warped
    assert steps.for_chunk(False) == (1000.0,)
    with pytest.raises(ValueError, match="first_chunk_steps"):
        StreamingConfig(first_chunk_steps=(500.0, 750.0))


def test_first_chunk_steps_stream_equals_direct_loop_and_pools_with_others():
    embeds = torch.randn(5, TINY.text_dim, generator=torch.Generator().manual_seed(3))
    gen = StreamingGenerator.from_config("tiny", FRAMEWISE, seed=0, backend="eager")
    chunks = [c.latents for c in gen.stream(prompt_embeds=embeds, num_frames=13, seed=4, decode=False)]
    steps = gen.steps
    with torch.no_grad():
        cross = gen.dit.encode_context(embeds[None])
        cache = gen.dit.new_cache(FRAMEWISE, 1)
        rng = torch.Generator().manual_seed(4)
        for i in range(4):
            noise = torch.randn(1, 1, 16, 2, 2, generator=rng)
            x0 = denoise_chunk(gen.dit, noise, cross, cache, i, steps, generator=rng, first_chunk=i == 0)
            torch.testing.assert_close(chunks[i], x0[0], rtol=0, atol=0)
        # the first chunk really took 4 steps: 1 step gives another result
        cache = gen.dit.new_cache(FRAMEWISE, 1)
        rng = torch.Generator().manual_seed(4)
        one = denoise_chunk(gen.dit, torch.randn(1, 1, 16, 2, 2, generator=rng), cross, cache, 0, steps,
                            generator=rng)
    assert not torch.allclose(one[0], chunks[0])
    # In a pool, a stream that joins later runs its 4 first steps beside another's 1-step chunks.
    pool = gen.pool(2)
    a = pool.open(prompt_embeds=embeds, num_frames=13, seed=4, decode=False)
    first = pool.step()
    b = pool.open(prompt_embeds=embeds, num_frames=9, seed=4, decode=False)
    got = {a: [first[a].latents], b: []}
    while pool.streams:
        for s, ch in pool.step().items():
            got[s].append(ch.latents)
    for x, y in zip(got[a], chunks):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    for x, y in zip(got[b], chunks):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# A first frame of its own (the official independent_first_frame layout [1, c, c, ...])
# --------------------------------------------------------------------------------------------


def _offset_mask(frames: int, chunk: int, tokens: int, ring: int | None = None, sinks: int = 0) -> torch.Tensor:
    """Frame 0 alone, then chunks of ``chunk``: frame i sees the frames before its chunk's end that
    are sinks or within ``ring`` frames of that end (None: all)."""
    block = torch.tensor([0] + [1 + (f - 1) // chunk for f in range(1, frames)])
    end = torch.tensor([1 if b == 0 else 1 + b * chunk for b in block.tolist()])  # [F] chunk end of each frame
    j = torch.arange(frames)
    vis = j[None] < end[:, None]
    if ring is not None:
        vis &= (j[None] >= (end - ring)[:, None]) | (j[None] < sinks)
    return vis.repeat_interleave(tokens, 0).repeat_interleave(tokens, 1)


@pytest.mark.parametrize("window", [None, (6, 0), (5, 1)])
def test_first_frame_alone_streams_like_the_full_sequence(window):
    model = tiny_model()
    extra = {} if window is None else {"local_attn_size": window[0], "sink_size": window[1]}
    stream = StreamingConfig(**GRID, independent_first_frame=True, **extra)
    frames = 13  # 1 + 4 chunks of 3: evictions in the windowed cases
    x = torch.randn(1, frames, 16, 4, 6, dtype=torch.float64)
    t = torch.rand(1, frames, dtype=torch.float64) * 1000
    ctx = torch.randn(1, 5, TINY.text_dim, dtype=torch.float64)
    with torch.no_grad():
        cross = model.encode_context(ctx)
        cache = model.new_cache(stream, 1, num_frames=frames)
        outs = [model.forward_chunk(x[:, :1], t[:, :1], cross, cache, 0)]
        for s in range(1, frames, 3):
            outs.append(model.forward_chunk(x[:, s:s + 3], t[:, s:s + 3], cross, cache, s))
        ring = None if window is None else window[0] - window[1]
        sinks = 0 if window is None else window[1]
        full = model(x, t, ctx, mask=_offset_mask(frames, 3, 6, ring, sinks))
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-9, atol=1e-9)


FIRST_ALONE = StreamingConfig(latent_height=2, latent_width=2, local_attn_size=6, independent_first_frame=True)


def test_first_frame_alone_stream_equals_direct_loop_solo_and_pooled():
    embeds = torch.randn(5, TINY.text_dim, generator=torch.Generator().manual_seed(3))
    gen = StreamingGenerator.from_config("tiny", FIRST_ALONE, vae="tiny", seed=0, backend="eager")
    chunks = list(gen.stream(prompt_embeds=embeds, num_frames=37, seed=4))  # latents 1 + 3 x 3
    assert [c.latents.shape[0] for c in chunks] == [1, 3, 3, 3]
    assert [c.frames.shape[0] for c in chunks] == [1, 12, 12, 12]
    with torch.no_grad():
        cross = gen.dit.encode_context(embeds[None])
        cache = gen.dit.new_cache(FIRST_ALONE, 1)
        rng = torch.Generator().manual_seed(4)
        for i, (start, n) in enumerate([(0, 1), (1, 3), (4, 3), (7, 3)]):
            noise = torch.randn(1, n, 16, 2, 2, generator=rng)
            x0 = denoise_chunk(gen.dit, noise, cross, cache, start, gen.steps, generator=rng)
            torch.testing.assert_close(chunks[i].latents, x0[0], rtol=0, atol=0)
    # pooled: a stream starting (frame 0 alone) while another is mid-stream equals both alone
    pool = gen.pool(2)
    a = pool.open(prompt_embeds=embeds, num_frames=37, seed=4, decode=False)
    got = {a: [pool.step()[a].latents]}
    b = pool.open(prompt_embeds=embeds, num_frames=25, seed=4, decode=False)
    got[b] = []
    while pool.streams:
        for s, ch in pool.step().items():
            got[s].append(ch.latents)
    for s in (a, b):
        assert len(got[s]) == (4 if s is a else 3)
        for x, y in zip(got[s], [c.latents for c in chunks]):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"nearest valid: \[37, 25\]"):
        gen.stream(prompt_embeds=embeds, num_frames=33)


# --------------------------------------------------------------------------------------------
# The prompt-switch re-cache with kept sinks (LongLive's global sink)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["absolute", "cache_relative"])
def test_recache_keeping_sinks_equals_the_window_as_one_chunk(mode):
    from sf_sdk.sampling import recache

    model = tiny_model()
    stream = StreamingConfig(**GRID, local_attn_size=9, sink_size=3, position_mode=mode, recache_sinks=False)
    x = torch.randn(1, 15, 16, 4, 6, dtype=torch.float64)
    t0 = torch.zeros(1, 3, dtype=torch.float64)
    ctx_a, ctx_b = (torch.randn(1, 5, TINY.text_dim, dtype=torch.float64) for _ in range(2))
    with torch.no_grad():
        cross_a, cross_b = model.encode_context(ctx_a), model.encode_context(ctx_b)
        cache = model.new_cache(stream, 1)
        for s in range(0, 15, 3):  # the sinks are frames 0-2, the ring holds frames 9-14
            model.forward_chunk(x[:, s:s + 3], t0, cross_a, cache, s)
        tok = cache.layout.tokens_per_frame
        sinks_k, sinks_v = cache.k[:, :, :3 * tok].clone(), cache.v[:, :, :3 * tok].clone()
        recache(model, x[0, 9:15], cross_b, cache, 0, ChunkSchedule.from_config(stream), 3, keep_sinks=True)
        # the reference: the ring frames as one chunk under the new prompt, against the old sinks
        ref = model.new_cache(stream, 1)
        ref.k[:, :, :3 * tok], ref.v[:, :, :3 * tok] = sinks_k, sinks_v
        ref.end_frames[0] = 9  # frames 0-8 written: the sinks valid, the ring about to be the chunk's
        model.forward_chunk(x[:, 9:15], torch.zeros(1, 6, dtype=torch.float64), cross_b, ref, 9)
    torch.testing.assert_close(cache.k[:, :, :3 * tok], sinks_k, rtol=0, atol=0)  # the sinks are kept
    torch.testing.assert_close(cache.v[:, :, :3 * tok], sinks_v, rtol=0, atol=0)
    torch.testing.assert_close(cache.k[:, :, 3 * tok:], ref.k[:, :, 3 * tok:], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(cache.v[:, :, 3 * tok:], ref.v[:, :, 3 * tok:], rtol=1e-9, atol=1e-9)


def test_a_prompt_switch_keeps_the_sinks_in_a_stream():
    stream = StreamingConfig(latent_height=2, latent_width=2, local_attn_size=6, sink_size=3, recache_sinks=False)
    gen = StreamingGenerator.from_config("tiny", stream, seed=0, backend="eager")
    a, b = (torch.randn(5, TINY.text_dim, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    with gen.stream(prompt_embeds=a, seed=0, decode=False) as s:
        for _ in range(3):
            next(s)
        cache = gen._solo.cache
        tok = cache.layout.tokens_per_frame
        before = cache.k[:, :, :3 * tok].clone()
        s.set_prompt(prompt_embeds=b, transition="recache")
        chunk = next(s)
    assert torch.isfinite(chunk.latents).all()
    torch.testing.assert_close(cache.k[:, :, :3 * tok], before, rtol=0, atol=0)
