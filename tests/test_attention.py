"""Attention backends agree with the explicit ``math`` kernel, forward and backward, under every
mask (causal, sliding window, documents, padding); the mask equals its definition."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from conftest import options
from minillm.model import attention as attn_mod
from minillm.model.attention import KERNELS, Attention, math_attention
from minillm.model.mask import BLOCK, AttentionMask
from minillm.model.position import ALiBi, PositionEncoding
from tiny_models import _composed, component, tiny_model

BACKENDS = [b for b in KERNELS if b != "math" and (b != "flash_attn" or not attn_mod._flash_attn_missing())]
LAYOUTS = {"mha": 4, "gqa": 2, "mqa": 1}  # n_kv_heads at 4 query heads
BIAS = {"none": PositionEncoding(32, 4, 64), "alibi": ALiBi(32, 4, 64)}  # what a kernel sees
T = 48  # longer than the windows tested
MASKS = {"causal": {}, "window8": {"window": 8}, "window16": {"window": 16},
         "documents": {"documents": True}, "documents_window8": {"window": 8, "documents": True}}
WINDOWED = [a for a in options("model/attention") if _composed("attention", a).get("window")]


def documents(batch: int = 2, t: int = T, device: str = "cpu") -> torch.Tensor:
    """Non-decreasing document ids (B, T), a boundary at 20 and random others (~1 in 8 tokens)."""
    starts = torch.rand(batch, t) < 0.125
    starts[:, 20] = True
    return starts.cumsum(1).to(device)


def make_mask(kind: str, t: int = T, device: str = "cpu") -> AttentionMask:
    spec = MASKS[kind]
    docs = documents(t=t, device=device) if spec.get("documents") else None
    return AttentionMask(t, window=spec.get("window"), documents=docs)


# (device, dtype) -> tolerance against math computed in float32 on the same inputs
SETTINGS = {("cpu", torch.float32): 1e-5}
if torch.cuda.is_available():
    SETTINGS[("cuda", torch.bfloat16)] = 2e-2


def qkv(n_kv_heads: int, t_q: int = T, t_k: int = T, grad: bool = True, device: str = "cpu",
        dtype: torch.dtype = torch.float32):
    shapes = [(2, 4, t_q, 8), (2, n_kv_heads, t_k, 8), (2, n_kv_heads, t_k, 8)]
    return [torch.randn(s, device=device, dtype=dtype, requires_grad=grad) for s in shapes]


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", BIAS)
@pytest.mark.parametrize("mask", MASKS)
def test_kernel_matches_math_forward_and_backward(backend, layout, bias, mask, setting):
    (device, dtype), tol = setting, SETTINGS[setting]
    scheme, mask = BIAS[bias].to(device), make_mask(mask, device=device)
    q, k, v = qkv(LAYOUTS[layout], device=device, dtype=dtype)
    grad_out = torch.randn(2, 4, T, 8, device=device, dtype=dtype)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref, _ = math_attention(q32, k32, v32, scheme, mask)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), grad_out.float())
    y, _ = KERNELS[backend](q, k, v, scheme, mask)
    grads = torch.autograd.grad(y, (q, k, v), grad_out)
    torch.testing.assert_close(y.float(), ref, atol=tol, rtol=10 * tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r, atol=tol, rtol=10 * tol)
    with torch.no_grad():  # flex runs its own kernel only without autograd on CPU
        torch.testing.assert_close(KERNELS[backend](q, k, v, scheme, mask)[0].float(), ref,
                                   atol=tol, rtol=10 * tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", BIAS)
def test_kernel_queries_are_the_last_keys(backend, bias):
    """Tq < Tk without a mask: query i sits at absolute index i + Tk - Tq (causal, ALiBi distance)."""
    q, k, v = qkv(2, t_q=5, t_k=40, grad=False)
    mask = AttentionMask(5, 40)
    ref, weights = math_attention(q, k, v, BIAS[bias], mask)
    assert weights[..., 0, 36:].abs().max() == 0  # first query (index 35) sees keys 0..35
    torch.testing.assert_close(KERNELS[backend](q, k, v, BIAS[bias], mask)[0], ref,
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [None, 4])
def test_kernel_with_padding_mask_matches_math(backend, window):
    q, k, v = qkv(2, t_q=3, t_k=12, grad=False)
    mask = AttentionMask(3, 12, k_start=2, window=window, pad=torch.tensor([5, 13]))  # row 1: all pad
    ref, _ = math_attention(q, k, v, BIAS["alibi"], mask)
    torch.testing.assert_close(KERNELS[backend](q, k, v, BIAS["alibi"], mask)[0], ref,
                               atol=1e-5, rtol=1e-4)


def test_flex_never_materialises_the_alibi_bias(monkeypatch):
    q, k, v = qkv(2, grad=False)
    ref, _ = math_attention(q, k, v, BIAS["alibi"], AttentionMask(T))

    def refuse(*args):
        raise AssertionError("flex built the T x T bias")

    monkeypatch.setattr(ALiBi, "score_bias", refuse)
    with torch.no_grad():
        torch.testing.assert_close(KERNELS["flex"](q, k, v, BIAS["alibi"], AttentionMask(T))[0], ref,
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("position", options("model/position"))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("attention,docs", [("gqa", False), ("gqa", True)]
                         + [(a, d) for a in WINDOWED for d in (False, True)])
def test_model_backends_agree_for_every_position_scheme(position, backend, attention, docs):
    """Whole models: causal, each windowed option (window 8 < T) and document masks."""
    torch.manual_seed(0)
    window = {"window": 8} if attention in WINDOWED else {}
    ref = tiny_model(attention, position, backend="math", n_layers=4, max_seq_len=64, **window)
    model = tiny_model(attention, position, backend=backend, n_layers=4, max_seq_len=64, **window)
    model.load_state_dict(ref.state_dict())
    idx, ids = torch.randint(0, 64, (2, T)), documents() if docs else None
    with torch.no_grad():
        torch.testing.assert_close(model(idx, documents=ids), ref(idx, documents=ids),
                                   atol=1e-5, rtol=1e-4)
    model(idx, documents=ids).logsumexp(-1).mean().backward()
    ref(idx, documents=ids).logsumexp(-1).mean().backward()
    for (name, p), r in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad, atol=1e-5, rtol=1e-4, msg=name)


def brute_force(t_q, t_k, k_start=0, window=None, docs=None, pad=None, batch=1):
    """The mask's definition as a python double loop: (B, 1, Tq, Tk) booleans."""
    out = torch.zeros(batch, 1, t_q, t_k, dtype=torch.bool)
    for b in range(batch):
        for i in range(t_q):
            q = k_start + t_k - t_q + i  # absolute index of query i
            for j in range(t_k):
                k = k_start + j
                ok = (k <= q and (window is None or q - k < window)
                      and (docs is None or docs[b][i] == docs[b][j])
                      and (pad is None or k >= pad[b]))
                out[b, 0, i, j] = ok or (pad is not None and k == q)
    return out


