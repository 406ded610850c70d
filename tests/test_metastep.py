"""tools/metastep.py: the size of the meta-step against a hand computation on a reward model linear in
its parameters (a bag of tokens: r(x) = e . counts(x)), where grad L, grad J and hess J have closed
forms; and the command on the micro reward model."""
import json
import math

import numpy as np
import pytest
import torch

import data
from tools import metastep


class BagOfTokens(torch.nn.Module):
    """Scores cumulative over the real tokens: the score at the last real token is e . counts(x)."""

    def __init__(self, vocab, seed):
        super().__init__()
        self.e = torch.nn.Parameter(torch.randn(vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))

    def forward(self, input_ids, attention_mask):
        return torch.cumsum(self.e[input_ids] * attention_mask, 1)


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def counts(rows, vocab):
    out = np.zeros((len(rows), vocab))
    for i, row in enumerate(rows):
        for t in row:
            out[i, t] += 1
    return out


def grad_L(e, chosen, rejected):
    """L = mean -log sigmoid(e . (c - r)): grad = mean -(1 - sigmoid(z)) (c - r)."""
    d = chosen - rejected
    return (-(1 - sigmoid(d @ e))[:, None] * d).mean(0)


def grad_and_hess_J(e, phi, k):
    """J = mean over prompts of 2/k^2 sum_{i<j} sigmoid(|e . (phi_i - phi_j)|)."""
    g, H, m = np.zeros_like(e), np.zeros((len(e), len(e))), len(phi) // k
    for p in range(m):
        for i in range(k):
            for j in range(i + 1, k):
                delta = phi[p * k + i] - phi[p * k + j]
                u = delta @ e
                s = sigmoid(abs(u))
                g += 2 / k**2 * s * (1 - s) * np.sign(u) * delta / m
                H += 2 / k**2 * s * (1 - s) * (1 - 2 * s) * np.outer(delta, delta) / m
    return g, H


def test_one_draw_against_a_hand_computation():
    vocab, k, rng = 12, 3, np.random.default_rng(0)
    rows = lambda n: [rng.integers(1, vocab, rng.integers(3, 8)).tolist() for _ in range(n)]
    pairs, pairs2, meta = list(zip(rows(5), rows(5))), list(zip(rows(5), rows(5))), rows(2 * k)
    model = BagOfTokens(vocab, seed=3)
    etas = [0.0, 0.3, 3.0]
    got = metastep.one_draw(model, data.pair_batch(pairs, 0, "cpu"), data.meta_batch([meta[:k], meta[k:]], 0, "cpu")[0], k,
                            data.pair_batch(pairs2, 0, "cpu"), etas)
    e = model.e.detach().numpy()
    c, r = counts([a for a, _ in pairs], vocab), counts([b for _, b in pairs], vocab)
    g0 = grad_L(e, c, r)
    noise = np.linalg.norm(grad_L(e, counts([a for a, _ in pairs2], vocab), counts([b for _, b in pairs2], vocab)) - g0)
    assert got["noise"] == pytest.approx(noise / np.linalg.norm(g0), rel=1e-10)
    gJ, HJ = grad_and_hess_J(e, counts(meta, vocab), k)
    for i, eta in enumerate(etas):
        first = grad_L(e + eta * gJ, c, r)
        exact = first + eta * HJ @ first
        for form, g in (("first_order", first), ("exact", exact)):
            change, cos = got[form][i]
            assert change == pytest.approx(np.linalg.norm(g - g0) / np.linalg.norm(g0), rel=1e-9, abs=1e-15), (form, eta)
            assert cos == pytest.approx(g @ g0 / np.linalg.norm(g) / np.linalg.norm(g0), rel=1e-12), (form, eta)
    assert got["exact"][0] == (0.0, pytest.approx(1.0, rel=1e-15))  # eta = 0: the vanilla gradient itself
    assert got["first_order"][2][0] > got["first_order"][1][0] > 0  # a larger step changes more


def test_the_command_on_the_micro_reward_model(micro, micro_rm, tmp_path, capsys):
    """Both points, two draws, eta/alpha 0 and 1e4; the JSON holds what the table prints."""
    meta = tmp_path / "meta.jsonl"
    prompts = [p for p, _ in data.load_prompts(f"{micro['data']}/prompts_train.jsonl")[:6]]
    meta.write_text("".join(json.dumps({"prompt": p, "responses": [" yes", " no thanks", " maybe later"]}) + "\n"
                            for p in prompts))
    out = tmp_path / "metastep.json"
    metastep.main(["--rm_dir", micro_rm, "--meta_data", str(meta), "--ratios", "0,10000", "--draws", "2",
                   "--meta_batch", "2", "--out", str(out)])
    res = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert res["alpha"] == 3e-3 and res["global_batch"] == 16 and res["ratios"] == [0.0, 10000.0]
    for point in ("start", "end"):
        assert f", {point}: minibatch noise" in printed
        assert 0 < res[point]["noise"]["median"] < math.inf
        for form in ("first_order", "exact"):
            assert res[point][form][0]["change"]["max"] == 0.0 and res[point][form][0]["cos"]["min"] == pytest.approx(1.0)
            assert res[point][form][1]["change"]["min"] > 0
    assert res["start"]["parameters"] == res["end"]["parameters"]


def test_a_folder_without_args_json_is_one_line(tmp_path):
    import cli
    with pytest.raises(cli.UserError, match="args.json does not exist"):
        metastep.main(["--rm_dir", str(tmp_path)])


def test_rms_norm_computes_in_float64():
    """Patched, a float64 LlamaRMSNorm agrees with its own float32-cast formula to float32
    rounding, and with the formula in float64 to float64 rounding."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    norm = LlamaRMSNorm(8).double()
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(3, 8, dtype=torch.float64)
    before = norm(x)
    metastep.rms_norms_in_model_dtype(torch.nn.Sequential(norm))
    after = norm(x)
    want = norm.weight * x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + norm.variance_epsilon)
    assert torch.allclose(after, want, rtol=1e-14, atol=0) and torch.allclose(before, want, rtol=1e-6)
    assert not torch.allclose(before, want, rtol=1e-12, atol=0)  # the cast was there to remove


def test_the_table_shows_each_change_as_a_share_of_the_noise(tmp_path):
    point = {"parameters": 2e6, "noise": {"median": 2.0, "min": 1.0, "max": 3.0},
             "first_order": [{"change": {"median": 0.02}, "cos": {"median": 0.99}}],
             "exact": [{"change": {"median": 0.5}, "cos": {"median": 0.9}}]}
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"alpha": 1e-3, "ratios": [10], "end": point}))
    rows = metastep.markdown([("m", str(path))]).splitlines()
    assert rows[2] == "| m | 2.0 M | 0.001 | end | 2.00 [1.00, 3.00] | 10 | 1.0e-02 | 2.5e-01 | 0.9900 |"
