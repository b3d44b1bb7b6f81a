"""Loaders of the Self-Forcing family's released checkpoints (Self-Forcing, Causal Forcing(++),
LongLive base + LoRA, Reward Forcing): tiny files written here in each release's layout load into
modules equal to ones built directly, with their authors' streaming defaults; wrong and partial
files name what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sf_sdk import StreamingGenerator
from sf_sdk.checkpoint import (
    FAMILIES,
    CheckpointError,
    convert_official,
    detect_family,
    load_pretrained,
    read_index,
)
from sf_sdk.config import DIT_PRESETS, TEXT_PRESETS, VAE_PRESETS
from sf_sdk.models.dit import WanDiT
from sf_sdk.models.text import UMT5Encoder, build_word_tokenizer
from sf_sdk.models.vae import WanVAE

DIT = DIT_PRESETS["tiny"]
WORDS = ["a", "red", "circle", "moving", "left"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _seeded(seed: int) -> WanDiT:
    torch.manual_seed(seed)
    return WanDiT(DIT).eval()


def _prefixed(m: WanDiT, prefix: str = "model.") -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v.clone() for k, v in m.state_dict().items()}


def _out(model: WanDiT) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, DIT.in_dim, 4, 4, generator=g)
    ctx = torch.randn(1, 5, DIT.text_dim, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([[900.0, 500.0, 100.0]]), ctx)


def _lora_pair(module: torch.nn.Linear, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = module.weight.shape
    return torch.randn(rank, in_f, generator=g) * 0.1, torch.randn(out_f, rank, generator=g) * 0.1


@pytest.fixture(scope="module")
def wan(tmp_path_factory) -> Path:
    """A tiny Wan2.1-T2V-1.3B folder: config.json (the tiny DiT), VAE, umT5 and tokenizer."""
    root = tmp_path_factory.mktemp("wan_models") / "Wan2.1-T2V-1.3B"
    root.mkdir()
    torch.manual_seed(4)
    torch.save(WanVAE(VAE_PRESETS["tiny"]).state_dict(), root / "Wan2.1_VAE.pth")
    torch.manual_seed(5)
    torch.save({k: v.to(torch.bfloat16) for k, v in UMT5Encoder(TEXT_PRESETS["tiny"]).state_dict().items()},
               root / "models_t5_umt5-xxl-enc-bf16.pth")
    build_word_tokenizer(WORDS, root / "google" / "umt5-xxl")
    cfg = {"model_type": "t2v", "dim": DIT.dim, "ffn_dim": DIT.ffn_dim, "freq_dim": DIT.freq_dim,
           "num_heads": DIT.num_heads, "num_layers": DIT.num_layers, "text_len": DIT.text_len,
           "text_dim": DIT.text_dim}
    (root / "config.json").write_text(json.dumps(cfg))
    return root


class Release:
    """Files written in one family's release layout, and the module each should load into."""

    def __init__(self, path: Path, expected: WanDiT, family: str) -> None:
        self.path, self.expected, self.family = path, expected, family


