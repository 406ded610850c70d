"""Shared fixtures: a micro version of the embedded task (small files, a tiny model) built once
per test session, and helpers to run the stage scripts as a user would."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["HF_HUB_OFFLINE"] = "1"

import task  # noqa: E402


def run_script(*argv, nproc=1, check=True, env=None, timeout=600):
    """Run a stage script (under torchrun when nproc > 1); returns the CompletedProcess."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + os.getpid() % 1000)] + list(argv)
    else:
        cmd = [sys.executable] + list(argv)
    e = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=e, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def assert_cli_error(script, *argv, message):
    """Run a stage from the command line and check that a user mistake ends as it should: exit
    status 2 and one last 'error: ...' line containing `message`, no traceback."""
    p = run_script(script, *argv, check=False)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and message in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error:"), p.stderr


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def micro(tmp_path_factory):
    """A micro task: the real generator with few rows, and a 2-layer, width-32 Llama."""
    root = tmp_path_factory.mktemp("micro")
    data_dir = str(root / "data")
    task.build_data(data_dir, seed=0, n_sft=200, n_pairs=200, n_test_pairs=64, n_test_prompts=100,
                    n_ood_test=100)
    task.build_base_model(data_dir, str(root / "base"), seed=0, hidden_size=32, num_layers=2,
                          num_heads=2, intermediate_size=64)
    return {"root": str(root), "data": data_dir, "base": str(root / "base")}


@pytest.fixture(scope="session")
def micro_sft(micro):
    """The micro base model after a few SFT steps (what reward-model tests start from)."""
    out = os.path.join(micro["root"], "sft")
    run_script("sft.py", "--model_name_or_path", micro["base"], "--data", f"{micro['data']}/sft.jsonl",
               "--output_dir", out, "--max_steps", "12", "--global_batch", "16")
    return out


@pytest.fixture(scope="session")
def micro_rm(micro, micro_sft):
    """A reward model trained briefly from the micro SFT model."""
    out = os.path.join(micro["root"], "rm")
    run_script("reward_model.py", "--sft_dir", micro_sft, "--data", f"{micro['data']}/pairs_train.jsonl",
               "--eval_data", f"{micro['data']}/pairs_test.jsonl", "--output_dir", out,
               "--epochs", "2", "--global_batch", "16", "--lr", "3e-3", "--eval_every", "1000")
    return out
