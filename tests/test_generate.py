"""KV-cache decoding equals full recomputation; sampling filters, seeds, batching and stops."""

import itertools

import pytest
import torch

import minillm
from conftest import options
from minillm.generation import filter_logits, generate
from minillm.model import KVCache
from minillm.model.cache import RingCache
from tiny_models import _composed, tiny_model

COMBOS = list(itertools.product(options("model/attention"), options("model/position"),
                                options("model/ffn")))
WINDOWED = [a for a in options("model/attention") if _composed("attention", a).get("window")]
W = 4  # the window in the tests below: generations run several times past it, so rings wrap


@pytest.mark.parametrize("attention,position,ffn", COMBOS)
def test_cached_logits_equal_full_recomputation_at_every_step(attention, position, ffn):
    model = tiny_model(attention, position, ffn)
    ids = torch.randint(0, 64, (1, 5))
    cache = KVCache.for_model(model, 1, 32)
    with torch.no_grad():
        cached = model(ids, cache)
        torch.testing.assert_close(cached, model(ids), atol=2e-5, rtol=1e-5)
        for _ in range(5):
            ids = torch.cat([ids, cached[:, -1:].argmax(-1)], dim=1)
            cached = model(ids[:, -1:], cache)
            torch.testing.assert_close(cached[:, -1], model(ids)[:, -1], atol=2e-5, rtol=1e-5)
    assert cache.layer(0).k.shape[1] == model.blocks[0].attn.n_kv_heads  # GQA/MQA cache Hkv heads


@pytest.mark.parametrize("position", options("model/position"))
@pytest.mark.parametrize("attention", ["gqa", "mqa"])
def test_greedy_tokens_same_with_and_without_cache(attention, position):
    model = tiny_model(attention, position)
    prompts = [[1, 2, 3]]
    assert generate(model, prompts, 8, temperature=0) == \
        generate(model, prompts, 8, temperature=0, use_cache=False)


@pytest.mark.parametrize("position", options("model/position"))
def test_batched_left_padded_decoding_equals_per_row(position):
    model = tiny_model("gqa", position)
    prompts = [[5], [7, 8, 9, 10, 11, 12], [3, 4, 5]]
    batched = generate(model, prompts, 6, temperature=0)
    assert batched == [generate(model, [p], 6, temperature=0)[0] for p in prompts]
    assert batched == generate(model, prompts, 6, temperature=0, use_cache=False)


