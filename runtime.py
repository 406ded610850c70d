"""Plumbing every stage shares, so that sft.py, reward_model.py, metarm.py and ppo.py can read as
algorithms: command-line arguments from a dataclass, distributed set-up (one process, DDP or
FSDP2, gloo on CPU and NCCL on GPU), run folders (args.json, metrics.jsonl, resumable
checkpoints, the DONE marker), loading/saving Hugging Face models with clear errors (the policy,
and the reward model: a scalar read at the last real token), and changing parameters in place
on each process's FSDP2 shard.
"""
import argparse
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import logging
import math
import os
import pickle
import random
import shutil
import socket
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist


def progress(iterable, d, desc="", total=None, initial=0):
    """A tqdm bar on rank 0 in a terminal; in a log file, a plain line every 30 seconds at most
    ('ppo: 12/20 steps, 20 s'), with no carriage returns or cursor escapes."""
    if sys.stderr.isatty():
        from tqdm import tqdm
        yield from tqdm(iterable, disable=not d.main, dynamic_ncols=True, desc=desc, total=total, initial=initial)
        return
    total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
    t0 = last = time.time()
    for n, item in enumerate(iterable, initial + 1):
        yield item
        now = time.time()
        if d.main and (now - last >= 30 or n == total):
            print(f"{desc}: {n}/{total or '?'}, {now - t0:.0f} s", file=sys.stderr, flush=True)
            last = now


# DCP warns that it saves "in a single process" whenever no process group exists: that is intended.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


class UserError(Exception):
    """A problem the user can fix (bad file, bad flag, missing model): printed as one line."""


def guard(main):
    """Run main(); a UserError becomes one 'error: ...' line and exit status 2, not a traceback."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Exception as e:  # a folder that cannot be written (read-only, full disk, no permission)
        why = cannot_write(e)
        if why is None:
            raise
        where = e.filename if isinstance(e, OSError) and e.filename else (f"in {WRITING[-1]}" if WRITING else "")
        print(f"error: cannot write {where}: {why}; free the space (or fix the permission) and run the same "
              "command again: a stage resumes from its last checkpoint, a finished one is kept", file=sys.stderr, flush=True)
        sys.exit(2)
    shutdown()


WRITING = []  # the output folders this process writes in (Run.open adds its own), for the error line


def cannot_write(e):
    """The reason an exception means "this cannot be written", or None. Writers raise OSError
    (often without a file name), safetensors its own error, torch.save a RuntimeError."""
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
        return e.strerror
    text = str(e)
    if "No space left on device" in text or "StorageFull" in text or "code: 28" in text:
        return "No space left on device"
    if "Disk quota exceeded" in text:
        return "Disk quota exceeded"
    if isinstance(e, RuntimeError) and "file write failed" in text:
        return "a write failed (a full disk?)"
    return None


def shutdown():
    """Leave a multi-process run cleanly: wait for every rank, destroy the process group, then
    exit at once. The interpreter's own finalization is skipped on purpose: there, a thread of
    the communication backend that still reaches for the interpreter can abort the process
    ("terminate called without an active exception") after all its work is done and saved.
    Every file is closed by then (all writes use `with`); only stdout/stderr need a flush."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


