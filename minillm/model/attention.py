"""Causal self-attention: MHA, GQA and MQA through ``n_kv_heads``; kernels picked at construction.

Contract of the ``model/attention`` group: ``Attention(d_model=..., n_heads=..., **yaml_options)``
maps (B, T, C) -> (B, T, C). ``forward(x, position, cache)`` takes the model's shared position
scheme (see ``position.py``) and, when decoding, a per-layer KV cache (see ``cache.py``).
``residual_out()`` names the weights that write into the residual stream (for ``model.init``).
With ``qk_norm`` the module owns two RMSNorms over D (``q_norm``, ``k_norm``; Qwen3, OLMo 2,
modded-nanogpt), applied to q and k per head before the rotation, as Qwen3 does.

Every kernel has the signature ``kernel(q, k, v, position, mask) -> (y, weights | None)`` with
q (B, H, Tq, D), k and v (B, Hkv, Tk, D) kept at ``n_kv_heads`` (Ainslie et al. 2023, GQA;
Shazeer 2019, MQA), and ``mask`` either ``None`` (plain causal, the queries being the last Tq of
the Tk keys) or a boolean (B, 1, Tq, Tk) of allowed keys. Head h reads K/V head ``h // (H / Hkv)``.

Backends (``backend=``, chosen at construction):

* ``math``: explicit softmax(QK^T / sqrt(D) + bias) V; the reference, and the only one that returns
  the attention weights.
* ``sdpa`` (default): ``F.scaled_dot_product_attention`` with ``enable_gqa``. A scheme with a score
  bias (ALiBi) is passed as a materialised (H, Tq, Tk) additive mask.
* ``flex``: ``flex_attention`` compiled once per process; causality is a cached ``BlockMask`` and the
  scheme's bias a ``score_mod``, so no T x T tensor exists. It falls back to ``sdpa`` (same result)
  for KV-cache decoding steps and left-padded batches (Tq < Tk or a mask: a few query rows, and a
  new shape every step that would recompile flex) and, in torch 2.13, for CPU calls that need a
  backward pass, which flex does not implement on CPU.
* ``flash_attn``: the ``flash-attn`` package (CUDA, fp16/bf16), which takes ALiBi slopes and
  grouped K/V natively; falls back to ``sdpa`` for masked calls and for float32 inputs.

Notation: B batch, T time, C d_model, H query heads, Hkv key/value heads, G = H / Hkv, D head_dim.
"""

import functools
import importlib.util
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm.model.norm import RMSNorm
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
    gqa, t_q, t_k = k.shape[1] != q.shape[1], q.shape[2], k.shape[2]
    if mask is None and not position.has_score_bias and t_q in (1, t_k):
        # one query (a decoding step) sees every key; Tq == Tk is sdpa's own causal alignment.
        # Two calls, not is_causal=t_q > 1: under torch.compile with dynamic shapes that is a SymBool
        if t_q == 1:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa), None
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa), None
    attn_mask = _bias_and_mask(position, mask, q.shape[2], k.shape[2], q.device, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa), None


@functools.cache
def _compiled_flex():
    """``flex_attention`` compiled once per process (eager flex is a slow reference loop)."""
    from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention
    return torch.compile(torch_flex_attention, dynamic=False)


@functools.lru_cache(maxsize=32)
def _causal_block_mask(t_q: int, t_k: int, device: str):
    """Causal ``BlockMask`` with the queries as the last Tq of Tk keys, cached per shape and device."""
    from torch.nn.attention.flex_attention import create_block_mask
    offset = t_k - t_q

    def causal(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return create_block_mask(causal, None, None, t_q, t_k, device=device)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, position: PositionEncoding,
                   mask: Tensor | None) -> tuple[Tensor, None]:
    """FlexAttention: causal block mask plus the scheme's ``score_mod``, no T x T bias in memory."""
    cpu_backward = q.device.type == "cpu" and torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad)
    if mask is not None or q.shape[2] != k.shape[2] or cpu_backward:  # see the module docstring
        return sdpa_attention(q, k, v, position, mask)
    if q.device.type == "cpu":  # flex on CPU refuses inputs that require grad, even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    t_q, t_k = q.shape[2], k.shape[2]
    from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention
    # inside a compiled model the outer compile traces flex itself; in eager use our compiled copy
    flex = torch_flex_attention if torch.compiler.is_compiling() else _compiled_flex()
    y = flex(q, k, v, score_mod=position.score_mod(t_q, t_k),
                         block_mask=_causal_block_mask(t_q, t_k, str(q.device)),
                         enable_gqa=k.shape[1] != q.shape[1])
    return y, None


