"""evaluate.py: the paper's evaluation of an iterated-RLHF run (what iterate.sh calls last).

For one seed's run folder (sft/, rm/, ppo_vanilla/, round1/ ... roundR/):
  * every policy answers the same held-out test prompts (one sampled response each, cached in
    eval/); a judge scores the responses: the gold judge on the embedded task, or any Hugging
    Face reward model given by path on real data;
  * win / tie / lose of each round's policy pi_k against SFT (the paper's Table 1) and of the
    best round against SFT and the vanilla-PPO baselines (Table 2). A tie is a judge-score
    difference below --tie_margin; an empty response loses to any non-empty one, two empty
    responses tie, whatever the judge says;
  * diversity (Table 3): Self-BLEU averaged over n = 2..5 and distinct-n; lower Self-BLEU is
    more diverse;
  * per round, the reward models on the samples of the policy they are about to train (the
    round's meta data): the vanilla RM against the round's MetaRM (Figure 5: |dr| histogram,
    variance, share near zero, gold agreement, J), and their held-out accuracy (Figure 4);
  * from the PPO logs, the variance of same-prompt reward differences per step (Figure 1).
Writes eval/results.json and eval/results.md in the run folder; --aggregate pools several seeds' results
into mean +- standard deviation. With matplotlib installed it also draws figure1/4/5.png.

    python evaluate.py --run_dir runs/default/seed1 --rounds 3
    python evaluate.py --aggregate runs/default --seeds "1 2 3"
"""
import collections
import dataclasses
import json
import math
import os

import torch

import data
import reward_model as rm
import runtime
from runtime import arg


@dataclasses.dataclass
class Args:
    run_dir: str = arg("runs/default/seed1", "one seed's run folder, as iterate.sh lays it out")
    rounds: int = arg(3, "MetaRM rounds in the run")
    prompts: str = arg("runs/default/task/data/prompts_test.jsonl", "held-out test prompts (the paper: 100)")
    n_prompts: int = arg(150, "how many test prompts to use (the paper: 100; fewer only for quick checks)")
    pairs: str = arg("runs/default/task/data/pairs_test.jsonl", "held-out preference pairs for RM accuracy")
    sft_data: str = arg("runs/default/task/data/pairs_train.jsonl", "preference pairs whose chosen responses are the 'raw data' row of Table 3")
    judge: str = arg("gold", "'gold' (embedded task) or a Hugging Face reward-model folder")
    tie_margin: float = arg(0.1, "judge-score difference below which two responses tie")
    temperature: float = arg(1.0, "sampling temperature of the evaluated policies")
    top_p: float = arg(1.0, "nucleus sampling of the evaluated policies")
    repetition_penalty: float = arg(1.0, "repetition penalty of the evaluated policies")
    max_new_tokens: int = arg(40, "maximum response tokens")
    seed: int = arg(1234, "sampling seed (the same for every policy)")
    aggregate: str = arg("", "pool the results.json of <aggregate>/seed<S> for --seeds instead")
    seeds: str = arg("1", "with --aggregate: the seeds, space separated")


# The fields of results.json (the README's table lists the same). With several seeds every number
# becomes {"mean": ..., "std": ...}.
RESULT_FIELDS = {
    "config": "rounds, prompts (number of test prompts), judge, tie_margin",
    "judge_mean": "mean judge score on the test prompts of each policy: sft, vanilla_ppo, "
                  "vanilla_ppo_1round (when rounds > 1), round1 .. roundR",
    "table1": "Table 1: per round, {round, win, tie, lose} of pi_k against SFT, in % of prompts",
    "table2": "Table 2: best_round (most wins minus losses against SFT; with several seeds, the list of "
              "each seed's) and its win/tie/lose vs_sft, "
              "vs_vanilla_ppo (as many PPO steps as all rounds), vs_vanilla_ppo_1round; "
              "vanilla_ppo_vs_sft",
    "table3": "Table 3: per response set (raw_data, then each policy) self_bleu (mean of n = 2..5), "
              "self_bleu_2 .. self_bleu_5, distinct_1, distinct_2",
    "rounds": "Figures 4 and 5: per round, {round, metarm, vanilla, ppo_gold}; metarm and vanilla "
              "hold that RM's eval/accuracy and eval/margin (held-out pairs) and, on the round's "
              "meta data, shift/J, shift/dr_var, shift/dr_mean_abs, shift/dr_near_zero, shift/dr_hist, "
              "shift/gold_agreement, shift/gold_pairs; ppo_gold: the gold score per step of the round's PPO",
    "figure1": "Figure 1: per PPO run (vanilla_ppo, round1 ..), [step, variance of same-prompt reward "
               "differences]",
    "figure4": "Figure 4: per RM (vanilla, round1 ..), [step, held-out accuracy] during training",
    "ppo_curves": "per PPO run, gold and score: [step, mean gold score / RM score of the roll-outs]",
}
ROUND_RM_FIELDS = ("eval/accuracy", "eval/margin", "shift/J", "shift/dr_var", "shift/dr_mean_abs",
                   "shift/dr_near_zero", "shift/dr_hist", "shift/gold_agreement", "shift/gold_pairs")


