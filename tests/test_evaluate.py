"""evaluate.py: win/tie/lose, Self-BLEU and distinct-n against hand-computed values."""
import collections
import math
import random

import pytest

import diversity
import evaluate as ev
import report
import significance
from conftest import ROOT  # noqa: F401


def test_win_tie_lose_by_hand():
    a = [2.0, 1.0, 0.5, 0.0, 1.0, 5.0]
    b = [1.0, 1.05, 0.9, 0.0, 3.0, -1.0]
    empty_a = [False, False, False, True, False, True]
    empty_b = [False, False, False, True, True, False]
    # win (2 > 1), tie (|1 - 1.05| < 0.1), lose, tie (both empty), win (b empty), lose (a empty)
    got = report.win_tie_lose(a, b, 0.1, empty_a, empty_b)
    assert got == pytest.approx({"win": 100 * 2 / 6, "tie": 100 * 2 / 6, "lose": 100 * 2 / 6})
    assert report.win_tie_lose([1.0, 2.0], [0.0, 2.05], 0.1) == {"win": 50.0, "tie": 50.0, "lose": 0.0}


def test_self_bleu_and_distinct_by_hand():
    texts = ["the cat sat", "the cat ran", "a dog sat"]
    # BLEU-2 of each against the other two (p1, p2, brevity penalty 1):
    #   "the cat sat": p1 = 3/3, p2 = 1/2                 -> sqrt(1/2)
    #   "the cat ran": p1 = 2/3, p2 = 1/2                 -> sqrt(1/3)
    #   "a dog sat":   p1 = 1/3, p2 = 0 -> 0.1/2 (smoothed) -> sqrt(1/3 * 0.05)
    want = (math.sqrt(0.5) + math.sqrt(1 / 3) + math.sqrt(0.05 / 3)) / 3
    assert diversity.self_bleu(texts, 2) == pytest.approx(want, rel=1e-12)
    assert diversity.distinct(texts, 1) == pytest.approx(6 / 9)  # the, cat, sat twice; ran, a, dog once
    assert diversity.distinct(texts, 2) == pytest.approx(5 / 6)  # "the cat" twice


def slow_self_bleu(texts, max_n):
    """Self-BLEU the obvious way: each text against the list of all the others."""
    toks = [t.split() for t in texts]
    total = 0.0
    for i, hyp in enumerate(toks):
        refs = toks[:i] + toks[i + 1:]
        log_p = 0.0
        for n in range(1, max_n + 1):
            grams = collections.Counter(tuple(hyp[j:j + n]) for j in range(len(hyp) - n + 1))
            clipped = 0
            for g, c in grams.items():
                best = max(sum(1 for j in range(len(r) - n + 1) if tuple(r[j:j + n]) == g) for r in refs)
                clipped += min(c, best)
            log_p += math.log((clipped or 0.1) / max(1, sum(grams.values()))) / max_n
        r = min(refs, key=lambda x: (abs(len(x) - len(hyp)), len(x)))
        bp = 1.0 if len(hyp) > len(r) else math.exp(1 - len(r) / max(len(hyp), 1))
        total += bp * math.exp(log_p)
    return total / len(toks)


