#!/usr/bin/env bash
# iterate.sh: the paper's iterated-RLHF experiment, end to end, with the controls that tell whether
# the meta-step helps.
#
#   task (embedded default: data + tiny model, built once) -> for each seed:
#     SFT -> vanilla RM -> vanilla PPO (as many steps as all rounds together, a snapshot after
#     each round's worth) -> for each arm, round k = 1..R:
#       sample from pi_{k-1} (pi_0 = SFT; round 1's samples are shared by every arm) ->
#       that arm's reward model -> PPO from pi_{k-1} with it -> pi_k
#     (after SFT, branches that do not read from each other run side by side: LANES)
#     -> evaluate (every policy on the same test prompts; paired comparisons)
#   -> results.md / results.json in RUN_DIR (paired 95% intervals over seeds and prompts)
#
# Arms (ARMS), all from the same SFT model, vanilla RM, test prompts and, round by round, the same
# PPO and sampling seeds (common random numbers: arm differences are not sampling noise):
#   metarm   the round's RM is MetaRM (metarm.py) trained from SFT on the original pairs, with the
#            round's samples as meta data
#   vanilla  the same rounds with the vanilla RM: MetaRM at eta = 0 *is* the vanilla RM (the
#            meta-step is the only difference; tests/test_metarm.py checks the two agree), so
#            it is reused. Isolates the meta-step.
#   oracle   each round, new labels on the policy's own samples (the task's noisy annotator,
#            ORACLE_PAIRS pairs) added to the original pairs, RM retrained from SFT: what new
#            human preferences each round would buy. Embedded task only.
#   dpo      DPO from SFT on the original pairs (dpo.py; the paper's Table 2 baseline); no rounds
#   bilevel  the rounds with one reward model meta-trained by bilevel optimisation (bilevel_rm.py,
#            Jia 2024) from the vanilla RM, on the in-distribution topics' pairs and SFT samples:
#            the other answer to an RM off its distribution (compare with OOD=1). Embedded task only.
# An arm takes modifiers after '+': eta=<x> and deploy=theta|adapted (metarm), anchor=prev|sft
# (the PPO KL reference: pi_{k-1} or SFT), e.g. ARMS="metarm metarm+deploy=adapted vanilla+anchor=sft".
#
# Every stage (under torchrun when NPROC > 1) writes a run folder with a DONE marker written last. A
# stage whose marker exists is skipped, unless a stage it depends on ran in this invocation
# (then it is redone from scratch): a killed run picks up where it stopped, a finished one
# re-runs in seconds, and deleting one stage's DONE redoes that stage and the ones after it.
# One iterate.sh at a time per RUN_DIR (RUN_DIR/LOCK); RUN_DIR/settings records the settings it
# was run with, and a re-run with other settings is refused before any stage.
# This file is the experiment (its settings, then the stages in order, from '---- the experiment');
# how stages run side by side is iterate/scheduling.sh, the checks of every setting iterate/checks.sh.
#
# Settings (environment variables):
#   RUN_DIR    where everything goes                                  (runs/default)
#   ARMS       arms, space separated (see above)                      (metarm vanilla)
#   ROUNDS     rounds R (the paper: up to 4-5)                        (3)
#   SEEDS      seeds, space separated, e.g. "1 2 3"                   (1)
#   JOBS       seeds run side by side, each logging to RUN_DIR/seed<S>.log; (1)
#              with GPUs each seed gets one (NPROC=1)
#   LANES      a seed's branches after SFT (the vanilla RM, the SFT samples, each arm, vanilla
#              PPO) run side by side, LANES at a time, each once what it reads has ended and
#              logging to RUN_DIR/seed<S>/<branch>.log  (CPU: cores / (JOBS x NPROC); GPU: 1)
#   META_GRAD  exact | first_order | taylor                           (first_order)
#   KL_ANCHOR  prev | sft: the KL reference of round k's PPO, pi_{k-1} or SFT; an arm's
#              +anchor= wins (the paper does not say)                 (prev)
#   ORACLE_PAIRS  new labelled pairs per round in the oracle arm      (1000)
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
#   SFT_ARGS RM_ARGS METARM_ARGS PPO_ARGS SAMPLE_ARGS DPO_ARGS BILEVEL_ARGS EVAL_ARGS
#              extra flags for one stage
#   TASK_ARGS  extra flags for task.py (the embedded task), e.g. --base smollm2
#   PRESET     smollm2: the embedded task on a pretrained base (SmolLM2-135M-Instruct, offline);
#              llama2-7b-hh | llama2-7b-tldr: the paper's settings at 7B (docs/scaling.md)
set -euo pipefail
cd "$(dirname "$0")"

