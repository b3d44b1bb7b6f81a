"""The tiny decoder (TAEHV): the released file layout, streaming invariants, decoder="tiny" through
generate / stream / pool, its ONNX steps, the training stage and the errors."""

from __future__ import annotations

import copy
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sf_sdk import StreamingGenerator
from sf_sdk.checkpoint import ASSETS_DIR, CheckpointError, load_pretrained
from sf_sdk.checkpoint.taehv import (
    TINY_DECODER_FILE,
    add_tiny_decoder,
    load_folder_tiny_decoder,
    load_taehv,
    taehv_config_from_state,
)
from sf_sdk.config import StreamingConfig
from sf_sdk.models.onednn import PackedConvs
from sf_sdk.models.taehv import MemBlock, TAEHVConfig, TAEHVDecoder, TinyDecodeStep, decode_tiny_streams
from training.train import compose, run

SMALL = TAEHVConfig(z_dim=16, widths=(8, 8, 4, 4), blocks_per_stage=2)


def released_layout(z: int, widths: tuple[int, ...], blocks: int = 3, strides: tuple[int, ...] = (1, 2, 2)
                    ) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a released TAEHV decoder (``taew2_1``: z 16, widths 256/128/64/64), written
    out from the public layout: an ``nn.Sequential`` of clamp, conv, ReLU, then per stage
    ``blocks`` MemBlocks, upsample, TGrow, conv (no bias); ReLU, conv."""
    keys: dict[str, tuple[int, ...]] = {"decoder.1.weight": (widths[0], z, 3, 3), "decoder.1.bias": (widths[0],)}
    i = 3
    for k, stride in enumerate(strides):
        n = widths[k]
        for _ in range(blocks):
            keys[f"decoder.{i}.conv.0.weight"] = (n, 2 * n, 3, 3)
            for j in (0, 2, 4):
                keys[f"decoder.{i}.conv.{j}.bias"] = (n,)
            keys[f"decoder.{i}.conv.2.weight"] = keys[f"decoder.{i}.conv.4.weight"] = (n, n, 3, 3)
            i += 1
        i += 1  # the upsampling: no weights
        keys[f"decoder.{i}.conv.weight"] = (n * stride, n, 1, 1)  # TGrow
        keys[f"decoder.{i + 1}.weight"] = (widths[k + 1], n, 3, 3)
        i += 2
    keys[f"decoder.{i + 1}.weight"] = (3, widths[-1], 3, 3)  # after a ReLU
    keys[f"decoder.{i + 1}.bias"] = (3,)
    return keys


def _released_file(path: Path, layout: dict[str, tuple[int, ...]], *, encoder: bool = True) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    state = {k: torch.randn(shape, generator=gen) * 0.2 for k, shape in layout.items()}
    if encoder:  # released files carry the encoder too
        state["encoder.0.weight"] = torch.randn(8, 3, 3, 3, generator=gen)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state


def test_module_has_the_released_taew2_1_layout() -> None:
    with torch.device("meta"):
        model = TAEHVDecoder(TAEHVConfig())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == released_layout(16, (256, 128, 64, 64))
    assert model.num_decoder_caches == 9


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_released_layout_loads_and_equals_the_module_built_directly(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"taew2_1{suffix}"
    state = _released_file(path, released_layout(16, SMALL.widths, blocks=2))
    assert taehv_config_from_state(state) == SMALL
    loaded = load_taehv(path)
    direct = TAEHVDecoder(SMALL).eval()
    direct.load_state_dict({k: v for k, v in state.items() if k.startswith("decoder.")})
    z = torch.randn(1, 16, 3, 2, 2)
    with torch.no_grad():
        assert torch.equal(loaded.decode(z), direct.decode(z))


def test_streaming_equals_whole_clip_decode() -> None:
    model = TAEHVDecoder(SMALL).eval()
    z = torch.randn(2, 16, 6, 3, 2)
    with torch.no_grad():
        whole = model.decode(z)
        assert whole.shape == (2, 3, 1 + 4 * 5, 24, 16)
        stream = model.streaming_decoder()
        parts = [stream.decode(z[:, :, a:b]) for a, b in ((0, 1), (1, 3), (3, 6))]
        assert [p.shape[2] for p in parts] == [1, 8, 12]
        torch.testing.assert_close(torch.cat(parts, dim=2), whole, rtol=0, atol=1e-6)
        # The export step, one latent frame per call with the memory as tensors.
        first, step = TinyDecodeStep(model, first_frame=True), TinyDecodeStep(model)
        memory = step.initial_cache(2, 3, 2)
        frames, memory = first(z[:, :, :1], *memory)
        out = [frames]
        for i in range(1, 6):
            frames, memory = step(z[:, :, i:i + 1], *memory)
            out.append(frames)
        torch.testing.assert_close(torch.cat(out, dim=2), whole, rtol=0, atol=1e-6)
        assert [tuple(m.shape) for m in memory] == [s.shape for s in step.cache_spec(2, 3, 2)]


def _decode_layer_by_layer(model: TAEHVDecoder, z: torch.Tensor) -> torch.Tensor:
    """The decoder as its layers read, one after another (upsample, TGrow, conv as three ops;
    contiguous memory): the reference for the folded growth and channels-last path."""
    b, c, t, h, w = z.shape
    x = z.transpose(1, 2).reshape(b * t, c, h, w)
    for layer in model.decoder:
        if isinstance(layer, MemBlock):
            xs = x.reshape(b, -1, *x.shape[1:])
            past = torch.cat([torch.zeros_like(xs[:, :1]), xs[:, :-1]], dim=1).reshape(x.shape)
            x = layer.conv(torch.cat([x, past], dim=1)).add(layer.skip(x)).relu()
        else:
            x = layer(x)
    raw = x.reshape(b, -1, *x.shape[1:]).transpose(1, 2)
    return model.to_pixels(raw[:, :, model.frames_to_trim:], clamp=False)


@pytest.mark.parametrize("config", [
    SMALL,
    # A stage that grows in time only, one in space only.
    TAEHVConfig(z_dim=4, widths=(8, 6, 4), blocks_per_stage=1, time_upscale=(True, False), space_upscale=(False, True)),
], ids=["small", "time-only-and-space-only-stages"])
def test_folded_growth_equals_the_layers(config: TAEHVConfig) -> None:
    torch.manual_seed(0)
    model = TAEHVDecoder(config).double().eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    z = torch.randn(2, config.z_dim, 3, 3, 5, dtype=torch.float64)
    with torch.no_grad():
        reference = _decode_layer_by_layer(model, z)
        torch.testing.assert_close(model.decode(z, clamp=False), reference, rtol=1e-12, atol=1e-9)
        # The folded weights are kept between calls and rebuilt when a weight changes.
        model.decoder[model._growth_layers[-1] + 2].weight.mul_(-1)
        changed = _decode_layer_by_layer(model, z)
        assert (changed - reference).abs().max() > 1e-3
        torch.testing.assert_close(model.decode(z, clamp=False), changed, rtol=1e-12, atol=1e-9)
        # A decoder made under inference mode (its weights are inference tensors) decodes the same.
        with torch.inference_mode():
            frozen = TAEHVDecoder(config).double().eval()
            frozen.load_state_dict(model.state_dict())
            torch.testing.assert_close(frozen.decode(z, clamp=False), changed, rtol=1e-12, atol=1e-9)
    # Training: the same gradients as the layers give.
    model.train()
    grads = []
    for decode in (lambda: model.decode(z, clamp=False), lambda: _decode_layer_by_layer(model, z)):
        model.zero_grad()
        decode().square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


def test_batched_streams_equal_each_stream_alone() -> None:
    model = TAEHVDecoder(SMALL).eval()
    z = torch.randn(2, 16, 5, 2, 2)
    with torch.no_grad():
        alone = [model.decode(z[i:i + 1]) for i in range(2)]
        a, b = model.streaming_decoder(), model.streaming_decoder()
        first = decode_tiny_streams([a], z[:1, :, :2])  # stream a starts alone
        rest = decode_tiny_streams([a, b], torch.cat([z[:1, :, 2:5], z[1:, :, :3]]))  # b starts beside a
        last = decode_tiny_streams([b], z[1:, :, 3:5])
    torch.testing.assert_close(torch.cat([first[0], rest[0]], dim=2), alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat([rest[1], last[0]], dim=2), alone[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_convs_give_the_modules_bits_and_follow_weight_changes(dtype: torch.dtype,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    model = TAEHVDecoder(SMALL).eval().to(dtype)
    z = torch.randn(1, 16, 6, 3, 2).to(dtype)

    def stream(packed: bool) -> torch.Tensor:
        monkeypatch.setattr(PackedConvs, "usable", staticmethod(lambda x, _u=PackedConvs.usable: packed and _u(x)))
        s = model.streaming_decoder()
        with torch.no_grad():
            return torch.cat([s.decode(z[:, :, a:b]) for a, b in ((0, 1), (1, 3), (3, 6))], dim=2)

    frames = torch.zeros(2, 4, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert PackedConvs.usable(frames) and not PackedConvs.usable(frames.to(torch.float16))
    assert not PackedConvs.usable(frames)  # autograd on: the modules run
    def same(a: torch.Tensor, b: torch.Tensor) -> None:
        # bfloat16: PyTorch's convs are oneDNN's too, so the same bits; float32 at these small
        # shapes: PyTorch may pick its own kernel, which rounds differently
        if dtype == torch.bfloat16:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)

    before = stream(True)
    convs = 2 + (3 * SMALL.blocks_per_stage + 1) * SMALL.stages  # every conv, growths too
    assert len(model._packed._packed) == convs and len(model._packed) == 3 * convs  # chunks of 1, 2, 3 frames
    same(before, stream(False))
    with torch.no_grad():
        model.decoder[1].weight.mul_(1.5)  # in place: the packed weights must be made again
        model.decoder[4].conv[2].bias.add_(0.1)
        model.decoder[6].conv.weight.mul_(0.5)  # a TGrow: its stage's folded growth is made again
    changed = stream(True)
    same(changed, stream(False))
    assert not torch.equal(changed, before)
    twin = copy.deepcopy(model)  # a copy (and a pickle) starts without the packed weights
    assert not twin._packed._packed and not pickle.loads(pickle.dumps(model))._packed._packed
    with torch.no_grad():
        assert torch.equal(twin.streaming_decoder().decode(z), model.streaming_decoder().decode(z))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled shapes-tiny model with a (random) tiny decoder added."""
    folder = tmp_path_factory.mktemp("tiny") / "shapes-tiny"
    shutil.copytree(ASSETS_DIR / "shapes-tiny", folder, ignore=shutil.ignore_patterns(TINY_DECODER_FILE))
    index = json.loads((folder / "model_index.json").read_text())
    index.pop("tiny_decoder", None)
    (folder / "model_index.json").write_text(json.dumps(index))
    torch.manual_seed(3)
    add_tiny_decoder(folder, TAEHVDecoder(SMALL))
    return folder


