"""reward_model.py: the vanilla reward model, trained on preference pairs by the paper's Eq. 1.

    L(theta) = -E_{(x, y_w, y_l) ~ D} log sigmoid(r_theta(x, y_w) - r_theta(x, y_l))        (Eq. 1)

r_theta is a Hugging Face sequence-classification model with one label, initialised from the SFT
folder and read at the last real (non-pad) token of prompt + response (modeling.rewards).
metarm.py is this file plus Algorithm 1's meta-step: `diff reward_model.py metarm.py` shows it.

    python reward_model.py                                  # train on the embedded task (CPU)
    torchrun --nproc_per_node 2 reward_model.py             # the same with DDP (gloo on CPU)
    torchrun --nproc_per_node 8 reward_model.py --strategy fsdp --sft_dir runs/7b/sft \\
        --data Anthropic/hh-rlhf --eval_data Anthropic/hh-rlhf:test --lr 5e-6 \\
        --global_batch 16 --max_len 512 --truncate true --skip_bad_rows true \\
        --gradient_checkpointing true --output_dir runs/7b/rm      # the paper's settings (7B)
"""
import dataclasses

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
    sft_dir: str = arg("runs/default/seed1/sft", "the SFT model the reward model starts from, with a new head (folder or hub name)")
    data: str = arg("runs/default/task/data/pairs_train.jsonl", "the preference pairs D (HH-RLHF schema)")
    eval_data: str = arg("runs/default/task/data/pairs_test.jsonl", "held-out preference pairs")
    output_dir: str = arg("runs/default/seed1/rm", "run folder (a save_pretrained reward model when done)")
    epochs: float = arg(1.0, "passes over the preference pairs (paper: 1)", check="> 0")
    lr: float = arg(5e-4, "alpha: peak learning rate of AdamW (paper: 5e-6 at 7B)", check="> 0")
    warmup: float = arg(0.1, "linear warm-up in epochs, then linear decay to zero", check=">= 0")
    weight_decay: float = arg(0.0, "AdamW weight decay", check=">= 0")
    global_batch: int = arg(32, "n: preference pairs per step, over all processes (paper: 16)", check="> 0")
    max_len: int = arg(128, "maximum prompt + response tokens", check="> 0")
    truncate: bool = arg(False, "cut rows longer than max_len (counted) instead of stopping")
    skip_bad_rows: bool = arg(False, "skip malformed rows (counted and reported) instead of stopping")
    max_grad_norm: float = arg(1.0, "gradient clipping (0: off)", check=">= 0")
    max_steps: int = arg(0, "stop after this many steps (0: all epochs)", check=">= 0")
    eval_every: int = arg(50, "held-out accuracy every this many steps", check="> 0")
    seed: int = arg(1, "seed for the score head and the data order", check=">= 0")
    save_every: int = arg(50, "checkpoint every this many steps", check="> 0")
    strategy: str = arg("ddp", "multi-process wrapping", ["ddp", "fsdp"])
    precision: str = arg("auto", distributed.PRECISION_HELP, ["auto", "fp32", "bf16"])
    gradient_checkpointing: bool = arg(False, "recompute activations in backward to save memory")


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------
def pair_loss(r_w, r_l):
    """Eq. 1 per pair: -log sigmoid(r(x, y_w) - r(x, y_l))."""
    return -F.logsigmoid(r_w - r_l)


def L(model, X_t):
    """Eq. 1 on a batch of pairs X_t (n chosen rows, then the n rejected), averaged."""
    r = modeling.rewards(model, *X_t)
    n = len(r) // 2
    return pair_loss(r[:n], r[n:]).mean()


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def train(args):
    d = distributed.init_distributed(args.strategy, args.precision, args.sft_dir)
    cli.set_seed(args.seed)
    run = run_folder.Run.open(args.output_dir, args, d, "reward_model")
    if run is None:  # done, with these settings
        return

    # 1. data: the preference pairs D
    tok = loading.load_tokenizer(args.sft_dir)
    pairs = data.load_pairs(args.data, args.skip_bad_rows)
    examples = data.encode_pairs(tok, pairs, args.max_len, args.truncate, args.data)
    eval_pairs = data.load_pairs(args.eval_data, args.skip_bad_rows) if args.eval_data else []
    eval_examples = data.encode_pairs(tok, eval_pairs, args.max_len, args.truncate, args.eval_data)
    gold = measure.gold_applies([p for p, _, _, _ in pairs])

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
    d.print(f"reward model: {len(examples)} pairs, {total} steps of {args.global_batch} pairs")

    def evaluate(step):
        """Held-out accuracy and margin."""
        model.eval()
        out = measure.preference_accuracy(model, eval_examples, tok.pad_token_id, d)
        model.train()
        run.log(step, out)
        return out
    if start == 0:
        evaluate(0)

    # 3. train: Eq. 1, averaged over the global batch
    model.train()
    for step in cli.progress(range(start, total), d, initial=start, total=total, desc="rm"):
        mine = [examples[i] for i in training.batch_indices(len(examples), args.global_batch, step, args.seed, d)]
        X_t = data.pair_batch(mine, tok.pad_token_id, d.device)
        with distributed.autocast(d):
            L_value = L(model, X_t)
            L_value.backward()
        grad_norm = training.clip_grad_norm(model, args.max_grad_norm)
        L_value = distributed.mean_over_processes(L_value.detach())
        run.stop_unless_finite(step, **{"train/L": L_value, "train/grad_norm": grad_norm})
        lr = training.set_lr(opt, args.lr, step, total, warmup)
        opt.step()
        opt.zero_grad(set_to_none=True)
        run.log(step + 1, {"train/L": L_value, "train/grad_norm": grad_norm, "train/lr": lr})
        if (step + 1) % args.eval_every == 0 and step + 1 < total:
            evaluate(step + 1)
        if (step + 1) % args.save_every == 0 and step + 1 < total:
            run.save_checkpoint(step + 1, {"model": (model, opt)})

    # 4. the RM to deploy, its measurements, reward statistics for PPO, save, DONE last
    summary = {"stage": "reward_model", "steps": total}
    summary.update(evaluate(total))
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
