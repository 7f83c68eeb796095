"""The 2024-2026 recipe's training side: optimizer=muon (parameter split, fused matrices, schedule,
state, resume, bad settings), data.document_mask (batches, the one-story refusal, documents reaching
the model, validation both ways), the model=modern and experiment=ablate_recipe presets, and the
golden learning test (llama2.c's test_all.py): a model must learn the synthetic corpus."""

import inspect
import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN, compose_cfg, options
from hydra.utils import instantiate

import train
from minillm.data import EOT, TokenDataModule, generate_stories
from minillm.model import Transformer, build_model
from minillm.model.attention import Attention
from minillm.training.optimizers import MuonAdamW, optimizer_param_groups
from minillm.training.schedule import warmup_cosine, warmup_cosine_lr
from minillm.training import assemble

# Parts of the recipe come from other branches (parts: relu2, qk_norm, init, logit_softcap;
# masks: local_global windows, Transformer(documents=)): what needs them runs once they are merged.
PARTS_MERGED = "relu2" in options("model/ffn") and "qk_norm" in inspect.signature(Attention).parameters
DOCUMENTS_IN_MODEL = "documents" in inspect.signature(Transformer.forward).parameters
RECIPE_MERGED = PARTS_MERGED and DOCUMENTS_IN_MODEL and "local_global" in options("model/attention")
needs_parts = pytest.mark.skipif(not PARTS_MERGED, reason="needs the parts branch")
needs_recipe = pytest.mark.skipif(not RECIPE_MERGED, reason="needs the parts and masks branches")


def _small(preset: str) -> Transformer:
    cfg = compose_cfg([f"model={preset}", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
                       "model.max_seq_len=32", "data.vocab_size=512"])
    return build_model(cfg.model)


def _muon(model: Transformer, **kw) -> MuonAdamW:
    return MuonAdamW(MuonAdamW.param_groups_of(model, kw.pop("weight_decay", 0.1)), **kw)


