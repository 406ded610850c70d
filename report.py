"""report.py: the report of an iterated-RLHF run, from one seed's evaluation or several
(evaluate.py writes each seed's results and calls this): the paired comparisons of the policies
and of the reward models, pooled numbers, the markdown report and the figures. No model is
loaded here; everything comes from the results (evaluate.RESULT_FIELDS lists them).

  * win / tie / lose of one policy's response against another's on each prompt: a tie is a
    judge-score difference below the tie margin; an empty response loses to any non-empty one;
  * paired comparisons (`comparison_plan`, `compare`): on every (seed, prompt) the difference of
    two policies' judge scores and the win - lose outcome, their means and 95% intervals from a
    hierarchical bootstrap (significance.py) and a verdict; each arm's RM against the vanilla RM
    on the same samples, paired on the seed (`compare_rms`);
  * several seeds pooled: numbers as mean +- standard deviation over seeds (`pool`), comparisons
    over (seed, prompt) (`report`); results.md (`markdown`); figures with matplotlib (`figures`).
"""
import json
import math
import os

import numpy as np

import cli
from significance import hierarchical_bootstrap, seed_interval, verdict


def base(arm):
    """An arm's name without its modifiers: metarm+eta=1e-3 -> metarm."""
    return arm.split("+")[0]


# ---------------------------------------------------------------------------------------------
# Win / tie / lose, each small enough to check by hand
# ---------------------------------------------------------------------------------------------
def outcomes(a, b, margin, empty_a=None, empty_b=None):
    """Per prompt, +1 if response a beats response b, 0 for a tie, -1 if it loses, judged by
    scores a, b (lists of floats). An empty response loses to a non-empty one; two tie."""
    n = len(a)
    empty_a = empty_a or [False] * n
    empty_b = empty_b or [False] * n
    out = []
    for sa, sb, ea, eb in zip(a, b, empty_a, empty_b):
        if ea or eb:
            out.append(int(eb) - int(ea))
        elif abs(sa - sb) < margin:
            out.append(0)
        else:
            out.append(1 if sa > sb else -1)
    return out


def win_tie_lose(a, b, margin, empty_a=None, empty_b=None):
    """Percentages of prompts where response a beats, ties or loses to response b."""
    o = outcomes(a, b, margin, empty_a, empty_b)
    return {"win": 100 * o.count(1) / len(o), "tie": 100 * o.count(0) / len(o), "lose": 100 * o.count(-1) / len(o)}


# ---------------------------------------------------------------------------------------------
# Paired comparisons
# ---------------------------------------------------------------------------------------------
RM_METRICS = ("shift/gold_agreement", "shift/J", "shift/dr_var", "eval/accuracy")


def compare_rms(results):
    """Each arm's round-k RM against the vanilla RM on the same samples (the round's meta data),
    paired on the seed: the difference of each of RM_METRICS, its 95% interval and a verdict."""
    out = []
    for arm, rounds in results[0]["rounds"].items():
        if base(arm) == "vanilla":
            continue
        for i, r in enumerate(rounds):
            for metric in RM_METRICS:
                if metric not in r["rm"]:
                    continue
                diff = [res["rounds"][arm][i]["rm"][metric] - res["rounds"][arm][i]["vanilla"][metric] for res in results]
                iv = seed_interval(diff)
                out.append({"arm": arm, "round": r["round"], "metric": metric, "diff": iv, "seeds": len(diff),
                            "verdict": verdict(iv, len(diff), metric.split("/")[1], ("higher", "lower"), 4)})
    return out


def compare(scores, empty, a, b, margin, n_boot):
    """Paired comparison of policies a and b: scores[name] and empty[name] are [seeds][prompts]."""
    gold = np.asarray(scores[a]) - np.asarray(scores[b])
    wl = np.asarray([outcomes(sa, sb, margin, ea, eb) for sa, sb, ea, eb in
                     zip(scores[a], scores[b], empty[a], empty[b])], dtype=float)
    g = hierarchical_bootstrap(gold, n_boot)
    w = hierarchical_bootstrap(100 * wl, n_boot, seed=1)
    w["lo"], w["hi"] = max(w["lo"], -100.0), min(w["hi"], 100.0)  # a share of prompts: the t-interval cut to what it can be
    S, P = gold.shape
    return {"a": a, "b": b, "seeds": S, "prompts": P, "gold_diff": g, "win_minus_lose": w,
            "win": 100 * float((wl == 1).mean()), "tie": 100 * float((wl == 0).mean()),
            "lose": 100 * float((wl == -1).mean()), "verdict": verdict(g, S),
            "per_seed_gold_diff": gold.mean(1).tolist()}


