#!/usr/bin/env bash
# iterate.sh: the paper's iterated-RLHF experiment, end to end.
#
#   task (embedded default: data + tiny model, built once) -> for each seed:
#     SFT -> vanilla RM -> vanilla PPO (the baseline: as many steps as all rounds together,
#     with a snapshot after one round's worth) -> for round k = 1..R:
#       sample the meta data from pi_{k-1} (pi_0 = SFT) -> MetaRM from the SFT weights ->
#       PPO from pi_{k-1} with that RM -> pi_k
#     -> evaluate (win/tie/lose, diversity, the reward models on each round's samples)
#   -> results.md / results.json in RUN_DIR (mean +- std over seeds)
#
# Every stage runs under torchrun and writes a run folder with a DONE marker written last. A
# stage whose marker exists is skipped, unless a stage before it ran in this invocation (then it
# is redone from scratch): a killed run picks up where it stopped, a finished one re-runs in
# seconds, and deleting one stage's DONE redoes that stage and the ones after it.
#
# Settings (environment variables):
#   RUN_DIR    where everything goes                                  (runs/default)
#   ROUNDS     MetaRM rounds R (the paper: up to 4-5)                 (3)
#   SEEDS      seeds, space separated, e.g. "1 2 3"                   (1)
#   META_GRAD  exact | first_order | taylor                           (first_order)
#   NPROC      processes per stage                                    (number of GPUs, else 1)
#   DIST       ddp | fsdp: how each stage wraps its models            (ddp)
#   OOD        1: meta data, PPO and test prompts from the out-of-distribution prompts
#              (the paper's Figure 3 setting)                          (0)
#   MODEL      base model: a local folder or hub name                 (the embedded tiny Llama)
#   DATA       a folder with the embedded task's file names           ($RUN_DIR/task/data)
#   SFT_DATA PAIRS EVAL_PAIRS PROMPTS TEST_PROMPTS OOD_PROMPTS OOD_TEST_PROMPTS
#              individual data files or hub names                     (the files in DATA)
#   PPO_STEPS  PPO steps per round                                    (20)
#   META_N     prompts sampled (k = 5 responses each) for each round's meta data; 0: all  (256)
#   JUDGE      gold | a reward-model folder for the evaluation       (gold)
#   SFT_ARGS RM_ARGS METARM_ARGS PPO_ARGS SAMPLE_ARGS EVAL_ARGS   extra flags for one stage
#   PRESET     llama2-7b-hh | llama2-7b-tldr: the paper's settings at 7B (see README)
set -euo pipefail
cd "$(dirname "$0")"

if [ -n "${PRESET:-}" ]; then  # a preset sets what the environment has not; the defaults below fill the rest
  [ -f "presets/$PRESET.sh" ] || { echo "iterate.sh: no preset presets/$PRESET.sh"; exit 2; }
  source "presets/$PRESET.sh"
fi
RUN_DIR=${RUN_DIR:-runs/default}
ROUNDS=${ROUNDS:-3}
SEEDS=${SEEDS:-1}
META_GRAD=${META_GRAD:-first_order}
DIST=${DIST:-ddp}
OOD=${OOD:-0}
PPO_STEPS=${PPO_STEPS:-20}
META_N=${META_N:-256}
JUDGE=${JUDGE:-gold}
if [ -z "${NPROC:-}" ]; then
  NPROC=$( (command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | wc -l) || echo 0)
  [ "$NPROC" -gt 0 ] || NPROC=1
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # the default run never touches the network

DATA=${DATA:-$RUN_DIR/task/data}
MODEL=${MODEL:-$RUN_DIR/task/base_model}
SFT_DATA=${SFT_DATA:-$DATA/sft.jsonl}
PAIRS=${PAIRS:-$DATA/pairs_train.jsonl}
EVAL_PAIRS=${EVAL_PAIRS:-$DATA/pairs_test.jsonl}
PROMPTS=${PROMPTS:-$DATA/prompts_train.jsonl}
TEST_PROMPTS=${TEST_PROMPTS:-$DATA/prompts_test.jsonl}
OOD_PROMPTS=${OOD_PROMPTS:-$DATA/prompts_ood.jsonl}
OOD_TEST_PROMPTS=${OOD_TEST_PROMPTS:-$DATA/prompts_ood_test.jsonl}
if [ "$OOD" = 1 ]; then PROMPTS=$OOD_PROMPTS; TEST_PROMPTS=$OOD_TEST_PROMPTS; fi
COMMON="--strategy $DIST"

launch() { torchrun --standalone --nproc_per_node "$NPROC" "$@"; }

