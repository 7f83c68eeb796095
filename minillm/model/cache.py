"""Key/value cache for incremental decoding.

One ``KVCache`` serves the whole model for one batch. It keeps K and V per layer at ``n_kv_heads``
(GQA/MQA cache only their shared heads) and holds what every layer needs for the current step: the
absolute ``positions`` of the new tokens (B, Tq), and per key layout an ``AttentionMask`` (see
``mask.py``) of the keys each query may see; without padding these are (Tq,) and a plain causal
mask, which builds no tensor (the kernels' cheapest path). Prompts of different lengths are
left-padded: ``pad`` (B,) counts the padding of each row, which is masked out and shifts its
positions, so a row's first real token sits at position 0.

A global layer preallocates ``max_len`` slots. A windowed layer (``attn.window = W`` below
``max_len``) keeps only its last W keys in a ring buffer of W slots (Mistral's rolling buffer), so
decoding memory is bounded by W, not by the generated length. Its ``update`` returns the ring's
last W - 1 keys oldest first, then the new ones, so the queries are still the last Tq of the Tk
keys (a relative bias such as ALiBi holds) and its mask is the same rule with ``k_start`` the
absolute index of the oldest returned key. Positions (RoPE) stay absolute: keys are rotated before
they are stored.

Protocol per model call (``Transformer.forward`` does it): ``cache.begin(t)`` for ``t`` new tokens;
each attention layer calls ``cache.layer(i).update(k, v)`` and reads ``cache.layer(i).mask`` (and
restricts it to its window); then ``cache.end(t)``.
"""

import torch
from torch import Tensor

from minillm.model.mask import AttentionMask


class LayerCache:
    """One global layer's view of the shared cache: every key so far."""

    window: int | None = None

    def __init__(self, cache: "KVCache", shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.cache = cache
        self.k = torch.zeros(shape, device=cache.pad.device, dtype=dtype)
        self.v = torch.zeros(shape, device=cache.pad.device, dtype=dtype)

    @property
    def positions(self) -> Tensor:
        return self.cache.positions

    @property
    def mask(self) -> AttentionMask:
        return self.cache.masks[self.window]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new K/V (B, Hkv, Tq, D); return all keys and values so far (B, Hkv, Tk, D)."""
        start, end = self.cache.length, self.cache.length + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class RingCache(LayerCache):
    """A windowed layer's last ``window`` keys and values, in a ring buffer of ``window`` slots."""

    def __init__(self, cache: "KVCache", shape: tuple[int, ...], dtype: torch.dtype,
                 window: int) -> None:
        super().__init__(cache, (*shape[:2], window, shape[3]), dtype)
        self.window = window

    def _slots(self, first: int, n: int) -> list[slice]:
        """Ring slots of absolute indices ``first .. first + n - 1`` (n <= W): one or two slices."""
        start = first % self.window
        if start + n <= self.window:
            return [slice(start, start + n)]
        return [slice(start, self.window), slice(0, start + n - self.window)]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new K/V; return the ring's last W - 1 keys, oldest first, then the new ones."""
        length, t = self.cache.length, k.shape[2]
        old = self._slots(length - self.cache.ring_kept(self.window), self.cache.ring_kept(self.window))
        keys = torch.cat([self.k[:, :, s] for s in old] + [k], dim=2)  # (B, Hkv, n_old + Tq, D)
        values = torch.cat([self.v[:, :, s] for s in old] + [v], dim=2)
        n_new = min(t, self.window)  # only the last W new tokens are ever read again
        done = 0
        for s in self._slots(length + t - n_new, n_new):
            width = s.stop - s.start
            self.k[:, :, s] = k[:, :, t - n_new + done:t - n_new + done + width]
            self.v[:, :, s] = v[:, :, t - n_new + done:t - n_new + done + width]
            done += width
        return keys, values


class KVCache:
    """Per-layer K/V for ``max_len`` tokens (windowed layers: their last W), left-padding aware."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 pad: Tensor | None = None, windows: list[int | None] | None = None) -> None:
        self.max_len, self.length = max_len, 0
        self.pad = torch.zeros(batch, dtype=torch.long, device=device) if pad is None else pad.to(device)
        windows = [None] * n_layers if windows is None else windows
        if len(windows) != n_layers:
            raise ValueError(f"KVCache: {len(windows)} windows for {n_layers} layers")
        shape = (batch, n_kv_heads, max_len, head_dim)
        # a window as long as the cache never hides a key: such a layer keeps a plain buffer
        self.layers = [LayerCache(self, shape, dtype) if w is None or w >= max_len
                       else RingCache(self, shape, dtype, w) for w in windows]
        self.padded = bool(self.pad.any())  # decided once: unpadded batches need no mask at all
        self.positions: Tensor | None = None
        self.masks: dict[int | None, AttentionMask] = {}

    @classmethod
    def for_model(cls, model, batch: int, max_len: int, pad: Tensor | None = None) -> "KVCache":
        """A cache shaped for ``model``: its K/V heads, dtype, device and each layer's window."""
        attn = model.blocks[0].attn
        p = next(model.parameters())
        windows = [getattr(b.attn, "window", None) for b in model.blocks]
        return cls(len(model.blocks), batch, attn.n_kv_heads, attn.head_dim, max_len, p.device,
                   p.dtype, pad, windows)

    def layer(self, i: int) -> LayerCache:
        return self.layers[i]

    def ring_kept(self, window: int) -> int:
        """Keys a ring of ``window`` slots hands back before the new ones: those still in reach."""
        return min(self.length, window - 1)

    def begin(self, t: int) -> None:
        """Prepare positions and masks for ``t`` new tokens appended after ``self.length``."""
        if self.length + t > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; cannot append {t} to {self.length}")
        q_idx = torch.arange(self.length, self.length + t, device=self.pad.device)  # absolute indices
        pad = self.pad if self.padded else None
        self.positions = q_idx if pad is None else (q_idx[None, :] - pad[:, None]).clamp(min=0)  # (B, Tq)
        self.masks = {None: AttentionMask(t, self.length + t, pad=pad)}
        for w in {layer.window for layer in self.layers if layer.window is not None}:
            kept = self.ring_kept(w)
            self.masks[w] = AttentionMask(t, kept + t, k_start=self.length - kept, pad=pad)

    def end(self, t: int) -> None:
        self.length += t
