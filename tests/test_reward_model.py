"""reward_model.py: Eq. 1 by hand and by finite differences, the reward read at the last real
token whatever the padding, the |dr| statistics against slow loops, training, bad input."""
import json
import math
import os
import re

import pytest
import torch

import data
import reward_model as rm
import runtime
from conftest import assert_cli_error, metrics
from conftest import batch, clear_pairs, tiny_reward_model


def test_loss_by_hand():
    r_w, r_l = torch.tensor([1.0, 0.2, -0.3]), torch.tensor([0.5, 0.7, -0.3])
    want = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(0.5)) + math.log(2)) / 3
    assert rm.pair_loss(r_w, r_l).mean().item() == pytest.approx(want, rel=1e-6)


def test_loss_gradient_matches_finite_difference():
    model = tiny_reward_model("gpt2")
    ids, mask = batch(8, seed=5)  # 4 chosen rows then 4 rejected rows

    def loss():
        r = rm.rewards(model, ids, mask)
        return rm.pair_loss(r[:4], r[4:]).mean()
    params = list(model.parameters())
    grads = torch.autograd.grad(loss(), params)
    v = [torch.randn_like(p) for p in params]
    eps = 1e-6
    with torch.no_grad():
        for p, u in zip(params, v):
            p.add_(eps * u)
        up = loss().item()
        for p, u in zip(params, v):
            p.sub_(2 * eps * u)
        down = loss().item()
        for p, u in zip(params, v):
            p.add_(eps * u)
    fd = (up - down) / (2 * eps)
    an = sum((g * u).sum() for g, u in zip(grads, v)).item()
    assert an == pytest.approx(fd, rel=1e-7)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_reward_ignores_padding(kind):
    model = tiny_reward_model(kind).float().eval()
    seq = torch.tensor([[5, 9, 13, 2, 7, 11]])
    one = torch.ones_like(seq)
    base = rm.rewards(model, seq, one)
    for left, right in [(0, 3), (4, 0), (2, 5)]:
        ids = torch.cat([torch.zeros(1, left, dtype=torch.long), seq, torch.zeros(1, right, dtype=torch.long)], 1)
        mask = torch.cat([torch.zeros(1, left, dtype=torch.long), one, torch.zeros(1, right, dtype=torch.long)], 1)
        assert rm.rewards(model, ids, mask).item() == pytest.approx(base.item(), abs=1e-5), (left, right)
    # and in a batch with rows of other lengths, padded on either side
    ids, mask = data.pad([[3, 4], seq[0].tolist(), [8] * 9], 0, side="left")
    assert rm.rewards(model, ids, mask)[1].item() == pytest.approx(base.item(), abs=1e-5)


def test_difference_statistics_against_loops():
    r = torch.tensor([[0.0, 1.0, 3.0, 2.5], [1.0, 1.1, 0.4, 0.0], [2.0, -1.0, 0.5, 0.5]], dtype=torch.float64)
    diffs = []
    for row in r.tolist():
        for i in range(len(row)):
            for j in range(i + 1, len(row)):
                diffs.append(row[i] - row[j])
    mx = max(abs(x) for x in diffs)
    signed = diffs + [-x for x in diffs]
    mean = sum(signed) / len(signed)
    s = rm.difference_stats(r, bins=4, near_zero=0.1)
    assert s["var"] == pytest.approx(sum((x - mean) ** 2 for x in signed) / len(signed))
    assert s["mean_abs"] == pytest.approx(sum(abs(x) for x in diffs) / len(diffs))
    assert s["near_zero"] == pytest.approx(sum(abs(x) / mx < 0.1 for x in diffs) / len(diffs))
    hist = [0] * 4
    for x in diffs:
        hist[min(int(abs(x) / mx * 4), 3)] += 1
    assert s["hist"] == pytest.approx([h / len(diffs) for h in hist], abs=1e-4)


def test_gold_agreement_against_a_loop():
    r = torch.tensor([[0.0, 1.0, 1.0], [2.0, -1.0, 0.5]])
    g = torch.tensor([[1.0, 2.0, 0.0], [0.3, 0.3, 0.1]])
    right = n = 0.0
    for rr, gg in zip(r.tolist(), g.tolist()):
        for i in range(3):
            for j in range(i + 1, 3):
                if gg[i] == gg[j]:
                    continue  # gold tie: excluded
                n += 1
                right += 0.5 if rr[i] == rr[j] else float((rr[i] > rr[j]) == (gg[i] > gg[j]))
    got, count = rm.gold_agreement(r, g)
    assert count == n == 5 and got == pytest.approx(right / n)


def test_label_ceiling_counts_gold_order(micro):
    import task
    pairs = data.load_pairs(os.path.join(micro["data"], "pairs_test.jsonl"))
    agree = [task.gold(p, w) > task.gold(p, l) for p, w, l, _ in pairs if task.gold(p, w) != task.gold(p, l)]
    assert rm.label_ceiling(pairs) == pytest.approx(sum(agree) / len(agree))


def test_short_training_beats_chance(micro_sft, tmp_path):
    """A short run lifts held-out accuracy well above chance. Noisy labels (~70% agreement) would
    need a larger model and more steps than a unit test affords, so the pairs here are the gold
    judge's own clear preferences."""
    out = str(tmp_path / "rm")
    rm.main(["--sft_dir", micro_sft, "--data", clear_pairs(tmp_path / "train.jsonl", 600, 1),
             "--eval_data", clear_pairs(tmp_path / "test.jsonl", 200, 2), "--output_dir", out, "--epochs", "2",
             "--global_batch", "16", "--lr", "3e-3", "--eval_every", "1000"])
    acc = [r["eval/accuracy"] for r in metrics(out) if "eval/accuracy" in r]
    assert acc[0] < 0.6 and acc[-1] > 0.7, acc
    with open(os.path.join(out, "reward_stats.json")) as f:
        stats = json.load(f)
    assert stats["std"] > 0 and stats["n"] > 0
    # the saved folder is a plain Hugging Face sequence-classification model
    from transformers import AutoModelForSequenceClassification
    assert AutoModelForSequenceClassification.from_pretrained(out).config.num_labels == 1


def test_bad_pairs_name_file_and_row(micro, micro_sft, tmp_path, capsys):
    good = json.loads(open(os.path.join(micro["data"], "pairs_train.jsonl")).readline())
    long = {"chosen": good["chosen"] + " more" * 200, "rejected": good["rejected"]}
    cases = [({"chosen": good["chosen"], "rejected": good["chosen"]}, "row 2: chosen and rejected are identical"),
             ({"chosen": good["chosen"]}, "row 2: missing key 'rejected'"),
             (long, "row 2: ")]
    for i, (bad, message) in enumerate(cases):
        path = tmp_path / f"pairs{i}.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        argv = ["--sft_dir", micro_sft, "--data", str(path), "--eval_data", "", "--output_dir", str(tmp_path / "out")]
        if i == 0:  # from the command line: one 'error:' line, status 2, no traceback
            assert_cli_error("reward_model.py", *argv, message=f"{path}, {message}")
        else:
            with pytest.raises(runtime.UserError, match=re.escape(f"{path}, {message}")):
                rm.main(argv)
    # with --truncate the long row is cut, counted and reported
    rm.main(["--sft_dir", micro_sft, "--data", str(path), "--eval_data", "", "--output_dir", str(tmp_path / "cut"),
             "--truncate", "--global_batch", "2"])
    assert "1 rows truncated" in capsys.readouterr().out