def _write(root: Path, family: str) -> Release:
    gen, ema, critic = _seeded(1), _seeded(2), _seeded(3)
    entries = {"generator": _prefixed(gen), "generator_ema": _prefixed(ema), "critic": _prefixed(critic)}
    if family == "self-forcing":
        path, expected = root / "checkpoints" / "self_forcing_dmd.pt", ema
    elif family == "causal-forcing-chunkwise":  # its README loads 'generator'
        path, expected = root / "checkpoints" / "chunkwise" / "causal_forcing.pt", gen
    elif family == "causal-forcing-longvideo":  # its README passes --use_ema
        path, expected = root / "checkpoints" / "chunkwise" / "longvideo.pt", ema
    elif family == "rolling-forcing":  # FSDP-wrapped EMA keys, which its loader strips
        entries["generator_ema"] = _prefixed(ema, "model._fsdp_wrapped_module.")
        path, expected = root / "checkpoints" / "rolling_forcing_dmd.pt", ema
    elif family == "causal-forcing-framewise":
        path, expected = root / "checkpoints" / "framewise" / "causal_forcing.pt", ema
    elif family in ("causal-forcing++-2step", "causal-forcing++-1step"):
        # FSDP-wrapped keys, as the authors' loader falls back to
        entries["generator_ema"] = _prefixed(ema, "model._fsdp_wrapped_module.")
        name = "framewise-2step.pt" if "2step" in family else "framewise-1step.pt"
        path, expected = root / "checkpoints" / "causal-forcing++" / name, ema
    elif family == "longlive":
        path = root / "longlive_models" / "models" / "longlive_base.pt"
        path.parent.mkdir(parents=True)
        torch.save({"generator": _prefixed(gen), "generator_ema": _prefixed(ema)}, path)
        # lora.pt: PEFT keys of every block Linear under 'generator_lora', rank 4, alpha = rank
        expected, peft = _seeded(1), {}
        for name, mod in expected.named_modules():
            if name.startswith("blocks.") and isinstance(mod, torch.nn.Linear):
                a, b = _lora_pair(mod, 4, len(peft))
                peft[f"base_model.model.{name}.lora_A.weight"] = a
                peft[f"base_model.model.{name}.lora_B.weight"] = b
                with torch.no_grad():
                    mod.weight += b @ a
        torch.save({"generator_lora": peft}, path.parent / "lora.pt")
        return Release(path, expected, family)
    elif family == "reward-forcing":  # a flat state dict, loaded straight into the wrapper
        path = root / "checkpoints" / "Reward-Forcing-T2V-1.3B" / "rewardforcing.pt"
        path.parent.mkdir(parents=True)
        torch.save(_prefixed(gen), path)
        return Release(path, gen, family)
    else:
        raise AssertionError(family)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(entries, path)
    return Release(path, expected, family)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_release_loads_with_its_authors_defaults(family: str, wan: Path, tmp_path: Path) -> None:
    rel = _write(tmp_path, family)
    assert detect_family(rel.path).name == family
    loaded = load_pretrained(rel.path, wan_dir=wan, load_vae=False, load_text_encoder=False)
    torch.testing.assert_close(_out(loaded.dit), _out(rel.expected), rtol=1e-5, atol=1e-5)
    assert loaded.streaming == FAMILIES[family].streaming
    st = loaded.streaming
    expect = {  # the authors' inference configs (docs/models.md)
        "self-forcing": (3, 4, 0, -1, 0, "absolute", 1.0),
        "causal-forcing-chunkwise": (3, 4, 0, -1, 0, "absolute", 1.0),
        "causal-forcing-framewise": (1, 4, 0, -1, 0, "absolute", 1.0),
        "causal-forcing++-2step": (1, 2, 4, -1, 0, "absolute", 1.0),
        "causal-forcing++-1step": (1, 1, 4, -1, 0, "absolute", 1.0),
        "longlive": (3, 4, 0, 12, 3, "absolute", 1.0),
        "reward-forcing": (3, 4, 0, 9, 3, "cache_relative", 0.999),
        "causal-forcing-longvideo": (3, 4, 0, 21, 3, "cache_relative", 1.0),
        "rolling-forcing": (3, 5, 0, 21, 3, "cache_relative", 1.0),
    }[family]
    assert (st.num_frame_per_block, st.num_steps, len(st.first_chunk_steps), st.local_attn_size, st.sink_size,
            st.position_mode, st.sink_decay) == expect
    # Rolling Forcing's joint window: one chunk per denoising step (1: chunk by chunk)
    assert st.denoise_window == (st.num_steps if family in ("causal-forcing-longvideo", "rolling-forcing") else 1)


