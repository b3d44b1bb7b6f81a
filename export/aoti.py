"""AOTInductor: ``torch.export`` + AOTInductor packages (``.pt2``) of the chunk and decode steps.

    python -m export.aoti --model PATH_OR_PRESET [--random-init] --out DIR [--verify]

writes ``DIR/chunk_step.pt2`` (the DiT chunk step, cache written in place),
``DIR/cache_pass_step.pt2`` (the cache pass: the same writes without what only feeds the flow;
at 2 layers ~45% of a call), ``DIR/vae_first.pt2``
and ``DIR/vae_step.pt2`` (the VAE decode steps) and ``DIR/export.json``. Each package is a
compiled shared library with the weights inside: loading it needs no Python model code and no
compilation. ``StreamingGenerator(..., backend="aoti", backend_options={"artifact_dir": DIR})``
runs them; the stream's state is carried across calls in the explicit cache tensors.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from export.cli import base_parser, run_export, settings_kwargs
from export.manifest import Manifest, read_manifest, write_manifest
from export.runtime import DecoderFactory, StepChunkModel, StepDecoder
from export.settings import AOTISettings, ExportModel, attention_backend
from export.steps import STEP_FILES, StepGraph, cache_step_graph, chunk_step_graph, decode_step_graphs
from export.verify import verify_chunk_model, verify_decoder

__all__ = ["export_aoti", "load_aoti", "main"]

log = logging.getLogger(__name__)

BACKEND = "aoti"
SUFFIX = ".pt2"


def _package(graph: StepGraph, path: Path, settings: AOTISettings) -> float:
    """torch.export + AOTInductor of one step into ``path``; returns the seconds it took."""
    from torch._inductor import aoti_compile_and_package

    t0 = time.perf_counter()
    with torch.no_grad(), attention_backend(settings.attention):
        program = torch.export.export(graph.module, graph.args, strict=False)
        aoti_compile_and_package(program, package_path=str(path), inductor_configs=settings.inductor_configs())
    seconds = time.perf_counter() - t0
    log.info("AOTInductor %s -> %s in %.1f s", graph.name, path.name, seconds)
    return seconds


def export_aoti(model: ExportModel, out_dir: str | os.PathLike, settings: AOTISettings | None = None) -> Manifest:
    """Package the chunk step (and the decode steps) of ``model`` into ``out_dir``."""
    settings = settings or AOTISettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chunk = chunk_step_graph(model, settings, functional=False)
    graphs = [chunk, cache_step_graph(chunk, model, settings), *decode_step_graphs(model, settings)]
    files, seconds = {}, {}
    for graph in graphs:
        name = STEP_FILES[graph.name] + SUFFIX
        seconds[graph.name] = round(_package(graph, out / name, settings), 2)
        files[graph.name] = name
    write_manifest(out, BACKEND, model, settings, files, extra={"compile_seconds": seconds})
    return read_manifest(out, BACKEND)


def _children(spec) -> list:
    """A TreeSpec's child specs (``children()`` since torch 2.10, ``children_specs`` before)."""
    return list(spec.children()) if hasattr(spec, "children") else list(spec.children_specs)


def _direct(package):
    """The package's call without the per-call work of ``AOTICompiledModel.__call__`` (it parses
    the call spec's JSON and flattens the arguments and outputs with pytree on every call: ~0.1 ms,
    some 4% of a tiny chunk step) when the graph takes only positional tensors, as every step graph
    here does: the arguments go to the loader as they are and a single output comes back as it is.
    Anything else (another spec, a loader without ``boxed_run``) calls the package itself."""
    from torch.utils import _pytree as pytree

    loader = getattr(package, "loader", None)
    try:
        in_spec, out_spec = (pytree.treespec_loads(spec) for spec in loader.get_call_spec())
        args_spec, kwargs_spec = _children(in_spec)
        plain = kwargs_spec.num_leaves == 0 and all(c.is_leaf() for c in _children(args_spec))
        boxed_run = loader.boxed_run
    except (AttributeError, TypeError, ValueError):
        return package
    if not plain:
        return package
    count = args_spec.num_children

    def run(*args: torch.Tensor):
        if len(args) != count:  # (the loader itself refuses anything but tensors)
            raise ValueError(f"the AOTInductor step takes {count} tensors, got {len(args)} arguments")
        flat = boxed_run(list(args))
        return flat[0] if out_spec.is_leaf() else pytree.tree_unflatten(flat, out_spec)

    return run


def _decode_runner(package):
    call = _direct(package)

    def run(z: torch.Tensor, cache: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        pixels, new_cache = call(z, *cache)
        return pixels, tuple(new_cache)

    return run


def load_aoti(manifest: Manifest, dit: torch.nn.Module, *, device: torch.device | str | None = None
              ) -> tuple[StepChunkModel, DecoderFactory | None]:
    """The chunk model and (if exported) the streaming decoder of an AOTInductor folder."""
    from torch._inductor import aoti_load_package

    if manifest.settings.get("attention") != "reference":
        import sf_sdk.ops  # noqa: F401  (registers the sf_sdk:: custom ops the package calls)
    device = torch.device(device if device is not None else manifest.settings["device"])
    t0 = time.perf_counter()
    chunk = _direct(aoti_load_package(str(manifest.path("chunk"))))
    # Folders exported before the cache pass had its own step run the chunk step for it.
    write = _direct(aoti_load_package(str(manifest.path("cache_pass")))) if "cache_pass" in manifest.files else None
    model = StepChunkModel(dit, manifest.chunk_profile(), name="AOTInductor", inplace=chunk, cache_pass=write,
                           device=device)
    make_decoder = None
    shapes = manifest.decode_profile()
    if shapes is not None:
        first = _decode_runner(aoti_load_package(str(manifest.path("vae_first"))))
        step = _decode_runner(aoti_load_package(str(manifest.path("vae_step"))))

        def make_decoder() -> StepDecoder:
            return StepDecoder(shapes, first, step, device=device)
    log.info("loaded the AOTInductor packages of %s in %.2f s", manifest.root, time.perf_counter() - t0)
    return model, make_decoder


def _verify(model: ExportModel, manifest: Manifest, settings: AOTISettings, seed: int) -> list:
    chunk, make_decoder = load_aoti(manifest, model.dit)
    results = [verify_chunk_model(model, chunk, settings, seed=seed)]
    if make_decoder is not None:
        results.append(verify_decoder(model, make_decoder(), settings, seed=seed))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser("python -m export.aoti", "torch.export + AOTInductor packages of the streaming steps")
    parser.add_argument("--attention", default="reference", choices=("reference", "kernel", "auto"),
                        help="cache attention captured in the graph (kernel: the sf_sdk:: custom op)")
    parser.add_argument("--fast-compile", action="store_true",
                        help="shorter compile, slower kernels (no vectorization; for tests)")
    parser.add_argument("--no-freeze", action="store_true", help="keep weights as graph inputs (no folding)")
    parser.add_argument("--no-autotune", action="store_true",
                        help="CPU: oneDNN for every GEMM instead of timing Inductor's C++ GEMM template against it")
    args = parser.parse_args(argv)
    return run_export(args, lambda: AOTISettings(**settings_kwargs(args), attention=args.attention,
                                                fast_compile=args.fast_compile, freeze=not args.no_freeze,
                                                autotune=not args.no_autotune), export_aoti, _verify)


if __name__ == "__main__":
    sys.exit(main())
