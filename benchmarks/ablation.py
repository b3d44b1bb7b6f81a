"""The paper's ablation (its Table 2) at toy scale: teacher, diffusion and self forcing with the
same few-step DMD objective, chunk-wise and frame-wise, two training seeds each, scored by the
strict shapes evaluator at several video lengths.

    python benchmarks/ablation.py --base RUN_DIR --out DIR [--steps 1200] [--seeds 0 1]
        [--layouts chunk frame] [--modes self_forcing teacher_forcing diffusion_forcing]
        [--frames 33 333 1005] [--captions 24] [--long-captions 12] [--json OUT.json] [--plot OUT.png]
        [--strips DIR] [-- extra training overrides]

``--base`` is a training run whose ``vae`` and ``teacher`` stages are done (one teacher for every
row). Per layout (chunk-wise: 3 latent frames per chunk; frame-wise: 1) one ``ode_init`` run from
that teacher, then per row (layout, rollout mode, seed) a ``self_forcing`` run with the same
iterations, batch and seed schedule, exported to a model folder and scored at each length
(``--captions`` captions, evenly spread over the 72, at 33 frames; ``--long-captions`` at the
longer lengths, each through the stream's rolling window). Earlier stages are linked, not copied.
Every training stage and every score resumes: the same command goes on where it stopped, so the
whole grid can run over days in the background. Seconds per training iteration are the median of
the self_forcing stage's ``sec_per_step`` (wall time of one generator update and its critic
updates, data generation included).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.data.shapes import all_captions  # noqa: E402

log = logging.getLogger("ablation")

LAYOUTS = {"chunk": 3, "frame": 1}  # latent frames per chunk
MODES = ("teacher_forcing", "diffusion_forcing", "self_forcing")
SHORT = {"teacher_forcing": "TF", "diffusion_forcing": "DF", "self_forcing": "SF"}


def _train(run_dir: Path, config: str, overrides: list[str], log_file: Path) -> None:
    cmd = [sys.executable, "-m", "training.train", "--config-name", config, f"run_dir={run_dir}", *overrides]
    log.info("training: %s", " ".join(cmd[3:]))
    with log_file.open("a") as out:
        proc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"training failed (exit {proc.returncode}); see {log_file}")


def _link_stages(src: Path, dest: Path, stages: list[str]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in stages:
        target, link = (src / name).resolve(), dest / name
        if not (target / "final" / "DONE").is_file() and name != "text":
            raise SystemExit(f"{target} is not a finished stage: run it first")
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)


def spread(captions: list[str], n: int) -> list[str]:
    """``n`` captions evenly spread over ``captions`` (every colour, shape and direction appear)."""
    if n >= len(captions):
        return list(captions)
    return [captions[round(i * len(captions) / n)] for i in range(n)]


def _score(model: Path, frames: int, captions: list[str], jobs: int, out: Path, strips: Path | None) -> dict:
    if out.is_file():
        return json.loads(out.read_text())
    cmd = [sys.executable, "-m", "training.eval.shapes_bench", "--model", str(model), "--frames", str(frames),
           "--json", "--jobs", str(jobs), "--threads", "1", "--prompts", *captions]
    if strips is not None:
        cmd += ["--out-dir", str(strips), "--save-png"]
    log.info("scoring %s at %d frames (%d captions)", model, frames, len(captions))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise SystemExit(f"scoring failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(out)
    return result


def _sec_per_iteration(run_dir: Path) -> float | None:
    path = run_dir / "self_forcing" / "metrics.jsonl"
    if not path.is_file():
        return None
    secs = [r["sec_per_step"] for r in map(json.loads, path.read_text().splitlines()) if "sec_per_step" in r]
    return statistics.median(secs) if secs else None


def run_grid(args: argparse.Namespace) -> list[dict]:
    base, out = args.base.resolve(), args.out.resolve()
    common = [f"self_forcing.steps={args.steps}", *args.overrides]
    rows = []
    for layout in args.layouts:
        k = LAYOUTS[layout]
        ode_dir = out / f"ode-{layout}"
        _link_stages(base, ode_dir, ["vae", "text", "teacher"])
        _train(ode_dir, args.config, ["stages=[ode_init]", f"stream.num_frame_per_block={k}", *args.overrides],
               out / f"ode-{layout}.log")
        for mode in args.modes:
            for seed in args.seeds:
                name = f"{layout}-{SHORT[mode]}-s{seed}"
                row_dir = out / name
                _link_stages(ode_dir, row_dir, ["vae", "text", "teacher", "ode_init"])
                model = row_dir / "model"
                _train(row_dir, args.config, ["stages=[self_forcing,export]", f"seed={seed}",
                                              f"stream.num_frame_per_block={k}", f"self_forcing.rollout_mode={mode}",
                                              f"export.out_dir={model}", *common], out / f"{name}.log")
                row = {"row": name, "layout": layout, "mode": mode, "seed": seed,
                       "sec_per_iteration": _sec_per_iteration(row_dir), "scores": {}, "stuck_rate": {}}
                for frames in args.frames:
                    captions = spread(all_captions(), args.captions if frames <= 33 else args.long_captions)
                    strips = (args.strips / name / str(frames)) if args.strips else None
                    result = _score(model, frames, captions, args.jobs, row_dir / f"score-{frames}.json", strips)
                    row["scores"][frames] = result["mean_score"]
                    row["stuck_rate"][frames] = result.get("stuck_rate")
                rows.append(row)
                log.info("%s: %s", name, row)
    return rows


def table(rows: list[dict], frames: list[int]) -> str:
    """Markdown: one line per (layout, mode), the mean over seeds and each seed's value."""
    head = ["rollout", "layout", *[f"{f} frames" for f in frames], f"stuck @ {frames[-1]}", "s / iteration"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["mode"], row["layout"]), []).append(row)

    def cell(values: list[float | None], fmt: str) -> str:
        vals = [v for v in values if v is not None]
        if not vals:
            return "-"
        each = " / ".join(format(v, fmt) for v in vals)
        return f"**{format(statistics.mean(vals), fmt)}** ({each})" if len(vals) > 1 else each

    for (mode, layout), group in groups.items():
        cells = [cell([r["scores"].get(f) for r in group], ".3f") for f in frames]
        cells.append(cell([r["stuck_rate"].get(frames[-1]) for r in group], ".3f"))
        cells.append(cell([r["sec_per_iteration"] for r in group], ".2f"))
        lines.append(f"| {SHORT[mode]} + DMD | {layout}-wise | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], frames: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["mode"], row["layout"]), []).append(row)
    top = 0.0
    for (mode, layout), group in groups.items():
        means = [statistics.mean(r["scores"][f] for r in group) for f in frames]
        top = max(top, *means)
        ax.plot(frames, means, marker="o", linestyle="-" if layout == "chunk" else "--",
                label=f"{SHORT[mode]} {layout}-wise")
    ax.set_xscale("log")
    ax.set_xlabel("video length (frames)")
    ax.set_ylabel("strict shapes score (mean over seeds)")
    ax.set_ylim(0, min(1.0, max(0.1, 1.25 * top)))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, required=True, help="a run whose vae and teacher stages are done")
    p.add_argument("--out", type=Path, required=True, help="folder for the grid's runs (outside the repository)")
    p.add_argument("--config", default="shapes_tiny", help="training config (default shapes_tiny)")
    p.add_argument("--steps", type=int, default=1200, help="self_forcing iterations per row (default 1200)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=["chunk", "frame"])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    # 1005, not 1000: a stream's length is whole chunks (1 + 4 (3n - 1) video frames chunk-wise).
    p.add_argument("--frames", type=int, nargs="+", default=[33, 333, 1005])
    p.add_argument("--captions", type=int, default=72, help="captions scored at 33 frames (default all 72)")
    p.add_argument("--long-captions", type=int, default=12, help="captions scored at the longer lengths")
    p.add_argument("--jobs", type=int, default=1, help="scoring processes")
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--plot", type=Path, help="write score against video length here (PNG)")
    p.add_argument("--strips", type=Path, help="write frame strips (PNG contact sheets) under this folder")
    args = p.parse_args(argv)
    args.overrides = extra
    for f in args.frames:  # fail before hours of training, not at the first long score
        latent = (f - 1) / 4 + 1
        bad = [name for name in args.layouts if latent != int(latent) or int(latent) % LAYOUTS[name]]
        if bad:
            p.error(f"--frames {f} is not a whole number of chunks for layout(s) {', '.join(bad)}: video lengths "
                    f"are 1 + 4 (latent frames - 1) with latent frames a multiple of the chunk (e.g. 33, 333, 1005)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = run_grid(args)
    print(table(rows, args.frames))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(args).items()}},
                                        indent=1))
    if args.plot:
        plot(rows, args.frames, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
