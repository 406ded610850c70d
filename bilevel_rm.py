"""bilevel_rm.py: a reward model meta-trained by bilevel optimisation so that the policy it
steers agrees with human preferences on several training distributions (Jia 2024, "Generalizing
Reward Modeling for Out-of-Distribution Preference Learning", arXiv 2402.14760); at meta-test
time, on a distribution no preference pair covers, PPO with it (ppo.py) is the paper's
regularised policy optimisation with the learned reward model.

The outer variables are the reward model's parameters theta; each training distribution i
(here: a topic of the embedded task, or its harmful requests) has a support set P_i of prompts
with k samples of pi_ref each and a query set D_i of preference pairs:

    inner   phi_i(theta) = argmax_phi  E_{x~P_i, y~pi_phi}[r_theta(x, y)] - beta KL(pi_phi || pi_ref)
    outer   min_theta  sum_i L_i(phi_i(theta)),
            L_i(phi) = -E_{(x, y_w, y_l)~D_i} log sigmoid(beta [log pi_phi(y_w|x)/pi_ref(y_w|x)
                                                                - log pi_phi(y_l|x)/pi_ref(y_l|x)])

The inner solution is approximated by K plain gradient-ascent steps from pi_ref (the SFT model)
on an importance-weighted estimate of the inner objective from the support samples
(inner_objective); the hypergradient is exact through those K steps (unrolled, second order:
every inner gradient stays in the graph). The inner problem sees theta only through the support
rewards r = r_theta(x, y), so the chain rule splits in two (meta_step):
dL/dtheta = dL/dr . dr/dtheta, the first through the unrolled policy steps, the second one
backward through the reward model. At the exact inner optimum pi_phi = pi_ref exp(r/beta) / Z,
beta log pi_phi/pi_ref = r - beta log Z and L_i is Eq. 1 itself; the outer loss differs from
the vanilla reward model's only through what a few policy steps on P_i can move. docs/stages.md
says which choices are the paper's and which are this project's.

    python bilevel_rm.py                       # embedded task, from the vanilla RM (CPU)
    torchrun --nproc_per_node 2 bilevel_rm.py  # the same with DDP (gloo on CPU)
    OOD=1 ARMS="metarm vanilla bilevel" bash iterate.sh   # the OOD experiment with this arm
"""
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

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
    sft_dir: str = arg("runs/default/seed1/sft", "pi_ref: the SFT policy the inner problem starts from and is regularised to")
    init_rm: str = arg("runs/default/seed1/rm", "the reward model theta starts from ('': a new head on the SFT model)")
    data: str = arg("runs/default/task/data/pairs_train.jsonl", "the preference pairs: query sets D_i, grouped by distribution")
    eval_data: str = arg("runs/default/task/data/pairs_test.jsonl", "held-out preference pairs")
    support: str = arg("runs/default/seed1/sft_samples/meta.jsonl", "support sets P_i: k samples of pi_ref per prompt of "
                       "the training distributions (sample.py on their prompts)")
    output_dir: str = arg("runs/default/seed1/bilevel_rm", "run folder (a save_pretrained reward model when done)")
    beta: float = arg(0.1, "beta: the inner problem's KL coefficient, and the outer loss's scale", check="> 0")
    inner_lr: float = arg(0.01, "the step size of the inner gradient ascent on the policy (a trust region: the "
                          "estimated KL of the step stays near 0.1 nats on the embedded task)", check="> 0")
    inner_steps: int = arg(1, "K: inner steps unrolled (the hypergradient is exact through them)", check="> 0")
    steps: int = arg(50, "outer steps", check="> 0")
    lr: float = arg(1e-4, "peak learning rate of AdamW on theta", check="> 0")
    warmup: float = arg(0.1, "linear warm-up as a share of the steps, then linear decay to zero", check=">= 0")
    weight_decay: float = arg(0.0, "AdamW weight decay", check=">= 0")
    tasks_per_step: int = arg(2, "training distributions per outer step, over all processes", check="> 0")
    support_prompts: int = arg(4, "prompts of P_i per distribution and step, each with its k samples", check="> 0")
    query_pairs: int = arg(16, "pairs of D_i per distribution and step", check="> 0")
    max_len: int = arg(128, "maximum prompt + response tokens", check="> 0")
    truncate: bool = arg(False, "cut rows longer than max_len (counted) instead of stopping")
    skip_bad_rows: bool = arg(False, "skip malformed rows (counted and reported) instead of stopping")
    max_grad_norm: float = arg(1.0, "gradient clipping (0: off)", check=">= 0")
    eval_every: int = arg(25, "held-out accuracy every this many steps", check="> 0")
    seed: int = arg(1, "seed for the distributions and rows of each step", check=">= 0")
    save_every: int = arg(25, "checkpoint every this many steps", check="> 0")
    strategy: str = arg("ddp", "multi-process wrapping (ddp only: the hypergradient is second order)", ["ddp", "fsdp"])
    precision: str = arg("auto", distributed.PRECISION_HELP, ["auto", "fp32", "bf16"])


