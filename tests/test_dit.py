"""The causal DiT, its KV cache and schedule: parity, streaming == full sequence, limits, export."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from dit_util import random_dit

from sf_sdk.cache import KVCache
from sf_sdk.config import DIT_PRESETS, DiTConfig, StreamingConfig
from sf_sdk.models.dit import ChunkStep, WanDiT, block_causal_mask
from sf_sdk.parity import check_file
from sf_sdk.sampling import ChunkSchedule, denoise_chunk

TINY = DIT_PRESETS["tiny"]


def tiny_model(dtype=torch.float64, **overrides) -> WanDiT:
    return random_dit(dtype=dtype, **overrides)


@pytest.mark.parametrize("name", ["dit_causal_global", "dit_causal_rolling", "dit_causal_rolling_sink",
                                  "dit_bidirectional", "scheduler"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_golden_parity(golden_dir, name, dtype):
    res = check_file(golden_dir / f"{name}.safetensors", dtype)
    assert res.status == "ok", (res.status, res.detail, res.errors)


STREAMS = {
    "global": StreamingConfig(latent_height=4, latent_width=6),
    "window": StreamingConfig(latent_height=4, latent_width=6, local_attn_size=6),
    "window_not_multiple": StreamingConfig(latent_height=4, latent_width=6, local_attn_size=7),
    "window_sink": StreamingConfig(latent_height=4, latent_width=6, local_attn_size=6, sink_size=3),
    "sink_1_frame": StreamingConfig(latent_height=4, latent_width=6, local_attn_size=5, sink_size=1),
    "framewise": StreamingConfig(latent_height=4, latent_width=6, num_frame_per_block=1, local_attn_size=3,
                                 sink_size=1),
}


@pytest.mark.parametrize("mode", list(STREAMS))
def test_streaming_equals_block_causal_forward(mode):
    stream = STREAMS[mode]
    model = tiny_model()
    frames = 15 if stream.num_frame_per_block == 3 else 7
    x = torch.randn(2, frames, 16, 4, 6, dtype=torch.float64)
    t = torch.rand(2, frames, dtype=torch.float64) * 1000
    ctx = torch.randn(2, 5, TINY.text_dim, dtype=torch.float64)
    with torch.no_grad():
        mask = block_causal_mask(frames, 6, stream)
        full = model(x, t, ctx, mask=mask)
        cache = model.new_cache(stream, 2, num_frames=frames)
        cross = model.encode_context(ctx)
        c = stream.num_frame_per_block
        for s in range(0, frames, c):
            # a noisy call first: its keys must be overwritten by the second call
            model.forward_chunk(torch.randn_like(x[:, s:s + c]), t[:, s:s + c] * 0.5, cross, cache, s)
            out = model.forward_chunk(x[:, s:s + c], t[:, s:s + c], cross, cache, s)
            torch.testing.assert_close(out, full[:, s:s + c], rtol=1e-9, atol=1e-9)
    assert cache.end_frame == frames
    if stream.rolling:
        assert cache.layout.capacity_frames == stream.local_attn_size  # evictions happened


@pytest.mark.parametrize("mode", ["global", "window_sink", "framewise", "relative"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_write_cache_leaves_the_cache_forward_chunk_leaves(mode, dtype):
    """The cache pass's shortcut (the last layer stops after its keys/values, no head) writes
    every layer's keys/values bit for bit as the full call does, chunk after chunk."""
    stream = (dataclasses.replace(STREAMS["window_sink"], position_mode="cache_relative") if mode == "relative"
              else STREAMS[mode])
    model = tiny_model(dtype)
    c = stream.num_frame_per_block
    frames = 5 * c
    x = torch.randn(2, frames, 16, 4, 6, dtype=dtype)
    t = torch.rand(2, frames, dtype=dtype) * 1000
    ctx = torch.randn(2, 5, TINY.text_dim, dtype=dtype)
    with torch.no_grad():
        cross = model.encode_context(ctx)
        full, short = model.new_cache(stream, 2, num_frames=frames), model.new_cache(stream, 2, num_frames=frames)
        for s in range(0, frames, c):
            model.forward_chunk(x[:, s:s + c], t[:, s:s + c], cross, full, s)
            assert model.write_cache(x[:, s:s + c], t[:, s:s + c], cross, short, s) is None
            assert torch.equal(full.k, short.k) and torch.equal(full.v, short.v)
            assert full.end_frame == short.end_frame


