"""Mixture of Experts: routing against a per-token reference, the balancing losses against their
formulas and Hugging Face, aux-free balancing, capacity, checkpoint state, the training callbacks."""

import io
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import compose_cfg, options
from minillm import build_model
from minillm.model.experts import HAS_GROUPED_MM
from minillm.model.moe import MoE
from minillm.model.router import balance_loss, z_loss

C, E, K, F_ = 16, 4, 2, 8
KERNELS = ["sorted"] + (["grouped"] if HAS_GROUPED_MM else [])
ROUTING = {
    "softmax": {},
    "softmax_no_renorm": {"renormalize": False},
    "sigmoid": {"gate": "sigmoid"},
    "shared": {"n_shared": 2, "d_shared": 4},
    "auxfree": {"gate": "sigmoid", "bias_update_rate": 1e-3},
    "capacity": {"capacity_factor": 0.75},
    "top1": {"top_k": 1, "renormalize": False},
}


def swiglu(x, w_gate_up, w_down):
    gate, up = (x @ w_gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w_down


def reference(moe: MoE, x3: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Token by token: score, choose by biased score, gate by unbiased score, honour capacity."""
    b, t_len = x3.shape[:2]
    x = x3.reshape(-1, x3.shape[-1])
    n, k = x.shape[0], moe.top_k
    bias = moe.router.expert_bias if moe.router.expert_bias is not None else torch.zeros(moe.n_experts)
    choices = []
    for t in range(n):
        logits = moe.router.proj.weight @ x[t]
        scores = logits.softmax(-1) if moe.router.gate == "softmax" else logits.sigmoid()
        chosen = sorted(range(moe.n_experts), key=lambda e: -(scores[e] + bias[e]).item())[:k]
        gates = scores[chosen]
        choices.append((chosen, gates / gates.sum() if moe.router.renormalize else gates))
    cap = math.inf if moe.capacity_factor is None else math.ceil(moe.capacity_factor * n * k / moe.n_experts)
    kept, used, dropped = {}, [0] * moe.n_experts, 0
    for p, i, j in itertools.product(range(t_len), range(b), range(k)):  # position, sequence, choice
        t = i * t_len + p
        e = choices[t][0][j]
        kept[t, j] = used[e] < cap
        used[e] += 1
        dropped += not kept[t, j]
    out = torch.zeros_like(x)
    for t in range(n):
        for j, (e, g) in enumerate(zip(*choices[t])):
            if kept[t, j]:
                out[t] += g * swiglu(x[t], moe.experts.w_gate_up[e], moe.experts.w_down[e])
        if moe.shared is not None:
            out[t] += moe.shared(x[t])
    return out, dropped


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("routing", sorted(ROUTING))
def test_output_matches_per_token_reference(routing, kernel):
    opts = {"top_k": K} | ROUTING[routing]
    moe = MoE(C, E, d_expert=F_, dispatch=kernel, **opts).eval()
    moe.train(routing == "capacity")  # capacity is a training-time budget; evaluation is dropless
    if moe.router.expert_bias is not None:  # a bias large enough to change choices
        moe.router.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    x = torch.randn(3, 8, C)
    with torch.no_grad():
        out = moe(x)
        ref, dropped = reference(moe, x)
    torch.testing.assert_close(out.view(-1, C), ref, atol=1e-5, rtol=1e-4)
    assert moe.stats["dropped"].item() == dropped
    if routing == "capacity":
        assert dropped > 0  # the case exercises dropping
        with torch.no_grad():
            moe.eval()(x)
        assert moe.stats["dropped"].item() == 0  # evaluation and decoding drop nothing


def test_aux_free_bias_changes_choice_not_gates():
    moe = MoE(C, E, top_k=1, d_expert=F_, gate="sigmoid", renormalize=False, bias_update_rate=1e-3)
    x = torch.randn(32, C)
    before = moe.router(x)
    moe.router.expert_bias.copy_(torch.tensor([10.0, 0.0, 0.0, 0.0]))  # forces expert 0
    after = moe.router(x)
    assert (after.experts == 0).all() and not (before.experts == 0).all()
    torch.testing.assert_close(after.gates[:, 0], torch.sigmoid(after.logits[:, 0]))


def mixtral_formula(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Written out: N_exp * sum_e (share of tokens with e among their top-k) * (mean softmax prob)."""
    n, n_exp = logits.shape
    probs = torch.exp(logits) / torch.exp(logits).sum(dim=1, keepdim=True)
    top = [set(torch.argsort(probs[t], descending=True)[:k].tolist()) for t in range(n)]
    return n_exp * sum(sum(e in top[t] for t in range(n)) / n * probs[:, e].mean() for e in range(n_exp))


def routed_logits_layer(logits: torch.Tensor, **kw) -> MoE:
    """An MoE whose router maps the one-hot token t to the row ``logits[t]`` (identity features)."""
    n, n_exp = logits.shape
    moe = MoE(n, n_exp, d_expert=4, **kw)
    with torch.no_grad():
        moe.router.proj.weight.copy_(logits.t())
    return moe


def test_balance_loss_matches_formula_on_hand_built_logits():
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0], [0.0, 3.0, 2.0, 0.0], [1.0, 0.0, 3.0, 2.5],
                           [2.0, -1.0, 0.0, 3.0], [4.0, 0.0, 1.0, 0.5], [0.0, 0.1, 0.2, 0.3]])
    moe = routed_logits_layer(logits, top_k=2, aux_loss_coef=0.02)
    moe(torch.eye(6))
    expected = mixtral_formula(logits, 2)
    torch.testing.assert_close(moe.aux_losses["load_balance"], 0.02 * expected)
    torch.testing.assert_close(moe.stats["balance_loss"], expected)
    # Perfect balance: every expert chosen by half the tokens, uniform mean probabilities -> k.
    balanced = 5.0 * torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1.0]])
    torch.testing.assert_close(mixtral_formula(balanced, 2), torch.tensor(2.0))
    moe = routed_logits_layer(balanced, top_k=2)
    moe(torch.eye(4))
    torch.testing.assert_close(moe.stats["balance_loss"], torch.tensor(2.0))


