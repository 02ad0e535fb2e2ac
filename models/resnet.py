"""CIFAR ResNets (ResNet-20/32/56/110).

He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), section 4.2: three stages of
BasicBlocks with 16/32/64 channels, ``n = (depth - 2) / 6`` blocks per stage. As in Torch-Pruning's
``resnet_tiny`` (the model RL-Pruner prunes), a shape-changing shortcut is a 1x1 conv + BN projection.
With a CIFAR-100 head ResNet-56 has 127.93M MACs and 0.86M params at 1x3x32x32.

The final ``AvgPool2d(8)`` of the original is an ``AdaptiveAvgPool2d(1)`` here so that inputs other
than 32x32 (e.g. 28x28) work; on 32x32 the two are identical.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "CifarResNet", "resnet20", "resnet32", "resnet56", "resnet110"]


def _scaled(channels: int, width_mult: float) -> int:
    """Scale a channel count by ``width_mult``, keeping at least one channel."""
    return max(1, int(round(channels * width_mult)))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection.

    Args:
        in_planes: Input channels.
        planes: Output channels.
        stride: Stride of the first conv (2 halves the resolution).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images.

    Args:
        depth: Total depth, ``6n + 2`` (20, 32, 44, 56, 110, ...).
        num_classes: Number of output logits.
        width_mult: Multiplier for the 16/32/64 stage widths.
        in_chans: Input image channels (1 for grey images).
    """

    def __init__(
        self, depth: int = 56, num_classes: int = 10, width_mult: float = 1.0, in_chans: int = 3
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        blocks = (depth - 2) // 6
        widths = [_scaled(c, width_mult) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_chans, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        in_planes = widths[0]
        stages = []
        for i, planes in enumerate(widths):
            layer = []
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                layer.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        self.num_classes = num_classes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def get_classifier(self) -> nn.Linear:
        """Return the final ``nn.Linear`` (the layer whose outputs are the class logits)."""
        return self.fc

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and the three residual stages: images -> ``(N, 64*w, H/4, W/4)`` feature maps."""
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global average pool and classify."""
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(N, C, H, W)`` -> logits ``(N, num_classes)``."""
        return self.forward_head(self.forward_features(x))


def resnet20(num_classes: int = 10, width_mult: float = 1.0, in_chans: int = 3) -> CifarResNet:
    """ResNet-20 (3 blocks per stage)."""
    return CifarResNet(20, num_classes=num_classes, width_mult=width_mult, in_chans=in_chans)


def resnet32(num_classes: int = 10, width_mult: float = 1.0, in_chans: int = 3) -> CifarResNet:
    """ResNet-32 (5 blocks per stage)."""
    return CifarResNet(32, num_classes=num_classes, width_mult=width_mult, in_chans=in_chans)


def resnet56(num_classes: int = 10, width_mult: float = 1.0, in_chans: int = 3) -> CifarResNet:
    """ResNet-56 (9 blocks per stage): 127.93M MACs / 0.86M params with 100 classes."""
    return CifarResNet(56, num_classes=num_classes, width_mult=width_mult, in_chans=in_chans)


def resnet110(num_classes: int = 10, width_mult: float = 1.0, in_chans: int = 3) -> CifarResNet:
    """ResNet-110 (18 blocks per stage)."""
    return CifarResNet(110, num_classes=num_classes, width_mult=width_mult, in_chans=in_chans)
