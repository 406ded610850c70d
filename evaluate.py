"""evaluate.py: the evaluation of an iterated-RLHF run (what iterate.sh calls last), and the
paired statistics that say whether an arm helps.

For one seed's run folder (sft/, rm/, ppo_vanilla/, dpo/, <arm>/round1 ... <arm>/roundR/):
  * every policy answers the same held-out test prompts (one sampled response each, with the
    same sampling seed, cached in eval/); a judge scores the responses: the gold judge on the
    embedded task, or any Hugging Face reward model given by path on real data;
  * win / tie / lose of each arm's round-k policy against SFT (the paper's Table 1) and of each
    arm's best round against SFT, vanilla PPO and DPO (Table 2). A tie is a judge-score
    difference below --tie_margin; an empty response loses to any non-empty one;
  * paired comparisons (`comparisons`): on every (seed, prompt) the difference of the two
    policies' judge scores and the win - lose outcome, their means and 95% intervals from a
    hierarchical bootstrap (seeds, then prompts within a seed), and a verdict;
  * diversity (Table 3): Self-BLEU averaged over n = 2..5 and distinct-n; lower Self-BLEU is
    more diverse;
  * per arm and round, that arm's reward model and the vanilla RM on the samples of the policy
    they are about to steer (Figure 5: |dr| variance, share near zero, gold agreement, J) and
    their held-out accuracy (Figure 4);
  * from the PPO logs, the variance of same-prompt reward differences per step (Figure 1).
Writes eval/results.json and eval/results.md in the run folder; --aggregate pools several seeds'
results: numbers as mean +- standard deviation over seeds, comparisons over (seed, prompt). With
matplotlib installed it also draws figure1/4/5.png and gold_per_round.png.

    python evaluate.py --run_dir runs/default/seed1 --rounds 3 --arms "metarm vanilla"
    python evaluate.py --aggregate runs/default --seeds "1 2 3" --rounds 3 --arms "metarm vanilla"
    python evaluate.py --measure runs/default/seed1/rm --samples runs/default/seed1/sft_samples/meta.jsonl
"""
import collections
import dataclasses
import functools
import hashlib
import json
import math
import os

import numpy as np
import torch

import cli
import data
import distributed
import loading
import measure
import metarm
import run_folder
import sample
from cli import arg


@dataclasses.dataclass
class Args:
    run_dir: str = arg("runs/default/seed1", "one seed's run folder, as iterate.sh lays it out")
    rounds: int = arg(3, "rounds in the run", check="> 0")
    arms: str = arg("metarm vanilla", "the run's arms, space separated, as iterate.sh's ARMS")
    prompts: str = arg("runs/default/task/data/prompts_test.jsonl", "held-out test prompts (the paper: 100)")
    n_prompts: int = arg(150, "how many test prompts to use (the paper: 100; fewer only for quick checks)", check="> 0")
    pairs: str = arg("runs/default/task/data/pairs_test.jsonl", "held-out preference pairs for RM accuracy")
    raw_pairs: str = arg("runs/default/task/data/pairs_train.jsonl", "preference pairs whose chosen responses are the 'raw data' row of Table 3")
    judge: str = arg("gold", "'gold' (embedded task) or a Hugging Face reward-model folder")
    tie_margin: float = arg(0.1, "judge-score difference below which two responses tie", check=">= 0")
    temperature: float = arg(1.0, "sampling temperature of the evaluated policies", check="> 0")
    top_p: float = arg(1.0, "nucleus sampling of the evaluated policies", check="(0, 1]")
    repetition_penalty: float = arg(1.0, "repetition penalty of the evaluated policies", check="> 0")
    max_new_tokens: int = arg(40, "maximum response tokens", check="> 0")
    seed: int = arg(1234, "sampling seed (the same for every policy)", check=">= 0")
    aggregate: str = arg("", "pool the results.json of <aggregate>/seed<S> for --seeds instead")
    seeds: str = arg("1", "with --aggregate: the seeds, space separated")
    n_boot: int = arg(2000, "bootstrap resamples for the 95% intervals", check=">= 100")
    out_dir: str = arg("", "with --aggregate: write results.md/json here (default: the --aggregate folder)")
    skip_bad_rows: bool = arg(False, "skip malformed rows of --prompts, --pairs and --raw_pairs (counted and reported) instead of stopping")
    precision: str = arg("auto", distributed.PRECISION_HELP, ["auto", "fp32", "bf16"])
    measure: str = arg("", "only measure this saved reward model: accuracy on --pairs, and on --samples J, |dr| and gold agreement")
    samples: str = arg("", "with --measure: k samples per prompt (a meta.jsonl, e.g. sample.py's)")


