"""backend="auto": the per-component rule, the artifact cache (build once, reuse, rebuild when a key
changes, one artifact when two processes build at once) and the eager fallback of a failed export.

Every test uses its own temporary cache (``cache_dir=``), never the home cache; the tiny DiT
exports to ONNX in a few seconds, and only two tests export for real.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sf_sdk.precision as precision
from export.artifact_cache import KEY_FILE, ArtifactCache, default_cache_root
from export.auto import BUILD_ENV, Capabilities, Workload, choose_backends, component_key
from export.measure import MEASURE_FILE, read_measurement
from sf_sdk import StreamingGenerator
from sf_sdk.config import StreamingConfig

pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[1]
STREAM = StreamingConfig(latent_height=2, latent_width=2, local_attn_size=6)
TEXT_DIM = 32  # the tiny DiT's text_dim
BACKGROUND_TIMEOUT_S = 240


def _gen(cache: Path, build: str, stream: StreamingConfig = STREAM, dtype: str | torch.dtype = "auto",
         **kwargs) -> StreamingGenerator:
    """The tiny generator on auto, its DiT pinned to ONNX Runtime (a few seconds to export) unless
    ``dit=`` says otherwise."""
    options = {"cache_dir": str(cache), "build": build, "dit": "onnxruntime", **kwargs}
    return StreamingGenerator.from_config("tiny", stream, vae="tiny", seed=0, dtype=dtype, backend_options=options)


def _entries(cache: Path, backend: str = "onnxruntime") -> list[Path]:
    return sorted(p for p in (cache / backend).glob("dit-*") if p.is_dir())


def _embeds() -> torch.Tensor:
    return torch.randn(5, TEXT_DIM, generator=torch.Generator().manual_seed(7))


# --------------------------------------------------------------------------------------------
# The rule
# --------------------------------------------------------------------------------------------


def test_auto_is_the_default_and_picks_aoti_for_the_dit_on_this_cpu(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SF_SDK_ARTIFACT_CACHE", str(tmp_path))
    monkeypatch.setenv(BUILD_ENV, "never")
    gen = StreamingGenerator.from_config("tiny", STREAM, vae="tiny")
    assert gen.backend.components == {"dit": "eager", "decoder": "eager"}  # nothing cached, build never
    caps = Capabilities.probe(torch.device("cpu"))
    assert caps.available == {"aoti", "onnxruntime"}  # g++ (the CPU kernels need it too) and onnxruntime
    choice = choose_backends(caps, Workload.of(gen))
    assert (choice.dit, choice.decoder) == ("aoti", "eager")
    assert default_cache_root() == tmp_path


def test_the_aoti_dit_is_built_cached_and_streams_what_eager_streams(tmp_path: Path) -> None:
    gen = _gen(tmp_path, "now", dit="aoti")
    assert gen.backend.components == {"dit": "aoti", "decoder": "eager"}
    assert gen.backend.dit.name == "AOTInductor"
    [entry] = _entries(tmp_path, "aoti")
    measured = read_measurement(entry)  # timed against eager right after the build
    assert measured["backend"] == "aoti" and all(measured["seconds_per_chunk"][k] > 0 for k in ("aoti", "eager"))
    unpinned = _gen(tmp_path, "never", dit=None, dtype=gen.dtype)  # the rule's pick follows the measurement
    assert unpinned.backend.components["dit"] == ("eager" if measured["eager_faster"] else "aoti")
    # dtype auto put the model in bfloat16 where this CPU has AMX (the DiT runs on AOTInductor)
    assert gen.dtype == (torch.bfloat16 if precision.cpu_has_amx_bf16() else torch.float32)
    # a later construction loads it (build 'never' keeps dtype auto on the eager rule: name the dtype);
    # pinned, so that it is the export whatever its measurement against eager said
    again = _gen(tmp_path, "never", dit="aoti", dtype=gen.dtype)
    assert again.backend.components["dit"] == "aoti"
    assert _entries(tmp_path, "aoti") == [entry]
    eager = StreamingGenerator.from_config("tiny", STREAM, vae="tiny", seed=0, backend="eager", dtype=again.dtype)
    a = again.generate(prompt_embeds=_embeds(), num_frames=21, seed=3)
    b = eager.generate(prompt_embeds=_embeds(), num_frames=21, seed=3)
    err = (a.latents.float() - b.latents.float()).abs().max().item()
    print("max abs latent error", err)
    assert err < (1e-3 if again.dtype == torch.float32 else 5e-2)


CPU_ORT = Capabilities("cpu", frozenset({"onnxruntime"}))
CPU_BOTH = Capabilities("cpu", frozenset({"aoti", "onnxruntime"}))
CUDA_TRT = Capabilities("cuda", frozenset({"tensorrt"}))
F32 = Workload(torch.float32, rolling=True)


@pytest.mark.parametrize(("caps", "work", "dit", "decoder"), [
    (CPU_BOTH, F32, "aoti", "eager"),
    (CPU_BOTH, dataclasses.replace(F32, dtype=torch.float16), "onnxruntime", "eager"),  # aoti: float32 measured
    (CPU_BOTH, dataclasses.replace(F32, dtype=torch.bfloat16), "aoti", "eager"),  # dtype auto's AOTI pick
    (CPU_ORT, dataclasses.replace(F32, dtype=torch.bfloat16), "eager", "eager"),
    (Capabilities("cpu", frozenset({"aoti"})), F32, "aoti", "eager"),
    (CPU_ORT, F32, "onnxruntime", "eager"),  # no C++ compiler
    (Capabilities("cpu", frozenset()), F32, "eager", "eager"),  # onnxruntime not installed
    (CPU_ORT, dataclasses.replace(F32, dtype=torch.bfloat16), "eager", "eager"),  # ORT has no bf16 graphs
    (CPU_ORT, dataclasses.replace(F32, rolling=False), "onnxruntime", "eager"),  # global: a global_cache_frames cache
    (CPU_ORT, dataclasses.replace(F32, position_mode="cache_relative"), "eager", "eager"),
    (CPU_ORT, dataclasses.replace(F32, decoder="tiny"), "onnxruntime", "eager"),
    (CPU_ORT, dataclasses.replace(F32, decoder=None), "onnxruntime", None),
    (CUDA_TRT, F32, "tensorrt", "eager"),
    (CUDA_TRT, dataclasses.replace(F32, dtype=torch.bfloat16), "eager", "eager"),  # engines come from fp32
    (Capabilities("cuda", frozenset()), F32, "eager", "eager"),  # no TensorRT
    (Capabilities("cuda", frozenset({"onnxruntime"})), F32, "eager", "eager"),  # ORT-GPU is not a CUDA pick
])
def test_rule_for_given_capabilities(caps: Capabilities, work: Workload, dit: str, decoder: str | None) -> None:
    choice = choose_backends(caps, work)
    assert (choice.dit, choice.decoder) == (dit, decoder)
    assert choice.why["dit"]  # every pick says why


def test_a_pinned_dit_backend_overrides_the_rule() -> None:
    assert choose_backends(CPU_BOTH, F32, "onnxruntime").dit == "onnxruntime"
    assert choose_backends(CPU_BOTH, F32, "eager").dit == "eager"
    pinned = choose_backends(CPU_ORT, F32, "aoti")  # not available here: eager, and why
    assert pinned.dit == "eager" and "cannot run here" in pinned.why["dit"]
    cache_relative = dataclasses.replace(F32, position_mode="cache_relative")
    assert choose_backends(CPU_BOTH, cache_relative, "aoti").dit == "eager"  # exported steps are absolute


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache whose DiT entry was exported by the background builder the first construction started."""
    cache = tmp_path_factory.mktemp("auto-cache")
    first = _gen(cache, "background")
    assert first.backend.components["dit"] == "eager"  # this run: eager while the export is built
    deadline = time.monotonic() + BACKGROUND_TIMEOUT_S
    while not _entries(cache) and time.monotonic() < deadline:
        time.sleep(0.5)
    logs = "".join(p.read_text() for p in (cache / "onnxruntime").glob("*.log"))
    assert _entries(cache), f"the background export did not finish:\n{logs}"
    assert not list((cache / "onnxruntime").glob(".build-*")), "the build folder was not cleaned up"
    return cache