# ---------------------------------------------------------------------------------------------
# Metrics, each small enough to check by hand
# ---------------------------------------------------------------------------------------------
def win_tie_lose(a, b, margin, empty_a=None, empty_b=None):
    """Percentages of prompts where response a beats, ties or loses to response b, judged by
    scores a, b (lists of floats). An empty response loses to a non-empty one; two tie."""
    n = len(a)
    empty_a = empty_a or [False] * n
    empty_b = empty_b or [False] * n
    win = tie = lose = 0
    for sa, sb, ea, eb in zip(a, b, empty_a, empty_b):
        if ea or eb:
            win, tie, lose = win + (eb and not ea), tie + (ea and eb), lose + (ea and not eb)
        elif abs(sa - sb) < margin:
            tie += 1
        elif sa > sb:
            win += 1
        else:
            lose += 1
    return {"win": 100 * win / n, "tie": 100 * tie / n, "lose": 100 * lose / n}


def ngrams(tokens, n):
    return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(hyp, best, ref_lengths, max_n):
    """Sentence BLEU of token list `hyp` with uniform weights over 1..max_n, as in Self-BLEU
    (Zhu et al. 2018): n-gram counts clipped by best[n][g], the largest count of n-gram g in any
    reference; the closest reference length for the brevity penalty; 'method 1' smoothing (a
    zero count becomes 0.1)."""
    log_p = 0.0
    for n in range(1, max_n + 1):
        counts = ngrams(hyp, n)
        clipped = sum(min(c, best[n][g]) for g, c in counts.items())
        log_p += math.log((clipped or 0.1) / max(1, sum(counts.values()))) / max_n
    c = len(hyp)
    r = min((abs(x - c), x) for x in ref_lengths)[1]
    bp = 1.0 if c > r else math.exp(1 - r / max(c, 1))
    return bp * math.exp(log_p)


class _Leave1Out(dict):
    """The largest count of each n-gram over all texts but one: the top two counts are kept
    with the owner of the top one, so each text's references cost nothing to build."""

    def __init__(self, counters, skip):
        super().__init__()
        self.counters, self.skip = counters, skip

    def __missing__(self, g):
        (c1, owner), c2 = self.counters[g]
        return c2 if owner == self.skip else c1


def self_bleu(texts, max_n):
    """Mean BLEU of each text against all the others (higher: less diverse)."""
    toks = [t.split() for t in texts]
    top = [None]
    for n in range(1, max_n + 1):  # per n-gram: (largest count, its text), second largest count
        t = {}
        for i, tk in enumerate(toks):
            for g, c in ngrams(tk, n).items():
                (c1, o1), c2 = t.get(g, ((0, -1), 0))
                t[g] = ((c, i), c1) if c > c1 else ((c1, o1), max(c2, c))
        top.append(t)
    lengths = [len(t) for t in toks]
    total = 0.0
    for i, tk in enumerate(toks):
        best = [None] + [_Leave1Out(top[n], i) for n in range(1, max_n + 1)]
        total += bleu(tk, best, lengths[:i] + lengths[i + 1:], max_n)
    return total / len(toks)


def distinct(texts, n):
    """Distinct n-grams over all n-grams of all texts (higher: more diverse)."""
    grams = collections.Counter()
    for t in texts:
        grams += ngrams(t.split(), n)
    return len(grams) / max(1, sum(grams.values()))


