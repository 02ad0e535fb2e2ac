"""A user's own CNNs, as a ``pkg.module:factory`` for the model-reference tests.

The tests copy this file into a temporary folder under another name and import it from there, as a user's
module would be: residual add, concat, depthwise conv and a squeeze-excite gate (``small_net``), and a
grouped (not depthwise) conv that the pruning graph refuses (``grouped_net``).
"""

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c: int, mix_groups: int = 1):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.se = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(2 * c, 4, 1), nn.ReLU(), nn.Conv2d(4, 2 * c, 1), nn.Sigmoid()
        )
        self.mix = nn.Sequential(nn.Conv2d(2 * c, c, 1, groups=mix_groups, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)  # concat of a dense and a depthwise branch
        y = y * self.se(y)  # squeeze-excite gate
        return torch.relu(x + self.mix(y))  # residual add


class SmallNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 8, mix_groups: int = 1):
        super().__init__()
        conv = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
        self.stem = nn.Sequential(conv, nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(Block(width, mix_groups), nn.MaxPool2d(2), Block(width, mix_groups))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(x.mean((2, 3)))


def small_net(num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0) -> nn.Module:
    return SmallNet(num_classes, in_chans, width=max(2, round(8 * width_mult)))


def grouped_net(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return SmallNet(num_classes, in_chans, width=8, mix_groups=2)
