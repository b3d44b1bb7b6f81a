"""``sf-generate``: stream a prompt's video into an MP4 file while it is generated.

    sf-generate "a red circle moving right" --frames 33 --output red_circle.mp4
    sf-generate "a blue square moving up" --seconds 30 --window 6 --model path/to/model_folder
    sf-generate "a cat surfing" --model self_forcing_dmd.pt --wan-dir Wan2.1-T2V-1.3B --device cuda
    python -m sf_sdk ...                      (the same command)

Each chunk is appended to the MP4 (fragmented, playable while it grows) as soon as it is decoded;
a progress bar shows the frames done and the generation speed. The video grows in ``.NAME.part``
beside the output and is renamed to it when finished (:class:`sf_sdk.video.Mp4Writer`), so the
output name only ever holds a whole video. An existing output is kept unless ``--overwrite`` is
given; the default name is the prompt and the seed. Ctrl-C (exit code 130) or SIGTERM (143) stops
the stream and leaves a valid MP4 of exactly the frames it reports. Mistakes in the command (an
empty prompt, a frame count that is not whole chunks, an unknown device, a missing model, an
existing output, another run writing the same output) end with one line on stderr and exit code
2; a failure (a full disk, a crash) with one line and exit code 1, the output as it was
(:mod:`sf_sdk.exit_codes`).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

from sf_sdk.exit_codes import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USER_ERROR,
    CommandParser,
    StopSignals,
    UserError,
    run_command,
)

__all__ = ["main", "build_parser"]

log = logging.getLogger("sf_sdk.cli")

PROG = "sf-generate"
__all__ += ["EXIT_OK", "EXIT_FAILURE", "EXIT_USER_ERROR", "UserError"]
DEFAULT_MODEL = "shapes-tiny"
# Without --frames / --seconds: the length Self-Forcing was trained on (21 latent frames).
DEFAULT_FRAMES = 81
MAX_NAME_CHARS = 60
# Artifact backends, which need --artifact-dir (the folder `python -m export.<tool>` wrote).
ARTIFACT_BACKENDS = {"aoti": "aoti", "onnxruntime": "onnx", "tensorrt": "trt", "torch_tensorrt": "torch_trt"}
# On the CPU a one-video process runs --backend auto's exported DiT only for videos of at least this
# many chunks: loading it costs a new process ~1.1-1.4 s (inductor's import, the package) and it
# saves ~13 ms per shapes-tiny chunk at 2 threads, so shorter videos finish sooner eagerly
# (docs/export.md). Long-lived processes (sf-serve, the Python API) always take auto's pick.
AUTO_MIN_CHUNKS = 100


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog=PROG, description="Stream a text prompt's video into an MP4 file as it is generated.")
    p.add_argument("prompt", help="what the video shows")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--frames", type=int, help=f"video frames, whole chunks: 1 + 4k with k + 1 a multiple "
                                                   f"of the chunk size (default {DEFAULT_FRAMES})")
    length.add_argument("--seconds", type=float, help="video length in seconds, rounded up to whole chunks")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--output", "-o", type=Path, help="MP4 file to write (default: the prompt and the seed, as a "
                                                     "file name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (when the new video is "
                                                            "finished)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a model folder, a bundled model name, or an official self_forcing_dmd.pt "
                        f"(default {DEFAULT_MODEL})")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", help="auto, float32, bfloat16 or float16 (default auto: bfloat16 on CUDA and on AMX CPUs for "
                                  "DiTs big enough to gain, else float32; sf_sdk.precision)")
    p.add_argument("--window", type=int, help="rolling attention window in latent frames (local_attn_size); "
                                              "needed for videos longer than the model was trained on")
    p.add_argument("--sink", type=int, help="latent frames at the start that stay in the window (with --window)")
    p.add_argument("--framewise", action="store_true", help="one latent frame per chunk (lower latency)")
    p.add_argument("--wan-dir", type=Path, help="the official Wan2.1-T2V-1.3B folder (for a .pt --model)")
    p.add_argument("--no-ema", action="store_true", help="official checkpoints: the 'generator' weights, "
                                                         "not 'generator_ema'")
    p.add_argument("--family", help="official checkpoints: the Self-Forcing family member (causal-forcing-framewise, "
                                    "longlive, reward-forcing, rolling-forcing, ...; default: from the file name)")
    p.add_argument("--lora", type=Path, help="a LoRA (PEFT folder or file, LongLive lora.pt) merged into the DiT")
    p.add_argument("--lora-scale", type=float, default=1.0, help="the LoRA's strength (default 1)")
    p.add_argument("--image", type=Path, help="image-to-video: the first frame (resized and centre-cropped to the "
                                              "model's size; frame-wise models)")
    p.add_argument("--prompt-at", action="append", default=[], metavar="FRAME:PROMPT",
                   help="switch to PROMPT at video frame FRAME (at the first chunk boundary at or after it); "
                        "repeatable, e.g. --prompt-at 40:\"a blue circle moving left\"")
    p.add_argument("--transition", choices=("recache", "blend", "cut"), default="recache",
                   help="how --prompt-at switches: recache (default: the cached frames re-encoded under the new "
                        "prompt), blend (the prompt moves to the new one over --blend-chunks chunks) or cut")
    p.add_argument("--blend-chunks", type=int, default=3, help="chunks a blend takes (default 3)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own, one per core)")
    p.add_argument("--decoder", choices=("wan", "tiny"), default="wan",
                   help="wan (default): the model's VAE decoder; tiny: its tiny streaming decoder (TAEHV), faster")
    p.add_argument("--decoder-path", type=Path, help="a TAEHV file for --decoder tiny (taew2_1.pth for the "
                                                     "official checkpoints)")
    p.add_argument("--backend", default="auto",
                   help="auto (default: the fastest measured backend per component; a first run stays eager while "
                        "the export is built in the background for later runs), eager, onnxruntime, compile, ...")
    p.add_argument("--artifact-dir", type=Path, help="the artifact folder of an export backend (aoti, "
                                                     "onnxruntime, tensorrt, torch_tensorrt): the --out of "
                                                     "python -m export.aoti|onnx|trt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    restore = _setup_logging(args)
    try:
        return _main(args)
    finally:
        restore()


def _main(args: argparse.Namespace) -> int:
    return run_command(PROG, lambda signals: _run(args, signals), debug=args.debug)


def _setup_logging(args: argparse.Namespace) -> Callable[[], None]:
    """Log the SDK's messages to stderr for this command; returns what undoes it."""
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    logger = logging.getLogger("sf_sdk")
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]

    return restore


