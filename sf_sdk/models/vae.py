"""The Wan2.1 causal video VAE: encoder, decoder, streaming decoder and an export-friendly step.

Parameter names are those of the official ``WanVAE_`` module, so ``Wan2.1_VAE.pth`` loads with
``load_state_dict`` and no renaming.

Stream semantics (what "causal" means here, and what every decode path computes):

* Every temporal convolution with kernel ``k`` and stride ``s`` keeps the last ``k - s`` frames
  of its input (its *conv cache*, ``context`` frames; 2 for the usual 3-tap convs, the
  official ``CACHE_T``) and prepends them to the next frames it sees. At the start of a stream
  the cache is zeros: causal zero padding. So decoding frame by frame equals one causal pass
  over the whole clip.
* The first latent frame is special. In the decoder it skips temporal upsampling and yields
  one pixel frame; the time convs of the temporal upsamplers only start at the second latent
  frame, with zero history. Every later latent frame yields ``temporal_stride`` (4) pixel
  frames. In the encoder the first video frame skips temporal downsampling and later frames
  come in groups of ``temporal_stride``.
* Latents outside the VAE are normalized per channel: ``z = (mu - mean) / std``.

Three ways to decode, one code path (:meth:`WanVAE._decode_frame`, one latent frame per call,
bounded memory like the official decode):

* :meth:`WanVAE.decode` — a whole clip.
* :class:`StreamingDecoder` — successive chunks of a stream; equals one ``decode`` of the
  concatenated latents.
* :class:`VAEDecodeStep` — one latent frame with the conv cache as explicit fixed-shape tensors
  (inputs and outputs of the graph), for ``torch.export`` / ONNX / TensorRT.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from sf_sdk.attention import attention
from sf_sdk.config import VAEConfig

__all__ = [
    "WanVAE",
    "StreamingDecoder",
    "decode_streams",
    "VAEDecodeStep",
    "CacheSpec",
    "ConvCache",
    "CausalConv3d",
]

log = logging.getLogger(__name__)

RGB_CHANNELS = 3
# Each resample stage halves or doubles height and width.
SPATIAL_FACTOR = 2


# --------------------------------------------------------------------------------------------
# The conv cache
# --------------------------------------------------------------------------------------------


class ConvCache:
    """The temporal state of one stream through an encoder or decoder.

    ``tensors`` holds one entry per cached conv, in call order: the last ``context`` input
    frames of that conv, ``[B, C_in, context, H, W]``, or ``None`` for "zeros" (nothing seen
    yet). One pass of the encoder or decoder walks the list once; each conv reads its entry
    and replaces it with its new state. The list is updated in place, so an old entry is freed
    as soon as its conv has run.

    ``start`` is True for the call that opens the stream (the first frame), which skips the
    temporal resampling.
    """

    def __init__(self, tensors: list[Tensor | None], *, start: bool) -> None:
        self.tensors = tensors
        self.start = start
        self._index = 0

    def read(self) -> Tensor | None:
        """The state of the next conv in call order."""
        if self._index >= len(self.tensors):
            raise ValueError(f"the conv cache holds {len(self.tensors)} entries but the model "
                             f"needs more: build it for this model (see cache_spec)")
        return self.tensors[self._index]

    def write(self, state: Tensor | None) -> None:
        """Replace the entry just read and move on to the next conv."""
        self.tensors[self._index] = state
        self._index += 1

    def keep(self) -> None:
        """Leave the next conv's state as it is."""
        self.write(self.read())

    def check_consumed(self) -> None:
        if self._index != len(self.tensors):
            raise ValueError(f"the conv cache holds {len(self.tensors)} entries but the model used "
                             f"{self._index}: build it for this model (see cache_spec)")


@dataclass(frozen=True)
class CacheSpec:
    """Shape of one conv-cache tensor: the last ``shape[2]`` input frames of conv ``name``."""

    name: str
    shape: tuple[int, int, int, int, int]  # [B, C_in, context, H, W]

    @property
    def numel(self) -> int:
        b, c, t, h, w = self.shape
        return b * c * t * h * w


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


