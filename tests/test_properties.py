"""Property-based tests (Hypothesis) of the cache planner and the frame arithmetic, each against a
plain reference written here: any window, sink, chunk size, stream length and row positions.

Examples are derandomized (the same cases on every run and in CI) and few, so the module runs in
seconds on one core.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sf_sdk import StreamingGenerator
from sf_sdk.cache import CacheLayout, KVCache, frame_visibility
from sf_sdk.config import StreamingConfig, VAEConfig
from sf_sdk.results import latent_frames_floor, latent_frames_for_video, video_frames_for_latents
from sf_sdk.sampling import kept_frames

SETTINGS = settings(max_examples=40, derandomize=True, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------
# The reference: a cache as a dict {frame slot: absolute frame}, written frame by frame
# --------------------------------------------------------------------------------------------


class RefCache:
    """Sinks keep the first ``sink`` frames; every later frame goes to the ring slot that held the
    oldest non-sink frame (once the ring is full), else to the next free ring slot."""

    def __init__(self, sink: int, ring: int) -> None:
        self.sink, self.ring = sink, ring
        self.slots: dict[int, int] = {}
        self.written = 0

    def write(self, frame: int) -> None:
        assert frame == self.written
        if frame < self.sink:
            self.slots[frame] = frame
        else:
            ring_frames = sorted((f, s) for s, f in self.slots.items() if s >= self.sink)
            if len(ring_frames) < self.ring:
                slot = self.sink + len(ring_frames)
            else:
                slot = ring_frames[0][1]  # the oldest non-sink frame is evicted
            self.slots[slot] = frame
        self.written += 1

    def held(self) -> list[int]:
        """Frames held, oldest first (sinks first)."""
        return sorted(self.slots.values())

    def slot_of(self, frame: int) -> int:
        return next(s for s, f in self.slots.items() if f == frame)


def visible(end: int, sink: int, ring: int | None) -> set[int]:
    """Frames a chunk ending at ``end`` may see (global attention: ``ring`` None)."""
    if ring is None:
        return set(range(end))
    return set(range(min(sink, end))) | set(range(max(sink, end - ring), end))


layouts = st.builds(lambda sink, extra, chunk, h, w: (sink, chunk + extra, chunk, (h, w)),
                    st.integers(0, 4), st.integers(0, 6), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3))


@SETTINGS
@given(layouts, st.integers(1, 12))
def test_plans_follow_the_reference_cache(geometry, chunks: int) -> None:
    sink, ring, chunk, grid = geometry
    lay = CacheLayout(grid, sink, ring)
    tokens = lay.tokens_per_frame
    cache = KVCache(lay, num_layers=1, batch_size=1, num_heads=1, head_dim=2, position_mode="cache_relative")
    absolute = KVCache(lay, num_layers=1, batch_size=1, num_heads=1, head_dim=2)
    ref = RefCache(sink, ring)
    for k in range(chunks):
        start, end = k * chunk, (k + 1) * chunk
        plan = cache.plan_chunk(start, chunk)
        for f in range(start, end):
            ref.write(f)
        # slots: the reference's slot of each frame, expanded to its tokens
        want = [ref.slot_of(f) * tokens + t for f in range(start, end) for t in range(tokens)]
        assert plan.write_slots[0].tolist() == want
        assert [lay.frame_slot(f) for f in range(start, end)] == [ref.slot_of(f) for f in range(start, end)]
        # what the chunk attends to: the valid prefix holds exactly the visible frames
        held = ref.held()
        assert set(held) == visible(end, sink, ring)
        assert plan.kv_lens[0] == len(held) * tokens
        assert {ref.slot_of(f) for f in held} == set(range(len(held)))  # a prefix of the buffer
        assert kept_frames(cache, 0) == held
        assert lay.evicted(end) == end - len(held)
        # positions: cache_relative = rank in the kept order; absolute = the frame index
        order = {f: i for i, f in enumerate(held)}
        assert plan.query_positions[0].tolist() == [order[f] for f in range(start, end)]
        by_slot = {ref.slot_of(f): order[f] for f in held}
        assert plan.key_positions[0].tolist() == [by_slot[s] for s in range(len(held))]
        assert absolute.plan_chunk(start, chunk).query_positions[0].tolist() == list(range(start, end))
    # the full-sequence mask states the same rule
    vis = frame_visibility(chunks * chunk, chunk, sink, ring)
    for i in range(chunks * chunk):
        end = (i // chunk + 1) * chunk
        assert set(torch.nonzero(vis[i]).flatten().tolist()) == visible(end, sink, ring)


@SETTINGS
@given(layouts, st.lists(st.one_of(st.none(), st.integers(0, 9)), min_size=1, max_size=4))
def test_rows_at_different_positions_plan_as_each_alone(geometry, starts_in_chunks) -> None:
    sink, ring, chunk, grid = geometry
    lay = CacheLayout(grid, sink, ring)
    rows = len(starts_in_chunks)
    pooled = KVCache(lay, 1, rows, 1, 2, position_mode="cache_relative")
    pooled.end_frames = [0 if s is None else s * chunk for s in starts_in_chunks]
    starts = [None if s is None else s * chunk for s in starts_in_chunks]
    plan = pooled.plan_rows(starts, chunk)
    assert plan.active == tuple(s is not None for s in starts)
    for r, s in enumerate(starts):
        if s is None:
            continue
        alone = KVCache(lay, 1, 1, 1, 2, position_mode="cache_relative")
        alone.end_frames = [s]
        one = alone.plan_chunk(s, chunk)
        assert plan.write_slots[r].tolist() == one.write_slots[0].tolist()
        assert plan.kv_lens[r] == one.kv_lens[0] == len(visible(s + chunk, sink, ring)) * lay.tokens_per_frame
        assert plan.query_positions[r].tolist() == one.query_positions[0].tolist()
        assert pooled.end_frames[r] == s + chunk


@SETTINGS
@given(layouts, st.integers(1, 12))
def test_global_attention_cache_holds_every_frame_and_no_more(geometry, chunks: int) -> None:
    _, _, chunk, grid = geometry
    lay = CacheLayout(grid, 0, chunks * chunk, global_attention=True)
    cache = KVCache(lay, 1, 1, 1, 2)
    for k in range(chunks):
        plan = cache.plan_chunk(k * chunk, chunk)
        assert plan.kv_lens[0] == (k + 1) * chunk * lay.tokens_per_frame
        assert plan.write_slots[0].tolist() == list(range(k * chunk * lay.tokens_per_frame,
                                                          (k + 1) * chunk * lay.tokens_per_frame))
    with pytest.raises(ValueError, match="global attention cache holds"):
        cache.plan_chunk(chunks * chunk, chunk)


@SETTINGS
@given(st.integers(1, 4), st.integers(0, 3), st.integers(0, 8), st.one_of(st.none(), st.integers(1, 40)))
def test_cache_size_fits_what_the_stream_can_use(chunk: int, sink: int, extra: int, stream_frames: int | None) -> None:
    window = sink + chunk + extra
    stream = StreamingConfig(num_frame_per_block=chunk, local_attn_size=window, sink_size=sink,
                             latent_height=2, latent_width=2)
    from sf_sdk.config import DIT_PRESETS

    lay = CacheLayout.from_configs(DIT_PRESETS["tiny"], stream, stream_frames, fit=True)
    if stream_frames is not None and stream_frames < window:
        assert lay.capacity_frames == stream_frames and lay.global_attention
    else:
        assert (lay.sink_frames, lay.ring_frames) == (sink, window - sink)
    # either way every chunk of the stream sees what the window allows
    total = stream_frames if stream_frames is not None else 3 * window
    cache = KVCache(lay, 1, 1, 1, 2)
    for k in range(total // chunk):
        end = (k + 1) * chunk
        assert cache.plan_chunk(k * chunk, chunk).kv_lens[0] == len(visible(end, sink, window - sink)) * lay.tokens_per_frame


# --------------------------------------------------------------------------------------------
# Frame arithmetic
# --------------------------------------------------------------------------------------------


@SETTINGS
@given(st.integers(1, 8), st.integers(0, 400))
def test_video_and_latent_frame_counts(stride: int, latents: int) -> None:
    video = video_frames_for_latents(latents, stride)
    assert video == (0 if latents == 0 else 1 + stride * (latents - 1))  # the causal VAE: first frame alone
    if latents:
        assert latent_frames_for_video(video, stride) == latents
        assert latent_frames_floor(video, stride) == latents
        # the floor: the most latent frames whose decode fits in a count between two valid ones
        for v in range(video, video + stride):
            assert latent_frames_floor(v, stride) == latents
        if stride > 1:
            with pytest.raises(ValueError):
                latent_frames_for_video(video + 1, stride)


_GENS: dict[tuple[int, int], StreamingGenerator] = {}


def _gen(chunk: int, stride: int) -> StreamingGenerator:
    """A tiny generator with ``chunk`` latent frames per chunk and a VAE of temporal ``stride``."""
    if (chunk, stride) not in _GENS:
        down = {1: (False, False, False), 2: (False, False, True), 4: (False, True, True)}[stride]
        stream = StreamingConfig(num_frame_per_block=chunk, latent_height=2, latent_width=2, local_attn_size=2 * chunk)
        _GENS[chunk, stride] = StreamingGenerator.from_config("tiny", stream, vae=VAEConfig(dim=8, temperal_downsample=down))
    return _GENS[chunk, stride]


def _valid_counts(chunk: int, stride: int, up_to: int) -> list[int]:
    """Every video frame count of whole chunks, reference enumeration."""
    return [1 + stride * (k * chunk - 1) for k in range(1, up_to // (stride * chunk) + 3)]


@SETTINGS
@given(st.integers(1, 4), st.sampled_from([1, 2, 4]), st.integers(1, 200))
def test_valid_frame_counts_and_rounding(chunk: int, stride: int, near: int) -> None:
    gen = _gen(chunk, stride)
    valid = _valid_counts(chunk, stride, near + 2 * stride * chunk)
    embeds = torch.zeros(2, gen.dit.config.text_dim)
    got = gen.valid_num_frames(near)
    assert got == sorted(valid, key=lambda n: (abs(n - near), n))[:2]
    assert gen.round_up_frames(near) == min(n for n in valid if n >= near)
    for n in (near, *got):  # what the request check accepts is exactly the valid set
        ok = n in valid
        if ok:
            req = gen._check_request(None, embeds, n, 0, True, None, None)
            assert req.latent_frames == latent_frames_floor(n, stride) and req.latent_frames % chunk == 0
        else:
            with pytest.raises(ValueError, match="not a whole number of chunks"):
                gen._check_request(None, embeds, n, 0, True, None, None)


@SETTINGS
@given(st.integers(1, 4), st.sampled_from([1, 2, 4]), st.integers(1, 30))
def test_chunks_tile_the_video(chunk: int, stride: int, chunks: int) -> None:
    gen = _gen(chunk, stride)
    first = video_frames_for_latents(chunk, stride)
    sizes = [video_frames_for_latents((k + 1) * chunk, stride) - video_frames_for_latents(k * chunk, stride)
             for k in range(chunks)]
    assert sizes == [first] + [gen.chunk_frames] * (chunks - 1)
    assert sum(sizes) == video_frames_for_latents(chunks * chunk, stride) == 1 + stride * (chunks * chunk - 1)


@settings(max_examples=4, derandomize=True, deadline=None)
@given(st.integers(1, 3), st.sampled_from([1, 2, 4]), st.integers(1, 2))
def test_streamed_chunks_have_the_counted_frames(chunk: int, stride: int, chunks: int) -> None:
    gen = _gen(chunk, stride)
    n = video_frames_for_latents(chunks * chunk, stride)
    video = gen.generate(prompt_embeds=torch.zeros(2, gen.dit.config.text_dim), num_frames=n)
    assert video.frames.shape[0] == n and video.latents.shape[0] == chunks * chunk
    assert len(video.timings) == chunks
