"""distributed.py: one process, or one of several that torchrun started. Set-up (`init_distributed`:
gloo on CPU, NCCL on GPU, and the precision: bf16 autocast where it is fast), the few collectives
the stages use, wrapping a model for DDP or FSDP2, and changing parameters in place on each
process's FSDP2 shard (what metarm.py and bilevel_rm.py do to theta). In one process every
function here is the plain operation.
"""
import contextlib
import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from cli import UserError


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "ddp"  # how trainable models are wrapped when world > 1: "ddp" or "fsdp"
    bf16: bool = False  # bf16 compute: autocast on GPU, or on a CPU with fast bf16
    precision_why: str = ""  # how --precision was resolved, for the log and DONE

    @property
    def main(self):
        return self.rank == 0

    def print(self, *a):
        if self.main:
            print(*a, flush=True)


# On CPU, bf16 autocast is used only for a model large enough that its matrix products dominate
# the time (a SmolLM2-135M SFT step: 2.0x faster, docs/pretrained.md); for the embedded task's
# 1 M model it would change the rounding, and every result, for little or no speed.
BF16_CPU_MIN_PARAMETERS = 50_000_000


PRECISION_HELP = (f"auto: bf16 autocast on GPU, and on a CPU with fast bf16 for a model of "
                  f"{BF16_CPU_MIN_PARAMETERS // 10**6}M parameters or more; fp32 otherwise (DONE records which)")


