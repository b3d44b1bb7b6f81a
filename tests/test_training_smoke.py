"""The smoke recipe end to end: every stage at toy sizes, one process and torchrun with two.

``python -m training.train --config-name smoke`` must train, checkpoint, plot, sample and export
a model that ``StreamingGenerator.from_pretrained`` streams; the two-process run must agree on
every random exit step (metrics average them over ranks, so a disagreement shows as a fraction).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("vae", "teacher", "ode_init", "self_forcing")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _metrics(run_dir: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    _run([sys.executable, "-m", "training.train", "--config-name", "smoke", f"run_dir={run_dir}"])
    return run_dir


def test_smoke_single_process(smoke_run: Path) -> None:
    for stage in STAGES:
        assert (smoke_run / stage / "final" / "DONE").is_file(), stage
        records = _metrics(smoke_run, stage)
        assert [r["step"] for r in records] == list(range(1, len(records) + 1)), stage
        assert all(isinstance(v, (int, float)) for r in records for v in r.values())
        assert (smoke_run / stage / "losses.png").stat().st_size > 0
        assert list((smoke_run / stage / "checkpoints").glob("ckpt-*.safetensors"))
    assert (smoke_run / "teacher" / "samples" / "sample-final.mp4").stat().st_size > 0
    assert (smoke_run / "self_forcing" / "samples" / "sample-final.mp4").stat().st_size > 0


def test_smoke_export_streams(smoke_run: Path) -> None:
    from sf_sdk.checkpoint import read_index
    from sf_sdk.generator import StreamingGenerator

    folder = smoke_run / "export" / "shapes-tiny"
    files = read_index(folder)
    assert files.streaming.num_frame_per_block == 1 and files.streaming.local_attn_size == 2
    assert (files.streaming.latent_height, files.streaming.latent_width) == (4, 4)
    assert files.extra["fps"] == 16
    assert files.vae is not None and files.vae.latents_std != (1.0,) * files.vae.z_dim  # measured stats
    gen = StreamingGenerator.from_pretrained(folder)
    video = gen.generate("a red circle moving left", num_frames=9, seed=0)
    assert video.frames.shape == (9, 32, 32, 3)


def test_smoke_torchrun_two_processes(smoke_run: Path, tmp_path: Path) -> None:
    # Reuse the finished early stages; run self_forcing (exit-step sync) and export with 2 ranks.
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir, ignore=shutil.ignore_patterns("self_forcing", "export"))
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          "-m", "training.train", "--config-name", "smoke", f"run_dir={run_dir}", "self_forcing.steps=4"])
    records = _metrics(run_dir, "self_forcing")
    assert len(records) == 4
    # exit_step is averaged over the two ranks: an integer only if both drew the same step.
    assert all(float(r["exit_step"]).is_integer() for r in records), [r["exit_step"] for r in records]
    assert (run_dir / "export" / "shapes-tiny" / "model_index.json").is_file()


def test_init_vae_takes_a_models_vae_for_the_later_stages(smoke_run: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from training.train import compose, run

    model = smoke_run / "export" / "shapes-tiny"
    run_dir = tmp_path / "run"
    run(compose("smoke", [f"run_dir={run_dir}", f"init_vae={model}", "stages=[vae]"]))
    done = json.loads((run_dir / "vae" / "final" / "DONE").read_text())
    assert done["init_vae"] == str(model)
    taken = load_file(run_dir / "vae" / "final" / "vae.safetensors")
    shipped = load_file(model / "vae.safetensors")
    assert taken.keys() == shipped.keys() and all(bool((taken[k] == shipped[k]).all()) for k in shipped)
    vae_cfg = json.loads((run_dir / "vae" / "final" / "vae_config.json").read_text())
    assert vae_cfg["latents_std"] == json.loads((model / "model_index.json").read_text())["vae"]["latents_std"]

    # Another run's directory: its vae_decoder result (the decoder trained last).
    from_run = tmp_path / "from_run"
    run(compose("smoke", [f"run_dir={from_run}", f"init_vae={smoke_run}", "stages=[vae]"]))
    assert json.loads((from_run / "vae" / "final" / "DONE").read_text())["init_vae"] == str(
        smoke_run / "vae_decoder" / "final")
    taken = load_file(from_run / "vae" / "final" / "vae.safetensors")
    trained = load_file(smoke_run / "vae_decoder" / "final" / "vae.safetensors")
    assert all(bool((taken[k] == trained[k]).all()) for k in trained)

    with pytest.raises(ValueError, match="z_dim=4 but dit.in_dim=8"):
        run(compose("smoke", [f"run_dir={tmp_path / 'other'}", f"init_vae={model}", "stages=[vae]",
                              "dit.in_dim=8", "dit.out_dim=8"]))


def test_teacher_of_a_run_generates_through_the_bench(smoke_run: Path) -> None:
    from training.eval.shapes_bench import _teacher_generate

    generate = _teacher_generate(smoke_run, "smoke", "cpu", steps=3, guidance=3.0)
    first = generate("a red circle moving left", 9, 0)
    assert first.shape == (9, 32, 32, 3)
    assert (generate("a red circle moving left", 9, 0) == first).all()  # seeded
    assert not (generate("a red circle moving left", 9, 1) == first).all()
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        generate("a red circle moving left", 8, 0)


def _long_rollout_calls(smoke_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str
                        ) -> tuple[list[tuple[int, int | None, int]], list[float], Path]:
    """A 3-step self_forcing stage of the smoke run with ``overrides``: each rollout's (frames,
    grad_frames, frames returned), the generator updates' window starts, and the run folder."""
    import training.stages.self_forcing as sf_stage
    from training.train import compose, run

    calls: list[tuple[int, int | None, int]] = []
    real_rollout = sf_stage.rollout

    def recording_rollout(*args, **kwargs):
        x0 = real_rollout(*args, **kwargs)
        calls.append((args[2].shape[1], kwargs.get("grad_frames"), x0.shape[1]))
        return x0

    monkeypatch.setattr(sf_stage, "rollout", recording_rollout)
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir, ignore=shutil.ignore_patterns("self_forcing", "export"))
    run(compose("smoke", [f"run_dir={run_dir}", "stages=[self_forcing]", "self_forcing.steps=3", *overrides]))
    return calls, [r["window_start"] for r in _metrics(run_dir, "self_forcing")], run_dir


