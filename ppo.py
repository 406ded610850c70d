"""ppo.py: RLHF with PPO (Ouyang et al. 2022; Schulman et al. 2017), the stage where the policy's
output distribution shifts away from what the reward model was trained on.

Four models: the policy pi (trained) and the frozen reference pi_ref, both loaded from
--policy_dir (SFT, or the previous round's policy) unless --ref_dir names another reference
(the paper does not say which reference later rounds use); the frozen reward model r (--rm_dir); the
critic V, initialised from the reward model and read at every response token. One PPO step:
  1. roll out: sample responses to a batch of queries (left-padded; PAD is not EOS)
  2. score: log-probabilities under pi and pi_ref (logits / temperature, as when sampling),
     values V, and the RM score at the last real token
  3. rewards per token: -beta (log pi - log pi_ref) on every response token, plus at the last
     one the RM score, normalised by the RM's training statistics, minus a penalty for a
     response that never ends, clipped to [-reward_clip, reward_clip]
  4. advantages by GAE (gamma, lambda), whitened; returns = advantages + values
  5. several PPO epochs over mini-batches: clipped policy loss, clipped value loss
  6. adapt beta (optional adaptive KL controller)

    python ppo.py                                          # embedded task, vanilla RM
    torchrun --nproc_per_node 2 ppo.py                     # DDP (gloo on CPU)
    torchrun --nproc_per_node 8 ppo.py --strategy fsdp --policy_dir runs/7b/sft \\
        --rm_dir runs/7b/rm --prompts Anthropic/hh-rlhf --policy_lr 5e-7 --critic_lr 1.5e-6 \\
        --queries 8 --rollouts_per_query 16 --mini_batches 2 --temperature 0.8 --top_p 0.9 \\
        --repetition_penalty 1.1 --kl_coef 0.05 --reward_clip 0.8 --max_new_tokens 256 \\
        --max_prompt_len 512 --truncate true --skip_bad_rows true \\
        --gradient_checkpointing true --output_dir runs/7b/ppo   # the paper's settings (7B)
"""
import contextlib
import dataclasses
import math
import os
import time

import torch
import torch.nn.functional as F

import cli
import data
import distributed
import loading
import measure
import modeling
import run_folder
import training
from cli import arg


@dataclasses.dataclass
class Args:
    policy_dir: str = arg("runs/default/seed1/sft", "policy and frozen reference: SFT or the previous round's policy")
    ref_dir: str = arg("", "the frozen KL reference pi_ref ('': --policy_dir); iterate.sh's KL_ANCHOR=sft passes the SFT model")
    rm_dir: str = arg("runs/default/seed1/rm", "the frozen reward model (the critic starts from it too)")
    prompts: str = arg("runs/default/task/data/prompts_train.jsonl", "queries: {prompt} rows or HH-RLHF rows")
    output_dir: str = arg("runs/default/seed1/ppo", "run folder (a save_pretrained policy when done)")
    steps: int = arg(20, "PPO steps (one roll-out batch each)", check="> 0")
    snapshot_every: int = arg(0, "also save the policy every this many steps in <output_dir>/step<N> (0: off)", check=">= 0")
    queries: int = arg(32, "queries per step, over all processes", check="> 0")
    rollouts_per_query: int = arg(2, "responses sampled per query (paper: 16 at 7B); >= 2 gives the same-prompt |dr|", check="> 0")
    ppo_epochs: int = arg(1, "passes over each roll-out batch", check="> 0")
    mini_batches: int = arg(2, "mini-batches per PPO epoch", check="> 0")
    policy_lr: float = arg(3e-4, "policy learning rate (paper: 5e-7 at 7B)", check="> 0")
    critic_lr: float = arg(1e-3, "critic learning rate (paper: 1.5e-6 at 7B)", check="> 0")
    kl_coef: float = arg(0.05, "beta, the per-token KL penalty coefficient (paper: 0.05)", check=">= 0")
    kl_target: float = arg(0.0, "adaptive KL controller target per response (0: fixed beta)", check=">= 0")
    kl_horizon: int = arg(10000, "adaptive KL controller horizon, in roll-outs", check="> 0")
    gamma: float = arg(1.0, "GAE discount", check="[0, 1]")
    lam: float = arg(0.95, "GAE lambda", check="[0, 1]")
    cliprange: float = arg(0.2, "PPO policy ratio clip", check="> 0")
    cliprange_value: float = arg(0.2, "PPO value clip", check="> 0")
    vf_coef: float = arg(0.5, "weight of the value loss (the critic has its own optimizer)", check=">= 0")
    reward_clip: float = arg(5.0, "clip the normalised score to [-c, c] (the paper's 'clip value of 0.8'; 0: off)", check=">= 0")
    missing_eos_penalty: float = arg(1.0, "subtracted from the normalised score of a response that never ends", check=">= 0")
    whiten_advantages: bool = arg(True, "normalise advantages to zero mean, unit variance")
    temperature: float = arg(1.0, "sampling temperature; the training forward divides logits by it too (paper: 0.8)", check="> 0")
    top_p: float = arg(1.0, "nucleus sampling (paper: 0.9)", check="(0, 1]")
    repetition_penalty: float = arg(1.0, "repetition penalty when sampling (paper: 1.1)", check="> 0")
    max_new_tokens: int = arg(40, "maximum response tokens", check="> 0")
    max_prompt_len: int = arg(64, "maximum query tokens", check="> 0")
    truncate: bool = arg(False, "cut queries longer than max_prompt_len from the left (counted)")
    skip_bad_rows: bool = arg(False, "skip malformed prompt rows (counted and reported) instead of stopping")
    max_grad_norm: float = arg(1.0, "gradient clipping", check=">= 0")
    seed: int = arg(1, "seed for query order and sampling", check=">= 0")
    save_every: int = arg(10, "checkpoint every this many steps", check="> 0")
    strategy: str = arg("ddp", "multi-process wrapping", ["ddp", "fsdp"])
    precision: str = arg("auto", distributed.PRECISION_HELP, ["auto", "fp32", "bf16"])
    gradient_checkpointing: bool = arg(False, "recompute activations in backward to save memory")