if [ -n "${PRESET:-}" ]; then  # a preset sets what the environment has not; the defaults below fill the rest
  [ -f "presets/$PRESET.sh" ] || { echo "iterate.sh: no preset presets/$PRESET.sh"; exit 2; }
  source "presets/$PRESET.sh"
fi
RUN_DIR=${RUN_DIR:-runs/default}
ARMS=${ARMS:-metarm vanilla}
ROUNDS=${ROUNDS:-3}
SEEDS=${SEEDS:-1}
JOBS=${JOBS:-1}
META_GRAD=${META_GRAD:-first_order}
KL_ANCHOR=${KL_ANCHOR:-prev}
ORACLE_PAIRS=${ORACLE_PAIRS:-1000}
DIST=${DIST:-ddp}
OOD=${OOD:-0}
PPO_STEPS=${PPO_STEPS:-20}
META_N=${META_N:-256}
JUDGE=${JUDGE:-gold}
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
ID_PROMPTS=$PROMPTS  # the training distributions' prompts (the bilevel RM's support sets)
if [ "$OOD" = 1 ]; then PROMPTS=$OOD_PROMPTS; TEST_PROMPTS=$OOD_TEST_PROMPTS; fi
COMMON="--strategy $DIST"

source iterate/scheduling.sh  # how stages run: stage, launch, branches and seeds side by side, threads
source iterate/checks.sh      # every choice checked, then RUN_DIR locked and its settings recorded

# ---- the experiment --------------------------------------------------------------------------
# 1. the embedded task (data + tiny model), built once, when a model or data file of this run is in it
T_START=$SECONDS
NEED_TASK=0
for F in "$MODEL" "$SFT_DATA" "$PAIRS" "$EVAL_PAIRS" "$PROMPTS" "$TEST_PROMPTS" "$ID_PROMPTS"; do
  [[ "$F" != "$RUN_DIR/task/"* ]] || NEED_TASK=1
done
if [ "$NEED_TASK" = 1 ]; then
  stage "task" "$RUN_DIR/task" "$RUN_DIR/task/DONE" python task.py --out_dir "$RUN_DIR/task" ${TASK_ARGS:-}
fi
AFTER_TASK=$DIRTY

# 2. a seed: SFT, then the branches that start from it (side by side), then the seed's evaluation
run_seed() {
  local SEED=$1 R="$RUN_DIR/seed$1" A BRANCHES=()
  mkdir -p "$R"
  TIMES="$R/stage_times"
  : > "$TIMES"
  : > "$R/layout.jsonl.tmp"  # the record of what each folder is, rebuilt by every run (record)
  DIRTY=$AFTER_TASK
  stage "seed $SEED: sft" "$R/sft" "$R/sft/DONE" \
    launch sft.py $COMMON --model_name_or_path "$MODEL" --data "$SFT_DATA" --output_dir "$R/sft" --seed "$SEED" ${SFT_ARGS:-}
  record "$SEED" sft policy="$R/sft"
  # each branch: its name, the branches it reads (- for none) and its command; the longest first
  BRANCHES=(rm - "vanilla_rm $SEED" sft_samples - "sft_samples $SEED")
  [[ " $ARMS " != *" bilevel"* ]] || BRANCHES+=(bilevel_rm rm,sft_samples "bilevel_rm $SEED")  # one, for every bilevel arm
  for A in $ARMS; do
    case "$(arm_base "$A")" in
      dpo) BRANCHES+=("$A" - "arm $SEED $A");;
      vanilla) BRANCHES+=("$A" ppo_vanilla,sft_samples "arm $SEED $A");;  # round 1: vanilla PPO's snapshot
      bilevel) BRANCHES+=("$A" bilevel_rm "arm $SEED $A");;
      *) BRANCHES+=("$A" sft_samples "arm $SEED $A");;  # metarm, oracle: their RMs start from SFT
    esac
  done
  side_by_side "$SEED" "${BRANCHES[@]}" ppo_vanilla rm "vanilla_ppo $SEED"
  local key="arms=$ARMS rounds=$ROUNDS ppo_steps=$PPO_STEPS test_prompts=$TEST_PROMPTS judge=$JUDGE ${EVAL_ARGS:-}"
  [ ! -s "$TIMES" ] || rm -rf "$R/eval"  # a policy was redone: its cached test responses are stale
  [ "$(cat "$R/eval/key" 2>/dev/null)" = "$key" ] || rm -f "$R/eval/DONE"
  mv "$R/layout.jsonl.tmp" "$R/layout.jsonl"
  DIRTY=0
  stage "seed $SEED: evaluate" "$R/eval/DONE" "$R/eval/DONE" \
    one_process evaluate.py --run_dir "$R" --rounds "$ROUNDS" --arms "$ARMS" \
      --prompts "$TEST_PROMPTS" --pairs "$EVAL_PAIRS" --raw_pairs "$PAIRS" --judge "$JUDGE" ${EVAL_ARGS:-}
  echo "$key" > "$R/eval/key"
  printf "\nseed $SEED stage times (also in $TIMES):\n"
  cat "$TIMES"
}

