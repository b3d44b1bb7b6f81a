"""Score generated videos of the synthetic shapes domain against their captions.

:func:`score_video` takes uint8 frames ``[T, H, W, 3]`` and a caption
``"a {colour} {shape} moving {direction}"``. By default it is **strict** (``strict=True``): it
runs the ten checks of :data:`CHECKS`, each a score in ``[0, 1]``, most of them the fraction of
frames (or of frame steps) that pass:

==============  ===================================================================================
presence        fraction of frames holding an object whose extent is plausible for the domain
single_object   fraction of frames with that object and no second blob (a fragment, a ghost) of
                ``fragment_min_mass`` px or more
background      per frame, few bright pixels and a dark mean level away from the object, averaged
colour          fraction of frames whose object hue classifies as the caption's colour
shape           fraction of frames whose silhouette is the caption's shape (see below)
sharpness       fraction of frames whose object has crisp edges: the 10%-90% coverage rise is at most
                ``max_edge_width`` px wide (a sharp render: ~0.8 px; a Gaussian blur of sigma s: 2.6 s)
direction       the stated direction at the start: centroid velocity over the first ``straight_frames``
                frames, speed along the direction and alignment (ramps, multiplied)
bounce          over the whole video, of the frame steps in which the object moves, the share going the
                way the domain's bounce rule says: the caption's direction until the object touches the
                border ahead (leading edge within ``max_speed + border_slack`` px of it), then back
speed           over the whole video, fraction of frame steps moving at the domain's speed along the
                axis (``min_speed .. max_speed``, widened by ``speed_slack``); a step that moves less
                than ``stuck_speed`` px stands still and fails (its share is ``stuck_rate``); steps
                touching the border ahead are not timed (a bounce shortens them), and the first of them
                that stands still is not stuck (the turn of a bounce can land where it started)
stability       size consistency (coefficient of variation of the object's mass) times colour
                consistency (share of frames with the modal colour)
==============  ===================================================================================

The shape check judges the object's silhouette: its coverage re-sharpened about
``silhouette_level`` by its edge width (a steeper ramp, so that a blur only costs what it rounds,
and sub-pixel corners still count: a rounded corner of a 12 px square is a pixel or two). The
ideal circle, square and triangle (apex up: the renderer's own antialiased geometry) are each
fitted to it (centre and size maximising the soft IoU, from its moments). The frame shows the
caption's shape when that shape's template fits best, with IoU >= ``shape_min_iou``; the silhouette
is solid (area over the area of its convex hull >= ``min_solidity``: no dents, no concave or
arrow-shaped triangle); and, for a square or a triangle, the fitted template's corners are there
(the silhouette holds at least ``min_square_corner_fill`` / ``min_triangle_corner_fill`` of the
template inside a disc of ``corner_zone`` x size around every vertex: no rounded corners).

The video's ``score`` is the **product** of the checks: a video counts only when it shows one
object of the right colour and shape, crisp, moving the right way at the right speed and bouncing
at the borders over its whole length, steadily, on a clean background. ``mean_check`` (the plain
mean of the checks) is reported beside it; ``details["stuck_rate"]`` is the fraction of frame
steps in which the object does not move, and ``details["far_half_share"]`` (reported, not
scored) the share of frames with the object in the half of the frame away from the caption's
border: about 0.5 for a long video that bounces between the borders, near 0 for an object that
turns back before reaching the far one.

``strict=False`` (CLI ``--old``) gives the first, lenient scoring (:data:`OLD_CHECKS`), kept for
one side-by-side comparison (docs/training.md, "Strict evaluator"): a fill-ratio shape test, a
brightness-share single-object test and the direction of the first frames only. It passed rounded
squares, arrowhead triangles, blur, a flickering fragment and an object stuck at a border.

Per-frame measurements (robust to a dim or slightly grey background and colour drift): the
brightness ``v`` of a pixel is its largest channel; blobs are 8-connected components of
``v >= fg_threshold``; the object is the blob with the most brightness. Inside a window around it
the background level is subtracted and ``v`` is normalised by the object's peak, giving a soft
coverage ``c``. From ``c``: mass (sum), extents (sum of the row / column maxima), centroid, edge
width, the silhouette and its ``silhouette_level`` crossings between pixel centres (for the convex
hull). The colour is the nearest of the six hues to the chroma-weighted circular mean hue of the
object's core pixels (None, a miss, when the core is grey or white). Scored frames should be the
decoded frames themselves: an MP4's 4:2:0 chroma halves the resolution of a pure red or blue
object's edges, which the shape check sees.

:func:`calibrate` scores known inputs: rendered clips, noise, blank videos, wrong captions and the
failure cases of :data:`FAILURE_CASES` (:func:`render_failure`).

CLI::

    python -m training.eval.shapes_bench --model NAME_OR_PATH --json [--frames N] [--seeds K]
        [--prompts "a red circle moving left" ...] [--out-dir DIR] [--save-png] [--jobs J --threads T]
        [--reconstruct] [--old]
    python -m training.eval.shapes_bench --calibrate --json [--old] [--out-dir DIR --save-png]
    python -m training.eval.shapes_bench --teacher RUN_DIR [--config-name shapes_tiny] --json
"""

from __future__ import annotations

import argparse
import itertools
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
    ShapeAttributes,
    ShapesConfig,
    all_captions,
    make_clip,
    parse_caption,
    trajectory,
)

__all__ = [
    "BenchConfig",
    "CHECKS",
    "OLD_CHECKS",
    "FAILURE_CASES",
    "VideoScore",
    "score_video",
    "track",
    "axis_position",
    "as_uint8_frames",
    "run_benchmark",
    "run_benchmark_parallel",
    "render_failure",
    "calibrate",
    "contact_sheet",
    "write_png",
    "main",
]

log = logging.getLogger(__name__)

CHECKS: tuple[str, ...] = ("presence", "single_object", "background", "colour", "shape", "sharpness",
                           "direction", "bounce", "speed", "stability")
OLD_CHECKS: tuple[str, ...] = ("presence", "single_object", "background", "colour", "shape", "direction",
                               "stability")
SILHOUETTE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")


