"""Score generated videos of the synthetic shapes domain against their captions.

:func:`score_video` takes uint8 frames ``[T, H, W, 3]`` and a caption
``"a {colour} {shape} moving {direction}"`` and runs seven checks, each a score in ``[0, 1]``:

==============  ===================================================================================
presence        fraction of frames holding an object whose extent is plausible for the domain
single_object   per frame, the share of foreground brightness in the object's blob (ramp; 0 in frames
                without a plausible object), averaged
background      per frame, few bright pixels and a dark mean level away from the object, averaged
colour          fraction of frames whose object hue classifies as the caption's colour
shape           fraction of frames whose object classifies as the caption's shape
direction       centroid velocity over the first ``straight_frames`` frames: speed along the stated
                direction and its alignment (ramps, multiplied)
stability       size consistency (coefficient of variation of the object's mass) times colour
                consistency (share of frames with the modal colour)
==============  ===================================================================================

The video's ``score`` is the **product** of the seven checks: a video counts only when it shows
one object of the right colour and shape, moving the right way, steadily, on a clean background.
A wrong colour or direction therefore drops the score to about 0, and so do blank and noise
videos; ``mean_check`` (the plain mean of the checks) is reported beside it to show partial
progress of a model that is not there yet.

Per-frame measurements (robust to blur, a dim or slightly grey background and colour drift):
the brightness ``v`` of a pixel is its largest channel; blobs are 8-connected components of
``v >= fg_threshold``; the object is the blob with the most brightness. Inside a window around it
the background level is subtracted and ``v`` is normalised by the object's peak, giving a soft
coverage ``c``. From ``c``: mass (sum), extents (sum of the row / column maxima: the blurred
width of a solid shape integrates to its true width), centroid, fill ratio
``mass / (extent_x * extent_y)`` (circle pi/4, square 1, triangle 1/2) and asymmetry (how far the
mass centroid sits from the extent centre, x6 so that a triangle scores ~1 along its axis). The
shape is a triangle when the asymmetry is large, else a square or a circle by fill ratio; the
colour is the nearest of the six hues to the chroma-weighted circular mean hue of the object's
core pixels (None, a miss, when the core is grey or white).

CLI::

    python -m training.eval.shapes_bench --model NAME_OR_PATH --json [--frames N] [--seeds K]
        [--prompts "a red circle moving left" ...] [--out-dir DIR] [--save-png] [--jobs J --threads T]
    python -m training.eval.shapes_bench --calibrate --json
    python -m training.eval.shapes_bench --teacher RUN_DIR [--config-name shapes_tiny] --json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import re
import struct
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from training.data.shapes import (
    COLOURS,
    DIRECTIONS,
    ShapesConfig,
    all_captions,
    make_clip,
    parse_caption,
)

__all__ = [
    "BenchConfig",
    "CHECKS",
    "VideoScore",
    "score_video",
    "as_uint8_frames",
    "run_benchmark",
    "run_benchmark_parallel",
    "calibrate",
    "contact_sheet",
    "write_png",
    "main",
]

log = logging.getLogger(__name__)

CHECKS: tuple[str, ...] = ("presence", "single_object", "background", "colour", "shape", "direction",
                           "stability")



# --------------------------------------------------------------------------------------------
# Config and result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    """Thresholds of the checks. Brightness values are fractions of 255; ``(a, b)`` ramps map
    ``a`` to 0 and ``b`` to 1 (or the reverse for "at most" ramps), linearly in between."""

    domain: ShapesConfig = field(default_factory=ShapesConfig)
    fg_threshold: float = 0.25  # a pixel belongs to a blob when its largest channel is above this
    core_threshold: float = 0.5  # coverage above which a pixel is object core (read for colour)
    peak_percentile: float = 90.0  # object peak brightness, for the coverage normalisation
    window_margin: int = 3  # px around the object's blob where its blur tails are measured
    # Plausible object extent, relative to the domain's size range.
    extent_slack_low: float = 0.6
    extent_slack_high: float = 1.5
    single_ramp: tuple[float, float] = (0.8, 0.95)  # share of the frame's brightness in the object
    bg_bright_level: float = 0.2  # a background pixel brighter than this is "bright"
    bg_bright_ramp: tuple[float, float] = (0.05, 0.01)  # share of bright background pixels (at most)
    bg_level_ramp: tuple[float, float] = (0.2, 0.08)  # mean background brightness (at most)
    min_saturation: float = 0.35  # chroma / brightness below this is "no colour" (grey / white)
    # Shape classifier. Asymmetry: triangle ~0.95 (~0.6 under a sigma 1.5 px blur), circle and
    # square ~0. Fill ratio: circle pi/4 (~0.84 blurred), square 1: split half-way.
    triangle_min_asym: float = 0.4
    square_min_fill: float = (math.pi / 4 + 1.0) / 2
    speed_ramp: tuple[float, float] = (0.25, 0.5)  # px per frame along the stated direction
    alignment_ramp: tuple[float, float] = (0.7, 0.9)  # cosine between velocity and direction
    size_cv_ramp: tuple[float, float] = (0.3, 0.12)  # coefficient of variation of the mass (at most)

    def __post_init__(self) -> None:
        if not 0 < self.fg_threshold < self.core_threshold < 1:
            raise ValueError(f"need 0 < fg_threshold < core_threshold < 1, got {self.fg_threshold} "
                             f"and {self.core_threshold}")
        for name in ("single_ramp", "bg_bright_ramp", "bg_level_ramp", "speed_ramp", "alignment_ramp",
                     "size_cv_ramp"):
            low, high = getattr(self, name)
            if low == high:
                raise ValueError(f"{name} needs two different end points, got {(low, high)}")


@dataclass(frozen=True)
class VideoScore:
    """``score`` = product of ``checks``; ``details`` holds what was measured (JSON-ready)."""

    score: float
    checks: dict[str, float]
    details: dict[str, Any]

    @property
    def mean_check(self) -> float:
        return float(np.mean(list(self.checks.values())))


@dataclass(frozen=True)
class _Frame:
    """What one frame shows. ``present`` is False when no plausible object was found."""

    present: bool
    single: float  # single-object check for this frame (0 without a plausible object)
    background: float  # background check for this frame
    mass: float = 0.0
    centroid: tuple[float, float] = (0.0, 0.0)  # (x, y), px
    extent: tuple[float, float] = (0.0, 0.0)  # (x, y), px
    shape: str | None = None
    colour: str | None = None


def _ramp(value: float, ends: tuple[float, float]) -> float:
    """0 at ends[0], 1 at ends[1], linear in between and clamped (works in both directions)."""
    a, b = ends
    return float(np.clip((value - a) / (b - a), 0.0, 1.0))


# --------------------------------------------------------------------------------------------
# Per-frame measurements
# --------------------------------------------------------------------------------------------


# Neighbour offsets (dy, dx) that pair every 8-connected pixel pair exactly once.
_HALF_NEIGHBOURHOOD: tuple[tuple[int, int], ...] = ((0, 1), (1, 0), (1, 1), (1, -1))


def _label_components(mask: np.ndarray) -> np.ndarray:
    """8-connected components of each frame of a bool [T, H, W] mask.

    Returns int64 [T, H, W]: -1 off the mask, else the smallest flat index of the component
    (unique across frames). Vectorised union-find: every round hooks the larger root of each
    edge whose ends disagree onto the smaller one, then compresses paths to the roots; a handful
    of rounds suffice even for noise.
    """
    t, h, w = mask.shape
    index = np.arange(mask.size, dtype=np.int64).reshape(t, h, w)
    starts, ends = [], []
    for dy, dx in _HALF_NEIGHBOURHOOD:
        a = (slice(None), slice(0, h - dy), slice(max(-dx, 0), w - max(dx, 0)))
        b = (slice(None), slice(dy, h), slice(max(dx, 0), w - max(-dx, 0)))
        both = mask[a] & mask[b]
        starts.append(index[a][both])
        ends.append(index[b][both])
    a, b = np.concatenate(starts), np.concatenate(ends)  # [E] pixel pairs, both on
    parent = np.arange(mask.size, dtype=np.int64)  # [T*H*W], parent <= self: always a root's index
    while True:
        root_a, root_b = parent[a], parent[b]
        differ = root_a != root_b
        if not differ.any():
            break
        a, b, root_a, root_b = a[differ], b[differ], root_a[differ], root_b[differ]
        np.minimum.at(parent, np.maximum(root_a, root_b), np.minimum(root_a, root_b))
        while True:  # path compression: point every pixel at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return np.where(mask, parent.reshape(t, h, w), -1)


def _quantile(values: np.ndarray, q: float) -> float:
    """The ``q`` quantile (nearest rank) of a 1-D array; cheaper than np.percentile per call."""
    k = min(int(round(q * (values.size - 1))), values.size - 1)
    return float(np.partition(values, k)[k])


def _hue_degrees(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue in degrees and chroma (max - min) of float RGB [N, 3] in [0, 1]."""
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    top, bottom = rgb.max(axis=1), rgb.min(axis=1)
    chroma = top - bottom
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(top == r, ((g - b) / safe) % 6,
                   np.where(top == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60.0
    return hue, chroma


# Hue (degrees) of each domain colour; the classifier picks the nearest.
_COLOUR_HUES: dict[str, float] = {
    name: float(_hue_degrees(np.asarray([rgb], dtype=np.float64) / 255.0)[0][0]) for name, rgb in COLOURS.items()
}


def _classify_colour(rgb: np.ndarray, cfg: BenchConfig) -> str | None:
    """Nearest of the six hues to the chroma-weighted circular mean hue; None if unsaturated."""
    hue, chroma = _hue_degrees(rgb)
    brightness = rgb.max(axis=1)
    if chroma.sum() <= 0 or float(np.mean(chroma / np.maximum(brightness, 1e-6))) < cfg.min_saturation:
        return None
    angle = np.deg2rad(hue)
    mean = math.degrees(math.atan2(float(np.sum(chroma * np.sin(angle))),
                                   float(np.sum(chroma * np.cos(angle))))) % 360.0
    return min(_COLOUR_HUES, key=lambda c: abs((mean - _COLOUR_HUES[c] + 180.0) % 360.0 - 180.0))


def _classify_shape(fill: float, asym: float, cfg: BenchConfig) -> str:
    """Triangle when lopsided, else square or circle by fill ratio (see :class:`BenchConfig`)."""
    if asym >= cfg.triangle_min_asym:
        return "triangle"
    return "square" if fill >= cfg.square_min_fill else "circle"


def _background_score(value: np.ndarray, away: np.ndarray, cfg: BenchConfig) -> float:
    """Clean-background check on the pixels of ``value`` [H, W] selected by ``away``."""
    if not away.any():
        return 0.0
    bg = value[away]
    bright = float(np.mean(bg > cfg.bg_bright_level))
    return min(_ramp(bright, cfg.bg_bright_ramp), _ramp(float(bg.mean()), cfg.bg_level_ramp))


def _measure_frame(rgb: np.ndarray, value: np.ndarray, labels: np.ndarray, cfg: BenchConfig) -> _Frame:
    """rgb float [H, W, 3] and value (largest channel) [H, W] in [0, 1]; labels [H, W]."""
    h, w = value.shape
    on = labels >= 0
    if not on.any():
        return _Frame(present=False, single=0.0, background=_background_score(value, ~on, cfg))
    ids, inverse = np.unique(labels[on], return_inverse=True)
    blob_mass = np.bincount(inverse, weights=value[on])
    blob = labels == ids[int(np.argmax(blob_mass))]
    single = _ramp(float(blob_mass.max() / blob_mass.sum()), cfg.single_ramp)

    # A window around the blob holds its blur tails; the level outside it is the background.
    rows, cols = np.nonzero(blob)
    m = cfg.window_margin
    y0, y1 = max(rows.min() - m, 0), min(rows.max() + m + 1, h)
    x0, x1 = max(cols.min() - m, 0), min(cols.max() + m + 1, w)
    window = np.zeros_like(blob)
    window[y0:y1, x0:x1] = True
    background = _background_score(value, ~window, cfg)
    bg_level = _quantile(value[~window], 0.5) if (~window).any() else 0.0
    peak = _quantile(value[blob], cfg.peak_percentile / 100.0)
    if peak <= bg_level:
        return _Frame(present=False, single=0.0, background=background)

    # Soft coverage in the window, other blobs masked out.
    cover = np.clip((value[y0:y1, x0:x1] - bg_level) / (peak - bg_level), 0.0, 1.0)  # [h', w']
    cover = np.where(on[y0:y1, x0:x1] & ~blob[y0:y1, x0:x1], 0.0, cover)
    mass = float(cover.sum())
    col_profile, row_profile = cover.max(axis=0), cover.max(axis=1)  # [w'], [h']
    extent_x, extent_y = float(col_profile.sum()), float(row_profile.sum())
    low = cfg.domain.min_size * cfg.extent_slack_low
    high = cfg.domain.max_size * cfg.extent_slack_high
    if mass <= 0 or not (low <= extent_x <= high and low <= extent_y <= high):
        return _Frame(present=False, single=0.0, background=background)

    xs = np.arange(x0, x1, dtype=np.float64) + 0.5
    ys = np.arange(y0, y1, dtype=np.float64) + 0.5
    cx = float((cover.sum(axis=0) * xs).sum() / mass)
    cy = float((cover.sum(axis=1) * ys).sum() / mass)
    mid_x = float((col_profile * xs).sum() / extent_x)
    mid_y = float((row_profile * ys).sum() / extent_y)
    # A solid triangle's centroid sits 1/6 of its height from the middle of its extent.
    asym = 6.0 * max(abs(cx - mid_x) / extent_x, abs(cy - mid_y) / extent_y)
    fill = mass / (extent_x * extent_y)

    core = cover >= cfg.core_threshold
    colour = _classify_colour(rgb[y0:y1, x0:x1][core], cfg) if core.any() else None
    return _Frame(present=True, single=single, background=background, mass=mass, centroid=(cx, cy),
                  extent=(extent_x, extent_y), shape=_classify_shape(fill, asym, cfg), colour=colour)


# --------------------------------------------------------------------------------------------
# Video score
# --------------------------------------------------------------------------------------------


def as_uint8_frames(frames: Any) -> np.ndarray:
    """numpy or torch uint8 [T, H, W, 3] -> numpy (ValueError on anything else)."""
    if hasattr(frames, "detach"):  # a torch tensor
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got dtype {frames.dtype}: convert "
                         f"[-1, 1] floats with ((x + 1) * 127.5).round().clip(0, 255).astype(uint8)")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be [T, H, W, 3] with T >= 1, got shape {tuple(frames.shape)}")
    return frames


def _direction_score(frames: list[_Frame], direction: str, cfg: BenchConfig
                     ) -> tuple[float, list[float] | None]:
    window = frames[:cfg.domain.straight_frames]
    points = [(t, f.centroid) for t, f in enumerate(window) if f.present]
    if len(points) < 2:
        return 0.0, None
    t = np.array([p[0] for p in points], dtype=np.float64)
    xy = np.array([p[1] for p in points], dtype=np.float64)  # [n, 2]
    t_centered = t - t.mean()
    velocity = (t_centered[:, None] * (xy - xy.mean(axis=0))).sum(axis=0) / (t_centered ** 2).sum()  # [2]
    unit = np.asarray(DIRECTIONS[direction], dtype=np.float64)
    along = float(velocity @ unit)
    norm = float(np.linalg.norm(velocity))
    alignment = along / norm if norm > 0 else 0.0
    score = _ramp(along, cfg.speed_ramp) * _ramp(alignment, cfg.alignment_ramp)
    return score, [round(float(v), 4) for v in velocity]


def score_video(frames: Any, caption: str, cfg: BenchConfig | None = None) -> VideoScore:
    """Score uint8 frames [T, H, W, 3] (numpy or torch) against a shapes caption."""
    cfg = cfg or BenchConfig()
    prompt = parse_caption(caption)
    video = as_uint8_frames(frames)
    if video.shape[1:3] != (cfg.domain.height, cfg.domain.width):
        raise ValueError(f"the shapes benchmark scores {cfg.domain.height}x{cfg.domain.width} videos, got "
                         f"{video.shape[1]}x{video.shape[2]}: generate at the domain's size")
    rgb = video.astype(np.float64) / 255.0  # [T, H, W, 3]
    value = rgb.max(axis=-1)  # [T, H, W]
    labels = _label_components(value >= cfg.fg_threshold)
    per_frame = [_measure_frame(rgb[t], value[t], labels[t], cfg) for t in range(video.shape[0])]
    present = [f for f in per_frame if f.present]
    num = len(per_frame)

    direction, velocity = _direction_score(per_frame, prompt.direction, cfg)
    colours = Counter(f.colour for f in present)
    shapes = Counter(f.shape for f in present)
    if len(present) >= 2:
        masses = np.array([f.mass for f in present])
        size_score = _ramp(float(masses.std() / masses.mean()), cfg.size_cv_ramp)
        colour_consistency = colours.most_common(1)[0][1] / len(present)
        stability = size_score * colour_consistency
    else:
        stability = 0.0
    checks = {
        "presence": len(present) / num,
        "single_object": float(np.mean([f.single for f in per_frame])),
        "background": float(np.mean([f.background for f in per_frame])),
        "colour": sum(f.colour == prompt.colour for f in present) / num,
        "shape": sum(f.shape == prompt.shape for f in present) / num,
        "direction": direction,
        "stability": float(stability),
    }
    details = {
        "frames": num,
        "frames_present": len(present),
        "colour": colours.most_common(1)[0][0] if present else None,
        "shape": shapes.most_common(1)[0][0] if present else None,
        "velocity": velocity,
        "mean_extent": ([round(float(np.mean([f.extent[i] for f in present])), 3) for i in range(2)]
                        if present else None),
    }
    return VideoScore(score=float(np.prod(list(checks.values()))), checks=checks, details=details)


# --------------------------------------------------------------------------------------------
# Benchmark over prompts
# --------------------------------------------------------------------------------------------

GenerateFn = Callable[[str, int, int], Any]  # (prompt, num_frames, seed) -> uint8 [T, H, W, 3]


def _summarise(scores: dict[str, list[VideoScore]]) -> dict[str, Any]:
    every = [s for per in scores.values() for s in per]
    return {
        "mean_score": float(np.mean([s.score for s in every])),
        "mean_check": float(np.mean([s.mean_check for s in every])),
        "checks": {c: float(np.mean([s.checks[c] for s in every])) for c in CHECKS},
        "num_videos": len(every),
    }


def run_benchmark(generate: GenerateFn, prompts: Sequence[str], *, num_frames: int, seeds: Sequence[int],
                  cfg: BenchConfig | None = None, out_dir: Path | None = None, fps: int | None = None,
                  save_png: bool = False) -> dict[str, Any]:
    """Generate one video per (prompt, seed), score it, and aggregate.

    Returns ``{"mean_score", "mean_check", "checks", "num_videos", "per_prompt"}``; per prompt the
    mean score, per-check means and each seed's score and details. With ``out_dir`` every video is
    written as MP4 (and a PNG contact sheet with ``save_png``).
    """
    cfg = cfg or BenchConfig()
    _prepare(prompts, out_dir)
    results = {(prompt, seed): _score_one(generate, prompt, seed, num_frames, cfg, out_dir, fps, save_png)
               for prompt in prompts for seed in seeds}
    return _collect(prompts, seeds, results)


def run_benchmark_parallel(make_generate: Callable[[], GenerateFn], prompts: Sequence[str], *, jobs: int,
                           threads: int, num_frames: int, seeds: Sequence[int], cfg: BenchConfig | None = None,
                           out_dir: Path | None = None, fps: int | None = None,
                           save_png: bool = False) -> dict[str, Any]:
    """:func:`run_benchmark` over ``jobs`` worker processes of ``threads`` torch threads each.

    ``make_generate`` must pickle (a module-level function or a ``functools.partial`` of one): each
    worker calls it once to load its own model. Every video depends only on its prompt and seed,
    so the result is the serial one (up to float summation order when the thread count differs).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if jobs < 1 or threads < 1:
        raise ValueError(f"jobs and threads must be at least 1, got jobs={jobs}, threads={threads}")
    cfg = cfg or BenchConfig()
    _prepare(prompts, out_dir)
    tasks = [(prompt, seed, num_frames, cfg, out_dir, fps, save_png) for prompt in prompts for seed in seeds]
    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(make_generate, threads)) as pool:
        scores = list(pool.map(_worker_task, tasks))
    return _collect(prompts, seeds, {(task[0], task[1]): score for task, score in zip(tasks, scores)})


def _prepare(prompts: Sequence[str], out_dir: Path | None) -> None:
    for prompt in prompts:
        parse_caption(prompt)  # fail before generating anything
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)


def _score_one(generate: GenerateFn, prompt: str, seed: int, num_frames: int, cfg: BenchConfig,
               out_dir: Path | None, fps: int | None, save_png: bool) -> VideoScore:
    frames = as_uint8_frames(generate(prompt, num_frames, seed))
    result = score_video(frames, prompt, cfg)
    log.info("%-40s seed %d score %.3f", prompt, seed, result.score)
    if out_dir is not None:
        stem = f"{_slug(prompt)}_s{seed}"
        from sf_sdk.video import Mp4Writer  # lazy: only needed when saving

        with Mp4Writer(out_dir / f"{stem}.mp4", fps=fps or cfg.domain.fps) as writer:
            writer.write(frames)
        if save_png:
            write_png(out_dir / f"{stem}.png", contact_sheet(frames))
    return result


def _collect(prompts: Sequence[str], seeds: Sequence[int],
             results: dict[tuple[str, int], VideoScore]) -> dict[str, Any]:
    scores = {prompt: [results[(prompt, seed)] for seed in seeds] for prompt in prompts}
    per_prompt = {
        prompt: {
            "score": float(np.mean([s.score for s in per])),
            "checks": {c: float(np.mean([s.checks[c] for s in per])) for c in CHECKS},
            "seeds": [{"seed": seed, "score": s.score, "details": s.details} for seed, s in zip(seeds, per)],
        }
        for prompt, per in scores.items()
    }
    return {**_summarise(scores), "per_prompt": per_prompt}


_worker_generate: GenerateFn | None = None  # the model of this worker process (run_benchmark_parallel)


def _init_worker(make_generate: Callable[[], GenerateFn], threads: int) -> None:
    import torch

    global _worker_generate
    torch.set_num_threads(threads)
    _worker_generate = make_generate()


def _worker_task(task: tuple[Any, ...]) -> VideoScore:
    assert _worker_generate is not None, "_init_worker did not run in this process"
    return _score_one(_worker_generate, *task)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def calibrate(cfg: BenchConfig | None = None, *, clips_per_caption: int = 1, seed: int = 0,
              num_frames: int | None = None) -> dict[str, Any]:
    """The evaluator's figures on known inputs, no model needed.

    ``real``: Part-A clips, ``clips_per_caption`` of each of the 72 captions; ``wrong_colour`` /
    ``wrong_direction``: the same clips scored against a caption with another colour / the
    opposite direction; ``noise``: uniform noise; ``blank``: black videos.
    """
    cfg = cfg or BenchConfig()
    domain = cfg.domain if num_frames is None else ShapesConfig(**{**asdict(cfg.domain),
                                                                    "num_frames": num_frames})
    rng = np.random.default_rng(seed)
    colour_names, opposite = list(COLOURS), {"left": "right", "right": "left", "up": "down", "down": "up"}
    groups: dict[str, list[VideoScore]] = {"real": [], "wrong_colour": [], "wrong_direction": [],
                                           "noise": [], "blank": []}
    shape = (domain.num_frames, domain.height, domain.width, 3)
    index = 0
    for caption in all_captions():
        prompt = parse_caption(caption)
        for _ in range(clips_per_caption):
            clip = make_clip(seed, index, domain, caption=caption)
            index += 1
            groups["real"].append(score_video(clip.frames, caption, cfg))
            other = colour_names[(colour_names.index(prompt.colour) + 1) % len(colour_names)]
            groups["wrong_colour"].append(score_video(clip.frames, caption.replace(prompt.colour, other), cfg))
            flipped = f"a {prompt.colour} {prompt.shape} moving {opposite[prompt.direction]}"
            groups["wrong_direction"].append(score_video(clip.frames, flipped, cfg))
            groups["noise"].append(score_video(rng.integers(0, 256, shape, dtype=np.uint8), caption, cfg))
            groups["blank"].append(score_video(np.zeros(shape, dtype=np.uint8), caption, cfg))
    out: dict[str, Any] = {}
    for name, results in groups.items():
        values = np.array([r.score for r in results])
        out[name] = {
            "mean_score": float(values.mean()),
            "min_score": float(values.min()),
            "max_score": float(values.max()),
            "checks": {c: float(np.mean([r.checks[c] for r in results])) for c in CHECKS},
            "num_videos": len(results),
        }
    return out


# --------------------------------------------------------------------------------------------
# Contact sheets
# --------------------------------------------------------------------------------------------


def contact_sheet(frames: np.ndarray, num: int = 8, scale: int = 2, gap: int = 2) -> np.ndarray:
    """``num`` evenly spaced frames side by side, upscaled ``scale`` x, grey gaps: uint8 [H', W', 3]."""
    video = as_uint8_frames(frames)
    picks = np.unique(np.linspace(0, video.shape[0] - 1, min(num, video.shape[0])).round().astype(int))
    tiles = [video[i].repeat(scale, axis=0).repeat(scale, axis=1) for i in picks]  # [sH, sW, 3] each
    separator = np.full((tiles[0].shape[0], gap, 3), 128, dtype=np.uint8)
    row: list[np.ndarray] = []
    for tile in tiles:
        row += [tile, separator]
    return np.concatenate(row[:-1], axis=1)  # [sH, n*sW + (n-1)*gap, 3]


def write_png(path: Path, image: np.ndarray) -> None:
    """Write uint8 RGB [H, W, 3] as a PNG (no imaging library needed)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"write_png needs uint8 [H, W, 3], got {image.dtype} {tuple(image.shape)}")
    height, width = image.shape[:2]
    raw = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, width * 3)], axis=1)  # filter 0

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                           + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b""))


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _sdk_generate(model: str, device: str) -> GenerateFn:
    from sf_sdk import StreamingGenerator  # lazy: the evaluator itself does not need the SDK

    generator = StreamingGenerator.from_pretrained(model, device=device)

    def generate(prompt: str, num_frames: int, seed: int) -> Any:
        frames = generator.generate(prompt, num_frames=num_frames, seed=seed).frames
        if frames is None:
            raise ValueError(f"model {model!r} returned no decoded frames (it has no VAE?): the benchmark "
                             f"scores pixels")
        return frames

    return generate


