"""iterate.sh end to end on the micro task: one round, a few steps per stage, every arm. One run
(the module's `first` fixture) is read by the tests named after what they check: the stages, their
order and threads, the report's fields; then, in this order, on that same RUN_DIR: a second
invocation skips every stage, other settings and a second iterate.sh are refused, and deleting one
stage's marker redoes that stage and the ones that depend on it, and only those (last: it changes
the folder). Besides: two seeds side by side equal the first run's seed, a bad setting stops
iterate.sh before the first stage, Ctrl-C ends every stage, a failed branch stops its seed."""
import json
import os
import re
import shlex
import shutil
import subprocess
import time

import pytest

import cli
import evaluate
import report
from conftest import ROOT

pytestmark = pytest.mark.slow  # bash iterate.sh
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


STAGES = ["seed 1: sft", "seed 1: vanilla reward model", "seed 1: vanilla PPO (2 steps)",
          "seed 1: sample the meta data from sft",
          "seed 1 metarm round 1: MetaRM (first_order)",
          "seed 1 metarm round 1: PPO from seed1/sft",
          "seed 1 oracle round 1: 16 new labels on the samples",
          "seed 1 oracle round 1: reward model on the original + new pairs", "seed 1 oracle round 1: PPO from seed1/sft",
          "seed 1: DPO", "seed 1: evaluate"]


@pytest.fixture(scope="module")
def first(micro, tmp_path_factory):
    """The first iterate.sh on a fresh RUN_DIR, every arm, branches side by side (LANES=2). The
    RUN_DIR's name would run a command wherever a shell string were built from a path (a quote
    that closes '...', then $(touch <base>/PWNED)): checked by test_no_path_is_run_as_a_command."""
    base = str(tmp_path_factory.mktemp("iterate"))
    run_dir = f"{base}/x'$(touch${{IFS}}{base}/PWNED)'/run"
    ran, skipped, out = iterate(run_dir, micro, LANES="2")
    with open(os.path.join(run_dir, "results.json")) as f:
        res = json.load(f)
    return {"run_dir": run_dir, "base": base, "ran": ran, "skipped": skipped, "out": out, "res": res}


def test_no_path_is_run_as_a_command(first):
    """Every arm ran (the oracle's labelling step built a `bash -c` string from folder names)."""
    assert "seed 1 oracle round 1: 16 new labels on the samples" in first["ran"]
    assert not os.path.exists(os.path.join(first["base"], "PWNED"))


def test_every_stage_runs_once_sft_first_evaluation_last(first):
    ran = first["ran"]  # branches side by side: any order between them
    assert sorted(ran) == sorted(STAGES) and first["skipped"] == [] and ran[0] == STAGES[0] and ran[-1] == STAGES[-1]


def test_each_branch_writes_its_own_log(first):
    for branch in ARMS.split() + ["ppo_vanilla", "rm", "sft_samples"]:  # (one round: the vanilla arm runs nothing)
        assert os.path.getsize(os.path.join(first["run_dir"], "seed1", f"{branch}.log")) >= (branch != "vanilla"), branch


def test_a_branch_starts_once_what_it_reads_has_ended(first):
    events = re.findall(r"^\[(run |done)\] (.*?)(?: \(\d+ s, \d+ thread\(s\)\))?$", first["out"], re.M)
    at = {event: i for i, event in enumerate(events)}
    after = {"seed 1 metarm round 1: MetaRM (first_order)": ["seed 1: sample the meta data from sft"],
             "seed 1 oracle round 1: 16 new labels on the samples": ["seed 1: sample the meta data from sft"],
             "seed 1: vanilla PPO (2 steps)": ["seed 1: vanilla reward model"],
             "seed 1 metarm round 1: PPO from seed1/sft": ["seed 1 metarm round 1: MetaRM (first_order)"],
             "seed 1: DPO": ["seed 1: sft"], "seed 1: evaluate": [s for s in STAGES if s != "seed 1: evaluate"]}
    for stage, needs in after.items():
        assert all(at[("run ", stage)] > at[("done", n)] for n in needs), (stage, events)


