"""sample.py: the meta data S of MetaRM (Algorithm 1, line 3): k responses of a policy to each
prompt, no labels. Writes a run folder: meta.jsonl ({prompt, responses: [k strings]} per line),
args.json (which policy, prompts, seed and sampling settings made it) and DONE, last.

    python sample.py                     # round 1's meta data of iterate.sh's seed 1: 5 samples of its SFT model
    python sample.py --policy_dir runs/default/seed1/metarm/round1/ppo \\
        --output_dir runs/default/seed1/metarm/round2/samples --max_prompts 256 --seed 102
    torchrun --nproc_per_node 8 sample.py --policy_dir runs/7b/sft --prompts Anthropic/hh-rlhf \\
        --k 5 --max_prompts 4096 --temperature 0.8 --top_p 0.9 --repetition_penalty 1.1 \\
        --max_new_tokens 256 --output_dir runs/7b/round1/samples      # the paper's settings (7B)
"""
import dataclasses
import json
import os
import time

import torch
import torch.distributed as dist

import cli
import data
import distributed
import loading
import modeling
import run_folder
from cli import arg


@dataclasses.dataclass
class Args:
    policy_dir: str = arg("runs/default/seed1/sft", "the policy to sample from (SFT, or a round's PPO policy)")
    prompts: str = arg("runs/default/task/data/prompts_train.jsonl", "prompts: {prompt} rows or HH-RLHF rows")
    output_dir: str = arg("runs/default/seed1/sft_samples", "run folder: meta.jsonl, args.json, DONE")
    k: int = arg(5, "responses per prompt (paper: 5)", check=">= 2")
    max_prompts: int = arg(256, "use only the first N prompts (0: all)", check=">= 0")
    temperature: float = arg(1.0, "sampling temperature (paper: 0.8)", check="> 0")
    top_p: float = arg(1.0, "nucleus sampling (paper: 0.9)", check="(0, 1]")
    repetition_penalty: float = arg(1.0, "repetition penalty (paper: 1.1)", check="> 0")
    max_new_tokens: int = arg(40, "maximum response tokens", check="> 0")
    max_prompt_len: int = arg(64, "maximum prompt tokens", check="> 0")
    truncate: bool = arg(False, "cut prompts longer than max_prompt_len from the left (counted) instead of stopping")
    skip_bad_rows: bool = arg(False, "skip malformed prompt rows (counted and reported) instead of stopping")
    seed: int = arg(101, "seed for sampling, process r uses seed + r (iterate.sh: 100 x its seed + the round)", check=">= 0")
    strategy: str = arg("ddp", "multi-process wrapping (the policy is frozen: fsdp shards it)", ["ddp", "fsdp"])
    precision: str = arg("auto", distributed.PRECISION_HELP, ["auto", "fp32", "bf16"])


@torch.no_grad()
def sample_meta(policy, tok, prompts, prompt_ids, args, d, batch=128):
    """k responses for every prompt; each process samples a share, every process gets all."""
    out = {}
    batches = list(distributed.shard_batches(len(prompts), max(1, batch // args.k), d))
    for idx, real in cli.progress(batches, d, desc="sample"):
        ids = [prompt_ids[j] for j in idx for _ in range(args.k)]
        texts = data.decode_responses(tok, modeling.generate(policy, tok, ids, args, d)[1])
        if real:
            for n, j in enumerate(idx):
                out[j] = texts[n * args.k:(n + 1) * args.k]
    if d.world > 1:
        parts = [None] * d.world
        dist.all_gather_object(parts, out)
        out = {j: v for part in parts for j, v in part.items()}
    return [{"prompt": prompts[j], "responses": out[j]} for j in range(len(prompts))]


def main(argv=None):
    args = cli.parse_args(Args, __doc__, argv)
    d = distributed.init_distributed(args.strategy, args.precision, args.policy_dir)
    run = run_folder.Run.open(args.output_dir, args, d, "sample")
    if run is None:  # done, with these settings
        return
    cli.set_seed(args.seed + d.rank)
    tok = loading.load_tokenizer(args.policy_dir)
    prompts = [p for p, _ in data.load_prompts(args.prompts, args.skip_bad_rows)]
    if args.max_prompts:
        prompts = prompts[:args.max_prompts]
    prompt_ids = data.encode_prompts(tok, prompts, args.max_prompt_len, args.truncate, args.prompts)
    policy = distributed.wrap(loading.load_causal_lm(args.policy_dir, tok), d, trainable=False).eval()
    d.print(f"sample: {len(prompts)} prompts x {args.k} responses from {args.policy_dir}")
    t0 = time.time()
    rows = sample_meta(policy, tok, prompts, prompt_ids, args, d)
    if d.main:
        path = os.path.join(args.output_dir, "meta.jsonl")
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(path + ".tmp", path)
    run.finish({"stage": "sample", "prompts": len(rows), "k": args.k, "wall_time_s": round(time.time() - t0, 1)})


if __name__ == "__main__":
    cli.guard(main)