def test_cpu_matmul_layout_keeps_values_outputs_and_saving(tmp_path):
    """use_cpu_matmul_layout stores each linear weight as its contiguous transpose: the same values,
    parameters and state dict, the same stream (float64), the fused q/k/v copy in the same layout,
    and the weights still save; the generator applies it to CPU models."""
    from safetensors.torch import load_file, save_model

    from sf_sdk import StreamingGenerator

    stream = STREAMS["window_sink"]
    model = tiny_model(seed=3)
    standard = tiny_model(seed=3)
    params = {name: p for name, p in model.named_parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.use_cpu_matmul_layout() is model
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.t().is_contiguous() and not m.weight.is_contiguous() for m in linears)
    assert {name: p for name, p in model.named_parameters()} == params  # the same objects
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    w, _, _ = model.blocks[0].self_attn.fused_qkv()
    assert w.t().is_contiguous()
    frames, c = 12, stream.num_frame_per_block
    x = torch.randn(1, frames, 16, 4, 6, dtype=torch.float64)
    t = torch.rand(1, frames, dtype=torch.float64) * 1000
    ctx = torch.randn(1, 5, TINY.text_dim, dtype=torch.float64)
    with torch.no_grad():
        caches = [m.new_cache(stream, 1, num_frames=frames) for m in (model, standard)]
        crosses = [m.encode_context(ctx) for m in (model, standard)]
        for s in range(0, frames, c):
            a, b = (m.forward_chunk(x[:, s:s + c], t[:, s:s + c], cr, ca, s)
                    for m, cr, ca in zip((model, standard), crosses, caches))
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    save_model(model, str(tmp_path / "w.safetensors"))
    loaded = load_file(str(tmp_path / "w.safetensors"))
    assert all(torch.equal(loaded[k], before[k]) for k in loaded)
    gen = StreamingGenerator(tiny_model(seed=3, dtype=torch.float32), StreamingConfig(latent_height=4, latent_width=6),
                             backend="eager")
    assert gen.dit.blocks[0].ffn[0].weight.t().is_contiguous()


def test_cache_relative_matches_absolute_without_sinks_and_bounds_positions():
    model = tiny_model()
    base = StreamingConfig(latent_height=4, latent_width=6, local_attn_size=6)
    rel = dataclasses.replace(base, position_mode="cache_relative")
    x = torch.randn(1, 18, 16, 4, 6, dtype=torch.float64)
    ctx = torch.randn(1, 5, TINY.text_dim, dtype=torch.float64)
    t = torch.full((1, 3), 500.0, dtype=torch.float64)
    with torch.no_grad():
        cross = model.encode_context(ctx)
        ca, cr = model.new_cache(base, 1), model.new_cache(rel, 1)
        for s in range(0, 18, 3):
            a = model.forward_chunk(x[:, s:s + 3], t, cross, ca, s)
            r = model.forward_chunk(x[:, s:s + 3], t, cross, cr, s)
            torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9)
            plan = cr.plan_chunk(s, 3)
            assert int(plan.key_positions.max()) < rel.local_attn_size
            assert int(plan.query_positions.max()) < rel.local_attn_size