def test_balance_loss_matches_transformers_mixtral():
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    hf = mixtral.load_balancing_loss_func  # (gate_logits: tuple of (N, E), num_experts, top_k, mask)
    logits = torch.randn(64, 8)
    probs = logits.softmax(-1)
    torch.testing.assert_close(balance_loss(probs, probs.topk(2).indices, 8),
                               hf((logits,), num_experts=8, top_k=2))
    # A whole model: the per-layer loss averaged over layers = mean of HF applied layer by layer.
    cfg = compose_cfg(["model=tiny", "model/ffn=moe", "data.vocab_size=4096", "model.ffn.aux_loss_coef=1.0"])
    model = build_model(cfg.model)
    captured = []
    for block in model.blocks:
        block.ffn.router.proj.register_forward_hook(lambda m, i, out: captured.append(out.detach()))
    ids = torch.randint(0, 4096, (2, 32))
    aux = model(ids, targets=ids).aux  # the forward's result carries its auxiliary losses
    per_layer = torch.stack([hf((lg,), num_experts=8, top_k=2) for lg in captured])
    torch.testing.assert_close(aux["load_balance"], per_layer.mean())
    # HF pools the layers before the product f.P: a different number (documented, not a bug).
    assert not torch.isclose(hf(tuple(captured), num_experts=8, top_k=2), per_layer.mean())


def test_z_loss_matches_formula():
    logits = torch.randn(10, E) * 3
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 10
    torch.testing.assert_close(z_loss(logits), torch.tensor(expected))
    moe = routed_logits_layer(logits, z_loss_coef=1e-3)
    moe(torch.eye(10))
    torch.testing.assert_close(moe.aux_losses["z_loss"], torch.tensor(1e-3 * expected))


def test_stats_are_detached_and_consistent():
    moe = MoE(C, E, top_k=K, d_expert=F_)
    moe(torch.randn(40, C))
    load = moe.stats["tokens_per_expert"]
    assert load.sum().item() == 40 * K
    torch.testing.assert_close(moe.stats["imbalance"], load.max() / load.mean())
    probs = moe.router.proj(torch.randn(3, C)).softmax(-1)
    assert 0 < moe.stats["entropy"].item() <= math.log(E) + 1e-6
    assert probs.shape == (3, E)
    assert not any(v.requires_grad for v in moe.stats.values())


