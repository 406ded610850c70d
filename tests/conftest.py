"""Shared fixtures: a micro version of the embedded task (small files, a tiny model) built once
per test session, and helpers to run the stage scripts as a user would.

Two tiers. `pytest` runs the in-process checks: the meta-gradients and the other gradients, the
losses and statistics by hand, data validation, each stage's own unit checks. `pytest --slow`
adds the tests marked `slow`: everything that starts another process (a stage script, torchrun,
iterate.sh), kills and resumes, the documented commands, the presets and the pretrained model.
A test that starts a stage script and is not marked slow fails (run_script checks)."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["HF_HUB_OFFLINE"] = "1"

import cli  # noqa: E402
import modeling  # noqa: E402
import task  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="also run the slow tier (stage scripts, torchrun, iterate.sh, kills, the pretrained model)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the slow tier, run by `pytest --slow` (another process, or minutes)")


def pytest_collection_modifyitems(config, items):
    """The meta-gradient checks (test_metarm.py) first; without --slow, the slow tier deselected."""
    items.sort(key=lambda item: item.path.name != "test_metarm.py")  # stable: the rest keep their order
    if config.getoption("--slow"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


IN_SLOW_TEST = [False]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):  # before the test's fixtures, which may start stage scripts too
    IN_SLOW_TEST[0] = item.get_closest_marker("slow") is not None


def run_script(*argv, nproc=1, check=True, env=None, timeout=600):
    """Run a stage script (under torchrun when nproc > 1); returns the CompletedProcess. Only
    from a test marked slow: the default tier stays in this process."""
    assert IN_SLOW_TEST[0], "a test that starts a stage script belongs to the slow tier: mark it @pytest.mark.slow"
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


def assert_cli_error(script, *argv, message, capsys):
    """Run a stage as its `if __name__ == "__main__"` does (cli.guard around main, in this
    process) and check that a user mistake ends as it should: exit status 2 and one last
    'error: ...' line containing `message`, no traceback. (The same through a real `python
    stage.py`: test_failures.py::test_bad_flag_from_the_command_line.)"""
    import importlib
    stage = importlib.import_module(script.removesuffix(".py"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.guard(lambda: stage.main(list(argv)))
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err and message in err, err
    assert err.strip().splitlines()[-1].startswith("error:"), err


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
    import sft
    out = os.path.join(micro["root"], "sft")
    sft.main(["--model_name_or_path", micro["base"], "--data", f"{micro['data']}/sft.jsonl",
              "--output_dir", out, "--max_steps", "12", "--global_batch", "16"])
    return out


@pytest.fixture(scope="session")
def micro_rm(micro, micro_sft):
    """A reward model trained briefly from the micro SFT model."""
    import reward_model
    out = os.path.join(micro["root"], "rm")
    reward_model.main(["--sft_dir", micro_sft, "--data", f"{micro['data']}/pairs_train.jsonl",
                       "--eval_data", f"{micro['data']}/pairs_test.jsonl", "--output_dir", out,
                       "--epochs", "2", "--global_batch", "16", "--lr", "3e-3", "--eval_every", "1000"])
    return out


# --- helpers shared by test modules ---------------------------------------------------------
VOCAB = 50


def tiny_reward_model(kind, seed=0):
    """A float64 reward model with dropout off: GPT-2 (no internal float32 casts) or Llama."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2, num_labels=1, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        hf = GPT2ForSequenceClassification(cfg)
    else:
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=0)
        hf = LlamaForSequenceClassification(cfg)
    hf.score.weight.data.normal_(0, 0.3)  # rewards of order one, so J and L have real curvature
    return modeling.ScalarModel(hf).double()


def batch(n_rows, seed, min_len=4, max_len=9):
    """Right-padded random token rows (pad id 0) of different lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n_rows,), generator=g)
    ids = torch.zeros(n_rows, max_len, dtype=torch.long)
    mask = torch.zeros(n_rows, max_len, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, VOCAB, (int(n),), generator=g)
        mask[i, :n] = 1
    return ids, mask


def clear_pairs(path, n, seed):
    """Pairs of the embedded task that the gold judge orders clearly (gap > 1), labelled by it."""
    import random
    import task
    rng, prompts, rows = random.Random(seed), task.all_prompts()[0], []
    while len(rows) < n:
        [(p, a, b)] = task.sample_pairs(rng, prompts, 1)
        ga, gb = task.gold(p, a), task.gold(p, b)
        if abs(ga - gb) > 1.0:
            rows.append({"chosen": p + (a if ga > gb else b), "rejected": p + (b if ga > gb else a)})
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)