def _train(run_dir, cache, *overrides):
    return train.main(compose_cfg(TINY_TRAIN + [f"run_dir={run_dir}", f"data.cache_dir={cache}", *overrides]))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The synthetic token cache of TINY_TRAIN, shared with the other test files."""
    return tmp_path_factory.getbasetemp() / "data_cache"


# ---- optimizer=muon ----

@pytest.mark.parametrize("preset", [p for p in options("model") if p != "modern" or PARTS_MERGED])
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(preset):
    model = _small(preset)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [{names[id(p)] for p in g["params"]} for g in _muon(model).param_groups]
    assert sum(map(len, groups)) == len(names) and len(set().union(*groups)) == len(names)
    muon = {n for n, p in model.named_parameters() if any(p is q for q in _muon_params(model))}
    expected = {f"{n}.weight" for n, m in model.blocks.named_modules(prefix="blocks")
                if isinstance(m, torch.nn.Linear) and "router" not in n}
    assert muon == expected and muon  # attention qkv/proj and FFN matrices, never a router
    assert any(n.endswith("attn.qkv.weight") for n in muon)
    assert any(".ffn." in n for n in muon) or "moe" in preset  # a MoE's experts are 3-D banks
    adamw = set(names.values()) - muon
    assert "tok_emb.weight" in adamw and all("norm" not in n for n in muon)
    assert all(p.dim() == 2 for p in _muon_params(model))  # torch's Muon takes 2-D only
    if "moe" in preset:  # routers and 3-D expert banks: AdamW, decayed
        decayed = next(g for g in _muon(model).param_groups if "momentum" not in g and g["weight_decay"])
        decayed = {names[id(p)] for p in decayed["params"]}
        assert any("router" in n for n in decayed) and any("experts.w_" in n for n in decayed)


def _muon_params(model):
    return [p for g in MuonAdamW.param_groups_of(model, 0.1) if g.get("muon") for p in g["params"]]


def test_fused_matrices_are_orthogonalized_whole():
    """qkv and gate_up get torch's Muon update of the whole fused matrix (the documented choice),
    which differs from orthogonalizing the q rows alone (modded-nanogpt's per-matrix split)."""
    model = _small("tiny")
    attn, ffn = model.blocks[0].attn, model.blocks[0].ffn
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = {name: m.weight.detach().clone() for name, m in (("qkv", attn.qkv), ("gate_up", ffn.gate_up))}
    _muon(model, muon_lr=0.01, weight_decay=0.0).step()
    for name, m in (("qkv", attn.qkv), ("gate_up", ffn.gate_up)):
        reference = torch.nn.Parameter(before[name].clone())
        reference.grad = m.weight.grad.clone()
        torch.optim.Muon([reference], lr=0.01, weight_decay=0.0, adjust_lr_fn="original").step()
        assert torch.equal(m.weight.detach(), reference.detach()), name
    rows = attn.n_heads * attn.head_dim  # the q block
    q = torch.nn.Parameter(before["qkv"][:rows].clone())
    q.grad = attn.qkv.weight.grad[:rows].clone()
    torch.optim.Muon([q], lr=0.01, weight_decay=0.0, adjust_lr_fn="original").step()
    assert not torch.allclose(q.detach(), attn.qkv.weight.detach()[:rows], atol=1e-5)


def test_schedule_scales_every_group_from_its_own_lr_and_the_closure_runs_once():
    model = _small("tiny")
    optimizer = _muon(model, lr=1e-3, muon_lr=0.02, adjust_lr_fn="original")
    assert optimizer.param_groups[0]["lr"] == 1e-3  # AdamW's first: train/lr logs optimizer.lr
    scheduler = warmup_cosine(optimizer, warmup_steps=3, max_steps=10, min_lr=1e-4)
    calls = []
    for step in range(12):
        for group in optimizer.param_groups:  # each to its own floor: min_lr * its lr / optimizer.lr
            base = group["initial_lr"]
            assert group["lr"] == pytest.approx(warmup_cosine_lr(step, base, 3, 10, 1e-4 * base / 1e-3))
        inner = [g["lr"] for o in optimizer.optimizers for g in o.param_groups]
        assert inner == [g["lr"] for g in optimizer.param_groups]  # the same group dicts
        model.zero_grad()
        optimizer.step(lambda: calls.append(1) or model(torch.randint(0, 512, (2, 8)),
                                                         targets=torch.randint(0, 512, (2, 8))).loss.backward())
        scheduler.step()
    assert len(calls) == 12
    assert {g["initial_lr"] for g in optimizer.param_groups} == {1e-3, 0.02}


def test_state_dict_round_trips_and_the_loaded_optimizer_continues_identically():
    models = [_small("tiny"), _small("tiny")]
    models[1].load_state_dict(models[0].state_dict())
    first = _muon(models[0])
    x = torch.randint(0, 512, (2, 8))
    for _ in range(2):
        models[0].zero_grad()
        models[0](x, targets=x).loss.backward()
        first.step()
    models[1].load_state_dict(models[0].state_dict())
    second = _muon(models[1])
    saved = first.state_dict()
    torch.save(saved, buffer := __import__("io").BytesIO())  # plain data: loads with weights_only
    buffer.seek(0)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    assert second.param_groups[-1] is second.optimizers[-1].param_groups[-1]  # still shared
    for model, optimizer in zip(models, (first, second)):
        model.zero_grad()
        model(x, targets=x).loss.backward()
        optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
    assert len(saved["state"]) == sum(1 for _ in models[0].parameters())


def test_muon_run_resumes_bit_identically(cache, tmp_path):
    """optimizer=muon with gradient clipping (trainer=cpu), accumulation and dropout: 2 steps, a
    resume, 2 more steps equal 4 uninterrupted steps bit for bit (weights, optimizer, schedule)."""
    run = ["optimizer=muon", "model.dropout=0.1", "trainer.accumulate_grad_batches=2", "logger=none"]
    _train(tmp_path / "straight", cache, *run)
    _train(tmp_path / "resumed", cache, *run, "trainer.max_steps=2", "scheduler.max_steps=4")
    _train(tmp_path / "resumed", cache, *run, "ckpt_path=last")
    straight, resumed = (torch.load(tmp_path / r / "checkpoints" / "last.ckpt", weights_only=True)
                         for r in ("straight", "resumed"))
    assert resumed["global_step"] == straight["global_step"] == 4
    for key, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    (a,), (b,) = straight["optimizer_states"], resumed["optimizer_states"]
    assert a["state"].keys() == b["state"].keys() and len(a["param_groups"]) == 2  # AdamW, Muon
    for i in a["state"]:
        assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for k in a["state"][i]), i
    assert a["param_groups"] == b["param_groups"]
    assert resumed["lr_schedulers"] == straight["lr_schedulers"]


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=-1", "optimizer.lr=-1 must be a number >= 0"),
    ("optimizer.muon_lr=-0.02", "optimizer.muon_lr=-0.02 must be a number >= 0"),
    ("optimizer.momentum=1.5", "optimizer.momentum=1.5 must be in [0, 1)"),
    ("optimizer.adjust_lr_fn=spectral", "optimizer.adjust_lr_fn='spectral' must be one of original, match_rms_adamw"),
    ("optimizer.ns_steps=100", "optimizer.ns_steps=100 must be an integer in [1, 100)"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay=-0.1"),
    ("optimizer.betas=[0.9,1.0]", "optimizer.betas=[0.9, 1.0] must be two numbers in [0, 1)"),
    ("optimizer.eps=0", "optimizer.eps=0 must be a number > 0"),
])
def test_bad_muon_settings_fail_in_assemble_naming_the_key(override, message, cache, tmp_path):
    cfg = compose_cfg(TINY_TRAIN + [f"run_dir={tmp_path}", f"data.cache_dir={cache}", "optimizer=muon", override])
    with pytest.raises(ValueError) as info:
        assemble(cfg)
    assert message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(SystemExit) as exit_info:  # train.py: the same line, before any data is read
        _train(tmp_path / "run", tmp_path / "fresh_cache", "optimizer=muon", override)
    assert exit_info.value.code == 2 and not (tmp_path / "fresh_cache").exists()