def _default_output(prompt: str, seed: int) -> Path:
    """``<prompt words>_seed<N>.mp4``: letters, digits and ``_`` only (no path separators, no
    leading dot or dash), at most MAX_NAME_CHARS characters of the prompt."""
    name = re.sub(r"\W+", "_", prompt.lower()).strip("_")[:MAX_NAME_CHARS].rstrip("_")
    return Path(f"{name or 'sf_video'}_seed{seed}.mp4")


def _check_args(args: argparse.Namespace) -> tuple[str, str, Path]:
    """Checks that need no model; returns the device, dtype and output path."""
    if not args.prompt.strip():
        raise UserError("the prompt is empty: describe the video to generate")
    if args.frames is not None and args.frames <= 0:
        raise UserError(f"--frames must be a positive number of video frames, got {args.frames}")
    if args.seconds is not None and not (args.seconds > 0 and math.isfinite(args.seconds)):
        raise UserError(f"--seconds must be a positive number, got {args.seconds}")
    if args.window is not None and args.window <= 0:
        raise UserError(f"--window must be a positive number of latent frames, got {args.window}")
    if args.sink is not None and (args.sink < 0 or args.window is None):
        raise UserError("--sink needs --window and must be >= 0")
    args.switches = _parse_switches(args.prompt_at)
    if args.blend_chunks <= 0:
        raise UserError(f"--blend-chunks must be a positive number of chunks, got {args.blend_chunks}")
    if args.threads is not None and args.threads <= 0:
        raise UserError(f"--threads must be a positive number of CPU threads, got {args.threads}")
    if args.image is not None and not args.image.is_file():
        raise UserError(f"--image {args.image} is not a file: pass a PNG / JPEG image")
    import torch

    from sf_sdk.checkpoint import resolve_dtype
    from sf_sdk.generator import _parse_device

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _parse_device(device)  # a clear error for a bad --device before anything loads
    dtype = args.dtype or "auto"
    if dtype != "auto":
        resolve_dtype(dtype)
    output = args.output if args.output is not None else _default_output(args.prompt, args.seed)
    if output.is_dir():
        raise UserError(f"--output {output} is a folder: give a file name such as {output / 'video.mp4'}")
    if output.exists() and not args.overwrite:
        raise UserError(f"{output} exists: pass --overwrite to replace it (when the new video is finished), or "
                        f"choose another --output")
    if args.artifact_dir is not None and not args.artifact_dir.is_dir():
        raise UserError(f"--artifact-dir {args.artifact_dir} is not a folder: pass the --out folder of "
                        f"python -m export.aoti|onnx|trt")
    parent = output.resolve().parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK):
        raise UserError(f"cannot write {output}: {existing} is not writable")
    return device, dtype, output


