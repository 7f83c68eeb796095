"""Llama (``LlamaForCausalLM``), Mixtral (``MixtralForCausalLM``) and Qwen3 (``Qwen3ForCausalLM``):
RMSNorm, RoPE, MHA/GQA/MQA.

Llama has a SwiGLU FFN, Mixtral top-k routed SwiGLU experts, Qwen3 the Llama body with QK-norm
(``model.attention.qk_norm``) and optional sliding windows; the rest is one code path. Weight
layouts (minillm -> Hugging Face, per layer ``model.layers.{i}.``):

* ``attn.qkv`` rows [q (H*D); k (Hkv*D); v (Hkv*D)] -> ``self_attn.{q,k,v}_proj``; head h reads kv
  head h // (H/Hkv) in both (HF ``repeat_kv``); RoPE uses the halves layout in both, so no
  permutation. ``attn.proj`` -> ``self_attn.o_proj``.
* ``ffn.gate_up`` rows [gate; up] -> ``mlp.gate_proj``, ``mlp.up_proj``; ``ffn.down`` -> ``mlp.down_proj``.
* MoE router weight -> ``block_sparse_moe.gate``; ``w_gate_up[e]`` (C, 2F) columns [gate | up] ->
  ``experts.{e}.w1`` (gate) and ``w3`` (up) as (F, C); ``w_down[e]`` (F, C) -> ``experts.{e}.w2``
  (C, F). This is the Hub layout that ``save_pretrained`` writes; transformers >= 5 fuses it on
  load into ``mlp.experts.gate_up_proj`` (E, 2F, C), which ``minillm_weights`` also reads.
* Qwen3: ``attn.q_norm`` / ``attn.k_norm`` (D,) -> ``self_attn.q_norm`` / ``self_attn.k_norm``; both
  apply per head before the rotation in both, with config.json's one ``rms_norm_eps`` (so
  ``model.attention.qk_norm_eps`` must equal ``model.norm.eps``). Qwen3's MLP has no biases.

Windows (Qwen3): each layer's ``attn.window`` (W keys including the query's own, HF's
``sliding_window`` convention: key j is seen when i - W < j <= i) -> ``use_sliding_window: true``,
``sliding_window: W`` and per-layer ``layer_types`` ("sliding_attention" / "full_attention"), which
transformers 5 reads in place of ``max_window_layers``. Its ``__post_init__`` drops
``sliding_window`` unless ``use_sliding_window`` is true, so both are written. One W for all
windowed layers; Llama and Mixtral refuse windows.

RoPE: minillm's ``ntk`` scaling only raises theta, so it exports as the default rope type with the
raised theta; ``linear`` exports as HF's ``linear`` rope type. config.json carries both the
transformers 5 ``rope_parameters`` and the 4.x ``rope_theta``/``rope_scaling`` keys.
"""

from typing import Any

import torch
from torch import Tensor, nn

import inspect

from minillm.interop.body import (ATTENTION_EXPRESSED, Weights, common_config, layer_option_blockers,
                                  norm_blockers, norm_eps, norm_weight, option_blockers,
                                  structure_blockers, tied, vocab_rows)
from minillm.model.attention import Attention
from minillm.model.ffn import SwiGLU
from minillm.model.moe import MoE
from minillm.model.norm import RMSNorm
from minillm.model.position import RoPE
from minillm.model.transformer import Transformer

ATTENTION = "minillm.model.attention.Attention"
ROPE_EXPRESSED = frozenset({"d_model", "n_heads", "max_seq_len", "theta", "scaling", "factor"})
SWIGLU_EXPRESSED = frozenset({"d_model", "d_hidden", "bias"})
# MoE options Mixtral maps, ignores as training-only (jitter, z-loss, kernel) or refuses by name in
# ``Mixtral.variant_blockers``; a new MoE option is refused until it is listed here.
MOE_EXPRESSED = frozenset(inspect.signature(MoE.__init__).parameters) - {"self"}


