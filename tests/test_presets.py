"""The paper's 7B presets rehearsed end to end: `PRESET=llama2-7b-hh` and `PRESET=llama2-7b-tldr
bash iterate.sh` with the presets' own stage settings (lengths 512, truncation, bad rows skipped,
gradient checkpointing, --strategy fsdp, k = 5 samples of 256 / 64 tokens, 16 roll-outs per
query), one round of one PPO step, one process a stage, the model replaced by a small one and the
hub data sets by local files in their real schemas and real lengths: multi-turn HH-RLHF
transcripts of 300-600 tokens, TL;DR posts with their comparisons. What only the real path does -
long rows, cuts, chat text, the preset's lengths in every stage and in the evaluation - runs on
every CI run."""
import json
import os
import random
import re
import shlex
import subprocess

import pytest

import data
import loading
import task
from conftest import ROOT

pytestmark = pytest.mark.slow  # bash iterate.sh

WORDS = ("i you we they it this that the a an my your our some any every what how why when where "
         "should would could can will do does did have has had is are was were be been get got make "
         "take give keep tell ask think know feel want need try help start stop work live move call "
         "friend family partner boss neighbor doctor teacher car house job money time week year day "
         "night morning plan problem question answer idea reason advice situation decision message "
         "really always never often maybe probably actually honestly together alone better worse "
         "happy worried angry tired busy careful quiet important different difficult simple").split()


def sentence(rng, n):
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + rng.choice([".", ".", "?", "!"])


def paragraph(rng, n_words):
    out, left = [], n_words
    while left > 0:
        n = min(left, rng.randint(6, 16))
        out.append(sentence(rng, n))
        left -= n
    return " ".join(out)


def hh_rows(rng, n):
    """HH-RLHF rows: 2-4 turns, chosen and rejected sharing every turn but the last answer."""
    rows = []
    for _ in range(n):
        turns = "".join(f"\n\nHuman: {paragraph(rng, rng.randint(15, 40))}\n\nAssistant: {paragraph(rng, rng.randint(20, 50))}"
                        for _ in range(rng.randint(1, 3)))
        prompt = f"{turns}\n\nHuman: {paragraph(rng, rng.randint(10, 30))}\n\nAssistant:"
        rows.append({"chosen": f"{prompt} {paragraph(rng, rng.randint(20, 60))}",
                     "rejected": f"{prompt} {paragraph(rng, rng.randint(5, 40))}"})
    return rows


def tldr_info(rng, i):
    return {"id": f"t3_{i:05d}", "subreddit": rng.choice(["relationships", "AskReddit", "personalfinance"]),
            "title": sentence(rng, rng.randint(5, 12)), "post": paragraph(rng, rng.randint(120, 260))}


def tldr_sft_rows(rng, n):
    """CarperAI/openai_summarize_tldr rows: {prompt, label}, the post ending in 'TL;DR:'."""
    rows = []
    for i in range(n):
        info = tldr_info(rng, i)
        rows.append({"prompt": f"SUBREDDIT: r/{info['subreddit']}\nTITLE: {info['title']}\nPOST: {info['post']}\nTL;DR:",
                     "label": " " + paragraph(rng, rng.randint(8, 25))})
    return rows


def tldr_comparisons(rng, n):
    """openai/summarize_from_feedback 'comparisons' rows."""
    return [{"info": tldr_info(rng, i), "choice": rng.randint(0, 1), "worker": "w0", "batch": "batch1", "split": "train",
             "summaries": [{"text": " " + paragraph(rng, rng.randint(8, 25)), "policy": p, "note": None}
                           for p in ("sup2", "ppo_xl")], "extra": {"confidence": 5}} for i in range(n)]


def write(path, rows, bad_row=None):
    lines = [json.dumps(r) for r in rows]
    if bad_row is not None:
        lines.insert(3, json.dumps(bad_row))  # a malformed row in the middle: the presets skip bad rows
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def small_model(micro, tmp_path_factory):
    """A 2-layer Llama whose positions reach the presets' 512 + 256 tokens."""
    out = str(tmp_path_factory.mktemp("rehearsal") / "base")
    task.build_base_model(micro["data"], out, seed=0, hidden_size=32, num_layers=2, num_heads=2,
                          intermediate_size=64, max_positions=1024)
    return out