def test_aux_free_bias_balances_skewed_router():
    torch.manual_seed(1)
    moe = MoE(C, E, top_k=K, d_expert=F_, gate="sigmoid", aux_loss_coef=0.0, bias_update_rate=1e-3)
    with torch.no_grad():  # feature 0 is constant 1: a fixed logit offset of +0.8 ... -0.8 per expert
        moe.router.proj.weight[:, 0] = torch.linspace(0.8, -0.8, E)
    x = torch.randn(128, C)
    x[:, 0] = 1.0

    def imbalance():
        with torch.no_grad():
            moe(x)
        return moe.stats["imbalance"].item()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only adds contention
    try:
        start = imbalance()
        for _ in range(250):  # one forward and one bias step per "optimizer step"
            imbalance()
            moe.update_bias()
        end = imbalance()
    finally:
        torch.set_num_threads(threads)
    assert start > 1.5 and end < 1.15, (start, end)
    assert moe.router.expert_bias[0] < 0 < moe.router.expert_bias[-1]


def test_capacity_drops_exactly_the_overflow():
    moe = MoE(C, E, top_k=K, d_expert=F_, capacity_factor=1.0)
    with torch.no_grad():  # skew towards expert 0 so that it overflows
        moe.router.proj.weight[0] += 0.5
    x = torch.randn(64, C)
    moe(x)
    cap = math.ceil(1.0 * 64 * K / E)
    load = moe.stats["tokens_per_expert"]
    assert moe.stats["dropped"].item() == (load - cap).clamp(min=0).sum().item() > 0


def test_capacity_routing_is_causal():
    moe = MoE(C, E, top_k=K, d_expert=F_, capacity_factor=0.5)
    x = torch.randn(3, 10, C)
    changed = x.clone()
    changed[:, 6:] = torch.randn(3, 4, C)  # new later tokens compete for the same capacity
    with torch.no_grad():
        before, after = moe(x), moe(changed)
    assert moe.stats["dropped"] > 0
    torch.testing.assert_close(before[:, :6], after[:, :6], rtol=0, atol=0)


def test_state_dict_round_trip_keeps_bias():
    moe = MoE(C, E, top_k=K, d_expert=F_, bias_update_rate=1e-3).train()
    moe(torch.randn(30, C))
    moe.update_bias()
    assert moe.router.expert_bias.abs().sum() > 0
    buf = io.BytesIO()
    torch.save(moe.state_dict(), buf)
    buf.seek(0)
    fresh = MoE(C, E, top_k=K, d_expert=F_, bias_update_rate=1e-3)
    fresh.load_state_dict(torch.load(buf))
    torch.testing.assert_close(fresh.router.expert_bias, moe.router.expert_bias)
    assert "router.load" not in moe.state_dict()  # accumulation state is per step, not saved


def test_gradients_reach_router_and_experts():
    moe = MoE(C, E, top_k=K, d_expert=F_, z_loss_coef=1e-3)
    (moe(torch.randn(20, C)).square().sum() + sum(moe.aux_losses.values())).backward()
    assert moe.router.proj.weight.grad.abs().sum() > 0
    assert moe.experts.w_gate_up.grad.abs().sum() > 0
    auxfree = MoE(C, E, top_k=K, d_expert=F_, gate="sigmoid", bias_update_rate=1e-3)
    auxfree(torch.randn(20, C)).square().sum().backward()
    assert auxfree.router.proj.weight.grad.abs().sum() > 0
    assert not auxfree.router.expert_bias.requires_grad  # moved by update_bias(), not by gradients


@pytest.mark.skipif(len(KERNELS) < 2, reason="torch._grouped_mm is unavailable")
def test_grouped_and_sorted_kernels_agree_with_gradients():
    moes = [MoE(C, E, top_k=K, d_expert=F_, dispatch=k) for k in KERNELS]
    moes[1].load_state_dict(moes[0].state_dict())
    x = torch.randn(50, C)
    for m in moes:
        m(x).square().sum().backward()
    a, b = moes
    torch.testing.assert_close(a.experts.w_down.grad, b.experts.w_down.grad)
    torch.testing.assert_close(a.router.proj.weight.grad, b.router.proj.weight.grad)


def test_invalid_options_name_the_key():
    for kw, key in [({"gate": "relu"}, "gate"), ({"top_k": 9}, "top_k"),
                    ({"capacity_factor": 0}, "capacity_factor"), ({"dispatch": "x"}, "dispatch"),
                    ({"bias_update_rate": -1}, "bias_update_rate")]:
        with pytest.raises(ValueError, match=f"model.ffn.{key}"):
            MoE(C, E, **kw)


@pytest.mark.parametrize("ffn", [f for f in options("model/ffn") if f.startswith("moe")])
def test_active_params_count_only_routed_top_k(ffn):
    model = build_model(compose_cfg(["model=tiny", f"model/ffn={ffn}", "data.vocab_size=4096"]).model)
    bank = sum(p.numel() for b in model.blocks for p in b.ffn.experts.parameters())
    ffn0 = model.blocks[0].ffn
    expected = model.num_params() - bank * (ffn0.n_experts - ffn0.top_k) // ffn0.n_experts
    assert model.num_params(active=True) == expected