def test_batched_padded_logits_equal_per_row_logits():
    model = tiny_model("gqa", "alibi")
    long, short = torch.randint(0, 64, (1, 7)), torch.randint(0, 64, (1, 3))
    ids = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    with torch.no_grad():
        batched = model(ids, KVCache.for_model(model, 2, 16, pad=torch.tensor([4, 0])))
        torch.testing.assert_close(batched[0, 4:], model(short)[0], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(batched[1], model(long)[0], atol=2e-5, rtol=1e-5)


def test_seed_makes_sampling_deterministic():
    model = tiny_model()
    run = lambda seed: generate(model, [[1], [2, 3]], 16, temperature=1.0, top_k=20, seed=seed)
    assert run(0) == run(0)
    assert run(0) != run(1)


def test_top_k_and_top_p_keep_exactly_the_right_sets():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = lambda **kw: torch.isfinite(filter_logits(logits, **kw)).nonzero().flatten().tolist()
    assert kept(top_k=3) == [0, 1, 2]
    assert kept(top_p=0.5) == [0]
    assert kept(top_p=0.79) == [0, 1]
    assert kept(top_p=0.81) == [0, 1, 2]
    assert kept(top_k=2, top_p=0.99) == [0, 1]
    torch.manual_seed(0)
    for p in torch.rand(20).tolist():  # smallest prefix of the sorted probabilities with mass >= p
        probs = torch.rand(50).softmax(-1)
        order = probs.argsort(descending=True)
        n = int((probs[order].cumsum(-1) < p).sum()) + 1
        assert set(torch.isfinite(filter_logits(probs.log(), top_p=p))
                   .nonzero().flatten().tolist()) == set(order[:n].tolist())


def test_stops_at_eos_and_streams_every_token():
    model = tiny_model()
    free = generate(model, [[1, 2]], 12, temperature=0)[0]
    eos = free[3]
    streamed = []
    out = generate(model, [[1, 2], [4]], 12, temperature=0, eos_id=eos,
                   stream=lambda row, tok: streamed.append((row, tok)))
    assert out[0] == free[:free.index(eos) + 1]
    assert [t for r, t in streamed if r == 0] == out[0] and [t for r, t in streamed if r == 1] == out[1]


def test_long_prompt_keeps_last_tokens_and_warns():
    model = tiny_model("gqa", "learned")  # max_seq_len 32
    prompt = torch.randint(0, 64, (40,)).tolist()
    with pytest.warns(UserWarning, match="keeping its last 32"):
        out = generate(model, [prompt], 4, temperature=0)
    assert out == generate(model, [prompt[-32:]], 4, temperature=0)
    with pytest.raises(ValueError, match="Learned stops at model.max_seq_len=32"):
        generate(model, [prompt], 4, extrapolate=True)


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_extrapolation_runs_past_the_context_without_sliding(position):
    model = tiny_model("gqa", position)  # max_seq_len 32
    prompt = torch.randint(0, 64, (30,)).tolist()
    out = generate(model, [prompt], 10, temperature=0, extrapolate=True)
    assert out == generate(model, [prompt], 10, temperature=0, extrapolate=True, use_cache=False)
    with torch.no_grad():  # the last token saw the whole 39-token context
        assert out[0][-1] == model(torch.tensor([prompt + out[0][:-1]]))[0, -1].argmax().item()


def test_sliding_window_same_with_and_without_cache():
    model = tiny_model("gqa", "rope")
    assert generate(model, [[1, 2, 3]], 40, temperature=0) == \
        generate(model, [[1, 2, 3]], 40, temperature=0, use_cache=False)  # slides once, at 33


def test_package_entry_point_is_generate():
    model = tiny_model()
    assert minillm.generate(model, [[1]], 3, seed=0) == generate(model, [[1]], 3, seed=0)


def windowed_model(attention: str, position: str, max_seq_len: int = 64):
    """4 layers (local/global options get local and global ones), a window of ``W`` keys."""
    return tiny_model(attention, position, n_layers=4, max_seq_len=max_seq_len, window=W)


@pytest.mark.parametrize("position", options("model/position"))
@pytest.mark.parametrize("attention", WINDOWED)
@pytest.mark.parametrize("padded", [False, True])
def test_windowed_cache_equals_full_recomputation_at_every_step(attention, position, padded):
    model = windowed_model(attention, position)
    prompts = [[5, 6, 7, 8, 9, 10], [3, 4]] if padded else [[5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6]]
    pad = torch.tensor([6 - len(p) for p in prompts])
    ids = torch.tensor([[0] * (6 - len(p)) + p for p in prompts])
    cache = KVCache.for_model(model, 2, 40, pad)
    with torch.no_grad():
        for step in range(30):  # prompt longer than W, then 7x the window: every ring wraps
            cached = model(ids if step == 0 else ids[:, -1:], cache)[:, -1]
            full = model(ids, KVCache.for_model(model, 2, ids.shape[1], pad))[:, -1]  # no reuse
            torch.testing.assert_close(cached, full, atol=2e-5, rtol=1e-5)
            if not padded:
                torch.testing.assert_close(full, model(ids)[:, -1], atol=2e-5, rtol=1e-5)
            ids = torch.cat([ids, cached.argmax(-1, keepdim=True)], dim=1)
        for b, p in enumerate(prompts):  # each padded row equals its own unpadded run
            row = ids[b:b + 1, 6 - len(p):]
            torch.testing.assert_close(model(ids, KVCache.for_model(model, 2, ids.shape[1], pad))[b, -1],
                                       model(row)[0, -1], atol=2e-5, rtol=1e-5)
    layers, blocks = cache.layers, model.blocks
    k_bytes = [layer.k.numel() * layer.k.element_size() for layer in layers]
    for layer, block, nbytes in zip(layers, blocks, k_bytes):
        Hkv, D = block.attn.n_kv_heads, block.attn.head_dim
        slots = 40 if block.attn.window is None else W  # windowed: W keys, whatever the length
        assert isinstance(layer, RingCache) == (block.attn.window is not None)
        assert layer.k.shape == layer.v.shape == (2, Hkv, slots, D)
        assert nbytes == 2 * Hkv * slots * D * 4


@pytest.mark.parametrize("attention", WINDOWED)
def test_windowed_cache_fed_in_chunks_equals_full_recomputation(attention):
    """Chunks of 3 tokens into a ring of 4: a chunk's queries read keys the same chunk overwrites."""
    model = windowed_model(attention, "alibi")  # ALiBi: the keys must come back oldest first
    ids = torch.randint(0, 64, (2, 22))
    cache = KVCache.for_model(model, 2, 32)
    with torch.no_grad():
        full = model(ids)
        for start in range(0, 22, 3):
            chunk = model(ids[:, start:start + 3], cache)
            torch.testing.assert_close(chunk, full[:, start:start + 3], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("position", ["rope", "learned"])
@pytest.mark.parametrize("attention", WINDOWED)
def test_windowed_generation_same_with_and_without_cache(attention, position):
    """Batched, left-padded, past the window many times and past the context (it slides at 33)."""
    model = windowed_model(attention, position, max_seq_len=32)
    prompts = [[5], [7, 8, 9, 10, 11, 12], [3, 4, 5]]
    cached = generate(model, prompts, 40, temperature=0)
    assert cached == generate(model, prompts, 40, temperature=0, use_cache=False)
    assert cached == [generate(model, [p], 40, temperature=0)[0] for p in prompts]
