"""Which keys each query may see: described once here, translated for every attention backend.

An ``AttentionMask`` describes one attention call. Its queries are the last ``t_q`` of its ``t_k``
keys, and its first key sits at absolute index ``k_start`` of its row's token stream: query i is at
q = k_start + t_k - t_q + i and key j at k = k_start + j. Query q of row b may see key k when

    k <= q                                   causal
    q - k < window                           a sliding window of W keys, itself included
                                             (Beltagy et al. 2020; Hugging Face's sliding_window)
    documents[b, q] == documents[b, k]       same document: packed stories do not see each other
                                             (block-causal masking, torchtitan / modded-nanogpt)
    k >= pad[b]  (or k == q)                 left padding is masked; a padding query sees itself,
                                             so no softmax row is empty

Those four rules are ``mask_mod`` functions combined with flex's own ``and_masks``/``or_masks``
(``mask_mod``); every translation evaluates that one function:

* ``dense()``: the boolean (B|1, 1, Tq, Tk) mask of the ``math`` and ``sdpa`` kernels, built once
  per object and window (every layer of a forward shares it). ``is_causal`` says when the mask is
  plain causal, so sdpa takes its ``is_causal=True`` fast path and nothing is built.
* ``block_mask(device)``: a flex ``BlockMask`` (block-sparse: skipped blocks are not computed) with
  ``mask_mod`` applied inside partial blocks; static masks (causal, window) are cached per shape and
  window, document masks built once per object (per batch) and window.
* ``flash_window()``: flash-attn's ``window_size=(W - 1, 0)`` with ``causal=True``, or ``None``
  where flash-attn has no equivalent (documents, padding): that kernel then falls back to sdpa.
* the KV cache (``cache.py``) builds one mask per step and key layout; a windowed layer's ring
  buffer returns its keys oldest first with ``k_start`` the absolute index of the oldest.

A window of at least ``t_k`` keys cannot hide any key, so it is dropped at construction: the
mask stays plain causal (fast paths included) when the sequence is shorter than the window.

Notation: B batch, Tq queries, Tk keys, W window.
"""

import functools

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, and_masks, or_masks

BLOCK = 128  # flex's default sparse block size (both query and key tiles)


