"""Rolling Forcing's joint denoising window (``StreamingConfig.denoise_window`` > 1): each window
call equals the full-sequence forward under the window's mask, a stream equals a direct loop of the
method written here, ``denoise_window=1`` is today's stream, and unsupported combinations say so."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from dit_util import random_dit

from sf_sdk import StreamingGenerator
from sf_sdk.backends import Backend, register_backend
from sf_sdk.cache import frame_visibility, window_visibility
from sf_sdk.config import DIT_PRESETS, StreamingConfig
from sf_sdk.models.dit import WanDiT
from sf_sdk.sampling import ChunkSchedule

TINY = DIT_PRESETS["tiny"]
GRID = {"latent_height": 4, "latent_width": 6}  # 2x3 = 6 tokens per frame
TOKENS = 6
SHAPE = (TINY.in_dim, 4, 6)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model() -> WanDiT:
    return random_dit()


def token_mask(frames: torch.Tensor) -> torch.Tensor:
    return frames.repeat_interleave(TOKENS, 0).repeat_interleave(TOKENS, 1)  # [F*T, F*T]


def ring_of(stream: StreamingConfig) -> int | None:
    return stream.local_attn_size - stream.sink_size if stream.rolling else None


# --------------------------------------------------------------------------------------------
# (a) one window call == the full-sequence forward under the window's mask
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream, clean", [
    (StreamingConfig(**GRID, global_cache_frames=21), 9),  # global: the window sees every clean frame
    (StreamingConfig(**GRID, local_attn_size=12, sink_size=3), 18),  # sinks, evictions, a ring only partly seen
    (StreamingConfig(**GRID, local_attn_size=15, sink_size=3, position_mode="cache_relative"), 6),  # all held seen
])
def test_window_call_equals_full_sequence_forward(stream: StreamingConfig, clean: int) -> None:
    model, c, w = tiny_model(), stream.num_frame_per_block, 6  # a window of 2 chunks
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, clean + w, *SHAPE, generator=g, dtype=torch.float64)
    t = torch.cat([torch.zeros(1, clean, dtype=torch.float64),  # clean frames: the cache pass's timestep
                   torch.tensor([[250.0] * 3 + [900.0] * 3], dtype=torch.float64)], dim=1)  # [1, F]
    ctx = torch.randn(1, 5, TINY.text_dim, generator=g, dtype=torch.float64)
    with torch.no_grad():
        cross = model.encode_context(ctx)
        cache = model.new_cache(stream, 1)
        for s in range(0, clean, c):  # the cache passes of the clean chunks
            model.write_cache(x[:, s:s + c], t[:, s:s + c], cross, cache, s)
        before = cache.k.clone()
        out = model.forward_window(x[:, clean:], t[:, clean:], cross, cache)
        mask = token_mask(window_visibility(clean, w, c, stream.sink_size, ring_of(stream)))
        full = model(x, t, ctx, mask=mask)[:, clean:]
    torch.testing.assert_close(out, full, rtol=1e-9, atol=1e-9)
    assert torch.equal(cache.k, before) and cache.end_frame == clean  # the window writes nothing


def test_window_mask_rule() -> None:
    # 12 clean frames, a ring of 9 with 3 sinks, a window of 6: the window sees the sinks 0-2, the
    # newest 9 - 6 = 3 clean frames 9-11 and itself; clean frames keep the cache's rule.
    vis = window_visibility(12, 6, 3, sink_frames=3, ring_frames=9)
    assert vis[12:, :12].nonzero()[:, 1].unique().tolist() == [0, 1, 2, 9, 10, 11]
    assert vis[12:, 12:].all()
    assert torch.equal(vis[:12, :12], frame_visibility(12, 3, 3, 9))


def test_cache_relative_without_sinks_equals_absolute() -> None:
    # RoPE sees offsets only: with no sinks the window's context is contiguous, so rotating it by its
    # place (cache_relative) equals rotating at absolute frames, also after evictions and drops.
    model, c = tiny_model(), 3
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 27, *SHAPE, generator=g, dtype=torch.float64)
    t = torch.cat([torch.zeros(1, 21, dtype=torch.float64), torch.full((1, 6), 600.0, dtype=torch.float64)], dim=1)
    cross = model.encode_context(torch.randn(1, 5, TINY.text_dim, generator=g, dtype=torch.float64))
    outs = []
    with torch.no_grad():
        for mode in ("absolute", "cache_relative"):
            cache = model.new_cache(StreamingConfig(**GRID, local_attn_size=12, position_mode=mode), 1)
            for s in range(0, 21, c):
                model.write_cache(x[:, s:s + c], t[:, s:s + c], cross, cache, s)
            outs.append(model.forward_window(x[:, 21:], t[:, 21:], cross, cache))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------------
# (b) a stream == the method written out directly (full-sequence forwards, no cache)
# --------------------------------------------------------------------------------------------


def rolling_reference(model: WanDiT, stream: StreamingConfig, ctx: torch.Tensor, chunks: int, seed: int) -> torch.Tensor:
    """Rolling Forcing, written out: a window of one chunk per step, the newest entering as noise at
    the first step, the oldest leaving clean after the last; every call is the whole video so far
    (clean frames at timestep 0, then the window) under the window's mask. Noise as the stream draws
    it: the entering chunk's, then the re-noising of the chunks that stay."""
    steps = ChunkSchedule.from_config(stream)
    ts, n, c = steps.timesteps, len(steps.timesteps), stream.num_frame_per_block
    g = torch.Generator().manual_seed(seed)
    clean: list[torch.Tensor] = []
    window: list[list] = []  # [x of the chunk [1, c, C, H, W], its step]
    while len(clean) < chunks:
        if len(window) < n and len(clean) + len(window) < chunks:
            window.append([torch.randn(1, c, *SHAPE, generator=g, dtype=torch.float64), 0])
        p, w = len(clean) * c, len(window) * c
        xw = torch.cat([x for x, _ in window], dim=1)
        tw = torch.tensor([[ts[k] for _, k in window for _ in range(c)]], dtype=torch.float64)
        x = torch.cat(clean + [xw], dim=1)
        t = torch.cat([torch.zeros(1, p, dtype=torch.float64), tw], dim=1)
        mask = token_mask(window_visibility(p, w, c, stream.sink_size, ring_of(stream)))
        x0 = steps.schedule.x0_from_flow(model(x, t, ctx, mask=mask)[:, p:], xw, tw)
        if window[0][1] == n - 1:
            clean.append(x0[:, :c])
            window, x0 = window[1:], x0[:, c:]
        if window:
            tn = torch.tensor([[ts[k + 1] for _, k in window for _ in range(c)]], dtype=torch.float64)
            xn = steps.schedule.add_noise(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), tn)
            window = [[xn[:, i * c:(i + 1) * c], k + 1] for i, (_, k) in enumerate(window)]
    return torch.cat(clean, dim=1)[0]  # [chunks*c, C, H, W]


