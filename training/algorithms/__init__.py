"""Training algorithms of Self Forcing: pure functions and small classes, no I/O.

* :mod:`~training.algorithms.rollout` — the student rolled out chunk by chunk with
  :func:`sf_sdk.sampling.denoise_chunk` (self / teacher / diffusion forcing) and the exit step
  shared by every rank;
* :mod:`~training.algorithms.flow` — flow-matching loss, timestep sampling, CFG predictions;
* :mod:`~training.algorithms.dmd`, :mod:`~training.algorithms.sid`, :mod:`~training.algorithms.gan`
  — the distribution-matching losses (generator and critic sides);
* :mod:`~training.algorithms.ode` — teacher ODE trajectories and the regression initialisation;
* :mod:`~training.algorithms.ema` — the generator's parameter EMA.

The stage runners (``training.stages``) own data, optimisers, distribution and checkpoints.
"""

from __future__ import annotations

from training.algorithms.dmd import DMD, DMDConfig
from training.algorithms.ema import EMA
from training.algorithms.flow import (
    drop_prompts,
    flow_matching_loss,
    frozen,
    guided_flow,
    guided_x0,
    predict_x0,
    sample_score_timesteps,
    sample_train_timesteps,
    unwrap,
)
from training.algorithms.gan import DiscriminatorHead, GANConfig, RelativisticGAN
from training.algorithms.ode import ode_regression_loss, sample_ode_trajectory, student_timesteps
from training.algorithms.rollout import ROLLOUT_MODES, draw_exit_step, rollout
from training.algorithms.sid import SiD, SiDConfig

__all__ = [
    "DMD",
    "DMDConfig",
    "DiscriminatorHead",
    "EMA",
    "GANConfig",
    "ROLLOUT_MODES",
    "RelativisticGAN",
    "SiD",
    "SiDConfig",
    "draw_exit_step",
    "drop_prompts",
    "flow_matching_loss",
    "frozen",
    "guided_flow",
    "guided_x0",
    "ode_regression_loss",
    "predict_x0",
    "rollout",
    "sample_ode_trajectory",
    "sample_score_timesteps",
    "sample_train_timesteps",
    "student_timesteps",
    "unwrap",
]