def rehearse(preset, files, small_model, judge, tmp_path):
    """iterate.sh with the preset's own settings, one round of one PPO step, smaller only in counts
    that change no length and no path: PPO's 2 queries (x the preset's 16 roll-outs; it has 8) and
    16 prompts of meta data (x 5 samples: one MetaRM meta batch; it has every training prompt); one
    process per stage (each stage under torchrun with two processes and FSDP2, gradient
    checkpointing on, started by iterate.sh's launch: tests/test_distributed.py)."""
    ppo_args = preset_settings(preset, "PPO_ARGS")["PPO_ARGS"] + " --queries 2"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PRESET": preset, "RUN_DIR": str(tmp_path / "run"),
           "MODEL": small_model, "JUDGE": judge, "NPROC": "1", "ROUNDS": "1", "PPO_STEPS": "1",
           "ARMS": "metarm", "PPO_ARGS": ppo_args, "META_N": "16", **files}  # the vanilla arm's round 1 is vanilla PPO's
    for v in ("SFT_ARGS", "RM_ARGS", "METARM_ARGS", "SAMPLE_ARGS", "EVAL_ARGS", "DIST"):
        env.pop(v, None)  # the preset's own
    p = subprocess.run(["bash", "iterate.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return p.stdout + p.stderr, tmp_path / "run" / "seed1"


def stage_args(folder):
    with open(folder / "args.json") as f:
        return json.load(f)


def check_lengths(run, out, response_tokens):
    """Every stage ran with the preset's lengths, the long rows were cut (and said so), the bad
    row was skipped (and said so), and the evaluation read each model at its own lengths."""
    for folder in ("sft", "rm", "metarm/round1/rm"):
        a = stage_args(run / folder)
        assert (a["max_len"], a["truncate"], a["skip_bad_rows"], a["gradient_checkpointing"]) == (512, True, True, True), folder
    for folder in ("sft_samples", "metarm/round1/ppo", "ppo_vanilla"):
        a = stage_args(run / folder)
        assert (a["max_prompt_len"], a["max_new_tokens"], a["truncate"]) == (512, response_tokens, True), folder
    a = stage_args(run / "metarm/round1/rm")
    assert (a["meta_batch"], a["global_batch"], a["meta_grad"]) == (16, 16, "first_order")
    assert stage_args(run / "metarm/round1/ppo")["rollouts_per_query"] == 16
    assert re.search(r"rows truncated \((prompt cut from the left|response cut from the right), --max_len 512\)", out), out[-3000:]
    assert re.search(r"skipped 1 rows \(1 x ", out), out[-3000:]
    with open(run / "sft_samples" / "meta.jsonl") as f:
        assert all(len(json.loads(line)["responses"]) == 5 for line in f)
    with open(run / "eval" / "results.json") as f:
        res = json.load(f)
    assert set(res["judge_mean"]) >= {"sft", "metarm/round1", "vanilla_ppo/step1"}
    assert res["rounds"]["metarm"][0]["rm"]["eval/accuracy"] >= 0  # the RMs measured on the held-out pairs


def lengths_in_tokens(tok, rows, key):
    return [len(tok(r[key])["input_ids"]) for r in rows]


def test_hh_preset_rehearsed(micro, micro_rm, small_model, tmp_path):
    rng = random.Random(0)
    train, test = hh_rows(rng, 32), hh_rows(rng, 4)  # 32: the preset's SFT batch (a batch never repeats a row)
    tok = loading.load_tokenizer(small_model)
    lengths = lengths_in_tokens(tok, train, "chosen")
    assert 300 <= sorted(lengths)[len(lengths) // 2] <= 600 and max(lengths) > 512, lengths  # real lengths, some cut
    d = tmp_path / "hh"
    d.mkdir()
    pairs = write(d / "train.jsonl", train, bad_row={"chosen": "no dialogue structure", "rejected": "x"})
    files = {"SFT_DATA": pairs, "PAIRS": pairs, "PROMPTS": pairs,
             "EVAL_PAIRS": write(d / "test.jsonl", test), "TEST_PROMPTS": write(d / "test_prompts.jsonl", test)}
    out, run = rehearse("llama2-7b-hh", files, small_model, micro_rm, tmp_path)
    check_lengths(run, out, 256)
    assert stage_args(run / "sft")["strategy"] == "fsdp"  # the preset's DIST, passed to every stage
    assert len(data.load_pairs(pairs, skip_bad=True)) == 32


def preset_settings(preset, *names):
    """The values `source presets/<preset>.sh` gives the named variables (none set beforehand)."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_ARGS")}
    show = "; ".join(f'printf "%s\\n" "${name}"' for name in names)
    p = subprocess.run(["bash", "-c", f"JUDGE=some/judge; source presets/{preset}.sh; {show}"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return dict(zip(names, p.stdout.split("\n")))


def test_tldr_preset_data_through_its_stages(micro, small_model, tmp_path, capsys):
    """The TL;DR preset shares everything but its data sets and response length with the HH one,
    rehearsed end to end above: here its data, in the real schemas and lengths, go through the
    stages that read them (SFT, the RM, sampling; in this process) with the preset's own flags,
    one step each: the long rows cut and counted, the bad row skipped and counted, 64-token
    responses, k = 5."""
    import reward_model
    import sample
    import sft
    rng = random.Random(1)
    rows, comparisons, prompts = tldr_sft_rows(rng, 32), tldr_comparisons(rng, 16), tldr_sft_rows(rng, 8)
    tok = loading.load_tokenizer(small_model)
    lengths = lengths_in_tokens(tok, rows, "prompt")
    assert 300 <= sorted(lengths)[len(lengths) // 2] <= 700 and max(lengths) > 512, lengths
    d = tmp_path / "tldr"
    d.mkdir()
    sft_data = write(d / "sft.jsonl", rows, bad_row={"prompt": "a post", "label": 3})
    pairs, prompts = write(d / "comparisons.jsonl", comparisons), write(d / "prompts.jsonl", prompts)
    flags = {k: shlex.split(v) for k, v in preset_settings("llama2-7b-tldr", "SFT_ARGS", "RM_ARGS", "SAMPLE_ARGS").items()}
    capsys.readouterr()
    sft.main(["--model_name_or_path", small_model, "--data", sft_data, "--output_dir", str(tmp_path / "sft"),
              *flags["SFT_ARGS"], "--max_steps", "1"])
    out = capsys.readouterr().out
    assert re.search(r"sft.jsonl: \d+ rows truncated \(prompt cut from the left, --max_len 512\)", out), out
    assert "skipped 1 rows (1 x " in out, out
    reward_model.main(["--sft_dir", str(tmp_path / "sft"), "--data", pairs, "--eval_data", "",
                       "--output_dir", str(tmp_path / "rm"), *flags["RM_ARGS"], "--max_steps", "1"])
    assert re.search(r"comparisons.jsonl: \d+ rows truncated", capsys.readouterr().out)
    sample.main(["--policy_dir", str(tmp_path / "sft"), "--prompts", prompts, "--output_dir", str(tmp_path / "samples"),
                 *flags["SAMPLE_ARGS"], "--max_prompts", "8"])
    assert re.search(r"\d+ prompts truncated \(cut from the left, --max_prompt_len 512\)", capsys.readouterr().out)
    for folder in ("sft", "rm"):
        a = stage_args(tmp_path / folder)
        assert (a["max_len"], a["truncate"], a["skip_bad_rows"], a["gradient_checkpointing"]) == (512, True, True, True), folder
    a = stage_args(tmp_path / "samples")
    assert (a["max_prompt_len"], a["max_new_tokens"], a["truncate"], a["k"]) == (512, 64, True, 5)
    with open(tmp_path / "samples" / "meta.jsonl") as f:
        assert all(len(json.loads(line)["responses"]) == 5 for line in f)
