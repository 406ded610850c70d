"""No silent failure: every way a run can go wrong ends in one clear line (or in the result an
uninterrupted run gives), never in DONE over a broken folder, a traceback or lost rows.
NaN guards, run locks, settings-aware DONE, model kinds, flag checks, loaders, resume, damaged files."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import bilevel_rm
import cli
import data
import distributed
import dpo
import evaluate
import loading
import metarm
import ppo
import reward_model as rm
import run_folder
import sample
import sft
from conftest import ROOT, assert_cli_error, metrics, run_script


def weights(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "model.safetensors"))


def sft_argv(micro, out, *extra):
    return ["--model_name_or_path", micro["base"], "--data", f"{micro['data']}/sft.jsonl",
            "--output_dir", str(out), "--global_batch", "16", "--max_steps", "2", *extra]


# --- 1. a non-finite loss or gradient stops the stage: no DONE, the checkpoint kept -------------
def poisoned(fn, after):
    """fn, but from its (after+1)-th call on every output is multiplied by NaN (graph kept)."""
    calls = []

    def wrapper(*a, **k):
        calls.append(1)
        out = fn(*a, **k)
        if len(calls) <= after:
            return out
        return tuple(o * float("nan") for o in out) if isinstance(out, tuple) else out * float("nan")
    return wrapper


def stage_argv(micro, micro_sft, micro_rm, tmp_path, stage):
    pairs = ["--data", f"{micro['data']}/pairs_train.jsonl", "--eval_data", ""]
    meta = tmp_path / "meta.jsonl"
    with open(meta, "w") as f:
        for p, _ in data.load_prompts(f"{micro['data']}/prompts_train.jsonl")[:8]:
            f.write(json.dumps({"prompt": p, "responses": [" yes", " no thanks", " maybe"]}) + "\n")
    return {
        sft: sft_argv(micro, tmp_path / "out", "--max_steps", "4"),
        rm: ["--sft_dir", micro_sft, *pairs, "--global_batch", "8", "--max_steps", "4"],
        metarm: ["--sft_dir", micro_sft, *pairs, "--meta_data", str(meta), "--global_batch", "8",
                 "--meta_batch", "2", "--max_steps", "4"],
        dpo: ["--sft_dir", micro_sft, *pairs, "--global_batch", "8", "--max_steps", "4"],
        ppo: ppo_argv(micro, micro_sft, micro_rm, tmp_path / "out", "--steps", "4"),
        bilevel_rm: ["--sft_dir", micro_sft, "--init_rm", micro_rm, *pairs, "--support", str(meta), "--steps", "4",
                     "--tasks_per_step", "1", "--support_prompts", "2", "--query_pairs", "4"],
    }[stage] + ["--output_dir", str(tmp_path / "out"), "--save_every", "2"]


@pytest.mark.parametrize("stage,loss,calls_per_step", [
    (sft, "sft_loss_sum", 1), (rm, "pair_loss", 1), (metarm, "J", 2), (dpo, "dpo_loss", 1),
    (ppo, "policy_loss", 2), (bilevel_rm, "outer_loss", 1)])
def test_injected_non_finite_loss_stops_the_stage(micro, micro_sft, micro_rm, tmp_path, monkeypatch,
                                                  stage, loss, calls_per_step):
    """Steps 1-2 are fine (a checkpoint at step 2), step 3's loss is NaN: one line naming step 3,
    the checkpoint of step 2 kept, no DONE, no weights."""
    monkeypatch.setattr(stage, loss, poisoned(getattr(stage, loss), 2 * calls_per_step))
    with pytest.raises(cli.UserError, match=r"step 3: non-finite .*checkpoint .* is kept"):
        stage.main(stage_argv(micro, micro_sft, micro_rm, tmp_path, stage))
    out = tmp_path / "out"
    assert not run_folder.is_done(out) and not (out / "model.safetensors").exists()
    with open(out / "checkpoint" / "state.json") as f:
        assert json.load(f)["step"] == 2


def test_injected_nan_names_step_and_quantity(micro, tmp_path):
    d = distributed.Dist()
    run = run_folder.Run.open(str(tmp_path / "r"), sft.Args(output_dir=str(tmp_path / "r")), d, "sft")
    run.stop_unless_finite(3, **{"train/loss": 0.5})  # finite: nothing happens
    with pytest.raises(cli.UserError, match=r"step 4: non-finite train/loss = nan.*no checkpoint"):
        run.stop_unless_finite(3, **{"train/loss": float("nan"), "train/grad_norm": 1.0})
    with pytest.raises(cli.UserError, match="train/grad_norm = inf"):
        run.stop_unless_finite(3, **{"train/loss": 1.0, "train/grad_norm": float("inf")})


def test_non_finite_weights_are_refused(micro_sft, tmp_path):
    from safetensors.torch import save_file
    bad = tmp_path / "nan_sft"
    shutil.copytree(micro_sft, bad)
    w = weights(bad)
    name = sorted(w)[0]
    w[name] = torch.full_like(w[name], float("nan"))
    save_file(w, str(bad / "model.safetensors"))
    tok = loading.load_tokenizer(str(bad))
    with pytest.raises(cli.UserError, match="non-finite weights"):
        loading.load_causal_lm(str(bad), tok)


# --- 2. one process per run folder, one iterate.sh per RUN_DIR ---------------------------------
@pytest.mark.slow
def test_a_second_process_is_refused_and_a_stale_lock_taken(micro, tmp_path):
    out = tmp_path / "sft"
    os.makedirs(out)
    holder = subprocess.Popen([sys.executable, "-c", f"import run_folder, time; run_folder.lock({str(out)!r}); "
                               "print('locked', flush=True); time.sleep(120)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(cli.UserError, match=rf"in use by pid {holder.pid}"):
            sft.main(sft_argv(micro, out))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    sft.main(sft_argv(micro, out))  # the killed holder's lock is simply taken
    assert run_folder.is_done(out)


# --- 3. DONE stands for its settings ----------------------------------------------------------
def test_done_with_other_settings_is_refused(micro, tmp_path, capsys):
    out = tmp_path / "sft"
    sft.main(sft_argv(micro, out))
    stamp = os.path.getmtime(out / "DONE")
    with pytest.raises(cli.UserError, match=r"done with other settings \(--max_steps 2 -> 3"):
        sft.main(sft_argv(micro, out, "--max_steps", "3"))
    # flags that change nothing computed, and other spellings of the same paths, still skip
    capsys.readouterr()
    sft.main(sft_argv(micro, os.path.abspath(out), "--save_every", "7", "--data",
                      "./" + os.path.relpath(f"{micro['data']}/sft.jsonl")))
    assert "same settings): skipping" in capsys.readouterr().out
    assert os.path.getmtime(out / "DONE") == stamp


def test_a_folder_done_by_another_stage_is_refused(micro, micro_sft, micro_rm, tmp_path):
    """A vanilla RM's folder is not a MetaRM's, an SFT folder not a sample's: the second stage
    refuses, naming both, and leaves the folder as it was."""
    rm_copy, sft_copy = shutil.copytree(micro_rm, tmp_path / "rm"), shutil.copytree(micro_sft, tmp_path / "sft")
    before = (rm_copy / "DONE").read_text()
    samples = tmp_path / "samples"
    sample.main(["--policy_dir", micro_sft, "--prompts", f"{micro['data']}/prompts_train.jsonl", "--output_dir",
                 str(samples), "--max_prompts", "4", "--k", "2", "--max_new_tokens", "4"])
    with pytest.raises(cli.UserError, match=r"holds the output of reward_model, not of metarm: use another --output_dir"):
        metarm.main(["--sft_dir", micro_sft, "--data", f"{micro['data']}/pairs_train.jsonl", "--eval_data", "",
                     "--meta_data", str(samples / "meta.jsonl"), "--output_dir", str(rm_copy), "--max_steps", "1"])
    assert (rm_copy / "DONE").read_text() == before
    with pytest.raises(cli.UserError, match=r"holds the output of sft, not of sample"):
        sample.main(["--policy_dir", micro_sft, "--prompts", f"{micro['data']}/prompts_train.jsonl",
                     "--output_dir", str(sft_copy), "--max_prompts", "4"])


@pytest.mark.parametrize("marker", ["{}", "[]", "null", '{"stage": "sft"}', '{"settings": {}}'])
def test_a_done_marker_this_project_did_not_write_is_refused(micro, tmp_path, marker):
    out = tmp_path / "sft"
    out.mkdir()
    (out / "DONE").write_text(marker)
    with pytest.raises(cli.UserError, match=r"DONE is not a marker this project's stages write"):
        sft.main(sft_argv(micro, out))


def test_fresh_start_does_not_keep_old_metrics(micro, tmp_path):
    """A run killed before its first checkpoint leaves metrics.jsonl: the restart starts it over."""
    out = tmp_path / "sft"
    os.makedirs(out)
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 9.9}) + "\n")
    sft.main(sft_argv(micro, out))
    assert [m["step"] for m in metrics(out)] == [1, 2]


def test_checkpoint_goes_only_after_done(micro, tmp_path, monkeypatch):
    """A kill between DONE and removing the checkpoint must leave DONE, not a folder to redo."""
    out = str(tmp_path / "r")
    run = run_folder.Run.open(out, sft.Args(output_dir=out), distributed.Dist(), "sft")
    os.makedirs(os.path.join(out, "checkpoint"))
    open(os.path.join(out, "checkpoint", "state.json"), "w").write('{"step": 1}')

    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        run.finish({"stage": "test"})
    assert run_folder.is_done(out)


# --- 4. the right kind of model in each place ----------------------------------------------------
def ppo_argv(micro, policy, rm_dir, out, *extra):
    return ["--policy_dir", policy, "--rm_dir", rm_dir, "--prompts", f"{micro['data']}/prompts_train.jsonl",
            "--output_dir", str(out), "--steps", "2", "--queries", "4", "--max_new_tokens", "8", *extra]


def test_wrong_model_kinds_are_refused(micro, micro_sft, micro_rm, tmp_path):
    with pytest.raises(cli.UserError, match=r"sft is not a reward model"):
        ppo.main(ppo_argv(micro, micro_sft, micro_sft, tmp_path / "a"))
    with pytest.raises(cli.UserError, match=r"rm is a reward model .* not a causal LM"):
        ppo.main(ppo_argv(micro, micro_rm, micro_rm, tmp_path / "b"))
    with pytest.raises(cli.UserError, match=r"rm is a reward model, not the SFT model"):
        rm.main(["--sft_dir", micro_rm, "--data", f"{micro['data']}/pairs_train.jsonl", "--eval_data", "",
                 "--output_dir", str(tmp_path / "c")])
    no_stats = tmp_path / "rm_no_stats"
    shutil.copytree(micro_rm, no_stats)
    os.remove(no_stats / "reward_stats.json")
    with pytest.raises(cli.UserError, match="no reward_stats.json"):
        ppo.main(ppo_argv(micro, micro_sft, str(no_stats), tmp_path / "d"))


def test_tokenizers_must_agree(micro, micro_sft, micro_rm, tmp_path):
    other = tmp_path / "rm_other_tok"
    shutil.copytree(micro_rm, other)
    tok = loading.load_tokenizer(str(other))
    tok.add_tokens(["zzzz"])
    tok.save_pretrained(str(other))
    with pytest.raises(cli.UserError, match=r"tokenizers of .*sft and .*rm_other_tok differ"):
        ppo.main(ppo_argv(micro, micro_sft, str(other), tmp_path / "p"))
    # --init_rm went around the check: every loader goes through it now, and nothing is written
    # (metarm.py had the flag too; it starts from the SFT model only now)
    samples = tmp_path / "samples"
    sample.main(["--policy_dir", micro_sft, "--prompts", f"{micro['data']}/prompts_train.jsonl", "--output_dir",
                 str(samples), "--max_prompts", "4", "--k", "2", "--max_new_tokens", "4"])
    out = tmp_path / "bilevel"
    with pytest.raises(cli.UserError, match=r"tokenizers of .*sft and .*rm_other_tok differ"):
        bilevel_rm.main(["--sft_dir", micro_sft, "--init_rm", str(other), "--data", f"{micro['data']}/pairs_train.jsonl",
                         "--eval_data", "", "--output_dir", str(out), "--support", str(samples / "meta.jsonl"), "--steps", "1"])
    assert not run_folder.is_done(out) and not os.path.exists(out / "model.safetensors")
    other_lm = tmp_path / "sft_other_tok"
    shutil.copytree(micro_sft, other_lm)
    tok.save_pretrained(str(other_lm))
    with pytest.raises(cli.UserError, match=r"tokenizers of .*sft and .*sft_other_tok differ"):
        ppo.main(ppo_argv(micro, micro_sft, micro_rm, tmp_path / "q") + ["--ref_dir", str(other_lm)])


# --- 5. every numeric flag is checked when the command line is parsed ----------------------------
@pytest.mark.parametrize("stage,flag,value", [
    (sft, "global_batch", "-4"), (sft, "max_steps", "-5"), (sft, "micro_batch", "-1"), (sft, "lr", "-1e-3"),
    (sft, "save_every", "0"), (sft, "epochs", "0"), (sft, "max_len", "0"),
    (rm, "global_batch", "0"), (rm, "eval_every", "0"), (rm, "lr", "0"), (rm, "warmup", "-0.1"),
    (metarm, "eta", "-0.1"), (metarm, "meta_batch", "0"), (metarm, "lr", "nan"),
    (dpo, "beta", "0"), (dpo, "global_batch", "-2"),
    (ppo, "queries", "0"), (ppo, "mini_batches", "0"), (ppo, "temperature", "0"),
    (sample, "k", "0"), (sample, "k", "1"), (sample, "max_prompts", "-1"), (sample, "top_p", "0"),
    (ppo, "rollouts_per_query", "0"), (ppo, "ppo_epochs", "0"), (ppo, "policy_lr", "-1"), (ppo, "top_p", "0"),
    (ppo, "top_p", "1.5"), (ppo, "gamma", "2"), (ppo, "max_new_tokens", "0"), (ppo, "steps", "-1"),
    (ppo, "kl_coef", "-0.05"), (ppo, "snapshot_every", "-1"),
    (sft, "seed", "-1"), (sample, "seed", "-1"), (evaluate, "n_boot", "0"), (evaluate, "tie_margin", "nan"),
    (evaluate, "rounds", "0"), (evaluate, "n_prompts", "0"), (evaluate, "temperature", "0"), (evaluate, "top_p", "2"),
])
def test_bad_flag_is_one_line_at_parse_time(stage, flag, value):
    with pytest.raises(cli.UserError, match=rf"^--{flag} {float(value):g}: must be"):
        cli.parse_args(stage.Args, "", [f"--{flag}={value}"])


STAGES = [sft, rm, metarm, ppo, sample, dpo, bilevel_rm, evaluate]


@pytest.mark.parametrize("stage", STAGES, ids=lambda m: m.__name__)
def test_every_numeric_flag_has_a_check_and_help_prints(stage, capsys):
    """A new int or float flag without a check would take any value; --help formats every help
    text (a bare % in one was a crash)."""
    import dataclasses
    unchecked = [f.name for f in dataclasses.fields(stage.Args) if f.type in (int, float) and not f.metadata["check"]]
    assert unchecked == [], unchecked
    with pytest.raises(SystemExit) as e:
        cli.parse_args(stage.Args, stage.__doc__, ["--help"])
    assert e.value.code == 0 and "--seed SEED" in capsys.readouterr().out


@pytest.mark.parametrize("flag,value,rule", [("num_layers", "-1", ">= 1"), ("hidden_size", "30", "a multiple of 4"),
                                             ("seed", "-2", ">= 0"), ("agreement", "0.3", "in (0.5, 1]"),
                                             ("test_pairs", "0", ">= 1")])
def test_task_flags_are_checked_before_anything_is_written(tmp_path, flag, value, rule):
    import task
    with pytest.raises(SystemExit, match=re.escape(f"task.py: --{flag} {float(value):g}: must be {rule}")):
        task.main(["--out_dir", str(tmp_path / "task"), f"--{flag}={value}"])
    assert not os.path.exists(tmp_path / "task")


def test_a_shortened_flag_is_not_taken_for_a_longer_one(capsys):
    """argparse would read --kl as --kl_coef and --out as --output_dir; here both are errors."""
    for argv in (["--kl_c=0.1"], ["--out=x"]):
        with pytest.raises(SystemExit):
            cli.parse_args(ppo.Args, "", argv)
        assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.slow
def test_bad_flag_from_the_command_line():
    """Through a real `python ppo.py` (assert_cli_error runs the same guard in this process)."""
    p = run_script("ppo.py", "--queries", "0", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1] == "error: --queries 0: must be > 0", p.stderr


# --- 6. loaders: undecodable bytes, malformed real-schema rows, invalid JSON; every drop counted --
def write_lines(path, lines):
    with open(path, "wb") as f:
        f.write(b"\n".join(l if isinstance(l, bytes) else json.dumps(l).encode() for l in lines) + b"\n")
    return str(path)


GOOD = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"}


@pytest.mark.parametrize("line,error,reason", [
    (b'{"chosen": "\xff\xfe"}', r"not UTF-8 text \(byte 0xff at column 13\)", "not UTF-8 text"),
    (b'{"chosen": ', r"not valid JSON", "not valid JSON")])
def test_undecodable_row_is_named_and_skippable(tmp_path, capsys, line, error, reason):
    path = write_lines(tmp_path / "p.jsonl", [GOOD, line, GOOD])
    with pytest.raises(data.DataError, match=rf"p.jsonl, row 2: {error}"):
        data.load_pairs(path)
    assert len(data.load_pairs(path, skip_bad=True)) == 2
    assert f"skipped 1 rows (1 x {reason})" in capsys.readouterr().out


@pytest.mark.parametrize("row,message", [
    ({"info": {"post": "a post"}, "summaries": ["just a string", "another"], "choice": 0}, "a TL;DR comparison needs"),
    ({"info": {"title": "t"}, "summaries": [{"text": "a"}, {"text": "b"}], "choice": 1}, "non-empty 'post'"),
    ({"prompt": "how?", "response_0": "a", "safer_response_id": 0}, "missing key 'response_1'"),
    ({"prompt": "how?", "response_0": "a", "response_1": 7, "safer_response_id": 1}, "'response_1' should be a string"),
    ({"prompt": "how?", "response_0": "a", "response_1": "b", "safer_response_id": 2}, "missing or bad 'safer_response_id'"),
])
def test_malformed_real_schema_rows(tmp_path, row, message, capsys):
    path = write_lines(tmp_path / "real.jsonl", [row, GOOD])
    with pytest.raises(data.DataError, match=rf"real.jsonl, row 1: .*{re.escape(message)}"):
        data.load_pairs(path)
    assert len(data.load_pairs(path, skip_bad=True)) == 1
    assert "skipped 1 rows" in capsys.readouterr().out


def test_empty_prompt_is_counted_and_reasons_are_whole(tmp_path, capsys):
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": ""}, {"prompt": "hi"}, {"prompt": "\n\nHuman: x"}])
    with pytest.raises(data.DataError, match="row 1: empty prompt"):
        data.load_prompts(path)
    assert [p for p, _ in data.load_prompts(path, skip_bad=True)] == ["\n\nHuman: hi\n\nAssistant:"]
    out = capsys.readouterr().out
    assert "skipped 2 rows (1 x empty prompt, 1 x a prompt that starts with '\\n\\nHuman:' must end with " \
           "'\\n\\nAssistant:')" in out


def test_meta_rows_of_another_k(tmp_path, capsys):
    row = lambda k: {"prompt": "hi", "responses": [f" r{i}" for i in range(k)]}
    path = write_lines(tmp_path / "m.jsonl", [row(4)] + [row(5)] * 39)
    with pytest.raises(data.DataError, match=r"m.jsonl, row 2: has another number of responses than the first rows' 4"):
        data.load_meta(path)
    kept = data.load_meta(path, skip_bad=True)  # the most common k wins, the odd row is counted
    assert len(kept) == 39 and {len(rs) for _, rs, _ in kept} == {5}
    assert "skipped 1 rows (1 x has another number of responses than the most common rows' 5)" in capsys.readouterr().out


def test_cuts_are_reported(micro, micro_sft, micro_rm, tmp_path, capsys):
    """PPO prompts cut to --max_prompt_len, and meta and held-out rows cut to --max_len, are counted."""
    capsys.readouterr()
    ppo.main(ppo_argv(micro, micro_sft, micro_rm, tmp_path / "ppo", "--steps", "1",
                      "--max_prompt_len", "6", "--truncate", "true"))
    assert "prompts truncated (cut from the left, --max_prompt_len 6)" in capsys.readouterr().out
    meta = write_lines(tmp_path / "meta.jsonl", [{"prompt": "\n\nHuman: hi\n\nAssistant:",
                                                  "responses": [" yes " * 40, " no"]}] * 4)
    metarm.main(["--sft_dir", micro_sft, "--data", f"{micro['data']}/pairs_train.jsonl",
                 "--eval_data", f"{micro['data']}/pairs_test.jsonl", "--meta_data", meta,
                 "--output_dir", str(tmp_path / "m"), "--max_len", "40", "--truncate", "true",
                 "--max_steps", "1", "--global_batch", "4", "--meta_batch", "2"])
    out = capsys.readouterr().out
    assert f"{meta}: 4 rows truncated (response cut from the right, --max_len 40)" in out
    assert "pairs_test.jsonl: " in out and "rows truncated" in out.split("pairs_test.jsonl: ")[1]


# --- 7. a killed PPO run resumes to the uninterrupted run's result, bit for bit -------------------
@pytest.mark.slow
def test_killed_ppo_resumes_bit_identically(micro, micro_sft, micro_rm, tmp_path):
    argv = lambda out: ["ppo.py", *ppo_argv(micro, micro_sft, micro_rm, out, "--steps", "6", "--save_every", "2")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # one thread each: the two run side by side
    whole = subprocess.Popen([sys.executable, *argv(tmp_path / "whole")], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=env)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *argv(out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    t0 = time.time()
    while not (out / "checkpoint" / "state.json").exists():
        assert proc.poll() is None and time.time() - t0 < 300, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not run_folder.is_done(out)
    run_script(*argv(out), env={"OMP_NUM_THREADS": "1"})
    assert whole.wait(timeout=600) == 0, whole.stderr.read()[-3000:]
    a, b = weights(tmp_path / "whole"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [m["step"] for m in metrics(out)]
    assert steps == sorted(set(steps)) == list(range(1, 7))
    whole = [m["objective/scores"] for m in metrics(tmp_path / "whole")]
    assert [m["objective/scores"] for m in metrics(out)] == whole


# --- 8. damaged files: one line naming the file and what to delete ----------------------------
def test_damaged_model_folders(micro_sft, tmp_path):
    tok = loading.load_tokenizer(micro_sft)
    broken = tmp_path / "broken"
    shutil.copytree(micro_sft, broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(cli.UserError, match=r"cannot load .*broken .*the folder is damaged; delete it"):
        loading.load_causal_lm(str(broken), tok)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(cli.UserError, match=r"broken/config.json is damaged"):
        loading.load_causal_lm(str(broken), tok)
    empty = tmp_path / "no_weights"
    shutil.copytree(micro_sft, empty)
    os.remove(empty / "model.safetensors")
    with pytest.raises(cli.UserError, match=r"no_weights has a config.json but no weights"):
        loading.load_causal_lm(str(empty), tok)


def test_damaged_checkpoint(micro, tmp_path):
    out = str(tmp_path / "sft")
    run = run_folder.Run.open(out, sft.Args(output_dir=out), distributed.Dist(), "sft")
    model = loading.load_causal_lm(micro["base"], loading.load_tokenizer(micro["base"]))
    opt = torch.optim.AdamW(model.parameters())
    run.save_checkpoint(1, {"model": (model, opt)})
    for name in os.listdir(os.path.join(out, "checkpoint")):
        if name.endswith(".distcp"):
            with open(os.path.join(out, "checkpoint", name), "r+b") as f:
                f.truncate(10)
    with pytest.raises(cli.UserError, match=r"the checkpoint .*checkpoint cannot be read .*delete it"):
        run.load_checkpoint({"model": (model, opt)})


class _Payload:
    """Unpickled, creates the file it names: what a crafted checkpoint would do."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def small_checkpoint(tmp_path):
    out = str(tmp_path / "sft")
    run = run_folder.Run.open(out, sft.Args(output_dir=out), distributed.Dist(), "sft")
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(1, 3)).sum().backward()
    opt.step()
    run.save_checkpoint(1, {"model": (model, opt)})
    return run, model, opt, os.path.join(out, "checkpoint")