def test_self_bleu_against_the_obvious_loop():
    rng = random.Random(0)
    words = "a b c the cat sat on mat dog ran".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 10))) for _ in range(25)]
    for n in (2, 3, 4, 5):
        assert diversity.self_bleu(texts, n) == pytest.approx(slow_self_bleu(texts, n), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Paired statistics
# ---------------------------------------------------------------------------------------------
def test_t_quantiles_against_the_table():
    for df, want in ((1, 12.7062), (3, 3.18245), (7, 2.36462), (15, 2.13145), (math.inf, 1.95996)):
        assert significance.t_quantile(0.975, df) == pytest.approx(want, rel=2e-4)


def nested(rng, S, P, diff, seed_sd=0.3, prompt_sd=1.0):
    """Paired differences with a known mean: a seed effect, then per-prompt noise within the seed."""
    return diff + rng.normal(0, seed_sd, (S, 1)) + rng.normal(0, prompt_sd, (S, P))


def test_bootstrap_interval_covers_the_true_difference_95_percent_of_the_time():
    import numpy as np
    rng = np.random.default_rng(0)
    for S in (4, 8):
        reps, hits = 300, 0
        for r in range(reps):
            ci = significance.hierarchical_bootstrap(nested(rng, S, 40, 0.2), n_boot=400, seed=r)
            hits += ci["lo"] <= 0.2 <= ci["hi"]
        assert 0.92 <= hits / reps <= 0.99, (S, hits / reps)


def test_bootstrap_interval_shrinks_with_more_seeds():
    import numpy as np
    rng = np.random.default_rng(1)
    width = {S: np.mean([(lambda c: c["hi"] - c["lo"])(significance.hierarchical_bootstrap(nested(rng, S, 40, 0.0), n_boot=300, seed=r))
                         for r in range(40)]) for S in (4, 16)}
    assert width[16] < 0.5 * width[4]


def test_bootstrap_with_one_seed_is_over_prompts():
    import numpy as np
    x = np.random.default_rng(2).normal(1.0, 2.0, (1, 400))
    ci = significance.hierarchical_bootstrap(x, n_boot=4000)
    se = x.std() / math.sqrt(400)
    assert ci["mean"] == pytest.approx(x.mean())
    assert ci["se"] == pytest.approx(se, rel=0.06)
    assert ci["hi"] - ci["mean"] == pytest.approx(1.95996 * ci["se"], rel=1e-3)


def test_verdict_by_hand():
    t7 = significance.t_quantile(0.975, 7)
    assert significance.verdict({"lo": 0.1, "hi": 0.5, "se": 0.1}, 8) == "better"
    assert significance.verdict({"lo": -0.5, "hi": -0.01, "se": 0.1}, 8) == "worse"
    v = significance.verdict({"lo": -0.2, "hi": 0.3, "se": 0.1}, 8)
    assert v.startswith("no detectable difference") and f"{(t7 + 0.8416) * 0.1:.2f}" in v  # 0.32
    assert significance.verdict({"lo": 0.1, "hi": 0.5, "se": 0.1}, 1).startswith("one seed")


def test_compare_by_hand():
    # two seeds, three prompts; a beats b by 1.0, ties (|0.05| < 0.1), loses by 0.5 / wins, wins, ties
    scores = {"a": [[1.0, 0.05, 0.0], [2.0, 1.0, 0.0]], "b": [[0.0, 0.0, 0.5], [1.0, 0.0, 0.0]]}
    empty = {"a": [[False] * 3] * 2, "b": [[False] * 3] * 2}
    c = report.compare(scores, empty, "a", "b", 0.1, n_boot=200)
    assert c["gold_diff"]["mean"] == pytest.approx((1.0 + 0.05 - 0.5 + 1.0 + 1.0 + 0.0) / 6)
    assert c["per_seed_gold_diff"] == pytest.approx([0.55 / 3, 2.0 / 3])
    assert (c["win"], c["tie"], c["lose"]) == pytest.approx((100 * 3 / 6, 100 * 2 / 6, 100 * 1 / 6))
    assert c["win_minus_lose"]["mean"] == pytest.approx(100 * 2 / 6)
    assert (c["seeds"], c["prompts"]) == (2, 3)


def test_win_minus_lose_interval_stays_within_100_percent():
    """Two seeds, a wins every prompt but one: mean +- t_1 * se would pass +100%."""
    scores = {"a": [[1.0] * 4, [1.0, 1.0, 1.0, 0.0]], "b": [[0.0] * 4, [0.0, 0.0, 0.0, 0.5]]}
    empty = {"a": [[False] * 4] * 2, "b": [[False] * 4] * 2}
    c = report.compare(scores, empty, "a", "b", 0.1, n_boot=400)
    w = c["win_minus_lose"]
    assert w["mean"] == pytest.approx(100 * 6 / 8) and w["hi"] == 100.0 and -100.0 <= w["lo"] < w["mean"]
    assert w["mean"] + significance.t_quantile(0.975, 1) * w["se"] > 100  # the cut was needed


def test_comparison_plan_pairs_modified_arms_with_their_controls():
    plan = report.comparison_plan(["metarm", "vanilla", "vanilla+anchor=sft", "metarm+anchor=sft"], 2, 20)
    assert len(plan) == len(set(plan))
    want = {("metarm+anchor=sft/round2", "metarm/round2"),             # what the SFT anchor changes
            ("metarm+anchor=sft/round2", "vanilla+anchor=sft/round2"),  # the meta-step under it
            ("vanilla+anchor=sft/round1", "vanilla/round1"), ("metarm/round2", "vanilla/round2"),
            ("metarm/round2", "metarm/round1"), ("vanilla_ppo/step40", "sft")}
    assert want <= set(plan)
    assert ("metarm/round1", "vanilla+anchor=sft/round1") not in plan


def test_reward_models_are_measured_at_their_own_lengths(micro, micro_rm, tmp_path):
    """rm_on_samples reads the RM's max_len and truncate from its args.json: a held-out pair longer
    than that is cut when the RM was trained cutting, and is one error naming the limit when it was
    not; the same pairs at a limit that holds them give the same accuracy as the trained run's."""
    import json
    import shutil

    import data
    import distributed
    pairs = data.load_pairs(f"{micro['data']}/pairs_test.jsonl")
    d = distributed.Dist()
    [as_trained] = ev.rm_on_samples(micro_rm, [""], pairs, d)
    rm = tmp_path / "rm"
    shutil.copytree(micro_rm, rm)
    args = json.loads((rm / "args.json").read_text())
    for max_len, truncate in ((16, False), (16, True)):
        (rm / "args.json").write_text(json.dumps({**args, "max_len": max_len, "truncate": truncate}))
        assert ev.trained_lengths(str(rm), None) == (max_len, truncate)
        if not truncate:
            with pytest.raises(data.DataError, match="more than --max_len 16"):
                ev.rm_on_samples(str(rm), [""], pairs, d)
        else:
            [cut] = ev.rm_on_samples(str(rm), [""], pairs, d)
            assert cut["eval/accuracy"] != as_trained["eval/accuracy"] or cut["eval/margin"] != as_trained["eval/margin"]
    (rm / "args.json").write_text(json.dumps({**args, "max_len": 4096}))
    [wide] = ev.rm_on_samples(str(rm), [""], pairs, d)
    assert wide == as_trained
    snapshot = rm / "step2"  # a PPO snapshot reads its run's args.json
    snapshot.mkdir()
    assert ev.trained_lengths(str(snapshot), None) == (4096, args["truncate"])


def test_cached_responses_are_keyed_by_what_made_them(micro_sft, tmp_path):
    """The cache's name changes with the policy (its DONE, its weights), the prompts and every
    sampling setting, and with nothing else."""
    import json
    import os
    import shutil
    import types
    policy = shutil.copytree(micro_sft, tmp_path / "policy")
    args = types.SimpleNamespace(seed=1, temperature=1.0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=8)
    name = lambda prompts=("a", "b"), **kw: ev.cache_name(str(tmp_path / "eval"), "sft", str(policy), list(prompts),
                                                          types.SimpleNamespace(**{**vars(args), **kw}))
    first = name()
    assert name() == first and os.path.dirname(first) == str(tmp_path / "eval")
    changed = [name(prompts=("a",)), name(prompts=("a", "c")), name(temperature=0.7), name(top_p=0.9), name(seed=2),
               name(repetition_penalty=1.1), name(max_new_tokens=9)]
    assert first not in changed and len(set(changed)) == len(changed)
    done = json.loads((policy / "DONE").read_text())
    (policy / "DONE").write_text(json.dumps({**done, "steps": 99}))
    assert name() != first
    again = name()
    os.utime(policy / "model.safetensors", ns=(1, 1))  # other weights in the same place
    assert name() != again
