"""sft.py: the loss by hand, a run end to end, and resuming after a kill. (Two processes against one:
tests/test_distributed.py.)"""
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import data
import distributed
import loading
import run_folder
import sft
from conftest import ROOT, metrics


def test_loss_counts_response_tokens_only(micro):
    tok = loading.load_tokenizer(micro["base"])
    model = loading.load_causal_lm(micro["base"], tok)
    rows = data.load_sft(os.path.join(micro["data"], "sft.jsonl"))[:5]
    enc = data.Encoder(tok, 128)
    examples = [enc(p, r) for p, r, _ in rows]
    ids, mask, labels = data.response_batch(examples, tok.pad_token_id)
    logits = model(input_ids=ids, attention_mask=mask).logits
    got = sft.sft_loss_sum(logits, labels)
    # by hand: -log p(token | everything before it), over each row's response tokens only
    want = 0.0
    for i, (p, r) in enumerate(examples):
        for t in range(len(p), len(p) + len(r)):
            want -= F.log_softmax(logits[i, t - 1], -1)[ids[i, t]]
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    # changing prompt tokens' labels or padding changes nothing: only response positions count
    assert (labels[mask == 0] == -100).all()
    assert all((labels[i, :len(p)] == -100).all() for i, (p, _) in enumerate(examples))


def test_run_folder(micro, micro_sft, capsys):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "args.json", "metrics.jsonl", "DONE"):
        assert os.path.exists(os.path.join(micro_sft, name)), name
    rows = metrics(micro_sft)
    assert [r["step"] for r in rows] == list(range(1, 13)) and all("train/loss" in r for r in rows)
    assert not os.path.exists(os.path.join(micro_sft, "checkpoint"))
    capsys.readouterr()
    sft.main(["--output_dir", micro_sft, "--model_name_or_path", micro["base"], "--data",
              f"{micro['data']}/sft.jsonl", "--max_steps", "12", "--global_batch", "16"])
    assert "same settings): skipping" in capsys.readouterr().out


@pytest.mark.slow
def test_killed_run_resumes(micro, tmp_path):
    """Kill -9 after the first checkpoint; the rerun resumes there and ends as an unbroken run."""
    args = [sys.executable, "sft.py", "--model_name_or_path", micro["base"], "--data",
            f"{micro['data']}/sft.jsonl", "--max_steps", "40", "--global_batch", "8", "--save_every", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread each: the unbroken run goes side by side
    whole = subprocess.Popen(args + ["--output_dir", str(tmp_path / "whole")], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = str(tmp_path / "broken")
    proc = subprocess.Popen(args + ["--output_dir", out], cwd=ROOT, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:
        if "checkpoint: step" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert not run_folder.is_done(out), "the run finished before it was killed"
    resumed = subprocess.run(args + ["--output_dir", out], cwd=ROOT, capture_output=True, text=True, env=env)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout
    assert whole.wait(timeout=600) == 0
    whole, broken = metrics(tmp_path / "whole"), metrics(out)
    assert [r["step"] for r in broken] == list(range(1, 41))
    for a, b in zip(whole, broken):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-6)


def test_gradient_checkpointing_is_on_and_changes_no_gradient(micro):
    """--gradient_checkpointing true (the 7B presets) recomputes activations in backward: the
    model says it is on, and the SFT loss's gradient is that of the model without it."""
    tok = loading.load_tokenizer(micro["base"])
    rows = data.load_sft(os.path.join(micro["data"], "sft.jsonl"))[:4]
    enc = data.Encoder(tok, 128)
    ids, mask, labels = data.response_batch([enc(p, r) for p, r, _ in rows], tok.pad_token_id)
    grads = []
    for on in (False, True):
        model = distributed.wrap(loading.load_causal_lm(micro["base"], tok), distributed.Dist(), gradient_checkpointing=on)
        model.train()
        is_on = getattr(model, "is_activation_checkpointing", None)  # transformers 5.x's name
        assert (model.is_gradient_checkpointing if is_on is None else is_on) == on
        sft.sft_loss_sum(model(input_ids=ids, attention_mask=mask).logits, labels).backward()
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(*grads))