def diversity(texts):
    sb = {n: self_bleu(texts, n) for n in (2, 3, 4, 5)}
    return {"self_bleu": sum(sb.values()) / 4, **{f"self_bleu_{n}": v for n, v in sb.items()},
            "distinct_1": distinct(texts, 1), "distinct_2": distinct(texts, 2)}


# ---------------------------------------------------------------------------------------------
# Sampling and judging
# ---------------------------------------------------------------------------------------------
def responses(policy_dir, prompts, args, cache, d):
    """One response per prompt from a policy, sampled with a fixed seed; cached as JSON lines."""
    if os.path.exists(cache):
        with open(cache) as f:
            return [json.loads(line)["response"] for line in f]
    torch.manual_seed(args.seed)
    tok = runtime.load_tokenizer(policy_dir)
    model = runtime.load_causal_lm(policy_dir, tok).to(d.device).eval()
    enc = data.Encoder(tok, 10**9)
    s = runtime.Sampling(args.temperature, args.top_p, args.repetition_penalty, args.max_new_tokens)
    out = []
    for i in range(0, len(prompts), 64):
        _, r = runtime.generate(model, tok, [enc.prompt(p) for p in prompts[i:i + 64]], s, d)
        out += runtime.decode_responses(tok, r)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with open(cache + ".tmp", "w") as f:
        f.writelines(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in zip(prompts, out))
    os.replace(cache + ".tmp", cache)
    return out


class Judge:
    """The gold judge (embedded task) or a Hugging Face reward model, scoring (prompt, response)."""

    def __init__(self, name, d):
        self.name, self.d = name, d
        if name != "gold":
            self.tok = runtime.load_tokenizer(name)
            self.model = rm.load_reward_model(name, self.tok).to(d.device).eval()

    def __call__(self, prompts, texts):
        if self.name == "gold":
            import task
            return [task.gold(p, t) for p, t in zip(prompts, texts)]
        enc = data.Encoder(self.tok, 10**9)
        seqs = [sum(enc(p, t), []) for p, t in zip(prompts, texts)]
        return rm.score_sequences(self.model, seqs, self.tok.pad_token_id, self.d).tolist()


def rm_on_samples(rm_dir, meta_file, pairs, d):
    """A reward model on a round's meta data (samples of the policy it will steer) and on the
    held-out pairs: J, |dr| statistics, gold agreement, accuracy."""
    tok = runtime.load_tokenizer(rm_dir)
    model = rm.load_reward_model(rm_dir, tok).to(d.device).eval()
    meta = data.load_meta(meta_file)
    return rm.measure(model, tok, d, pairs=pairs, meta=meta, gold=rm.gold_applies([p for p, _, _ in meta]))


