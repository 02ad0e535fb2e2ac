"""keepgym.envs.metrics: the MAC/param counter, accuracy and latency helpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from keepgym.envs.metrics import count_macs_params, evaluate_accuracy, measure_latency


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(2, 3),
    )


def test_counts_like_thop_on_a_tiny_cnn() -> None:
    model = _tiny_cnn().train()
    macs, params = count_macs_params(model, (1, 1, 8, 8))
    conv = 2 * 8 * 8 * 1 * 3 * 3  # out elements x C_in x k x k
    bn = 4 * 2 * 8 * 8  # thop: 2 * numel, doubled for affine
    avgpool = 2 * 4 * 4  # one op per output element
    adaptive = (16 + 1) * 2  # (kernel + 1) per output element
    linear = 2 * 3
    assert macs == conv + bn + avgpool + adaptive + linear
    assert params == 18 + 4 + 9
    assert model.training  # mode restored
    # Batch size scales the count linearly.
    assert count_macs_params(model, (4, 1, 8, 8))[0] == 4 * macs


class _Attention(nn.Module):
    """Tokens from pixels, optional kept-token indices, explicit-matmul or fused attention."""

    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        self.qkv = nn.Linear(8, 24, bias=False)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, 8)
        if keep is not None:
            tokens = torch.gather(tokens, 1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
        q, k, v = self.qkv(tokens).view(tokens.shape[0], tokens.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
        if self.fused:
            return F.scaled_dot_product_attention(q, k, v)
        return (q @ k.transpose(-1, -2)).softmax(-1) @ v


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "matmul"])
def test_attention_matmuls_and_forward_kwargs(fused: bool) -> None:
    model = _Attention(fused)

    def expected(n: int) -> int:
        return n * 8 * 24 + 2 * (2 * n * n * 4)  # qkv projection + (q k^T, attn v) over 2 heads

    assert count_macs_params(model, (1, 8, 4, 4)) == (expected(16), 8 * 24)
    keep = torch.tensor([[0, 3, 5, 9, 15]])
    assert count_macs_params(model, (1, 8, 4, 4), keep=keep) == (expected(5), 8 * 24)


class _Constant(nn.Module):
    """Always predicts class 1 (and has a parameter so it has a device)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([0.0, 1.0, 0.0]))

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.bias.expand(x.shape[0], 3) * scale


def test_evaluate_accuracy_of_a_constant_model() -> None:
    model = _Constant().train()
    x = torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8)
    y = torch.tensor([1, 1, 1, 0, 2, 1, 0, 0, 1, 2])
    seen = []

    def normalize(batch: torch.Tensor) -> torch.Tensor:
        seen.append(batch.dtype)
        return batch.float() / 255.0

    assert evaluate_accuracy(model, x, y, normalize, batch_size=3) == pytest.approx(0.5)
    assert seen == [torch.uint8] * 4  # 10 images in batches of 3
    assert model.training
    # forward_kwargs reach the model: a negative scale makes class 1 the least likely.
    assert evaluate_accuracy(model, x, y, normalize, forward_kwargs={"scale": -1.0}) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        evaluate_accuracy(model, x[:0], y[:0], normalize)


def test_measure_latency() -> None:
    model = _tiny_cnn().train()
    stats = measure_latency(model, (1, 8, 8), batch_size=4, repeats=3, warmup=1)
    assert set(stats) == {"median_ms", "images_per_second", "batch_size"}
    assert stats["batch_size"] == 4 and stats["median_ms"] > 0
    assert stats["images_per_second"] == pytest.approx(4 / (stats["median_ms"] / 1e3))
    assert model.training
    # An NCHW shape works too (N is replaced by batch_size).
    assert measure_latency(model, (1, 1, 8, 8), repeats=1, warmup=0)["batch_size"] == 1
