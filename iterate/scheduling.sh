# iterate/scheduling.sh: how iterate.sh runs its stages, sourced by it; the experiment does not
# depend on anything here (JOBS, LANES and the threads change the time, not the numbers).
#   stage NAME OUTPUT MARKER command...   run a stage unless its MARKER says done (and nothing it
#                                         reads was redone: DIRTY), timed, with its threads
#   launch SCRIPT ARGS...                 python, or torchrun with NPROC processes
#   side_by_side SEED NAME NEEDS CMD ...  a seed's branches, LANES at a time, each once its NEEDS ended
#   run_seeds                             run_seed for every seed, JOBS side by side
#   record SEED NAME KEY=FOLDER ...       one line of the seed's record of what each folder is
# and Ctrl-C or TERM ends every process iterate.sh started.

NGPU=$( (command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | wc -l) || echo 0)
if [ -z "${NPROC:-}" ]; then
  NPROC=$NGPU
  [ "$NPROC" -gt 0 ] || NPROC=1
fi
SHARE=1  # a seed's share of the cores (CPU): the threads of a stage that runs alone (threads)
[ "$NGPU" -gt 0 ] || SHARE=$(( $(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) / (${JOBS:-1} * NPROC) ))
[ "$SHARE" -ge 1 ] || SHARE=1
LANES=${LANES:-$SHARE}  # with GPUs, one stage at a time (at 7B two do not fit)
# A stage gets 1 thread or the seed's share depending on which branch happens to end last (threads
# below), so its numbers must not depend on its threads. MKL, PyTorch's CPU BLAS, splits a long
# inner product over the threads (a score head's weight gradient, [1, B*T] x [B*T, hidden], came
# out otherwise with 1 and 2 threads on an Intel Xeon); its strict reproducible mode does not.
export MKL_CBWR=${MKL_CBWR:-AUTO,STRICT}

# One process: plain python (torchrun's own start and rendezvous cost about 2 s a stage, for
# nothing with one process); more: torchrun.
one_process() { python -u "$@"; }
launch() {
  if [ "$NPROC" = 1 ]; then one_process "$@"
  else torchrun --standalone --nproc_per_node "$NPROC" "$@"; fi
}

