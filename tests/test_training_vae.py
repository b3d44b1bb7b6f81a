"""The vae stage's encoder phase: an auxiliary decoder trains the encoder while the Wan decoder
waits for the vae_decoder stage; resume stays exact with the auxiliary decoder in the state."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sf_sdk.config import VAEConfig
from training.stages.vae import AuxDecoder
from training.train import compose, run
from training.utils.config import TrainConfig, VAEStageConfig

ENCODER_PHASE = ("vae.decoder_weight=0", "vae.aux_decoder_dim=4")


def _config(run_dir: Path, *overrides: str) -> TrainConfig:
    return compose("smoke", [f"run_dir={run_dir}", *overrides])


def _run(run_dir: Path, *overrides: str) -> None:
    run(_config(run_dir, *overrides))


def test_aux_decoder_maps_latent_frames_to_the_causal_video_frames() -> None:
    cfg = VAEConfig(dim=4, z_dim=4, num_res_blocks=1, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
    aux = AuxDecoder(cfg, dim=4)
    z = torch.randn(2, 4, 3, 8, 8)  # three latent frames: 1 + 4 + 4 video frames
    video = aux(z)
    assert video.shape == (2, 3, 9, 64, 64)
    # Each latent frame decodes its own frames only: changing latent frame 2 leaves frames 0-4.
    z2 = z.clone()
    z2[:, :, 2] += 1.0
    other = aux(z2)
    assert torch.equal(video[:, :, :5], other[:, :, :5])
    assert not torch.allclose(video[:, :, 5:], other[:, :, 5:])


def test_encoder_phase_trains_the_encoder_and_leaves_the_wan_decoder(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _run(run_dir, "stages=[vae]", "vae.steps=2", *ENCODER_PHASE)
    ckpt = load_file(run_dir / "vae" / "checkpoints" / "ckpt-00000002.safetensors")
    assert any(k.startswith("model.aux_decoder.") for k in ckpt)
    torch.manual_seed(_config(run_dir).seed)  # the stage's own initialisation
    from sf_sdk.models.vae import WanVAE

    cfg = _config(run_dir).vae_model
    init = WanVAE(dataclasses.replace(cfg, latents_mean=(0.0,) * cfg.z_dim,
                                      latents_std=(1.0,) * cfg.z_dim)).state_dict()
    trained = {k[len("model.vae."):]: v for k, v in ckpt.items() if k.startswith("model.vae.")}
    decoder = [k for k in init if k.startswith(("decoder.", "conv2."))]
    encoder = [k for k in init if k.startswith(("encoder.", "conv1."))]
    assert all(torch.equal(init[k], trained[k]) for k in decoder)
    assert any(not torch.equal(init[k], trained[k]) for k in encoder)
    # The vae_decoder stage then trains the Wan decoder on the frozen latents.
    _run(run_dir, "stages=[vae_decoder]", "vae_decoder.steps=1")
    assert (run_dir / "vae_decoder" / "final" / "vae.safetensors").is_file()


def test_encoder_phase_resume_is_exact(tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(straight, "stages=[vae]", "vae.steps=2", *ENCODER_PHASE)
    _run(resumed, "stages=[vae]", "vae.steps=1", *ENCODER_PHASE)
    _run(resumed, "stages=[vae]", "vae.steps=2", *ENCODER_PHASE)
    name = "ckpt-00000002.safetensors"
    a = load_file(straight / "vae" / "checkpoints" / name)
    b = load_file(resumed / "vae" / "checkpoints" / name)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_encoder_phase_needs_something_to_train_the_encoder() -> None:
    with pytest.raises(ValueError, match="needs an auxiliary decoder"):
        VAEStageConfig(decoder_weight=0.0)


def test_learning_rate_warmup_then_cosine_decay() -> None:
    from training.utils.loop import set_lr

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    stage = VAEStageConfig(steps=110, warmup_steps=10, lr_final_ratio=0.1)
    lrs = []
    for step in range(stage.steps):
        set_lr(opt, 2.0, step, stage)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.2) and lrs[9] == pytest.approx(2.0)  # warmup
    assert lrs[10] == pytest.approx(2.0) and lrs[60] == pytest.approx(1.1, rel=0.02)  # cosine midpoint
    assert lrs[-1] == pytest.approx(0.2, rel=1e-3)  # down to lr * lr_final_ratio
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    constant = VAEStageConfig(steps=110, warmup_steps=10)
    set_lr(opt, 2.0, 100, constant)
    assert opt.param_groups[0]["lr"] == 2.0
    with pytest.raises(ValueError, match="lr_final_ratio"):
        VAEStageConfig(lr_final_ratio=0.0)


def test_cosine_decay_can_start_later() -> None:
    from training.utils.loop import set_lr

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    stage = VAEStageConfig(steps=101, warmup_steps=10, lr_final_ratio=0.1, decay_from_step=50)
    lrs = []
    for step in range(stage.steps):
        set_lr(opt, 2.0, step, stage)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[10] == lrs[50] == pytest.approx(2.0)  # constant until decay_from_step
    assert lrs[75] == pytest.approx(1.1, rel=0.02) and lrs[-1] == pytest.approx(0.2, rel=1e-3)


def test_long_clip_phase(tmp_path: Path) -> None:
    """From long_from_step on, the stage trains on long clips at long_lr: the same weights as a
    short-clip run until then, different after."""
    common = ("stages=[vae]", "vae.steps=3", "vae.num_frames=5", "vae.ckpt_every_steps=1", *ENCODER_PHASE)
    _run(tmp_path / "short", *common)
    _run(tmp_path / "long", *common, "vae.long_from_step=2", "vae.long_num_frames=9", "vae.long_batch_size=1",
         "vae.long_lr=1e-2")
    ckpts = [{step: load_file(tmp_path / name / "vae" / "checkpoints" / f"ckpt-{step:08d}.safetensors")
              for step in (2, 3)} for name in ("short", "long")]
    short, long = ckpts
    assert all(torch.equal(short[2][k], long[2][k]) for k in short[2])
    assert any(not torch.equal(short[3][k], long[3][k]) for k in short[3] if k.startswith("model.vae.encoder"))
    with pytest.raises(ValueError, match="long_from_step"):
        VAEStageConfig(steps=10, long_from_step=10)
    with pytest.raises(ValueError, match="long_lr"):
        VAEStageConfig(long_lr=-1.0)


def test_gradient_l1_sees_blurred_edges_not_offsets() -> None:
    from training.algorithms.edges import gradient_l1

    target = torch.zeros(1, 3, 2, 16, 16)
    target[..., 4:12, 4:12] = 1.0  # a square
    assert gradient_l1(target, target) == 0
    assert gradient_l1(target + 0.3, target) < 1e-6  # a constant offset has the same gradients
    blurred = torch.nn.functional.avg_pool3d(target, (1, 3, 3), stride=1, padding=(0, 1, 1))
    assert gradient_l1(blurred, target) > 0.01
    # A constant weight changes nothing; an object weight counts the edge pairs more.
    assert torch.allclose(gradient_l1(blurred, target, torch.full((1, 1, 2, 16, 16), 3.0)),
                          gradient_l1(blurred, target))
    weight = 1.0 + 10.0 * (target[:, :1] > 0.5).float()
    assert gradient_l1(blurred, target, weight) > gradient_l1(blurred, target)


def test_grad_weight_adds_the_edge_loss_and_changes_training(tmp_path: Path) -> None:
    """vae_decoder.grad_weight > 0: the stage logs loss_grad and trains other weights than without it
    (grad_weight=0, the default, is the old loss exactly: the existing tests' checkpoints)."""
    import json

    common = ("stages=[vae,vae_decoder]", "vae.steps=1", "vae_decoder.steps=2")
    _run(tmp_path / "plain", *common)
    _run(tmp_path / "edges", *common, "vae_decoder.grad_weight=1.0")
    lines = [json.loads(line) for line in (tmp_path / "edges" / "vae_decoder" / "metrics.jsonl").read_text().splitlines()]
    assert all(line["loss_grad"] > 0 for line in lines)
    plain_lines = (tmp_path / "plain" / "vae_decoder" / "metrics.jsonl").read_text()
    assert "loss_grad" not in plain_lines
    name = "vae_decoder/checkpoints/ckpt-00000002.safetensors"
    a, b = load_file(tmp_path / "plain" / name), load_file(tmp_path / "edges" / name)
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("model.vae.decoder"))
    with pytest.raises(ValueError, match="grad_weight"):
        VAEStageConfig(grad_weight=-1.0)


