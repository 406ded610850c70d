"""bilevel_rm.py: the inner objective against the closed-form optimum of the KL-regularised
problem, the hypergradient against finite differences and against one autograd graph through
theta, a stopped run resumed, and its input errors. (One step under DDP against one process:
tests/test_distributed.py.)"""
import json
import math
import types

import pytest
import torch

import bilevel_rm
import cli
import data
import measure
import modeling
from conftest import VOCAB, assert_cli_error, metrics, tiny_reward_model


# --- the inner problem ------------------------------------------------------------------------
def test_inner_objective_is_the_kl_regularised_objective_on_an_enumerated_space():
    """With every outcome of a discrete space drawn once (q uniform), the estimate is exact:
    sum_y pi(y) (r(y) - r_bar) - beta KL(pi || pi_ref), computed here by hand."""
    g = torch.Generator().manual_seed(0)
    n, beta = 7, 0.3
    logp_ref = torch.randn(n, generator=g, dtype=torch.float64).log_softmax(0)
    logp = torch.randn(n, generator=g, dtype=torch.float64).log_softmax(0)
    r = torch.randn(n, generator=g, dtype=torch.float64)
    got = bilevel_rm.inner_objective(logp, logp_ref, r, beta, k=n, logq=torch.full((n,), -math.log(n), dtype=torch.float64))
    pi = logp.exp()
    want = sum(pi[y] * (r[y] - r.mean()) for y in range(n)) - beta * sum(pi[y] * (logp[y] - logp_ref[y]) for y in range(n))
    assert float(got) == pytest.approx(float(want), rel=1e-12)


def test_inner_ascent_reaches_pi_ref_exp_r_over_beta():
    """Gradient ascent on the inner objective over the logits of a discrete policy converges to
    the closed-form optimum pi* = pi_ref exp(r / beta) / Z."""
    g = torch.Generator().manual_seed(1)
    n, beta = 6, 0.5
    logp_ref = torch.randn(n, generator=g, dtype=torch.float64).log_softmax(0)
    r = torch.randn(n, generator=g, dtype=torch.float64)
    logq = torch.full((n,), -math.log(n), dtype=torch.float64)
    logits = logp_ref.clone().requires_grad_()
    opt = torch.optim.SGD([logits], lr=2.0)
    for _ in range(3000):
        opt.zero_grad()
        (-bilevel_rm.inner_objective(logits.log_softmax(0), logp_ref, r, beta, k=n, logq=logq)).backward()
        opt.step()
    want = (logp_ref + r / beta).softmax(0)
    assert torch.allclose(logits.detach().softmax(0), want, atol=1e-9), (logits.softmax(0), want)


def test_at_pi_ref_the_inner_gradient_is_reinforce():
    """At phi = pi_ref (w = 1) the gradient w.r.t. log pi(y) is (r - r_bar - beta) / n."""
    r = torch.tensor([1.0, 3.0, 0.0, 2.0], dtype=torch.float64)
    logp = torch.tensor([-2.0, -1.5, -3.0, -0.5], dtype=torch.float64, requires_grad=True)
    J = bilevel_rm.inner_objective(logp, logp.detach(), r, 0.2, k=2)
    g, = torch.autograd.grad(J, logp)
    # prompts (1, 3) and (0, 2): r_bar = 2 and 1
    assert g.tolist() == pytest.approx([(-1 - 0.2) / 4, (1 - 0.2) / 4, (-1 - 0.2) / 4, (1 - 0.2) / 4])


def test_outer_loss_by_hand():
    logp = torch.tensor([-1.0, -2.0, -3.0, -1.0], dtype=torch.float64)  # chosen 2, then rejected 2
    ref = torch.tensor([-2.0, -2.0, -2.0, -2.0], dtype=torch.float64)
    # h = 0.5 * (logp - ref) = [0.5, 0, -0.5, 0.5]: margins 1.0 and -0.5
    want = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2  # -log sigmoid(m) = log(1 + e^-m)
    assert float(bilevel_rm.outer_loss(logp, ref, 0.5)) == pytest.approx(want, rel=1e-12)


# --- the hypergradient ------------------------------------------------------------------------
def tiny_policy(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=2,
                     pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).double().eval().requires_grad_(False)


def rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(3, VOCAB, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g).tolist(),
             torch.randint(3, VOCAB, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist())
            for _ in range(n)]


def problem():
    k = 3
    S = data.response_batch(rows(2 * k, 1), 0)      # 2 prompts x k samples
    Q = data.response_batch(rows(2 * 3, 2), 0)      # 3 pairs: chosen rows, then rejected
    args = types.SimpleNamespace(beta=0.5, inner_lr=2.0, inner_steps=2)
    return tiny_reward_model("gpt2"), tiny_policy(), S, Q, k, args


def L_of(rm, policy, S, Q, k, args, params=None):
    return bilevel_rm.L_through_inner(modeling.rewards(rm, *S[:2], params), policy, S, Q, k, args)[0]


