"""A SimpleViT-style Vision Transformer that can drop patch tokens.

The architecture follows the ViT used by AgentViT (Cauteruccio et al., "Adaptive patch selection to
improve Vision Transformers through Reinforcement Learning", Applied Intelligence 2025), which is
lucidrains' ``SimpleViT``: patch embedding (LayerNorm -> Linear -> LayerNorm), a fixed 2-D sin-cos
position embedding, pre-norm blocks with bias-free attention projections, mean pooling and a
LayerNorm + Linear head. A CLS token is optional.

``ViT.forward(x, keep=...)`` takes the indices of the patches each image keeps. Tokens are gathered
right after the position embedding is added, so every block runs on ``k`` tokens only and the compute
really falls with ``k`` (``ViT.analytic_macs``). ``ViT.patch_scores`` gives the attention each patch
receives in one block, the signal the patch selectors and ``keepgym.envs.PatchSelectEnv`` use.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "VIT_PRESETS",
    "ViT",
    "vit_cifar",
    "vit_medium",
    "vit_small",
    "vit_tiny",
    "posemb_sincos_2d",
    "select_all",
    "select_random_k",
    "select_topk",
    "mask_to_indices",
]

SCORE_MODES = ("attention", "agentvit")

#: Width, depth and heads of the ViT factories below (``ViT``/``PatchSelectEnv`` keyword arguments).
VIT_PRESETS: dict[str, dict[str, int]] = {
    "vit_tiny": dict(dim=32, depth=2, heads=2, mlp_dim=64, dim_head=8),
    "vit_small": dict(dim=64, depth=4, heads=4, mlp_dim=128, dim_head=16),
    "vit_medium": dict(dim=128, depth=6, heads=4, mlp_dim=256, dim_head=32),
    "vit_cifar": dict(dim=128, depth=6, heads=16, mlp_dim=512, dim_head=64),
}


def posemb_sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed 2-D sin-cos position embedding of a ``h x w`` grid, shape ``(h * w, dim)`` (row-major)."""
    if dim % 4 != 0:
        raise ValueError(f"dim must be a multiple of 4 for the sin-cos embedding, got {dim}")
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    omega = torch.arange(dim // 4) / max(dim // 4 - 1, 1)
    omega = 1.0 / (temperature**omega)
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=1).float()