def _parse_switches(items: Sequence[str]) -> list[tuple[int, str]]:
    """``--prompt-at FRAME:PROMPT`` values -> [(frame, prompt)] sorted by frame."""
    out: dict[int, str] = {}
    for item in items:
        frame, sep, prompt = item.partition(":")
        if not sep or not frame.strip().isdigit():
            raise UserError(f"--prompt-at needs FRAME:PROMPT (a video frame number, a colon, a prompt), got {item!r}")
        if not prompt.strip():
            raise UserError(f"--prompt-at {item!r}: the prompt after the colon is empty")
        n = int(frame)
        if n <= 0:
            raise UserError(f"--prompt-at {item!r}: the frame must be after the start (> 0); the first prompt is "
                            f"the positional one")
        if n in out:
            raise UserError(f"--prompt-at gives two prompts for frame {n}")
        out[n] = prompt.strip()
    return sorted(out.items())


def _run(args: argparse.Namespace, signals: StopSignals) -> int:
    device, dtype, output = _check_args(args)
    from sf_sdk.generator import cpu_threads
    from sf_sdk.video import Mp4Writer

    # The output is reserved before the model loads: another run writing it fails here, at once.
    # Its fps is the model's, set once the model is loaded (before the first frame).
    writer = Mp4Writer(output, overwrite=args.overwrite)
    try:
        with cpu_threads(args.threads):
            return _generate(args, device, dtype, writer, signals)
    finally:
        writer.discard()  # only when _write did not finish it: an error before or while writing


def _backend_options(args: argparse.Namespace) -> dict[str, object] | None:
    if args.artifact_dir is None:
        if args.backend in ARTIFACT_BACKENDS:
            raise UserError(f"--backend {args.backend} needs --artifact-dir DIR, the folder written by "
                            f"python -m export.{ARTIFACT_BACKENDS[args.backend]} --model ... --out DIR")
        return None
    return {"artifact_dir": str(args.artifact_dir)}


def _generate(args: argparse.Namespace, device: str, dtype: str, writer, signals: StopSignals) -> int:
    import torch

    from sf_sdk.generator import StreamingGenerator

    overrides: dict[str, object] = {}
    if args.window is not None:
        overrides["local_attn_size"] = args.window
    if args.sink is not None:
        overrides["sink_size"] = args.sink
    if args.framewise:
        overrides["num_frame_per_block"] = 1
    t0 = time.perf_counter()
    # On the CPU, auto is resolved once the video's length is known (AUTO_MIN_CHUNKS); with options
    # (--artifact-dir) it is resolved at once and says what is wrong with them.
    options = _backend_options(args)
    defer_auto = args.backend == "auto" and device == "cpu" and options is None
    gen = StreamingGenerator.from_pretrained(args.model, device=device, dtype=dtype, streaming=overrides or None,
                                             backend="eager" if defer_auto else args.backend,
                                             backend_options=options,
                                             decoder=args.decoder, decoder_path=args.decoder_path,
                                             wan_dir=args.wan_dir, use_ema=False if args.no_ema else None,
                                             family=args.family, lora=args.lora, lora_scale=args.lora_scale)
    n = torch.get_num_threads()
    threads = f", {n} CPU thread{'s' if n != 1 else ''}" if gen.device.type == "cpu" else ""
    log.info("loaded %s on %s (%s%s) in %.1f s", args.model, device, str(gen.dtype).removeprefix("torch."), threads,
             time.perf_counter() - t0)
    if getattr(gen.backend, "make_decoder", None) is None:
        where = (f"the {args.backend} artifacts in {args.artifact_dir} hold no VAE step (exported with --no-vae): "
                 f"export them again without --no-vae" if args.artifact_dir is not None
                 else f"{args.model} has no VAE: use a model folder with one")
        raise UserError(f"no decoder to make frames with: {where}")
    frames = _num_frames(args, gen)
    st = gen.streaming
    latent = (frames - 1) // gen.temporal_stride + 1
    if defer_auto:
        chunks = math.ceil(latent / st.num_frame_per_block)
        if chunks >= AUTO_MIN_CHUNKS:
            gen.use_backend("auto")
        else:
            log.info("backend auto: a video of %d chunk%s runs eagerly (an exported DiT costs a new process more "
                     "to load than it saves below %d chunks; sf-serve and the Python API use it at any length)",
                     chunks, "" if chunks == 1 else "s", AUTO_MIN_CHUNKS)
    if not st.rolling and latent > st.global_cache_frames:
        log.warning("%d latent frames with global attention: longer than the %d the model streams by default; "
                    "for long videos use a rolling window (--window N)", latent, st.global_cache_frames)
    late = [f for f, _ in args.switches if f >= frames]
    if late:
        raise UserError(f"--prompt-at frame {late[0]} is not before the end of the video ({frames} frames)")
    writer.fps = Fraction(gen.fps)
    with gen.stream(args.prompt, num_frames=frames, seed=args.seed, image=args.image) as stream:
        return _write(stream, gen, frames, writer, signals, progress=not (args.no_progress or args.quiet),
                      switches=args.switches, transition=args.transition, blend_chunks=args.blend_chunks)