# The fields of results.json (docs/results.md's table lists the same; tests/test_iterate.py checks it).
# In a seed's eval/results.json numbers are that seed's; in RUN_DIR/results.json, {"mean", "std"} over seeds.
RESULT_FIELDS = {
    "config": "rounds, arms, ppo_steps (per round), prompts (number of test prompts), judge, tie_margin, seeds, "
              "settings: per arm what matters (meta_grad, eta, alpha, deploy, kl_anchor, ppo_steps, kl_coef, "
              "new_pairs_per_round, beta), read from the stages' args.json",
    "judge_mean": "mean judge score on the test prompts of each policy: sft, vanilla_ppo/step<N> (after each "
                  "round's worth of steps), dpo, <arm>/round<k>",
    "gold": "per policy, the mean judge score with its 95% interval {mean, lo, hi, se} over seeds and prompts",
    "per_seed": "per seed, judge_mean",
    "comparisons": "paired comparisons a vs b: seeds, prompts, gold_diff and win_minus_lose (% of prompts) as "
                   "{mean, lo, hi, se}, win/tie/lose in % pooled, verdict, per_seed_gold_diff",
    "rm_comparisons": "each arm's round-k RM minus the vanilla RM on the same samples, paired on the seed: arm, "
                      "round, metric (shift/gold_agreement, shift/J, shift/dr_var, eval/accuracy), diff {mean, lo, hi, se} "
                      "(95% t-interval over seeds), seeds, verdict",
    "table1": "Table 1: per arm, per round {round, win, tie, lose} of pi_k against SFT, in % of prompts",
    "table2": "Table 2: per arm, best_round (highest mean gold difference against SFT over all seeds) and its "
              "comparison against sft, vanilla_ppo/step<all rounds> and dpo",
    "table3": "Table 3: per response set (raw_data, then each policy) self_bleu (mean of n = 2..5), "
              "self_bleu_2 .. self_bleu_5, distinct_1, distinct_2",
    "rounds": "Figures 4 and 5: per arm, per round {round, rm, vanilla, ppo_gold}: rm (that arm's RM) and vanilla "
              "hold eval/accuracy and eval/margin (held-out pairs) and, on the samples of the policy the round "
              "starts from, shift/J, shift/dr_var, shift/dr_mean_abs, shift/dr_near_zero, shift/dr_hist, "
              "shift/gold_agreement, shift/gold_pairs; ppo_gold: the gold score per step of the round's PPO",
    "figure1": "Figure 1: per PPO run (vanilla_ppo, <arm>/round<k>), [step, variance of same-prompt reward differences]",
    "figure4": "Figure 4: per RM (vanilla, <arm>/round<k>), [step, held-out accuracy] during training",
    "ppo_curves": "per PPO run, gold and score: [step, mean gold score / RM score of the roll-outs]",
}
ROUND_RM_FIELDS = ("eval/accuracy", "eval/margin", "shift/J", "shift/dr_var", "shift/dr_mean_abs",
                   "shift/dr_near_zero", "shift/dr_hist", "shift/gold_agreement", "shift/gold_pairs")

