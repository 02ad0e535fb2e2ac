"""Tests for models/vit.py: the token-dropping SimpleViT, its MAC count, scores and selectors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from keepgym.envs.metrics import count_macs_params
from keepgym.models.vit import (
    ViT,
    mask_to_indices,
    select_all,
    select_random_k,
    select_topk,
    vit_cifar,
    vit_small,
    vit_tiny,
)


def _tiny(cls_token: bool = False, **kw) -> ViT:
    torch.manual_seed(0)
    cfg = dict(
        image_size=16, patch_size=4, dim=16, depth=2, heads=2, mlp_dim=32, dim_head=8, cls_token=cls_token
    )
    cfg.update(kw)
    return ViT(**cfg).eval()


def _measured_macs(model: ViT, x: torch.Tensor, keep: torch.Tensor | None) -> int:
    # The project's own counter: torch's FlopCounterMode counts attention differently across versions.
    return count_macs_params(model, tuple(x.shape), keep=keep)[0]


class _Scores(nn.Module):
    """``patch_scores`` as a module, so the project's counter can count it."""

    def __init__(self, vit: ViT, layer: int) -> None:
        super().__init__()
        self.vit, self.layer = vit, layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.patch_scores(x, layer=self.layer)


def test_cifar_config_has_3_95m_params_and_reference_flops():
    model = vit_cifar()
    params = sum(p.numel() for p in model.parameters())
    assert params == 3_947_242
    assert round(params / 1e6, 2) == 3.95
    assert model.num_patches == 64
    # AgentViT's measured 0.6048 GFLOPs with 64 tokens and 0.2588 with 30 kept (FLOPs = 2 MACs).
    assert 2 * model.analytic_macs(64, include_norms=False) / 1e9 == pytest.approx(0.6048, abs=1e-4)
    assert 2 * model.analytic_macs(30, include_norms=False) / 1e9 == pytest.approx(0.2588, abs=1e-4)
    # The state pass (embedding + block 0's attention on all 64 patches): AgentViT measured 0.0847 GFLOPs.
    assert 2 * model.analytic_score_macs(0, include_norms=False) / 1e9 == pytest.approx(0.0847, abs=1e-4)


@pytest.mark.parametrize("cls_token", [False, True])
def test_measured_macs_match_analytic_and_fall_with_k(cls_token):
    model = _tiny(cls_token)
    x = torch.randn(1, 3, 16, 16)
    n = model.num_patches
    previous = None
    for k in (n, 12, 8, 3, 1):
        keep = None if k == n else select_topk(model.patch_scores(x), k)
        measured = _measured_macs(model, x, keep)
        assert measured == model.analytic_macs(k)
        if previous is not None:
            assert measured < previous
        previous = measured
    # The scoring pass has its own closed form too.
    assert count_macs_params(_Scores(model, 1), tuple(x.shape))[0] == model.analytic_score_macs(1)