# --------------------------------------------------------------------------------------------
# Config and result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    """Thresholds of the checks. Brightness values are fractions of 255; ``(a, b)`` ramps map
    ``a`` to 0 and ``b`` to 1 (or the reverse for "at most" ramps), linearly in between.
    Calibration of the strict thresholds: :func:`calibrate` (rendered clips against
    :data:`FAILURE_CASES`)."""

    domain: ShapesConfig = field(default_factory=ShapesConfig)
    fg_threshold: float = 0.25  # a pixel belongs to a blob when its largest channel is above this
    core_threshold: float = 0.5  # coverage above which a pixel is object core (read for colour)
    peak_percentile: float = 90.0  # object peak brightness, for the coverage normalisation
    window_margin: int = 3  # px around the object's blob where its blur tails are measured
    # Plausible object extent, relative to the domain's size range.
    extent_slack_low: float = 0.6
    extent_slack_high: float = 1.5
    bg_bright_level: float = 0.2  # a background pixel brighter than this is "bright"
    bg_bright_ramp: tuple[float, float] = (0.05, 0.01)  # share of bright background pixels (at most)
    bg_level_ramp: tuple[float, float] = (0.2, 0.08)  # mean background brightness (at most)
    min_saturation: float = 0.35  # chroma / brightness below this is "no colour" (grey / white)
    speed_ramp: tuple[float, float] = (0.25, 0.5)  # initial px per frame along the stated direction
    alignment_ramp: tuple[float, float] = (0.7, 0.9)  # cosine between initial velocity and direction
    size_cv_ramp: tuple[float, float] = (0.3, 0.12)  # coefficient of variation of the mass (at most)

    # Strict checks (the default).
    fragment_min_mass: float = 2.0  # px of full coverage: a second blob this heavy fails single_object
    silhouette_level: float = 0.5  # coverage from which a pixel is inside the silhouette
    shape_min_iou: float = 0.9  # IoU of the silhouette and the caption shape's fitted template
    min_solidity: float = 0.95  # silhouette area / convex hull area (rendered: >= 0.98)
    corner_zone: float = 0.3  # radius of the disc around each template vertex, relative to the size
    # Share of the fitted template's corner discs the silhouette fills. A square's corner rounded with
    # radius r leaves 1 - 3.0 (r / size)^2 of them (0.9: r ~ size / 5.5); a triangle's acute corners
    # lose more to the same radius (1 - 14.8 (r / size)^2) and to a blur.
    min_square_corner_fill: float = 0.9
    min_triangle_corner_fill: float = 0.8
    max_edge_width: float = 3.4  # px: 10%-90% coverage rise (a Gaussian blur of sigma 1.3 px)
    stuck_speed: float = 0.5  # px per frame: a step that moves less stands still (domain: >= 1)
    speed_slack: float = 0.25  # speeds in [min_speed * (1 - slack), max_speed * (1 + slack)] pass
    border_slack: float = 1.0  # px beyond max_speed within which the leading edge touches a border

    # Old (lenient) scoring, strict=False only.
    single_ramp: tuple[float, float] = (0.8, 0.95)  # share of the frame's brightness in the object
    # Asymmetry: triangle ~0.95 (~0.6 under a sigma 1.5 px blur), circle and square ~0. Fill ratio:
    # circle pi/4 (~0.84 blurred), square 1: split half-way.
    triangle_min_asym: float = 0.4
    square_min_fill: float = (math.pi / 4 + 1.0) / 2

    def __post_init__(self) -> None:
        if not 0 < self.fg_threshold < self.core_threshold < 1:
            raise ValueError(f"need 0 < fg_threshold < core_threshold < 1, got {self.fg_threshold} "
                             f"and {self.core_threshold}")
        for name in ("single_ramp", "bg_bright_ramp", "bg_level_ramp", "speed_ramp", "alignment_ramp",
                     "size_cv_ramp"):
            low, high = getattr(self, name)
            if low == high:
                raise ValueError(f"{name} needs two different end points, got {(low, high)}")
        for name in ("silhouette_level", "shape_min_iou", "min_solidity", "min_square_corner_fill",
                     "min_triangle_corner_fill", "speed_slack"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)!r}")
        for name in ("fragment_min_mass", "corner_zone", "max_edge_width", "stuck_speed", "border_slack"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.stuck_speed >= self.domain.min_speed * (1 - self.speed_slack):
            raise ValueError(f"stuck_speed ({self.stuck_speed}) must be below the slowest accepted speed "
                             f"({self.domain.min_speed * (1 - self.speed_slack)})")


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
class _Silhouette:
    """What the strict shape and sharpness checks read from one frame's object."""

    iou: dict[str, float]  # IoU of the silhouette and each shape's best-fitting template
    corner_fill: dict[str, float]  # share of the fitted square's / triangle's corner discs filled
    solidity: float  # area / convex hull area
    edge_width: float  # px, 10%-90% coverage rise

    def failure(self, shape: str, cfg: BenchConfig) -> str | None:
        """Why the silhouette is not a clean ``shape`` (None when it is one)."""
        best = max(self.iou, key=self.iou.__getitem__)
        if best != shape or self.iou[shape] < cfg.shape_min_iou:
            return "template"
        if self.solidity < cfg.min_solidity:
            return "solidity"
        least = {"square": cfg.min_square_corner_fill, "triangle": cfg.min_triangle_corner_fill}.get(shape, 0.0)
        if self.corner_fill.get(shape, 1.0) < least:
            return "corners"
        return None

    def label(self, cfg: BenchConfig) -> str | None:
        """The shape this silhouette cleanly is, or None."""
        best = max(self.iou, key=self.iou.__getitem__)
        return best if self.failure(best, cfg) is None else None


@dataclass(frozen=True)
class _Frame:
    """What one frame shows. ``present`` is False when no plausible object was found."""

    present: bool
    single: float  # single-object check for this frame (0 without a plausible object)
    background: float  # background check for this frame
    mass: float = 0.0
    centroid: tuple[float, float] = (0.0, 0.0)  # (x, y), px
    extent: tuple[float, float] = (0.0, 0.0)  # (x, y), px
    middle: tuple[float, float] = (0.0, 0.0)  # (x, y) centre of the extent, px
    shape: str | None = None  # old scoring's classification
    colour: str | None = None
    fragments: int = 0  # other blobs of fragment_min_mass px or more (strict)
    silhouette: _Silhouette | None = None  # strict


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
    """Old scoring: triangle when lopsided, else square or circle by fill ratio."""
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