class AttentionMask:
    """Causal attention, optionally windowed, per document and left-padded (see module docstring)."""

    def __init__(self, t_q: int, t_k: int | None = None, *, k_start: int = 0,
                 window: int | None = None, documents: Tensor | None = None,
                 pad: Tensor | None = None, _built: dict | None = None) -> None:
        t_k = t_q if t_k is None else t_k
        if documents is not None and (t_q != t_k or documents.dim() != 2 or documents.shape[1] != t_q):
            raise ValueError(f"documents of shape {tuple(documents.shape)}: expected (B, T) document "
                             f"ids of the {t_q} queries, which must also be the keys (no cache)")
        self.t_q, self.t_k, self.k_start = t_q, t_k, k_start
        self.window = window if window is not None and window < t_k else None  # see docstring
        self.documents, self.pad = documents, pad
        self._built = {} if _built is None else _built  # shared with ``windowed`` copies

    @property
    def is_causal(self) -> bool:
        """Plain causal: every earlier key (and the query itself) is visible."""
        return self.window is None and self.documents is None and self.pad is None

    @property
    def batch(self) -> int:
        """Rows the mask differs across: B with documents or padding, else 1 (broadcast)."""
        per_row = self.documents if self.documents is not None else self.pad
        return 1 if per_row is None else per_row.shape[0]

    def windowed(self, window: int | None) -> "AttentionMask":
        """The same mask restricted to a window of ``window`` keys (``None``: unchanged)."""
        if window is None:
            return self
        return AttentionMask(self.t_q, self.t_k, k_start=self.k_start, window=window,
                             documents=self.documents, pad=self.pad, _built=self._built)

    def mask_mod(self):
        """The rule as one flex ``mask_mod(b, h, q_idx, kv_idx)``, indices into q and k."""
        q_start, k_start, window, docs, pad = (self.k_start + self.t_k - self.t_q, self.k_start,
                                               self.window, self.documents, self.pad)

        def causal(b, h, q_idx, kv_idx):
            return kv_idx + k_start <= q_idx + q_start

        def in_window(b, h, q_idx, kv_idx):
            return (q_idx + q_start) - (kv_idx + k_start) < window

        def same_document(b, h, q_idx, kv_idx):
            return docs[b, q_idx] == docs[b, kv_idx]

        def not_padding(b, h, q_idx, kv_idx):
            return kv_idx + k_start >= pad[b]

        def itself(b, h, q_idx, kv_idx):
            return kv_idx + k_start == q_idx + q_start

        rules = [causal] + [rule for rule, on in [(in_window, window is not None),
                                                  (same_document, docs is not None),
                                                  (not_padding, pad is not None)] if on]
        rule = and_masks(*rules) if len(rules) > 1 else causal
        return or_masks(rule, itself) if pad is not None else rule

    def _evaluate(self, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        """``mask_mod`` on the grid of query rows ``q_idx`` x keys ``kv_idx``: (B|1, 1, Tq, Tk)."""
        b = torch.arange(self.batch, device=q_idx.device)[:, None, None, None]
        return self.mask_mod()(b, b.new_zeros(()), q_idx[None, None, :, None],
                               kv_idx[None, None, None, :]).expand(self.batch, 1, -1, -1)

    def dense(self, device: torch.device | str) -> Tensor:
        """Boolean (B|1, 1, Tq, Tk) mask of visible keys, built once per object and window."""
        key = ("dense", self.window, str(device))
        if key not in self._built:
            self._built[key] = self._evaluate(torch.arange(self.t_q, device=device),
                                              torch.arange(self.t_k, device=device))
        return self._built[key]

    def block_mask(self, device: torch.device | str) -> BlockMask:
        """Flex ``BlockMask``: cached per shape and window when static, else once per object."""
        if self.documents is None and self.pad is None:  # depends only on t_q, t_k and window
            return _static_block_mask(self.t_q, self.t_k, self.window, str(device))
        key = ("block", self.window, str(device))
        if key not in self._built:
            self._built[key] = self._sparse_blocks(str(device))
        return self._built[key]

    def _sparse_blocks(self, device: str) -> BlockMask:
        """Flex ``BlockMask`` built one query tile at a time.

        ``create_block_mask`` evaluates the mask_mod on the whole (B, H, Tq, Tk) grid in eager mode
        (a T x T tensor) and compiling it costs 10-60 s of CPU per shape and window; one tile of
        ``BLOCK`` query rows at a time needs (B, BLOCK, Tk) and nothing to compile.
        """
        n_q, n_k = -(-self.t_q // BLOCK), -(-self.t_k // BLOCK)
        kv_idx = torch.arange(n_k * BLOCK, device=device)
        k_ok = kv_idx < self.t_k  # the last tile may stick out past Tk: those keys never count
        partial, full = [], []
        for tile in range(n_q):
            q_idx = torch.arange(tile * BLOCK, (tile + 1) * BLOCK, device=device)
            q_ok = q_idx < self.t_q
            # causal: key tiles past this tile's last query hold nothing visible; skip evaluating them
            reach = min(n_k, -(-(self.t_k - self.t_q + (tile + 1) * BLOCK) // BLOCK))
            seen = self._evaluate(q_idx.clamp(max=self.t_q - 1),
                                  kv_idx[:reach * BLOCK].clamp(max=self.t_k - 1))
            seen = seen & q_ok[:, None] & k_ok[:reach * BLOCK]  # (B, 1, BLOCK, reach * BLOCK)
            count = seen.view(self.batch, 1, BLOCK, reach, BLOCK).sum(dim=(2, 4))  # (B, 1, reach)
            count = torch.nn.functional.pad(count, (0, n_k - reach))  # (B, 1, n_k)
            full.append(count == BLOCK * BLOCK)
            partial.append((count > 0) & (count < BLOCK * BLOCK))
        return BlockMask.from_kv_blocks(*_ordered(torch.stack(partial, 2)),
                                        *_ordered(torch.stack(full, 2)), BLOCK_SIZE=BLOCK,
                                        mask_mod=self.mask_mod(), seq_lengths=(self.t_q, self.t_k))

    def flash_window(self) -> tuple[int, int] | None:
        """flash-attn's ``window_size`` (with ``causal=True``); ``None`` where it has none."""
        if self.documents is not None or self.pad is not None:
            return None
        return (-1, -1) if self.window is None else (self.window - 1, 0)


def _ordered(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """(B, H, n_q, n_k) booleans -> flex's (count, key-block indices listed first) per query tile."""
    count = blocks.sum(-1, dtype=torch.int32)
    order = blocks.to(torch.int8).argsort(dim=-1, descending=True, stable=True)
    return count, order.to(torch.int32)


@functools.lru_cache(maxsize=32)
def _static_block_mask(t_q: int, t_k: int, window: int | None, device: str) -> BlockMask:
    """Causal (and windowed) ``BlockMask``, the queries the last Tq of Tk keys, cached per shape."""
    return AttentionMask(t_q, t_k, window=window)._sparse_blocks(device)