# ---------------------------------------------------------------------------------------------
# Arguments: a documented dataclass at the top of each stage becomes its command line
# ---------------------------------------------------------------------------------------------
def arg(default, help, choices=None, check=None):
    """A flag: default, help text, allowed choices, and a check of its value made when the command
    line is parsed: "> 0", ">= 0", "[0, 1]", "(0, 1]", ">= 2"."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "check": check})


CHECKS = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, ">= 2": lambda v: v >= 2, ">= 100": lambda v: v >= 100,
          "[0, 1]": lambda v: 0 <= v <= 1, "(0, 1]": lambda v: 0 < v <= 1}


def _bool(s):
    if s.lower() in ("1", "true", "yes"):
        return True
    if s.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def parse_args(cls, doc, argv=None):
    # allow_abbrev=False: a shortened or mistyped flag is an error, never silently another flag
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    for f in dataclasses.fields(cls):
        extra = dict(type=_bool, nargs="?", const=True) if f.type is bool else dict(type=f.type)
        ap.add_argument(f"--{f.name}", default=f.default, choices=f.metadata["choices"],
                        help=f"{f.metadata['help']} (default: {f.default!r})".replace("%", "%%"), **extra)  # argparse formats help with %
    args = cls(**vars(ap.parse_args(argv)))
    for f in dataclasses.fields(cls):
        rule, value = f.metadata["check"], getattr(args, f.name)
        if rule and not (math.isfinite(value) and CHECKS[rule](value)):
            raise UserError(f"--{f.name} {value:g}: must be {rule}")
    return args


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Distributed set-up
# ---------------------------------------------------------------------------------------------
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
# Loading and saving models
# ---------------------------------------------------------------------------------------------
def check_model_path(name):
    """Fail early, in one line, on a folder that does not exist, is an unfinished run or holds
    no model."""
    if os.path.isdir(name):
        if os.path.exists(os.path.join(name, "args.json")) and not is_done(name):
            raise UserError(f"{name} is a run folder without its DONE marker: that stage did not "
                            "finish; run it again to resume it")
        if not os.path.exists(os.path.join(name, "config.json")):
            raise UserError(f"{name} has no config.json: not a Hugging Face model folder")
        return
    first = name.split("/")[0]
    if name.startswith(("/", ".", "~")) or os.path.exists(first) or name.count("/") > 1:
        raise UserError(f"model folder {name} does not exist")


def model_kind(name):
    """'reward model', 'causal LM' or None (unknown: a hub name, or no architectures listed), from
    the folder's config.json."""
    path = os.path.join(name, "config.json")
    if not os.path.isfile(path):
        return None
    archs = " ".join(read_json(path).get("architectures") or [])
    if "ForSequenceClassification" in archs:
        return "reward model"
    return "causal LM" if "ForCausalLM" in archs else None


def read_json(path):
    """A JSON file written by this project; a damaged one is one line naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as e:  # (huge numbers, deep nesting)
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:160]
        raise UserError(f"{path} is damaged ({why}): delete it (or its folder) and run the stage that "
                        "wrote it again") from None


def _from_pretrained(cls, name, **kw):
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # no per-load progress bar, no report on the new score head:
    hf_logging.disable_progress_bar()  # the stages say what they load, in one line
    check_model_path(name)
    local = os.path.isdir(name)
    if local and cls.__name__ != "AutoTokenizer":
        read_json(os.path.join(name, "config.json"))
        if not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(name)):
            raise UserError(f"{name} has a config.json but no weights (*.safetensors): the stage "
                            "that wrote it did not finish saving; delete it and run that stage again")
    try:
        model = cls.from_pretrained(name, **kw)
    except Exception as e:  # transformers, safetensors and the hub raise many types
        first = (str(e).splitlines() or [""])[0][:200]
        if local:
            raise UserError(f"cannot load {name} ({type(e).__name__}: {first}): the folder is damaged; "
                            "delete it and run the stage that wrote it again") from None
        if not isinstance(e, OSError):
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise UserError(f"cannot load {name!r}: it is not a local folder and {why} "
                        f"({first}). Download it where there is network access and pass the "
                        "local folder instead") from None
    if isinstance(model, torch.nn.Module):
        for pname, p in model.named_parameters():
            if not torch.isfinite(p).all():
                raise UserError(f"{name} holds non-finite weights (NaN or inf, first in {pname}): "
                                "it was saved by a run that diverged; train it again")
    return model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_tokenizer(name, tok):
    """Every model loaded beside a tokenizer comes through here (load_causal_lm,
    load_reward_model): a folder that carries a tokenizer of its own must carry `tok`'s, or its
    token ids would mean other things. A hub name or a folder without tokenizer files is taken
    as it is."""
    source = getattr(tok, "name_or_path", "")
    if (not os.path.isdir(name) or not any(os.path.exists(os.path.join(name, f)) for f in TOKENIZER_FILES)
            or (source and os.path.realpath(source) == os.path.realpath(name))):
        return
    same_tokenizer(tok, source or "the tokenizer", load_tokenizer(name), name)


def same_tokenizer(tok, name, other, other_name):
    """Refuse two models whose tokenizers differ (vocabulary or special tokens): their token ids
    would mean different things to each other."""
    specials = lambda t: (t.pad_token_id, t.eos_token_id, t.bos_token_id, len(t))
    if specials(tok) != specials(other) or tok.get_vocab() != other.get_vocab():
        raise UserError(f"the tokenizers of {name} and {other_name} differ (vocabulary or special "
                        "tokens): both models must come from the same SFT model")


def no_dropout(model):
    """Dropout off everywhere: RLHF log-probabilities and rewards must be deterministic."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                "summary_first_dropout", "classifier_dropout"):
        if getattr(model.config, key, None):
            setattr(model.config, key, 0.0)
    return model


