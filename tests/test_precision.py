"""dtype="auto" (sf_sdk.precision): the rule, and the generators that apply it."""

from __future__ import annotations

import pytest
import torch

import sf_sdk.precision as precision
from sf_sdk import StreamingGenerator
from sf_sdk.config import DiTConfig, StreamingConfig
from sf_sdk.precision import CPU_BF16_MIN_GFLOP, choose_dtype, dit_call_gflop

pytestmark = pytest.mark.usefixtures("one_thread")

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
MID = DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=2, text_len=512)
MID_STREAM = StreamingConfig(num_frame_per_block=3, latent_height=30, latent_width=52)
# 2.8 GFLOP per call: above the CPU threshold, still quick to build and run on a CPU.
SMALL = DiTConfig(dim=512, ffn_dim=2048, num_heads=8, num_layers=2, text_dim=64, text_len=8, freq_dim=64)
SMALL_STREAM = StreamingConfig(num_frame_per_block=3, latent_height=16, latent_width=16, local_attn_size=6)


def test_gflop_closed_form():
    tokens = 3 * 15 * 26  # 3 latent frames of 30x52 in 2x2 patches
    expected = 2 * tokens * (6 * 1536 ** 2 + 2 * 1536 * 8960) * 2 / 1e9
    assert dit_call_gflop(MID, MID_STREAM) == pytest.approx(expected)
    assert dit_call_gflop(SMALL, SMALL_STREAM) > CPU_BF16_MIN_GFLOP
    assert dit_call_gflop(DiTConfig(dim=256, ffn_dim=1024, num_heads=4, num_layers=2),
                          StreamingConfig(latent_height=8, latent_width=8)) < CPU_BF16_MIN_GFLOP


@pytest.mark.parametrize(("device", "kwargs", "cfg", "expected", "why"), [
    (CPU, {"has_amx": False}, MID, torch.float32, "no AMX"),
    (CPU, {"has_amx": True}, MID, torch.bfloat16, "AMX"),
    (CPU, {"has_amx": True}, DiTConfig(dim=128, ffn_dim=512, num_heads=4, num_layers=6), torch.float32,
     "overhead-bound"),
    (CUDA, {"tensorrt": True}, MID, torch.float32, "TensorRT"),
    (CUDA, {"tensorrt": False, "cuda_bf16": True}, MID, torch.bfloat16, "CUDA"),
    (CUDA, {"tensorrt": False, "cuda_bf16": False}, MID, torch.float32, "no bfloat16"),
    (torch.device("meta"), {}, MID, torch.float32, "no measured rule"),
])
def test_rule(device, kwargs, cfg, expected, why):
    stream = MID_STREAM if cfg is MID else StreamingConfig(latent_height=8, latent_width=8)
    choice = choose_dtype(cfg, stream, device, **kwargs)
    assert choice.dtype == expected
    assert why in choice.why


@pytest.mark.parametrize(("stream", "backend", "options", "env", "compiler", "expected"), [
    (StreamingConfig(), "auto", None, "background", True, True),
    (StreamingConfig(), "auto", {"build": "now"}, "never", True, True),  # the option beats the environment
    (StreamingConfig(), "auto", None, "never", True, False),  # nothing gets built: eager unless cached
    (StreamingConfig(), "auto", {"build": "never"}, "now", True, False),
    (StreamingConfig(), "auto", {"dit": "aoti"}, "now", True, True),
    (StreamingConfig(), "auto", {"dit": "onnxruntime"}, "now", True, False),
    (StreamingConfig(), "auto", {"dit": "eager"}, "now", True, False),
    (StreamingConfig(), "auto", None, "now", False, False),  # no C++ compiler
    (StreamingConfig(), "eager", None, "now", True, False),
    (StreamingConfig(position_mode="cache_relative"), "auto", None, "now", True, False),  # exported steps: absolute
])
def test_dit_runs_on_aoti(monkeypatch, stream, backend, options, env, compiler, expected):
    from export.auto import BUILD_ENV

    monkeypatch.setenv(BUILD_ENV, env)
    assert precision.dit_runs_on_aoti(stream, backend, options, compiler=compiler) is expected


