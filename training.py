"""training.py: what every training stage does alike: the data order (`batch_indices`: one stream
of per-epoch permutations cut into global batches, the same whatever the number of processes),
the learning-rate schedule (linear warm-up, then linear decay, the paper's), gradient clipping.
"""
import math

import numpy as np
import torch

from cli import UserError
from distributed import reshard


def total_steps(n_rows, global_batch, epochs):
    return math.ceil(n_rows * epochs / global_batch)


def batch_indices(n_rows, global_batch, step, seed, d, flag="--global_batch"):
    """This rank's row indices for global step `step`. The rows form one stream, a fresh
    permutation per epoch (the same on every rank), cut into consecutive global batches; each
    rank takes a contiguous slice of the batch, so the batch does not depend on the world size."""
    if global_batch > n_rows:
        raise UserError(f"{flag} {global_batch}: more than the {n_rows} rows it is drawn from (a batch would hold "
                        f"rows twice): lower it to {n_rows} or less, or give more rows")
    if global_batch % d.world:
        raise UserError(f"the global batch {global_batch} must be divisible by the number of "
                        f"processes {d.world}")
    positions = range(step * global_batch, (step + 1) * global_batch)
    perms = {}
    rows = []
    for p in positions:
        epoch = p // n_rows
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n_rows)
        rows.append(int(perms[epoch][p % n_rows]))
    per_rank = global_batch // d.world
    return rows[d.rank * per_rank:(d.rank + 1) * per_rank]


def micro_batches(rows, size):
    return [rows[i:i + size] for i in range(0, len(rows), size)] if size > 0 else [rows]


def set_lr(opt, peak, step, total, warmup):
    """Linear warm-up over `warmup` steps, then linear decay to zero (the paper's schedule)."""
    if step < warmup:
        lr = peak * (step + 1) / warmup
    else:
        lr = peak * max(0.0, (total - step) / max(1, total - warmup))
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


def clip_grad_norm(model, max_norm):
    """Clip and return the global gradient norm (works on DTensor shards under FSDP2 too)."""
    params = [p for p in reshard(model).parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