DIRTY=0
TIMES=/dev/null  # each seed's stage times, in RUN_DIR/seed<S>/stage_times
say() { echo "$@" >&"${SAY_FD:-1}"; }  # a branch's status lines, even when its output goes to its log
stage() {  # stage NAME OUTPUT MARKER command...   (done when MARKER exists)
  local name=$1 out=$2 marker=$3; shift 3
  if [ "$DIRTY" = 0 ] && [ -e "$marker" ]; then say "[skip] $name"; return 0; fi
  if [ -n "${STOP:-}" ] && [ -e "$STOP" ]; then exit 1; fi  # another branch of the seed failed: start nothing
  if [ "$DIRTY" = 1 ]; then rm -rf "$out"; fi  # something before it changed: redo from scratch
  DIRTY=1
  say "[run ] $name"
  local t0=$SECONDS threads
  threads=${OMP_NUM_THREADS:-$(threads)}
  OMP_NUM_THREADS=$threads "$@" || { say "iterate.sh: stage '$name' failed (its folder: $out${BRANCH_LOG:+, its output: $BRANCH_LOG}); fix and re-run to resume"; exit 1; }
  echo "$name: $((SECONDS - t0)) s, $threads thread(s), in $out" >> "$TIMES"
  say "[done] $name ($((SECONDS - t0)) s, $threads thread(s))"
}
# A stage's intra-op threads (per process). The cores go to seeds (JOBS) and branches (LANES) side
# by side, one thread per stage; a stage that runs alone - SFT, the evaluation, and a branch's
# stages once no other branch of its seed runs or waits (side_by_side names that branch in ALONE)
# - takes the seed's whole share, SHARE. The threads change the time, not the numbers: on the
# machines measured, every stage gives the same bits with 1 or 2 threads (tests/test_iterate.py).
threads() {
  if [ -z "${BRANCH:-}" ] || [ "$(cat "$ALONE" 2>/dev/null)" = "$BRANCH" ]; then echo "$SHARE"; else echo 1; fi
}
# The one record of a seed's layout: RUN_DIR/seed<S>/layout.jsonl, one JSON object a line, naming a
# policy or reward model (sft, vanilla_rm, vanilla_ppo/step<N>, dpo, <arm>/round<k>) and what holds
# it, folders relative to the seed's folder. run_seed starts it as layout.jsonl.tmp, each branch
# appends the lines of what it runs (one short write each: appends do not interleave), and it is
# renamed before the evaluation, which reads it (evaluate.read_layout) instead of knowing the layout.
record() {  # record SEED NAME KEY=VALUE ...: a value inside the seed's folder is written relative to it
  local R="$RUN_DIR/seed$1" line kv v
  line="{\"name\": \"$2\""
  shift 2
  for kv in "$@"; do
    v=${kv#*=}
    v=${v#"$R/"}
    [[ "$v" =~ ^[A-Za-z0-9_.+=/-]+$ ]] || fail "record: '$v' (${kv%%=*}) is not a folder inside $R or a plain word"
    if [[ "$v" =~ ^[0-9]+$ ]]; then line+=", \"${kv%%=*}\": $v"; else line+=", \"${kv%%=*}\": \"$v\""; fi
  done
  echo "$line}" >> "$R/layout.jsonl.tmp"
}

# Background branches ignore Ctrl-C (bash does that to background jobs in a script): on INT or TERM,
# end every process this script started (a stage stopped mid-way resumes from its checkpoint).
kill_tree() { local c; for c in $(pgrep -P "$1"); do kill_tree "$c"; done; kill -TERM "$1" 2>/dev/null || true; }
trap 'for c in $(pgrep -P $$); do kill_tree "$c"; done; echo "iterate.sh: stopped" >&2; exit 130' INT TERM

# side_by_side SEED NAME NEEDS COMMAND ...: each COMMAND once the branches named in its NEEDS (comma
# separated; - for none) have ended, LANES at a time, the first ready in the order given. Once one
# fails, nothing new starts: the running branches end the stage they are in (stage reads STOP).
side_by_side() {
  local SEED=$1 i n ready pid st failed="" log ALONE="$RUN_DIR/seed$1/.alone" STOP="$RUN_DIR/seed$1/.stop"
  shift
  # A branch starts with DIRTY set (its stages redone) if one of its NEEDS was redone in this run
  # (ran a stage or started dirty: it says so in .redone/NAME), or for -, if DIRTY is set now.
  local redo="$RUN_DIR/seed$SEED/.redone" before=$DIRTY
  rm -rf "$ALONE" "$STOP" "$redo" && mkdir -p "$redo"
  local -a name=() needs=() command=()
  local -A state=() name_of=() redone=()
  while [ $# -gt 0 ]; do name+=("$1"); needs+=("$2"); command+=("$3"); shift 3; done
  while :; do
    for i in "${!name[@]}"; do  # start what is ready, while lanes are free (after a failure: nothing)
      [ -z "$failed" ] && [ "${#name_of[@]}" -lt "$LANES" ] && [ -z "${state[${name[$i]}]:-}" ] || continue
      ready=1
      for n in ${needs[$i]//,/ }; do [ "$n" = - ] || [ "${state[$n]:-}" = done ] || ready=0; done
      [ "$ready" = 1 ] || continue
      DIRTY=0
      for n in ${needs[$i]//,/ }; do
        if [ "$n" = - ]; then DIRTY=$(( DIRTY | before )); else DIRTY=$(( DIRTY | ${redone[$n]} )); fi
      done
      if [ "$LANES" = 1 ]; then
        ( ${command[$i]}; echo "$DIRTY" > "$redo/${name[$i]}" ) &  # one at a time: its output where ours goes
      else                               # side by side: its output to its log, status lines to ours
        log="$RUN_DIR/seed$SEED/${name[$i]}.log"
        ( BRANCH=${name[$i]} BRANCH_LOG=$log SAY_FD=4; ${command[$i]}; echo "$DIRTY" > "$redo/${name[$i]}" ) 4>&1 > "$log" 2>&1 &
      fi
      state[${name[$i]}]=running
      name_of[$!]=${name[$i]}
    done
    [ "${#name_of[@]}" -gt 0 ] || break
    if [ "${#name_of[@]}" = 1 ] && [ "${#state[@]}" = "${#name[@]}" ]; then  # the last branch (every one
      # started, one running): the seed's cores are its
      echo "${name_of[@]}" > "$ALONE.tmp" && mv "$ALONE.tmp" "$ALONE"
    fi
    st=0
    wait -n -p pid || st=$?
    if [ "$st" = 0 ]; then state[${name_of[$pid]}]=done; else state[${name_of[$pid]}]=failed; failed=1; : > "$STOP"; fi
    [ "$st" != 0 ] || redone[${name_of[$pid]}]=$(cat "$redo/${name_of[$pid]}")
    unset "name_of[$pid]"
  done
  rm -rf "$ALONE" "$STOP" "$redo"
  [ -z "$failed" ] || exit 1
  for i in "${!name[@]}"; do  # a branch waiting for one that is not there would be skipped silently
    [ -n "${state[${name[$i]}]:-}" ] || fail "branch ${name[$i]} waits for '${needs[$i]}', which never ran"
  done
}

run_seeds() {  # run_seed for every seed in SEEDS; JOBS > 1: side by side, each in its own log
  if [ "$JOBS" = 1 ]; then
    for SEED in $SEEDS; do run_seed "$SEED"; done
    return
  fi
  # the cores (or GPUs) divided between the seeds
  [ "$NGPU" = 0 ] || NPROC=1
  declare -A SEED_OF=()
  failed=""
  reap() {  # wait for one seed to end
    local pid st=0
    wait -n -p pid || st=$?
    if [ "$st" = 0 ]; then echo "[seed ${SEED_OF[$pid]}] done"; else echo "[seed ${SEED_OF[$pid]}] failed"; failed="$failed ${SEED_OF[$pid]}"; fi
    unset "SEED_OF[$pid]"
  }
  slot=0
  for SEED in $SEEDS; do
    while [ "${#SEED_OF[@]}" -ge "$JOBS" ]; do reap; done
    [ "$NGPU" -gt 0 ] && export CUDA_VISIBLE_DEVICES=$(( slot % NGPU ))
    echo "[seed $SEED] running, log: $RUN_DIR/seed$SEED.log"
    ( run_seed "$SEED" ) > "$RUN_DIR/seed$SEED.log" 2>&1 &
    SEED_OF[$!]=$SEED
    slot=$((slot + 1))
  done
  while [ "${#SEED_OF[@]}" -gt 0 ]; do reap; done
  [ -z "$failed" ] || fail "seed(s)$failed failed: see $RUN_DIR/seed<S>.log, fix and re-run to resume"
}
