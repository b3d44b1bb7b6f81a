"""The synthetic "shapes" domain: one coloured shape moving on a black background.

A small, fully specified text-to-video domain for training and evaluating the pipeline end to
end on a CPU. Every clip shows exactly one object:

* 64x64 RGB at 16 fps on a black background (:class:`ShapesConfig` holds every number);
* shape in ``SHAPES`` (circle, square, triangle), colour in ``COLOURS`` (six pure RGB colours);
* size 12 to 20 px across (circle diameter, square side, triangle base and height);
* moving left, right, up or down at 1 to 2 px per frame, bouncing off the borders;
* starting at least ``start_margin`` (16) px from the border it moves toward, so the stated
  direction holds for the first ``straight_frames`` (8) frames whatever the speed;
* caption ``"a {colour} {shape} moving {direction}"`` (the initial direction);
* optionally (``mid_video_share``) a share of clips that are a window later in a long video:
  frames ``s .. s + T - 1`` of the same bouncing trajectory, ``s`` drawn from
  ``1 .. mid_video_max_start``, the caption still the direction at frame 0 of the trajectory. Such
  a clip can show the object moving against its caption with no bounce in view, which is what a
  rolling window sees once a stream's bounce has left it.

Clips are deterministic: clip ``index`` of ``seed`` depends on nothing else (not on the worker or
rank that draws it). Clip lengths follow the causal VAE framing, ``1 + 4k`` frames (33 by
default). Frames are uint8 ``[T, H, W, 3]`` numpy arrays; :func:`frames_to_tensor` gives the
``[3, T, H, W]`` float tensor in ``[-1, 1]`` the VAE takes.

Coordinates: ``x`` to the right, ``y`` down, in pixels; pixel ``(row i, column j)`` covers
``[j, j + 1] x [i, i + 1]``, so its centre is ``(j + 0.5, i + 0.5)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from sf_sdk.config import check_fields

__all__ = [
    "SHAPES",
    "COLOURS",
    "DIRECTIONS",
    "CAPTION_TEMPLATE",
    "ShapesConfig",
    "ShapePrompt",
    "ShapeAttributes",
    "ShapesClip",
    "ShapesDataset",
    "all_captions",
    "domain_words",
    "parse_caption",
    "sample_attributes",
    "trajectory",
    "render_clip",
    "make_clip",
    "frames_to_tensor",
    "tensor_to_frames",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
}
# Unit step (dx, dy) per direction, image coordinates (y grows downward).
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
CAPTION_TEMPLATE = "a {colour} {shape} moving {direction}"


# --------------------------------------------------------------------------------------------
# Config and attributes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapesConfig:
    """Every number of the domain. Sizes and distances are in pixels, speeds in px per frame."""

    height: int = 64
    width: int = 64
    fps: int = 16
    num_frames: int = 33
    min_size: float = 12.0
    max_size: float = 20.0
    min_speed: float = 1.0
    max_speed: float = 2.0
    # Distance between the object's leading edge and the border it moves toward, at frame 0.
    start_margin: float = 16.0
    # The causal VAE keeps the first frame and compresses the rest by this factor: clips have
    # 1 + frame_stride * k frames.
    frame_stride: int = 4
    antialias: bool = True
    # Share of clips that start later in the video (frame s of the trajectory, s uniform in
    # 1 .. mid_video_max_start); 0: every clip starts at frame 0.
    mid_video_share: float = 0.0
    mid_video_max_start: int = 128

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("height", "width", "fps", "num_frames", "frame_stride"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if (self.num_frames - 1) % self.frame_stride:
            raise ValueError(
                f"num_frames must be 1 + {self.frame_stride} * k for the causal VAE, got "
                f"{self.num_frames}: use e.g. {1 + self.frame_stride * max(1, self.num_frames // self.frame_stride)}")
        if not 0 < self.min_size <= self.max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got {self.min_size} and {self.max_size}")
        if not 0 < self.min_speed <= self.max_speed:
            raise ValueError(f"need 0 < min_speed <= max_speed, got {self.min_speed} and {self.max_speed}")
        if self.start_margin < 0:
            raise ValueError(f"start_margin must be >= 0, got {self.start_margin}")
        if self.max_size + self.start_margin > min(self.height, self.width):
            raise ValueError(
                f"max_size ({self.max_size}) + start_margin ({self.start_margin}) must fit in the frame "
                f"({self.height}x{self.width}): lower them or enlarge the frame")
        if not 0.0 <= self.mid_video_share <= 1.0:
            raise ValueError(f"mid_video_share is a share of clips in [0, 1], got {self.mid_video_share}")
        if self.mid_video_max_start < 1:
            raise ValueError(f"mid_video_max_start must be >= 1 (frames), got {self.mid_video_max_start}")

    @property
    def straight_frames(self) -> int:
        """Leading frames over which every clip starting at frame 0 moves in its stated direction
        (no bounce yet)."""
        return int(self.start_margin // self.max_speed)


@dataclass(frozen=True)
class ShapePrompt:
    """The three words a caption is made of."""

    colour: str
    shape: str
    direction: str

    def __post_init__(self) -> None:
        _check_choice("colour", self.colour, tuple(COLOURS))
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("direction", self.direction, tuple(DIRECTIONS))

    @property
    def caption(self) -> str:
        return CAPTION_TEMPLATE.format(colour=self.colour, shape=self.shape, direction=self.direction)


@dataclass(frozen=True)
class ShapeAttributes:
    """Everything that determines one clip."""

    shape: str
    colour: str
    direction: str
    size: float  # px across: circle diameter, square side, triangle base (= height)
    speed: float  # px per frame
    x0: float  # object centre at frame 0 of the trajectory, px
    y0: float
    start_frame: int = 0  # the trajectory's frame the clip starts at (> 0: a window later in the video)

    def __post_init__(self) -> None:
        ShapePrompt(self.colour, self.shape, self.direction)  # validates the three words
        if self.size <= 0 or self.speed < 0:
            raise ValueError(f"size must be > 0 and speed >= 0, got {self.size} and {self.speed}")
        if self.start_frame < 0:
            raise ValueError(f"start_frame must be >= 0, got {self.start_frame}")

    @property
    def prompt(self) -> ShapePrompt:
        return ShapePrompt(self.colour, self.shape, self.direction)

    @property
    def caption(self) -> str:
        return self.prompt.caption

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]


@dataclass(frozen=True)
class ShapesClip:
    """One rendered clip: frames uint8 [T, H, W, 3] and what they show."""

    frames: np.ndarray
    attributes: ShapeAttributes
    seed: int
    index: int

    @property
    def caption(self) -> str:
        return self.attributes.caption


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; the shapes domain knows {list(choices)}")


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------


def all_captions() -> list[str]:
    """The full prompt set: 3 shapes x 6 colours x 4 directions = 72 captions, in a fixed order
    (shape, then colour, then direction, each in the order of its constant)."""
    return [ShapePrompt(colour, shape, direction).caption
            for shape, colour, direction in itertools.product(SHAPES, COLOURS, DIRECTIONS)]


def domain_words() -> list[str]:
    """Every word a caption can hold, in a fixed order (for a word-level tokenizer)."""
    template_words = [w for w in CAPTION_TEMPLATE.split() if not w.startswith("{")]
    return template_words + list(COLOURS) + list(SHAPES) + list(DIRECTIONS)


def parse_caption(caption: str) -> ShapePrompt:
    """Split ``"a {colour} {shape} moving {direction}"`` into its words (ValueError otherwise)."""
    words = caption.strip().lower().split()
    if len(words) != 5 or words[0] != "a" or words[3] != "moving":
        raise ValueError(f"caption {caption!r} does not match {CAPTION_TEMPLATE!r}")
    return ShapePrompt(colour=words[1], shape=words[2], direction=words[4])


# --------------------------------------------------------------------------------------------
# Sampling and rendering
# --------------------------------------------------------------------------------------------


def _clip_rng(seed: int, index: int) -> np.random.Generator:
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng([int(seed), int(index)])


def sample_attributes(rng: np.random.Generator, cfg: ShapesConfig, *, shape: str | None = None,
                      colour: str | None = None, direction: str | None = None) -> ShapeAttributes:
    """Draw one clip's attributes; ``shape`` / ``colour`` / ``direction`` pin those words.

    The draws happen in a fixed order whatever is pinned, so pinning a word leaves the other
    attributes of a given rng state unchanged.
    """
    drawn_shape = SHAPES[rng.integers(len(SHAPES))]
    drawn_colour = tuple(COLOURS)[rng.integers(len(COLOURS))]
    drawn_direction = tuple(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    shape = shape if shape is not None else drawn_shape
    colour = colour if colour is not None else drawn_colour
    direction = direction if direction is not None else drawn_direction
    _check_choice("direction", direction, tuple(DIRECTIONS))

    size = float(rng.uniform(cfg.min_size, cfg.max_size))
    speed = float(rng.uniform(cfg.min_speed, cfg.max_speed))
    half = size / 2
    dx, dy = DIRECTIONS[direction]
    # Centre ranges keep the whole object inside the frame; on the moving axis the leading
    # edge also stays start_margin away from the border ahead.
    x_lo, x_hi = half, cfg.width - half
    y_lo, y_hi = half, cfg.height - half
    if dx > 0:
        x_hi -= cfg.start_margin
    elif dx < 0:
        x_lo += cfg.start_margin
    if dy > 0:
        y_hi -= cfg.start_margin
    elif dy < 0:
        y_lo += cfg.start_margin
    x0 = float(rng.uniform(x_lo, x_hi))
    y0 = float(rng.uniform(y_lo, y_hi))
    start_frame = 0
    # Drawn last and only when asked for, so that share 0 leaves every earlier clip as it was.
    if cfg.mid_video_share > 0 and rng.random() < cfg.mid_video_share:
        start_frame = int(rng.integers(1, cfg.mid_video_max_start + 1))
    return ShapeAttributes(shape=shape, colour=colour, direction=direction, size=size, speed=speed,
                           x0=x0, y0=y0, start_frame=start_frame)


def _bounce(position: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Fold free-flight positions into [lo, hi] as if reflected at both ends."""
    span = hi - lo
    if span <= 0:
        return np.full_like(position, lo)
    phase = np.mod(position - lo, 2 * span)
    return lo + np.where(phase > span, 2 * span - phase, phase)


