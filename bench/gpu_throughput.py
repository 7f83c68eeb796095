"""Training throughput and MFU of the llama2.c shapes on synthetic tokens.

Trains each shape for a fixed number of steps with what ``trainer=gpu`` turns on (bf16 autocast,
fused AdamW, torch.compile, vocab padded to a multiple of 64) and prints tokens per second, MFU
against the detected chip's dense bf16 peak, and peak memory. Goals on an H100: 110M shape >= 40%
MFU; 15M shape at vocab 32000 >= 15% MFU.

    python bench/gpu_throughput.py                  # all shapes, CUDA
    python bench/gpu_throughput.py --quick          # fewer steps
    python bench/gpu_throughput.py --device cpu --shapes 15M-4k --steps 3 --batch 2 --no-compile
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minillm import build_model  # noqa: E402
from minillm.training.throughput import flops_per_token, mfu, peak_flops  # noqa: E402

SHAPES = {  # name: (d_model, n_layers, n_heads, seq_len, vocab, batch)
    "15M-4k": (288, 6, 6, 256, 4096, 128),
    "15M-32k": (288, 6, 6, 256, 32000, 128),
    "110M-32k": (768, 12, 12, 1024, 32000, 32),
}


def run_shape(name: str, args) -> None:
    d, layers, heads, T, vocab, batch = SHAPES[name]
    batch = args.batch or batch
    with initialize_config_dir(str(ROOT / "configs"), version_base=None):
        cfg = compose("train", ["model=llama", "model/attention=mha", f"data.vocab_size={vocab}",
                                f"model.d_model={d}", f"model.n_layers={layers}",
                                f"model.n_heads={heads}", f"model.max_seq_len={T}"])
    device = torch.device(args.device)
    model = build_model(cfg.model).to(device)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=fused)
    fwd = torch.compile(model) if args.compile else model
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    data = torch.randint(0, vocab, (args.steps + args.warmup, batch, T + 1), device=device)

    def step(i: int) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = fwd(data[i, :, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), data[i, :, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        loss = step(i)
    loss.item()  # one sync at the end
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tps = args.steps * batch * T / dt
    fpt = flops_per_token(model, T)
    util = mfu(tps, fpt, peak_flops(device, args.peak_flops))
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    util_s = f"{100 * util:5.1f}%" if util is not None else "  n/a"
    print(f"{name:9s} params {model.num_params() / 1e6:6.1f}M  batch {batch:4d}x{T:<5d} "
          f"{tps / 1e3:9.1f}k tok/s  MFU {util_s}  peak mem {mem:5.1f} GiB  "
          f"{dt / args.steps * 1e3:7.1f} ms/step  loss {loss.item():.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=0, help="override each shape's batch size")
    ap.add_argument("--quick", action="store_true", help="10 steps after 3 warm-up steps")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--peak-flops", type=float, default=None, help="chip peak, if not detected")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup = 10, 3
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: pass --device cpu (MFU is then not reported)")
        torch.set_float32_matmul_precision("high")
        print(f"device {torch.cuda.get_device_name()}, peak {peak_flops('cuda', args.peak_flops)}")
    for name in args.shapes:
        run_shape(name, args)


if __name__ == "__main__":
    main()
