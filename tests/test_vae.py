"""The Wan2.1 causal VAE: golden parity, streaming == full decode, shapes, input checks, export."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from sf_sdk.config import VAE_PRESETS, VAEConfig
from sf_sdk.models.vae import CausalConv3d, StreamingDecoder, VAEDecodeStep, WanVAE
from sf_sdk.parity import vae as vae_parity

GOLDEN = vae_parity.default_path()
# Latent geometry of the tiny tests: 4x4 latents -> 32x32 frames.
LATENT_HW = (4, 4)
NUM_LATENT_FRAMES = 5


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vae(dtype: torch.dtype = torch.float64, seed: int = 0) -> WanVAE:
    """Base width 8 with random weights (norm gains too, so no layer is an identity)."""
    torch.manual_seed(seed)
    vae = WanVAE(VAE_PRESETS["tiny"])
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return vae.to(dtype).eval()


def random_latents(frames: int = NUM_LATENT_FRAMES, batch: int = 1,
                   dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, frames, *LATENT_HW, generator=g).to(dtype)


@pytest.fixture(scope="module")
def vae64() -> WanVAE:
    return tiny_vae(torch.float64)


@pytest.fixture(scope="module")
def z64() -> torch.Tensor:
    return random_latents()


@pytest.fixture(scope="module")
def full64(vae64: WanVAE, z64: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae64.decode(z64, clamp=False)


# ---- golden parity ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-6), (torch.float32, 1e-3)])
def test_golden_parity(dtype: torch.dtype, tolerance: float) -> None:
    results = vae_parity.check(GOLDEN, dtype)
    assert set(results) == {"decode", "encode"}
    for name, (err, scale) in results.items():
        assert scale > 0.5, f"{name}: reference scale {scale} looks empty"
        assert err / scale < tolerance, f"{name}: relative error {err / scale:.3e} in {dtype}"


def test_official_parameter_names() -> None:
    with safe_open(str(GOLDEN), "pt") as f:
        golden = {k.removeprefix(vae_parity.WEIGHT_PREFIX): f.get_slice(k).get_shape()
                  for k in f.keys() if k.startswith(vae_parity.WEIGHT_PREFIX)}
    ours = {k: list(v.shape) for k, v in WanVAE(VAE_PRESETS["tiny"]).state_dict().items()}
    assert ours == golden


def test_real_config_cache_layout() -> None:
    """The Wan2.1 decoder caches 32 convs (the official TensorRT engine's 32 cache inputs),
    ~1.9 GB in bf16 at 480x832."""
    with torch.device("meta"):
        vae = WanVAE(VAEConfig())
    spec = vae.decoder_cache_spec(1, 60, 104)
    assert len(spec) == vae.num_decoder_caches == 32
    assert spec[0].shape == (1, 16, 2, 60, 104)
    assert spec[-1].name == "decoder.head.2" and spec[-1].shape == (1, 96, 2, 480, 832)
    gigabytes = sum(s.numel for s in spec) * torch.bfloat16.itemsize / 1e9
    assert 1.85 < gigabytes < 1.95


# ---- shapes and causality --------------------------------------------------------------------


def test_encode_decode_shapes(vae64: WanVAE) -> None:
    video = torch.rand(2, 3, 9, 32, 32, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        mu = vae64.encode(video)
        assert mu.shape == (2, 16, 3, 4, 4)
        z = vae64.normalize(mu)
        assert torch.allclose(vae64.denormalize(z), mu, atol=1e-12)
        out = vae64.decode(z)
    assert out.shape == (2, 3, 9, 32, 32)
    assert out.abs().max() <= 1.0
    assert torch.isfinite(out).all()
    with torch.no_grad():
        image = vae64.encode(video[:, :, :1])
        assert image.shape == (2, 16, 1, 4, 4)
        assert vae64.decode(vae64.normalize(image)).shape == (2, 3, 1, 32, 32)


def test_encode_is_causal(vae64: WanVAE) -> None:
    video = torch.rand(1, 3, 9, 32, 32, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        full = vae64.encode(video)
        prefix = vae64.encode(video[:, :, :5])
        changed = vae64.encode(torch.cat([video[:, :, :5], -video[:, :, 5:]], dim=2))
    assert torch.allclose(prefix, full[:, :, :2], atol=1e-12)
    assert torch.allclose(changed[:, :, :2], full[:, :, :2], atol=1e-12)
    assert (changed[:, :, 2] - full[:, :, 2]).abs().max() > 1e-3


def test_decode_is_causal(vae64: WanVAE, z64: torch.Tensor, full64: torch.Tensor) -> None:
    with torch.no_grad():
        prefix = vae64.decode(z64[:, :, :2], clamp=False)
    assert prefix.shape[2] == 5
    assert torch.allclose(prefix, full64[:, :, :5], atol=1e-12)


# ---- streaming -------------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [(5,), (1, 4), (2, 3), (3, 2), (4, 1), (1, 1, 1, 1, 1), (1, 2, 2)])
def test_streaming_equals_full_decode(vae64: WanVAE, z64: torch.Tensor, full64: torch.Tensor,
                                      chunks: tuple[int, ...]) -> None:
    decoder = vae64.streaming_decoder(clamp=False)
    outputs, start = [], 0
    with torch.no_grad():
        for size in chunks:
            out = decoder.decode(z64[:, :, start:start + size])
            expected_frames = 1 + 4 * (size - 1) if start == 0 else 4 * size
            assert out.shape == (1, 3, expected_frames, 32, 32)
            outputs.append(out)
            start += size
    assert (torch.cat(outputs, dim=2) - full64).abs().max() < 1e-6


@pytest.mark.parametrize("per_pass", [2, 3, 8])
def test_several_latents_per_pass_equal_one(vae64: WanVAE, z64: torch.Tensor, full64: torch.Tensor,
                                            per_pass: int) -> None:
    video = torch.rand(1, 3, 17, 32, 32, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        mu = vae64.encode(video)
        assert (vae64.encode(video, latents_per_pass=per_pass) - mu).abs().max() < 1e-10
        assert (vae64.decode(z64, clamp=False, latents_per_pass=per_pass) - full64).abs().max() < 1e-10
        stream = vae64.streaming_decoder(clamp=False, latents_per_pass=per_pass)
        parts = [stream.decode(z64[:, :, :3]), stream.decode(z64[:, :, 3:])]
    assert (torch.cat(parts, dim=2) - full64).abs().max() < 1e-10
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="latents_per_pass"):
            vae64.encode(video, latents_per_pass=bad)
        with pytest.raises(ValueError, match="latents_per_pass"):
            vae64.streaming_decoder(latents_per_pass=bad)


def test_streaming_float32_close() -> None:
    vae = tiny_vae(torch.float32)
    z = random_latents(dtype=torch.float32)
    with torch.no_grad():
        full = vae.decode(z)
        decoder = vae.streaming_decoder()
        streamed = torch.cat([decoder.decode(z[:, :, :2]), decoder.decode(z[:, :, 2:])], dim=2)
    assert torch.allclose(streamed, full, atol=1e-5)


def test_streaming_state_matters_and_reset(vae64: WanVAE, z64: torch.Tensor,
                                           full64: torch.Tensor) -> None:
    decoder = StreamingDecoder(vae64, clamp=False)
    with torch.no_grad():
        decoder.decode(z64[:, :, :2])
        assert decoder.started
        continued = decoder.decode(z64[:, :, 2:])
        decoder.reset()
        assert not decoder.started
        restarted = decoder.decode(z64[:, :, 2:])
        decoder.reset()
        again = decoder.decode(z64)
    # A fresh stream on the tail differs from the continued stream (the state is used) ...
    assert restarted.shape[2] != continued.shape[2] or not torch.allclose(restarted, continued)
    assert (continued - full64[:, :, 5:]).abs().max() < 1e-6
    # ... and after reset() the stream restarts exactly.
    assert (again - full64).abs().max() < 1e-6


# ---- input checks ----------------------------------------------------------------------------


def test_bad_inputs(vae64: WanVAE) -> None:
    f64 = torch.float64
    cases = [
        (vae64.encode, torch.zeros(1, 4, 5, 32, 32, dtype=f64), "3 \\(RGB\\) channels"),
        (vae64.encode, torch.zeros(1, 3, 8, 32, 32, dtype=f64), "1 \\+ 4k frames.*got 8"),
        (vae64.encode, torch.zeros(1, 3, 0, 32, 32, dtype=f64), "1 \\+ 4k frames"),
        (vae64.encode, torch.zeros(3, 5, 32, 32, dtype=f64), "5-D tensor"),
        (vae64.encode, torch.zeros(1, 3, 5, 30, 32, dtype=f64), "multiples of 8"),
        (vae64.encode, torch.zeros(1, 3, 5, 32, 32, dtype=torch.float32), "dtype"),
        (vae64.decode, torch.zeros(1, 8, 2, 4, 4, dtype=f64), "z_dim = 16 channels"),
        (vae64.decode, torch.zeros(1, 2, 16, 4, 4, dtype=f64), "transpose"),
        (vae64.decode, torch.zeros(16, 2, 4, 4, dtype=f64), "5-D tensor"),
        (vae64.decode, torch.zeros(1, 16, 0, 4, 4, dtype=f64), "at least one latent frame"),
    ]
    for fn, x, match in cases:
        with pytest.raises(ValueError, match=match):
            fn(x)


def test_streaming_rejects_a_different_stream(vae64: WanVAE) -> None:
    decoder = vae64.streaming_decoder()
    with torch.no_grad():
        decoder.decode(random_latents(frames=1))
        with pytest.raises(ValueError, match="reset"):
            decoder.decode(random_latents(frames=1, batch=2))


# ---- export-friendly step --------------------------------------------------------------------


def test_decode_step_loop_equals_decode(vae64: WanVAE, z64: torch.Tensor, full64: torch.Tensor) -> None:
    first = VAEDecodeStep(vae64, first_frame=True, clamp=False)
    step = VAEDecodeStep(vae64, clamp=False)
    spec = step.cache_spec(1, *LATENT_HW)
    cache = step.initial_cache(1, *LATENT_HW)
    assert [c.shape for c in cache] == [torch.Size(s.shape) for s in spec]
    frames = []
    with torch.no_grad():
        for i in range(z64.shape[2]):
            pixels, cache = (first if i == 0 else step)(z64[:, :, i:i + 1], *cache)
            assert pixels.shape == (1, 3, 1 if i == 0 else 4, 32, 32)
            assert [c.shape for c in cache] == [torch.Size(s.shape) for s in spec]
            frames.append(pixels)
    assert (torch.cat(frames, dim=2) - full64).abs().max() < 1e-6
    with pytest.raises(ValueError, match="cache tensors"):
        step(z64[:, :, :1], *cache[:-1])
    with pytest.raises(ValueError, match="one latent frame"):
        step(z64[:, :, :2], *cache)


def test_decode_step_exports() -> None:
    vae = tiny_vae(torch.float32)
    z = random_latents(frames=3, dtype=torch.float32)
    first = VAEDecodeStep(vae, first_frame=True)
    step = VAEDecodeStep(vae)
    with torch.no_grad():
        cache = first.initial_cache(1, *LATENT_HW)
        program = torch.export.export(first, (z[:, :, :1], *cache))
        # Portable graph: the eager oneDNN shortcut for single CPU clips must not be traced in.
        assert "mkldnn" not in str(program.graph)
        exported_first = program.module()
        pixels0, cache = exported_first(z[:, :, :1], *cache)
        exported = torch.export.export(step, (z[:, :, 1:2], *cache)).module()
        pixels = [pixels0]
        for i in range(1, z.shape[2]):
            ours, new_cache = exported(z[:, :, i:i + 1], *cache)
            eager, eager_cache = step(z[:, :, i:i + 1], *cache)
            # float32 rounding: eager single-clip convs run on oneDNN, the graph on the default dispatch
            assert torch.allclose(ours, eager, atol=1e-5)
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(new_cache, eager_cache))
            pixels.append(ours)
            cache = new_cache
        full = vae.decode(z)
    assert torch.allclose(torch.cat(pixels, dim=2), full, atol=1e-5)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")
def test_single_clip_onednn_conv_matches_default_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    # A batch-1 float32 clip on CPU takes oneDNN directly; outputs and gradients must be those of
    # PyTorch's own dispatch, for one conv and for a whole decode (its conv caches included).
    torch.manual_seed(0)
    conv = CausalConv3d(8, 12, 3, spatial_padding=1)
    x = torch.randn(1, 8, 5, 6, 7)
    vae = tiny_vae(torch.float32)
    z = random_latents(frames=3, dtype=torch.float32)
    results = []
    for fast in (True, False):
        monkeypatch.setattr(CausalConv3d, "onednn_single_clip", fast)
        conv.zero_grad()
        xi = x.clone().requires_grad_(True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y = conv(xi)
        assert ("aten::mkldnn_convolution" in {e.key for e in prof.key_averages()}) == fast
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        with torch.no_grad():
            decoded = vae.decode(z)
        results.append((y.detach(), xi.grad, conv.weight.grad.clone(), conv.bias.grad.clone(), decoded))
    for fast, default in zip(*results):
        assert torch.allclose(fast, default, atol=1e-5)
