"""Causal self-attention: MHA, GQA and MQA through ``n_kv_heads``; kernels picked at construction.

Contract of the ``model/attention`` group: ``Attention(d_model=..., n_heads=..., **yaml_options)``
maps (B, T, C) -> (B, T, C). ``forward(x, position, cache)`` takes the model's shared position
scheme (see ``position.py``) and, when decoding, a per-layer KV cache (see ``cache.py``).

Every kernel has the signature ``kernel(q, k, v, position, mask) -> (y, weights | None)`` with
q (B, H, Tq, D), k and v (B, Hkv, Tk, D) kept at ``n_kv_heads`` (Ainslie et al. 2023, GQA;
Shazeer 2019, MQA), and ``mask`` either ``None`` (plain causal, Tq == Tk) or a boolean
(B, 1, Tq, Tk) of allowed keys. Head h reads K/V head ``h // (H / Hkv)``.

Notation: B batch, T time, C d_model, H query heads, Hkv key/value heads, G = H / Hkv, D head_dim.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm.model.position import PositionEncoding


def _bias_and_mask(position: PositionEncoding, mask: Tensor | None, t_q: int, t_k: int,
                   device: torch.device, dtype: torch.dtype) -> Tensor:
    """Additive float mask (B|1, H|1, Tq, Tk): the scheme's score bias plus -inf where masked."""
    if mask is None:
        mask = torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(t_k - t_q)
    bias = position.score_bias(t_q, t_k)
    bias = torch.zeros((), device=device) if bias is None else bias.to(device)
    return bias.to(dtype).masked_fill(~mask, float("-inf"))


def math_attention(q: Tensor, k: Tensor, v: Tensor, position: PositionEncoding,
                   mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Explicit softmax(QK^T / sqrt(D) + bias) V; returns the attention weights too."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    qg = q.view(B, Hkv, H // Hkv, Tq, D)  # group query heads over their shared K/V head
    scores = (qg @ k.unsqueeze(2).transpose(-2, -1)).view(B, H, Tq, Tk) / math.sqrt(D)
    scores = scores + _bias_and_mask(position, mask, Tq, Tk, q.device, scores.dtype)
    weights = scores.softmax(dim=-1)  # (B, H, Tq, Tk)
    y = (weights.view(B, Hkv, H // Hkv, Tq, Tk) @ v.unsqueeze(2)).view(B, H, Tq, D)
    return y, weights


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, position: PositionEncoding,
                   mask: Tensor | None) -> tuple[Tensor, None]:
    """``F.scaled_dot_product_attention``: FlashAttention / memory-efficient kernels on GPU."""
    gqa = k.shape[1] != q.shape[1]
    if mask is None and not position.has_score_bias:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa), None
    attn_mask = _bias_and_mask(position, mask, q.shape[2], k.shape[2], q.device, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa), None


KERNELS = {"math": math_attention, "sdpa": sdpa_attention}


class Attention(nn.Module):
    """Multi-head causal self-attention with ``n_kv_heads`` shared key/value heads."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None,
                 backend: str = "sdpa", bias: bool = False) -> None:
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if d_model % n_heads:
            raise ValueError(f"model.n_heads={n_heads} must divide model.d_model={d_model}")
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            valid = [d for d in range(1, n_heads + 1) if n_heads % d == 0]
            raise ValueError(f"model.attention.n_kv_heads={n_kv_heads} must divide "
                             f"model.n_heads={n_heads}; valid: {valid}")
        if backend not in KERNELS:
            raise ValueError(f"model.attention.backend={backend!r} is not one of {sorted(KERNELS)}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d_model // n_heads
        self.backend, self.kernel = backend, KERNELS[backend]
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.record_weights = False  # set True (math backend) to keep ``attn_weights``
        self.attn_weights: Tensor | None = None

    def forward(self, x: Tensor, position: PositionEncoding, cache=None) -> Tensor:
        B, T, C = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        positions, mask = (None, None) if cache is None else (cache.positions, cache.mask)
        q, k = position.rotate(q, k, positions)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, Hkv, Tk, D)
        y, weights = self.kernel(q, k, v, position, mask)
        if self.record_weights:
            self.attn_weights = weights
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)