def test_patch_discriminator_scores_every_frame_by_patches() -> None:
    from training.algorithms.patch_gan import (
        PatchDiscriminator,
        discriminator_hinge_loss,
        generator_hinge_loss,
    )

    disc = PatchDiscriminator(dim=4, levels=3)
    logits = disc(torch.randn(2, 3, 5, 32, 32))
    assert logits.shape == (10, 1, 4, 4)  # one logit map per frame, a patch per 8x8 pixels
    real, fake = torch.full((4,), 2.0), torch.full((4,), -2.0)
    assert discriminator_hinge_loss(real, fake) == 0  # both beyond the margin
    assert generator_hinge_loss(fake) == 2.0
    with pytest.raises(ValueError, match="dim > 0"):
        PatchDiscriminator(dim=0)


def test_gan_weight_trains_a_discriminator_and_resumes_exactly(tmp_path: Path) -> None:
    """vae_decoder.gan_weight > 0: the discriminator and its optimizer are in the checkpoint, the
    stage logs loss_gan / loss_disc, and a kill + restart resumes to the same weights."""
    import json

    gan = ("vae_decoder.gan_weight=0.1", "vae_decoder.gan_dim=4", "vae_decoder.grad_weight=1.0")
    common = ("stages=[vae,vae_decoder]", "vae.steps=1")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(straight, *common, "vae_decoder.steps=2", *gan)
    _run(resumed, *common, "vae_decoder.steps=1", *gan)
    _run(resumed, *common, "vae_decoder.steps=2", *gan)
    name = "vae_decoder/checkpoints/ckpt-00000002.safetensors"
    a, b = load_file(straight / name), load_file(resumed / name)
    assert any(k.startswith("model.discriminator.") for k in a)
    assert any(k.startswith("optim.opt_disc.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(line) for line in (straight / "vae_decoder" / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_gan" in line and "loss_disc" in line for line in lines)
    with pytest.raises(ValueError, match="gan_weight"):
        VAEStageConfig(gan_weight=-1.0)
    with pytest.raises(ValueError, match="needs decoder_weight"):
        VAEStageConfig(gan_weight=0.1, decoder_weight=0.0, aux_decoder_dim=4)


def test_edge_options_default_off_and_the_edges_config() -> None:
    """The existing configs keep the old loss; shapes_tiny_vae_edges trains the shipped decoder on."""
    for name in ("shapes_tiny", "smoke"):
        cfg = compose(name, ["run_dir=/tmp/unused"])
        for st in (cfg.vae, cfg.vae_decoder):
            assert st.grad_weight == 0 and st.gan_weight == 0
    edges = compose("shapes_tiny_vae_edges", ["run_dir=/tmp/unused"])
    assert edges.init_vae == "shapes-tiny" and edges.stages == ("vae", "vae_decoder")
    assert edges.vae_decoder.grad_weight > 0 and edges.vae_decoder.mse_weight == 0
    assert edges.vae_model == compose("shapes_tiny", ["run_dir=/tmp/unused"]).vae_model


def test_widened_decoder_computes_the_narrow_decoders_function() -> None:
    """Every hidden channel copied k times (inputs divided by k, q by sqrt(k)): the same frames,
    through the attention blocks, the time upsampling and the streaming cache."""
    from sf_sdk.models.vae import WanVAE
    from training.algorithms.widen import widen_decoder

    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(dim=4, num_res_blocks=1, attn_scales=(0.5,))).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.2 * torch.randn_like(p))  # away from the ones / zeros of a fresh norm and bias
    wide = widen_decoder(vae, 12, noise=0.0).eval()
    assert wide.config.decoder_dim == 12 and wide.config.dim == 4
    assert sum(p.numel() for p in wide.decoder.parameters()) > 8 * sum(p.numel() for p in vae.decoder.parameters())
    assert all(torch.equal(t, wide.state_dict()[k]) for k, t in vae.state_dict().items() if not k.startswith("decoder."))
    z = torch.randn(1, 16, 3, 4, 4)
    with torch.no_grad():
        narrow_frames = vae.decode(z)
        torch.testing.assert_close(wide.decode(z), narrow_frames, atol=1e-5, rtol=1e-4)
        noisy = widen_decoder(vae, 8, noise=1e-3, seed=1).eval().decode(z)
    assert 0 < (noisy - narrow_frames).abs().max() < 0.05
    with pytest.raises(ValueError, match="multiple of the decoder's width 4"):
        widen_decoder(vae, 6)