class FeedForward(nn.Module):
    """Pre-norm MLP: LayerNorm -> Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class Attention(nn.Module):
    """Pre-norm multi-head self-attention with bias-free QKV and output projections."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        inner = heads * dim_head
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, inner * 3, bias=False)
        self.proj = nn.Linear(inner, dim, bias=False)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = x.shape
        # unbind (not indexing): its backward is one stack instead of three zero-filled scatters.
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.heads, self.dim_head).unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # each (B, heads, T, dim_head)

    def _merge(self, out: Tensor) -> Tensor:
        b, _, t, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, t, self.heads * self.dim_head))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._qkv(x)
        # Fused kernel: fastest on CPU and GPU; the explicit softmax is only needed for scores.
        return self._merge(F.scaled_dot_product_attention(q, k, v))

    def forward_with_attn(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Same output as ``forward`` plus the softmax attention ``(B, heads, T, T)``."""
        q, k, v = self._qkv(x)
        attn = (q @ k.transpose(-1, -2) * self.scale).softmax(dim=-1)
        return self._merge(attn @ v), attn


class Block(nn.Module):
    """Pre-norm transformer block (residual attention, then residual MLP)."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int) -> None:
        super().__init__()
        self.attn = Attention(dim, heads, dim_head)
        self.mlp = FeedForward(dim, mlp_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class ViT(nn.Module):
    """SimpleViT with per-image patch (token) selection.

    Args:
        image_size: Side of the square input image in pixels.
        patch_size: Side of a square patch; must divide ``image_size``.
        num_classes: Number of output classes.
        dim: Token width.
        depth: Number of transformer blocks.
        heads: Attention heads.
        mlp_dim: Hidden width of the block MLP.
        in_chans: Input channels.
        dim_head: Width of one attention head (AgentViT keeps lucidrains' 64, so the inner attention
            width is ``heads * dim_head``, 8x ``dim`` in the CIFAR config).
        cls_token: Prepend a learned CLS token and classify from it instead of mean pooling. The CLS
            token is never dropped.
    """

    def __init__(
        self,
        *,
        image_size: int = 32,
        patch_size: int = 4,
        num_classes: int = 10,
        dim: int = 128,
        depth: int = 6,
        heads: int = 16,
        mlp_dim: int = 512,
        in_chans: int = 3,
        dim_head: int = 64,
        cls_token: bool = False,
    ) -> None:
        super().__init__()
        if patch_size <= 0 or image_size % patch_size != 0:
            raise ValueError(f"patch_size {patch_size} does not divide image_size {image_size}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.num_patches = self.grid * self.grid
        self.num_classes = num_classes
        self.dim = dim
        self.depth = depth
        self.heads = heads
        self.dim_head = dim_head
        self.mlp_dim = mlp_dim
        self.in_chans = in_chans
        self.patch_dim = in_chans * patch_size * patch_size
        self.num_prefix_tokens = 1 if cls_token else 0

        self.patch_embed = nn.Sequential(
            nn.LayerNorm(self.patch_dim), nn.Linear(self.patch_dim, dim), nn.LayerNorm(dim)
        )
        self.register_buffer("pos_embed", posemb_sincos_2d(self.grid, self.grid, dim), persistent=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, dim_head, mlp_dim) for _ in range(depth))
        self.head_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    # ------------------------------------------------------------------ tokens
    def patchify(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, N, p*p*C)``, patches row-major, pixels as ``(p1 p2 c)``."""
        b, c, h, w = x.shape
        if c != self.in_chans or h != self.image_size or w != self.image_size:
            raise ValueError(
                f"expected input (B, {self.in_chans}, {self.image_size}, {self.image_size}), "
                f"got {tuple(x.shape)}"
            )
        p, g = self.patch_size, self.grid
        x = x.reshape(b, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, g * g, p * p * c)

    def embed(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """Patch tokens with position embedding, gathered to ``keep``, CLS prepended: ``(B, T, dim)``."""
        tokens = self.patch_embed(self.patchify(x)) + self.pos_embed.to(x.dtype)
        if keep is not None:
            keep = self._check_keep(keep, tokens.shape[0]).to(tokens.device)
            tokens = torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        if self.cls_token is not None:
            tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        return tokens

    def _check_keep(self, keep: Tensor, batch: int) -> Tensor:
        if keep.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"keep must hold integer patch indices, got dtype {keep.dtype}")
        if keep.dim() == 1:
            keep = keep.unsqueeze(0).expand(batch, -1)
        if keep.dim() != 2 or keep.shape[0] != batch or keep.shape[1] < 1:
            raise ValueError(f"keep must have shape (batch={batch}, k>=1) or (k,), got {tuple(keep.shape)}")
        if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= self.num_patches):
            raise ValueError(f"keep indices must lie in [0, {self.num_patches})")
        return keep.long()

    def get_classifier(self) -> nn.Linear:
        """The logits layer."""
        return self.head

    # ----------------------------------------------------------------- forward
    def forward_features(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """Tokens after the last block, ``(B, prefix + k, dim)``."""
        x = self.embed(x, keep)
        for block in self.blocks:
            x = block(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool (CLS token or mean over kept tokens), LayerNorm, classify."""
        x = x[:, 0] if self.cls_token is not None else x.mean(dim=1)
        x = self.head_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """Logits ``(B, num_classes)``.

        Args:
            x: Images ``(B, C, H, W)``.
            keep: Kept patch indices per image, LongTensor ``(B, k)`` (or ``(k,)`` for the whole batch);
                ``None`` keeps all ``N`` patches. Patches are numbered row-major over the grid.
        """
        return self.forward_head(self.forward_features(x, keep))

    # ------------------------------------------------------------------ scores
    @torch.no_grad()
    def patch_scores(self, x: Tensor, layer: int = 0, mode: str = "attention") -> Tensor:
        """Score every patch from block ``layer`` run on all patches, ``(B, N)``, no gradients.

        Args:
            x: Images ``(B, C, H, W)``.
            layer: Block whose attention is read; blocks before it run in full.
            mode: ``"attention"``: the softmax attention each patch receives, averaged over heads and
                query tokens (each row sums to 1); with a CLS token, the CLS query's row instead
                (sums to 1 minus the CLS self-attention). ``"agentvit"``: AgentViT's state, the
                channel mean of that block's attention sub-layer output (unbounded).
        """
        if mode not in SCORE_MODES:
            raise ValueError(f"mode must be one of {SCORE_MODES}, got {mode!r}")
        tokens, out, attn = self.attention_map(x, layer)
        p = self.num_prefix_tokens
        if mode == "agentvit":
            return out.mean(dim=-1)[:, p:]
        if self.cls_token is not None:
            return attn[:, :, 0, p:].mean(dim=1)
        return attn.mean(dim=(1, 2))

    @torch.no_grad()
    def attention_map(self, x: Tensor, layer: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """Block ``layer`` run on all tokens: its input tokens ``(B, T, dim)``, its attention sub-layer
        output ``(B, T, dim)`` and softmax attention ``(B, heads, T, T)``; T counts the CLS token first.

        The token-dropping adapters of torchvision/timm ViTs (``keepgym.models.vit_adapter``) offer the
        same method, so ``PatchSelectEnv`` reads every ViT the same way.
        """
        if not 0 <= layer < self.depth:
            raise ValueError(f"layer must be in [0, {self.depth}), got {layer}")
        tokens = self.embed(x)
        for block in self.blocks[:layer]:
            tokens = block(tokens)
        out, attn = self.blocks[layer].attn.forward_with_attn(tokens)
        return tokens, out, attn

    # -------------------------------------------------------------------- cost
    def analytic_macs(self, k: int | None = None, include_norms: bool = True) -> int:
        """Multiply-accumulates per image of ``forward`` with ``k`` kept patches (``None`` = all).

        Counted like ``keepgym.envs.metrics.count_macs_params``, the project's counter: every matrix product
        (patch embedding on all ``N`` patches, QKV, ``QK^T``, ``AV``, output projection, MLP, head; as
        ``torch.utils.flop_counter`` counts them) plus, thop-style, ``4 * numel`` for each affine
        LayerNorm's input. GELU, softmax and additions count zero.

        Args:
            k: Kept patches, ``1 <= k <= N``.
            include_norms: Add the LayerNorm term; False gives the matrix products alone (what
                ``FlopCounterMode`` reports, divided by 2).
        """
        n = self.num_patches
        k = n if k is None else int(k)
        if not 1 <= k <= n:
            raise ValueError(f"k must be in [1, {n}], got {k}")
        t = k + self.num_prefix_tokens
        macs = self._embed_macs(include_norms) + self.depth * self._block_macs(t, include_norms)
        return macs + self.dim * self.num_classes + (4 * self.dim if include_norms else 0)

    def analytic_score_macs(self, layer: int = 0, include_norms: bool = True) -> int:
        """MACs per image of ``patch_scores(x, layer)``: all patches through blocks ``0..layer - 1`` and
        the attention sub-layer of block ``layer``, counted as in ``analytic_macs``."""
        t = self.num_patches + self.num_prefix_tokens
        attn = self._block_macs(t, include_norms, attention_only=True)
        return self._embed_macs(include_norms) + layer * self._block_macs(t, include_norms) + attn

    def _embed_macs(self, include_norms: bool) -> int:
        n = self.num_patches
        norms = 4 * n * (self.patch_dim + self.dim) if include_norms else 0
        return n * self.patch_dim * self.dim + norms

    def _block_macs(self, t: int, include_norms: bool, attention_only: bool = False) -> int:
        inner = self.heads * self.dim_head
        attn = t * self.dim * 3 * inner + 2 * t * t * inner + t * inner * self.dim
        attn += 4 * t * self.dim if include_norms else 0
        if attention_only:
            return attn
        mlp = 2 * t * self.dim * self.mlp_dim + (4 * t * self.dim if include_norms else 0)
        return attn + mlp


# --------------------------------------------------------------------- selectors
def select_all(scores: Tensor) -> Tensor:
    """Keep every patch: indices ``(B, N)``."""
    b, n = scores.shape
    return torch.arange(n, device=scores.device).unsqueeze(0).expand(b, n).contiguous()


def select_random_k(scores: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """``k`` patches drawn uniformly without replacement per image, sorted: ``(B, k)``.

    ``generator`` must live on ``scores``' device (or be ``None``).
    """
    b, n = scores.shape
    k = _check_k(k, n)
    noise = torch.rand(b, n, generator=generator, device=scores.device)
    return noise.topk(k, dim=1).indices.sort(dim=1).values


def select_topk(scores: Tensor, k: int) -> Tensor:
    """The ``k`` highest-scoring patches per image, sorted by index: ``(B, k)`` (EViT-like top-k)."""
    _, n = scores.shape
    k = _check_k(k, n)
    return scores.topk(k, dim=1).indices.sort(dim=1).values


def mask_to_indices(mask: Tensor) -> Tensor:
    """Boolean keep-mask ``(N,)`` or ``(B, N)`` -> kept indices ``(k,)`` or ``(B, k)``.

    Raises:
        ValueError: If a row keeps nothing or rows keep different numbers of patches.
    """
    mask = mask.bool()
    if mask.dim() == 1:
        if not mask.any():
            raise ValueError("the mask keeps no patch")
        return mask.nonzero().squeeze(1)
    counts = mask.sum(dim=1)
    if int(counts.min()) < 1:
        raise ValueError("the mask keeps no patch in some row")
    if int(counts.max()) != int(counts.min()):
        raise ValueError("every row of the mask must keep the same number of patches")
    k = int(counts[0])
    # Stable sort puts kept indices first in ascending order.
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    return order[:, :k]


def _check_k(k: int, n: int) -> int:
    k = int(k)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    return k


# ---------------------------------------------------------------------- factories
def _scaled(value: int, width_mult: float, multiple: int = 1) -> int:
    return max(multiple, int(math.ceil(value * width_mult / multiple - 1e-9)) * multiple)


def _build(
    preset: str,
    num_classes: int,
    width_mult: float,
    in_chans: int = 3,
    image_size: int = 32,
    patch_size: int = 4,
    **kw: Any,
) -> ViT:
    """``VIT_PRESETS[preset]`` scaled by ``width_mult``, ``kw`` overriding any ``ViT`` argument."""
    cfg = dict(VIT_PRESETS[preset])
    if width_mult != 1.0:
        # dim must stay a multiple of 4 for the sin-cos embedding; heads scale with the width.
        cfg["dim"] = _scaled(cfg["dim"], width_mult, 4)
        cfg["heads"] = _scaled(cfg["heads"], width_mult)
        cfg["mlp_dim"] = _scaled(cfg["mlp_dim"], width_mult)
    cfg.update(kw)
    return ViT(
        num_classes=num_classes, in_chans=in_chans, image_size=image_size, patch_size=patch_size, **cfg
    )


def vit_cifar(num_classes: int = 10, width_mult: float = 1.0, **kw: Any) -> ViT:
    """AgentViT's CIFAR ViT: 32x32, patch 4 (N=64), dim 128, depth 6, 16 heads of 64, MLP 512 (3.95M params).

    ``width_mult`` scales ``dim`` (to a multiple of 4), ``heads`` and ``mlp_dim``; ``kw`` sets ``in_chans``
    (3), ``image_size`` (32), ``patch_size`` (4) or overrides any other ``ViT`` argument (``dim``, ``depth``,
    ``heads``, ``mlp_dim``, ``dim_head``, ``cls_token``). The same holds for :func:`vit_small` and :func:`vit_tiny`.
    """
    return _build("vit_cifar", num_classes, width_mult, **kw)


def vit_medium(num_classes: int = 10, width_mult: float = 1.0, **kw: Any) -> ViT:
    """AgentViT's CIFAR depth and width (6 blocks, dim 128) with 4 heads of 32 and MLP 256: ~4x cheaper
    than :func:`vit_cifar`, the CPU preset of the CIFAR-10 AgentViT runs (0.80M parameters)."""
    return _build("vit_medium", num_classes, width_mult, **kw)


def vit_small(num_classes: int = 10, width_mult: float = 1.0, **kw: Any) -> ViT:
    """A CPU-friendly ViT for demos: dim 64, depth 4, 4 heads of 16, MLP 128."""
    return _build("vit_small", num_classes, width_mult, **kw)


def vit_tiny(num_classes: int = 10, width_mult: float = 1.0, **kw: Any) -> ViT:
    """A test-sized ViT: dim 32, depth 2, 2 heads of 8, MLP 64."""
    return _build("vit_tiny", num_classes, width_mult, **kw)
