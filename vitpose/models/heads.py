"""Heatmap decoders of ViTPose: feature map (B, C, Hp, Wp) -> heatmaps (B, K, 4*Hp, 4*Wp).

Owns the two decoders of the paper: the classic one (two deconvolutions, the default) and the simple one
(bilinear upsampling). Module names follow mmpose's TopdownHeatmapSimpleHead (`deconv_layers.{0,1,3,4}`,
`final_layer`) so official checkpoints load as they are.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _init_like_mmpose(module: nn.Module) -> None:
    # mmpose's head init: normal(std=0.001) for deconvs and the final conv, unit BatchNorm. The tiny std
    # starts training from near-zero heatmaps.
    for m in module.modules():
        if isinstance(m, (nn.ConvTranspose2d, nn.Conv2d)):
            nn.init.normal_(m.weight, std=0.001)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class FloatBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm computed in float32 whatever the input's precision.

    DeepSpeed's bf16/fp16 mode casts parameters but keeps buffers (running stats) in float32, and
    low-precision statistics would drift anyway; same state-dict keys as ``nn.BatchNorm2d``.
    """

    # Read by DeepSpeed (>= 0.19, data_types.keep_in_fp32_modules "auto"): under zero.Init it would otherwise
    # make these bf16, and a checkpoint's fp32 statistics would be rounded when loaded into them on resume.
    _keep_in_fp32_modules_strict = ["running_mean", "running_var"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.dtype in (torch.float32, torch.bfloat16)
            and self.weight.dtype == torch.float32
            and (self.running_mean is None or self.running_mean.dtype == torch.float32)
        ):
            # fp32 parameters and statistics: the kernel computes in fp32 for a bf16 input too (mixed-type
            # batch norm, bf16 out, as under autocast), without converting the activation there and back.
            return super().forward(x)
        for name in ("running_mean", "running_var"):
            buf = getattr(self, name)
            if buf is not None and buf.dtype != torch.float32:
                buf.data = buf.data.float()  # ZeRO-3 casts buffers too; statistics stay float32
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        out = F.batch_norm(
            x.float(), self.running_mean, self.running_var, self.weight.float(), self.bias.float(),
            self.training or not self.track_running_stats, momentum, self.eps,
        )
        return out.to(x.dtype)


class ClassicDecoder(nn.Module):
    """2 x [ConvTranspose2d 4x4 s2 p1 (no bias), BatchNorm2d, ReLU], then a 1x1 conv to K heatmaps."""

    upsample = 4

    def __init__(self, in_channels: int, num_keypoints: int, channels: int = 256) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.channels = channels
        self.num_keypoints = num_keypoints
        layers: list[nn.Module] = []
        c_in = in_channels
        for _ in range(2):
            layers += [
                nn.ConvTranspose2d(c_in, channels, kernel_size=4, stride=2, padding=1, bias=False),
                FloatBatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ]
            c_in = channels
        self.deconv_layers = nn.Sequential(*layers)
        self.final_layer = nn.Conv2d(channels, num_keypoints, kernel_size=1)
        self.init_weights()

    def init_weights(self) -> None:
        _init_like_mmpose(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last through the deconvolutions (oneDNN's fast layout on CPU; a no-op for the backbone's
        # output, which already is one); heatmaps are handed back in the usual contiguous layout.
        x = x.contiguous(memory_format=torch.channels_last)
        return self.final_layer(self.deconv_layers(x)).contiguous()

    def flops(self, grid: tuple[int, int], batch: int = 1) -> int:
        """Forward MACs (see ViTBackbone.flops): a transposed conv costs k*k*Cin*Cout per input pixel."""
        h, w = grid
        d1 = h * w * self.in_channels * self.channels * 16
        d2 = (2 * h) * (2 * w) * self.channels * self.channels * 16
        final = (4 * h) * (4 * w) * self.channels * self.num_keypoints
        return batch * (d1 + d2 + final)


class SimpleDecoder(nn.Module):
    """ReLU, bilinear upsampling x4, then a 3x3 conv to K heatmaps (the paper's "simple decoder")."""

    upsample = 4

    def __init__(self, in_channels: int, num_keypoints: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_keypoints = num_keypoints
        self.final_layer = nn.Conv2d(in_channels, num_keypoints, kernel_size=3, padding=1)
        self.init_weights()

    def init_weights(self) -> None:
        _init_like_mmpose(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same order as mmpose's head with upsample=4: relu, then resize (align_corners=False), then conv.
        x = x.contiguous(memory_format=torch.channels_last)
        x = F.interpolate(F.relu(x), scale_factor=4, mode="bilinear", align_corners=False)
        return self.final_layer(x).contiguous()

    def flops(self, grid: tuple[int, int], batch: int = 1) -> int:
        """Forward MACs of the 3x3 conv at the upsampled resolution."""
        h, w = grid
        return batch * (4 * h) * (4 * w) * self.in_channels * self.num_keypoints * 9
