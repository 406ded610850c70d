"""evaluate.py: the evaluation of one seed of an iterated-RLHF run (what iterate.sh calls last),
and the command that pools several seeds into one report.

One seed's run folder is read through its record of what each folder is, layout.jsonl, which
iterate.sh writes (read_layout: the policies sft, vanilla_ppo/step<N>, dpo, <arm>/round<k>, and
for each the folder of its weights, its PPO log, the reward model that steered it and the
samples of its round):
  * every policy answers the same held-out test prompts (one sampled response each, with the
    same sampling seed, cached in eval/); a judge scores the responses: the gold judge on the
    embedded task, or any Hugging Face reward model given by path on real data;
  * diversity of the responses (diversity.py: the paper's Table 3);
  * per arm and round, that arm's reward model and the vanilla RM on the samples of the policy
    they are about to steer (Figure 5: |dr| variance, share near zero, gold agreement, J) and
    their held-out accuracy (Figure 4);
  * from the PPO logs, the variance of same-prompt reward differences per step (Figure 1).
Writes eval/results.json and eval/results.md in the seed's folder with report.py (win / tie /
lose, the paired comparisons and their verdicts); --aggregate pools several seeds' results:
numbers as mean +- standard deviation over seeds, comparisons over (seed, prompt). With
matplotlib installed it also draws figure1/4/5.png and gold_per_round.png.

    python evaluate.py --run_dir runs/default/seed1 --rounds 3 --arms "metarm vanilla"
    python evaluate.py --aggregate runs/default --seeds "1 2 3" --rounds 3 --arms "metarm vanilla"
    python evaluate.py --measure runs/default/seed1/rm --samples runs/default/seed1/sft_samples/meta.jsonl
"""
import collections
import dataclasses
import hashlib
import json
import os

import torch

import cli
import data
import distributed
import loading
import measure
import modeling
import report
import run_folder
from cli import arg
from diversity import diversity
from report import base


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
# The seed's record: what each folder is (iterate.sh writes it, evaluate.py only reads it)
# ---------------------------------------------------------------------------------------------
LAYOUT_FOLDERS = ("policy", "log", "rm", "samples", "new_pairs")  # fields that name a folder or file


def read_layout(run):
    """<run>/layout.jsonl -> {name: entry}, the folders joined to `run`. A line per policy or RM:
      name      sft | vanilla_rm | vanilla_ppo/step<N> | dpo | <arm>/round<k>
      policy    the folder of its weights (vanilla_rm: rm, its reward model)
      log       the PPO run whose metrics.jsonl holds its training: its first `steps` steps
      rm        the reward model that steered that PPO; samples: its round's meta data (the
                samples of the policy the round starts from), on which the RMs are measured
      arm, round, kl_anchor; new_pairs (the oracle's labels of the round)
    The vanilla arm's round 1 is vanilla PPO's snapshot after as many steps: the same run."""
    path = os.path.join(run, "layout.jsonl")
    if not os.path.isfile(path):
        raise cli.UserError(f"{path} does not exist: iterate.sh writes this record of the seed's folders before "
                            "it evaluates the seed; run iterate.sh for it")
    out = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            try:
                e = json.loads(line)
            except (ValueError, RecursionError):
                e = None
            if not (isinstance(e, dict) and isinstance(e.get("name"), str)
                    and all(isinstance(e[k], str) for k in LAYOUT_FOLDERS if k in e)):
                raise cli.UserError(f"{path}, line {i}: not the record of one folder (damaged): run iterate.sh for "
                                    "this seed again to rewrite it")
            out[e["name"]] = {k: os.path.join(run, v) if k in LAYOUT_FOLDERS else v for k, v in e.items()}
    return out


def entry(layout, name, run):
    """The record of `name`, whose stages have all finished (evaluate.py reads finished seeds only)."""
    if name not in layout:
        raise cli.UserError(f"{run}/layout.jsonl has no {name}: the seed was run with other arms or rounds; run "
                            "iterate.sh for it with the settings evaluated here")
    for k in ("policy", "log", "rm"):
        if k in layout[name]:
            finished(layout[name][k])
    return layout[name]