# ---------------------------------------------------------------------------------------------
# The pieces of the algorithm, each testable on its own
# ---------------------------------------------------------------------------------------------
def response_mask(response, eos_id):
    """1 on response tokens up to and including the first EOS, 0 after it (padding)."""
    is_eos = (response == eos_id).long()
    after = (is_eos.cumsum(1) - is_eos) > 0
    return (~after).long()


def logprobs_and_entropy(policy, query, qmask, response, rmask, temperature):
    """log pi(response token) for each response position, with logits / temperature as when
    sampling, and the entropy of that distribution."""
    ids, mask = torch.cat([query, response], 1), torch.cat([qmask, rmask], 1)
    logits = policy(input_ids=ids, attention_mask=mask, position_ids=modeling.positions(mask)).logits
    logits = logits[:, query.shape[1] - 1:-1].float() / temperature
    logp_all = F.log_softmax(logits, -1)
    logp = logp_all.gather(2, response[:, :, None]).squeeze(2)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def values_of(critic, query, qmask, response, rmask):
    """V(s_t) for each response token t: the critic read where the policy predicts token t."""
    ids, mask = torch.cat([query, response], 1), torch.cat([qmask, rmask], 1)
    return critic(ids, mask)[:, query.shape[1] - 1:-1]


def last_token(rmask):
    """Index of the last real response token (its EOS, or the last token if it never ends)."""
    return (rmask.sum(1) - 1).clamp(min=0).long()


def shape_score(score, ended, stats, reward_clip, missing_eos_penalty):
    """RM score -> the reward added at the last token: normalised with the RM's training
    statistics, a penalty when the response never ends, then clipped."""
    s = (score - stats["mean"]) / stats["std"] - missing_eos_penalty * (~ended).float()
    return s.clamp(-reward_clip, reward_clip) if reward_clip > 0 else s


def token_rewards(score, logp, ref_logp, rmask, kl_coef):
    """Per-token rewards: -beta (log pi - log pi_ref) on response tokens, plus the score at the
    last one; zero after EOS. Returns (rewards, kl) with kl = log pi - log pi_ref (masked)."""
    kl = (logp - ref_logp) * rmask
    rewards = -kl_coef * kl
    rewards[torch.arange(len(score)), last_token(rmask)] += score
    return rewards * rmask, kl