# ---------------------------------------------------------------------------------------------
# The two objectives. S: the support batch (m prompts x k samples of pi_ref, the k of a prompt
# together); Q: the query batch (n chosen rows, then n rejected). Each a data.response_batch.
# ---------------------------------------------------------------------------------------------
def inner_objective(logp, logp_ref, r, beta, k, logq=None):
    """The inner objective E_{y~pi_phi}[r(x, y) - r_bar(x)] - beta KL(pi_phi || pi_ref) per prompt,
    averaged, estimated from k samples per prompt drawn from q (pi_ref in the meta-step, the
    default) with importance weights w = pi_phi / q: mean of w (r - r_bar - beta log pi_phi/pi_ref).
    r_bar(x), the mean reward of the prompt's k samples, is a baseline (constant in phi); at
    phi = pi_ref, w = 1 and the gradient is the REINFORCE estimate mean (r - r_bar - beta) grad log pi."""
    w = torch.exp(logp - (logp_ref if logq is None else logq))
    advantage = r - r.view(-1, k).mean(1).repeat_interleave(k)
    return (w * (advantage - beta * (logp - logp_ref))).mean()


def outer_loss(logp, logp_ref, beta):
    """L_i: the preference loss of the tuned policy on the query pairs (chosen rows, then
    rejected), through its implicit reward beta log pi_phi / pi_ref."""
    n = len(logp) // 2
    h = beta * (logp - logp_ref)
    return -F.logsigmoid(h[:n] - h[n:]).mean()


def policy_params(policy):
    names, phi = zip(*[(n, p.detach()) for n, p in policy.named_parameters()])
    return list(names), list(phi)


# ---------------------------------------------------------------------------------------------
# The meta-step: one training distribution's hypergradient
# ---------------------------------------------------------------------------------------------
def L_through_inner(r, policy, S, Q, k, args):
    """The outer loss L_i as a function of the support rewards r: K inner ascent steps from
    pi_ref, each kept in the graph, then L_i at the tuned policy phi_K."""
    names, phi = policy_params(policy)
    logp = lambda batch, params: modeling.sequence_logps(policy, *batch, dict(zip(names, params)))
    with torch.no_grad():
        ref_S, ref_Q = logp(S, phi), logp(Q, phi)
    phi = [p.requires_grad_() for p in phi]
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):  # fused attention kernels have no double backward
        for _ in range(args.inner_steps):
            J = inner_objective(logp(S, phi), ref_S, r, args.beta, k)                        # inner
            grad_J = torch.autograd.grad(J, phi, create_graph=True)
            phi = [p + args.inner_lr * g for p, g in zip(phi, grad_J)]                      # ascent
        logp_S = logp(S, phi)
        L_i = outer_loss(logp(Q, phi), ref_Q, args.beta)                                    # outer
    kl = (torch.exp(logp_S - ref_S) * (logp_S - ref_S)).mean()  # KL(pi_phi_K || pi_ref), estimated on S
    return L_i, dict(kl=kl.detach())


