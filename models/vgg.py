"""CIFAR VGG with batch norm (VGG-11/13/16/19).

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition" (2014).
This is the CIFAR variant of weiaicunzai/pytorch-cifar100 used by RL-Pruner (Beryex/RLPruner-CNN):
3x3 conv + BN + ReLU stacks, five 2x2 max-pools down to 512x1x1 and a 512 -> 4096 -> 4096 -> classes
classifier with dropout. With a CIFAR-100 head VGG-19 has 418.63M MACs and 39.33M params at 1x3x32x32.

Two small changes let other input sizes through without touching layers: the max-pools use
``ceil_mode=True`` (identical to floor mode on 32x32, but 28x28 reaches 1x1 instead of 0x0) and an
``AdaptiveAvgPool2d(1)`` precedes the classifier (an identity on 32x32 inputs).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VGG", "VGG_CONFIGS", "vgg11", "vgg13", "vgg16", "vgg19"]

# "M" is a 2x2 max-pool, ints are 3x3 conv output channels (configurations A, B, D, E of the paper).
VGG_CONFIGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", *[256] * 4, "M", *[512] * 4, "M", *[512] * 4, "M"],
}


def _scaled(channels: int, width_mult: float) -> int:
    """Scale a channel count by ``width_mult``, keeping at least one channel."""
    return max(1, int(round(channels * width_mult)))


class VGG(nn.Module):
    """VGG-BN for 32x32 images.

    Args:
        depth: 11, 13, 16 or 19.
        num_classes: Number of output logits.
        width_mult: Multiplier for every conv width and the two hidden FC widths.
        in_chans: Input image channels (1 for grey images).
        hidden_features: Width of the two hidden FC layers before scaling.
        dropout: Dropout probability after each hidden FC layer.
    """

    def __init__(
        self,
        depth: int = 19,
        num_classes: int = 10,
        width_mult: float = 1.0,
        in_chans: int = 3,
        hidden_features: int = 4096,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if depth not in VGG_CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_CONFIGS)}, got {depth}")
        layers: list[nn.Module] = []
        channels = in_chans
        for item in VGG_CONFIGS[depth]:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
                continue
            out = _scaled(int(item), width_mult)
            layers += [nn.Conv2d(channels, out, kernel_size=3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        hidden = _scaled(hidden_features, width_mult)
        self.classifier = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        self.num_classes = num_classes

    def get_classifier(self) -> nn.Linear:
        """Return the final ``nn.Linear`` (the layer whose outputs are the class logits)."""
        return self.classifier[-1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Convolutional trunk: images ``(N, C, H, W)`` -> feature maps."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Pool the feature maps and classify."""
        return self.classifier(torch.flatten(self.pool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(N, C, H, W)`` -> logits ``(N, num_classes)``."""
        return self.forward_head(self.forward_features(x))


def vgg11(num_classes: int = 10, width_mult: float = 1.0, in_chans: int = 3, **kwargs) -> VGG:
    """VGG-11-BN (configuration A)."""
    return VGG(11, num_classes=num_classes, width_mult=width_mult, in_chans=in_chans, **kwargs)


def vgg13(num_classes: int = 10, width_mult: float = 1.0, in_chans: int = 3, **kwargs) -> VGG:
    """VGG-13-BN (configuration B)."""
    return VGG(13, num_classes=num_classes, width_mult=width_mult, in_chans=in_chans, **kwargs)


def vgg16(num_classes: int = 10, width_mult: float = 1.0, in_chans: int = 3, **kwargs) -> VGG:
    """VGG-16-BN (configuration D)."""
    return VGG(16, num_classes=num_classes, width_mult=width_mult, in_chans=in_chans, **kwargs)


def vgg19(num_classes: int = 10, width_mult: float = 1.0, in_chans: int = 3, **kwargs) -> VGG:
    """VGG-19-BN (configuration E): 418.63M MACs / 39.33M params with 100 classes."""
    return VGG(19, num_classes=num_classes, width_mult=width_mult, in_chans=in_chans, **kwargs)