def curve(run_dir, key):
    """[(step, value)] of one metric from a stage's metrics.jsonl."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [(r["step"], r[key]) for r in map(json.loads, f) if key in r]


# ---------------------------------------------------------------------------------------------
# One seed's report
# ---------------------------------------------------------------------------------------------
def evaluate(args, d):
    R, run = args.rounds, args.run_dir
    prompts = [p for p, _ in data.load_prompts(args.prompts)][:args.n_prompts]
    policies = {"sft": f"{run}/sft", "vanilla_ppo": f"{run}/ppo_vanilla"}
    one_round = f"{run}/ppo_vanilla/step{_ppo_steps(run)}"
    if R > 1 and os.path.isdir(one_round):
        policies["vanilla_ppo_1round"] = one_round
    policies.update({f"round{k}": f"{run}/round{k}/ppo" for k in range(1, R + 1)})
    if args.judge == "gold" and not rm.gold_applies(prompts):
        raise runtime.UserError(f"the gold judge only knows the embedded task, and {args.prompts} holds other "
                                "prompts: pass --judge <a reward-model folder> (iterate.sh: JUDGE=...)")
    judge = Judge(args.judge, d)
    texts, scores, empty = {}, {}, {}
    for name, path in runtime.progress(policies.items(), d, desc="evaluate", total=len(policies)):
        texts[name] = responses(path, prompts, args, f"{run}/eval/{name}.jsonl", d)
        scores[name] = judge(prompts, texts[name])
        empty[name] = [not t.strip() for t in texts[name]]
    wtl = lambda a, b: win_tie_lose(scores[a], scores[b], args.tie_margin, empty[a], empty[b])

    res = {"config": {"rounds": R, "prompts": len(prompts), "judge": args.judge, "tie_margin": args.tie_margin},
           "judge_mean": {k: sum(v) / len(v) for k, v in scores.items()}}
    res["table1"] = [{"round": k, **wtl(f"round{k}", "sft")} for k in range(1, R + 1)]
    best = max(range(1, R + 1), key=lambda k: (res["table1"][k - 1]["win"] - res["table1"][k - 1]["lose"], -k))
    res["table2"] = {"best_round": best, "vs_sft": wtl(f"round{best}", "sft"),
                     "vs_vanilla_ppo": wtl(f"round{best}", "vanilla_ppo")}
    if "vanilla_ppo_1round" in policies:
        res["table2"]["vs_vanilla_ppo_1round"] = wtl(f"round{best}", "vanilla_ppo_1round")
    res["table2"]["vanilla_ppo_vs_sft"] = wtl("vanilla_ppo", "sft")
    raw = [w for _, w, _, _ in data.load_pairs(args.sft_data)][:len(prompts)]
    res["table3"] = {"raw_data": diversity(raw), **{k: diversity(v) for k, v in texts.items()}}

    pairs = data.load_pairs(args.pairs)
    res["rounds"] = []
    for k in range(1, R + 1):
        meta = f"{run}/round{k}/meta.jsonl"
        res["rounds"].append({"round": k, "metarm": rm_on_samples(f"{run}/round{k}/rm", meta, pairs, d),
                              "vanilla": rm_on_samples(f"{run}/rm", meta, pairs, d),
                              "ppo_gold": [v for _, v in curve(f"{run}/round{k}/ppo", "objective/gold")]})
    res["figure1"] = {"vanilla_ppo": curve(f"{run}/ppo_vanilla", "shift/dr_var"),
                      **{f"round{k}": curve(f"{run}/round{k}/ppo", "shift/dr_var") for k in range(1, R + 1)}}
    res["figure4"] = {"vanilla": curve(f"{run}/rm", "eval/accuracy"),
                      **{f"round{k}": curve(f"{run}/round{k}/rm", "eval/accuracy") for k in range(1, R + 1)}}
    res["ppo_curves"] = {name: {"gold": curve(p, "objective/gold"), "score": curve(p, "objective/scores")}
                         for name, p in [("vanilla_ppo", f"{run}/ppo_vanilla")] +
                         [(f"round{k}", f"{run}/round{k}/ppo") for k in range(1, R + 1)]}
    return res


def _ppo_steps(run):
    with open(f"{run}/round1/ppo/args.json") as f:
        return json.load(f)["steps"]


# ---------------------------------------------------------------------------------------------
# Several seeds, and the report
# ---------------------------------------------------------------------------------------------
def pool(results):
    """Mean and standard deviation of every number found at the same place in several results."""
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


def fmt(x, digits=1):
    if isinstance(x, dict) and "mean" in x:
        spread = x["std"] > 1e-9 * max(1.0, abs(x["mean"]))  # identical over seeds: no "± 0.000"
        return f"{x['mean']:.{digits}f} ± {x['std']:.{digits}f}" if spread else f"{x['mean']:.{digits}f}"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown(res, seeds):
    rows = [f"# Iterated RLHF with MetaRM: results ({seeds})", ""]
    t = lambda r: f"| {fmt(r['win'])} | {fmt(r['tie'])} | {fmt(r['lose'])} |"
    rows += ["## Table 1: each round's policy against SFT (judge: %s, %% of prompts)" % res["config"]["judge"], "",
             "| opponent vs SFT | win | tie | lose |", "|---|---|---|---|"]
    rows += [f"| round {fmt(r['round'], 0)} " + t(r) for r in res["table1"]]
    t2 = res["table2"]
    best = t2["best_round"]
    best = f"round {best}" if isinstance(best, int) else "per seed: round " + ", ".join(map(str, best))
    rows += ["", f"## Table 2: the best round ({best}) against the baselines", "",
             "| opponent | win | tie | lose |", "|---|---|---|---|", "| SFT " + t(t2["vs_sft"]),
             "| vanilla PPO (all rounds' steps) " + t(t2["vs_vanilla_ppo"])]
    if "vs_vanilla_ppo_1round" in t2:
        rows.append("| vanilla PPO (one round's steps) " + t(t2["vs_vanilla_ppo_1round"]))
    rows += ["", "vanilla PPO (all rounds' steps) against SFT: " + t(t2["vanilla_ppo_vs_sft"]).strip("| ").replace(" | ", " / ") + " (win / tie / lose)"]
    rows += ["", "## Table 3: diversity (Self-BLEU averaged over n = 2..5: lower is more diverse)", "",
             "| responses | Self-BLEU | distinct-1 | distinct-2 |", "|---|---|---|---|"]
    rows += [f"| {k} | {fmt(v['self_bleu'], 3)} | {fmt(v['distinct_1'], 3)} | {fmt(v['distinct_2'], 3)} |" for k, v in res["table3"].items()]
    rows += ["", "## Mean judge score of each policy on the test prompts", "", "| policy | score |", "|---|---|"]
    rows += [f"| {k} | {fmt(v, 3)} |" for k, v in res["judge_mean"].items()]
    rows += ["", "## The reward models on the samples of the policy they steer (Figures 4 and 5)", "",
             "| round | RM | held-out accuracy | J | var dr | share near 0 | gold agreement |", "|---|---|---|---|---|---|---|"]
    for r in res["rounds"]:
        for name in ("vanilla", "metarm"):
            m = r[name]
            rows.append(f"| {fmt(r['round'], 0)} | {name} | {fmt(m['eval/accuracy'], 3)} | {fmt(m['shift/J'], 4)} | "
                        f"{fmt(m['shift/dr_var'], 4)} | {fmt(m['shift/dr_near_zero'], 3)} | {fmt(m.get('shift/gold_agreement', float('nan')), 3)} |")
    return "\n".join(rows) + "\n"


def figures(res, out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: figures skipped (pip install matplotlib to draw them)")
        return
    plot = lambda series, title, ylabel, name: _plot(plt, series, title, ylabel, os.path.join(out_dir, name))
    plot(res["figure1"], "Figure 1: variance of same-prompt reward differences during PPO", "var dr", "figure1.png")
    plot(res["figure4"], "Figure 4: held-out RM accuracy during training", "accuracy", "figure4.png")
    fig, axes = plt.subplots(1, len(res["rounds"]), figsize=(4 * len(res["rounds"]), 3), squeeze=False)
    for ax, r in zip(axes[0], res["rounds"]):
        for name in ("vanilla", "metarm"):
            h = r[name]["shift/dr_hist"]
            ax.bar([i / len(h) + (0.05 if name == "metarm" else 0) for i in range(len(h))], h, width=0.05, label=name)
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
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save(res, out_dir, seeds):
    with open(os.path.join(out_dir, "results.json.tmp"), "w") as f:
        json.dump(res, f, indent=1)
    os.replace(os.path.join(out_dir, "results.json.tmp"), os.path.join(out_dir, "results.json"))
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(res, seeds))


def main(argv=None):
    args = runtime.parse_args(Args, __doc__, argv)
    d = runtime.init_distributed()
    if args.aggregate:
        seeds = args.seeds.split()
        results = []
        for s in seeds:
            with open(os.path.join(args.aggregate, f"seed{s}", "eval", "results.json")) as f:
                results.append(json.load(f))
        res = pool(results)
        best = [r["table2"]["best_round"] for r in results]  # a round is not a number to average
        res["table2"]["best_round"] = best if len(best) > 1 else best[0]
        label = f"seeds {', '.join(seeds)}: mean ± standard deviation" if len(seeds) > 1 else f"seed {seeds[0]}"
        save(res, args.aggregate, label)
        figures(results[0], args.aggregate)
        print(markdown(res, label))
        return
    if args.n_prompts < 100:
        d.print(f"note: {args.n_prompts} test prompts; the paper uses 100")
    res = evaluate(args, d)
    out = os.path.join(args.run_dir, "eval")
    save(res, out, os.path.basename(args.run_dir.rstrip("/")))
    with open(os.path.join(out, "DONE"), "w") as f:
        json.dump({"stage": "evaluate", "table1": res["table1"], "best_round": res["table2"]["best_round"]}, f)
    print(json.dumps({"stage": "evaluate", "table1": res["table1"], "best_round": res["table2"]["best_round"]}))


if __name__ == "__main__":
    runtime.guard(main)