def meta_step(rm, policy, S, Q, k, args, scale=1.0):
    """Adds scale * dL_i/dtheta to the .grad of the reward model's parameters; returns (L_i, info).
    The chain rule in two pieces: dL_i/dr through the unrolled inner steps, then one backward of
    r = r_theta(x, y) through the reward model (under DDP, that backward averages over processes)."""
    r = modeling.rewards(rm, *S[:2])                            # r_theta on the support samples
    r_leaf = r.detach().requires_grad_()
    L_i, info = L_through_inner(r_leaf, policy, S, Q, k, args)
    dL_dr, = torch.autograd.grad(L_i, r_leaf)
    (scale * (r * dL_dr).sum()).backward()                     # dL_i/dtheta = dL_i/dr . dr/dtheta
    return L_i.detach(), info


# ---------------------------------------------------------------------------------------------
# Training distributions
# ---------------------------------------------------------------------------------------------
def group(rows, path):
    """{distribution: [row index]} for rows (prompt, ..., where): the embedded task's topics and
    its harmful requests (measure.distribution)."""
    out = {}
    for i, row in enumerate(rows):
        name = measure.distribution(row[0])
        if name is None:
            raise data.DataError(f"{path} {row[-1]}: the prompt belongs to none of the embedded task's "
                                 "training distributions (its topics, or a harmful request); bilevel_rm.py "
                                 "groups prompts by them")
        out.setdefault(name, []).append(i)
    return out


def distributions(pairs, meta, args):
    """The training distributions with both a query set and a support set."""
    D, P = group(pairs, args.data), group(meta, args.support)
    names = sorted(set(D) & set(P))
    if len(names) < args.tasks_per_step:
        raise cli.UserError(
            f"{len(names)} training distributions have both pairs ({args.data}: {sorted(D)}) and support "
            f"samples ({args.support}: {sorted(P)}); --tasks_per_step {args.tasks_per_step} needs as many")
    return names, D, P


