"""A DiT block's streaming call as one op (csrc/cpu/block_step.cpp: sf_sdk::dit_block_step and
sf_sdk::dit_block_write_kv): against its PyTorch reference, opcheck, argument errors, and the eager
DiT streaming through it bit for bit as it does op by op, and only where it should."""

from __future__ import annotations

import pytest
import torch
from dit_util import OpNames, random_dit

from sf_sdk import ops
from sf_sdk.config import DIT_PRESETS, StreamingConfig
from sf_sdk.models import dit as dit_module
from sf_sdk.models.dit import rotary_freqs

TINY = DIT_PRESETS["tiny"]
ONE_OP = {"dit_block_step", "dit_block_write_kv"}


def _block_inputs(*, batch: int = 1, frames: int = 3, per_frame: int = 4, dim: int = 32, heads: int = 4,
                  capacity: int = 36, kv_len: int = 24, norms: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.3

    n, hd = frames * per_frame, dim // heads
    weights = [rnd(3 * dim, dim), rnd(3 * dim), rnd(dim, dim), rnd(dim), rnd(dim, dim), rnd(dim), rnd(dim, dim),
               rnd(dim), rnd(4 * dim, dim), rnd(4 * dim), rnd(dim, 4 * dim), rnd(dim)]
    angles = torch.rand(n, hd // 2, generator=g) * 6
    cos, sin = angles.cos(), angles.sin()
    return dict(
        x=rnd(batch, n, dim) * 3, e0=rnd(batch, frames, 6, dim), modulation=rnd(1, 6, dim), weights=weights,
        qk_norm=rnd(2, dim) + 1 if norms else None, norm3_weight=rnd(dim) + 1 if norms else None,
        norm3_bias=rnd(dim) if norms else None, cross_q_norm=rnd(dim) + 1 if norms else None,
        cross_k=rnd(batch, 7, heads, hd), cross_v=rnd(batch, 7, heads, hd),
        k_cache=rnd(2, batch + 1, capacity, heads, hd), v_cache=rnd(2, batch + 1, capacity, heads, hd), layer=1,
        rows=batch, slots=torch.arange(kv_len - n, kv_len), cos=cos, sin=sin, freqs=rotary_freqs(cos, sin),
        kv_len=kv_len, num_heads=heads, eps=1e-6)


def _write_kv_args(a: dict) -> dict:
    keys = ("x", "e0", "modulation", "qk_norm", "k_cache", "v_cache", "layer", "rows", "slots", "cos", "sin",
            "num_heads", "eps")
    return {"qkv_w": a["weights"][0], "qkv_b": a["weights"][1], **{k: a[k] for k in keys}}


@pytest.mark.parametrize(("batch", "norms"), [(1, True), (2, False)])
def test_the_block_step_matches_its_reference(cpu_kernels, batch, norms):
    a = _block_inputs(batch=batch, norms=norms)
    b = {**a, "k_cache": a["k_cache"].clone(), "v_cache": a["v_cache"].clone()}
    out = torch.ops.sf_sdk.dit_block_step(**a)
    expected = ops.reference_dit_block_step(**b)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["k_cache"], b["k_cache"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["v_cache"], b["v_cache"], atol=1e-5, rtol=1e-5)
    assert not torch.equal(a["k_cache"][1, :batch], _block_inputs(batch=batch, norms=norms)["k_cache"][1, :batch])
    # only the layer's rows were written: the other layer and the row past `rows` are untouched
    fresh = _block_inputs(batch=batch, norms=norms)
    assert torch.equal(a["k_cache"][0], fresh["k_cache"][0]) and torch.equal(a["k_cache"][1, batch:],
                                                                             fresh["k_cache"][1, batch:])
    # the cache pass writes the same keys / values as the full call
    c = _block_inputs(batch=batch, norms=norms)
    torch.ops.sf_sdk.dit_block_write_kv(**_write_kv_args(c))
    assert torch.equal(c["k_cache"], a["k_cache"]) and torch.equal(c["v_cache"], a["v_cache"])


@pytest.mark.parametrize("name", sorted(ONE_OP))
def test_opcheck(cpu_kernels, name):
    a = _block_inputs(dim=16, heads=2, per_frame=2, kv_len=12)
    args = a if name == "dit_block_step" else _write_kv_args(a)
    torch.library.opcheck(getattr(torch.ops.sf_sdk, name), (), args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize(("change", "match"), [
    ({"weights": "drop"}, "12 projection tensors"),
    ({"rows": 2}, "rows = 2 must equal x's batch 1"),
    ({"kv_len": 37}, r"kv_len = 37 must be in \[1, capacity = 36\]"),
    ({"layer": 2}, "layer 2 is outside k_cache's 2 layers"),
    ({"num_heads": 3}, "must divide dim = 32"),
    ({"e0": torch.zeros(1, 5, 6, 32)}, "not whole frames"),
    ({"freqs": torch.zeros(12, 1, 4)}, "complex64"),
    ({"x": torch.zeros(1, 12, 32, dtype=torch.float64)}, "float32"),
])
def test_bad_arguments_say_what_is_wrong(cpu_kernels, change, match):
    a = _block_inputs()
    a.update({k: (a["weights"][:-1] if v == "drop" else v) for k, v in change.items()})
    with pytest.raises(ValueError, match=match):
        torch.ops.sf_sdk.dit_block_step(**a)


def _stream(model, x, t, ctx, stream, rows: int = 1, cache_pass: bool = True):
    """Chunks through forward_chunk (two denoising calls each) and write_cache; every output."""
    cache, cross = model.new_cache(stream, rows, num_frames=x.shape[1]), model.encode_context(ctx.expand(rows, -1, -1))
    c, outs = stream.num_frame_per_block, []
    for s in range(0, x.shape[1], c):
        plan = cache.plan_chunk(s, c)
        attend = model.step_attention(cache, plan)
        xs, ts = x[:, s:s + c].expand(rows, -1, -1, -1, -1), t[:, s:s + c].expand(rows, -1)
        outs += [model.forward_chunk(xs, ts, cross, cache, plan, attend),
                 model.forward_chunk(xs * 0.5, ts * 0.5, cross, cache, plan, attend)]
        if cache_pass:
            model.write_cache(xs * 0.25, ts * 0, cross, cache, plan, attend)
    return torch.cat(outs, dim=1), cache.k.clone()


@pytest.mark.parametrize("overrides", [{}, {"qk_norm": False, "cross_attn_norm": False}])
def test_the_dit_streams_bit_for_bit_as_op_by_op(cpu_kernels, monkeypatch, overrides):
    """Through the rolling window's wrap-around too (12 frames in a window of 6): the one-op block
    runs the same kernels in the same order, so the flows and the cache are equal, not just close."""
    stream = StreamingConfig(latent_height=4, latent_width=6, local_attn_size=6)
    model = random_dit(seed=2, dtype=torch.float32, **overrides)
    x, t = torch.randn(1, 12, 16, 4, 6), torch.rand(1, 12) * 1000
    ctx = torch.randn(1, 5, TINY.text_dim)
    with torch.no_grad():
        seen = OpNames()
        with seen:
            one_op = _stream(model, x, t, ctx, stream)
        assert ONE_OP <= seen.names
        monkeypatch.setattr(dit_module.StepAttention, "block_step", lambda self, x: False)
        seen = OpNames()
        with seen:
            op_by_op = _stream(model, x, t, ctx, stream)
        assert not ONE_OP & seen.names and "modulated_layer_norm" in seen.names
    assert torch.equal(one_op[0], op_by_op[0]) and torch.equal(one_op[1], op_by_op[1])


@pytest.mark.parametrize("case", ["autograd", "float64", "cache_relative", "kernel attention", "no kernels"])
def test_the_one_op_block_is_left_out_where_it_does_not_apply(cpu_kernels, monkeypatch, case):
    from sf_sdk.attention import default_backend

    stream = StreamingConfig(latent_height=4, latent_width=6, local_attn_size=6,
                             position_mode="cache_relative" if case == "cache_relative" else "absolute")
    dtype = torch.float64 if case == "float64" else torch.float32
    model = random_dit(seed=2, dtype=dtype)
    x, t, ctx = torch.randn(1, 6, 16, 4, 6, dtype=dtype), torch.rand(1, 6, dtype=dtype) * 1000, \
        torch.randn(1, 5, TINY.text_dim, dtype=dtype)
    if case == "no kernels":
        monkeypatch.setattr(ops, "block_kernels_available", lambda x: False)
    seen = OpNames()
    with torch.set_grad_enabled(case == "autograd"), \
            default_backend("kernel" if case == "kernel attention" else "auto"), seen:
        # (the cache pass never carries gradients: with autograd on it still runs in one op each)
        _stream(model, x, t, ctx, stream, cache_pass=case != "autograd")
    assert not ONE_OP & seen.names
    assert "modulated_layer_norm" in seen.names or case in ("autograd", "float64", "no kernels")


def test_pooled_rows_at_different_positions_run_op_by_op(cpu_kernels):
    """A plan whose rows stand at their own positions (a pool) has per-row tables and lengths."""
    stream = StreamingConfig(latent_height=4, latent_width=6, local_attn_size=6)
    model = random_dit(seed=2, dtype=torch.float32)
    cache, cross = model.new_cache(stream, 2, num_frames=6), model.encode_context(torch.randn(2, 5, TINY.text_dim))
    x = torch.randn(2, 3, 16, 4, 6)
    with torch.no_grad():
        model.write_cache(x, torch.zeros(2, 3), cross, cache, cache.plan_rows([0, None], 3))
        seen = OpNames()
        with seen:
            model.forward_chunk(x, torch.full((2, 3), 500.0), cross, cache, cache.plan_rows([3, 0], 3))
    assert not ONE_OP & seen.names and "modulated_layer_norm" in seen.names
