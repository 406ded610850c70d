"""studies/pretrained_rm.py: vanilla reward modelling against MetaRM on a pretrained model, at
the reward model (the pre-registered study, docs/study-pretrained-rm.md).

Every RM starts from one SmolLM2 SFT model and is trained on the embedded task's pairs; MetaRM's
meta data S are samples of a policy PPO has moved off SFT (pi_1), and every RM is measured on
*held-out* samples H of that policy (test prompts, none of them in S). A seed s varies the RM's
new head and data order (--seed s of both stages) and the samples S_s and H_s; the SFT model and
pi_1 are shared. Per seed:

    S_s  = sample.py  pi_1 on the first 64 training prompts x 5   (--seed 100 s + 1)
    H_s  = sample.py  pi_1 on the first 96 test prompts x 5       (--seed 100 s + 2)
    vanilla      reward_model.py  --seed s   (the RM settings below)
    eta<r>       metarm.py        --seed s --meta_data S_s --eta r * alpha   (first_order)
    measure      evaluate.py --measure <RM> --samples H_s --pairs <held-out pairs>

    python studies/pretrained_rm.py prepare                                  # the shared SFT model and pi_1
    python studies/pretrained_rm.py run    --seeds "1 2 3 4 5 6 7 8" --ratios "1 ..."
    python studies/pretrained_rm.py report --seeds "1 2 3 4 5 6 7 8" --ratios "1 ..."
    python studies/pretrained_rm.py run    --seeds "9 10 11 12 13 14 15 16" --ratios "<the arm's r>"   # the confirmation
    python studies/pretrained_rm.py report --seeds "9 10 11 12 13 14 15 16" --ratios "<the arm's r>" \
                                           --primary <out_dir>/report-seeds1-2-3-4-5-6-7-8.json
    python studies/pretrained_rm.py ratios --diagnostic docs/metastep-smollm2.json   # the eta grid
    python studies/pretrained_rm.py ppo        --seeds "4 5 6 7 8" --arm eta<r>   # part 3, at the policy
    python studies/pretrained_rm.py ppo_report --seeds "4 5 6 7 8" --arm eta<r>

`run` is resumable: each stage skips what its DONE says is done, each measurement is written
under a temporary name and renamed, and an arm whose measurement exists is not trained again (the
measurements, committed in docs/study-pretrained-rm/, are the results; copied into --out_dir they
let a run go on where another machine stopped), so a killed run picks up where it stopped. `report` prints
the table: per arm the mean over seeds of each metric, and MetaRM minus vanilla paired on the
seed with its 95% t-interval, the two-sided paired t-test's p and Holm's adjustment across the
eta values, with the smallest difference the seeds detect at 80% power (primary endpoint: gold
agreement on H; significance.py holds the tests); then the arm the registered rule sends to the
confirmation seeds (or, with --primary <the primary set's report>, the confirmation's registered
verdict), and (with matplotlib) a figure of the paired differences, seed by seed.
`ppo` (part 3) trains PPO from SFT with a seed's vanilla RM and with its arm's RM and scores
each policy's answers to the test prompts with the gold judge (seed<s>/policy/<rm>.json);
`ppo_report` pairs them on (seed, prompt).
"""
import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from significance import detectable, hierarchical_bootstrap, holm, paired_t, seed_interval, verdict  # noqa: E402

BASE = "runs/smollm2"
SFT = f"{BASE}/seed1/sft"
PI_1 = f"{BASE}/seed1/ppo_vanilla"  # 20 steps of vanilla PPO from SFT on the vanilla RM
DATA = f"{BASE}/task/data"
ALPHA = 2e-5
RM_ARGS = ["--lr", str(ALPHA), "--warmup", "0.02", "--global_batch", "16", "--max_steps", "32",
           "--eval_every", "1000", "--max_len", "96"]
