"""reward_model.py: the vanilla reward model (the paper's Eq. 1), and the measurements every later
stage uses to see distribution shift.

    L(theta) = -E_{(x, y_w, y_l) ~ D} log sigmoid(r_theta(x, y_w) - r_theta(x, y_l))        (Eq. 1)

r_theta is a Hugging Face sequence-classification model with one label, initialised from the SFT
folder and read at the last real (non-pad) token of prompt + response.

    python reward_model.py                                  # train on the embedded task (CPU)
    torchrun --nproc_per_node 2 reward_model.py             # the same with DDP (gloo on CPU)
    python reward_model.py --measure runs/default/seed1/rm --samples runs/default/seed1/metarm/round1/meta.jsonl
    torchrun --nproc_per_node 8 reward_model.py --strategy fsdp --sft_dir runs/7b/sft \\
        --data Anthropic/hh-rlhf --eval_data Anthropic/hh-rlhf:test --lr 5e-6 \\
        --global_batch 16 --micro_batch 2 --max_len 512 --truncate true --skip_bad_rows true \\
        --output_dir runs/7b/rm                                    # the paper's settings (7B)

Measurements (functions the other stages import, and `--measure` on any saved RM):
  * preference accuracy and mean margin r(y_w) - r(y_l) on held-out pairs;
  * the label ceiling: how often the noisy labels agree with the gold ordering (embedded task);
  * gold agreement: on k samples per prompt (a meta-data file, e.g. the policy's samples), how
    often the RM orders two responses of one prompt as the gold judge does (gold ties excluded);
  * the reward-difference distribution of the paper's Figures 1 and 5: pairwise |dr| between
    responses of one prompt, its variance, a histogram and the share near zero.
"""
import dataclasses
import json
import os

import torch
import torch.nn.functional as F

import data
import runtime
from runtime import arg


@dataclasses.dataclass
class Args:
    sft_dir: str = arg("runs/default/seed1/sft", "the SFT model the reward model starts from (folder or hub name)")
    data: str = arg("runs/default/task/data/pairs_train.jsonl", "preference pairs (HH-RLHF schema)")
    eval_data: str = arg("runs/default/task/data/pairs_test.jsonl", "held-out preference pairs")
    output_dir: str = arg("runs/default/seed1/rm", "run folder (a save_pretrained reward model when done)")
    epochs: float = arg(1.0, "passes over the pairs (paper: 1)", check="> 0")
    lr: float = arg(5e-4, "peak learning rate, AdamW (paper: 5e-6 at 7B)", check="> 0")
    warmup: float = arg(0.1, "linear warm-up in epochs, then linear decay to zero", check=">= 0")
    weight_decay: float = arg(0.0, "AdamW weight decay", check=">= 0")
    global_batch: int = arg(32, "pairs per optimizer step, whatever the number of processes (paper: 16)", check="> 0")
    micro_batch: int = arg(0, "pairs per forward pass on one process (0: all of its share)", check=">= 0")
    max_len: int = arg(128, "maximum prompt + response tokens", check="> 0")
    truncate: bool = arg(False, "cut rows longer than max_len (counted) instead of stopping")
    skip_bad_rows: bool = arg(False, "skip malformed rows (counted and reported) instead of stopping")
    max_grad_norm: float = arg(1.0, "gradient clipping (0: off)", check=">= 0")
    max_steps: int = arg(0, "stop after this many steps (0: all epochs)", check=">= 0")
    eval_every: int = arg(50, "held-out accuracy every this many steps", check="> 0")
    seed: int = arg(1, "seed for the score head and the data order")
    save_every: int = arg(50, "checkpoint every this many steps", check="> 0")
    strategy: str = arg("ddp", "multi-process wrapping", ["ddp", "fsdp"])
    precision: str = arg("auto", "bf16 on GPU, fp32 on CPU", ["auto", "fp32", "bf16"])
    gradient_checkpointing: bool = arg(False, "recompute activations in backward to save memory")
    measure: str = arg("", "measure this saved reward model instead of training one")
    samples: str = arg("", "with --measure: k samples per prompt (meta-data file) for gold agreement and |dr|")