# 3. the branches (run_seed's variables are theirs: bash functions see their caller's)
vanilla_rm() {
  local SEED=$1 R="$RUN_DIR/seed$1"
  stage "seed $SEED: vanilla reward model" "$R/rm" "$R/rm/DONE" \
    launch reward_model.py $COMMON --sft_dir "$R/sft" --data "$PAIRS" --eval_data "$EVAL_PAIRS" \
      --output_dir "$R/rm" --seed "$SEED" ${RM_ARGS:-}
  record "$SEED" vanilla_rm rm="$R/rm"
}
sft_samples() {  # round 1's meta data, shared by every arm
  local SEED=$1 R="$RUN_DIR/seed$1"
  stage "seed $SEED: sample the meta data from sft" "$R/sft_samples" "$R/sft_samples/DONE" \
    launch sample.py $COMMON --policy_dir "$R/sft" --prompts "$PROMPTS" --output_dir "$R/sft_samples" \
      --max_prompts "$META_N" --seed "$((SEED * 100 + 1))" ${SAMPLE_ARGS:-}
}
vanilla_ppo() {  # the baseline; the same PPO seed as every arm's round 1: with KL_ANCHOR either
  local SEED=$1 R="$RUN_DIR/seed$1" K  # way, its first PPO_STEPS steps are the vanilla arm's round 1
  stage "seed $SEED: vanilla PPO ($((ROUNDS * PPO_STEPS)) steps)" "$R/ppo_vanilla" "$R/ppo_vanilla/DONE" \
    launch ppo.py $COMMON --policy_dir "$R/sft" --rm_dir "$R/rm" --prompts "$PROMPTS" --output_dir "$R/ppo_vanilla" \
      --steps $((ROUNDS * PPO_STEPS)) --snapshot_every "$PPO_STEPS" --seed "$((SEED * 100 + 1))" ${PPO_ARGS:-}
  for K in $(seq 1 "$ROUNDS"); do
    record "$SEED" "vanilla_ppo/step$((K * PPO_STEPS))" round="$K" policy="$(vanilla_ppo_after "$R" "$K")" \
      log="$R/ppo_vanilla" steps="$((K * PPO_STEPS))" rm="$R/rm"
  done
}
vanilla_ppo_after() {  # vanilla_ppo_after SEED_DIR K: the policy after K rounds' worth of steps (ppo.py's snapshots)
  if [ "$2" = "$ROUNDS" ]; then echo "$1/ppo_vanilla"; else echo "$1/ppo_vanilla/step$(($2 * PPO_STEPS))"; fi
}
bilevel_rm() {  # one bilevel RM per seed, for every bilevel arm
  local SEED=$1 R="$RUN_DIR/seed$1" SUPPORT="$RUN_DIR/seed$1/sft_samples/meta.jsonl"
  if [ "$PROMPTS" != "$ID_PROMPTS" ]; then  # OOD=1: the support sets come from the training prompts
    SUPPORT="$R/bilevel_support/meta.jsonl"
    stage "seed $SEED: sample the bilevel RM's support sets from sft" "$R/bilevel_support" "$R/bilevel_support/DONE" \
      launch sample.py $COMMON --policy_dir "$R/sft" --prompts "$ID_PROMPTS" --output_dir "$R/bilevel_support" \
        --max_prompts "$META_N" --seed "$((SEED * 100 + 1))" ${SAMPLE_ARGS:-}
  fi
  stage "seed $SEED: bilevel RM" "$R/bilevel_rm" "$R/bilevel_rm/DONE" \
    launch bilevel_rm.py $COMMON --sft_dir "$R/sft" --init_rm "$R/rm" --data "$PAIRS" --eval_data "$EVAL_PAIRS" \
      --support "$SUPPORT" --output_dir "$R/bilevel_rm" --seed "$SEED" ${BILEVEL_ARGS:-}
}