@pytest.mark.parametrize("t_q,t_k,k_start,window,docs,pad", [
    (7, 7, 0, None, None, None), (7, 7, 0, 3, None, None), (7, 7, 0, 7, None, None),
    (7, 7, 0, None, [[0, 0, 1, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 3]], None),
    (7, 7, 0, 2, [[0, 0, 1, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 3]], None),
    (3, 9, 0, None, None, [4, 0]), (3, 9, 0, 4, None, [4, 0]),
    (1, 4, 6, 4, None, [7, 0]), (2, 5, 6, 4, None, None),  # a ring: keys 6.. of a longer stream
])
def test_mask_equals_its_definition(t_q, t_k, k_start, window, docs, pad):
    doc_t = None if docs is None else torch.tensor(docs)
    pad_t = None if pad is None else torch.tensor(pad)
    mask = AttentionMask(t_q, t_k, k_start=k_start, window=window, documents=doc_t, pad=pad_t)
    expected = brute_force(t_q, t_k, k_start, window, docs, pad, batch=mask.batch)
    assert torch.equal(mask.dense("cpu"), expected)
    plain = torch.ones(t_q, t_k, dtype=torch.bool).tril(t_k - t_q)
    assert mask.is_causal == torch.equal(expected, plain.expand_as(expected))  # fast path iff causal


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("t", [T, 300])
def test_block_mask_equals_create_block_mask(kind, t):
    """Our tile-by-tile BlockMask is the one torch builds from the whole mask, block for block."""
    mask = make_mask(kind, t=t)
    ours = mask.block_mask("cpu")
    ref = create_block_mask(mask.mask_mod(), mask.batch, None, t, t, device="cpu")
    for part in ("kv_num_blocks", "full_kv_num_blocks"):
        assert torch.equal(getattr(ours, part), getattr(ref, part)), part
    assert torch.equal(ours.to_dense(), ref.to_dense())
    if mask.documents is None:  # queries the last Tq of Tk keys
        short = AttentionMask(t - 20, t, window=mask.window)
        ref = create_block_mask(short.mask_mod(), 1, None, t - 20, t, device="cpu")
        assert torch.equal(short.block_mask("cpu").to_dense(), ref.to_dense())
        assert torch.equal(short.block_mask("cpu").full_kv_num_blocks, ref.full_kv_num_blocks)


