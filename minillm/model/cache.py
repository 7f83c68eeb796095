"""Key/value cache for incremental decoding.

One ``KVCache`` serves the whole model for one batch. It preallocates K and V per layer at
``n_kv_heads`` (GQA/MQA cache only their shared heads) and holds what every layer needs for the
current step: the absolute ``positions`` of the new tokens (B, Tq) and the boolean ``mask``
(B, 1, Tq, Tk) of keys each query may see; without padding these are (Tq,) and ``None`` (plain
causal, the kernels' cheapest path). Prompts of different lengths are left-padded:
``pad`` (B,) counts the padding of each row, which is masked out and shifts its positions, so a
row's first real token sits at position 0.

Protocol per model call (``Transformer.forward`` does it): ``cache.begin(t)`` for ``t`` new tokens,
each attention layer calls ``cache.layer(i).update(k, v)``, then ``cache.end(t)``.
"""

import torch
from torch import Tensor


class LayerCache:
    """One layer's view of the shared cache."""

    def __init__(self, cache: "KVCache", k: Tensor, v: Tensor) -> None:
        self.cache, self.k, self.v = cache, k, v

    @property
    def positions(self) -> Tensor:
        return self.cache.positions

    @property
    def mask(self) -> Tensor:
        return self.cache.mask

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new K/V (B, Hkv, Tq, D); return all keys and values so far (B, Hkv, Tk, D)."""
        start, end = self.cache.length, self.cache.length + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Preallocated per-layer K/V for ``max_len`` tokens, with left-padding-aware positions."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 pad: Tensor | None = None) -> None:
        self.max_len, self.length = max_len, 0
        self.pad = torch.zeros(batch, dtype=torch.long, device=device) if pad is None else pad.to(device)
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.layers = [LayerCache(self, torch.zeros(shape, device=device, dtype=dtype),
                                  torch.zeros(shape, device=device, dtype=dtype))
                       for _ in range(n_layers)]
        self.padded = bool(self.pad.any())  # decided once: unpadded batches need no mask at all
        self.positions: Tensor | None = None
        self.mask: Tensor | None = None

    @classmethod
    def for_model(cls, model, batch: int, max_len: int, pad: Tensor | None = None) -> "KVCache":
        attn = model.blocks[0].attn
        p = next(model.parameters())
        return cls(len(model.blocks), batch, attn.n_kv_heads, attn.head_dim, max_len, p.device,
                   p.dtype, pad)

    def layer(self, i: int) -> LayerCache:
        return self.layers[i]

    def begin(self, t: int) -> None:
        """Prepare positions and mask for ``t`` new tokens appended after ``self.length``."""
        if self.length + t > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; cannot append {t} to {self.length}")
        device = self.pad.device
        q_idx = torch.arange(self.length, self.length + t, device=device)  # buffer slots
        if not self.padded:  # slots are positions; mask None = causal, queries the last t keys
            self.positions, self.mask = q_idx, None
            return
        k_idx = torch.arange(self.length + t, device=device)
        self.positions = (q_idx[None, :] - self.pad[:, None]).clamp(min=0)  # (B, Tq)
        causal = k_idx[None, :] <= q_idx[:, None]  # (Tq, Tk)
        real = k_idx[None, :] >= self.pad[:, None]  # (B, Tk) not padding
        own = k_idx[None, :] == q_idx[:, None]  # a padding query sees itself: no empty softmax row
        self.mask = ((causal[None] & real[:, None, :]) | own)[:, None]  # (B, 1, Tq, Tk)

    def end(self, t: int) -> None:
        self.length += t
