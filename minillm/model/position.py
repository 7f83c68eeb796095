"""Position encodings behind one interface.

Contract of the ``model/position`` group. The model builds one instance as
``Scheme(d_model=..., n_heads=..., max_seq_len=..., **yaml_options)`` and every attention layer
calls the same instance. A scheme answers three questions and overrides only what it changes:

* ``embed(x, positions)``: add something to the token embeddings (absolute schemes);
* ``rotate(q, k, positions)``: rotate queries and keys (RoPE);
* ``score_bias(t_q, t_k)``: an additive bias on the attention scores, shape (H, Tq, Tk) (ALiBi);
  ``score_mod(t_q, t_k)`` returns the same bias as a ``flex_attention`` score modification and
  ``slopes`` (a buffer, ALiBi only) as flash-attn's ``alibi_slopes``, for kernels that never
  materialise it. ``has_score_bias`` says whether these exist.

``positions`` is ``None`` for a plain training batch (positions ``0..T-1``) or a LongTensor of
shape (T,) or (B, T) of absolute positions (KV-cache decoding, left-padded batches), each below the
length last passed to ``reserve(n)`` (at least ``max_seq_len``): the model calls it with its cache's
length, so schemes with tables index them per step instead of recomputing them in every layer.
Queries are always the last Tq of the Tk keys, so a relative bias needs only ``t_q`` and ``t_k``.

``max_len`` is the longest sequence a scheme can encode (``None``: no limit).

Notation: B batch, T time, C d_model, H heads, D head_dim.
"""

import math
from typing import Callable

import torch
from torch import Tensor, nn


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


def _positions(positions: Tensor | None, t: int, device: torch.device) -> Tensor:
    return torch.arange(t, device=device) if positions is None else positions