# ---- data.document_mask ----

def _datamodule(cache, **kw) -> TokenDataModule:
    cfg = compose_cfg(TINY_TRAIN + [f"data.cache_dir={cache}"]).data
    return instantiate(cfg, **kw)


def test_document_ids_count_the_stories_started_in_each_window(cache):
    plain, masked = _datamodule(cache), _datamodule(cache, document_mask=True)
    plain.setup(), masked.setup()
    eot = masked.eot_id
    tokens = np.memmap(masked.folder / "train.bin", dtype=masked.manifest["dtype"], mode="r")
    stream, reference = masked.train_stream(), plain.train_stream()
    crossed = 0
    for n in range(8):
        x, y, documents = stream.batch(tokens, n)
        assert all(torch.equal(a, b) for a, b in zip((x, y), reference.batch(tokens, n)))  # same windows
        assert documents.dtype == torch.int64 and documents.shape == x.shape
        for row_x, row_d in zip(x.tolist(), documents.tolist()):  # the definition, token by token
            assert row_d == [sum(t == eot for t in row_x[:i + 1]) for i in range(len(row_x))]
        crossed += int((documents[:, -1] > documents[:, 0]).sum())
    assert crossed  # some windows span a story boundary (the 32-token windows of ~150-token stories)
    val = next(iter(masked.val_dataloader()))
    assert len(val) == 3 and torch.equal(val[2], torch.cumsum(val[0] == eot, dim=1))
    assert len(next(iter(plain.val_dataloader()))) == 2  # the default path: (x, y) as before