def rope_config(pos: RoPE) -> dict[str, Any]:
    """config.json entries for minillm's RoPE (theta already includes any NTK scaling)."""
    theta, factor = float(pos.theta), 1.0 / pos.pos_scale
    if factor == 1.0:
        return {"rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    scaling = {"rope_type": "linear", "factor": factor}
    return {"rope_theta": theta, "rope_scaling": scaling,
            "rope_parameters": {**scaling, "rope_theta": theta}}


def rope_from_config(hf: dict[str, Any], default_theta: float) -> dict[str, Any]:
    """minillm RoPE options for a config.json's rope entries (transformers 4.x or 5 spelling)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", default_theta)))
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"from_hf: partial_rotary_factor={params['partial_rotary_factor']} in "
                         "config.json; minillm's RoPE rotates the whole head")
    if kind == "default":
        return {"theta": theta, "scaling": "none", "factor": 1.0}
    if kind == "linear":
        return {"theta": theta, "scaling": "linear", "factor": float(params["factor"])}
    raise ValueError(f"from_hf: rope_type={kind!r} in config.json has no minillm equivalent; "
                     "minillm's RoPE reads 'default' and 'linear'")


class Llama:
    """``LlamaForCausalLM``: RMSNorm, RoPE, MHA/GQA/MQA, SwiGLU."""

    architecture, model_type = "LlamaForCausalLM", "llama"
    # transformers' LlamaConfig defaults, for keys a config.json may leave out
    defaults = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": None,
                "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "rope_theta": 10000.0,
                "tie_word_embeddings": False}

    attention_options = ATTENTION_EXPRESSED  # Attention options this family maps

    # ---- minillm -> Hugging Face
    def blockers(self, model: nn.Module) -> list[str]:
        arch, out = self.architecture, structure_blockers(model, self.architecture)
        if out:
            return out
        if type(model.position) is not RoPE:
            out.append(f"model.position is {type(model.position).__name__}; {arch} encodes "
                       "positions only with RoPE")
        else:
            out += option_blockers(model.position, "model.position", ROPE_EXPRESSED, arch)
        out += norm_blockers(model, (RMSNorm, nn.RMSNorm), arch)
        out += layer_option_blockers(model, arch, self.attention_options)
        return out + self.variant_blockers(model)

    def variant_blockers(self, model: Transformer) -> list[str]:
        """What blocks this architecture beyond the shared body (Llama and Mixtral differ here)."""
        ffn = model.blocks[0].ffn
        if type(ffn) is not SwiGLU:
            return [f"model.ffn is {type(ffn).__name__}; {self.architecture} has a SwiGLU FFN"]
        return option_blockers(ffn, "model.ffn", SWIGLU_EXPRESSED, self.architecture)

    def hf_config(self, model: Transformer) -> dict[str, Any]:
        attn, ffn = model.blocks[0].attn, model.blocks[0].ffn
        return {"architectures": [self.architecture], "model_type": self.model_type,
                **common_config(model), "hidden_size": model.tok_emb.embedding_dim,
                "num_hidden_layers": len(model.blocks), "num_attention_heads": attn.n_heads,
                "num_key_value_heads": attn.n_kv_heads, "head_dim": attn.head_dim,
                "hidden_act": "silu", "max_position_embeddings": model.max_seq_len,
                "rms_norm_eps": norm_eps(model.norm), "attention_dropout": 0.0,
                **rope_config(model.position), **self.variant_config(ffn, attn)}

    def variant_config(self, ffn: nn.Module, attn: nn.Module) -> dict[str, Any]:
        """config.json entries where Llama and Mixtral differ."""
        return {"intermediate_size": ffn.down.in_features, "mlp_bias": ffn.down.bias is not None,
                "attention_bias": attn.qkv.bias is not None, "pretraining_tp": 1}

    def hf_weights(self, model: Transformer) -> dict[str, Tensor]:
        embedding, head = vocab_rows(model)
        out = {"model.embed_tokens.weight": embedding, "model.norm.weight": norm_weight(model.norm)}
        if not tied(model):
            out["lm_head.weight"] = head
        for i, block in enumerate(model.blocks):
            p, attn = f"model.layers.{i}.", block.attn
            H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
            out[p + "input_layernorm.weight"] = norm_weight(block.attn_norm)
            out[p + "post_attention_layernorm.weight"] = norm_weight(block.ffn_norm)
            for kind in ("weight", "bias"):
                if getattr(attn.qkv, kind) is not None:
                    q, k, v = getattr(attn.qkv, kind).split([H * D, Hkv * D, Hkv * D])
                    out.update({f"{p}self_attn.q_proj.{kind}": q, f"{p}self_attn.k_proj.{kind}": k,
                                f"{p}self_attn.v_proj.{kind}": v,
                                f"{p}self_attn.o_proj.{kind}": getattr(attn.proj, kind)})
            out.update(self.attention_extra_weights(p, attn))
            out.update(self.ffn_weights(p, block.ffn))
        return out

    def attention_extra_weights(self, p: str, attn: nn.Module) -> dict[str, Tensor]:
        """Attention tensors beyond the four projections (Qwen3's q/k norms); none in Llama."""
        return {}

    def ffn_weights(self, p: str, ffn: nn.Module) -> dict[str, Tensor]:
        out = {}
        for kind in ("weight", "bias"):
            if getattr(ffn.down, kind) is not None:
                gate, up = getattr(ffn.gate_up, kind).chunk(2)
                out.update({f"{p}mlp.gate_proj.{kind}": gate, f"{p}mlp.up_proj.{kind}": up,
                            f"{p}mlp.down_proj.{kind}": getattr(ffn.down, kind)})
        return out

    # ---- Hugging Face -> minillm
    def get(self, hf: dict[str, Any], key: str) -> Any:
        """config.json's value for ``key``, or transformers' default for this architecture."""
        value = hf.get(key)
        return self.defaults.get(key) if value is None else value

    def check_config(self, hf: dict[str, Any]) -> None:
        """Raise for config.json settings that minillm cannot reproduce."""
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"from_hf: hidden_act={act!r} in config.json; minillm's SwiGLU uses 'silu'")
        C, H = self.get(hf, "hidden_size"), self.get(hf, "num_attention_heads")
        if self.get(hf, "head_dim") not in (None, C // H) or C % H:
            raise ValueError(f"from_hf: head_dim={self.get(hf, 'head_dim')} with hidden_size={C} and "
                             f"num_attention_heads={H}; minillm needs head_dim = hidden_size / heads")

    def minillm_config(self, hf: dict[str, Any], weights: dict[str, Tensor]) -> dict[str, Any]:
        """The minillm ``model`` config (for ``build_model``) equivalent to config.json."""
        self.check_config(hf)
        get = lambda key: self.get(hf, key)  # noqa: E731
        return {"_target_": "minillm.model.Transformer", "vocab_size": get("vocab_size"),
                "d_model": get("hidden_size"), "n_layers": get("num_hidden_layers"),
                "n_heads": get("num_attention_heads"), "max_seq_len": get("max_position_embeddings"),
                "tie_embeddings": bool(get("tie_word_embeddings")), "dropout": 0.0,
                "attention": {"_target_": ATTENTION, "_partial_": True, "backend": "sdpa",
                              "n_kv_heads": get("num_key_value_heads") or get("num_attention_heads"),
                              "bias": bool(hf.get("attention_bias", False))},
                "position": {"_target_": "minillm.model.position.RoPE", "_partial_": True,
                             **rope_from_config(hf, self.defaults["rope_theta"])},
                "ffn": self.minillm_ffn(hf),
                "norm": {"_target_": "minillm.model.norm.RMSNorm", "_partial_": True,
                         "eps": get("rms_norm_eps")}}

    def minillm_ffn(self, hf: dict[str, Any]) -> dict[str, Any]:
        return {"_target_": "minillm.model.ffn.SwiGLU", "_partial_": True,
                "d_hidden": self.get(hf, "intermediate_size"), "bias": bool(hf.get("mlp_bias", False))}

    def minillm_weights(self, weights: dict[str, Tensor], hf: dict[str, Any],
                        model: Transformer) -> dict[str, Tensor]:
        """minillm state dict entries for ``model`` (built from config.json) from the checkpoint."""
        w = Weights({k.replace(".block_sparse_moe.", ".mlp."): v for k, v in weights.items()},
                    ignore=("rotary_emb.inv_freq",))
        out = {"tok_emb.weight": w.take("model.embed_tokens.weight"),
               "norm.weight": w.take("model.norm.weight")}
        if w.has("lm_head.weight"):
            out["lm_head.weight"] = w.take("lm_head.weight")
        for i in range(len(model.blocks)):
            p, b = f"model.layers.{i}.", f"blocks.{i}."
            out[b + "attn_norm.weight"] = w.take(p + "input_layernorm.weight")
            out[b + "ffn_norm.weight"] = w.take(p + "post_attention_layernorm.weight")
            for kind in ("weight", "bias"):
                if w.has(f"{p}self_attn.q_proj.{kind}"):
                    out[f"{b}attn.qkv.{kind}"] = torch.cat(
                        [w.take(f"{p}self_attn.{x}_proj.{kind}") for x in "qkv"])
                    out[f"{b}attn.proj.{kind}"] = w.take(f"{p}self_attn.o_proj.{kind}")
            out.update(self.minillm_attention_extra_weights(w, p, b))
            out.update(self.minillm_ffn_weights(w, p, b, model.blocks[i].ffn))
        w.done()
        return out

    def minillm_attention_extra_weights(self, w: Weights, p: str, b: str) -> dict[str, Tensor]:
        """The reverse of ``attention_extra_weights``."""
        return {}

    def minillm_ffn_weights(self, w: Weights, p: str, b: str, ffn: nn.Module) -> dict[str, Tensor]:
        out = {}
        for kind in ("weight", "bias"):
            if w.has(f"{p}mlp.down_proj.{kind}"):
                out[f"{b}ffn.gate_up.{kind}"] = torch.cat(
                    [w.take(f"{p}mlp.gate_proj.{kind}"), w.take(f"{p}mlp.up_proj.{kind}")])
                out[f"{b}ffn.down.{kind}"] = w.take(f"{p}mlp.down_proj.{kind}")
        return out


class Mixtral(Llama):
    """``MixtralForCausalLM``: the Llama body with top-k softmax-routed SwiGLU experts."""

    architecture, model_type = "MixtralForCausalLM", "mixtral"
    defaults = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                "rms_norm_eps": 1e-5, "max_position_embeddings": 4096 * 32, "rope_theta": 1e6,
                "tie_word_embeddings": False, "num_local_experts": 8, "num_experts_per_tok": 2,
                "router_aux_loss_coef": 0.001}

    def variant_blockers(self, model: Transformer) -> list[str]:
        arch, ffn, attn = self.architecture, model.blocks[0].ffn, model.blocks[0].attn
        if type(ffn) is not MoE:
            return [f"model.ffn is {type(ffn).__name__}; {arch} has a Mixture-of-Experts FFN"]
        router, out = ffn.router, option_blockers(ffn, "model.ffn", MOE_EXPRESSED, arch)
        if attn.qkv.bias is not None:
            out.append(f"model.attention.bias=true; {arch} has no attention biases")
        if getattr(ffn, "shared", None) is not None:
            out.append(f"model.ffn.n_shared > 0 (shared experts); {arch} has routed experts only")
        if getattr(router, "gate", "softmax") != "softmax":
            out.append(f"model.ffn.gate={router.gate!r}; {arch} gates with a softmax")
        if not getattr(router, "renormalize", True):
            out.append(f"model.ffn.renormalize=false; {arch} renormalises the top-k gates")
        if getattr(router, "expert_bias", None) is not None:
            out.append(f"model.ffn.bias_update_rate > 0 (auxiliary-loss-free expert bias); "
                       f"{arch} routes on the router scores alone")
        if getattr(ffn, "capacity_factor", None) is not None:
            out.append(f"model.ffn.capacity_factor={ffn.capacity_factor} (dropped tokens); "
                       f"{arch} is dropless")
        return out

    def variant_config(self, ffn: nn.Module, attn: nn.Module) -> dict[str, Any]:
        # Training-only options (router jitter, z-loss) do not change the function: not exported.
        return {"intermediate_size": moe_tensors(ffn)["w_down"].shape[1],
                "num_local_experts": ffn.n_experts, "num_experts_per_tok": ffn.top_k,
                "router_aux_loss_coef": ffn.aux_loss_coef, "output_router_logits": False,
                "router_jitter_noise": 0.0, "sliding_window": None}

    def ffn_weights(self, p: str, ffn: nn.Module) -> dict[str, Tensor]:
        t = moe_tensors(ffn)
        w_gate_up, w_down = t["w_gate_up"], t["w_down"]
        F = w_down.shape[1]
        out = {f"{p}block_sparse_moe.gate.weight": t["router"]}
        for e in range(ffn.n_experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            out.update({q + "w1.weight": w_gate_up[e, :, :F].T, q + "w3.weight": w_gate_up[e, :, F:].T,
                        q + "w2.weight": w_down[e].T})
        return out

    def check_config(self, hf: dict[str, Any]) -> None:
        super().check_config(hf)
        window = hf.get("sliding_window")
        if window is not None and window < self.get(hf, "max_position_embeddings"):
            raise ValueError(f"from_hf: sliding_window={window} in config.json; minillm attention "
                             "sees the whole context")

    def minillm_ffn(self, hf: dict[str, Any]) -> dict[str, Any]:
        return {"_target_": "minillm.model.moe.MoE", "_partial_": True,
                "n_experts": self.get(hf, "num_local_experts"),
                "top_k": self.get(hf, "num_experts_per_tok"),
                "d_expert": self.get(hf, "intermediate_size"),
                "aux_loss_coef": self.get(hf, "router_aux_loss_coef")}

    def minillm_ffn_weights(self, w: Weights, p: str, b: str, ffn: nn.Module) -> dict[str, Tensor]:
        names = moe_names(ffn)
        out = {b + "ffn." + names["router"]: w.take(f"{p}mlp.gate.weight")}
        if w.has(f"{p}mlp.experts.gate_up_proj"):  # transformers >= 5 fused layout
            out[b + "ffn." + names["w_gate_up"]] = w.take(f"{p}mlp.experts.gate_up_proj").transpose(1, 2)
            out[b + "ffn." + names["w_down"]] = w.take(f"{p}mlp.experts.down_proj").transpose(1, 2)
            return out
        q = f"{p}mlp.experts."
        out[b + "ffn." + names["w_gate_up"]] = torch.stack(
            [torch.cat([w.take(f"{q}{e}.w1.weight"), w.take(f"{q}{e}.w3.weight")]).T
             for e in range(ffn.n_experts)])
        out[b + "ffn." + names["w_down"]] = torch.stack(
            [w.take(f"{q}{e}.w2.weight").T for e in range(ffn.n_experts)])
        return out


def moe_tensors(ffn: nn.Module) -> dict[str, Tensor]:
    """A minillm MoE's router weight (E, C), ``w_gate_up`` (E, C, 2F) and ``w_down`` (E, F, C)."""
    router = getattr(ffn.router, "proj", ffn.router)  # a Linear, or a router module holding one
    bank = getattr(ffn, "experts", ffn)  # the expert weights, on the layer or an expert bank
    return {"router": router.weight, "w_gate_up": bank.w_gate_up, "w_down": bank.w_down}


def moe_names(ffn: nn.Module) -> dict[str, str]:
    """The state-dict names (inside the layer) of the tensors ``moe_tensors`` returns."""
    names = {id(t): n for n, t in ffn.named_parameters()}
    return {k: names[id(t)] for k, t in moe_tensors(ffn).items()}


class Qwen3(Llama):
    """``Qwen3ForCausalLM``: the Llama body with QK-norm and optional sliding-window layers."""

    architecture, model_type = "Qwen3ForCausalLM", "qwen3"
    defaults = {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                "head_dim": 128, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
                "rope_theta": 10000.0, "tie_word_embeddings": False, "max_window_layers": 28}
    attention_options = ATTENTION_EXPRESSED | {"qk_norm", "window"}

    def variant_blockers(self, model: Transformer) -> list[str]:
        arch, out = self.architecture, super().variant_blockers(model)
        attn, ffn = model.blocks[0].attn, model.blocks[0].ffn
        if not getattr(attn, "qk_norm", False):
            out.append(f"model.attention.qk_norm=false; {arch} always normalises q and k per head")
        elif attn.qk_norm_eps != norm_eps(model.norm):
            out.append(f"model.attention.qk_norm_eps={attn.qk_norm_eps} differs from model.norm.eps="
                       f"{norm_eps(model.norm)}; {arch} uses one rms_norm_eps for both")
        if type(ffn) is SwiGLU and ffn.down.bias is not None:
            out.append(f"model.ffn.bias=true; {arch} has no MLP biases")
        if len({w for w in layer_windows(model) if w is not None}) > 1:
            out.append(f"model.attention.window differs between layers ({layer_windows(model)}); "
                       f"{arch} has one sliding_window")
        return out

    def hf_config(self, model: Transformer) -> dict[str, Any]:
        windows = layer_windows(model)
        window = next((w for w in windows if w is not None), None)
        sliding = [w is not None for w in windows]
        # transformers < 5 reads max_window_layers (layers >= it slide): exact when the windowed
        # layers are a suffix; transformers 5 reads layer_types, which is always exact.
        first = sliding.index(True) if window is not None else len(windows)
        suffix = all(sliding[first:])
        config = super().hf_config(model)
        for key in ("mlp_bias", "pretraining_tp"):
            config.pop(key)
        return {**config, "use_sliding_window": window is not None, "sliding_window": window,
                "max_window_layers": first if suffix else len(windows),
                "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding]}

    def attention_extra_weights(self, p: str, attn: nn.Module) -> dict[str, Tensor]:
        return {f"{p}self_attn.q_norm.weight": attn.q_norm.weight,
                f"{p}self_attn.k_norm.weight": attn.k_norm.weight}

    # ---- Hugging Face -> minillm
    def minillm_config(self, hf: dict[str, Any], weights: dict[str, Tensor]) -> dict[str, Any]:
        config = super().minillm_config(hf, weights)
        config["attention"].update(qk_norm=True, qk_norm_eps=self.get(hf, "rms_norm_eps"),
                                   **self.window_options(hf))
        return config

    def window_options(self, hf: dict[str, Any]) -> dict[str, Any]:
        """minillm's ``window`` / ``global_every`` for config.json's sliding layers, as transformers
        resolves them (``Qwen3Config.__post_init__``); a pattern minillm cannot express raises."""
        n = self.get(hf, "num_hidden_layers")
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        types = hf.get("layer_types") or [
            "sliding_attention" if window is not None and i >= self.get(hf, "max_window_layers")
            else "full_attention" for i in range(n)]
        sliding = [t == "sliding_attention" for t in types]
        if window is None or not any(sliding):
            return {}
        if "window" not in inspect.signature(Attention).parameters:
            raise ValueError(f"from_hf: sliding_window={window} in config.json; this minillm's "
                             "attention has no model.attention.window")
        if all(sliding):
            return {"window": window}
        every = sliding.index(False) + 1  # minillm: layer i is global when (i + 1) % every == 0
        if sliding != [(i + 1) % every != 0 for i in range(n)]:
            raise ValueError(f"from_hf: layer_types={types} in config.json; minillm's pattern is "
                             "global every global_every-th layer, windowed elsewhere")
        return {"window": window, "global_every": every}

    def minillm_attention_extra_weights(self, w: Weights, p: str, b: str) -> dict[str, Tensor]:
        return {f"{b}attn.q_norm.weight": w.take(f"{p}self_attn.q_norm.weight"),
                f"{b}attn.k_norm.weight": w.take(f"{p}self_attn.k_norm.weight")}


def layer_windows(model: Transformer) -> list[int | None]:
    """Each layer's attention window (None: global), as ``Attention.window`` resolves it."""
    return [getattr(b.attn, "window", None) for b in model.blocks]


LLAMA, MIXTRAL, QWEN3 = Llama(), Mixtral(), Qwen3()