def test_a_stage_beside_others_gets_one_thread_a_stage_alone_every_core(first):
    """SFT and the evaluation run alone: the seed's cores (here all); MetaRM runs beside DPO and
    vanilla PPO: one thread."""
    threads = dict(re.findall(r"^\[done\] (.*) \(\d+ s, (\d+) thread\(s\)\)$", first["out"], re.M))
    cores = str(len(os.sched_getaffinity(0)))
    assert threads["seed 1: sft"] == threads["seed 1: evaluate"] == cores, threads
    assert threads["seed 1 metarm round 1: MetaRM (first_order)"] == "1", threads


def test_results_json_has_every_documented_field(first):
    assert set(first["res"]) == set(evaluate.RESULT_FIELDS)
    with open(os.path.join(ROOT, "docs", "results.md")) as f:
        doc = f.read()
    assert all(f"`{field}`" in doc for field in evaluate.RESULT_FIELDS), "docs/results.md must document results.json"
    with open(os.path.join(first["run_dir"], "results.md")) as f:
        md = f.read()
    assert "Verdicts" in md and "Table 1" in md and "Table 2" in md and "Table 3" in md


def test_results_name_every_policy_and_each_arms_settings(first):
    res = first["res"]
    policies = {"sft", "vanilla_ppo/step2", "dpo", "metarm/round1", "vanilla/round1", "oracle/round1"}
    assert set(res["judge_mean"]) == set(res["gold"]) == policies
    cfg = res["config"]
    assert cfg["arms"] == ARMS.split() and cfg["seeds"] == [1] and cfg["ppo_steps"] == 2
    assert cfg["settings"]["metarm"]["deploy"] == "theta" and cfg["settings"]["metarm"]["eta"] == 5e-4
    assert cfg["settings"]["oracle"]["new_pairs_per_round"] == 16 and cfg["settings"]["dpo"]["beta"] == 0.1
    assert {c["kl_anchor"] for a, c in cfg["settings"].items() if a != "dpo"} == {"prev"}


def test_comparisons_pair_each_arm_with_its_controls(first):
    res = first["res"]
    pairs = {(c["a"], c["b"]) for c in res["comparisons"]}
    assert {("metarm/round1", "sft"), ("metarm/round1", "vanilla/round1"), ("metarm/round1", "vanilla_ppo/step2"),
            ("metarm/round1", "dpo"), ("oracle/round1", "vanilla/round1"), ("dpo", "sft")} <= pairs
    for c in res["comparisons"]:
        assert c["gold_diff"]["lo"] <= c["gold_diff"]["mean"] <= c["gold_diff"]["hi"]
        assert abs(c["win"] + c["tie"] + c["lose"] - 100) < 1e-6 and c["verdict"].startswith("one seed")
    assert {c["metric"] for c in res["rm_comparisons"]} == set(report.RM_METRICS)
    assert {c["arm"] for c in res["rm_comparisons"]} == {"metarm", "oracle"}


def test_the_paper_tables_and_figures_are_filled(first):
    res = first["res"]
    t1 = res["table1"]["metarm"][0]
    assert abs(t1["win"]["mean"] + t1["tie"]["mean"] + t1["lose"]["mean"] - 100) < 1e-6
    assert set(res["table2"]) == {"metarm", "vanilla", "oracle"}
    assert {"raw_data", "sft", "dpo", "oracle/round1"} <= set(res["table3"])
    for arm in ("metarm", "vanilla", "oracle"):
        assert set(evaluate.ROUND_RM_FIELDS) <= set(res["rounds"][arm][0]["rm"])
        assert len(res["rounds"][arm][0]["ppo_gold"]) == 2
    assert res["figure1"]["vanilla_ppo"] and res["figure4"]["vanilla"] and res["figure4"]["oracle/round1"]
    assert res["ppo_curves"]["metarm/round1"]["gold"][-1][0] == {"mean": 2, "std": 0.0}


