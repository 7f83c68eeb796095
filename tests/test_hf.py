"""Hugging Face interop: parity with transformers' reference models, export/import round trips.

Reference models are built from configs with random weights (no network) and run eager attention;
exported folders load with transformers' defaults, as a user would. Parity means fp32 logits
within 1e-4 and the same greedy tokens. Tests that need ``transformers`` skip without it.
"""

import inspect
import json

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minillm import build_model, export_hf, from_hf
from minillm.interop import hf_model_config
from minillm.model.attention import Attention
from tests.conftest import compose_cfg, options

V = 310  # model vocabulary: the tiny tokenizer's ~300 tokens and spare ids (minillm pads to 320)
TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=64",
        "data=synthetic", f"data.vocab_size={V}"]
TEXT = ["Once upon a time there was a little dog.", "The dog liked to play in the park.",
        "One day the sun was hot and the cat was sad.", "They were happy and played all day."]


@pytest.fixture(scope="session")  # session: skips before the session-scoped tiny_run trains
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A tiny byte-level BPE trained in-process, with minillm's special token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    return tok


@torch.no_grad()
def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere (norm scales around 1, nonzero biases), so every tensor matters."""
    for name, p in model.named_parameters():
        p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() == 1 and "norm" in name else 0.0))
    return model.eval()


def minillm_model(overrides: list[str]):
    return randomize(build_model(compose_cfg(TINY + overrides).model))


@torch.no_grad()
def greedy(model, ids: torch.Tensor, n: int, eos: int | None = None) -> torch.Tensor:
    """Argmax decoding by full recomputation; stops after ``eos`` as HF ``generate`` does."""
    for _ in range(n):
        nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        if nxt.item() == eos:
            break
    return ids


@torch.no_grad()
def assert_parity(mini, hf, eos: int | None = None, vocab: int = V) -> None:
    """Same fp32 logits (max abs difference < 1e-4) and the same greedy continuation."""
    ids = torch.randint(0, vocab, (2, 24))
    diff = (mini(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-4, diff
    prompt = ids[:1, :6]
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                      max_new_tokens=12, eos_token_id=eos, pad_token_id=eos)
    assert torch.equal(greedy(mini, prompt, 12, eos), ref)


# ---- Hugging Face reference model -> from_hf -> minillm

def reference(transformers, kind: str, **overrides):
    """A tiny HF model of ``kind`` with random weights, eager attention."""
    common = dict(vocab_size=256, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      layer_norm_epsilon=1e-5, **common, **overrides)
        model = transformers.GPT2LMHeadModel
    else:
        body = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                    rope_parameters={"rope_type": "default", "rope_theta": 500.0})
        body.update(overrides)
        if kind == "mixtral":
            cfg = transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2,
                                             router_aux_loss_coef=0.02, **common, **body)
            model = transformers.MixtralForCausalLM
        elif kind == "qwen3":
            cfg = transformers.Qwen3Config(**{"head_dim": 16, **common, **body})
            model = transformers.Qwen3ForCausalLM
        else:
            cfg = transformers.LlamaConfig(**common, **body)
            model = transformers.LlamaForCausalLM
    cfg._attn_implementation = "eager"
    return randomize(model(cfg))


REFERENCES = {
    "llama-gqa": ("llama", {}),
    "llama-mqa-bias-tied-linear-rope": ("llama", dict(
        num_key_value_heads=1, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    "mixtral": ("mixtral", {}),
    "gpt2-untied": ("gpt2", dict(tie_word_embeddings=False)),
    "qwen3-gqa": ("qwen3", {}),
    "qwen3-mqa-bias-tied": ("qwen3", dict(num_key_value_heads=1, attention_bias=True,
                                          tie_word_embeddings=True, rms_norm_eps=1e-6)),
}


@pytest.mark.parametrize("case", sorted(REFERENCES))
def test_from_hf_matches_reference(transformers, tmp_path, case):
    kind, overrides = REFERENCES[case]
    hf = reference(transformers, kind, **overrides)
    hf.save_pretrained(tmp_path)
    mini, tok = from_hf(tmp_path)
    assert tok is None
    assert_parity(mini, hf, vocab=256)


def test_from_hf_reads_fused_mixtral_layout(transformers, tmp_path):
    """transformers >= 5 holds experts fused (mlp.experts.gate_up_proj); that layout imports too."""
    hf = reference(transformers, "mixtral")
    hf.save_pretrained(tmp_path / "hub")  # Hub layout: block_sparse_moe.experts.{e}.w1/w2/w3
    (tmp_path / "fused").mkdir()
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "fused" / "model.safetensors")
    (tmp_path / "fused" / "config.json").write_text((tmp_path / "hub" / "config.json").read_text())
    assert any("gate_up_proj" in k for k in hf.state_dict())
    a, b = from_hf(tmp_path / "hub")[0].state_dict(), from_hf(tmp_path / "fused")[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- minillm -> export_hf -> AutoModelForCausalLM, and back with from_hf

EXPORTS = {
    "llama": (["model=llama"], "LlamaForCausalLM"),
    "llama-mqa-ntk-rope": (["model=llama", "model/attention=mqa", "model.position.scaling=ntk",
                            "model.position.factor=4.0", "model.position.theta=500.0",
                            "model.norm.eps=1e-6"], "LlamaForCausalLM"),
    "llama-mha-bias-untied-linear-rope": (
        ["model=llama", "model/attention=mha", "model.attention.bias=true", "model.ffn.bias=true",
         "model.tie_embeddings=false", "model.position.scaling=linear", "model.position.factor=2.0"],
        "LlamaForCausalLM"),
    "gpt2": (["model=gpt2"], "GPT2LMHeadModel"),
    "gpt2-bias-untied": (["model=gpt2", "model.attention.bias=true", "model.ffn.bias=true",
                          "model.tie_embeddings=false"], "GPT2LMHeadModel"),
    "qwen3-gqa": (["model=llama", "model/attention=gqa_qknorm"], "Qwen3ForCausalLM"),
    "qwen3-mqa-bias-untied-linear-rope-eps": (
        ["model=llama", "model/attention=mqa", "model.attention.qk_norm=true",
         "model.attention.bias=true", "model.tie_embeddings=false", "model.position.scaling=linear",
         "model.position.factor=2.0", "model.norm.eps=1e-6", "model.attention.qk_norm_eps=1e-6"],
        "Qwen3ForCausalLM"),
}


def check_export(transformers, tokenizer, folder, overrides: list[str], architecture: str) -> None:
    """Export, load with AutoModelForCausalLM, check parity, import back and compare weights."""
    mini = minillm_model(overrides)
    export_hf(mini, folder, tokenizer)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()  # as a user would
    assert type(hf).__name__ == architecture
    eos = tokenizer.token_to_id("<|endoftext|>")
    assert hf.config.eos_token_id == eos
    assert_parity(mini, hf, eos=eos)

    back, tok = from_hf(folder)  # the round trip gives the same weights and tokenizer
    own, other = mini.state_dict(), back.state_dict()
    assert own.keys() == other.keys()
    for key in own:  # padding rows of the vocabulary are not exported; they read as zeros
        rows = V if key in ("tok_emb.weight", "lm_head.weight") else None
        assert torch.equal(own[key][:rows], other[key][:rows]), key
    assert not other["tok_emb.weight"][V:].any()
    assert tok.to_str() == tokenizer.to_str()
    for a, b in zip(mini.blocks, back.blocks):  # the kernel is not exported (from_hf picks sdpa);
        b.attn.backend, b.attn.kernel = a.attn.backend, a.attn.kernel  # same kernel: same bits
    ids = torch.randint(0, V, (1, 16))
    with torch.no_grad():
        assert torch.equal(mini(ids), back(ids))


@pytest.mark.parametrize("case", sorted(EXPORTS))
def test_export_loads_in_transformers_and_round_trips(transformers, tokenizer, tmp_path, case):
    check_export(transformers, tokenizer, tmp_path, *EXPORTS[case])


# MoE options Mixtral cannot express, and the words the blocker uses; every other MoE option in
# configs/model/ffn must export with parity.
MOE_BLOCKED = {"moe_auxfree": "bias_update_rate", "moe_capacity": "capacity_factor",
               "moe_shared": "n_shared", "moe_sigmoid": "gate='sigmoid'"}


@pytest.mark.parametrize("ffn", [o for o in options("model/ffn") if o.startswith("moe")])
def test_every_moe_option_exports_as_mixtral_or_names_its_blocker(transformers, tokenizer, tmp_path, ffn):
    overrides = ["model=moe_rope", f"model/ffn={ffn}", "model.ffn.d_expert=32"]
    if ffn in MOE_BLOCKED:
        with pytest.raises(ValueError, match="no native architecture") as err:
            export_hf(minillm_model(overrides), tmp_path)
        mixtral = next(line for line in str(err.value).splitlines() if "MixtralForCausalLM:" in line)
        assert f"model.ffn.{MOE_BLOCKED[ffn]}" in mixtral
    else:
        check_export(transformers, tokenizer, tmp_path, overrides, "MixtralForCausalLM")


def test_exported_tokenizer_loads_with_autotokenizer(transformers, tokenizer, tmp_path):
    export_hf(minillm_model(["model=llama"]), tmp_path, tokenizer)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tok.eos_token == hf_tok.bos_token == "<|endoftext|>"
    for text in TEXT + ["A cat named Zed!<|endoftext|> ünïcode"]:
        ids = tokenizer.encode(text).ids
        assert hf_tok(text)["input_ids"] == ids
        assert hf_tok.decode(ids) == tokenizer.decode(ids, skip_special_tokens=False)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


# ---- MoE auxiliary loss against Mixtral's load_balancing_loss_func

@pytest.mark.parametrize("n_layers", [1, 3])
def test_moe_aux_loss_matches_mixtral(transformers, tmp_path, n_layers):
    """One layer: exactly HF's aux_loss. Several: HF's function per layer, averaged (docs: interop)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    hf = reference(transformers, "mixtral", num_hidden_layers=n_layers)
    hf.save_pretrained(tmp_path)
    mini, _ = from_hf(tmp_path)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        out = hf(ids, output_router_logits=True)
        aux = mini(ids, targets=ids).aux
    coef, E, k = hf.config.router_aux_loss_coef, hf.config.num_local_experts, hf.config.num_experts_per_tok
    per_layer = torch.stack([load_balancing_loss_func((r,), E, k) for r in out.router_logits]).mean()
    got = aux["load_balance"]
    assert torch.allclose(got, coef * per_layer, atol=1e-6)
    if n_layers == 1:
        assert torch.allclose(got, coef * out.aux_loss, atol=1e-6)