def _measure_frame(rgb: np.ndarray, value: np.ndarray, labels: np.ndarray, cfg: BenchConfig,
                   strict: bool = True) -> _Frame:
    """rgb float [H, W, 3] and value (largest channel) [H, W] in [0, 1]; labels [H, W]."""
    h, w = value.shape
    on = labels >= 0
    if not on.any():
        return _Frame(present=False, single=0.0, background=_background_score(value, ~on, cfg))
    ids, inverse = np.unique(labels[on], return_inverse=True)
    blob_mass = np.bincount(inverse, weights=value[on])
    main = int(np.argmax(blob_mass))
    blob = labels == ids[main]

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
    core = cover >= cfg.core_threshold
    colour = _classify_colour(rgb[y0:y1, x0:x1][core], cfg) if core.any() else None
    measured = dict(present=True, background=background, mass=mass, centroid=(cx, cy),
                    extent=(extent_x, extent_y), middle=(mid_x, mid_y), colour=colour)
    if not strict:
        # A solid triangle's centroid sits 1/6 of its height from the middle of its extent.
        asym = 6.0 * max(abs(cx - mid_x) / extent_x, abs(cy - mid_y) / extent_y)
        fill = mass / (extent_x * extent_y)
        single = _ramp(float(blob_mass.max() / blob_mass.sum()), cfg.single_ramp)
        return _Frame(single=single, shape=_classify_shape(fill, asym, cfg), **measured)

    # Every other blob, in coverage px at the object's brightness: a fragment or a ghost.
    others = np.delete(np.bincount(inverse, weights=np.clip((value[on] - bg_level) / (peak - bg_level), 0, 1)),
                       main)
    fragments = int(np.count_nonzero(others >= cfg.fragment_min_mass))
    silhouette = _measure_silhouette(cover, x0, y0, mass, (cx, cy), cfg)
    return _Frame(single=float(fragments == 0), fragments=fragments, silhouette=silhouette, **measured)


# --------------------------------------------------------------------------------------------
# Silhouette geometry (strict shape and sharpness checks)
# --------------------------------------------------------------------------------------------


def _interval_overlap(lo: np.ndarray, hi: np.ndarray, pixel_lo: np.ndarray) -> np.ndarray:
    """Length of [lo, hi] inside each unit pixel interval [pixel_lo, pixel_lo + 1]."""
    return np.clip(np.minimum(hi, pixel_lo + 1) - np.maximum(lo, pixel_lo), 0.0, 1.0)


