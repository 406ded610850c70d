"""dpo.py: Direct Preference Optimization (Rafailov et al. 2023), the paper's Table 2 baseline:
the policy learns from the preference pairs directly, with no reward model and no PPO. The
frozen SFT model is the reference pi_ref; for a pair (x, y_w, y_l) the loss is (Eq. 7 there)

    L_DPO = -log sigmoid( beta * [ (log pi(y_w|x) - log pi_ref(y_w|x))
                                 - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )

and beta * (log pi(y|x) - log pi_ref(y|x)) is the implicit reward r_hat(x, y): the log-ratios are
sums over the response tokens (EOS included), prompt and padding contribute nothing. The held-out
"accuracy" is the share of pairs whose implicit reward ranks y_w above y_l.

    python dpo.py                                          # embedded task: from SFT, the same pairs as the RM
    torchrun --nproc_per_node 2 dpo.py                     # DDP (gloo on CPU)
    torchrun --nproc_per_node 8 dpo.py --strategy fsdp --sft_dir runs/7b/sft \\
        --data Anthropic/hh-rlhf --eval_data Anthropic/hh-rlhf:test --lr 5e-7 --beta 0.1 \\
        --global_batch 32 --micro_batch 2 --max_len 512 --truncate true --skip_bad_rows true \\
        --gradient_checkpointing true --output_dir runs/7b/dpo   # usual 7B settings (the paper gives none)

The output folder is a save_pretrained policy, like sft.py's, with args.json, metrics.jsonl and,
written last, DONE. A killed run resumes from its last checkpoint when started again.
"""
import dataclasses

import torch
import torch.nn.functional as F

import cli
import data
import distributed
import loading
import modeling
import run_folder
import training
from cli import arg


@dataclasses.dataclass
class Args:
    sft_dir: str = arg("runs/default/seed1/sft", "the SFT model: the policy's start and the frozen reference pi_ref")
    data: str = arg("runs/default/task/data/pairs_train.jsonl", "preference pairs (the reward model's pairs)")
    eval_data: str = arg("runs/default/task/data/pairs_test.jsonl", "held-out preference pairs")
    output_dir: str = arg("runs/default/seed1/dpo", "run folder (a save_pretrained policy when done)")
    beta: float = arg(0.1, "beta, the strength of the KL constraint to pi_ref (Rafailov et al.: 0.1)", check="> 0")
    epochs: float = arg(1.0, "passes over the pairs (as the reward model)", check="> 0")
    lr: float = arg(5e-4, "peak learning rate, AdamW (the reward model's; 7B: about 5e-7)", check="> 0")
    warmup: float = arg(0.1, "linear warm-up in epochs, then linear decay to zero", check=">= 0")
    weight_decay: float = arg(0.0, "AdamW weight decay", check=">= 0")
    global_batch: int = arg(32, "pairs per optimizer step, whatever the number of processes", check="> 0")
    micro_batch: int = arg(0, "pairs per forward pass on one process (0: all of its share)", check=">= 0")
    max_len: int = arg(128, "maximum prompt + response tokens", check="> 0")
    truncate: bool = arg(False, "cut rows longer than max_len (counted) instead of stopping")
    skip_bad_rows: bool = arg(False, "skip malformed rows (counted and reported) instead of stopping")
    max_grad_norm: float = arg(1.0, "gradient clipping (0: off)", check=">= 0")
    max_steps: int = arg(0, "stop after this many steps (0: all epochs)", check=">= 0")
    eval_every: int = arg(50, "held-out implicit-reward accuracy every this many steps", check="> 0")
    seed: int = arg(1, "seed for the data order", check=">= 0")
    save_every: int = arg(50, "checkpoint every this many steps", check="> 0")
    strategy: str = arg("ddp", "multi-process wrapping", ["ddp", "fsdp"])
    precision: str = arg("auto", distributed.PRECISION_HELP, ["auto", "fp32", "bf16"])
    gradient_checkpointing: bool = arg(False, "recompute activations in backward to save memory")


# ---------------------------------------------------------------------------------------------
# The loss. A batch holds the n chosen rows, then the n rejected rows (prompt + response each).
# ---------------------------------------------------------------------------------------------
def dpo_loss(logp_w, logp_l, ref_w, ref_l, beta):
    """Per pair: the DPO loss and the implicit rewards r_hat of the chosen and rejected responses."""
    r_w, r_l = beta * (logp_w - ref_w), beta * (logp_l - ref_l)
    return -F.logsigmoid(r_w - r_l), r_w.detach(), r_l.detach()


def pair_terms(policy, ref, examples, pad_id, beta, d):
    """dpo_loss on a list of encoded pairs: the policy's forward with gradient, pi_ref's without."""
    rows = [w for w, _ in examples] + [l for _, l in examples]
    ids, mask, labels = (t.to(d.device) for t in data.response_batch(rows, pad_id))
    n = len(examples)
    with torch.no_grad():
        ref_logp = modeling.sequence_logps(ref, ids, mask, labels)
    logp = modeling.sequence_logps(policy, ids, mask, labels)
    return dpo_loss(logp[:n], logp[n:], ref_logp[:n], ref_logp[n:], beta)