def test_the_record_names_each_policy_and_the_vanilla_round_one_is_vanilla_ppo(first):
    """layout.jsonl names every policy the report has, with its folders; the vanilla arm's round 1
    is vanilla PPO's run (its first PPO_STEPS steps: tests/test_ppo.py checks that they are the
    same weights), not run again."""
    seed = os.path.join(first["run_dir"], "seed1")
    with open(os.path.join(seed, "layout.jsonl")) as f:
        layout = {e["name"]: e for e in map(json.loads, f)}
    assert set(first["res"]["judge_mean"]) | {"vanilla_rm"} == set(layout)
    assert layout["vanilla/round1"] == {"name": "vanilla/round1", "arm": "vanilla", "round": 1, "policy": "ppo_vanilla",
                                        "log": "ppo_vanilla", "steps": 2, "rm": "rm", "samples": "sft_samples/meta.jsonl",
                                        "kl_anchor": "prev"}
    assert layout["metarm/round1"]["policy"] == "metarm/round1/ppo" and layout["metarm/round1"]["rm"] == "metarm/round1/rm"
    assert layout["oracle/round1"]["new_pairs"] == "oracle/round1/new_pairs.jsonl"
    assert not os.path.exists(os.path.join(seed, "vanilla", "round1", "ppo"))
    res = first["res"]
    assert res["judge_mean"]["vanilla/round1"]["mean"] == res["judge_mean"]["vanilla_ppo/step2"]["mean"]


def test_a_product_gives_the_same_bits_with_one_or_two_threads():
    """Under the MKL mode iterate.sh exports (iterate/scheduling.sh), the matrix product whose sum
    MKL otherwise splits over the threads - a score head's weight gradient, [1, K] x [K, hidden] -
    gives the same bits with 1 and 2 threads: a stage's numbers do not depend on whether it ran
    beside another branch or alone."""
    code = ("import hashlib, torch; torch.manual_seed(0); g, h = torch.randn(1, 8192), torch.randn(8192, 128)\n"
            "for n in (1, 2): torch.set_num_threads(n); print(hashlib.sha256((g @ h).numpy().tobytes()).hexdigest())")
    script = f'source <(grep "^export MKL_CBWR" iterate/scheduling.sh); python -c {shlex.quote(code)}'
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert len(out) == 2 and out[0] == out[1] and len(out[0]) == 64


def test_the_record_of_later_rounds_names_vanilla_ppos_snapshots(tmp_path):
    """iterate.sh's record and vanilla_ppo_after, run by bash as iterate.sh runs them, on a RUN_DIR
    with quotes and spaces: with 3 rounds of 10 steps, the vanilla arm's round k < 3 is the
    snapshot ppo.py writes after 10 k steps (<run>/step<N>) and round 3 its run's folder; each
    line reads back through evaluate.read_layout."""
    run_dir = str(tmp_path / "a 'b\" c")
    os.makedirs(os.path.join(run_dir, "seed1"))
    script = ('source <(sed -n "/^record() {/,/^}/p; /^vanilla_ppo_after() {/,/^}/p; /^fail() {/p" '
              'iterate/scheduling.sh iterate.sh iterate/checks.sh); ROUNDS=3 PPO_STEPS=10; R="$RUN_DIR/seed1"; '
              'for K in 1 2 3; do record 1 "vanilla/round$K" round=$K policy="$(vanilla_ppo_after "$R" $K)" kl_anchor=prev; done; '
              '(record 1 bad policy="/elsewhere/x y") || echo refused')
    p = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, env={**os.environ, "RUN_DIR": run_dir})
    assert p.stdout == "refused\n" and "'/elsewhere/x y' (policy) is not a folder inside" in p.stderr, p.stderr
    os.replace(os.path.join(run_dir, "seed1", "layout.jsonl.tmp"), os.path.join(run_dir, "seed1", "layout.jsonl"))
    layout = evaluate.read_layout(os.path.join(run_dir, "seed1"))
    assert [layout[f"vanilla/round{k}"]["policy"] for k in (1, 2, 3)] == [
        os.path.join(run_dir, "seed1", p) for p in ("ppo_vanilla/step10", "ppo_vanilla/step20", "ppo_vanilla")]
    assert layout["vanilla/round2"]["round"] == 2 and layout["vanilla/round2"]["kl_anchor"] == "prev"


