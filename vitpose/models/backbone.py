"""The plain ViT backbone of ViTPose.

Owns: the patch embedding (a padded conv), the position embedding, the timm transformer blocks, the last
norm, the optional knowledge tokens (paper §3.4) and the activation-checkpointing switch. Module names
follow the official ViTPose code (`patch_embed.proj`, `pos_embed`, `blocks.N.*`, `last_norm`) so an
official state dict loads with a plain `load_state_dict(strict=True)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from timm.layers import DropPath, resample_abs_pos_embed, trunc_normal_
from torch.utils.checkpoint import checkpoint

from .attention import AttentionSpec, WindowLayout, attend, attention_cost, window_attention, window_mask
from .moe import MoeMlp

LAYER_NORM_EPS = 1e-6


def default_patch_padding(patch_size: int) -> int:
    """Padding of the patch conv: ViTPose pads its 16x16 conv by 2; we scale that as `2 * patch // 16`.

    Any padding below patch/2 keeps the token grid at exactly H/patch x W/patch when the input is a
    multiple of the patch (see `token_grid`), so the rule changes nothing but the border receptive field.
    """
    return 2 * patch_size // 16


def token_grid(img_size: tuple[int, int], patch_size: int, padding: int) -> tuple[int, int]:
    """Token grid (h, w) of a conv with kernel = stride = patch_size and the given padding.

    256x192 with patch 16 and padding 2: ((256 + 4 - 16) // 16 + 1, (192 + 4 - 16) // 16 + 1) = (16, 12).
    """
    h, w = img_size
    return (h + 2 * padding - patch_size) // patch_size + 1, (w + 2 * padding - patch_size) // patch_size + 1


def _init_vit_weights(module: nn.Module) -> None:
    # The official ViTPose init: truncated normal for linears, unit LayerNorm; the patch conv keeps the
    # PyTorch default (the official code does not touch it either).
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class Mlp(nn.Module):
    """fc1 -> GELU (exact) -> fc2; timm's ``Mlp`` names."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention: one fused qkv Linear, ``F.scaled_dot_product_attention``, the output Linear.

    Same parameters and names as timm's ``Attention`` (``qkv``, ``proj``). The qkv output (B, N, 3C) is
    split along its middle axis into three (B, N, h, d) views, so that in the backward pass the three
    gradients stack straight back into qkv's own memory layout (timm's head-major permute costs one extra
    full copy of the qkv gradient per block). The attention output of the fused kernel is (B, N, h, d)
    in memory, so merging the heads is a view (bf16 training on a CPU: see ``attention.explicit_attention``).
    With a ``layout`` the block attends within windows (attention.py); the parameters are the same.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, layout: WindowLayout | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.layout = layout
        # Built once with the model (on its device); not in the state dict, so checkpoints do not see it.
        self.register_buffer("window_mask", None if layout is None else window_mask(layout), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.layout is None:
            out = attend(q, k, v)
        else:
            out = window_attention(q, k, v, self.layout, self.window_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    Module names are timm's ``vision_transformer.Block`` ones (``norm1``, ``attn.qkv``, ``attn.proj``,
    ``norm2``, ``mlp.fc1``, ``mlp.fc2``, ``drop_path1/2``), which are the official ViTPose keys.
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, drop_path: float = 0.0,
                 layout: WindowLayout | None = None, moe: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, layout=layout)
        self.drop_path1: nn.Module = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        # An explicit hidden size (ViT-g: 6144 for 1408), not a float ratio; ViTPose+ experts with ``moe``
        # = (experts, part_features) (moe.py).
        self.mlp: nn.Module = Mlp(dim, mlp_hidden) if moe is None else MoeMlp(dim, mlp_hidden, *moe)
        self.drop_path2: nn.Module = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, dataset_index: int | torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        h = self.norm2(x)
        return x + self.drop_path2(self.mlp(h) if dataset_index is None else self.mlp(h, dataset_index))


