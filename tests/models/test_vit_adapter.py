"""Token-dropping adapters for torchvision and timm ViTs: parity with the model's own forward, dropping."""

from __future__ import annotations

import pytest
import torch

from keepgym.models.vit import vit_tiny
from keepgym.models.vit_adapter import TorchvisionViTAdapter, adapt_vit


def _torchvision_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    ).eval()
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero: all logits 0
    return model


def test_torchvision_parity_with_all_patches_and_real_dropping():
    model = _torchvision_vit()
    vit = adapt_vit(model)
    assert isinstance(vit, TorchvisionViTAdapter) and vit.num_patches == 16 and vit.num_prefix_tokens == 1
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (vit(x) - model(x)).abs().max() < 1e-5
        assert (vit(x, keep=torch.arange(16)) - model(x)).abs().max() < 1e-5
        # Dropping patches changes the logits, and only the kept tokens go through the blocks.
        keep = torch.tensor([[0, 5, 10], [1, 2, 3], [4, 8, 12], [15, 14, 13]])
        assert (vit(x, keep=keep) - model(x)).abs().max() > 1e-4
        tokens, out, attn = vit.attention_map(x, layer=1)
    assert tokens.shape == out.shape == (4, 17, 32) and attn.shape == (4, 2, 17, 17)
    assert torch.allclose(attn.sum(-1), torch.ones(4, 2, 17), atol=1e-5)
    assert vit.analytic_macs(3) < vit.analytic_macs(16)


def test_timm_parity_class_token_and_mean_pool():
    timm = pytest.importorskip("timm")
    x = torch.randn(3, 3, 32, 32)
    for kw in (dict(), dict(global_pool="avg", class_token=False)):
        model = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10, depth=2, **kw
        ).eval()
        vit = adapt_vit(model)
        with torch.no_grad():
            assert (vit(x) - model(x)).abs().max() < 1e-5
            assert vit(x, keep=torch.tensor([0, 7])).shape == (3, 10)
            _, _, attn = vit.attention_map(x, 0)
        assert attn.shape[-1] == 16 + vit.num_prefix_tokens


def test_adapt_vit_passes_keepgym_vits_and_refuses_others():
    own = vit_tiny(image_size=16)
    assert adapt_vit(own) is own
    with pytest.raises(TypeError):
        adapt_vit(torch.nn.Linear(2, 2))
