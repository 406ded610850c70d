"""tools/bench_stages.py: step time and memory of every stage on this machine (CPU or GPU).

Builds a task (the embedded tiny model, or a larger randomly initialised Llama with --hidden
etc.), runs each stage for a few steps in its own process, and prints, from the stages' own
logs, the median step time and, on GPU, the peak memory and the memory held between steps
(weights and optimizer state). With --larger it is the small-scale check of docs/scaling.md's
memory plan: PPO with its four models of N parameters each.

    python tools/bench_stages.py                                   # the tiny default
    python tools/bench_stages.py --hidden 2048 --layers 16 --intermediate 5504 --heads 16 --only ppo
    python tools/bench_stages.py --base smollm2 --only sft,rm --steps 6 --precision fp32   # (then bf16)
    python tools/bench_stages.py --from_run runs/smollm2/seed1     # a finished iterate.sh seed, stage by stage

--from_run reads a seed's run folders instead (each stage's DONE: wall time, precision, the peak
resident memory of its process) and iterate.sh's stage_times.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tools/ is one below the stages
sys.path.insert(0, ROOT)

import task  # noqa: E402


def run(*argv):
    p = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{' '.join(argv)} failed:\n{p.stderr[-3000:]}")


def summary(run_dir, key):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if key in line][1:]  # the first step warms up
    t = statistics.median(r["time/since_last_log_s"] for r in rows)
    peak = max((r.get("mem/peak_gb", float("nan")) for r in rows), default=float("nan"))
    held = statistics.median(r.get("mem/allocated_gb", float("nan")) for r in rows)
    return len(rows) + 1, t, peak, held


def from_run(seed_dir):
    """The table of one finished iterate.sh seed: per stage, iterate.sh's wall time (with the
    threads it had), the stage's own time and precision, and its process's peak memory (the
    stage's DONE, in the folder each stage_times line names)."""
    print("| stage | wall (iterate.sh) | in the stage (s) | peak memory (GiB) | precision |")
    print("|---|---|---|---|---|")
    with open(os.path.join(seed_dir, "stage_times")) as f:
        for line in f:
            name, _, rest = line.strip().rpartition(": ")
            wall, _, folder = rest.partition(", in ")
            done = os.path.join(ROOT, folder, "DONE")  # iterate.sh's paths are relative to its folder
            d = {}
            if folder and os.path.isfile(done) and os.path.isfile(os.path.join(ROOT, folder, "args.json")):
                with open(done) as g:
                    d = json.load(g)
            print(f"| {name} | {wall} | {d.get('wall_time_s', '')} | {d.get('peak_rss_gb', '')} | "
                  f"{d.get('precision', '').split(' (')[0]} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--only", default="sft,rm,metarm_first_order,metarm_exact,ppo")
    ap.add_argument("--out", default="", help="the task and run folders (kept: a second run reuses the task)")
    ap.add_argument("--base", default="tiny", choices=["tiny", "smollm2"],
                    help="tiny: a random Llama of --hidden etc.; smollm2: SmolLM2-135M-Instruct (task.py --base smollm2)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="every stage's --precision")
    ap.add_argument("--from_run", default="", help="instead: the table of a finished iterate.sh seed folder")
    args = ap.parse_args()
    if args.from_run:
        return from_run(args.from_run)
    out = args.out or tempfile.mkdtemp()
    data, base = f"{out}/task/data", f"{out}/task/base_model"
    if not os.path.exists(base):
        task.build_data(data, seed=0)
        if args.base == "smollm2":
            task.build_pretrained_base(base)
        else:
            task.build_base_model(data, base, hidden_size=args.hidden, num_layers=args.layers,
                                  intermediate_size=args.intermediate, num_heads=args.heads)
    steps = ["--max_steps", str(args.steps), "--precision", args.precision]
    only = args.only.split(",")
    jobs = {
        "sft": ["sft.py", "--model_name_or_path", base, "--data", f"{data}/sft.jsonl", "--output_dir", f"{out}/sft", *steps],
        "rm": ["reward_model.py", "--sft_dir", f"{out}/sft", "--data", f"{data}/pairs_train.jsonl",
               "--eval_data", "", "--output_dir", f"{out}/rm", *steps],
        "sample": ["sample.py", "--policy_dir", f"{out}/sft", "--prompts", f"{data}/prompts_train.jsonl",
                   "--max_prompts", "64", "--output_dir", f"{out}/samples", "--precision", args.precision],
        "metarm_first_order": ["metarm.py", "--sft_dir", f"{out}/sft", "--data", f"{data}/pairs_train.jsonl",
                               "--eval_data", "", "--meta_data", f"{out}/samples/meta.jsonl", "--output_dir",
                               f"{out}/metarm_first_order", "--eval_every", "100000", *steps],
        "metarm_exact": ["metarm.py", "--sft_dir", f"{out}/sft", "--data", f"{data}/pairs_train.jsonl", "--eval_data", "",
                         "--meta_data", f"{out}/samples/meta.jsonl", "--output_dir", f"{out}/metarm_exact",
                         "--meta_grad", "exact", "--eval_every", "100000", *steps],
        "ppo": ["ppo.py", "--policy_dir", f"{out}/sft", "--rm_dir", f"{out}/rm", "--prompts", f"{data}/prompts_train.jsonl",
                "--output_dir", f"{out}/ppo", "--steps", str(args.steps), "--precision", args.precision],
    }
    wanted = {"sft", "rm"} | set(only) | ({"sample"} if any(o.startswith("metarm") for o in only) else set())
    order = [k for k in jobs if k in wanted]  # sft and rm always: the later stages start from them
    keys = {"sft": "train/loss", "rm": "train/L", "metarm_first_order": "train/L_at_theta_prime",
            "metarm_exact": "train/L_at_theta_prime",
            "ppo": "ppo/policy/loss"}
    what = "SmolLM2-135M-Instruct" if args.base == "smollm2" else f"hidden {args.hidden}, {args.layers} layers"
    print(f"model: {what}; --precision {args.precision}; {args.steps} steps per stage\n")
    print("| stage | steps | median step (s) | peak memory (GiB) | held between steps (GiB) |")
    print("|---|---|---|---|---|")
    for k in order:
        run(*jobs[k])
        if k in keys and k in only:
            s, t, peak, held = summary(f"{out}/{k}", keys[k])
            print(f"| {k} | {s} | {t:.3f} | {peak:.2f} | {held:.2f} |", flush=True)


if __name__ == "__main__":
    main()