def window_generator(stream: StreamingConfig) -> StreamingGenerator:
    gen = StreamingGenerator.from_config("tiny", stream, dtype="float64", backend="eager")
    gen.dit.load_state_dict(tiny_model().state_dict())
    return gen


@pytest.mark.parametrize("stream, chunks", [
    # 3 steps: a window of 3 chunks; sinks, a 12-frame ring (3 frames of it beside the window), evictions
    (StreamingConfig(**GRID, denoising_step_list=(1000.0, 750.0, 500.0), denoise_window=3, local_attn_size=15,
                     sink_size=3), 8),
    # global attention, a stream shorter than the window (it fills and drains without a full window)
    (StreamingConfig(**GRID, denoising_step_list=(1000.0, 500.0, 250.0), denoise_window=3), 2),
])
def test_stream_equals_rolling_reference(stream: StreamingConfig, chunks: int) -> None:
    gen = window_generator(stream)
    ctx = torch.randn(1, 5, TINY.text_dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    frames = 1 + gen.temporal_stride * (chunks * 3 - 1)
    out = list(gen.stream(prompt_embeds=ctx[0], num_frames=frames, seed=7, decode=False))
    assert [ch.start_frame for ch in out] == list(range(0, chunks * 3, 3))
    got = torch.cat([ch.latents for ch in out])
    with torch.no_grad():
        want = rolling_reference(gen.dit, stream, ctx, chunks, seed=7)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_window_streams_steer_reset_and_close() -> None:
    stream = StreamingConfig(**GRID, denoising_step_list=(1000.0, 500.0), denoise_window=2, local_attn_size=9,
                             sink_size=3, position_mode="cache_relative")
    gen = window_generator(stream)
    emb = torch.randn(5, TINY.text_dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    other = torch.randn(5, TINY.text_dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with gen.stream(prompt_embeds=emb, seed=0, decode=False) as s:  # unbounded: the window never drains
        it = iter(s)
        firsts = [next(it).latents for _ in range(4)]
        s.set_prompt(prompt_embeds=other, transition="recache")  # re-encodes the clean cached frames
        after = next(it)
        s.set_prompt(prompt_embeds=emb, transition="blend", chunks=2)
        nxt = [next(it), next(it)]
        s.reset()
        again = next(it)
    assert s.closed
    assert after.start_frame == 12 and [c.start_frame for c in nxt] == [15, 18] and again.start_frame == 0
    assert all(torch.isfinite(x).all() for x in firsts + [after.latents, again.latents])
    # the same stream again from the same seed: the same first chunks (nothing left over from the last)
    with gen.stream(prompt_embeds=emb, seed=0, decode=False) as s2:
        it2 = iter(s2)
        assert all(torch.equal(next(it2).latents, x) for x in firsts)


# --------------------------------------------------------------------------------------------
# (c) denoise_window=1 is today's stream
# --------------------------------------------------------------------------------------------


def test_window_of_one_is_the_chunk_by_chunk_stream() -> None:
    base = StreamingConfig(**GRID, local_attn_size=9, sink_size=3)
    explicit = dataclasses.replace(base, denoise_window=1)
    assert explicit == base and StreamingConfig().denoise_window == 1
    emb = torch.randn(5, TINY.text_dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    runs = []
    for stream in (base, explicit):
        gen = window_generator(stream)
        runs.append(torch.cat([c.latents for c in gen.stream(prompt_embeds=emb, num_frames=45, seed=3, decode=False)]))
    assert torch.equal(runs[0], runs[1])


# --------------------------------------------------------------------------------------------
# (d) what it does not support says so
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, match", [
    ({"denoise_window": 0}, "denoise_window must be >= 1"),
    ({"denoise_window": 3}, r"one chunk per denoising step .* must equal len\(denoising_step_list\) = 4"),
    ({"denoise_window": 4, "first_chunk_steps": (1000.0, 500.0)}, "does not support first_chunk_steps"),
    ({"denoise_window": 4, "independent_first_frame": True}, "does not support independent_first_frame"),
    ({"denoise_window": 4, "local_attn_size": 9, "sink_size": 3, "sink_decay": 0.9,
      "position_mode": "cache_relative"}, "does not support sink_decay < 1"),
    ({"denoise_window": 4, "local_attn_size": 12, "sink_size": 3}, "raise local_attn_size to at least 15"),
])
def test_unsupported_combinations_are_errors(fields: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StreamingConfig(**fields)


def test_pools_and_exported_backends_are_errors() -> None:
    stream = StreamingConfig(**GRID, denoising_step_list=(1000.0, 500.0), denoise_window=2, local_attn_size=9)
    gen = window_generator(stream)
    with pytest.raises(ValueError, match="runs one stream at a time"):
        gen.pool(2)
    assert gen.pool(1).max_streams == 1

    class Exported(torch.nn.Module):  # stands for an exported chunk step: not the eager WanDiT
        pass

    register_backend("test-exported-step", lambda g, options: Backend("test-exported-step", Exported(), None))
    gen.use_backend("test-exported-step")
    with pytest.raises(ValueError, match="runs the eager DiT .* use backend='eager'"):
        next(iter(gen.stream(prompt_embeds=torch.randn(5, TINY.text_dim, dtype=torch.float64), num_frames=9,
                             decode=False)))


def test_training_rollout_refuses_the_window() -> None:
    from training.algorithms.rollout import rollout

    stream = StreamingConfig(**GRID, denoising_step_list=(1000.0, 500.0), denoise_window=2)
    model = tiny_model()
    cross = model.encode_context(torch.zeros(1, 5, TINY.text_dim, dtype=torch.float64))
    with pytest.raises(ValueError, match="rollout denoises chunk by chunk.*train with denoise_window=1"):
        rollout(model, cross, torch.zeros(1, 6, *SHAPE, dtype=torch.float64), stream, mode="self_forcing",
                exit_step=1, generator=None)