def eval_flags(micro):
    """The evaluation settings iterate() gives (the same files by content, wherever they lie)."""
    return ["--prompts", f"{micro['data']}/prompts_test.jsonl", "--pairs", f"{micro['data']}/pairs_test.jsonl",
            "--raw_pairs", f"{micro['data']}/pairs_train.jsonl", "--n_prompts", "20", "--max_new_tokens", "12"]


def test_a_report_on_some_arms_has_only_theirs(first, micro, tmp_path):
    """evaluate.py --aggregate on some of the arms: only their policies; an arm no seed was
    evaluated with is refused."""
    evaluate.main(["--aggregate", first["run_dir"], "--seeds", "1", "--rounds", "1", "--arms", "metarm",
                   "--out_dir", str(tmp_path / "sub"), "--n_boot", "100", *eval_flags(micro)])
    with open(tmp_path / "sub" / "results.json") as f:
        sub = json.load(f)
    assert set(sub["gold"]) == {"sft", "vanilla_ppo/step2", "metarm/round1"} and set(sub["rounds"]) == {"metarm"}
    with pytest.raises(cli.UserError, match="re-run iterate.sh"):
        evaluate.main(["--aggregate", first["run_dir"], "--seeds", "1", "--rounds", "1", "--arms", "metarm+eta=1",
                       "--out_dir", str(tmp_path / "sub"), *eval_flags(micro)])


def test_a_seed_evaluated_otherwise_is_not_pooled(first, micro, tmp_path):
    """A seed's results.json made with other evaluation settings (a hand-run evaluate.py) is
    refused by the aggregation iterate.sh runs, naming the setting; so is one that records none."""
    with open(os.path.join(first["run_dir"], "seed1", "eval", "results.json")) as f:
        res = json.load(f)
    (tmp_path / "seed1" / "eval").mkdir(parents=True)
    res["config"]["eval_settings"]["n_prompts"] = 10
    (tmp_path / "seed1" / "eval" / "results.json").write_text(json.dumps(res))
    argv = ["--aggregate", str(tmp_path), "--seeds", "1", "--rounds", "1", "--arms", "metarm", *eval_flags(micro)]
    with pytest.raises(cli.UserError, match=r"evaluated with other settings \(--n_prompts 10 -> 20"):
        evaluate.main(argv)
    del res["config"]["eval_settings"]
    (tmp_path / "seed1" / "eval" / "results.json").write_text(json.dumps(res))
    with pytest.raises(cli.UserError, match=r"records no evaluation settings"):
        evaluate.main(argv)