def test_flex_window_and_documents_are_block_sparse_and_build_no_dense_mask(monkeypatch):
    t = 1024
    causal = AttentionMask(t).block_mask("cpu")
    window = AttentionMask(t, window=BLOCK).block_mask("cpu")
    docs = AttentionMask(t, documents=torch.arange(t).div(BLOCK, rounding_mode="floor")[None])
    n_tiles = t // BLOCK
    assert causal.kv_num_blocks.sum() + causal.full_kv_num_blocks.sum() == n_tiles * (n_tiles + 1) // 2
    assert window.kv_num_blocks.sum() + window.full_kv_num_blocks.sum() == 2 * n_tiles - 1
    assert docs.block_mask("cpu").kv_num_blocks.sum() == n_tiles  # one story per tile: the diagonal
    assert docs.block_mask("cpu").full_kv_num_blocks.sum() == 0

    q, k, v = qkv(2, t_q=300, t_k=300, grad=False)  # three query tiles, the last one cut short
    mask = make_mask("documents_window8", t=300)
    ref, _ = math_attention(q, k, v, BIAS["none"], mask)
    shapes = []
    evaluate = AttentionMask._evaluate
    monkeypatch.setattr(AttentionMask, "_evaluate",
                        lambda self, q_idx, kv_idx: shapes.append(len(q_idx)) or evaluate(self, q_idx, kv_idx))

    def refuse(*args, **kwargs):
        raise AssertionError("flex built a dense T x T mask")

    monkeypatch.setattr(AttentionMask, "dense", refuse)
    monkeypatch.setattr("torch.nn.attention.flex_attention.create_mask", refuse)
    fresh = AttentionMask(300, window=8, documents=mask.documents)
    with torch.no_grad():
        torch.testing.assert_close(KERNELS["flex"](q, k, v, BIAS["none"], fresh)[0], ref,
                                   atol=1e-5, rtol=1e-4)
    assert shapes and max(shapes) == BLOCK  # evaluated one tile of query rows at a time


def test_flash_window_translation():
    """flash-attn keeps key j for query i when i - left <= j <= i + right (and j <= i: causal)."""
    for window in (None, 1, 8, 16, 48, 100):
        mask = AttentionMask(T, window=window)
        left, right = mask.flash_window()
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        kept = (j <= i) & ((left < 0) | (j >= i - left)) & ((right < 0) | (j <= i + right))
        assert torch.equal(kept, mask.dense("cpu")[0, 0]), window
    assert make_mask("documents").flash_window() is None
    assert AttentionMask(2, 9, pad=torch.tensor([3, 0])).flash_window() is None


