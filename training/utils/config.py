"""Typed training configuration: frozen dataclasses, every default in one place.

Hydra composes YAML files under ``training/configs``; they may only override fields of
:class:`TrainConfig` (unknown keys are errors, raised by :func:`build_config`). Model configs are
the SDK's own dataclasses (``sf_sdk.config``), never copies.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from sf_sdk.config import DiTConfig, StreamingConfig, TextEncoderConfig, VAEConfig, check_fields, check_value
from training.data.shapes import ShapesConfig

__all__ = [
    "STAGES",
    "StageConfig",
    "VAEStageConfig",
    "TinyDecoderStageConfig",
    "TeacherStageConfig",
    "ODEInitStageConfig",
    "SelfForcingStageConfig",
    "ExportStageConfig",
    "TrainConfig",
    "build_config",
    "config_to_dict",
]

T = TypeVar("T")

STAGES: tuple[str, ...] = ("vae", "vae_decoder", "tiny_decoder", "teacher", "ode_init", "self_forcing", "export")
Precision = Literal["fp32", "bf16"]


@dataclass(frozen=True)
class StageConfig:
    """Loop settings shared by every training stage (per process; the global batch is
    ``batch_size * grad_accum * world_size``)."""

    steps: int = 100
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0
    # Below 1: after the warmup the learning rate follows a cosine from lr down to
    # lr * lr_final_ratio at the last step (1: constant).
    lr_final_ratio: float = 1.0
    # The cosine starts here (or after the warmup, if later): constant lr before it.
    decay_from_step: int = 0
    log_every: int = 10
    # A checkpoint is written every ``ckpt_every_steps`` steps (0: off) and whenever
    # ``ckpt_every_minutes`` have passed since the last one, and always at the end.
    ckpt_every_steps: int = 0
    ckpt_every_minutes: float = 3.0
    keep_checkpoints: int = 2
    sample_every: int = 0  # steps between sample MP4s (0: only at the end)

    def __post_init__(self) -> None:
        check_fields(self)  # every field against its declared type (subclasses' fields too)
        for name in ("steps", "batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{type(self).__name__}.{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 < self.lr_final_ratio <= 1:
            raise ValueError(f"{type(self).__name__}.lr_final_ratio must be in (0, 1], got {self.lr_final_ratio}")
        for name in ("ckpt_every_steps", "ckpt_every_minutes", "sample_every", "warmup_steps",
                     "weight_decay", "grad_clip", "decay_from_step"):
            if getattr(self, name) < 0:
                raise ValueError(f"{type(self).__name__}.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class VAEStageConfig(StageConfig):
    """Autoencoder training of the Wan VAE on short clips, then the latent statistics."""

    num_frames: int = 17
    # Train on random square crops of this size (0: full frames); the VAE is convolutional, so
    # crops cut the cost without changing what it learns about edges and motion.
    crop: int = 0
    # Pixels of the object (brighter than the black background) weigh 1 + fg_weight.
    fg_weight: float = 4.0
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    # Weight of an L1 on the spatial image gradients (training.algorithms.edges.gradient_l1, the
    # same object weighting; 0: off): it keeps edges and corners that L1 / MSE alone blur (docs/vae.md).
    grad_weight: float = 0.0
    # Weight of a patch-GAN term on the Wan decoder's frames (training.algorithms.patch_gan, hinge
    # losses; 0: off), from step ``gan_from_step`` on, its discriminator of width ``gan_dim``
    # trained at ``gan_lr`` (0: ``lr``) beside the autoencoder.
    gan_weight: float = 0.0
    gan_dim: int = 32
    gan_from_step: int = 0
    gan_lr: float = 0.0
    # Gaussian noise added to the posterior mean before decoding (a fixed-variance VAE) and an
    # L2 pull of the mean toward 0: both keep the latent smooth and bounded for the DiT.
    latent_noise: float = 0.1
    latent_l2: float = 1e-4
    stats_clips: int = 64  # clips encoded for latents_mean / latents_std
    # Weight of the Wan decoder's reconstruction (0: the Wan decoder is not trained here; the
    # vae_decoder stage trains it on the frozen encoder's latents).
    decoder_weight: float = 1.0
    # Width of an auxiliary plain conv decoder trained beside the encoder (0: none). It is a
    # training aid only, never shipped: the narrow Wan encoder learns many times faster behind a
    # decoder that learns fast (docs/training.md), after which its latents are frozen.
    aux_decoder_dim: int = 0
    aux_weight: float = 1.0
    # From step ``long_from_step`` on (0: never) the clips have ``long_num_frames`` frames, in
    # batches of ``long_batch_size``. The causal VAE's temporal receptive field spans many latent
    # frames: trained on short clips only, it encodes (decodes) the latent frames past its
    # training length badly, so the recipe ends each VAE stage on clips as long as the teacher's.
    long_from_step: int = 0
    long_num_frames: int = 33
    long_batch_size: int = 2
    long_lr: float = 0.0  # learning rate of the long-clip steps (0: ``lr``)
    # vae_decoder stage only: train the encoder (``conv1`` and ``encoder``) beside the decoder,
    # from the run's VAE (docs/vae.md, "Clips as long as the evaluator's"). The latents then move: with
    # ``anchor_weight`` > 0 an MSE (in units of the latent std) pulls the encoder's posterior mean
    # toward the starting encoder's, so a DiT trained on the old latents still fits, and the old
    # latent statistics are kept; without it the statistics are measured again at the end, and a
    # DiT has to be trained on the new latents.
    train_encoder: bool = False
    anchor_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.anchor_weight < 0:
            raise ValueError(f"anchor_weight must be >= 0, got {self.anchor_weight}")
        if self.anchor_weight and not self.train_encoder:
            raise ValueError("anchor_weight > 0 needs train_encoder=true: it pulls the trained encoder's latents "
                             "toward the starting encoder's")
        if self.long_from_step < 0 or self.long_from_step >= self.steps:
            raise ValueError(f"long_from_step must be in [0, steps={self.steps}) (0: off), got {self.long_from_step}")
        if self.long_lr < 0:
            raise ValueError(f"long_lr must be >= 0 (0: lr), got {self.long_lr}")
        if self.long_batch_size <= 0 or self.long_num_frames <= 0:
            raise ValueError(f"long_batch_size and long_num_frames must be positive, got {self.long_batch_size} "
                             f"and {self.long_num_frames}")
        if min(self.l1_weight, self.mse_weight, self.grad_weight) < 0:
            raise ValueError(f"vae l1_weight, mse_weight and grad_weight must be >= 0, got {self.l1_weight}, "
                             f"{self.mse_weight} and {self.grad_weight}")
        if self.gan_weight < 0 or self.gan_lr < 0 or self.gan_from_step < 0 or self.gan_dim <= 0:
            raise ValueError(f"vae gan_weight, gan_lr and gan_from_step must be >= 0 and gan_dim > 0, got "
                             f"{self.gan_weight}, {self.gan_lr}, {self.gan_from_step} and {self.gan_dim}")
        if self.gan_weight and not self.decoder_weight:
            raise ValueError("vae.gan_weight > 0 needs decoder_weight > 0: the GAN term is on the Wan decoder's frames")
        if self.decoder_weight < 0 or self.aux_weight < 0 or self.aux_decoder_dim < 0:
            raise ValueError("vae decoder_weight, aux_weight and aux_decoder_dim must be >= 0")
        if self.decoder_weight == 0 and (self.aux_decoder_dim == 0 or self.aux_weight == 0):
            raise ValueError("vae.decoder_weight=0 needs an auxiliary decoder (aux_decoder_dim > 0 and "
                             "aux_weight > 0): otherwise nothing trains the encoder")


@dataclass(frozen=True)
class TinyDecoderStageConfig(StageConfig):
    """A tiny streaming decoder (TAEHV, sf_sdk.models.taehv) of the frozen encoder's latents.

    The rendered clip is the target (and, with ``wan_weight``, also the Wan decoder's frames of
    the same latents): object-weighted L1 plus the image-gradient L1 (``grad_weight``).
    """

    # Channels per stage and of the final conv (one per spatial doubling, plus one).
    widths: tuple[int, ...] = (64, 32, 16, 16)
    blocks_per_stage: int = 3
    num_frames: int = 33
    fg_weight: float = 4.0
    l1_weight: float = 1.0
    # The object-weighted MSE: with L1 alone a decoder from scratch that cannot yet place the object
    # settles on the per-pixel median, the black background, and never draws it (even fitting one
    # clip); the MSE's mean keeps the object's colour in the output while its position is learnt.
    mse_weight: float = 1.0
    grad_weight: float = 10.0
    # The image-gradient term joins at this step: from scratch, with it on from step 0 the decoder
    # settles on flat black frames (its output exactly -1, the last ReLUs off) and does not recover;
    # with L1 alone it draws the objects within ~50 steps.
    grad_from_step: int = 300
    wan_weight: float = 0.0  # weight of the Wan decoder's frames as a second target (0: off)
    latent_noise: float = 0.1  # Gaussian noise on the posterior mean, as the vae stage's decoder sees
    # Start from this model folder's (or bundled model's) tiny decoder instead of a fresh one, with
    # a fresh optimizer and schedule: e.g. ``init=shapes-tiny`` to fine-tune the shipped decoder
    # toward a new Wan decoder. Its widths must be this stage's. A checkpoint of the run wins.
    init: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.fg_weight, self.l1_weight, self.mse_weight, self.grad_weight, self.wan_weight,
               self.latent_noise) < 0:
            raise ValueError("tiny_decoder fg_weight, l1_weight, mse_weight, grad_weight, wan_weight and "
                             "latent_noise must be >= 0")
        if not self.l1_weight and not self.mse_weight and not self.grad_weight:
            raise ValueError("tiny_decoder needs l1_weight, mse_weight or grad_weight > 0: otherwise nothing "
                             "trains it")
        if self.num_frames < 1 or self.grad_from_step < 0:
            raise ValueError(f"tiny_decoder.num_frames must be positive and grad_from_step >= 0, got "
                             f"{self.num_frames} and {self.grad_from_step}")


@dataclass(frozen=True)
class TeacherStageConfig(StageConfig):
    """Bidirectional flow-matching DiT on cached normalized latents."""

    num_frames: int = 33  # video frames; latent frames = 1 + (num_frames - 1) / temporal stride
    cache_clips: int = 512  # clips pre-encoded to latents (the teacher's dataset)
    cache_shard: int = 128
    encode_batch: int = 16  # clips per VAE encode call while building the cache
    prompt_dropout: float = 0.1  # fraction of prompts replaced by the empty prompt (CFG)
    use_training_weight: bool = False
    ema_decay: float = 0.999
    text_seed: int = 1234  # seed of the frozen random text encoder
    sample_steps: int = 24
    sample_guidance: float = 4.0
    # A model folder or bundled name whose DiT (the same DiT config) starts the teacher instead of
    # a fresh one, e.g. a shipped student when the teacher it was distilled from is gone; a
    # checkpoint of the run still wins, so the run resumes as usual.
    init: str = ""


@dataclass(frozen=True)
class ODEInitStageConfig(StageConfig):
    """Teacher ODE trajectories, then causal regression of the student (CausVid init)."""

    num_pairs: int = 64  # trajectories generated (each: one caption, one noise)
    ode_steps: int = 24
    guidance: float = 4.0
    ema_decay: float = 0.99


@dataclass(frozen=True)
class SelfForcingStageConfig(StageConfig):
    """DMD (or SiD) on the student's own autoregressive rollouts."""

    loss: Literal["dmd", "sid"] = "dmd"
    rollout_mode: Literal["self_forcing", "teacher_forcing", "diffusion_forcing"] = "self_forcing"
    gan_weight: float = 0.0
    guidance: float = 4.0
    critic_lr: float = 2e-5
    dfake_gen_update_ratio: int = 5
    min_step_fraction: float = 0.02
    max_step_fraction: float = 0.98
    ema_decay: float = 0.99
    num_latent_frames: int = 9
    # Long rollouts (Self-Forcing++ / LongLive style): > 1 rolls the student out over up to
    # long_rollout x num_latent_frames latent frames with the stream's rolling window and applies
    # the loss to one random num_latent_frames window of it (the frames before it without
    # gradients, the rollout stops at the window's end); 1 = the plain rollout.
    long_rollout: int = 1
    # With long_rollout > 1: the share of rollouts that stay at the training length (their window
    # starts at frame 0), so the short-window loss trains beside the long one (LongLive keeps both);
    # 0 = every window drawn over the whole long rollout (where a window at frame 0 is one in
    # (long_rollout - 1) * num_latent_frames / chunk + 1).
    long_rollout_plain: float = 0.0
    # The critic (fake score) starts from a trained one instead of the teacher: a self_forcing
    # checkpoint file (ckpt-*.safetensors) or a self_forcing stage folder (its newest checkpoint).
    # A continuation then keeps the critic that tracked its student (Self-Forcing++, LongLive);
    # "" = the teacher, as the paper does.
    init_critic: str = ""
    # Image-to-video fine-tune: each rollout starts from a clip of the teacher's latent cache, its
    # latent frame 0 the given image (written to the KV cache by a cache pass, as inference does
    # with ``image=``) and its caption the prompt; the student generates the num_latent_frames - 1
    # frames after it (frame 0 alone, then chunks of stream.num_frame_per_block) and the losses
    # judge the whole clip, the gradient reaching the generated frames only.
    image_conditioning: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.long_rollout < 1:
            raise ValueError(f"self_forcing.long_rollout must be >= 1 (1: off), got {self.long_rollout}")
        if not 0 <= self.long_rollout_plain <= 1:
            raise ValueError(f"self_forcing.long_rollout_plain is a share of rollouts in [0, 1], got "
                             f"{self.long_rollout_plain}")
        if self.long_rollout_plain > 0 and self.long_rollout == 1:
            raise ValueError(f"self_forcing.long_rollout_plain={self.long_rollout_plain} needs long_rollout > 1 "
                             f"(with long_rollout=1 every rollout is plain already)")
        if self.long_rollout > 1 and self.rollout_mode != "self_forcing":
            raise ValueError(f"self_forcing.long_rollout={self.long_rollout} needs rollout_mode=self_forcing "
                             f"(the forcing modes need ground truth as long as the rollout)")
        if self.image_conditioning and self.rollout_mode != "self_forcing":
            raise ValueError(f"self_forcing.image_conditioning needs rollout_mode=self_forcing, got "
                             f"{self.rollout_mode!r}: the forcing modes fill every chunk's cache from ground truth, an "
                             f"image-conditioned rollout is given frame 0 only")
        if self.image_conditioning and self.long_rollout != 1:
            raise ValueError(f"self_forcing.image_conditioning needs long_rollout=1, got {self.long_rollout}: "
                             f"the loss window must start at the given frame")


