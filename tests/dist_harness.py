"""Run by test_distributed.py as one process or under torchrun (DDP or FSDP2): a few steps of
every stage through its real entry point, with the same global batches, so that the logged
losses can be compared across world sizes (the reward model and first_order MetaRM with gradient
checkpointing, as the 7B presets train them); the bilevel RM's steps; the meta data sampled, each
process a share; one step of the PPO stage; one PPO update on fixed roll-outs; and a checkpoint
written at one world size and read at another.

    python tests/dist_harness.py single OUT CONFIG_JSON
    torchrun --nproc_per_node 2 tests/dist_harness.py fsdp OUT CONFIG_JSON
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bilevel_rm  # noqa: E402
import cli  # noqa: E402
import data  # noqa: E402
import distributed  # noqa: E402
import dpo  # noqa: E402
import loading  # noqa: E402
import metarm  # noqa: E402
import ppo  # noqa: E402
import reward_model as rm  # noqa: E402
import run_folder  # noqa: E402
import sample  # noqa: E402
import sft  # noqa: E402


def stages(strategy, out, micro):
    s = ["--strategy", "ddp" if strategy == "single" else strategy]
    d = micro["data"]
    sft.main(["--model_name_or_path", micro["base"], "--data", f"{d}/sft.jsonl", "--output_dir", f"{out}/sft",
              "--max_steps", "3", "--global_batch", "8", *s])
    rm.main(["--sft_dir", micro["sft"], "--data", f"{d}/pairs_train.jsonl", "--eval_data", f"{d}/pairs_test.jsonl",
             "--output_dir", f"{out}/rm", "--max_steps", "3", "--global_batch", "8", "--gradient_checkpointing", "true", *s])
    dpo.main(["--sft_dir", micro["sft"], "--data", f"{d}/pairs_train.jsonl", "--eval_data", f"{d}/pairs_test.jsonl",
              "--output_dir", f"{out}/dpo", "--max_steps", "3", "--global_batch", "8", *s])
    modes = ["first_order"] + (["exact", "taylor"] if strategy != "fsdp" else [])
    bilevel = ["--sft_dir", micro["sft"], "--init_rm", micro["rm"], "--data", f"{d}/pairs_train.jsonl",
               "--eval_data", f"{d}/pairs_test.jsonl", "--support", micro["meta"], "--output_dir", f"{out}/bilevel",
               "--steps", "3", "--support_prompts", "2", "--query_pairs", "4", "--lr", "1e-3", *s]
    if strategy == "fsdp":  # the second-order forms must refuse, with the reason
        second_order = {"metarm": (metarm, ["--meta_data", micro["meta"], "--meta_grad", "exact",
                                            "--output_dir", f"{out}/refused", *s]),
                        "bilevel": (bilevel_rm, bilevel)}
        for name, (stage, argv) in second_order.items():
            try:
                stage.main(argv)
            except cli.UserError as e:
                with open(f"{out}/refused_{name}.txt", "w") as f:
                    f.write(str(e))
    else:  # each process one of a step's two training distributions (one process: both)
        bilevel_rm.main(bilevel)
    for mode in modes:
        metarm.main(["--sft_dir", micro["sft"], "--data", f"{d}/pairs_train.jsonl", "--eval_data", f"{d}/pairs_test.jsonl",
                     "--meta_data", micro["meta"], "--output_dir", f"{out}/metarm_{mode}", "--meta_grad", mode,
                     "--max_steps", "3", "--global_batch", "8", "--meta_batch", "4", *s,
                     "--gradient_checkpointing", "true" if mode == "first_order" else "false",
                     "--eta", "0.5"])  # an ascent step large enough to matter (the default eta = alpha barely moves theta')
    sample.main(["--policy_dir", micro["sft"], "--prompts", f"{d}/prompts_train.jsonl", "--k", "2", "--max_prompts", "7",
                 "--output_dir", f"{out}/samples", "--max_new_tokens", "6", *s])  # 7 prompts: one process has 3, one 4
    ppo.main(["--policy_dir", micro["sft"], "--rm_dir", micro["rm"], "--prompts", f"{d}/prompts_train.jsonl",
              "--output_dir", f"{out}/ppo", "--steps", "1", "--queries", "2", "--rollouts_per_query", "2",
              "--max_new_tokens", "6", *s])


def ppo_update(strategy, out, micro, d):
    """Roll-outs of one global batch, the same on every process (identical weights and seed),
    each process keeping its share; then one PPO update (2 epochs, one mini-batch each)."""
    args = cli.parse_args(ppo.Args, "", ["--ppo_epochs", "2", "--mini_batches", "1", "--max_new_tokens", "12",
                                             "--strategy", "ddp" if strategy == "single" else strategy])
    tok = loading.load_tokenizer(micro["sft"])
    policy = distributed.wrap(loading.load_causal_lm(micro["sft"], tok), d)
    ref = distributed.wrap(loading.load_causal_lm(micro["sft"], tok), d, trainable=False)
    reward = distributed.wrap(loading.load_reward_model(micro["rm"], tok), d, trainable=False)
    critic = distributed.wrap(loading.load_reward_model(micro["rm"], tok), d)
    popt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    copt = torch.optim.AdamW(critic.parameters(), lr=1e-3)
    enc = data.Encoder(tok, 64)
    prompts = [(enc.prompt(p), p) for p, _ in data.load_prompts(f"{micro['data']}/prompts_train.jsonl")[:8]]
    torch.manual_seed(0)
    batch = ppo.rollout(policy, ref, reward, critic, tok, prompts, args, {"mean": 0.0, "std": 1.0}, 0.05,
                        d, ppo.Timer())  # every process: the whole batch (whitening sees it W times: same)
    n = len(prompts) // d.world
    share = {k: v[d.rank * n:(d.rank + 1) * n] for k, v in batch.items()}
    metrics = ppo.ppo_update(policy, critic, popt, copt, share, args, d)
    if d.main:
        with open(f"{out}/ppo_update.json", "w") as f:
            json.dump(metrics, f)


def checkpoint(strategy, out, micro, d):
    """Save model + optimizer after one step; load the checkpoint another world size saved and
    compare it with the full weights that world size recorded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def fresh():
        tok = loading.load_tokenizer(micro["base"])
        model = distributed.wrap(loading.load_causal_lm(micro["base"], tok), d)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = fresh()
    ids = torch.arange(3, 19).view(2, 8)
    (model(input_ids=ids).logits.float().pow(2).mean() * d.world).backward()
    opt.step()
    opt.zero_grad()
    args = cli.parse_args(sft.Args, "", [])
    run = run_folder.Run(f"{out}/ckpt", args, d)
    run.save_checkpoint(1, {"model": (model, opt)})
    weights = get_model_state_dict(model, options=full)
    if d.main:
        torch.save(weights, f"{out}/ckpt/full.pt")
    other = micro.get("other_ckpt")
    if other:  # written at the other world size: reload it here
        model, opt = fresh()
        run_folder.Run(other, args, d).load_checkpoint({"model": (model, opt)})
        got, want = get_model_state_dict(model, options=full), torch.load(f"{other}/full.pt")
        if d.main:
            worst = max(float((got[k] - want[k]).abs().max()) for k in want)
            with open(f"{out}/reload.json", "w") as f:
                json.dump({"max_abs_diff": worst, "keys": len(want)}, f)


def main():
    strategy, out, micro_json = sys.argv[1:4]
    with open(micro_json) as f:
        micro = json.load(f)
    d = distributed.init_distributed("ddp" if strategy == "single" else strategy)
    if d.main:
        os.makedirs(out, exist_ok=True)
    distributed.barrier()
    stages(strategy, out, micro)
    ppo_update(strategy, out, micro, d)
    checkpoint(strategy, out, micro, d)
    if d.world > 1:
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in
                    distributed.wrap(loading.load_causal_lm(micro["base"], loading.load_tokenizer(micro["base"])), d).parameters())
        sizes = [None] * d.world
        torch.distributed.all_gather_object(sizes, local)
        if d.main:
            with open(f"{out}/shard_sizes.json", "w") as f:
                json.dump(sizes, f)
    cli.shutdown()


if __name__ == "__main__":
    main()
