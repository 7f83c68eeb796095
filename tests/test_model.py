"""Model properties for every component combination, discovered from the config folders."""

import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F
from hydra.errors import ConfigCompositionException

from minillm import build_model
from minillm.model.attention import Attention
from minillm.model.cache import KVCache
from minillm.model.ffn import ReLU2
from minillm.model.position import ALiBi, PositionEncoding, RoPE, Sinusoidal, alibi_slopes
from minillm.model.transformer import Transformer
from tests.conftest import compose_cfg, options

VOCAB = 97
SMALL = ["model=tiny", f"data.vocab_size={VOCAB}", "model.d_model=32", "model.n_layers=2",
         "model.n_heads=4", "model.max_seq_len=32"]
COMBOS = list(itertools.product(options("model/attention"), options("model/position"),
                                options("model/ffn")))


def small_model(*overrides: str):
    torch.manual_seed(0)
    return build_model(compose_cfg([*SMALL, *overrides]).model)


@pytest.mark.parametrize("attention,position,ffn", COMBOS)
def test_combination_is_causal_trainable_and_starts_near_uniform(attention, position, ffn):
    model = small_model(f"model/attention={attention}", f"model/position={position}",
                        f"model/ffn={ffn}")
    idx = torch.randint(0, VOCAB, (2, 24))

    # Causality: changing token t leaves the logits before t unchanged, and changes later ones.
    t = 13
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(idx), model(changed)
    torch.testing.assert_close(before[:, :t], after[:, :t], rtol=0, atol=1e-5)
    assert (before[:, t:] - after[:, t:]).abs().max() > 1e-4

    # Loss at init is close to ln(V): the model starts near uniform.
    logits = model(idx[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
    aux = sum(model(idx[:, :-1], targets=idx[:, 1:]).aux.values(), torch.zeros(()))
    assert torch.isfinite(loss) and abs(loss.item() - math.log(VOCAB)) < 0.3
    (loss + aux).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("preset", options("model"))
def test_every_preset_composes_and_instantiates(preset):
    cfg = compose_cfg([f"model={preset}", "data.vocab_size=4096"])
    model = build_model(cfg.model)
    assert model.num_params() >= model.num_params(active=True) > 0
    with torch.no_grad():
        assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 4096)


POSITIONS = {
    "none": lambda: PositionEncoding(64, 8, 64),
    "sinusoidal": lambda: Sinusoidal(64, 8, 64),
    "rope": lambda: RoPE(64, 8, 64),
    "alibi": lambda: ALiBi(64, 8, 64),
}


def attention_pair(n_kv_heads: int, backend: str = "sdpa") -> tuple[Attention, Attention]:
    ref = Attention(64, 8, n_kv_heads, backend="math")
    other = Attention(64, 8, n_kv_heads, backend=backend)
    other.load_state_dict(ref.state_dict())
    return ref, other


@pytest.mark.parametrize("position", sorted(POSITIONS))
@pytest.mark.parametrize("n_kv_heads", [8, 2, 1])
def test_sdpa_matches_math_forward_and_backward(position, n_kv_heads):
    pos = POSITIONS[position]()
    ref, fast = attention_pair(n_kv_heads)
    x = torch.randn(2, 20, 64, requires_grad=True)
    y_ref = ref(x, pos)
    (g_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    y = fast(x, pos)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


def test_gqa_equals_mha_with_repeated_kv_weights():
    """GQA is MHA whose query heads in a group share one K/V head: h reads kv head h // G."""
    H, Hkv, D, C = 8, 2, 8, 64
    gqa = Attention(C, H, Hkv, backend="math")
    mha = Attention(C, H, H, backend="math")
    wq, wk, wv = gqa.qkv.weight.split([H * D, Hkv * D, Hkv * D])
    repeat = lambda w: w.view(Hkv, 1, D, C).expand(Hkv, H // Hkv, D, C).reshape(H * D, C)
    with torch.no_grad():
        mha.qkv.weight.copy_(torch.cat([wq, repeat(wk), repeat(wv)]))
        mha.proj.weight.copy_(gqa.proj.weight)
    x, pos = torch.randn(2, 10, C), RoPE(C, H, 32)
    torch.testing.assert_close(gqa(x, pos), mha(x, pos), rtol=1e-5, atol=1e-6)


def test_gqa_with_as_many_kv_heads_as_query_heads_is_mha():
    mha = Attention(64, 8, None)
    gqa = Attention(64, 8, 8)
    gqa.load_state_dict(mha.state_dict())
    x = torch.randn(1, 6, 64)
    torch.testing.assert_close(gqa(x, PositionEncoding(64, 8, 8)), mha(x, PositionEncoding(64, 8, 8)))


def test_rope_score_depends_only_on_offset():
    rope = RoPE(64, 4, 128)
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 4, 1, 16)

    def score(m: int, n: int) -> torch.Tensor:
        qm, _ = rope.rotate(q, q, torch.tensor([m]))
        _, kn = rope.rotate(k, k, torch.tensor([n]))
        return (qm * kn).sum(-1)

    torch.testing.assert_close(score(5, 2), score(105, 102), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(score(40, 40), score(0, 0), rtol=1e-4, atol=1e-5)
    assert (score(5, 2) - score(5, 3)).abs().max() > 1e-3  # but it does depend on the offset
    # Rotation preserves norms (it is a rotation).
    qr, _ = rope.rotate(q, q, torch.tensor([77]))
    torch.testing.assert_close(qr.norm(dim=-1), q.norm(dim=-1))


def test_rope_lookup_past_the_table_after_reserve_equals_the_full_rotation():
    rope = RoPE(64, 4, 16)  # table of 16 positions; decoding a 40-token cache reserves 40
    q, k = torch.randn(2, 4, 40, 16), torch.randn(2, 4, 40, 16)
    full_q, full_k = rope.rotate(q, k)  # t = 40 > 16: computed from the formula
    rope.reserve(40)
    assert rope.cos.shape[0] == 40
    steps = torch.tensor([[30, 31], [5, 39]])  # (B, T) positions, as a left-padded batch has
    rows = torch.arange(2)[:, None]
    got_q, got_k = rope.rotate(q[rows, :, steps].transpose(1, 2), k[rows, :, steps].transpose(1, 2), steps)
    torch.testing.assert_close(got_q, full_q[rows, :, steps].transpose(1, 2))
    torch.testing.assert_close(got_k, full_k[rows, :, steps].transpose(1, 2))


def reference_alibi_slopes(n: int) -> list[float]:
    """The construction of the ALiBi reference code (Press et al., ``get_slopes``)."""
    def power_of_2(n):
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        return [start * start ** i for i in range(n)]
    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + reference_alibi_slopes(2 * closest)[0::2][: n - closest]


def test_alibi_slopes_match_paper_and_reference():
    assert alibi_slopes(8) == pytest.approx([2 ** -(i + 1) for i in range(8)])
    for n in (6, 12, 16, 5):
        assert alibi_slopes(n) == pytest.approx(reference_alibi_slopes(n))
    assert alibi_slopes(6) == pytest.approx([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])


def test_alibi_bias_is_minus_slope_times_distance():
    alibi = ALiBi(32, 4, 16)
    bias = alibi.score_bias(3, 5)  # queries are the last 3 of 5 positions: i = 2, 3, 4
    m = torch.tensor(alibi_slopes(4))
    for i in range(3):
        for j in range(5):
            expected = -m * (i + 2 - j) if j <= i + 2 else torch.zeros(4)
            torch.testing.assert_close(bias[:, i, j], expected)


def test_sinusoidal_matches_formula():
    d = 16
    pe = Sinusoidal(d, 2, 50, scale=1.0).embed(torch.zeros(1, 50, d))[0]
    for p in (0, 1, 7, 49):
        for i in range(d // 2):
            angle = p / 10000 ** (2 * i / d)
            assert pe[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)
    # Beyond the precomputed table the formula still holds.
    far = Sinusoidal(d, 2, 8, scale=1.0).embed(torch.zeros(1, 50, d))[0]
    torch.testing.assert_close(far, pe, rtol=1e-4, atol=1e-5)
    scaled = Sinusoidal(d, 2, 8).embed(torch.zeros(1, 50, d))[0]  # default scale, past the table too
    torch.testing.assert_close(scaled, 0.02 * pe, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("overrides,key", [
    (["model.n_heads=5"], "model.n_heads"),
    (["model/attention=gqa", "model.attention.n_kv_heads=3"], "model.attention.n_kv_heads"),
    (["model/ffn=moe", "model.ffn.top_k=9"], "model.ffn.top_k"),
    (["model/position=rope", "model.d_model=36", "model.n_heads=4"], "model.position=rope"),
    (["model.attention.backend=fast"], "model.attention.backend"),
    (["model.d_model=0"], "model.d_model"),
    (["model.logit_softcap=0"], "model.logit_softcap=0 must be a number > 0"),
    (["model.logit_softcap=-15"], "model.logit_softcap=-15 must be a number > 0"),
    (["model.init=xavier"], "model.init='xavier' is not one of ['gpt2', 'zero_proj']"),
    (["model.attention.qk_norm_eps=0"], "model.attention.qk_norm_eps=0 must be a number > 0"),
    (["model.attention.qk_norm=1"], "model.attention.qk_norm=1 must be true or false"),
])
def test_impossible_settings_fail_at_construction_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        small_model(*overrides)


def test_unknown_component_lists_the_valid_choices():
    with pytest.raises(ConfigCompositionException, match="rope"):
        compose_cfg(["model/position=rotary"])


def test_sequence_longer_than_learned_table_fails_clearly():
    model = small_model("model/position=learned")
    with pytest.raises(ValueError, match="model.max_seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_tied_embeddings_share_one_tensor():
    model = small_model()
    assert model.lm_head.weight is model.tok_emb.weight
    untied = small_model("model.tie_embeddings=false")
    assert untied.num_params() == model.num_params() + 128 * 32  # 97 rows padded to 128


def test_vocab_padding_changes_no_logit():
    padded = small_model("model.vocab_multiple=64")
    exact = small_model("model.vocab_multiple=1")
    assert padded.tok_emb.weight.shape[0] == 128 and exact.tok_emb.weight.shape[0] == VOCAB
    with torch.no_grad():
        exact.tok_emb.weight.copy_(padded.tok_emb.weight[:VOCAB])
        for (n, p), (_, q) in zip(padded.named_parameters(), exact.named_parameters()):
            if n != "tok_emb.weight":
                q.copy_(p)
    idx = torch.randint(0, VOCAB, (2, 12))
    torch.testing.assert_close(padded(idx), exact(idx))


@pytest.mark.parametrize("ffn,softcap", [("swiglu", "null"), ("moe", "null"), ("swiglu", "2.0")])
def test_forward_with_targets_is_the_cross_entropy_of_the_logits(ffn, softcap):
    # 97 tokens, rows padded to 128: the loss sees 97 (after the cap, when there is one)
    model = small_model(f"model/ffn={ffn}", f"model.logit_softcap={softcap}")
    idx, targets = torch.randint(0, VOCAB, (2, 12)), torch.randint(0, VOCAB, (2, 12))
    targets[0, :3] = -100  # ignored, as F.cross_entropy's ignore_index
    logits = model(idx)
    kept = targets.flatten() != -100
    log_probs = logits.flatten(0, 1)[kept].log_softmax(-1)
    by_hand = -log_probs.gather(1, targets.flatten()[kept, None]).mean()
    loss = model(idx, targets=targets).loss
    torch.testing.assert_close(loss, by_hand)
    params = [p for p in model.parameters() if p.requires_grad]
    for g, r in zip(torch.autograd.grad(loss, params), torch.autograd.grad(by_hand, params)):
        torch.testing.assert_close(g, r)
    with pytest.raises(ValueError, match="targets with a cache"):
        model(idx, cache=KVCache.for_model(model, 2, 16), targets=targets)


# ---- logit soft-capping, ReLU^2, QK-norm

def test_softcap_is_cap_tanh_of_the_logits_and_bounds_them():
    capped, plain = small_model("model.logit_softcap=3.0"), small_model()
    with torch.no_grad():  # large weights: raw logits far beyond the cap
        for p in plain.parameters():
            p.mul_(40.0) if p.dim() > 1 else None
    capped.load_state_dict(plain.state_dict())
    idx = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        raw, got = plain(idx), capped(idx)
    assert raw.abs().max() > 10  # the cap has work to do
    torch.testing.assert_close(got, 3.0 * torch.tanh(raw / 3.0))
    assert got.abs().max() < 3.0
    cache = KVCache.for_model(capped, 2, 16)  # decoding reads the capped logits too
    with torch.no_grad():
        torch.testing.assert_close(capped(idx, cache=cache), got, rtol=1e-4, atol=1e-4)


def test_relu2_is_down_of_squared_relu_of_up():
    ffn = ReLU2(16)
    assert ffn.up.out_features == 64  # d_hidden default 4C
    x = torch.randn(2, 5, 16)
    h = x @ ffn.up.weight.T
    by_hand = (h.clamp(min=0) ** 2) @ ffn.down.weight.T
    torch.testing.assert_close(ffn(x), by_hand)
    assert ffn.residual_out() == [ffn.down.weight]


class RecordingPosition(PositionEncoding):
    """No positions; remembers the q and k that attention hands to ``rotate``."""

    def rotate(self, q, k, positions=None):
        self.q, self.k = q, k
        return q, k


@pytest.mark.parametrize("n_kv_heads", [8, 2])
def test_qk_norm_gives_q_and_k_unit_rms_per_head_before_the_rotation(n_kv_heads):
    attn = Attention(64, 8, n_kv_heads, qk_norm=True)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 2.0)
        attn.k_norm.weight.uniform_(0.5, 2.0)
    pos = RecordingPosition(64, 8, 32)
    attn(torch.randn(2, 10, 64) * 3.0, pos)
    assert pos.q.shape == (2, 8, 10, 8) and pos.k.shape == (2, n_kv_heads, 10, 8)
    for x, norm in [(pos.q, attn.q_norm), (pos.k, attn.k_norm)]:
        rms = (x / norm.weight).pow(2).mean(-1).sqrt()  # every (batch, head, position) row
        torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-4, atol=1e-4)
    plain = Attention(64, 8, n_kv_heads)  # without qk_norm the rows are not normalised
    plain(torch.randn(2, 10, 64) * 3.0, pos)
    assert (pos.q.pow(2).mean(-1).sqrt() - 1).abs().max() > 0.1


def test_qk_norm_weights_are_per_layer_and_change_the_function():
    model = small_model("model.attention.qk_norm=true")
    names = [n for n, _ in model.named_parameters() if "_norm.weight" in n and ".attn." in n]
    assert names == [f"blocks.{i}.attn.{qk}_norm.weight" for i in range(2) for qk in "qk"]
    assert model.blocks[0].attn.q_norm.weight is not model.blocks[1].attn.q_norm.weight
    idx = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        before = model(idx)
        model.blocks[1].attn.k_norm.weight.mul_(3.0)
        assert (model(idx) - before).abs().max() > 1e-4
    assert "q_norm" not in str(small_model().state_dict().keys())  # off: no extra tensors


# ---- init contract: residual_out() marks the projections; gpt2 equals the old name-suffix rule

def old_suffix_init(self, std: float, init: str = "gpt2") -> None:
    """``Transformer._init_weights`` before the init contract (residual outputs found by name)."""
    for name, p in self.named_parameters():
        if name.startswith("position.") or p.dim() < 2:
            continue
        residual_out = name.endswith(("attn.proj.weight", "down.weight", "w_down"))
        torch.nn.init.normal_(p, std=std / math.sqrt(2 * self.n_layers) if residual_out else std)
    for m in self.modules():
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            torch.nn.init.zeros_(m.bias)


@pytest.mark.parametrize("preset", options("model"))
def test_gpt2_init_is_bit_identical_to_the_name_suffix_rule(preset, monkeypatch):
    cfg = compose_cfg([f"model={preset}", "data.vocab_size=512", "model.attention.bias=true",
                       "model.init=gpt2"]).model  # model=modern defaults to zero_proj
    torch.manual_seed(3)
    new = build_model(cfg).state_dict()
    monkeypatch.setattr(Transformer, "_init_weights", old_suffix_init)
    torch.manual_seed(3)
    old = build_model(cfg).state_dict()
    assert new.keys() == old.keys()
    for key in new:
        assert torch.equal(new[key], old[key]), key


@pytest.mark.parametrize("attention,ffn", itertools.product(options("model/attention"),
                                                            options("model/ffn")))
def test_zero_proj_zeroes_exactly_the_residual_projections(attention, ffn):
    parts = [f"model/attention={attention}", f"model/ffn={ffn}"]
    gpt2, zero = small_model(*parts), small_model(*parts, "model.init=zero_proj")
    residual = {id(p) for b in zero.blocks for p in b.attn.residual_out() + b.ffn.residual_out()}
    by_name = dict(gpt2.named_parameters())
    n_zero = 0
    for name, p in zero.named_parameters():
        if id(p) in residual:
            n_zero += 1
            assert not p.any() and by_name[name].any(), name
        else:  # everything else drawn exactly as under gpt2
            assert torch.equal(p, by_name[name]), name
    assert n_zero >= 2 * len(zero.blocks)  # at least attention's and the FFN's in every block


def test_zero_proj_model_learns():
    """Zero projections get gradients at step 0; after one step every weight does; the loss falls."""
    model = small_model("model.init=zero_proj").train()
    idx = torch.randint(0, VOCAB, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(30):
        loss = model(idx[:, :-1], targets=idx[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for b in model.blocks:
                assert all(p.grad.abs().sum() > 0 for p in b.attn.residual_out() + b.ffn.residual_out())
            assert not model.blocks[0].attn.qkv.weight.grad.any()  # the block starts as the identity
        if step == 1:
            for name, p in model.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_a_part_without_residual_out_is_refused_naming_the_group():
    class Bare(torch.nn.Module):
        def __init__(self, d_model):
            super().__init__()
            self.lin = torch.nn.Linear(d_model, d_model)

        def forward(self, x):
            return self.lin(x)

    cfg = compose_cfg(SMALL).model
    from hydra.utils import instantiate
    parts = {k: instantiate(cfg[k]) for k in ("attention", "position", "norm")}
    with pytest.raises(ValueError, match=r"model\.ffn is Bare, which has no residual_out\(\)"):
        Transformer(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=32,
                    ffn=Bare, **parts)
