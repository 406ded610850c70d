"""The study's statistics (significance.py: Student's t, the paired t-test, Holm) and its eta grid
rule (studies/pretrained_rm.py), against hand computations."""
import json
import math
import os
import sys

import pytest

import significance
from conftest import ROOT  # noqa: F401

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "studies"))
import pretrained_rm as study  # noqa: E402


def test_t_cdf_against_closed_forms():
    assert significance.t_cdf(1.0, 1) == pytest.approx(0.5 + math.atan(1.0) / math.pi, abs=1e-9)  # Cauchy
    for t in (-2.0, 0.3, 3.873):  # df = 3: 1/2 + (u / (1 + u^2) + atan u) / pi with u = t / sqrt 3
        u = t / math.sqrt(3)
        assert significance.t_cdf(t, 3) == pytest.approx(0.5 + (u / (1 + u * u) + math.atan(u)) / math.pi, abs=1e-9)
    assert significance.t_cdf(2.364624, 7) == pytest.approx(0.975, abs=1e-6)  # the tabled t_{0.975, 7}


def test_paired_t_by_hand():
    r = significance.paired_t([1.0, 2.0, 3.0, 4.0])
    se = math.sqrt(5 / 3) / 2  # sd of 1..4 is sqrt(5/3)
    u = (2.5 / se) / math.sqrt(3)
    assert r["mean"] == 2.5 and r["se"] == pytest.approx(se)
    assert r["p"] == pytest.approx(2 * (0.5 - (u / (1 + u * u) + math.atan(u)) / math.pi), abs=1e-9)
    assert r["lo"] == pytest.approx(2.5 - 3.182446 * se, abs=1e-5)  # t_{0.975, 3} = 3.1824
    assert significance.paired_t([0.0, 0.0, 0.0])["p"] == 1.0


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 -> x3, x2, x1 = 0.03, 0.06, 0.04 -> running max 0.03, 0.06, 0.06
    assert significance.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert significance.holm([0.5, 0.9]) == [1.0, 1.0]


def diagnostic(slope, noise=2.0):
    ratios = [1, 10, 100, 1000, 10000]
    return {"ratios": ratios, "end": {"noise": {"median": noise},
                                      "first_order": [{"change": {"median": slope * r}} for r in ratios]}}


def test_ratios_for_a_linear_change():
    # change = slope * r, noise 2: target t at r = t * 2 / slope
    assert study.ratios_for(diagnostic(2e-4)) == [100, 1000, 10000]
    assert study.ratios_for(diagnostic(6e-4)) == [30, 300, 3000]  # 33.3 -> one digit
    assert study.ratios_for(diagnostic(2e-7)) == [1e5, 1e6, 1e7]  # beyond the grid: extrapolated


def test_a_seed_is_measured_whole_on_one_build(tmp_path, monkeypatch):
    """A seed measured whole on one build of SFT and pi_1 (even an unrecorded one) is left alone; a
    seed left part-way on another build has those measurements moved aside and every arm measured
    again on this one, so that its arms stay paired on one build."""
    trained = []
    monkeypatch.setattr(study, "stage", lambda script, *argv: trained.append(argv[argv.index("--output_dir") + 1]))
    monkeypatch.setattr(study, "measure", lambda rm, samples, out, b: open(out, "w").write(json.dumps({"build": b})))

    def seed(name, arms):
        (tmp_path / name / "measure").mkdir(parents=True)
        for arm, b in arms.items():
            (tmp_path / name / "measure" / f"{arm}.json").write_text(json.dumps({"x": 1, **({"build": b} if b else {})}))
    seed("seed1", {"vanilla": None, "eta1": None})   # whole, before builds were recorded
    seed("seed2", {"vanilla": "B", "eta1": None})    # part-way, on two builds
    for s in (1, 2):
        study.run_seed(str(tmp_path), s, [1.0], "B")
    assert [os.path.basename(t) for t in trained] == ["S", "H", "eta1"]  # seed 2's eta1 only
    assert sorted(os.listdir(tmp_path / "seed2" / "measure" / "superseded")) == ["eta1.json"]
    assert study.build_of(str(tmp_path / "seed2" / "measure" / "eta1.json")) == "B"
    assert not os.path.exists(tmp_path / "seed1" / "measure" / "superseded")


def diffs(gold, acc):
    """diffs as report() makes them, from {arm: (mean, p, p_holm)} per metric."""
    as_t = lambda d: {a: {"mean": m, "p": p, "p_holm": h} for a, (m, p, h) in d.items()}
    return {"shift/gold_agreement": as_t(gold), "eval/accuracy": as_t(acc)}


