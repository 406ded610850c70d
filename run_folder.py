"""run_folder.py: a stage's output folder. `Run.open` locks it, skips a stage already done with the
same settings, refuses one done by another stage or with other settings, and resumes from the
last checkpoint; `Run` writes args.json, metrics.jsonl, resumable checkpoints (written under a
temporary name, then renamed) and, last, DONE, which names the stage and its settings. Reading a
folder from elsewhere runs no code from it (the checkpoint reader below).
"""
import dataclasses
import fcntl
import json
import logging
import math
import os
import pickle
import shutil
import socket
import sys
import time
import warnings

import torch
import torch.distributed as dist

from cli import WRITING, UserError, read_json
from distributed import barrier, broadcast_object

# DCP warns that it saves "in a single process" whenever no process group exists: that is intended.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


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
