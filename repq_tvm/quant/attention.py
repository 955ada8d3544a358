"""Attention with both matmuls explicit and quantized, replacing timm's (possibly fused) attention.

timm's `Attention` / `WindowAttention` may call `scaled_dot_product_attention`, which would hide both
matmuls from the quantizers. These modules compute the same function step by step:
`attn = Q(q) @ Q(k)ᵀ · scale (+ bias/mask)`, `softmax`, `out = Qlog(attn) @ Q(v)`. The softmax scale
is applied after `q @ kᵀ` so the integer matmul sees the unscaled quantized q.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import QuantMatMul


class QuantAttention(nn.Module):
    """timm `Attention` (ViT / DeiT)."""

    def __init__(self, attn: nn.Module, matmul_qk: QuantMatMul, matmul_av: QuantMatMul):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.attn_dim = attn.num_heads * attn.head_dim
        self.qkv, self.q_norm, self.k_norm, self.norm, self.proj = attn.qkv, attn.q_norm, attn.k_norm, attn.norm, attn.proj
        self.matmul_qk, self.matmul_av = matmul_qk, matmul_av

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("masked attention is not supported")
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.matmul_qk(q, k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = self.matmul_av(attn, v)
        x = x.transpose(1, 2).reshape(b, n, self.attn_dim)
        return self.proj(self.norm(x))


class QuantWindowAttention(nn.Module):
    """timm Swin `WindowAttention`: relative position bias and the shifted-window mask."""

    def __init__(self, attn: nn.Module, matmul_qk: QuantMatMul, matmul_av: QuantMatMul):
        super().__init__()
        self.num_heads, self.scale, self.window_area = attn.num_heads, attn.scale, attn.window_area
        self.qkv, self.proj = attn.qkv, attn.proj
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        self.matmul_qk, self.matmul_av = matmul_qk, matmul_av

    def rel_pos_bias(self) -> torch.Tensor:
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = self.matmul_qk(q, k.transpose(-2, -1)) * self.scale + self.rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = attn.softmax(dim=-1)
        x = self.matmul_av(attn, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, -1))