# ---------------------------------------------------------------------------------------------
# Metrics, each small enough to check by hand
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
# What makes a seed's evaluation: iterate.sh's aggregation refuses seeds evaluated otherwise.
EVAL_SETTINGS = ("rounds", "arms", "n_prompts", "judge", "tie_margin", "temperature", "top_p", "repetition_penalty",
                 "max_new_tokens", "seed", "skip_bad_rows")
EVAL_FILES = ("prompts", "pairs", "raw_pairs")  # by content: the same task's files agree wherever they lie


def eval_settings(args):
    out = {k: getattr(args, k) for k in EVAL_SETTINGS}
    for k in EVAL_FILES:
        path = getattr(args, k)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[k] = "sha256:" + hashlib.sha256(f.read()).hexdigest()
        else:  # a hub data set's name
            out[k] = path
    return out


def fingerprint(folder):
    """What identifies a saved policy without reading its weights: its DONE marker's text and
    its weight files' sizes and modification times."""
    parts = []
    for name in sorted(os.listdir(folder)):
        if name == "DONE" or name.endswith(".safetensors"):
            st = os.stat(os.path.join(folder, name))
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
            if name == "DONE":
                with open(os.path.join(folder, name), "rb") as f:
                    parts.append(hashlib.sha256(f.read()).hexdigest())
    return parts


def cache_name(eval_dir, name, policy_dir, prompts, args):
    """<eval_dir>/<name>.<key>.jsonl: the key hashes everything the responses depend on (the
    policy, the prompts, the sampling settings), so a changed one is a new file, never a stale one."""
    key = json.dumps({"policy": fingerprint(policy_dir), "prompts": prompts,
                      "sampling": [args.seed, args.temperature, args.top_p, args.repetition_penalty, args.max_new_tokens]})
    return os.path.join(eval_dir, f"{name.replace('/', '__')}.{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsonl")


def responses(policy_dir, prompts, args, cache, d):
    """One response per prompt from a policy, sampled with a fixed seed; cached as JSON lines
    (under a name that holds the cache's key: cache_name)."""
    if os.path.exists(cache):
        with open(cache) as f:
            return [json.loads(line)["response"] for line in f]
    torch.manual_seed(args.seed)
    tok = loading.load_tokenizer(policy_dir)
    model = loading.load_causal_lm(policy_dir, tok).to(d.device).eval()
    max_len, truncate = trained_lengths(policy_dir, tok, "max_prompt_len")
    ids = data.encode_prompts(tok, prompts, max_len, truncate, args.prompts)
    out = []
    for i in range(0, len(prompts), 64):
        out += data.decode_responses(tok, sample.generate(model, tok, ids[i:i + 64], args, d))
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
            self.tok = loading.load_tokenizer(name)
            self.model = loading.load_reward_model(name, self.tok).to(d.device).eval()
            self.max_len = trained_lengths(name, self.tok)[0]

    def __call__(self, prompts, texts):
        if self.name == "gold":
            return measure.gold_scores(prompts, texts)
        enc = data.Encoder(self.tok, self.max_len, truncate=True)  # judge every response, cut to fit
        seqs = [sum(enc(p, t, f"{self.name}: test prompt {i + 1}"), []) for i, (p, t) in enumerate(zip(prompts, texts))]
        return measure.score_sequences(self.model, seqs, self.tok.pad_token_id, self.d).tolist()


def trained_lengths(folder, tok, key="max_len"):
    """(max length, truncate) of the stage that wrote a model folder, from its args.json (a PPO
    snapshot, <run>/step<N>, reads its run's): a model is measured on what it was trained to read.
    key: "max_prompt_len" for a policy's prompts (PPO, sample.py), else the whole sequence ("max_len":
    SFT, DPO, every reward model). A model from elsewhere: its tokenizer's limit, cutting."""
    for path in (folder, os.path.dirname(folder.rstrip("/"))):
        f = os.path.join(path, "args.json")
        if os.path.isfile(f):
            args = cli.read_json(f)
            if key in args or "max_len" in args:
                return args.get(key, args.get("max_len")), bool(args.get("truncate", False))
    limit = tok.model_max_length if 0 < tok.model_max_length < 10**6 else 10**6
    return limit, True