def test_family_argument_and_use_ema(wan: Path, tmp_path: Path) -> None:
    rel = _write(tmp_path, "causal-forcing-chunkwise")
    renamed = tmp_path / "mine.pt"
    renamed.write_bytes(rel.path.read_bytes())
    as_cf = load_pretrained(renamed, wan_dir=wan, family="causal-forcing-framewise", load_vae=False,
                            load_text_encoder=False)
    assert as_cf.streaming == FAMILIES["causal-forcing-framewise"].streaming
    torch.testing.assert_close(_out(as_cf.dit), _out(_seeded(2)))  # that family reads generator_ema
    not_ema = load_pretrained(renamed, wan_dir=wan, family="causal-forcing-framewise", use_ema=False,
                              load_vae=False, load_text_encoder=False)
    torch.testing.assert_close(_out(not_ema.dit), _out(_seeded(1)))
    # an unknown name loads as Self-Forcing (logged); an unknown family is an error
    assert load_pretrained(renamed, wan_dir=wan, load_vae=False, load_text_encoder=False).streaming == \
        FAMILIES["self-forcing"].streaming
    with pytest.raises(CheckpointError, match="unknown family 'causal'; choose one of"):
        load_pretrained(renamed, wan_dir=wan, family="causal", load_vae=False, load_text_encoder=False)


