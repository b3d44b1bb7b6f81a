"""Stage ``vae``: train the Wan-architecture VAE on shapes clips, then its latent statistics.

The autoencoder is trained as a fixed-variance VAE: the decoder sees the posterior mean plus
Gaussian noise (``latent_noise``) and the mean is pulled gently toward 0 (``latent_l2``). The
reconstruction loss is L1 + MSE with the object's pixels weighted up (the shapes cover ~5% of
each frame), optionally with terms that keep edges (docs/vae.md): an L1 on the spatial image
gradients (``grad_weight``) and a patch-GAN term on the Wan decoder's frames (``gan_weight``; its
discriminator is checkpointed beside the autoencoder, so resume stays exact). Finally
``latents_mean`` / ``latents_std`` are measured per channel over ``stats_clips`` clips and written
into the VAEConfig of ``final/`` so that normalized latents are ~N(0, 1) for the DiT.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from sf_sdk.checkpoint import VAE_FILE as MODEL_VAE_FILE
from sf_sdk.checkpoint import load_into, load_state_dict, read_index
from sf_sdk.config import VAEConfig, from_dict, to_dict
from sf_sdk.models.vae import WanVAE
from sf_sdk.video import Mp4Writer
from training.algorithms.edges import gradient_l1
from training.algorithms.patch_gan import PatchDiscriminator, discriminator_hinge_loss, generator_hinge_loss
from training.algorithms.widen import widen_decoder
from training.data.shapes import ShapesDataset, tensor_to_frames
from training.utils.checkpoint import TrainState, atomic_save_file
from training.utils.config import TrainConfig, VAEStageConfig
from training.utils.dist import DistInfo
from training.utils.loop import (
    Metric,
    StageRun,
    accumulate,
    autocast,
    make_optimizer,
    optimizer_step,
    set_lr,
    step_generator,
    wrap_ddp,
)

__all__ = ["run_vae", "run_vae_decoder", "load_trained_vae", "check_latents_unmoved", "load_vae_dir",
           "finished_vae_dir", "VAE_FILE", "VAE_CONFIG_FILE"]

log = logging.getLogger(__name__)

VAE_FILE = "vae.safetensors"
VAE_CONFIG_FILE = "vae_config.json"
# A pixel belongs to the object when its brightest channel exceeds this value (in [-1, 1]).
FOREGROUND_LEVEL = -0.5
RGB = 3


class AuxDecoder(nn.Module):
    """A plain 2D conv decoder of latent frames, a training aid for the encoder (never shipped).

    Each latent frame ``[z, h, w]`` is decoded on its own to the ``temporal_stride`` video frames
    it stands for (the stream's first latent frame to one frame): conv, GroupNorm, SiLU and a 2x
    nearest upsampling per level, so the encoder gets a useful reconstruction gradient from the
    first steps on.
    """

    def __init__(self, config: VAEConfig, dim: int) -> None:
        super().__init__()
        self.stride_t = config.temporal_stride
        levels = config.spatial_stride.bit_length() - 1  # log2 of the spatial stride
        widths = [dim * 2 ** (levels - i) for i in range(levels + 1)]  # [4d, 2d, d] for 8x

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(1, c_out), nn.SiLU())

        layers: list[nn.Module] = [block(config.z_dim, widths[0])]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), block(c_in, c_out)]
        layers.append(nn.Conv2d(widths[-1], RGB * self.stride_t, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        b, c, t, h, w = z.shape
        frames = self.net(z.transpose(1, 2).reshape(b * t, c, h, w))  # [B*t, 3*st, H, W]
        frames = frames.reshape(b, t, self.stride_t, RGB, *frames.shape[2:])  # [B, t, st, 3, H, W]
        first = frames[:, :1, :1]  # [B, 1, 1, 3, H, W]: the stream's first frame
        video = torch.cat([first.flatten(1, 2), frames[:, 1:].flatten(1, 2)], dim=1)  # [B, T, 3, H, W]
        return video.transpose(1, 2)  # [B, 3, T, H, W]


class Autoencoder(nn.Module):
    """encode -> noisy mean -> decode(s) as one ``forward`` (what DDP wraps)."""

    def __init__(self, vae: WanVAE, aux: AuxDecoder | None = None, use_decoder: bool = True) -> None:
        super().__init__()
        self.vae = vae
        self.aux = aux
        self.use_decoder = use_decoder

    def forward(self, video: Tensor, noise: Tensor, noise_scale: float
                ) -> tuple[Tensor | None, Tensor | None, Tensor]:
        mu = self.vae.encode(video)  # [B, z, t, h, w] raw posterior mean
        z = self.vae.normalize(mu + noise_scale * noise) if noise_scale else self.vae.normalize(mu)
        recon = self.vae.decode(z, clamp=False) if self.use_decoder else None  # [B, 3, T, H, W]
        aux = self.aux(z) if self.aux is not None else None  # [B, 3, T, H, W]
        return recon, aux, mu


def reconstruction_loss(recon: Tensor, video: Tensor, fg_weight: float, l1_weight: float,
                        mse_weight: float, grad_weight: float = 0.0) -> tuple[Tensor, dict[str, Metric]]:
    """Object-weighted L1 and MSE, and with ``grad_weight`` an L1 on the spatial image gradients
    (:func:`training.algorithms.edges.gradient_l1`, the same weighting), which keeps edges."""
    fg = (video.amax(dim=1, keepdim=True) > FOREGROUND_LEVEL).to(video.dtype)  # [B, 1, T, H, W]
    weight = 1.0 + fg_weight * fg
    err = recon - video
    l1 = (weight * err.abs()).mean() / weight.mean()
    mse = (weight * err.square()).mean() / weight.mean()
    loss = l1_weight * l1 + mse_weight * mse
    metrics: dict[str, Metric] = {"loss_l1": l1.detach(), "loss_mse": mse.detach()}
    if grad_weight:
        grad = gradient_l1(recon, video, weight)
        loss = loss + grad_weight * grad
        metrics["loss_grad"] = grad.detach()
    with torch.no_grad():
        metrics["psnr"] = -10 * torch.log10(err.detach().clamp(-2, 2).square().mean() / 4 + 1e-12)
    return loss, metrics


def _batch(ds: ShapesDataset, stage_step: int, micro: int, batch: int, dist: DistInfo, accum: int,
           crop: int, gen: torch.Generator) -> Tensor:
    """The clips of one micro-batch: a pure function of (step, micro, rank) for exact resume.

    With ``crop``, each clip is cut to a ``crop`` x ``crop`` window around the object's mean
    position (jittered by up to a quarter of the window), so every crop shows the object.
    """
    first = ((stage_step * accum + micro) * dist.world_size + dist.rank) * batch
    videos = [ds[i]["video"] for i in range(first, first + batch)]  # each [3, T, H, W]
    if not crop:
        return torch.stack(videos)  # [B, 3, T, H, W]
    h, w = videos[0].shape[2:]
    if crop > min(h, w):
        raise ValueError(f"vae.crop={crop} exceeds the frame size {h}x{w}: lower it (0 = full frames)")
    out = []
    for video in videos:
        fg = (video.amax(dim=0) > FOREGROUND_LEVEL).any(dim=0)  # [H, W]
        ys, xs = fg.nonzero(as_tuple=True)
        cy, cx = (ys.float().mean().item(), xs.float().mean().item()) if len(ys) else (h / 2, w / 2)
        jitter = (torch.rand(2, generator=gen) - 0.5) * (crop / 2)
        top = int(min(max(cy - crop / 2 + jitter[0].item(), 0), h - crop))
        left = int(min(max(cx - crop / 2 + jitter[1].item(), 0), w - crop))
        out.append(video[..., top:top + crop, left:left + crop])  # [3, T, crop, crop]
    return torch.stack(out)  # [B, 3, T, crop, crop]


def run_vae(cfg: TrainConfig, dist: DistInfo) -> None:
    st = cfg.vae
    run = StageRun(cfg, "vae", st, dist)
    if run.done:
        log.info("stage vae already done (%s)", run.final_dir)
        return
    if cfg.init_vae:
        _take_model_vae(cfg, run, dist)
        return
    torch.manual_seed(cfg.seed)
    # Start from identity statistics; the measured ones are written at the end.
    z = cfg.vae_model.z_dim
    vae_cfg = dataclasses.replace(cfg.vae_model, latents_mean=(0.0,) * z, latents_std=(1.0,) * z)
    vae = WanVAE(vae_cfg).to(dist.device)
    short, long = _datasets(cfg, st, cfg.seed)
    _train_autoencoder(cfg, st, run, vae, short, long, dist)
    final_ds = long or short
    final_cfg = measure_latent_stats(vae, final_ds, st.stats_clips, dist.device, vae_cfg)
    if dist.is_main:
        write_reconstruction(vae, final_ds, run.samples_dir / "recon-final.mp4", cfg.data.fps)
        save_trained_vae(run.final_dir, vae, final_cfg)
    run.mark_done({"steps": run.stage.steps, "latents_mean": list(final_cfg.latents_mean),
                   "latents_std": list(final_cfg.latents_std)})


def _take_model_vae(cfg: TrainConfig, run: StageRun, dist: DistInfo) -> None:
    """The ``vae`` stage's result taken from ``cfg.init_vae`` (weights and latent statistics): a
    model folder or bundled name, or another run's directory (its ``vae_decoder`` result when that
    stage is done, else its ``vae`` result)."""
    run_vae_dir = finished_vae_dir(cfg.init_vae)
    if run_vae_dir is not None:
        vae = load_vae_dir(run_vae_dir, torch.device("cpu"))
        origin = run_vae_dir
    else:
        files = read_index(cfg.init_vae)
        if files.vae is None or not files.path(MODEL_VAE_FILE).is_file():
            raise ValueError(f"init_vae={cfg.init_vae!r} has no VAE ({MODEL_VAE_FILE}): pass a model folder that "
                             f"ships one, or a run directory with a finished vae stage")
        vae = WanVAE(files.vae)
        load_into(vae, load_state_dict(files.path(MODEL_VAE_FILE)), what=f"VAE of {cfg.init_vae}", config=files.vae)
        origin = files.root
    width = vae.config.decoder_dim or vae.config.dim
    if cfg.vae_model.decoder_dim and cfg.vae_model.decoder_dim != width:
        # A wider decoder over the same encoder and latents, started as the narrow one widened.
        vae = widen_decoder(vae, cfg.vae_model.decoder_dim, seed=cfg.seed)
        log.info("stage vae: decoder widened from %d to %d channels", width, cfg.vae_model.decoder_dim)
    vae_cfg = vae.config
    if vae_cfg.z_dim != cfg.dit.in_dim:
        raise ValueError(f"init_vae={cfg.init_vae!r} has z_dim={vae_cfg.z_dim} but dit.in_dim={cfg.dit.in_dim}: "
                         f"set dit.in_dim and dit.out_dim to {vae_cfg.z_dim}")
    if dist.is_main:
        save_trained_vae(run.final_dir, vae, vae_cfg)
    log.info("stage vae: taken from %s (not trained)", origin)
    run.mark_done({"steps": run.stage.steps, "init_vae": str(origin), "latents_mean": list(vae_cfg.latents_mean),
                   "latents_std": list(vae_cfg.latents_std)})


def run_vae_decoder(cfg: TrainConfig, dist: DistInfo) -> None:
    """Stage ``vae_decoder``: more training of the decoder alone, the encoder frozen.

    The latents (and their statistics) stay exactly those the teacher and the student were
    trained on, so this stage can run at the same time as the later stages; ``export`` ships
    its decoder when it is done. With ``train_encoder`` the encoder trains too (its latents move:
    held near the old ones by ``anchor_weight``, else with new statistics for new DiT stages).
    """
    st = cfg.vae_decoder
    run = StageRun(cfg, "vae_decoder", st, dist)
    if run.done:
        log.info("stage vae_decoder already done (%s)", run.final_dir)
        return
    vae = load_trained_vae(cfg.run_dir, dist.device).train()
    # The starting encoder, frozen: what the anchor term pulls the trained encoder's latents toward.
    anchor = copy.deepcopy(vae).eval() if st.anchor_weight else None
    trained = (vae.conv2, vae.decoder) + ((vae.conv1, vae.encoder) if st.train_encoder else ())
    for module in trained:
        module.requires_grad_(True)
    short, long = _datasets(cfg, st, cfg.seed + 1)
    _train_autoencoder(cfg, st, run, vae, short, long, dist, anchor=anchor)
    final_cfg = vae.config
    if st.train_encoder and not st.anchor_weight:
        # The latents moved freely: the DiT stages need their new statistics.
        final_cfg = measure_latent_stats(vae, long or short, st.stats_clips, dist.device, vae.config)
    if dist.is_main:
        write_reconstruction(vae, long or short, run.samples_dir / "recon-final.mp4", cfg.data.fps)
        save_trained_vae(run.final_dir, vae, final_cfg)
    run.mark_done({"steps": run.stage.steps, "train_encoder": st.train_encoder, "anchored": st.anchor_weight > 0,
                   "latents_mean": list(final_cfg.latents_mean), "latents_std": list(final_cfg.latents_std)})


def _datasets(cfg: TrainConfig, st: VAEStageConfig, seed: int) -> tuple[ShapesDataset, ShapesDataset | None]:
    """The stage's short-clip dataset, and its long-clip one when ``st.long_from_step`` is set."""
    def make(num_frames: int) -> ShapesDataset:
        return ShapesDataset(dataclasses.replace(cfg.data, num_frames=num_frames), seed=seed, rank=0, world_size=1)

    return make(st.num_frames), make(st.long_num_frames) if st.long_from_step else None


