"""Greedy generation with a KV cache against full recomputation, on the llama2.c 15M shape.

    PYTHONPATH=. python bench/generate.py [--device cuda] [--quick]

Model: ``configs/model/llama.yaml`` with MHA (d_model 288, 6 layers, 6 heads, vocab 4096, context
256), random weights. Generates ``--new`` tokens after a ``--prompt``-token prompt at batch 1 both
ways, asserts the tokens are identical and prints the speed-up (goal: at least 5x). Past the
256-token context both paths slide the window the same way (see ``minillm/generate.py``).
"""

import argparse
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from minillm import build_model, generate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--backend", default="sdpa", help="model.attention.backend")
    ap.add_argument("--quick", action="store_true", help="64 new tokens")
    args = ap.parse_args()
    new = 64 if args.quick else args.new
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = compose("train", overrides=["model=llama", "model/attention=mha", "data=synthetic",
                                          "data.vocab_size=4096",
                                          f"model.attention.backend={args.backend}"])
    torch.manual_seed(0)
    model = build_model(cfg.model).to(args.device).eval()
    prompt = [torch.randint(0, 4096, (args.prompt,)).tolist()]
    generate(model, prompt, 4, temperature=0)  # warm-up
    seconds, tokens = {}, {}
    for use_cache in (True, False):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        tokens[use_cache] = generate(model, prompt, new, temperature=0, use_cache=use_cache)
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds[use_cache] = time.perf_counter() - t
    assert tokens[True] == tokens[False], "cached and recomputed greedy tokens differ"
    speedup = seconds[False] / seconds[True]
    print(f"{model.num_params() / 1e6:.1f}M params, {args.device}, prompt {args.prompt}, {new} new "
          f"tokens, batch 1: KV cache {seconds[True]:.2f} s ({new / seconds[True]:.0f} tok/s), "
          f"recompute {seconds[False]:.2f} s ({new / seconds[False]:.0f} tok/s): "
          f"{speedup:.1f}x faster, identical greedy tokens")
    assert speedup >= 5, f"KV cache only {speedup:.1f}x faster than recomputation (goal 5x)"


if __name__ == "__main__":
    main()