def load_tokenizer(name):
    from transformers import AutoTokenizer
    tok = _from_pretrained(AutoTokenizer, name)
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        # Llama-2 has no PAD; a PAD equal to EOS would make a real EOS look like padding.
        tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def load_causal_lm(name, tok):
    from transformers import AutoModelForCausalLM
    if model_kind(name) == "reward model":
        raise UserError(f"{name} is a reward model (sequence classification), not a causal LM: "
                        "pass a policy (an SFT, DPO or PPO folder)")
    check_tokenizer(name, tok)
    model = _from_pretrained(AutoModelForCausalLM, name, dtype=torch.float32)
    return _fit_vocab(no_dropout(model), tok)


class ScalarModel(torch.nn.Module):
    """A Hugging Face sequence-classification model (one label) read at every position:
    forward -> [B, T] scores. `hf` is the plain model that save_pretrained writes. The reward
    model reads it at the last real token (rewards); PPO's critic at every response token.

    For speed, the rows go through the network in groups of `rows` of about one length, each
    group cut after its longest row's last real token: the padding behind it is work for nothing
    (about a third of a batch of the embedded task). Attention is causal, so the scores up to a
    row's last real token are those of the whole batch, to float rounding (after it, padding, they
    mean nothing, as before)."""

    rows = 16

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids, attention_mask):
        ends = last_index(attention_mask) + 1
        by_length = torch.argsort(ends, stable=True)
        parts = []
        for group in by_length.split(self.rows):
            T = int(ends[group].max())
            ids, mask = input_ids[group, :T], attention_mask[group, :T]
            h = self.hf.base_model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).last_hidden_state
            parts.append(torch.nn.functional.pad(self.hf.score(h)[..., 0], (0, input_ids.shape[1] - T)))
        # back in the given order: indexing makes a new tensor, not a view of the head's output
        # (FSDP2 warns that in-place changes to a view would bypass it); bf16 -> fp32, fp32 and fp64 kept
        scores = torch.cat(parts)[torch.argsort(by_length)]
        return scores.to(torch.promote_types(scores.dtype, torch.float32))