@pytest.mark.parametrize("cls_token", [False, True])
def test_measured_macs_match_count_macs_params(cls_token):
    metrics = pytest.importorskip("keepgym.envs.metrics")
    model = _tiny(cls_token)
    for k in (16, 8, 1):
        keep = torch.arange(0, 16, 16 // k)[:k].unsqueeze(0)
        macs, params = metrics.count_macs_params(model, (1, 3, 16, 16), keep=keep)
        assert macs == model.analytic_macs(k)
        assert params == sum(p.numel() for p in model.parameters())
    assert metrics.count_macs_params(vit_cifar(), (1, 3, 32, 32))[0] == vit_cifar().analytic_macs(64)


@pytest.mark.parametrize("cls_token", [False, True])
def test_gather_keeps_exactly_k_tokens_per_image(cls_token):
    model = _tiny(cls_token)
    x = torch.randn(4, 3, 16, 16)
    keep = select_random_k(torch.zeros(4, 16), 5, torch.Generator().manual_seed(1))
    prefix = 1 if cls_token else 0
    assert model.forward_features(x, keep).shape == (4, prefix + 5, 16)
    full = model.embed(x)
    gathered = model.embed(x, keep)
    # Each kept token is the original token of that image's chosen patch (position embedding included).
    for b in range(4):
        assert torch.equal(gathered[b, prefix:], full[b, prefix:][keep[b]])
        if cls_token:
            assert torch.equal(gathered[b, 0], model.cls_token[0, 0])
    # Images are independent: each image's logits match a forward of that image alone.
    logits = model(x, keep=keep)
    for b in range(4):
        assert torch.allclose(logits[b], model(x[b : b + 1], keep=keep[b : b + 1])[0], atol=1e-5)


def test_keep_all_equals_no_keep_and_shared_keep_broadcasts():
    model = _tiny()
    x = torch.randn(3, 3, 16, 16)
    assert torch.allclose(model(x), model(x, keep=select_all(torch.zeros(3, 16))), atol=1e-6)
    shared = torch.tensor([0, 5, 9])
    assert torch.allclose(model(x, keep=shared), model(x, keep=shared.expand(3, -1)), atol=1e-6)


def test_cls_token_is_always_kept_and_used_for_the_head():
    model = _tiny(cls_token=True)
    x = torch.randn(2, 3, 16, 16)
    keep = torch.tensor([[1], [7]])
    feats = model.forward_features(x, keep)
    assert feats.shape == (2, 2, 16)  # CLS + the single kept patch
    assert model.analytic_macs(1) > _tiny().analytic_macs(1)  # the CLS token is paid for


def test_patch_scores_are_attention_received():
    model = _tiny()
    x = torch.randn(5, 3, 16, 16)
    scores = model.patch_scores(x)
    assert scores.shape == (5, 16)
    assert not scores.requires_grad
    assert (scores >= 0).all()
    assert torch.allclose(scores.sum(dim=1), torch.ones(5), atol=1e-5)
    assert model.patch_scores(x, layer=1).shape == (5, 16)
    # Scores come from the explicit softmax; the fused forward must agree with it.
    tokens = model.embed(x)
    out, attn = model.blocks[0].attn.forward_with_attn(tokens)
    assert torch.allclose(out, model.blocks[0].attn(tokens), atol=1e-5)
    assert torch.allclose(scores, attn.mean(dim=(1, 2)))
    # AgentViT's state: channel mean of the block's attention sub-layer output.
    assert torch.allclose(model.patch_scores(x, mode="agentvit"), out.mean(dim=-1), atol=1e-6)


def test_patch_scores_with_cls_use_the_cls_row():
    model = _tiny(cls_token=True)
    scores = model.patch_scores(torch.randn(3, 3, 16, 16))
    assert scores.shape == (3, 16)
    assert (scores.sum(dim=1) < 1).all() and (scores >= 0).all()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="does not divide"):
        ViT(image_size=30, patch_size=4)
    model = _tiny()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError):
        model.patch_scores(x, layer=2)
    with pytest.raises(ValueError):
        model.patch_scores(x, mode="cls")
    with pytest.raises(ValueError):
        model(x, keep=torch.tensor([[16]]))
    with pytest.raises(ValueError):
        model(x, keep=torch.tensor([[0.5]]))
    with pytest.raises(ValueError):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError):
        model.analytic_macs(0)


def test_selectors():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.9], [0.8, 0.1, 0.3, 0.0]])
    assert select_topk(scores, 2).tolist() == [[1, 3], [0, 2]]
    assert select_all(scores).tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    r1 = select_random_k(scores, 3, torch.Generator().manual_seed(5))
    r2 = select_random_k(scores, 3, torch.Generator().manual_seed(5))
    assert torch.equal(r1, r2) and r1.shape == (2, 3)
    assert all(len(set(row)) == 3 for row in r1.tolist())
    mask = torch.tensor([[True, False, True, False], [False, True, True, False]])
    assert mask_to_indices(mask).tolist() == [[0, 2], [1, 2]]
    assert mask_to_indices(torch.tensor([0, 1, 1, 0])).tolist() == [1, 2]
    with pytest.raises(ValueError):
        mask_to_indices(torch.zeros(4))
    with pytest.raises(ValueError):
        mask_to_indices(torch.tensor([[True, True], [True, False]]))
    with pytest.raises(ValueError):
        select_topk(scores, 5)


def test_factories_and_width_mult():
    assert vit_small().dim == 64 and vit_tiny().depth == 2
    narrow = vit_cifar(width_mult=0.5, num_classes=100, in_chans=1)
    assert (narrow.dim, narrow.heads, narrow.mlp_dim) == (64, 8, 256)
    assert narrow.head.out_features == 100 and narrow.in_chans == 1
    assert vit_cifar(image_size=28, patch_size=4).num_patches == 49
    assert vit_cifar(depth=2, cls_token=True).cls_token is not None