def trajectory(attrs: ShapeAttributes, cfg: ShapesConfig, num_frames: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Object centre (x [T], y [T]) per frame of the clip (from ``attrs.start_frame`` of the
    trajectory on), bouncing off the borders."""
    frames = cfg.num_frames if num_frames is None else num_frames
    t = attrs.start_frame + np.arange(frames, dtype=np.float64)
    dx, dy = DIRECTIONS[attrs.direction]
    half = attrs.size / 2
    x = _bounce(attrs.x0 + dx * attrs.speed * t, half, cfg.width - half)
    y = _bounce(attrs.y0 + dy * attrs.speed * t, half, cfg.height - half)
    return x, y


def _interval_overlap(lo: np.ndarray, hi: np.ndarray, pixel_lo: np.ndarray) -> np.ndarray:
    """Length of [lo, hi] inside each unit pixel interval [pixel_lo, pixel_lo + 1]."""
    return np.clip(np.minimum(hi, pixel_lo + 1) - np.maximum(lo, pixel_lo), 0.0, 1.0)


def _coverage(attrs: ShapeAttributes, cx: np.ndarray, cy: np.ndarray, cfg: ShapesConfig) -> np.ndarray:
    """Fraction of each pixel covered by the shape, [T, H, W] in [0, 1].

    Squares get their exact area coverage; circles and triangles a one-pixel linear ramp of the
    signed distance to the outline (a close, fast approximation). Without antialiasing a pixel
    is on when its centre is inside.
    """
    half = attrs.size / 2
    cx = cx[:, None, None]  # [T, 1, 1]
    cy = cy[:, None, None]
    cols = np.arange(cfg.width, dtype=np.float64)[None, None, :]  # [1, 1, W]
    rows = np.arange(cfg.height, dtype=np.float64)[None, :, None]  # [1, H, 1]
    px, py = cols + 0.5, rows + 0.5  # pixel centres

    if attrs.shape == "square":
        if cfg.antialias:
            return _interval_overlap(cx - half, cx + half, cols) * _interval_overlap(cy - half, cy + half, rows)
        inside = (np.abs(px - cx) <= half) & (np.abs(py - cy) <= half)
        return inside.astype(np.float64)

    if attrs.shape == "circle":
        signed = half - np.sqrt((px - cx) ** 2 + (py - cy) ** 2)  # > 0 inside
    else:  # triangle: apex up, base at the bottom, base width = height = size
        # Signed distances to the three edges, positive inside. Apex (cx, cy - half), base
        # corners (cx -+ half, cy + half); the slanted edges have inward normals (+-2, 1) / sqrt(5).
        norm = np.sqrt(5.0)
        bottom = (cy + half) - py
        left = ((py - (cy - half)) - 2 * (cx - px)) / norm
        right = ((py - (cy - half)) - 2 * (px - cx)) / norm
        signed = np.minimum(np.minimum(bottom, left), right)
    if cfg.antialias:
        return np.clip(signed + 0.5, 0.0, 1.0)
    return (signed >= 0).astype(np.float64)


def render_clip(attrs: ShapeAttributes, cfg: ShapesConfig, num_frames: int | None = None) -> np.ndarray:
    """Render uint8 frames [T, H, W, 3]."""
    cx, cy = trajectory(attrs, cfg, num_frames)
    cover = _coverage(attrs, cx, cy, cfg)  # [T, H, W]
    rgb = np.asarray(attrs.rgb, dtype=np.float64)
    return np.rint(cover[..., None] * rgb).astype(np.uint8)  # [T, H, W, 3]


def make_clip(seed: int, index: int, cfg: ShapesConfig | None = None, *, caption: str | None = None
              ) -> ShapesClip:
    """Clip ``index`` of ``seed``. With ``caption`` its three words are pinned and the rest
    (size, speed, start) is drawn from the same (seed, index) stream."""
    cfg = cfg or ShapesConfig()
    pinned: dict[str, str] = {}
    if caption is not None:
        prompt = parse_caption(caption)
        pinned = {"shape": prompt.shape, "colour": prompt.colour, "direction": prompt.direction}
    attrs = sample_attributes(_clip_rng(seed, index), cfg, **pinned)
    return ShapesClip(frames=render_clip(attrs, cfg), attributes=attrs, seed=seed, index=index)


# --------------------------------------------------------------------------------------------
# Tensor conversion
# --------------------------------------------------------------------------------------------


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [3, T, H, W] in [-1, 1]."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)  # [3, T, H, W]
    return video.float() / 127.5 - 1.0


def tensor_to_frames(video: torch.Tensor) -> np.ndarray:
    """float [3, T, H, W] in [-1, 1] (clamped) -> uint8 [T, H, W, 3]."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a [3, T, H, W] tensor, got {tuple(video.shape)}")
    pixels = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).cpu().numpy()  # [T, H, W, 3]


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