def test_dense_twin_matches_moe_active_params():
    moe = build_model(compose_cfg(["model=moe_rope", "data.vocab_size=4096"]).model)
    dense = build_model(compose_cfg(["model=dense_rope", "data.vocab_size=4096"]).model)
    routers = sum(b.ffn.router.proj.weight.numel() for b in moe.blocks)
    assert moe.num_params(active=True) - dense.num_params() == routers
    assert routers / dense.num_params() < 0.002


def test_training_callbacks_log_update_bias_and_draw(tmp_path):
    L = pytest.importorskip("lightning")
    from lightning.pytorch.loggers import CSVLogger

    from minillm.training.moe import ExpertBiasUpdate, MoEMonitor, plot_expert_load

    model = build_model(compose_cfg(["model=tiny", "model/ffn=moe_auxfree", "data.vocab_size=256",
                                     "model.n_layers=2"]).model)

    class Module(L.LightningModule):  # the minimum the callbacks rely on: .model, aux losses added
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            out = self.model(batch[:, :-1], targets=batch[:, 1:])
            return out.loss + sum(out.aux.values())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    calls = []
    layer = model.blocks[0].ffn
    layer.update_bias = lambda: calls.append(1) or MoE.update_bias(layer)
    tokens = torch.randint(0, 256, (24, 17))
    batches = torch.utils.data.DataLoader(tokens, batch_size=2)  # 12 micro-batches (2, 17)
    monitor = MoEMonitor(log_every_n_steps=2)
    trainer = L.Trainer(max_steps=5, accumulate_grad_batches=2, logger=CSVLogger(tmp_path, name="log"),
                        callbacks=[monitor, ExpertBiasUpdate()], default_root_dir=tmp_path,
                        accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(Module(), batches)
    assert len(calls) == 5  # once per optimizer step, not per micro-batch
    bias = model.blocks[1].ffn.router.expert_bias
    assert 0 < bias.abs().max() <= 5 * 1e-3 + 1e-9
    assert monitor.steps == [2, 4]
    for h in monitor.history:  # loads summed over 2 steps x 2 micro-batches of B*T*K assignments
        assert (h.sum(dim=-1) == 2 * 2 * (2 * 16 * 2)).all()
    assert (tmp_path / "expert_load.png").stat().st_size > 0
    header = (tmp_path / "log" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    for key in ("moe/layer1/imbalance", "moe/layer0/entropy", "moe/layer0/dropped", "moe/layer1/tokens_e7"):
        assert key in header
    loads = plot_expert_load(model, [(b[:, :-1], b[:, 1:]) for b in tokens[:6].split(2)], tmp_path / "val.png")
    assert loads.shape == (3, 2, 8) and (loads.sum(dim=-1) == 2 * 16 * 2).all()
    assert (tmp_path / "val.png").stat().st_size > 0


def test_torch_compile_matches_eager():
    moe = MoE(C, E, top_k=K, d_expert=F_)  # grouped on CPU eager; the compiler needs a fallback
    x = torch.randn(2, 8, C)
    torch.testing.assert_close(torch.compile(moe, backend="eager")(x), moe(x))


def test_train_and_eval_an_moe_run_end_to_end(tmp_path):
    import eval as eval_script
    import train
    from conftest import TINY_TRAIN

    run_dir = tmp_path / "run"
    train.main(compose_cfg(TINY_TRAIN + ["model/ffn=moe_auxfree", "model.ffn.d_expert=32",
                                         f"run_dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}"]))
    assert (run_dir / "expert_load.png").stat().st_size > 0  # MoEMonitor from callbacks/default.yaml
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    bias = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    bias = bias["model.blocks.0.ffn.router.expert_bias"]
    assert 0 < bias.abs().max() <= 4 * 1e-3 + 1e-9  # ExpertBiasUpdate stepped it, once per step
    header = next((run_dir).rglob("metrics.csv")).read_text().splitlines()[0]
    assert "moe/layer0/imbalance" in header
    result = eval_script.main(compose_cfg([f"ckpt_path={ckpt}", "mode=experts", "expert_batches=2",
                                           "batch_size=2"], "eval"))
    assert len(result["imbalance"]) == 1 and result["imbalance"][0] >= 1.0
    assert (ckpt.parent / "expert_load.png").stat().st_size > 0