def _num_frames(args: argparse.Namespace, gen) -> int:
    if args.frames is not None:
        return args.frames
    if args.seconds is not None:
        wanted = math.ceil(args.seconds * gen.fps)
        frames = gen.round_up_frames(wanted)
        log.info("--seconds %g at %d fps = %d frames; rounded up to whole chunks: %d frames (%.2f s)",
                 args.seconds, gen.fps, wanted, frames, frames / gen.fps)
        return frames
    return gen.round_up_frames(DEFAULT_FRAMES)


def _write(stream, gen, total: int, writer, signals: StopSignals, *, progress: bool,
           switches: Sequence[tuple[int, str]] = (), transition: str = "recache", blend_chunks: int = 3) -> int:
    """Stream the chunks into ``writer`` and finish it. A stop signal between chunks (or held back
    while a chunk goes into the file) finishes the file with the frames written so far."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    output = writer.path
    written = 0
    pending = list(switches)
    dit_s = decode_s = 0.0
    start = time.perf_counter()
    bar = tqdm(total=total, unit="frame", desc="generating", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    try:
        with logging_redirect_tqdm(loggers=[logging.getLogger("sf_sdk")]), bar:
            for chunk in stream:
                with signals.held():
                    writer.write(chunk.frames)
                written = writer.frames_written
                dit_s += chunk.timing.dit_s
                decode_s += chunk.timing.decode_s
                elapsed = time.perf_counter() - start
                bar.update(chunk.frames.shape[0])
                while pending and pending[0][0] <= written < total:
                    asked, prompt = pending.pop(0)
                    stream.set_prompt(prompt, transition=transition, chunks=blend_chunks)
                    log.info("frame %d%s: %s %r", written, f" (asked {asked})" if asked != written else "",
                             transition, prompt)
                bar.set_postfix_str(f"{written / elapsed:.1f} FPS, {written / elapsed / gen.fps:.2f}x real time")
    except KeyboardInterrupt as exc:
        with signals.held():
            writer.close()
        what = "terminated" if getattr(exc, "signum", signal.SIGINT) == signal.SIGTERM else "interrupted"
        if writer.frames_written:
            log.warning("%s: %s holds the %d frames written so far", what, output, writer.frames_written)
        else:
            log.warning("%s before the first chunk: no video written", what)
        raise
    with signals.held():
        writer.close()
    elapsed = time.perf_counter() - start
    log.info("wrote %d frames (%.2f s at %d fps, %dx%d) to %s in %.1f s: %.1f FPS end to end "
             "(DiT %.1f s, VAE decode %.1f s)", written, written / gen.fps, gen.fps, *gen.frame_size[::-1],
             output, elapsed, written / elapsed, dit_s, decode_s)
    return EXIT_OK