def test_a_crafted_checkpoint_metadata_runs_no_code(tmp_path, capfd):
    import pickle
    run, model, opt, ckpt = small_checkpoint(tmp_path)
    marker = tmp_path / "ran"
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        pickle.dump(_Payload(str(marker)), f)
    with pytest.raises(cli.UserError, match=r"cannot be read \(.*(builtins|io)\.open is not part of a checkpoint's metadata"):
        run.load_checkpoint({"model": (model, opt)})
    assert not marker.exists()
    assert "Traceback" not in capfd.readouterr().err


def test_a_checkpoint_resumes_through_the_restricted_readers(tmp_path):
    """The optimizer's non-tensor entries (its param_groups) are plain data: they pass the
    weights-only check and come back as saved."""
    run, model, opt, ckpt = small_checkpoint(tmp_path)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.state_dict()["param_groups"]]
    with torch.no_grad():
        model.weight.zero_()
    opt2 = torch.optim.AdamW(model.parameters(), lr=0.5)
    assert run.load_checkpoint({"model": (model, opt2)})["step"] == 1
    assert all(torch.equal(model.state_dict()[k], want[k]) for k in want)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt2.state_dict()["param_groups"]] == groups


def test_a_crafted_checkpoint_entry_is_not_unpickled(tmp_path):
    import io
    import pickle
    marker = tmp_path / "ran"
    _, planner = run_folder._checkpoint_reader(str(tmp_path))
    with pytest.raises(pickle.UnpicklingError):
        planner.load_bytes(None, io.BytesIO(pickle.dumps(_Payload(str(marker)))))
    assert not marker.exists()