def comparison_plan(arms, R, steps):
    """The (a, b) pairs every report compares, a against b: each arm's round k against SFT, its own
    round k - 1, the vanilla arm's round k, vanilla PPO after as many steps, and DPO; an arm with
    modifiers (metarm+anchor=sft) also against its plain arm (what the modifiers change) and
    against the vanilla arm with the same modifiers (the meta-step under them)."""
    rounds = [a for a in arms if base(a) != "dpo"]
    has_dpo = any(base(a) == "dpo" for a in arms)
    plan = []
    add = lambda pair: plan.append(pair) if pair not in plan else None
    for arm in rounds:
        mods = arm[len(base(arm)):]
        for k in range(1, R + 1):
            me = f"{arm}/round{k}"
            add((me, "sft"))
            if k > 1:
                add((me, f"{arm}/round{k - 1}"))  # does the arm improve round over round?
            if "vanilla" in arms and arm != "vanilla":
                add((me, f"vanilla/round{k}"))
            if base(arm) == "bilevel" and "metarm" in arms:
                add((me, f"metarm/round{k}"))  # the two answers to a reward model off its distribution
            if mods and base(arm) in arms:
                add((me, f"{base(arm)}/round{k}"))
            if mods and base(arm) != "vanilla" and f"vanilla{mods}" in arms:
                add((me, f"vanilla{mods}/round{k}"))
            add((me, f"vanilla_ppo/step{k * steps}"))
            if has_dpo:
                add((me, "dpo"))
    if has_dpo:
        add(("dpo", "sft"))
    add((f"vanilla_ppo/step{R * steps}", "sft"))
    return plan


# ---------------------------------------------------------------------------------------------
# One seed or several: pooled numbers, paired comparisons, the report
# ---------------------------------------------------------------------------------------------
def pool(results):
    """Mean and standard deviation over seeds of every number found at the same place."""
    first = results[0]
    if isinstance(first, dict):
        return {k: pool([r[k] for r in results]) for k in first if all(k in r for r in results)}
    if isinstance(first, list):  # tables, curves [[step, value], ...], histograms: element by element
        return [pool(list(x)) for x in zip(*results)]
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        m = sum(results) / len(results)
        sd = math.sqrt(sum((x - m) ** 2 for x in results) / (len(results) - 1)) if len(results) > 1 else 0.0
        return {"mean": m, "std": sd}
    return first


POOLED = ("judge_mean", "table1", "table3", "rounds", "figure1", "figure4", "ppo_curves")  # mean +- std over seeds


def report(results, seeds, n_boot, arms):
    """results: one seed's results.json each -> the pooled report on `arms` (each seed's results
    must hold them; a seed evaluated with more arms contributes these only), paired comparisons."""
    cfg = results[0]["config"]
    R, steps, margin = cfg["rounds"], cfg["ppo_steps"], cfg["tie_margin"]
    for s, r in zip(seeds, results):
        if (r["config"]["rounds"], r["config"]["ppo_steps"]) != (R, steps) or not set(arms) <= set(r["config"]["arms"]):
            raise cli.UserError(f"seed {s} was evaluated with arms {r['config']['arms']}, {r['config']['rounds']} "
                                    f"rounds of {r['config']['ppo_steps']} steps; the report needs arms {arms}, {R} rounds "
                                    f"of {steps} steps in every seed: re-run iterate.sh for it with those settings")
    keep = lambda name: name.split("/")[0] in arms or name in ("sft", "raw_data", "vanilla", "vanilla_ppo") or \
        name.startswith("vanilla_ppo/")
    mine = lambda r: {k: ({n: v for n, v in r[k].items() if keep(n)} if k not in ("table1", "rounds") else
                          {a: v for a, v in r[k].items() if a in arms}) for k in POOLED}
    res = pool([mine(r) for r in results])
    res["config"] = {**cfg, "arms": list(arms), "seeds": [int(s) for s in seeds],
                     "settings": {a: results[0]["config"]["settings"][a] for a in arms}}
    scores = {name: [r["scores"][name] for r in results] for name in results[0]["scores"] if keep(name)}
    empty = {name: [r["empty"][name] for r in results] for name in scores}
    res["gold"] = {name: hierarchical_bootstrap(v, n_boot) for name, v in scores.items()}
    res["per_seed"] = {str(s): r["judge_mean"] for s, r in zip(seeds, results)}
    res["comparisons"] = [compare(scores, empty, a, b, margin, n_boot) for a, b in comparison_plan(arms, R, steps)]
    res["rm_comparisons"] = [c for c in compare_rms(results) if c["arm"] in arms]
    res["table2"] = {}
    for a in arms:
        if base(a) == "dpo":
            continue
        vs_sft = {c["a"]: c for c in res["comparisons"] if c["b"] == "sft"}
        best = max(range(1, R + 1), key=lambda k: (vs_sft[f"{a}/round{k}"]["gold_diff"]["mean"], -k))
        me = f"{a}/round{best}"
        opponents = ["sft", f"vanilla_ppo/step{R * steps}"] + (["dpo"] if "dpo" in scores else [])
        res["table2"][a] = {"best_round": best, **{b: compare(scores, empty, me, b, margin, n_boot) for b in opponents}}
    return res