def step_rows(rows, want, step, seed, salt):
    """`want` of a distribution's row indices for one step (with replacement when it has fewer)."""
    rng = np.random.default_rng([seed, step, salt])
    return [rows[i] for i in rng.choice(len(rows), size=want, replace=len(rows) < want)]


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def train(args):
    d = distributed.init_distributed(args.strategy, args.precision, args.sft_dir)
    if d.world > 1 and args.strategy == "fsdp":
        raise cli.UserError("bilevel_rm.py differentiates through the policy's inner gradient steps: "
                                "FSDP2 frees the gathered weights after backward; use --strategy ddp")
    cli.set_seed(args.seed)
    run = run_folder.Run.open(args.output_dir, args, d, "bilevel_rm")
    if run is None:  # done, with these settings
        return

    # 1. data: query pairs and support samples, grouped into training distributions
    tok = loading.load_tokenizer(args.sft_dir)
    pairs = data.load_pairs(args.data, args.skip_bad_rows)
    query = data.encode_pairs(tok, pairs, args.max_len, args.truncate, args.data, joined=False)
    examples = [(sum(w, []), sum(l, [])) for w, l in query]  # prompt + response joined: the RM's rows
    eval_pairs = data.load_pairs(args.eval_data, args.skip_bad_rows) if args.eval_data else []
    eval_examples = data.encode_pairs(tok, eval_pairs, args.max_len, args.truncate, args.eval_data)
    meta = data.load_meta(args.support, args.skip_bad_rows)
    support_enc = data.Encoder(tok, args.max_len, truncate=True)  # policy samples: cut, not fatal
    support = [[support_enc(p, s, where) for s in rs] for p, rs, where in meta]
    support_enc.report(args.support)
    k = len(meta[0][1])
    names, D, P = distributions(pairs, meta, args)

    # 2. the reward model theta (trained) and pi_ref (frozen: each inner problem starts from it)
    model = distributed.wrap(loading.load_reward_model(args.init_rm or args.sft_dir, tok, trained=bool(args.init_rm)), d)
    policy = loading.load_causal_lm(args.sft_dir, tok).to(d.device).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total, warmup = args.steps, int(args.warmup * args.steps)
    state = run.load_checkpoint({"model": (model, opt)})
    start = state["step"] if state else 0
    d.print(f"bilevel rm (beta={args.beta}, K={args.inner_steps}): {len(names)} training distributions "
            f"({', '.join(names)}), {len(pairs)} pairs, {len(meta)} support prompts x {k} samples, {total} steps")

    def evaluate(step, final=False):
        """Held-out accuracy and margin; final=True adds the |dr| statistics and gold agreement
        on the support samples."""
        model.eval()
        out = measure.preference_accuracy(model, eval_examples, tok.pad_token_id, d)
        if final:
            r = measure.score_samples(model, [[sum(x, []) for x in row] for row in support], tok.pad_token_id, d)
            out.update(measure.shift(r, meta if measure.gold_applies([p for p, _, _ in meta]) else None))
        model.train()
        run.log(step, out)
        return out
    if start == 0:
        evaluate(0)

    # 3. train: each step, tasks_per_step distributions; each adds its hypergradient
    model.train()
    batch = lambda rows: tuple(t.to(d.device) for t in data.response_batch(rows, tok.pad_token_id))
    for step in cli.progress(range(start, total), d, initial=start, total=total, desc="bilevel"):
        mine = [names[i] for i in training.batch_indices(len(names), args.tasks_per_step, step, args.seed, d, "--tasks_per_step")]
        L_sum = kl_sum = 0.0
        for j, name in enumerate(mine):
            salt = names.index(name)
            S = batch([x for i in step_rows(P[name], args.support_prompts, step, args.seed, salt) for x in support[i]])
            Q_pairs = [query[i] for i in step_rows(D[name], args.query_pairs, step, args.seed + 1, salt)]
            Q = batch([w for w, _ in Q_pairs] + [l for _, l in Q_pairs])
            with distributed.grad_sync(model, j == len(mine) - 1), distributed.autocast(d):
                L_i, info = meta_step(model, policy, S, Q, k, args, scale=d.world / args.tasks_per_step)
            L_sum += float(L_i)
            kl_sum += float(info["kl"])
        hypergrad = [p.grad for p in distributed.trainable(model)]
        hypergrad_norm = distributed.dot(hypergrad, hypergrad) ** 0.5  # before clipping
        grad_norm = training.clip_grad_norm(model, args.max_grad_norm)
        L_value = distributed.all_sum(L_sum) / args.tasks_per_step
        run.stop_unless_finite(step, **{"train/L_outer": L_value, "train/grad_norm": grad_norm})
        lr = training.set_lr(opt, args.lr, step, total, warmup)
        opt.step()
        opt.zero_grad(set_to_none=True)
        run.log(step + 1, {"train/L_outer": L_value, "inner/kl": distributed.all_sum(kl_sum) / args.tasks_per_step,
                           "meta/hypergrad_norm": hypergrad_norm, "train/grad_norm": grad_norm, "train/lr": lr})
        if (step + 1) % args.eval_every == 0 and step + 1 < total:
            evaluate(step + 1)
        if (step + 1) % args.save_every == 0 and step + 1 < total:
            run.save_checkpoint(step + 1, {"model": (model, opt)})

    # 4. the RM to deploy, its measurements, reward statistics for PPO, save, DONE last
    summary = {"stage": "bilevel_rm", "steps": total, "distributions": names}
    summary.update(evaluate(total, final=True))
    model.eval()
    stats = measure.reward_stats(model, examples, tok.pad_token_id, d)
    loading.save_model(model, tok, args.output_dir, d, extra={"reward_stats.json": stats})
    run.finish({**summary, "reward_stats": stats})


def main(argv=None):
    train(cli.parse_args(Args, __doc__, argv))


if __name__ == "__main__":
    cli.guard(main)