class PatchEmbed(nn.Module):
    """Image (B, 3, H, W) -> feature map (B, C, Hp, Wp) with one padded, strided conv."""

    def __init__(self, patch_size: int, embed_dim: int, padding: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last: the conv writes (B, Hp, Wp, C) memory, which is the token sequence (B, N, C)
        # the blocks read, so no transpose copy follows (and the residual stream starts contiguous).
        return self.proj(x.contiguous(memory_format=torch.channels_last))


def initial_knowledge_tokens(num_tokens: int, dim: int, seed: int) -> torch.Tensor:
    """The tokens token learning starts from (trunc normal, std .02, drawn from ``seed`` alone).

    Also the ``random_token`` control arm: the same tokens before they ever saw the teacher.
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    gen = torch.Generator().manual_seed(int(seed))
    return nn.init.trunc_normal_(torch.empty(num_tokens, dim), std=0.02, generator=gen)


def fixed_lift(token_dim: int, embed_dim: int, seed: int) -> torch.Tensor:
    """A fixed (embed_dim, token_dim) matrix with orthonormal columns (rows when token_dim > embed_dim),
    drawn from ``seed``: maps student-width tokens into a teacher of another width, norm-preserving."""
    gen = torch.Generator().manual_seed(int(seed) * 7919 + 17)
    q, r = torch.linalg.qr(torch.randn(max(embed_dim, token_dim), min(embed_dim, token_dim), generator=gen))
    q = q * torch.sign(torch.diagonal(r))  # a unique Q for the draw (QR's sign ambiguity removed)
    return q if embed_dim >= token_dim else q.T


class KnowledgeTokens(nn.Module):
    """K tokens appended to the patch tokens (paper §3.4), nothing trainable between them and the blocks.

    A student holds them in its own width, frozen. Token learning on a teacher of another width holds them in
    the student's width too, entering the teacher through ``lift``: a fixed, seeded buffer (never trained), so
    the tokens a student receives are exactly the ones that were optimised on the teacher. With equal widths
    there is no lift, which is the paper's method as written.
    """

    def __init__(self, tokens: torch.Tensor, lift: torch.Tensor | None = None) -> None:
        super().__init__()
        self.tokens = nn.Parameter(tokens.detach().clone())
        # Not part of the state dict: it exists only on the teacher copy used for token learning.
        self.register_buffer("lift", None if lift is None else lift.detach().clone(), persistent=False)

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    def forward(self) -> torch.Tensor:
        return self.tokens if self.lift is None else self.tokens @ self.lift.T  # (K, C)


class ViTBackbone(nn.Module):
    """Plain ViT without cls token: image (B, 3, H, W) -> feature map (B, C, Hp, Wp)."""

    def __init__(
        self,
        img_size: tuple[int, int] = (256, 192),
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_hidden: int | None = None,
        drop_path_rate: float = 0.0,
        patch_padding: int | None = None,
        pre_norm: bool = False,
        attention: AttentionSpec | None = None,
        moe: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.patch_size = patch_size
        self.patch_padding = default_patch_padding(patch_size) if patch_padding is None else patch_padding
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_hidden = 4 * embed_dim if mlp_hidden is None else mlp_hidden
        self.grid_size = token_grid(self.img_size, patch_size, self.patch_padding)
        self.attention = attention or AttentionSpec()
        bad = [b for b in self.attention.full_blocks if not 0 <= b < depth]
        if bad:
            raise ValueError(f"attention full_blocks {bad} are not blocks of this {depth}-block backbone (0-{depth - 1})")
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(patch_size, embed_dim, self.patch_padding)
        # Stored with one extra slot (the official layout keeps the cls slot); used as
        # pos_embed[:, 1:] + pos_embed[:, :1], so the cls slot is a learned offset shared by all patches.
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim))
        # CLIP-style ViTs (timm `pre_norm=True`) normalise the embedded tokens before the first block; a
        # LayerNorm cannot be folded into the patch conv, so such a backbone carries it (timm's name).
        self.norm_pre: nn.Module = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS) if pre_norm else nn.Identity()
        # Stochastic depth increases linearly over the blocks, as in the official code. Plain Python (not
        # torch.linspace) so the model can also be built on the meta device.
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, self.mlp_hidden, drop_path=dpr[i],
                   layout=self.attention.layout(i, self.grid_size), moe=moe) for i in range(depth)]
        )
        self.last_norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self.knowledge_tokens: KnowledgeTokens | None = None
        self.init_weights()

    def init_weights(self) -> None:
        """ViT initialisation (truncated normal linears and pos_embed). Callable again after construction:
        under ``deepspeed.zero.Init`` the submodules are already partitioned when ``__init__`` ends."""
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_vit_weights)

    # ---- activation checkpointing -------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (torch.utils.checkpoint, non-reentrant)."""
        self.grad_checkpointing = enable

    # ---- knowledge tokens ---------------------------------------------------------------------------
    @property
    def num_knowledge_tokens(self) -> int:
        return 0 if self.knowledge_tokens is None else self.knowledge_tokens.num_tokens

    def _param_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        w = self.patch_embed.proj.weight
        return w.device, w.dtype

    def set_knowledge_tokens(self, tokens: torch.Tensor, trainable: bool = False,
                             lift: torch.Tensor | None = None) -> KnowledgeTokens:
        """Append the tokens (K, C) (a copy), replacing any present; ``trainable=False`` freezes them (paper
        §3.4 step 2). Tokens of another width need ``lift`` (``fixed_lift``): token learning on a teacher."""
        if tokens.dim() == 3 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.dim() != 2:
            raise ValueError(f"knowledge tokens must have shape (K, C), got {tuple(tokens.shape)}")
        width = self.embed_dim if lift is None else lift.shape[1]
        if tokens.shape[1] != width or (lift is not None and lift.shape[0] != self.embed_dim):
            raise ValueError(
                f"knowledge tokens of width {tokens.shape[1]} do not fit this backbone (width {self.embed_dim}"
                + ("" if lift is None else f", lift {tuple(lift.shape)}") + "): a student takes tokens learned "
                "in its own width (vitpose.distill.tokens learns them so)"
            )
        device, dtype = self._param_device_dtype()
        self.knowledge_tokens = KnowledgeTokens(tokens.to(device, dtype),
                                                None if lift is None else lift.to(device, dtype))
        self.knowledge_tokens.tokens.requires_grad_(trainable)
        return self.knowledge_tokens

    def add_knowledge_tokens(self, num_tokens: int, seed: int = 0) -> KnowledgeTokens:
        """Append ``num_tokens`` trainable tokens at their seeded initialisation (``initial_knowledge_tokens``)."""
        return self.set_knowledge_tokens(initial_knowledge_tokens(num_tokens, self.embed_dim, seed), trainable=True)

    def knowledge_token_params(self) -> list[nn.Parameter]:
        """Parameters of the knowledge tokens (the tokens alone; a lift is a buffer); empty without tokens."""
        return [] if self.knowledge_tokens is None else list(self.knowledge_tokens.parameters())

    # ---- forward ------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, dataset_index: int | torch.Tensor | None = None) -> torch.Tensor:
        """Feature map of ``images``; ``dataset_index`` picks the ViTPose+ expert(s) (moe.py), if any."""
        x = self.patch_embed(images)  # (B, C, Hp, Wp)
        b, c, hp, wp = x.shape
        if (hp, wp) != self.grid_size:
            raise ValueError(
                f"input {tuple(images.shape[-2:])} gives a {hp}x{wp} token grid, but this backbone was built for "
                f"img_size {self.img_size} ({self.grid_size[0]}x{self.grid_size[1]} tokens); build the model with "
                f"img_size={tuple(images.shape[-2:])} (load_checkpoint resizes pos_embed)"
            )
        # (B, N, C), a view of the channels-last conv output; contiguous() is a no-op then and makes sure
        # the residual stream is token-major (a transposed stream would make every LayerNorm copy it).
        x = x.flatten(2).transpose(1, 2).contiguous()
        x = self.norm_pre(x + (self.pos_embed[:, 1:] + self.pos_embed[:, :1]))
        if self.knowledge_tokens is not None:
            # Appended after the position embedding: the tokens have no position, they attend with all
            # patches in every block and are dropped before the decoder.
            kt = self.knowledge_tokens().to(x.dtype)  # (K, C)
            x = torch.cat([x, kt.unsqueeze(0).expand(b, -1, -1)], dim=1)  # (B, N + K, C)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, dataset_index, use_reentrant=False)
            else:
                x = blk(x, dataset_index)
        x = self.last_norm(x[:, : hp * wp])  # (B, N, C): knowledge tokens never reach the heatmaps
        # (B, C, Hp, Wp) as a channels-last view of the tokens: no copy, and the decoder's convolutions
        # run channels-last.
        return x.reshape(b, hp, wp, c).permute(0, 3, 1, 2)

    # ---- cost ---------------------------------------------------------------------------------------
    def flops(self, batch: int = 1) -> int:
        """Forward multiply-accumulates of the patch conv, all linears and the attention matmuls.

        One MAC counts as one FLOP (the convention of the ViTPose paper's "GFLOPs"); biases, norms,
        softmax, GELU and residual adds are not counted. ViT-B at 256x192 gives 17.10 G, the paper's 17.1.
        Window attention counts the matmuls it computes (padded windows included).
        """
        n = self.num_patches
        t = n + self.num_knowledge_tokens
        c, hidden = self.embed_dim, self.mlp_hidden
        patch = n * c * 3 * self.patch_size**2
        linears = t * (3 * c * c + c * c + 2 * c * hidden)  # qkv, proj, fc1, fc2
        attention = sum(self._attention_cost(blk)[0] for blk in self.blocks)
        return batch * (patch + self.depth * linears + attention)

    def attention_map_bytes(self, batch: int = 1, bytes_per_element: int = 4) -> int:
        """Bytes of the softmax probabilities of all blocks: what an explicit attention (the official code's,
        and ours for bf16 on CPUs) keeps for the backward pass. Fused kernels keep O(tokens) instead."""
        return batch * bytes_per_element * sum(self._attention_cost(blk)[1] for blk in self.blocks)

    def _attention_cost(self, blk: nn.Module) -> tuple[int, int]:
        return attention_cost(blk.attn.layout, self.num_patches, self.num_knowledge_tokens, self.embed_dim,
                              self.num_heads)


def _check_grid(n: int, grid: tuple[int, int]) -> None:
    if grid[0] * grid[1] != n:
        raise ValueError(f"grid {grid} does not hold {n} tokens")


def resize_pos_embed(
    pos_embed: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int], antialias: bool = False
) -> torch.Tensor:
    """Resample a (1, 1 + N, C) position embedding to another token grid, keeping the first (cls) slot.

    timm's ``resample_abs_pos_embed`` (bicubic) for every load path. ``antialias=False`` (ViTPose files, ours
    and official) is mmpose's own resize (F.interpolate bicubic), so a checkpoint run at another size gets the
    embeddings the official code would give it; pre-trained timm/MAE files pass True, timm's default for them.
    """
    _check_grid(pos_embed.shape[1] - 1, src_grid)
    grid = resample_abs_pos_embed(pos_embed[:, 1:].float(), new_size=list(dst_grid), old_size=list(src_grid),
                                  num_prefix_tokens=0, antialias=antialias)
    return torch.cat([pos_embed[:, :1], grid.to(pos_embed.dtype)], dim=1)


def guess_grid(num_tokens: int, aspect: float = 4 / 3) -> tuple[int, int]:
    """The (h, w) factorisation of `num_tokens` whose h/w is closest to `aspect` (pose crops are 4:3)."""
    pairs = [(h, num_tokens // h) for h in range(1, num_tokens + 1) if num_tokens % h == 0]
    return min(pairs, key=lambda hw: abs(math.log(hw[0] / hw[1]) - math.log(aspect)))