# 4. the arms: DPO's one stage, or round k = 1..R of sample from pi_{k-1}, the arm's RM, PPO -> pi_k
arm() {  # arm SEED ARM
  local SEED=$1 A=$2 R="$RUN_DIR/seed$1" B K POLICY="$RUN_DIR/seed$1/sft" LOG RM REF ANCHOR EXTRA
  B=$(arm_base "$A")
  if [ "$B" = dpo ]; then
    stage "seed $SEED: DPO" "$R/dpo" "$R/dpo/DONE" \
      launch dpo.py $COMMON --sft_dir "$R/sft" --data "$PAIRS" --eval_data "$EVAL_PAIRS" --output_dir "$R/dpo" \
        --seed "$SEED" ${DPO_ARGS:-}
    record "$SEED" dpo policy="$R/dpo"
    return
  fi
  ANCHOR=$(arm_mod "$A" anchor "$KL_ANCHOR")
  for K in $(seq 1 "$ROUNDS"); do
    local D="$R/$A/round$K" META="$R/sft_samples/meta.jsonl"  # pi_0 = SFT for every arm: the same samples
    if [ "$K" -gt 1 ]; then
      META="$D/samples/meta.jsonl"
      stage "seed $SEED $A round $K: sample from $(basename "$(dirname "$POLICY")")" "$D/samples" "$D/samples/DONE" \
        launch sample.py $COMMON --policy_dir "$POLICY" --prompts "$PROMPTS" --output_dir "$D/samples" \
          --max_prompts "$META_N" --seed "$((SEED * 100 + K))" ${SAMPLE_ARGS:-}
    fi
    case "$B" in
      metarm)
        RM="$D/rm"
        stage "seed $SEED $A round $K: MetaRM ($META_GRAD)" "$D/rm" "$D/rm/DONE" \
          launch metarm.py $COMMON --sft_dir "$R/sft" --data "$PAIRS" --eval_data "$EVAL_PAIRS" --meta_data "$META" \
            --meta_grad "$META_GRAD" --output_dir "$D/rm" --seed "$SEED" ${METARM_ARGS:-} $(metarm_flags "$A");;
      vanilla)
        RM="$R/rm";;
      bilevel)
        RM="$R/bilevel_rm";;
      oracle)
        RM="$D/rm"
        stage "seed $SEED $A round $K: $ORACLE_PAIRS new labels on the samples" "$D/pairs.jsonl" "$D/pairs.jsonl" \
          oracle_labels "$D" "$META" "$((SEED * 100 + K))"
        stage "seed $SEED $A round $K: reward model on the original + new pairs" "$D/rm" "$D/rm/DONE" \
          launch reward_model.py $COMMON --sft_dir "$R/sft" --data "$D/pairs.jsonl" --eval_data "$EVAL_PAIRS" \
            --output_dir "$D/rm" --seed "$SEED" ${RM_ARGS:-};;
    esac
    REF=""
    [ "$ANCHOR" = sft ] && REF="$R/sft"
    if [ "$B" = vanilla ] && [ "$K" = 1 ]; then  # vanilla PPO's first PPO_STEPS steps bit for bit (same SFT, RM,
      POLICY=$(vanilla_ppo_after "$R" 1) LOG="$R/ppo_vanilla"  # seed; the reference SFT either way): not run again
    else
      stage "seed $SEED $A round $K: PPO from $(basename "$(dirname "$POLICY")")/$(basename "$POLICY")" "$D/ppo" "$D/ppo/DONE" \
        launch ppo.py $COMMON --policy_dir "$POLICY" --ref_dir "$REF" --rm_dir "$RM" --prompts "$PROMPTS" --output_dir "$D/ppo" \
          --steps "$PPO_STEPS" --seed "$((SEED * 100 + K))" ${PPO_ARGS:-}
      POLICY="$D/ppo" LOG="$D/ppo"
    fi
    EXTRA=() && [ "$B" != oracle ] || EXTRA=(new_pairs="$D/new_pairs.jsonl")
    record "$SEED" "$A/round$K" arm="$A" round="$K" policy="$POLICY" log="$LOG" steps="$PPO_STEPS" rm="$RM" \
      samples="$META" kl_anchor="$ANCHOR" "${EXTRA[@]}"
  done
}
oracle_labels() {  # oracle_labels FOLDER META SEED: the task's annotator labels the samples; + the pairs
  mkdir -p "$1" && python task.py --label "$2" --out "$1/new_pairs.jsonl" --pairs "$ORACLE_PAIRS" --seed "$3" \
    && cat "$PAIRS" "$1/new_pairs.jsonl" > "$1/pairs.jsonl.tmp" && mv "$1/pairs.jsonl.tmp" "$1/pairs.jsonl"
}

# 5. every seed, then the report over seeds
run_seeds
python evaluate.py --aggregate "$RUN_DIR" --seeds "$SEEDS" --rounds "$ROUNDS" --arms "$ARMS" \
  --prompts "$TEST_PROMPTS" --pairs "$EVAL_PAIRS" --raw_pairs "$PAIRS" --judge "$JUDGE" ${EVAL_ARGS:-}
echo "total: $((SECONDS - T_START)) s. Report: $RUN_DIR/results.md (numbers: $RUN_DIR/results.json)"
