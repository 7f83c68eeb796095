"""Decoding memory: KV-cache bytes of windowed models against a full cache, and their decoding speed.

    PYTHONPATH=. python bench/kv_cache.py [--device cuda] [--new 4096] [--window 64] [--quick]

Model: ``configs/model/llama.yaml`` (d_model 288, 6 layers, 6 heads, GQA with 2 K/V heads, vocab
4096), random weights, with ``model/attention`` = gqa (every layer global), swa (every layer
windowed) and local_global (every second layer global). Each generates ``--new`` greedy tokens
after a 16-token prompt at batch 1 with ``extrapolate=True`` (RoPE past the 256-token context, so
the cache holds the whole generation). A global layer's cache grows with the generated length; a
windowed layer keeps a ring of W keys. The bytes are those of the cache the generation allocates.
"""

import argparse
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from minillm import KVCache, build_model, generate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def cache_bytes(cache: KVCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.k, layer.v))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=4096)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 on a busy CPU)")
    ap.add_argument("--quick", action="store_true", help="512 new tokens")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    new = 512 if args.quick else args.new
    prompt = [torch.randint(0, 4096, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()]
    print(f"llama body, {args.device}, {torch.get_num_threads()} threads, prompt {args.prompt}, "
          f"{new} new tokens, batch 1, window {args.window}")
    print(f"{'attention':>12} {'windows per layer':>30} {'KV cache MB':>11} {'x full':>7} {'tok/s':>7}")
    full = None
    for attention in ("gqa", "swa", "local_global"):
        with initialize_config_dir(str(CONFIGS), version_base=None):
            cfg = compose("train", overrides=["model=llama", f"model/attention={attention}",
                                              "data=synthetic", "data.vocab_size=4096"]
                          + ([f"model.attention.window={args.window}"] if attention != "gqa" else []))
        torch.manual_seed(0)
        model = build_model(cfg.model).to(args.device).eval()
        nbytes = cache_bytes(KVCache.for_model(model, 1, args.prompt + new))  # what generate allocates
        full = full or nbytes
        generate(model, prompt, 4, temperature=0)  # warm-up
        t = time.perf_counter()
        out = generate(model, prompt, new, temperature=0, extrapolate=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        windows = ",".join("-" if b.attn.window is None else str(b.attn.window) for b in model.blocks)
        print(f"{attention:>12} {windows:>30} {nbytes / 2**20:11.2f} {nbytes / full:7.3f} "
              f"{len(out[0]) / seconds:7.0f}", flush=True)


if __name__ == "__main__":
    main()