def fast_bf16_cpu():
    """Whether this CPU multiplies bf16 matrices natively (AMX tiles or AVX-512 BF16), as torch's
    own CPU-capability checks report it."""
    checks = [getattr(torch.cpu, n, None) for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(c is not None and c() for c in checks)


def n_parameters(name):
    """Parameters of the model in a folder (or hub name), counted from its config on the meta
    device (nothing loaded); None when there is no readable config."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if not os.path.isdir(name) and (name.startswith(("/", ".", "~")) or name.count("/") != 1):
        return None  # neither a folder nor a hub name
    try:
        config = AutoConfig.from_pretrained(name)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # no config, a hub name offline, an architecture without a causal LM
        return None
    return sum(p.numel() for p in model.parameters())


def init_distributed(strategy="ddp", precision="auto", model=None):
    """One process, or one of WORLD_SIZE processes started by torchrun. precision 'auto': bf16
    autocast on GPU, and on a CPU with fast bf16 (fast_bf16_cpu) for a model (the stage's main
    one, a folder) of at least BF16_CPU_MIN_PARAMETERS; float32 otherwise."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    why = f"--precision {precision}"
    if precision == "auto" and device.type == "cuda":
        precision, why = "bf16", "auto: GPU"
    elif precision == "auto":
        fast = fast_bf16_cpu()
        n = n_parameters(model) if model and fast else None
        if n is not None and n >= BF16_CPU_MIN_PARAMETERS:
            precision, why = "bf16", f"auto: CPU with fast bf16, {n / 1e6:.1f}M parameters"
        elif not fast:
            precision, why = "fp32", "auto: CPU without fast bf16 (AMX or AVX-512 BF16)"
        else:
            precision, why = "fp32", f"auto: CPU, a model under {BF16_CPU_MIN_PARAMETERS / 1e6:.0f}M parameters"
    return Dist(rank, world, local_rank, device, strategy, precision == "bf16", f"{precision} ({why})")

# ---------------------------------------------------------------------------------------------
# Collectives: the identity in one process
# ---------------------------------------------------------------------------------------------


def all_sum(x):
    """Sum a float or tensor over ranks (identity in one process)."""
    if not dist.is_initialized():
        return x
    t = torch.as_tensor(x, dtype=torch.float64).clone()
    dist.all_reduce(t)
    return t.item() if t.dim() == 0 else t


def barrier():
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_mean(tensors):
    """Average tensors over processes, differentiably (the backward all-reduces the incoming gradient)."""
    if not dist.is_initialized():
        return list(tensors)
    from torch.distributed.nn.functional import all_reduce
    return [all_reduce(t) / dist.get_world_size() for t in tensors]


def mean_over_processes(x):
    """The mean of a float over processes (itself in one process)."""
    return all_sum(float(x)) / (dist.get_world_size() if dist.is_initialized() else 1)

# ---------------------------------------------------------------------------------------------
# Wrapping a model: DDP or FSDP2, autocast, gradient accumulation
# ---------------------------------------------------------------------------------------------


def decoder_layers(model):
    """The transformer blocks of a Hugging Face model (what FSDP2 shards one by one)."""
    base = getattr(model, "base_model", model)
    for name in ("layers", "h", "blocks", "layer"):
        layers = getattr(base, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise UserError(f"cannot find the decoder layers of {type(model).__name__} to shard")


def wrap(model, d, trainable=True, gradient_checkpointing=False):
    """Move a model to its device and wrap it for d.strategy. Trainable models: DDP, or FSDP2
    (each decoder layer, then the whole model) with bf16 compute and fp32 gradient reduction on
    GPU; frozen models: sharded under FSDP2, stored in bf16 on GPU, never wrapped in DDP."""
    hf = getattr(model, "hf", model)
    if not trainable:
        model.requires_grad_(False)
        if d.bf16 and d.device.type == "cuda":
            model.to(torch.bfloat16)
    elif gradient_checkpointing:  # transformers >= 5.x names it activation checkpointing
        if hasattr(hf, "activation_checkpointing_enable"):
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = model.to(d.device)
    if d.world > 1 and d.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if d.bf16 and d.device.type == "cuda" else None, reduce_dtype=torch.float32)
        for layer in decoder_layers(hf):
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    if d.world > 1 and trainable:
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    return model


def reshard(model):
    """Under FSDP2 a forward pass without backward leaves the root's weights gathered, and
    model.parameters() then lists the gathered tensors, not the sharded parameters that the
    optimizer holds: reshard so that the parameters are the shards again. No-op otherwise."""
    for m in model.modules():
        if hasattr(m, "reshard"):
            m.reshard()
    return model


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def autocast(d):
    """bf16 autocast (GPU, or CPU with fast bf16) for one process or DDP; FSDP2 casts by its own
    policy on GPU. Weights, gradients and optimizer state stay float32."""
    if d.bf16 and not (d.world > 1 and d.strategy == "fsdp" and d.device.type == "cuda"):
        return torch.autocast(d.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def grad_sync(model, enabled):
    """Skip the gradient all-reduce on all but the last micro-batch of a step (accumulation)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        yield
        model.set_requires_gradient_sync(True)
    else:
        yield


def shard_batches(n, batch, d):
    """This process's share of n items in batches, the same number of batches on every process
    (FSDP2 gathers weights in every forward, so every process must run as many): a process
    that runs out gets ([0], False) batches, to run and discard. Yields (indices, real)."""
    per = -(-n // d.world)
    mine = list(range(d.rank * per, min(n, (d.rank + 1) * per)))
    for b in range(-(-per // batch)):
        idx = mine[b * batch:(b + 1) * batch]
        yield (idx, True) if idx else ([0], False)

# ---------------------------------------------------------------------------------------------
# Parameters changed in place, each process on its own FSDP2 shard
# ---------------------------------------------------------------------------------------------


def trainable(model):
    """The trainable parameters. Under FSDP2 these are the sharded parameters; a module left
    unsharded by a forward pass (the root keeps its weights gathered) is resharded first, so
    that what is changed in place is each process's shard."""
    return [p for p in reshard(model).parameters() if p.requires_grad]


def local(t):
    """The tensor this process holds: its shard of an FSDP2 DTensor, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def copy_(params, tensors):
    """params <- tensors, in place, each process on its own shard under FSDP2."""
    for p, t in zip(params, tensors):
        if local(p).numel():  # an empty FSDP2 shard has nothing to copy
            local(p).copy_(local(t))


def taken_grads(params, keep_none=False):
    """The parameters' .grad, cleared from them. An FSDP2 shard that holds no rows of a small
    tensor (a one-row score head split over two processes) gets no gradient: zeros then (None
    with keep_none=True)."""
    grads = [p.grad if p.grad is not None or keep_none else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    return grads


def dot(a, b):
    """sum_i <a_i, b_i> over two lists of (full or FSDP2-sharded) tensors."""
    total = sum(float((local(x).double() * local(y).double()).sum()) for x, y in zip(a, b))
    return all_sum(total) if any(hasattr(t, "to_local") for t in a) else total