def rm_on_samples(rm_dir, meta_files, pairs, d):
    """A reward model, loaded once, on the held-out pairs (accuracy, margin) and on each meta-data
    file (samples of a policy, e.g. the one it will steer): J (Eq. 2), |dr| statistics, gold
    agreement. One result per file."""
    tok = loading.load_tokenizer(rm_dir)
    model = loading.load_reward_model(rm_dir, tok).to(d.device).eval()
    max_len, truncate = trained_lengths(rm_dir, tok)
    accuracy = measure.preference_accuracy(model, data.encode_pairs(tok, pairs, max_len, truncate), tok.pad_token_id, d)
    results = []
    for meta_file in meta_files:
        out = dict(accuracy)
        if meta_file:
            meta = data.load_meta(meta_file)
            r = measure.score_samples(model, data.encode_meta(tok, meta, max_len), tok.pad_token_id, d)
            out["shift/J"] = float(metarm.difference_loss(r))
            out.update(measure.shift(r, meta if measure.gold_applies([p for p, _, _ in meta]) else None))
        results.append(out)
    return results


def meta_file(run, arm, k):
    """Round k's meta data: the SFT samples in round 1 (shared by every arm), then pi_{k-1}'s."""
    return f"{run}/sft_samples/meta.jsonl" if k == 1 else f"{run}/{arm}/round{k}/samples/meta.jsonl"


def curve(run_dir, key):
    """[(step, value)] of one metric from a stage's metrics.jsonl."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [(r["step"], r[key]) for r in map(json.loads, f) if key in r]




# ---------------------------------------------------------------------------------------------
# Paired statistics: hierarchical bootstrap over seeds and prompts
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)  # pure, and asked for the same (q, df) by every comparison
def t_quantile(q, df):
    """The q-quantile of Student's t with df degrees of freedom (df = inf: the normal), by
    bisection on the CDF, itself a Simpson integral of the density (numpy has no t quantile)."""
    if math.isinf(df):
        return t_quantile(q, 1e7)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = lambda u: math.exp(log_c - (df + 1) / 2 * math.log1p(u * u / df))

    def cdf(t, n=2000):
        h = t / n
        s = density(0) + density(t) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, n))
        return 0.5 + s * h / 3
    lo, hi = 0.0, 1e3
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return (lo + hi) / 2


def hierarchical_bootstrap(x, n_boot=2000, seed=0):
    """Mean of x [seeds, prompts] (paired differences, one per seed and prompt) and its 95%
    interval. The standard error comes from a hierarchical bootstrap: resample seeds with
    replacement, then prompts with replacement within each drawn seed, and take the grand mean.
    A percentile interval from a handful of seeds covers far less than 95% (resampling S seeds
    underestimates the seed-to-seed variance by (S-1)/S, and the normal quantile is too small),
    so the interval is mean +- t_{S-1} * se with that variance corrected; with one seed it is
    over prompts only (normal quantile). tests/test_evaluate.py measures the coverage."""
    x = np.asarray(x, dtype=float)
    S, P = x.shape
    rng = np.random.default_rng(seed)
    s = rng.integers(0, S, (n_boot, S))
    p = rng.integers(0, P, (n_boot, S, P))
    means = x[s[:, :, None], p].mean(axis=(1, 2))
    se = float(means.std()) * (math.sqrt(S / (S - 1)) if S > 1 else 1.0)
    t = t_quantile(0.975, S - 1 if S > 1 else math.inf)
    m = float(x.mean())
    return {"mean": m, "lo": m - t * se, "hi": m + t * se, "se": se}


POWER_Z = 0.8416  # the 80% quantile of the normal: detectable effects are quoted at 80% power


def verdict(interval, n_seeds, what="gold", words=("better", "worse"), digits=2):
    """better / worse / no detectable difference, from a 95% interval of a paired difference,
    with the smallest difference this design detects with 80% power, (t_{S-1} + z_0.8) * se."""
    if n_seeds < 2:
        return "one seed: no verdict across seeds is possible"
    t = t_quantile(0.975, n_seeds - 1)
    detectable = (t + POWER_Z) * interval["se"]
    if interval["lo"] > 0:
        return words[0]
    if interval["hi"] < 0:
        return words[1]
    return f"no detectable difference (this run detects |{what} difference| >= {detectable:.{digits}f} at 80% power)"


def seed_interval(values):
    """Mean of one number per seed and its 95% t-interval (a number measured once per seed, such
    as an RM's gold agreement on a round's samples, has no prompt level to resample)."""
    x = np.asarray(values, dtype=float)
    m, S = float(x.mean()), len(x)
    if S < 2:
        return {"mean": m, "lo": m, "hi": m, "se": 0.0}
    se = float(x.std(ddof=1)) / math.sqrt(S)
    t = t_quantile(0.975, S - 1)
    return {"mean": m, "lo": m - t * se, "hi": m + t * se, "se": se}


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


# ---------------------------------------------------------------------------------------------
# One seed: sample, judge, measure
# ---------------------------------------------------------------------------------------------
def base(arm):
    return arm.split("+")[0]


def args_of(path):
    """The args.json of a finished stage's folder (evaluate.py reads finished seeds only)."""
    if not run_folder.is_done(path):
        raise cli.UserError(f"{path} is not done (no DONE marker): run iterate.sh for this seed to finish it "
                                "before evaluating it")
    return cli.read_json(os.path.join(path, "args.json"))


