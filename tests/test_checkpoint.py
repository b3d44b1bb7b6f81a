"""Checkpoints: the official release layout (tiny files written here), our folder format, and
the errors of corrupt, truncated, empty and mismatched files."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sf_sdk import StreamingGenerator
from sf_sdk.checkpoint import (
    SELF_FORCING_STREAMING,
    CheckpointError,
    StateDict,
    convert_official,
    find_official,
    load_official,
    open_state_dict,
    read_index,
    save_pretrained,
)
from sf_sdk.config import DIT_PRESETS, TEXT_PRESETS, VAE_PRESETS, StreamingConfig, to_dict
from sf_sdk.models.dit import WanDiT
from sf_sdk.models.text import PromptTokenizer, TextEncoder, UMT5Encoder, build_word_tokenizer
from sf_sdk.models.vae import WanVAE

DIT = DIT_PRESETS["tiny"]
VAE = VAE_PRESETS["tiny"]
TEXT = TEXT_PRESETS["tiny"]
WORDS = ["a", "red", "blue", "circle", "square", "moving", "left", "right"]
PROMPT = "a red circle moving left"
# Small latents keep the VAE and DiT calls cheap.
SMALL = {"latent_height": 2, "latent_width": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


class NotWeights:
    """An object a weights-only pickle must refuse."""


def _seeded(cls, cfg, seed: int):
    torch.manual_seed(seed)
    return cls(cfg).eval()


@dataclasses.dataclass
class Official:
    root: Path
    ckpt: Path
    wan: Path
    generator: WanDiT
    ema: WanDiT
    vae: WanVAE
    t5: UMT5Encoder  # with the bf16-rounded weights the file holds


def _write_official(root: Path) -> Official:
    """Tiny files in the official layout: self_forcing_dmd.pt + Wan2.1-T2V-1.3B/."""
    gen, ema, critic = (_seeded(WanDiT, DIT, s) for s in (1, 2, 3))
    vae = _seeded(WanVAE, VAE, 4)
    t5 = _seeded(UMT5Encoder, TEXT, 5)
    t5.to(torch.bfloat16).float()  # the official encoder file is bf16

    def prefixed(m: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {f"model.{k}": v for k, v in m.state_dict().items()}

    root.mkdir(parents=True, exist_ok=True)
    ckpt = root / "self_forcing_dmd.pt"
    torch.save({"generator": prefixed(gen), "generator_ema": prefixed(ema), "critic": prefixed(critic)}, ckpt)
    wan = root / "Wan2.1-T2V-1.3B"
    wan.mkdir()
    torch.save(vae.state_dict(), wan / "Wan2.1_VAE.pth")
    torch.save({k: v.to(torch.bfloat16) for k, v in t5.state_dict().items()},
               wan / "models_t5_umt5-xxl-enc-bf16.pth")
    build_word_tokenizer(WORDS, wan / "google" / "umt5-xxl")
    config = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v",
              "dim": DIT.dim, "ffn_dim": DIT.ffn_dim, "freq_dim": DIT.freq_dim, "num_heads": DIT.num_heads,
              "num_layers": DIT.num_layers, "in_dim": DIT.in_dim, "out_dim": DIT.out_dim,
              "text_len": DIT.text_len, "text_dim": DIT.text_dim, "eps": DIT.eps}
    (wan / "config.json").write_text(json.dumps(config))
    return Official(root, ckpt, wan, gen, ema, vae, t5)


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> Official:
    return _write_official(tmp_path_factory.mktemp("release"))


def _dit_out(model: WanDiT, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, DIT.in_dim, 4, 4, generator=g)
    ctx = torch.randn(1, 5, DIT.text_dim, generator=g)
    t = torch.tensor([[900.0, 500.0, 100.0]])
    with torch.no_grad():
        return model(x.to(model.dtype), t.to(model.dtype), ctx.to(model.dtype))


def _embed(enc: UMT5Encoder, tokenizer_dir: Path) -> torch.Tensor:
    return TextEncoder(enc, PromptTokenizer(tokenizer_dir, TEXT.text_len)).encode(PROMPT)[0]


# --------------------------------------------------------------------------------------------
# The official release
# --------------------------------------------------------------------------------------------


def test_official_files_load_and_match_their_modules(official: Official) -> None:
    loaded = load_official(official.ckpt, official.wan, vae_config=VAE, text_config=TEXT)
    assert loaded.dit_config == DIT  # from the Wan folder's config.json
    torch.testing.assert_close(_dit_out(loaded.dit), _dit_out(official.ema), rtol=0, atol=0)
    assert not torch.equal(_dit_out(loaded.dit), _dit_out(official.generator))
    z = torch.randn(1, VAE.z_dim, 2, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded.vae.decode(z), official.vae.decode(z), rtol=0, atol=0)
    torch.testing.assert_close(_embed(loaded.text_encoder, loaded.tokenizer_dir),
                               _embed(official.t5, loaded.tokenizer_dir), rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.dit.parameters())
    # The Self-Forcing streaming defaults.
    st = loaded.streaming
    assert st == SELF_FORCING_STREAMING
    assert (st.num_frame_per_block, st.denoising_step_list, st.warp_denoising_step, st.timestep_shift,
            st.local_attn_size, st.latent_height, st.latent_width) == \
        (3, (1000.0, 750.0, 500.0, 250.0), True, 5.0, -1, 60, 104)

    raw = load_official(official.ckpt, official.wan, use_ema=False, load_vae=False, load_text_encoder=False,
                        dtype="float64")
    assert raw.vae is None and raw.text_encoder is None
    assert raw.dit.dtype == torch.float64
    torch.testing.assert_close(_dit_out(raw.dit), _dit_out(copy.deepcopy(official.generator).double()),
                               rtol=0, atol=0)


def test_official_defaults_are_the_released_model(tmp_path: Path) -> None:
    wan = tmp_path / "wan"
    wan.mkdir()
    from sf_sdk.checkpoint import official_dit_config

    assert official_dit_config(wan) == DIT_PRESETS["wan2.1-t2v-1.3b"]  # no config.json
    (wan / "config.json").write_text(json.dumps({"_class_name": "WanModel", "model_type": "t2v", "dim": 1536,
                                                 "num_heads": 12, "num_layers": 30, "text_len": 512}))
    assert official_dit_config(wan) == DIT_PRESETS["wan2.1-t2v-1.3b"]
    (wan / "config.json").write_text(json.dumps({"model_type": "i2v", "in_dim": 36}))
    with pytest.raises(CheckpointError, match="i2v"):
        official_dit_config(wan)


def test_generator_from_official_checkpoint(official: Official, tmp_path: Path) -> None:
    kwargs = dict(vae_config=VAE, text_config=TEXT, streaming=SMALL)
    by_file = StreamingGenerator.from_pretrained(official.ckpt, wan_dir=official.wan, **kwargs)
    video = by_file.generate(PROMPT, num_frames=9, seed=3)
    assert video.frames.shape == (9, 16, 16, 3)
    # A folder holding both, and the .pt alone with the Wan folder beside it.
    by_folder = StreamingGenerator.from_pretrained(official.root, **kwargs)
    by_neighbour = StreamingGenerator.from_pretrained(official.ckpt, **kwargs)
    for gen in (by_folder, by_neighbour):
        np.testing.assert_array_equal(gen.generate(PROMPT, num_frames=9, seed=3).frames, video.frames)
    assert find_official(official.root) == (official.ckpt, official.wan)

    # Convert to our format: the same video.
    out = convert_official(official.ckpt, official.wan, tmp_path / "converted", torch.float32,
                           vae_config=VAE, text_config=TEXT)
    assert read_index(out).extra["converted_from"]["weights"] == "generator_ema"
    converted = StreamingGenerator.from_pretrained(out, streaming=SMALL)
    np.testing.assert_array_equal(converted.generate(PROMPT, num_frames=9, seed=3).frames, video.frames)


def test_official_errors_name_what_to_do(official: Official, tmp_path: Path) -> None:
    # No EMA weights in the file.
    only_gen = tmp_path / "gen_only.pt"
    torch.save({"generator": {f"model.{k}": v for k, v in official.generator.state_dict().items()}}, only_gen)
    with pytest.raises(CheckpointError, match=r"no 'generator_ema' entry.*use_ema=False"):
        load_official(only_gen, None, load_vae=False, load_text_encoder=False)
    # The Wan folder lacks files.
    bare = tmp_path / "bare_wan"
    bare.mkdir()
    with pytest.raises(CheckpointError, match=r"lacks \['Wan2.1_VAE.pth', 'models_t5_umt5-xxl-enc-bf16.pth'"):
        load_official(official.ckpt, bare)
    # The .pt without a Wan folder anywhere near it.
    lonely = tmp_path / "lonely" / "self_forcing_dmd.pt"
    lonely.parent.mkdir()
    lonely.write_bytes(official.ckpt.read_bytes())
    with pytest.raises(CheckpointError, match="wan_dir"):
        StreamingGenerator.from_pretrained(lonely)
    # Default (1.3B) configs do not fit tiny files: the error names keys and the fitting config.
    wan_default = tmp_path / "wan_default"
    wan_default.mkdir()
    with pytest.raises(CheckpointError) as err:
        load_official(official.ckpt, wan_default, load_vae=False, load_text_encoder=False)
    msg = str(err.value)
    assert "missing keys: blocks.10." in msg and "wrong shapes: blocks.0." in msg
    assert "DiTConfig(dim=96, ffn_dim=192, num_layers=2, in_dim=16, out_dim=16, text_dim=32, freq_dim=32" in msg
    with pytest.raises(CheckpointError, match=r"TextEncoderConfig\(vocab=101, dim=32, dim_attn=32, dim_ffn=64, "
                                              r"num_heads=4, num_layers=2, num_buckets=32"):
        load_official(official.ckpt, official.wan, load_vae=False)
    with pytest.raises(CheckpointError, match=r"VAEConfig\(dim=8, z_dim=16"):
        load_official(official.ckpt, official.wan, load_text_encoder=False)


# --------------------------------------------------------------------------------------------
# Corrupt, truncated, empty and mismatched files
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(official: Official, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    data = official.ckpt.read_bytes()
    files = {"empty.pt": b"", "truncated.pt": data[: len(data) // 2], "corrupt.pt": bytes(range(256)) * 8}
    out = {name: d / name for name in files}
    for name, content in files.items():
        out[name].write_bytes(content)
    st = d / "dit.safetensors"
    save_file(official.ema.state_dict(), str(st))
    out["truncated.safetensors"] = d / "truncated.safetensors"
    out["truncated.safetensors"].write_bytes(st.read_bytes()[:-100])
    out["objects.pt"] = d / "objects.pt"
    torch.save({"generator_ema": {"x": NotWeights()}}, out["objects.pt"])
    return out


@pytest.mark.parametrize("name, pattern", [
    ("empty.pt", r"is empty \(0 bytes\)"),
    ("truncated.pt", r"cannot read .*truncated"),
    ("corrupt.pt", r"cannot read .*truncated, corrupt"),
    ("truncated.safetensors", r"cannot read .*truncated"),
    ("objects.pt", r"holds Python objects besides tensors \(.*NotWeights\)"),
])
def test_bad_files_give_clear_errors(bad_files: dict[str, Path], name: str, pattern: str) -> None:
    with pytest.raises(CheckpointError, match=pattern):
        load_official(bad_files[name], None, load_vae=False, load_text_encoder=False) \
            if name.endswith(".pt") else open_state_dict(bad_files[name])


def test_mismatch_names_keys_and_prefix(official: Official, tmp_path: Path) -> None:
    # Our folder with a DiT of another depth / width than its index says.
    other = dataclasses.replace(DIT, num_layers=3, ffn_dim=128)
    folder = save_pretrained(tmp_path / "m", dit=WanDiT(other), dit_config=other, streaming=StreamingConfig())
    index = json.loads((folder / "model_index.json").read_text())
    index["dit"] = to_dict(DIT)
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        StreamingGenerator.from_pretrained(folder)
    msg = str(err.value)
    assert "unexpected keys: blocks.2." in msg
    assert "wrong shapes: blocks.0.ffn.0.bias: checkpoint (128,) vs model (192,)" in msg
    assert "num_layers=3" in msg and "ffn_dim=128" in msg
    # Keys with a prefix the loader does not expect.
    prefixed = tmp_path / "p" / "dit.safetensors"
    prefixed.parent.mkdir()
    save_file({f"_orig_mod.{k}": v for k, v in official.ema.state_dict().items()}, str(prefixed))
    from sf_sdk.checkpoint import build_module

    with pytest.raises(CheckpointError, match="carry a '_orig_mod.' prefix"):
        build_module(WanDiT, DIT, open_state_dict(prefixed), what="DiT")


def test_bad_index_and_missing_bundled_model(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="no model_index.json"):
        read_index(folder)
    (folder / "model_index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_index(folder)
    (folder / "model_index.json").write_text(json.dumps({"format": "sf-sdk", "version": 1,
                                                         "dit": {"dim": 96, "heads": 4}}))
    with pytest.raises(CheckpointError, match=r"unknown DiTConfig keys \['heads'\]"):
        read_index(folder)
    with pytest.raises(CheckpointError, match="neither a model folder"):
        read_index(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------
# Our format
# --------------------------------------------------------------------------------------------


def test_our_format_round_trips_lazily_into_the_requested_dtype(official: Official, tmp_path: Path) -> None:
    tok = build_word_tokenizer(WORDS, tmp_path / "tok")
    stream = StreamingConfig(latent_height=4, latent_width=4, local_attn_size=6)
    folder = save_pretrained(tmp_path / "model", dit=official.ema, dit_config=DIT, streaming=stream,
                             vae=official.vae, vae_config=VAE, text_encoder=official.t5, text_config=TEXT,
                             tokenizer_dir=tok, extra={"fps": 12})
    assert sorted(p.name for p in folder.iterdir()) == ["dit.safetensors", "model_index.json", "text_encoder.safetensors",
                                                        "tokenizer", "vae.safetensors"]
    reference = StreamingGenerator(official.ema, stream, vae=official.vae, fps=12,
                                   text_encoder=TextEncoder(official.t5, PromptTokenizer(tok, TEXT.text_len)))
    loaded = StreamingGenerator.from_pretrained(folder)
    assert loaded.fps == 12 and loaded.streaming == stream
    a = reference.generate(PROMPT, num_frames=9, seed=5)
    b = loaded.generate(PROMPT, num_frames=9, seed=5)
    np.testing.assert_array_equal(a.frames, b.frames)
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)

    # Lazy: shapes come from the header; tensors are read (and cast) one at a time on access.
    state = open_state_dict(folder / "dit.safetensors", dtype=torch.bfloat16)
    assert isinstance(state, StateDict) and len(state) == len(official.ema.state_dict())
    assert state.shape("patch_embedding.weight") == tuple(official.ema.patch_embedding.weight.shape)
    assert state["patch_embedding.weight"].dtype == torch.bfloat16
    half = StreamingGenerator.from_pretrained(folder, dtype="bfloat16", text_dtype="float32")
    assert all(p.dtype == torch.bfloat16 for p in half.dit.parameters())
    assert all(p.dtype == torch.bfloat16 for p in half.vae.parameters())
    assert half.text_encoder.dtype == torch.float32
    assert not any(t.is_meta for t in [*half.dit.parameters(), *half.vae.buffers()])
    torch.testing.assert_close(half.vae.latents_std, official.vae.latents_std)
    wide = StreamingGenerator.from_pretrained(folder, dtype="float64", load_text_encoder=False)
    torch.testing.assert_close(_dit_out(wide.dit).float(), _dit_out(official.ema))
