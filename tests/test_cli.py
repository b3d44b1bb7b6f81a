"""The sf-generate command (in a subprocess and in-process) on a tiny model folder written by
save_pretrained: its errors, Ctrl-C and SIGTERM, how it writes its output (no overwrite unless
asked, the seed in the default name, one run per output, a full disk), unknown words, an ONNX
artifact from the command line, and the benchmark scripts."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sf_sdk import StreamingGenerator
from sf_sdk.cli import main
from sf_sdk.video import read_video

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red circle moving left"
FPS = 8
# The subprocesses run tiny tensors: one thread each (the machine is shared).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path) -> Path:
    """The shared tiny model (conftest): 2x2 latents (16x16 pixels), a rolling window of 6, 8 fps."""
    return tiny_model_dir


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sf_sdk", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_streams_the_prompt_into_an_mp4(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "video.mp4"
    run = _cli(PROMPT, "--frames", "21", "--seed", "1", "--model", str(model_dir), "--output", str(out),
               "--device", "cpu", "--threads", "1")
    assert run.returncode == 0, run.stderr
    assert "(float32, 1 CPU thread)" in run.stderr and "wrote 21 frames" in run.stderr and "Traceback" not in run.stderr
    video = read_video(out)
    assert video.shape == (21, 16, 16, 3)
    # It is this prompt and seed's video (H.264 is lossy: closer to it than to another seed's).
    gen = StreamingGenerator.from_pretrained(model_dir)
    same = gen.generate(PROMPT, num_frames=21, seed=1).frames.astype(np.float64)
    other = gen.generate(PROMPT, num_frames=21, seed=2).frames.astype(np.float64)
    assert np.abs(video - same).mean() < np.abs(video - other).mean()


def test_cli_user_errors_are_one_line(model_dir: Path) -> None:
    run = _cli("   ")  # fails before any model is loaded
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["sf-generate: error: the prompt is empty: describe the video to generate"]


@pytest.mark.parametrize("args, message", [
    (["--frames", "0"], "--frames must be a positive number"),
    (["--frames", "-5"], "--frames must be a positive number"),
    (["--seconds", "0"], "--seconds must be a positive number"),
    (["--frames", "20"], r"not a whole number of chunks .* nearest valid: \[21, 9\]"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--dtype", "float8"], "unknown dtype 'float8'"),
    (["--window", "0"], "--window must be a positive number"),
    (["--threads", "0"], "--threads must be a positive number"),
    (["--frames", "9", "--backend", "nope"], "backend 'nope' is not available"),
    (["--frames", "9", "--seconds", "1"], "not allowed with argument"),
    (["--frames", "nine"], "invalid int value"),
])
def test_cli_bad_arguments(model_dir: Path, tmp_path: Path, capsys, args: list[str], message: str) -> None:
    try:
        code = main([PROMPT, "--model", str(model_dir), "--output", str(tmp_path / "x.mp4"), *args])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("sf-generate: error:")]
    assert code == 2
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.search(message, errors[0]), errors[0]
    assert not (tmp_path / "x.mp4").exists()


def test_cli_missing_models(tmp_path: Path, capsys, monkeypatch) -> None:
    from sf_sdk.checkpoint import folder

    # An installation without shapes-tiny: patched where resolve_model_path reads it.
    monkeypatch.setattr(folder, "ASSETS_DIR", tmp_path / "assets")
    assert main([PROMPT, "--frames", "9", "--output", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert "bundled model 'shapes-tiny' is missing" in err and "python -m training.train" in err
    assert main([PROMPT, "--model", str(tmp_path / "nowhere")]) == 2
    assert "neither a model folder" in capsys.readouterr().err


def test_cli_seconds_round_up_to_whole_chunks(model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "s.mp4"
    assert main([PROMPT, "--seconds", "1", "--model", str(model_dir), "--output", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "--seconds 1 at 8 fps = 8 frames; rounded up to whole chunks: 9 frames" in err
    assert read_video(out).shape[0] == 9


def test_ctrl_c_leaves_a_valid_mp4(model_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """Ctrl-C while chunks stream: Python turns SIGINT into KeyboardInterrupt in the main thread; it
    is raised here right after the third chunk reached the MP4 writer, deterministically."""
    from sf_sdk import video

    out = tmp_path / "long.mp4"
    real_write = video.Mp4Writer.write
    calls = {"n": 0}

    def write_then_interrupt(self, frames):
        real_write(self, frames)
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(video.Mp4Writer, "write", write_then_interrupt)
    code = main([PROMPT, "--frames", "3993", "--model", str(model_dir), "--output", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 130, err
    assert "interrupted" in err and "Traceback" not in err
    frames = read_video(out)
    assert 9 <= frames.shape[0] < 3993 and frames.shape[1:] == (16, 16, 3)


def test_default_output_is_the_prompt_and_the_seed(model_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from sf_sdk.cli import _default_output

    assert _default_output("A red circle, moving LEFT!", 7) == Path("a_red_circle_moving_left_seed7.mp4")
    # Nothing of a path survives: no separators, no leading dot or dash, never empty.
    for prompt in ("../../etc/passwd", ".hidden -rf", "/", "***"):
        name = _default_output(prompt, 0).name
        assert "/" not in name and name[0] not in ".-" and name.endswith("_seed0.mp4"), name
    assert _default_output("x" * 500, 1).name == "x" * 60 + "_seed1.mp4"
    monkeypatch.chdir(tmp_path)
    for seed in ("1", "2"):  # one prompt, two seeds: two files
        assert main([PROMPT, "--frames", "9", "--seed", seed, "--model", str(model_dir), "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"a_red_circle_moving_left_seed{s}.mp4" for s in "12"]


def test_an_existing_output_needs_overwrite(model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "keep.mp4"
    out.write_bytes(b"an earlier video")
    args = [PROMPT, "--frames", "9", "--model", str(model_dir), "--output", str(out), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{out} exists: pass --overwrite to replace it" in err and "loaded" not in err  # before any loading
    assert out.read_bytes() == b"an earlier video"
    assert main([*args, "--overwrite"]) == 0
    assert read_video(out).shape == (9, 16, 16, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.mp4"]  # no .part left


def test_sigterm_and_a_second_run_on_the_same_output(model_dir: Path, tmp_path: Path, capsys) -> None:
    """A long run in a subprocess: a second run writing the same output fails at once (exit 2), then
    SIGTERM stops the first like Ctrl-C: exit 143 and a finished MP4 of exactly the frames it reports."""
    out = tmp_path / "long.mp4"
    part = tmp_path / ".long.mp4.part"
    proc = subprocess.Popen([sys.executable, "-m", "sf_sdk", PROMPT, "--frames", "3993", "--model", str(model_dir),
                             "--output", str(out), "--no-progress", "--threads", "1"],
                            cwd=REPO, env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (part.exists() and part.stat().st_size > 2000) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        assert main([PROMPT, "--frames", "9", "--model", str(model_dir), "--output", str(out),
                     "--overwrite"]) == 2
        assert "another process is writing" in capsys.readouterr().err
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    said = re.search(r"terminated: .* holds the (\d+) frames written so far", err)
    assert said and err.rstrip().endswith("sf-generate: terminated") and "Traceback" not in err, err
    frames = read_video(out)
    assert frames.shape[0] == int(said.group(1)) and 9 <= frames.shape[0] < 3993
    assert not part.exists()


_FULL_DISK = """
import resource, signal, sys
from sf_sdk.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_fails_cleanly(model_dir: Path, tmp_path: Path) -> None:
    """For real: files of at most 6 kB (RLIMIT_FSIZE), so the MP4 write fails part-way, as on a full
    disk (EFBIG here, ENOSPC there: the same path through the writer)."""
    out = tmp_path / "big.mp4"
    run = subprocess.run([sys.executable, "-c", _FULL_DISK, PROMPT, "--frames", "3993", "--model", str(model_dir),
                          "--output", str(out), "--no-progress", "--threads", "1"], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("sf-generate: failed: OSError: [Errno 27] cannot write") and "File too large" in last
    assert "no file was left there" in last and "Traceback" not in run.stderr
    assert list(tmp_path.iterdir()) == []


def test_unknown_words_are_named(model_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["a red cat surfing left", "--frames", "9", "--model", str(model_dir), "--output",
                 str(tmp_path / "cat.mp4"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "the model does not know the words 'cat', 'surfing'" in err
    assert main([PROMPT, "--frames", "9", "--model", str(model_dir), "--output", str(tmp_path / "ok.mp4"),
                 "--no-progress"]) == 0
    assert "does not know" not in capsys.readouterr().err


def test_an_onnx_artifact_runs_from_the_command_line(model_dir: Path, tmp_path: Path, capsys) -> None:
    """--backend onnxruntime --artifact-dir DIR: the artifacts exported here, with the VAE step."""
    from export import onnx as onnx_export

    artifacts = tmp_path / "onnx"
    assert onnx_export.main(["--model", str(model_dir), "--out", str(artifacts)]) == 0
    base = [PROMPT, "--frames", "9", "--seed", "1", "--model", str(model_dir), "--no-progress"]
    assert main([*base, "--backend", "onnxruntime", "--output", str(tmp_path / "x.mp4")]) == 2
    assert "--backend onnxruntime needs --artifact-dir DIR" in capsys.readouterr().err
    assert main([*base, "--backend", "onnxruntime", "--artifact-dir", str(artifacts),
                 "--output", str(tmp_path / "ort.mp4")]) == 0
    assert main([*base, "--backend", "eager", "--output", str(tmp_path / "eager.mp4")]) == 0
    ort, eager = read_video(tmp_path / "ort.mp4"), read_video(tmp_path / "eager.mp4")
    assert ort.shape == eager.shape == (9, 16, 16, 3)
    assert np.abs(ort.astype(int) - eager).max() <= 2  # the same video, up to float rounding in H.264


def _script(name: str):
    path = REPO / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_latency_benchmark_json(tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    code = _script("latency").main(["--preset", "tiny", "--latent", "2", "2", "--chunks", "3", "--warmup", "1",
                                    "--window", "6", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    res = data["results"]["eager"]
    assert data["device"]["type"] == "cpu" and data["versions"]["torch"] == torch.__version__
    assert data["config"]["streaming"]["local_attn_size"] == 6 and data["config"]["height"] == 16
    assert res["chunks"] == 3 and 0 < res["dit_p50_s"] <= res["e2e_p50_s"]
    assert res["fps_e2e"] <= res["fps_dit"] and res["frames_per_chunk"] == 12
    assert res["peak_memory_mb"] > 0 and res["ttff_s"] > 0


def test_scaling_benchmark_json(capsys) -> None:
    assert _script("scaling").main(["--chunks", "6", "--span", "3", "--warmup", "1", "--latent", "2", "2",
                                    "--no-decode", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["late_over_early"] > 0 and data["rss_growth_mb"] is not None
    assert data["config"]["final_start_frame"] == 3 * 6


def test_vae_training_benchmark_json(capsys) -> None:
    assert _script("vae_training").main(["--steps", "2", "--every", "1", "--dim", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    errors = data["object_error"]
    assert list(errors) == ["plain", "wan", "wan_enc+plain_dec", "frozen_plain_enc+wan_dec"]
    for curve in errors.values():
        assert list(curve) == ["1", "2"] and all(0 < e < 10 for e in curve.values())


def test_vae_frames_benchmark(capsys, tmp_path: Path) -> None:
    bench = _script("vae_frames")
    assert bench.main(["--model", "shapes-tiny", "--frames", "9", "--clips", "1", "--json"]) == 0
    errors = json.loads(capsys.readouterr().out)["error_per_latent_frame"]
    assert len(errors) == 3 and all(0 <= e < 2.5 for e in errors)  # frame 0, then one per 4 frames
    # A run's encoder phase, through its auxiliary decoder.
    from training.train import compose, run

    run(compose("smoke", [f"run_dir={tmp_path}", "stages=[vae]", "vae.steps=1", "vae.decoder_weight=0",
                          "vae.aux_decoder_dim=4"]))
    assert bench.main(["--run", str(tmp_path), "--frames", "5", "--clips", "1", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["error_per_latent_frame"]) == 2
    # A run's newest VAE through the Wan decoder: its vae_decoder stage's latest checkpoint.
    run(compose("smoke", [f"run_dir={tmp_path}", "stages=[vae_decoder]", "vae_decoder.steps=1"]))
    assert bench.main(["--model", str(tmp_path), "--frames", "5", "--clips", "1", "--json"]) == 0
    assert "vae_decoder/checkpoints step 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--model", "shapes-tiny", "--frames", "8"])


def test_short_cpu_videos_run_eagerly_under_auto(model_dir: Path, tmp_path: Path, capsys,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import sf_sdk.cli as cli
    from sf_sdk.generator import StreamingGenerator as Gen

    used: list[str] = []
    real_use = Gen.use_backend
    monkeypatch.setattr(Gen, "use_backend", lambda self, name, options=None: (used.append(name),
                                                                              real_use(self, name, options))[1])
    args = [PROMPT, "--frames", "9", "--model", str(model_dir), "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "short.mp4")]) == 0
    err = capsys.readouterr().err
    assert "backend auto: a video of 1 chunk runs eagerly" in err and "auto" not in used, err
    monkeypatch.setattr(cli, "AUTO_MIN_CHUNKS", 1)  # a video that long takes auto's pick
    assert main([*args, "--output", str(tmp_path / "long.mp4")]) == 0
    assert "runs eagerly" not in capsys.readouterr().err and used[-1] == "auto"