def test_a_checkpoint_without_metadata_is_one_line(tmp_path, capfd):
    run, model, opt, ckpt = small_checkpoint(tmp_path)
    os.remove(os.path.join(ckpt, ".metadata"))
    with pytest.raises(cli.UserError, match=r"has no .metadata \(an unfinished save\?\): delete it"):
        run.load_checkpoint({"model": (model, opt)})
    assert "Traceback" not in capfd.readouterr().err


def test_a_checkpoint_is_resumed_under_the_settings_it_was_saved_with(tmp_path):
    """args.json is rewritten by every start; the checkpoint's own record of its settings and
    stage is what a resume is held to."""
    run, *_ = small_checkpoint(tmp_path)
    out = run.path
    with open(os.path.join(out, "args.json")) as f:
        edited = {**json.load(f), "lr": 0.5}
    with open(os.path.join(out, "args.json"), "w") as f:
        json.dump(edited, f)
    with pytest.raises(cli.UserError, match=r"holds a checkpoint of a run with other arguments \(--lr 0.005 -> 0.5"):
        run_folder.Run.open(out, sft.Args(output_dir=out, lr=0.5), distributed.Dist(), "sft")
    assert run_folder.Run.open(out, sft.Args(output_dir=out), distributed.Dist(), "sft").has_checkpoint()
    with pytest.raises(cli.UserError, match=r"holds a checkpoint of sft, not of dpo"):
        run_folder.Run.open(out, dpo.Args(output_dir=out), distributed.Dist(), "dpo")