@torch.no_grad()
def implicit_accuracy(policy, ref, examples, pad_id, beta, d, batch=64):
    """Held-out share of pairs with r_hat(y_w) > r_hat(y_l), and the mean margin; every process
    scores a share and all get the totals."""
    right = margin = 0.0
    for idx, real in distributed.shard_batches(len(examples), batch, d):
        _, r_w, r_l = pair_terms(policy, ref, [examples[i] for i in idx], pad_id, beta, d)
        if real:
            right += float((r_w > r_l).sum())
            margin += float((r_w - r_l).sum())
    n = len(examples)
    return distributed.all_sum(right) / n, distributed.all_sum(margin) / n


def train(args):
    d = distributed.init_distributed(args.strategy, args.precision, args.sft_dir)
    cli.set_seed(args.seed)
    run = run_folder.Run.open(args.output_dir, args, d, "dpo")
    if run is None:  # done, with these settings
        return

    # 1. data: (prompt, response) token ids of each chosen and rejected response
    tok = loading.load_tokenizer(args.sft_dir)
    encode = lambda path: data.encode_pairs(tok, data.load_pairs(path, args.skip_bad_rows), args.max_len,
                                            args.truncate, path, joined=False)
    examples = encode(args.data)
    eval_examples = encode(args.eval_data) if args.eval_data else []

    # 2. the policy (trained) and the reference (frozen), both from SFT
    policy = distributed.wrap(loading.load_causal_lm(args.sft_dir, tok), d,
                          gradient_checkpointing=args.gradient_checkpointing)
    ref = distributed.wrap(loading.load_causal_lm(args.sft_dir, tok), d, trainable=False).eval()
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total = training.total_steps(len(examples), args.global_batch, args.epochs)
    if args.max_steps:
        total = min(total, args.max_steps)
    warmup = int(args.warmup * len(examples) / args.global_batch)
    state = run.load_checkpoint({"model": (policy, opt)})
    start = state["step"] if state else 0
    d.print(f"dpo (beta={args.beta}): {len(examples)} pairs, {total} steps of {args.global_batch} pairs")

    def evaluate(step):
        if eval_examples:
            policy.eval()
            acc, margin = implicit_accuracy(policy, ref, eval_examples, tok.pad_token_id, args.beta, d)
            policy.train()
            run.log(step, {"eval/accuracy": acc, "eval/margin": margin})
            return acc
    if start == 0:
        evaluate(0)

    # 3. train: L_DPO averaged over the global batch
    policy.train()
    for step in cli.progress(range(start, total), d, initial=start, total=total, desc="dpo"):
        mine = [examples[i] for i in training.batch_indices(len(examples), args.global_batch, step, args.seed, d)]
        chunks = training.micro_batches(mine, args.micro_batch)
        loss_sum = acc_sum = margin_sum = 0.0
        for j, chunk in enumerate(chunks):
            with distributed.grad_sync(policy, j == len(chunks) - 1), distributed.autocast(d):
                loss, r_w, r_l = pair_terms(policy, ref, chunk, tok.pad_token_id, args.beta, d)
                # DDP/FSDP average gradients over processes: scale so the result is the global mean
                (loss.sum() * d.world / args.global_batch).backward()
            loss_sum += loss.sum().item()
            acc_sum += (r_w > r_l).float().sum().item()
            margin_sum += (r_w - r_l).sum().item()
        grad_norm = training.clip_grad_norm(policy, args.max_grad_norm)
        n = args.global_batch
        loss = distributed.all_sum(loss_sum) / n
        run.stop_unless_finite(step, **{"train/loss": loss, "train/grad_norm": grad_norm})
        lr = training.set_lr(opt, args.lr, step, total, warmup)
        opt.step()
        opt.zero_grad(set_to_none=True)
        run.log(step + 1, {"train/loss": loss, "train/accuracy": distributed.all_sum(acc_sum) / n,
                           "train/margin": distributed.all_sum(margin_sum) / n, "train/lr": lr, "train/grad_norm": grad_norm})
        if (step + 1) % args.eval_every == 0 and step + 1 < total:
            evaluate(step + 1)
        if (step + 1) % args.save_every == 0 and step + 1 < total:
            run.save_checkpoint(step + 1, {"model": (policy, opt)})

    # 4. save the policy where the evaluation expects it, DONE last
    acc = evaluate(total)
    loading.save_model(policy, tok, args.output_dir, d)
    run.finish({"stage": "dpo", "steps": total, "beta": args.beta, "eval/accuracy": acc})


def main(argv=None):
    train(cli.parse_args(Args, __doc__, argv))


if __name__ == "__main__":
    cli.guard(main)