@dataclass(frozen=True)
class ExportStageConfig:
    """Export of the final student (EMA) with its VAE and text encoder in the SDK format."""

    out_dir: str = ""  # default: <run_dir>/export/shapes-tiny
    source: Literal["self_forcing", "ode_init"] = "self_forcing"
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    fps: int = 16

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class TrainConfig:
    """Everything one ``python -m training.train`` run needs."""

    run_dir: str = ""
    stages: tuple[str, ...] = STAGES
    seed: int = 0
    device: str = "cpu"
    num_threads: int = 0  # torch intra-op threads per process (0: torch's default)
    # GPU switches (fields, never code changes): bf16 autocast, gradient checkpointing of the
    # DiT blocks, FSDP2 sharding of the DiT instead of DDP.
    precision: Precision = "fp32"
    gradient_checkpointing: bool = False
    fsdp: bool = False
    # A model folder, bundled name (``shapes-tiny``) or another run's directory whose VAE the
    # ``vae`` stage takes as its result instead of training one: the later stages then train on
    # that latent space (``vae_decoder`` goes on training its decoder; a new DiT fits its latents).
    init_vae: str = ""
    data: ShapesConfig = field(default_factory=ShapesConfig)
    vae_model: VAEConfig = field(default_factory=VAEConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    stream: StreamingConfig = field(default_factory=StreamingConfig)
    vae: VAEStageConfig = field(default_factory=VAEStageConfig)
    vae_decoder: VAEStageConfig = field(default_factory=VAEStageConfig)
    tiny_decoder: TinyDecoderStageConfig = field(default_factory=TinyDecoderStageConfig)
    teacher: TeacherStageConfig = field(default_factory=TeacherStageConfig)
    ode_init: ODEInitStageConfig = field(default_factory=ODEInitStageConfig)
    self_forcing: SelfForcingStageConfig = field(default_factory=SelfForcingStageConfig)
    export: ExportStageConfig = field(default_factory=ExportStageConfig)

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.run_dir:
            raise ValueError("run_dir is required: pass run_dir=/path/to/run (outside the repository)")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stages {unknown}; valid stages are {list(STAGES)}")
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {self.num_threads}")
        if self.vae.train_encoder:
            raise ValueError("vae.train_encoder is an option of the vae_decoder stage (the vae stage always trains "
                             "the encoder): set vae_decoder.train_encoder=true")


# --------------------------------------------------------------------------------------------
# dict <-> dataclass
# --------------------------------------------------------------------------------------------


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def build_config(cls: type[T], data: dict[str, Any], where: str = "", *, source: str = "") -> T:
    """Build the dataclass ``cls`` from a nested dict, recursing into dataclass fields.

    Unknown keys are an error naming the valid ones; every value is checked against its field's
    declared type (:func:`sf_sdk.config.check_value`: ``'6'`` or ``6.5`` for an int, ``'no'`` for a
    bool, NaN for a float are errors naming the key); lists become tuples where the field is a
    tuple; missing keys keep their defaults. ``source`` (the YAML file and overrides the dict came
    from) is named in every error.
    """
    if source:
        try:
            return build_config(cls, data, where)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown keys {unknown} in {where or cls.__name__} ({cls.__name__}); valid "
                         f"keys are {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = hints[name]
        path = f"{where}.{name}" if where else name
        if _is_config(tp):
            kwargs[name] = build_config(tp, value or {}, path)
        else:
            kwargs[name] = check_value(tp, value, path)
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON/YAML-ready nested dict (tuples become lists)."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


def schema_dict() -> dict[str, Any]:
    """Every field of :class:`TrainConfig` with its default (the Hydra schema node).

    ``run_dir`` is left empty here; :class:`TrainConfig` rejects it if no override sets it.
    """
    fields = {}
    for f in dataclasses.fields(TrainConfig):
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            fields[f.name] = config_to_dict(f.default_factory())  # type: ignore[misc]
        else:
            fields[f.name] = config_to_dict(f.default)
    return fields
