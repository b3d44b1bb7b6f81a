"""The artifact cache: exported steps built on first use, reused while nothing they depend on changes.

What ``backend="auto"`` loads its exported components from (:mod:`export.auto`). One entry is
one component (the DiT chunk step, or a decoder) exported for one backend::

    <root>/<backend>/<component>-<key hash>/   export.json + graphs (what ``python -m export.*`` writes)
                                               key.json (the key below, in full)
    <root>/<backend>/<component>-<key hash>.lock     held while the entry is built
    <root>/<backend>/<component>-<key hash>.failed   why the last build failed (not retried)

The key (:class:`CacheKey`) holds everything the artifact depends on: the weights' fingerprint
(:func:`export.settings.weights_fingerprint`), the model config, the stream geometry (latent
size, chunk size, window, sink, position mode), batch, dtype, device and the library versions
(torch, onnx, onnxruntime, sf-sdk, ...). Any change gives another hash, so another entry: a stale
artifact is never loaded, it is rebuilt.

Builds are safe against concurrent processes: a builder takes an exclusive ``flock`` on the
entry's lock file (released by the kernel if the builder dies), looks again whether another
process finished the entry meanwhile, exports into a temporary folder beside the entry, and
renames it into place; readers only ever see complete entries (a rename is atomic).

A build may run in this process (:meth:`ArtifactCache.build`) or in a detached, low-priority
background process (:meth:`ArtifactCache.build_in_background`): the component's module is saved
into the temporary folder and ``python -m export.artifact_cache DIR`` exports it from there.

Root: ``backend_options={"cache_dir": DIR}``, else ``$SF_SDK_ARTIFACT_CACHE``, else
``$XDG_CACHE_HOME/sf-sdk/artifacts`` (``~/.cache/sf-sdk/artifacts``).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ArtifactCache", "CacheKey", "CACHE_ENV", "default_cache_root", "library_versions"]

log = logging.getLogger(__name__)

CACHE_ENV = "SF_SDK_ARTIFACT_CACHE"
KEY_FILE = "key.json"
SOURCE = "source"  # the saved module a background build exports from (inside the temporary folder)
BUILD_PREFIX = ".build-"

# Exports an entry's component into a folder (the exporters' own output layout).
Exporter = Callable[[Path], None]


def default_cache_root() -> Path:
    """``$SF_SDK_ARTIFACT_CACHE``, else ``$XDG_CACHE_HOME/sf-sdk/artifacts`` (``~/.cache/sf-sdk/artifacts``)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sf-sdk" / "artifacts"


# The layout of what the exporters write; part of every key, so a change of it rebuilds old entries
# (2: AOTInductor folders gained the cache-pass step; 3: their CPU GEMMs autotuned).
ARTIFACT_FORMAT = "3"


# The CPU flags whose presence changes what Inductor compiles for (its vector ISA picks).
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
              "amx_tile", "amx_bf16", "amx_int8")