def _template_coverage(shape: str, params: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Antialiased coverage [N, h, w] of N ideal shapes, params [N, 3] = (centre x, centre y, size),
    on pixel columns ``xs`` [w] and rows ``ys`` [h] (integers).

    The renderer's geometry (``training.data.shapes``, antialiased; a test holds them equal), so a
    rendered frame is its own template: exact area coverage for squares, a one-pixel ramp of the
    signed distance for circles and apex-up triangles (base = height = size).
    """
    cx, cy = params[:, 0, None, None], params[:, 1, None, None]  # [N, 1, 1]
    half = params[:, 2, None, None] / 2
    cols = np.asarray(xs, dtype=np.float64)[None, None, :]  # [1, 1, w]
    rows = np.asarray(ys, dtype=np.float64)[None, :, None]  # [1, h, 1]
    if shape == "square":
        return _interval_overlap(cx - half, cx + half, cols) * _interval_overlap(cy - half, cy + half, rows)
    px, py = cols + 0.5, rows + 0.5  # pixel centres
    if shape == "circle":
        signed = half - np.sqrt((px - cx) ** 2 + (py - cy) ** 2)
    elif shape == "triangle":
        norm = np.sqrt(5.0)
        bottom = (cy + half) - py
        left = ((py - (cy - half)) - 2 * (cx - px)) / norm
        right = ((py - (cy - half)) - 2 * (px - cx)) / norm
        signed = np.minimum(np.minimum(bottom, left), right)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.clip(signed + 0.5, 0.0, 1.0)


def _vertices(shape: str, cx: float, cy: float, size: float) -> list[tuple[float, float]]:
    half = size / 2
    if shape == "square":
        return [(cx - half, cy - half), (cx + half, cy - half), (cx - half, cy + half), (cx + half, cy + half)]
    if shape == "triangle":
        return [(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)]
    return []


# Moves of the template fit: every (centre x, centre y, size) step of -1, 0, +1; no move first, so
# that ties keep the current fit.
_FIT_MOVES = np.array(sorted(itertools.product((-1.0, 0.0, 1.0), repeat=3), key=lambda m: m != (0, 0, 0)))
_FIT_STEPS: tuple[float, ...] = (0.5, 0.25)  # px; the moments start within a pixel or so
_FIT_MAX_MOVES = 8  # per step size


def _soft_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of soft masks over their last two axes: sum of minima / sum of maxima."""
    return np.minimum(a, b).sum(axis=(-2, -1)) / np.maximum(np.maximum(a, b).sum(axis=(-2, -1)), 1e-9)


def _fit_template(shape: str, silhouette: np.ndarray, xs: np.ndarray, ys: np.ndarray,
                  start: tuple[float, float, float]) -> tuple[np.ndarray, float]:
    """The (centre x, centre y, size) of ``shape`` whose template has the largest soft IoU with
    ``silhouette`` [h, w], by a coarse-to-fine local search from ``start``; returns it and the IoU."""
    params = np.asarray(start, dtype=np.float64)
    best = 0.0
    for step in _FIT_STEPS:
        for _ in range(_FIT_MAX_MOVES):
            candidates = params + _FIT_MOVES * step  # [27, 3]
            candidates[:, 2] = np.maximum(candidates[:, 2], 1.0)
            iou = _soft_iou(_template_coverage(shape, candidates, xs, ys), silhouette)  # [27]
            k = int(np.argmax(iou))  # the first maximum: no move on a tie
            params, best = candidates[k], float(iou[k])
            if k == 0:
                break
    return params, best


def _corner_fill(shape: str, params: np.ndarray, silhouette: np.ndarray, xs: np.ndarray, ys: np.ndarray,
                 cfg: BenchConfig) -> float:
    """Share of the fitted template's coverage near its vertices that the silhouette holds."""
    template = _template_coverage(shape, params[None], xs, ys)[0]  # [h, w]
    px = np.asarray(xs, dtype=np.float64)[None, :] + 0.5
    py = np.asarray(ys, dtype=np.float64)[:, None] + 0.5
    radius = cfg.corner_zone * float(params[2])
    zone = np.zeros(template.shape, dtype=bool)
    for vx, vy in _vertices(shape, *params):
        zone |= (px - vx) ** 2 + (py - vy) ** 2 <= radius ** 2
    need = float(template[zone].sum())
    return float(np.minimum(silhouette, template)[zone].sum() / need) if need > 0 else 0.0


def _level_crossings(cover: np.ndarray, level: float) -> np.ndarray:
    """Points (x, y) [N, 2] where ``cover`` [h, w] crosses ``level`` between neighbouring pixel
    centres (linear interpolation), in the window's pixel coordinates; outside the window is 0."""
    padded = np.pad(cover, 1)  # [h+2, w+2]
    points = []
    for axis in (1, 0):
        a = padded[:, :-1] if axis == 1 else padded[:-1, :]
        b = padded[:, 1:] if axis == 1 else padded[1:, :]
        cross = (a >= level) != (b >= level)
        rows, cols = np.nonzero(cross)
        t = (level - a[cross]) / (b[cross] - a[cross])
        if axis == 1:
            points.append(np.stack([cols + t - 0.5, rows - 0.5], axis=1))  # padded centre j + 0.5 - 1
        else:
            points.append(np.stack([cols - 0.5, rows + t - 0.5], axis=1))
    return np.concatenate(points)


def _convex_hull(points: np.ndarray) -> tuple[float, float]:
    """Area and perimeter of the convex hull of points [N, 2] (Andrew's monotone chain)."""
    pts = sorted(set(map(tuple, np.round(points, 6).tolist())))
    if len(pts) < 3:
        return 0.0, 0.0

    def half(seq: list[tuple[float, float]]) -> list[tuple[float, float]]:
        chain: list[tuple[float, float]] = []
        for p in seq:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    hull = np.array(half(pts) + half(pts[::-1]))  # [K, 2], counter-clockwise
    nxt = np.roll(hull, -1, axis=0)
    area = 0.5 * abs(float(np.sum(hull[:, 0] * nxt[:, 1] - nxt[:, 0] * hull[:, 1])))
    return area, float(np.sum(np.linalg.norm(nxt - hull, axis=1)))


# The 10%-90% rise of the renderer's one-pixel antialiasing ramp, px: the edge width of a sharp render.
_SHARP_EDGE_WIDTH = 0.8


def _measure_silhouette(cover: np.ndarray, x0: int, y0: int, mass: float, centroid: tuple[float, float],
                        cfg: BenchConfig) -> _Silhouette:
    """Edge width, template fits, corners and solidity of the object's soft coverage [h, w] whose
    top-left pixel is (x0, y0).

    The silhouette is the coverage re-sharpened about ``silhouette_level`` to the edge width of a
    sharp render (a steeper ramp by edge width / 0.8): a binary mask with its sub-pixel edges
    kept, so that a blur widens no edge and a rounded corner of a 12 px square (a pixel or two)
    still shows. It is compared with the renderer's own antialiased templates.
    """
    h, w = cover.shape
    xs, ys = np.arange(x0, x0 + w), np.arange(y0, y0 + h)
    level = cfg.silhouette_level
    _, perimeter = _convex_hull(_level_crossings(cover, level))
    edge_width = np.count_nonzero((cover > 0.1) & (cover < 0.9)) / perimeter if perimeter > 0 else float("inf")
    gain = max(1.0, edge_width / _SHARP_EDGE_WIDTH) if perimeter > 0 else 1.0
    silhouette = np.clip(level + (cover - level) * gain, 0.0, 1.0)  # [h, w]
    area = float(silhouette.sum())
    gx, gy = centroid
    starts = {"circle": (gx, gy, 2 * math.sqrt(mass / math.pi)), "square": (gx, gy, math.sqrt(mass)),
              # a triangle's centroid sits size / 6 below the centre of its extent
              "triangle": (gx, gy - math.sqrt(2 * mass) / 6, math.sqrt(2 * mass))}
    iou, corners = {}, {}
    for shape in SILHOUETTE_SHAPES:
        params, iou[shape] = _fit_template(shape, silhouette, xs, ys, starts[shape])
        if _vertices(shape, *params):
            corners[shape] = _corner_fill(shape, params, silhouette, xs, ys, cfg)
    hull_area, _ = _convex_hull(_level_crossings(silhouette, level))
    solidity = min(area / hull_area, 1.0) if hull_area > 0 else 0.0
    return _Silhouette(iou=iou, corner_fill=corners, solidity=solidity, edge_width=edge_width)


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
    """The stated direction at the start: a line fit to the centroids of the first straight frames."""
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


@dataclass(frozen=True)
class _Motion:
    """The strict motion checks over every frame step between two frames that show the object."""

    bounce: float  # share of the moving steps that go the way the bounce rule says
    speed: float  # share of the steps (bounce steps aside) at the domain's speed
    stuck_rate: float  # share of the steps that do not move
    steps: int
    bounces: int  # reversals at a border
    wrong_way: int  # moving steps against the bounce rule
    median_speed: float | None  # px per frame along the axis, over the moving steps


def _motion(frames: list[_Frame], direction: str, cfg: BenchConfig) -> _Motion:
    """Walk the frame steps with the direction the bounce rule expects: the caption's, flipped
    whenever the object, touching the border ahead, turns back."""
    dom = cfg.domain
    axis = 0 if DIRECTIONS[direction][0] else 1
    expected = DIRECTIONS[direction][axis]  # +1 or -1 along the axis
    limit = (dom.width, dom.height)[axis]
    reach = dom.max_speed + cfg.border_slack  # the leading edge this close to a border touches it
    low_speed, high_speed = dom.min_speed * (1 - cfg.speed_slack), dom.max_speed * (1 + cfg.speed_slack)

    def touching(f: _Frame, sign: int) -> bool:
        edge = f.middle[axis] + sign * f.extent[axis] / 2
        return edge >= limit - reach if sign > 0 else edge <= reach

    steps = stuck = moving = right_way = at_speed = timed = bounces = 0
    still_run = 0  # consecutive steps that did not move
    speeds = []
    for a, b in zip(frames, frames[1:]):
        if not (a.present and b.present):
            still_run = 0
            continue
        steps += 1
        step = np.subtract(b.centroid, a.centroid)  # [2] px
        at_border = touching(a, expected) or touching(b, expected)
        if float(np.hypot(*step)) < cfg.stuck_speed:
            still_run += 1
            if at_border and still_run == 1:
                continue  # the turn of a bounce can land next to where it started: once is allowed
            stuck += 1
            timed += 1  # fails the speed check
            continue
        still_run = 0
        moving += 1
        along = float(step[axis]) * expected
        if along < 0 and at_border:  # turned back at the border ahead: a bounce
            expected = -expected
            bounces += 1
            right_way += 1
            continue
        right_way += along > 0
        if at_border:
            continue  # the bounce may fall inside this step, or the next: not timed
        speeds.append(abs(float(step[axis])))
        timed += 1
        at_speed += low_speed <= abs(float(step[axis])) <= high_speed
    return _Motion(bounce=right_way / moving if moving else 0.0, speed=at_speed / timed if timed else 0.0,
                   stuck_rate=stuck / steps if steps else 0.0, steps=steps, bounces=bounces,
                   wrong_way=moving - right_way, median_speed=float(np.median(speeds)) if speeds else None)


def axis_position(centroids: np.ndarray, direction: str, cfg: BenchConfig | None = None) -> np.ndarray:
    """Centroids ``[T, 2]`` (x, y) px -> position along the direction's axis ``[T]``: 0 at the border
    the direction points to, 1 at the far one (NaN stays NaN)."""
    cfg = cfg or BenchConfig()
    dx, dy = DIRECTIONS[direction]
    axis = 0 if dx else 1
    pos = np.asarray(centroids, dtype=np.float64)[:, axis] / (cfg.domain.width, cfg.domain.height)[axis]
    return 1.0 - pos if (dx or dy) > 0 else pos


def _far_half_share(present: list[_Frame], direction: str, cfg: BenchConfig) -> float | None:
    """Share of the frames showing the object whose centre lies in the half of the frame away from
    the caption's border. An object that bounces between the borders spends about half of a long
    video there; one that turns back toward the caption's border before reaching the far one,
    almost none. Reported, not scored."""
    if not present:
        return None
    position = axis_position(np.array([f.centroid for f in present]), direction, cfg)
    return round(float(np.mean(position > 0.5)), 4)


def _measure_video(video: np.ndarray, cfg: BenchConfig, strict: bool) -> list[_Frame]:
    """Every frame of uint8 ``[T, H, W, 3]`` measured (objects, silhouettes, background)."""
    rgb = video.astype(np.float64) / 255.0  # [T, H, W, 3]
    value = rgb.max(axis=-1)  # [T, H, W]
    labels = _label_components(value >= cfg.fg_threshold)
    return [_measure_frame(rgb[t], value[t], labels[t], cfg, strict) for t in range(video.shape[0])]


def track(frames: Any, cfg: BenchConfig | None = None) -> np.ndarray:
    """The object's centroid per frame as the strict checks see it: float64 ``[T, 2]`` (x, y) in
    px, NaN where a frame shows no plausible object."""
    per_frame = _measure_video(as_uint8_frames(frames), cfg or BenchConfig(), True)
    return np.array([f.centroid if f.present else (np.nan, np.nan) for f in per_frame], dtype=np.float64)


def score_video(frames: Any, caption: str, cfg: BenchConfig | None = None, *, strict: bool = True) -> VideoScore:
    """Score uint8 frames [T, H, W, 3] (numpy or torch) against a shapes caption: the strict checks
    (:data:`CHECKS`, the default) or, with ``strict=False``, the old lenient ones (:data:`OLD_CHECKS`)."""
    cfg = cfg or BenchConfig()
    prompt = parse_caption(caption)
    video = as_uint8_frames(frames)
    if video.shape[1:3] != (cfg.domain.height, cfg.domain.width):
        raise ValueError(f"the shapes benchmark scores {cfg.domain.height}x{cfg.domain.width} videos, got "
                         f"{video.shape[1]}x{video.shape[2]}: generate at the domain's size")
    per_frame = _measure_video(video, cfg, strict)
    present = [f for f in per_frame if f.present]
    num = len(per_frame)

    direction, velocity = _direction_score(per_frame, prompt.direction, cfg)
    colours = Counter(f.colour for f in present)
    if len(present) >= 2:
        masses = np.array([f.mass for f in present])
        size_score = _ramp(float(masses.std() / masses.mean()), cfg.size_cv_ramp)
        colour_consistency = colours.most_common(1)[0][1] / len(present)
        stability = size_score * colour_consistency
    else:
        stability = 0.0
    details: dict[str, Any] = {
        "frames": num,
        "frames_present": len(present),
        "colour": colours.most_common(1)[0][0] if present else None,
        "velocity": velocity,
        "mean_extent": ([round(float(np.mean([f.extent[i] for f in present])), 3) for i in range(2)]
                        if present else None),
    }
    if not strict:
        shapes = Counter(f.shape for f in present)
        checks = {
            "presence": len(present) / num,
            "single_object": float(np.mean([f.single for f in per_frame])),
            "background": float(np.mean([f.background for f in per_frame])),
            "colour": sum(f.colour == prompt.colour for f in present) / num,
            "shape": sum(f.shape == prompt.shape for f in present) / num,
            "direction": direction,
            "stability": float(stability),
        }
        details["shape"] = shapes.most_common(1)[0][0] if present else None
        return VideoScore(score=float(np.prod(list(checks.values()))), checks=checks, details=details)

    silhouettes = [f.silhouette for f in present if f.silhouette is not None]
    failures = Counter(s.failure(prompt.shape, cfg) for s in silhouettes)
    shapes = Counter(s.label(cfg) for s in silhouettes)
    motion = _motion(per_frame, prompt.direction, cfg)
    checks = {
        "presence": len(present) / num,
        "single_object": float(np.mean([f.single for f in per_frame])),
        "background": float(np.mean([f.background for f in per_frame])),
        "colour": sum(f.colour == prompt.colour for f in present) / num,
        "shape": failures[None] / num,
        "sharpness": sum(s.edge_width <= cfg.max_edge_width for s in silhouettes) / num,
        "direction": direction,
        "bounce": motion.bounce,
        "speed": motion.speed,
        "stability": float(stability),
    }

    def median(values: list[float]) -> float | None:
        return round(float(np.median(values)), 4) if values else None

    details.update({
        "shape": shapes.most_common(1)[0][0] if present else None,  # None: no clean shape most often
        "shape_failures": {reason: failures[reason] for reason in ("template", "solidity", "corners")},
        "frames_with_fragments": sum(f.fragments > 0 for f in present),
        "median_iou": median([s.iou[prompt.shape] for s in silhouettes]),
        "median_solidity": median([s.solidity for s in silhouettes]),
        "median_corner_fill": median([s.corner_fill[prompt.shape] for s in silhouettes
                                      if prompt.shape in s.corner_fill]),
        "median_edge_width": median([s.edge_width for s in silhouettes]),
        "stuck_rate": motion.stuck_rate,
        "steps": motion.steps,
        "bounces": motion.bounces,
        "wrong_way_steps": motion.wrong_way,
        "median_speed": None if motion.median_speed is None else round(motion.median_speed, 4),
        "far_half_share": _far_half_share(present, prompt.direction, cfg),
    })
    return VideoScore(score=float(np.prod(list(checks.values()))), checks=checks, details=details)


# --------------------------------------------------------------------------------------------
# Benchmark over prompts
# --------------------------------------------------------------------------------------------

GenerateFn = Callable[[str, int, int], Any]  # (prompt, num_frames, seed) -> uint8 [T, H, W, 3]


def _summarise(scores: Sequence[VideoScore]) -> dict[str, Any]:
    """Means over videos: score, mean check, each check, and the stuck rate (strict scores)."""
    summary: dict[str, Any] = {
        "mean_score": float(np.mean([s.score for s in scores])),
        "mean_check": float(np.mean([s.mean_check for s in scores])),
        "checks": {c: float(np.mean([s.checks[c] for s in scores])) for c in scores[0].checks},
    }
    if "stuck_rate" in scores[0].details:
        summary["stuck_rate"] = float(np.mean([s.details["stuck_rate"] for s in scores]))
        far = [s.details["far_half_share"] for s in scores if s.details["far_half_share"] is not None]
        summary["far_half_share"] = float(np.mean(far)) if far else None
    return summary


def run_benchmark(generate: GenerateFn, prompts: Sequence[str], *, num_frames: int, seeds: Sequence[int],
                  cfg: BenchConfig | None = None, out_dir: Path | None = None, fps: int | None = None,
                  save_png: bool = False, strict: bool = True) -> dict[str, Any]:
    """Generate one video per (prompt, seed), score it, and aggregate.

    Returns ``{"mean_score", "mean_check", "checks", "stuck_rate", "num_videos", "per_prompt"}``
    (``stuck_rate`` only when ``strict``); per prompt the mean score, per-check means and each
    seed's score and details. With ``out_dir`` every video is written as MP4 (and a PNG contact
    sheet with ``save_png``).
    """
    cfg = cfg or BenchConfig()
    _prepare(prompts, out_dir)
    results = {(prompt, seed): _score_one(generate, prompt, seed, num_frames, cfg, out_dir, fps, save_png, strict)
               for prompt in prompts for seed in seeds}
    return _collect(prompts, seeds, results)


def run_benchmark_parallel(make_generate: Callable[[], GenerateFn], prompts: Sequence[str], *, jobs: int,
                           threads: int, num_frames: int, seeds: Sequence[int], cfg: BenchConfig | None = None,
                           out_dir: Path | None = None, fps: int | None = None,
                           save_png: bool = False, strict: bool = True) -> dict[str, Any]:
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
    tasks = [(prompt, seed, num_frames, cfg, out_dir, fps, save_png, strict) for prompt in prompts for seed in seeds]
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
               out_dir: Path | None, fps: int | None, save_png: bool, strict: bool = True) -> VideoScore:
    frames = as_uint8_frames(generate(prompt, num_frames, seed))
    result = score_video(frames, prompt, cfg, strict=strict)
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
            "checks": {c: float(np.mean([s.checks[c] for s in per])) for c in per[0].checks},
            "seeds": [{"seed": seed, "score": s.score, "details": s.details} for seed, s in zip(seeds, per)],
        }
        for prompt, per in scores.items()
    }
    every = [s for per in scores.values() for s in per]
    return {**_summarise(every), "num_videos": len(every), "per_prompt": per_prompt}


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


