"""Numbers that look valid: NaN / Inf in weights, configs or inputs are errors naming the cause,
never an all-black video. Weights are checked at load; a stream's first chunk is checked."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sf_sdk import StreamingGenerator
from sf_sdk.checkpoint.folder import resolve_model_path
from sf_sdk.checkpoint.weights import CheckpointError
from sf_sdk.config import StreamingConfig
from sf_sdk.pool import NonFiniteError


def _gen() -> StreamingGenerator:
    stream = StreamingConfig(latent_height=2, latent_width=2, local_attn_size=6)
    return StreamingGenerator.from_config("tiny", stream, vae="tiny", seed=0, backend="eager")  # runs gen.dit itself


def _embeds(gen: StreamingGenerator) -> torch.Tensor:
    return torch.randn(4, gen.dit.config.text_dim)


def test_non_finite_weight_fails_the_first_chunk_and_names_it() -> None:
    gen = _gen()
    with torch.no_grad():
        gen.dit.blocks[1].ffn[0].weight[0, 0] = math.nan
    with pytest.raises(NonFiniteError, match=r"first chunk's latents.*DiT weights.*blocks\.1\.ffn\.0\.weight"):
        gen.generate(prompt_embeds=_embeds(gen), num_frames=9)


def test_non_finite_vae_weight_fails_on_the_decoded_frames() -> None:
    gen = _gen()
    with torch.no_grad():
        next(gen.vae.decoder.parameters()).fill_(math.inf)
    with pytest.raises(NonFiniteError, match=r"first chunk's decoded frames.*VAE weights"):
        gen.generate(prompt_embeds=_embeds(gen), num_frames=9)
    # latents only: nothing decoded, nothing non-finite
    assert torch.isfinite(gen.generate(prompt_embeds=_embeds(gen), num_frames=9, decode=False).latents).all()


def test_overflow_with_finite_weights_points_at_the_config() -> None:
    gen = _gen()
    with torch.no_grad():
        gen.dit.patch_embedding.weight.mul_(1e37)  # finite, but the activations overflow float32
    with pytest.raises(NonFiniteError, match=r"finite weights in torch.float32: check the streaming config "
                                             r"\(timestep_shift=5.0"):
        gen.generate(prompt_embeds=_embeds(gen), num_frames=9, decode=False)


def test_a_pool_checks_each_stream_first_chunk_only() -> None:
    gen = _gen()
    pool = gen.pool(2)
    a = pool.open(prompt_embeds=_embeds(gen), seed=1, decode=False)
    pool.step()
    with torch.no_grad():
        gen.dit.head.head.weight.fill_(math.nan)
    pool.step()  # a is past its first chunk: not checked again (no host sync on the hot path)
    pool.open(prompt_embeds=_embeds(gen), seed=2, decode=False)
    with pytest.raises(NonFiniteError, match="DiT weights"):
        pool.step()
    assert not a.closed


def test_non_finite_inputs_are_rejected_up_front() -> None:
    gen = _gen()
    emb = _embeds(gen)
    emb[0, 0] = math.inf
    with pytest.raises(ValueError, match="prompt_embeds contains NaN or infinite"):
        gen.stream(prompt_embeds=emb)
    latent = torch.zeros(3, gen.dit.config.in_dim, 2, 2)
    latent[1, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="initial_latent holds NaN or infinite values"):
        gen.stream(prompt_embeds=_embeds(gen), initial_latent=latent)
    with pytest.raises(ValueError, match="timestep_shift must be a finite number, got nan"):
        StreamingConfig(timestep_shift=math.nan)


def test_loading_non_finite_weights_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(resolve_model_path("shapes-tiny"), folder)
    weights = load_file(folder / "dit.safetensors")
    name = sorted(weights)[3]
    weights[name].view(-1)[0] = math.nan
    save_file(weights, str(folder / "dit.safetensors"))
    with pytest.raises(CheckpointError, match=rf"DiT \(dit.safetensors\) weights hold NaN or infinite values in 1 "
                                              rf"tensor\(s\): {name}"):
        StreamingGenerator.from_pretrained(folder)
