"""tools/bench_iterate.py: how long `bash iterate.sh` takes, stage by stage, from a fresh RUN_DIR.

Runs iterate.sh (this checkout's, and with --vs another checkout's, in turn: A B A B ...) in a new
temporary RUN_DIR each time, with the settings of the environment (ARMS, ROUNDS, LANES, ...), and
prints one table: each stage's seconds (the median over --repeats) as iterate.sh reports them
("[done] NAME (N s)"), the whole run's wall time, and with --vs the ratio this / other taken run
by run. A stage's own time includes waiting for the cores when branches run side by side; the
total is what a user waits.

    python tools/bench_iterate.py                                  # the default experiment, one seed
    python tools/bench_iterate.py --vs ../an-older-checkout        # before / after, paired
    ROUNDS=1 PPO_STEPS=4 python tools/bench_iterate.py             # any iterate.sh setting
    python tools/bench_iterate.py --vs ../older --keep /tmp/runs   # and keep the run folders (to compare results)
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tools/ is one below the stages


TOTAL = "total (wall)"


def run(checkout, keep=""):
    """One fresh run: {stage: seconds, TOTAL: the whole run's wall seconds}. keep: a folder in
    which the run folder is left (else it is deleted)."""
    if keep:
        os.makedirs(keep, exist_ok=True)
    run_dir = tempfile.mkdtemp(prefix=f"bench_iterate_{os.path.basename(checkout)}_", dir=keep or None)
    try:
        t0 = time.perf_counter()
        p = subprocess.run(["bash", os.path.join(checkout, "iterate.sh")], env={**os.environ, "RUN_DIR": run_dir},
                           capture_output=True, text=True)
        wall = time.perf_counter() - t0
    finally:
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    if p.returncode:
        raise SystemExit(f"tools/bench_iterate.py: {checkout}/iterate.sh failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    stages = {name: int(s) for name, s in re.findall(r"^\[done\] (.*) \((\d+) s(?:, \d+ thread\(s\))?\)$", p.stdout, re.M)}
    return {**stages, TOTAL: wall}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vs", default="", help="another checkout of this project, run in turn with this one")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each (median)")
    ap.add_argument("--keep", default="", help="leave each run's folder in this folder (default: delete them)")
    args = ap.parse_args()
    checkouts = [ROOT] + ([os.path.abspath(args.vs)] if args.vs else [])
    runs = {c: [] for c in checkouts}
    for _ in range(args.repeats):
        for c in checkouts:
            runs[c].append(run(c, args.keep))
    med = lambda xs: statistics.median(xs) if xs else float("nan")
    names = list(dict.fromkeys(n for c in checkouts for times in runs[c] for n in times if n != TOTAL)) + [TOTAL]
    head = ["stage", "this (s)"] + (["other (s)", "this / other"] if args.vs else [])
    print(f"this: {ROOT}" + (f"; other: {checkouts[1]}" if args.vs else "") + f"; {args.repeats} run(s) each\n")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for n in names:
        row = [n] + [f"{med([times[n] for times in runs[c] if n in times]):.0f}" for c in checkouts]
        if args.vs:
            ratios = [a[n] / b[n] for a, b in zip(runs[ROOT], runs[checkouts[1]]) if n in a and b.get(n)]
            row.append(f"{med(ratios):.2f}" if ratios else "")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