# ---------------------------------------------------------------------------------------------
# The reward model: a scalar read at the last real token
# ---------------------------------------------------------------------------------------------
class ScalarModel(torch.nn.Module):
    """A Hugging Face sequence-classification model (one label) read at every position:
    forward -> [B, T] scores. `hf` is the plain model that save_pretrained writes. PPO's critic
    is the same thing, read at every response token instead of the last one."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids, attention_mask):
        h = self.hf.base_model(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=positions(attention_mask)).last_hidden_state
        scores = self.hf.score(h)[..., 0]
        # a new tensor, not a view of the head's output (FSDP2 warns that in-place changes to a
        # view would bypass it); bf16 -> fp32, fp32 and fp64 kept
        return scores.to(torch.promote_types(scores.dtype, torch.float32), copy=True)


def positions(mask):
    """Position ids that start at 0 on the first real token, so left padding changes nothing."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def last_index(mask):
    """Index of the last real token of each row, for left or right padding."""
    T = mask.shape[1]
    return T - 1 - mask.flip(-1).long().argmax(-1)


def rewards(model, ids, mask, params=None):
    """r_theta(x, y) for each row: the score at the last real token. With `params` (name -> tensor),
    r at those parameters instead, through torch.func.functional_call (MetaRM's theta')."""
    scores = model(ids, mask) if params is None else torch.func.functional_call(model, params, (ids, mask))
    return scores.gather(1, last_index(mask)[:, None]).squeeze(1)


def load_reward_model(name, tok, trained=True):
    """A one-label sequence-classification model: a trained reward model (a folder that
    reward_model.py or metarm.py wrote: sequence classification, with reward_stats.json), or,
    with trained=False, a new score head on an SFT model."""
    from transformers import AutoModelForSequenceClassification
    kind = runtime.model_kind(name)
    if trained and (kind != "reward model" or not os.path.isfile(os.path.join(name, "reward_stats.json"))):
        raise runtime.UserError(
            f"{name} is not a reward model ({kind or 'no sequence-classification config.json'}"
            f"{'' if kind != 'reward model' else ', no reward_stats.json'}): pass a folder that "
            "reward_model.py or metarm.py wrote (for an outside RM, add a reward_stats.json "
            '{"mean": 0.0, "std": 1.0})')
    if not trained and kind == "reward model":
        raise runtime.UserError(f"{name} is a reward model, not the SFT model a new reward model "
                                "starts from (metarm.py --init_rm starts from a reward model)")
    hf = runtime._from_pretrained(AutoModelForSequenceClassification, name, num_labels=1,
                                  dtype=torch.float32)
    if not hasattr(hf, "score"):
        raise runtime.UserError(f"{type(hf).__name__} has no 'score' head; use a decoder model "
                                "(Llama, Mistral, Qwen2, GPT-2, ...)")
    return ScalarModel(runtime._fit_vocab(runtime.no_dropout(hf), tok))


def pair_loss(r_w, r_l):
    """Eq. 1 per pair: -log sigmoid(r(x, y_w) - r(x, y_l))."""
    return -F.logsigmoid(r_w - r_l)


def encode_pairs(tok, pairs, max_len, truncate):
    enc = data.Encoder(tok, max_len, truncate)
    out = [(sum(enc(p, w, where), []), sum(enc(p, l, where), [])) for p, w, l, where in pairs]
    return out, enc


def pair_batch(examples, pad_id, device):
    """[(chosen_ids, rejected_ids)] -> one right-padded batch: chosen rows, then rejected rows."""
    ids, mask = data.pad([c for c, _ in examples] + [r for _, r in examples], pad_id)
    return ids.to(device), mask.to(device)


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def score_sequences(model, seqs, pad_id, d, batch=64):
    """Rewards of a list of token-id lists; every process scores a share, all get all of them."""
    out = torch.zeros(len(seqs), dtype=torch.float64)
    for idx, real in runtime.shard_batches(len(seqs), batch, d):
        ids, mask = data.pad([seqs[i] for i in idx], pad_id)
        with runtime.autocast(d):
            r = rewards(model, ids.to(d.device), mask.to(d.device)).double().cpu()
        if real:
            out[idx] = r
    return runtime.all_sum(out) if d.world > 1 else out


