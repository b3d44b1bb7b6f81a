"""A patch discriminator on video frames and its hinge losses: the adversarial term of the VAE
stages (Wan's VAE, like the Stable Diffusion autoencoders, was trained with reconstruction,
perceptual and GAN terms; per-pixel losses alone average an uncertain edge into a blur).

:class:`PatchDiscriminator` is the pix2pix / taming PatchGAN layout at a small width: stride-2
convs with GroupNorm and LeakyReLU, then a 1-channel conv, one logit per overlapping patch of
every frame (``[B, 3, T, H, W]`` is scored frame by frame). The losses are the hinge pair

    discriminator: relu(1 - D(real)) + relu(1 + D(fake))     generator: -D(fake)

averaged over patches. Pure modules and functions: the stage owns optimisers and schedules.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["PatchDiscriminator", "discriminator_hinge_loss", "generator_hinge_loss"]

RGB = 3


class PatchDiscriminator(nn.Module):
    """Frames ``[B, 3, T, H, W]`` -> patch logits ``[B*T, 1, H / 2**levels, W / 2**levels]``."""

    def __init__(self, dim: int = 32, levels: int = 3) -> None:
        super().__init__()
        if dim <= 0 or levels <= 0:
            raise ValueError(f"PatchDiscriminator needs dim > 0 and levels > 0, got {dim} and {levels}")
        layers: list[nn.Module] = [nn.Conv2d(RGB, dim, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c_in = dim
        for i in range(1, levels):
            c_out = dim * 2 ** min(i, 3)
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.GroupNorm(1, c_out), nn.LeakyReLU(0.2)]
            c_in = c_out
        layers += [nn.Conv2d(c_in, c_in, 3, padding=1), nn.GroupNorm(1, c_in), nn.LeakyReLU(0.2),
                   nn.Conv2d(c_in, 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, video: Tensor) -> Tensor:
        frames = video.transpose(1, 2).flatten(0, 1)  # [B*T, 3, H, W]
        return self.net(frames)  # [B*T, 1, h, w]


def discriminator_hinge_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    return (real_logits.neg().add(1).relu().mean() + fake_logits.add(1).relu().mean()) / 2


def generator_hinge_loss(fake_logits: Tensor) -> Tensor:
    return fake_logits.mean().neg()