def test_seeds_side_by_side_equal_the_seed_alone(first, micro, tmp_path):
    """JOBS=2 runs two seeds at once, each in its own log, here with LANES=1 (a seed's branches one
    at a time, one thread each on 2 cores); seed 1 of the first run went alone with LANES=2 (its
    branches side by side; SFT, the evaluation, and any stage the last branch starts alone, with
    all the cores): the same models, bit for bit, and the same evaluation."""
    par = str(tmp_path / "par")
    p = iterate(par, micro, check=False, ARMS="vanilla", SEEDS="1 2", JOBS="2", LANES="1")  # one round: no stage of its own
    assert p.returncode == 0, p.stdout + p.stderr
    assert "[seed 1] done" in p.stdout and "[seed 2] done" in p.stdout and os.path.exists(os.path.join(par, "seed2.log"))
    for folder in ("sft", "rm", "ppo_vanilla"):
        with open(os.path.join(first["run_dir"], "seed1", folder, "model.safetensors"), "rb") as f, \
                open(os.path.join(par, "seed1", folder, "model.safetensors"), "rb") as g:
            assert f.read() == g.read(), folder
    with open(os.path.join(par, "results.json")) as f:
        res = json.load(f)
    assert res["config"]["seeds"] == [1, 2] and set(res["per_seed"]) == {"1", "2"}
    assert res["per_seed"]["1"] != res["per_seed"]["2"]
    assert set(res["per_seed"]["1"]) == {"sft", "vanilla_ppo/step2", "vanilla/round1"}
    assert res["per_seed"]["1"] == {k: first["res"]["per_seed"]["1"][k] for k in res["per_seed"]["1"]}


# --- on the first run's RUN_DIR, in this order ----------------------------------------------
def python_starts(tmp_path):
    """Env that makes every python iterate.sh starts log its command line (a sitecustomize.py on
    PYTHONPATH), and a function that reads them back."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import os, sys\nwith open(os.environ['PYTHON_STARTS'], 'a') as f:\n    f.write(' '.join(sys.argv) + '\\n')\n")
    log = tmp_path / "starts.txt"
    env = {"PYTHONPATH": str(tmp_path / "site"), "PYTHON_STARTS": str(log)}
    return env, lambda: [line.split()[0] for line in log.read_text().splitlines()] if log.exists() else []


def test_a_second_invocation_skips_every_stage(first, micro, tmp_path):
    """Every stage skipped, and the flags not parsed again (RUN_DIR/flags_checked holds them): the
    one python started is the report over seeds."""
    env, starts = python_starts(tmp_path)
    ran, skipped, _ = iterate(first["run_dir"], micro, **env)
    assert ran == [] and sorted(skipped) == sorted(STAGES)
    assert starts() == ["evaluate.py"]


def test_another_spelling_of_the_run_dir_is_the_same_run(first, micro):
    head, tail = os.path.split(first["run_dir"])
    ran, skipped, _ = iterate(f"{head}/./{tail}/", micro)
    assert ran == [] and len(skipped) == len(STAGES)


def test_a_moved_run_dir_is_the_same_run(first, micro, tmp_path):
    """Moved (here: copied) elsewhere, a RUN_DIR is still done: nothing runs again."""
    moved = str(tmp_path / "moved")
    shutil.copytree(first["run_dir"], moved, ignore=shutil.ignore_patterns("LOCK"))
    ran, skipped, _ = iterate(moved, micro)
    assert ran == [] and len(skipped) == len(STAGES)


def test_settings_record_paths_inside_the_run_dir_by_their_place_in_it(tmp_path):
    """iterate.sh's settings() (iterate/checks.sh) writes runs/x/..., ./runs/x//... and /abs/runs/x/... alike."""
    def recorded(run_dir):
        script = (f'source <(sed -n "/^settings() {{/,/^}}/p" iterate/checks.sh); RUN_DIR={shlex.quote(run_dir)}; '
                  'MODEL="$RUN_DIR/task/base_model"; PAIRS=/elsewhere/pairs.jsonl; settings "<RUN_DIR>"')
        p = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
        return p.stdout
    spellings = [recorded(r) for r in ("runs/x", "./runs/x/", os.path.join(ROOT, "runs/x"))]
    assert spellings[0] == spellings[1] == spellings[2]
    assert "MODEL=<RUN_DIR>/task/base_model\n" in spellings[0] and "PAIRS=/elsewhere/pairs.jsonl\n" in spellings[0]


