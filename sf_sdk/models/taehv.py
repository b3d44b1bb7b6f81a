"""TAEHV: a tiny streaming decoder of Wan2.1 latents (2D convs with one frame of memory).

The architecture of the public TAEHV decoder (``taew2_1`` decodes Wan2.1 latents), written for
this SDK; parameter names are those of the released files (``decoder.<i>...``: one
``nn.Sequential``), so ``taew2_1.pth`` / ``taew2_1.safetensors`` load without renaming (see
:mod:`sf_sdk.checkpoint.taehv`). Only the decoder is built: the Wan VAE's encoder stays the
encoder of every model.

The decoder, for ``S`` stages (3 for Wan: widths ``n_0 .. n_S``)::

    input clamp (3 tanh(z / 3)), conv 3x3 z -> n_0, ReLU
    per stage k: B MemBlocks of width n_k, 2x nearest upsampling (or 1x), TGrow (1 or 2 frames
                 out per frame in), conv 3x3 n_k -> n_{k+1} (no bias)
    ReLU, conv 3x3 n_S -> 3

Stream semantics (what every decode path computes):

* Latents are the *normalized* latents the DiT works with (TAEHV applies no mean / std) and
  frames come out in [-1, 1] (TAEHV's [0, 1] mapped by ``2x - 1``).
* A MemBlock sees its input frame and the input frame before it at the same time rate (its
  *memory*); before the stream's first frame the memory is zeros. Nothing else looks across
  time, so decoding a clip in chunks, with each MemBlock's last input frame kept between chunks,
  equals decoding it whole.
* TGrow with stride ``s`` turns each frame into ``s`` frames: frame ``t s + j`` is the ``j``-th
  channel block of a 1x1 conv. With strides (1, 2, 2) each latent frame yields 4 frames.
* The stream's first ``temporal_stride - 1`` output frames are dropped, so latents of ``T``
  frames give ``1 + 4 (T - 1)`` frames, aligned with the Wan VAE's decode: the first chunk of a
  stream gives ``1 + 4 (t - 1)`` frames, every later chunk ``4 t``.

How a stage grows (the same sums as the layers, in fewer operations): nearest 2x upsampling,
the TGrow 1x1 conv and the 3x3 conv after it are linear, so they run as one transposed conv of
stride 2 (a 4x4 kernel: each output pixel's 3x3 window on the upsampled grid reads 2x2 input
pixels) whose weights fold the TGrow blocks in; its ``s * C`` output channels are ``s`` frames of
``C`` channels (one copy puts them in frame order in channels-last memory). Decode does a quarter of the 3x3 conv's multiplies and never
materializes the upsampled frames (2.3-4x faster for each stage's growth on this CPU; float32
agrees with the layer-by-layer path to float32 rounding, see ``grow``).

Three ways to decode, one code path (:meth:`TAEHVDecoder.run`, any number of latent frames per
call, the memory passed explicitly):

* :meth:`TAEHVDecoder.decode` — a whole clip.
* :class:`TinyStreamingDecoder` — successive chunks of a stream (and :func:`decode_tiny_streams`:
  one chunk for each of several streams in one batched pass).
* :class:`TinyDecodeStep` — one latent frame with the memory as explicit fixed-shape tensors, for
  ``torch.export`` / ONNX (the same signature as :class:`sf_sdk.models.vae.VAEDecodeStep`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sf_sdk.config import VAEConfig
from sf_sdk.models.graphs import tracing, weights_key
from sf_sdk.models.onednn import PackedConvs
from sf_sdk.models.vae import CacheSpec

__all__ = [
    "TAEHVConfig",
    "TAEHV_PRESETS",
    "TAEHVDecoder",
    "MemBlock",
    "TGrow",
    "TinyStreamingDecoder",
    "decode_tiny_streams",
    "TinyDecodeStep",
]

log = logging.getLogger(__name__)

RGB_CHANNELS = 3
# Each upsampling stage doubles height and width; a temporal one doubles the frames.
UPSCALE = 2
# The input clamp: z -> LIMIT * tanh(z / LIMIT).
LIMIT = 3.0


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TAEHVConfig:
    """The TAEHV decoder. Defaults are the released ``taew2_1`` decoder (Wan2.1 latents).

    ``widths``: the channels of each stage and, last, of the final conv (one more entry than
    stages); ``time_upscale`` / ``space_upscale``: whether each stage doubles the frames /
    height and width; ``blocks_per_stage``: MemBlocks per stage.
    """

    z_dim: int = 16
    widths: tuple[int, ...] = (256, 128, 64, 64)
    blocks_per_stage: int = 3
    time_upscale: tuple[bool, ...] = (False, True, True)
    space_upscale: tuple[bool, ...] = (True, True, True)

    def __post_init__(self) -> None:
        for name in ("widths", "time_upscale", "space_upscale"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("z_dim", "blocks_per_stage"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TAEHVConfig.{name} must be a positive int, got {value!r}")
        if not self.widths or any(not isinstance(w, int) or w <= 0 for w in self.widths):
            raise ValueError(f"TAEHVConfig.widths must be positive ints, got {self.widths}")
        stages = len(self.widths) - 1
        if stages < 1 or len(self.time_upscale) != stages or len(self.space_upscale) != stages:
            raise ValueError(f"TAEHVConfig needs one more width than stages and one time_upscale and "
                             f"space_upscale flag per stage: got widths {self.widths}, time_upscale "
                             f"{self.time_upscale}, space_upscale {self.space_upscale}")

    @classmethod
    def for_vae(cls, vae: VAEConfig, *, widths: Sequence[int], blocks_per_stage: int = 3) -> TAEHVConfig:
        """A decoder of ``vae``'s latents: one stage per spatial doubling, the temporal doublings
        in the last stages (as ``taew2_1``), ``len(widths) - 1`` stages."""
        stages = len(widths) - 1
        space = vae.spatial_stride.bit_length() - 1  # log2
        time = vae.temporal_stride.bit_length() - 1
        if stages != space or time > stages:
            raise ValueError(f"the VAE upsamples {space} times in space and {time} in time: a tiny decoder for it "
                             f"needs {space + 1} widths, got {tuple(widths)}")
        return cls(z_dim=vae.z_dim, widths=tuple(widths), blocks_per_stage=blocks_per_stage,
                   time_upscale=(False,) * (stages - time) + (True,) * time, space_upscale=(True,) * stages)

    @property
    def stages(self) -> int:
        return len(self.widths) - 1

    @property
    def temporal_stride(self) -> int:
        """Video frames per latent frame (after the stream's first)."""
        return UPSCALE ** sum(bool(t) for t in self.time_upscale)

    @property
    def spatial_stride(self) -> int:
        return UPSCALE ** sum(bool(s) for s in self.space_upscale)


TAEHV_PRESETS: dict[str, TAEHVConfig] = {
    "taew2.1": TAEHVConfig(),
}


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


def _conv3x3(c_in: int, c_out: int, *, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias)


class InputClamp(nn.Module):
    """Soft-clamp the latents to (-3, 3): ``3 tanh(z / 3)``."""

    def forward(self, x: Tensor) -> Tensor:
        return LIMIT * torch.tanh(x / LIMIT)


class MemBlock(nn.Module):
    """A residual block over a frame and its memory (the previous frame's input).

    ``relu(conv(cat[x, past]) + skip(x))``, ``conv`` being conv 3x3, ReLU, conv 3x3, ReLU,
    conv 3x3 (``conv.0/2/4`` in the released files) and ``skip`` a 1x1 conv when the width
    changes.
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv3x3(2 * c_in, c_out), nn.ReLU(), _conv3x3(c_out, c_out), nn.ReLU(),
                                  _conv3x3(c_out, c_out))
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, past: Tensor, packed: PackedConvs | None = None) -> Tensor:
        # x, past: [N, C_in, H, W] (past: the same block's input one frame earlier). The ReLUs and
        # the sum write into the convs' fresh outputs (autograd allows it: a conv keeps its input).
        # ``packed``: the decoder's PackedConvs, for frames it accepts (oneDNN's convs, ReLUs fused).
        conv = self.conv
        if packed is not None:
            y = packed(conv[0], torch.cat([x, past], dim=1), relu=True)
            y = packed(conv[4], packed(conv[2], y, relu=True))
        else:
            y = F.relu_(conv[0](torch.cat([x, past], dim=1)))
            y = conv[4](F.relu_(conv[2](y)))
        return F.relu_(y.add_(self.skip(x)))  # [N, C_out, H, W]


class TGrow(nn.Module):
    """``stride`` frames out per frame in: frame ``t * stride + j`` is channel block ``j`` of a 1x1 conv."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # The decoder's run folds this layer into the stage's growth (TAEHVDecoder.grow); this
        # forward runs the layer alone. n = B * T, frames of a clip consecutive.
        n, c, h, w = x.shape
        # The 1x1 conv as one batched matmul (the same sums): PyTorch's CPU path for a bias-free 1x1
        # conv is its slow reference kernel.
        y = torch.matmul(self.conv.weight.view(c * self.stride, c), x.reshape(n, c, h * w))  # [N, C*s, H*W]
        return y.reshape(n * self.stride, c, h, w)  # [B*T*stride, C, H, W]


def _transposed_taps(kernel: Tensor, dim: int) -> Tensor:
    """A 3-tap axis of a conv after nearest 2x upsampling -> the 4 taps of the stride-2
    transposed conv that computes both output phases from the input (see ``TAEHVDecoder.grow``)."""
    k0, k1, k2 = kernel.unbind(dim)
    return torch.stack([k2, k1 + k2, k0 + k1, k0], dim)


# --------------------------------------------------------------------------------------------
# The decoder
# --------------------------------------------------------------------------------------------


class TAEHVDecoder(nn.Module):
    """Normalized latents ``[B, z_dim, T, h, w]`` -> video ``[B, 3, 1 + 4 (T - 1), 8h, 8w]`` in [-1, 1].

    ``decoder`` is the released files' ``nn.Sequential`` (their indices are the parameter
    names). The memory of a stream is one tensor per MemBlock, in call order:
    ``[B, C_in, 1, H, W]`` (the block's last input frame), or ``None`` for zeros.
    """

    def __init__(self, config: TAEHVConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else TAEHVConfig()
        cfg = self.config
        n = cfg.widths
        layers: list[nn.Module] = [InputClamp(), _conv3x3(cfg.z_dim, n[0]), nn.ReLU()]
        for k in range(cfg.stages):
            layers += [MemBlock(n[k], n[k]) for _ in range(cfg.blocks_per_stage)]
            layers += [nn.Upsample(scale_factor=float(UPSCALE if cfg.space_upscale[k] else 1), mode="nearest"),
                       TGrow(n[k], UPSCALE if cfg.time_upscale[k] else 1),
                       _conv3x3(n[k], n[k + 1], bias=False)]
        layers += [nn.ReLU(), _conv3x3(n[-1], RGB_CHANNELS)]
        self.decoder = nn.Sequential(*layers)
        self.num_decoder_caches = sum(isinstance(m, MemBlock) for m in self.decoder)
        # Each stage's growth (upsample, TGrow, conv) runs as one op (grow): the index of its upsample.
        self._growth_layers = tuple(i for i, m in enumerate(self.decoder) if isinstance(m, nn.Upsample))
        self._grow_weights: dict[int, tuple[tuple[object, ...], Tensor]] = {}
        self._packed = PackedConvs()

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder[1].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder[1].weight.device

    @property
    def frames_to_trim(self) -> int:
        """Output frames dropped at the start of a stream (aligns the frames with the Wan VAE's)."""
        return self.config.temporal_stride - 1

    # ---- the one code path -----------------------------------------------------------------

    def run(self, z: Tensor, memory: list[Tensor | None]) -> Tensor:
        """Latent frames ``[B, z, t, h, w]`` -> raw frames ``[B, 3, 4t, 8h, 8w]`` (TAEHV's [0, 1]
        scale, not clamped, nothing trimmed); ``memory`` (one entry per MemBlock) is read and
        replaced in place by the state after these frames."""
        if len(memory) != self.num_decoder_caches:
            raise ValueError(f"the memory holds {len(memory)} entries but this decoder has "
                             f"{self.num_decoder_caches} MemBlocks: build it for this model (cache_spec)")
        b, c, t, h, w = z.shape
        # Frames in channels-last memory from here on: the convs take it without a reorder
        # (1.6-3x faster each on this CPU); every op below keeps it.
        x = z.transpose(1, 2).reshape(b * t, c, h, w).contiguous(memory_format=torch.channels_last)  # [B*t, z, h, w]
        packed = self._packed if PackedConvs.usable(x) else None
        layers = self.decoder
        index = 0
        skip = 0
        for i, layer in enumerate(layers):
            if skip:  # the TGrow and conv that grow() ran, or the ReLU a packed conv applied
                skip -= 1
            elif i in self._growth_layers:
                x = self.grow(i, x, packed)
                skip = 2
            elif isinstance(layer, MemBlock):
                x = layer(x, self._past(x, b, memory, index, keep_layout=packed is not None), packed)
                index += 1
            elif isinstance(layer, nn.ReLU):
                x = F.relu_(x)  # every ReLU here follows a conv whose output nothing else holds
            elif packed is not None and isinstance(layer, nn.Conv2d):
                relu = i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU)
                x = packed(layer, x, relu=relu)
                skip = int(relu)
            else:
                x = layer(x)
        frames = x.shape[0] // b
        return x.reshape(b, frames, *x.shape[1:]).transpose(1, 2)  # [B, 3, 4t, 8h, 8w]

    @staticmethod
    def _past(x: Tensor, b: int, memory: list[Tensor | None], index: int, *, keep_layout: bool = False) -> Tensor:
        """A MemBlock's memory input for frames ``x`` ``[B*T', C, H, W]`` (streams' frames
        consecutive): each frame's predecessor, the stored frame before a stream's first; stores
        the last frames as the new memory ``[B, C, 1, H, W]``."""
        frames = x.shape[0] // b
        prev = memory[index]
        zeros = x.new_zeros(1, *x.shape[1:]).contiguous(memory_format=torch.channels_last) if prev is None else None
        parts = []
        for row in range(b):
            first = zeros if prev is None else prev[row:row + 1, :, 0].contiguous(memory_format=torch.channels_last)
            parts += [first, x[row * frames:(row + 1) * frames - 1]]  # [1, C, H, W], [T'-1, C, H, W]
        last = x.view(b, frames, *x.shape[1:])[:, -1:].transpose(1, 2)  # [B, C, 1, H, W]
        # ``keep_layout`` (inference: the packed convs run) keeps the frame in the channels-last
        # order it has, so the next chunk reads it without a reorder (a copy of one frame: a view
        # would keep the whole chunk's activations alive); where autograd or a graph sees it, a
        # contiguous copy.
        memory[index] = last.contiguous(memory_format=torch.channels_last_3d) if keep_layout else last.contiguous()
        return torch.cat(parts)  # [B*T', C, H, W]

    def grow(self, index: int, x: Tensor, packed: PackedConvs | None = None) -> Tensor:
        """The stage growth at ``decoder[index]`` (upsample, TGrow, conv 3x3) in one conv:
        ``[N, C_in, H, W]`` -> ``[N * s, C_out, 2H, 2W]`` (``[N * s, C_out, H, W]`` for a stage
        without spatial upsampling), ``s`` the TGrow stride."""
        up, tgrow, conv = self.decoder[index], self.decoder[index + 1], self.decoder[index + 2]
        weight = self._grow_weight(index)
        n, _, h, w = x.shape
        s, c_out = tgrow.stride, conv.out_channels
        if int(up.scale_factor) == UPSCALE and packed is not None:
            y = packed.transposed(index, weight, (tgrow.conv.weight, conv.weight), x, stride=UPSCALE,
                                  padding=1)  # [N, s*C_out, 2H, 2W]
        elif int(up.scale_factor) == UPSCALE:
            y = F.conv_transpose2d(x, weight, stride=UPSCALE, padding=1)
        else:
            y = F.conv2d(x, weight, padding=1)  # [N, s*C_out, H, W]
        if s == 1:
            return y
        # Frame t*s + j is channel block j of frame t; in channels-last memory that is one copy
        # ([N, H', W', s, C] -> [N, s, H', W', C]), in contiguous memory a view.
        h2, w2 = y.shape[2:]
        if y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous():
            y = y.permute(0, 2, 3, 1).reshape(n, h2, w2, s, c_out).permute(0, 3, 1, 2, 4)  # [N, s, H', W', C]
            return y.reshape(n * s, h2, w2, c_out).permute(0, 3, 1, 2)  # [N*s, C, H', W'] channels-last
        return y.reshape(n * s, c_out, h2, w2)

    def _grow_weight(self, index: int) -> Tensor:
        """:meth:`grow`'s folded weights, from the layers' current weights (kept between calls
        when no gradient is taken and nothing traces; rebuilt when a weight changes)."""
        up, tgrow, conv = self.decoder[index], self.decoder[index + 1], self.decoder[index + 2]
        w_t, w_c = tgrow.conv.weight, conv.weight  # [s*C_in, C_in, 1, 1], [C_out, C_in, 3, 3]
        reuse = not tracing() and not torch.is_grad_enabled()
        if reuse:
            key = weights_key((w_t, w_c))
            cached = self._grow_weights.get(index)
            if cached is not None and cached[0] == key:
                return cached[1]
        s, c_in, c_out = tgrow.stride, w_c.shape[1], w_c.shape[0]
        # Conv after TGrow: frame j's kernel is conv . block j of the 1x1 conv (in float32 at least).
        wide = torch.promote_types(w_c.dtype, torch.float32)
        blocks = w_t.to(wide).reshape(s, c_in, c_in)  # [s, mid, in]
        kernel = torch.einsum("omyx,jmi->joiyx", w_c.to(wide), blocks)  # [s, C_out, C_in, 3, 3]
        if int(up.scale_factor) == UPSCALE:
            # Nearest 2x then a 3x3 conv (padding 1): output row 2i reads input rows i-1 (tap 0)
            # and i (taps 1 + 2), row 2i+1 reads i (taps 0 + 1) and i+1 (tap 2); as a stride-2
            # transposed conv (padding 1) those are its kernel rows 3, 1 and 2, 0.
            kernel = _transposed_taps(_transposed_taps(kernel, 3), 4)  # [s, C_out, C_in, 4, 4]
            weight = kernel.reshape(s * c_out, c_in, 4, 4).transpose(0, 1)  # [C_in, s*C_out, 4, 4]
        else:
            weight = kernel.reshape(s * c_out, c_in, 3, 3)
        weight = weight.contiguous().to(w_c.dtype)
        if reuse:
            self._grow_weights[index] = (key, weight)
        return weight

    @staticmethod
    def to_pixels(raw: Tensor, clamp: bool) -> Tensor:
        """TAEHV's [0, 1] frames -> [-1, 1] (clamped unless ``clamp=False``)."""
        return raw.clamp(0.0, 1.0) * 2 - 1 if clamp else raw * 2 - 1

    # ---- decode ----------------------------------------------------------------------------

    def forward(self, z: Tensor, *, clamp: bool = True) -> Tensor:
        """:meth:`decode` (what training wraps in DDP)."""
        return self.decode(z, clamp=clamp)

    def decode(self, z: Tensor, *, clamp: bool = True) -> Tensor:
        """Normalized latents [B, z_dim, T, h, w] -> video [B, 3, 1 + 4(T - 1), 8h, 8w] in [-1, 1]
        (clamped unless ``clamp=False``: the raw output, for training)."""
        return self.streaming_decoder(clamp=clamp).decode(z)

    def streaming_decoder(self, *, clamp: bool = True) -> TinyStreamingDecoder:
        """A decoder for a latent stream given in chunks (holds the MemBlocks' memory)."""
        return TinyStreamingDecoder(self, clamp=clamp)

    def decoder_cache_spec(self, batch: int, height: int, width: int) -> list[CacheSpec]:
        """Shapes of the memory for latents ``[batch, z, t, height, width]``: one entry per
        MemBlock in call order (9 for ``taew2_1``), named by module path."""
        for name, value in (("batch", batch), ("height", height), ("width", width)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        specs = []
        for i, layer in enumerate(self.decoder):
            if isinstance(layer, MemBlock):
                specs.append(CacheSpec(f"decoder.{i}", (batch, layer.conv[0].in_channels // 2, 1, height, width)))
            elif isinstance(layer, nn.Upsample):
                scale = int(layer.scale_factor)
                height, width = height * scale, width * scale
        return specs

    def check_latents(self, z: Tensor, what: str = "latents") -> None:
        if not isinstance(z, Tensor) or z.ndim != 5:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"{what} must be a 5-D tensor [B, {self.config.z_dim}, T, h, w], got {shape}; "
                             f"note the layout is channels before frames")
        if z.shape[1] != self.config.z_dim:
            raise ValueError(f"{what} must have z_dim = {self.config.z_dim} channels in dim 1, got shape "
                             f"{tuple(z.shape)}; if frames come first, use {what}.transpose(1, 2)")
        if z.shape[2] < 1:
            raise ValueError(f"{what} must hold at least one latent frame, got shape {tuple(z.shape)}")
        if z.dtype != self.dtype:
            raise ValueError(f"{what} has dtype {z.dtype} but the tiny decoder runs in {self.dtype}: cast the "
                             f"input with .to({self.dtype}) or the decoder with .to({z.dtype})")


# --------------------------------------------------------------------------------------------
# Streaming decode
# --------------------------------------------------------------------------------------------


class TinyStreamingDecoder:
    """Decodes a latent stream chunk by chunk, holding only the MemBlocks' memory.

    The contract of :class:`sf_sdk.models.vae.StreamingDecoder`: ``decode`` of successive chunks
    ``[B, z, t, h, w]`` (any sizes) returns ``1 + 4(t - 1)`` frames for the stream's first chunk
    and ``4t`` afterwards; their concatenation equals one :meth:`TAEHVDecoder.decode` of the
    concatenated latents. ``reset()`` starts a new stream.
    """

    def __init__(self, model: TAEHVDecoder, *, clamp: bool = True) -> None:
        self.model = model
        self.clamp = clamp
        self._memory: list[Tensor | None] | None = None
        self._geometry: tuple[int, int, int] | None = None  # batch, h, w of the stream

    @property
    def started(self) -> bool:
        return self._memory is not None

    def reset(self) -> None:
        """Forget the stream: the next chunk starts a new one."""
        self._memory = None
        self._geometry = None

    def decode(self, z: Tensor) -> Tensor:
        """The next chunk of normalized latents [B, z, t, h, w] -> its frames [B, 3, f, 8h, 8w]."""
        self.model.check_latents(z)
        geometry = (z.shape[0], z.shape[3], z.shape[4])
        if self._geometry is not None and geometry != self._geometry:
            raise ValueError(f"this stream decodes batch, h, w = {self._geometry}, got {geometry}: call "
                             f"reset() before decoding a different stream")
        start = self._memory is None
        if start:
            log.debug("tiny decoder stream starts: batch %d, latents %dx%d", *geometry)
            self._memory = [None] * self.model.num_decoder_caches
            self._geometry = geometry
        raw = self.model.run(z, self._memory)  # [B, 3, 4t, 8h, 8w]
        if start:
            raw = raw[:, :, self.model.frames_to_trim:]
        return self.model.to_pixels(raw, self.clamp)


def decode_tiny_streams(decoders: Sequence[TinyStreamingDecoder], z: Tensor) -> list[Tensor]:
    """One chunk for each of several streams in one batched pass.

    ``z`` [N, z_dim, t, h, w]: row ``i`` is the next chunk of the stream ``decoders[i]`` holds
    (each a batch-1 stream of one decoder). Returns each row's frames, as ``decoders[i].decode``
    would (up to float rounding), and advances every decoder. Streams that start here run in the
    same pass (their memory is zeros); their first frames are trimmed afterwards.
    """
    if len(decoders) != z.shape[0]:
        raise ValueError(f"{len(decoders)} decoders for {z.shape[0]} latent rows")
    if not decoders:
        return []
    model = decoders[0].model
    model.check_latents(z)
    geometry = (1, z.shape[3], z.shape[4])
    for d in decoders:
        if d.model is not model or d.clamp != decoders[0].clamp:
            raise ValueError("decode_tiny_streams needs decoders of one model with the same clamp")
        if d._geometry is not None and d._geometry != geometry:
            raise ValueError(f"a stream decodes batch, h, w = {d._geometry}, got {geometry}")
    specs = model.decoder_cache_spec(1, z.shape[3], z.shape[4])
    memory: list[Tensor | None] = [
        torch.cat([d._memory[j] if d._memory is not None else z.new_zeros(spec.shape) for d in decoders])
        for j, spec in enumerate(specs)]  # each [N, C, 1, H, W]
    raw = model.run(z, memory)  # [N, 3, 4t, 8h, 8w]
    out = []
    for row, d in enumerate(decoders):
        frames = raw[row:row + 1]
        if d._memory is None:
            frames = frames[:, :, model.frames_to_trim:]
        d._memory = [m[row:row + 1] for m in memory]
        d._geometry = geometry
        out.append(model.to_pixels(frames, d.clamp))
    return out  # each [1, 3, frames, 8h, 8w]


# --------------------------------------------------------------------------------------------
# Export-friendly step
# --------------------------------------------------------------------------------------------


class TinyDecodeStep(nn.Module):
    """Decode one latent frame with the memory as explicit fixed-shape tensors.

    ``forward(z, *memory) -> (pixels, new_memory)``: ``z`` one normalized latent frame
    ``[B, z_dim, 1, h, w]``, ``memory`` the flat tuple of :meth:`cache_spec` tensors (zeros at the
    start of a stream), ``pixels`` ``[B, 3, 4, 8h, 8w]``; with ``first_frame=True`` (the stream's
    first latent frame) only the last of them, ``[B, 3, 1, 8h, 8w]``. The signature of
    :class:`sf_sdk.models.vae.VAEDecodeStep`, so the export package's decode runners drive both.
    """

    def __init__(self, model: TAEHVDecoder, *, first_frame: bool = False, clamp: bool = True) -> None:
        super().__init__()
        self.model = model
        self.first_frame = first_frame
        self.clamp = clamp

    @property
    def frames_out(self) -> int:
        return 1 if self.first_frame else self.model.config.temporal_stride

    def cache_spec(self, batch: int, height: int, width: int) -> list[CacheSpec]:
        return self.model.decoder_cache_spec(batch, height, width)

    def initial_cache(self, batch: int, height: int, width: int, *, dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None) -> tuple[Tensor, ...]:
        """The memory at the start of a stream: zeros (defaults: the decoder's dtype and device)."""
        dtype = dtype if dtype is not None else self.model.dtype
        device = device if device is not None else self.model.device
        return tuple(torch.zeros(spec.shape, dtype=dtype, device=device)
                     for spec in self.cache_spec(batch, height, width))

    def forward(self, z: Tensor, *memory: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        self.model.check_latents(z)
        if z.shape[2] != 1:
            raise ValueError(f"TinyDecodeStep takes one latent frame [B, z, 1, h, w], got shape {tuple(z.shape)}: "
                             f"loop over the frames")
        if len(memory) != self.model.num_decoder_caches:
            raise ValueError(f"TinyDecodeStep needs {self.model.num_decoder_caches} memory tensors, got "
                             f"{len(memory)}: start from initial_cache()")
        state: list[Tensor | None] = list(memory)
        raw = self.model.run(z, state)  # [B, 3, 4, 8h, 8w]
        if self.first_frame:
            raw = raw[:, :, self.model.frames_to_trim:]  # the stream's first frames are dropped
        return self.model.to_pixels(raw, self.clamp), tuple(state)  # type: ignore[arg-type]
