"""iterate.sh end to end on the micro task: one round, a few steps per stage. The report has every
documented field; a second invocation skips every stage; deleting one stage's marker redoes that
stage and the ones after it, and only those."""
import json
import os
import re
import subprocess

import evaluate
from conftest import ROOT


def iterate(run_dir, micro):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RUN_DIR": run_dir, "MODEL": micro["base"], "DATA": micro["data"],
           "ROUNDS": "1", "PPO_STEPS": "2", "META_N": "8", "NPROC": "1",
           "SFT_ARGS": "--max_steps 4 --global_batch 16",
           "RM_ARGS": "--max_steps 4 --global_batch 16 --eval_every 1000",
           "METARM_ARGS": "--max_steps 3 --global_batch 8 --meta_batch 2 --eval_every 1000",
           "PPO_ARGS": "--queries 4 --rollouts_per_query 2 --max_new_tokens 12",
           "SAMPLE_ARGS": "--max_new_tokens 12", "EVAL_ARGS": "--n_prompts 20 --max_new_tokens 12"}
    p = subprocess.run(["bash", "iterate.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    ran = re.findall(r"^\[run \] (.*)$", p.stdout, re.M)
    skipped = re.findall(r"^\[skip\] (.*)$", p.stdout, re.M)
    return ran, skipped, p.stdout


def test_iterate_end_to_end(micro, tmp_path):
    run_dir = str(tmp_path / "run")
    stages = ["seed 1: sft", "seed 1: vanilla reward model", "seed 1: vanilla PPO (2 steps)",
              "seed 1 round 1: sample the meta data from sft", "seed 1 round 1: MetaRM (first_order)",
              "seed 1 round 1: PPO from sft", "seed 1: evaluate"]
    ran, skipped, out = iterate(run_dir, micro)
    assert ran == stages and skipped == []

    with open(os.path.join(run_dir, "results.json")) as f:
        res = json.load(f)
    assert set(res) == set(evaluate.RESULT_FIELDS)
    assert set(res["judge_mean"]) == {"sft", "vanilla_ppo", "round1"}
    t1 = res["table1"][0]
    assert t1["round"]["mean"] == 1
    assert abs(t1["win"]["mean"] + t1["tie"]["mean"] + t1["lose"]["mean"] - 100) < 1e-6
    assert {"vs_sft", "vs_vanilla_ppo", "vanilla_ppo_vs_sft", "best_round"} <= set(res["table2"])
    assert set(res["table3"]) == {"raw_data", "sft", "vanilla_ppo", "round1"}
    assert {"self_bleu", "self_bleu_2", "self_bleu_5", "distinct_1", "distinct_2"} <= set(res["table3"]["sft"])
    for which in ("metarm", "vanilla"):
        assert set(evaluate.ROUND_RM_FIELDS) <= set(res["rounds"][0][which])
    assert len(res["rounds"][0]["ppo_gold"]) == 2
    assert res["figure1"]["vanilla_ppo"] and res["figure4"]["vanilla"]
    assert res["ppo_curves"]["round1"]["gold"][-1][0] == {"mean": 2, "std": 0.0}
    with open(os.path.join(run_dir, "results.md")) as f:
        md = f.read()
    assert "Table 1" in md and "Table 2" in md and "Table 3" in md
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert all(f"`{field}`" in readme for field in evaluate.RESULT_FIELDS), "README must document results.json"

    ran, skipped, _ = iterate(run_dir, micro)
    assert ran == [] and skipped == stages

    stamp = os.path.getmtime(os.path.join(run_dir, "seed1", "round1", "rm", "DONE"))
    os.remove(os.path.join(run_dir, "seed1", "round1", "ppo", "DONE"))
    ran, skipped, _ = iterate(run_dir, micro)
    assert skipped == stages[:5] and ran == stages[5:]
    assert os.path.getmtime(os.path.join(run_dir, "seed1", "round1", "rm", "DONE")) == stamp
    assert os.path.exists(os.path.join(run_dir, "results.json"))