def policy_dirs(run, arms, R):
    """Every policy of a run, by name: sft, vanilla_ppo/step<N> (after k rounds' worth of steps),
    dpo, <arm>/round<k>."""
    total = args_of(f"{run}/ppo_vanilla")["steps"]
    steps = total // R
    out = {"sft": f"{run}/sft"}
    for k in range(1, R + 1):
        out[f"vanilla_ppo/step{k * steps}"] = f"{run}/ppo_vanilla" if k * steps == total else f"{run}/ppo_vanilla/step{k * steps}"
    for arm in arms:
        if base(arm) == "dpo":
            out["dpo"] = f"{run}/dpo"
        else:
            out.update({f"{arm}/round{k}": f"{run}/{arm}/round{k}/ppo" for k in range(1, R + 1)})
    return out, steps


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


def rm_dir(run, arm, k):
    """The reward model that steered an arm's round-k PPO (vanilla and bilevel: one for all rounds)."""
    return {"vanilla": f"{run}/rm", "bilevel": f"{run}/bilevel_rm"}.get(base(arm), f"{run}/{arm}/round{k}/rm")


def arm_settings(run, arm):
    """What matters of an arm's settings, read from its stages' args.json."""
    if base(arm) == "dpo":
        a = args_of(f"{run}/dpo")
        return {"beta": a["beta"], "lr": a["lr"], "epochs": a["epochs"]}
    ppo = args_of(f"{run}/{arm}/round1/ppo")
    out = {"kl_anchor": "sft" if ppo.get("ref_dir") else "prev", "ppo_steps": ppo["steps"], "kl_coef": ppo["kl_coef"],
           "policy_lr": ppo["policy_lr"]}
    if base(arm) == "metarm":
        m = args_of(f"{run}/{arm}/round1/rm")
        out.update({"meta_grad": m["meta_grad"], "eta": m["eta"], "alpha": m["lr"], "deploy": m["deploy"],
                    "meta_batch": m["meta_batch"], "epochs": m["epochs"]})
    if base(arm) == "bilevel":
        m = args_of(f"{run}/bilevel_rm")
        out.update({k: m[k] for k in ("beta", "inner_lr", "inner_steps", "steps", "lr", "tasks_per_step")})
    if base(arm) == "oracle":
        args_of(f"{run}/{arm}/round1/rm")  # done: its pairs are complete
        with open(f"{run}/{arm}/round1/new_pairs.jsonl") as f:
            out["new_pairs_per_round"] = sum(1 for _ in f)
    return out


