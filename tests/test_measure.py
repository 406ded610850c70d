"""measure.py: the |dr| statistics, gold agreement and the label ceiling against slow loops."""
import os

import pytest
import torch

import data
import measure


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
    s = measure.difference_stats(r, bins=4, near_zero=0.1)
    assert s["var"] == pytest.approx(sum((x - mean) ** 2 for x in signed) / len(signed))
    assert s["mean_abs"] == pytest.approx(sum(abs(x) for x in diffs) / len(diffs))
    assert s["near_zero"] == pytest.approx(sum(abs(x) / mx < 0.1 for x in diffs) / len(diffs))
    hist = [0] * 4
    for x in diffs:
        hist[min(int(abs(x) / mx * 4), 3)] += 1
    assert s["hist"] == pytest.approx([h / len(diffs) for h in hist], abs=1e-4)


def test_scores_in_the_given_order_whatever_the_batching():
    """score_sequences batches by length; each reward is the one of the sequence scored alone."""
    from conftest import tiny_reward_model
    import distributed
    import modeling
    model = tiny_reward_model("llama").eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 50, (int(n),), generator=g).tolist() for n in torch.randint(2, 20, (23,), generator=g)]
    got = measure.score_sequences(model, seqs, 0, distributed.Dist(), batch=5)
    with torch.no_grad():
        alone = [float(modeling.rewards(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))) for s in seqs]
    assert got.tolist() == pytest.approx(alone, rel=1e-9, abs=1e-12)


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
    got, count = measure.gold_agreement(r, g)
    assert count == n == 5 and got == pytest.approx(right / n)


def test_label_ceiling_counts_gold_order(micro):
    import task
    pairs = data.load_pairs(os.path.join(micro["data"], "pairs_test.jsonl"))
    agree = [task.gold(p, w) > task.gold(p, l) for p, w, l, _ in pairs if task.gold(p, w) != task.gold(p, l)]
    assert measure.label_ceiling(pairs) == pytest.approx(sum(agree) / len(agree))
