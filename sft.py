"""sft.py: supervised fine-tuning, the first stage of RLHF. The loss is the next-token
cross-entropy on response tokens only: prompt and padding tokens contribute nothing.

    python sft.py                                         # embedded task, CPU, under a minute
    torchrun --nproc_per_node 2 sft.py                    # the same with DDP (gloo on CPU)
    torchrun --nproc_per_node 8 sft.py --strategy fsdp \\
        --model_name_or_path meta-llama/Llama-2-7b-hf --data Anthropic/hh-rlhf \\
        --lr 2e-5 --epochs 2 --warmup 0.3 --global_batch 32 --micro_batch 4 \\
        --max_len 512 --truncate true --output_dir runs/7b/sft   # the paper's settings (7B)

The defaults train the embedded task's tiny model from scratch (python task.py builds it).
The output folder is a save_pretrained model + tokenizer, with args.json, metrics.jsonl and,
written last, DONE. A killed run resumes from its last checkpoint when started again.
"""
import dataclasses

import torch
import torch.nn.functional as F

import cli
import data
import distributed
import loading
import run_folder
import training
from cli import arg


@dataclasses.dataclass
class Args:
    model_name_or_path: str = arg("runs/default/task/base_model", "base model: a local folder or a hub name")
    data: str = arg("runs/default/task/data/sft.jsonl", "SFT rows: {prompt, response} or HH-RLHF rows")
    output_dir: str = arg("runs/default/seed1/sft", "run folder (a save_pretrained model when done)")
    epochs: float = arg(4.0, "passes over the data (paper: 2)", check="> 0")
    lr: float = arg(5e-3, "peak learning rate, AdamW (paper: 2e-5; the tiny default trains from scratch)", check="> 0")
    warmup: float = arg(0.3, "linear warm-up, in epochs (paper: 0.3), then linear decay to zero", check=">= 0")
    weight_decay: float = arg(0.0, "AdamW weight decay", check=">= 0")
    global_batch: int = arg(32, "rows per optimizer step, whatever the number of processes (paper: 32)", check="> 0")
    micro_batch: int = arg(0, "rows per forward pass on one process (0: all of its share at once)", check=">= 0")
    max_len: int = arg(128, "maximum prompt + response tokens", check="> 0")
    truncate: bool = arg(False, "cut rows longer than max_len (counted) instead of stopping")
    skip_bad_rows: bool = arg(False, "skip malformed rows (counted and reported) instead of stopping")
    max_grad_norm: float = arg(1.0, "gradient clipping (0: off)", check=">= 0")
    max_steps: int = arg(0, "stop after this many steps (0: all epochs)", check=">= 0")
    seed: int = arg(1, "seed for initialisation and data order", check=">= 0")
    save_every: int = arg(100, "checkpoint every this many steps", check="> 0")
    strategy: str = arg("ddp", "multi-process wrapping", ["ddp", "fsdp"])
    precision: str = arg("auto", distributed.PRECISION_HELP, ["auto", "fp32", "bf16"])
    gradient_checkpointing: bool = arg(False, "recompute activations in backward to save memory")


def sft_loss_sum(logits, labels):
    """Sum of -log p(token) over response tokens. labels is the input shifted by the model:
    labels[t] = input[t] on response tokens and -100 (ignored) on prompt and padding tokens."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=-100, reduction="sum")


def train(args):
    d = distributed.init_distributed(args.strategy, args.precision, args.model_name_or_path)
    cli.set_seed(args.seed)
    run = run_folder.Run.open(args.output_dir, args, d, "sft")
    if run is None:  # done, with these settings
        return

    # 1. data: tokenized once; prompt tokens are masked out of the loss
    tok = loading.load_tokenizer(args.model_name_or_path)
    rows = data.load_sft(args.data, args.skip_bad_rows)
    enc = data.Encoder(tok, args.max_len, args.truncate)
    examples = [enc(p, r, where) for p, r, where in rows]
    enc.report(args.data)

    # 2. model, optimizer, schedule
    model = loading.load_causal_lm(args.model_name_or_path, tok)
    model = distributed.wrap(model, d, gradient_checkpointing=args.gradient_checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total = training.total_steps(len(examples), args.global_batch, args.epochs)
    if args.max_steps:
        total = min(total, args.max_steps)
    warmup = int(args.warmup * len(examples) / args.global_batch)
    state = run.load_checkpoint({"model": (model, opt)})
    start = state["step"] if state else 0
    # a sharded (DTensor) parameter reports its full size
    d.print(f"sft: {len(examples)} rows, {total} steps of {args.global_batch} rows, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    # 3. train: loss = sum over the global batch's response tokens / their number
    model.train()
    for step in cli.progress(range(start, total), d, initial=start, total=total, desc="sft"):
        mine = [examples[i] for i in training.batch_indices(len(examples), args.global_batch, step, args.seed, d)]
        n_tokens = distributed.all_sum(sum(len(r) for _, r in mine))
        loss_sum = 0.0
        chunks = training.micro_batches(mine, args.micro_batch)
        for j, chunk in enumerate(chunks):
            ids, mask, labels = (t.to(d.device) for t in data.response_batch(chunk, tok.pad_token_id))
            with distributed.grad_sync(model, j == len(chunks) - 1), distributed.autocast(d):
                s = sft_loss_sum(model(input_ids=ids, attention_mask=mask).logits, labels)
                # DDP/FSDP average gradients over processes: scale so the result is the global mean
                (s * d.world / n_tokens).backward()
            loss_sum += s.item()
        grad_norm = training.clip_grad_norm(model, args.max_grad_norm)
        loss = distributed.all_sum(loss_sum) / n_tokens
        run.stop_unless_finite(step, **{"train/loss": loss, "train/grad_norm": grad_norm})
        lr = training.set_lr(opt, args.lr, step, total, warmup)
        opt.step()
        opt.zero_grad(set_to_none=True)
        run.log(step + 1, {"train/loss": loss, "train/lr": lr,
                           "train/grad_norm": grad_norm, "train/tokens": int(n_tokens)})
        if (step + 1) % args.save_every == 0 and step + 1 < total:
            run.save_checkpoint(step + 1, {"model": (model, opt)})

    # 4. save the model where the next stage expects it, DONE last
    loading.save_model(model, tok, args.output_dir, d)
    run.finish({"stage": "sft", "steps": total})


def main(argv=None):
    train(cli.parse_args(Args, __doc__, argv))


if __name__ == "__main__":
    cli.guard(main)
