"""metarm.py: MetaRM, the paper's Algorithm 1. The reward model is trained on the *original*
preference pairs, but every step first adapts it, by one plain gradient-ascent step, to tell
apart the responses of the *current* policy (no labels needed), and takes its loss there.

Algorithm 1, step t (the names below are the paper's):
  2. X_t: n preference pairs (x, y_w, y_l) from D        3. X_s: m prompts x k responses from S
  4. J_theta(X_s) = 2/k^2 sum_{i<j} sigmoid(|r(x, s_i) - r(x, s_j)|)       difference loss (Eq. 2)
  5. theta' = theta + eta * grad J_theta(X_s)           meta-process: ascent, a plain step (Eq. 3)
  6. L_theta'(X_t) = -mean log sigmoid(r_theta'(x, y_w) - r_theta'(x, y_l))  at theta' (Eq. 1, 4)
  7. theta <- theta - alpha * grad                      MetaRM-optimization, by the optimizer (Eq. 5)

Which gradient in line 7 (--meta_grad):
  exact        d/dtheta L(theta + eta grad J(theta)) = (I + eta hess J) grad L(theta')   MAML-style
  first_order  grad L(theta') applied to theta: back up theta, ascend in place, back-propagate,
               restore theta. What the authors ran; the only form practical at 7B under sharding.
  taylor       grad of the surrogate L(theta) + eta <grad L(theta), grad J(theta)>   (Eq. 7-8)
exact - taylor = O(eta^2), first_order - taylor = O(eta): `python metarm.py --check` shows it.

    python metarm.py                                     # embedded task: round 1 meta data
    python metarm.py --check                             # the gradient-check table
    torchrun --nproc_per_node 2 metarm.py                # DDP (gloo on CPU); exact works too
    torchrun --nproc_per_node 8 metarm.py --strategy fsdp --meta_grad first_order \\
        --sft_dir runs/7b/sft --data Anthropic/hh-rlhf --eval_data Anthropic/hh-rlhf:test \\
        --meta_data runs/7b/round1/meta.jsonl --lr 5e-6 --eta 5e-6 --global_batch 16 \\
        --meta_batch 16 --max_len 512 --truncate true --skip_bad_rows true \\
        --gradient_checkpointing true --output_dir runs/7b/round1/rm   # the paper's settings (7B)
"""
import dataclasses
import math
import os

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel

import data
import reward_model as rm
import runtime
from runtime import arg


@dataclasses.dataclass
class Args:
    sft_dir: str = arg("runs/default/seed1/sft", "every round's RM starts from these SFT weights (new head)")
    init_rm: str = arg("", "start from this reward model instead of the SFT weights")
    data: str = arg("runs/default/task/data/pairs_train.jsonl", "the original preference pairs D")
    eval_data: str = arg("runs/default/task/data/pairs_test.jsonl", "held-out preference pairs")
    meta_data: str = arg("runs/default/seed1/metarm/round1/meta.jsonl", "meta data S: k policy samples per prompt (ppo.py --sample_only)")
    output_dir: str = arg("runs/default/seed1/metarm/round1/rm", "run folder (a save_pretrained reward model when done)")
    meta_grad: str = arg("first_order", "which gradient of L(theta') updates theta", ["exact", "first_order", "taylor"])
    eta: float = arg(5e-4, "eta, the meta-process ascent step: the paper's eta = alpha (5e-6 at 7B); docs/stages.md: the eta study", check=">= 0")
    lr: float = arg(5e-4, "alpha, the learning rate of the outer AdamW update (paper: 5e-6 at 7B)", check="> 0")
    epochs: float = arg(1.0, "passes over the original pairs (paper: 1)", check="> 0")
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
    seed: int = arg(1, "seed for the score head and the data order")
    save_every: int = arg(50, "checkpoint every this many steps", check="> 0")
    strategy: str = arg("ddp", "multi-process wrapping (fsdp: first_order only)", ["ddp", "fsdp"])
    precision: str = arg("auto", "bf16 on GPU, fp32 on CPU", ["auto", "fp32", "bf16"])
    gradient_checkpointing: bool = arg(False, "recompute activations in backward (first_order only)")
    deploy: str = arg("theta", "which RM to save: 'theta' = Algorithm 1's last line, theta itself; 'adapted' = "
                      "theta + eta grad J(theta; S), the meta-process applied once more on all of S (an option of "
                      "this project, not of the paper)", ["theta", "adapted"])
    check: bool = arg(False, "print the gradient-check table instead of training")


