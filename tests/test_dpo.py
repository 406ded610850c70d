"""dpo.py: the loss and implicit rewards against a hand computation, the sequence log-probability
against a row-by-row loop on unpadded inputs, and a short run that writes a usable policy.
(One DPO step under DDP and FSDP2 against one process: test_distributed.py; --beta 0 refused:
test_failures.py::test_bad_flag_is_one_line_at_parse_time.)"""
import math
import os

import pytest
import torch

import data
import dpo
import loading
import modeling
from conftest import metrics


def test_loss_and_implicit_reward_by_hand():
    beta = 0.1
    logp_w, logp_l = torch.tensor([-3.0, -10.0]), torch.tensor([-5.0, -4.0])
    ref_w, ref_l = torch.tensor([-4.0, -9.0]), torch.tensor([-4.5, -6.0])
    loss, r_w, r_l = dpo.dpo_loss(logp_w, logp_l, ref_w, ref_l, beta)
    # pair 1: r_w = 0.1 * (-3 + 4) = 0.1, r_l = 0.1 * (-5 + 4.5) = -0.05, loss = log(1 + e^-0.15)
    # pair 2: r_w = 0.1 * (-10 + 9) = -0.1, r_l = 0.1 * (-4 + 6) = 0.2,  loss = log(1 + e^0.3)
    assert r_w.tolist() == pytest.approx([0.1, -0.1])
    assert r_l.tolist() == pytest.approx([-0.05, 0.2])
    assert loss.tolist() == pytest.approx([math.log1p(math.exp(-0.15)), math.log1p(math.exp(0.3))])


def test_sequence_logps_against_a_loop(micro, micro_sft):
    """Right-padded batch of chosen and rejected rows vs. each row alone, no padding, summed by hand."""
    tok = loading.load_tokenizer(micro_sft)
    model = loading.load_causal_lm(micro_sft, tok).eval()
    enc = data.Encoder(tok, 128)
    pairs = data.load_pairs(f"{micro['data']}/pairs_train.jsonl")[:3]
    examples = [(enc(p, w), enc(p, l)) for p, w, l, _ in pairs]
    ids, mask, labels = data.response_batch([w for w, _ in examples] + [l for _, l in examples], tok.pad_token_id)
    with torch.no_grad():
        got = modeling.sequence_logps(model, ids, mask, labels)
        rows = [w for w, _ in examples] + [l for _, l in examples]
        for i, (p, r) in enumerate(rows):
            logits = model(input_ids=torch.tensor([p + r])).logits[0].float()
            want = sum(float(logits[len(p) + t - 1].log_softmax(-1)[tok_id]) for t, tok_id in enumerate(r))
            assert float(got[i]) == pytest.approx(want, rel=1e-5, abs=1e-4)
    n = len(examples)
    assert (labels[:n] != -100).sum(1).tolist() == [len(w[1]) for w, _ in examples]  # response tokens only


def test_a_short_run_learns_and_saves_a_policy(micro, micro_sft, tmp_path):
    out = str(tmp_path / "dpo")
    dpo.main(["--sft_dir", micro_sft, "--data", f"{micro['data']}/pairs_train.jsonl",
              "--eval_data", f"{micro['data']}/pairs_test.jsonl", "--output_dir", out,
              "--max_steps", "8", "--global_batch", "16", "--eval_every", "1000", "--lr", "3e-3"])
    rows = metrics(out)
    # at step 0 the policy is the reference: every implicit reward is exactly 0, so no pair is ranked right
    assert rows[0]["eval/accuracy"] == 0.0 and rows[0]["eval/margin"] == 0.0
    assert rows[1]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)  # -log sigmoid(0) on the first batch
    train = [r["train/margin"] for r in rows if "train/margin" in r]
    assert sum(train[-3:]) / 3 > 0  # the chosen responses pull ahead of the rejected ones
    assert os.path.exists(os.path.join(out, "DONE"))
    tok = loading.load_tokenizer(out)
    loading.load_causal_lm(out, tok)

