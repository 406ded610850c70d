"""The commands the README, the docs pages and the stages' docstrings show. Every one parses: its
script exists and each flag is one the stage has, with a valid value (a renamed flag breaks this
test). And the one-process commands on the default layout run, verbatim, in the order a reader
would run them, in a folder whose runs/default/task is the micro task."""
import glob
import importlib
import os
import re
import shlex
import shutil
import subprocess

import pytest

import cli
from conftest import ROOT

STAGES = ["sft", "reward_model", "sample", "metarm", "bilevel_rm", "ppo", "dpo", "gradcheck", "evaluate"]  # the order they run in
TOOLS = {"gradcheck"}  # in tools/


def module(script):
    return importlib.import_module(f"tools.{script}" if script in TOOLS else script)
# what a stage's default command reads comes from the level before: sft; then the vanilla RM, the SFT
# samples and DPO (from sft); then the rest (from the RM and the samples)
LEVEL = {"sft": 0, "reward_model": 1, "sample": 1, "dpo": 1,
         "metarm": 2, "bilevel_rm": 2, "ppo": 2, "gradcheck": 2, "evaluate": 2}


def documented_commands():
    """(where, launcher, script, argv) for every 'python X.py ...' or 'torchrun ... X.py ...' line
    (with its backslash continuations) in README.md, docs/*.md and the stage files' docstrings."""
    texts = [(p, open(p).read()) for p in [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "*.md"))]]
    for name in STAGES:
        texts.append((f"{name}.py", module(name).__doc__ or ""))
    for where, text in texts:
        text = text.replace("\\\\\n", " ").replace("\\\n", " ")
        for line in text.splitlines():
            spans = re.findall(r"`([^`]*)`", line) if "`" in line else [line]  # prose: its code spans
            for cmd in spans:
                cmd = cmd.strip().lstrip("$ ").split("  #")[0].split(" # ")[0]
                m = re.match(r"^(?:[A-Z_]+=\S+ )*(python|torchrun)\b.*?(\b\w+)\.py\b(.*)$", cmd)
                if m and m.group(2) in STAGES:
                    yield where, m.group(1), m.group(2), shlex.split(m.group(3).split("&&")[0].split("|")[0])


COMMANDS = list(documented_commands())


def test_the_docs_show_commands_of_every_stage():
    assert {script for _, _, script, _ in COMMANDS} >= set(STAGES)


@pytest.mark.parametrize("where,launcher,script,argv", COMMANDS,
                         ids=[f"{w}:{s}:{i}" for i, (w, _, s, _) in enumerate(COMMANDS)])
def test_documented_command_parses(where, launcher, script, argv):
    stage = module(script)
    try:
        cli.parse_args(stage.Args, "", argv)
    except SystemExit:
        pytest.fail(f"{where}: `{script}.py {' '.join(argv)}` does not parse")


def runnable_here(launcher, argv):
    """One process, on the default layout: not the 7B recipes, not the recorded experiment
    (runs/exp), not the 26 M "larger" model (its own task.py folder), no placeholders (RM_DIR, P), and nothing that needs a whole multi-round run
    (a later round's policy, a seed's evaluation, several seeds)."""
    words = " ".join(argv)
    return (launcher == "python" and not re.search(r"runs/(7b|exp|larger)|\b[A-Z][A-Z_]*\b|/round\d", words)
            and "--run_dir" not in argv and "--aggregate" not in argv)


@pytest.mark.slow
def test_documented_commands_run_verbatim(micro, tmp_path, monkeypatch, capsys):
    """Each distinct runnable command, once, stages in pipeline order, each as its `python X.py`
    does (cli.guard around main, here in this process, in a folder whose runs/default/task is
    the micro task, its SFT rows and training prompts cut to 64: the defaults that read every row
    do less work, and every command runs the same code): none ends in an error."""
    task = tmp_path / "runs" / "default" / "task"
    shutil.copytree(micro["data"], task / "data")
    shutil.copytree(micro["base"], task / "base_model")
    for name in ("sft.jsonl", "prompts_train.jsonl"):  # 64: still two of each default batch (32)
        path = task / "data" / name
        path.write_text("".join(path.read_text().splitlines(keepends=True)[:64]))
    (task / "DONE").write_text("{}")
    todo = sorted({(script, tuple(argv)) for _, launcher, script, argv in COMMANDS if runnable_here(launcher, argv)},
                  key=lambda c: (STAGES.index(c[0]), len(c[1])))
    assert [s for s, _ in todo].count("sft") and [s for s, _ in todo].count("evaluate")
    monkeypatch.chdir(tmp_path)
    for script, argv in todo:
        # a folder under /tmp goes under this test's folder: no run left there from elsewhere is reused
        argv = [str(tmp_path / a[1:]) if a.startswith("/tmp/") else a for a in argv]
        try:
            cli.guard(lambda: module(script).main(argv))
        except SystemExit as e:
            pytest.fail(f"python {script}.py {' '.join(argv)}: exit status {e.code}\n{capsys.readouterr().err[-3000:]}")


PRESET_FLAGS = {"SFT_ARGS": "sft", "RM_ARGS": "reward_model", "METARM_ARGS": "metarm", "SAMPLE_ARGS": "sample",
                "PPO_ARGS": "ppo", "DPO_ARGS": "dpo", "EVAL_ARGS": "evaluate"}


@pytest.mark.parametrize("preset", sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "presets", "*.sh"))))
def test_preset_flags_parse(preset):
    """Each preset sets every stage's extra flags (SFT_ARGS, ..., EVAL_ARGS: the tiny model's defaults
    would be wrong at 7B), and each is a flag that stage has."""
    env = {k: v for k, v in os.environ.items() if k not in PRESET_FLAGS}
    show = "; ".join(f'printf "%s\\n" "${name}"' for name in PRESET_FLAGS)
    p = subprocess.run(["bash", "-c", f"JUDGE=some/judge; source presets/{preset}; {show}"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    values = p.stdout.split("\n")[:len(PRESET_FLAGS)]
    assert len(values) == len(PRESET_FLAGS) and all(values), p.stdout
    for (name, script), value in zip(PRESET_FLAGS.items(), values):
        try:
            cli.parse_args(importlib.import_module(script).Args, "", shlex.split(value))
        except SystemExit:
            pytest.fail(f"presets/{preset}: {name}={value!r} has a flag {script}.py does not")