def evaluate(args, d):
    R, run, arms = args.rounds, args.run_dir, args.arms.split()
    if not os.path.isdir(run):
        raise cli.UserError(f"--run_dir {run} does not exist: one seed's run folder, as iterate.sh lays it out "
                                "(e.g. runs/default/seed1)")
    prompts = [p for p, _ in data.load_prompts(args.prompts, args.skip_bad_rows)][:args.n_prompts]
    if args.judge == "gold" and not measure.gold_applies(prompts):
        raise cli.UserError(f"the gold judge only knows the embedded task, and {args.prompts} holds other "
                                "prompts: pass --judge <a reward-model folder> (iterate.sh: JUDGE=...)")
    policies, steps = policy_dirs(run, arms, R)
    judge = Judge(args.judge, d)
    texts, scores, empty = {}, {}, {}
    for name, path in cli.progress(policies.items(), d, desc="evaluate", total=len(policies)):
        texts[name] = responses(path, prompts, args, cache_name(f"{run}/eval", name, path, prompts, args), d)
        scores[name] = judge(prompts, texts[name])
        empty[name] = [not t.strip() for t in texts[name]]

    res = {"config": {"rounds": R, "arms": arms, "ppo_steps": steps, "prompts": len(prompts), "judge": args.judge,
                      "eval_settings": eval_settings(args),
                      "tie_margin": args.tie_margin, "precision": d.precision_why, "settings": {a: arm_settings(run, a) for a in arms}},
           "judge_mean": {k: sum(v) / len(v) for k, v in scores.items()}, "scores": scores, "empty": empty}
    wtl = lambda a, b: win_tie_lose(scores[a], scores[b], args.tie_margin, empty[a], empty[b])
    round_arms = [a for a in arms if base(a) != "dpo"]
    res["table1"] = {a: [{"round": k, **wtl(f"{a}/round{k}", "sft")} for k in range(1, R + 1)] for a in round_arms}
    raw = [w for _, w, _, _ in data.load_pairs(args.raw_pairs, args.skip_bad_rows)][:len(prompts)]
    res["table3"] = {"raw_data": diversity(raw), **{k: diversity(v) for k, v in texts.items()}}

    pairs = data.load_pairs(args.pairs, args.skip_bad_rows)
    needed = collections.defaultdict(list)  # RM -> the samples it is measured on, each pair once
    for a in round_arms:
        for k in range(1, R + 1):
            for rm in (f"{run}/rm", rm_dir(run, a, k)):
                if meta_file(run, a, k) not in needed[rm]:
                    needed[rm].append(meta_file(run, a, k))
    measured = {(rm, m): out for rm, metas in needed.items()  # one RM in memory at a time
                for m, out in zip(metas, rm_on_samples(rm, metas, pairs, d))}
    res["rounds"] = {}
    for a in round_arms:
        res["rounds"][a] = []
        for k in range(1, R + 1):
            meta = meta_file(run, a, k)
            vanilla, mine = measured[f"{run}/rm", meta], measured[rm_dir(run, a, k), meta]
            res["rounds"][a].append({"round": k, "rm": mine, "vanilla": vanilla,
                                     "ppo_gold": [v for _, v in curve(f"{run}/{a}/round{k}/ppo", "objective/gold")]})
    ppo_runs = {"vanilla_ppo": f"{run}/ppo_vanilla",
                **{f"{a}/round{k}": f"{run}/{a}/round{k}/ppo" for a in round_arms for k in range(1, R + 1)}}
    res["figure1"] = {name: curve(p, "shift/dr_var") for name, p in ppo_runs.items()}
    res["figure4"] = {"vanilla": curve(f"{run}/rm", "eval/accuracy"),
                      **{f"{a}/round{k}": curve(rm_dir(run, a, k), "eval/accuracy")
                         for a in round_arms if base(a) != "vanilla" for k in range(1, R + 1)}}
    res["ppo_curves"] = {name: {"gold": curve(p, "objective/gold"), "score": curve(p, "objective/scores")}
                         for name, p in ppo_runs.items()}
    return res


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


