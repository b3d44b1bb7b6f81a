"""The shapes evaluator: the strict checks (the default) on rendered clips, noise and blank
videos and wrong captions; the failure cases a person sees and the old scoring passed; the bounce
rule and the stuck rate; robustness to a generative model's mild blur and colour drift; the
benchmark loop and the CLI."""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from training.data.shapes import (
    COLOURS,
    ShapeAttributes,
    ShapesConfig,
    _coverage,
    all_captions,
    make_clip,
    parse_caption,
)
from training.eval.shapes_bench import (
    CHECKS,
    FAILURE_CASES,
    FAILURE_SHAPES,
    OLD_CHECKS,
    BenchConfig,
    _label_components,
    _template_coverage,
    contact_sheet,
    main,
    render_failure,
    run_benchmark,
    score_video,
)

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def _blur(frames: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of [T, H, W, 3] (float out)."""
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma ** 2))
    taps /= taps.sum()
    out = frames.astype(np.float64)
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad)
        out = sum(w * np.take(padded, np.arange(i, i + out.shape[axis]), axis=axis) for i, w in enumerate(taps))
    return out


def _model_like(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What an imperfect generator might produce: blur, colour crosstalk, a dim noisy background."""
    crosstalk = np.array([[0.85, 0.12, 0.08], [0.1, 0.8, 0.12], [0.1, 0.1, 0.85]])
    out = _blur(frames, 1.0) @ crosstalk.T * 0.9 + 8 + rng.normal(0, 6, frames.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _flood_fill_labels(mask: np.ndarray) -> np.ndarray:
    """Reference 8-connected labelling: -1 off the mask, else the component's smallest flat index."""
    labels = -np.ones(mask.shape, dtype=np.int64)
    for start in zip(*np.nonzero(mask)):
        if labels[start] >= 0:
            continue
        root = int(np.ravel_multi_index(start, mask.shape))
        labels[start], stack = root, [start]
        while stack:
            t, y, x = stack.pop()
            for yy in range(max(y - 1, 0), min(y + 2, mask.shape[1])):
                for xx in range(max(x - 1, 0), min(x + 2, mask.shape[2])):
                    if mask[t, yy, xx] and labels[t, yy, xx] < 0:
                        labels[t, yy, xx] = root
                        stack.append((t, yy, xx))
    return labels


@pytest.mark.parametrize("density", [0.1, 0.45, 0.8])
def test_connected_components_match_a_flood_fill(density: float) -> None:
    mask = np.random.default_rng(3).random((3, 20, 24)) < density
    np.testing.assert_array_equal(_label_components(mask), _flood_fill_labels(mask))


def test_templates_are_the_renderers_geometry() -> None:
    """The strict shape check fits the renderer's own antialiased shapes: a rendered frame is its template."""
    rng = np.random.default_rng(0)
    cfg = ShapesConfig()
    for shape in ("circle", "square", "triangle"):
        for _ in range(5):
            size, x, y = rng.uniform(12, 20), rng.uniform(10, 54), rng.uniform(10, 54)
            attrs = ShapeAttributes(shape=shape, colour="red", direction="left", size=size, speed=1.0, x0=x, y0=y)
            expected = _coverage(attrs, np.array([x]), np.array([y]), cfg)  # [1, H, W]
            got = _template_coverage(shape, np.array([[x, y, size]]), np.arange(cfg.width), np.arange(cfg.height))
            np.testing.assert_array_equal(got, expected)


# Tiny clips: 17 frames hold the start and, for about half of them, a bounce.
CLIP = ShapesConfig(num_frames=17)


@pytest.fixture(scope="module")
def real_clips() -> list[tuple[str, np.ndarray]]:
    return [(caption, make_clip(0, i, CLIP, caption=caption).frames) for i, caption in enumerate(all_captions())]


def test_real_clips_score_high(real_clips: list[tuple[str, np.ndarray]]) -> None:
    results = [score_video(frames, caption) for caption, frames in real_clips]
    scores = np.array([r.score for r in results])
    assert scores.mean() >= 0.97
    assert scores.min() >= 0.9
    assert set(results[0].checks) == set(CHECKS)
    assert sum(r.details["bounces"] for r in results) >= 20  # the bounce rule was exercised
    for r, (caption, _) in zip(results, real_clips):
        prompt = parse_caption(caption)
        assert (r.details["colour"], r.details["shape"]) == (prompt.colour, prompt.shape)
        assert r.details["stuck_rate"] == 0.0 and r.details["wrong_way_steps"] == 0
    old = [score_video(frames, caption, strict=False) for caption, frames in real_clips[::6]]
    assert set(old[0].checks) == set(OLD_CHECKS) and min(r.score for r in old) >= 0.95


def test_noise_and_blank_score_low() -> None:
    rng = np.random.default_rng(0)
    shape = (33, 64, 64, 3)
    for caption in all_captions()[::9]:
        noise = rng.integers(0, 256, shape, dtype=np.uint8)
        assert score_video(noise, caption).score <= 0.1
        assert score_video(np.zeros(shape, np.uint8), caption).score <= 0.1
        dim_noise = rng.integers(0, 80, shape, dtype=np.uint8)
        assert score_video(dim_noise, caption).score <= 0.1


def test_wrong_colour_shape_or_direction_loses_the_score(real_clips: list[tuple[str, np.ndarray]]) -> None:
    colours = list(COLOURS)
    for caption, frames in real_clips[::8]:
        p = parse_caption(caption)
        wrong_colour = f"a {colours[(colours.index(p.colour) + 2) % 6]} {p.shape} moving {p.direction}"
        wrong_shape = f"a {p.colour} {'circle' if p.shape != 'circle' else 'square'} moving {p.direction}"
        wrong_direction = f"a {p.colour} {p.shape} moving {OPPOSITE[p.direction]}"
        perpendicular = f"a {p.colour} {p.shape} moving {'up' if p.direction in ('left', 'right') else 'left'}"
        for bad, check in ((wrong_colour, "colour"), (wrong_shape, "shape"), (wrong_direction, "direction"),
                           (perpendicular, "direction")):
            result = score_video(frames, bad)
            assert result.score <= 0.1, (bad, result)
            assert result.checks[check] <= 0.1
            # Only that check failed, or for a direction the motion checks, which all read the caption's axis.
            related = {check, "bounce", "speed"} if check == "direction" else {check}
            assert min(v for c, v in result.checks.items() if c not in related) >= 0.95, (bad, result.checks)


def test_partial_failures_show_in_their_checks() -> None:
    caption = "a red square moving right"
    frames = make_clip(0, 2, caption=caption).frames
    vanishing = frames.copy()
    vanishing[16:] = 0
    r = score_video(vanishing, caption)
    assert 0.4 <= r.checks["presence"] <= 0.6 and r.score <= 0.6

    static = np.repeat(frames[:1], len(frames), axis=0)
    r = score_video(static, caption)
    assert r.checks["direction"] == 0.0 and r.checks["shape"] == 1.0
    assert r.checks["speed"] == 0.0 and r.details["stuck_rate"] == 1.0

    second = make_clip(0, 3, caption="a red circle moving up").frames
    r = score_video(np.maximum(frames, second), caption)
    assert r.checks["single_object"] < 0.8 and r.score < 0.2

    recoloured = frames.copy()
    recoloured[16:] = recoloured[16:][..., [1, 0, 2]]  # red turns green half-way
    r = score_video(recoloured, caption)
    assert r.checks["colour"] < 0.6 and r.checks["stability"] < 0.6

    grey_background = np.maximum(frames, 70).astype(np.uint8)
    r = score_video(grey_background, caption)
    assert r.checks["background"] <= 0.1


# The check that catches each failure case, and what it reads.
CAUGHT_BY = {"rounded_square": "shape", "arrowhead": "shape", "blurred": "sharpness", "stuck_at_border": "speed",
             "fragment": "single_object"}


@pytest.mark.parametrize("kind", list(FAILURE_CASES))
def test_failure_cases_fail_and_the_old_scoring_passed_them(kind: str) -> None:
    """What a person sees as wrong scores low on the strict checks; the old scoring passed it."""
    captions = [c for c in all_captions() if parse_caption(c).shape == FAILURE_SHAPES.get(kind, parse_caption(c).shape)]
    domain = ShapesConfig()  # 33 frames: the stuck object stands still for 24 of its 32 steps
    for caption in captions[1::len(captions) // 3]:  # three clips
        attrs = make_clip(0, all_captions().index(caption), domain, caption=caption).attributes
        frames = render_failure(kind, attrs, domain)
        strict, old = score_video(frames, caption), score_video(frames, caption, strict=False)
        assert old.score >= 0.9, (kind, caption, old.checks)
        assert strict.score <= 0.35 and strict.checks[CAUGHT_BY[kind]] <= 0.35, (kind, caption, strict.checks)
        failures = strict.details["shape_failures"]
        if kind == "rounded_square":
            assert failures["corners"] >= 0.9 * len(frames)
        elif kind == "arrowhead":
            assert failures["template"] + failures["solidity"] == len(frames)
        elif kind == "stuck_at_border":
            assert strict.details["stuck_rate"] >= 0.6 and strict.checks["bounce"] == 1.0
    with pytest.raises(ValueError, match="square"):
        render_failure("rounded_square", make_clip(0, 0, caption="a red circle moving left").attributes, domain)


def _render_track(attrs: ShapeAttributes, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """uint8 frames [T, 64, 64, 3] of the object of ``attrs`` with its centre at x [T], y [T]."""
    params = np.stack([x, y, np.full_like(x, attrs.size)], axis=1)
    cover = _template_coverage(attrs.shape, params, np.arange(64), np.arange(64))  # [T, H, W]
    return np.rint(cover[..., None] * np.asarray(attrs.rgb, dtype=np.float64)).astype(np.uint8)


def test_motion_over_the_whole_video_follows_the_bounce_rule() -> None:
    caption = "a green circle moving right"
    long = ShapesConfig(num_frames=81)
    clip = make_clip(0, 5, long, caption=caption)
    r = score_video(clip.frames, caption)
    assert r.details["bounces"] >= 2 and r.score >= 0.97
    assert (r.checks["bounce"], r.checks["speed"], r.details["stuck_rate"]) == (1.0, 1.0, 0.0)

    attrs = replace(clip.attributes, x0=16.0, speed=1.5)
    t = np.arange(49, dtype=np.float64)
    y = np.full_like(t, attrs.y0)
    # Turns back half-way across the frame, with no border near: 24 of its 48 steps go the wrong way.
    early = attrs.x0 + attrs.speed * np.minimum(t, 48 - t)
    r = score_video(_render_track(attrs, early, y), caption)
    assert r.details["wrong_way_steps"] == 24 and r.checks["bounce"] == 0.5 and r.details["bounces"] == 0
    # Stops every fourth step (a judder): a quarter of the steps stand still.
    judder = attrs.x0 + attrs.speed * (t[:33] - t[:33] // 4)
    r = score_video(_render_track(attrs, judder, y[:33]), caption)
    assert r.details["stuck_rate"] == pytest.approx(8 / 32) and r.checks["speed"] == pytest.approx(24 / 32)
    # Drifts at a third of the domain's slowest speed: moving, but too slow.
    slow = attrs.x0 + 0.6 * t
    r = score_video(_render_track(attrs, slow, y), caption)
    assert r.details["stuck_rate"] == 0.0 and r.checks["speed"] == 0.0 and r.checks["bounce"] == 1.0


def test_far_half_share_tells_bouncing_from_hovering_at_the_captions_border() -> None:
    caption = "a green circle moving right"
    clip = make_clip(0, 5, ShapesConfig(num_frames=333), caption=caption)
    r = score_video(clip.frames, caption)
    assert 0.4 <= r.details["far_half_share"] <= 0.6
    # what the long streams do: bounce at the right border, come back 12-20 px, turn right again
    attrs = replace(clip.attributes, speed=1.5)
    t = np.arange(333, dtype=np.float64)
    right = 64 - attrs.size / 2
    hover = right - np.abs(((t * attrs.speed) % 32) - 16)  # 16 px back from the border and again
    r = score_video(_render_track(attrs, hover, np.full_like(t, attrs.y0)), caption)
    assert r.details["far_half_share"] < 0.05
    result = run_benchmark(lambda prompt, n, seed: clip.frames, [caption], num_frames=333, seeds=[0])
    assert 0.4 <= result["far_half_share"] <= 0.6


def test_robust_to_blur_and_colour_drift(real_clips: list[tuple[str, np.ndarray]]) -> None:
    """A mild blur (sigma 1 px, the VAE's softness), colour crosstalk and a dim noisy background pass;
    a sigma 1.5 px blur is the ``blurred`` failure case."""
    rng = np.random.default_rng(1)
    scores = [score_video(_model_like(frames, rng), caption).score for caption, frames in real_clips[::4]]
    assert np.mean(scores) >= 0.9


def test_survives_an_mp4_round_trip(tmp_path: Path) -> None:
    """H.264 (4:2:0) keeps luma at full resolution and halves chroma. Objects whose edges the luma
    carries keep their strict scores; a pure red or blue triangle's edges come back in 2x2 chroma
    blocks, which the strict shape check reads as misshapen (the benchmark scores decoded frames;
    MP4s are only written for viewing). The old scoring survived either."""
    from sf_sdk.video import Mp4Writer, read_video

    clip = ShapesConfig(num_frames=17)
    captions = ["a yellow triangle moving up", "a cyan square moving left", "a green circle moving down",
                "a red square moving right", "a red triangle moving left"]
    for i, caption in enumerate(captions):
        frames = make_clip(0, i, clip, caption=caption).frames
        path = tmp_path / f"{i}.mp4"
        with Mp4Writer(path, fps=16) as writer:
            writer.write(frames)
        decoded = read_video(path)
        assert score_video(decoded, caption, strict=False).score >= 0.95
        if "red triangle" not in caption:
            assert score_video(decoded, caption).score >= 0.9, caption


def test_input_validation() -> None:
    frames = make_clip(0, 0).frames
    caption = make_clip(0, 0).caption
    assert score_video(torch.from_numpy(frames), caption).score == score_video(frames, caption).score
    with pytest.raises(ValueError, match="uint8"):
        score_video(frames.astype(np.float32), caption)
    with pytest.raises(ValueError, match="T, H, W, 3"):
        score_video(frames[0], caption)
    with pytest.raises(ValueError, match="64x64"):
        score_video(np.zeros((5, 32, 32, 3), np.uint8), caption)
    with pytest.raises(ValueError):
        score_video(frames, "a red blob moving left")
    with pytest.raises(ValueError):
        BenchConfig(fg_threshold=0.6)
    with pytest.raises(ValueError, match="min_solidity"):
        BenchConfig(min_solidity=1.5)
    with pytest.raises(ValueError, match="stuck_speed"):
        BenchConfig(stuck_speed=0.9)


def _read_png(path: Path) -> np.ndarray:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    idat = data.index(b"IDAT")
    (length,) = struct.unpack(">I", data[idat - 4:idat])
    raw = np.frombuffer(zlib.decompress(data[idat + 4:idat + 4 + length]), np.uint8)
    return raw.reshape(height, 1 + width * 3)[:, 1:].reshape(height, width, 3)


def test_run_benchmark_with_an_oracle_and_a_noise_generator(tmp_path: Path) -> None:
    prompts = all_captions()[::12]
    cfg = BenchConfig(domain=ShapesConfig(num_frames=17))

    def oracle(prompt: str, num_frames: int, seed: int) -> torch.Tensor:
        clip = make_clip(seed, 0, ShapesConfig(num_frames=num_frames), caption=prompt)
        return torch.from_numpy(clip.frames)

    result = run_benchmark(oracle, prompts, num_frames=17, seeds=[0, 1], cfg=cfg, out_dir=tmp_path,
                           save_png=True)
    json.dumps(result)
    assert result["mean_score"] >= 0.97 and result["num_videos"] == 2 * len(prompts)
    assert set(result["checks"]) == set(CHECKS) and set(result["per_prompt"]) == set(prompts)
    assert result["stuck_rate"] == 0.0
    assert all("stuck_rate" in s["details"] for entry in result["per_prompt"].values() for s in entry["seeds"])
    entry = result["per_prompt"][prompts[0]]
    assert [s["seed"] for s in entry["seeds"]] == [0, 1]
    assert len(list(tmp_path.glob("*.mp4"))) == len(list(tmp_path.glob("*.png"))) == 2 * len(prompts)
    sheet_path = sorted(tmp_path.glob("*.png"))[0]
    png = _read_png(sheet_path)
    stem = sheet_path.stem.rsplit("_s", 1)
    prompt = next(p for p in prompts if p.replace(" ", "_") == stem[0])
    expected = contact_sheet(make_clip(int(stem[1]), 0, ShapesConfig(num_frames=17), caption=prompt).frames)
    np.testing.assert_array_equal(png, expected)

    rng = np.random.default_rng(0)
    noise = run_benchmark(lambda p, n, s: rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8), prompts,
                          num_frames=17, seeds=[0], cfg=cfg)
    assert noise["mean_score"] <= 0.1
    old = run_benchmark(oracle, prompts, num_frames=17, seeds=[0], cfg=cfg, strict=False)
    assert set(old["checks"]) == set(OLD_CHECKS) and "stuck_rate" not in old
    with pytest.raises(ValueError):
        run_benchmark(oracle, ["not a caption"], num_frames=17, seeds=[0], cfg=cfg)


def test_cli_calibrate_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Rendered clips pass, every failure case fails; ``--old`` passes the failure cases."""
    prompts = ["a red circle moving left", "a cyan square moving up", "a yellow triangle moving down"]
    args = ["--calibrate", "--json", "--frames", "25", "--prompts", *prompts]
    assert main([*args, "--out-dir", str(tmp_path), "--save-png"]) == 0
    out = json.loads(capsys.readouterr().out)
    figures = out["calibration"]
    assert figures["real"]["mean_score"] >= 0.97 and figures["real"]["num_videos"] == 3
    for name in ("noise", "blank", "wrong_colour", "wrong_direction"):
        assert figures[name]["mean_score"] <= 0.1
    for name in FAILURE_CASES:  # the fragment shows in 16 of the 25 frames
        assert figures[name]["max_score"] <= 0.4, (name, figures[name])
    assert figures["rounded_square"]["num_videos"] == 1 and figures["fragment"]["num_videos"] == 3
    assert out["config"]["frames"] == 25 and out["config"]["strict"] is True
    assert {p.stem for p in tmp_path.glob("*.png")} == set(figures)
    assert main([*args, "--old"]) == 0
    old = json.loads(capsys.readouterr().out)["calibration"]
    assert all(old[name]["min_score"] >= 0.9 for name in ("real", *FAILURE_CASES)), old
    with pytest.raises(SystemExit):
        main(["--json"])  # neither --model nor --calibrate


def test_cli_reconstruct_scores_real_clips_through_the_bundled_vae(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", "shapes-tiny", "--reconstruct", "--json", "--frames", "9",
                 "--prompts", "a magenta square moving right"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["config"]["reconstruct"] is True and result["num_videos"] == 1
    # The VAE keeps one object on a clean background in every frame of a real clip.
    assert result["checks"]["presence"] == 1.0 and result["checks"]["background"] > 0.9


def test_cli_jobs_score_as_one_process(capsys: pytest.CaptureFixture[str]) -> None:
    """Worker processes (each loading the model) give the per-video scores of a single process."""
    args = ["--model", "shapes-tiny", "--json", "--frames", "9", "--threads", "1",
            "--prompts", "a red circle moving left", "a cyan square moving up", "a yellow triangle moving down"]
    results = []
    threads = torch.get_num_threads()
    for jobs in ("1", "2"):
        assert main([*args, "--jobs", jobs]) == 0
        results.append(json.loads(capsys.readouterr().out))
        assert torch.get_num_threads() == threads  # --threads holds inside main() only
    serial, parallel = results
    assert parallel["config"]["jobs"] == 2 and parallel["config"]["threads"] == 1
    assert list(parallel["per_prompt"]) == list(serial["per_prompt"])
    assert parallel["per_prompt"] == serial["per_prompt"]
    assert parallel["mean_score"] == serial["mean_score"] and parallel["num_videos"] == 3
    with pytest.raises(SystemExit):
        main([*args, "--jobs", "0"])


def test_the_bundled_model_draws_what_the_prompt_says(capsys: pytest.CaptureFixture[str]) -> None:
    """shapes-tiny through the SDK's sampling path: right colour, the right initial direction, an
    object on a clean background in every video (a speck beside it in a few frames at most). Its
    shapes and its motion over the clip are what the strict checks fail (docs/training.md, "Strict
    evaluator"): the floors here only catch a regression."""
    prompts = all_captions()[::5]
    assert main(["--model", "shapes-tiny", "--json", "--prompts", *prompts]) == 0
    result = json.loads(capsys.readouterr().out)
    for prompt, entry in result["per_prompt"].items():
        for check in ("presence", "background", "colour", "direction"):
            assert entry["checks"][check] >= 0.9, (prompt, check, entry["checks"])
        assert entry["checks"]["single_object"] >= 0.8, (prompt, entry["checks"])
    assert result["checks"]["single_object"] >= 0.95
    assert result["mean_score"] >= 0.15, result["checks"]
    assert result["checks"]["bounce"] >= 0.8 and result["stuck_rate"] <= 0.2, result["checks"]
