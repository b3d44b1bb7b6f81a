"""The backend registry: what a stream runs its chunks and its decode on.

``backend="eager"`` runs the PyTorch modules; other names (``auto``, the default: the fastest
measured backend per component with an artifact cache, and ``compile``, ``aoti``,
``onnxruntime``, ``tensorrt``, ``torch_tensorrt``) are provided by the ``export`` package,
imported on first use, and registered under the same API (:func:`register_backend`).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor

from sf_sdk.sampling import ChunkModel

if TYPE_CHECKING:  # pragma: no cover
    from sf_sdk.generator import StreamingGenerator

__all__ = ["Backend", "Decoder", "BackendFactory", "register_backend", "backend_names", "backend_status",
           "resolve_backend", "DEFAULT_BACKEND"]

log = logging.getLogger(__name__)

# What every constructor, sf-generate and sf-serve use unless told otherwise (export.auto).
DEFAULT_BACKEND = "auto"


class Decoder(Protocol):
    def decode(self, z: Tensor) -> Tensor: ...

    def reset(self) -> None: ...


@dataclass
class Backend:
    """What the streaming loop runs: a chunk model and a streaming decoder factory.

    The two may come from different backends (``backend="auto"`` picks each component's:
    ``components`` names them). ``streams`` (optional) gives the backend a pool of ``n`` streams
    runs (an exported step has a static batch); None: this one, for every pool size.
    """

    name: str
    dit: ChunkModel
    make_decoder: Callable[[], Decoder] | None
    streams: Callable[[int], Backend] | None = None
    components: dict[str, str] | None = None

    def for_streams(self, n: int) -> Backend:
        """The backend a pool of ``n`` streams runs."""
        return self if self.streams is None else self.streams(n)


BackendFactory = Callable[["StreamingGenerator", dict[str, Any]], Backend]
# Returns None when the backend can run here, else the reason it cannot.
AvailabilityCheck = Callable[[], "str | None"]
_BACKENDS: dict[str, BackendFactory] = {}
_AVAILABLE: dict[str, AvailabilityCheck] = {}
# Backends living in the export package, imported on first use.
_LAZY_BACKENDS = {
    "auto": "export.auto",
    "compile": "export.backends",
    "aoti": "export.backends",
    "onnxruntime": "export.backends",
    "tensorrt": "export.backends",
    "torch_tensorrt": "export.backends",
}
_import_errors: dict[str, str] = {}


def register_backend(name: str, factory: BackendFactory, *, available: AvailabilityCheck | None = None
                     ) -> None:
    """Make ``StreamingGenerator(..., backend=name)`` build its backend with ``factory``.

    ``available`` (optional) returns None when the backend can run on this machine, else the
    reason it cannot (e.g. "tensorrt is not installed"); benchmarks use it to skip backends.
    """
    _BACKENDS[name] = factory
    if available is not None:
        _AVAILABLE[name] = available
    else:
        _AVAILABLE.pop(name, None)


def _eager_backend(gen: StreamingGenerator, options: dict[str, Any]) -> Backend:
    if options:
        raise ValueError(f"the eager backend takes no options, got {sorted(options)}")
    make = gen.make_streaming_decoder if gen.vae is not None or gen.decoder == "tiny" else None
    return Backend("eager", gen.dit, make)


register_backend("eager", _eager_backend)


def _import_backend_module(name: str) -> None:
    module = _LAZY_BACKENDS.get(name)
    if name in _BACKENDS or module is None or module in _import_errors:
        return
    try:
        importlib.import_module(module)
    except ImportError as exc:
        _import_errors[module] = f"{module} cannot be imported ({exc})"


def backend_names() -> list[str]:
    """Every backend name: registered ones and the ones the export package provides."""
    for name in _LAZY_BACKENDS:
        _import_backend_module(name)
    return ["eager"] + sorted((set(_BACKENDS) | set(_LAZY_BACKENDS)) - {"eager"})


def backend_status(name: str) -> str | None:
    """None when backend ``name`` can run here, else the reason it cannot."""
    _import_backend_module(name)
    if name not in _BACKENDS:
        module = _LAZY_BACKENDS.get(name)
        if module is None:
            return f"unknown backend {name!r}"
        return _import_errors.get(module, f"{module} does not register {name!r}")
    check = _AVAILABLE.get(name)
    if check is None:
        return None
    try:
        return check()
    except Exception as exc:  # an availability probe must not break listing
        return f"availability check failed: {type(exc).__name__}: {exc}"


def resolve_backend(name: str) -> BackendFactory:
    _import_backend_module(name)
    if name == DEFAULT_BACKEND and name not in _BACKENDS:
        # The default must always construct: without the export package, auto is eager.
        log.warning("backend %r is not available (%s): running eagerly", name, backend_status(name))
        return lambda gen, options: _eager_backend(gen, {})
    if name not in _BACKENDS:
        reason = backend_status(name)
        known = sorted(set(_BACKENDS) | set(_LAZY_BACKENDS))
        raise ValueError(f"backend {name!r} is not available ({reason}); choose one of {known}")
    return _BACKENDS[name]