def ci(x, digits=2):
    return f"{x['mean']:+.{digits}f} [{x['lo']:+.{digits}f}, {x['hi']:+.{digits}f}]"


def fmt(x, digits=1):
    if isinstance(x, dict) and "mean" in x:
        spread = x.get("std", 0) > 1e-9 * max(1.0, abs(x["mean"]))  # identical over seeds: no "± 0.000"
        return f"{x['mean']:.{digits}f} ± {x['std']:.{digits}f}" if spread else f"{x['mean']:.{digits}f}"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown(res):
    cfg = res["config"]
    S = len(cfg["seeds"])
    seeds = ", ".join(map(str, cfg["seeds"]))
    rows = [f"# Iterated RLHF: results ({S} seed{'s' * (S > 1)}: {seeds}; {cfg['prompts']} test prompts; judge: {cfg['judge']})", ""]
    if S == 1:
        rows += ["One seed: the intervals below cover the test prompts only; a verdict across seeds needs several.", ""]
    rows += ["Every comparison is paired on (seed, prompt): the mean difference of the judge's scores and of the "
             "win - lose outcome (in % of prompts), with 95% intervals from a hierarchical bootstrap "
             "(seeds, then prompts within a seed; see significance.hierarchical_bootstrap).", ""]
    rows += ["## Verdicts", "", "| comparison | gold difference [95% CI] | win - lose, % [95% CI] | verdict |", "|---|---|---|---|"]
    key = [c for c in res["comparisons"] if c["b"].startswith(("vanilla/", "metarm/")) or c["b"] == "sft"
           or c["b"].split("/")[0] == c["a"].split("/")[0]]
    rows += [f"| {c['a']} vs {c['b']} | {ci(c['gold_diff'])} | {ci(c['win_minus_lose'], 1)} | {c['verdict']} |" for c in key]
    rows += ["", "## Mean judge score of each policy [95% CI]", "", "| policy | score |", "|---|---|"]
    rows += [f"| {k} | {ci(v)} |" for k, v in res["gold"].items()]
    rows += ["", "## Table 1: each round's policy against SFT (% of prompts, pooled over seeds)", "",
             "| arm | round | win | tie | lose | win - lose [95% CI] |", "|---|---|---|---|---|---|"]
    by = {(c["a"], c["b"]): c for c in res["comparisons"]}
    for a in res["table1"]:
        for r in res["table1"][a]:
            c = by[(f"{a}/round{fmt(r['round'], 0)}", "sft")]
            rows.append(f"| {a} | {fmt(r['round'], 0)} | {c['win']:.1f} | {c['tie']:.1f} | {c['lose']:.1f} | {ci(c['win_minus_lose'], 1)} |")
    rows += ["", "## Table 2: each arm's best round (highest mean gold difference against SFT) against the baselines", "",
             "| arm (best round) | opponent | win | tie | lose | gold difference [95% CI] | verdict |", "|---|---|---|---|---|---|---|"]
    for a, t in res["table2"].items():
        for b, c in t.items():
            if b != "best_round":
                rows.append(f"| {a} (round {t['best_round']}) | {b} | {c['win']:.1f} | {c['tie']:.1f} | {c['lose']:.1f} | "
                            f"{ci(c['gold_diff'])} | {c['verdict']} |")
    rows += ["", "## Every paired comparison", "", "| a | b | gold difference [95% CI] | win - lose, % [95% CI] | verdict |", "|---|---|---|---|---|"]
    rows += [f"| {c['a']} | {c['b']} | {ci(c['gold_diff'])} | {ci(c['win_minus_lose'], 1)} | {c['verdict']} |" for c in res["comparisons"]]
    rows += ["", "## Table 3: diversity (Self-BLEU averaged over n = 2..5: lower is more diverse; mean ± std over seeds)", "",
             "| responses | Self-BLEU | distinct-1 | distinct-2 |", "|---|---|---|---|"]
    rows += [f"| {k} | {fmt(v['self_bleu'], 3)} | {fmt(v['distinct_1'], 3)} | {fmt(v['distinct_2'], 3)} |" for k, v in res["table3"].items()]
    rows += ["", "## The reward models on the samples of the policy they steer (Figures 4 and 5; mean ± std over seeds)", "",
             "| arm | round | RM | held-out accuracy | J | var dr | share near 0 | gold agreement |", "|---|---|---|---|---|---|---|---|"]
    for a, rounds in res["rounds"].items():
        for r in rounds:
            for name in (("vanilla",) if base(a) == "vanilla" else ("vanilla", "rm")):
                m = r[name]
                rows.append(f"| {a} | {fmt(r['round'], 0)} | {'vanilla' if name == 'vanilla' else a} | {fmt(m['eval/accuracy'], 3)} | "
                            f"{fmt(m['shift/J'], 4)} | {fmt(m['shift/dr_var'], 4)} | {fmt(m['shift/dr_near_zero'], 3)} | "
                            f"{fmt(m.get('shift/gold_agreement', float('nan')), 3)} |")
    rows += ["", "## Each arm's RM minus the vanilla RM on the same samples (paired on the seed, 95% t-interval)", "",
             "| arm | round | metric | difference [95% CI] | verdict |", "|---|---|---|---|---|"]
    rows += [f"| {c['arm']} | {c['round']} | {c['metric']} | {ci(c['diff'], 4)} | {c['verdict']} |" for c in res["rm_comparisons"]]
    rows += ["", "## Settings", "", f"rounds {cfg['rounds']}, PPO steps per round {cfg['ppo_steps']}, tie margin {cfg['tie_margin']}", ""]
    rows += [f"- {a}: " + ", ".join(f"{k} {v}" for k, v in s.items()) for a, s in cfg["settings"].items()]
    return "\n".join(rows) + "\n"


