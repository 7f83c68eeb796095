"""``mode=attention``: attention maps of a checkpoint on a prompt, one PNG grid per layer.

The model is rebuilt on the ``math`` backend, the one kernel that forms the softmax weights (the
kernel is picked at construction). See docs/attention.md (Attention maps).
"""

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from minillm.checkpoint import checkpoint_model
from minillm.data import EOT, load_tokenizer
from minillm.evaluation.loading import read
from minillm.evaluation.output import save_figure, subplots
from minillm.evaluation.sample import prompt_text
from minillm.model import Transformer


def math_model(checkpoint: dict, device: torch.device) -> Transformer:
    """The checkpoint's model on the ``math`` attention backend, recording attention weights."""
    model = checkpoint_model(checkpoint, device, attention={"backend": "math"})
    for block in model.blocks:
        block.attn.record_weights = True
    return model


@torch.no_grad()
def attention_maps(model: Transformer, ids: list[int]) -> np.ndarray:
    """Attention weights of every layer for one sequence: (layers, H, T, T), rows sum to 1."""
    device = next(model.parameters()).device
    model(torch.tensor([ids], device=device))
    return np.stack([block.attn.attn_weights[0].float().cpu().numpy() for block in model.blocks])


def plot_layer(weights: np.ndarray, labels: list[str], layer: int, path: Path) -> None:
    """One layer's heads (H, T, T) as a grid of heat maps, query tokens down, key tokens across."""
    from matplotlib.colors import PowerNorm

    n_heads, t = weights.shape[0], weights.shape[-1]
    cols = min(n_heads, 4)
    rows = math.ceil(n_heads / cols)
    size = max(3.0, 0.22 * t + 1.0)
    fig, axes = subplots(rows, cols, figsize=(cols * size, rows * size), squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= n_heads:
            ax.axis("off")
            continue
        ax.imshow(weights[h], cmap="viridis", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0))  # faint weights show
        ax.set_title(f"layer {layer}, head {h}", fontsize=9)
        ax.set_xticks(range(t), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(t), labels, fontsize=7)
    fig.suptitle(f"Attention weights, layer {layer} (row: query token, column: key token)", fontsize=10)
    save_figure(fig, path, dpi=110)


def attention(cfg: DictConfig) -> dict[str, Any]:
    """``python eval.py ckpt_path=PATH mode=attention prompt="..."``: PNGs per layer, weights."""
    prompt = prompt_text(cfg)
    checkpoint, device = read(cfg)
    tokenizer = load_tokenizer(checkpoint["tokenizer"])
    ids = [tokenizer.token_to_id(EOT)] + tokenizer.encode(prompt).ids
    model = math_model(checkpoint, device)
    limit = model.position.max_len
    if limit is not None and len(ids) > limit:
        raise ValueError(f"prompt is {len(ids)} tokens with <|endoftext|>; this model's "
                         f"{type(model.position).__name__} positions encode at most {limit}: shorten it")
    weights = attention_maps(model, ids)
    # each token's text (special tokens by name), newlines shown as \n
    labels = [tokenizer.decode([i], skip_special_tokens=False).replace("\n", "\\n") for i in ids]
    folder = Path(cfg.get("out_dir") or Path(cfg.ckpt_path).parent / "attention")
    folder.mkdir(parents=True, exist_ok=True)
    for layer, layer_weights in enumerate(weights):
        plot_layer(layer_weights, labels, layer, folder / f"layer{layer}.png")
    np.savez(folder / "weights.npz", weights=weights, tokens=np.array(labels))
    files = [str(folder / f"layer{layer}.png") for layer in range(len(weights))]
    files.append(str(folder / "weights.npz"))
    print(f"{len(ids)} tokens, {weights.shape[0]} layers x {weights.shape[1]} heads\n"
          f"written: {', '.join(files)}")
    return {"tokens": labels, "weights": weights, "files": files}
