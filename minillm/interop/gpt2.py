"""GPT-2 (``GPT2LMHeadModel``): LayerNorm, learned positions, MHA, tanh-GELU MLP.

Weight layouts (minillm -> Hugging Face, per layer ``transformer.h.{i}.``): GPT-2 stores its
projections as ``Conv1D`` (y = x W + b, W of shape (in, out)), the transpose of ``nn.Linear``.
``attn.qkv`` rows [q; k; v] -> ``attn.c_attn`` columns [q | k | v] (GPT-2 splits heads the same
way); ``attn.proj`` -> ``attn.c_proj``; ``ffn.up`` -> ``mlp.c_fc``; ``ffn.down`` -> ``mlp.c_proj``.
GPT-2 always has biases: a minillm model without them (the ``gpt2`` preset has ``bias: false``)
exports zeros, and a checkpoint whose attention (or MLP) biases are all exactly zero imports with
that part's ``bias: false``, so the round trip gives back the same structure. minillm's GELU is the
tanh approximation, GPT-2's ``gelu_new``.
"""

from typing import Any

from torch import Tensor, nn

from minillm.interop.body import (Weights, bias_or_zeros, common_config, layer_option_blockers,
                                  norm_blockers, norm_eps, norm_weight, option_blockers,
                                  structure_blockers, tied, vocab_rows)
from minillm.model.ffn import MLP
from minillm.model.position import Learned
from minillm.model.transformer import Transformer

TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh")


