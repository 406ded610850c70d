"""metarm.py: MetaRM, the paper's Algorithm 1. The reward model is trained on the *original*
preference pairs by the paper's Eq. 1, as in reward_model.py,

    L(theta) = -E_{(x, y_w, y_l) ~ D} log sigmoid(r_theta(x, y_w) - r_theta(x, y_l))        (Eq. 1)

r_theta is a Hugging Face sequence-classification model with one label, initialised from the SFT
folder and read at the last real (non-pad) token of prompt + response (modeling.rewards).

But every step first adapts it, by one plain gradient-ascent step, to tell apart the responses
of the *current* policy (no labels needed), and takes its loss there. Step t (the paper's names):
  2. X_t: n preference pairs (x, y_w, y_l) from D        3. X_s: m prompts x k responses from S
  4. J_theta(X_s) = 2/k^2 sum_{i<j} sigmoid(|r(x, s_i) - r(x, s_j)|)       difference loss (Eq. 2)
  5. theta' = theta + eta * grad J_theta(X_s)           meta-process: ascent, a plain step (Eq. 3)
  6. L_theta'(X_t), Eq. 1 at theta' (Eq. 4)             7. theta <- theta - alpha * grad (Eq. 5)
The gradient in line 7 (--meta_grad) in three forms, side by side in meta_gradient: exact (through
the inner gradient), first_order (the authors'; works sharded), taylor (Eq. 7-8); tools/gradcheck.py.

    python metarm.py                                        # train on the embedded task (CPU)
    torchrun --nproc_per_node 2 metarm.py                   # the same with DDP (gloo on CPU)
    torchrun --nproc_per_node 8 metarm.py --strategy fsdp --sft_dir runs/7b/sft \\
        --data Anthropic/hh-rlhf --eval_data Anthropic/hh-rlhf:test --lr 5e-6 \\
        --meta_data runs/7b/round1/samples/meta.jsonl --meta_batch 16 --meta_grad first_order --eta 5e-6 \\
        --global_batch 16 --max_len 512 --truncate true --skip_bad_rows true \\
        --gradient_checkpointing true --output_dir runs/7b/round1/rm   # the paper's settings (7B)
"""
import contextlib
import dataclasses
import math

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
    sft_dir: str = arg("runs/default/seed1/sft", "the SFT model the reward model starts from, with a new head (folder or hub name)")
    data: str = arg("runs/default/task/data/pairs_train.jsonl", "the preference pairs D (HH-RLHF schema)")
    eval_data: str = arg("runs/default/task/data/pairs_test.jsonl", "held-out preference pairs")
    meta_data: str = arg("runs/default/seed1/sft_samples/meta.jsonl", "meta data S: k policy samples per prompt (sample.py)")
    output_dir: str = arg("runs/default/seed1/metarm/round1/rm", "run folder (a save_pretrained reward model when done)")
    meta_grad: str = arg("first_order", "which gradient of L(theta') updates theta", ["exact", "first_order", "taylor"])
    eta: float = arg(5e-4, "eta, the meta-process ascent step: the paper's eta = alpha (5e-6 at 7B); docs/stages.md: the eta study", check=">= 0")
    epochs: float = arg(1.0, "passes over the preference pairs (paper: 1)", check="> 0")
    lr: float = arg(5e-4, "alpha: peak learning rate of AdamW (paper: 5e-6 at 7B)", check="> 0")
    warmup: float = arg(0.1, "linear warm-up in epochs, then linear decay to zero", check=">= 0")
    weight_decay: float = arg(0.0, "AdamW weight decay", check=">= 0")
    global_batch: int = arg(32, "n: preference pairs per step, over all processes (paper: 16)", check="> 0")
    meta_batch: int = arg(8, "m: prompts of the meta data per step, each with its k responses (paper: 16)", check="> 0")
    max_len: int = arg(128, "maximum prompt + response tokens", check="> 0")
    truncate: bool = arg(False, "cut rows longer than max_len (counted) instead of stopping")
    skip_bad_rows: bool = arg(False, "skip malformed rows (counted and reported) instead of stopping")
    max_grad_norm: float = arg(1.0, "gradient clipping (0: off)", check=">= 0")
    max_steps: int = arg(0, "stop after this many steps (0: all epochs)", check=">= 0")
    eval_every: int = arg(50, "held-out accuracy and J on the meta data every this many steps", check="> 0")
    seed: int = arg(1, "seed for the score head and the data order", check=">= 0")
    save_every: int = arg(50, "checkpoint every this many steps", check="> 0")
    strategy: str = arg("ddp", "multi-process wrapping", ["ddp", "fsdp"])
    precision: str = arg("auto", distributed.PRECISION_HELP, ["auto", "fp32", "bf16"])
    gradient_checkpointing: bool = arg(False, "recompute activations in backward (first_order only)")
    deploy: str = arg("theta", "which RM to save: 'theta' = Algorithm 1's last line, theta itself; 'adapted' = "
                      "theta + eta grad J(theta; S), the meta-process applied once more on all of S (an option of "
                      "this project, not of the paper)", ["theta", "adapted"])


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------
def pair_loss(r_w, r_l):
    """Eq. 1 per pair: -log sigmoid(r(x, y_w) - r(x, y_l))."""
    return -F.logsigmoid(r_w - r_l)