def gae(rewards, values, rmask, gamma, lam):
    """Generalised advantage estimation over response tokens; positions after EOS are terminal
    (value 0, reward 0). Returns (advantages, returns)."""
    values = values * rmask
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last * rmask[:, t + 1] if t + 1 < T else delta
        adv[:, t] = last
    adv = adv * rmask
    return adv, adv + values


def masked_whiten(x, mask):
    """(x - mean) / std over the masked entries of every process (so the world size is moot)."""
    n = distributed.all_sum(float(mask.sum()))
    mean = distributed.all_sum(float((x * mask).sum())) / n
    var = distributed.all_sum(float((((x - mean) * mask) ** 2).sum())) / n
    return (x - mean) * torch.rsqrt(torch.tensor(var + 1e-8)) * mask


def policy_loss(logp, old_logp, adv, rmask, cliprange):
    """Clipped surrogate, summed over masked tokens: max(-A r, -A clip(r, 1-c, 1+c)).
    Returns (loss sum, clipped-token count, approx-KL sum)."""
    ratio = torch.exp(logp - old_logp)
    loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cliprange, 1 + cliprange))
    clipped = ((ratio - 1).abs() > cliprange).float()
    approx_kl = 0.5 * (logp - old_logp) ** 2
    return (loss * rmask).sum(), (clipped * rmask).sum(), (approx_kl * rmask).sum()


def value_loss(v, old_v, returns, rmask, cliprange_value):
    """Clipped value loss, summed over masked tokens: 0.5 max((v - R)^2, (clip(v) - R)^2)."""
    v_clipped = old_v + (v - old_v).clamp(-cliprange_value, cliprange_value)
    loss = 0.5 * torch.max((v - returns) ** 2, (v_clipped - returns) ** 2)
    clipped = ((v - old_v).abs() > cliprange_value).float()
    return (loss * rmask).sum(), (clipped * rmask).sum()


class AdaptiveKL:
    """Ziegler et al. (2019): move beta so that the KL per response tracks a target."""

    def __init__(self, beta, target, horizon):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl, n):
        if self.target > 0:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.beta *= 1 + error * n / self.horizon


# ---------------------------------------------------------------------------------------------
# Roll-outs and the PPO update
# ---------------------------------------------------------------------------------------------
class Timer(dict):
    """Seconds spent per named part of a step (the time breakdown in the log and tools/bench_ppo.py)."""

    @contextlib.contextmanager
    def __call__(self, name):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self[name] = self.get(name, 0.0) + time.perf_counter() - t0


@torch.no_grad()
def rollout(policy, ref, reward, critic, tok, prompts, args, stats, kl_coef, d, timer):
    """Steps 1-4 for this process's queries: a dict of tensors (prompts: [(ids, text)])."""
    policy.eval()
    with timer("generate"):
        query, response = modeling.generate(policy, tok, [p for p, _ in prompts], args, d)  # step 1: y ~ pi(. | x)
    qmask = (query != tok.pad_token_id).long()
    rmask = response_mask(response, tok.eos_token_id)
    ended = (response == tok.eos_token_id).any(1)
    with distributed.autocast(d):
        with timer("policy_forward"):
            logp, _ = logprobs_and_entropy(policy, query, qmask, response, rmask, args.temperature)
        with timer("reference_forward"):
            ref_logp, _ = logprobs_and_entropy(ref, query, qmask, response, rmask, args.temperature)
        with timer("value_forward"):
            values = values_of(critic, query, qmask, response, rmask).float()
        with timer("reward_forward"):
            ids, mask = torch.cat([query, response], 1), torch.cat([qmask, rmask], 1)
            score = modeling.rewards(reward, ids, mask).float()
    shaped = shape_score(score, ended, stats, args.reward_clip, args.missing_eos_penalty)
    rewards, kl = token_rewards(shaped, logp, ref_logp, rmask, kl_coef)
    adv, returns = gae(rewards, values, rmask, args.gamma, args.lam)
    if args.whiten_advantages:
        adv = masked_whiten(adv, rmask.float())
    policy.train()
    distributed.reshard(policy)
    distributed.reshard(critic)
    return dict(query=query, qmask=qmask, response=response, rmask=rmask, logp=logp, values=values,
                adv=adv, returns=returns, score=score, shaped=shaped, kl=kl, ended=ended.float())