def test_the_confirmation_arm_follows_the_registered_rule():
    acc_fine = {"eta1": (0, .9, 1), "eta20": (0, .9, 1), "eta200": (0, .9, 1)}
    # two arms Holm-better: the one with the larger mean, whatever its p
    gain = study.confirmation_arm(diffs({"eta1": (.01, .001, .003), "eta20": (.03, .01, .02), "eta200": (.05, .2, .2)}, acc_fine))
    assert (gain["arm"], gain["rule"]) == ("eta20", "gain")
    # better but not after Holm, or significant but worse: the null; the largest eta whose accuracy is not lower
    null = {"eta1": (.01, .04, .12), "eta20": (-.02, .001, .003), "eta200": (.05, .2, .2)}
    acc = {"eta1": (0, .9, 1), "eta20": (.01, .01, .03), "eta200": (-.02, .04, .12)}
    c = study.confirmation_arm(diffs(null, acc))
    assert (c["arm"], c["rule"]) == ("eta20", "null")  # eta200's accuracy is lower at p = .04 (unadjusted)
    acc["eta200"] = (-.02, .06, .12)  # lower, but not significantly
    assert study.confirmation_arm(diffs(null, acc))["arm"] == "eta200"
    assert study.confirmation_arm(diffs(null, {a: (-.1, .001, .003) for a in null}))["arm"] is None


def test_the_report_by_hand(tmp_path):
    """Three seeds, vanilla and one MetaRM arm: the paired difference, its p, the detectable
    difference (t_{0.975, 2} + z_0.8) se and the confirmation arm, from the measurement files."""
    gold = {"vanilla": [0.50, 0.40, 0.45], "eta20": [0.52, 0.425, 0.465]}  # differences 0.02, 0.025, 0.015
    B = {"sft": "s", "pi_1": "p", "cpu": "c"}
    for s in (1, 2, 3):
        (tmp_path / f"seed{s}" / "measure").mkdir(parents=True)
        for arm, g in gold.items():
            m = {"shift/gold_agreement": g[s - 1], "eval/accuracy": 0.6, "shift/J": 0.4, "shift/dr_var": 0.1, "build": B}
            (tmp_path / f"seed{s}" / "measure" / f"{arm}.json").write_text(json.dumps(m))
    res, text = study.report(str(tmp_path), [1, 2, 3], [20.0])
    d = res["diffs"]["shift/gold_agreement"]["eta20"]
    se = 0.005 / math.sqrt(3)  # sd of 0.02, 0.025, 0.015 is 0.005
    u = (0.02 / se) / math.sqrt(2)  # df = 2: P(T <= t) = 1/2 + u / (2 sqrt(1 + u^2)) with u = t / sqrt 2
    assert d["mean"] == pytest.approx(0.02) and d["se"] == pytest.approx(se)
    assert d["p"] == pytest.approx(1 - u / math.sqrt(1 + u * u), abs=1e-9) and d["p_holm"] == d["p"]  # one arm
    assert d["detectable"] == pytest.approx((4.302653 + 0.8416) * se, rel=1e-5)  # the tabled t_{0.975, 2}
    assert res["confirmation"]["arm"] == "eta20" and res["confirmation"]["rule"] == "gain"  # p = 0.020
    assert res["per_seed"]["eta20"]["shift/gold_agreement"] == gold["eta20"]
    assert "| shift/gold_agreement | eta20 | +0.0200 [" in text and "confirmation seeds: eta20" in text
    assert res["builds"] == {"1 2 3": B} and "seeds 1 2 3: sft s, pi_1 p (c)" in text


def test_the_confirmation_verdict_follows_the_registered_rule(tmp_path):
    """After the null, the null is kept when the confirmation's interval contains zero; after a
    gain, the gain is confirmed only when its interval lies above zero. The confirmation report
    runs only the arm the primary report picked."""
    t = lambda lo, hi: {"mean": (lo + hi) / 2, "lo": lo, "hi": hi, "detectable": 0.01}
    assert study.confirmation_verdict(t(-0.007, 0.011), "null").startswith("the null is kept")
    assert study.confirmation_verdict(t(0.001, 0.02), "null").startswith("the null is not kept: MetaRM is better")
    assert study.confirmation_verdict(t(-0.02, -0.001), "null").startswith("the null is not kept: MetaRM is worse")
    assert study.confirmation_verdict(t(0.001, 0.02), "gain").startswith("the gain is confirmed")
    assert study.confirmation_verdict(t(-0.001, 0.02), "gain").startswith("the gain is not confirmed")
    for s in (4, 5, 6):  # gold differences -0.01, +0.01, +0.003: the interval holds zero
        (tmp_path / f"seed{s}" / "measure").mkdir(parents=True)
        for arm, g in (("vanilla", 0.5), ("eta2000", 0.5 + {4: -0.01, 5: 0.01, 6: 0.003}[s])):
            m = {"shift/gold_agreement": g, "eval/accuracy": 0.6, "shift/J": 0.4, "shift/dr_var": 0.1}
            (tmp_path / f"seed{s}" / "measure" / f"{arm}.json").write_text(json.dumps(m))
    primary = {"seeds": [1, 2, 3], "confirmation": {"arm": "eta2000", "rule": "null"}}
    res, text = study.report(str(tmp_path), [4, 5, 6], [2000.0], primary)
    assert res["confirms"]["verdict"].startswith("the null is kept") and "confirmation of eta2000" in text
    assert "confirmation" not in res  # the rule that picks an arm is the primary set's, not run here
    with pytest.raises(SystemExit, match="the confirmation runs the arm the primary report picked, eta2000"):
        study.report(str(tmp_path), [4, 5, 6], [200.0], primary)
    none = {"seeds": [1, 2, 3], "confirmation": {"arm": None, "rule": "null", "why": "every arm's accuracy is lower"}}
    with pytest.raises(SystemExit, match="the primary report picked no arm to confirm"):
        study.report(str(tmp_path), [4, 5, 6], [2000.0], none)