class ShapesDataset(IterableDataset):
    """An unbounded stream of shapes clips.

    Indexable (``ds[i]`` is clip ``i`` of ``seed``, always the same) and iterable: each
    (rank, DataLoader worker) pair walks its own residue class of indices, so together they draw
    ``start, start + 1, ...`` exactly once and the content of a clip never depends on the split.
    ``rank`` / ``world_size`` default to torch.distributed's when it is initialized.

    Samples are dicts ``{"video": float32 [3, T, H, W] in [-1, 1], "caption": str, "index": int}``
    (the default DataLoader collate stacks them); :meth:`clip` gives the full :class:`ShapesClip`.
    """

    def __init__(self, cfg: ShapesConfig | None = None, seed: int = 0, start: int = 0,
                 rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__()
        if seed < 0 or start < 0:
            raise ValueError(f"seed and start must be >= 0, got seed={seed}, start={start}")
        self.cfg = cfg or ShapesConfig()
        self.seed = seed
        self.start = start
        self.rank, self.world_size = _resolve_rank(rank, world_size)

    def clip(self, index: int) -> ShapesClip:
        return make_clip(self.seed, index, self.cfg)

    def __getitem__(self, index: int) -> dict[str, Any]:
        clip = self.clip(index)
        return {"video": frames_to_tensor(clip.frames), "caption": clip.caption, "index": index}

    def indices(self) -> Iterator[int]:
        """The clip indices this process / worker draws, in order."""
        worker = get_worker_info()
        num_workers, worker_id = (1, 0) if worker is None else (worker.num_workers, worker.id)
        stride = self.world_size * num_workers
        return itertools.count(self.start + self.rank * num_workers + worker_id, stride)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index in self.indices():
            yield self[index]


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    dist = torch.distributed
    initialized = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialized else 1
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size