class PositionEncoding(nn.Module):
    """No position information at all (NoPE): every hook is the identity."""

    max_len: int | None = None
    has_score_bias = False  # True when ``score_bias`` returns a tensor

    def __init__(self, d_model: int, n_heads: int, max_seq_len: int) -> None:
        super().__init__()
        self.d_model, self.n_heads, self.max_seq_len = d_model, n_heads, max_seq_len

    def embed(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        return x

    def rotate(self, q: Tensor, k: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return q, k

    def reserve(self, n: int) -> None:
        """Get ready for ``positions`` up to ``n - 1`` (no-op for schemes without tables)."""

    def score_bias(self, t_q: int, t_k: int) -> Tensor | None:
        return None

    def score_mod(self, t_q: int, t_k: int) -> Callable | None:
        """``flex_attention`` score modification equal to ``score_bias(t_q, t_k)`` (None: no bias)."""
        return None


NoPosition = PositionEncoding


def sinusoid_table(positions: Tensor, d_model: int) -> Tensor:
    """Vaswani et al. 2017: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...)."""
    inv_freq = 10000.0 ** (-torch.arange(0, d_model, 2, device=positions.device).float() / d_model)
    angles = positions.float()[..., None] * inv_freq  # (..., C/2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (..., C) interleaved


class Sinusoidal(PositionEncoding):
    """Fixed sinusoidal absolute positions added to the embeddings (Vaswani et al. 2017).

    ``scale`` multiplies the table. Its entries have magnitude 1 while token embeddings start at
    std 0.02 (GPT-2 init), so an unscaled table drowns the tokens and the model barely learns
    (measured: 2.15 bits/byte against 1.40 for RoPE at equal budget); the default 0.02 puts
    positions at the tokens' scale, as Vaswani et al. did the other way round by scaling the
    embeddings up by sqrt(d_model). ``scale: 1.0`` is the bare formula.
    """

    def __init__(self, d_model: int, n_heads: int, max_seq_len: int, scale: float = 0.02) -> None:
        super().__init__(d_model, n_heads, max_seq_len)
        _check(d_model % 2 == 0, f"model.position=sinusoidal needs an even model.d_model, got {d_model}")
        _check(scale > 0, f"model.position.scale={scale} must be > 0")
        self.scale = scale
        table = scale * sinusoid_table(torch.arange(max_seq_len), d_model)
        self.register_buffer("table", table, persistent=False)

    def embed(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        t = x.shape[1]
        if positions is None and t <= self.table.shape[0]:
            return x + self.table[:t].to(x.dtype)
        pe = self.scale * sinusoid_table(_positions(positions, t, x.device), self.d_model)  # past the table
        return x + pe.to(x.dtype)


class Learned(PositionEncoding):
    """A learned table of absolute position embeddings (GPT-2); cannot go past ``max_seq_len``."""

    def __init__(self, d_model: int, n_heads: int, max_seq_len: int) -> None:
        super().__init__(d_model, n_heads, max_seq_len)
        self.max_len = max_seq_len
        self.table = nn.Embedding(max_seq_len, d_model)
        nn.init.normal_(self.table.weight, std=0.02)

    def embed(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        t = x.shape[1]
        if positions is None:
            _check(t <= self.max_len, f"sequence length {t} exceeds the learned position table "
                   f"(model.max_seq_len={self.max_len}); use a shorter input or another model.position")
            return x + self.table.weight[:t]
        return x + self.table(positions)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RoPE(PositionEncoding):
    """Rotary embeddings (Su et al. 2021) in the halves layout of Hugging Face Llama.

    ``scaling`` stretches positions at evaluation time past the training length:
    ``linear`` (position interpolation, Chen et al. 2023) divides positions by ``factor``;
    ``ntk`` raises theta by ``factor ** (D / (D - 2))`` (NTK-aware scaling).
    """

    def __init__(self, d_model: int, n_heads: int, max_seq_len: int, theta: float = 10000.0,
                 scaling: str = "none", factor: float = 1.0) -> None:
        super().__init__(d_model, n_heads, max_seq_len)
        head_dim = d_model // n_heads
        _check(head_dim % 2 == 0, f"model.position=rope needs an even head dimension "
               f"(model.d_model / model.n_heads), got {d_model}/{n_heads}={head_dim}")
        _check(scaling in ("none", "linear", "ntk"),
               f"model.position.scaling={scaling!r} is not one of 'none', 'linear', 'ntk'")
        _check(factor >= 1.0, f"model.position.factor={factor} must be >= 1")
        if scaling == "ntk":
            theta = theta * factor ** (head_dim / (head_dim - 2))
        self.head_dim, self.theta = head_dim, theta
        self.pos_scale = 1.0 / factor if scaling == "linear" else 1.0
        inv_freq = theta ** (-torch.arange(0, head_dim, 2).float() / head_dim)
        self.register_buffer("inv_freq", torch.cat((inv_freq, inv_freq)), persistent=False)  # (D,)
        # rotate_half(x) * sin == roll(x, D/2) * (sin with its first half negated), exactly; one op
        # per tensor instead of three matters in KV-cache decoding, where each op is tiny
        self.register_buffer("sign", torch.cat((-torch.ones(head_dim // 2), torch.ones(head_dim // 2))),
                             persistent=False)
        cos, sin = self._cos_sin(torch.arange(max_seq_len))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)  # signed, see above

    def _cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and signed sin (..., D) of the angles in the halves layout."""
        p = positions.float()
        if self.pos_scale != 1.0:
            p = p * self.pos_scale
        angles = p[..., None] * self.inv_freq  # (..., D)
        return angles.cos(), angles.sin() * self.sign

    def reserve(self, n: int) -> None:
        """Extend the cos/sin tables to ``n`` positions (once per longer cache, not per step)."""
        if n > self.cos.shape[0]:
            self.cos, self.sin = self._cos_sin(torch.arange(n, device=self.cos.device))

    def rotate(self, q: Tensor, k: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        t = q.shape[2]  # q, k: (B, H, T, D)
        if positions is not None:  # decoding: a lookup (positions < the reserved length)
            cos, sin = self.cos[positions], self.sin[positions]  # (T, D) or (B, T, D)
            if cos.dim() == 3:
                cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D)
        elif t <= self.cos.shape[0]:
            cos, sin = self.cos[:t], self.sin[:t]  # (T, D)
        else:
            cos, sin = self._cos_sin(torch.arange(t, device=q.device))
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        half = self.head_dim // 2
        return q * cos + q.roll(half, -1) * sin, k * cos + k.roll(half, -1) * sin


def alibi_slopes(n_heads: int) -> list[float]:
    """Head slopes of Press et al. 2021, with the reference code's rule for non-powers of two."""
    def power_of_2(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return power_of_2(n_heads)
    p = 2 ** math.floor(math.log2(n_heads))
    return power_of_2(p) + alibi_slopes(2 * p)[0::2][: n_heads - p]


class ALiBi(PositionEncoding):
    """Attention with linear biases (Press et al. 2021): score += -m_h * (i - j) for key j <= i."""

    has_score_bias = True

    def __init__(self, d_model: int, n_heads: int, max_seq_len: int) -> None:
        super().__init__(d_model, n_heads, max_seq_len)
        self.register_buffer("slopes", torch.tensor(alibi_slopes(n_heads)), persistent=False)

    def score_bias(self, t_q: int, t_k: int) -> Tensor:
        i = torch.arange(t_k - t_q, t_k, device=self.slopes.device)[:, None]
        j = torch.arange(t_k, device=self.slopes.device)[None, :]
        return -self.slopes[:, None, None] * (i - j).clamp(min=0)  # (H, Tq, Tk); masked part is 0

    def score_mod(self, t_q: int, t_k: int) -> Callable:
        """score - m_h * (i - j) with i = q_idx + (Tk - Tq), the query's absolute index."""
        slopes, offset = self.slopes, t_k - t_q

        def alibi(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return score - slopes[h] * (q_idx + offset - kv_idx)

        return alibi
