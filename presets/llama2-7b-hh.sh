# presets/llama2-7b-hh.sh: the paper's settings for Llama-2-7B on Anthropic HH-RLHF, one node of
# 8 x A100-80G (PRESET=llama2-7b-hh bash iterate.sh). Sourced by iterate.sh; every variable can
# still be set from the environment (it wins over the preset). The memory plan behind these numbers is in the README.
# Needs the hub (or local copies given by path): set HF_HUB_OFFLINE=0 once to download.
MODEL=${MODEL:-meta-llama/Llama-2-7b-hf}
SFT_DATA=${SFT_DATA:-Anthropic/hh-rlhf}                # SFT on the chosen transcripts
PAIRS=${PAIRS:-Anthropic/hh-rlhf}
EVAL_PAIRS=${EVAL_PAIRS:-Anthropic/hh-rlhf:test}
PROMPTS=${PROMPTS:-Anthropic/hh-rlhf}                  # the prompt: the shared prefix of a pair
TEST_PROMPTS=${TEST_PROMPTS:-Anthropic/hh-rlhf:test}
OOD_PROMPTS=${OOD_PROMPTS:-PKU-Alignment/PKU-SafeRLHF}  # OOD=1 (Figure 3); OpenAssistant/oasst1 also reads
OOD_TEST_PROMPTS=${OOD_TEST_PROMPTS:-PKU-Alignment/PKU-SafeRLHF:test}
DIST=${DIST:-fsdp}                                     # four 7B models do not fit replicated
NPROC=${NPROC:-8}
META_GRAD=${META_GRAD:-first_order}                    # exact/taylor refuse FSDP (see metarm.py)
ROUNDS=${ROUNDS:-4}                                    # the paper's dialogue gains peak at round 3
PPO_STEPS=${PPO_STEPS:-200}                            # not given in the paper: 200 x 128 roll-outs a round
META_N=${META_N:-0}                                    # every training prompt, 5 responses each (the paper)
if [ -z "${JUDGE:-}" ] || [ "$JUDGE" = gold ]; then
  echo "iterate.sh: the gold judge only knows the embedded task; set JUDGE to a reward-model folder"
  echo "  (an RM trained on other data than PAIRS, standing in for the paper's GPT-4 judge)"
  exit 2
fi
LONG="--max_len 512 --truncate true --skip_bad_rows true --gradient_checkpointing true"
SAMPLING="--temperature 0.8 --top_p 0.9 --repetition_penalty 1.1 --max_new_tokens 256"
SFT_ARGS=${SFT_ARGS:-"--lr 2e-5 --epochs 2 --warmup 0.3 --global_batch 32 --micro_batch 4 $LONG"}
RM_ARGS=${RM_ARGS:-"--lr 5e-6 --epochs 1 --global_batch 16 --micro_batch 2 --eval_every 500 $LONG"}
METARM_ARGS=${METARM_ARGS:-"--lr 5e-6 --eta 5e-6 --epochs 1 --global_batch 16 --meta_batch 16 --eval_every 500 $LONG"}
SAMPLE_ARGS=${SAMPLE_ARGS:-"--k 5 $SAMPLING --max_prompt_len 512 --truncate true --skip_bad_rows true"}
PPO_ARGS=${PPO_ARGS:-"--policy_lr 5e-7 --critic_lr 1.5e-6 --queries 8 --rollouts_per_query 16 --mini_batches 2 \
  --kl_coef 0.05 --reward_clip 0.8 $SAMPLING --max_prompt_len 512 --truncate true --skip_bad_rows true \
  --gradient_checkpointing true --save_every 20"}
EVAL_ARGS=${EVAL_ARGS:-"--n_prompts 100 $SAMPLING"}