def test_the_figure_is_drawn(tmp_path):
    pytest.importorskip("matplotlib")  # optional: report prints the table without it
    res = {"seeds": [1, 2], "per_seed": {"vanilla": {m: [0.5, 0.4] for m in study.METRICS},
                                         "eta1": {m: [0.6, 0.45] for m in study.METRICS}},
           "diffs": {m: {"eta1": {"mean": 0.075, "lo": -0.2, "hi": 0.35, "p_holm": 0.3}} for m in study.METRICS}}
    study.plot(res, str(tmp_path / "f.png"))
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not os.path.exists(tmp_path / "f.png.tmp.png")


def test_ppo_at_the_policy_scores_the_first_answer_of_each_policy(micro, tmp_path, monkeypatch):
    """Part 3's runner: PPO with the seed's vanilla RM and with the arm's RM, each policy's answers
    sampled with the same seed, the first answer to each prompt scored by the gold judge; a seed
    whose RMs are of another build is refused; what is done is not run again."""
    import task
    with open(f"{micro['data']}/prompts_test.jsonl") as f:
        prompts = [json.loads(line)["prompt"] for line in f][:4]
    answers = [" of course . first unplug the cables . then restart it . good luck !", " no ."]
    calls = []

    def stage(script, *argv):
        calls.append((script, argv))
        if script == "sample.py":
            out = argv[argv.index("--output_dir") + 1]
            os.makedirs(out)
            with open(f"{out}/meta.jsonl", "w") as f:
                f.writelines(json.dumps({"prompt": p, "responses": answers}) + "\n" for p in prompts)
    monkeypatch.setattr(study, "stage", stage)
    monkeypatch.setattr(study, "preset", lambda *names: [["--queries", "8"]])
    d = tmp_path / "seed3"
    for rm in ("vanilla", "eta20"):
        (d / rm).mkdir(parents=True)
        (d / rm / "DONE").write_text("{}")
    (d / "measure").mkdir()
    (d / "measure" / "vanilla.json").write_text(json.dumps({"build": "B"}))
    (d / "measure" / "eta20.json").write_text(json.dumps({"build": "other"}))
    with pytest.raises(SystemExit, match="eta20: no reward model of this build"):
        study.run_policy(str(tmp_path), 3, "eta20", "B")
    assert calls == []  # both RMs are checked before either PPO runs
    (d / "measure" / "eta20.json").write_text(json.dumps({"build": "B"}))
    study.run_policy(str(tmp_path), 3, "eta20", "B")
    assert [(s, a[a.index("--rm_dir") + 1]) for s, a in calls if s == "ppo.py"] == [("ppo.py", f"{d}/vanilla"), ("ppo.py", f"{d}/eta20")]
    seeds = {a[a.index("--seed") + 1] for s, a in calls if s == "sample.py"}
    assert seeds == {"303"} and all("--queries" in a and a[a.index("--steps") + 1] == "10" for s, a in calls if s == "ppo.py")
    with open(d / "policy" / "eta20.json") as f:
        got = json.load(f)
    assert got["prompts"] == prompts and got["gold"] == [task.gold(p, answers[0]) for p in prompts]
    assert got["gold"] != [task.gold(p, answers[1]) for p in prompts]
    n = len(calls)
    study.run_policy(str(tmp_path), 3, "eta20", "B")
    assert len(calls) == n  # done: nothing runs again


def test_the_policy_report_by_hand(tmp_path):
    gold = {1: {"vanilla": [0.0, 1.0, 0.5], "eta20": [0.5, 1.0, 1.0]}, 2: {"vanilla": [1.0, 1.0, 0.0], "eta20": [1.0, 0.5, 0.0]}}
    for s, by_rm in gold.items():
        (tmp_path / f"seed{s}" / "policy").mkdir(parents=True)
        for rm, g in by_rm.items():
            (tmp_path / f"seed{s}" / "policy" / f"{rm}.json").write_text(json.dumps({"prompts": ["a", "b", "c"], "gold": g}))
    res, text = study.policy_report(str(tmp_path), [1, 2], "eta20")
    assert res["diff"]["mean"] == pytest.approx((0.5 + 0 + 0.5 + 0 - 0.5 + 0) / 6)
    assert res["per_seed"]["2"] == {"vanilla": pytest.approx(2 / 3), "eta20": pytest.approx(0.5)}
    assert "| 1 | +0.5000 | +0.8333 | +0.3333 |" in text and res["verdict"].startswith("no detectable difference")
    (tmp_path / "seed2" / "policy" / "eta20.json").write_text(json.dumps({"prompts": ["a", "c", "b"], "gold": [1, 0, 0]}))
    with pytest.raises(SystemExit, match="seed 2: the two policies answered different prompts"):
        study.policy_report(str(tmp_path), [1, 2], "eta20")
