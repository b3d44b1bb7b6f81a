"""Image-to-video on a shapes model (the bundled shapes-tiny, or a fine-tune), scored by the shapes evaluator.

For each caption of a sample of the shapes domain, the first frame of a rendered clip of that
caption is the conditioning image; the model continues it under the same caption, and the
strict evaluator (``training.eval.shapes_bench.score_video``) scores the video against it:

* ``t2v``: text only, in the model's own chunk layout (shapes-tiny: chunks of 3), the reference;
* ``i2v_first_alone``: the image as frame 0 alone, then chunks of 3 (``independent_first_frame``);
* ``i2v_framewise``: the image as frame 0, then one frame per chunk.

shapes-tiny was trained text-to-video in chunks of 3, never with an image or another chunk
layout, so for it the two I2V rows measure how far the layout alone carries (a baseline for an I2V
fine-tune). A model fine-tuned with ``self_forcing.image_conditioning`` (docs/training.md) was
exported with ``independent_first_frame=True``: ``i2v_first_alone`` is then its native layout (the
one it was trained in) and ``t2v`` streams its frame 0 denoised alone from text. The JSON names
each mode's chunk layout (``layouts``). Besides the score: ``colour`` / ``shape`` / ``presence``
checks, and ``start_px``, the distance in pixels between the object's centroid in the image and in
the video's second frame (small: the video continues the given object where it is).

    python benchmarks/i2v_shapes.py [--model shapes-tiny] [--captions 24] [--frames 25] [--out i2v_shapes.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sf_sdk import StreamingGenerator  # noqa: E402
from sf_sdk.config import StreamingConfig  # noqa: E402
from sf_sdk.image import fit_image  # noqa: E402
from training.data.shapes import ShapesConfig, all_captions, make_clip  # noqa: E402
from training.eval.shapes_bench import score_video  # noqa: E402

log = logging.getLogger("i2v_shapes")
MODES = {"t2v": None, "i2v_first_alone": {"independent_first_frame": True},
         "i2v_framewise": {"num_frame_per_block": 1}}


def _layout(streaming: StreamingConfig) -> str:
    """A stream's latent frames per chunk, e.g. ``"1, 3, 3, ..."`` (frame 0 alone, then chunks of 3)."""
    c = streaming.num_frame_per_block
    return f"{streaming.first_chunk_frames}, {c}, {c}, ..."


def _centroid(frame: np.ndarray) -> np.ndarray | None:
    mask = frame.max(axis=-1) >= 96  # the domain's objects are bright on a dark background
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shapes-tiny",
                   help="a bundled model name or a model folder (e.g. an image-to-video fine-tune's export)")
    p.add_argument("--captions", type=int, default=24, help="captions sampled evenly from the domain's 72")
    p.add_argument("--frames", type=int, default=25,
                   help="video frames, rounded up to whole chunks per mode (25: 33 for t2v, 25 for the others)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("i2v_shapes.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    captions = all_captions()
    captions = captions[::max(1, len(captions) // args.captions)][:args.captions]
    gens = {m: StreamingGenerator.from_pretrained(args.model, streaming=o, backend="eager")
            for m, o in MODES.items()}
    domain = ShapesConfig()
    size = gens["t2v"].frame_size
    if size != (domain.height, domain.width):
        p.error(f"{args.model} makes {size[0]}x{size[1]} frames; the shapes evaluator scores the domain's "
                f"{domain.height}x{domain.width}: pass a model of the shapes domain at its size")
    rows: dict[str, list[dict]] = {m: [] for m in MODES}
    t0 = time.perf_counter()
    for i, caption in enumerate(captions):
        image = fit_image(make_clip(args.seed, i, caption=caption).frames[0], size).numpy()  # [H, W, 3]
        start = _centroid(image)
        for mode, gen in gens.items():
            video = gen.generate(caption, num_frames=gen.round_up_frames(args.frames), seed=args.seed + i,
                                 image=None if mode == "t2v" else image).frames
            s = score_video(video, caption)
            c1 = _centroid(video[1])
            dist = float(np.linalg.norm(c1 - start)) if c1 is not None and start is not None else None
            rows[mode].append({"caption": caption, "score": s.score, **{k: s.checks[k] for k in
                                                                          ("presence", "colour", "shape")},
                               "start_px": dist})
    summary = {}
    for mode, rs in rows.items():
        dists = [r["start_px"] for r in rs if r["start_px"] is not None]
        summary[mode] = {k: float(np.mean([r[k] for r in rs])) for k in ("score", "presence", "colour", "shape")}
        summary[mode]["start_px_median"] = float(np.median(dists)) if dists else None
        log.info("%-16s score %.3f  presence %.3f  colour %.3f  shape %.3f  start_px (median) %s  (chunks %s)",
                 mode, *(summary[mode][k] for k in ("score", "presence", "colour", "shape")),
                 f"{summary[mode]['start_px_median']:.1f}" if dists else "-", _layout(gens[mode].streaming))
    result = {"benchmark": "i2v_shapes", "model": args.model,
              "frames": {m: g.round_up_frames(args.frames) for m, g in gens.items()},
              "layouts": {m: _layout(g.streaming) for m, g in gens.items()}, "captions": len(captions),
              "seed": args.seed, "device": "cpu", "threads": 1, "torch": torch.__version__,
              "python": platform.python_version(), "wall_s": time.perf_counter() - t0, "summary": summary,
              "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s (%.0f s)", args.out, result["wall_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