def check_evaluated_alike(path, result, args):
    """A seed's results.json was made with the evaluation settings the aggregation is given (a
    hand-run evaluate.py with others would otherwise be pooled without a word)."""
    before = (result.get("config") or {}).get("eval_settings") if isinstance(result, dict) else None
    if not isinstance(before, dict):
        raise cli.UserError(f"{path} records no evaluation settings (damaged, or written by an older "
                                "evaluate.py): delete its eval folder and run iterate.sh again to re-evaluate it")
    now = {k: v for k, v in eval_settings(args).items() if k not in ("rounds", "arms")}  # report() checks those
    diff = run_folder.differences(before, now)
    if diff:
        raise cli.UserError(f"{path} was evaluated with other settings ({diff} (that seed -> this report)): "
                                f"delete {os.path.dirname(path)} and run iterate.sh again, or aggregate with that "
                                "seed's settings")


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
             "(seeds, then prompts within a seed; see evaluate.hierarchical_bootstrap).", ""]
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


def main(argv=None):
    args = cli.parse_args(Args, __doc__, argv)
    d = distributed.init_distributed(precision=args.precision,  # --aggregate runs no model
                                 model=args.measure or (None if args.aggregate else os.path.join(args.run_dir, "sft")))
    if args.measure:
        pairs = data.load_pairs(args.pairs, args.skip_bad_rows) if args.pairs else []
        [out] = rm_on_samples(args.measure, [args.samples], pairs, d)
        if pairs and measure.gold_applies([p for p, _, _, _ in pairs]):
            out["eval/label_ceiling"] = measure.label_ceiling(pairs)
        d.print(json.dumps(out, indent=2))
        return
    if args.aggregate:
        seeds = args.seeds.split()
        results = []
        for s in seeds:
            path = os.path.join(args.aggregate, f"seed{s}", "eval", "results.json")
            if not os.path.exists(path):
                raise cli.UserError(f"{path} does not exist: evaluate seed {s} first (iterate.sh does)")
            results.append(cli.read_json(path))
            check_evaluated_alike(path, results[-1], args)
        res = report(results, seeds, args.n_boot, args.arms.split())
        out = args.out_dir or args.aggregate
        os.makedirs(out, exist_ok=True)
        save(res, out)
        figures(res, results[0], out)
        print(markdown(res))
        return
    if args.n_prompts < 100:
        d.print(f"note: {args.n_prompts} test prompts; the paper uses 100")
    res = evaluate(args, d)
    arms = res["config"]["arms"]
    out = os.path.join(args.run_dir, "eval")
    seed = os.path.basename(args.run_dir.rstrip("/")).removeprefix("seed")
    rep = report([res], [seed], args.n_boot, arms)  # this seed's intervals: over prompts only
    save({**res, **{k: rep[k] for k in ("config", "gold", "comparisons", "rm_comparisons", "table2")}}, out)
    with open(os.path.join(out, "DONE.tmp"), "w") as f:
        json.dump({"stage": "evaluate", "judge_mean": res["judge_mean"], "settings": eval_settings(args)}, f)
    os.replace(os.path.join(out, "DONE.tmp"), os.path.join(out, "DONE"))
    print(json.dumps({"stage": "evaluate", "judge_mean": res["judge_mean"]}))


if __name__ == "__main__":
    cli.guard(main)
