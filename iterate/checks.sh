# iterate/checks.sh: every choice of iterate.sh checked before the first stage runs, then its
# RUN_DIR locked and its settings recorded (a RUN_DIR stands for one set of settings); sourced by
# iterate.sh. A bad choice is one line and exit status 2.

fail() { echo "iterate.sh: $*" >&2; exit 2; }
is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }
case "$META_GRAD" in exact|first_order|taylor) ;; *) fail "META_GRAD=$META_GRAD: use exact, first_order or taylor";; esac
case "$DIST" in ddp|fsdp) ;; *) fail "DIST=$DIST: use ddp or fsdp";; esac
case "$KL_ANCHOR" in prev|sft) ;; *) fail "KL_ANCHOR=$KL_ANCHOR: use prev or sft";; esac
case "$OOD" in 0|1) ;; *) fail "OOD=$OOD: use 0 or 1";; esac
for v in ROUNDS JOBS LANES PPO_STEPS NPROC ORACLE_PAIRS; do
  is_int "${!v}" && [ "${!v}" -ge 1 ] || fail "$v=${!v}: a whole number >= 1"
done
is_int "$META_N" || fail "META_N=$META_N: a whole number (0: all prompts)"
for S in $SEEDS; do is_int "$S" || fail "SEEDS: '$S' is not a whole number"; done
[ -n "$SEEDS" ] || fail "SEEDS is empty"
TWICE=$(printf '%s\n' $SEEDS | sed 's/^0*\([0-9]\)/\1/' | sort | uniq -d | tr '\n' ' ')
[ -z "$TWICE" ] || fail "SEEDS=\"$SEEDS\": seed(s) ${TWICE}named twice"
[ -n "$ARMS" ] || fail "ARMS is empty"
arm_base() { echo "${1%%+*}"; }
arm_mod() {  # arm_mod ARM KEY DEFAULT: the value of +KEY=value in the arm's name, else DEFAULT
  local m
  if [[ "$1" == *+* ]]; then
    for m in $(echo "${1#*+}" | tr '+' ' '); do
      [ "${m%%=*}" = "$2" ] && { echo "${m#*=}"; return; }
    done
  fi
  echo "$3"
}
metarm_flags() {  # the arm's +eta= and +deploy= as metarm.py flags (after METARM_ARGS: they win)
  local f=""
  [ "$(arm_mod "$1" eta "")" = "" ] || f="--eta $(arm_mod "$1" eta "")"
  [ "$(arm_mod "$1" deploy "")" = "" ] || f="$f --deploy $(arm_mod "$1" deploy "")"
  echo "$f"
}
for A in $ARMS; do
  B=$(arm_base "$A")
  case "$B" in metarm|vanilla|oracle|dpo|bilevel) ;; *) fail "ARMS: unknown arm '$B' in '$A' (metarm, vanilla, oracle, dpo, bilevel)";; esac
  if [ "$A" != "$B" ]; then
    for m in $(echo "${A#*+}" | tr '+' ' '); do
      k=${m%%=*}; v=${m#*=}
      [ "$k" != "$m" ] || fail "ARMS: '$m' in '$A' is not key=value"
      case "$B:$k" in
        metarm:eta) [[ "$v" =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]] || fail "ARMS: eta=$v in '$A' is not a number >= 0";;
        metarm:deploy) case "$v" in theta|adapted) ;; *) fail "ARMS: deploy=$v in '$A': theta or adapted";; esac;;
        metarm:anchor|vanilla:anchor|oracle:anchor|bilevel:anchor) case "$v" in prev|sft) ;; *) fail "ARMS: anchor=$v in '$A': prev or sft";; esac;;
        *) fail "ARMS: '$k' is not a setting of the $B arm (metarm: eta, deploy, anchor; vanilla, oracle, bilevel: anchor)";;
      esac
    done
  fi
  case "$B" in  # arms that read the embedded task itself
    oracle) needs="labels with the embedded task's annotator";;
    bilevel) needs="groups the pairs into the embedded task's topics";;
    *) needs="";;
  esac
  if [ -n "$needs" ] && [ "$DATA" != "$RUN_DIR/task/data" ] && [ "$PAIRS" = "${PAIRS#$DATA/}" ]; then
    fail "ARMS: the $B arm $needs; it needs the embedded task's data"
  fi
