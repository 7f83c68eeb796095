"""Attention backends x position schemes: speed against plain causal sdpa, and ALiBi peak memory.

    PYTHONPATH=. python bench/attention.py                                 # CPU, fp32, T = 256, 1024
    PYTHONPATH=. python bench/attention.py --device cuda --dtype bf16      # T = 1024, 2048, 4096
    add --quick for one length and few repeats
    PYTHONPATH=. python bench/attention.py --masks [--window 256 --doc-len 200]   # T = 1024, 4096

``--masks`` compares masks instead of position schemes (RoPE throughout): a sliding window of
``--window`` keys and document masks (stories of about ``--doc-len`` tokens, the TinyStories mean),
each on ``flex`` (block-sparse: skipped blocks are not computed) and ``sdpa`` (a dense boolean mask),
against dense causal ``sdpa``. Document rows rebuild their mask every call (once per batch, as in
training); causal and window masks are cached per shape. Peak memory is that of an inference call.

One attention layer of the llama2.c 15M shape (d_model 288, 6 heads, GQA with 2 K/V heads unless
--kv-heads), batch --batch. "train" times forward+backward, "infer" a forward under no_grad; ratios
are times of plain causal sdpa divided by the row's time (above 1 is faster). Peak memory is what
the allocator holds during an ALiBi forward: torch.cuda.max_memory_allocated on CUDA, the
profiler's allocation events on CPU. On CPU, flex has no backward in torch 2.13, so its "train"
rows run the sdpa fallback (marked *).
"""

import argparse
import time

import torch

from minillm.model.attention import KERNELS, Attention, _flash_attn_missing
from minillm.model.mask import AttentionMask
from minillm.model.position import ALiBi, PositionEncoding, RoPE

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, reps: int) -> float:
    """Fastest of ``reps`` timings of ``fn()`` after two warm-up calls (compilation happens there);
    the minimum, because other processes sharing the CPU only ever add time."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def peak_bytes(fn, device: str) -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def masks(args, dtype: torch.dtype, lengths: list[int], batch: int, reps: int) -> None:
    """Window and document masks on flex and sdpa against dense causal sdpa (see the docstring)."""
    cuda, d_model, n_heads = args.device == "cuda", 288, 6
    print(f"{'mask':>10} {'backend':>8} {'T':>5} {'infer ms':>9} {'x causal':>8} {'peak MB':>8}"
          + (f" {'train ms':>9} {'x causal':>8}" if cuda else ""))
    for T in lengths:
        rope = RoPE(d_model, n_heads, T).to(args.device)
        x = torch.randn(batch, T, d_model, device=args.device, dtype=dtype, requires_grad=True)
        starts = torch.rand(batch, T, generator=torch.Generator().manual_seed(0)) < 1 / args.doc_len
        docs = starts.cumsum(1).to(args.device)
        base = {}
        for kind, backend in [("causal", "sdpa"), ("causal", "flex"), ("window", "sdpa"),
                              ("window", "flex"), ("documents", "sdpa"), ("documents", "flex")]:
            torch.manual_seed(0)
            window = args.window if kind == "window" else None
            layer = Attention(d_model, n_heads, args.kv_heads, backend=backend,
                              window=window).to(args.device, dtype)

            def call():  # the model builds one mask per forward: documents rebuild it per batch
                return layer(x, rope, None, AttentionMask(T, documents=docs if kind == "documents" else None))

            def infer():
                with torch.no_grad():
                    call()

            def train():
                call().sum().backward()

            t_infer = timed(infer, args.device, reps)
            base.setdefault("infer", t_infer)
            row = (f"{kind:>10} {backend:>8} {T:5d} {t_infer * 1e3:9.2f} {base['infer'] / t_infer:8.2f} "
                   f"{peak_bytes(infer, args.device) / 2**20:8.1f}")
            if cuda:
                t_train = timed(train, args.device, reps)
                base.setdefault("train", t_train)
                row += f" {t_train * 1e3:9.2f} {base['train'] / t_train:8.2f}"
            print(row, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--lengths", type=int, nargs="+", default=None)
    ap.add_argument("--batch", type=int, default=None, help="default: 1 on CPU, 8 on CUDA")
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 on a busy CPU)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=None, help="timings per row (default 10, --quick 3)")
    ap.add_argument("--masks", action="store_true", help="window and document masks (see above)")
    ap.add_argument("--window", type=int, default=256, help="--masks: window of W keys")
    ap.add_argument("--doc-len", type=int, default=200, help="--masks: mean document length")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    lengths = args.lengths or ([1024, 2048, 4096] if cuda else [1024, 4096] if args.masks else [256, 1024])
    lengths = lengths[:1] if args.quick else lengths
    batch, reps = args.batch or (8 if cuda else 1), args.reps or (3 if args.quick else 10)
    if args.masks:
        print(f"device {args.device}, {dtype}, batch {batch}, d_model 288, heads 6, kv heads "
              f"{args.kv_heads}, window {args.window}, documents ~{args.doc_len} tokens, "
              f"torch {torch.__version__}, threads {torch.get_num_threads()}")
        return masks(args, dtype, lengths, batch, reps)
    backends = [b for b in KERNELS if b != "flash_attn" or not _flash_attn_missing()]
    d_model, n_heads = 288, 6
    print(f"device {args.device}, {dtype}, batch {batch}, d_model {d_model}, heads {n_heads}, "
          f"kv heads {args.kv_heads}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'backend':>10} {'position':>8} {'T':>5} {'train ms':>9} {'x sdpa':>7} "
          f"{'infer ms':>9} {'x sdpa':>7} {'alibi peak MB':>13}")
    ratios = {}  # (backend, T) -> ALiBi training speed relative to causal sdpa
    for T in lengths:
        schemes = {"none": PositionEncoding(d_model, n_heads, T), "rope": RoPE(d_model, n_heads, T),
                   "alibi": ALiBi(d_model, n_heads, T)}
        x = torch.randn(batch, T, d_model, device=args.device, dtype=dtype, requires_grad=True)
        base = {}
        for backend in ["sdpa"] + [b for b in backends if b != "sdpa"]:
            torch.manual_seed(0)
            layer = Attention(d_model, n_heads, args.kv_heads, backend=backend).to(args.device, dtype)
            for name, scheme in schemes.items():
                scheme = scheme.to(args.device)

                def train():
                    layer(x, scheme).sum().backward()

                def infer():
                    with torch.no_grad():
                        layer(x, scheme)

                t_train, t_infer = timed(train, args.device, reps), timed(infer, args.device, reps)
                base.setdefault("train", t_train), base.setdefault("infer", t_infer)
                if name == "alibi":
                    ratios[backend, T] = base["train"] / t_train
                peak = f"{peak_bytes(infer, args.device) / 2**20:13.1f}" if name == "alibi" else ""
                star = "*" if backend == "flex" and not cuda else " "
                print(f"{backend:>10} {name:>8} {T:5d} {t_train * 1e3:8.2f}{star} "
                      f"{base['train'] / t_train:7.2f} {t_infer * 1e3:9.2f} "
                      f"{base['infer'] / t_infer:7.2f} {peak}", flush=True)
    if cuda:  # the goal: ALiBi at >= 0.85x the speed of causal FlashAttention (sdpa)
        for (backend, T), r in sorted(ratios.items()):
            if backend in ("flex", "flash_attn"):
                print(f"goal ALiBi {backend} T={T}: {r:.2f}x causal sdpa "
                      f"({'met' if r >= 0.85 else 'NOT met'}, goal 0.85x)")


if __name__ == "__main__":
    main()
