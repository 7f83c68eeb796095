"""Pieces shared by the family modules: reading a minillm model's parts, and moving weights by name.

A family module (``llama.py``, ``gpt2.py``) answers four questions about one Hugging Face
architecture: which parts of a minillm model block it (``blockers``), the ``config.json`` and
weights of a model it can express (``hf_config``, ``hf_weights``), and the reverse
(``minillm_config``, ``minillm_weights``).

Options, not only classes, decide what a family can express: ``option_blockers`` reads every
constructor option of a part (the model, each layer's attention, the FFN, the position scheme) and
refuses any that differs from its default unless the family lists it as expressed. A new option on
``Attention`` (or anywhere) is therefore refused by name until an exporter maps it, never exported
silently as if it were off.
"""

import inspect
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from minillm.model.attention import Attention
from minillm.model.transformer import Block, Transformer


class Family(Protocol):
    """One Hugging Face architecture, both directions."""

    architecture: str  # e.g. "LlamaForCausalLM"
    model_type: str  # config.json's model_type, e.g. "llama"

    def blockers(self, model: nn.Module) -> list[str]: ...
    def hf_config(self, model: Transformer) -> dict[str, Any]: ...
    def hf_weights(self, model: Transformer) -> dict[str, Tensor]: ...
    def minillm_config(self, hf: dict[str, Any], weights: dict[str, Tensor]) -> dict[str, Any]: ...
    def minillm_weights(self, weights: dict[str, Tensor], hf: dict[str, Any],
                        model: Transformer) -> dict[str, Tensor]: ...


def named(module: nn.Module | None) -> str:
    return type(module).__name__


# Options every family reads from the built modules (sizes, head counts, biases, eps), that only the
# per-layer ``window`` shows (``global_every``), or that do not change the function (kernel, dropout,
# init). ``qk_norm_eps`` does nothing while ``qk_norm`` is off; a family that takes ``qk_norm``
# checks it.
MODEL_EXPRESSED = frozenset({"vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len",
                             "attention", "position", "ffn", "norm", "tie_embeddings", "dropout",
                             "init_std", "vocab_multiple", "init"})
ATTENTION_EXPRESSED = frozenset({"d_model", "n_heads", "n_kv_heads", "backend", "bias", "layer_idx",
                                 "n_layers", "global_every", "qk_norm_eps"})
MISSING = object()


def option_blockers(module: nn.Module, key: str, expressed: frozenset[str], arch: str) -> list[str]:
    """Constructor options of ``module`` (config key ``key``) set away from their default that
    ``arch`` cannot express; an option whose value the module does not keep as an attribute of the
    same name cannot be checked, so it blocks too."""
    out = []
    for name, param in inspect.signature(type(module).__init__).parameters.items():
        if name == "self" or name in expressed or param.kind in (param.VAR_POSITIONAL,
                                                                param.VAR_KEYWORD):
            continue
        value = getattr(module, name, MISSING)
        if value is MISSING:
            out.append(f"{key}.{name} is not readable from the built {named(module)}; the "
                       f"{arch} exporter cannot tell whether it is set")
        elif param.default is param.empty or value != param.default:
            out.append(f"{key}.{name}={yaml_value(value)}; {arch} has no equivalent")
    return out


def yaml_value(value: Any) -> str:
    """A value as the YAML/command line spells it (true, null, 'sdpa')."""
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    return repr(value)


def layer_option_blockers(model: Transformer, arch: str,
                          attention: frozenset[str] = ATTENTION_EXPRESSED) -> list[str]:
    """``option_blockers`` of the model itself and of every layer's attention (duplicates once)."""
    out = option_blockers(model, "model", MODEL_EXPRESSED, arch)
    for block in model.blocks:
        out += [b for b in option_blockers(block.attn, "model.attention", attention, arch)
                if b not in out]
    return out


