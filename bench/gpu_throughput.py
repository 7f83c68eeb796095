"""Training throughput and MFU of the llama2.c shapes on synthetic tokens.

Trains each shape for a fixed number of steps with what ``trainer=gpu`` turns on (bf16 autocast,
fused AdamW, torch.compile with the loss inside the compiled forward, vocab padded to a multiple of
64) and prints tokens per second, MFU against the detected chip's dense bf16 peak, and peak memory.
Goals on an H100: 110M shape >= 40% MFU; 15M shape at vocab 32000 >= 15% MFU.

``--lightning`` also trains each shape through ``train.py``'s own path (Hydra config, Lightning,
``trainer=gpu``, the default callbacks, synthetic data through the DataLoader) and prints its
tokens/s as read by the ``ThroughputMonitor`` and its ratio to the bare loop measured just before
in the same process: what the framework costs. ``--loss-outside`` times the bare loop with the loss
computed outside the compiled forward (the logits come out, then cross-entropy in fp32), for the
ratio of the fused loss.

    python bench/gpu_throughput.py                  # all shapes, CUDA
    python bench/gpu_throughput.py --quick --lightning --loss-outside
    python bench/gpu_throughput.py --device cpu --shapes 15M-4k --steps 3 --batch 2 --no-compile --lightning
"""

import argparse
import sys
import tempfile
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


def model_overrides(name: str) -> list[str]:
    d, layers, heads, T, vocab, _ = SHAPES[name]
    return ["model=llama", "model/attention=mha", f"model.vocab_size={vocab}", f"model.d_model={d}",
            f"model.n_layers={layers}", f"model.n_heads={heads}", f"model.max_seq_len={T}"]


def run_shape(name: str, args, loss_inside: bool = True) -> float:
    """Time the bare training loop on ``name``; print a line, return tokens per second."""
    d, layers, heads, T, vocab, batch = SHAPES[name]
    batch = args.batch or batch
    with initialize_config_dir(str(ROOT / "configs"), version_base=None):
        cfg = compose("train", model_overrides(name))
    device = torch.device(args.device)
    model = build_model(cfg.model).to(device)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=fused)
    fwd = torch.compile(model) if args.compile else model
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    data = torch.randint(0, vocab, (args.steps + args.warmup, batch, T + 1), device=device)

    def step(i: int) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if loss_inside:  # as LanguageModel.training_step
                loss = fwd(data[i, :, :-1], targets=data[i, :, 1:]).loss
            else:
                logits = fwd(data[i, :, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1).float(), data[i, :, 1:].flatten())
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
    label = name if loss_inside else f"{name} loss outside"
    print(f"{label:9s} params {model.num_params() / 1e6:6.1f}M  batch {batch:4d}x{T:<5d} "
          f"{tps / 1e3:9.1f}k tok/s  MFU {util_s}  peak mem {mem:5.1f} GiB  "
          f"{dt / args.steps * 1e3:7.1f} ms/step  loss {loss.item():.3f}")
    return tps


def run_lightning(name: str, args) -> dict[str, float]:
    """Train ``name`` through ``minillm.training.train`` for 2 x steps (the first window holds
    compilation); return the metrics of the last ``steps`` steps (ThroughputMonitor's)."""
    from minillm.training import assemble, train

    _, _, _, T, _, batch = SHAPES[name]
    batch, steps = args.batch or batch, args.steps
    trainer = (["trainer=gpu", f"compile={str(args.compile).lower()}"] if args.device == "cuda" else
               ["trainer=cpu", f"compile={str(args.compile).lower()}"])
    if args.dtype == "fp32":
        trainer.append("trainer.precision=32-true")
    with tempfile.TemporaryDirectory() as run_dir, \
            initialize_config_dir(str(ROOT / "configs"), version_base=None):
        cfg = compose("train", model_overrides(name) + trainer + [
            "data=synthetic", f"data.batch_size={batch}", f"data.seq_len={T}", "data.n_stories=2000",
            "+data.show_progress=false", "logger=none", f"run_dir={run_dir}",
            f"trainer.max_steps={2 * steps}",
            f"scheduler.max_steps={2 * steps}", "scheduler.warmup_steps=1",
            f"trainer.log_every_n_steps={steps}", f"trainer.val_check_interval={4 * steps}",
            "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
            "+trainer.enable_progress_bar=false", "~callbacks.progress_bar",
            f"callbacks.throughput.peak_flops={args.peak_flops or 'null'}"])
        metrics = train(assemble(cfg))
    tps, util = metrics.get("train/tokens_per_sec"), metrics.get("train/mfu")
    util_s = f"{100 * util:5.1f}%" if util is not None else "  n/a"
    mem = metrics.get("train/peak_memory_mb", float("nan")) / 1024
    print(f"{name + ' lightning':9s} {tps / 1e3:9.1f}k tok/s  MFU {util_s}  peak mem {mem:5.1f} GiB")
    return metrics


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
    ap.add_argument("--lightning", action="store_true", help="also train through train.py's path")
    ap.add_argument("--loss-outside", action="store_true",
                    help="also time the loss outside the compiled forward")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup = 10, 3
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: pass --device cpu (MFU is then not reported)")
        torch.set_float32_matmul_precision("high")
        print(f"device {torch.cuda.get_device_name()}, peak {peak_flops('cuda', args.peak_flops)}")
    for name in args.shapes:
        bare = run_shape(name, args)
        if args.loss_outside:
            outside = run_shape(name, args, loss_inside=False)
            print(f"{name}: loss inside / outside the compiled forward: {bare / outside:.3f}x tokens/s")
        if args.lightning:
            framed = run_lightning(name, args)["train/tokens_per_sec"]
            print(f"{name}: lightning / bare loop: {framed / bare:.3f}x tokens/s")


if __name__ == "__main__":
    main()
