"""Resources: the KV cache is sized by what a stream can use, and a request that cannot fit in
memory is refused before anything is allocated, with the window and the bytes in the message."""

from __future__ import annotations

import pytest
import torch

from sf_sdk import StreamingGenerator
from sf_sdk.cache import CacheLayout, OutOfMemoryRequest, available_memory, cache_nbytes
from sf_sdk.config import StreamingConfig


def _gen(window: int, sink: int = 0) -> StreamingGenerator:
    stream = StreamingConfig(latent_height=2, latent_width=2, local_attn_size=window, sink_size=sink)
    return StreamingGenerator.from_config("tiny", stream, vae="tiny", seed=0)


def _embeds() -> torch.Tensor:
    return torch.randn(4, 32, generator=torch.Generator().manual_seed(3))


def test_a_bounded_stream_holds_only_its_own_frames_and_computes_the_same() -> None:
    huge, fitting = _gen(30000, sink=3), _gen(9)
    a = huge.generate(prompt_embeds=_embeds(), num_frames=21, seed=5)  # 6 latent frames, a window of 30000
    cache = huge._solo.cache
    assert cache.layout.capacity_frames == 6 and cache.nbytes() == cache_nbytes(
        cache.layout, 2, 1, 4, 24, torch.float32)
    window_bytes = cache_nbytes(CacheLayout.from_configs(huge.dit.config, huge.streaming), 2, 1, 4, 24, torch.float32)
    assert window_bytes == 5000 * cache.nbytes()
    b = fitting.generate(prompt_embeds=_embeds(), num_frames=21, seed=5)  # nothing evicted in either
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=1e-5)


def test_streams_longer_than_the_window_or_unbounded_hold_the_window() -> None:
    gen = _gen(6)
    gen.generate(prompt_embeds=_embeds(), num_frames=33, decode=False)  # 9 latent frames > 6
    assert gen._solo.cache.layout.capacity_frames == 6 and not gen._solo.cache.layout.global_attention
    with gen.stream(prompt_embeds=_embeds(), decode=False) as s:
        next(s)
        assert gen._solo.cache.layout.capacity_frames == 6


def test_a_window_that_cannot_fit_is_refused_before_allocating() -> None:
    free = available_memory("cpu")
    assert free is not None and free > 0
    frames = 3 * (free // (2 * 2 * 24 * 4 * 4) + 3)  # more frame slots than the free bytes can hold
    gen = _gen(frames)
    with pytest.raises(OutOfMemoryRequest, match=rf"KV cache of {frames} latent frames \(the window: local_attn_size "
                                                  rf"/ --window {frames}\) needs .* GiB \(\d+ bytes\), cpu has .* "
                                                  rf"available: lower the window"):
        next(gen.stream(prompt_embeds=_embeds(), decode=False))
    assert issubclass(OutOfMemoryRequest, ValueError) and issubclass(OutOfMemoryRequest, MemoryError)
    with pytest.raises(OutOfMemoryRequest, match=r"for 2 streams .* or pool fewer streams"):
        gen.pool(2)
    # the same window for a short bounded stream fits: its cache is its own length
    assert gen.generate(prompt_embeds=_embeds(), num_frames=9, decode=False).latents.shape[0] == 3


def test_a_pool_with_max_frames_under_the_window_holds_only_those_frames() -> None:
    gen = _gen(30000)
    pool = gen.pool(2, max_frames=21)  # 6 latent frames
    assert pool.cache.layout.capacity_frames == 6
    a = pool.open(prompt_embeds=_embeds(), num_frames=21, seed=5, decode=False)
    got = [pool.step()[a].latents for _ in range(2)]
    alone = gen.generate(prompt_embeds=_embeds(), num_frames=21, seed=5, decode=False)
    torch.testing.assert_close(torch.cat(got), alone.latents, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"this pool's cache holds 21 video frames; the stream asks for an unbounded "
                                         r"stream: build the pool with a larger max_frames, or none \(the window\)"):
        pool.open(prompt_embeds=_embeds(), decode=False)
    assert _gen(6).pool(1, max_frames=81).cache.layout.capacity_frames == 6  # longer than the window: the window