def structure_blockers(model: nn.Module, arch: str) -> list[str]:
    """Blockers every family shares: a minillm ``Transformer`` of pre-norm blocks with ``Attention``."""
    if not isinstance(model, Transformer):
        return [f"the model is a {named(model)}, not a minillm Transformer"]
    out = []
    if any(type(b) is not Block for b in model.blocks):
        out.append(f"a block is not minillm's pre-norm Block; {arch} has only pre-norm blocks")
    if any(type(b.attn) is not Attention for b in model.blocks):
        out.append(f"model.attention is {named(model.blocks[0].attn)}; {arch} has standard attention")
    for part in ("ffn", "attn_norm", "ffn_norm"):
        if len({type(getattr(b, part)) for b in model.blocks}) > 1:
            out.append(f"the blocks mix {part} classes; {arch} repeats one block")
    return out


def norms(model: Transformer) -> list[nn.Module]:
    """Every norm of the model: two per block, then the final one."""
    return [n for b in model.blocks for n in (b.attn_norm, b.ffn_norm)] + [model.norm]


def norm_blockers(model: Transformer, classes: tuple[type, ...], arch: str) -> list[str]:
    """The norms must all be one of ``classes`` (an RMSNorm or a LayerNorm) with one shared eps."""
    want = classes[0].__name__
    found = {named(n) for n in norms(model) if not isinstance(n, classes)}
    if found:
        return [f"model.norm is {', '.join(sorted(found))}; {arch} uses {want}"]
    if len({norm_eps(n) for n in norms(model)}) > 1:
        return [f"the norms use different eps; {arch} has one eps for all"]
    return []


def norm_eps(norm: nn.Module) -> float:
    """The norm's eps; torch's RMSNorm with eps=None uses the float32 machine epsilon in fp32."""
    return torch.finfo(torch.float32).eps if norm.eps is None else float(norm.eps)


def norm_weight(norm: nn.Module) -> Tensor:
    """The norm's scale, ones when it has none (``elementwise_affine=False``)."""
    weight = getattr(norm, "weight", None)
    return weight if weight is not None else torch.ones(norm.normalized_shape[-1])


def bias_or_zeros(module: nn.Module, size: int) -> Tensor:
    """A Linear's or LayerNorm's bias, zeros when it has none (the exported model needs one)."""
    bias = getattr(module, "bias", None)
    return bias if bias is not None else torch.zeros(size)


def tied(model: Transformer) -> bool:
    """True when the language-model head shares the embedding matrix."""
    return model.lm_head.weight is model.tok_emb.weight


def vocab_rows(model: Transformer) -> tuple[Tensor, Tensor]:
    """Embedding and head rows of the real vocabulary: minillm pads both to a multiple of
    ``vocab_multiple`` and cuts its logits back to ``vocab_size``, so the padding is not exported."""
    V = model.vocab_size
    return model.tok_emb.weight[:V], model.lm_head.weight[:V]


def common_config(model: Transformer) -> dict[str, Any]:
    """Entries every family's config.json shares."""
    return {"vocab_size": model.vocab_size, "tie_word_embeddings": tied(model),
            "initializer_range": 0.02, "use_cache": True}


class Weights:
    """A Hugging Face state dict consumed key by key, so leftovers can be reported at the end."""

    def __init__(self, weights: dict[str, Tensor], ignore: tuple[str, ...] = ()) -> None:
        self.weights = {k: v for k, v in weights.items() if not k.endswith(ignore)}

    def has(self, key: str) -> bool:
        return key in self.weights

    def take(self, key: str) -> Tensor:
        if key not in self.weights:
            raise ValueError(f"from_hf: the checkpoint has no tensor {key!r}, which its config implies")
        return self.weights.pop(key)

    def done(self) -> None:
        """Raise if tensors are left that the config does not explain."""
        if self.weights:
            extra = sorted(self.weights)
            raise ValueError(f"from_hf: {len(extra)} checkpoint tensors have no place in the model "
                             f"its config.json describes, e.g. {extra[:5]}")