def test_document_mask_on_one_story_data_fails_before_training(tmp_path, capsys):
    data = tmp_path / "one_story"
    data.mkdir()
    # Training text without <|endoftext|> lines reads as one story: no boundary to mask.
    (data / "train.txt").write_text("\n".join(generate_stories(30, 2)))
    (data / "validation.txt").write_text("".join(f"{s}\n{EOT}\n" for s in generate_stories(10, 2, "validation")))
    overrides = [o for o in TINY_TRAIN if not o.startswith(("data=", "data.n_stories"))]
    cfg = compose_cfg(overrides + ["data=tinystories", f"data.path={data}", "data.document_mask=true",
                                   f"run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(SystemExit) as info:
        train.main(cfg)
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the tokenizer's progress bars
    assert info.value.code == 2 and err.startswith("error: data.document_mask=true: the training")
    assert "valid: data.document_mask=false" in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # before the first step


def test_documents_reach_the_model_and_validation_reports_both_ways(cache, tmp_path, monkeypatch):
    real, seen = Transformer.forward, []

    def forward(self, idx, cache=None, targets=None, **kw):
        if targets is not None:  # the losses of training and validation (not text samples)
            seen.append((self.training, kw.get("documents")))
        if "documents" in kw and kw["documents"] is not None:
            assert torch.equal(kw["documents"], torch.cumsum(idx == eot, dim=1))
        return real(self, idx, cache, targets, **kw) if DOCUMENTS_IN_MODEL else real(self, idx, cache, targets)

    eot = _datamodule(cache).eot_id
    monkeypatch.setattr(Transformer, "forward", forward)
    _train(tmp_path / "masked", cache, "data.document_mask=true", "logger=none")
    training = [d for t, d in seen if t]
    assert training and all(d is not None for d in training)
    validation = [d is None for t, d in seen if not t]  # masked, then unmasked: one each per batch
    assert validation and validation[::2] == [False] * (len(validation) // 2) and all(validation[1::2])
    history = [json.loads(line) for line in (tmp_path / "masked" / "metrics.jsonl").read_text().splitlines()]
    for h in history:
        assert math.isfinite(h["val_loss_unmasked"]) and h["val_bpb_unmasked"] > 0
        ratio = h["val_bpb_unmasked"] / h["val_loss_unmasked"]
        assert ratio == pytest.approx(h["val_bpb"] / h["val_loss"])  # the same bytes per token
        if not DOCUMENTS_IN_MODEL:  # until the model masks, both are the same number
            assert h["val_loss_unmasked"] == pytest.approx(h["val_loss"])
    seen.clear()
    _train(tmp_path / "plain", cache, "logger=none")
    assert seen and all(d is None for _, d in seen)  # default: the model is called as before
    plain = json.loads((tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "val_loss_unmasked" not in plain


# ---- presets ----

@needs_parts
def test_modern_preset_has_the_recipe_and_trains_with_muon_and_document_masks():
    cfg = compose_cfg(["model=modern", "optimizer=muon", "data.document_mask=true"])
    model = build_model(cfg.model)
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads) == (288, 6, 6)  # llama2.c 15M
    assert model.blocks[0].attn.q_norm is not None and type(model.blocks[0].ffn).__name__ == "ReLU2"
    assert cfg.model.logit_softcap == 15 and cfg.model.init == "zero_proj"
    optimizer = instantiate(cfg.optimizer)
    assert isinstance(optimizer(optimizer_param_groups(optimizer, model)), MuonAdamW)


@needs_recipe
def test_ablate_recipe_members_each_change_one_part_from_the_baseline():
    members = ["baseline", "qk_norm", "relu2", "softcap", "zero_proj", "window", "document_mask", "muon", "all"]
    cfgs = {m: compose_cfg(["experiment=ablate_recipe", f"ablate/recipe={m}"]) for m in members}
    assert options("ablate/recipe") == sorted(members)
    base = cfgs["baseline"]
    assert base.model.attention._target_.endswith("Attention") and base.optimizer._target_ == "torch.optim.AdamW"
    changed = {
        "qk_norm": cfgs["qk_norm"].model.attention.qk_norm,
        "relu2": cfgs["relu2"].model.ffn._target_.endswith("ReLU2"),
        "softcap": cfgs["softcap"].model.logit_softcap == 15,
        "zero_proj": cfgs["zero_proj"].model.init == "zero_proj",
        "window": cfgs["window"].model.attention.window == 64,
        "document_mask": cfgs["document_mask"].data.document_mask,
        "muon": cfgs["muon"].optimizer._target_.endswith("MuonAdamW"),
    }
    assert all(changed.values()), changed
    everything = cfgs["all"]
    assert everything.model.attention.qk_norm and everything.model.ffn._target_.endswith("ReLU2")
    assert everything.model.attention.window == 64 and everything.data.document_mask
    assert everything.optimizer._target_.endswith("MuonAdamW") and everything.optimizer.lr == base.optimizer.lr
    models = {m: build_model(c.model) for m, c in cfgs.items()}
    assert models["relu2"].num_params() == models["baseline"].num_params()  # d_hidden 4.5C: equal weights
    assert [m.blocks[i].attn.window for i in range(4) for m in [models["window"]]] == [64, None, 64, None]


# ---- golden learning test ----

GOLDEN = ["model.max_seq_len=64", "data.batch_size=16", "trainer.max_steps=60",
          "trainer.val_check_interval=60", "trainer.limit_val_batches=4", "scheduler.warmup_steps=10",
          "optimizer.lr=3e-3", "logger=none", "~callbacks.samples"]
TINY_SHAPE = ["model.d_model=128", "model.n_layers=4", "model.n_heads=4"]  # the tiny preset's own


@pytest.mark.parametrize("preset", [
    pytest.param(["model=tiny", *TINY_SHAPE], id="tiny"),
    # The modern model's parts at the tiny shape, with AdamW: torch's Muon runs its Newton-Schulz in
    # bfloat16, ~1 s per step of the tiny model on an AVX2 CPU (its resume test trains it).
    pytest.param(["model=modern", *TINY_SHAPE], id="modern", marks=needs_parts),
])
def test_golden_a_model_learns_the_synthetic_corpus(preset, cache, tmp_path):
    """60 steps of 16 x 64 tokens reach a validation loss of at most 3.6 nats/token (measured:
    2.92 for tiny, 2.59 for modern's parts; untrained: ln 512 = 6.24). Fails if training is broken (measured: a zero
    learning rate ends at 6.27, targets shuffled within each batch at 5.19)."""
    loss = _train(tmp_path / "run", cache, *preset, *GOLDEN)
    assert loss < 3.6, f"{preset}: validation loss {loss:.3f} after 60 steps"
