"""Learning-rate schedule: linear warmup, then cosine decay to a floor (nanoGPT, llama2.c)."""

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from minillm.config import check_int

# warmup_steps=auto: this many steps, or a tenth of a shorter run, so `trainer.max_steps=30` works
# as typed while the default 1,000- and 5,000-step runs keep the 100 steps they always had.
AUTO_WARMUP_STEPS, AUTO_WARMUP_FRACTION = 100, 0.1


def warmup_cosine_lr(step: int, lr: float, warmup_steps: int, max_steps: int, min_lr: float) -> float:
    """Learning rate after ``step`` optimizer steps: lr*(step+1)/(warmup+1), cosine to min_lr, then min_lr."""
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def resolve_warmup(warmup_steps: int | str, max_steps: int) -> int:
    """``warmup_steps`` as a number of steps: ``auto`` is min(100, max_steps // 10); a number is kept."""
    if warmup_steps == "auto":
        return min(AUTO_WARMUP_STEPS, int(max_steps * AUTO_WARMUP_FRACTION))
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int):
        raise ValueError(f"scheduler.warmup_steps={warmup_steps!r} must be an integer in [0, "
                         f"scheduler.max_steps={max_steps}) or auto")
    return warmup_steps


def warmup_cosine(optimizer: Optimizer, warmup_steps: int | str, max_steps: int, min_lr: float) -> LambdaLR:
    """A per-step ``LambdaLR`` following ``warmup_cosine_lr`` from each group's initial lr, down to
    ``min_lr`` scaled by that lr over the first group's (``optimizer.lr``): every group decays by
    the same factor, also with Muon's own lr (``optimizer=muon``)."""
    check_int(max_steps, "scheduler.max_steps",
              hint=" (it follows trainer.max_steps; set trainer.max_steps=N)")
    warmup_steps = resolve_warmup(warmup_steps, max_steps)
    if not 0 <= warmup_steps < max_steps:
        raise ValueError(f"scheduler.warmup_steps={warmup_steps!r} must be in [0, "
                         f"scheduler.max_steps={max_steps})")
    base = [group["lr"] for group in optimizer.param_groups]
    if any(not 0 <= min_lr <= lr for lr in base):
        raise ValueError(f"scheduler.min_lr={min_lr!r} must be in [0, optimizer.lr={base[0]}]")

    # Closures, not callable objects: LambdaLR then keeps them out of its state_dict, so checkpoints
    # hold plain data only.
    def factor(lr: float):
        floor = min_lr * lr / base[0] if base[0] else min_lr
        return lambda step: warmup_cosine_lr(step, lr, warmup_steps, max_steps, floor) / lr if lr else 0.0

    return LambdaLR(optimizer, [factor(lr) for lr in base])