# ---------------------------------------------------------------------------------------------
# The two losses. A batch is (input_ids, attention_mask); X_t holds n chosen rows then n rejected
# rows, X_s holds m*k rows, the k responses of each prompt together.
# ---------------------------------------------------------------------------------------------
def difference_loss(r):
    """Eq. 2 for r of shape [m, k]: J = 2/k^2 sum_{i<j} sigmoid(|r_i - r_j|), mean over prompts."""
    k = r.shape[1]
    i, j = torch.triu_indices(k, k, offset=1)
    return (2 / k**2 * torch.sigmoid((r[:, i] - r[:, j]).abs()).sum(1)).mean()


def L(model, X_t, params=None):
    """Eq. 1 on a batch of pairs."""
    r = rm.rewards(model, *X_t, params)
    n = len(r) // 2
    return rm.pair_loss(r[:n], r[n:]).mean()


def J(model, X_s, k, params=None):
    """Eq. 2 on a meta batch of m prompts x k responses."""
    return difference_loss(rm.rewards(model, *X_s, params).view(-1, k))


def all_mean(tensors):
    """Average over processes, differentiably (the backward all-reduces the incoming gradient)."""
    if not dist.is_initialized():
        return list(tensors)
    from torch.distributed.nn.functional import all_reduce
    return [all_reduce(t) / dist.get_world_size() for t in tensors]


# ---------------------------------------------------------------------------------------------
# The meta-step: the gradient of Algorithm 1, line 7, in its three forms
# ---------------------------------------------------------------------------------------------
def meta_gradient(model, X_t, X_s, k, eta, mode):
    """The MetaRM gradient for the model's trainable parameters theta. The parameters are left
    exactly as they were.
      model: a reward model mapping (input_ids, attention_mask) to per-token scores, or its DDP
             or FSDP2 wrapper; X_t: a batch of pairs; X_s: a meta batch of m*k rows; k: responses
             per prompt; eta: the ascent step; mode: "exact", "first_order" or "taylor".
    Returns (grad, info): grad, one tensor per trainable parameter in model.parameters() order;
    info: J = J(theta), L = the vanilla loss it evaluated (at theta' for exact and first_order,
    at theta for taylor), grad_J = grad J(theta) and grad_L = grad L at that same point.
    Under DDP each process passes its share of both batches and gets the gradient of the global
    batches: grad J is averaged over processes before theta' is formed."""
    if mode == "first_order":
        return first_order(model, X_t, X_s, k, eta)
    net = runtime.unwrap(model)  # exact and taylor do their own averaging over processes
    names, theta = zip(*[(n, p) for n, p in net.named_parameters() if p.requires_grad])
    with sdpa_kernel(SDPBackend.MATH):  # fused CPU/flash attention kernels have no double backward
        J_theta = J(net, X_s, k)
        grad_J = all_mean(torch.autograd.grad(J_theta, theta, create_graph=True))     # kept in graph
        if mode == "exact":
            theta_prime = [p + eta * g for p, g in zip(theta, grad_J)]                     # Eq. 3
            L_value = L(net, X_t, dict(zip(names, theta_prime)))                          # Eq. 4
            both = torch.autograd.grad(L_value, [*theta, *theta_prime])
            grad = both[:len(theta)]                                 # (I + eta hess J) grad L(theta')
            grad_L = all_mean(both[len(theta):])                     # grad L(theta'), for the log
        elif mode == "taylor":
            L_value = L(net, X_t)
            grad_L = all_mean(torch.autograd.grad(L_value, theta, create_graph=True))
            surrogate = L_value + eta * sum((gl * gj).sum() for gl, gj in zip(grad_L, grad_J))  # Eq. 7
            grad = torch.autograd.grad(surrogate, theta)                                  # Eq. 8
        else:
            raise ValueError(f"unknown meta_grad {mode!r}")
    detach = lambda ts: [t.detach() for t in ts]
    return detach(all_mean(grad)), dict(J=J_theta.detach(), L=L_value.detach(),
                                        grad_J=detach(grad_J), grad_L=detach(grad_L))