def _vae_roundtrip(model: str, device: str) -> GenerateFn:
    """Real clips of each caption through the model's VAE (encode, decode): the ceiling that
    no generator decoding with this VAE can pass."""
    import torch

    from sf_sdk import StreamingGenerator
    from training.data.shapes import frames_to_tensor, tensor_to_frames

    vae = StreamingGenerator.from_pretrained(model, device=device).vae
    if vae is None:
        raise ValueError(f"model {model!r} has no VAE: --reconstruct needs one")
    domain = BenchConfig().domain

    def generate(prompt: str, num_frames: int, seed: int) -> Any:
        cfg = replace(domain, num_frames=num_frames)
        index = all_captions().index(prompt)
        clip = make_clip(seed, index, cfg, caption=prompt)
        video = frames_to_tensor(clip.frames)[None].to(device=device, dtype=vae.dtype)  # [1, 3, T, H, W]
        with torch.no_grad():
            recon = vae.decode(vae.normalize(vae.encode(video)))
        return tensor_to_frames(recon[0].float().cpu())

    return generate


def _teacher_generate(run_dir: Path, config_name: str, device: str, steps: int, guidance: float) -> GenerateFn:
    """Videos from a training run's teacher (Euler ODE with classifier-free guidance over the whole
    clip at once, as the ``teacher`` stage samples), decoded by the run's VAE (its ``vae_decoder``
    stage when done): the quality the students of that run are distilled from."""
    import torch

    from training.data.shapes import tensor_to_frames
    from training.stages.common import prompt_table
    from training.stages.teacher import load_teacher, sample_teacher
    from training.stages.vae import finished_vae_dir, load_vae_dir
    from training.train import compose

    cfg = compose(config_name, [f"run_dir={run_dir}"])
    dev = torch.device(device)
    teacher = load_teacher(cfg, dev)
    prompts = prompt_table(cfg, dev)
    vae_dir = finished_vae_dir(run_dir)
    if vae_dir is None:
        raise ValueError(f"{run_dir} has no finished vae or vae_decoder stage to decode with")
    vae = load_vae_dir(vae_dir, dev)
    stride = vae.config.temporal_stride

    def generate(prompt: str, num_frames: int, seed: int) -> Any:
        if (num_frames - 1) % stride:
            raise ValueError(f"--frames must be 1 + {stride}k for the teacher, got {num_frames}")
        x0 = sample_teacher(teacher, cfg, prompts, [prompt], 1 + (num_frames - 1) // stride,
                            torch.Generator().manual_seed(seed), steps=steps, guidance=guidance)
        with torch.no_grad():
            video = vae.decode(x0.transpose(1, 2).to(vae.dtype))  # [1, 3, T, H, W]
        return tensor_to_frames(video[0].float().cpu())

    return generate