@pytest.mark.parametrize("attention", WINDOWED)
@pytest.mark.parametrize("preset", ["tiny", "llama", "gpt2"])
def test_windowed_options_name_local_and_global_layers(attention, preset):
    from minillm import build_model
    from conftest import compose_cfg
    cfg = compose_cfg([f"model={preset}", f"model/attention={attention}", "data.vocab_size=64"])
    windows = [b.attn.window for b in build_model(cfg.model).blocks]
    every = cfg.model.attention.global_every
    assert windows == [None if every and (i + 1) % every == 0 else cfg.model.attention.window
                       for i in range(len(windows))]
    assert any(w is not None for w in windows)
    assert every is None or None in windows


@pytest.mark.parametrize("options,message", [
    ({"window": 0}, "model.attention.window=0 must be an integer >= 1"),
    ({"window": 8, "global_every": 0}, "model.attention.global_every=0 must be an integer in 2..model.n_layers=4"),
    ({"window": 8, "global_every": 1}, "model.attention.global_every=1 makes all model.n_layers=4 layers global: no windowed layer"),
    ({"window": 8, "global_every": 5}, "model.attention.global_every=5 > model.n_layers=4: no global layer"),
    ({"window": None, "global_every": 2}, "model.attention.global_every=2 needs model.attention.window"),
])
def test_bad_window_settings_fail_at_construction_naming_the_key(options, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")) as err:
        tiny_model("gqa", n_layers=4, **options)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("position", options("model/position"))
@pytest.mark.parametrize("backend", BACKENDS + ["math"])
def test_documents_do_not_see_each_other(position, backend):
    """Per-document logits with a document mask are those of each document alone: no leak.

    Schemes that add absolute positions to the embeddings see a document at a shifted offset in the
    packed window, so for them the check is that other documents' tokens change nothing."""
    model = tiny_model("gqa", position, backend=backend, n_layers=2, max_seq_len=64)
    idx, ids = torch.randint(0, 64, (2, T)), documents()
    other = torch.randint(0, 64, (2, T))
    relative = type(model.position).embed is PositionEncoding.embed
    with torch.no_grad():
        packed = model(idx, documents=ids)
        for b in range(2):
            for d in ids[b].unique():
                own = ids[b] == d
                if relative:
                    alone = model(idx[b:b + 1, own])[0]
                else:
                    alone = model(torch.where(own, idx[b], other[b])[None], documents=ids[b:b + 1])[0, own]
                torch.testing.assert_close(packed[b, own], alone, atol=2e-5, rtol=1e-4)
        with pytest.raises(ValueError, match="documents with a cache"):
            from minillm.model import KVCache
            model(idx, cache=KVCache.for_model(model, 2, 64), documents=ids)


def test_flash_attn_backend_names_what_is_missing():
    if not attn_mod._flash_attn_missing():
        pytest.skip("flash-attn and CUDA are present")
    with pytest.raises(ValueError, match=r"model\.attention\.backend='flash_attn' needs .*sdpa"):
        Attention(32, 4, backend="flash_attn")


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match=r"model\.attention\.backend='fast'"):
        component("attention", "mha", backend="fast")(d_model=32, n_heads=4)


@pytest.mark.parametrize("t_q,t_k", [(6, 6), (2, 9)])
def test_alibi_score_mod_equals_score_bias(t_q, t_k):
    """The flex score_mod uses the query's absolute index q_idx + Tk - Tq, like the bias."""
    alibi = BIAS["alibi"]
    h, i, j = torch.meshgrid(torch.arange(4), torch.arange(t_q), torch.arange(t_k), indexing="ij")
    mod = alibi.score_mod(t_q, t_k)(torch.zeros(4, t_q, t_k), torch.zeros_like(h), h, i, j)
    causal = j <= i + t_k - t_q
    torch.testing.assert_close(mod[causal], alibi.score_bias(t_q, t_k)[causal])
    assert PositionEncoding(32, 4, 64).score_mod(t_q, t_k) is None
