"""Every stage command the README, the docs pages and the stages' docstrings show parses: its script
exists and each flag is one the stage has, with a valid value (a renamed flag breaks this test)."""
import glob
import importlib
import os
import re
import shlex

import pytest

import runtime
from conftest import ROOT

STAGES = {"sft", "reward_model", "metarm", "ppo", "dpo", "evaluate"}


def documented_commands():
    """(where, script, argv) for every 'python X.py ...' or 'torchrun ... X.py ...' line (with its
    backslash continuations) in README.md, docs/*.md and the stage files' docstrings."""
    texts = [(p, open(p).read()) for p in [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "*.md"))]]
    for name in STAGES:
        texts.append((f"{name}.py", importlib.import_module(name).__doc__ or ""))
    for where, text in texts:
        text = text.replace("\\\\\n", " ").replace("\\\n", " ")
        for line in text.splitlines():
            spans = re.findall(r"`([^`]*)`", line) if "`" in line else [line]  # prose: its code spans
            for cmd in spans:
                cmd = cmd.strip().lstrip("$ ").split("  #")[0].split(" # ")[0]
                m = re.match(r"^(?:[A-Z_]+=\S+ )*(?:python|torchrun)\b.*?(\b\w+)\.py\b(.*)$", cmd)
                if m and m.group(1) in STAGES:
                    yield where, m.group(1), shlex.split(m.group(2).split("&&")[0].split("|")[0])


COMMANDS = list(documented_commands())


def test_the_docs_show_commands_of_every_stage():
    assert {script for _, script, _ in COMMANDS} >= {"sft", "reward_model", "metarm", "ppo", "dpo"}


@pytest.mark.parametrize("where,script,argv", COMMANDS, ids=[f"{w}:{s}:{i}" for i, (w, s, _) in enumerate(COMMANDS)])
def test_documented_command_parses(where, script, argv):
    stage = importlib.import_module(script)
    if not hasattr(stage, "Args"):
        pytest.fail(f"{where}: {script}.py has no Args")
    try:
        runtime.parse_args(stage.Args, "", argv)
    except SystemExit:
        pytest.fail(f"{where}: `{script}.py {' '.join(argv)}` does not parse")