_HAS_ONEDNN = torch.backends.mkldnn.is_available()


class CausalConv3d(nn.Conv3d):
    """A 3D convolution that is causal in time.

    Spatial padding is symmetric (zeros); in time the conv sees ``context = kernel_t - stride_t``
    frames of the past in front of its input, read from (and written back to) a
    :class:`ConvCache`, or zeros without one. A 1-tap conv has no context and needs no cache.

    On CPU, a single clip (batch 1) goes to oneDNN directly: PyTorch's dispatch picks its slow
    reference kernel for a batch of 1 when ``C * T * H`` is small (its size rule ignores the
    width): ~3x slower for the shapes-tiny streaming decoder (``python benchmarks/vae_decode.py``).
    ``CausalConv3d.onednn_single_clip = False`` goes back to the default dispatch.
    """

    onednn_single_clip = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, spatial_padding: int = 0) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=(0, spatial_padding, spatial_padding))
        self.context = self.kernel_size[0] - self.stride[0]
        if self.context < 0:
            raise ValueError(f"temporal stride {self.stride[0]} larger than the kernel "
                             f"{self.kernel_size[0]} would skip frames")

    def forward(self, x: Tensor, cache: ConvCache | None = None) -> Tensor:
        if self.context == 0:
            return super().forward(x)
        past = cache.read() if cache is not None else None
        if past is None:
            b, c, _, h, w = x.shape
            past = x.new_zeros(b, c, self.context, h, w)
        x = torch.cat([past, x], dim=2)  # [B, C, context + T, H, W]
        if cache is not None:
            # A copy, so the state does not keep the whole concatenation alive.
            cache.write(x[:, :, -self.context:].contiguous())
        return super().forward(x)

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if (self.onednn_single_clip and _HAS_ONEDNN and x.shape[0] == 1 and x.device.type == "cpu"
                and x.dtype == torch.float32 and type(x) is Tensor
                and not torch.compiler.is_compiling() and not torch.jit.is_tracing()):
            return torch.ops.aten.mkldnn_convolution(x, weight, bias, self.padding, self.stride, self.dilation,
                                                     self.groups)
        return super()._conv_forward(x, weight, bias)


class RMSNorm(nn.Module):
    """Normalize over channels (dim 1) to unit RMS, then scale by ``gamma``."""

    def __init__(self, dim: int, spatial_dims: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * spatial_dims))

    def forward(self, x: Tensor) -> Tensor:
        # x / max(|x|, 1e-12) over channels, as F.normalize, but ~6x faster on CPU (forward and
        # backward): F.normalize's vector norm over the strided channel dim is slow.
        inv_norm = torch.rsqrt(x.square().sum(dim=1, keepdim=True).clamp_min(1e-24))  # [B, 1, ...]
        return x * inv_norm * self.scale * self.gamma


def _check_positive(value: int, name: str) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _frames_to_batch(x: Tensor) -> Tensor:
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)  # [B*T, C, H, W]


