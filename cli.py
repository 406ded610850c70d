"""cli.py: what a stage's command line is made of. Flags from a documented dataclass at the top of
each stage (`arg`, `parse_args`: a bad value is one line naming the flag); a problem the user can
fix is a `UserError`, which `guard` prints as one `error: ...` line with exit status 2 instead of
a traceback (a folder that cannot be written, too); progress bars on long work; the seed.
"""
import argparse
import dataclasses
import errno
import json
import math
import os
import random
import sys
import time

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


def read_json(path):
    """A JSON file written by this project; a damaged one is one line naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as e:  # (huge numbers, deep nesting)
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:160]
        raise UserError(f"{path} is damaged ({why}): delete it (or its folder) and run the stage that "
                        "wrote it again") from None
