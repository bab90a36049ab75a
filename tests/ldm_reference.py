"""An independent, minimal LDM KL autoencoder (the architecture VA-VAE checkpoints are saved from).

Written for the tests from the architecture description, with LDM's parameter names, so that a
random-weight instance's `state_dict()` is an LDM-format checkpoint and its outputs are the
reference the converted diffusers model must reproduce:

- GroupNorm(32, eps 1e-6) and swish everywhere; resnets norm→swish→conv twice with a 1×1
  `nin_shortcut` when the width changes; single-head attention with 1×1 conv q/k/v/proj_out.
- Encoder: conv_in, per level `num_res_blocks` resnets (each followed by attention when the
  level's nominal resolution is in `attn_resolutions`), a stride-2 conv after a (0,1,0,1) zero pad
  between levels; mid = resnet, attention, resnet; norm, swish, conv_out to 2·z (double_z).
- Decoder: conv_in, mid, levels from lowest to highest with `num_res_blocks + 1` resnets (+attention)
  and nearest-×2 then conv between levels; `up[i]` is stored under level i's own index.
- quant_conv (2z→2z) after the encoder, post_quant_conv (z→z) before the decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).reshape(b, c, h * w).transpose(1, 2)  # [b, hw, c]
        k = self.k(y).reshape(b, c, h * w)  # [b, c, hw]
        v = self.v(y).reshape(b, c, h * w)
        weights = torch.softmax(torch.bmm(q, k) / c ** 0.5, dim=2)  # [b, query, key]
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # right and bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: `block` resnets, matching `attn` blocks (maybe none), a resampler."""

    def __init__(self, widths: list[tuple[int, int]], attention: bool, resample: nn.Module | None,
                 resample_name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(i, o) for i, o in widths)
        self.attn = nn.ModuleList(AttnBlock(o) for _, o in widths) if attention else nn.ModuleList()
        if resample is not None:
            setattr(self, resample_name, resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class Mid(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, attn_resolutions: tuple[int, ...],
                 resolution: int, in_channels: int, z_channels: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        width = ch
        for level, mult in enumerate(ch_mult):
            out = ch * mult
            widths = [(width if j == 0 else out, out) for j in range(num_res_blocks)]
            last = level == len(ch_mult) - 1
            self.down.append(Level(widths, resolution // 2 ** level in attn_resolutions,
                                   None if last else Downsample(out), "downsample"))
            width = out
        self.mid = Mid(width)
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, 2 * z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(swish(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, attn_resolutions: tuple[int, ...],
                 resolution: int, out_ch: int, z_channels: int) -> None:
        super().__init__()
        width = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = Mid(width)
        levels: list[Level] = []
        for level in reversed(range(len(ch_mult))):
            out = ch * ch_mult[level]
            widths = [(width if j == 0 else out, out) for j in range(num_res_blocks + 1)]
            levels.insert(0, Level(widths, resolution // 2 ** level in attn_resolutions,
                                   None if level == 0 else Upsample(out), "upsample"))
            width = out
        self.up = nn.ModuleList(levels)  # up[i] is level i; run from the last
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """`encode` gives the moments (mean then log-variance), `decode` an image from a latent."""

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, attn_resolutions: tuple[int, ...],
                 resolution: int, z_channels: int, in_channels: int = 3, out_ch: int = 3) -> None:
        super().__init__()
        shared = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
                      resolution=resolution, z_channels=z_channels)
        self.encoder = Encoder(in_channels=in_channels, **shared)
        self.decoder = Decoder(out_ch=out_ch, **shared)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))