def L(model, X_t, params=None):
    """Eq. 1 on a batch of pairs X_t (n chosen rows, then the n rejected), averaged."""
    r = modeling.rewards(model, *X_t, params)
    n = len(r) // 2
    return pair_loss(r[:n], r[n:]).mean()


# ---------------------------------------------------------------------------------------------
# The meta-step. X_s: m*k rows, a prompt's k responses together
# ---------------------------------------------------------------------------------------------
def J(model, X_s, k, params=None):
    """Eq. 2 on a meta batch of m prompts x k responses: J = 2/k^2 sum_{i<j} sigmoid(|r_i - r_j|),
    mean over prompts (measure.difference_loss: the reports measure every RM's J with it too)."""
    return measure.difference_loss(modeling.rewards(model, *X_s, params).view(-1, k))


def ascend(theta, grad_J, eta):
    """Eq. 3, the meta-process: theta' = theta + eta grad J(theta), one plain ascent step. Every
    path forms theta' here: change the inner step here, and only here."""
    return [torch.add(p, g, alpha=eta) for p, g in zip(theta, grad_J)]


def meta_gradient(model, X_t, X_s, k, eta, mode):
    """The MetaRM gradient for the trainable parameters theta of `model` (a reward model, or its DDP /
    FSDP2 wrapper), left exactly as they were. X_t: pairs; X_s: m*k rows; mode: "exact", "first_order"
    or "taylor". Returns (grad, info): grad, one tensor per trainable parameter (parameters() order);
    info: J = J(theta), grad_J, and L and grad_L where the form evaluates L (theta', or theta for
    taylor). Under DDP each process passes its share of both batches and gets the gradient of the
    global batches: grad J is averaged over processes before theta' is formed."""
    if mode == "first_order":
        return first_order(model, X_t, X_s, k, eta)
    net = distributed.unwrap(model)  # exact and taylor do their own averaging over processes
    names, theta = zip(*[(n, p) for n, p in net.named_parameters() if p.requires_grad])
    if mode not in ("exact", "taylor"):
        raise ValueError(f"unknown meta_grad {mode!r}")
    with twice():
        J_theta = J(net, X_s, k)
        grad_J = distributed.all_mean(torch.autograd.grad(J_theta, theta, create_graph=True))     # kept in graph
    if mode == "exact":
        theta_prime = ascend(theta, grad_J, eta)                                           # Eq. 3
        L_value = L(net, X_t, dict(zip(names, theta_prime)))                              # Eq. 4
        both = torch.autograd.grad(L_value, [*theta, *theta_prime])
        grad = both[:len(theta)]                                     # (I + eta hess J) grad L(theta')
        grad_L = distributed.all_mean(both[len(theta):])                 # grad L(theta'), for the log
    else:
        with twice():
            L_value = L(net, X_t)
            grad_L = distributed.all_mean(torch.autograd.grad(L_value, theta, create_graph=True))
        surrogate = L_value + eta * sum((gl * gj).sum() for gl, gj in zip(grad_L, grad_J))      # Eq. 7
        grad = torch.autograd.grad(surrogate, theta)                                      # Eq. 8
    detach = lambda ts: [t.detach() for t in ts]
    return detach(distributed.all_mean(grad)), dict(J=J_theta.detach(), L=L_value.detach(),
                                        grad_J=detach(grad_J), grad_L=detach(grad_L))