class GPT2:
    """``GPT2LMHeadModel``."""

    architecture, model_type = "GPT2LMHeadModel", "gpt2"

    # ---- minillm -> Hugging Face
    def blockers(self, model: nn.Module) -> list[str]:
        arch, out = self.architecture, structure_blockers(model, self.architecture)
        if out:
            return out
        if type(model.position) is not Learned:
            out.append(f"model.position is {type(model.position).__name__}; {arch} has learned "
                       "absolute positions")
        else:
            out += option_blockers(model.position, "model.position",
                                   frozenset({"d_model", "n_heads", "max_seq_len"}), arch)
        out += norm_blockers(model, (nn.LayerNorm,), arch)
        attn, ffn = model.blocks[0].attn, model.blocks[0].ffn
        if attn.n_kv_heads != attn.n_heads:
            out.append(f"model.attention.n_kv_heads={attn.n_kv_heads} with model.n_heads="
                       f"{attn.n_heads}; {arch} has one K/V head per query head (MHA)")
        if type(ffn) is not MLP:
            out.append(f"model.ffn is {type(ffn).__name__}; {arch} has a GELU MLP")
        else:
            out += option_blockers(ffn, "model.ffn", frozenset({"d_model", "d_hidden", "bias"}), arch)
        return out + layer_option_blockers(model, arch)

    def hf_config(self, model: Transformer) -> dict[str, Any]:
        attn, ffn = model.blocks[0].attn, model.blocks[0].ffn
        p = float(model.drop.p)
        return {"architectures": [self.architecture], "model_type": self.model_type,
                **common_config(model), "n_embd": model.tok_emb.embedding_dim,
                "n_layer": len(model.blocks), "n_head": attn.n_heads, "n_positions": model.max_seq_len,
                "n_inner": ffn.up.out_features, "activation_function": "gelu_new",
                "layer_norm_epsilon": norm_eps(model.norm), "resid_pdrop": p, "embd_pdrop": p,
                "attn_pdrop": 0.0, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}

    def hf_weights(self, model: Transformer) -> dict[str, Tensor]:
        C = model.tok_emb.embedding_dim

        def norm(name: str, module: nn.Module) -> dict[str, Tensor]:
            return {f"{name}.weight": norm_weight(module), f"{name}.bias": bias_or_zeros(module, C)}

        def conv(name: str, linear: nn.Linear) -> dict[str, Tensor]:
            return {f"{name}.weight": linear.weight.T,
                    f"{name}.bias": bias_or_zeros(linear, linear.out_features)}

        embedding, head = vocab_rows(model)
        out = {"wte.weight": embedding, "wpe.weight": model.position.table.weight,
               **norm("ln_f", model.norm)}
        for i, b in enumerate(model.blocks):
            out.update({**norm(f"h.{i}.ln_1", b.attn_norm), **norm(f"h.{i}.ln_2", b.ffn_norm),
                        **conv(f"h.{i}.attn.c_attn", b.attn.qkv), **conv(f"h.{i}.attn.c_proj", b.attn.proj),
                        **conv(f"h.{i}.mlp.c_fc", b.ffn.up), **conv(f"h.{i}.mlp.c_proj", b.ffn.down)})
        out = {f"transformer.{k}": v for k, v in out.items()}
        if not tied(model):
            out["lm_head.weight"] = head
        return out

    # ---- Hugging Face -> minillm
    def minillm_config(self, hf: dict[str, Any], weights: dict[str, Tensor]) -> dict[str, Any]:
        """The minillm ``model`` config equivalent to config.json (``weights`` decide ``bias``)."""
        act = hf.get("activation_function", "gelu_new")
        if act not in TANH_GELUS:
            raise ValueError(f"from_hf: activation_function={act!r} in config.json; minillm's MLP "
                             f"uses the tanh GELU ({', '.join(TANH_GELUS)})")
        for key, ok in [("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("add_cross_attention", False)]:
            if hf.get(key, ok) != ok:
                raise ValueError(f"from_hf: {key}={hf[key]} in config.json; minillm needs {ok}")
        C = hf.get("n_embd", 768)
        return {"_target_": "minillm.model.Transformer", "vocab_size": hf.get("vocab_size", 50257),
                "d_model": C, "n_layers": hf.get("n_layer", 12), "n_heads": hf.get("n_head", 12),
                "max_seq_len": hf.get("n_positions", 1024),
                "tie_embeddings": bool(hf.get("tie_word_embeddings", True)), "dropout": 0.0,
                "attention": {"_target_": "minillm.model.attention.Attention", "_partial_": True,
                              "n_kv_heads": None, "backend": "sdpa", "bias": has_bias(weights, "attn")},
                "position": {"_target_": "minillm.model.position.Learned", "_partial_": True},
                "ffn": {"_target_": "minillm.model.ffn.MLP", "_partial_": True,
                        "d_hidden": hf.get("n_inner") or 4 * C, "bias": has_bias(weights, "mlp")},
                "norm": {"_target_": "torch.nn.LayerNorm", "_partial_": True,
                         "eps": hf.get("layer_norm_epsilon", 1e-5)}}

    def minillm_weights(self, weights: dict[str, Tensor], hf: dict[str, Any],
                        model: Transformer) -> dict[str, Tensor]:
        """minillm state dict entries for ``model`` (built from config.json) from the checkpoint."""
        # Old checkpoints keep the causal-mask buffers ``attn.bias`` / ``attn.masked_bias``.
        w = Weights({k.removeprefix("transformer."): v for k, v in weights.items()},
                    ignore=(".attn.bias", ".attn.masked_bias"))

        def norm(name: str, hf_name: str) -> dict[str, Tensor]:
            return {f"{name}.weight": w.take(f"{hf_name}.weight"), f"{name}.bias": w.take(f"{hf_name}.bias")}

        def linear(name: str, hf_name: str) -> dict[str, Tensor]:
            weight, b = w.take(f"{hf_name}.weight").T, w.take(f"{hf_name}.bias")
            bias = has_bias(weights, hf_name.split(".")[-2])  # "attn" or "mlp"
            return {f"{name}.weight": weight, **({f"{name}.bias": b} if bias else {})}

        out = {"tok_emb.weight": w.take("wte.weight"), "position.table.weight": w.take("wpe.weight"),
               **norm("norm", "ln_f")}
        if w.has("lm_head.weight"):
            out["lm_head.weight"] = w.take("lm_head.weight")
        for i in range(len(model.blocks)):
            b, p = f"blocks.{i}.", f"h.{i}."
            out.update({**norm(b + "attn_norm", p + "ln_1"), **norm(b + "ffn_norm", p + "ln_2"),
                        **linear(b + "attn.qkv", p + "attn.c_attn"),
                        **linear(b + "attn.proj", p + "attn.c_proj"),
                        **linear(b + "ffn.up", p + "mlp.c_fc"), **linear(b + "ffn.down", p + "mlp.c_proj")})
        w.done()
        return out


def has_bias(weights: dict[str, Tensor], part: str) -> bool:
    """False when every bias of ``part`` ("attn" or "mlp") is exactly zero (a minillm ``bias: false``
    export); attention and MLP are told apart, as minillm sets their ``bias`` separately."""
    return any(bool(v.any()) for k, v in weights.items()
               if k.endswith((f"{part}.c_attn.bias", f"{part}.c_proj.bias", f"{part}.c_fc.bias")))


GPT2_FAMILY = GPT2()