META_ARGS = ["--meta_grad", "first_order", "--meta_batch", "4"]
SAMPLE_ARGS = ["--k", "5", "--max_prompt_len", "32", "--max_new_tokens", "48"]
METRICS = ("shift/gold_agreement", "eval/accuracy", "shift/J", "shift/dr_var")  # the primary first


def arm_name(ratio):
    return "vanilla" if ratio is None else f"eta{ratio:g}"


# ---------------------------------------------------------------------------------------------
# Running: one seed's samples, RMs and measurements, each step skipped when done
# ---------------------------------------------------------------------------------------------
def stage(script, *argv, threads=None):
    cmd = [sys.executable, os.path.join(ROOT, script), *argv]
    print("+", " ".join(cmd[1:]), flush=True)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    subprocess.run(cmd, cwd=ROOT, check=True, env=env)


def preset(*names):
    """The smollm2 preset's settings (presets/smollm2.sh), as iterate.sh would read them."""
    show = "; ".join(f'printf "%s\\n" "${n}"' for n in names)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_ARGS")}
    p = subprocess.run(["bash", "-c", f"source presets/smollm2.sh; {show}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, check=True)
    return [v.split() for v in p.stdout.split("\n")[:len(names)]]


def prepare(out_dir):
    """The shared SFT model and pi_1 of a new checkout: the stages PRESET=smollm2 bash iterate.sh
    runs for seed 1 up to vanilla PPO (the task and its base folder, SFT, the vanilla RM, 20 vanilla
    PPO steps), each with the threads it had there and skipped when done; then the measurements
    committed in docs/study-pretrained-rm/ copied into out_dir, so that `run` goes on from them."""
    task_args, sft_args, rm_args, ppo_args = preset("TASK_ARGS", "SFT_ARGS", "RM_ARGS", "PPO_ARGS")
    if not os.path.exists(os.path.join(ROOT, BASE, "task", "DONE")):
        stage("task.py", "--out_dir", f"{BASE}/task", *task_args, threads=2)
    r = f"{BASE}/seed1"
    stage("sft.py", "--strategy", "ddp", "--model_name_or_path", f"{BASE}/task/base_model", "--data", f"{DATA}/sft.jsonl",
          "--output_dir", SFT, "--seed", "1", *sft_args, threads=2)
    stage("reward_model.py", "--strategy", "ddp", "--sft_dir", SFT, "--data", f"{DATA}/pairs_train.jsonl",
          "--eval_data", f"{DATA}/pairs_test.jsonl", "--output_dir", f"{r}/rm", "--seed", "1", *rm_args, threads=1)
    stage("ppo.py", "--strategy", "ddp", "--policy_dir", SFT, "--rm_dir", f"{r}/rm", "--prompts", f"{DATA}/prompts_train.jsonl",
          "--output_dir", PI_1, "--steps", "20", "--snapshot_every", "10", "--seed", "101", *ppo_args, threads=1)
    committed = os.path.join(ROOT, "docs", "study-pretrained-rm")
    for folder, _, files in os.walk(committed):
        for name in files:
            dst = os.path.join(out_dir, os.path.relpath(os.path.join(folder, name), committed))
            if name.endswith(".json") and not os.path.exists(dst):
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copyfile(os.path.join(folder, name), dst)
    print(f"build: {build()}")


def build():
    """Which SFT model and pi_1 this checkout holds: they are rebuilt by the same commands on each
    machine, and are the same bits only on the same kind of CPU. A seed's arms share one build."""
    def digest(folder):
        h = hashlib.sha256()
        with open(os.path.join(ROOT, folder, "model.safetensors"), "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        return h.hexdigest()[:16]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return {"sft": digest(SFT), "pi_1": digest(PI_1), "cpu": cpu}


def write_json(path, obj):
    """Write under a temporary name, then rename: a killed run never leaves half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def measure(rm_dir, samples, out, this_build):
    if os.path.exists(out):
        return
    p = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--measure", rm_dir, "--samples", samples,
                        "--pairs", f"{DATA}/pairs_test.jsonl"], cwd=ROOT, check=True, capture_output=True, text=True)
    start = p.stdout.index("{\n")  # the JSON evaluate.py prints last
    result = {**json.loads(p.stdout[start:]), "build": this_build}
    write_json(out, result)
    print(f"  {out}: gold agreement {result['shift/gold_agreement']:.4f}, accuracy {result['eval/accuracy']:.4f}",
          flush=True)


def build_of(path):
    with open(path) as f:
        return json.load(f).get("build")  # None: measured before builds were recorded (seeds 1-3, docs)


def run_seed(out_dir, seed, ratios, this_build):
    """Every arm of one seed measured, all on one build of the SFT model and pi_1 (the pairing):
    a seed measured whole on one build is done; in a seed left part-way on another build, what
    was measured there is moved to measure/superseded/ and measured again on this one."""
    d = os.path.join(out_dir, f"seed{seed}")
    S, H = f"{d}/S", f"{d}/H"
    files = {r: f"{d}/measure/{arm_name(r)}.json" for r in [None, *ratios]}
    builds = [build_of(f) for f in files.values() if os.path.exists(f)]
    if len(builds) == len(files) and all(b == builds[0] for b in builds):
        return  # every arm measured on one build (the measurements are the results; the RM folders may be gone)
    for r, f in files.items():
        if os.path.exists(f) and build_of(f) != this_build:
            os.makedirs(f"{d}/measure/superseded", exist_ok=True)
            os.replace(f, f"{d}/measure/superseded/{arm_name(r)}.json")
            print(f"  {f}: measured on another build of SFT and pi_1, measured again on this one", flush=True)
    todo = [r for r, f in files.items() if not os.path.exists(f)]
    stage("sample.py", "--policy_dir", PI_1, "--prompts", f"{DATA}/prompts_train.jsonl", "--max_prompts", "64",
          "--seed", str(100 * seed + 1), "--output_dir", S, *SAMPLE_ARGS)
    stage("sample.py", "--policy_dir", PI_1, "--prompts", f"{DATA}/prompts_test.jsonl", "--max_prompts", "96",
          "--seed", str(100 * seed + 2), "--output_dir", H, *SAMPLE_ARGS)
    os.makedirs(f"{d}/measure", exist_ok=True)
    for ratio in todo:
        rm = f"{d}/{arm_name(ratio)}"
        common = ["--sft_dir", SFT, "--data", f"{DATA}/pairs_train.jsonl", "--eval_data", f"{DATA}/pairs_test.jsonl",
                  "--output_dir", rm, "--seed", str(seed), *RM_ARGS]
        if ratio is None:
            stage("reward_model.py", *common)
        else:
            stage("metarm.py", *common, *META_ARGS, "--meta_data", f"{S}/meta.jsonl", "--eta", f"{ratio * ALPHA:g}")
        measure(rm, f"{H}/meta.jsonl", files[ratio], this_build)


# ---------------------------------------------------------------------------------------------
# Part 3, at the policy: PPO with each RM of a seed, the gold judge on the policies' answers
# ---------------------------------------------------------------------------------------------
PPO_STEPS = 10
ANSWER_PROMPTS = 150  # evaluate.py's --n_prompts: every test prompt of the embedded task


def run_policy(out_dir, seed, arm, this_build):
    """PPO round 1 from the shared SFT model, 10 steps with the smollm2 preset's PPO settings and
    --seed s, once with the seed's vanilla RM and once with the arm's RM; each policy answers the
    150 test prompts (sample.py, the same sampling seed for both policies; the first response to
    each prompt is the one scored) and the gold judge scores the answers."""
    import task
    d = os.path.join(out_dir, f"seed{seed}")
    (ppo_args,) = preset("PPO_ARGS")
    todo = [rm for rm in ("vanilla", arm) if not os.path.exists(f"{d}/policy/{rm}.json")]
    for rm in todo:  # both checked before either runs
        measured = f"{d}/measure/{rm}.json"
        if not (os.path.exists(f"{d}/{rm}/DONE") and os.path.exists(measured) and build_of(measured) == this_build):
            raise SystemExit(f"{d}/{rm}: no reward model of this build of SFT and pi_1 ({this_build}) here: "
                             f"PPO at the policy runs on the seeds whose RMs were trained on this machine")
    os.makedirs(f"{d}/policy", exist_ok=True)
    for rm in todo:
        out = f"{d}/policy/{rm}.json"
        policy, answers = f"{d}/ppo_{rm}", f"{d}/answers_{rm}"
        stage("ppo.py", "--strategy", "ddp", "--policy_dir", SFT, "--rm_dir", f"{d}/{rm}", "--prompts",
              f"{DATA}/prompts_train.jsonl", "--output_dir", policy, "--steps", str(PPO_STEPS), "--seed", str(seed), *ppo_args)
        stage("sample.py", "--policy_dir", policy, "--prompts", f"{DATA}/prompts_test.jsonl", "--max_prompts",
              str(ANSWER_PROMPTS), "--seed", str(100 * seed + 3), "--output_dir", answers, *SAMPLE_ARGS[2:], "--k", "2")
        with open(f"{answers}/meta.jsonl") as f:
            rows = [json.loads(line) for line in f]
        prompts = [r["prompt"] for r in rows]
        result = {"rm": rm, "prompts": prompts, "gold": [task.gold(p, r["responses"][0]) for p, r in zip(prompts, rows)],
                  "build": this_build}
        write_json(out, result)
        print(f"  {out}: mean gold {sum(result['gold']) / len(prompts):+.4f} on {len(prompts)} prompts", flush=True)


def policy_report(out_dir, seeds, arm):
    """The policy steered by the arm's RM minus the one steered by the vanilla RM: gold score
    differences paired on (seed, prompt), mean and 95% interval by the hierarchical bootstrap
    (significance.py), with the verdict and the difference detectable at 80% power."""
    gold = {}
    for s in seeds:
        for rm in ("vanilla", arm):
            path = os.path.join(out_dir, f"seed{s}", "policy", f"{rm}.json")
            if not os.path.exists(path):
                raise SystemExit(f"{path} does not exist: run `studies/pretrained_rm.py ppo --arm {arm}` for seed {s} first")
            with open(path) as f:
                gold[rm, s] = json.load(f)
        if gold["vanilla", s]["prompts"] != gold[arm, s]["prompts"]:
            raise SystemExit(f"seed {s}: the two policies answered different prompts; cannot pair them")
    x = [[a - v for a, v in zip(gold[arm, s]["gold"], gold["vanilla", s]["gold"])] for s in seeds]
    diff = hierarchical_bootstrap(x)
    res = {"seeds": seeds, "arm": arm, "ppo_steps": PPO_STEPS, "diff": diff,
           "per_seed": {str(s): {rm: sum(gold[rm, s]["gold"]) / len(gold[rm, s]["gold"]) for rm in ("vanilla", arm)}
                        for s in seeds},
           "verdict": verdict(diff, len(seeds), digits=3)}
    lines = [f"PPO round 1 ({PPO_STEPS} steps) steered by {arm}'s RM against the vanilla RM; seeds "
             f"{' '.join(map(str, seeds))} ({len(seeds)}), {len(x[0])} test prompts each", "",
             f"| seed | vanilla RM: mean gold | {arm} RM: mean gold | difference |", "|---|---|---|---|"]
    for s in seeds:
        v, a = res["per_seed"][str(s)]["vanilla"], res["per_seed"][str(s)][arm]
        lines.append(f"| {s} | {v:+.4f} | {a:+.4f} | {a - v:+.4f} |")
    lines += ["", f"{arm} - vanilla, paired on (seed, prompt): {ci(diff, 4)} (hierarchical bootstrap): {res['verdict']}"]
    return res, "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The eta grid from the diagnostic (tools/metastep.py --out at the SmolLM2 RM's end)
# ---------------------------------------------------------------------------------------------
def ratios_for(diagnostic, targets=(0.01, 0.1, 1.0), point="end", form="first_order"):
    """The eta / alpha at which the median change of the gradient is `target` x the median
    minibatch noise: log-log interpolation between the grid's points, beyond them extrapolated
    with the slope of the two nearest; rounded to one significant digit."""
    ratios = diagnostic["ratios"]
    noise = diagnostic[point]["noise"]["median"]
    curve = [(math.log(r), math.log(e["change"]["median"] / noise))
             for r, e in zip(ratios, diagnostic[point][form]) if r > 0 and e["change"]["median"] > 0]
    out = []
    for target in targets:
        y = math.log(target)
        i = next((i for i in range(len(curve) - 1) if curve[i + 1][1] >= y), len(curve) - 2)
        (x0, y0), (x1, y1) = curve[i], curve[i + 1]
        x = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        r = math.exp(x)
        digits = -int(math.floor(math.log10(r)))
        out.append(float(f"{round(r, digits):g}"))
    return out


# ---------------------------------------------------------------------------------------------
def report(out_dir, seeds, ratios, primary=None):
    """The table of a set of seeds. With `primary` (the primary set's report, as report() wrote it)
    this set is the confirmation: its one arm must be the one the primary report's rule picked, and
    the verdict is the registered one for that rule (confirmation_verdict)."""
    if primary is not None and primary["confirmation"]["arm"] is None:
        raise SystemExit(f"the primary report picked no arm to confirm ({primary['confirmation']['why']})")
    if primary is not None and [arm_name(r) for r in ratios] != [primary["confirmation"]["arm"]]:
        raise SystemExit(f"the confirmation runs the arm the primary report picked, {primary['confirmation']['arm']}: "
                         f"--ratios {' '.join(f'{r:g}' for r in ratios)} is another")
    values = {}
    for ratio in [None, *ratios]:
        for s in seeds:
            path = os.path.join(out_dir, f"seed{s}", "measure", f"{arm_name(ratio)}.json")
            if not os.path.exists(path):
                raise SystemExit(f"{path} does not exist: run `studies/pretrained_rm.py run` for seed {s} first")
            with open(path) as f:
                values[arm_name(ratio), s] = json.load(f)
    res = {"seeds": seeds, "ratios": ratios, "alpha": ALPHA, "arms": {}, "per_seed": {}, "diffs": {}}
    for ratio in [None, *ratios]:
        a = arm_name(ratio)
        res["arms"][a] = {m: seed_interval([values[a, s][m] for s in seeds]) for m in METRICS}
        res["per_seed"][a] = {m: [values[a, s][m] for s in seeds] for m in METRICS}
    for m in METRICS:
        tests = {arm_name(r): paired_t([values[arm_name(r), s][m] - values["vanilla", s][m] for s in seeds])
                 for r in ratios}
        for a, adj in zip(tests, holm([t["p"] for t in tests.values()])):
            tests[a]["p_holm"] = adj
            tests[a]["detectable"] = detectable(tests[a]["se"], len(seeds))  # at 80% power
        res["diffs"][m] = tests
    if primary is None:  # the primary set: which arm the confirmation seeds run
        c = res["confirmation"] = confirmation_arm(res["diffs"])
        closing = f"the arm the registered rule sends to the confirmation seeds: {c['arm'] or 'none'} ({c['why']})"
    else:  # the confirmation: its registered verdict
        arm, rule = primary["confirmation"]["arm"], primary["confirmation"]["rule"]
        c = res["confirms"] = {"arm": arm, "rule": rule, "primary_seeds": primary["seeds"],
                               "verdict": confirmation_verdict(res["diffs"][METRICS[0]][arm], rule)}
        closing = (f"confirmation of {arm} (the {rule} branch of the rule, picked on seeds "
                   f"{' '.join(map(str, c['primary_seeds']))}): {c['verdict']}")
    by_build = {}  # the build of SFT and pi_1 each seed was measured on (its vanilla arm's, as every arm's)
    for s in seeds:
        b = values["vanilla", s].get("build")
        by_build.setdefault(json.dumps(b), []).append(s)
    res["builds"] = {" ".join(map(str, ss)): json.loads(b) for b, ss in by_build.items()}
    lines = [f"seeds {' '.join(map(str, seeds))} ({len(seeds)}); alpha {ALPHA:g}; mean [95% t-interval over seeds]",
             "builds of SFT and pi_1: " + "; ".join(
                 f"seeds {ss}: " + (f"sft {b['sft']}, pi_1 {b['pi_1']} ({b['cpu']})" if b else "not recorded (the first machine)")
                 for ss, b in res["builds"].items()), "",
             "| arm | eta | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for ratio in [None, *ratios]:
        a = arm_name(ratio)
        eta = "0 (vanilla)" if ratio is None else f"{ratio:g} alpha = {ratio * ALPHA:.2g}"
        lines.append(f"| {a} | {eta} | " + " | ".join(ci(res["arms"][a][m], 4) for m in METRICS) + " |")
    lines += ["", "MetaRM - vanilla, paired on the seed: mean [95% t-interval], two-sided paired t p, Holm-adjusted p "
              "across the eta values, verdict at 0.05 (Holm)", "",
              "| metric | arm | difference | p | p (Holm) | verdict | detectable at 80% power |",
              "|---|---|---|---|---|---|---|"]
    for m in METRICS:
        for a, t in res["diffs"][m].items():
            word = ("higher" if t["mean"] > 0 else "lower") if t["p_holm"] < 0.05 else "no detectable difference"
            lines.append(f"| {m} | {a} | {ci(t, 4)} | {t['p']:.3f} | {t['p_holm']:.3f} | {word} | {t['detectable']:.4f} |")
    lines += ["", closing]
    return res, "\n".join(lines)


def confirmation_verdict(t, rule):
    """The registered verdict on the confirmation seeds, from the paired test of the primary
    endpoint: after a gain, the gain is confirmed if its 95% interval lies above zero; after the
    null, the null is kept if the interval contains zero."""
    where = f"{ci(t, 4)}, detectable at 80% power {t['detectable']:.4f}"
    if rule == "gain":
        return ("the gain is confirmed" if t["lo"] > 0 else "the gain is not confirmed") + f" ({where})"
    if t["lo"] <= 0 <= t["hi"]:
        return f"the null is kept: the interval contains zero ({where})"
    return f"the null is not kept: MetaRM is {'better' if t['lo'] > 0 else 'worse'} ({where})"


def confirmation_arm(diffs):
    """The registered rule (docs/study-pretrained-rm.md, "Seeds and confirmation"): if some arm is
    Holm-significantly better on the primary endpoint, the one of those with the largest mean
    difference; otherwise the arm with the largest eta whose held-out pair accuracy is not
    significantly lower than vanilla's (unadjusted paired t: p >= 0.05, or higher)."""
    primary, accuracy = diffs[METRICS[0]], diffs["eval/accuracy"]
    better = [a for a, t in primary.items() if t["p_holm"] < 0.05 and t["mean"] > 0]
    if better:
        arm = max(better, key=lambda a: primary[a]["mean"])
        return {"arm": arm, "rule": "gain", "why": f"Holm-significantly better on {METRICS[0]}, the largest mean of "
                                                   f"{len(better)} such arm(s)"}
    kept = [a for a, t in accuracy.items() if not (t["p"] < 0.05 and t["mean"] < 0)]
    if not kept:
        return {"arm": None, "rule": "null", "why": "no arm is better, and every arm's held-out accuracy is lower"}
    arm = max(kept, key=lambda a: float(a[len("eta"):]))
    return {"arm": arm, "rule": "null", "why": f"no arm is Holm-significantly better on {METRICS[0]}: the largest "
                                               "eta whose held-out accuracy is not significantly lower"}


def plot(res, path):
    """Per arm, each seed's MetaRM - vanilla (dots) and the mean with its 95% t-interval, for the
    primary endpoint and held-out accuracy. Needs matplotlib (an optional extra)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    arms = list(res["diffs"][METRICS[0]])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, m in zip(axes, (METRICS[0], "eval/accuracy")):
        for i, a in enumerate(arms):
            d = [x - v for x, v in zip(res["per_seed"][a][m], res["per_seed"]["vanilla"][m])]
            ax.plot([i] * len(d), d, "o", color="0.6", ms=4, zorder=1)
            t = res["diffs"][m][a]
            ax.errorbar([i + 0.15], [t["mean"]], yerr=[[t["mean"] - t["lo"]], [t["hi"] - t["mean"]]], fmt="s",
                        color="C3" if t["p_holm"] < 0.05 else "C0", capsize=4, zorder=2)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(arms)), [f"η/α = {a[len('eta'):]}" for a in arms])
        ax.set_title(f"{m}: MetaRM − vanilla")
    axes[0].set_ylabel(f"paired on the seed ({len(res['seeds'])} seeds)")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)


def ci(x, digits):
    return f"{x['mean']:+.{digits}f} [{x['lo']:+.{digits}f}, {x['hi']:+.{digits}f}]"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["prepare", "run", "report", "ratios", "ppo", "ppo_report"])
    p.add_argument("--seeds", default="1 2 3 4 5 6 7 8")
    p.add_argument("--ratios", default="", help="eta / alpha of the MetaRM arms, space separated")
    p.add_argument("--out_dir", default="runs/study-pretrained-rm")
    p.add_argument("--arm", default="", help="ppo, ppo_report: the MetaRM arm whose RM steers PPO against vanilla's (e.g. eta2000)")
    p.add_argument("--primary", default="", help="report: the primary set's report (report-seeds<...>.json); "
                   "this set is then its confirmation, and gets the registered verdict")
    p.add_argument("--diagnostic", default="docs/metastep-smollm2.json", help="ratios: tools/metastep.py's --out")
    args = p.parse_args(argv)
    if args.mode == "ratios":
        with open(args.diagnostic) as f:
            print(" ".join(f"{r:g}" for r in ratios_for(json.load(f))))
        return
    if args.mode == "prepare":
        prepare(args.out_dir)
        return
    seeds = [int(s) for s in args.seeds.split()]
    if args.mode in ("ppo", "ppo_report"):
        if not args.arm.startswith("eta"):
            p.error(f"{args.mode} needs --arm eta<r>, one of the MetaRM arms (e.g. --arm eta2000)")
        if args.mode == "ppo":
            this_build = build()
            print(f"build: {this_build}", flush=True)
            for s in seeds:
                run_policy(args.out_dir, s, args.arm, this_build)
            return
        res, text = policy_report(args.out_dir, seeds, args.arm)
        write_json(os.path.join(args.out_dir, f"policy-{args.arm}-seeds" + "-".join(map(str, seeds)) + ".json"), res)
        print(text)
        return
    ratios = [float(r) for r in args.ratios.split()]
    if args.mode == "run":
        this_build = build()
        print(f"build: {this_build}", flush=True)
        for s in seeds:
            run_seed(args.out_dir, s, ratios, this_build)
    else:
        primary = None
        if args.primary:
            with open(args.primary) as f:
                primary = json.load(f)
            if "confirmation" not in primary:
                p.error(f"--primary {args.primary}: not a primary set's report (it names no confirmation arm)")
        res, text = report(args.out_dir, seeds, ratios, primary)
        name = os.path.join(args.out_dir, "report-seeds" + "-".join(map(str, seeds)))
        write_json(name + ".json", res)
        print(text)
        try:
            plot(res, name + ".png")
            print(f"figure: {name}.png")
        except ImportError:
            print("matplotlib is not installed: the figure is skipped (pip install matplotlib to draw it)")


if __name__ == "__main__":
    main()