def preference_accuracy(model, examples, pad_id, d):
    """(accuracy, mean margin) on encoded pairs; a tie counts as half right."""
    r = score_sequences(model, [c for c, _ in examples] + [x for _, x in examples], pad_id, d)
    margin = r[:len(examples)] - r[len(examples):]
    acc = ((margin > 0).double() + 0.5 * (margin == 0).double()).mean()
    return float(acc), float(margin.mean())


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


def label_ceiling(pairs):
    """Share of preference labels that agree with the gold ordering (gold ties excluded)."""
    import task
    gaps = [task.gold(p, w) - task.gold(p, l) for p, w, l, _ in pairs]
    counted = [g for g in gaps if g != 0]
    return sum(g > 0 for g in counted) / max(len(counted), 1)


def embedded(path):
    """True for a file of the embedded task (its folder has task.json): the gold judge applies."""
    return os.path.isfile(os.path.join(os.path.dirname(path), "task.json"))


def gold_applies(prompts):
    """True when every prompt is one of the embedded task's (so the gold judge can grade)."""
    import task
    return all(task.is_task_prompt(p) for p in prompts)


def score_samples(model, tok, meta, d, max_len=256):
    """Rewards of a meta-data set [(prompt, [k responses], where)] -> [m, k] tensor."""
    enc = data.Encoder(tok, max_len, truncate=True)
    seqs = [sum(enc(p, s), []) for p, rs, _ in meta for s in rs]
    return score_sequences(model, seqs, tok.pad_token_id, d).view(len(meta), -1)


def measure(model, tok, d, pairs=None, meta=None, gold=False, max_len=128, truncate=False):
    """Every measurement that applies: preference accuracy on pairs; on samples (a meta-data set)
    J (Eq. 2), the reward-difference statistics and, with gold=True (embedded task), gold
    agreement. Each sample is scored once."""
    out = {}
    if pairs:
        examples, _ = encode_pairs(tok, pairs, max_len, truncate)
        out["eval/accuracy"], out["eval/margin"] = preference_accuracy(model, examples, tok.pad_token_id, d)
    if meta:
        from metarm import difference_loss
        r = score_samples(model, tok, meta, d)
        out["shift/J"] = float(difference_loss(r))
        out.update({f"shift/dr_{k}": v for k, v in difference_stats(r).items()})
        if gold:
            import task
            g = torch.tensor([[task.gold(p, s) for s in rs] for p, rs, _ in meta])
            out["shift/gold_agreement"], out["shift/gold_pairs"] = gold_agreement(r, g)
    return out


def reward_stats(model, examples, pad_id, d, n=2048):
    """Mean and standard deviation of r over (up to n of) the training responses, chosen and
    rejected alike: PPO normalises the RM score with them."""
    seqs = [c for c, _ in examples] + [x for _, x in examples]
    pick = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(0))[:n].tolist()
    r = score_sequences(model, [seqs[i] for i in pick], pad_id, d)
    return {"mean": float(r.mean()), "std": float(r.std()), "n": len(r)}