def test_wrong_and_partial_files_name_what_is_wrong(wan: Path, tmp_path: Path) -> None:
    def load(path: Path, **kw):
        return load_pretrained(path, wan_dir=wan, load_vae=False, load_text_encoder=False, **kw)

    ll = _write(tmp_path / "ll", "longlive")
    with pytest.raises(CheckpointError, match="is a LongLive LoRA .*pass this file as lora="):
        load(ll.path.parent / "lora.pt", family="longlive")
    partial = tmp_path / "partial" / "rewardforcing.pt"
    partial.parent.mkdir()
    sd = _prefixed(_seeded(1))
    torch.save({k: v for k, v in sd.items() if not k.startswith("model.blocks.1.")}, partial)
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\."):
        load(partial)
    only_gen = tmp_path / "cf" / "framewise" / "causal_forcing.pt"
    only_gen.parent.mkdir(parents=True)
    torch.save({"generator": sd}, only_gen)
    with pytest.raises(CheckpointError, match=r"no 'generator_ema' entry.*use_ema=False"):
        load(only_gen)
    bad_lora = tmp_path / "bad_lora.pt"
    torch.save({"generator_lora": {"base_model.model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 7),
                                   "base_model.model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(96, 4)}},
               bad_lora)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.self_attn\.q: lora_A \(4, 7\) .* weight \[96, 96\]"):
        load(ll.path, lora=bad_lora)
    with pytest.raises(CheckpointError, match=r"\['family'\] apply to official checkpoints only"):
        load_pretrained("shapes-tiny", family="longlive")


def test_reward_forcing_streams_and_converts(wan: Path, tmp_path: Path) -> None:
    rel = _write(tmp_path, "reward-forcing")
    small = {"latent_height": 2, "latent_width": 2}
    tiny = {"vae_config": VAE_PRESETS["tiny"], "text_config": TEXT_PRESETS["tiny"]}
    gen = StreamingGenerator.from_pretrained(rel.path, wan_dir=wan, streaming=small, **tiny, backend="eager")
    assert gen.streaming.sink_decay == 0.999 and gen.dit.new_cache(gen.streaming, 1).sink_decay == 0.999
    video = gen.generate("a red circle", num_frames=45, seed=0, decode=False)  # 4 chunks: evictions
    assert video.latents.shape[0] == 12 and torch.isfinite(video.latents).all()
    # the converted folder keeps the weights, the family's streaming, its licence and source
    out = convert_official(rel.path, wan, tmp_path / "rf", "float32", **tiny)
    files = read_index(out)
    assert files.streaming == FAMILIES["reward-forcing"].streaming
    assert files.extra["family"] == "reward-forcing" and "Reward-Forcing-T2V-1.3B" in files.extra["converted_from"]["source"]
    again = StreamingGenerator.from_pretrained(out, streaming=small, backend="eager")
    torch.testing.assert_close(_out(again.dit), _out(rel.expected))


@pytest.mark.parametrize("family", ["causal-forcing-longvideo", "rolling-forcing"])
def test_rolling_forcing_families_stream_and_convert(family: str, wan: Path, tmp_path: Path) -> None:
    rel = _write(tmp_path, family)
    small = {"latent_height": 2, "latent_width": 2}
    tiny = {"vae_config": VAE_PRESETS["tiny"], "text_config": TEXT_PRESETS["tiny"]}
    gen = StreamingGenerator.from_pretrained(rel.path, wan_dir=wan, streaming=small, **tiny, backend="eager")
    assert gen.streaming.denoise_window == gen.streaming.num_steps > 1
    video = gen.generate("a red circle", num_frames=45, seed=0)  # 4 chunks through the joint window, decoded
    assert video.latents.shape[0] == 12 and torch.isfinite(video.latents).all() and video.frames.shape[0] == 45
    out = convert_official(rel.path, wan, tmp_path / "rolling", "float32", include_text_encoder=False,
                           vae_config=VAE_PRESETS["tiny"])
    assert read_index(out).streaming == FAMILIES[family].streaming


def test_longlive_converts_with_its_lora_merged(wan: Path, tmp_path: Path) -> None:
    rel = _write(tmp_path, "longlive")
    out = convert_official(rel.path, wan, tmp_path / "ll", "float32", include_text_encoder=False,
                           vae_config=VAE_PRESETS["tiny"])
    files = read_index(out)
    assert files.extra["converted_from"]["lora"]["file"] == "lora.pt"
    loaded = load_pretrained(out, load_text_encoder=False)
    torch.testing.assert_close(_out(loaded.dit), _out(rel.expected), rtol=1e-5, atol=1e-5)
    # lora_scale=0 leaves the LoRA out: the base weights
    base = load_pretrained(rel.path, wan_dir=wan, lora_scale=0.0, load_vae=False, load_text_encoder=False)
    torch.testing.assert_close(_out(base.dit), _out(_seeded(1)))


def test_convert_command_and_release_folders(wan: Path, tmp_path: Path) -> None:
    from export.convert import main

    rel = _write(tmp_path, "longlive")
    renamed = tmp_path / "base.pt"  # a renamed file: the family and its LoRA are given on the command line
    renamed.write_bytes(rel.path.read_bytes())
    out = tmp_path / "converted"
    rc = main(["--checkpoint", str(renamed), "--wan-dir", str(wan), "--out", str(out), "--dtype", "float32",
               "--family", "longlive", "--lora", str(rel.path.parent / "lora.pt"), "--no-text-encoder",
               "--vae-preset", "tiny"])
    assert rc == 0
    files = read_index(out)
    assert files.extra["family"] == "longlive" and files.streaming == FAMILIES["longlive"].streaming
    torch.testing.assert_close(_out(load_pretrained(out, load_text_encoder=False).dit), _out(rel.expected),
                               rtol=1e-5, atol=1e-5)
    # the release folder itself (longlive_base.pt beside lora.pt): the base is found, the LoRA merged
    loaded = load_pretrained(rel.path.parent, wan_dir=wan, load_vae=False, load_text_encoder=False)
    torch.testing.assert_close(_out(loaded.dit), _out(rel.expected), rtol=1e-5, atol=1e-5)
    # a flat LoRA passed as the base says so
    flat = tmp_path / "rewardforcing.pt"
    torch.save({"base_model.model.blocks.0.ffn.0.lora_A.weight": torch.zeros(2, 96)}, flat)
    with pytest.raises(CheckpointError, match="is a LoRA .*not a DiT checkpoint"):
        load_pretrained(flat, wan_dir=wan, load_vae=False, load_text_encoder=False)