def test_long_rollout_plain_keeps_a_share_of_rollouts_at_the_training_length(
        smoke_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frames = 3  # smoke: num_latent_frames 3
    calls, starts, _ = _long_rollout_calls(smoke_run, tmp_path, monkeypatch, "self_forcing.long_rollout=4",
                                           "self_forcing.long_rollout_plain=1")
    assert len(calls) == 6 and all(c == (frames, None, frames) for c in calls) and starts == [0, 0, 0]
    from training.train import compose

    for share, message in (("1.5", "share of rollouts in \\[0, 1\\]"), ("0.5", "needs long_rollout > 1")):
        with pytest.raises(Exception, match=message):
            compose("smoke", ["run_dir=/tmp/unused", f"self_forcing.long_rollout_plain={share}",
                              *(["self_forcing.long_rollout=2"] if share == "1.5" else [])])


def test_long_rollout_scores_a_window_of_a_longer_rollout(smoke_run: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``self_forcing.long_rollout=K``: rollouts of up to K x num_latent_frames through the rolling
    window, the loss on one num_latent_frames window (the frames before it without gradients)."""
    calls, starts, run_dir = _long_rollout_calls(smoke_run, tmp_path, monkeypatch, "self_forcing.long_rollout=4")
    frames = 3  # smoke: num_latent_frames 3, chunks of 1, a rolling window of 2
    assert len(calls) == 6  # 3 steps x (1 generator + 1 critic rollout)
    assert all(frames <= n <= 4 * frames and full == n for n, _, full in calls)
    assert any(n > frames for n, _, _ in calls), calls
    assert all(grad == (frames if n > frames else None) for n, grad, _ in calls)
    assert starts == [n - frames for (n, _, _), i in zip(calls, range(6)) if i % 2 == 0]
    assert (run_dir / "self_forcing" / "final" / "dit.safetensors").is_file()


@pytest.mark.parametrize("mode", ["teacher_forcing", "diffusion_forcing"])
def test_forcing_modes_take_a_teacher_trajectory_as_ground_truth(smoke_run: Path, tmp_path: Path, mode: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Teacher / diffusion forcing roll out from a teacher trajectory's own noise, prompted with its
    caption, with its end as the context: the student's first chunk and the ground truth after it
    are one video (an unrelated clip's context contradicts the first chunk)."""
    import json

    import torch
    from safetensors import safe_open

    import training.stages.self_forcing as sf_stage
    from training.stages.common import prompt_table
    from training.train import compose, run

    draws: list = []
    real_draw = sf_stage._Draw

    def recording_draw(*args):
        draws.append(real_draw(*args))
        return draws[-1]

    monkeypatch.setattr(sf_stage, "_Draw", recording_draw)
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir, ignore=shutil.ignore_patterns("self_forcing", "export"))
    cfg = compose("smoke", [f"run_dir={run_dir}", "stages=[self_forcing]", "self_forcing.steps=2",
                            f"self_forcing.rollout_mode={mode}"])
    run(cfg)
    noise, x0, captions = [], [], []
    for path in sorted((run_dir / "ode_init" / "pairs").glob("shard-*.safetensors")):
        with safe_open(str(path), "pt") as f:
            noise.append(f.get_tensor("noisy")[:, 0])
            x0.append(f.get_tensor("x0"))
            captions += json.loads(f.metadata()["captions"])
    noise, x0 = torch.cat(noise), torch.cat(x0)
    table = prompt_table(cfg, torch.device("cpu"))
    frames = draws[0].clean.shape[1]
    checked = 0
    for d in draws:
        for cond, start, clean in zip(d.cond, d.noise, d.clean):
            [pair] = [i for i in range(len(captions)) if torch.equal(x0[i, :frames], clean)]
            assert torch.equal(start, noise[pair, :frames])
            assert torch.equal(cond, table.cond[table.index(captions[pair])])
            checked += 1
    assert checked >= 4


def test_init_critic_starts_the_critic_from_a_trained_one(smoke_run: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``self_forcing.init_critic``: the critic of a continuation starts from the critic of an earlier
    self_forcing run (its stage folder: the newest checkpoint), not from the teacher; a folder
    without checkpoints is a clear error."""
    import torch
    from safetensors.torch import load_file

    import training.stages.self_forcing as sf_stage
    from training.train import compose, run
    from training.utils.checkpoint import latest_step

    source = smoke_run / "self_forcing"
    ckpts = source / "checkpoints"
    saved = load_file(str(ckpts / f"ckpt-{latest_step(ckpts):08d}.safetensors"))
    want = {k[len("model.critic."):]: v for k, v in saved.items() if k.startswith("model.critic.")}
    teacher = load_file(str(smoke_run / "teacher" / "final" / "dit.safetensors"))
    assert any(not torch.equal(want[k], teacher[k]) for k in want)  # the trained critic moved off the teacher
    seen: list[dict[str, torch.Tensor]] = []
    real = sf_stage._trained_critic

    def recording(src: str, device: torch.device) -> dict[str, torch.Tensor]:
        seen.append(real(src, device))
        return seen[-1]

    monkeypatch.setattr(sf_stage, "_trained_critic", recording)
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir, ignore=shutil.ignore_patterns("self_forcing", "export"))
    run(compose("smoke", [f"run_dir={run_dir}", "stages=[self_forcing]", "self_forcing.steps=1",
                          f"self_forcing.init_critic={source}"]))
    assert len(seen) == 1 and seen[0].keys() == want.keys()
    assert all(torch.equal(seen[0][k], want[k]) for k in want)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        real(str(empty), torch.device("cpu"))
    with pytest.raises(ValueError, match="holds no critic"):
        real(str(smoke_run / "teacher" / "final" / "dit.safetensors"), torch.device("cpu"))


def test_long_rollout_needs_self_forcing_rollouts() -> None:
    from training.train import compose

    with pytest.raises(Exception, match="long_rollout=2 needs rollout_mode=self_forcing"):
        compose("smoke", ["run_dir=/tmp/unused", "self_forcing.long_rollout=2",
                          "self_forcing.rollout_mode=teacher_forcing"])


def test_teacher_can_start_from_a_models_dit(smoke_run: Path, tmp_path: Path) -> None:
    """``teacher.init``: the teacher starts from a model folder's DiT (here the smoke export's
    student); a DiT of another config is refused with what to set."""
    import torch
    from safetensors.torch import load_file, save_file

    from sf_sdk.checkpoint import load_pretrained
    from sf_sdk.models.dit import WanDiT
    from training.train import compose, run

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir, ignore=shutil.ignore_patterns("teacher", "ode_init", "self_forcing", "export"))
    # The smoke export's student moved its weights off the seeded initialisation: a model whose DiT
    # is that student plus noise, so starting from it is told apart from starting fresh.
    model = tmp_path / "model"
    shutil.copytree(smoke_run / "export" / "shapes-tiny", model)
    weights = load_file(model / "dit.safetensors")
    gen = torch.Generator().manual_seed(0)
    save_file({k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in weights.items()},
              model / "dit.safetensors", {"format": "sf-sdk"})
    run(compose("smoke", [f"run_dir={run_dir}", "stages=[teacher]", "teacher.steps=1", "teacher.lr=1e-12",
                          "teacher.sample_every=0", f"teacher.init={model}"]))
    start = load_pretrained(model, load_vae=False, load_text_encoder=False).dit.state_dict()
    teacher = load_file(run_dir / "teacher" / "final" / "dit.safetensors")
    assert all(torch.allclose(teacher[k], v, atol=1e-6) for k, v in start.items())
    cfg = compose("smoke", [f"run_dir={run_dir}"])
    torch.manual_seed(cfg.seed)
    fresh = WanDiT(cfg.dit).state_dict()  # what the stage starts from without teacher.init
    assert all(not torch.allclose(fresh[k], v, atol=1e-2) for k, v in start.items())
    with pytest.raises(ValueError, match="set the run's dit"):
        run(compose("smoke", [f"run_dir={tmp_path / 'other'}", "stages=[vae,teacher]", "vae.steps=1",
                              "teacher.steps=1", "dit.num_layers=1", f"teacher.init={model}"]))
