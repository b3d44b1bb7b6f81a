"""Entry point of the Self-Forcing training recipe.

    python -m training.train --config-name shapes_tiny run_dir=/path/to/run [stages=[vae]] [field=value ...]
    torchrun --standalone --nproc_per_node 2 -m training.train --config-name smoke run_dir=/tmp/smoke

YAML files under ``training/configs`` only override fields of
:class:`training.utils.config.TrainConfig` (unknown keys are errors). Stages run in the order of
``stages``; each checkpoints into ``<run_dir>/<stage>/checkpoints`` and resumes from there, and a
finished stage (``<run_dir>/<stage>/final/DONE``) is skipped, so re-running the same command
continues where it stopped.

Exit codes (:mod:`sf_sdk.exit_codes`): 0 done; 2 a mistake in the command (an unknown config
name, a bad override, an unknown key or a bad value), in one line before anything runs; 1 a
failure while training (Hydra prints the traceback); 130 / 143 stopped by SIGINT / SIGTERM
(the checkpoints written so far stay, and the same command resumes from them).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from sf_sdk.exit_codes import EXIT_SIGTERM, EXIT_USER_ERROR, exit_code, one_line, stop_signals
from training.utils.config import TrainConfig, build_config, schema_dict
from training.utils.dist import DistInfo, barrier, init_distributed

log = logging.getLogger("training")

ConfigStore.instance().store(name="schema", node=schema_dict())


def _runner(stage: str) -> Callable[[TrainConfig, DistInfo], None]:
    """Import stage runners lazily (a stage only needs its own dependencies)."""
    if stage == "vae":
        from training.stages.vae import run_vae
        return run_vae
    if stage == "vae_decoder":
        from training.stages.vae import run_vae_decoder
        return run_vae_decoder
    if stage == "tiny_decoder":
        from training.stages.tiny_decoder import run_tiny_decoder
        return run_tiny_decoder
    if stage == "teacher":
        from training.stages.teacher import run_teacher
        return run_teacher
    if stage == "ode_init":
        from training.stages.ode_init import run_ode_init
        return run_ode_init
    if stage == "self_forcing":
        from training.stages.self_forcing import run_self_forcing
        return run_self_forcing
    if stage == "export":
        from training.stages.export import run_export
        return run_export
    raise ValueError(f"unknown stage {stage!r}")


def run(cfg: TrainConfig) -> None:
    """Run ``cfg.stages`` in order in this process (one rank of torchrun, or alone)."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    dist = init_distributed(cfg.device)
    if not dist.is_main:  # one voice in the logs: other ranks report warnings only
        logging.getLogger("training").setLevel(logging.WARNING)
        logging.getLogger("sf_sdk").setLevel(logging.WARNING)
    log.info("run_dir %s, stages %s, rank %d of %d, %d threads", cfg.run_dir, list(cfg.stages), dist.rank,
             dist.world_size, torch.get_num_threads())
    try:
        for stage in cfg.stages:
            _runner(stage)(cfg, dist)
            barrier()
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def compose(config_name: str, overrides: Sequence[str] = ()) -> TrainConfig:
    """The typed config of ``training/configs/<config_name>.yaml`` with command-line style
    ``overrides`` (``["run_dir=...", "stages=[vae]", "vae.steps=2"]``): what ``python -m
    training.train`` builds, for running the recipe from Python with :func:`run`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    config_dir = Path(__file__).resolve().parent / "configs"
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        raw = hydra_compose(config_name=config_name, overrides=list(overrides))
    return build_config(TrainConfig, OmegaConf.to_container(raw, resolve=True),  # type: ignore[arg-type]
                        source=_source(config_name, overrides))


def _source(config_name: str | None, overrides: Sequence[str]) -> str:
    """Where a composed config came from, for its errors: the YAML file and the overrides."""
    where = f"training/configs/{config_name}.yaml" if config_name else "the config"
    return f"{where} with overrides {list(overrides)}" if overrides else where


@hydra.main(version_base=None, config_path="configs", config_name=None)
def main(raw: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    job = HydraConfig.get()
    try:
        cfg = build_config(TrainConfig, OmegaConf.to_container(raw, resolve=True),  # type: ignore[arg-type]
                           source=_source(job.job.config_name, job.overrides.task))
    except ValueError as exc:
        _user_error(exc)
    try:
        with stop_signals():
            run(cfg)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the checkpoints so far stay
        code = exit_code(exc)
        log.warning("stopped by %s; run the same command again to resume", "SIGTERM" if code == EXIT_SIGTERM
                    else "SIGINT")
        raise SystemExit(code) from None


PROG = "python -m training.train"


def _user_error(exc: BaseException) -> None:
    sys.stderr.write(f"{PROG}: error: {one_line(exc)}\n")
    raise SystemExit(EXIT_USER_ERROR)


def _check_command(argv: Sequence[str]) -> None:
    """Compose the config the command names before Hydra runs it, so that a mistake in it (an
    unknown config name, an override Hydra cannot parse, an unknown key, a bad value) is one line
    and exit code 2 rather than Hydra's traceback and 1. Commands with Hydra's own flags (help,
    printing, multirun) or ``hydra.*`` overrides are left to Hydra."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    name, overrides, rest = None, [], list(argv)
    while rest:
        arg = rest.pop(0)
        if arg in ("--config-name", "-cn") and rest:
            name = rest.pop(0)
        elif arg.startswith("--config-name="):
            name = arg.split("=", 1)[1]
        elif arg.startswith("-") or arg.startswith("hydra."):
            return
        else:
            overrides.append(arg)
    names = sorted(p.stem for p in (Path(__file__).resolve().parent / "configs").glob("*.yaml"))
    if name is None:
        _user_error(ValueError(f"no config given: pass --config-name NAME, one of {names}"))
    name = name.removesuffix(".yaml")
    if name not in names:
        _user_error(ValueError(f"no config {name!r} in training/configs: choose one of {names}"))
    try:
        compose(name, overrides)
    except (ValueError, HydraException, OmegaConfBaseException) as exc:
        _user_error(exc)


if __name__ == "__main__":
    _check_command(sys.argv[1:])
    main()
