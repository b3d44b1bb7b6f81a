"""The DiT block's fused CPU kernels (csrc/cpu/block_ops.cpp): modulated_layer_norm, grouped_rms_norm
and gelu_tanh_ against float64 oracles and their PyTorch references, on strided inputs and ragged
widths; opcheck; argument errors; and the DiT running them (and only where it should)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dit_util import OpNames, random_dit

from sf_sdk import ops
from sf_sdk.config import DIT_PRESETS, StreamingConfig

TINY = DIT_PRESETS["tiny"]


def _adaln_inputs(batch: int, frames: int, per_frame: int, dim: int):
    x = torch.randn(batch, frames * per_frame, dim) * 3 + 0.5
    mod = torch.randn(batch, frames, 6, dim)  # shift and scale are strided views, as in the block
    shift, scale = mod.unsqueeze(3).unbind(2)[:2]
    return x, shift, 1 + scale


@pytest.mark.parametrize(("batch", "frames", "per_frame", "dim"), [(1, 3, 16, 256), (2, 1, 5, 13), (3, 2, 7, 128)])
def test_modulated_layer_norm_matches_the_oracle(cpu_kernels, batch, frames, per_frame, dim):
    x, shift, scale1 = _adaln_inputs(batch, frames, per_frame, dim)
    out = torch.ops.sf_sdk.modulated_layer_norm(x, shift, scale1, 1e-6)
    oracle = ops.reference_modulated_layer_norm(x.double(), shift.double(), scale1.double(), 1e-6)
    assert out.dtype == torch.float32 and out.is_contiguous() and out.shape == x.shape
    torch.testing.assert_close(out.double(), oracle, atol=2e-5, rtol=1e-5)
    # a strided x (a slice of a wider buffer) reads the same rows
    wide = torch.randn(batch, frames * per_frame, dim + 3)
    wide[..., :dim] = x
    torch.testing.assert_close(torch.ops.sf_sdk.modulated_layer_norm(wide[..., :dim], shift, scale1, 1e-6), out)


@pytest.mark.parametrize(("groups", "dim"), [(2, 256), (1, 13), (3, 40)])
def test_grouped_rms_norm_matches_the_oracle_on_a_strided_view(cpu_kernels, groups, dim):
    qkv = torch.randn(2, 9, groups + 1, dim) * 2  # the norms read the first `groups` of a fused projection
    x, weight = qkv[:, :, :groups], torch.randn(groups, dim)
    out = torch.ops.sf_sdk.grouped_rms_norm(x, weight, 1e-6)
    oracle = ops.reference_grouped_rms_norm(x.double(), weight.double(), 1e-6)
    assert out.is_contiguous() and out.shape == x.shape
    torch.testing.assert_close(out.double(), oracle, atol=2e-5, rtol=1e-5)


def test_gelu_tanh_matches_pytorch_including_non_finite_values(cpu_kernels):
    y = torch.cat([torch.randn(48 * 1024 + 5) * 4,
                   torch.tensor([-100.0, -20.0, 0.0, 20.0, 100.0, float("inf"), -float("inf"), float("nan")])])
    expected = F.gelu(y.double(), approximate="tanh")
    out = y.clone()
    assert torch.ops.sf_sdk.gelu_tanh_(out) is None
    finite = expected.isfinite()
    torch.testing.assert_close(out.double()[finite], expected[finite], atol=2e-6, rtol=1e-5)
    assert torch.equal(out[~finite].isnan(), expected[~finite].isnan())
    assert out[-3] == float("inf")


@pytest.mark.parametrize("name", ["modulated_layer_norm", "grouped_rms_norm", "gelu_tanh_"])
def test_opcheck(cpu_kernels, name):
    x, shift, scale1 = _adaln_inputs(1, 2, 3, 24)
    args = {"modulated_layer_norm": (x, shift, scale1, 1e-6),
            "grouped_rms_norm": (torch.randn(2, 5, 2, 24), torch.randn(2, 24), 1e-6),
            "gelu_tanh_": (torch.randn(4, 37),)}[name]
    torch.library.opcheck(getattr(torch.ops.sf_sdk, name), args)


@pytest.mark.parametrize(("call", "match"), [
    (lambda: torch.ops.sf_sdk.modulated_layer_norm(torch.randn(1, 6, 8), torch.randn(1, 4, 1, 8),
                                                   torch.randn(1, 4, 1, 8), 1e-6), "not whole frames"),
    (lambda: torch.ops.sf_sdk.modulated_layer_norm(torch.randn(1, 6, 8), torch.randn(1, 2, 8),
                                                   torch.randn(1, 2, 8), 1e-6), r"\[B, F, 1, D\]"),
    (lambda: torch.ops.sf_sdk.modulated_layer_norm(torch.randn(1, 6, 8).double(), torch.randn(1, 2, 1, 8).double(),
                                                   torch.randn(1, 2, 1, 8).double(), 1e-6), "float32"),
    (lambda: torch.ops.sf_sdk.grouped_rms_norm(torch.randn(1, 3, 2, 8), torch.randn(8), 1e-6), r"\[G, D\]"),
    (lambda: torch.ops.sf_sdk.grouped_rms_norm(torch.randn(3, 2, 8), torch.randn(2, 8), 1e-6), r"\[B, L, G, D\]"),
    (lambda: torch.ops.sf_sdk.gelu_tanh_(torch.randn(4, 6).t()), "contiguous"),
])
def test_bad_arguments_say_what_is_wrong(cpu_kernels, call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _stream(model, x, t, ctx, stream):
    cache, cross = model.new_cache(stream, 1, num_frames=x.shape[1]), model.encode_context(ctx)
    c = stream.num_frame_per_block
    return torch.cat([model.forward_chunk(x[:, s:s + c], t[:, s:s + c], cross, cache, s)
                      for s in range(0, x.shape[1], c)], dim=1)


def test_the_dit_streams_the_same_with_and_without_the_kernels(cpu_kernels, monkeypatch):
    """A float32 stream through the fused kernels stays within float32 rounding of the same stream on
    PyTorch ops, and the kernels really ran (they are left out with autograd and in float64). The
    blocks run op by op here (their one-op form, which calls the same kernels: test_block_step.py)."""
    from sf_sdk.models.dit import StepAttention

    monkeypatch.setattr(StepAttention, "block_step", lambda self, x: False)
    stream = StreamingConfig(latent_height=4, latent_width=6, local_attn_size=6)
    model = random_dit(seed=1, dtype=torch.float32)
    x = torch.randn(1, 9, 16, 4, 6)
    t = torch.rand(1, 9) * 1000
    ctx = torch.randn(1, 5, TINY.text_dim)
    with torch.no_grad():
        seen = OpNames()
        with seen:
            fused = _stream(model, x, t, ctx, stream)
        assert {"modulated_layer_norm", "grouped_rms_norm", "gelu_tanh_"} <= seen.names
        monkeypatch.setattr(ops, "block_kernels_available", lambda x: False)
        plain = _stream(model, x, t, ctx, stream)
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)
    monkeypatch.undo()
    monkeypatch.setattr(StepAttention, "block_step", lambda self, x: False)
    for grad, dtype in ((True, torch.float32), (False, torch.float64)):
        m = random_dit(seed=1, dtype=dtype)
        seen = OpNames()
        with torch.set_grad_enabled(grad), seen:
            _stream(m, x.to(dtype), t.to(dtype), ctx.to(dtype), stream)
        assert not {"modulated_layer_norm", "grouped_rms_norm", "gelu_tanh_"} & seen.names, (grad, dtype)