def test_cache_relative_with_sinks_equals_shifted_full_sequence():
    # With sinks, the chunk sees the sinks as if the ring frames directly followed them.
    model = tiny_model()
    stream = StreamingConfig(latent_height=4, latent_width=6, local_attn_size=6, sink_size=3,
                             position_mode="cache_relative")
    x = torch.randn(1, 12, 16, 4, 6, dtype=torch.float64)
    ctx = torch.randn(1, 5, TINY.text_dim, dtype=torch.float64)
    t = torch.full((1, 3), 300.0, dtype=torch.float64)
    with torch.no_grad():
        cross = model.encode_context(ctx)
        cache = model.new_cache(stream, 1)
        for s in range(0, 12, 3):
            out = model.forward_chunk(x[:, s:s + 3], t, cross, cache, s)
        # last chunk (frames 9-11) sees sinks 0-2 and itself, at positions 0-2 and 3-5
        window = torch.cat([x[:, 0:3], x[:, 9:12]], dim=1)
        ref = model(window, torch.full((1, 6), 300.0, dtype=torch.float64), ctx,
                    mask=block_causal_mask(6, 6, StreamingConfig(latent_height=4, latent_width=6)))
    torch.testing.assert_close(out, ref[:, 3:], rtol=1e-9, atol=1e-9)


def test_rope_has_no_position_limit_and_keeps_precision():
    model = tiny_model(dtype=torch.float32)
    x = torch.randn(1, 6, 16, 4, 6)
    t = torch.full((1, 6), 400.0)
    ctx = torch.randn(1, 5, TINY.text_dim)
    mask = block_causal_mask(6, 6, StreamingConfig(latent_height=4, latent_width=6))
    with torch.no_grad():
        near = model(x, t, ctx, mask=mask, start_frame=0)
        far = model(x, t, ctx, mask=mask, start_frame=10_000_000)  # RoPE sees only offsets
    torch.testing.assert_close(far, near, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rope_tables_equal_cos_sin_of_the_concatenated_angles(dtype: torch.dtype):
    # The tables are built axis by axis (height / width parts made once per grid); they must be
    # exactly cos / sin of Wan's concatenated [frame | height | width] angles, per row or shared.
    rope = tiny_model(dtype=torch.float32).rope
    h, w = 4, 6
    inv = [rope.theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d) for d in rope.axis_dims]
    for positions in (torch.tensor([0, 1, 2]), torch.tensor([[3, 4, 5], [999_997, 999_998, 999_999]])):
        rows = positions.reshape(-1, positions.shape[-1])
        angles = []
        for p in rows:
            f, y, x = torch.meshgrid(p.double(), torch.arange(h, dtype=torch.float64),
                                     torch.arange(w, dtype=torch.float64), indexing="ij")
            angles.append(torch.cat([f.reshape(-1, 1) * inv[0], y.reshape(-1, 1) * inv[1],
                                     x.reshape(-1, 1) * inv[2]], dim=-1))  # [F*h*w, head_dim/2]
        angles = torch.stack(angles).reshape(*positions.shape[:-1], -1, angles[0].shape[-1])
        for _ in range(2):  # the second call reads the per-grid tables made by the first
            cos, sin = rope.table(positions, (h, w), dtype)
            assert torch.equal(cos, torch.cos(angles).to(dtype)) and torch.equal(sin, torch.sin(angles).to(dtype))