def ppo_update(policy, critic, popt, copt, batch, args, d, stop_unless_finite=None):
    """Step 5: ppo_epochs passes of mini-batches over this process's roll-outs. Every loss is a
    sum over tokens divided by the mini-batch's token count over all processes, so the update
    is the same whatever the world size. stop_unless_finite(**values) sees the global losses and
    gradient norms before every optimizer step (Run.stop_unless_finite)."""
    n = len(batch["query"])
    sums = dict.fromkeys(["pg", "vf", "clip", "vclip", "kl", "ent", "tokens"], 0.0)
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(args.ppo_epochs):
        order = torch.randperm(n, generator=gen)
        for idx in order.chunk(args.mini_batches):
            b = {k: v[idx] for k, v in batch.items()}
            tokens = distributed.all_sum(float(b["rmask"].sum()))
            with distributed.autocast(d):
                logp, entropy = logprobs_and_entropy(policy, b["query"], b["qmask"], b["response"], b["rmask"], args.temperature)
                pg, clip, akl = policy_loss(logp, b["logp"], b["adv"], b["rmask"], args.cliprange)
                v = values_of(critic, b["query"], b["qmask"], b["response"], b["rmask"])
                vf, vclip = value_loss(v, b["values"], b["returns"], b["rmask"], args.cliprange_value)
                ((pg + args.vf_coef * vf) * d.world / tokens).backward()
            norms = {"ppo/policy/grad_norm": training.clip_grad_norm(policy, args.max_grad_norm),
                     "ppo/val/grad_norm": training.clip_grad_norm(critic, args.max_grad_norm)}
            mine = {key: distributed.all_sum(float(val.detach())) for key, val in (  # this mini-batch, all processes
                ("pg", pg), ("vf", vf), ("clip", clip), ("vclip", vclip), ("kl", akl), ("ent", (entropy * b["rmask"]).sum()))}
            if stop_unless_finite:
                stop_unless_finite(**norms, **{"ppo/policy/loss": mine["pg"] / tokens, "ppo/val/loss": mine["vf"] / tokens})
            popt.step()
            copt.step()
            popt.zero_grad(set_to_none=True)
            copt.zero_grad(set_to_none=True)
            for key, val in mine.items():
                sums[key] += val
            sums["tokens"] += tokens
    t = sums["tokens"]
    return {"ppo/policy/loss": sums["pg"] / t, "ppo/val/loss": sums["vf"] / t,
            "ppo/policy/clipfrac": sums["clip"] / t, "ppo/val/clipfrac": sums["vclip"] / t,
            "ppo/policy/approxkl": sums["kl"] / t, "ppo/policy/entropy": sums["ent"] / t}


def explained_variance(values, returns, mask):
    m = mask.bool()
    return float(1 - (returns[m] - values[m]).var() / returns[m].var().clamp(min=1e-8))


def same_prompt_stats(score, k):
    """Reward differences between the k roll-outs of each query (the paper's Figure 1)."""
    if k < 2:
        return {}
    s = measure.difference_stats(score.view(-1, k))
    return {"shift/dr_var": s["var"], "shift/dr_mean_abs": s["mean_abs"]}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def load_reward_stats(rm_dir):
    """The reward mean and std that reward_model.py / metarm.py stored beside the RM."""
    path = os.path.join(rm_dir, "reward_stats.json")
    stats = cli.read_json(path)
    if not (isinstance(stats, dict) and all(isinstance(stats.get(k), (int, float)) for k in ("mean", "std"))
            and math.isfinite(stats["mean"]) and math.isfinite(stats["std"]) and stats["std"] > 0):
        raise cli.UserError(f"{path}: needs a finite 'mean' and a positive 'std', got {stats}")
    return stats