def _print_table(result: dict[str, Any]) -> None:
    lines = [f"mean score {result['mean_score']:.4f}  (mean check {result['mean_check']:.4f}, "
             f"{result['num_videos']} videos)"]
    lines += [f"  {name:<14} {value:.4f}" for name, value in result["checks"].items()]
    for prompt, entry in result.get("per_prompt", {}).items():
        lines.append(f"  {entry['score']:.3f}  {prompt}")
    sys.stdout.write("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.eval.shapes_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model name or checkpoint path for StreamingGenerator.from_pretrained")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=int, default=ShapesConfig.num_frames, help="frames per video")
    parser.add_argument("--seeds", type=int, default=1, help="videos per prompt (seeds seed_base..)")
    parser.add_argument("--seed-base", type=int, default=0)
    parser.add_argument("--prompts", nargs="+", help="a subset of the 72 captions (default: all)")
    parser.add_argument("--out-dir", type=Path, help="write MP4s and results.json here")
    parser.add_argument("--save-png", action="store_true", help="also write a contact sheet per video")
    parser.add_argument("--calibrate", action="store_true",
                        help="score real clips, noise and blank videos (no model)")
    parser.add_argument("--reconstruct", action="store_true",
                        help="score real clips passed through the model's VAE instead of generated "
                             "videos (the ceiling the VAE sets for any generator)")
    parser.add_argument("--teacher", type=Path, metavar="RUN_DIR",
                        help="score the teacher of a training run instead of a model (its Euler ODE "
                             "with guidance; see --config-name, --teacher-steps, --guidance)")
    parser.add_argument("--config-name", default="shapes_tiny",
                        help="the training config the --teacher run was made with")
    parser.add_argument("--teacher-steps", type=int, default=24, help="Euler steps of the --teacher ODE")
    parser.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance of --teacher")
    parser.add_argument("--jobs", type=int, default=1,
                        help="worker processes generating videos side by side, each loading the model "
                             "(default 1: in this process)")
    parser.add_argument("--threads", type=int,
                        help="torch threads per process generating (default: torch's own with --jobs 1, "
                             "else its share of them)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    if args.seeds <= 0 or args.frames <= 0:
        parser.error("--seeds and --frames must be positive")
    if args.save_png and args.out_dir is None:
        parser.error("--save-png needs --out-dir")
    if args.jobs < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--jobs and --threads must be at least 1")
    cfg = BenchConfig()
    started = time.perf_counter()
    config: dict[str, Any] = {"frames": args.frames, "bench": asdict(cfg),
                              "python": platform.python_version(), "numpy": np.__version__}
    if args.calibrate:
        result: dict[str, Any] = {"calibration": calibrate(cfg, num_frames=args.frames)}
        if not args.json:
            for name, entry in result["calibration"].items():
                sys.stdout.write(f"{name:<16} mean {entry['mean_score']:.4f}  min {entry['min_score']:.4f}  "
                                 f"max {entry['max_score']:.4f}\n")
    else:
        if args.teacher is not None:
            if args.model or args.reconstruct:
                parser.error("--teacher scores a run's teacher: drop --model and --reconstruct")
            if args.teacher_steps <= 0:
                parser.error("--teacher-steps must be positive")
            source = {"teacher": str(args.teacher), "config_name": args.config_name,
                      "teacher_steps": args.teacher_steps, "guidance": args.guidance}
            make_generate = partial(_teacher_generate, args.teacher, args.config_name, args.device,
                                    args.teacher_steps, args.guidance)
        else:
            if not args.model:
                parser.error("--model is required (or use --calibrate or --teacher)")
            source = {"model": args.model, "reconstruct": args.reconstruct}
            make_generate = partial(_vae_roundtrip if args.reconstruct else _sdk_generate, args.model, args.device)
        import torch

        prompts = args.prompts or all_captions()
        seeds = list(range(args.seed_base, args.seed_base + args.seeds))
        threads = args.threads or max(1, torch.get_num_threads() // args.jobs)
        config.update(source, device=args.device, seeds=seeds, num_prompts=len(prompts), jobs=args.jobs,
                      threads=threads)
        if args.jobs == 1:
            from sf_sdk.generator import cpu_threads

            with cpu_threads(threads):
                result = run_benchmark(make_generate(), prompts, num_frames=args.frames, seeds=seeds, cfg=cfg,
                                       out_dir=args.out_dir, save_png=args.save_png)
        else:
            result = run_benchmark_parallel(make_generate, prompts, jobs=args.jobs, threads=threads,
                                            num_frames=args.frames, seeds=seeds, cfg=cfg, out_dir=args.out_dir,
                                            save_png=args.save_png)
        if not args.json:
            _print_table(result)
    config["elapsed_s"] = round(time.perf_counter() - started, 3)
    result["config"] = config
    text = json.dumps(result, indent=2)
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "results.json").write_text(text)
    if args.json:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