def test_chunk_timesteps_are_made_once_but_embedded_per_chunk():
    # The sampler keeps a chunk's timestep and sigma tensors on the schedule for the chunks after
    # it; what the model computes from them (the time embeddings) must not carry over: after a
    # weight change a memoised schedule gives what a fresh one gives.
    model = tiny_model(dtype=torch.float32)
    stream = StreamingConfig(latent_height=2, latent_width=2)
    noise = torch.randn(1, 3, 16, 2, 2, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(1, 4, TINY.text_dim, generator=torch.Generator().manual_seed(2))

    def chunk(steps: ChunkSchedule) -> torch.Tensor:
        cache = model.new_cache(stream, 1)
        return denoise_chunk(model, noise, model.encode_context(ctx), cache, 0, steps,
                             generator=torch.Generator().manual_seed(0))

    steps = ChunkSchedule.from_config(stream)
    with torch.no_grad():
        before = chunk(steps)
        assert len(steps.chunk_tables) == 1
        for p in model.time_embedding.parameters():
            p.mul_(1.5)
        memoised, fresh = chunk(steps), chunk(ChunkSchedule.from_config(stream))
    assert torch.equal(memoised, fresh) and not torch.equal(memoised, before)
    assert len(steps.chunk_tables) == 1


def test_3000_frame_stream_constant_cache_finite_output():
    model = tiny_model(dtype=torch.float32)
    # 15-frame chunks keep the call count (and the test time) low: 200 chunks, 3000 latent frames.
    stream = StreamingConfig(latent_height=2, latent_width=2, num_frame_per_block=15, local_attn_size=45,
                             sink_size=15, denoising_step_list=(1000.0,))
    steps = ChunkSchedule.from_config(stream)
    cache = model.new_cache(stream, 1)
    ptr, shape = cache.k.data_ptr(), tuple(cache.k.shape)
    cross = model.encode_context(torch.randn(1, 4, TINY.text_dim))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for s in range(0, 3000, 15):
            x0 = denoise_chunk(model, torch.randn(1, 15, 16, 2, 2, generator=gen), cross, cache, s, steps,
                               generator=gen)
            assert torch.isfinite(x0).all()
    assert cache.end_frame == 3000
    assert cache.k.data_ptr() == ptr and tuple(cache.k.shape) == shape


def _step_inputs(model: WanDiT, stream: StreamingConfig, start: int):
    cache = model.new_cache(stream, 1)
    cross = model.encode_context(torch.randn(1, 5, TINY.text_dim))
    x = torch.randn(1, 3, 16, 4, 6)
    t = torch.full((1, 3), 750.0)
    # fill earlier chunks so the window is full and wrapped
    with torch.no_grad():
        for s in range(0, start, 3):
            model.forward_chunk(torch.randn_like(x), t, cross, cache, s)
    plan = cache.plan_chunk(start, 3)
    attend = model.step_attention(cache, plan)
    return cache, cross, x, t, plan, attend


def test_chunk_step_exports_without_graph_breaks():
    model = tiny_model(dtype=torch.float32)
    stream = StreamingConfig(latent_height=4, latent_width=6, local_attn_size=6)
    cache, cross, x, t, plan, attend = _step_inputs(model, stream, 9)
    kv_len = torch.tensor(plan.kv_len)
    args = (x, t, cross.k, cross.v, cache.k.clone(), cache.v.clone(), plan.write_slots, kv_len,
            attend.cos_q, attend.sin_q)
    step = ChunkStep(model, functional=True).eval()
    with torch.no_grad():
        exported = torch.export.export(step, args, strict=False)
        flow, new_k, _ = exported.module()(*args)
        ref = model.forward_chunk(x, t, cross, cache, 9, attend)
    torch.testing.assert_close(flow, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_k, cache.k, rtol=1e-5, atol=1e-5)


def test_cache_only_step_writes_what_the_chunk_step_writes():
    """ChunkStep(cache_only=True), the exported cache pass: exported, it leaves the cache as the whole
    in-place step does (every layer's keys/values, to float32 rounding of the export), running less."""
    model = tiny_model(dtype=torch.float32)
    stream = StreamingConfig(latent_height=4, latent_width=6, local_attn_size=6)
    cache, cross, x, t, plan, attend = _step_inputs(model, stream, 9)
    kv_len = torch.tensor(plan.kv_len)

    def args(k, v):
        return (x, t, cross.k, cross.v, k, v, plan.write_slots, kv_len, attend.cos_q, attend.sin_q)

    full_k, full_v, only_k, only_v = cache.k.clone(), cache.v.clone(), cache.k.clone(), cache.v.clone()
    with torch.no_grad():
        ChunkStep(model).eval()(*args(full_k, full_v))
        only = torch.export.export(ChunkStep(model, cache_only=True).eval(), args(cache.k.clone(), cache.v.clone()),
                                   strict=False).module()
        assert torch.equal(only(*args(only_k, only_v)), kv_len)
    assert not torch.equal(only_k, cache.k)  # it wrote
    torch.testing.assert_close(only_k, full_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(only_v, full_v, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="in place"):
        ChunkStep(model, functional=True, cache_only=True)


def test_bad_inputs_have_clear_errors():
    model = tiny_model(dtype=torch.float32)
    stream = StreamingConfig(latent_height=4, latent_width=6, local_attn_size=6)
    cache = model.new_cache(stream, 1)
    cross = model.encode_context(torch.randn(1, 5, TINY.text_dim))
    x = torch.randn(1, 3, 16, 4, 6)
    t = torch.full((1, 3), 500.0)
    with pytest.raises(ValueError, match="channels"):
        model.forward_chunk(torch.randn(1, 3, 8, 4, 6), t, cross, cache, 0)
    with pytest.raises(ValueError, match=r"\[B, F, C, H, W\]"):
        model.forward_chunk(torch.randn(3, 16, 4, 6), t, cross, cache, 0)
    with pytest.raises(ValueError, match="float64"):
        model.forward_chunk(x.double(), t, cross, cache, 0)
    with pytest.raises(ValueError, match="timestep"):
        model.forward_chunk(x, torch.full((1, 2), 1.0), cross, cache, 0)
    with pytest.raises(ValueError, match="batch size"):
        model.forward_chunk(torch.randn(2, 3, 16, 4, 6), torch.full((2, 3), 1.0),
                            model.encode_context(torch.randn(2, 5, TINY.text_dim)), cache, 0)
    with pytest.raises(ValueError, match="patch grid"):
        model.forward_chunk(torch.randn(1, 3, 16, 6, 6), t, cross, cache, 0)
    with pytest.raises(ValueError, match="in order"):
        model.forward_chunk(x, t, cross, cache, 6)
    with pytest.raises(ValueError, match="text_dim"):
        model.encode_context(torch.randn(1, 5, 7))
    with pytest.raises(ValueError, match="do not split"):
        block_causal_mask(7, 6, stream)
    with pytest.raises(ValueError, match="fewer than one chunk"):
        StreamingConfig(local_attn_size=4, sink_size=2)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        DiTConfig(dim=100, num_heads=12)
    with pytest.raises(ValueError, match="strictly decreasing"):
        StreamingConfig(denoising_step_list=(500, 750))
    glob = StreamingConfig(latent_height=4, latent_width=6)
    small = KVCache.for_model(TINY, glob, 1, num_frames=3)
    with torch.no_grad():
        model.forward_chunk(x, t, cross, small, 0)
        with pytest.raises(ValueError, match="global attention cache"):
            model.forward_chunk(x, t, cross, small, 3)


def test_schedule_warp_and_conversions():
    steps = ChunkSchedule.from_config(StreamingConfig())
    assert steps.timesteps == pytest.approx((1000.0, 937.5, 833.3333, 625.0), abs=1e-3)
    sched = steps.schedule
    x0, noise = torch.randn(2, 3, 4, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, 4, dtype=torch.float64)
    t = torch.full((2, 3), 937.5, dtype=torch.float64)
    xt = sched.add_noise(x0, noise, t)
    flow = sched.flow_target(x0, noise)
    torch.testing.assert_close(sched.x0_from_flow(flow, xt, t), x0)
    torch.testing.assert_close(sched.flow_from_x0(x0, xt, t), flow)


def test_bfloat16_streaming_tracks_float32():
    model = tiny_model(dtype=torch.float32)
    stream = StreamingConfig(latent_height=4, latent_width=6, local_attn_size=6)
    x = torch.randn(1, 9, 16, 4, 6)
    t = torch.full((1, 3), 600.0)
    ctx = torch.randn(1, 5, TINY.text_dim)
    outs = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            m = model.to(dtype)
            cache, cross = m.new_cache(stream, 1), m.encode_context(ctx.to(dtype))
            outs[dtype] = torch.cat([m.forward_chunk(x[:, s:s + 3].to(dtype), t.to(dtype), cross, cache, s)
                                     for s in range(0, 9, 3)], dim=1)
    assert outs[torch.bfloat16].dtype == torch.bfloat16
    err = (outs[torch.bfloat16].float() - outs[torch.float32]).abs().max() / outs[torch.float32].abs().max()
    assert err < 0.1