def _train_autoencoder(cfg: TrainConfig, st: VAEStageConfig, run: StageRun, vae: WanVAE, short: ShapesDataset,
                       long: ShapesDataset | None, dist: DistInfo, anchor: WanVAE | None = None) -> None:
    """The reconstruction loop of the VAE stages (trainable parameters: those requiring grad):
    clips from ``short``, then from ``long`` from step ``st.long_from_step`` on. With ``anchor``
    (a frozen VAE), ``st.anchor_weight`` times the MSE of the normalized posterior means of the
    two encoders is added."""
    z = vae.config.z_dim
    aux = AuxDecoder(vae.config, st.aux_decoder_dim).to(dist.device) if st.aux_decoder_dim else None
    if not st.decoder_weight:
        for module in (vae.conv2, vae.decoder):
            module.requires_grad_(False)
    auto = Autoencoder(vae, aux, use_decoder=st.decoder_weight > 0)
    model = wrap_ddp(auto, cfg, dist)
    params = [p for p in auto.parameters() if p.requires_grad]
    opt = make_optimizer(params, st)
    modules: dict[str, nn.Module] = {"vae": vae} if aux is None else {"vae": vae, "aux_decoder": aux}
    optimizers: dict[str, torch.optim.Optimizer] = {"opt": opt}
    disc: nn.Module | None = None
    if st.gan_weight:
        disc = PatchDiscriminator(st.gan_dim).to(dist.device)
        modules["discriminator"], optimizers["opt_disc"] = disc, make_optimizer(disc.parameters(), st,
                                                                                 lr=st.gan_lr or st.lr)
        disc = wrap_ddp(disc, cfg, dist)
    state = TrainState(modules=modules, optimizers=optimizers)
    run.resume(state)
    log.info("%s: %.2fM trainable parameters, clips of %d frames, batch %d x %d x %d", run.name,
             sum(p.numel() for p in params) / 1e6, st.num_frames, st.batch_size, st.grad_accum, dist.world_size)
    if long is not None:
        log.info("%s: clips of %d frames, batch %d, from step %d", run.name, st.long_num_frames,
                 st.long_batch_size, st.long_from_step)
    while state.step < st.steps:
        in_long = long is not None and state.step >= st.long_from_step
        set_lr(opt, (st.long_lr or st.lr) if in_long else st.lr, state.step, st)
        gen = step_generator(cfg.seed, run.name, state.step, dist.rank)
        ds, batch = (long, st.long_batch_size) if in_long else (short, st.batch_size)
        gan_on = disc is not None and state.step >= st.gan_from_step
        pairs: list[tuple[Tensor, Tensor]] = []  # (real, fake) clips of the step, for the discriminator

        def micro(i: int, gen: torch.Generator = gen, ds: ShapesDataset = ds, batch: int = batch,
                  gan_on: bool = gan_on, pairs: list[tuple[Tensor, Tensor]] = pairs):
            def fn() -> tuple[Tensor, dict[str, Metric]]:
                video = _batch(ds, state.step, i, batch, dist, st.grad_accum, st.crop, gen).to(dist.device)
                with autocast(cfg, dist.device):
                    shape = (video.shape[0], z, 1 + (video.shape[2] - 1) // vae.config.temporal_stride,
                             video.shape[3] // vae.config.spatial_stride, video.shape[4] // vae.config.spatial_stride)
                    noise = torch.randn(shape, generator=gen).to(dist.device)
                    recon, aux_recon, mu = model(video, noise, st.latent_noise)
                    loss = torch.zeros((), device=dist.device)
                    metrics: dict[str, Metric] = {}
                    if recon is not None:
                        part, metrics = reconstruction_loss(recon.float(), video, st.fg_weight, st.l1_weight,
                                                            st.mse_weight, st.grad_weight)
                        loss = loss + st.decoder_weight * part
                        if gan_on:
                            disc.requires_grad_(False)  # the generator's term reaches the decoder only
                            gan = generator_hinge_loss(disc(recon.float()))
                            disc.requires_grad_(True)
                            loss = loss + st.decoder_weight * st.gan_weight * gan
                            metrics["loss_gan"] = gan.detach()
                            pairs.append((video, recon.detach().float()))
                    if aux_recon is not None:
                        part, aux_metrics = reconstruction_loss(aux_recon.float(), video, st.fg_weight,
                                                                st.l1_weight, st.mse_weight, st.grad_weight)
                        loss = loss + st.aux_weight * part
                        metrics.update({f"aux_{k}": v for k, v in aux_metrics.items()})
                    reg = mu.float().square().mean()
                    if anchor is not None:
                        with torch.no_grad():
                            mu0 = anchor.encode(video)  # [B, z, t, h, w]
                        drift = (vae.normalize(mu.float()) - anchor.normalize(mu0.float())).square().mean()
                        loss = loss + st.anchor_weight * drift
                        metrics["latent_drift"] = drift.detach().sqrt()
                metrics["mu_rms"] = reg.detach().sqrt()
                return loss + st.latent_l2 * reg, metrics
            return fn

        metrics = accumulate(model, [micro(i) for i in range(st.grad_accum)])
        if (norm := optimizer_step(opt, params, st.grad_clip)) is not None:
            metrics["grad_norm"] = norm
        if gan_on:
            metrics["loss_disc"] = _discriminator_step(disc, optimizers["opt_disc"], pairs, st, state.step)
        state.step += 1
        run.log_step(state, metrics)
        if st.sample_every and state.step % st.sample_every == 0 and dist.is_main:
            write_reconstruction(vae, long or short, run.samples_dir / f"recon-{state.step:06d}.mp4", cfg.data.fps)
        run.maybe_checkpoint(state, force=state.step == st.steps)
    run.finish()


def _discriminator_step(disc: nn.Module, opt: torch.optim.Optimizer, pairs: list[tuple[Tensor, Tensor]],
                        st: VAEStageConfig, step: int) -> Tensor:
    """One update of the patch discriminator on the step's real clips and (detached) reconstructions."""
    set_lr(opt, st.gan_lr or st.lr, step, st)
    total = torch.zeros((), device=pairs[0][0].device)
    for real, fake in pairs:
        logits = disc(torch.cat([real, fake]))  # [2*B*T, 1, h, w]: one forward for both
        loss = discriminator_hinge_loss(*logits.chunk(2)) / len(pairs)
        loss.backward()
        total = total + loss.detach()
    optimizer_step(opt, list(disc.parameters()), st.grad_clip)
    return total


@torch.no_grad()
def measure_latent_stats(vae: WanVAE, ds: ShapesDataset, clips: int, device: torch.device, vae_cfg: VAEConfig
                         ) -> VAEConfig:
    """Per-channel mean and std of the posterior means of ``clips`` held-out clips."""
    vae.eval()
    held_out = 10_000_000  # indices far beyond any training step's clips
    mus = [vae.encode(ds[held_out + i]["video"][None].to(device)) for i in range(clips)]  # [1, z, t, h, w]
    flat = torch.cat([m.transpose(0, 1).flatten(1) for m in mus], dim=1).double()  # [z, N]
    mean, std = flat.mean(dim=1), flat.std(dim=1).clamp_min(1e-4)
    vae.train()
    log.info("latent mean %s std %s", [round(v, 3) for v in mean.tolist()], [round(v, 3) for v in std.tolist()])
    return dataclasses.replace(vae_cfg, latents_mean=tuple(mean.tolist()), latents_std=tuple(std.tolist()))


@torch.no_grad()
def write_reconstruction(vae: WanVAE, ds: ShapesDataset, path: Path, fps: int) -> None:
    """Side-by-side MP4: a held-out clip and its reconstruction."""
    was_training = vae.training
    vae.eval()
    video = ds[20_000_000]["video"][None].to(vae.dtype)  # [1, 3, T, H, W]
    recon = vae.decode(vae.normalize(vae.encode(video)))
    both = torch.cat([video, recon], dim=4)[0]  # [3, T, H, 2W]
    path.parent.mkdir(parents=True, exist_ok=True)
    with Mp4Writer(path, fps=fps) as writer:
        writer.write(tensor_to_frames(both))
    vae.train(was_training)


def save_trained_vae(folder: Path, vae: WanVAE, vae_cfg: VAEConfig) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_file(vae.state_dict(), folder / VAE_FILE, {"format": "sf-sdk"})
    (folder / VAE_CONFIG_FILE).write_text(json.dumps(to_dict(vae_cfg), indent=2) + "\n")


def finished_vae_dir(run_dir: str | Path) -> Path | None:
    """The newest finished VAE of a run: ``vae_decoder/final`` when that stage is done (its
    decoder trained last), else ``vae/final`` when done, else None."""
    return next((Path(run_dir) / stage / "final" for stage in ("vae_decoder", "vae")
                 if (Path(run_dir) / stage / "final" / "DONE").is_file()), None)


def load_vae_dir(folder: Path, device: torch.device) -> WanVAE:
    """A VAE saved by :func:`save_trained_vae` (weights and config with latent statistics), frozen."""
    vae_cfg = from_dict(VAEConfig, json.loads((folder / VAE_CONFIG_FILE).read_text()), source=folder / VAE_CONFIG_FILE)
    vae = WanVAE(vae_cfg)
    load_into(vae, load_state_dict(folder / VAE_FILE), what=f"VAE ({folder})", config=vae_cfg)
    return vae.to(device).eval().requires_grad_(False)


def check_latents_unmoved(run_dir: str | Path) -> None:
    """Raise when the run's ``vae_decoder`` stage trained its encoder without the anchor: its
    latents are no longer ``vae/final``'s, so DiT stages of this run would train on latents its
    decoder no longer reads. New DiT stages belong in a new run with ``init_vae`` set to this one."""
    done = Path(run_dir) / "vae_decoder" / "final" / "DONE"
    if not done.is_file():
        return
    info = json.loads(done.read_text() or "{}")
    if info.get("train_encoder") and not info.get("anchored"):
        raise ValueError(f"{run_dir}: its vae_decoder stage trained the encoder freely (new latents); train DiT "
                         f"stages on them in a new run with init_vae={run_dir}")


def load_trained_vae(run_dir: str | Path, device: torch.device) -> WanVAE:
    """The VAE produced by the ``vae`` stage of ``run_dir`` (with its latent statistics), frozen."""
    folder = Path(run_dir) / "vae" / "final"
    if not (folder / VAE_CONFIG_FILE).is_file():
        raise ValueError(f"{folder} holds no trained VAE: run the vae stage first (stages=[vae])")
    return load_vae_dir(folder, device)