def first_order(model, X_t, X_s, k, eta):
    """The authors' procedure, on the parameters in place: back up theta, ascend to theta',
    back-propagate L at theta', restore theta. Works on sharded (FSDP2) parameters, each process
    perturbing and restoring its own shard, and with gradient checkpointing (the recomputation in
    backward sees theta', which is what the parameters hold)."""
    theta = trainable(model)
    backup = [p.detach().clone() for p in theta]
    callers = taken_grads(theta, keep_none=True)  # the caller's .grad, put back at the end
    J_theta = J(model, X_s, k)
    J_theta.backward()                         # grad J(theta), averaged over processes by DDP/FSDP
    grad_J = taken_grads(theta)
    add_(theta, grad_J, eta)                   # theta' = theta + eta grad J(theta)        (Eq. 3)
    L_value = L(model, X_t)
    L_value.backward()                         # grad L(theta')                            (Eq. 4)
    grad = taken_grads(theta)
    copy_(theta, backup)                       # theta again, bit for bit
    for p, g in zip(theta, callers):
        p.grad = g
    return grad, dict(J=J_theta.detach(), L=L_value.detach(), grad_J=grad_J, grad_L=grad)


def trainable(model):
    """theta: the trainable parameters. Under FSDP2 these are the sharded parameters; a module
    left unsharded by a forward pass (the root keeps its weights gathered) is resharded first,
    so that what we perturb and restore is each process's shard."""
    return [p for p in runtime.reshard(model).parameters() if p.requires_grad]


@torch.no_grad()
def add_(params, tensors, alpha):
    """params += alpha * tensors, in place, on each process's own shard under FSDP2."""
    for p, t in zip(params, tensors):
        p, t = local(p), local(t)
        if p.numel():  # an empty FSDP2 shard has nothing to update
            p.add_(t, alpha=alpha)


@torch.no_grad()
def copy_(params, tensors):
    for p, t in zip(params, tensors):
        if local(p).numel():
            local(p).copy_(local(t))