done

# Each stage's extra flags parse before the first stage runs (one python start for all of them),
# unless this RUN_DIR has checked these very flags already (RUN_DIR/flags_checked, written below;
# each stage still checks its own flags when it starts).
FLAGS=(SFT_ARGS "${SFT_ARGS:-}" RM_ARGS "${RM_ARGS:-}" METARM_ARGS "${METARM_ARGS:-}" PPO_ARGS "${PPO_ARGS:-}"
       SAMPLE_ARGS "${SAMPLE_ARGS:-}" DPO_ARGS "${DPO_ARGS:-}" BILEVEL_ARGS "${BILEVEL_ARGS:-}" EVAL_ARGS "${EVAL_ARGS:-}")
CHECKED=$(printf '%s\n' "${FLAGS[@]}")
if [ "$(cat "$RUN_DIR/flags_checked" 2>/dev/null)" != "$CHECKED" ]; then
  python tools/check_flags.py "${FLAGS[@]}" || exit 2
fi

# ---- one iterate.sh per RUN_DIR, and a RUN_DIR stands for one set of settings ------------------
mkdir -p "$RUN_DIR" 2>/dev/null && [ -w "$RUN_DIR" ] || fail "cannot write in RUN_DIR=$RUN_DIR"
exec 9>>"$RUN_DIR/LOCK"  # held until this script and every stage it started have ended
flock -n 9 || fail "RUN_DIR=$RUN_DIR is in use by another iterate.sh ($(cat "$RUN_DIR/LOCK")): wait for it to end, or stop it"
echo "iterate.sh, pid $$ on $(hostname)" > "$RUN_DIR/LOCK"
# What every stage computes depends on these (ARMS and SEEDS may grow: new ones simply run; JOBS,
# LANES, NPROC and DIST change how, not what). A finished RUN_DIR re-run with other values is refused.
# Paths inside RUN_DIR are recorded as <RUN_DIR>/...: runs/x, ./runs/x/ and /abs/runs/x are one RUN_DIR.
settings() {  # settings SPELLING: the settings, RUN_DIR written as SPELLING
  [ -z "${TASK_ARGS:-}" ] || echo "TASK_ARGS=$TASK_ARGS"  # (absent when empty: older RUN_DIRs still match)
  local v val
  for v in ROUNDS META_GRAD KL_ANCHOR ORACLE_PAIRS OOD MODEL SFT_DATA PAIRS EVAL_PAIRS PROMPTS \
           TEST_PROMPTS PPO_STEPS META_N SFT_ARGS RM_ARGS METARM_ARGS PPO_ARGS SAMPLE_ARGS DPO_ARGS BILEVEL_ARGS; do
    val=${!v:-}
    [ "$v" = "${v%_ARGS}" ] && [ "${val#"$RUN_DIR"/}" != "$val" ] && val="$1/${val#"$RUN_DIR"/}"
    echo "$v=$val"
  done
}
SETTINGS=$(settings "<RUN_DIR>")
OLD_ROOT=$(sed -n 's|^MODEL=\(.*\)/task/base_model$|\1|p' "$RUN_DIR/settings" 2>/dev/null || true)  # as older runs wrote it
if [ -f "$RUN_DIR/settings" ] && [ "$(cat "$RUN_DIR/settings")" != "$SETTINGS" ] \
   && { [ -z "$OLD_ROOT" ] || [ "$(cat "$RUN_DIR/settings")" != "$(settings "$OLD_ROOT")" ]; }; then
  fail "RUN_DIR=$RUN_DIR was run with other settings: $(diff <(cat "$RUN_DIR/settings") <(echo "$SETTINGS") \
    | sed -n 's/^< /before /p; s/^> /now /p' | tr '\n' ';' | sed 's/;/; /g')use another RUN_DIR, or delete it"
fi
echo "$SETTINGS" > "$RUN_DIR/settings.tmp" && mv "$RUN_DIR/settings.tmp" "$RUN_DIR/settings"
printf '%s\n' "$CHECKED" > "$RUN_DIR/flags_checked.tmp" && mv "$RUN_DIR/flags_checked.tmp" "$RUN_DIR/flags_checked"
