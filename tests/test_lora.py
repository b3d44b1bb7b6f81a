"""LoRA: merged weights equal the base run with the LoRA branch added, in each layout read (PEFT
folder with alpha, PEFT / LongLive state dicts, kohya with per-module alpha, ours); mismatched
LoRAs are clear errors; extraction by SVD round-trips; from_pretrained(lora=) and sf-generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sf_sdk import StreamingGenerator
from sf_sdk.checkpoint import CheckpointError, extract_lora, merge_lora, read_lora, save_lora, save_pretrained
from sf_sdk.config import DIT_PRESETS, StreamingConfig
from sf_sdk.models.dit import WanDiT

DIT = DIT_PRESETS["tiny"]
RANK = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def _base(seed: int = 1) -> WanDiT:
    torch.manual_seed(seed)
    return WanDiT(DIT).eval()


def _targets(model: WanDiT) -> list[str]:
    # LongLive's targets: every Linear inside the blocks; a subset keeps the files small here
    return [n for n, m in model.named_modules() if n.startswith("blocks.") and isinstance(m, torch.nn.Linear)
            and (".self_attn." in n or ".ffn." in n)]


def _pairs(model: WanDiT, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in _targets(model):
        o, i = model.get_submodule(name).weight.shape
        out[name] = (torch.randn(RANK, i, generator=g) * 0.2, torch.randn(o, RANK, generator=g) * 0.2)
    return out


def _out(model: WanDiT) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, DIT.in_dim, 4, 4, generator=g)
    ctx = torch.randn(1, 5, DIT.text_dim, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([[900.0, 500.0, 100.0]]), ctx)


def _with_branch(model: WanDiT, pairs, scale: float) -> torch.Tensor:
    """The base model run with each adapted weight W replaced by W + scale * B @ A, computed here in
    float64 from the pairs (the LoRA delta added by hand)."""
    with torch.no_grad():
        saved = {n: model.get_submodule(n).weight.clone() for n in pairs}
        for name, (a, b) in pairs.items():
            w = model.get_submodule(name).weight
            w.copy_((w.double() + scale * (b.double() @ a.double())).float())
    try:
        return _out(model)
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                model.get_submodule(name).weight.copy_(w)


def _peft_keys(pairs, adapter: str = "") -> dict[str, torch.Tensor]:
    sd = {}
    for name, (a, b) in pairs.items():
        sd[f"base_model.model.{name}.lora_A{adapter}.weight"] = a
        sd[f"base_model.model.{name}.lora_B{adapter}.weight"] = b
    return sd


def test_peft_folder_with_alpha_merges_to_the_branch(tmp_path: Path) -> None:
    base, pairs = _base(), _pairs(_base())
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in _peft_keys(pairs, ".default").items()},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": 6, "peft_type": "LORA"}))
    expected = _with_branch(base, pairs, scale=0.5 * 6 / RANK)
    merged = _base()
    assert len(merge_lora(merged, folder, scale=0.5)) == len(pairs)
    torch.testing.assert_close(_out(merged), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_out(merged), _out(base))


def test_merge_equals_the_unmerged_lora_branch() -> None:
    # One Linear layer: the merged weight computes what PEFT's unmerged forward does,
    # base(x) + scale * (x A^T) B^T.
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(12, 8))
    a, b, x = torch.randn(RANK, 12), torch.randn(8, RANK), torch.randn(5, 12)
    from sf_sdk.checkpoint.lora import LoRA, LoRALayer

    with torch.no_grad():
        unmerged = layer(x) + 0.75 * (x @ a.T) @ b.T
        merge_lora(layer, LoRA({"0": LoRALayer(a, b, 1.5)}), scale=0.5)
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["longlive", "peft_state_dict", "kohya", "ours"])
def test_state_dict_layouts_merge_to_the_branch(layout: str, tmp_path: Path) -> None:
    base, pairs = _base(), _pairs(_base())
    scale = 1.0  # alpha = rank unless the file says otherwise
    if layout == "longlive":  # lora.pt: {'generator_lora': PEFT keys}, alpha = rank (256 / 256)
        path = tmp_path / "lora.pt"
        torch.save({"generator_lora": _peft_keys(pairs)}, path)
    elif layout == "peft_state_dict":
        path = tmp_path / "adapter.pt"
        torch.save(_peft_keys(pairs, ".default"), path)
    elif layout == "kohya":  # lora_down / lora_up with a per-module alpha, wrapper prefix on the names
        path = tmp_path / "kohya.safetensors"
        sd = {}
        for name, (a, b) in pairs.items():
            sd[f"model.{name}.lora_down.weight"] = a
            sd[f"model.{name}.lora_up.weight"] = b
            sd[f"model.{name}.alpha"] = torch.tensor(1.5)
        save_file(sd, str(path))
        scale = 1.5 / RANK
    else:
        from sf_sdk.checkpoint.lora import LoRA, LoRALayer

        path = save_lora(tmp_path / "ours.safetensors", LoRA({n: LoRALayer(a, b, 0.25) for n, (a, b) in pairs.items()}))
        scale = 0.25
    expected = _with_branch(base, pairs, scale)
    merged = _base()
    merge_lora(merged, path)
    torch.testing.assert_close(_out(merged), expected, rtol=1e-5, atol=1e-5)


def test_mismatched_loras_are_clear_errors(tmp_path: Path) -> None:
    pairs = _pairs(_base())
    name = "blocks.0.self_attn.q"
    wrong_shape = dict(pairs, **{name: (torch.zeros(RANK, 7), pairs[name][1])})
    torch.save(_peft_keys(wrong_shape), tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"blocks\.0\.self_attn\.q: lora_A \(3, 7\) .* weight \[96, 96\]"):
        merge_lora(_base(), tmp_path / "shape.pt")
    unknown = dict(pairs, **{"blocks.9.self_attn.q": pairs[name]})
    torch.save(_peft_keys(unknown), tmp_path / "unknown.pt")
    with pytest.raises(CheckpointError, match=r"module\(s\) the DiT does not have: \['blocks\.9\.self_attn\.q'\]"):
        merge_lora(_base(), tmp_path / "unknown.pt")
    half = _peft_keys(pairs)
    del half[f"base_model.model.{name}.lora_B.weight"]
    torch.save(half, tmp_path / "half.pt")
    with pytest.raises(CheckpointError, match=r"only one of lora_A / lora_B: \['blocks\.0\.self_attn\.q'\]"):
        merge_lora(_base(), tmp_path / "half.pt")
    torch.save(_base().state_dict(), tmp_path / "not_lora.pt")
    with pytest.raises(CheckpointError, match="holds no LoRA weights"):
        read_lora(tmp_path / "not_lora.pt")
    # nothing was merged by a failed call
    model = _base()
    with pytest.raises(CheckpointError):
        merge_lora(model, tmp_path / "shape.pt")
    torch.testing.assert_close(_out(model), _out(_base()), rtol=0, atol=0)


def test_extracted_lora_round_trips(tmp_path: Path) -> None:
    base, tuned = _base(), _base()
    pairs = _pairs(base, seed=5)
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            tuned.get_submodule(name).weight += b @ a  # a rank-3 fine-tune
    lora = extract_lora(base, tuned, rank=RANK)
    assert sorted(lora.layers) == sorted(pairs)
    path = save_lora(tmp_path / "extracted.safetensors", lora)
    merged = _base()
    merge_lora(merged, path)
    torch.testing.assert_close(_out(merged), _out(tuned), rtol=1e-4, atol=1e-4)


def test_from_pretrained_and_sf_generate_merge_a_lora(tmp_path: Path, capsys) -> None:
    from sf_sdk.cli import main

    stream = StreamingConfig(latent_height=2, latent_width=2, local_attn_size=6)
    folder = save_pretrained(tmp_path / "model", dit=_base(), dit_config=DIT, streaming=stream)
    pairs = _pairs(_base())
    torch.save({"generator_lora": _peft_keys(pairs)}, tmp_path / "lora.pt")
    gen = StreamingGenerator.from_pretrained(folder, lora=tmp_path / "lora.pt", lora_scale=0.5, backend="eager")
    torch.testing.assert_close(_out(gen.dit), _with_branch(_base(), pairs, 0.5), rtol=1e-5, atol=1e-5)
    # sf-generate --lora: the bundled model with a small LoRA writes its video; a LoRA that does
    # not fit is a one-line error naming the module, exit code 2
    shapes = StreamingGenerator.from_pretrained("shapes-tiny", load_text_encoder=False, backend="eager").dit
    lora = {}
    for name in ("blocks.0.self_attn.q", "blocks.1.ffn.0"):
        o, i = shapes.get_submodule(name).weight.shape
        lora[name] = (torch.randn(2, i) * 0.01, torch.randn(o, 2) * 0.01)
    torch.save(_peft_keys(lora), tmp_path / "shapes_lora.pt")
    out = tmp_path / "out.mp4"
    rc = main(["a red circle moving left", "--model", "shapes-tiny", "--frames", "9", "--lora",
               str(tmp_path / "shapes_lora.pt"), "--lora-scale", "0.5", "--output", str(out), "--device", "cpu", "--backend", "eager",
               "--no-progress", "-q"])
    assert rc == 0 and out.stat().st_size > 0
    torch.save(_peft_keys({"blocks.7.ffn.0": lora["blocks.1.ffn.0"]}), tmp_path / "bad.pt")
    rc = main(["a red circle moving left", "--model", "shapes-tiny", "--frames", "9", "--lora",
               str(tmp_path / "bad.pt"), "--output", str(tmp_path / "bad.mp4"), "--device", "cpu", "--backend", "eager", "-q"])
    assert rc == 2 and "blocks.7.ffn.0" in capsys.readouterr().err