def test_init_vae_with_a_wider_decoder_widens_the_models_decoder(tmp_path: Path) -> None:
    """``vae_model.decoder_dim`` above the given model's width: its encoder and latents kept, its
    decoder widened, then trained on by the vae_decoder stage."""
    from sf_sdk.checkpoint import load_pretrained
    from training.stages.vae import load_trained_vae

    run_dir = tmp_path / "run"
    _run(run_dir, "init_vae=shapes-tiny", "vae_model.dim=8", "vae_model.decoder_dim=16", "dit.in_dim=16",
         "dit.out_dim=16", "stages=[vae]")
    wide = load_trained_vae(run_dir, torch.device("cpu"))
    shipped = load_pretrained("shapes-tiny", load_text_encoder=False).vae
    assert wide.config.decoder_dim == 16 and wide.config.latents_std == shipped.config.latents_std
    z = torch.randn(1, 16, 2, 8, 8)
    with torch.no_grad():
        assert (wide.decode(z) - shipped.decode(z)).abs().max() < 0.1


def _encoder_state(vae) -> dict[str, torch.Tensor]:
    return {k: v for k, v in vae.state_dict().items() if k.startswith(("encoder.", "conv1."))}


def _latent_shift(run_dir: Path, start) -> float:
    """RMS change of the posterior mean of one fixed clip, in units of the starting statistics."""
    from training.stages.vae import load_vae_dir

    trained = load_vae_dir(run_dir / "vae_decoder" / "final", torch.device("cpu"))
    video = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        return (start.normalize(trained.encode(video)) - start.normalize(start.encode(video))).square().mean().sqrt().item()