def test_snapshot_done_is_written_last(micro_sft, tmp_path, monkeypatch):
    tok = loading.load_tokenizer(micro_sft)
    model = loading.load_causal_lm(micro_sft, tok)
    moved = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (moved.append(os.path.basename(b)), real(a, b)))
    os.makedirs(tmp_path / "snap")
    loading.save_model(model, tok, str(tmp_path / "snap"), distributed.Dist(), extra={"DONE": {"step": 1}})
    assert moved[-1] == "DONE" and "model.safetensors" in moved


def test_unwritable_folder_is_one_line(micro, capsys):
    assert_cli_error("sft.py", *sft_argv(micro, "/sys/kernel/no_such_dir/sft"), message="cannot write in /sys/kernel",
                     capsys=capsys)


def test_evaluate_on_a_missing_unfinished_or_damaged_seed_is_one_line(micro, micro_sft, tmp_path):
    with pytest.raises(cli.UserError, match=r"--run_dir .*nowhere/seed1 does not exist"):
        evaluate.main(["--run_dir", str(tmp_path / "nowhere" / "seed1"), "--prompts", f"{micro['data']}/prompts_test.jsonl"])
    seed = tmp_path / "run" / "seed1"
    shutil.copytree(micro_sft, seed / "sft")
    argv = ["--run_dir", str(seed), "--prompts", f"{micro['data']}/prompts_test.jsonl", "--rounds", "1"]
    with pytest.raises(cli.UserError, match=r"seed1/layout.jsonl does not exist: iterate.sh writes"):
        evaluate.main(argv)
    (seed / "layout.jsonl").write_text('{"name": "sft", "policy": "sft"}\n{"name": "vanilla_ppo/step4", "policy": [')
    with pytest.raises(cli.UserError, match=r"layout.jsonl, line 2: not the record of one folder \(damaged\)"):
        evaluate.main(argv)
    (seed / "layout.jsonl").write_text('{"name": "sft", "policy": "sft"}\n'
                                       '{"name": "vanilla_ppo/step4", "policy": "ppo_vanilla", "log": "ppo_vanilla", "steps": 4}\n')
    (seed / "ppo_vanilla").mkdir()
    (seed / "ppo_vanilla" / "args.json").write_text('{"steps": 4}')  # started, never finished
    with pytest.raises(cli.UserError, match=r"ppo_vanilla is not done \(no DONE marker\)"):
        evaluate.main(argv)
    (seed / "eval").mkdir()
    (seed / "eval" / "results.json").write_text('{"config": ')
    with pytest.raises(cli.UserError, match=r"results.json is damaged"):
        evaluate.main(["--aggregate", str(tmp_path / "run"), "--seeds", "1"])


