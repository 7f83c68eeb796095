"""The decoder-only transformer, assembled from pluggable parts.

``Transformer`` receives its parts as factories (Hydra ``_partial_`` configs or plain callables) and
fills in the shared sizes itself, so component YAML files never repeat them:

    attention(d_model=C, n_heads=H)              -> nn.Module   (attention.py)
    position(d_model=C, n_heads=H, max_seq_len=L) -> PositionEncoding (position.py)
    ffn(d_model=C)                               -> nn.Module   (ffn.py, moe.py)
    norm(C)                                      -> nn.Module   (torch.nn.LayerNorm / RMSNorm)

Init contract (``model.init``): every attention and FFN module lists the weights that write into the
residual stream in ``residual_out()`` (its output projections); the model draws every matrix from
N(0, init_std) and then gives exactly those std / sqrt(2 * n_layers) (``gpt2``, GPT-2's scaled init)
or zero (``zero_proj``: each block starts as the identity; modded-nanogpt). A new part gets the
residual init by declaring ``residual_out()``; the transformer never guesses from parameter names.

Notation: B batch, T time, C d_model, V vocab_size, L max_seq_len.
"""

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm.model.position import PositionEncoding


def token_cross_entropy(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy of logits (B, T, V) against targets (B, T), in fp32; targets of
    -100 are ignored. Training, ``eval.py mode=loss`` and ``mode=extrapolate`` all score with it."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)


class LossOutput(NamedTuple):
    """The training forward's result: the language-model loss and the weighted auxiliary losses
    of the same forward (name -> mean over the layers that have one; empty for a dense model)."""

    loss: Tensor
    aux: dict[str, Tensor]


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, d_model: int, attention: nn.Module, ffn: nn.Module, norm: Callable,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.attn_norm, self.attn = norm(d_model), attention
        self.ffn_norm, self.ffn = norm(d_model), ffn
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, position: PositionEncoding, cache=None) -> Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), position, cache))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


INITS = ("gpt2", "zero_proj")


def residual_out(part: nn.Module, group: str) -> list[Tensor]:
    """The weights ``part`` writes into the residual stream with (see the init contract above)."""
    if not callable(getattr(part, "residual_out", None)):
        raise ValueError(f"model.{group} is {type(part).__name__}, which has no residual_out(): "
                         "declare the weights that write into the residual stream (init contract)")
    return list(part.residual_out())


class SoftCap(nn.Module):
    """Logit soft-capping ``cap * tanh(logits / cap)`` (Gemma 2; modded-nanogpt uses 15-30).

    Smoothly bounds the logits to (-cap, cap) while leaving small ones almost unchanged.
    """

    def __init__(self, cap: float) -> None:
        super().__init__()
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
            raise ValueError(f"model.logit_softcap={cap!r} must be a number > 0 (or null for none)")
        self.cap = float(cap)

    def forward(self, logits: Tensor) -> Tensor:
        return self.cap * torch.tanh(logits / self.cap)