def test_vae_decoder_can_train_the_encoder_with_or_without_the_anchor(tmp_path: Path) -> None:
    """``vae_decoder.train_encoder``: the encoder trains too. Free, the latent statistics are
    measured again and the run's DiT stages refuse the moved latents; anchored, the statistics
    stay and the latents move less than free ones (the anchor's pull)."""
    import json

    from training.stages.export import export_model
    from training.stages.vae import load_trained_vae, load_vae_dir

    common = ("stages=[vae,vae_decoder]", "vae.steps=1", "vae_decoder.steps=4", "vae_decoder.lr=3e-3",
              "vae_decoder.train_encoder=true")
    free, anchored = tmp_path / "free", tmp_path / "anchored"
    _run(free, *common)
    _run(anchored, *common, "vae_decoder.anchor_weight=1000")
    start = load_trained_vae(free, torch.device("cpu"))
    moved = load_vae_dir(free / "vae_decoder" / "final", torch.device("cpu"))
    held = load_vae_dir(anchored / "vae_decoder" / "final", torch.device("cpu"))
    assert any(not torch.equal(v, _encoder_state(moved)[k]) for k, v in _encoder_state(start).items())
    assert any(not torch.equal(v, _encoder_state(held)[k]) for k, v in _encoder_state(start).items())
    assert moved.config.latents_std != start.config.latents_std
    assert held.config.latents_std == start.config.latents_std
    assert _latent_shift(anchored, start) < 0.5 * _latent_shift(free, start)
    lines = [json.loads(line) for line in (anchored / "vae_decoder" / "metrics.jsonl").read_text().splitlines()]
    assert all("latent_drift" in line for line in lines)
    assert json.loads((free / "vae_decoder" / "final" / "DONE").read_text())["train_encoder"] is True
    # The free run's own teacher would encode with vae/final's encoder: it stops and says what to do.
    with pytest.raises(ValueError, match="init_vae="):
        _run(free, "stages=[teacher]", "teacher.steps=1")
    with pytest.raises(ValueError, match="init_vae="):  # nor does export pair a DiT with the moved latents
        export_model(_config(free), tmp_path / "model", "self_forcing")
    # Its VAE, latents and statistics, is what a new run takes with init_vae.
    _run(tmp_path / "next", f"init_vae={free}", "stages=[vae]")
    taken = load_trained_vae(tmp_path / "next", torch.device("cpu"))
    assert taken.config.latents_std == moved.config.latents_std


def test_train_encoder_options_are_checked() -> None:
    with pytest.raises(ValueError, match="needs train_encoder=true"):
        VAEStageConfig(anchor_weight=1.0)
    with pytest.raises(ValueError, match="anchor_weight must be >= 0"):
        VAEStageConfig(train_encoder=True, anchor_weight=-1.0)
    with pytest.raises(ValueError, match="vae_decoder.train_encoder=true"):
        compose("smoke", ["run_dir=/tmp/unused", "vae.train_encoder=true"])
