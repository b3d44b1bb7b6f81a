"""The graphs every backend captures, and example inputs with their exact static shapes.

* The DiT chunk step is :class:`sf_sdk.models.dit.ChunkStep`: one chunk of latents against the
  KV cache, every piece of state an explicit tensor (cache buffers, token slots, ``kv_len`` as a
  0-dim tensor, rotary tables). ``functional=False`` writes the cache in place (torch.compile,
  AOTInductor); ``functional=True`` returns the updated caches (ONNX, TensorRT).
* The VAE decode steps are :class:`sf_sdk.models.vae.VAEDecodeStep` with ``first_frame=True``
  (the stream's first latent frame, one pixel frame out) and ``False`` (every later latent frame,
  ``temporal_stride`` pixel frames out), the conv cache as explicit inputs and outputs.

Example inputs come from a real cache plan for a chunk whose window is full and wrapped, so
captured graphs see the same kind of values they will see while streaming; with a batch of
several streams, the rows sit at different positions (a pool whose streams joined at different
times). The inputs are :class:`sf_sdk.models.dit.ChunkInputs`, the declaration every backend shares.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from export.settings import ExportModel, ExportSettings
from sf_sdk.models.dit import ChunkInputs, ChunkStep, WanDiT
from sf_sdk.models.vae import VAEDecodeStep

__all__ = ["StepGraph", "chunk_step_graph", "cache_step_graph", "decode_step_graphs", "check_exportable",
           "STEP_FILES"]

# Artifact names (without extension) of the steps.
STEP_FILES = {"chunk": "chunk_step", "cache_pass": "cache_pass_step", "vae_first": "vae_first",
              "vae_step": "vae_step"}


@dataclass
class StepGraph:
    """A module to capture, with example inputs and I/O names."""

    name: str
    module: nn.Module
    args: tuple[Tensor, ...]
    input_names: list[str]
    output_names: list[str]


def check_exportable(model: ExportModel) -> None:
    """Raise a ValueError for stream settings the captured steps do not implement."""
    if model.streaming.position_mode != "absolute":
        raise ValueError("exported chunk steps store keys after the rotary embedding at absolute positions; "
                         f"position_mode={model.streaming.position_mode!r} is eager-only: export with "
                         f"position_mode='absolute'")


def _prompt(dit: WanDiT, batch: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Random prompt embeddings shorter than text_len (the model zero-pads them)."""
    rows = max(1, dit.config.text_len // 2)
    return torch.randn(batch, rows, dit.config.text_dim, device=device, dtype=dtype)


def chunk_step_graph(model: ExportModel, settings: ExportSettings, *, functional: bool) -> StepGraph:
    """ChunkStep and example inputs for the stream geometry of ``model``."""
    check_exportable(model)
    dit: WanDiT = model.dit
    shapes = model.chunk_shapes(settings)
    device = torch.device(settings.device)
    dtype = shapes.dtype
    stream = model.streaming
    cache = dit.new_cache(stream, shapes.batch, num_frames=settings.num_frames)
    if tuple(cache.k.shape) != shapes.cache_shape:
        raise AssertionError(f"cache {tuple(cache.k.shape)} != profile {shapes.cache_shape}")
    with torch.no_grad():
        cross = dit.encode_context(_prompt(dit, shapes.batch, device, dtype))
        # Rows at different positions, each past the window's first wrap (or the last chunks of a
        # global cache): row r is r chunks behind row 0 (as pooled streams that joined later).
        chunk = stream.num_frame_per_block
        frames = cache.layout.capacity_frames + chunk if stream.rolling else cache.layout.capacity_frames
        last = (frames // chunk - 1) * chunk
        starts = [max(0, last - chunk * (r % 2)) for r in range(shapes.batch)]
        for s in range(0, last, chunk):
            cache.plan_rows([s if s < st else None for st in starts], chunk)
        plan = cache.plan_rows(starts, chunk)
        x = torch.randn(shapes.latent_shape, device=device, dtype=dtype)
        t = torch.full((shapes.batch, chunk), 500.0, device=device, dtype=dtype)
        attend = dit.step_attention(cache, plan, "reference")
        cache.k.normal_()
        cache.v.normal_()
        args = tuple(ChunkInputs.from_plan(x, t, cross, cache, attend))
    names = [spec.name for spec in shapes.inputs()]
    outputs = [spec.name for spec in shapes.outputs()] if functional else ["flow"]
    step = ChunkStep(dit, functional=functional, attention=settings.attention).eval()
    return StepGraph("chunk", step, args, names, outputs)


def cache_step_graph(chunk: StepGraph, model: ExportModel, settings: ExportSettings) -> StepGraph:
    """The cache pass as its own in-place step (``ChunkStep(cache_only=True)``) beside the in-place
    ``chunk`` step, whose example inputs it shares (no second example cache: at the 1.3B preset's
    global cache that is gigabytes): the same keys/values written, without the last layer's
    attention and FFN and the head, which only feed the flow the cache pass discards."""
    step = ChunkStep(model.dit, attention=settings.attention, cache_only=True).eval()
    return StepGraph("cache_pass", step, chunk.args, chunk.input_names, ["kv_len_out"])


def decode_step_graphs(model: ExportModel, settings: ExportSettings) -> list[StepGraph]:
    """The first-frame and the later-frame VAE decode steps with example inputs (empty without a VAE)."""
    shapes = model.decode_shapes(settings)
    if shapes is None or not settings.include_vae:
        return []
    device = torch.device(settings.device)
    graphs = []
    for name, first in (("vae_first", True), ("vae_step", False)):
        step = VAEDecodeStep(model.vae, first_frame=first).eval()
        z = torch.randn(shapes.inputs()[0].shape, device=device, dtype=shapes.dtype)
        cache = tuple(torch.randn(spec.shape, device=device, dtype=shapes.dtype) * 0.1
                      for spec in shapes.inputs()[1:])
        graphs.append(StepGraph(name, step, (z, *cache), shapes.input_names, shapes.output_names))
    return graphs