# ---- what transformers cannot express, and what minillm cannot import (no transformers needed)

@pytest.mark.parametrize("overrides, blocker", [
    (["model=alibi"], "model.position is ALiBi; LlamaForCausalLM encodes positions only with RoPE"),
    (["model=sinusoidal"], "model.position is Sinusoidal"),
    (["model=llama", "model/position=none"], "model.position is PositionEncoding"),
    (["model=llama", "model/norm=layernorm"], "LlamaForCausalLM uses RMSNorm"),
    (["model=llama", "model/ffn=gelu"], "LlamaForCausalLM has a SwiGLU FFN"),
    (["model=moe_rope", "model.attention.bias=true"], "MixtralForCausalLM has no attention biases"),
    (["model=gpt2", "model/attention=gqa"], "model.attention.n_kv_heads=2"),
])
def test_export_names_the_blocking_part(tmp_path, overrides, blocker):
    with pytest.raises(ValueError, match="no native architecture") as err:
        export_hf(minillm_model(overrides), tmp_path)
    assert blocker in str(err.value)
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("config, message", [
    ({"model_type": "bert"}, "model_type='bert'"),
    ({"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
      "num_attention_heads": 2, "intermediate_size": 8,
      "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
    ({"model_type": "gpt2", "activation_function": "relu"}, "activation_function='relu'"),
])
def test_from_hf_rejects_what_minillm_cannot_express(tmp_path, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=message):
        from_hf(tmp_path)


def test_hf_model_config_rebuilds_the_same_structure(tmp_path):
    mini = minillm_model(["model=moe_rope", "model.ffn.n_experts=4", "model.ffn.top_k=1"])
    export_hf(mini, tmp_path)
    cfg = hf_model_config(tmp_path)
    assert cfg["ffn"]["n_experts"] == 4 and cfg["ffn"]["top_k"] == 1
    assert cfg["attention"]["n_kv_heads"] == 2 and cfg["max_seq_len"] == 64
    assert build_model(cfg).num_params() == mini.num_params()


def test_from_hf_reports_tensors_the_config_does_not_explain(tmp_path):
    from safetensors.torch import load_file

    export_hf(minillm_model(["model=llama"]), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({**weights, "model.layers.7.mlp.up_proj.weight": torch.zeros(2, 2)},
              tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"have no place .*model\.layers\.7\.mlp\.up_proj"):
        from_hf(tmp_path)
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"no tensor 'model\.layers\.1\.self_attn\.k_proj\.weight'"):
        from_hf(tmp_path)


def test_export_rejects_a_tokenizer_larger_than_the_vocabulary(tokenizer, tmp_path):
    model = build_model(compose_cfg(TINY + ["model=llama", "data.vocab_size=256"]).model)
    with pytest.raises(ValueError, match="model.vocab_size=256"):
        export_hf(model, tmp_path, tokenizer)


# ---- eval.py mode=export on a real training checkpoint

def test_eval_export_mode_writes_a_folder_transformers_loads(transformers, tiny_run, tmp_path):
    import eval as eval_script
    from minillm import load_checkpoint

    ckpt, out = tiny_run / "checkpoints" / "last.ckpt", tmp_path / "hf"
    result = eval_script.main(compose_cfg([f"ckpt_path={ckpt}", "mode=export", f"out={out}"], "eval"))
    assert result == {"out": str(out), "architecture": "LlamaForCausalLM"}
    model, tokenizer, _ = load_checkpoint(ckpt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    text = "<|endoftext|>Once upon a time there was a"
    ids = transformers.AutoTokenizer.from_pretrained(out)(text, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == tokenizer.encode(text).ids
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() < 1e-4
    with pytest.raises(SystemExit):  # out is required: one line on stderr, exit code 2
        eval_script.main(compose_cfg([f"ckpt_path={ckpt}", "mode=export"], "eval"))


# ---- every option of every model config group: exports with parity, or is refused by name

GROUPS = ("attention", "position", "ffn", "norm")
BASES = ("llama", "gpt2")  # one body per family of parts: RoPE/RMSNorm/SwiGLU and GPT-2's


def option_cases() -> list[tuple[list[str], str]]:
    """(overrides, the config key a refusal must name), discovered from configs/model: each option
    of each group on each base, each boolean setting of the base's parts flipped, and the
    model-level settings that change the function."""
    cases = []
    for base in BASES:
        for group in GROUPS:
            cases += [([f"model={base}", f"model/{group}={o}"], f"model.{group}")
                      for o in options(f"model/{group}")]
        model = compose_cfg(TINY + [f"model={base}"]).model
        for key, value in [(f"{group}.{k}", v) for group in GROUPS for k, v in model[group].items()]\
                + list(model.items()):
            if isinstance(value, bool) and not key.split(".")[-1].startswith("_"):
                cases.append(([f"model={base}", f"model.{key}={str(not value).lower()}"], f"model.{key}"))
        cases += [([f"model={base}", "model.logit_softcap=30.0"], "model.logit_softcap"),
                  ([f"model={base}", "model.init=zero_proj"], "model.init")]
    return cases


@pytest.mark.parametrize("overrides, key", option_cases(),
                         ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_every_option_exports_with_parity_or_is_refused_by_name(transformers, tokenizer, tmp_path,
                                                                overrides, key):
    try:
        export_hf(minillm_model(overrides), tmp_path / "probe")
    except ValueError as err:  # refused: each architecture's line says why, naming the setting
        assert "no native architecture" in str(err) and key in str(err), str(err)
        return
    arch = json.loads((tmp_path / "probe" / "config.json").read_text())["architectures"][0]
    check_export(transformers, tokenizer, tmp_path / "folder", overrides, arch)


def test_the_option_sweep_exports_the_new_parts_it_can_and_refuses_the_rest(tmp_path):
    """The sweep above must not pass by refusing everything: QK-norm exports, relu2 and softcap do not."""
    from minillm.interop import hf_family

    assert hf_family(minillm_model(["model=llama", "model/attention=gqa_qknorm"])).architecture \
        == "Qwen3ForCausalLM"
    assert hf_family(minillm_model(["model=llama", "model.init=zero_proj"])).architecture \
        == "LlamaForCausalLM"
    for overrides, named in [(["model=llama", "model/ffn=relu2"], "model.ffn is ReLU2"),
                             (["model=llama", "model.logit_softcap=30.0"], "model.logit_softcap=30.0"),
                             (["model=gpt2", "model.attention.qk_norm=true"],
                              "model.attention.qk_norm=true; GPT2LMHeadModel has no equivalent"),
                             (["model=llama", "model.attention.qk_norm=true", "model.norm.eps=1e-6"],
                              "model.attention.qk_norm_eps=1e-05 differs from model.norm.eps=1e-06"),
                             (["model=llama", "model.attention.qk_norm=true", "model.ffn.bias=true"],
                              "model.ffn.bias=true; Qwen3ForCausalLM has no MLP biases")]:
        with pytest.raises(ValueError, match="no native architecture") as err:
            export_hf(minillm_model(overrides), tmp_path)
        assert named in str(err.value)


def test_a_new_attention_option_is_refused_until_an_exporter_maps_it(monkeypatch, tmp_path):
    """Options are checked generically: one that no family maps blocks every export by name."""
    init = Attention.__init__

    def with_option(self, *args, sharpen: float = 1.0, opaque: int = 0, **kwargs):
        init(self, *args, **kwargs)
        self.sharpen = sharpen  # ``opaque`` is not kept: the exporter cannot read it

    monkeypatch.setattr(Attention, "__init__", with_option)
    monkeypatch.setattr(Attention, "__signature__", inspect.signature(with_option), raising=False)
    with pytest.raises(ValueError, match="no native architecture") as err:
        export_hf(minillm_model(["model=llama", "+model.attention.sharpen=2.0"]), tmp_path)
    assert "LlamaForCausalLM: model.attention.sharpen=2.0; LlamaForCausalLM has no equivalent" \
        in str(err.value)
    assert "model.attention.opaque is not readable" in str(err.value)


# ---- sliding windows (attn.window, from the masks branch) -> Qwen3's sliding_window + layer_types

HAS_WINDOW = "window" in inspect.signature(Attention).parameters
needs_window = pytest.mark.skipif(not HAS_WINDOW, reason="Attention has no window option yet")

WINDOWED = {
    "every-layer": (["model.attention.window=8"], ["sliding_attention"] * 2),
    "local-global": (["model.attention.window=8", "model.attention.global_every=2"],
                     ["sliding_attention", "full_attention"]),
}


@needs_window
@pytest.mark.parametrize("case", sorted(WINDOWED))
def test_windowed_qk_norm_model_exports_as_qwen3_with_layer_types(transformers, tokenizer, tmp_path,
                                                                  case):
    windows, layer_types = WINDOWED[case]
    overrides = ["model=llama", "model/attention=gqa_qknorm", *windows]
    check_export(transformers, tokenizer, tmp_path, overrides, "Qwen3ForCausalLM")  # T 24 > W 8
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["sliding_window"] == 8 and config["use_sliding_window"]
    assert config["layer_types"] == layer_types
    assert from_hf(tmp_path)[0].blocks[0].attn.window == 8


@needs_window
def test_windows_without_qk_norm_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="no native architecture") as err:
        export_hf(minillm_model(["model=llama", "model.attention.window=8"]), tmp_path)
    assert "LlamaForCausalLM: model.attention.window=8" in str(err.value)


@needs_window
def test_qwen3_reference_with_sliding_layers_imports_with_parity(transformers, tmp_path):
    hf = reference(transformers, "qwen3", num_hidden_layers=4, use_sliding_window=True,
                   sliding_window=8, max_window_layers=4,
                   layer_types=["sliding_attention", "full_attention"] * 2)
    hf.save_pretrained(tmp_path)
    mini, _ = from_hf(tmp_path)
    assert [b.attn.window for b in mini.blocks] == [8, None, 8, None]
    assert_parity(mini, hf, vocab=256)


def test_qwen3_layer_pattern_minillm_cannot_express_is_refused(tmp_path):
    config = {"model_type": "qwen3", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 3,
              "num_attention_heads": 2, "head_dim": 4, "intermediate_size": 8,
              "use_sliding_window": True, "sliding_window": 4,
              "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({}, tmp_path / "model.safetensors")
    match = "layer_types=" if HAS_WINDOW else "model.attention.window"
    with pytest.raises(ValueError, match=match):
        from_hf(tmp_path)
