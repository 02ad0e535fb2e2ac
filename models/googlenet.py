"""CIFAR GoogLeNet (Inception v1).

Szegedy et al., "Going Deeper with Convolutions" (CVPR 2015). CIFAR variant of
weiaicunzai/pytorch-cifar100 as used by RL-Pruner: a 3-conv 3x3 stem (64, 64, 192) without stride,
the 5x5 branch replaced by two stacked 3x3 convs, three stride-2 max-pools, global average pooling,
``Dropout2d(0.4)`` and ``Linear(1024, classes)``. With a CIFAR-100 head it has 535.66M MACs and
6.40M params at 1x3x32x32. Inputs of any size >= 8x8 work (the head pools adaptively).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GoogLeNet", "Inception", "googlenet"]

# (n1x1, n3x3_reduce, n3x3, n5x5_reduce, n5x5, pool_proj) per Inception module, in order.
_INCEPTION_CFG: dict[str, tuple[int, int, int, int, int, int]] = {
    "a3": (64, 96, 128, 16, 32, 32),
    "b3": (128, 128, 192, 32, 96, 64),
    "a4": (192, 96, 208, 16, 48, 64),
    "b4": (160, 112, 224, 24, 64, 64),
    "c4": (128, 128, 256, 24, 64, 64),
    "d4": (112, 144, 288, 32, 64, 64),
    "e4": (256, 160, 320, 32, 128, 128),
    "a5": (256, 160, 320, 32, 128, 128),
    "b5": (384, 192, 384, 48, 128, 128),
}


def _scaled(channels: int, width_mult: float) -> int:
    """Scale a channel count by ``width_mult``, keeping at least one channel."""
    return max(1, int(round(channels * width_mult)))


def _conv_bn_relu(in_ch: int, out_ch: int, kernel_size: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, kernel_size=kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
    ]


class Inception(nn.Module):
    """Four parallel branches concatenated along channels.

    Args:
        in_channels: Input channels.
        n1x1: 1x1 branch width.
        n3x3_reduce: 1x1 reduction before the 3x3 branch.
        n3x3: 3x3 branch width.
        n5x5_reduce: 1x1 reduction before the "5x5" branch (two stacked 3x3 convs).
        n5x5: "5x5" branch width.
        pool_proj: 1x1 projection after the 3x3 max-pool branch.
    """

    def __init__(
        self,
        in_channels: int,
        n1x1: int,
        n3x3_reduce: int,
        n3x3: int,
        n5x5_reduce: int,
        n5x5: int,
        pool_proj: int,
    ) -> None:
        super().__init__()
        self.b1 = nn.Sequential(*_conv_bn_relu(in_channels, n1x1, 1))
        self.b2 = nn.Sequential(
            *_conv_bn_relu(in_channels, n3x3_reduce, 1), *_conv_bn_relu(n3x3_reduce, n3x3, 3)
        )
        self.b3 = nn.Sequential(
            *_conv_bn_relu(in_channels, n5x5_reduce, 1),
            *_conv_bn_relu(n5x5_reduce, n5x5, 3),
            *_conv_bn_relu(n5x5, n5x5, 3),
        )
        self.b4 = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1), *_conv_bn_relu(in_channels, pool_proj, 1)
        )
        self.out_channels = n1x1 + n3x3 + n5x5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1)


class GoogLeNet(nn.Module):
    """GoogLeNet for 32x32 images.

    Args:
        num_classes: Number of output logits.
        width_mult: Multiplier for every conv width.
        in_chans: Input image channels (1 for grey images).
        dropout: ``Dropout2d`` probability before the classifier.
    """

    def __init__(
        self, num_classes: int = 10, width_mult: float = 1.0, in_chans: int = 3, dropout: float = 0.4
    ) -> None:
        super().__init__()
        s64, s192 = _scaled(64, width_mult), _scaled(192, width_mult)
        self.prelayer = nn.Sequential(
            *_conv_bn_relu(in_chans, s64, 3), *_conv_bn_relu(s64, s64, 3), *_conv_bn_relu(s64, s192, 3)
        )
        channels = s192
        modules: dict[str, Inception] = {}
        for name, cfg in _INCEPTION_CFG.items():
            block = Inception(channels, *(_scaled(c, width_mult) for c in cfg))
            modules[name] = block
            channels = block.out_channels
        self.maxpool1 = nn.MaxPool2d(3, stride=2, padding=1)
        self.a3, self.b3 = modules["a3"], modules["b3"]
        self.maxpool2 = nn.MaxPool2d(3, stride=2, padding=1)
        self.a4, self.b4, self.c4, self.d4, self.e4 = (modules[k] for k in ("a4", "b4", "c4", "d4", "e4"))
        self.maxpool3 = nn.MaxPool2d(3, stride=2, padding=1)
        self.a5, self.b5 = modules["a5"], modules["b5"]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout2d(dropout)
        self.linear = nn.Linear(channels, num_classes)
        self.num_classes = num_classes

    def get_classifier(self) -> nn.Linear:
        """Return the final ``nn.Linear`` (the layer whose outputs are the class logits)."""
        return self.linear

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and Inception stages: images -> ``(N, 1024*w, H/8, W/8)`` feature maps."""
        x = self.maxpool1(self.prelayer(x))
        x = self.maxpool2(self.b3(self.a3(x)))
        x = self.maxpool3(self.e4(self.d4(self.c4(self.b4(self.a4(x))))))
        return self.b5(self.a5(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool, dropout and classify."""
        return self.linear(torch.flatten(self.dropout(self.avgpool(x)), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(N, C, H, W)`` -> logits ``(N, num_classes)``."""
        return self.forward_head(self.forward_features(x))


def googlenet(num_classes: int = 10, width_mult: float = 1.0, in_chans: int = 3, **kwargs) -> GoogLeNet:
    """CIFAR GoogLeNet: 535.66M MACs / 6.40M params with 100 classes."""
    return GoogLeNet(num_classes=num_classes, width_mult=width_mult, in_chans=in_chans, **kwargs)