DIRTY=0
TIMES=""
stage() {  # stage NAME OUTPUT MARKER command...   (done when MARKER exists)
  local name=$1 out=$2 marker=$3; shift 3
  if [ "$DIRTY" = 0 ] && [ -e "$marker" ]; then echo "[skip] $name"; return 0; fi
  if [ "$DIRTY" = 1 ]; then rm -rf "$out"; fi  # something before it changed: redo from scratch
  DIRTY=1
  echo "[run ] $name"
  local t0=$SECONDS
  "$@" || { echo "iterate.sh: stage '$name' failed (its folder: $out); fix and re-run to resume"; exit 1; }
  TIMES="$TIMES$name: $((SECONDS - t0)) s\n"
  echo "[done] $name ($((SECONDS - t0)) s)"
}

T_START=$SECONDS
if [ "$MODEL" = "$RUN_DIR/task/base_model" ] || [ "$DATA" = "$RUN_DIR/task/data" ]; then
  stage "task" "$RUN_DIR/task" "$RUN_DIR/task/DONE" python task.py --out_dir "$RUN_DIR/task"
fi
AFTER_TASK=$DIRTY

for SEED in $SEEDS; do
  DIRTY=$AFTER_TASK
  R="$RUN_DIR/seed$SEED"
  stage "seed $SEED: sft" "$R/sft" "$R/sft/DONE" \
    launch sft.py $COMMON --model_name_or_path "$MODEL" --data "$SFT_DATA" --output_dir "$R/sft" --seed "$SEED" ${SFT_ARGS:-}
  stage "seed $SEED: vanilla reward model" "$R/rm" "$R/rm/DONE" \
    launch reward_model.py $COMMON --sft_dir "$R/sft" --data "$PAIRS" --eval_data "$EVAL_PAIRS" \
      --output_dir "$R/rm" --seed "$SEED" ${RM_ARGS:-}
  stage "seed $SEED: vanilla PPO ($((ROUNDS * PPO_STEPS)) steps)" "$R/ppo_vanilla" "$R/ppo_vanilla/DONE" \
    launch ppo.py $COMMON --policy_dir "$R/sft" --rm_dir "$R/rm" --prompts "$PROMPTS" --output_dir "$R/ppo_vanilla" \
      --steps $((ROUNDS * PPO_STEPS)) --snapshot_every "$PPO_STEPS" --seed "$SEED" ${PPO_ARGS:-}
  POLICY="$R/sft"
  for K in $(seq 1 "$ROUNDS"); do
    stage "seed $SEED round $K: sample the meta data from $(basename "$POLICY")" "$R/round$K/meta.jsonl" "$R/round$K/meta.jsonl" \
      launch ppo.py $COMMON --sample_only --policy_dir "$POLICY" --prompts "$PROMPTS" --out "$R/round$K/meta.jsonl" \
        --max_prompts "$META_N" --seed "$((SEED * 100 + K))" ${SAMPLE_ARGS:-}
    stage "seed $SEED round $K: MetaRM ($META_GRAD)" "$R/round$K/rm" "$R/round$K/rm/DONE" \
      launch metarm.py $COMMON --sft_dir "$R/sft" --data "$PAIRS" --eval_data "$EVAL_PAIRS" --meta_data "$R/round$K/meta.jsonl" \
        --meta_grad "$META_GRAD" --output_dir "$R/round$K/rm" --seed "$SEED" ${METARM_ARGS:-}
    stage "seed $SEED round $K: PPO from $(basename "$POLICY")" "$R/round$K/ppo" "$R/round$K/ppo/DONE" \
      launch ppo.py $COMMON --policy_dir "$POLICY" --rm_dir "$R/round$K/rm" --prompts "$PROMPTS" --output_dir "$R/round$K/ppo" \
        --steps "$PPO_STEPS" --seed "$((SEED * 100 + K))" ${PPO_ARGS:-}
    POLICY="$R/round$K/ppo"
  done
  stage "seed $SEED: evaluate" "$R/eval" "$R/eval/DONE" \
    torchrun --standalone --nproc_per_node 1 evaluate.py --run_dir "$R" --rounds "$ROUNDS" --prompts "$TEST_PROMPTS" \
      --pairs "$EVAL_PAIRS" --sft_data "$PAIRS" --judge "$JUDGE" ${EVAL_ARGS:-}
done

python evaluate.py --aggregate "$RUN_DIR" --seeds "$SEEDS" --rounds "$ROUNDS"
printf "\nstage times:\n$TIMES"
echo "total: $((SECONDS - T_START)) s. Report: $RUN_DIR/results.md (numbers: $RUN_DIR/results.json)"
