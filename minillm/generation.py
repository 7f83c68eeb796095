"""Autoregressive sampling with a KV cache.

``generate`` decodes a batch of prompts of different lengths (left-padded; see ``model/cache.py``)
with temperature, top-k and top-p sampling, stopping rows at ``eos_id``. With ``use_cache=False``
it recomputes the whole window for every token, which gives the same logits (the reference the
cache is tested against) at O(T^2) cost.

Context window: a prompt longer than ``model.max_seq_len`` keeps its last ``max_seq_len`` tokens
(a warning says so). When prompt plus generated tokens fill the window, the oldest tokens are
dropped so that the last ``max_seq_len // 2`` remain and decoding continues, the cache rebuilt from
them; both paths follow this rule, so they stay identical. With ``extrapolate=True`` (position
schemes without a length limit: all but ``learned``) the window is instead the longest prompt plus
``max_new_tokens``, the size of the cache allocated, so nothing is cut or slid.

Example::

    from minillm import generate
    new_ids = generate(model, [[eos_id], [eos_id, 17, 42]], max_new_tokens=64, temperature=0.8,
                       top_p=0.95, eos_id=eos_id, seed=0, stream=lambda row, tok: ...)
"""

import warnings
from typing import Callable

import torch
from torch import Tensor

from minillm.config import is_int
from minillm.data.tokenizer import EOT
from minillm.model.cache import KVCache


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set to -inf every logit outside the top ``top_k`` and outside the nucleus of mass ``top_p``."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already >= p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> Tensor:
    """One token id per row from logits (B, V); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _left_pad(rows: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """(B, T) ids left-padded with 0 and the (B,) count of padding per row."""
    t = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (t - len(r)) + r for r in rows], device=device)
    pad = torch.tensor([t - len(r) for r in rows], device=device)
    return ids, pad


@torch.inference_mode()
def generate(model, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             seed: int | None = None, use_cache: bool = True,
             stream: Callable[[int, int], None] | None = None,
             extrapolate: bool = False) -> list[list[int]]:
    """New token ids for each prompt (the prompt excluded; a row ends after ``eos_id``).

    ``prompt_ids``: one list of token ids per row, any lengths. ``temperature`` 0 is greedy;
    ``top_k``/``top_p`` restrict sampling to the k most likely tokens / the smallest set of mass
    ``top_p``. ``seed`` makes sampling reproducible. ``stream(row, token)`` is called for every new
    token as it is produced. ``use_cache=False`` recomputes the whole context for every token.
    ``extrapolate`` lets schemes without a length limit run past ``model.max_seq_len``.
    """
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token (start from the <|endoftext|> id)")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (or None: no limit)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (or None: no limit)")
    window = model.max_seq_len
    if extrapolate:
        if model.position.max_len is not None:
            raise ValueError(f"extrapolation (allow_extrapolation=true) needs a position scheme "
                             f"without a length limit; {type(model.position).__name__} stops at "
                             f"model.max_seq_len={model.position.max_len}")
        window = max(len(p) for p in prompt_ids) + max_new_tokens
    if any(len(p) > window for p in prompt_ids):
        warnings.warn(f"prompt longer than the context (model.max_seq_len={window}): "
                      f"keeping its last {window} tokens")
        prompt_ids = [p[-window:] for p in prompt_ids]
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    ids, pad = _left_pad(prompt_ids, device)
    B, padded = ids.shape[0], len({len(p) for p in prompt_ids}) > 1
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B  # rows that produced eos_id: a host list, read without device syncs
    cache, fresh = None, ids  # ``fresh``: tokens not yet in the cache
    for _ in range(max_new_tokens):
        if ids.shape[1] > window:  # slide: keep the last half window, rebuild the cache
            keep = max(1, window // 2)
            pad = (pad - (ids.shape[1] - keep)).clamp(min=0)
            ids, cache, fresh = ids[:, -keep:], None, ids[:, -keep:]
        if use_cache:
            if cache is None:
                cache, fresh = KVCache.for_model(model, B, window, pad), ids
            logits = model(fresh, cache)[:, -1]
        elif padded:  # the cache object only carries the padding mask and positions here
            logits = model(ids, KVCache.for_model(model, B, ids.shape[1], pad))[:, -1]
        else:
            logits = model(ids)[:, -1]
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        for b, tok in enumerate(nxt.tolist()):  # the step's one host sync
            if done[b]:
                continue  # a finished row keeps decoding in the batch; its tokens are dropped
            out[b].append(tok)
            done[b] = tok == eos_id
            if stream is not None:
                stream(b, tok)
        if all(done):
            break
        ids, fresh = torch.cat([ids, nxt[:, None]], dim=1), nxt[:, None]
    return out


def check_sampling(prefix: str, max_new_tokens, num_samples, temperature, top_k, top_p,
                   min_new_tokens: int = 0) -> None:
    """Reject bad sampling settings (``eval.py mode=sample``, the ``SampleText`` callback) with one
    message naming ``<prefix><key>=<value>: ...``."""
    def bad(key: str, value, valid: str) -> ValueError:
        return ValueError(f"{prefix}{key}={value!r}: {valid}")

    if not is_int(max_new_tokens, min_new_tokens):
        raise bad("max_new_tokens", max_new_tokens, f"must be an integer >= {min_new_tokens}")
    if not is_int(num_samples):
        raise bad("num_samples", num_samples, "must be an integer >= 1")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise bad("temperature", temperature, "must be a number >= 0 (0 = greedy)")
    if top_k is not None and not is_int(top_k):
        raise bad("top_k", top_k, "must be an integer >= 1, or null for no filter")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise bad("top_p", top_p, "must be in (0, 1], or null for no filter")


def continuations(model, tokenizer, prompt: str, num_samples: int, max_new_tokens: int,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = None, use_cache: bool = True,
                  stream: Callable[[int, int], None] | None = None) -> list[str]:
    """``num_samples`` texts continuing ``prompt`` (encoded after EOT): prompt included, EOT excluded."""
    eot = tokenizer.token_to_id(EOT)
    prompt_ids = tokenizer.encode(prompt).ids
    rows = generate(model, [[eot] + prompt_ids] * num_samples, max_new_tokens, temperature=temperature,
                    top_k=top_k, top_p=top_p, eos_id=eot, seed=seed, use_cache=use_cache, stream=stream)
    return [tokenizer.decode(prompt_ids + [t for t in row if t != eot]) for row in rows]
