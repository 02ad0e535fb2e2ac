"""Token-dropping adapters: torchvision and timm Vision Transformers as ``PatchSelectEnv`` ViTs.

``PatchSelectEnv`` (and the patch selectors) drive a ViT through a small interface, the one
``keepgym.models.vit.ViT`` has: ``forward(x, keep=None)`` with per-image kept patch indices,
``attention_map(x, layer)`` (the input tokens, attention sub-layer output and softmax attention of one
block run on all tokens), ``analytic_macs(k)`` / ``analytic_score_macs(layer)`` and the attributes
``num_patches``, ``grid``, ``patch_size``, ``image_size``, ``in_chans``, ``num_classes``, ``depth`` and
``num_prefix_tokens``. :func:`adapt_vit` wraps a torchvision ``VisionTransformer`` or a timm
``VisionTransformer`` so it offers the same: patch tokens are gathered right after the position
embedding is added (class and register tokens always kept), so every block runs on the kept tokens
only. With all patches kept the logits equal the model's own forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["TorchvisionViTAdapter", "TimmViTAdapter", "adapt_vit", "gather_patches"]


def gather_patches(tokens: Tensor, keep: Tensor | None, num_patches: int) -> Tensor:
    """``tokens (B, N, D)`` gathered to ``keep`` (``(B, k)`` or ``(k,)`` indices); None keeps all."""
    if keep is None:
        return tokens
    if keep.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"keep must hold integer patch indices, got dtype {keep.dtype}")
    b = tokens.shape[0]
    if keep.dim() == 1:
        keep = keep.unsqueeze(0).expand(b, -1)
    if keep.dim() != 2 or keep.shape[0] != b or keep.shape[1] < 1:
        raise ValueError(f"keep must have shape (batch={b}, k>=1) or (k,), got {tuple(keep.shape)}")
    if int(keep.min()) < 0 or int(keep.max()) >= num_patches:
        raise ValueError(f"keep indices must lie in [0, {num_patches})")
    keep = keep.long().to(tokens.device)
    return torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def _block_macs(t: int, dim: int, mlp_dim: int) -> int:
    # QKV + output projection, QK^T and AV, MLP: the matrix products of one pre-norm block.
    return 4 * t * dim * dim + 2 * t * t * dim + 2 * t * dim * mlp_dim


class _AdapterBase(nn.Module):
    num_patches: int
    num_prefix_tokens: int
    depth: int
    dim: int
    mlp_dim: int
    patch_dim: int
    num_classes: int

    def analytic_macs(self, k: int | None = None) -> int:
        """Matrix-product MACs per image of ``forward`` with ``k`` kept patches (None = all)."""
        n = self.num_patches
        k = n if k is None else int(k)
        if not 1 <= k <= n:
            raise ValueError(f"k must be in [1, {n}], got {k}")
        t = k + self.num_prefix_tokens
        embed = n * self.patch_dim * self.dim
        return embed + self.depth * _block_macs(t, self.dim, self.mlp_dim) + self.dim * self.num_classes

    def analytic_score_macs(self, layer: int = 0) -> int:
        """Matrix-product MACs per image of ``attention_map(x, layer)``."""
        t = self.num_patches + self.num_prefix_tokens
        attn = 4 * t * self.dim * self.dim + 2 * t * t * self.dim
        return self.num_patches * self.patch_dim * self.dim + layer * _block_macs(t, self.dim, self.mlp_dim) + attn

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.depth:
            raise ValueError(f"layer must be in [0, {self.depth}), got {layer}")


class TorchvisionViTAdapter(_AdapterBase):
    """A torchvision ``VisionTransformer`` (``vit_b_16`` ... or one built directly) that drops patch tokens.

    Args:
        model: The torchvision model; its parameters are shared, not copied.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.image_size = int(model.image_size)
        self.patch_size = int(model.patch_size)
        self.grid = self.image_size // self.patch_size
        self.num_patches = self.grid * self.grid
        self.num_prefix_tokens = 1
        self.in_chans = int(model.conv_proj.in_channels)
        self.dim = int(model.hidden_dim)
        self.mlp_dim = int(model.mlp_dim)
        self.depth = len(model.encoder.layers)
        self.num_classes = int(model.num_classes)
        self.patch_dim = self.in_chans * self.patch_size * self.patch_size

    def embed(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """Class token + kept patch tokens, position embedding added: ``(B, 1 + k, D)``."""
        m = self.model
        pos = m.encoder.pos_embedding
        tokens = m._process_input(x) + pos[:, 1:]
        tokens = gather_patches(tokens, keep, self.num_patches)
        cls = (m.class_token + pos[:, :1]).expand(tokens.shape[0], -1, -1)
        return m.encoder.dropout(torch.cat((cls, tokens), dim=1))

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """Logits ``(B, num_classes)`` from the class token, only ``keep`` patches seen."""
        m = self.model
        tokens = m.encoder.ln(m.encoder.layers(self.embed(x, keep)))
        return m.heads(tokens[:, 0])

    @torch.no_grad()
    def attention_map(self, x: Tensor, layer: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """As ``ViT.attention_map``: block input tokens, attention output, attention ``(B, H, T, T)``."""
        self._check_layer(layer)
        tokens = self.embed(x)
        for block in self.model.encoder.layers[:layer]:
            tokens = block(tokens)
        block = self.model.encoder.layers[layer]
        h = block.ln_1(tokens)
        out, attn = block.self_attention(h, h, h, need_weights=True, average_attn_weights=False)
        return tokens, out, attn


class TimmViTAdapter(_AdapterBase):
    """A timm ``VisionTransformer`` that drops patch tokens (prefix tokens: class/register, kept).

    Args:
        model: The timm model (fixed image size, flattened patch embedding); parameters are shared.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        pe = model.patch_embed
        grid = tuple(int(g) for g in pe.grid_size)
        if grid[0] != grid[1]:
            raise ValueError(f"only square patch grids are supported, got {grid}")
        self.grid = grid[0]
        self.patch_size = int(pe.patch_size[0])
        self.image_size = self.grid * self.patch_size
        self.num_patches = self.grid * self.grid
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self.in_chans = int(pe.proj.in_channels)
        self.dim = int(model.embed_dim)
        self.depth = len(model.blocks)
        self.mlp_dim = int(model.blocks[0].mlp.fc1.out_features)
        self.num_classes = int(model.num_classes)
        self.patch_dim = self.in_chans * self.patch_size * self.patch_size

    def embed(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """Prefix tokens + kept patch tokens after timm's own position embedding: ``(B, prefix + k, D)``."""
        m = self.model
        tokens = m._pos_embed(m.patch_embed(x))
        p = self.num_prefix_tokens
        if keep is not None:
            patches = gather_patches(tokens[:, p:], keep, self.num_patches)
            tokens = torch.cat((tokens[:, :p], patches), dim=1)
        return m.norm_pre(m.patch_drop(tokens))

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """Logits ``(B, num_classes)`` (timm's ``forward_head``: class token or mean of kept tokens)."""
        m = self.model
        return m.forward_head(m.norm(m.blocks(self.embed(x, keep))))

    @torch.no_grad()
    def attention_map(self, x: Tensor, layer: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """As ``ViT.attention_map``; the softmax attention is recomputed from the block's own QKV."""
        self._check_layer(layer)
        tokens = self.embed(x)
        for block in self.model.blocks[:layer]:
            tokens = block(tokens)
        block = self.model.blocks[layer]
        h = block.norm1(tokens)
        a = block.attn
        b, t, c = h.shape
        q, k, _ = a.qkv(h).reshape(b, t, 3, a.num_heads, c // a.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        attn = (q * a.scale @ k.transpose(-2, -1)).softmax(dim=-1)
        return tokens, a(h), attn


def adapt_vit(model: nn.Module) -> Any:
    """``model`` as a token-dropping ViT: a keepgym ``ViT`` as is, torchvision/timm ViTs wrapped.

    Raises:
        TypeError: Any other module.
    """
    from keepgym.models.vit import ViT

    if isinstance(model, ViT | _AdapterBase):
        return model
    module = type(model).__module__
    if module.startswith("torchvision.models.vision_transformer"):
        return TorchvisionViTAdapter(model)
    if module.startswith("timm.models.vision_transformer"):
        return TimmViTAdapter(model)
    raise TypeError(
        f"model must be a keepgym ViT, a torchvision VisionTransformer or a timm VisionTransformer, "
        f"got {type(model).__name__}"
    )
