"""Read and write a Hugging Face model folder: config.json, safetensors weights, tokenizer files.

Only plain files are involved (``json``, ``safetensors``, ``tokenizers``), so export and import work
without ``transformers`` installed. Weights are written in the format the Hub uses (the one
``save_pretrained`` writes), and read from ``model.safetensors``, a sharded
``model.safetensors.index.json`` or a legacy ``pytorch_model.bin``.
"""

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import Tensor

from minillm.data.tokenizer import EOT  # minillm's end-of-text token, also GPT-2's


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's ``config.json`` as a dict."""
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"from_hf: {folder} has no config.json; expected a Hugging Face model folder")
    return json.loads(path.read_text())


def read_weights(folder: Path) -> dict[str, Tensor]:
    """All tensors of the folder's checkpoint, keyed by their Hugging Face names."""
    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        state: dict[str, Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(folder / shard))
        return state
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ValueError(f"from_hf: {folder} has no model.safetensors, model.safetensors.index.json "
                     "or pytorch_model.bin")


def special_token(tokenizer: Tokenizer | None) -> tuple[str | None, int | None]:
    """The end-of-text token and its id: ``<|endoftext|>`` if present, else the first special token."""
    if tokenizer is None:
        return None, None
    specials = [t.content for _, t in sorted(tokenizer.get_added_tokens_decoder().items()) if t.special]
    token = EOT if tokenizer.token_to_id(EOT) is not None else next(iter(specials), None)
    return token, None if token is None else tokenizer.token_to_id(token)


def write_folder(folder: Path, config: dict[str, Any], weights: dict[str, Tensor],
                 tokenizer: Tokenizer | None, max_len: int) -> None:
    """Write config.json, model.safetensors and (given a tokenizer) its PreTrainedTokenizerFast files."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is None:
        return
    tokenizer.save(str(folder / "tokenizer.json"))
    token, _ = special_token(tokenizer)
    specials = {} if token is None else {"bos_token": token, "eos_token": token, "unk_token": token}
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
                  "clean_up_tokenization_spaces": False, "add_bos_token": False,
                  "add_eos_token": False, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def read_tokenizer(folder: Path) -> Tokenizer | None:
    """The folder's ``tokenizer.json`` as a ``tokenizers.Tokenizer``, or None if it has none."""
    path = folder / "tokenizer.json"
    return Tokenizer.from_file(str(path)) if path.is_file() else None


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``, as config.json spells it."""
    return str(dtype).removeprefix("torch.")
