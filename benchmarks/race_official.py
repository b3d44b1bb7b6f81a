"""The official Self-Forcing causal inference loop against sf-sdk, side by side in one run.

    PYTHONPATH=. python benchmarks/race_official.py OFFICIAL_SRC --config tiny --chunks 7 --json race.json
    PYTHONPATH=. python benchmarks/race_official.py OFFICIAL_SRC --config mid --chunks 6 --backends eager,auto,default
    PYTHONPATH=. python benchmarks/race_official.py OFFICIAL_SRC --config mid --chunks 3 --dtype bfloat16 --backends eager

``OFFICIAL_SRC`` is a checkout of the public github.com/guandeh17/Self-Forcing repository (any
folder outside this project); it is imported from there at run time, never copied. It needs
``diffusers`` and ``einops`` (``pip install diffusers einops``); nothing else of its
requirements (no flash-attn, no transformers, no CUDA).

Both sides get the same random weights (ours, loaded into the official ``CausalWanModel`` by
parameter name, strict), the same prompt embeddings and the same streaming config: chunks of 3
latent frames, the 4 warped denoising steps + the cache pass at timestep 0, global attention
(the KV cache holds every frame; ``--window N`` gives both sides a rolling window of N latent
frames instead), no VAE decode. The official side is its
``CausalInferencePipeline.inference`` loop, unmodified; ours is ``StreamingGenerator.stream``
with ``decode=False`` on each backend asked for, in ``--dtype`` like the official side, and on
``default``: a generator built with every default (``dtype="auto"``, ``backend="auto"``: on an
AMX CPU a large DiT then computes in bfloat16, which the table's dtype column shows).

What each figure includes: ``s/chunk`` is the median over the chunks after the first of one
chunk's denoising steps, their re-noising and the cache pass (DiT only). Official: from the start
of a chunk's first DiT call to the end of its cache pass (forward hooks on its DiT wrapper).
sf-sdk: the host clock around ``next(stream)``, so it also counts our pool's per-chunk
bookkeeping; ``CPU s/chunk`` is the same span's CPU time over all the process's threads (the work
done, robust to other load on a shared machine). A warm-up stream (``--warmup-chunks``) runs on each
side first; with ``--rounds`` the sides alternate, and the first chunk of every stream is left out.
Before timing, one DiT call on the same input checks that both sides compute the same flow
(``parity_max_abs``).

Shims (the official code as published runs only on CUDA with its model files; each shim is named
``shim_*`` below and changes only what its docstring says):

* ``shim_packages``: ``wan``, ``wan.modules``, ``pipeline`` and ``utils`` are entered without
  running their ``__init__`` files (which import the T5 text encoder, its tokenizer — ftfy,
  transformers — and every other pipeline); the modules the loop needs are then imported as
  they are.
* ``shim_text_encoder``: ``wan.modules.tokenizers`` and ``wan.modules.t5`` are stand-ins that
  refuse to be used (the race feeds prompt embeddings; the T5 module also reads the CUDA device
  in a default argument at import).
* ``shim_memory``: ``demo_utils.memory`` reads the CUDA device at import; a stand-in names the CPU
  (the loop uses it only with ``low_memory=True``, which the race does not set).
* ``shim_attention``: ``flash_attention`` asserts a CUDA tensor and the SDPA fallback
  ``attention`` casts q/k/v to bfloat16; both become ``scaled_dot_product_attention`` in the
  input dtype (float32 here, as ours), which is what flash attention computes.
* ``shim_cache_sizes``: the pipeline hard-codes 30 layers, 1560 tokens per frame, 12 heads of 128
  and 512 text rows in its cache set-up; these come from the config instead (same capacity
  rule: 32760 tokens for global attention, or more when the stream needs more).
* ``shim_prompt`` / ``shim_no_decode``: the text encoder returns the given embeddings; the VAE
  returns the latents (decode off, as on our side).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import logging
import platform
import statistics
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sf_sdk.config import DiTConfig, StreamingConfig, to_dict
from sf_sdk.generator import StreamingGenerator, backend_status
from sf_sdk.results import video_frames_for_latents

log = logging.getLogger("benchmarks.race_official")

CHUNK_FRAMES = 3
PROMPT_ROWS = 16
OFFICIAL_GLOBAL_CACHE_TOKENS = 32760  # the official capacity for global attention


@dataclass(frozen=True)
class RaceConfig:
    dit: DiTConfig
    latent_hw: tuple[int, int]


CONFIGS: dict[str, RaceConfig] = {
    "tiny": RaceConfig(DiTConfig(dim=256, ffn_dim=1024, num_heads=4, num_layers=2, text_len=32), (8, 8)),
    "mid": RaceConfig(DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=2, text_len=512), (30, 52)),
}


# --------------------------------------------------------------------------------------------
# Shims for the official code (see the module docstring)
# --------------------------------------------------------------------------------------------


def shim_packages(src: Path) -> None:
    """Enter the official packages without running their ``__init__`` files."""
    for name, folder in (("wan", src / "wan"), ("wan.modules", src / "wan" / "modules"),
                         ("pipeline", src / "pipeline"), ("utils", src / "utils")):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(folder)]
        sys.modules[name] = pkg


def shim_text_encoder() -> None:
    """Stand-ins for ``wan.modules.tokenizers`` and ``wan.modules.t5`` (no text encoder runs)."""

    def unavailable(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the race feeds prompt embeddings; the official text encoder is not loaded")

    for name, attr in (("wan.modules.tokenizers", "HuggingfaceTokenizer"), ("wan.modules.t5", "umt5_xxl")):
        mod = types.ModuleType(name)
        setattr(mod, attr, unavailable)
        sys.modules[name] = mod


def shim_memory() -> None:
    """``demo_utils.memory`` without its import-time CUDA query (used only with low_memory=True)."""
    mod = types.ModuleType("demo_utils.memory")
    mod.cpu = mod.gpu = torch.device("cpu")

    def unavailable(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("low_memory offloading is CUDA-only and not part of the race")

    mod.get_cuda_free_memory_gb = mod.DynamicSwapInstaller = unavailable
    mod.move_model_to_device_with_memory_preservation = unavailable
    pkg = types.ModuleType("demo_utils")
    pkg.__path__ = []
    sys.modules["demo_utils"], sys.modules["demo_utils.memory"] = pkg, mod


def shim_attention_fn(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None,
                      causal=False, window_size=(-1, -1), deterministic=False, dtype=None, version=None,
                      fa_version=None):
    """flash_attention / attention on any device, in the input dtype: q [B, Lq, H, D] -> [B, Lq, H, D].
    The race never passes lengths, windows or dropout; anything else is refused."""
    if q_lens is not None or k_lens is not None or window_size != (-1, -1) or dropout_p or q_scale is not None:
        raise NotImplementedError("the race's attention shim covers unpadded, unwindowed calls only")
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2).contiguous()


def shim_attention(modules: list[types.ModuleType]) -> None:
    """Point every imported name of the official attention functions at :func:`shim_attention_fn`."""
    for mod in modules:
        for name in ("flash_attention", "attention"):
            if hasattr(mod, name):
                setattr(mod, name, shim_attention_fn)


class ShimPrompt(torch.nn.Module):
    """The official text encoder's interface, returning fixed prompt embeddings."""

    def __init__(self, embeds: torch.Tensor) -> None:
        super().__init__()
        self.embeds = embeds  # [1, Lt, text_dim]

    def forward(self, text_prompts: list[str]) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": self.embeds.expand(len(text_prompts), -1, -1)}