def test_a_full_disk_is_one_line_naming_the_folder(micro, micro_sft, tmp_path, monkeypatch, capsys):
    """A write that fails for want of space (an OSError with no file name, as a file object's
    write raises it; or a library's own error saying so) ends in one line naming the folder."""
    import errno
    out = tmp_path / "samples"
    real = os.replace

    def full(src, dst):
        if str(dst).endswith("meta.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)
    monkeypatch.setattr(os, "replace", full)
    assert_cli_error("sample.py", "--policy_dir", micro_sft, "--prompts", f"{micro['data']}/prompts_train.jsonl",
                     "--output_dir", str(out), "--max_prompts", "2", "--k", "2", "--max_new_tokens", "4",
                     message=f"cannot write in {out}: No space left on device; free the space", capsys=capsys)
    monkeypatch.setattr(os, "replace", real)
    assert not run_folder.is_done(out)

    def library_error(*a, **k):
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                           '"No space left on device" })')
    monkeypatch.setattr(loading, "save_model", library_error)
    assert_cli_error("reward_model.py", "--sft_dir", micro_sft, "--data", f"{micro['data']}/pairs_train.jsonl",
                     "--eval_data", "", "--output_dir", str(tmp_path / "rm"), "--max_steps", "1",
                     message=f"cannot write in {tmp_path / 'rm'}: No space left on device", capsys=capsys)


def test_a_batch_larger_than_its_rows_is_refused(micro, micro_sft, micro_rm, tmp_path):
    """A batch of more rows than there are would hold rows twice in one step, silently."""
    with pytest.raises(cli.UserError, match=r"--global_batch 100000: more than the \d+ rows it is drawn from"):
        sft.main(sft_argv(micro, tmp_path / "sft", "--global_batch", "100000"))
    with pytest.raises(cli.UserError, match=r"--queries 100000: more than the \d+ rows"):
        ppo.main(ppo_argv(micro, micro_sft, micro_rm, tmp_path / "ppo", "--queries", "100000"))