def test_other_settings_are_refused_before_any_stage(first, micro):
    p = iterate(first["run_dir"], micro, check=False, PPO_STEPS="3")
    assert p.returncode == 2 and "[run ]" not in p.stdout and "[skip]" not in p.stdout, p.stdout + p.stderr
    assert "was run with other settings: before PPO_STEPS=2; now PPO_STEPS=3" in p.stderr, p.stderr
    # the evaluation's flags may change on a finished RUN_DIR (the seeds are re-evaluated), and are checked
    p = iterate(first["run_dir"], micro, check=False, EVAL_ARGS="--n_prompts 20 --tie_margin -1")
    assert p.returncode == 2 and "evaluate.py: --tie_margin -1: must be >= 0" in p.stderr and "[run ]" not in p.stdout


def test_a_second_iterate_sh_on_the_same_run_dir_is_refused(first, micro):
    holder = subprocess.Popen(["flock", "-o", os.path.join(first["run_dir"], "LOCK"), "sleep", "60"])
    try:
        time.sleep(0.5)
        p = iterate(first["run_dir"], micro, check=False)
        assert p.returncode == 2 and "is in use by another iterate.sh" in p.stderr, p.stderr
    finally:
        holder.kill()
        holder.wait()


def test_a_deleted_done_redoes_its_stage_and_dependants_and_added_arms_run_alone(first, micro):
    """One stage's DONE deleted: that stage and the ones that depend on it are redone, and only
    those; two arms added on the same folder (the bilevel arm: its reward model once per seed,
    support sets the SFT samples, then its rounds; a vanilla arm, whose one round is vanilla PPO's):
    only they run; the evaluation is redone."""
    run_dir = first["run_dir"]
    stamp = os.path.getmtime(os.path.join(run_dir, "seed1", "metarm", "round1", "rm", "DONE"))
    os.remove(os.path.join(run_dir, "seed1", "oracle", "round1", "rm", "DONE"))
    ran, skipped, _ = iterate(run_dir, micro, ARMS=ARMS + " vanilla+anchor=sft bilevel")
    assert sorted(ran) == sorted(["seed 1 oracle round 1: reward model on the original + new pairs",
                                  "seed 1 oracle round 1: PPO from seed1/sft", "seed 1: bilevel RM",
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


# --- each on a RUN_DIR of its own -------------------------------------------------------------
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
    ({"SEEDS": "1 2 01"}, 'SEEDS="1 2 01": seed(s) 1 named twice'),
    # each stage's extra flags, parsed as the stage will parse them: every bad one named, in one run
    pytest.param({"METARM_ARGS": "--meta_grad bogus", "PPO_ARGS": "--steps_typo 3",
                  "EVAL_ARGS": "--n_prompts 20 --tie_margin -1"},
                 ("METARM_ARGS=\"--meta_grad bogus\": metarm.py: argument --meta_grad: invalid choice",
                  "PPO_ARGS=\"--steps_typo 3\": ppo.py: unrecognized arguments: --steps_typo 3",
                  "EVAL_ARGS=\"--n_prompts 20 --tie_margin -1\": evaluate.py: --tie_margin -1: must be >= 0"),
                 id="METARM_ARGS, PPO_ARGS and EVAL_ARGS bad"),
])
def test_bad_settings_stop_before_any_stage(micro, tmp_path, setting, message):
    p = iterate(str(tmp_path / "run"), micro, check=False, **setting)
    messages = (message,) if isinstance(message, str) else message
    assert p.returncode == 2 and all(m in p.stderr for m in messages) and "[run ]" not in p.stdout, p.stdout + p.stderr
    assert not os.path.exists(tmp_path / "run" / "seed1")


def with_sft(run_dir, micro_sft):
    """A RUN_DIR whose seed 1 has an SFT model already (iterate.sh skips a stage whose DONE exists):
    for the tests of what happens after SFT."""
    shutil.copytree(micro_sft, os.path.join(run_dir, "seed1", "sft"))
    return run_dir