class ShimNoDecode(torch.nn.Module):
    """The official VAE wrapper's interface with decode off: returns the latents."""

    def decode_to_pixel(self, latent: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        return latent


def shim_cache_sizes(pipe: Any, cfg: DiTConfig, tokens_per_frame: int, total_frames: int) -> None:
    """The pipeline's hard-coded cache geometry replaced by the config's."""
    pipe.num_transformer_blocks = cfg.num_layers
    pipe.frame_seq_length = tokens_per_frame
    capacity = max(OFFICIAL_GLOBAL_CACHE_TOKENS, total_frames * tokens_per_frame)
    if pipe.local_attn_size != -1:
        capacity = pipe.local_attn_size * tokens_per_frame
    for block in pipe.generator.model.blocks:
        block.self_attn.max_attention_size = capacity

    def init_kv(batch_size: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = [batch_size, capacity, cfg.num_heads, cfg.head_dim]
        pipe.kv_cache1 = [{"k": torch.zeros(shape, dtype=dtype, device=device),
                           "v": torch.zeros(shape, dtype=dtype, device=device),
                           "global_end_index": torch.tensor([0], dtype=torch.long, device=device),
                           "local_end_index": torch.tensor([0], dtype=torch.long, device=device)}
                          for _ in range(cfg.num_layers)]

    def init_cross(batch_size: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = [batch_size, cfg.text_len, cfg.num_heads, cfg.head_dim]
        pipe.crossattn_cache = [{"k": torch.zeros(shape, dtype=dtype, device=device),
                                 "v": torch.zeros(shape, dtype=dtype, device=device), "is_init": False}
                                for _ in range(cfg.num_layers)]

    pipe._initialize_kv_cache = init_kv
    pipe._initialize_crossattn_cache = init_cross


# --------------------------------------------------------------------------------------------
# The official side
# --------------------------------------------------------------------------------------------


class Official:
    """The official CausalInferencePipeline over our weights, with per-chunk timing hooks."""

    def __init__(self, src: Path, gen: StreamingGenerator, embeds: torch.Tensor, total_frames: int) -> None:
        src = src.resolve()
        if not (src / "pipeline" / "causal_inference.py").is_file():
            raise ValueError(f"{src} is not a Self-Forcing checkout (no pipeline/causal_inference.py): "
                             f"pass the folder of github.com/guandeh17/Self-Forcing")
        sys.path.insert(0, str(src))
        shim_packages(src)
        shim_text_encoder()
        shim_memory()
        attn = importlib.import_module("wan.modules.attention")
        model_mod = importlib.import_module("wan.modules.model")
        causal_mod = importlib.import_module("wan.modules.causal_model")
        shim_attention([attn, model_mod, causal_mod])
        wrapper_mod = importlib.import_module("utils.wan_wrapper")
        pipe_mod = importlib.import_module("pipeline.causal_inference")
        self.commit = _git_commit(src)

        cfg, stream = gen.dit.config, gen.streaming
        model = causal_mod.CausalWanModel(
            model_type="t2v", patch_size=cfg.patch_size, text_len=cfg.text_len, in_dim=cfg.in_dim, dim=cfg.dim,
            ffn_dim=cfg.ffn_dim, freq_dim=cfg.freq_dim, text_dim=cfg.text_dim, out_dim=cfg.out_dim,
            num_heads=cfg.num_heads, num_layers=cfg.num_layers, local_attn_size=stream.local_attn_size,
            sink_size=stream.sink_size, qk_norm=cfg.qk_norm, cross_attn_norm=cfg.cross_attn_norm, eps=cfg.eps)
        model.load_state_dict(gen.dit.state_dict(), strict=True)
        if gen.dtype != torch.float32:
            model = model.to(gen.dtype)
        model = model.eval().requires_grad_(False)

        # The wrapper's constructor loads from a folder; hand it the model built above instead.
        cls = wrapper_mod.CausalWanModel
        cls.from_pretrained = classmethod(lambda *a, **k: model)  # shadows the inherited loader
        try:
            wrapper = wrapper_mod.WanDiffusionWrapper(timestep_shift=stream.timestep_shift, is_causal=True,
                                                      local_attn_size=stream.local_attn_size,
                                                      sink_size=stream.sink_size)
        finally:
            del cls.from_pretrained
        args = types.SimpleNamespace(denoising_step_list=[int(t) for t in stream.denoising_step_list],
                                     warp_denoising_step=stream.warp_denoising_step,
                                     num_frame_per_block=stream.num_frame_per_block, independent_first_frame=False,
                                     context_noise=stream.context_noise, model_kwargs={})
        with contextlib.redirect_stdout(io.StringIO()):
            self.pipe = pipe_mod.CausalInferencePipeline(args, gen.device, generator=wrapper,
                                                         text_encoder=ShimPrompt(embeds), vae=ShimNoDecode())
        tokens = (stream.latent_height // cfg.patch_size[1]) * (stream.latent_width // cfg.patch_size[2])
        shim_cache_sizes(self.pipe, cfg, tokens, total_frames)
        self.calls_per_chunk = len(stream.denoising_step_list) + 1
        self._starts: list[tuple[float, float]] = []
        self._ends: list[tuple[float, float]] = []
        wrapper.register_forward_pre_hook(lambda *a: self._starts.append(_clocks()))
        wrapper.register_forward_hook(lambda *a: self._ends.append(_clocks()))

    def run(self, noise: torch.Tensor) -> tuple[list[float], list[float]]:
        """Stream ``noise`` [1, F, C, H, W]; per-chunk wall and CPU seconds."""
        self._starts.clear()
        self._ends.clear()
        self.pipe.kv_cache1 = None  # fresh caches
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            self.pipe.inference(noise, text_prompts=["race"])
        n = self.calls_per_chunk
        spans = [(self._starts[i], self._ends[i + n - 1]) for i in range(0, len(self._ends), n)]
        return [e[0] - s[0] for s, e in spans], [e[1] - s[1] for s, e in spans]

    def first_flow(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """One DiT call at the stream's start (fresh caches): the flow [1, F, C, H, W]."""
        self.pipe._initialize_kv_cache(1, x.dtype, x.device)
        self.pipe._initialize_crossattn_cache(1, x.dtype, x.device)
        timestep = torch.full(x.shape[:2], t, dtype=x.dtype)
        with torch.no_grad():
            flow, _ = self.pipe.generator(noisy_image_or_video=x, conditional_dict=self.pipe.text_encoder([""]),
                                          timestep=timestep, kv_cache=self.pipe.kv_cache1,
                                          crossattn_cache=self.pipe.crossattn_cache, current_start=0)
        return flow


def _git_commit(src: Path) -> str | None:
    head = src / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref:"):
            return (src / ".git" / ref.split()[1]).read_text().strip()
        return ref
    except OSError:
        return None


# --------------------------------------------------------------------------------------------
# Our side
# --------------------------------------------------------------------------------------------


def _clocks() -> tuple[float, float]:
    """(wall clock, this process's CPU time over all its threads)."""
    return time.perf_counter(), time.process_time()


def ours_run(gen: StreamingGenerator, embeds: torch.Tensor, num_latent: int) -> tuple[list[float], list[float]]:
    """One stream of ``num_latent`` latent frames; per-chunk wall and CPU seconds."""
    frames = video_frames_for_latents(num_latent, gen.temporal_stride)
    wall, cpu = [], []
    with gen.stream(prompt_embeds=embeds, num_frames=frames, decode=False, seed=0) as s:
        it = iter(s)
        while True:
            t0 = _clocks()
            try:
                next(it)
            except StopIteration:
                break
            t1 = _clocks()
            wall.append(t1[0] - t0[0])
            cpu.append(t1[1] - t0[1])
    return wall, cpu


def ours_first_flow(gen: StreamingGenerator, embeds: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    dit = gen.dit
    with torch.no_grad():
        cross = dit.encode_context(embeds.unsqueeze(0))
        cache = dit.new_cache(gen.streaming, 1, num_frames=x.shape[1])
        return dit.forward_chunk(x, torch.full(x.shape[:2], t, dtype=x.dtype), cross, cache, 0)


# --------------------------------------------------------------------------------------------
# The race
# --------------------------------------------------------------------------------------------


def race(src: Path, name: str, chunks: int, rounds: int, warmup: int, backends: list[str], seed: int,
         window: int = -1, dtype: str = "float32") -> dict[str, Any]:
    rc = CONFIGS[name]
    num_latent = chunks * CHUNK_FRAMES
    h, w = rc.latent_hw
    stream = StreamingConfig(num_frame_per_block=CHUNK_FRAMES, latent_height=h, latent_width=w,
                             global_cache_frames=num_latent, local_attn_size=window)
    # The official side and the named backends compute in ``dtype``; the "default" side is a generator
    # with every default (dtype="auto", backend="auto"), the same weights (same seed, cast after init).
    gen = StreamingGenerator.from_config(rc.dit, stream, seed=seed, dtype=dtype, backend="eager")
    gens = {b: gen for b in backends if b != "default"}
    if "default" in backends:
        gens["default"] = StreamingGenerator.from_config(rc.dit, stream, seed=seed)
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(PROMPT_ROWS, rc.dit.text_dim, generator=g)
    padded = F.pad(embeds, (0, 0, 0, rc.dit.text_len - PROMPT_ROWS)).unsqueeze(0)  # [1, Lt, text_dim]
    noise = torch.randn(1, num_latent, rc.dit.in_dim, h, w, generator=g).to(gen.dtype)
    official = Official(src, gen, padded.to(gen.dtype), num_latent)

    # Same weights, same input: the first DiT call's flow on both sides.
    t0 = float(gen.steps.timesteps[0])
    x = noise[:, :CHUNK_FRAMES]
    reference = official.first_flow(x, int(t0))
    parity = (reference - ours_first_flow(gen, embeds.to(gen.dtype), x, int(t0))).abs().max().item()
    log.info("%s: first-call flow max |official - ours| = %.2e (%s)", name, parity, dtype)
    dtypes = {f"sf-sdk {b}": str(g.dtype).removeprefix("torch.") for b, g in gens.items()}
    parity_default = None
    if "default" in gens and gens["default"].dtype != gen.dtype:
        d = gens["default"]
        flow = ours_first_flow(d, embeds.to(d.dtype), x.to(d.dtype), int(t0))
        parity_default = (reference.float() - flow.float()).abs().max().item()
        log.info("%s: the default side computes in %s; its first-call flow max |official - ours| = %.2e",
                 name, dtypes["sf-sdk default"], parity_default)

    result: dict[str, Any] = {"config": name, "dit": to_dict(rc.dit), "latent_hw": list(rc.latent_hw),
                              "chunks": chunks, "rounds": rounds, "window": window, "chunk_frames": CHUNK_FRAMES, "parity_max_abs": parity,
                              "official_commit": official.commit, "dtype": dtype, "side_dtypes": dtypes,
                              "parity_default_max_abs": parity_default, "sides": {}}
    runs: dict[str, Any] = {"official": lambda: official.run(noise[:, :warmup * CHUNK_FRAMES])}
    for b in backends:
        reason = backend_status(b) if b not in ("eager", "default") else None
        if reason is None and b != "default":
            try:  # backends that need an exported artifact say so here
                gen.use_backend(b)
            except (ValueError, RuntimeError) as exc:
                reason = str(exc)
        if reason is not None:
            result["sides"][f"sf-sdk {b}"] = {"skipped": reason}
            log.warning("backend %s skipped: %s", b, reason)
            continue
        runs[f"sf-sdk {b}"] = b
    for side, what in runs.items():  # warm-up: a short stream on each side
        if side == "official":
            what()
        else:
            g = gens[what]
            if what != "default":
                g.use_backend(what)
            ours_run(g, embeds.to(g.dtype), warmup * CHUNK_FRAMES)
    measured: dict[str, tuple[list[float], list[float]]] = {side: ([], []) for side in runs}
    for _ in range(rounds):  # sides alternate, so a load change on a shared machine hits all of them
        for side, what in runs.items():
            if side == "official":
                wall, cpu = official.run(noise)
            else:
                g = gens[what]
                if what != "default":
                    g.use_backend(what)
                wall, cpu = ours_run(g, embeds.to(g.dtype), num_latent)
            measured[side][0].extend(wall[1:])  # the first chunk of each stream is not counted
            measured[side][1].extend(cpu[1:])
    for side, (wall, cpu) in measured.items():
        result["sides"][side] = {"chunk_wall_s": wall, "chunk_cpu_s": cpu, "median_s": statistics.median(wall),
                                 "median_cpu_s": statistics.median(cpu)}
        log.info("%s %s: %.4f s/chunk (CPU %.4f s)", name, side, statistics.median(wall), statistics.median(cpu))
    base = result["sides"]["official"]
    for r in result["sides"].values():
        if "median_s" in r:
            r["official_over_this"] = base["median_s"] / r["median_s"]
            r["official_over_this_cpu"] = base["median_cpu_s"] / r["median_cpu_s"]
    return result


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| config | side | dtype | s/chunk | official / this | CPU s/chunk | official / this (CPU) |",
             "|---|---|---|---|---|---|---|"]
    for res in results:
        for side, r in res["sides"].items():
            dtype = res.get("side_dtypes", {}).get(side, res.get("dtype", "float32"))
            if "skipped" in r:
                lines.append(f"| {res['config']} | {side} | {dtype} | skipped: {r['skipped']} | | | |")
            else:
                lines.append(f"| {res['config']} | {side} | {dtype} | {r['median_s']:.4f} | "
                             f"{r['official_over_this']:.2f}x | {r['median_cpu_s']:.4f} | "
                             f"{r['official_over_this_cpu']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("official_src", type=Path, help="a checkout of github.com/guandeh17/Self-Forcing")
    p.add_argument("--config", choices=[*CONFIGS, "all"], default="tiny")
    p.add_argument("--chunks", type=int, default=7, help="chunks per measured stream (the first is not counted)")
    p.add_argument("--window", type=int, default=-1,
                   help="local_attn_size in latent frames on both sides (-1: global attention, the default)")
    p.add_argument("--warmup-chunks", type=int, default=2, help="chunks of the warm-up stream on each side")
    p.add_argument("--rounds", type=int, default=1, help="measured streams per side, the sides alternating")
    p.add_argument("--backends", default="eager,default",
                   help="comma-separated sf-sdk sides: backends in --dtype (eager, auto, onnxruntime, ...) and "
                        "'default', a generator with every default (dtype and backend 'auto'); default eager,default")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the official side's and the named backends' dtype (default float32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.chunks < 2:
        p.error("--chunks must be at least 2 (the first chunk is not counted)")
    if args.warmup_chunks < 1 or args.rounds < 1:
        p.error("--warmup-chunks and --rounds must be at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    names = list(CONFIGS) if args.config == "all" else [args.config]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    results = [race(args.official_src, n, args.chunks, args.rounds, args.warmup_chunks, backends, args.seed,
                    args.window, args.dtype) for n in names]
    print(table(results))
    if args.json is not None:
        doc = {"results": results, "threads": torch.get_num_threads(), "torch": torch.__version__,
               "python": platform.python_version(), "machine": platform.machine(),
               "definitions": {"median_s": "median wall seconds of one chunk's denoising steps + cache pass (DiT "
                                           "only, no decode), over the chunks after the first of every round",
                               "median_cpu_s": "the same chunks' CPU seconds (all threads of the process): "
                                               "the work done, unaffected by other processes on a shared machine",
                               "official_over_this": "official median / this side's median (same run)",
                               "parity_max_abs": "max |flow| difference of one DiT call on the same input",
                               "parity_default_max_abs": "the same for the default side when its dtype differs"}}
        args.json.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
