"""tools/bench_ppo.py: where the time of one PPO step goes, on the embedded task's tiny models.

Runs ppo.py for a few steps (the real code path, its own timers) from a given SFT policy and
reward model, and prints the mean share of each part of a step: generation, the policy /
reference / value / reward forward passes of the roll-out, and the PPO optimisation epochs.

    python tools/bench_ppo.py --policy_dir runs/default/seed1/sft --rm_dir runs/default/seed1/rm
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

PARTS = ["generate", "policy_forward", "reference_forward", "value_forward", "reward_forward", "ppo_epochs"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy_dir", default="runs/default/seed1/sft")
    ap.add_argument("--rm_dir", default="runs/default/seed1/rm")
    ap.add_argument("--prompts", default="runs/default/task/data/prompts_train.jsonl")
    ap.add_argument("--steps", type=int, default=6, help="steps to run; the first is dropped as warm-up")
    ap.add_argument("ppo_args", nargs="*", help="extra ppo.py flags, after --")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "ppo.py", "--policy_dir", args.policy_dir, "--rm_dir", args.rm_dir,
               "--prompts", args.prompts, "--steps", str(args.steps), "--output_dir", out, *args.ppo_args]
        subprocess.run(cmd, check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f][1:]
    step = sum(r["time/step_s"] for r in rows) / len(rows)
    print(f"one PPO step ({' '.join(args.ppo_args) or 'ppo.py defaults'}), mean of {len(rows)} steps\n")
    print("| part | seconds | share |\n|---|---|---|")
    for part in PARTS:
        t = sum(r[f"time/{part}_s"] for r in rows) / len(rows)
        print(f"| {part.replace('_', ' ')} | {t:.3f} | {100 * t / step:.0f}% |")
    other = step - sum(sum(r[f"time/{p}_s"] for r in rows) / len(rows) for p in PARTS)
    print(f"| other (GAE, metrics, gold judge) | {other:.3f} | {100 * other / step:.0f}% |")
    print(f"| **step** | {step:.3f} | 100% |")


if __name__ == "__main__":
    main()
