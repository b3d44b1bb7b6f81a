"""The synthetic shapes domain: spec, determinism, dataset splitting, vocabulary."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from training.data.shapes import (
    COLOURS,
    DIRECTIONS,
    SHAPES,
    ShapeAttributes,
    ShapesConfig,
    ShapesDataset,
    all_captions,
    domain_words,
    frames_to_tensor,
    make_clip,
    parse_caption,
    render_clip,
    sample_attributes,
    tensor_to_frames,
    trajectory,
)

CFG = ShapesConfig()


def _mask_stats(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per frame: coverage sum, centroid (x, y) and bounding box (x0, y0, x1, y1) of pixels at least
    half covered."""
    cover = frames.max(axis=-1).astype(np.float64) / 255.0  # [T, H, W]
    ys, xs = np.arange(cover.shape[1]) + 0.5, np.arange(cover.shape[2]) + 0.5
    mass = cover.sum(axis=(1, 2))
    cx = (cover.sum(axis=1) * xs).sum(axis=1) / mass
    cy = (cover.sum(axis=2) * ys).sum(axis=1) / mass
    boxes = []
    for frame in cover >= 0.5:
        rows, cols = np.nonzero(frame)
        boxes.append((cols.min(), rows.min(), cols.max() + 1, rows.max() + 1))
    return mass, np.stack([cx, cy], axis=1), np.array(boxes)


def test_clip_format_and_determinism() -> None:
    clip = make_clip(seed=3, index=17)
    assert clip.frames.shape == (33, 64, 64, 3) and clip.frames.dtype == np.uint8
    again = make_clip(seed=3, index=17)
    np.testing.assert_array_equal(clip.frames, again.frames)
    assert clip.attributes == again.attributes
    assert not np.array_equal(clip.frames, make_clip(seed=3, index=18).frames)
    assert not np.array_equal(clip.frames, make_clip(seed=4, index=17).frames)
    assert clip.caption == f"a {clip.attributes.colour} {clip.attributes.shape} moving {clip.attributes.direction}"


def test_attribute_ranges_and_coverage() -> None:
    rng = np.random.default_rng(0)
    drawn = [sample_attributes(rng, CFG) for _ in range(2000)]
    assert {a.caption for a in drawn} == set(all_captions())
    for a in drawn:
        assert CFG.min_size <= a.size <= CFG.max_size
        assert CFG.min_speed <= a.speed <= CFG.max_speed
        half = a.size / 2
        assert half <= a.x0 <= CFG.width - half and half <= a.y0 <= CFG.height - half
        dx, dy = DIRECTIONS[a.direction]
        # Distance from the leading edge to the border ahead.
        ahead = {(1, 0): CFG.width - (a.x0 + half), (-1, 0): a.x0 - half,
                 (0, 1): CFG.height - (a.y0 + half), (0, -1): a.y0 - half}[(dx, dy)]
        assert ahead >= CFG.start_margin - 1e-9


@pytest.mark.parametrize("index", range(12))
def test_rendered_clip_matches_its_attributes(index: int) -> None:
    clip = make_clip(seed=1, index=index)
    a = clip.attributes
    frames = clip.frames
    # Pure colour on black: channels off in the colour are zero everywhere.
    off = [c for c in range(3) if a.rgb[c] == 0]
    assert frames[..., off].max(initial=0) == 0
    lit = frames.max(axis=-1) > 0
    assert lit.any(axis=(1, 2)).all(), "the object must be visible in every frame"
    mass, centroid, boxes = _mask_stats(frames)
    expected_area = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}[a.shape] * a.size ** 2
    np.testing.assert_allclose(mass, expected_area, rtol=0.06)
    # Size across matches (bounding box of half-covered pixels, within antialiasing).
    widths = boxes[:, 2] - boxes[:, 0]
    assert np.all(np.abs(widths - a.size) <= 1.5)
    # The stated direction holds over the first straight_frames frames at the drawn speed.
    n = CFG.straight_frames
    steps = np.diff(centroid[:n], axis=0)  # [n-1, 2]
    unit = np.array(DIRECTIONS[a.direction], dtype=np.float64)
    np.testing.assert_allclose(steps @ unit, a.speed, atol=0.15)
    np.testing.assert_allclose(steps @ unit[::-1], 0.0, atol=0.1)


def test_bounces_stay_inside_and_reverse() -> None:
    attrs = ShapeAttributes(shape="square", colour="red", direction="right", size=16.0, speed=2.0,
                            x0=20.0, y0=30.0)
    x, y = trajectory(attrs, CFG, num_frames=129)
    assert x.min() >= 8.0 and x.max() <= CFG.width - 8.0
    np.testing.assert_allclose(y, 30.0)
    velocity = np.diff(x)
    assert (velocity > 0).any() and (velocity < 0).any(), "the object must bounce back"
    np.testing.assert_allclose(np.abs(velocity[np.abs(np.abs(velocity) - 2.0) < 1e-9]), 2.0)
    frames = render_clip(attrs, CFG, num_frames=129)
    assert frames.shape == (129, 64, 64, 3)
    _, _, boxes = _mask_stats(frames)
    assert boxes[:, 0].min() >= 0 and boxes[:, 2].max() <= CFG.width


def test_shapes_are_told_apart_by_fill_ratio() -> None:
    cfg = ShapesConfig(antialias=False)
    fills = {}
    for shape in SHAPES:
        attrs = ShapeAttributes(shape=shape, colour="green", direction="up", size=20.0, speed=1.0,
                                x0=32.0, y0=40.0)
        lit = render_clip(attrs, cfg, num_frames=1)[0].max(axis=-1) > 0
        rows, cols = np.nonzero(lit)
        fills[shape] = lit.sum() / ((np.ptp(rows) + 1) * (np.ptp(cols) + 1))
    assert fills["triangle"] < 0.6 < fills["circle"] < 0.85 < fills["square"]


