"""MobileNetV3-Large and -Small.

Howard et al., "Searching for MobileNetV3" (ICCV 2019). The xiaolai-sqlai/mobilenetv3 replication
used by RL-Pruner: the ImageNet stride-2 stem is kept for 32x32 inputs, squeeze-excite with a BN'd
bottleneck and ``Hardsigmoid``, every block has a residual (a 1x1 conv + BN when the width changes,
a depthwise stride-2 conv when the resolution changes) and the head is 1x1 conv -> global pool ->
``Linear(960, 1280)`` + ``BatchNorm1d`` + ``Hardswish`` -> dropout -> ``Linear(1280, classes)``.
With a CIFAR-100 head MobileNetV3-Large has 7.47M MACs and 4.03M params at 1x3x32x32.

Note: the ``BatchNorm1d`` in the head needs batches of at least 2 images in training mode.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Block", "MobileNetV3", "SqueezeExcite", "mobilenetv3_large", "mobilenetv3_small"]

# (kernel, expand, out, activation, squeeze-excite, stride) per block.
_LARGE_CFG = [
    (3, 16, 16, "relu", False, 1),
    (3, 64, 24, "relu", False, 2),
    (3, 72, 24, "relu", False, 1),
    (5, 72, 40, "relu", True, 2),
    (5, 120, 40, "relu", True, 1),
    (5, 120, 40, "relu", True, 1),
    (3, 240, 80, "hswish", False, 2),
    (3, 200, 80, "hswish", False, 1),
    (3, 184, 80, "hswish", False, 1),
    (3, 184, 80, "hswish", False, 1),
    (3, 480, 112, "hswish", True, 1),
    (3, 672, 112, "hswish", True, 1),
    (5, 672, 160, "hswish", True, 2),
    (5, 672, 160, "hswish", True, 1),
    (5, 960, 160, "hswish", True, 1),
]
_SMALL_CFG = [
    (3, 16, 16, "relu", True, 2),
    (3, 72, 24, "relu", False, 2),
    (3, 88, 24, "relu", False, 1),
    (5, 96, 40, "hswish", True, 2),
    (5, 240, 40, "hswish", True, 1),
    (5, 240, 40, "hswish", True, 1),
    (5, 120, 48, "hswish", True, 1),
    (5, 144, 48, "hswish", True, 1),
    (5, 288, 96, "hswish", True, 2),
    (5, 576, 96, "hswish", True, 1),
    (5, 576, 96, "hswish", True, 1),
]
# (stem width, last conv width) per variant; the head's hidden FC width is 1280 for both.
_VARIANTS = {"large": (_LARGE_CFG, 16, 960), "small": (_SMALL_CFG, 16, 576)}


def _scaled(channels: int, width_mult: float) -> int:
    """Scale a channel count by ``width_mult``, keeping at least one channel."""
    return max(1, int(round(channels * width_mult)))


def _act(kind: str) -> nn.Module:
    return nn.ReLU() if kind == "relu" else nn.Hardswish()


class SqueezeExcite(nn.Module):
    """Channel attention: ``x * hardsigmoid(W2 relu(BN(W1 avgpool(x))))``.

    Args:
        channels: Input (and output) channels.
        reduced: Bottleneck width.
    """

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.se = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, reduced, kernel_size=1, bias=False),
            nn.BatchNorm2d(reduced),
            nn.ReLU(),
            nn.Conv2d(reduced, channels, kernel_size=1, bias=False),
            nn.Hardsigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.se(x)


class Block(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> (SE) -> 1x1 project, plus a shortcut.

    Args:
        kernel_size: Depthwise kernel size.
        in_size: Input channels.
        expand_size: Expanded (depthwise) channels.
        out_size: Output channels.
        act: ``"relu"`` or ``"hswish"``.
        se_reduced: Squeeze-excite bottleneck width, or ``None`` for no SE.
        stride: Depthwise stride.
    """

    def __init__(
        self,
        kernel_size: int,
        in_size: int,
        expand_size: int,
        out_size: int,
        act: str,
        se_reduced: int | None,
        stride: int,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_size, expand_size, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(expand_size)
        self.act1 = _act(act)
        self.conv2 = nn.Conv2d(
            expand_size,
            expand_size,
            kernel_size=kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=expand_size,
            bias=False,
        )
        self.bn2 = nn.BatchNorm2d(expand_size)
        self.act2 = _act(act)
        self.se: nn.Module = (
            SqueezeExcite(expand_size, se_reduced) if se_reduced is not None else nn.Identity()
        )
        self.conv3 = nn.Conv2d(expand_size, out_size, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_size)
        self.act3 = _act(act)
        self.skip: nn.Module | None = None
        if stride == 1 and in_size != out_size:
            self.skip = nn.Sequential(
                nn.Conv2d(in_size, out_size, kernel_size=1, bias=False), nn.BatchNorm2d(out_size)
            )
        elif stride == 2 and in_size != out_size:
            self.skip = nn.Sequential(
                nn.Conv2d(in_size, in_size, kernel_size=3, stride=2, padding=1, groups=in_size, bias=False),
                nn.BatchNorm2d(in_size),
                nn.Conv2d(in_size, out_size, kernel_size=1, bias=True),
                nn.BatchNorm2d(out_size),
            )
        elif stride == 2:
            self.skip = nn.Sequential(
                nn.Conv2d(in_size, out_size, kernel_size=3, stride=2, padding=1, groups=in_size, bias=False),
                nn.BatchNorm2d(out_size),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.skip is None else self.skip(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.se(out)))
        return self.act3(out + shortcut)


class MobileNetV3(nn.Module):
    """MobileNetV3 (xiaolai-sqlai layout) for small images.

    Args:
        variant: ``"large"`` or ``"small"``.
        num_classes: Number of output logits.
        width_mult: Multiplier for every conv width and the head's hidden FC width.
        in_chans: Input image channels (1 for grey images).
        dropout: Dropout probability before the classifier.
    """

    def __init__(
        self,
        variant: str = "large",
        num_classes: int = 10,
        width_mult: float = 1.0,
        in_chans: int = 3,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if variant not in _VARIANTS:
            raise ValueError(f"MobileNetV3 variant must be one of {sorted(_VARIANTS)}, got {variant!r}")
        cfg, stem, last = _VARIANTS[variant]
        stem = _scaled(stem, width_mult)
        self.conv1 = nn.Conv2d(in_chans, stem, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.hs1 = nn.Hardswish()
        blocks = []
        channels = stem
        se_floor = _scaled(8, width_mult)
        for kernel, expand, out, act, se, stride in cfg:
            expand, out = _scaled(expand, width_mult), _scaled(out, width_mult)
            se_reduced = max(expand // 4, se_floor) if se else None
            blocks.append(Block(kernel, channels, expand, out, act, se_reduced, stride))
            channels = out
        self.bneck = nn.Sequential(*blocks)
        last = _scaled(last, width_mult)
        hidden = _scaled(1280, width_mult)
        self.conv2 = nn.Conv2d(channels, last, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.hs2 = nn.Hardswish()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear3 = nn.Linear(last, hidden, bias=False)
        self.bn3 = nn.BatchNorm1d(hidden)
        self.hs3 = nn.Hardswish()
        self.drop = nn.Dropout(dropout)
        self.linear4 = nn.Linear(hidden, num_classes)
        self.num_classes = num_classes

    def get_classifier(self) -> nn.Linear:
        """Return the final ``nn.Linear`` (the layer whose outputs are the class logits)."""
        return self.linear4

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, bottleneck blocks and last 1x1 conv: images -> feature maps."""
        x = self.hs1(self.bn1(self.conv1(x)))
        x = self.bneck(x)
        return self.hs2(self.bn2(self.conv2(x)))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Global pool, hidden FC + BN1d + Hardswish, dropout, classify."""
        x = torch.flatten(self.gap(x), 1)
        x = self.drop(self.hs3(self.bn3(self.linear3(x))))
        return self.linear4(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(N, C, H, W)`` -> logits ``(N, num_classes)``."""
        return self.forward_head(self.forward_features(x))


def mobilenetv3_large(
    num_classes: int = 10, width_mult: float = 1.0, in_chans: int = 3, **kwargs
) -> MobileNetV3:
    """MobileNetV3-Large: 7.47M MACs / 4.03M params with 100 classes at 32x32."""
    return MobileNetV3("large", num_classes=num_classes, width_mult=width_mult, in_chans=in_chans, **kwargs)


def mobilenetv3_small(
    num_classes: int = 10, width_mult: float = 1.0, in_chans: int = 3, **kwargs
) -> MobileNetV3:
    """MobileNetV3-Small."""
    return MobileNetV3("small", num_classes=num_classes, width_mult=width_mult, in_chans=in_chans, **kwargs)
