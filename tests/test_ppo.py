"""ppo.py: GAE against a slow loop, rewards and KL by hand, log-probabilities against those seen
while sampling, the clipped losses by hand, and a short run that raises the RM's score. (PPO
under two processes: test_distributed.py::test_ppo_update_matches_one_process, the update on fixed
roll-outs under DDP and FSDP2, and test_presets.py::test_hh_preset_rehearsed, ppo.py end to end
under torchrun.)"""
import os

import pytest
import torch

import data
import loading
import ppo
import run_folder
from conftest import metrics


def test_response_mask_stops_after_the_first_eos():
    r = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 7, 2, 0], [5, 6, 7, 8, 9]])
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(ppo.response_mask(r, eos_id=2), want)


def test_gae_against_a_slow_loop():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]).float()
    rewards = rewards * mask
    gamma, lam = 0.9, 0.8
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    for i in range(3):
        n = int(mask[i].sum())
        a_next = 0.0
        for t in reversed(range(n)):
            v_next = values[i, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[i, t].item() + gamma * v_next - values[i, t].item()
            a_next = delta + gamma * lam * a_next
            assert adv[i, t].item() == pytest.approx(a_next, rel=1e-5, abs=1e-6)
            assert ret[i, t].item() == pytest.approx(a_next + values[i, t].item(), rel=1e-5, abs=1e-6)
        assert (adv[i, n:] == 0).all()


def test_rewards_and_kl_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.2, -0.4, -0.6, -0.8]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -1.0], [-0.2, -0.2, -0.2, -0.2]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).float()  # row 0 ends (EOS) at token 2
    ended = torch.tensor([True, False])
    stats = {"mean": 1.0, "std": 2.0}
    score = ppo.shape_score(torch.tensor([4.0, 3.0]), ended, stats, reward_clip=1.4, missing_eos_penalty=0.5)
    # row 0: (4 - 1) / 2 = 1.5, clipped to 1.4; row 1: (3 - 1) / 2 - 0.5 = 0.5
    assert score.tolist() == pytest.approx([1.4, 0.5])
    rewards, kl = ppo.token_rewards(score, logp, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0], [0.0, -0.2, -0.4, -0.6]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 1.4, 0.0], [0.0, 0.02, 0.04, 0.06 + 0.5]]))


def test_clipped_losses_by_hand():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]]))  # ratios 1.5, 0.5, 1.1, 0.7
    adv = torch.tensor([[1.0, 1.0, -2.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, clipped, _ = ppo.policy_loss(logp, old, adv, mask, cliprange=0.2)
    # token by token: max(-A r, -A clip(r, 0.8, 1.2))
    want = max(-1.5, -1.2) + max(-0.5, -0.8) + max(2.2, 2.2)  # the last token is masked
    assert loss.item() == pytest.approx(want)
    assert clipped.item() == 2
    v, old_v, ret = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.5, 0.5, 1.9]]), torch.tensor([[2.0, 0.0, 0.0]])
    vloss, vclipped = ppo.value_loss(v, old_v, ret, torch.ones(1, 3), cliprange_value=0.2)
    # v clipped to old +- 0.2: 0.7, 0.3, 2.0; loss 0.5 max((v - R)^2, (v_clip - R)^2)
    want = 0.5 * (max(1.0, 1.69) + max(0.0, 0.09) + max(4.0, 4.0))
    assert vloss.item() == pytest.approx(want) and vclipped.item() == 2


def test_logprobs_match_those_seen_while_sampling(micro_sft):
    tok = loading.load_tokenizer(micro_sft)
    model = loading.load_causal_lm(micro_sft, tok).eval()
    enc = data.Encoder(tok, 64)
    prompts = ["\n\nHuman: how do i fix my laptop ?\n\nAssistant:", "\n\nHuman: hi\n\nAssistant:",
               "\n\nHuman: any tips to grow my roses please ?\n\nAssistant:"]
    query, qmask = data.pad([enc.prompt(p) for p in prompts], tok.pad_token_id, side="left")
    T = 0.7
    torch.manual_seed(0)
    out = model.generate(input_ids=query, attention_mask=qmask, do_sample=True, temperature=T, top_p=1.0,
                         max_new_tokens=12, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         return_dict_in_generate=True, output_logits=True)
    response = out.sequences[:, query.shape[1]:]
    seen = torch.stack([torch.log_softmax(l / T, -1) for l in out.logits], 1)
    seen = seen.gather(2, response[:, :, None]).squeeze(2)
    rmask = ppo.response_mask(response, tok.eos_token_id)
    with torch.no_grad():
        logp, _ = ppo.logprobs_and_entropy(model, query, qmask, response, rmask, T)
    m = rmask.bool()
    assert torch.allclose(logp[m], seen[m], atol=1e-4), (logp[m] - seen[m]).abs().max()


def test_short_run_raises_the_rm_score(micro, micro_sft, micro_rm, tmp_path):
    out = str(tmp_path / "ppo")
    ppo.main(["--policy_dir", micro_sft, "--rm_dir", micro_rm, "--prompts", f"{micro['data']}/prompts_train.jsonl",
              "--output_dir", out, "--steps", "16", "--queries", "16", "--policy_lr", "3e-3", "--kl_coef", "0.01",
              "--max_new_tokens", "16", "--snapshot_every", "8"])
    rows = metrics(out)
    first, last = [sum(r["objective/scores"] for r in rows[i]) / 4 for i in (slice(0, 4), slice(-4, None))]
    assert last > first + 0.1, (first, last)
    for key in ("objective/kl", "objective/gold", "ppo/policy/approxkl", "ppo/policy/clipfrac", "ppo/val/loss",
                "val/explained_variance", "ppo/policy/entropy", "rollout/length", "rollout/ended", "shift/dr_var"):
        assert key in rows[-1], key
    assert run_folder.is_done(out) and run_folder.is_done(os.path.join(out, "step8"))



def test_a_snapshot_is_the_shorter_run(micro, micro_sft, micro_rm, tmp_path):
    """What iterate.sh relies on to run the vanilla arm's round 1 once: PPO for N steps saves, bit
    for bit, the snapshot a longer run of the same seed writes after N steps (the learning rates
    are constant, nothing depends on --steps but the stop)."""
    common = ["--policy_dir", micro_sft, "--rm_dir", micro_rm, "--prompts", f"{micro['data']}/prompts_train.jsonl",
              "--queries", "4", "--max_new_tokens", "8", "--seed", "101"]
    ppo.main([*common, "--output_dir", str(tmp_path / "short"), "--steps", "2"])
    ppo.main([*common, "--output_dir", str(tmp_path / "long"), "--steps", "3", "--snapshot_every", "2"])
    with open(tmp_path / "short" / "model.safetensors", "rb") as f, \
            open(tmp_path / "long" / "step2" / "model.safetensors", "rb") as g:
        assert f.read() == g.read()
    assert [r["objective/scores"] for r in metrics(str(tmp_path / "short"))] == \
        [r["objective/scores"] for r in metrics(str(tmp_path / "long"))][:2]