def test_vocabulary_and_prompt_set() -> None:
    captions = all_captions()
    assert len(captions) == len(set(captions)) == len(SHAPES) * len(COLOURS) * len(DIRECTIONS) == 72
    words = domain_words()
    assert len(words) == len(set(words)) == 15
    assert {w for c in captions for w in c.split()} == set(words)
    for caption in captions:
        assert parse_caption(caption).caption == caption
    assert parse_caption("  A Red Circle moving LEFT ").shape == "circle"
    for bad in ("a red circle moving", "a purple circle moving left", "a red hexagon moving left",
                "a red circle going left", "the red circle moving left"):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_caption_pinning_keeps_the_rest_of_the_draw() -> None:
    pinned = make_clip(5, 9, caption="a cyan triangle moving down")
    assert pinned.caption == "a cyan triangle moving down"
    free = make_clip(5, 9)
    assert pinned.attributes.size == free.attributes.size
    assert pinned.attributes.speed == free.attributes.speed


def test_mid_video_clips_are_later_windows_of_the_same_trajectory() -> None:
    mixed = ShapesConfig(mid_video_share=0.3, mid_video_max_start=96)
    starts, later_attrs = [], []
    for index in range(400):
        plain, later = make_clip(3, index), make_clip(3, index, mixed)
        a, b = plain.attributes, later.attributes
        # share 0 draws nothing more: every other attribute is the plain clip's, caption included
        assert (a.shape, a.colour, a.direction, a.size, a.speed, a.x0, a.y0, a.start_frame) == (
            b.shape, b.colour, b.direction, b.size, b.speed, b.x0, b.y0, 0) or b.start_frame > 0
        assert a.start_frame == 0 and later.caption == plain.caption
        starts.append(b.start_frame)
        later_attrs.append(b)
        if b.start_frame:
            assert 1 <= b.start_frame <= 96
            long = render_clip(a, CFG, num_frames=b.start_frame + CFG.num_frames)
            np.testing.assert_array_equal(later.frames, long[b.start_frame:])
        else:
            np.testing.assert_array_equal(later.frames, plain.frames)
    share = np.mean(np.array(starts) > 0)
    assert 0.22 < share < 0.38, share
    # some windows move against their caption with no bounce in view: what a rolling window sees
    against = 0
    for b in (attrs for attrs in later_attrs if attrs.start_frame):
        x, y = trajectory(b, CFG)
        dx, dy = DIRECTIONS[b.direction]
        along = np.diff(x) * dx + np.diff(y) * dy
        against += bool((along < 0).all())
    assert against >= 5  # 10 of the ~120 windows here
    with pytest.raises(ValueError, match="mid_video_share"):
        ShapesConfig(mid_video_share=1.5)
    with pytest.raises(ValueError, match="mid_video_max_start"):
        ShapesConfig(mid_video_max_start=0)
    with pytest.raises(ValueError, match="start_frame"):
        ShapeAttributes(shape="circle", colour="red", direction="up", size=12, speed=1, x0=30, y0=30,
                        start_frame=-1)


def test_tensor_round_trip() -> None:
    frames = make_clip(0, 0).frames
    video = frames_to_tensor(frames)
    assert video.shape == (3, 33, 64, 64) and video.dtype == torch.float32
    assert video.min() >= -1.0 and video.max() <= 1.0 and video.min() == -1.0
    np.testing.assert_array_equal(tensor_to_frames(video), frames)
    with pytest.raises(ValueError):
        frames_to_tensor(frames.astype(np.float32))
    with pytest.raises(ValueError):
        tensor_to_frames(video[0])


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="1 \\+ 4"):
        ShapesConfig(num_frames=32)
    with pytest.raises(ValueError):
        ShapesConfig(min_size=20, max_size=12)
    with pytest.raises(ValueError):
        ShapesConfig(max_size=50)  # plus the 16 px margin does not fit in 64 px
    assert ShapesConfig(num_frames=9).num_frames == 9
    assert CFG.straight_frames == 8
    with pytest.raises(ValueError):
        ShapeAttributes(shape="star", colour="red", direction="up", size=12, speed=1, x0=30, y0=30)
    with pytest.raises(ValueError):
        make_clip(-1, 0)


def test_dataset_index_and_rank_split_are_consistent() -> None:
    cfg = ShapesConfig(num_frames=5)
    full = ShapesDataset(cfg, seed=2)
    sample = full[4]
    assert sample["video"].shape == (3, 5, 64, 64) and isinstance(sample["caption"], str)
    seen = {}
    for rank in range(2):
        ds = ShapesDataset(cfg, seed=2, rank=rank, world_size=2)
        for _, item in zip(range(3), ds):
            seen[item["index"]] = item
    assert sorted(seen) == list(range(6))
    for index, item in seen.items():
        torch.testing.assert_close(item["video"], full[index]["video"], rtol=0, atol=0)
        assert item["caption"] == full[index]["caption"]
    with pytest.raises(ValueError):
        ShapesDataset(cfg, rank=2, world_size=2)


def test_dataloader_workers_draw_each_index_once() -> None:
    cfg = ShapesConfig(num_frames=5)
    ds = ShapesDataset(cfg, seed=7, start=10)
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    items = [item for _, item in zip(range(6), loader)]
    assert sorted(int(item["index"]) for item in items) == list(range(10, 16))
    for item in items:
        torch.testing.assert_close(item["video"], ds[int(item["index"])]["video"], rtol=0, atol=0)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["video"].shape == (4, 3, 5, 64, 64) and len(batch["caption"]) == 4
