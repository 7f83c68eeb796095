"""``mode=loss``: validation loss, perplexity and bits per byte of a checkpoint, with a unigram
baseline (fitted on the training tokens, add-one smoothing) scored on the same tokens. Bits per
byte as in training (``TokenDataModule.bytes_per_token``); see docs/training.md.
"""

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from minillm.evaluation.loading import checkpoint_datamodule, load
from minillm.model.transformer import token_cross_entropy


@torch.no_grad()
def validation_nll(model: torch.nn.Module, dataloader, device: torch.device,
                   vocab_size: int) -> tuple[float, int, Tensor]:
    """Summed next-token NLL (nats), token count and per-id counts of the targets, over ``dataloader``."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    counts = torch.zeros(vocab_size, dtype=torch.float64, device=device)
    for x, y in dataloader:
        x, y = x.to(device), y.to(device)  # (B, T)
        logits = model(x)  # (B, T, V)
        total += token_cross_entropy(logits, y, reduction="sum").double()
        counts += torch.bincount(y.flatten(), minlength=vocab_size).double()
    return total.item(), int(counts.sum().item()), counts.cpu()


def unigram_log_probs(tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> Tensor:
    """log p(id) of a unigram model fitted on ``tokens`` with add-one (Laplace) smoothing."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(tokens), chunk):  # chunked: the training memmap may be large
        counts += np.bincount(np.asarray(tokens[start:start + chunk]), minlength=vocab_size)[:vocab_size]
    probs = (counts + 1) / (counts.sum() + vocab_size)
    return torch.from_numpy(np.log(probs))


def evaluate_loss(cfg: DictConfig) -> dict[str, Any]:
    """Print and write ``eval.json`` beside the checkpoint: val loss, ppl, bpb, unigram bpb."""
    (model, tokenizer, run_cfg), checkpoint = load(cfg)
    datamodule = checkpoint_datamodule(run_cfg, cfg)
    device = next(model.parameters()).device
    vocab_size = max(model.vocab_size, tokenizer.get_vocab_size())
    nll, n_tokens, target_counts = validation_nll(model, datamodule.val_dataloader(), device, vocab_size)
    train_tokens = np.memmap(datamodule.folder / "train.bin", dtype=datamodule.manifest["dtype"], mode="r")
    # Smoothing spreads mass over the ids the tokenizer can emit, not the model's padded vocab.
    unigram = unigram_log_probs(train_tokens, tokenizer.get_vocab_size())
    unigram_nll = -(target_counts[: len(unigram)] * unigram).sum().item()
    loss, unigram_loss = nll / n_tokens, unigram_nll / n_tokens
    scale = math.log(2) * datamodule.bytes_per_token
    result = {
        "ckpt_path": str(cfg.ckpt_path),
        "step": int(checkpoint.get("global_step", 0)),
        "tokens_seen": int(checkpoint.get("tokens_seen", 0)),
        "val_loss": loss,
        "val_ppl": math.exp(loss),
        "val_bpb": loss / scale,
        "val_tokens": n_tokens,
        "bytes_per_token": datamodule.bytes_per_token,
        "unigram_loss": unigram_loss,
        "unigram_bpb": unigram_loss / scale,
    }
    out = Path(cfg.ckpt_path).parent / "eval.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{cfg.ckpt_path} (step {result['step']}, {result['tokens_seen']:,} tokens seen)\n"
          f"  val loss {loss:.4f} nats/token, perplexity {result['val_ppl']:.2f}, "
          f"{result['val_bpb']:.4f} bits/byte on {n_tokens:,} tokens\n"
          f"  unigram baseline {result['unigram_bpb']:.4f} bits/byte\n"
          f"  written to {out}")
    return result
