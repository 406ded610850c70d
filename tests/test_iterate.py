"""iterate.sh end to end on the micro task: one round, a few steps per stage, every arm. The report has
every documented field; a second invocation skips every stage; deleting one stage's marker redoes that
stage and the ones that depend on it, and only those; a bad setting stops it before the first stage."""
import json
import os
import re
import subprocess
import time

import pytest

import evaluate
import runtime
from conftest import ROOT

ARMS = "metarm vanilla oracle dpo"


def iterate(run_dir, micro, check=True, **extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RUN_DIR": run_dir, "MODEL": micro["base"], "DATA": micro["data"],
           "ARMS": ARMS, "ROUNDS": "1", "PPO_STEPS": "2", "META_N": "8", "NPROC": "1", "ORACLE_PAIRS": "16",
           "SFT_ARGS": "--max_steps 4 --global_batch 16",
           "RM_ARGS": "--max_steps 4 --global_batch 16 --eval_every 1000",
           "METARM_ARGS": "--max_steps 3 --global_batch 8 --meta_batch 2 --eval_every 1000",
           "DPO_ARGS": "--max_steps 3 --global_batch 8 --eval_every 1000",
           "BILEVEL_ARGS": "--steps 2 --support_prompts 2 --query_pairs 4 --eval_every 1000",
           "PPO_ARGS": "--queries 4 --rollouts_per_query 2 --max_new_tokens 12",
           "SAMPLE_ARGS": "--max_new_tokens 12", "EVAL_ARGS": "--n_prompts 20 --max_new_tokens 12 --n_boot 200", **extra}
    p = subprocess.run(["bash", "iterate.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if not check:
        return p
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    ran = re.findall(r"^\[run \] (.*)$", p.stdout, re.M)
    skipped = re.findall(r"^\[skip\] (.*)$", p.stdout, re.M)
    return ran, skipped, p.stdout


def test_iterate_end_to_end(micro, tmp_path):
    run_dir = str(tmp_path / "run")
    stages = ["seed 1: sft", "seed 1: vanilla reward model", "seed 1: vanilla PPO (2 steps)",
              "seed 1: sample the meta data from sft",
              "seed 1 metarm round 1: MetaRM (first_order)",
              "seed 1 metarm round 1: PPO from seed1/sft",
              "seed 1 vanilla round 1: PPO from seed1/sft",
              "seed 1 oracle round 1: 16 new labels on the samples",
              "seed 1 oracle round 1: reward model on the original + new pairs", "seed 1 oracle round 1: PPO from seed1/sft",
              "seed 1: DPO", "seed 1: evaluate"]
    ran, skipped, out = iterate(run_dir, micro, LANES="2")  # branches side by side: any order between them
    assert sorted(ran) == sorted(stages) and skipped == [] and ran[0] == stages[0] and ran[-1] == stages[-1]
    for branch in ARMS.split() + ["ppo_vanilla", "rm", "sft_samples"]:
        assert os.path.getsize(os.path.join(run_dir, "seed1", f"{branch}.log")) > 0, branch
    # each branch starts once what it reads has ended
    events = re.findall(r"^\[(run |done)\] (.*?)(?: \(\d+ s, \d+ thread\(s\)\))?$", out, re.M)
    at = {event: i for i, event in enumerate(events)}
    after = {"seed 1 metarm round 1: MetaRM (first_order)": ["seed 1: sample the meta data from sft"],
             "seed 1 oracle round 1: 16 new labels on the samples": ["seed 1: sample the meta data from sft"],
             "seed 1 vanilla round 1: PPO from seed1/sft": ["seed 1: vanilla reward model", "seed 1: sample the meta data from sft"],
             "seed 1: vanilla PPO (2 steps)": ["seed 1: vanilla reward model"],
             "seed 1 metarm round 1: PPO from seed1/sft": ["seed 1 metarm round 1: MetaRM (first_order)"],
             "seed 1: DPO": ["seed 1: sft"], "seed 1: evaluate": [s for s in stages if s != "seed 1: evaluate"]}
    for stage, needs in after.items():
        assert all(at[("run ", stage)] > at[("done", n)] for n in needs), (stage, events)
    # one thread beside other branches; the seed's cores (here all) when alone: SFT, the evaluation
    threads = dict(re.findall(r"^\[done\] (.*) \(\d+ s, (\d+) thread\(s\)\)$", out, re.M))
    cores = str(len(os.sched_getaffinity(0)))
    assert threads["seed 1: sft"] == threads["seed 1: evaluate"] == cores, threads
    assert threads["seed 1 metarm round 1: MetaRM (first_order)"] == "1", threads  # DPO, vanilla PPO wait

    with open(os.path.join(run_dir, "results.json")) as f:
        res = json.load(f)
    assert set(res) == set(evaluate.RESULT_FIELDS)
    policies = {"sft", "vanilla_ppo/step2", "dpo", "metarm/round1", "vanilla/round1", "oracle/round1"}
    assert set(res["judge_mean"]) == set(res["gold"]) == policies
    cfg = res["config"]
    assert cfg["arms"] == ARMS.split() and cfg["seeds"] == [1] and cfg["ppo_steps"] == 2
    assert cfg["settings"]["metarm"]["deploy"] == "theta" and cfg["settings"]["metarm"]["eta"] == 5e-4
    assert cfg["settings"]["oracle"]["new_pairs_per_round"] == 16 and cfg["settings"]["dpo"]["beta"] == 0.1
    assert {c["kl_anchor"] for a, c in cfg["settings"].items() if a != "dpo"} == {"prev"}
    pairs = {(c["a"], c["b"]) for c in res["comparisons"]}
    assert {("metarm/round1", "sft"), ("metarm/round1", "vanilla/round1"), ("metarm/round1", "vanilla_ppo/step2"),
            ("metarm/round1", "dpo"), ("oracle/round1", "vanilla/round1"), ("dpo", "sft")} <= pairs
    for c in res["comparisons"]:
        assert c["gold_diff"]["lo"] <= c["gold_diff"]["mean"] <= c["gold_diff"]["hi"]
        assert abs(c["win"] + c["tie"] + c["lose"] - 100) < 1e-6 and c["verdict"].startswith("one seed")
    # the vanilla arm's round 1 is vanilla PPO's first PPO_STEPS steps (same RM, seed and reference)
    assert res["judge_mean"]["vanilla/round1"]["mean"] == res["judge_mean"]["vanilla_ppo/step2"]["mean"]
    assert {c["metric"] for c in res["rm_comparisons"]} == set(evaluate.RM_METRICS)
    assert {c["arm"] for c in res["rm_comparisons"]} == {"metarm", "oracle"}
    t1 = res["table1"]["metarm"][0]
    assert abs(t1["win"]["mean"] + t1["tie"]["mean"] + t1["lose"]["mean"] - 100) < 1e-6
    assert set(res["table2"]) == {"metarm", "vanilla", "oracle"}
    assert {"raw_data", "sft", "dpo", "oracle/round1"} <= set(res["table3"])
    for arm in ("metarm", "vanilla", "oracle"):
        assert set(evaluate.ROUND_RM_FIELDS) <= set(res["rounds"][arm][0]["rm"])
        assert len(res["rounds"][arm][0]["ppo_gold"]) == 2
    assert res["figure1"]["vanilla_ppo"] and res["figure4"]["vanilla"] and res["figure4"]["oracle/round1"]
    assert res["ppo_curves"]["metarm/round1"]["gold"][-1][0] == {"mean": 2, "std": 0.0}
    with open(os.path.join(run_dir, "results.md")) as f:
        md = f.read()
    assert "Verdicts" in md and "Table 1" in md and "Table 2" in md and "Table 3" in md
    with open(os.path.join(ROOT, "docs", "results.md")) as f:
        doc = f.read()
    assert all(f"`{field}`" in doc for field in evaluate.RESULT_FIELDS), "docs/results.md must document results.json"

    # a report on some of the arms: only their policies; an arm no seed was evaluated with is refused
    evaluate.main(["--aggregate", run_dir, "--seeds", "1", "--rounds", "1", "--arms", "metarm",
                   "--out_dir", str(tmp_path / "sub"), "--n_boot", "100"])
    with open(tmp_path / "sub" / "results.json") as f:
        sub = json.load(f)
    assert set(sub["gold"]) == {"sft", "vanilla_ppo/step2", "metarm/round1"} and set(sub["rounds"]) == {"metarm"}
    with pytest.raises(runtime.UserError, match="re-run iterate.sh"):
        evaluate.main(["--aggregate", run_dir, "--seeds", "1", "--rounds", "1", "--arms", "metarm+eta=1",
                       "--out_dir", str(tmp_path / "sub")])

    ran, skipped, _ = iterate(run_dir, micro)
    assert ran == [] and sorted(skipped) == sorted(stages)

    # the same RUN_DIR with other settings is refused before any stage, and so is a second iterate.sh
    p = iterate(run_dir, micro, check=False, PPO_STEPS="3")
    assert p.returncode == 2 and "[run ]" not in p.stdout and "[skip]" not in p.stdout, p.stdout + p.stderr
    assert "was run with other settings: before PPO_STEPS=2; now PPO_STEPS=3" in p.stderr, p.stderr
    holder = subprocess.Popen(["flock", "-o", os.path.join(run_dir, "LOCK"), "sleep", "60"])
    try:
        time.sleep(0.5)
        p = iterate(run_dir, micro, check=False)
        assert p.returncode == 2 and "is in use by another iterate.sh" in p.stderr, p.stderr
    finally:
        holder.kill()
        holder.wait()

    # one stage's DONE deleted: that stage and the ones that depend on it are redone, and only those;
    # two arms added on the same folder (the bilevel arm: its reward model once per seed, support sets
    # the SFT samples, then its rounds): only they run; the evaluation is redone
    stamp = os.path.getmtime(os.path.join(run_dir, "seed1", "metarm", "round1", "rm", "DONE"))
    os.remove(os.path.join(run_dir, "seed1", "oracle", "round1", "rm", "DONE"))
    ran, skipped, _ = iterate(run_dir, micro, ARMS=ARMS + " vanilla+anchor=sft bilevel")
    assert sorted(ran) == sorted(["seed 1 oracle round 1: reward model on the original + new pairs",
                                  "seed 1 oracle round 1: PPO from seed1/sft",
                                  "seed 1 vanilla+anchor=sft round 1: PPO from seed1/sft", "seed 1: bilevel RM",
                                  "seed 1 bilevel round 1: PPO from seed1/sft", "seed 1: evaluate"])
    assert ran.index("seed 1 oracle round 1: PPO from seed1/sft") > ran.index(
        "seed 1 oracle round 1: reward model on the original + new pairs")
    assert os.path.getmtime(os.path.join(run_dir, "seed1", "metarm", "round1", "rm", "DONE")) == stamp
    with open(os.path.join(run_dir, "results.json")) as f:
        res = json.load(f)
    assert res["config"]["settings"]["vanilla+anchor=sft"]["kl_anchor"] == "sft"
    assert res["config"]["settings"]["bilevel"]["steps"] == 2
    assert ("bilevel/round1", "metarm/round1") in {(c["a"], c["b"]) for c in res["comparisons"]}
    assert {c["arm"] for c in res["rm_comparisons"]} == {"metarm", "oracle", "bilevel"}


@pytest.mark.parametrize("setting,message", [
    ({"ARMS": "metarm bogus"}, "unknown arm 'bogus'"),
    ({"ARMS": "metarm+eta=-1"}, "eta=-1"),
    ({"ARMS": "vanilla+eta=0.1"}, "'eta' is not a setting of the vanilla arm"),
    ({"ARMS": "metarm+deploy=both"}, "deploy=both"),
    ({"ARMS": "bilevel+eta=0.1"}, "'eta' is not a setting of the bilevel arm"),
    ({"META_GRAD": "exakt"}, "META_GRAD=exakt"),
    ({"JOBS": "0"}, "JOBS=0"),
    ({"LANES": "two"}, "LANES=two"),
    ({"KL_ANCHOR": "ref"}, "KL_ANCHOR=ref"),
])
def test_bad_settings_stop_before_any_stage(micro, tmp_path, setting, message):
    p = iterate(str(tmp_path / "run"), micro, check=False, **setting)
    assert p.returncode == 2 and message in p.stderr and "[run ]" not in p.stdout, p.stdout + p.stderr
    assert not os.path.exists(tmp_path / "run" / "seed1")


def test_seeds_side_by_side_equal_a_seed_alone(micro, tmp_path):
    """JOBS=2 runs two seeds at once, each in its own log, here with LANES=1 (a seed's branches one
    at a time, one thread each on 2 cores); seed 2 run alone with LANES=2 (its branches side by
    side; SFT, the evaluation, and any stage the last branch starts alone, with all the cores): the
    same results."""
    iterate(str(tmp_path / "alone"), micro, ARMS="vanilla", SEEDS="2", JOBS="1", LANES="2")
    p = iterate(str(tmp_path / "par"), micro, check=False, ARMS="vanilla", SEEDS="1 2", JOBS="2", LANES="1")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "[seed 1] done" in p.stdout and "[seed 2] done" in p.stdout
    assert os.path.exists(tmp_path / "par" / "seed2.log") and os.path.exists(tmp_path / "alone" / "seed2" / "vanilla.log")
    with open(tmp_path / "alone" / "results.json") as f, open(tmp_path / "par" / "results.json") as g:
        alone, par = json.load(f), json.load(g)
    assert alone["config"]["seeds"] == [2] and par["config"]["seeds"] == [1, 2]
    assert set(par["per_seed"]) == {"1", "2"} and par["per_seed"]["1"] != par["per_seed"]["2"]
    assert alone["per_seed"]["2"] == par["per_seed"]["2"]


def test_interrupt_ends_every_stage_started(micro, tmp_path):
    """Ctrl-C (SIGINT) on iterate.sh ends the stages it started, background branches included (bash
    starts those with SIGINT ignored): nothing holds RUN_DIR/LOCK afterwards."""
    import signal
    run_dir = str(tmp_path / "run")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RUN_DIR": run_dir, "MODEL": micro["base"], "DATA": micro["data"],
           "ARMS": "vanilla", "ROUNDS": "1", "LANES": "2", "SFT_ARGS": "--max_steps 4 --global_batch 16",
           "RM_ARGS": "--max_steps 400 --global_batch 16"}  # the vanilla RM runs long enough to be interrupted
    # as from a terminal: SIGINT not ignored (a test run in the background would pass it on ignored)
    p = subprocess.Popen(["bash", "iterate.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in p.stdout:
        if line.startswith("[run ] seed 1: vanilla reward model"):
            break
    time.sleep(3)  # the RM is training, beside the SFT samples
    p.send_signal(signal.SIGINT)
    out = p.stdout.read()
    assert p.wait(timeout=60) == 130 and "iterate.sh: stopped" in out, out
    free = subprocess.run(["flock", "-n", os.path.join(run_dir, "LOCK"), "true"])
    assert free.returncode == 0, "a stage outlived iterate.sh"
    assert not os.path.exists(os.path.join(run_dir, "seed1", "rm", "DONE"))


def test_a_failed_branch_stops_the_seed_and_names_its_log(micro, tmp_path):
    """A stage that fails in a branch run side by side: the other running branch ends its stage, nothing
    new starts, no evaluation; the message names the stage, its folder and its log, where the error is."""
    run_dir = str(tmp_path / "run")
    p = iterate(run_dir, micro, check=False, ARMS="metarm vanilla", LANES="2",
                METARM_ARGS="--max_steps 3 --global_batch 8 --no_such_flag 1")
    log = os.path.join(run_dir, "seed1", "metarm.log")
    assert p.returncode == 1, p.stdout + p.stderr
    assert (f"iterate.sh: stage 'seed 1 metarm round 1: MetaRM (first_order)' failed (its folder: "
            f"{run_dir}/seed1/metarm/round1/rm, its output: {log}); fix and re-run to resume") in p.stdout, p.stdout
    assert "no_such_flag" in open(log).read()
    ran = re.findall(r"^\[run \] (.*)$", p.stdout, re.M)
    done = re.findall(r"^\[done\] (.*) \(\d+ s, \d+ thread\(s\)\)$", p.stdout, re.M)
    assert "seed 1: evaluate" not in ran and set(ran) - {"seed 1 metarm round 1: MetaRM (first_order)"} == set(done)
    assert subprocess.run(["flock", "-n", os.path.join(run_dir, "LOCK"), "true"]).returncode == 0