def _batch_to_frames(x: Tensor, batch: int) -> Tensor:
    bt, c, h, w = x.shape
    return x.reshape(batch, bt // batch, c, h, w).transpose(1, 2)  # [B, C, T, H, W]


class ResidualBlock(nn.Module):
    """norm, SiLU, causal conv, norm, SiLU, dropout, causal conv; plus a 1x1x1 shortcut."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        # Sequential only for the official parameter names (residual.0/.2/.3/.6).
        self.residual = nn.Sequential(
            RMSNorm(in_dim, spatial_dims=3), nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, spatial_padding=1),
            RMSNorm(out_dim, spatial_dims=3), nn.SiLU(), nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, spatial_padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: ConvCache | None = None) -> Tensor:
        norm1, act1, conv1, norm2, act2, dropout, conv2 = self.residual
        h = conv1(act1(norm1(x)), cache)
        h = conv2(dropout(act2(norm2(h))), cache)
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no attention across time)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, spatial_dims=2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, cache: ConvCache | None = None) -> Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(_frames_to_batch(x))  # [B*T, C, H, W]
        qkv = self.to_qkv(y).reshape(b * t, 3 * c, h * w).transpose(1, 2)  # [B*T, H*W, 3C]
        q, k, v = qkv.unsqueeze(2).chunk(3, dim=-1)  # each [B*T, H*W, 1, C]
        y = attention(q, k, v)  # [B*T, H*W, 1, C]
        y = y.reshape(b * t, h * w, c).transpose(1, 2).reshape(b * t, c, h, w)  # [B*T, C, H, W]
        return _batch_to_frames(self.proj(y), b) + x


ResampleMode = Literal["upsample2d", "upsample3d", "downsample2d", "downsample3d"]


class Resample(nn.Module):
    """2x spatial up/downsampling of every frame; the ``3d`` modes also resample time by 2.

    ``upsample3d``: a causal time conv produces two frames per input frame (channels split in
    two halves), before the spatial upsampling; the stream's first frame is not doubled.
    ``downsample3d``: after the spatial downsampling, a 3-tap time conv with stride 2 over the
    previous frame and the new ones; the stream's first frame passes through alone.
    Upsampling also halves the channels (official layout).
    """

    def __init__(self, dim: int, mode: ResampleMode) -> None:
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=float(SPATIAL_FACTOR), mode="nearest"),
                nn.Conv2d(dim, dim // 2, 3, padding=1),
            )
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(
                nn.ZeroPad2d((0, 1, 0, 1)),  # right and bottom only
                nn.Conv2d(dim, dim, 3, stride=SPATIAL_FACTOR),
            )
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    @property
    def upsamples(self) -> bool:
        return self.mode.startswith("upsample")

    def forward(self, x: Tensor, cache: ConvCache | None = None) -> Tensor:
        if self.mode == "upsample3d":
            x = self._double_frames(x, cache)
        x = _batch_to_frames(self.resample(_frames_to_batch(x)), x.shape[0])  # [B, C', T, H', W']
        if self.mode == "downsample3d":
            x = self._halve_frames(x, cache)
        return x

    def _double_frames(self, x: Tensor, cache: ConvCache | None) -> Tensor:
        if cache is None or cache.start:
            if cache is not None:
                cache.keep()  # the time conv starts with the next frame, from zeros
            return x
        b, c, t, h, w = x.shape
        y = self.time_conv(x, cache)  # [B, 2C, T, H, W]
        # Output frame 2i is the first channel half at input frame i, 2i + 1 the second.
        y = y.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5)  # [B, C, T, 2, H, W]
        return y.reshape(b, c, 2 * t, h, w)  # [B, C, 2T, H, W]

    def _halve_frames(self, x: Tensor, cache: ConvCache | None) -> Tensor:
        if cache is None or cache.start:
            if cache is not None:
                # The first frame passes through alone and becomes the time conv's history.
                cache.read()
                cache.write(x[:, :, -self.time_conv.context:].contiguous())
            return x
        return self.time_conv(x, cache)  # [B, C, T/2, H, W]


# --------------------------------------------------------------------------------------------
# Encoder and decoder
# --------------------------------------------------------------------------------------------


def _cached_convs(block: nn.Module, prefix: str) -> list[tuple[str, CausalConv3d]]:
    """The convs of ``block`` that keep a cache, in call order (registration order)."""
    return [(name, m) for name, m in block.named_modules(prefix=prefix)
            if isinstance(m, CausalConv3d) and m.context > 0]


class Encoder3d(nn.Module):
    """Video [B, 3, T, H, W] -> moments [B, 2*z_dim, T', H/8, W/8] (mean and log-variance)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        dims = [config.dim * m for m in (1, *config.dim_mult)]
        self.conv1 = CausalConv3d(RGB_CHANNELS, dims[0], 3, spatial_padding=1)

        blocks: list[nn.Module] = []
        scale = 1.0
        for stage, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(config.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, config.dropout))
                if scale in config.attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if stage < len(config.dim_mult) - 1:
                temporal = config.temperal_downsample[stage]
                blocks.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
                scale /= SPATIAL_FACTOR
        self.downsamples = nn.Sequential(*blocks)

        width = dims[-1]
        self.middle = nn.Sequential(
            ResidualBlock(width, width, config.dropout), AttentionBlock(width),
            ResidualBlock(width, width, config.dropout),
        )
        self.head = nn.Sequential(
            RMSNorm(width, spatial_dims=3), nn.SiLU(),
            CausalConv3d(width, 2 * config.z_dim, 3, spatial_padding=1),
        )

    def forward(self, x: Tensor, cache: ConvCache | None = None) -> Tensor:
        x = self.conv1(x, cache)
        for block in (*self.downsamples, *self.middle):
            x = block(x, cache)
        norm, act, conv = self.head
        return conv(act(norm(x)), cache)


class Decoder3d(nn.Module):
    """Latents [B, z_dim, T, h, w] (un-normalized, after ``conv2``) -> video [B, 3, T', 8h, 8w]."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        mults = config.dim_mult
        width = config.decoder_dim or config.dim
        dims = [width * m for m in (mults[-1], *mults[::-1])]
        temporal_upsample = config.temperal_downsample[::-1]
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3, spatial_padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0], config.dropout), AttentionBlock(dims[0]),
            ResidualBlock(dims[0], dims[0], config.dropout),
        )

        blocks: list[nn.Module] = []
        scale = 1.0 / SPATIAL_FACTOR ** (len(mults) - 2)
        for stage, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if stage > 0:
                in_dim //= 2  # the previous stage's upsampler halved the channels
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim, config.dropout))
                if scale in config.attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if stage < len(mults) - 1:
                temporal = temporal_upsample[stage]
                blocks.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d"))
                scale *= SPATIAL_FACTOR
        self.upsamples = nn.Sequential(*blocks)

        self.head = nn.Sequential(
            RMSNorm(dims[-1], spatial_dims=3), nn.SiLU(),
            CausalConv3d(dims[-1], RGB_CHANNELS, 3, spatial_padding=1),
        )

    def forward(self, x: Tensor, cache: ConvCache | None = None) -> Tensor:
        x = self.conv1(x, cache)
        for block in (*self.middle, *self.upsamples):
            x = block(x, cache)
        norm, act, conv = self.head
        return conv(act(norm(x)), cache)

    def cache_layout(self, height: int, width: int) -> list[tuple[str, CausalConv3d, int, int]]:
        """(name, conv, height, width) of every cached conv in call order, for latents h x w."""
        layout = [(n, m, height, width) for n, m in _cached_convs(self.conv1, "conv1")]
        for i, block in enumerate(self.middle):
            layout += [(n, m, height, width) for n, m in _cached_convs(block, f"middle.{i}")]
        for i, block in enumerate(self.upsamples):
            # An upsampler's time conv runs before its spatial upsampling.
            layout += [(n, m, height, width) for n, m in _cached_convs(block, f"upsamples.{i}")]
            if isinstance(block, Resample) and block.upsamples:
                height, width = height * SPATIAL_FACTOR, width * SPATIAL_FACTOR
        layout += [(n, m, height, width) for n, m in _cached_convs(self.head, "head")]
        return layout


# --------------------------------------------------------------------------------------------
# The VAE
# --------------------------------------------------------------------------------------------


class WanVAE(nn.Module):
    """The Wan2.1 causal video VAE (official parameter names: encoder, conv1, conv2, decoder).

    Videos are ``[B, 3, T, H, W]`` in [-1, 1] with ``T = 1 + 4k``; latents ``[B, z_dim, 1 + k,
    H/8, W/8]``. :meth:`encode` returns the raw posterior mean; :meth:`decode` takes
    *normalized* latents (what the DiT works with): use ``vae.normalize(vae.encode(video))``
    for the inverse of ``decode``.
    """

    def __init__(self, config: VAEConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else VAEConfig()
        z_dim = self.config.z_dim
        self.encoder = Encoder3d(self.config)
        self.conv1 = CausalConv3d(2 * z_dim, 2 * z_dim, 1)  # encoder moments
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)  # decoder input
        self.decoder = Decoder3d(self.config)
        # Not in the state dict (the official checkpoint has no such keys); kept in float64 and
        # cast at use, so a float64 model sees the exact constants.
        self.register_buffer("latents_mean", torch.tensor(self.config.latents_mean, dtype=torch.float64),
                             persistent=False)
        self.register_buffer("latents_std", torch.tensor(self.config.latents_std, dtype=torch.float64),
                             persistent=False)
        self.num_encoder_caches = len(_cached_convs(self.encoder, "encoder"))
        self.num_decoder_caches = len(_cached_convs(self.decoder, "decoder"))

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    # ---- latent normalization --------------------------------------------------------------

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, self.config.z_dim, 1, 1, 1)
        mean = self.latents_mean.to(like.dtype).view(shape)  # [1, z, 1, 1, 1]
        std = self.latents_std.to(like.dtype).view(shape)  # [1, z, 1, 1, 1]
        return mean, std

    def normalize(self, mu: Tensor) -> Tensor:
        """Raw latents -> the normalized latents of the DiT: (mu - mean) / std per channel."""
        self._check_latents(mu, "mu", check_dtype=False)
        mean, std = self._stats(mu)
        return (mu - mean) / std

    def denormalize(self, z: Tensor) -> Tensor:
        """Normalized latents -> raw latents: z * std + mean per channel."""
        self._check_latents(z, "z", check_dtype=False)
        mean, std = self._stats(z)
        return z * std + mean

    # ---- encode ----------------------------------------------------------------------------

    def encode(self, video: Tensor, *, latents_per_pass: int = 1) -> Tensor:
        """Video [B, 3, 1 + 4k, H, W] in [-1, 1] -> posterior mean [B, z_dim, 1 + k, H/8, W/8].

        The first frame is encoded alone, then groups of ``temporal_stride`` frames, with the
        conv cache carried from group to group (the official chunking, bounded memory). With
        ``latents_per_pass`` > 1 each pass takes that many groups at once: the same result (the
        convs are causal and the cache holds their past), fewer and larger passes; faster for
        small frames, memory grows with the pass.
        """
        self._check_video(video)
        _check_positive(latents_per_pass, "latents_per_pass")
        state: list[Tensor | None] = [None] * self.num_encoder_caches
        span = self.config.temporal_stride * latents_per_pass  # video frames per pass
        chunks = [video[:, :, :1]] + [video[:, :, t:t + span] for t in range(1, video.shape[2], span)]
        moments = []
        for i, chunk in enumerate(chunks):
            cache = ConvCache(state, start=i == 0)
            moments.append(self.encoder(chunk, cache))  # [B, 2z, t, H/8, W/8]
            cache.check_consumed()
        moments_t = self.conv1(torch.cat(moments, dim=2))  # [B, 2z, 1 + k, H/8, W/8]
        mu, _log_var = moments_t.chunk(2, dim=1)
        return mu

    # ---- decode ----------------------------------------------------------------------------

    def decode(self, z: Tensor, *, clamp: bool = True, latents_per_pass: int = 1) -> Tensor:
        """Normalized latents [B, z_dim, T, h, w] -> video [B, 3, 1 + 4(T - 1), 8h, 8w].

        One latent frame at a time with the conv cache (the official decode), or
        ``latents_per_pass`` at a time after the first (the same result, see :meth:`encode`);
        the output is clamped to [-1, 1] unless ``clamp=False`` (the raw decoder output).
        """
        return self.streaming_decoder(clamp=clamp, latents_per_pass=latents_per_pass).decode(z)

    def streaming_decoder(self, *, clamp: bool = True, latents_per_pass: int = 1) -> StreamingDecoder:
        """A decoder for a latent stream given in chunks (holds the causal-conv state)."""
        return StreamingDecoder(self, clamp=clamp, latents_per_pass=latents_per_pass)

    def _decode_frame(self, z: Tensor, cache: ConvCache, clamp: bool) -> Tensor:
        """Normalized latent frames [B, z, t, h, w] -> their pixel frames; updates ``cache``.

        1 pixel frame if ``cache.start`` (the stream's first latent frame: then t must be 1),
        else ``temporal_stride`` frames per latent frame.
        """
        x = self.conv2(self.denormalize(z))
        video = self.decoder(x, cache)  # [B, 3, 1 or 4t, 8h, 8w]
        cache.check_consumed()
        return video.clamp(-1.0, 1.0) if clamp else video

    def decoder_cache_spec(self, batch: int, height: int, width: int) -> list[CacheSpec]:
        """Shapes of the decoder's conv cache for latents ``[batch, z, t, height, width]``.

        One entry per cached conv in call order (32 for the Wan2.1 VAE), named by module path.
        """
        for name, value in (("batch", batch), ("height", height), ("width", width)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        return [CacheSpec(f"decoder.{name}", (batch, conv.in_channels, conv.context, h, w))
                for name, conv, h, w in self.decoder.cache_layout(height, width)]

    # ---- input checks ----------------------------------------------------------------------

    def _check_dtype(self, x: Tensor, what: str) -> None:
        if x.dtype != self.dtype:
            raise ValueError(f"{what} has dtype {x.dtype} but the VAE runs in {self.dtype}: "
                             f"cast the input with .to({self.dtype}) or the VAE with .to({x.dtype})")

    def _check_video(self, video: Tensor) -> None:
        if not isinstance(video, Tensor) or video.ndim != 5:
            shape = tuple(video.shape) if isinstance(video, Tensor) else type(video).__name__
            raise ValueError(f"video must be a 5-D tensor [B, 3, T, H, W], got {shape}; add the "
                             f"batch dimension with video.unsqueeze(0) for a single clip")
        b, c, t, h, w = video.shape
        if c != RGB_CHANNELS:
            raise ValueError(f"video must have {RGB_CHANNELS} (RGB) channels in dim 1, got {c} "
                             f"(shape {tuple(video.shape)}); the layout is [B, C, T, H, W]")
        stride = self.config.temporal_stride
        if t < 1 or (t - 1) % stride:
            lower = 1 + stride * max((t - 1) // stride, 0)
            raise ValueError(f"video needs 1 + {stride}k frames (the first frame alone, then groups "
                             f"of {stride}), got {t}: trim it to {lower} or pad it to "
                             f"{lower + stride} frames")
        s = self.config.spatial_stride
        if h % s or w % s:
            raise ValueError(f"video height and width must be multiples of {s}, got {h}x{w}: "
                             f"crop or resize it")
        self._check_dtype(video, "video")

    def _check_latents(self, z: Tensor, what: str = "latents", *, check_dtype: bool = True) -> None:
        if not isinstance(z, Tensor) or z.ndim != 5:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"{what} must be a 5-D tensor [B, {self.config.z_dim}, T, h, w], got "
                             f"{shape}; note the layout is channels before frames")
        if z.shape[1] != self.config.z_dim:
            raise ValueError(f"{what} must have z_dim = {self.config.z_dim} channels in dim 1, got "
                             f"shape {tuple(z.shape)}; if frames come first, use "
                             f"{what}.transpose(1, 2)")
        if z.shape[2] < 1:
            raise ValueError(f"{what} must hold at least one latent frame, got shape {tuple(z.shape)}")
        if check_dtype:
            self._check_dtype(z, what)


# --------------------------------------------------------------------------------------------
# Streaming decode
# --------------------------------------------------------------------------------------------


class StreamingDecoder:
    """Decodes a latent stream chunk by chunk, holding only the decoder's causal-conv state.

    ``decode`` of successive chunks ``[B, z, t, h, w]`` (any sizes) returns the pixel frames of
    each chunk: ``1 + 4(t - 1)`` for the first chunk of the stream, ``4t`` afterwards; their
    concatenation equals one :meth:`WanVAE.decode` of the concatenated latents. ``reset()``
    starts a new stream. The state is the last frames (2 per 3-tap conv) of every cached
    conv's input, updated in place.
    """

    def __init__(self, vae: WanVAE, *, clamp: bool = True, latents_per_pass: int = 1) -> None:
        _check_positive(latents_per_pass, "latents_per_pass")
        self.vae = vae
        self.clamp = clamp
        self.latents_per_pass = latents_per_pass  # latent frames per decoder pass (after the first)
        self._cache: list[Tensor | None] | None = None
        self._geometry: tuple[int, int, int] | None = None  # batch, h, w of the stream

    @property
    def started(self) -> bool:
        return self._cache is not None

    def reset(self) -> None:
        """Forget the stream: the next chunk starts a new one."""
        self._cache = None
        self._geometry = None

    def decode(self, z: Tensor) -> Tensor:
        """The next chunk of normalized latents [B, z, t, h, w] -> its pixel frames."""
        self.vae._check_latents(z)
        geometry = (z.shape[0], z.shape[3], z.shape[4])
        if self._geometry is not None and geometry != self._geometry:
            raise ValueError(f"this stream decodes batch, h, w = {self._geometry}, got {geometry}: "
                             f"call reset() before decoding a different stream")
        frames = []
        i = 0
        while i < z.shape[2]:
            start = self._cache is None
            if start:
                log.debug("VAE stream starts: batch %d, latents %dx%d", *geometry)
                self._cache = [None] * self.vae.num_decoder_caches
                self._geometry = geometry
            # The stream's first latent frame is decoded alone (it skips the time upsampling).
            span = 1 if start else self.latents_per_pass
            cache = ConvCache(self._cache, start=start)
            frames.append(self.vae._decode_frame(z[:, :, i:i + span], cache, self.clamp))
            i += span
        return torch.cat(frames, dim=2)  # [B, 3, frames, 8h, 8w]


def decode_streams(decoders: Sequence[StreamingDecoder], z: Tensor) -> list[Tensor]:
    """One chunk for each of several streams in batched decoder passes.

    ``z`` [N, z_dim, t, h, w]: row ``i`` is the next chunk of the stream ``decoders[i]`` holds
    (each a batch-1 stream of one VAE, all with the same ``latents_per_pass``). Returns each row's
    pixel frames, as ``decoders[i].decode`` would (up to float rounding), and advances every
    decoder. Rows at the same place whose conv states have the same layout (streams past their
    first frame, or streams starting) run as one batch, ``latents_per_pass`` latent frames per pass
    (a starting stream's first frame alone); their states are split back per stream afterwards.
    """
    if len(decoders) != z.shape[0]:
        raise ValueError(f"{len(decoders)} decoders for {z.shape[0]} latent rows")
    if not decoders:
        return []
    vae, per_pass = decoders[0].vae, decoders[0].latents_per_pass
    vae._check_latents(z)
    for d in decoders:
        if d.vae is not vae or d.latents_per_pass != per_pass or d.clamp != decoders[0].clamp:
            raise ValueError("decode_streams needs decoders of one VAE with the same clamp and latents_per_pass")
        geometry = (1, z.shape[3], z.shape[4])
        if d._geometry is not None and d._geometry != geometry:
            raise ValueError(f"a stream decodes batch, h, w = {d._geometry}, got {geometry}")
    out: list[list[Tensor]] = [[] for _ in decoders]
    done = [0] * len(decoders)  # latent frames of z each row has decoded
    frames = z.shape[2]
    while min(done) < frames:
        groups: dict[tuple, list[int]] = {}
        for row, d in enumerate(decoders):
            if done[row] < frames:
                key = ("start",) if d._cache is None else tuple(t is None for t in d._cache)
                groups.setdefault((done[row], key), []).append(row)
        for (i, key), rows in groups.items():
            start = key == ("start",)
            if start:
                tensors: list[Tensor | None] = [None] * vae.num_decoder_caches
            else:
                tensors = [None if t is None else torch.cat([decoders[r]._cache[j] for r in rows])
                           for j, t in enumerate(decoders[rows[0]]._cache)]
            span = 1 if start else min(per_pass, frames - i)
            state = ConvCache(tensors, start=start)
            pixels = vae._decode_frame(z[rows, :, i:i + span], state, decoders[rows[0]].clamp)  # [G, 3, f, H, W]
            for g, r in enumerate(rows):
                d = decoders[r]
                d._cache = [None if t is None else t[g:g + 1] for t in state.tensors]
                d._geometry = (1, z.shape[3], z.shape[4])
                out[r].append(pixels[g:g + 1])
                done[r] += span
    return [torch.cat(frames, dim=2) for frames in out]  # each [1, 3, frames, 8h, 8w]


# --------------------------------------------------------------------------------------------
# Export-friendly step
# --------------------------------------------------------------------------------------------


class VAEDecodeStep(nn.Module):
    """Decode one latent frame with the conv cache as explicit fixed-shape tensors.

    ``forward(z, *cache) -> (pixels, new_cache)``: ``z`` is one normalized latent frame
    ``[B, z_dim, 1, h, w]``, ``cache`` the flat tuple of :meth:`cache_spec` tensors (in that
    order), ``pixels`` ``[B, 3, 4, 8h, 8w]`` (clamped to [-1, 1] unless ``clamp=False``) and
    ``new_cache`` a tuple of the same shapes. No data-dependent control flow: the graph traces
    with ``torch.export.export``.

    The stream's first latent frame uses a second instance built with ``first_frame=True``
    (same signature, one pixel frame out):

        first, step = VAEDecodeStep(vae, first_frame=True), VAEDecodeStep(vae)
        cache = step.initial_cache(batch, h, w)
        pixels, cache = first(z[:, :, 0:1], *cache)
        for i in range(1, frames):
            pixels, cache = step(z[:, :, i:i + 1], *cache)
    """

    def __init__(self, vae: WanVAE, *, first_frame: bool = False, clamp: bool = True) -> None:
        super().__init__()
        self.vae = vae
        self.first_frame = first_frame
        self.clamp = clamp

    @property
    def frames_out(self) -> int:
        return 1 if self.first_frame else self.vae.config.temporal_stride

    def cache_spec(self, batch: int, height: int, width: int) -> list[CacheSpec]:
        """Shapes of the cache tensors for latent frames [batch, z, 1, height, width]."""
        return self.vae.decoder_cache_spec(batch, height, width)

    def initial_cache(self, batch: int, height: int, width: int, *, dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None) -> tuple[Tensor, ...]:
        """The cache at the start of a stream: zeros (defaults: the VAE's dtype and device)."""
        dtype = dtype if dtype is not None else self.vae.dtype
        device = device if device is not None else self.vae.conv2.weight.device
        return tuple(torch.zeros(spec.shape, dtype=dtype, device=device)
                     for spec in self.cache_spec(batch, height, width))

    def forward(self, z: Tensor, *cache: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        self.vae._check_latents(z)
        if z.shape[2] != 1:
            raise ValueError(f"VAEDecodeStep takes one latent frame [B, z, 1, h, w], got shape "
                             f"{tuple(z.shape)}: loop over the frames")
        if len(cache) != self.vae.num_decoder_caches:
            raise ValueError(f"VAEDecodeStep needs {self.vae.num_decoder_caches} cache tensors, got "
                             f"{len(cache)}: start from initial_cache()")
        state = ConvCache(list(cache), start=self.first_frame)
        pixels = self.vae._decode_frame(z, state, self.clamp)  # [B, 3, frames_out, 8h, 8w]
        return pixels, tuple(state.tensors)  # type: ignore[arg-type]
