"""Where the object goes in a long stream: its position along the caption's axis, frame by frame,
for one or more models against the rendered clip of the same caption.

    python benchmarks/long_motion.py --models shapes-tiny RUN/model [--labels shipped new] [--frames 333]
        [--prompts "a green circle moving up" ...] [--plot OUT.png] [--json OUT.json]

Per model and caption (seed 0, streamed through the model's rolling window, float32 eager so
that models compare alike) the evaluator's tracked centroid (``shapes_bench.track``), the share
of frames in the half of the frame away from the caption's border (``far_half_share``: about
0.5 when the object bounces between the borders, near 0 when it turns back before the far one)
and the number of times it crosses the frame's middle. The rendered clip (``make_clip`` with the
caption pinned) is the reference row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.data.shapes import ShapesConfig, make_clip, parse_caption  # noqa: E402
from training.eval import shapes_bench  # noqa: E402
from training.eval.shapes_bench import track  # noqa: E402

DEFAULT_PROMPTS = ["a green circle moving up", "a red square moving left", "a yellow triangle moving left"]


def axis_position(centroids: np.ndarray, caption: str) -> np.ndarray:
    """Position along the caption's axis, 0 at the caption's border, 1 at the far one (NaN where
    no object): the evaluator's, for a caption."""
    return shapes_bench.axis_position(centroids, parse_caption(caption).direction)


def summarise(position: np.ndarray) -> dict[str, float | int]:
    seen = position[~np.isnan(position)]
    side = seen > 0.5
    return {"far_half_share": round(float(side.mean()), 4) if seen.size else float("nan"),
            "middle_crossings": int(np.count_nonzero(side[1:] != side[:-1]))}


def positions(model: str, captions: list[str], frames: int) -> dict[str, np.ndarray]:
    """The model loaded once, each caption streamed (seed 0) and tracked."""
    os.environ.setdefault("SF_SDK_AUTO_BUILD", "never")
    from sf_sdk import StreamingGenerator

    gen = StreamingGenerator.from_pretrained(model, dtype="float32", backend="eager")
    return {c: axis_position(track(gen.generate(c, num_frames=frames, seed=0).frames), c) for c in captions}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", required=True, help="model names or folders")
    p.add_argument("--labels", nargs="+", help="a name per model for the table and the plot (default: the models)")
    p.add_argument("--frames", type=int, default=333)
    p.add_argument("--prompts", nargs="+", default=DEFAULT_PROMPTS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot", type=Path, help="write the positions here (PNG, one panel per caption)")
    p.add_argument("--json", type=Path, help="write the summaries here")
    args = p.parse_args(argv)
    for caption in args.prompts:
        parse_caption(caption)  # a bad caption fails before any model loads
    labels = args.labels or args.models
    if len(labels) != len(args.models) or len(set(labels) | {"rendered clip"}) != len(labels) + 1:
        p.error(f"--labels needs one distinct name per model ({len(args.models)}), none 'rendered clip'; "
                f"got {labels}")
    import torch

    torch.set_num_threads(args.threads)
    rows: dict[str, dict[str, np.ndarray]] = {"rendered clip": {}}
    for i, caption in enumerate(args.prompts):
        clip = make_clip(0, i, ShapesConfig(num_frames=args.frames), caption=caption)
        rows["rendered clip"][caption] = axis_position(track(clip.frames), caption)
    for label, model in zip(labels, args.models):
        rows[label] = positions(model, args.prompts, args.frames)
    summary = {name: {c: summarise(pos) for c, pos in per.items()} for name, per in rows.items()}
    for name, per in summary.items():
        far = np.mean([v["far_half_share"] for v in per.values()])
        cross = np.mean([v["middle_crossings"] for v in per.values()])
        print(f"{name:<40} far-half share {far:.3f}  middle crossings {cross:.1f}  ({args.frames} frames, "
              f"{len(per)} captions)")
    if args.json:
        args.json.write_text(json.dumps({"frames": args.frames, "summary": summary}, indent=2))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(args.prompts), 1, figsize=(8, 2.2 * len(args.prompts)), squeeze=False)
        for ax, caption in zip(axes[:, 0], args.prompts):
            for name, per in rows.items():
                ax.plot(per[caption], label=name, linewidth=1.2 if name == "rendered clip" else 1.0,
                        color="0.6" if name == "rendered clip" else None)
            ax.axhline(0.5, color="0.8", linewidth=0.8)
            ax.set_ylim(0, 1)
            ax.set_title(caption, fontsize=9)
            ax.set_ylabel("0: caption's border", fontsize=8)
        axes[-1, 0].set_xlabel("frame")
        axes[0, 0].legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