def test_background_build_then_later_constructions_reuse_it(built: Path) -> None:
    [entry] = _entries(built)
    stamp = (entry / KEY_FILE).stat().st_mtime_ns, entry.stat().st_ino
    gen = _gen(built, "now")
    assert gen.backend.components == {"dit": "onnxruntime", "decoder": "eager"}
    assert gen.backend.dit.name == "ONNX Runtime"
    assert _entries(built) == [entry]
    assert ((entry / KEY_FILE).stat().st_mtime_ns, entry.stat().st_ino) == stamp  # loaded, not rebuilt
    key = json.loads((entry / KEY_FILE).read_text())
    assert key["geometry"]["latent_height"] == 2 and key["geometry"]["batch"] == 1
    assert {"torch", "onnxruntime", "sf-sdk"} <= set(key["versions"])
    # The artifact computes what eager computes.
    eager = StreamingGenerator.from_config("tiny", STREAM, vae="tiny", seed=0, backend="eager")
    a = gen.generate(prompt_embeds=_embeds(), num_frames=21, seed=3)
    b = eager.generate(prompt_embeds=_embeds(), num_frames=21, seed=3)
    assert torch.allclose(a.latents, b.latents, atol=1e-3)


def test_an_export_measured_slower_than_eager_is_left_for_eager(built: Path, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the build's timing says eager is faster, the rule's pick streams eagerly (and says why);
    a pinned DiT backend is used anyway. The measurement is recorded by the build itself."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(built, cache)
    [entry] = _entries(cache)
    record = read_measurement(entry)
    assert record is not None and record["backend"] == "onnxruntime"  # the background build timed it
    assert set(record["seconds_per_chunk"]) == {"eager", "onnxruntime"}
    record.update(eager_faster=True, seconds_per_chunk={"eager": 0.010, "onnxruntime": 0.020})
    (entry / MEASURE_FILE).write_text(json.dumps(record))
    monkeypatch.setattr(Capabilities, "probe", classmethod(lambda cls, device: CPU_ORT))  # the rule: ONNX Runtime
    with caplog.at_level(logging.INFO, logger="export.auto"):
        gen = _gen(cache, "never", dit=None)
    assert gen.backend.components["dit"] == "eager"
    assert "measured faster than the onnxruntime one" in caplog.text and "20.0 ms against eager 10.0 ms" in caplog.text
    assert _gen(cache, "never").backend.components["dit"] == "onnxruntime"  # pinned: used
    (entry / MEASURE_FILE).write_text(json.dumps({"backend": "onnxruntime"}))  # unreadable: the rule's pick
    assert _gen(cache, "never", dit=None).backend.components["dit"] == "onnxruntime"


def test_changed_weights_are_not_served_from_the_cache(built: Path) -> None:
    gen = _gen(built, "never")
    with torch.no_grad():
        gen.dit.head.head.weight.add_(1e-3)
    before = _entries(built)
    again = StreamingGenerator(gen.dit, STREAM, vae=gen.vae,
                               backend_options={"cache_dir": str(built), "build": "never"})
    assert again.backend.components["dit"] == "eager"  # the stale artifact is not loaded
    cache = ArtifactCache(built)
    assert cache.lookup(component_key(again, "onnxruntime", "dit")) is None
    assert component_key(again, "onnxruntime", "dit").digest != component_key(_gen(built, "never"), "onnxruntime",
                                                                             "dit").digest
    assert _entries(built) == before


def test_an_artifact_built_for_another_cpu_is_not_served(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import export.artifact_cache as artifact_cache

    gen = _gen(built, "never")
    here = component_key(gen, "onnxruntime", "dit")
    assert here.versions["cpu_isa"] == artifact_cache.cpu_isa() != ""
    assert ArtifactCache(built).lookup(here) is not None
    monkeypatch.setattr(artifact_cache, "cpu_isa", lambda: "avx2")  # the same cache on an older CPU
    elsewhere = component_key(gen, "onnxruntime", "dit")
    assert elsewhere.digest != here.digest and ArtifactCache(built).lookup(elsewhere) is None
    assert _gen(built, "never").backend.components["dit"] == "eager"


_BUILD_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
from sf_sdk import StreamingGenerator
from sf_sdk.config import StreamingConfig
stream = StreamingConfig(latent_height=4, latent_width=2, local_attn_size=6)
gen = StreamingGenerator.from_config("tiny", stream, vae="tiny", seed=0,
                                     backend_options={"cache_dir": sys.argv[1], "build": "now", "dit": "onnxruntime"})
print("DIT", gen.backend.components["dit"])
"""


def test_global_attention_runs_the_export_up_to_its_capacity_and_eager_beyond(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    stream = StreamingConfig(latent_height=2, latent_width=2, global_cache_frames=6)
    gen = _gen(tmp_path, "now", stream)
    assert gen.backend.components["dit"] == "onnxruntime"
    key = json.loads((_entries(tmp_path)[0] / KEY_FILE).read_text())
    assert key["geometry"]["global_cache_frames"] == 6 and key["geometry"]["local_attn_size"] == -1
    eager = StreamingGenerator.from_config("tiny", stream, vae="tiny", seed=0, backend="eager")
    # 9 and 21 video frames are 3 and 6 latent frames: the exported cache (6 frames) holds them;
    # 33 (9 latent frames) does not, and runs the eager DiT, with a log line.
    for frames, dit in ((9, "onnxruntime"), (21, "onnxruntime"), (33, "eager")):
        with caplog.at_level(logging.INFO, logger="sf_sdk.pool"):
            a = gen.generate(prompt_embeds=_embeds(), num_frames=frames, seed=3)
        b = eager.generate(prompt_embeds=_embeds(), num_frames=frames, seed=3)
        assert gen._solo.backend.components["dit"] == dit, frames
        assert gen._solo.cache.layout.capacity_frames == (6 if dit == "onnxruntime" else 9)
        assert torch.allclose(a.latents, b.latents, atol=1e-4), frames
    assert "exceeds the exported DiT's cache (6 frames" in caplog.text
    # A second geometry: another global_cache_frames is another cache entry.
    _gen(tmp_path, "now", dataclasses.replace(stream, global_cache_frames=9))
    assert len(_entries(tmp_path)) == 2


def test_an_explicit_export_refuses_a_global_stream_longer_than_its_cache(tmp_path: Path) -> None:
    from export.onnx import export_onnx
    from export.settings import ExportModel, ONNXSettings

    stream = StreamingConfig(latent_height=2, latent_width=2, global_cache_frames=3)
    gen = StreamingGenerator.from_config("tiny", stream, seed=0, backend="eager")
    export_onnx(ExportModel(gen.dit, stream, None), tmp_path, ONNXSettings(include_vae=False))
    gen.use_backend("onnxruntime", {"artifact_dir": str(tmp_path)})
    gen.generate(prompt_embeds=_embeds(), num_frames=9, decode=False)  # 3 latent frames: fits
    with pytest.raises(ValueError, match="exported for a global-attention cache of 3 latent frames; this needs 6"):
        gen.generate(prompt_embeds=_embeds(), num_frames=21, decode=False)


def test_onnxruntime_threads_sleep_between_steps(tmp_path: Path) -> None:
    """Idle ONNX Runtime threads must not spin: the eager decoder runs between the DiT steps on
    the same cores (spinning made auto slower than eager end to end)."""
    import onnx
    from onnx import TensorProto, helper

    from export.onnx import OrtStep
    from export.settings import TensorSpec

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    step = OrtStep(path, [TensorSpec("x", (2,), torch.float32)], [TensorSpec("y", (2,), torch.float32)],
                   device=torch.device("cpu"))
    assert step.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


@pytest.mark.slow
def test_two_processes_building_a_new_geometry_make_one_artifact(built: Path) -> None:
    before = _entries(built)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD_SCRIPT, str(built)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO) for _ in range(2)]
    outs = [p.communicate(timeout=BACKGROUND_TIMEOUT_S)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    assert all("DIT onnxruntime" in out for out in outs), "\n".join(outs)
    assert sum(out.count("building the onnxruntime dit") for out in outs) == 1, "\n".join(outs)
    after = _entries(built)
    assert len(after) == len(before) + 1 and set(before) <= set(after)  # the geometry change made a new entry
    [new] = set(after) - set(before)
    assert json.loads((new / KEY_FILE).read_text())["geometry"]["latent_height"] == 4
    assert not list((built / "onnxruntime").glob(".build-*"))


def test_a_broken_export_warns_once_and_runs_eagerly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    import export.onnx

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("the exporter cannot lower this graph")

    monkeypatch.setattr(export.onnx, "export_onnx", broken)
    with caplog.at_level(logging.INFO):
        gen = _gen(tmp_path, "now")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "cannot lower this graph" in warnings[0].getMessage()
    assert gen.backend.components["dit"] == "eager" and calls == [1]
    assert gen.generate(prompt_embeds=_embeds(), num_frames=9).frames.shape[0] == 9
    assert _entries(tmp_path) == [] and not list((tmp_path / "onnxruntime").glob(".build-*"))
    caplog.clear()
    with caplog.at_level(logging.INFO):  # the failure is recorded: not retried, one warning again
        again = _gen(tmp_path, "now")
    assert again.backend.components["dit"] == "eager" and calls == [1]
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


def test_bad_options_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="build='sometimes'"):
        _gen(tmp_path, "sometimes")
    with pytest.raises(ValueError, match="dit='tvm': choose one of"):
        _gen(tmp_path, "never", dit="tvm")
    with pytest.raises(ValueError, match="artifact_dir"):
        StreamingGenerator.from_config("tiny", STREAM, backend_options={"artifact_dir": str(tmp_path)})


def test_the_default_constructs_eagerly_when_auto_cannot_be_imported(monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    import sf_sdk.backends as backends

    monkeypatch.delitem(backends._BACKENDS, "auto")
    monkeypatch.setitem(backends._import_errors, "export.auto", "export.auto cannot be imported (no fcntl)")
    with caplog.at_level(logging.WARNING):
        gen = StreamingGenerator.from_config("tiny", STREAM, vae="tiny", backend_options={"build": "now"})
    assert gen.backend.name == "eager"
    assert "no fcntl" in caplog.text