def train(args, d):
    if args.queries % d.world:
        raise cli.UserError(f"--queries {args.queries} must be divisible by the number of processes {d.world}")
    cli.set_seed(args.seed)
    run = run_folder.Run.open(args.output_dir, args, d, "ppo")
    if run is None:  # done, with these settings
        return
    tok = loading.load_tokenizer(args.policy_dir)
    texts = [p for p, _ in data.load_prompts(args.prompts, args.skip_bad_rows)]
    prompts = list(zip(data.encode_prompts(tok, texts, args.max_prompt_len, args.truncate, args.prompts), texts))
    gold = measure.gold_applies(texts)

    # the four models: policy (trained), reference (frozen), reward (frozen), critic (trained)
    policy = distributed.wrap(loading.load_causal_lm(args.policy_dir, tok), d, gradient_checkpointing=args.gradient_checkpointing)
    ref = distributed.wrap(loading.load_causal_lm(args.ref_dir or args.policy_dir, tok), d, trainable=False).eval()
    # (the reference and the reward model must share the policy's tokenizer: loading.check_tokenizer)
    reward = distributed.wrap(loading.load_reward_model(args.rm_dir, tok), d, trainable=False).eval()
    stats = load_reward_stats(args.rm_dir)
    critic = distributed.wrap(loading.load_reward_model(args.rm_dir, tok), d, gradient_checkpointing=args.gradient_checkpointing)
    popt = torch.optim.AdamW(policy.parameters(), lr=args.policy_lr, eps=1e-5)
    copt = torch.optim.AdamW(critic.parameters(), lr=args.critic_lr, eps=1e-5)
    kl_ctl = AdaptiveKL(args.kl_coef, args.kl_target, args.kl_horizon)
    torch.manual_seed(args.seed + 1000 * d.rank)  # each process samples its own roll-outs
    state = run.load_checkpoint({"policy": (policy, popt), "critic": (critic, copt)})  # and its generator
    start = state["step"] if state else 0
    if state:
        kl_ctl.beta = state["kl_coef"]
    d.print(f"ppo: {len(prompts)} prompts, {args.steps} steps of {args.queries} queries x "
            f"{args.rollouts_per_query} roll-outs")

    for step in cli.progress(range(start, args.steps), d, initial=start, total=args.steps, desc="ppo"):
        t0, timer = time.perf_counter(), Timer()
        rows = training.batch_indices(len(prompts), args.queries, step, args.seed, d, "--queries")
        mine = [prompts[i] for i in rows for _ in range(args.rollouts_per_query)]
        batch = rollout(policy, ref, reward, critic, tok, mine, args, stats, kl_ctl.beta, d, timer)
        with timer("ppo_epochs"):
            metrics = ppo_update(policy, critic, popt, copt, batch, args, d,
                                 lambda **v: run.stop_unless_finite(step, **v))

        # metrics of the roll-outs (the objective the policy maximises, and the drift)
        kl_sum = batch["kl"].sum(1)
        n = distributed.all_sum(len(kl_sum))
        mean = lambda x: distributed.all_sum(float(x.sum())) / n
        metrics.update({
            "objective/scores": mean(batch["score"]), "objective/shaped_score": mean(batch["shaped"]),
            "objective/kl": mean(kl_sum), "objective/rlhf_reward": mean(batch["shaped"] - kl_ctl.beta * kl_sum),
            "objective/kl_coef": kl_ctl.beta, "val/explained_variance": explained_variance(batch["values"], batch["returns"], batch["rmask"]),
            "rollout/length": mean(batch["rmask"].sum(1).float()), "rollout/ended": mean(batch["ended"]),
            **same_prompt_stats(batch["score"], args.rollouts_per_query),
            **{f"time/{k}_s": v for k, v in timer.items()}, "time/step_s": time.perf_counter() - t0})
        if gold:
            texts = data.decode_responses(tok, batch["response"])
            metrics["objective/gold"] = mean(torch.tensor(measure.gold_scores([p for _, p in mine], texts)))
        kl_ctl.update(metrics["objective/kl"], args.queries * args.rollouts_per_query)
        run.log(step + 1, metrics)
        if args.snapshot_every and (step + 1) % args.snapshot_every == 0 and step + 1 < args.steps:
            snap = os.path.join(args.output_dir, f"step{step + 1}")
            if d.main:
                os.makedirs(snap, exist_ok=True)
            loading.save_model(policy, tok, snap, d, extra={"DONE": {"stage": "ppo snapshot", "step": step + 1}})
        if (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            run.save_checkpoint(step + 1, {"policy": (policy, popt), "critic": (critic, copt)},
                                {"kl_coef": kl_ctl.beta})

    loading.save_model(policy, tok, args.output_dir, d)
    run.finish({"stage": "ppo", "steps": args.steps})


def main(argv=None):
    args = cli.parse_args(Args, __doc__, argv)
    train(args, distributed.init_distributed(args.strategy, args.precision, args.policy_dir))


if __name__ == "__main__":
    cli.guard(main)