def positions(mask):
    """Position ids that start at 0 on the first real token, so left padding changes nothing."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def last_index(mask):
    """Index of the last real token of each row, for left or right padding."""
    T = mask.shape[1]
    return T - 1 - mask.flip(-1).long().argmax(-1)


def rewards(model, ids, mask, params=None):
    """r_theta(x, y) for each row: the score at the last real token. With `params` (name -> tensor),
    r at those parameters instead, through torch.func.functional_call (MetaRM's theta')."""
    scores = model(ids, mask) if params is None else torch.func.functional_call(model, params, (ids, mask))
    return scores.gather(1, last_index(mask)[:, None]).squeeze(1)


def sequence_logps(model, ids, mask, labels, params=None):
    """log pi(y|x) per row of a causal LM: the sum of the response tokens' log-probabilities
    (labels != -100). With `params` (name -> tensor), at those parameters (torch.func)."""
    kw = dict(input_ids=ids, attention_mask=mask)
    out = model(**kw) if params is None else torch.func.functional_call(model, params, (), kw)
    logits, target = out.logits[:, :-1], labels[:, 1:]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32; fp64 kept
    logp = torch.gather(logits.log_softmax(-1), 2, target.clamp(min=0)[..., None]).squeeze(-1)
    return (logp * (target != -100)).sum(-1)


def load_reward_model(name, tok, trained=True):
    """A one-label sequence-classification model: a trained reward model (a folder that
    reward_model.py or metarm.py wrote: sequence classification, with reward_stats.json), or,
    with trained=False, a new score head on an SFT model."""
    from transformers import AutoModelForSequenceClassification
    kind = model_kind(name)
    if trained and (kind != "reward model" or not os.path.isfile(os.path.join(name, "reward_stats.json"))):
        raise UserError(
            f"{name} is not a reward model ({kind or 'no sequence-classification config.json'}"
            f"{'' if kind != 'reward model' else ', no reward_stats.json'}): pass a folder that "
            "reward_model.py or metarm.py wrote (for an outside RM, add a reward_stats.json "
            '{"mean": 0.0, "std": 1.0})')
    if not trained and kind == "reward model":
        raise UserError(f"{name} is a reward model, not the SFT model a new reward model "
                        "starts from (metarm.py --init_rm starts from a reward model)")
    check_tokenizer(name, tok)
    hf = _from_pretrained(AutoModelForSequenceClassification, name, num_labels=1, dtype=torch.float32)
    if not hasattr(hf, "score"):
        raise UserError(f"{type(hf).__name__} has no 'score' head; use a decoder model "
                        "(Llama, Mistral, Qwen2, GPT-2, ...)")
    return ScalarModel(_fit_vocab(no_dropout(hf), tok))


def _fit_vocab(model, tok):
    if model.get_input_embeddings().weight.shape[0] < len(tok):
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    return model


def save_model(model, tok, out_dir, d, extra=None):
    """Gather the full weights and save a plain save_pretrained folder (rank 0 writes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    inner = unwrap(model)
    hf = getattr(inner, "hf", inner)
    if hf is not inner:  # a wrapper such as ScalarModel: strip its prefix
        sd = {k[len("hf."):]: v for k, v in sd.items() if k.startswith("hf.")}
    bad = broadcast_object(next((k for k, v in sd.items() if not torch.isfinite(v).all()), None))
    if bad:
        raise UserError(f"{out_dir}: the weights to save are not finite (NaN or inf, first in {bad}); "
                        "nothing saved, no DONE written: lower the learning rate (or eta) and run again")
    if d.main:
        tmp = os.path.join(out_dir, "model.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        hf.save_pretrained(tmp, state_dict=sd)
        tok.save_pretrained(tmp)
        for name, obj in (extra or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(obj, f, indent=2)
        for name in sorted(os.listdir(tmp), key=lambda n: n == "DONE"):  # a DONE marker last
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        os.rmdir(tmp)
    barrier()


# ---------------------------------------------------------------------------------------------
# Run folders: args.json, metrics.jsonl, checkpoint/, and DONE written last
# ---------------------------------------------------------------------------------------------
def is_done(path):
    return os.path.exists(os.path.join(path, "DONE"))


# Flags that may differ when a run is resumed or re-run (they do not change what is computed).
RESUME_FREE = {"save_every", "eval_every", "output_dir"}


def settings(args):
    """What a run folder stands for: its arguments minus those that change nothing computed."""
    return {k: v for k, v in args.items() if k not in RESUME_FREE and k != "world_size"}


def same(a, b):
    """Two settings agree; two spellings of one path (runs/x, ./runs/x, /abs/runs/x) agree."""
    if a == b:
        return True
    return (isinstance(a, str) and isinstance(b, str) and a != "" and b != ""
            and os.path.realpath(a) == os.path.realpath(b))


def differences(before, now):
    keys = [k for k in now if k in before and not same(before[k], now[k])]
    return ", ".join(f"--{k} {before[k]!r} -> {now[k]!r}" for k in keys)


_LOCKS = {}


def lock(folder):
    """An exclusive lock on <folder>/LOCK for as long as this process lives (the kernel releases it
    when the process ends, however it ends, so a lock left by a killed run is simply taken)."""
    key = os.path.realpath(folder)
    if key in _LOCKS:  # this process locked it before (a stage run twice in one process)
        _LOCKS.pop(key).close()
    f = open(os.path.join(folder, "LOCK"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        who = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{folder} is in use by {who}: wait for it to end (or stop it) before "
                        "running this stage there again") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _LOCKS[key] = f


# A run folder may come from elsewhere: nothing in it may run code when it is read. JSON files are
# data; weights load with safetensors or torch.load(weights_only=True); and torch.distributed.checkpoint,
# which unpickles a checkpoint's .metadata and its non-tensor entries, reads through the two classes
# below: the metadata through an unpickler that builds only the checkpoint format's own classes, the
# entries only after torch.load(weights_only=True) has accepted them.
_METADATA_CLASSES = {("torch.distributed.checkpoint.metadata", n) for n in (
    "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
    "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"), ("torch.serialization", "_get_layout")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _METADATA_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def _checkpoint_reader(path):
    """A torch.distributed.checkpoint reader of `path` and a load planner, neither of which
    unpickles anything but a checkpoint's own data."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            torch.load(value, weights_only=True)  # raises on anything but plain data
            value.seek(0)
            super().load_bytes(read_item, value)

    return Reader(path), Planner()


class Run:
    """A stage's output folder: args.json, metrics.jsonl, checkpoint/, and DONE written last.
    Run.open returns None when the folder is done with the same settings (skip the stage)."""

    @classmethod
    def open(cls, path, args, d, stage):
        """Lock the folder, then: done by this stage with these settings -> None; done by another
        stage, or with other settings -> an error naming them; else a Run that resumes from its
        checkpoint when there is one."""
        verdict = None
        if d.main:
            try:
                os.makedirs(path, exist_ok=True)
                lock(path)
            except UserError as e:
                verdict = e
            except OSError as e:  # read-only, no permission, full disk
                verdict = UserError(f"cannot write in {path}: {e.strerror}")
            else:
                try:
                    verdict = cls._done_verdict(path, stage, dataclasses.asdict(args))
                except UserError as e:
                    verdict = e
        verdict = broadcast_object(verdict)
        if isinstance(verdict, UserError):
            raise verdict
        if verdict == "done":
            d.print(f"{path} is done (DONE marker present, same settings): skipping")
            return None
        WRITING.append(path)
        return cls(path, args, d, stage)

    @staticmethod
    def _done_verdict(path, stage, now):
        """None (not done), "done" (by `stage`, same settings) or the UserError to raise."""
        if not is_done(path):
            return None
        done = read_json(os.path.join(path, "DONE"))
        if not isinstance(done, dict) or not isinstance(done.get("stage"), str) or not isinstance(done.get("settings"), dict):
            return UserError(f"{path}/DONE is not a marker this project's stages write (a JSON object naming its "
                             "stage and settings): delete the folder to run the stage there")
        if done["stage"] != stage:
            return UserError(f"{path} holds the output of {done['stage']}, not of {stage}: use another "
                             "--output_dir")
        before = done["settings"]
        if not differences(before, now):
            return "done"
        return UserError(f"{path} is done with other settings ({differences(before, now)} "
                         "(before -> now)): use another --output_dir, or delete the folder to redo it")

    def __init__(self, path, args, d, stage=""):
        self.path, self.d, self.t0, self.stage = path, d, time.time(), stage
        self.args = dataclasses.asdict(args)
        self.ckpt = os.path.join(path, "checkpoint")
        if d.main:
            os.makedirs(path, exist_ok=True)
            old = os.path.join(path, "args.json")
            if self.has_checkpoint():
                saved = read_json(os.path.join(self.checkpoint_path(), "state.json"))
                if not isinstance(saved, dict):
                    raise UserError(f"{self.checkpoint_path()}/state.json is damaged (not a JSON object): delete "
                                    "the checkpoint to start this stage over")
                if saved.get("stage") and stage and saved["stage"] != stage:
                    raise UserError(f"{path} holds a checkpoint of {saved['stage']}, not of {stage}: use another "
                                    "--output_dir")
                if isinstance(saved.get("settings"), dict):  # what the checkpoint was computed with
                    before = saved["settings"]
                else:  # a checkpoint that predates recording them
                    before = settings(read_json(old)) if os.path.exists(old) else {}
                diff = differences(before, settings(self.args))
                if diff:
                    raise UserError(f"{path} holds a checkpoint of a run with other arguments ({diff} "
                                    "(before -> now)): use another --output_dir or delete it")
            elif os.path.exists(os.path.join(path, "metrics.jsonl")):  # a fresh start: no old history
                os.remove(os.path.join(path, "metrics.jsonl"))
            with open(old + ".tmp", "w") as f:
                json.dump({**self.args, "world_size": d.world}, f, indent=2)
            os.replace(old + ".tmp", old)
        barrier()

    def checkpoint_path(self):
        """The checkpoint to resume from (checkpoint/, or checkpoint.old/ when a kill came between
        the two renames of save_checkpoint), or None."""
        return next((self.ckpt + s for s in ("", ".old") if os.path.exists(os.path.join(self.ckpt + s, "state.json"))),
                    None)

    def has_checkpoint(self):
        return self.checkpoint_path() is not None

    def log(self, step, metrics):
        now = time.time()
        metrics = {**metrics, "time/since_last_log_s": now - getattr(self, "_last", self.t0)}
        self._last = now
        if torch.cuda.is_available():  # allocated between steps: weights + optimizer state
            metrics["mem/peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
            metrics["mem/allocated_gb"] = torch.cuda.memory_allocated() / 2**30
        if self.d.main:
            row = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v)
                                    for k, v in metrics.items()}}
            with open(os.path.join(self.path, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")

    def stop_unless_finite(self, step, **values):
        """Called before every optimizer step with global values (the same on every process): a
        NaN or inf stops the stage with one line; the last checkpoint stays, no DONE is written."""
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if not bad:
            return
        kept = (f"the last checkpoint ({self.ckpt}) is kept, but it resumes only under the same arguments: "
                "to go on with a lower learning rate, delete this folder (or pick another --output_dir) and "
                "run again"
                if self.has_checkpoint() else "no checkpoint had been saved yet")
        raise UserError(f"{self.path}: step {step + 1}: non-finite "
                        f"{', '.join(f'{k} = {v}' for k, v in bad.items())}; stopped before the "
                        f"update, no DONE written; {kept}")

    def save_checkpoint(self, step, parts, state=None):
        """DCP checkpoint of {name: (model, optimizer)} (reshardable to another world size), each
        process's random generators, and a small JSON state, written to checkpoint.tmp and renamed
        into place."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        sd = {}
        for name, (model, opt) in parts.items():
            sd[f"{name}/model"], sd[f"{name}/optim"] = get_state_dict(model, opt)
        tmp = self.ckpt + ".tmp"
        if self.d.main:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        dcp.save(sd, checkpoint_id=tmp, no_dist=not dist.is_initialized())
        rng = {"cpu": torch.get_rng_state(), "world": self.d.world,
               "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        torch.save(rng, os.path.join(tmp, f"rng{self.d.rank}.pt"))
        barrier()
        if self.d.main:
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump({"step": step, "stage": self.stage, "settings": settings(self.args), **(state or {})}, f)
            if os.path.exists(self.ckpt):
                shutil.rmtree(self.ckpt + ".old", ignore_errors=True)
                os.replace(self.ckpt, self.ckpt + ".old")
            os.replace(tmp, self.ckpt)
            shutil.rmtree(self.ckpt + ".old", ignore_errors=True)
            print(f"{chr(10) if sys.stderr.isatty() else ''}checkpoint: step {step} saved in {self.ckpt}",
                  file=sys.stderr, flush=True)
        barrier()

    def load_checkpoint(self, parts):
        """Restore the last checkpoint into {name: (model, optimizer)} and this process's random
        generators (when the world size is the one it was saved with); its state dict, or None."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        path = self.checkpoint_path()
        if path is None:
            return None
        sd = {}
        for name, (model, opt) in parts.items():
            sd[f"{name}/model"], sd[f"{name}/optim"] = get_state_dict(model, opt)
        state = read_json(os.path.join(path, "state.json"))
        if not os.path.isfile(os.path.join(path, ".metadata")):
            raise UserError(f"the checkpoint {path} has no .metadata (an unfinished save?): delete it to start "
                            "this stage over")
        reader, planner = _checkpoint_reader(path)
        try:
            logging.disable(logging.CRITICAL)  # torch logs a traceback for every rank-local file it tries
            try:
                dcp.load(sd, checkpoint_id=path, storage_reader=reader, planner=planner, no_dist=not dist.is_initialized())
            finally:
                logging.disable(logging.NOTSET)
            rng_file = os.path.join(path, f"rng{self.d.rank}.pt")
            rng = torch.load(rng_file, weights_only=True) if os.path.exists(rng_file) else None
        except (Exception, dcp.api.CheckpointException) as e:  # many types on a damaged file
            if isinstance(e, dcp.api.CheckpointException) and e.failures:  # the first process's own error
                e = next(iter(e.failures.values()))[0]
            raise UserError(f"the checkpoint {path} cannot be read ({type(e).__name__}: "
                            f"{(str(e).splitlines() or [''])[0][:160]}): delete it to start this "
                            "stage over") from None
        for name, (model, opt) in parts.items():
            set_state_dict(model, opt, model_state_dict=sd[f"{name}/model"], optim_state_dict=sd[f"{name}/optim"])
        if rng is not None and rng["world"] == self.d.world:
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        else:
            self.d.print("the checkpoint's random generators are for another number of processes: "
                         "sampling after the resume is not the uninterrupted run's")
        if self.d.main:  # forget metrics logged after the checkpoint: they will be logged again
            self._truncate_metrics(state["step"])
        barrier()
        self.d.print(f"resuming {self.path} from step {state['step']}")
        return state

    def _truncate_metrics(self, step):
        p = os.path.join(self.path, "metrics.jsonl")
        if os.path.exists(p):
            with open(p) as f:
                keep = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= step]
            with open(p + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(p + ".tmp", p)

    def finish(self, summary):
        """Write DONE (the summary and the settings it stands for) last: its presence means
        everything else in the folder is complete. The checkpoint goes only after it."""
        if self.d.main:
            summary = {**summary, "precision": self.d.precision_why, "wall_time_s": round(time.time() - self.t0, 1),
                       "peak_rss_gb": round(peak_rss_gb(), 2)}
            with open(os.path.join(self.path, "DONE.tmp"), "w") as f:
                json.dump({**summary, "stage": self.stage or summary.get("stage"), "settings": settings(self.args)},
                          f, indent=2)
            os.replace(os.path.join(self.path, "DONE.tmp"), os.path.join(self.path, "DONE"))
            shutil.rmtree(self.ckpt, ignore_errors=True)
            shutil.rmtree(self.ckpt + ".old", ignore_errors=True)
            print(json.dumps(summary), flush=True)
        barrier()


def peak_rss_gb():
    """The most memory this process has held (resident set, rank 0's), in GiB."""
    import resource
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kb / 2**20 if sys.platform != "darwin" else kb / 2**30


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