def test_hypergradient_matches_finite_difference():
    """meta_step's gradient . v = d/de L(theta + e v), where L runs the K inner steps afresh at
    every theta (float64, central difference)."""
    rm, policy, S, Q, k, args = problem()
    L, _ = bilevel_rm.meta_step(rm, policy, S, Q, k, args)
    assert abs(float(L) - math.log(2)) > 1e-4  # the inner steps moved the policy
    names, theta = zip(*rm.named_parameters())
    g = torch.Generator().manual_seed(3)
    vs = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in theta]
    got = sum(float((p.grad * v).sum()) for p, v in zip(theta, vs))
    eps = 1e-6
    with torch.no_grad():
        pm = [{n: p + s * eps * v for n, p, v in zip(names, theta, vs)} for s in (1, -1)]
    fd = (L_of(rm, policy, S, Q, k, args, pm[0]).item() - L_of(rm, policy, S, Q, k, args, pm[1]).item()) / (2 * eps)
    assert abs(got - fd) <= 1e-6 * abs(fd) + 1e-12, (got, fd)


def test_hypergradient_equals_one_graph_through_theta():
    """The two-piece chain rule (dL/dr, then r's backward) against autograd through the whole
    computation from theta at once."""
    rm, policy, S, Q, k, args = problem()
    bilevel_rm.meta_step(rm, policy, S, Q, k, args, scale=0.7)
    got = [p.grad.clone() for p in rm.parameters()]
    want = torch.autograd.grad(0.7 * L_of(rm, policy, S, Q, k, args), list(rm.parameters()))
    got, want = torch.cat([g.reshape(-1) for g in got]), torch.cat([g.reshape(-1) for g in want])
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))
    assert all(p.grad is None or not p.requires_grad for p in policy.parameters())  # pi_ref is untouched


# --- the stage ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def support(micro, micro_sft, tmp_path_factory):
    import sample
    out = tmp_path_factory.mktemp("bilevel") / "samples"
    sample.main(["--policy_dir", micro_sft, "--prompts", f"{micro['data']}/prompts_train.jsonl", "--k", "3",
                 "--max_prompts", "48", "--output_dir", str(out), "--max_new_tokens", "12"])
    return str(out / "meta.jsonl")


def stage_argv(micro, micro_sft, micro_rm, support, out, *more):
    return ["bilevel_rm.py", "--sft_dir", micro_sft, "--init_rm", micro_rm, "--data", f"{micro['data']}/pairs_train.jsonl",
            "--eval_data", f"{micro['data']}/pairs_test.jsonl", "--support", support, "--output_dir", str(out),
            "--steps", "3", "--support_prompts", "2", "--query_pairs", "4", "--lr", "1e-3", *more]


def test_support_without_training_distributions_is_refused(micro, micro_sft, micro_rm, tmp_path, capsys):
    """Support samples of the out-of-distribution topics share no distribution with the pairs."""
    ood = tmp_path / "ood.jsonl"
    with open(ood, "w") as f:
        for p, _ in data.load_prompts(f"{micro['data']}/prompts_ood.jsonl")[:4]:
            f.write(json.dumps({"prompt": p, "responses": [" a", " b"]}) + "\n")
    assert_cli_error(*stage_argv(micro, micro_sft, micro_rm, str(ood), tmp_path / "out"),
                     message="training distributions have both pairs", capsys=capsys)


def test_a_prompt_of_no_distribution_is_named(tmp_path):
    rows_ = [("\n\nHuman: how do i cook my soup ?\n\nAssistant:", [], "row 1"),
             ("\n\nHuman: what is the capital of peru ?\n\nAssistant:", [], "row 2")]
    with pytest.raises(data.DataError, match="support.jsonl row 2: the prompt belongs to none"):
        bilevel_rm.group(rows_, "support.jsonl")
    assert measure.distribution(rows_[0][0]) == "cooking"


def test_a_stopped_run_resumes_to_the_uninterrupted_result(micro, micro_sft, micro_rm, support, tmp_path, monkeypatch):
    """Stopped at step 3 (a NaN outer loss) after the step-2 checkpoint, then started again: only
    steps 3-4 are run, and the weights are bit for bit those of a run never stopped (each step's
    rows depend on the step alone)."""
    from safetensors.torch import load_file
    argv = lambda out: stage_argv(micro, micro_sft, micro_rm, support, out, "--steps", "4", "--save_every", "2")[1:]
    bilevel_rm.main(argv(tmp_path / "whole"))
    calls, outer = [], bilevel_rm.outer_loss
    def poisoned(*a):
        calls.append(1)
        return outer(*a) * (float("nan") if len(calls) > 4 else 1.0)  # 2 distributions a step
    monkeypatch.setattr(bilevel_rm, "outer_loss", poisoned)
    with pytest.raises(cli.UserError, match="step 3: non-finite"):
        bilevel_rm.main(argv(tmp_path / "cut"))
    calls.clear()
    monkeypatch.setattr(bilevel_rm, "outer_loss", lambda *a: calls.append(1) or outer(*a))
    bilevel_rm.main(argv(tmp_path / "cut"))
    assert len(calls) == 4  # steps 3 and 4 only: steps 1 and 2 came from the checkpoint
    whole, cut = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("whole", "cut"))
    assert all(torch.equal(whole[n], cut[n]) for n in whole)
    assert [r["train/L_outer"] for r in metrics(tmp_path / "cut") if "train/L_outer" in r] == \
        [r["train/L_outer"] for r in metrics(tmp_path / "whole") if "train/L_outer" in r]
