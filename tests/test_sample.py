"""sample.py: the meta-data stage writes a run folder that says what made it, skips when done,
and names a bad prompt row. (Two processes, each sampling a share, return every prompt once, in
order: tests/test_distributed.py.)"""
import json
import re

import pytest

import cli
import data
import run_folder
import sample


def test_writes_a_run_folder_and_skips_when_done(micro, micro_sft, tmp_path, capsys):
    out = tmp_path / "samples"
    argv = ["--policy_dir", micro_sft, "--prompts", f"{micro['data']}/prompts_train.jsonl",
            "--k", "3", "--max_prompts", "10", "--output_dir", str(out), "--max_new_tokens", "8", "--seed", "7"]
    sample.main(argv)
    rows = data.load_meta(str(out / "meta.jsonl"))
    prompts = [p for p, _ in data.load_prompts(f"{micro['data']}/prompts_train.jsonl")][:10]
    assert [p for p, _, _ in rows] == prompts and all(len(rs) == 3 for _, rs, _ in rows)
    made = json.loads((out / "args.json").read_text())
    assert made["policy_dir"] == micro_sft and made["seed"] == 7 and made["k"] == 3
    assert run_folder.is_done(str(out)) and json.loads((out / "DONE").read_text())["prompts"] == 10
    before = (out / "meta.jsonl").read_text()
    sample.main(argv)  # done with the same settings: skipped, nothing rewritten
    assert "is done" in capsys.readouterr().out and (out / "meta.jsonl").read_text() == before
    with pytest.raises(cli.UserError, match=r"--seed 7 -> 8"):
        sample.main([*argv[:-1], "8"])


def test_bad_prompt_row_is_named(micro, micro_sft, tmp_path):
    prompts = [p for p, _ in data.load_prompts(f"{micro['data']}/prompts_train.jsonl")][:1]
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(json.dumps({"prompt": prompts[0]}) + "\n" + json.dumps({"question": "hi"}) + "\n")
    with pytest.raises(cli.UserError, match=re.escape(f"{bad}, row 2: missing key 'prompt'")):
        sample.main(["--policy_dir", micro_sft, "--prompts", str(bad), "--output_dir", str(tmp_path / "m2")])


def test_a_long_prompt_is_named_or_cut_and_counted(micro, micro_sft, tmp_path, capsys):
    argv = ["--policy_dir", micro_sft, "--prompts", f"{micro['data']}/prompts_train.jsonl", "--k", "2",
            "--max_prompts", "3", "--max_new_tokens", "4", "--max_prompt_len", "5"]
    with pytest.raises(cli.UserError, match=r"prompts_train.jsonl: a prompt of \d+ tokens is longer than --max_prompt_len 5"):
        sample.main([*argv, "--output_dir", str(tmp_path / "a")])
    sample.main([*argv, "--output_dir", str(tmp_path / "b"), "--truncate", "true"])
    assert "3 prompts truncated (cut from the left, --max_prompt_len 5)" in capsys.readouterr().out
    assert len(data.load_meta(str(tmp_path / "b" / "meta.jsonl"))) == 3