def local(t):
    """The tensor this process holds: its shard of an FSDP2 DTensor, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def taken_grads(params, keep_none=False):
    """The parameters' .grad, cleared from them. An FSDP2 shard that holds no rows of a small
    tensor (a one-row score head split over two processes) gets no gradient: zeros then (None
    with keep_none=True)."""
    grads = [p.grad if p.grad is not None or keep_none else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    return grads


# ---------------------------------------------------------------------------------------------
# Gradient check (--check): how the three forms relate as eta shrinks
# ---------------------------------------------------------------------------------------------
def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def finite_difference(net, X_t, X_s, k, eta, direction, eps):
    """Central difference of F(theta) = L(theta + eta grad J(theta)) along `direction`."""
    names, theta = zip(*[(n, p) for n, p in net.named_parameters() if p.requires_grad])
    def F(sign):
        moved = [p + sign * eps * v for p, v in zip(theta, direction)]
        with sdpa_kernel(SDPBackend.MATH):
            g = torch.autograd.grad(J(net, X_s, k, dict(zip(names, moved))), moved)
        with torch.no_grad():
            return L(net, X_t, dict(zip(names, [m + eta * gi for m, gi in zip(moved, g)])))
    return (F(1) - F(-1)) / (2 * eps)


def check_table(net, X_t, X_s, k, etas):
    """Rows (eta, |exact - taylor|, |first_order - taylor|) and the fitted log-log slopes."""
    rows = []
    for eta in etas:
        g = {m: flat(meta_gradient(net, X_t, X_s, k, eta, m)[0]) for m in ("exact", "first_order", "taylor")}
        rows.append((eta, float((g["exact"] - g["taylor"]).norm()), float((g["first_order"] - g["taylor"]).norm())))
    return rows, slope([r[0] for r in rows], [r[1] for r in rows]), slope([r[0] for r in rows], [r[2] for r in rows])


def toy_problem(vocab=50, k=3):
    """A float64 GPT-2 reward model (2 layers, width 16; GPT-2 computes in the model's dtype
    throughout) with rewards of order one, 4 pairs and 2 prompts x k responses of random tokens."""
    from transformers import GPT2Config, GPT2ForSequenceClassification
    cfg = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=2, n_head=2, num_labels=1,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = GPT2ForSequenceClassification(cfg)
    hf.score.weight.data.normal_(0, 0.3)
    rows = lambda n: data.pad([torch.randint(1, vocab, (int(torch.randint(4, 10, ())),)).tolist()
                               for _ in range(n)], 0)
    return rm.ScalarModel(hf).double(), rows(8), rows(2 * k), k


def slope(x, y):
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(v) for v in x], [math.log(v) for v in y]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def check(args):
    """The gradient-check table in float64: on the SFT model and task batches when they exist
    (after `bash iterate.sh`), else on a tiny random GPT-2 reward model and random token rows."""
    torch.manual_seed(args.seed)
    d = runtime.Dist()
    if os.path.isdir(args.init_rm or args.sft_dir) and os.path.isfile(args.meta_data):
        tok = runtime.load_tokenizer(args.sft_dir)
        net = rm.load_reward_model(args.init_rm or args.sft_dir, tok, trained=bool(args.init_rm)).double()
        X_t, X_s, k = batches(tok, data.load_pairs(args.data)[:4], data.load_meta(args.meta_data)[:2], args, d)
        eta0 = 0.04  # small enough for the leading term to dominate (the training default is far larger)
    else:
        print(f"{args.sft_dir} or {args.meta_data} does not exist: a tiny random model and random token rows")
        net, X_t, X_s, k = toy_problem()
        eta0 = 1e-3  # its gradients are larger: the leading term dominates from a smaller eta
    rows, s_exact, s_first = check_table(net, X_t, X_s, k, [eta0 / 2**i for i in range(6)])
    print(f"gradient check: float64, {sum(p.numel() for p in net.parameters())} parameters, "
          f"4 pairs, 2 prompts x {k} responses")
    print(f"{'eta':>10} {'|exact - taylor|':>18} {'|first_order - taylor|':>24}")
    for eta, a, b in rows:
        print(f"{eta:10.4g} {a:18.3e} {b:24.3e}")
    print(f"{'slope':>10} {s_exact:18.2f} {s_first:24.2f}   (expected: 2 and 1)")
    v = [torch.randn_like(p) for p in net.parameters()]
    exact = flat(meta_gradient(net, X_t, X_s, k, eta0, "exact")[0])
    fd = float(finite_difference(net, X_t, X_s, k, eta0, v, 1e-5))
    an = float(exact @ flat(v))
    print(f"exact . v = {an:.10g}; central finite difference of L(theta + eta grad J(theta)) "
          f"along v = {fd:.10g}; relative error {abs(an - fd) / abs(fd):.1e}")


# ---------------------------------------------------------------------------------------------
# Training: --epochs passes over the original pairs, meta batches drawn in turn from S
# ---------------------------------------------------------------------------------------------
def batches(tok, pairs, meta, args, d):
    """Encode pairs and meta rows into X_t, X_s (right padded) on the device."""
    examples, _ = rm.encode_pairs(tok, pairs, args.max_len, args.truncate)
    X_t = rm.pair_batch(examples, tok.pad_token_id, d.device)
    X_s, k = meta_batch(encode_meta(tok, meta, args.max_len)[0], tok.pad_token_id, d.device)
    return X_t, X_s, k


def encode_meta(tok, meta, max_len):
    """Meta rows -> [[k token-id lists]] (prompt + response each), and the Encoder: policy samples
    longer than max_len are cut, not fatal, and the cuts are counted."""
    enc = data.Encoder(tok, max_len, truncate=True)
    return [[sum(enc(p, s, where), []) for s in rs] for p, rs, where in meta], enc


def meta_batch(samples, pad_id, device):
    """Encoded meta rows -> X_s (right padded), the k responses of each prompt together, and k."""
    ids, mask = data.pad([seq for row in samples for seq in row], pad_id)
    return (ids.to(device), mask.to(device)), len(samples[0])


def adapt(model, samples, pad_id, args, d):
    """theta <- theta + eta grad J(theta; S), in place, with grad J averaged over all of S: the
    meta-process once more, on the whole meta data, so that the saved RM is the adapted one.
    Every process takes its share of each global meta batch, as in training."""
    theta = trainable(model)
    n_batches = math.ceil(len(samples) / args.meta_batch)
    for b in range(n_batches):
        rows = [samples[i] for i in runtime.batch_indices(len(samples), args.meta_batch, b, args.seed + 2, d)]
        X_s, k = meta_batch(rows, pad_id, d.device)
        with runtime.autocast(d):
            (J(model, X_s, k) / n_batches).backward()
    add_(theta, taken_grads(theta), args.eta)


def train(args):
    d = runtime.init_distributed(args.strategy, args.precision)
    if args.meta_grad != "first_order" and d.world > 1 and d.strategy == "fsdp":
        raise runtime.UserError(
            f"--meta_grad {args.meta_grad} needs the whole parameter tensors in one autograd graph "
            "through a second backward; FSDP2 shards them and frees the gathered copies after "
            "backward, so the second-order term cannot be formed. Use --meta_grad first_order "
            "(what the authors ran at 7B) or --strategy ddp on a model that fits one device")
    if args.meta_grad != "first_order" and args.gradient_checkpointing:
        raise runtime.UserError(
            f"--meta_grad {args.meta_grad} with gradient checkpointing gives silently wrong "
            "gradients (the recomputation in backward runs outside functional_call and sees theta, "
            "not theta'); use --meta_grad first_order, which is exact under checkpointing")
    runtime.set_seed(args.seed)
    run = runtime.Run.open(args.output_dir, args, d)
    if run is None:  # done, with these settings
        return

    # 1. data: the original pairs D and the meta data S
    tok = runtime.load_tokenizer(args.sft_dir)
    pairs = data.load_pairs(args.data, args.skip_bad_rows)
    examples, enc = rm.encode_pairs(tok, pairs, args.max_len, args.truncate)
    enc.report(args.data)
    eval_pairs = data.load_pairs(args.eval_data, args.skip_bad_rows) if args.eval_data else []
    if eval_pairs:
        rm.encode_pairs(tok, eval_pairs, args.max_len, args.truncate)[1].report(args.eval_data)
    meta = data.load_meta(args.meta_data, args.skip_bad_rows)
    samples, enc = encode_meta(tok, meta, args.max_len)
    enc.report(args.meta_data)
    if args.meta_batch % d.world:
        raise runtime.UserError(f"--meta_batch {args.meta_batch} must be divisible by the number "
                                f"of processes {d.world}")

    # 2. the reward model: SFT weights and a new head (the paper: each round starts from SFT)
    model = runtime.wrap(rm.load_reward_model(args.init_rm or args.sft_dir, tok, trained=bool(args.init_rm)), d,
                         gradient_checkpointing=args.gradient_checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    theta = trainable(model)
    total = runtime.total_steps(len(examples), args.global_batch, args.epochs)
    if args.max_steps:
        total = min(total, args.max_steps)
    warmup = int(args.warmup * len(examples) / args.global_batch)
    state = run.load_checkpoint({"model": (model, opt)})
    start = state["step"] if state else 0
    d.print(f"metarm ({args.meta_grad}, eta={args.eta}): {len(examples)} pairs, {len(meta)} meta "
            f"prompts x {len(meta[0][1])} responses, {total} steps")

    gold = rm.gold_applies([p for p, _, _ in meta])

    def evaluate(step, full=False):
        """Held-out accuracy and J on the meta data; full=True adds |dr| statistics and gold agreement."""
        model.eval()
        out = rm.measure(model, tok, d, pairs=eval_pairs, meta=meta, gold=gold and full, max_len=args.max_len,
                         truncate=args.truncate)
        model.train()
        if not full:
            out = {k: v for k, v in out.items() if k in ("eval/accuracy", "eval/margin", "shift/J")}
        run.log(step, {k: v for k, v in out.items() if not isinstance(v, list)})
        return out
    if start == 0:
        evaluate(0)

    model.train()
    for step in runtime.progress(range(start, total), d, initial=start, total=total, desc="metarm"):
        # 2.-3. sample X_t from D and X_s from S (this process's share of each)
        mine = [examples[i] for i in runtime.batch_indices(len(examples), args.global_batch, step, args.seed, d)]
        X_t = rm.pair_batch(mine, tok.pad_token_id, d.device)
        rows = [samples[i] for i in runtime.batch_indices(len(samples), args.meta_batch, step, args.seed + 1, d)]
        X_s, k = meta_batch(rows, tok.pad_token_id, d.device)

        # 4.-6. the meta-step; 7. the outer update with the optimizer (learning rate alpha)
        with runtime.autocast(d):
            grad, info = meta_gradient(model, X_t, X_s, k, args.eta, args.meta_grad)
            J_prime = J_after_ascent(model, X_s, k, args.eta, info["grad_J"])
        gL, gJ = info["grad_L"], info["grad_J"]  # measured before clipping (first_order's grad_L *is* grad)
        grads = {"meta/cos_gradL_gradJ": dot(gL, gJ) / max(math.sqrt(dot(gL, gL) * dot(gJ, gJ)), 1e-30),
                 "meta/gradL_norm": math.sqrt(dot(gL, gL)), "meta/gradJ_norm": math.sqrt(dot(gJ, gJ))}
        for p, g in zip(theta, grad):
            p.grad = g
        grad_norm = runtime.clip_grad_norm(model, args.max_grad_norm)
        L_value, J_value = mean_over_processes(info["L"]), mean_over_processes(info["J"])
        run.stop_unless_finite(step, **{"train/L": L_value, "meta/J": J_value, "train/grad_norm": grad_norm})
        lr = runtime.set_lr(opt, args.lr, step, total, warmup)
        opt.step()
        opt.zero_grad(set_to_none=True)
        run.log(step + 1, {"train/L": L_value, "meta/J": J_value, "meta/J_after_ascent": mean_over_processes(J_prime),
                           **grads, "train/grad_norm": grad_norm, "train/lr": lr})
        if (step + 1) % args.eval_every == 0 and step + 1 < total:
            evaluate(step + 1)
        if (step + 1) % args.save_every == 0 and step + 1 < total:
            run.save_checkpoint(step + 1, {"model": (model, opt)})

    # the RM to deploy, its measurements on the meta data (the shifted samples), save, DONE last
    summary = {"stage": "metarm", "meta_grad": args.meta_grad, "deploy": args.deploy, "steps": total}
    if args.deploy == "adapted":  # theta's own figures first, for comparison
        summary.update({f"theta/{k}": v for k, v in evaluate(total, full=True).items()})
        adapt(model, samples, tok.pad_token_id, args, d)
    summary.update(evaluate(total, full=True))
    model.eval()
    stats = rm.reward_stats(model, examples, tok.pad_token_id, d)
    runtime.save_model(model, tok, args.output_dir, d, extra={"reward_stats.json": stats})
    run.finish({**summary, "reward_stats": stats})


@torch.no_grad()
def J_after_ascent(model, X_s, k, eta, grad_J):
    """J(theta') for the log: ascend in place, one forward pass, restore theta."""
    theta = trainable(model)
    backup = [p.detach().clone() for p in theta]
    add_(theta, grad_J, eta)
    value = J(model, X_s, k)
    copy_(theta, backup)
    return value


def dot(a, b):
    """sum_i <a_i, b_i> over two lists of (full or FSDP2-sharded) tensors."""
    total = sum(float((local(x).double() * local(y).double()).sum()) for x, y in zip(a, b))
    return runtime.all_sum(total) if any(hasattr(t, "to_local") for t in a) else total


def mean_over_processes(x):
    return runtime.all_sum(float(x)) / (dist.get_world_size() if dist.is_initialized() else 1)


def main(argv=None):
    args = runtime.parse_args(Args, __doc__, argv)
    check(args) if args.check else train(args)


if __name__ == "__main__":
    runtime.guard(main)
