"""Hugging Face transformers interop: export a minillm model as a native HF folder, import one back.

``export_hf(model, out, tokenizer)`` writes config.json, model.safetensors and (given a tokenizer)
tokenizer.json + tokenizer_config.json, loadable offline with ``AutoModelForCausalLM`` and
``AutoTokenizer``. The family is read from the model's structure (position, norm, attention and
FFN classes and their options), never from a preset name:

* RoPE + RMSNorm + SwiGLU -> ``LlamaForCausalLM`` (MHA, GQA or MQA);
* RoPE + RMSNorm + MoE    -> ``MixtralForCausalLM``;
* RoPE + RMSNorm + SwiGLU + QK-norm (``model.attention.qk_norm``), optionally sliding windows ->
  ``Qwen3ForCausalLM``;
* learned positions + LayerNorm + GELU MLP + MHA -> ``GPT2LMHeadModel``.

Anything else raises a ValueError naming, per architecture, the parts and options that block it:
an option of the model or a layer's attention set away from its default is refused unless the
family maps it (``body.option_blockers``), so a new option never exports silently as if it were off.
``from_hf(folder)`` is the reverse for these four ``model_type`` values. Neither needs
``transformers``; the parity tests (tests/test_hf.py) check logits and greedy tokens against it.

MoE auxiliary loss: minillm computes the Mixtral load-balancing loss per layer and averages it over
layers, ``mean_l E sum_e f_le P_le``; HF pools the router logits of all layers first,
``E sum_e (mean_l f_le)(mean_l P_le)``. The two agree for one layer; for several, minillm's value
equals HF's ``load_balancing_loss_func`` applied to each layer alone, then averaged.
"""

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from minillm.interop.body import Family
from minillm.interop.folder import (dtype_name, read_config, read_tokenizer, read_weights,
                                    special_token, write_folder)
from minillm.interop.gpt2 import GPT2_FAMILY
from minillm.interop.llama import LLAMA, MIXTRAL, QWEN3
from minillm.model.build import build_model
from minillm.model.transformer import Transformer

FAMILIES: tuple[Family, ...] = (LLAMA, MIXTRAL, QWEN3, GPT2_FAMILY)


def hf_family(model: torch.nn.Module) -> Family:
    """The family that expresses ``model``; a ValueError listing what blocks each one otherwise."""
    blocked = {f.architecture: f.blockers(model) for f in FAMILIES}
    for family in FAMILIES:
        if not blocked[family.architecture]:
            return family
    lines = [f"  {arch}: " + "; ".join(reasons) for arch, reasons in blocked.items()]
    raise ValueError("export_hf: transformers has no native architecture for this model:\n"
                     + "\n".join(lines))


def export_hf(model: Transformer, out: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write ``model`` (and ``tokenizer``) as a Hugging Face model folder at ``out``; return its path."""
    family, out = hf_family(model), Path(out)
    token, token_id = special_token(tokenizer)
    if tokenizer is not None and tokenizer.get_vocab_size() > model.vocab_size:
        raise ValueError(f"export_hf: the tokenizer has {tokenizer.get_vocab_size()} tokens but "
                         f"model.vocab_size={model.vocab_size}")
    dtype = dtype_name(model.tok_emb.weight.dtype)
    config = {**family.hf_config(model), "bos_token_id": token_id, "eos_token_id": token_id,
              "pad_token_id": None, "dtype": dtype, "torch_dtype": dtype}
    write_folder(out, config, family.hf_weights(model), tokenizer, model.max_seq_len)
    return out


def _import_family(hf: dict[str, Any]) -> Family:
    types = {f.model_type: f for f in FAMILIES}
    kind = hf.get("model_type")
    if kind not in types:
        raise ValueError(f"from_hf: model_type={kind!r} in config.json is not one of {sorted(types)}")
    return types[kind]


def hf_model_config(folder: str | Path) -> dict[str, Any]:
    """The minillm ``model`` config (a dict for ``build_model``) of a Hugging Face model folder."""
    folder = Path(folder)
    hf = read_config(folder)
    family = _import_family(hf)
    return family.minillm_config(hf, read_weights(folder))


def from_hf(folder: str | Path, dtype: torch.dtype = torch.float32
            ) -> tuple[Transformer, Tokenizer | None]:
    """A minillm model (eval mode) from a Hugging Face model folder, and its tokenizer if it has one.

    ``hf_model_config(folder)`` gives the matching minillm ``model`` config, e.g. to save with a
    checkpoint. Dropout is a training choice and is not imported (set ``model.dropout``).
    """
    folder = Path(folder)
    hf = read_config(folder)
    family = _import_family(hf)
    weights = read_weights(folder)
    model = build_model(family.minillm_config(hf, weights))
    state = family.minillm_weights(weights, hf, model)
    own = model.state_dict()
    for key in ("tok_emb.weight", "lm_head.weight"):  # zero rows up to minillm's padded vocabulary
        if key in state and state[key].shape[0] < own[key].shape[0]:
            pad = state[key].new_zeros(own[key].shape[0] - state[key].shape[0], state[key].shape[1])
            state[key] = torch.cat([state[key], pad])
    if model.lm_head.weight is model.tok_emb.weight:  # tied: the embedding is the head
        state["lm_head.weight"] = state["tok_emb.weight"]
    missing = [k for k, p in model.named_parameters() if k not in state]
    unknown = [k for k in state if k not in own]
    if missing or unknown:
        raise ValueError(f"from_hf: the checkpoint does not fit the model config.json describes; "
                         f"missing {missing[:5]}, unexpected {unknown[:5]}")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ValueError(f"from_hf: {key} has shape {tuple(value.shape)} in the checkpoint, "
                             f"{tuple(own[key].shape)} in the model config.json describes")
    model.load_state_dict({**own, **state})
    return model.to(dtype).eval(), read_tokenizer(folder)


__all__ = ["export_hf", "from_hf", "hf_model_config", "hf_family"]
