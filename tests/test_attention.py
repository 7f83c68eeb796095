"""Attention backends agree with the explicit ``math`` kernel, forward and backward."""

import pytest
import torch

from conftest import options
from minillm.model import attention as attn_mod
from minillm.model.attention import KERNELS, Attention, math_attention
from minillm.model.position import ALiBi, PositionEncoding
from tiny_models import component, tiny_model

BACKENDS = [b for b in KERNELS if b != "math" and (b != "flash_attn" or not attn_mod._flash_attn_missing())]
LAYOUTS = {"mha": 4, "gqa": 2, "mqa": 1}  # n_kv_heads at 4 query heads
BIAS = {"none": PositionEncoding(32, 4, 64), "alibi": ALiBi(32, 4, 64)}  # what a kernel sees


# (device, dtype) -> tolerance against math computed in float32 on the same inputs
SETTINGS = {("cpu", torch.float32): 1e-5}
if torch.cuda.is_available():
    SETTINGS[("cuda", torch.bfloat16)] = 2e-2


def qkv(n_kv_heads: int, t_q: int = 40, t_k: int = 40, grad: bool = True, device: str = "cpu",
        dtype: torch.dtype = torch.float32):
    shapes = [(2, 4, t_q, 8), (2, n_kv_heads, t_k, 8), (2, n_kv_heads, t_k, 8)]
    return [torch.randn(s, device=device, dtype=dtype, requires_grad=grad) for s in shapes]


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", BIAS)
def test_kernel_matches_math_forward_and_backward(backend, layout, bias, setting):
    (device, dtype), tol = setting, SETTINGS[setting]
    scheme = BIAS[bias].to(device)
    q, k, v = qkv(LAYOUTS[layout], device=device, dtype=dtype)
    grad_out = torch.randn(2, 4, 40, 8, device=device, dtype=dtype)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref, _ = math_attention(q32, k32, v32, scheme, None)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), grad_out.float())
    y, _ = KERNELS[backend](q, k, v, scheme, None)
    grads = torch.autograd.grad(y, (q, k, v), grad_out)
    torch.testing.assert_close(y.float(), ref, atol=tol, rtol=10 * tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r, atol=tol, rtol=10 * tol)
    with torch.no_grad():  # flex runs its own kernel only without autograd on CPU
        torch.testing.assert_close(KERNELS[backend](q, k, v, scheme, None)[0].float(), ref,
                                   atol=tol, rtol=10 * tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", BIAS)
def test_kernel_queries_are_the_last_keys(backend, bias):
    """Tq < Tk without a mask: query i sits at absolute index i + Tk - Tq (causal, ALiBi distance)."""
    q, k, v = qkv(2, t_q=5, t_k=40, grad=False)
    ref, weights = math_attention(q, k, v, BIAS[bias], None)
    assert weights[..., 0, 36:].abs().max() == 0  # first query (index 35) sees keys 0..35
    torch.testing.assert_close(KERNELS[backend](q, k, v, BIAS[bias], None)[0], ref,
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_with_padding_mask_matches_math(backend):
    q, k, v = qkv(2, t_q=3, t_k=12, grad=False)
    mask = torch.rand(2, 1, 3, 12) < 0.7
    mask[..., -1] = True  # every query sees at least one key
    ref, _ = math_attention(q, k, v, BIAS["alibi"], mask)
    torch.testing.assert_close(KERNELS[backend](q, k, v, BIAS["alibi"], mask)[0], ref,
                               atol=1e-5, rtol=1e-4)


def test_flex_never_materialises_the_alibi_bias(monkeypatch):
    q, k, v = qkv(2, grad=False)
    ref, _ = math_attention(q, k, v, BIAS["alibi"], None)

    def refuse(*args):
        raise AssertionError("flex built the T x T bias")

    monkeypatch.setattr(ALiBi, "score_bias", refuse)
    with torch.no_grad():
        torch.testing.assert_close(KERNELS["flex"](q, k, v, BIAS["alibi"], None)[0], ref,
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("position", options("model/position"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_backends_agree_for_every_position_scheme(position, backend):
    torch.manual_seed(0)
    ref = tiny_model("gqa", position, backend="math")
    model = tiny_model("gqa", position, backend=backend)
    model.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx), atol=1e-5, rtol=1e-4)
    model(idx).logsumexp(-1).mean().backward()
    ref(idx).logsumexp(-1).mean().backward()
    for (name, p), r in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad, atol=1e-5, rtol=1e-4, msg=name)


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