@functools.cache
def cpu_isa() -> str:
    """The vector extensions of this CPU that compiled CPU kernels may use (e.g. ``avx2 fma avx512f
    ... amx_tile amx_bf16``): an AOTInductor package built here may use instructions another CPU
    lacks, so a cache copied to (or shared with) another machine rebuilds rather than loads it.
    Read from the kernel's CPU flags (Linux), else ATen's CPU capability and the AMX query; not
    Inductor's own ISA pick, which compiles probe programs (1.5 s in a process that has not made it)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return " ".join(f for f in _ISA_FLAGS if f in flags) or "none"
    except OSError:
        pass
    import torch

    from sf_sdk.precision import cpu_has_amx_bf16

    return torch.backends.cpu.get_cpu_capability().lower() + (" amx" if cpu_has_amx_bf16() else "")


def library_versions() -> dict[str, str]:
    """The versions an exported artifact depends on: torch, the ONNX stack, TensorRT, sf-sdk, the
    exporters' own :data:`ARTIFACT_FORMAT` and the CPU's vector ISA (:func:`cpu_isa`)."""
    from importlib import metadata

    from export.manifest import versions

    out = versions()
    out["artifact_format"] = ARTIFACT_FORMAT
    out["cpu_isa"] = cpu_isa()
    try:
        out["sf-sdk"] = metadata.version("sf-sdk")
    except metadata.PackageNotFoundError:
        out["sf-sdk"] = "unknown"
    return out


@dataclass(frozen=True)
class CacheKey:
    """Everything one cached component depends on; ``digest`` names its entry."""

    backend: str  # the exporter: "onnxruntime", "tensorrt", ...
    component: str  # "dit" or a decoder kind ("vae", ...)
    weights: str  # weights_fingerprint of the module
    config: dict[str, Any]  # the module's config (to_dict)
    geometry: dict[str, Any]  # latent size, chunk frames, window, sink, position mode, batch, dtype, device
    versions: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "component": self.component, "weights": self.weights,
                "config": self.config, "geometry": self.geometry, "versions": self.versions}

    @property
    def digest(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:20]

    @property
    def name(self) -> str:
        return f"{self.component}-{self.digest}"


class ArtifactCache:
    """Cached exports under ``root`` (see the module docstring for the layout and the locking)."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_root()

    # ------------------------------------------------------------------ paths
    def entry(self, key: CacheKey) -> Path:
        return self.root / key.backend / key.name

    def _lock_path(self, key: CacheKey) -> Path:
        return self.root / key.backend / f"{key.name}.lock"

    def _failed_path(self, key: CacheKey) -> Path:
        return self.root / key.backend / f"{key.name}.failed"

    # ------------------------------------------------------------------ lookup
    def lookup(self, key: CacheKey) -> Path | None:
        """The entry's folder when it is complete (its key recorded), else None."""
        path = self.entry(key)
        return path if (path / KEY_FILE).is_file() else None

    def failure(self, key: CacheKey) -> str | None:
        """Why the last build of this entry failed (None: it did not fail, or was never built)."""
        path = self._failed_path(key)
        return path.read_text().strip() or "unknown error" if path.is_file() else None

    def building(self, key: CacheKey) -> bool:
        """True while another process holds the entry's build lock."""
        lock = self._lock_path(key)
        if not lock.exists():
            return False
        with open(lock, "a+") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return False

    @contextlib.contextmanager
    def _locked(self, key: CacheKey) -> Iterator[None]:
        lock = self._lock_path(key)
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a+") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process building %s", self.entry(key))
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    # ------------------------------------------------------------------ building
    def build(self, key: CacheKey, export: Exporter, *, what: str = "") -> Path:
        """The entry's folder, exported with ``export(folder)`` unless it exists; one builder at a
        time across processes. Raises what the export raised (and records it in ``.failed``)."""
        with self._locked(key):
            done = self.lookup(key)
            if done is not None:
                return done
            return self._build_locked(key, export, what=what)

    def _build_locked(self, key: CacheKey, export: Exporter, *, what: str, tmp: Path | None = None) -> Path:
        final = self.entry(key)
        tmp = tmp or Path(tempfile.mkdtemp(prefix=BUILD_PREFIX + key.name + "-", dir=final.parent))
        log.info("building the %s %s for %s into %s (once: later runs load it)", key.backend, key.component,
                 what or "this model", final)
        t0 = time.perf_counter()
        try:
            artifact = tmp / "artifact"
            export(artifact)
            (artifact / KEY_FILE).write_text(json.dumps(key.to_dict(), indent=2, sort_keys=True, default=str) + "\n")
            if final.exists():  # an incomplete entry (no key file): a build that died mid-rename
                shutil.rmtree(final)
            os.rename(artifact, final)
        except BaseException as exc:
            self._failed_path(key).write_text(f"{type(exc).__name__}: {exc}\n")
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._failed_path(key).unlink(missing_ok=True)
        log.info("built %s in %.1f s", final, time.perf_counter() - t0)
        return final

    def build_in_background(self, key: CacheKey, save: Callable[[Path], None], spec: dict[str, Any]) -> Path | None:
        """Start a detached low-priority process that builds the entry: ``save(folder)`` writes what
        it exports from (:func:`export.auto.save_source`), ``spec`` the rest it needs (JSON). Returns
        the log file the process writes, or None when another process is building the entry."""
        if self.building(key) or self.lookup(key) is not None:
            return None
        parent = self.entry(key).parent
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=BUILD_PREFIX + key.name + "-", dir=parent))
        source = tmp / SOURCE
        source.mkdir()
        save(source)
        (source / "spec.json").write_text(json.dumps({"key": key.to_dict(), **spec}, default=str) + "\n")
        log_file = parent / f"{key.name}.log"
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        root = Path(__file__).resolve().parents[1]
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
        with open(log_file, "w") as out:
            subprocess.Popen([sys.executable, "-m", "export.artifact_cache", str(self.root), str(tmp)],
                             stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                             start_new_session=True, cwd=str(root))
        return log_file


def _key_from_dict(data: dict[str, Any]) -> CacheKey:
    return CacheKey(**{k: data[k] for k in CacheKey.__dataclass_fields__})


def _build_saved(root: Path, tmp: Path) -> int:
    """The background builder: export the module saved in ``tmp/source`` into its entry."""
    from export.auto import export_saved

    spec = json.loads((tmp / SOURCE / "spec.json").read_text())
    key = _key_from_dict(spec["key"])
    cache = ArtifactCache(root)
    try:
        with cache._locked(key):
            if cache.lookup(key) is not None:
                log.info("%s was built by another process", cache.entry(key))
                return 0
            cache._build_locked(key, lambda out: export_saved(key, spec, tmp / SOURCE, out),
                                what=spec.get("what", ""), tmp=tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        sys.stderr.write("usage: python -m export.artifact_cache CACHE_ROOT BUILD_DIR (started by backend='auto')\n")
        return 2
    os.nice(19)  # a background build: the lowest CPU priority, the foreground run goes first
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return _build_saved(Path(args[0]), Path(args[1]))
    except Exception:
        log.exception("the background export failed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