def figures(res, first, out_dir):
    """gold_per_round.png from the pooled report; figure1/4/5.png from the first seed's results."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: figures skipped (pip install matplotlib to draw them)")
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))  # each arm's gold per round, with its interval
    R, steps = res["config"]["rounds"], res["config"]["ppo_steps"]
    lines = {a: [f"{a}/round{k}" for k in range(1, R + 1)] for a in res["table1"]}
    lines["vanilla PPO (same steps)"] = [f"vanilla_ppo/step{k * steps}" for k in range(1, R + 1)]
    for i, (name, pols) in enumerate(lines.items()):
        g = [res["gold"][p] for p in pols]
        ax.errorbar([k + 0.04 * i for k in range(1, R + 1)], [x["mean"] for x in g], yerr=[[x["mean"] - x["lo"] for x in g], [x["hi"] - x["mean"] for x in g]],
                    capsize=3, marker="o", label=name)
    for name in ("sft", "dpo"):
        if name in res["gold"]:
            ax.axhline(res["gold"][name]["mean"], linestyle="--", color="gray" if name == "sft" else "black", label=name)
    ax.set(title="mean gold score per round (95% CI)", xlabel="round", ylabel="gold")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "gold_per_round.png"))
    plt.close(fig)
    plot = lambda series, title, ylabel, name: _plot(plt, series, title, ylabel, os.path.join(out_dir, name))
    plot(first["figure1"], "Figure 1: variance of same-prompt reward differences during PPO", "var dr", "figure1.png")
    plot(first["figure4"], "Figure 4: held-out RM accuracy during training", "accuracy", "figure4.png")
    arms = [a for a in first["rounds"] if base(a) != "vanilla"]
    if not arms:
        return
    rounds = first["rounds"][arms[0]]
    fig, axes = plt.subplots(1, len(rounds), figsize=(4 * len(rounds), 3), squeeze=False)
    for ax, r in zip(axes[0], rounds):
        for name in ("vanilla", "rm"):
            h = r[name]["shift/dr_hist"]
            ax.bar([i / len(h) + (0.05 if name == "rm" else 0) for i in range(len(h))], h, width=0.05,
                   label=arms[0] if name == "rm" else name)
        ax.set_title(f"Figure 5, round {r['round']}: |dr| / max")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "figure5.png"))
    plt.close(fig)


def _plot(plt, series, title, ylabel, path):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, pts in series.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save(res, out_dir):
    with open(os.path.join(out_dir, "results.json.tmp"), "w") as f:
        json.dump(res, f, indent=1)
    os.replace(os.path.join(out_dir, "results.json.tmp"), os.path.join(out_dir, "results.json"))
    with open(os.path.join(out_dir, "results.md.tmp"), "w") as f:
        f.write(markdown(res))
    os.replace(os.path.join(out_dir, "results.md.tmp"), os.path.join(out_dir, "results.md"))