class Transformer(nn.Module):
    """Token embedding, ``n_layers`` blocks, final norm and a (tied) language-model head."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, max_seq_len: int,
                 attention: Callable, position: Callable, ffn: Callable, norm: Callable,
                 tie_embeddings: bool = True, dropout: float = 0.0, init_std: float = 0.02,
                 vocab_multiple: int = 64, init: str = "gpt2",
                 logit_softcap: float | None = None) -> None:
        super().__init__()
        for key, value in [("vocab_size", vocab_size), ("d_model", d_model), ("n_layers", n_layers),
                           ("n_heads", n_heads), ("max_seq_len", max_seq_len),
                           ("vocab_multiple", vocab_multiple)]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{key}={value!r} must be a positive integer")
        if d_model % n_heads:
            valid = [h for h in range(1, d_model + 1) if d_model % h == 0 and h <= 64]
            raise ValueError(f"model.n_heads={n_heads} must divide model.d_model={d_model}; "
                             f"valid head counts: {valid}")
        if init not in INITS:
            raise ValueError(f"model.init={init!r} is not one of {list(INITS)}")
        self.vocab_size, self.max_seq_len, self.n_layers = vocab_size, max_seq_len, n_layers
        self.init, self.logit_softcap = init, logit_softcap
        self.softcap = SoftCap(logit_softcap) if logit_softcap is not None else nn.Identity()
        # Embedding rows padded to a multiple of ``vocab_multiple`` keep matmuls on fast tile sizes
        # (nanoGPT measured ~25% on GPT-2's 50257); logits are cut back to ``vocab_size``.
        padded = -(-vocab_size // vocab_multiple) * vocab_multiple
        self.tok_emb = nn.Embedding(padded, d_model)
        self.position: PositionEncoding = position(d_model=d_model, n_heads=n_heads,
                                                   max_seq_len=max_seq_len)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(d_model, attention(d_model=d_model, n_heads=n_heads), ffn(d_model=d_model), norm,
                  dropout) for _ in range(n_layers))
        self.norm = norm(d_model)
        self.lm_head = nn.Linear(d_model, padded, bias=False)
        self._init_weights(init_std, init)
        if tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def _init_weights(self, std: float, init: str) -> None:
        """N(0, std) for every matrix; the blocks' ``residual_out()`` weights scaled (``gpt2``) or zero.

        Every matrix is drawn in ``named_parameters`` order under both inits, so ``zero_proj`` differs
        from ``gpt2`` only in the zeroed projections, and ``gpt2`` equals the pre-contract init exactly.
        """
        residual = {id(p) for block in self.blocks for p in residual_out(block.attn, "attention")
                    + residual_out(block.ffn, "ffn")}
        for name, p in self.named_parameters():
            if name.startswith("position.") or p.dim() < 2:
                continue
            nn.init.normal_(p, std=std / math.sqrt(2 * self.n_layers) if id(p) in residual else std)
            if init == "zero_proj" and id(p) in residual:
                nn.init.zeros_(p)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: Tensor, cache=None, targets: Tensor | None = None) -> Tensor | LossOutput:
        """Logits (B, T, V) for token ids ``idx`` (B, T); ``cache`` for incremental decoding.

        With ``targets`` (B, T), a ``LossOutput`` instead: the mean next-token cross-entropy (fp32;
        targets of -100 are ignored) and the auxiliary losses this very forward produced, so a
        compiled, DDP or FSDP run reads them from the result, never from a module attribute that
        another forward may have set. Inside the forward, a compiled model fuses the loss with the head:
        the fp32 logits that cross-entropy under bf16 autocast would write (4 bytes x tokens x
        vocabulary, forward and backward) are never held in memory.
        """
        if cache is None:
            x = self.drop(self.position.embed(self.tok_emb(idx)))  # (B, T, C)
            for block in self.blocks:
                x = block(x, self.position)
            logits = self.logits(x)
            if targets is None:
                return logits
            return LossOutput(token_cross_entropy(logits, targets), self._aux_losses())
        if targets is not None:
            raise ValueError("targets with a cache: the loss is for whole windows, not decoding steps")
        cache.begin(idx.shape[1])
        self.position.reserve(cache.max_len)  # a host-side length check; tables grow once
        x = self.position.embed(self.tok_emb(idx), cache.positions)
        for i, block in enumerate(self.blocks):
            x = block(x, self.position, cache.layer(i))
        cache.end(idx.shape[1])
        return self.logits(x)

    def logits(self, x: Tensor) -> Tensor:
        """Final norm, language-model head and soft-capping (if any): (B, T, C) -> (B, T, V)."""
        logits = self.lm_head(self.norm(x))
        logits = logits if logits.shape[-1] == self.vocab_size else logits[..., :self.vocab_size]
        return self.softcap(logits)

    def _aux_losses(self) -> dict[str, Tensor]:
        """Weighted auxiliary losses of the layers' forwards just run, averaged over the layers."""
        per_layer = [b.ffn.aux_losses for b in self.blocks if getattr(b.ffn, "aux_losses", None)]
        names = {name for losses in per_layer for name in losses}
        return {n: torch.stack([losses[n] for losses in per_layer]).mean() for n in sorted(names)}

    def num_params(self, active: bool = False) -> int:
        """Parameter count (tied weights once); ``active``: only what one token uses (MoE top-k)."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        for block in self.blocks:
            if hasattr(block.ffn, "inactive_params"):  # MoE: experts a token is not routed to
                total -= block.ffn.inactive_params()
        return total