# ---------------------------------------------------------------------------------------------
# Training, Eq. 1
# ---------------------------------------------------------------------------------------------
def train(args):
    d = runtime.init_distributed(args.strategy, args.precision)
    runtime.set_seed(args.seed)
    run = runtime.Run.open(args.output_dir, args, d)
    if run is None:  # done, with these settings
        return

    # 1. data
    tok = runtime.load_tokenizer(args.sft_dir)
    pairs = data.load_pairs(args.data, args.skip_bad_rows)
    examples, enc = encode_pairs(tok, pairs, args.max_len, args.truncate)
    enc.report(args.data)
    eval_pairs = data.load_pairs(args.eval_data, args.skip_bad_rows) if args.eval_data else []
    eval_examples = []
    if eval_pairs:
        eval_examples, eval_enc = encode_pairs(tok, eval_pairs, args.max_len, args.truncate)
        eval_enc.report(args.eval_data)

    # 2. model from the SFT weights, with a new scalar head
    model = runtime.wrap(load_reward_model(args.sft_dir, tok, trained=False), d,
                         gradient_checkpointing=args.gradient_checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total = runtime.total_steps(len(examples), args.global_batch, args.epochs)
    if args.max_steps:
        total = min(total, args.max_steps)
    warmup = int(args.warmup * len(examples) / args.global_batch)
    state = run.load_checkpoint({"model": (model, opt)})
    start = state["step"] if state else 0
    d.print(f"reward model: {len(examples)} pairs, {total} steps of {args.global_batch} pairs")

    def evaluate(step):
        if eval_examples:
            model.eval()
            acc, margin = preference_accuracy(model, eval_examples, tok.pad_token_id, d)
            model.train()
            run.log(step, {"eval/accuracy": acc, "eval/margin": margin})
            return acc
    if start == 0:
        evaluate(0)

    # 3. train: Eq. 1 averaged over the global batch
    model.train()
    for step in runtime.progress(range(start, total), d, initial=start, total=total, desc="rm"):
        mine = [examples[i] for i in runtime.batch_indices(len(examples), args.global_batch, step, args.seed, d)]
        chunks = runtime.micro_batches(mine, args.micro_batch)
        loss_sum = acc_sum = 0.0
        for j, chunk in enumerate(chunks):
            ids, mask = pair_batch(chunk, tok.pad_token_id, d.device)
            with runtime.grad_sync(model, j == len(chunks) - 1), runtime.autocast(d):
                r = rewards(model, ids, mask)
                r_w, r_l = r[:len(chunk)], r[len(chunk):]
                loss = pair_loss(r_w, r_l).sum()
                (loss * d.world / args.global_batch).backward()
            loss_sum += loss.item()
            acc_sum += (r_w > r_l).float().sum().item()
        grad_norm = runtime.clip_grad_norm(model, args.max_grad_norm)
        loss = runtime.all_sum(loss_sum) / args.global_batch
        run.stop_unless_finite(step, **{"train/loss": loss, "train/grad_norm": grad_norm})
        lr = runtime.set_lr(opt, args.lr, step, total, warmup)
        opt.step()
        opt.zero_grad(set_to_none=True)
        run.log(step + 1, {"train/loss": loss,
                           "train/accuracy": runtime.all_sum(acc_sum) / args.global_batch,
                           "train/lr": lr, "train/grad_norm": grad_norm})
        if (step + 1) % args.eval_every == 0 and step + 1 < total:
            evaluate(step + 1)
        if (step + 1) % args.save_every == 0 and step + 1 < total:
            run.save_checkpoint(step + 1, {"model": (model, opt)})

    # 4. final measurements, reward statistics for PPO, save, DONE last
    model.eval()
    acc = evaluate(total)
    stats = reward_stats(model, examples, tok.pad_token_id, d)
    summary = {"stage": "reward_model", "steps": total, "eval/accuracy": acc, "reward_stats": stats}
    if embedded(args.data):
        summary["label_ceiling/train"] = label_ceiling(pairs)
        if eval_pairs:
            summary["label_ceiling/eval"] = label_ceiling(eval_pairs)
    runtime.save_model(model, tok, args.output_dir, d, extra={"reward_stats.json": stats})
    run.finish(summary)


def main(argv=None):
    args = runtime.parse_args(Args, __doc__, argv)
    if not args.measure:
        return train(args)
    d = runtime.init_distributed(args.strategy, args.precision)
    tok = runtime.load_tokenizer(args.measure)
    model = runtime.wrap(load_reward_model(args.measure, tok), d, trainable=False).eval()
    pairs = data.load_pairs(args.eval_data, args.skip_bad_rows) if args.eval_data else None
    meta = data.load_meta(args.samples) if args.samples else None
    gold = bool(meta) and gold_applies([p for p, _, _ in meta])
    out = measure(model, tok, d, pairs, meta, gold, args.max_len, args.truncate)
    if pairs and embedded(args.eval_data):
        out["eval/label_ceiling"] = label_ceiling(pairs)
    d.print(json.dumps(out, indent=2))


if __name__ == "__main__":
    runtime.guard(main)
