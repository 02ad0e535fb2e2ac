"""CIFAR DenseNet-BC-121.

Huang et al., "Densely Connected Convolutional Networks" (CVPR 2017). CIFAR variant of
weiaicunzai/pytorch-cifar100 as used by RL-Pruner: a single 3x3 stem conv to ``2 * growth`` channels
(no stem pooling), bottleneck layers BN-ReLU-1x1(4k)-BN-ReLU-3x3(k) concatenated onto their input,
transitions BN-1x1-AvgPool(2) with compression 0.5, blocks [6, 12, 24, 16], growth 32, then
BN-ReLU, global average pooling and a linear classifier. With a CIFAR-100 head it has 907.93M MACs
and 7.05M params at 1x3x32x32.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Bottleneck", "DenseNet", "Transition", "densenet121"]


def _scaled(channels: int, width_mult: float) -> int:
    """Scale a channel count by ``width_mult``, keeping at least one channel."""
    return max(1, int(round(channels * width_mult)))


class Bottleneck(nn.Module):
    """Dense layer: ``cat([x, conv3x3(relu(bn(conv1x1(relu(bn(x))))))], dim=1)``.

    Args:
        in_channels: Input channels.
        growth_rate: Channels added to the running concatenation.
    """

    def __init__(self, in_channels: int, growth_rate: int) -> None:
        super().__init__()
        inner = 4 * growth_rate
        self.bottle_neck = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, inner, kernel_size=1, bias=False),
            nn.BatchNorm2d(inner),
            nn.ReLU(),
            nn.Conv2d(inner, growth_rate, kernel_size=3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.bottle_neck(x)], dim=1)


class Transition(nn.Module):
    """BN, 1x1 conv (compression) and 2x2 average pooling.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.down_sample = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
            nn.AvgPool2d(2, stride=2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_sample(x)


class DenseNet(nn.Module):
    """DenseNet-BC for 32x32 images.

    Args:
        blocks: Dense layers per dense block.
        growth_rate: Growth rate ``k`` before width scaling.
        reduction: Transition compression factor.
        num_classes: Number of output logits.
        width_mult: Multiplier for the growth rate (and so for every width, the stem is ``2k``).
        in_chans: Input image channels (1 for grey images).
    """

    def __init__(
        self,
        blocks: tuple[int, ...] = (6, 12, 24, 16),
        growth_rate: int = 32,
        reduction: float = 0.5,
        num_classes: int = 10,
        width_mult: float = 1.0,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        growth = _scaled(growth_rate, width_mult)
        channels = 2 * growth
        self.conv1 = nn.Conv2d(in_chans, channels, kernel_size=3, padding=1, bias=False)
        self.features = nn.Sequential()
        for index, n_layers in enumerate(blocks):
            layers = []
            for _ in range(n_layers):
                layers.append(Bottleneck(channels, growth))
                channels += growth
            self.features.add_module(f"dense_block_layer_{index}", nn.Sequential(*layers))
            if index != len(blocks) - 1:
                out_channels = max(1, int(reduction * channels))
                self.features.add_module(f"transition_layer_{index}", Transition(channels, out_channels))
                channels = out_channels
        self.features.add_module("bn", nn.BatchNorm2d(channels))
        self.features.add_module("relu", nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(channels, num_classes)
        self.num_classes = num_classes

    def get_classifier(self) -> nn.Linear:
        """Return the final ``nn.Linear`` (the layer whose outputs are the class logits)."""
        return self.linear

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem conv and dense blocks: images -> feature maps."""
        return self.features(self.conv1(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool and classify."""
        return self.linear(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(N, C, H, W)`` -> logits ``(N, num_classes)``."""
        return self.forward_head(self.forward_features(x))


def densenet121(num_classes: int = 10, width_mult: float = 1.0, in_chans: int = 3, **kwargs) -> DenseNet:
    """DenseNet-BC-121 (k=32): 907.93M MACs / 7.05M params with 100 classes."""
    return DenseNet(
        (6, 12, 24, 16), 32, 0.5, num_classes=num_classes, width_mult=width_mult, in_chans=in_chans, **kwargs
    )
