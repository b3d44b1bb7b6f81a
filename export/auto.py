"""``backend="auto"`` (the default): per component, the fastest backend measured for this device,
its artifacts exported on first use into the artifact cache (:mod:`export.artifact_cache`).

The rule (:func:`choose_backends`; the measurements behind it are in docs/export.md,
``python benchmarks/auto.py`` reproduces them):

================  =============================================  ================================
component         CPU                                            CUDA
================  =============================================  ================================
DiT chunk step    ``aoti`` (float32 or bfloat16, a C++ compiler  ``tensorrt`` (float32 generator,
                  to build it), else ``onnxruntime`` (float32    TensorRT + cuda-python), else
                  or float16), else eager; ``position_mode=      eager
                  "absolute"`` only
Wan VAE decoder   eager (its oneDNN convolutions beat the ONNX   eager
                  Runtime decode step end to end)
tiny decoder      eager (not measured faster exported)           eager
================  =============================================  ================================

Under global attention the DiT is exported for a cache of ``global_cache_frames`` latent frames
(part of the cache key): every stream that long or shorter runs it (its cache keeps that capacity,
attending only to the frames written), a longer stream runs the eager DiT (logged).

A DiT on one backend and the decoder on another is one :class:`sf_sdk.backends.Backend`: its
``dit`` comes from one component, ``make_decoder`` from the other. Which decoder runs is the
user's choice (``decoder=``); auto picks only its backend.

First use of a component the cache does not hold yet (``backend_options={"build": ...}``, or
``$SF_SDK_AUTO_BUILD``):

* ``"background"`` (the default): this run streams eagerly while a detached low-priority process
  exports the component for later runs; a short job is never made slower by an export it does
  not recover (on the bundled model an export costs more than a 333-frame video takes eagerly);
* ``"now"``: export here, before the first chunk (long-lived processes: ``sf-serve``);
* ``"never"``: eager unless the cache already holds it.

An export or a load that fails logs one warning and the component runs eagerly; a failed export
is recorded in the cache and not retried for the same key. Options: ``cache_dir`` (default
``$SF_SDK_ARTIFACT_CACHE``, else ``~/.cache/sf-sdk/artifacts``), ``build``, ``threads`` (ONNX
Runtime intra-op threads), ``streams`` (the pool size whose DiT is prepared at construction,
default 1: ``stream()`` / ``generate()``; other pool sizes are prepared when a pool is made),
``dit`` (pin the DiT's backend, e.g. ``"onnxruntime"``, instead of the rule; still cached).

Measured, not only ruled: right after a DiT export for AOTInductor or ONNX Runtime, the builder
times it against the eager DiT on the same stream (:mod:`export.measure`) and records both in the
entry; where eager measured faster (by more than 5%), later runs stream eagerly and say so. A
pinned ``dit`` is used whatever the measurement.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from export.artifact_cache import ArtifactCache, CacheKey, library_versions
from sf_sdk.backends import Backend, backend_status, register_backend
from sf_sdk.config import to_dict

__all__ = ["Capabilities", "Workload", "AutoChoice", "choose_backends", "dit_on_aoti", "auto_backend", "component_key",
           "export_component", "export_saved", "save_source", "BUILD_ENV", "BUILD_MODES"]

log = logging.getLogger(__name__)

BUILD_ENV = "SF_SDK_AUTO_BUILD"
BUILD_MODES = ("background", "now", "never")
# Backends auto may pick for a component (each has an exporter and a loader below).
DIT_CANDIDATES = {"cpu": ("aoti", "onnxruntime"), "cuda": ("tensorrt",)}
ORT_DTYPES = (torch.float32, torch.float16)
# Exported DiT steps timed against eager right after their build (export.measure); eager runs
# where it measured faster. TensorRT engines are not (built for CUDA, where eager is not close).
MEASURED_BACKENDS = ("aoti", "onnxruntime")
AOTI_DTYPES = (torch.float32, torch.bfloat16)  # measured faster than ONNX Runtime / eager (float16 not measured)


# --------------------------------------------------------------------------------------------
# The rule
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Capabilities:
    """What can run here: the device type and the backends whose availability check passes."""

    device: str  # "cpu" or "cuda"
    available: frozenset[str]

    @classmethod
    def probe(cls, device: torch.device) -> Capabilities:
        """The candidates that can run here (an AOTInductor export also needs a C++ compiler)."""
        from export.backends import compiler_status

        names = DIT_CANDIDATES.get(device.type, ())
        return cls(device.type, frozenset(n for n in names if backend_status(n) is None
                                          and (n != "aoti" or compiler_status() is None)))


@dataclass(frozen=True)
class Workload:
    """What the chosen backends must run: the compute dtype, the stream geometry's traits that
    exported steps depend on, and the decoder the user chose (None: no decoding)."""

    dtype: torch.dtype
    rolling: bool
    position_mode: str = "absolute"
    decoder: str | None = "wan"

    @classmethod
    def of(cls, gen: Any) -> Workload:
        has_decoder = gen.vae is not None or getattr(gen, "decoder", "wan") == "tiny"
        return cls(gen.dtype, gen.streaming.rolling, gen.streaming.position_mode,
                   getattr(gen, "decoder", "wan") if has_decoder else None)


@dataclass(frozen=True)
class AutoChoice:
    """The backend of each component, and why."""

    dit: str
    decoder: str | None
    why: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"auto(dit={self.dit}, decoder={self.decoder or 'none'})"


def choose_backends(caps: Capabilities, work: Workload, pin: str | None = None) -> AutoChoice:
    """The backend of the DiT chunk step and of the decoder (see the module docstring's table);
    ``pin`` (the ``dit`` option) names the DiT's backend instead of the rule."""
    why: dict[str, str] = {}
    dit = "eager"
    if pin is not None:
        if pin != "eager" and pin not in caps.available:
            why["dit"] = f"the pinned DiT backend {pin!r} cannot run here"
        else:
            dit = pin
            why["dit"] = f"pinned (backend_options dit={pin!r})"
    elif caps.device == "cpu":
        if "aoti" in caps.available and work.dtype in AOTI_DTYPES:
            dit = "aoti"
        elif "onnxruntime" not in caps.available:
            why["dit"] = ("no C++ compiler for AOTInductor and onnxruntime is not installed (apt-get install g++, "
                          "or pip install 'sf-sdk[onnx]')")
        elif work.dtype not in ORT_DTYPES:
            why["dit"] = f"ONNX Runtime runs float32 / float16 graphs, the model computes in {work.dtype}"
        else:
            dit = "onnxruntime"
    elif caps.device == "cuda":
        if "tensorrt" not in caps.available:
            why["dit"] = "TensorRT (with cuda-python) is not installed"
        elif work.dtype != torch.float32:
            why["dit"] = (f"TensorRT engines are built from a float32 generator (fp16 kernels inside), this one "
                          f"computes in {work.dtype}")
        else:
            dit = "tensorrt"
    else:
        why["dit"] = f"no exported backend for {caps.device}"
    if dit != "eager" and work.position_mode != "absolute":
        dit, why["dit"] = "eager", f"exported steps implement position_mode='absolute', not {work.position_mode!r}"
    if dit != "eager" and pin is None:
        why["dit"] = f"{dit} is the fastest measured DiT step on {caps.device} for {work.dtype}"
        if not work.rolling:
            why["dit"] += (" (global attention: exported for a cache of global_cache_frames latent frames; a "
                           "longer stream runs the eager DiT)")
    decoder = None
    if work.decoder is not None:
        decoder = "eager"
        why["decoder"] = {"wan": "the eager Wan VAE decode (oneDNN convolutions) is faster end to end than its "
                                 "exported decode steps (docs/export.md)",
                          "tiny": "the tiny decoder was not measured faster exported"}.get(
            work.decoder, f"no measurement for decoder {work.decoder!r}")
    return AutoChoice(dit, decoder, why)


def dit_on_aoti(device: torch.device, stream: Any, options: dict[str, Any] | None, *,
                caps: Capabilities | None = None) -> bool:
    """Whether ``backend="auto"`` with ``options`` runs a bfloat16 DiT streaming ``stream`` on
    AOTInductor here: the rule picks it (:func:`choose_backends`, the ``dit`` pin included) and the
    build mode may build or load it (not ``"never"``). ``dtype="auto"``'s question
    (:func:`sf_sdk.precision.dit_runs_on_aoti`); ``caps`` overrides the probe (tests)."""
    opts = _Options.parse(dict(options or {}))
    if opts.build == "never":
        return False
    caps = caps if caps is not None else Capabilities.probe(device)
    work = Workload(torch.bfloat16, stream.rolling, stream.position_mode, decoder=None)
    return choose_backends(caps, work, opts.dit).dit == "aoti"


# --------------------------------------------------------------------------------------------
# Components: cache keys, exporters, loaders
# --------------------------------------------------------------------------------------------


def _geometry(gen: Any, batch: int) -> dict[str, Any]:
    from export.manifest import GRAPH_STREAM_FIELDS

    stream = to_dict(gen.streaming)
    geo = {k: stream[k] for k in GRAPH_STREAM_FIELDS}
    if not gen.streaming.rolling:  # global attention: the cache's capacity is part of the graph
        geo["global_cache_frames"] = stream["global_cache_frames"]
    return {**geo, "batch": batch, "dtype": str(gen.dtype).removeprefix("torch."), "device": gen.device.type}


def component_key(gen: Any, backend: str, component: str, *, batch: int = 1) -> CacheKey:
    """The cache key of one component of ``gen`` exported for ``backend``."""
    from export.settings import weights_fingerprint

    module = gen.dit if component == "dit" else gen.tiny_decoder
    return CacheKey(backend, component, weights_fingerprint(module), to_dict(module.config), _geometry(gen, batch),
                    library_versions())


def export_component(key: CacheKey, module: torch.nn.Module, spec: dict[str, Any], out: Path) -> None:
    """Export ``module`` (the component of ``key``) into ``out`` as its backend's exporter writes it."""
    from export.settings import ExportModel, ONNXSettings
    from sf_sdk.config import StreamingConfig, from_dict

    stream = from_dict(StreamingConfig, spec["streaming"])
    geo = key.geometry
    if key.component == "dit" and key.backend == "aoti":
        from export.aoti import export_aoti
        from export.settings import AOTISettings

        export_aoti(ExportModel(module, stream, None, source=spec.get("what", "")), out,
                    AOTISettings(batch_size=geo["batch"], dtype=geo["dtype"], device=geo["device"], include_vae=False))
    elif key.component == "dit" and key.backend == "onnxruntime":
        from export.onnx import export_onnx

        export_onnx(ExportModel(module, stream, None, source=spec.get("what", "")), out,
                    ONNXSettings(batch_size=geo["batch"], dtype=geo["dtype"], device=geo["device"], include_vae=False))
    elif key.component == "dit" and key.backend == "tensorrt":
        from export.settings import TRTSettings
        from export.trt import export_trt

        export_trt(ExportModel(module, stream, None, source=spec.get("what", "")), out,
                   TRTSettings(batch_size=geo["batch"], device=geo["device"], include_vae=False))
    elif key.component == "tiny" and key.backend == "onnxruntime":
        from export.tiny import export_tiny_onnx

        export_tiny_onnx(module, stream, out, ONNXSettings(dtype=geo["dtype"], device=geo["device"]))
    else:
        raise ValueError(f"no exporter for the {key.component} component on {key.backend}")
    if key.component == "dit" and key.backend in MEASURED_BACKENDS:
        _measure_dit(key, module, stream, out)


def _measure_dit(key: CacheKey, module: torch.nn.Module, stream: Any, out: Path) -> None:
    """Time the just-exported DiT step against eager (:mod:`export.measure`) and record it in the
    entry; a measurement that fails is logged and leaves the export in use (the static rule)."""
    from export.measure import time_chunk_models, write_measurement
    from export.settings import ExportModel, ExportSettings

    geo = key.geometry
    try:
        step = _load_dit_module(module, stream, torch.device(geo["device"]), key.backend, out, None)
        settings = ExportSettings(batch_size=geo["batch"], dtype=geo["dtype"], device=geo["device"])
        seconds = time_chunk_models(ExportModel(module, stream, None), {"eager": module, key.backend: step}, settings)
        record = write_measurement(out, key.backend, seconds)
    except Exception as exc:
        log.warning("auto: timing the %s DiT against eager failed (%s: %s); the export is used as the rule says",
                    key.backend, type(exc).__name__, " ".join(str(exc).split())[:300])
        return
    log.info("auto: the %s DiT step %.1f ms, eager %.1f ms per chunk (%s)", key.backend,
             seconds[key.backend] * 1e3, seconds["eager"] * 1e3,
             "eager is used" if record["eager_faster"] else "the export is used")


def _load_dit(gen: Any, backend: str, folder: Path, threads: int | None) -> Any:
    return _load_dit_module(gen.dit, gen.streaming, gen.device, backend, folder, threads)


def _load_dit_module(dit: torch.nn.Module, stream: Any, device: torch.device, backend: str, folder: Path,
                     threads: int | None) -> Any:
    from export.manifest import read_manifest

    if backend == "aoti":
        from export.aoti import BACKEND, load_aoti

        manifest = read_manifest(folder, BACKEND)
        manifest.check_generator(dit, stream, vae=None, check_weights=False)  # the key holds them
        model, _ = load_aoti(manifest, dit, device=device)
        return model
    if backend == "onnxruntime":
        from export.onnx import BACKEND, load_onnxruntime

        manifest = read_manifest(folder, BACKEND)
        manifest.check_generator(dit, stream, vae=None, check_weights=False)  # the key holds them
        model, _ = load_onnxruntime(manifest, dit, device=device, threads=threads)
        return model
    if backend == "tensorrt":
        from export.trt import BACKEND, load_tensorrt, settings_from_manifest

        manifest = read_manifest(folder, BACKEND)
        manifest.check_generator(dit, stream, vae=None, check_weights=False)
        model, _ = load_tensorrt(manifest, dit, settings_from_manifest(manifest), device=device)
        return model
    raise ValueError(f"no loader for the DiT on {backend}")


def _load_tiny(gen: Any, backend: str, folder: Path, threads: int | None) -> Callable[[], Any]:
    from export.tiny import load_tiny_onnxruntime

    _, make = load_tiny_onnxruntime(folder, device=gen.device, threads=threads)
    return make


def save_source(component: str, module: torch.nn.Module, folder: Path) -> None:
    """Write ``module`` (the DiT, or the tiny decoder) as config JSON + safetensors into ``folder``,
    for a background export (:func:`export_saved` reads it back; no pickle)."""
    from safetensors.torch import save_model

    (folder / "config.json").write_text(json.dumps({"component": component, "config": to_dict(module.config),
                                                    "dtype": str(next(module.parameters()).dtype)}) + "\n")
    save_model(module, str(folder / "weights.safetensors"))


def _load_source(folder: Path) -> torch.nn.Module:
    from safetensors.torch import load_model

    from sf_sdk.config import DiTConfig, from_dict

    data = json.loads((folder / "config.json").read_text())
    if data["component"] == "dit":
        from sf_sdk.models.dit import WanDiT

        module = WanDiT(from_dict(DiTConfig, data["config"]))
    elif data["component"] == "tiny":
        from sf_sdk.models.taehv import TAEHVConfig, TAEHVDecoder

        module = TAEHVDecoder(from_dict(TAEHVConfig, data["config"]))
    else:
        raise ValueError(f"{folder}: unknown component {data['component']!r}")
    module = module.to(getattr(torch, data["dtype"].removeprefix("torch.")))
    load_model(module, str(folder / "weights.safetensors"))
    return module.eval().requires_grad_(False)


def export_saved(key: CacheKey, spec: dict[str, Any], source: Path, out: Path) -> None:
    """The background builder's export: the component saved by :func:`save_source` into ``out``."""
    module = _load_source(source).to(key.geometry["device"])
    if key.component == "dit":
        module.use_cpu_matmul_layout()  # as the generator holds it (a no-op off the CPU): eager is timed as it runs
    export_component(key, module, spec, out)


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


@dataclass
class _Options:
    cache: ArtifactCache
    build: str
    threads: int | None
    streams: int = 1
    dit: str | None = None

    @classmethod
    def parse(cls, options: dict[str, Any]) -> _Options:
        allowed = {"cache_dir", "build", "threads", "streams", "dit"}
        unknown = sorted(set(options) - allowed)
        if "artifact_dir" in unknown:
            raise ValueError("artifact_dir names a folder you exported yourself: pass it with the backend that "
                             "loads it (backend='onnxruntime', 'aoti', 'tensorrt', ...); backend='auto' keeps its "
                             "own artifact cache (option cache_dir)")
        if unknown:
            raise ValueError(f"unknown auto backend options {unknown}; valid: {sorted(allowed)}")
        build = options.get("build") or os.environ.get(BUILD_ENV) or "background"
        if build not in BUILD_MODES:
            raise ValueError(f"auto backend build={build!r} (or ${BUILD_ENV}): choose one of {BUILD_MODES}")
        threads = options.get("threads")
        if threads is not None and (not isinstance(threads, int) or threads <= 0):
            raise ValueError(f"auto backend threads must be a positive int, got {threads!r}")
        streams = options.get("streams", 1)
        if not isinstance(streams, int) or isinstance(streams, bool) or streams <= 0:
            raise ValueError(f"auto backend streams (the pool size to prepare) must be a positive int, got {streams!r}")
        dit = options.get("dit")
        names = ("eager", *sorted({n for names in DIT_CANDIDATES.values() for n in names}))
        if dit is not None and dit not in names:
            raise ValueError(f"auto backend dit={dit!r}: choose one of {names} (or leave it out: the rule picks)")
        return cls(ArtifactCache(options.get("cache_dir")), build, threads, streams, dit)


class _Auto:
    """Resolves the components of one generator; memoizes the DiT per pool size."""

    def __init__(self, gen: Any, choice: AutoChoice, opts: _Options) -> None:
        self.gen = gen
        self.choice = choice
        self.opts = opts
        self._by_batch: dict[int, Backend] = {}
        self.make_decoder = self._decoder()

    def backend(self, batch: int) -> Backend:
        if batch not in self._by_batch:
            dit = self.gen.dit
            name = "eager"
            if self.choice.dit != "eager":
                found = self._component(self.choice.dit, "dit", batch, lambda path: _load_dit(
                    self.gen, self.choice.dit, path, self.opts.threads))
                if found is not None:
                    dit, name = found, self.choice.dit
            label = f"auto(dit={name}, decoder={self._decoder_name})"
            self._by_batch[batch] = Backend(label, dit, self.make_decoder, streams=self.backend,
                                            components={"dit": name, "decoder": self._decoder_name})
            if batch == 1 or name != "eager":
                log.info("backend auto for %d stream(s): DiT on %s, decoder on %s", batch, name,
                         self._decoder_name)
        return self._by_batch[batch]

    def _decoder(self) -> Callable[[], Any] | None:
        gen = self.gen
        if self.choice.decoder is None:
            self._decoder_name = "none"
            return None
        self._decoder_name = "eager"
        if self.choice.decoder != "eager" and gen.decoder == "tiny":
            found = self._component(self.choice.decoder, "tiny", 1, lambda path: _load_tiny(
                gen, self.choice.decoder, path, self.opts.threads))
            if found is not None:
                self._decoder_name = self.choice.decoder
                return found
        return gen.make_streaming_decoder

    def _component(self, backend: str, component: str, batch: int, load: Callable[[Path], Any]) -> Any | None:
        """The loaded component from the cache (building it as the build mode says); None: run it eagerly."""
        gen, cache, build = self.gen, self.opts.cache, self.opts.build
        key = component_key(gen, backend, component, batch=batch)
        what = f"{component} ({_describe(gen, batch)})"
        path = cache.lookup(key)
        if path is None:
            failed = cache.failure(key)
            if failed is not None:
                log.warning("auto: the earlier %s export of the %s failed (%s): it runs eagerly; delete %s to "
                            "retry", backend, what, failed, cache.entry(key).with_suffix(".failed"))
                return None
            if build == "never":
                log.info("auto: the cache holds no %s %s (build='never'): it runs eagerly", backend, what)
                return None
            if build == "background":
                module = gen.dit if component == "dit" else gen.tiny_decoder
                try:
                    log_file = cache.build_in_background(key, lambda folder: save_source(component, module, folder),
                                                         _spec(gen, batch))
                except Exception as exc:
                    log.warning("auto: could not start the background export of the %s %s (%s: %s): it runs "
                                "eagerly", backend, what, type(exc).__name__, " ".join(str(exc).split())[:300])
                    return None
                if log_file is None:
                    log.info("auto: another process is exporting the %s %s: this run is eager", backend, what)
                else:
                    log.info("auto: exporting the %s %s in the background into %s (log %s); this run is eager, "
                             "later runs load it", backend, what, cache.entry(key), log_file)
                return None
            module = gen.dit if component == "dit" else gen.tiny_decoder
            try:
                path = cache.build(key, lambda out: export_component(key, module, _spec(gen, batch), out),
                                   what=_describe(gen, batch))
            except Exception as exc:
                log.warning("auto: exporting the %s %s failed (%s: %s): it runs eagerly", backend, what,
                            type(exc).__name__, " ".join(str(exc).split())[:300])
                return None
        if component == "dit" and backend in MEASURED_BACKENDS and self.opts.dit is None:  # a pin is obeyed
            from export.measure import eager_is_faster

            slower, why = eager_is_faster(path)
            if slower:
                log.info("auto: the eager DiT measured faster than the %s one for the %s (%s): it runs eagerly",
                         backend, what, why)
                return None
        try:
            return load(path)
        except Exception as exc:
            log.warning("auto: loading the %s %s from %s failed (%s: %s): it runs eagerly", backend, what, path,
                        type(exc).__name__, " ".join(str(exc).split())[:300])
            return None


def _describe(gen: Any, batch: int) -> str:
    st = gen.streaming
    return (f"latent {st.latent_height}x{st.latent_width}, chunk {st.num_frame_per_block}, window "
            f"{st.local_attn_size}, batch {batch}, {str(gen.dtype).removeprefix('torch.')}")


def _spec(gen: Any, batch: int) -> dict[str, Any]:
    """What an export needs besides the module (JSON, for a background builder too)."""
    return {"streaming": to_dict(gen.streaming), "what": _describe(gen, batch)}


def auto_backend(gen: Any, options: dict[str, Any]) -> Backend:
    """The ``auto`` backend factory (registered as ``"auto"``)."""
    opts = _Options.parse(options)
    choice = choose_backends(Capabilities.probe(gen.device), Workload.of(gen), opts.dit)
    for component, reason in choice.why.items():
        log.debug("auto %s: %s", component, reason)
    return _Auto(gen, choice, opts).backend(opts.streams)


register_backend("auto", auto_backend)