def twice():
    """Attention for a graph that is differentiated twice: fused kernels have no double backward."""
    return sdpa_kernel(SDPBackend.MATH)


def first_order(model, X_t, X_s, k, eta):
    """The authors' procedure, in place: ascend to theta', back-propagate L there, restore theta.
    Works on FSDP2 shards and under gradient checkpointing (which recomputes with theta')."""
    theta = distributed.trainable(model)
    callers = distributed.taken_grads(theta, keep_none=True)  # the caller's .grad, put back at the end
    J_theta = J(model, X_s, k)
    J_theta.backward()                         # grad J(theta), averaged over processes by DDP/FSDP
    grad_J = distributed.taken_grads(theta)
    with ascended(model, grad_J, eta):         # theta' = theta + eta grad J(theta)        (Eq. 3)
        L_value = L(model, X_t)
        L_value.backward()                     # grad L(theta')                            (Eq. 4)
    grad = distributed.taken_grads(theta)
    for p, g in zip(theta, callers):
        p.grad = g
    return grad, dict(J=J_theta.detach(), L=L_value.detach(), grad_J=grad_J, grad_L=grad)


@contextlib.contextmanager
def ascended(model, grad_J, eta):
    """Inside, the model's parameters hold theta' (Eq. 3); after, theta again, bit for bit."""
    theta = distributed.trainable(model)
    backup = [p.detach().clone() for p in theta]
    distributed.copy_(theta, ascend(backup, grad_J, eta))
    try:
        yield
    finally:
        distributed.copy_(theta, backup)


