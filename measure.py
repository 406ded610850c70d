"""measure.py: what a reward model does on data, the measurements every stage and the report use
to see distribution shift. Each takes rewards (scored here from a model, or given as a matrix)
and none needs a stage:
  * preference accuracy and mean margin r(y_w) - r(y_l) on held-out pairs;
  * the label ceiling: how often the noisy labels agree with the gold ordering (embedded task);
  * gold agreement: on k samples per prompt (a meta-data file, e.g. the policy's samples), how
    often the RM orders two responses of one prompt as the gold judge does (gold ties excluded);
  * the reward-difference distribution of the paper's Figures 1 and 5: pairwise |dr| between
    responses of one prompt, its variance, a histogram and the share near zero;
  * the mean and std of r over training responses, with which PPO normalises the score;
  * MetaRM's J (Eq. 2) of the same reward matrix, which metarm.py ascends and every report
    measures.
"""
import torch

import data
import distributed
import modeling
import task


@torch.no_grad()
def score_sequences(model, seqs, pad_id, d, batch=64):
    """Rewards of a list of token-id lists; every process scores a share, all get all of them.
    For speed they are scored shortest first, so that a batch holds sequences of about one length
    (little padding); the rewards come back in the given order."""
    by_length = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.zeros(len(seqs), dtype=torch.float64)
    for pos, real in distributed.shard_batches(len(seqs), batch, d):
        idx = [by_length[p] for p in pos]
        ids, mask = data.pad([seqs[i] for i in idx], pad_id)
        with distributed.autocast(d):
            r = modeling.rewards(model, ids.to(d.device), mask.to(d.device)).double().cpu()
        if real:
            out[idx] = r
    return distributed.all_sum(out) if d.world > 1 else out


def score_samples(model, samples, pad_id, d):
    """Rewards of encoded meta rows (data.encode_meta: m prompts x k responses) -> [m, k]."""
    return score_sequences(model, [seq for row in samples for seq in row], pad_id, d).view(len(samples), -1)


def preference_accuracy(model, examples, pad_id, d):
    """{eval/accuracy, eval/margin} on encoded pairs (a tie counts as half right); {} without pairs."""
    if not examples:
        return {}
    r = score_sequences(model, [c for c, _ in examples] + [x for _, x in examples], pad_id, d)
    margin = r[:len(examples)] - r[len(examples):]
    acc = ((margin > 0).double() + 0.5 * (margin == 0).double()).mean()
    return {"eval/accuracy": float(acc), "eval/margin": float(margin.mean())}


def reward_stats(model, examples, pad_id, d, n=2048):
    """Mean and standard deviation of r over (up to n of) the training responses, chosen and
    rejected alike: PPO normalises the RM score with them."""
    seqs = [c for c, _ in examples] + [x for _, x in examples]
    pick = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(0))[:n].tolist()
    r = score_sequences(model, [seqs[i] for i in pick], pad_id, d)
    return {"mean": float(r.mean()), "std": float(r.std()), "n": len(r)}


# ---------------------------------------------------------------------------------------------
# Statistics of a reward matrix r [m, k]: k responses of each of m prompts
# ---------------------------------------------------------------------------------------------
def pairwise(x):
    """[m, k] -> [m, k(k-1)/2]: x_i - x_j for every pair i < j of each row."""
    i, j = torch.triu_indices(x.shape[1], x.shape[1], offset=1)
    return x[:, i] - x[:, j]


def gold_agreement(r, g, tie=1e-9):
    """How often the RM orders two responses of one prompt as the gold judge does.
    r, g: [m, k] rewards and gold scores. Pairs the gold judge ties (|dg| <= tie) are excluded;
    an RM tie counts as half right. Returns (agreement, number of pairs counted)."""
    dr, dg = pairwise(r.double()), pairwise(g.double())
    keep = dg.abs() > tie
    right = (torch.sign(dr) == torch.sign(dg)).double() + 0.5 * (dr == 0).double()
    n = int(keep.sum())
    return (float(right[keep].mean()) if n else float("nan")), n


def difference_loss(r):
    """Eq. 2 for r of shape [m, k]: J = 2/k^2 sum_{i<j} sigmoid(|r_i - r_j|), mean over prompts."""
    k = r.shape[1]
    i, j = torch.triu_indices(k, k, offset=1)
    return (2 / k**2 * torch.sigmoid((r[:, i] - r[:, j]).abs()).sum(1)).mean()


def difference_stats(r, bins=10, near_zero=0.1):
    """The reward-difference distribution of Figures 1 and 5, over pairs i < j of each prompt.
    var: variance of the signed dr (Figure 1; symmetric, so its mean is zero by construction);
    mean_abs: mean |dr|; hist: histogram of |dr| / max |dr| over [0, 1] (the paper normalises by
    the largest difference, so two RMs can be drawn on one axis), shares summing to 1;
    near_zero: share of pairs with |dr| / max |dr| < near_zero."""
    dr = pairwise(r.double()).flatten()
    a = dr.abs()
    z = a / a.max() if a.max() > 0 else a
    hist = torch.histc(z, bins=bins, min=0, max=1) / len(z)
    return {"var": float(torch.cat([dr, -dr]).var(unbiased=False)), "mean_abs": float(a.mean()),
            "near_zero": float((z < near_zero).double().mean()), "hist": [round(float(h), 4) for h in hist]}


def shift(r, meta=None):
    """{shift/dr_*} of a reward matrix, and with the meta rows it scored (embedded task only)
    {shift/gold_agreement, shift/gold_pairs}."""
    out = {f"shift/dr_{k}": v for k, v in difference_stats(r).items()}
    if meta is not None:
        g = torch.tensor([gold_scores([p] * len(rs), rs) for p, rs, _ in meta])
        out["shift/gold_agreement"], out["shift/gold_pairs"] = gold_agreement(r, g)
    return out


# ---------------------------------------------------------------------------------------------
# The gold judge of the embedded task (task.py, the task's builder and judge)
# ---------------------------------------------------------------------------------------------
def gold_applies(prompts):
    """True when every prompt is one of the embedded task's (so the gold judge can grade)."""
    return bool(prompts) and all(task.is_task_prompt(p) for p in prompts)


def distribution(prompt):
    """The embedded task's training distribution a prompt comes from: its topic, 'harmful' for a
    harmful request, None for a prompt of no task topic (bilevel_rm.py's grouping)."""
    topic, _, harmful = task.parse_prompt(prompt)
    return "harmful" if harmful else topic


def gold_scores(prompts, responses):
    return [task.gold(p, s) for p, s in zip(prompts, responses)]


def label_ceiling(pairs):
    """Share of preference labels that agree with the gold ordering (gold ties excluded)."""
    gaps = [task.gold(p, w) - task.gold(p, l) for p, w, l, _ in pairs]
    counted = [g for g in gaps if g != 0]
    return sum(g > 0 for g in counted) / max(len(counted), 1)