def finished(path):
    """`path`, a stage's folder, if its DONE marker is there (evaluate.py reads finished seeds only)."""
    if not run_folder.is_done(path):
        raise cli.UserError(f"{path} is not done (no DONE marker): run iterate.sh for this seed to finish it "
                            "before evaluating it")
    return path


def args_of(path):
    """The args.json of a finished stage's folder."""
    return cli.read_json(os.path.join(finished(path), "args.json"))


def curve(e, key):
    """[(step, value)] of one metric over the PPO steps that made policy e (layout entry: its
    log's first e["steps"] steps), or over a stage's whole metrics.jsonl (a folder)."""
    folder, last = (e["log"], e["steps"]) if isinstance(e, dict) else (e, None)
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [(r["step"], r[key]) for r in map(json.loads, f) if key in r and (last is None or r["step"] <= last)]


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
        out += data.decode_responses(tok, modeling.generate(model, tok, ids[i:i + 64], args, d)[1])
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
            out["shift/J"] = float(measure.difference_loss(r))
            out.update(measure.shift(r, meta if measure.gold_applies([p for p, _, _ in meta]) else None))
        results.append(out)
    return results


# ---------------------------------------------------------------------------------------------
# One seed: every policy sampled and judged, every reward model measured
# ---------------------------------------------------------------------------------------------
def arm_settings(layout, arm, run):
    """What matters of an arm's settings, read from its stages' args.json (round 1's)."""
    if base(arm) == "dpo":
        a = args_of(entry(layout, "dpo", run)["policy"])
        return {"beta": a["beta"], "lr": a["lr"], "epochs": a["epochs"]}
    first = entry(layout, f"{arm}/round1", run)
    ppo = args_of(first["log"])
    out = {"kl_anchor": first["kl_anchor"], "ppo_steps": first["steps"], "kl_coef": ppo["kl_coef"],
           "policy_lr": ppo["policy_lr"]}
    if base(arm) == "metarm":
        m = args_of(first["rm"])
        out.update({"meta_grad": m["meta_grad"], "eta": m["eta"], "alpha": m["lr"], "deploy": m["deploy"],
                    "meta_batch": m["meta_batch"], "epochs": m["epochs"]})
    if base(arm) == "bilevel":
        m = args_of(first["rm"])
        out.update({k: m[k] for k in ("beta", "inner_lr", "inner_steps", "steps", "lr", "tasks_per_step")})
    if base(arm) == "oracle":
        args_of(first["rm"])  # done: its pairs are complete
        with open(first["new_pairs"]) as f:
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
    layout = read_layout(run)
    vanilla_ppo = sorted((e for e in layout.values() if e["name"].startswith("vanilla_ppo/")), key=lambda e: e["steps"])
    if len(vanilla_ppo) != R:
        raise cli.UserError(f"{run}/layout.jsonl records {len(vanilla_ppo)} rounds of vanilla PPO, not --rounds {R}: "
                            "evaluate the seed with the rounds it was run with")
    steps = vanilla_ppo[0]["steps"]
    round_arms = [a for a in arms if base(a) != "dpo"]
    names = ["sft", *(e["name"] for e in vanilla_ppo)]
    for a in arms:
        names += ["dpo"] if base(a) == "dpo" else [f"{a}/round{k}" for k in range(1, R + 1)]
    policies = {name: entry(layout, name, run) for name in names}
    judge = Judge(args.judge, d)
    texts, scores, empty, sampled = {}, {}, {}, {}
    for name, e in cli.progress(policies.items(), d, desc="evaluate", total=len(policies)):
        path = e["policy"]
        if path not in sampled:  # (the vanilla arm's round 1 is a vanilla PPO snapshot: one policy, two names)
            sampled[path] = responses(path, prompts, args, cache_name(f"{run}/eval", name, path, prompts, args), d)
        texts[name] = sampled[path]
        scores[name] = judge(prompts, texts[name])
        empty[name] = [not t.strip() for t in texts[name]]

    res = {"config": {"rounds": R, "arms": arms, "ppo_steps": steps, "prompts": len(prompts), "judge": args.judge,
                      "eval_settings": eval_settings(args), "tie_margin": args.tie_margin,
                      "precision": d.precision_why, "settings": {a: arm_settings(layout, a, run) for a in arms}},
           "judge_mean": {k: sum(v) / len(v) for k, v in scores.items()}, "scores": scores, "empty": empty}
    wtl = lambda a, b: report.win_tie_lose(scores[a], scores[b], args.tie_margin, empty[a], empty[b])
    res["table1"] = {a: [{"round": k, **wtl(f"{a}/round{k}", "sft")} for k in range(1, R + 1)] for a in round_arms}
    raw = [w for _, w, _, _ in data.load_pairs(args.raw_pairs, args.skip_bad_rows)][:len(prompts)]
    res["table3"] = {"raw_data": diversity(raw), **{k: diversity(v) for k, v in texts.items()}}

    pairs = data.load_pairs(args.pairs, args.skip_bad_rows)
    vanilla_rm = entry(layout, "vanilla_rm", run)["rm"]
    needed = collections.defaultdict(list)  # RM -> the samples it is measured on, each pair once
    for a in round_arms:
        for k in range(1, R + 1):
            e = policies[f"{a}/round{k}"]
            for rm in (vanilla_rm, e["rm"]):
                if e["samples"] not in needed[rm]:
                    needed[rm].append(e["samples"])
    measured = {(rm, m): out for rm, metas in needed.items()  # one RM in memory at a time
                for m, out in zip(metas, rm_on_samples(rm, metas, pairs, d))}
    res["rounds"] = {}
    for a in round_arms:
        res["rounds"][a] = []
        for k in range(1, R + 1):
            e = policies[f"{a}/round{k}"]
            res["rounds"][a].append({"round": k, "rm": measured[e["rm"], e["samples"]],
                                     "vanilla": measured[vanilla_rm, e["samples"]], "ppo_gold": [v for _, v in curve(e, "objective/gold")]})
    ppo_runs = {"vanilla_ppo": vanilla_ppo[-1], **{f"{a}/round{k}": policies[f"{a}/round{k}"] for a in round_arms for k in range(1, R + 1)}}
    res["figure1"] = {name: curve(e, "shift/dr_var") for name, e in ppo_runs.items()}
    res["figure4"] = {"vanilla": curve(vanilla_rm, "eval/accuracy"),
                      **{f"{a}/round{k}": curve(policies[f"{a}/round{k}"]["rm"], "eval/accuracy")
                         for a in round_arms if base(a) != "vanilla" for k in range(1, R + 1)}}
    res["ppo_curves"] = {name: {"gold": curve(e, "objective/gold"), "score": curve(e, "objective/scores")}
                         for name, e in ppo_runs.items()}
    return res


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
        res = report.report(results, seeds, args.n_boot, args.arms.split())
        out = args.out_dir or args.aggregate
        os.makedirs(out, exist_ok=True)
        report.save(res, out)
        report.figures(res, results[0], out)
        print(report.markdown(res))
        return
    if args.n_prompts < 100:
        d.print(f"note: {args.n_prompts} test prompts; the paper uses 100")
    res = evaluate(args, d)
    arms = res["config"]["arms"]
    out = os.path.join(args.run_dir, "eval")
    seed = os.path.basename(args.run_dir.rstrip("/")).removeprefix("seed")
    rep = report.report([res], [seed], args.n_boot, arms)  # this seed's intervals: over prompts only
    report.save({**res, **{k: rep[k] for k in ("config", "gold", "comparisons", "rm_comparisons", "table2")}}, out)
    with open(os.path.join(out, "DONE.tmp"), "w") as f:
        json.dump({"stage": "evaluate", "judge_mean": res["judge_mean"], "settings": eval_settings(args)}, f)
    os.replace(os.path.join(out, "DONE.tmp"), os.path.join(out, "DONE"))
    print(json.dumps({"stage": "evaluate", "judge_mean": res["judge_mean"]}))


if __name__ == "__main__":
    cli.guard(main)