# --------------------------------------------------------------------------------------------
# Calibration: known inputs, and failures a person sees
# --------------------------------------------------------------------------------------------

# Each renders a clip of the caption's attributes with one defect that the old scoring passed:
FAILURE_CASES: dict[str, str] = {
    "rounded_square": "squares whose corners are rounded with a radius of a quarter of the side",
    "arrowhead": "triangles with a notch of a quarter of their height cut into the base (concave)",
    "blurred": "any shape under a Gaussian blur of sigma 1.5 px",
    "stuck_at_border": "an object that stops at the border ahead instead of bouncing "
                       "(it starts straight_frames steps from it)",
    "fragment": "a 2x2 px fragment of the object's colour beside it in two frames of every three",
}
FAILURE_SHAPES: dict[str, str] = {"rounded_square": "square", "arrowhead": "triangle"}  # the others: any


def _gaussian_blur(frames: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of uint8 [T, H, W, 3] (zero padding), rounded back to uint8."""
    radius = int(math.ceil(3 * sigma))
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma ** 2))
    taps /= taps.sum()
    out = frames.astype(np.float64)
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad)
        out = sum(w * np.take(padded, np.arange(i, i + out.shape[axis]), axis=axis) for i, w in enumerate(taps))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _supersampled(inside: Callable[[np.ndarray, np.ndarray], np.ndarray], domain: ShapesConfig,
                  factor: int = 4) -> np.ndarray:
    """Coverage [T, H, W] of a region given by ``inside(x, y)`` on points [T, H*f, W*f] (x right,
    y down, px), averaged over ``factor`` x ``factor`` samples per pixel."""
    offsets = (np.arange(factor) + 0.5) / factor
    x = (np.arange(domain.width)[:, None] + offsets[None]).reshape(-1)  # [W*f]
    y = (np.arange(domain.height)[:, None] + offsets[None]).reshape(-1)  # [H*f]
    hits = inside(x[None, None, :], y[None, :, None]).astype(np.float64)  # [T, H*f, W*f]
    t = hits.shape[0]
    return hits.reshape(t, domain.height, factor, domain.width, factor).mean(axis=(2, 4))


def render_failure(kind: str, attrs: ShapeAttributes, domain: ShapesConfig) -> np.ndarray:
    """uint8 frames [T, H, W, 3] of the clip of ``attrs`` with the defect ``kind`` of
    :data:`FAILURE_CASES` (``rounded_square`` needs a square, ``arrowhead`` a triangle)."""
    if kind not in FAILURE_CASES:
        raise ValueError(f"unknown failure case {kind!r}; known: {list(FAILURE_CASES)}")
    if kind in FAILURE_SHAPES and attrs.shape != FAILURE_SHAPES[kind]:
        raise ValueError(f"{kind} draws a {FAILURE_SHAPES[kind]}, got a {attrs.shape}")
    rgb = np.asarray(attrs.rgb, dtype=np.float64)
    half = attrs.size / 2
    dx, dy = DIRECTIONS[attrs.direction]
    if kind == "stuck_at_border":
        # Start straight_frames steps from the border ahead and stop there (clamp, no fold).
        lo_x, hi_x, lo_y, hi_y = half, domain.width - half, half, domain.height - half
        run = domain.straight_frames * attrs.speed
        x0 = {1: hi_x - run, -1: lo_x + run}.get(dx, attrs.x0)
        y0 = {1: hi_y - run, -1: lo_y + run}.get(dy, attrs.y0)
        t = np.arange(domain.num_frames, dtype=np.float64)
        cx = np.clip(x0 + dx * attrs.speed * t, lo_x, hi_x)
        cy = np.clip(y0 + dy * attrs.speed * t, lo_y, hi_y)
    else:
        cx, cy = trajectory(attrs, domain)
    centres = np.stack([cx, cy, np.full_like(cx, attrs.size)], axis=1)  # [T, 3]
    xs, ys = np.arange(domain.width), np.arange(domain.height)

    if kind == "rounded_square":
        r = attrs.size / 4
        qx = np.abs(xs[None, None, :] + 0.5 - cx[:, None, None]) - (half - r)  # [T, 1, W]
        qy = np.abs(ys[None, :, None] + 0.5 - cy[:, None, None]) - (half - r)  # [T, H, 1]
        outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0) - r
        cover = np.clip(0.5 - outside, 0.0, 1.0)  # the renderer's one-pixel ramp of the signed distance
    elif kind == "arrowhead":
        notch = attrs.size / 4
        apex_y, base_y = cy - half, cy + half  # [T]

        def inside(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            ax, ay, by = cx[:, None, None], apex_y[:, None, None], base_y[:, None, None]
            in_triangle = (y <= by) & (np.abs(x - ax) <= (y - ay) / 2)  # base width = height
            # the notch: a triangle from the base corners up to notch px above the base's middle
            in_notch = y >= by - notch * (1 - np.abs(x - ax) / half)
            return in_triangle & ~in_notch

        cover = _supersampled(inside, domain)
    else:
        cover = _template_coverage(attrs.shape, centres, xs, ys)  # = training.data.shapes.render_clip
    frames = np.rint(cover[..., None] * rgb).astype(np.uint8)  # [T, H, W, 3]

    if kind == "blurred":
        frames = _gaussian_blur(frames, 1.5)
    elif kind == "fragment":
        # 2x2 px beside the object, across the axis of motion, on the side with room.
        gap = half + 4
        for t in range(domain.num_frames):
            if t % 3 == 0:
                continue
            if dx:
                fx, fy = cx[t], cy[t] + (gap if cy[t] + gap + 2 < domain.height else -gap)
            else:
                fx, fy = cx[t] + (gap if cx[t] + gap + 2 < domain.width else -gap), cy[t]
            i, j = int(fy), int(fx)
            frames[t, i:i + 2, j:j + 2] = np.asarray(attrs.rgb, dtype=np.uint8)
    return frames


def _group_stats(results: Sequence[VideoScore]) -> dict[str, Any]:
    values = np.array([r.score for r in results])
    return {**_summarise(results), "min_score": float(values.min()), "max_score": float(values.max()),
            "num_videos": len(results)}


def calibrate(cfg: BenchConfig | None = None, *, clips_per_caption: int = 1, seed: int = 0,
              num_frames: int | None = None, captions: Sequence[str] | None = None, strict: bool = True,
              out_dir: Path | None = None) -> dict[str, Any]:
    """The evaluator's figures on known inputs, no model needed.

    ``real``: rendered clips, ``clips_per_caption`` of each caption (default: the 72); ``wrong_colour`` /
    ``wrong_direction``: the same clips scored against a caption with another colour / the
    opposite direction; ``noise``: uniform noise; ``blank``: black videos; then each of
    :data:`FAILURE_CASES`, rendered from the same clips' attributes (those of its shape only where
    it needs one). With ``out_dir``, a contact sheet of each group's first video is written there
    as ``<group>.png``.
    """
    cfg = cfg or BenchConfig()
    domain = cfg.domain if num_frames is None else replace(cfg.domain, num_frames=num_frames)
    rng = np.random.default_rng(seed)
    colour_names, opposite = list(COLOURS), {"left": "right", "right": "left", "up": "down", "down": "up"}
    groups: dict[str, list[VideoScore]] = {name: [] for name in ("real", "wrong_colour", "wrong_direction",
                                                                 "noise", "blank", *FAILURE_CASES)}
    first: dict[str, np.ndarray] = {}
    shape = (domain.num_frames, domain.height, domain.width, 3)
    index = 0

    def add(group: str, frames: np.ndarray, caption: str) -> None:
        groups[group].append(score_video(frames, caption, cfg, strict=strict))
        first.setdefault(group, frames)

    for caption in captions or all_captions():
        prompt = parse_caption(caption)
        for _ in range(clips_per_caption):
            clip = make_clip(seed, index, domain, caption=caption)
            index += 1
            add("real", clip.frames, caption)
            other = colour_names[(colour_names.index(prompt.colour) + 1) % len(colour_names)]
            add("wrong_colour", clip.frames, caption.replace(prompt.colour, other))
            add("wrong_direction", clip.frames, f"a {prompt.colour} {prompt.shape} moving {opposite[prompt.direction]}")
            add("noise", rng.integers(0, 256, shape, dtype=np.uint8), caption)
            add("blank", np.zeros(shape, dtype=np.uint8), caption)
            for kind in FAILURE_CASES:
                if FAILURE_SHAPES.get(kind, prompt.shape) == prompt.shape:
                    add(kind, render_failure(kind, clip.attributes, domain), caption)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for group, frames in first.items():
            write_png(out_dir / f"{group}.png", contact_sheet(frames))
    return {name: _group_stats(results) for name, results in groups.items() if results}


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


def _sdk_generate(model: str, device: str, decoder: str = "wan", dtype: str = "auto") -> GenerateFn:
    from sf_sdk import StreamingGenerator  # lazy: the evaluator itself does not need the SDK

    generator = StreamingGenerator.from_pretrained(model, device=device, decoder=decoder, dtype=dtype)

    def generate(prompt: str, num_frames: int, seed: int) -> Any:
        frames = generator.generate(prompt, num_frames=num_frames, seed=seed).frames
        if frames is None:
            raise ValueError(f"model {model!r} returned no decoded frames (it has no VAE?): the benchmark "
                             f"scores pixels")
        return frames

    return generate


def _vae_roundtrip(model: str, device: str, decoder: str = "wan", dtype: str = "auto") -> GenerateFn:
    """Real clips of each caption through the model's VAE (encode, decode): the ceiling that
    no generator decoding with this VAE can pass. ``decoder="tiny"``: decoded by the model's tiny
    decoder instead (the same encoder and latents)."""
    import torch

    from sf_sdk import StreamingGenerator
    from training.data.shapes import frames_to_tensor, tensor_to_frames

    gen = StreamingGenerator.from_pretrained(model, device=device, decoder=decoder, dtype=dtype)
    vae = gen.vae
    if vae is None:
        raise ValueError(f"model {model!r} has no VAE: --reconstruct needs one")
    decode = gen.tiny_decoder.decode if decoder == "tiny" else vae.decode
    domain = BenchConfig().domain

    def generate(prompt: str, num_frames: int, seed: int) -> Any:
        cfg = replace(domain, num_frames=num_frames)
        index = all_captions().index(prompt)
        clip = make_clip(seed, index, cfg, caption=prompt)
        video = frames_to_tensor(clip.frames)[None].to(device=device, dtype=vae.dtype)  # [1, 3, T, H, W]
        with torch.no_grad():
            recon = decode(vae.normalize(vae.encode(video)))
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
    stuck = f", stuck rate {result['stuck_rate']:.4f}" if "stuck_rate" in result else ""
    if result.get("far_half_share") is not None:
        stuck += f", far-half share {result['far_half_share']:.3f}"
    lines = [f"mean score {result['mean_score']:.4f}  (mean check {result['mean_check']:.4f}, "
             f"{result['num_videos']} videos{stuck})"]
    lines += [f"  {name:<14} {value:.4f}" for name, value in result["checks"].items()]
    for prompt, entry in result.get("per_prompt", {}).items():
        lines.append(f"  {entry['score']:.3f}  {prompt}")
    sys.stdout.write("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.eval.shapes_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model name or checkpoint path for StreamingGenerator.from_pretrained")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto",
                        help="--model: the generator's dtype (auto: its default, as sf-generate; e.g. float32 to "
                             "compare models whose default dtypes differ)")
    parser.add_argument("--frames", type=int, default=ShapesConfig.num_frames, help="frames per video")
    parser.add_argument("--seeds", type=int, default=1, help="videos per prompt (seeds seed_base..)")
    parser.add_argument("--seed-base", type=int, default=0)
    parser.add_argument("--prompts", nargs="+", help="a subset of the 72 captions (default: all; also for "
                                                     "--calibrate)")
    parser.add_argument("--out-dir", type=Path, help="write MP4s and results.json here")
    parser.add_argument("--save-png", action="store_true", help="also write a contact sheet per video")
    parser.add_argument("--calibrate", action="store_true",
                        help="score rendered clips, noise, blank videos and the failure cases (no model)")
    parser.add_argument("--old", action="store_true",
                        help="score with the old lenient checks instead of the strict ones (for comparison)")
    parser.add_argument("--reconstruct", action="store_true",
                        help="score real clips passed through the model's VAE instead of generated "
                             "videos (the ceiling the VAE sets for any generator)")
    parser.add_argument("--decoder", choices=("wan", "tiny"), default="wan",
                        help="the model's decoder for generated and --reconstruct videos: wan (default) or its "
                             "tiny streaming decoder (TAEHV)")
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
    strict = not args.old
    started = time.perf_counter()
    config: dict[str, Any] = {"frames": args.frames, "strict": strict, "bench": asdict(cfg),
                              "python": platform.python_version(), "numpy": np.__version__}
    if args.calibrate:
        sheets = args.out_dir if args.save_png else None
        result: dict[str, Any] = {"calibration": calibrate(cfg, num_frames=args.frames, captions=args.prompts,
                                                           strict=strict, out_dir=sheets)}
        if not args.json:
            for name, entry in result["calibration"].items():
                sys.stdout.write(f"{name:<16} mean {entry['mean_score']:.4f}  min {entry['min_score']:.4f}  "
                                 f"max {entry['max_score']:.4f}\n")
    else:
        if args.teacher is not None:
            if args.model or args.reconstruct:
                parser.error("--teacher scores a run's teacher: drop --model and --reconstruct")
            if args.decoder != "wan":
                parser.error("--teacher decodes with the run's VAE: drop --decoder")
            if args.teacher_steps <= 0:
                parser.error("--teacher-steps must be positive")
            source = {"teacher": str(args.teacher), "config_name": args.config_name,
                      "teacher_steps": args.teacher_steps, "guidance": args.guidance}
            make_generate = partial(_teacher_generate, args.teacher, args.config_name, args.device,
                                    args.teacher_steps, args.guidance)
        else:
            if not args.model:
                parser.error("--model is required (or use --calibrate or --teacher)")
            source = {"model": args.model, "reconstruct": args.reconstruct, "decoder": args.decoder,
                      "dtype": args.dtype}
            make_generate = partial(_vae_roundtrip if args.reconstruct else _sdk_generate, args.model, args.device,
                                    args.decoder, args.dtype)
        import torch

        prompts = args.prompts or all_captions()
        seeds = list(range(args.seed_base, args.seed_base + args.seeds))
        threads = args.threads or max(1, torch.get_num_threads() // args.jobs)
        config.update(source, device=args.device, seeds=seeds, num_prompts=len(prompts), jobs=args.jobs,
                      threads=threads)
        common = dict(num_frames=args.frames, seeds=seeds, cfg=cfg, out_dir=args.out_dir, save_png=args.save_png,
                      strict=strict)
        if args.jobs == 1:
            from sf_sdk.generator import cpu_threads

            with cpu_threads(threads):
                result = run_benchmark(make_generate(), prompts, **common)
        else:
            result = run_benchmark_parallel(make_generate, prompts, jobs=args.jobs, threads=threads, **common)
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