def test_decoder_tiny_through_generate_stream_and_pool(tiny_folder: Path) -> None:
    gen = StreamingGenerator.from_pretrained(tiny_folder, decoder="tiny")
    wan = StreamingGenerator.from_pretrained(tiny_folder)
    assert gen.decoder == "tiny" and wan.decoder == "wan"
    tiny_decoder = load_folder_tiny_decoder(tiny_folder)
    video = gen.generate("a red circle", num_frames=21, seed=1)
    assert video.frames.shape == (21, 64, 64, 3)
    # The frames are the tiny decoder's decode of the generated latents (not the Wan decoder's).
    with torch.no_grad():
        expected = tiny_decoder.decode(video.latents.transpose(0, 1)[None])  # [1, 3, 21, 64, 64]
    ref = ((expected[0].permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).numpy().astype(np.int16)
    assert np.abs(video.frames.astype(np.int16) - ref).max() <= 1
    assert np.abs(video.frames.astype(np.int16) - wan.generate("a red circle", num_frames=21, seed=1).frames).mean() > 1
    with gen.stream("a red circle", num_frames=21, seed=1) as s:
        streamed = np.concatenate([c.frames for c in s])
    assert np.array_equal(streamed, video.frames)
    pool = gen.pool(2)
    a = pool.open("a red circle", num_frames=21, seed=1)
    b = pool.open("a blue square", num_frames=21, seed=2)
    chunks: dict = {a: [], b: []}
    while pool.streams:
        for h, c in pool.step().items():
            chunks[h].append(c.frames)
    pooled = np.concatenate(chunks[a])
    assert np.abs(pooled.astype(np.int16) - video.frames).max() <= 2  # batched DiT and decode: float rounding


def test_tiny_decoder_errors(tiny_folder: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"  # the model without a tiny decoder
    shutil.copytree(tiny_folder, plain, ignore=shutil.ignore_patterns(TINY_DECODER_FILE))
    index = json.loads((plain / "model_index.json").read_text())
    del index["tiny_decoder"]
    (plain / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="has no tiny decoder"):
        StreamingGenerator.from_pretrained(plain, decoder="tiny")
    with pytest.raises(ValueError, match="this model has no tiny decoder"):
        StreamingGenerator.from_loaded(load_pretrained(plain), decoder="tiny")
    with pytest.raises(ValueError, match="decoder must be one of"):
        StreamingGenerator.from_pretrained(tiny_folder, decoder="taehv")
    with pytest.raises(ValueError, match="pass decoder='tiny'"):
        StreamingGenerator.from_pretrained(tiny_folder, decoder_path=tiny_folder / TINY_DECODER_FILE)
    # A decoder of other latents (z_dim 8 for a z_dim 16 model).
    other = tmp_path / "taew_z8.safetensors"
    _released_file(other, released_layout(8, SMALL.widths, blocks=2))
    with pytest.raises(ValueError, match="z_dim=8"):
        StreamingGenerator.from_pretrained(tiny_folder, decoder="tiny", decoder_path=other)
    # A partial file: a MemBlock's conv missing; and a wrong shape, against an explicit config.
    layout = released_layout(16, SMALL.widths, blocks=2)
    partial = {k: v for k, v in layout.items() if k != "decoder.4.conv.2.weight"}
    _released_file(tmp_path / "partial.safetensors", partial, encoder=False)
    with pytest.raises(CheckpointError, match=r"missing keys: decoder\.4\.conv\.2\.weight"):
        load_taehv(tmp_path / "partial.safetensors", config=SMALL)
    wrong = dict(layout, **{"decoder.1.weight": (8, 16, 1, 1)})
    _released_file(tmp_path / "wrong.safetensors", wrong)
    with pytest.raises(CheckpointError, match=r"wrong shapes: decoder\.1\.weight"):
        load_taehv(tmp_path / "wrong.safetensors", config=SMALL)
    save_file({"model.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a TAEHV file"):
        load_taehv(tmp_path / "other.safetensors")
    save_file({"encoder.0.weight": torch.zeros(2)}, str(tmp_path / "encoder_only.safetensors"))
    with pytest.raises(CheckpointError, match="no TAEHV decoder"):
        load_taehv(tmp_path / "encoder_only.safetensors")
    # The index describes a tiny decoder whose file is missing.
    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    (broken / TINY_DECODER_FILE).unlink()
    with pytest.raises(CheckpointError, match="tiny_decoder.safetensors is missing"):
        StreamingGenerator.from_pretrained(broken, decoder="tiny")


@pytest.mark.slow
def test_tiny_decoder_onnx_steps_match_eager(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from export.tiny import export_tiny_onnx, verify_tiny

    model = TAEHVDecoder(TAEHVConfig(z_dim=4, widths=(4, 4, 4, 4), blocks_per_stage=1)).eval()
    stream = StreamingConfig(latent_height=2, latent_width=2)
    export_tiny_onnx(model, stream, tmp_path)
    result = verify_tiny(model, stream, tmp_path)
    assert result.ok, result


def _smoke(run_dir: Path, *overrides: str) -> None:
    run(compose("smoke", [f"run_dir={run_dir}", *overrides]))


@pytest.mark.slow
def test_training_stage_runs_and_resumes_exactly(tmp_path: Path) -> None:
    base = tmp_path / "base"
    _smoke(base, "stages=[vae]", "vae.steps=1", "vae.stats_clips=1")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    shutil.copytree(base, straight)
    shutil.copytree(base, resumed)
    _smoke(straight, "stages=[tiny_decoder]", "tiny_decoder.steps=2")
    _smoke(resumed, "stages=[tiny_decoder]", "tiny_decoder.steps=1")
    _smoke(resumed, "stages=[tiny_decoder]", "tiny_decoder.steps=2")  # the same command, a larger budget
    a = load_file(straight / "tiny_decoder" / "final" / TINY_DECODER_FILE)
    b = load_file(resumed / "tiny_decoder" / "final" / TINY_DECODER_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from training.stages.tiny_decoder import load_trained_tiny_decoder

    assert load_trained_tiny_decoder(straight).config.widths == (8, 8, 4, 4)
    metrics = [json.loads(line) for line in (straight / "tiny_decoder" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 2 and np.isfinite(metrics[-1]["loss_grad"])


def test_training_stage_starts_from_a_folders_tiny_decoder(tiny_folder: Path) -> None:
    from training.stages.tiny_decoder import _start_from

    torch.manual_seed(0)
    fresh = TAEHVDecoder(SMALL)
    _start_from(fresh, str(tiny_folder))
    shipped = load_folder_tiny_decoder(tiny_folder).state_dict()
    assert all(torch.equal(tensor, shipped[name]) for name, tensor in fresh.state_dict().items())
    wider = TAEHVDecoder(TAEHVConfig(z_dim=16, widths=(16, 8, 4, 4), blocks_per_stage=2))
    with pytest.raises(ValueError, match="set tiny_decoder.widths / blocks_per_stage to match"):
        _start_from(wider, str(tiny_folder))