def adapt(model, samples, pad_id, args, d):
    """--deploy adapted: theta <- theta + eta grad J(theta; S), in place, with grad J averaged over
    all of S (every process takes its share of each global meta batch, as in training)."""
    theta = distributed.trainable(model)
    n_batches = math.ceil(len(samples) / args.meta_batch)
    for b in range(n_batches):
        rows = [samples[i] for i in training.batch_indices(len(samples), args.meta_batch, b, args.seed + 2, d, "--meta_batch")]
        X_s, k = data.meta_batch(rows, pad_id, d.device)
        with distributed.autocast(d):
            (J(model, X_s, k) / n_batches).backward()
    grad_J = distributed.taken_grads(theta)
    with torch.no_grad():
        distributed.copy_(theta, ascend(theta, grad_J, args.eta))


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def train(args):
    d = distributed.init_distributed(args.strategy, args.precision, args.sft_dir)
    if args.meta_grad != "first_order" and (args.gradient_checkpointing or d.world > 1 and d.strategy == "fsdp"):
        raise cli.UserError(
            f"--meta_grad {args.meta_grad} back-propagates through grad J: FSDP2 frees the gathered weights "
            "after backward, and gradient checkpointing recomputes with theta, not theta' (silently wrong "
            "gradients). Use --meta_grad first_order (what the authors ran at 7B), or --strategy ddp")
    cli.set_seed(args.seed)
    run = run_folder.Run.open(args.output_dir, args, d, "metarm")
    if run is None:  # done, with these settings
        return

    # 1. data: the preference pairs D and the meta data S
    tok = loading.load_tokenizer(args.sft_dir)
    pairs = data.load_pairs(args.data, args.skip_bad_rows)
    examples = data.encode_pairs(tok, pairs, args.max_len, args.truncate, args.data)
    eval_pairs = data.load_pairs(args.eval_data, args.skip_bad_rows) if args.eval_data else []
    eval_examples = data.encode_pairs(tok, eval_pairs, args.max_len, args.truncate, args.eval_data)
    meta = data.load_meta(args.meta_data, args.skip_bad_rows)
    gold = measure.gold_applies([p for p, _, _, _ in pairs])
    samples = data.encode_meta(tok, meta, args.max_len, args.meta_data)
    gold_meta = measure.gold_applies([p for p, _, _ in meta])

    # 2. the reward model: SFT weights and a new head
    model = distributed.wrap(loading.load_reward_model(args.sft_dir, tok, trained=False), d,
                         gradient_checkpointing=args.gradient_checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total = training.total_steps(len(examples), args.global_batch, args.epochs)
    if args.max_steps:
        total = min(total, args.max_steps)
    warmup = int(args.warmup * len(examples) / args.global_batch)
    state = run.load_checkpoint({"model": (model, opt)})
    start = state["step"] if state else 0
    d.print(f"metarm ({args.meta_grad}, eta={args.eta}): {len(examples)} pairs, {len(meta)} meta prompts, {total} steps")

    def evaluate(step, final=False):
        """Held-out accuracy and margin, J on the meta data; final=True adds |dr| and gold agreement."""
        model.eval()
        out = measure.preference_accuracy(model, eval_examples, tok.pad_token_id, d)
        r = measure.score_samples(model, samples, tok.pad_token_id, d)
        out["shift/J"] = float(measure.difference_loss(r))
        if final:
            out.update(measure.shift(r, meta if gold_meta else None))
        model.train()
        run.log(step, out)
        return out
    if start == 0:
        evaluate(0)

    # 3. train: Algorithm 1, lines 2-7
    model.train()
    theta = distributed.trainable(model)
    at = "theta" if args.meta_grad == "taylor" else "theta_prime"  # where L and grad L are evaluated
    for step in cli.progress(range(start, total), d, initial=start, total=total, desc="metarm"):
        mine = [examples[i] for i in training.batch_indices(len(examples), args.global_batch, step, args.seed, d)]
        X_t = data.pair_batch(mine, tok.pad_token_id, d.device)                             # 2. X_t from D
        rows = [samples[i] for i in training.batch_indices(len(samples), args.meta_batch, step, args.seed + 1, d, "--meta_batch")]
        X_s, k = data.meta_batch(rows, tok.pad_token_id, d.device)                          # 3. X_s from S
        with distributed.autocast(d):                                                           # 4.-6. meta-step
            grad, info = meta_gradient(model, X_t, X_s, k, args.eta, args.meta_grad)
        with torch.no_grad(), ascended(model, info["grad_J"], args.eta):
            J_prime = distributed.mean_over_processes(J(model, X_s, k))                         # J(theta'), logged
        gL, gJ = info["grad_L"], info["grad_J"]                                             # logged before clipping
        norms = {f"meta/gradL_at_{at}_norm": distributed.dot(gL, gL) ** 0.5, "meta/gradJ_norm": distributed.dot(gJ, gJ) ** 0.5}
        norms[f"meta/cos_gradL_at_{at}_gradJ"] = distributed.dot(gL, gJ) / max(math.prod(norms.values()), 1e-30)
        for p, g in zip(theta, grad):
            p.grad = g
        grad_norm = training.clip_grad_norm(model, args.max_grad_norm)
        L_value, J_value = distributed.mean_over_processes(info["L"]), distributed.mean_over_processes(info["J"])
        run.stop_unless_finite(step, **{f"train/L_at_{at}": L_value, "meta/J": J_value, "train/grad_norm": grad_norm})
        lr = training.set_lr(opt, args.lr, step, total, warmup)
        opt.step()                                                     # 7. theta <- theta - alpha * grad
        opt.zero_grad(set_to_none=True)
        run.log(step + 1, {f"train/L_at_{at}": L_value, "meta/J": J_value, "meta/J_after_ascent": J_prime,
                           **norms, "train/grad_norm": grad_norm, "train/lr": lr})
        if (step + 1) % args.eval_every == 0 and step + 1 < total:
            evaluate(step + 1)
        if (step + 1) % args.save_every == 0 and step + 1 < total:
            run.save_checkpoint(step + 1, {"model": (model, opt)})

    # 4. the RM to deploy, its measurements, reward statistics for PPO, save, DONE last
    summary = {"stage": "metarm", "meta_grad": args.meta_grad, "deploy": args.deploy, "steps": total}
    if args.deploy == "adapted":  # theta's own figures first, for comparison
        summary.update({f"theta/{k}": v for k, v in evaluate(total, final=True).items()})
        adapt(model, samples, tok.pad_token_id, args, d)
    summary.update(evaluate(total, final=True))
    if gold:
        summary["label_ceiling/train"] = measure.label_ceiling(pairs)
        if eval_pairs:
            summary["label_ceiling/eval"] = measure.label_ceiling(eval_pairs)
    model.eval()
    stats = measure.reward_stats(model, examples, tok.pad_token_id, d)
    loading.save_model(model, tok, args.output_dir, d, extra={"reward_stats.json": stats})
    run.finish({**summary, "reward_stats": stats})


def main(argv=None):
    train(cli.parse_args(Args, __doc__, argv))


if __name__ == "__main__":
    cli.guard(main)