def test_interrupt_ends_every_stage_started(micro, micro_sft, tmp_path):
    """Ctrl-C (SIGINT) on iterate.sh ends the stages it started, background branches included (bash
    starts those with SIGINT ignored): nothing holds RUN_DIR/LOCK afterwards."""
    import signal
    run_dir = with_sft(str(tmp_path / "run"), micro_sft)
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


def test_a_failed_branch_stops_the_seed_and_names_its_log(micro, micro_sft, tmp_path):
    """A stage that fails in a branch run side by side (the vanilla RM, beside the SFT samples): the
    other running branch ends its stage, the branches that wait for the failed one never start, no
    evaluation; the message names the stage, its folder and its log, where the error is. (A
    running branch starts no further stage: test_a_running_branch_starts_no_stage_after_a_failure.)"""
    run_dir = with_sft(str(tmp_path / "run"), micro_sft)
    p = iterate(run_dir, micro, check=False, ARMS="vanilla", LANES="2",  # vanilla PPO, then the arm, wait for the RM
                RM_ARGS="--max_steps 4 --global_batch 100000")  # parses; the data has fewer rows
    log = os.path.join(run_dir, "seed1", "rm.log")
    assert p.returncode == 1, p.stdout + p.stderr
    assert (f"iterate.sh: stage 'seed 1: vanilla reward model' failed (its folder: "
            f"{run_dir}/seed1/rm, its output: {log}); fix and re-run to resume") in p.stdout, p.stdout
    assert "--global_batch" in open(log).read()
    ran = re.findall(r"^\[run \] (.*)$", p.stdout, re.M)
    done = re.findall(r"^\[done\] (.*) \(\d+ s, \d+ thread\(s\)\)$", p.stdout, re.M)
    assert sorted(ran) == ["seed 1: sample the meta data from sft", "seed 1: vanilla reward model"]  # and the branch beside it
    assert done == ["seed 1: sample the meta data from sft"]
    assert subprocess.run(["flock", "-n", os.path.join(run_dir, "LOCK"), "true"]).returncode == 0


def test_a_running_branch_starts_no_stage_after_a_failure(tmp_path):
    """side_by_side (iterate/scheduling.sh), run by bash as iterate.sh runs it, with stand-in stages:
    branch a fails while branch b's first stage runs; b ends that stage and does not start its
    second, and c, which waits for b, never starts; side_by_side exits 1."""
    stop = tmp_path / "seed1" / ".stop"
    wait_for_the_failure = f"for i in $(seq 200); do [ -e {shlex.quote(str(stop))} ] && exit 0; sleep 0.05; done; exit 0"
    script = ('source iterate/scheduling.sh; fail() { echo "$*" >&2; exit 2; }; LANES=2; mkdir -p "$RUN_DIR/seed1"; '
              'a() { stage a1 "$RUN_DIR/a1" "$RUN_DIR/a1/DONE" false; }; '
              'b() { stage b1 "$RUN_DIR/b1" "$RUN_DIR/b1/DONE" bash -c "$WAIT"; stage b2 "$RUN_DIR/b2" "$RUN_DIR/b2/DONE" true; }; '
              'c() { stage c1 "$RUN_DIR/c1" "$RUN_DIR/c1/DONE" true; }; '
              'side_by_side 1 b - b a - a c b c')
    p = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "RUN_DIR": str(tmp_path), "WAIT": wait_for_the_failure})
    ran = re.findall(r"^\[run \] (.*)$", p.stdout, re.M)
    done = re.findall(r"^\[done\] (\S+)", p.stdout, re.M)
    assert p.returncode == 1 and sorted(ran) == ["a1", "b1"] and done == ["b1"], p.stdout + p.stderr
    assert "iterate.sh: stage 'a1' failed" in p.stdout and not stop.exists()