def test_aoti_puts_small_models_in_bfloat16_on_amx():
    """Below the eager threshold, bfloat16 only where the DiT runs on AOTInductor (and AMX is there)."""
    tiny, stream = DiTConfig(dim=128, ffn_dim=512, num_heads=4, num_layers=6), StreamingConfig(latent_height=8,
                                                                                               latent_width=8)
    on_aoti = choose_dtype(tiny, stream, CPU, has_amx=True, aoti=True)
    assert on_aoti.dtype == torch.bfloat16 and "AOTInductor" in on_aoti.why
    assert choose_dtype(tiny, stream, CPU, has_amx=True, aoti=False).dtype == torch.float32
    assert choose_dtype(tiny, stream, CPU, has_amx=False, aoti=True).dtype == torch.float32  # no AMX: float32


def test_from_config_bfloat16_on_aoti(monkeypatch, tmp_path):
    """backend auto that may build its AOTInductor DiT: the small model is made in bfloat16, and auto
    keeps the DiT on AOTInductor for that dtype (build 'never' here, so it streams eagerly)."""
    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: True)
    monkeypatch.setattr(precision, "dit_runs_on_aoti", lambda *a, **k: True)
    gen = StreamingGenerator.from_config("tiny", StreamingConfig(latent_height=8, latent_width=8),
                                         backend_options={"build": "never", "cache_dir": str(tmp_path)})
    assert gen.dtype == torch.bfloat16
    from export.auto import Capabilities, Workload, choose_backends

    assert choose_backends(Capabilities("cpu", frozenset({"aoti"})), Workload.of(gen)).dit == "aoti"


def test_tensorrt_only_counts_for_backend_auto(monkeypatch):
    import sf_sdk.backends as backends

    monkeypatch.setattr(backends, "backend_status", lambda name: None)  # "TensorRT is installed"
    assert choose_dtype(MID, MID_STREAM, CUDA, backend="auto", cuda_bf16=True).dtype == torch.float32
    assert choose_dtype(MID, MID_STREAM, CUDA, backend="eager", cuda_bf16=True).dtype == torch.bfloat16


@pytest.mark.parametrize("amx", [True, False])
def test_from_config_applies_the_rule(monkeypatch, amx):
    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: amx)
    gen = StreamingGenerator.from_config(SMALL, SMALL_STREAM, backend="eager")
    assert gen.dtype == (torch.bfloat16 if amx else torch.float32)
    tiny = StreamingGenerator.from_config("tiny", StreamingConfig(latent_height=8, latent_width=8), backend="eager")
    assert tiny.dtype == torch.float32  # far below the threshold on any CPU
    named = StreamingGenerator.from_config(SMALL, SMALL_STREAM, backend="eager", dtype="float32")
    assert named.dtype == torch.float32  # a named dtype is never overridden


def test_bfloat16_auto_streams(monkeypatch):
    """The bfloat16 the rule picks runs the streaming loop end to end (cache, attention, steps)."""
    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: True)
    gen = StreamingGenerator.from_config(SMALL, SMALL_STREAM, backend="eager")
    emb = torch.randn(4, SMALL.text_dim)
    with gen.stream(prompt_embeds=emb, num_frames=9, decode=False, seed=0) as s:
        chunks = list(s)
    assert chunks and all(torch.isfinite(c.latents.float()).all() for c in chunks)
    assert chunks[0].latents.dtype == torch.bfloat16


def test_from_pretrained_auto_keeps_shapes_tiny_float32(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: True)
    gen = StreamingGenerator.from_pretrained("shapes-tiny", backend="eager")
    assert gen.dtype == torch.float32
    assert gen.vae is None or next(gen.vae.parameters()).dtype == torch.float32


def test_from_pretrained_auto_casts_every_component(monkeypatch, tmp_path):
    """A loaded model the rule puts in bfloat16: DiT, VAE and text encoder all follow, as with a
    named dtype."""
    import sf_sdk.generator as generator

    monkeypatch.setattr(generator, "choose_dtype",
                        lambda *a, **k: precision.DtypeChoice(torch.bfloat16, "test"))
    gen = StreamingGenerator.from_pretrained("shapes-tiny", backend="eager")
    assert gen.dtype == torch.bfloat16
    assert next(gen.vae.parameters()).dtype == torch.bfloat16
    named = StreamingGenerator.from_pretrained("shapes-tiny", backend="eager", dtype="bfloat16")
    assert {n: p.dtype for n, p in gen.dit.named_parameters()} == {n: p.dtype for n, p in named.dit.named_parameters()}
    for a, b in zip(gen.dit.parameters(), named.dit.parameters()):
        assert torch.equal(a, b)
