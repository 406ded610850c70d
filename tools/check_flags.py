"""tools/check_flags.py: parse each stage's extra flags, as iterate.sh will pass them, before the
first stage runs (a bad METARM_ARGS would otherwise stop the run only after SFT, the RM and the
samples had run).

    python tools/check_flags.py SFT_ARGS "$SFT_ARGS" RM_ARGS "$RM_ARGS" ...

Each value is split on whitespace, as bash splits an unquoted ${SFT_ARGS}. Exit 0 when every
one parses and passes its checks; else one line per bad variable on stderr, exit 2."""
import contextlib
import importlib
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STAGE = {"SFT_ARGS": "sft", "RM_ARGS": "reward_model", "METARM_ARGS": "metarm", "PPO_ARGS": "ppo",
         "SAMPLE_ARGS": "sample", "DPO_ARGS": "dpo", "BILEVEL_ARGS": "bilevel_rm", "EVAL_ARGS": "evaluate"}


def problem(variable, value):
    """None, or what is wrong with `variable`'s flags, in one line."""
    import cli
    module = importlib.import_module(STAGE[variable])
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            cli.parse_args(module.Args, module.__doc__, value.split())
    except SystemExit:  # argparse: an unknown flag, a bad value or choice
        lines = [l for l in err.getvalue().splitlines() if l.strip()]
        return lines[-1].split("error: ", 1)[-1] if lines else "cannot be parsed"
    except cli.UserError as e:
        return str(e)
    return None


def main(argv):
    if len(argv) % 2 or any(v not in STAGE for v in argv[::2]):
        raise SystemExit(f"usage: check_flags.py VARIABLE VALUE ...; VARIABLE one of {', '.join(STAGE)}")
    bad = [(v, value, problem(v, value)) for v, value in zip(argv[::2], argv[1::2]) if value.strip()]
    bad = [b for b in bad if b[2]]
    for v, value, why in bad:
        print(f"iterate.sh: {v}=\"{value}\": {STAGE[v]}.py: {why}", file=sys.stderr)
    return 2 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