def flash_attn_attention(q: Tensor, k: Tensor, v: Tensor, position: PositionEncoding,
                         mask: Tensor | None) -> tuple[Tensor, None]:
    """The ``flash-attn`` package: ALiBi slopes and grouped K/V handled inside the kernel."""
    slopes = getattr(position, "slopes", None)
    if (mask is not None or q.dtype not in (torch.float16, torch.bfloat16)
            or (position.has_score_bias and slopes is None)):
        return sdpa_attention(q, k, v, position, mask)
    from flash_attn import flash_attn_func
    y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                        alibi_slopes=slopes.float() if position.has_score_bias else None)  # (B, T, H, D)
    return y.transpose(1, 2), None  # (B, H, T, D)


def _flash_attn_missing() -> str | None:
    """What ``backend=flash_attn`` lacks on this machine, or ``None``."""
    missing = [what for what, ok in [
        ("the flash-attn package (pip install flash-attn)", importlib.util.find_spec("flash_attn")),
        ("a CUDA device", torch.cuda.is_available())] if not ok]
    return " and ".join(missing) or None


KERNELS = {"math": math_attention, "sdpa": sdpa_attention, "flex": flex_attention,
           "flash_attn": flash_attn_attention}


class Attention(nn.Module):
    """Multi-head causal self-attention with ``n_kv_heads`` shared key/value heads."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None,
                 backend: str = "sdpa", bias: bool = False, qk_norm: bool = False,
                 qk_norm_eps: float = 1e-5) -> None:
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
        if backend == "flash_attn" and (missing := _flash_attn_missing()):
            valid = sorted(set(KERNELS) - {"flash_attn"})
            raise ValueError(f"model.attention.backend='flash_attn' needs {missing}; "
                             f"use one of {valid}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d_model // n_heads
        self.backend, self.kernel = backend, KERNELS[backend]
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.qk_norm, self.qk_norm_eps = qk_norm_options(qk_norm, qk_norm_eps)
        norm = (lambda: RMSNorm(self.head_dim, qk_norm_eps)) if qk_norm else nn.Identity
        self.q_norm, self.k_norm = norm(), norm()  # over D, per head; own scales in every layer
        self.record_weights = False  # set True (math backend) to keep ``attn_weights``
        self.attn_weights: Tensor | None = None

    def forward(self, x: Tensor, position: PositionEncoding, cache=None) -> Tensor:
        B, T, C = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)  # QK-norm (identity when off), before the rotation
        positions, mask = (None, None) if cache is None else (cache.positions, cache.mask)
        q, k = position.rotate(q, k, positions)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, Hkv, Tk, D)
        y, weights = self.kernel(q, k, v, position, mask)
        if self.record_weights:
            self.attn_weights = weights
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)

    def residual_out(self) -> list[Tensor]:
        """The output projection, which writes into the residual stream."""
        return [self.proj.weight]


def qk_norm_options(qk_norm: bool, eps: float) -> tuple[bool, float]:
    """``model.attention.qk_norm`` (a bool) and ``qk_norm_eps`` (> 0), checked."""
    if not isinstance(qk_norm, bool):
        raise ValueError(f"model.attention.qk_norm={qk_norm!r} must be true or false")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"model.attention.qk_norm_eps={eps!r} must be a number > 0")
    return qk_norm, float(eps)
