"""Export backends: settings and profiles, torch.compile without recompilation, AOTInductor and ONNX
Runtime artifacts verified against eager PyTorch and streamed by the generator, TensorRT and
Torch-TensorRT up to the GPU boundary, official-checkpoint conversion.

The AOTInductor, ONNX and torch.compile tests compile real graphs of the tiny preset on 4x6 latents
(tens of seconds each on a 2-core CPU); artifacts are made once per module and shared.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from export.manifest import read_manifest
from export.runtime import BackendUnavailable
from export.settings import (
    ChunkShapes,
    ExportSettings,
    ONNXSettings,
    TRTSettings,
    attention_backend,
    load_export_model,
)
from sf_sdk import StreamingGenerator
from sf_sdk.checkpoint import save_pretrained
from sf_sdk.config import DIT_PRESETS, VAE_PRESETS, StreamingConfig
from sf_sdk.models.dit import ChunkInputs

LATENT_HW = ("4", "6")
WINDOW = 6  # latent frames: chunks of 3 evict from the third chunk on
STREAM_CHUNKS = 5


def _tiny_model():
    return load_export_model("tiny", random_init=True, latent_hw=(4, 6), window=WINDOW)


def _generator(model, backend: str = "eager", **options) -> StreamingGenerator:
    return StreamingGenerator(model.dit, model.streaming, vae=model.vae, backend=backend,
                              backend_options=options or None)


def _stream(gen: StreamingGenerator, chunks: int = STREAM_CHUNKS, decode: bool = True, seed: int = 3):
    emb = torch.randn(5, gen.dit.config.text_dim, generator=torch.Generator().manual_seed(seed))
    out = []
    with attention_backend("reference"), gen.stream(prompt_embeds=emb, seed=seed, decode=decode) as s:
        for chunk in s:
            out.append(chunk)
            if len(out) == chunks:
                break
    return out


def _assert_same_stream(got, ref, atol: float = 1e-4) -> None:
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=atol)
        if b.frames is not None:
            # uint8 frames: at most one level apart where a value sits on a rounding boundary
            assert np.abs(a.frames.astype(int) - b.frames.astype(int)).max() <= 1


# --------------------------------------------------------------------------------------------
# Settings and shape profiles (fast)
# --------------------------------------------------------------------------------------------


def test_shape_profiles_derive_from_configs():
    dit = DIT_PRESETS["tiny"]
    stream = StreamingConfig(latent_height=4, latent_width=6, local_attn_size=6, sink_size=3)
    shapes = ChunkShapes.from_configs(dit, stream, batch=2)
    tokens = 2 * 3  # patch grid of a 4x6 latent with 2x2 patches
    assert shapes.chunk_tokens == 3 * tokens
    assert shapes.cache_shape == (dit.num_layers, 2, 6 * tokens, dit.num_heads, dit.head_dim)
    names = [s.name for s in shapes.inputs()]
    assert names == ["x", "timestep", "cross_k", "cross_v", "k_cache", "v_cache", "write_slots", "kv_len",
                     "cos_q", "sin_q"]
    assert names == list(ChunkInputs._fields)  # one declaration for every backend
    # every input has a batch (stream) axis: per-row slots, valid lengths and rotary tables
    assert shapes.inputs()[6].shape == (2, 3 * tokens) and shapes.inputs()[7].shape == (2,)
    assert shapes.inputs()[7].dtype == torch.int64 and shapes.inputs()[8].shape == (2, 3 * tokens, dit.head_dim // 2)
    glob = ChunkShapes.from_configs(dit, StreamingConfig(latent_height=4, latent_width=6), num_frames=9)
    assert glob.cache_capacity == 9 * tokens

    from export.trt import profiles_for

    decode_model = load_export_model("tiny", random_init=True, latent_hw=(4, 6), window=6)
    settings = TRTSettings(batch_range=(1, 2, 4))
    profiles = profiles_for(decode_model.chunk_shapes(settings), decode_model.decode_shapes(settings), settings)
    lo, opt, hi = profiles["chunk"].shapes["k_cache"]
    assert (lo[1], opt[1], hi[1]) == (1, 2, 4) and lo[2] == 6 * tokens
    assert profiles["chunk"].shapes["kv_len"] == ((1,), (2,), (4,))
    assert profiles["vae_step"].shapes["z"][2][0] == 4
    assert settings.dynamic_batch and not TRTSettings().dynamic_batch


def test_weights_fingerprint_does_not_depend_on_the_thread_count():
    from export.settings import weights_fingerprint

    model = load_export_model("tiny", random_init=True, latent_hw=(4, 6), window=6).dit
    saved = torch.get_num_threads()
    try:
        prints = set()
        for threads in (1, 2):
            torch.set_num_threads(threads)
            prints.add(weights_fingerprint(model))
    finally:
        torch.set_num_threads(saved)
    assert len(prints) == 1
    with torch.no_grad():
        model.head.head.bias.add_(1e-3)
    assert weights_fingerprint(model) not in prints


def test_aoti_autotunes_cpu_gemms_except_for_fast_compiles_and_cuda():
    from export.settings import AOTISettings

    configs = AOTISettings().inductor_configs()
    assert configs["max_autotune"] is True and configs["max_autotune_gemm_backends"] == "CPP,ATEN"
    assert configs["autotune_num_choices_displayed"] == 0  # no choice tables on stderr
    with torch._inductor.config.patch(configs):  # every key is one this Inductor has
        pass
    for settings in (AOTISettings(autotune=False), AOTISettings(fast_compile=True), AOTISettings(device="cuda")):
        assert "max_autotune" not in settings.inductor_configs()
    assert AOTISettings(autotune=False).inductor_configs() == {"freezing": True}


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="batch_size"):
        ExportSettings(batch_size=0)
    with pytest.raises(ValueError, match="dtype"):
        ExportSettings(dtype="int8")
    with pytest.raises(ValueError, match="standard ops"):
        ONNXSettings(attention="kernel")
    with pytest.raises(ValueError, match="precision"):
        TRTSettings(precision="int4")
    with pytest.raises(ValueError, match="float32"):
        TRTSettings(dtype="float16")
    with pytest.raises(ValueError, match="batch_range"):
        TRTSettings(batch_range=(2, 1, 4))
    with pytest.raises(ValueError, match="random-init"):
        load_export_model("tiny")
    with pytest.raises(ValueError, match="preset"):
        load_export_model("no-such-preset", random_init=True)


def test_artifact_backends_need_an_artifact_dir():
    model = _tiny_model()
    with pytest.raises(ValueError, match="artifact_dir"):
        _generator(model, "aoti")
    with pytest.raises(ValueError, match="unknown onnxruntime backend options"):
        _generator(model, "onnxruntime", artifact_dir="x", bogus=1)


def test_gpu_backends_fail_clearly_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the CPU-only error paths do not apply")
    from sf_sdk.generator import backend_status

    assert "CUDA GPU" in backend_status("tensorrt") and "CUDA GPU" in backend_status("torch_tensorrt")
    assert backend_status("onnxruntime") is None and backend_status("aoti") is None
    model = _tiny_model()
    with pytest.raises(BackendUnavailable, match="CUDA GPU"):
        _generator(model, "tensorrt", artifact_dir="unused")
    with pytest.raises(BackendUnavailable, match="CUDA GPU"):
        _generator(model, "torch_tensorrt")


# --------------------------------------------------------------------------------------------
# torch.compile: one graph for every chunk, evictions included
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compile_backend_never_recompiles_across_chunks():
    import torch._dynamo
    from torch._dynamo.utils import counters

    cfg = dataclasses.replace(DIT_PRESETS["tiny"], num_layers=1)
    stream = StreamingConfig(latent_height=4, latent_width=6, local_attn_size=WINDOW)
    torch._dynamo.reset()
    counters.clear()
    compiled = StreamingGenerator.from_config(cfg, stream, backend="compile", seed=1)
    eager = StreamingGenerator.from_config(cfg, stream, seed=1)
    chunks = 6  # frames 0-17 through a 6-frame window: four chunks evict
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = _stream(compiled, chunks, decode=False)
        assert counters["stats"]["unique_graphs"] == 1
        got += _stream(compiled, 2, decode=False, seed=4)  # a second stream reuses the graph too
    assert counters["stats"]["unique_graphs"] == 1
    _assert_same_stream(got[:chunks], _stream(eager, chunks, decode=False))


# --------------------------------------------------------------------------------------------
# AOTInductor
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aoti_dir(tmp_path_factory):
    from export import aoti

    out = tmp_path_factory.mktemp("aoti")
    rc = aoti.main(["--model", "tiny", "--random-init", "--latent-hw", *LATENT_HW, "--window", str(WINDOW),
                    "--out", str(out), "--verify", "--fast-compile"])
    assert rc == 0
    return out


@pytest.mark.slow
def test_aoti_cli_verifies_dit_and_vae(aoti_dir):
    manifest = read_manifest(aoti_dir, "aoti")
    assert sorted(manifest.files) == ["cache_pass", "chunk", "vae_first", "vae_step"]
    assert all(manifest.path(step).is_file() for step in manifest.files)
    verify = {r["step"]: r for r in json.loads((aoti_dir / "export.json").read_text())["verify"]}
    assert verify["chunk"]["ok"] and verify["chunk"]["chunks"] >= 4 and verify["chunk"]["evictions"] > 0
    assert verify["chunk"]["max_abs_error"] <= 1e-4
    assert verify["vae"]["ok"] and verify["vae"]["max_abs_error"] <= 1e-4


@pytest.mark.slow
def test_aoti_backend_streams_like_eager(aoti_dir, tmp_path):
    model = _tiny_model()
    gen = _generator(model, "aoti", artifact_dir=str(aoti_dir))
    assert gen.backend.dit._cache_pass is not None  # the cache pass runs its own, shorter step
    got = _stream(gen)
    _assert_same_stream(got, _stream(_generator(model)))
    # A folder exported before the cache pass had its own step: the chunk step writes the cache.
    import shutil

    old = tmp_path / "old"
    shutil.copytree(aoti_dir, old)
    meta = json.loads((old / "export.json").read_text())
    del meta["files"]["cache_pass"]
    (old / "cache_pass_step.pt2").unlink()
    (old / "export.json").write_text(json.dumps(meta))
    legacy = _generator(model, "aoti", artifact_dir=str(old))
    assert legacy.backend.dit._cache_pass is None
    _assert_same_stream(_stream(legacy), got)
    other = load_export_model("tiny", random_init=True, latent_hw=(4, 6), window=WINDOW, seed=7)
    with pytest.raises(ValueError, match="other DiT weights"):
        _generator(other, "aoti", artifact_dir=str(aoti_dir))
    wider = load_export_model("tiny", random_init=True, latent_hw=(4, 8), window=WINDOW)
    with pytest.raises(ValueError, match="stream geometry"):
        _generator(wider, "aoti", artifact_dir=str(aoti_dir))


# --------------------------------------------------------------------------------------------
# ONNX / ONNX Runtime, from a model folder written with save_pretrained (the training output)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdk_folder(tmp_path_factory):
    model = _tiny_model()
    out = tmp_path_factory.mktemp("model") / "tiny-sdk"
    save_pretrained(out, dit=model.dit, dit_config=model.dit_config, streaming=model.streaming, vae=model.vae,
                    vae_config=model.vae_config)
    return out


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory, sdk_folder):
    from export import onnx as onnx_export

    out = tmp_path_factory.mktemp("onnx")
    assert onnx_export.main(["--model", str(sdk_folder), "--out", str(out), "--verify"]) == 0
    return out


@pytest.mark.slow
def test_onnx_cli_checks_and_verifies(onnx_dir):
    import onnx

    manifest = read_manifest(onnx_dir, "onnx")
    graph = onnx.load(str(manifest.path("chunk")))
    onnx.checker.check_model(graph)
    assert [i.name for i in graph.graph.input] == [s.name for s in manifest.chunk_profile().inputs()]
    assert [o.name for o in graph.graph.output] == ["flow", "new_k_cache", "new_v_cache"]
    verify = {r["step"]: r for r in json.loads((onnx_dir / "export.json").read_text())["verify"]}
    assert verify["chunk"]["ok"] and verify["chunk"]["evictions"] > 0 and verify["vae"]["ok"]


@pytest.mark.slow
def test_onnxruntime_backend_streams_like_eager_without_copies(onnx_dir, sdk_folder):
    eager = StreamingGenerator.from_pretrained(sdk_folder, load_text_encoder=False)
    ort_gen = StreamingGenerator.from_pretrained(sdk_folder, load_text_encoder=False, backend="onnxruntime",
                                                 backend_options={"artifact_dir": str(onnx_dir)})
    got = _stream(ort_gen)
    _assert_same_stream(got, _stream(eager))
    # The KV cache ping-pongs between two buffers that ONNX Runtime reads and writes in place.
    cache = ort_gen._solo.cache
    seen = {cache.k.data_ptr()}
    _stream(ort_gen, 1)
    seen.add(ort_gen._solo.cache.k.data_ptr())
    _stream(ort_gen, 2)
    seen.add(ort_gen._solo.cache.k.data_ptr())
    assert len(seen) == 2


@pytest.mark.slow
def test_onnxruntime_runs_a_stream_pool(tmp_path, sdk_folder):
    """An export with a batch of 2 streams is verified as a pool (rows at different positions) and
    runs a StreamPool whose streams join at different chunks, as the eager pool does."""
    from export import onnx as onnx_export

    out = tmp_path / "onnx-pool"
    assert onnx_export.main(["--model", str(sdk_folder), "--out", str(out), "--batch", "2", "--verify"]) == 0
    verify = {r["step"]: r for r in json.loads((out / "export.json").read_text())["verify"]}
    assert verify["chunk"]["ok"] and verify["chunk"]["evictions"] > 0
    gens = [StreamingGenerator.from_pretrained(sdk_folder, load_text_encoder=False),
            StreamingGenerator.from_pretrained(sdk_folder, load_text_encoder=False, backend="onnxruntime",
                                               backend_options={"artifact_dir": str(out)})]
    with pytest.raises(ValueError, match="--batch 3"):
        gens[1].pool(3)
    runs = [_pool_run(gen) for gen in gens]
    for i in (0, 1):
        _assert_same_stream(runs[1][i], runs[0][i])


def _pool_run(gen: StreamingGenerator) -> dict[int, list]:
    """Two pooled streams: the second joins one chunk late, the first switches prompt (recache)."""
    pool = gen.pool(2)
    emb = [torch.randn(5, gen.dit.config.text_dim, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    first = pool.open(prompt_embeds=emb[0], seed=0)
    got: dict[int, list] = {0: [], 1: []}
    second = None
    for step in range(STREAM_CHUNKS + 1):
        if step == 1:
            second = pool.open(prompt_embeds=emb[1], seed=1)
        if step == 3:
            first.set_prompt(prompt_embeds=emb[1], transition="recache")
        res = pool.step()
        got[0].append(res[first])
        if second is not None:
            got[1].append(res[second])
    return got


@pytest.mark.slow
def test_aoti_runs_a_stream_pool(tmp_path):
    from export import aoti

    out = tmp_path / "aoti-pool"
    assert aoti.main(["--model", "tiny", "--random-init", "--latent-hw", *LATENT_HW, "--window", str(WINDOW),
                      "--out", str(out), "--batch", "2", "--verify", "--fast-compile"]) == 0
    verify = {r["step"]: r for r in json.loads((out / "export.json").read_text())["verify"]}
    assert verify["chunk"]["ok"] and verify["chunk"]["evictions"] > 0
    model = _tiny_model()
    runs = [_pool_run(_generator(model)), _pool_run(_generator(model, "aoti", artifact_dir=str(out)))]
    for i in (0, 1):
        _assert_same_stream(runs[1][i], runs[0][i])


# --------------------------------------------------------------------------------------------
# TensorRT: ONNX written, engines need a GPU
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_trt_cli_writes_onnx_then_exits_2_without_gpu(tmp_path):
    import onnx
    import onnxruntime as ort

    from export import trt

    out = tmp_path / "trt"
    rc = trt.main(["--model", "tiny", "--random-init", "--latent-hw", *LATENT_HW, "--window", str(WINDOW),
                   "--out", str(out), "--no-vae", "--batch-range", "1", "1", "2"])
    assert rc == (trt.EXIT_UNAVAILABLE if trt.trt_blockers() else 0)
    manifest = read_manifest(out, "tensorrt")
    graph = onnx.load(str(manifest.path("chunk_trt")))
    onnx.checker.check_model(graph)
    doubles = [i.name for i in graph.graph.initializer if i.data_type == onnx.TensorProto.DOUBLE]
    doubles += [n.name for n in graph.graph.node for a in n.attribute
                if n.op_type == "Cast" and a.name == "to" and a.i == onnx.TensorProto.DOUBLE]
    assert not doubles
    # --batch-range exported a dynamic batch axis (dim 1 of the caches, dim 0 of the latents).
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert dims["x"][0] == dims["k_cache"][1] and isinstance(dims["x"][0], str)
    # The float32-only graph TensorRT parses still computes the chunk step (checked on ONNX Runtime).
    model = _tiny_model()
    from export.steps import chunk_step_graph

    g = chunk_step_graph(model, ExportSettings(include_vae=False), functional=True)
    with torch.no_grad(), attention_backend("reference"):
        ref = g.module(*g.args)
    sess = ort.InferenceSession(str(manifest.path("chunk_trt")), providers=["CPUExecutionProvider"])
    got = sess.run(None, {name: arg.numpy() for name, arg in zip(g.input_names, g.args)})
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b.numpy(), atol=2e-3, rtol=0)


# --------------------------------------------------------------------------------------------
# Official checkpoint -> model folder -> export
# --------------------------------------------------------------------------------------------


def test_convert_cli_makes_an_exportable_folder(tmp_path):
    from export import convert
    from sf_sdk.models.dit import WanDiT
    from sf_sdk.models.vae import WanVAE

    cfg = DIT_PRESETS["tiny"]
    torch.manual_seed(5)
    dit, vae = WanDiT(cfg), WanVAE(VAE_PRESETS["tiny"])
    state = {f"model.{k}": v for k, v in dit.state_dict().items()}
    torch.save({"generator": state, "generator_ema": state, "critic": {}}, tmp_path / "self_forcing_dmd.pt")
    wan = tmp_path / "Wan2.1-T2V-1.3B"
    wan.mkdir()
    torch.save(vae.state_dict(), wan / "Wan2.1_VAE.pth")
    fields = ("dim", "ffn_dim", "num_heads", "num_layers", "freq_dim", "text_dim", "text_len")
    (wan / "config.json").write_text(json.dumps({"model_type": "t2v", **{f: getattr(cfg, f) for f in fields}}))
    out = tmp_path / "converted"
    rc = convert.main(["--checkpoint", str(tmp_path / "self_forcing_dmd.pt"), "--wan-dir", str(wan),
                       "--out", str(out), "--dtype", "float32", "--vae-preset", "tiny", "--no-text-encoder"])
    assert rc == 0
    model = load_export_model(out, latent_hw=(4, 6), window=WINDOW)
    for (name, a), b in zip(model.dit.state_dict().items(), dit.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert model.vae is not None and model.streaming.local_attn_size == WINDOW
    assert convert.main(["--checkpoint", str(tmp_path / "missing.pt"), "--wan-dir", str(wan), "--out",
                         str(tmp_path / "x"), "--vae-preset", "tiny", "--no-text-encoder"]) == 2
