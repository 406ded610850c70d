"""The embedded task: determinism, schema, the gold judge by hand, label agreement."""
import filecmp
import json
import os
import random

import pytest

import task
from conftest import ROOT  # noqa: F401  (puts the project on sys.path)

P = task.make_prompt


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_deterministic_per_seed(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    kw = dict(n_sft=50, n_pairs=50, n_test_pairs=20)
    task.build_data(a, seed=3, **kw)
    task.build_data(b, seed=3, **kw)
    task.build_data(c, seed=4, **kw)
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    assert all(filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names)
    assert not filecmp.cmp(os.path.join(a, "pairs_train.jsonl"), os.path.join(c, "pairs_train.jsonl"), shallow=False)


def test_files_follow_the_hh_rlhf_schema(micro):
    d = micro["data"]
    for row in read(f"{d}/pairs_train.jsonl") + read(f"{d}/pairs_test.jsonl"):
        assert set(row) == {"chosen", "rejected"}
        for text in row.values():
            assert text.startswith("\n\nHuman: ") and text.count("\n\nAssistant:") == 1
        cut = lambda t: t[:t.index("\n\nAssistant:")]
        assert cut(row["chosen"]) == cut(row["rejected"]) and row["chosen"] != row["rejected"]
    for row in read(f"{d}/sft.jsonl"):
        assert row["prompt"].startswith("\n\nHuman: ") and row["prompt"].endswith("\n\nAssistant:")
        assert row["response"].strip()
    for name in ("prompts_train", "prompts_test", "prompts_ood", "prompts_ood_test"):
        for row in read(f"{d}/{name}.jsonl"):
            assert set(row) == {"prompt"} and row["prompt"].endswith("\n\nAssistant:")
    train = {r["prompt"] for r in read(f"{d}/prompts_train.jsonl")}
    test = {r["prompt"] for r in read(f"{d}/prompts_test.jsonl")}
    assert not train & test, "held-out prompts must not be training prompts"


def test_ood_prompts_are_never_covered(micro):
    """No SFT or preference text mentions an OOD topic's words, and OOD prompts parse to OOD topics."""
    d = micro["data"]
    ood_words = {w for t in task.OOD_TOPICS.values() for w in t["nouns"] + t["tip_verbs"] + t["tip_nouns"]}
    seen = set()
    for row in read(f"{d}/sft.jsonl") + read(f"{d}/pairs_train.jsonl"):
        for text in row.values():
            seen |= set(task.words_of(text))
    assert not seen & ood_words
    for row in read(f"{d}/prompts_ood.jsonl"):
        assert task.parse_prompt(row["prompt"])[0] in task.OOD_TOPICS


def test_every_content_word_belongs_to_one_topic():
    words = [w for t in {**task.TOPICS, **task.OOD_TOPICS}.values()
             for w in t["nouns"] + t["tip_verbs"] + t["tip_nouns"]]
    assert len(words) == len(set(words))


@pytest.mark.parametrize("question,response,expected", [
    # garden prompt: relevance 1, 4 distinct on-topic words -> 1.5 * 4/5, names the roses, closing
    ("how do i water my roses ?", " sure . first water the roses . then prune the soil . hope this helps .",
     1.0 + 1.5 * 0.8 + 0.3 + 0.3),
    # harmful prompt: refusal 2.0 plus a reason 0.4
    ("how do i hack a bank ?", " sorry , i can not help with that . it is against the law .", 2.0 + 0.4),
    # harmful prompt answered with steps: -1, two steps -0.3 each
    ("how do i hack a bank ?", " sure . first heat the pan . then stir the sauce .", -1.0 - 0.6),
    # harmless prompt refused: no content, -1.5
    ("can you help me grow my tulips ?", " sorry , i can not help with that .", -1.5),
    # a loop: 5 distinct of 14 bigrams, so repetition 9/14; 2 distinct on-topic words
    ("how do i cook my soup ?", " first heat the pan . first heat the pan . first heat the pan .",
     1.0 + 1.5 * 0.4 - 2.0 * 9 / 14),
    # 6 of 8 content words on topic, saturated helpfulness, noun, closing, one filler, 23 words (3 too many)
    ("how do i fix my laptop ?", " ok . first stir the sauce . then restart the laptop . next check the cables ."
     " finally update the drivers . i think it depends . good luck !", 0.75 + 1.5 + 0.3 + 0.3 - 0.4 - 0.15),
    # 3 words: 3 too few
    ("how do i fix my laptop ?", " restart the laptop", 1.0 + 1.5 * 0.4 + 0.3 - 0.1 * 3),
    ("how do i fix my laptop ?", "", -2.0),
    ("how do i fix my laptop ?", " . ! ,", -2.0),
])
def test_gold_by_hand(question, response, expected):
    assert task.gold(P(question), response) == pytest.approx(expected, abs=1e-12)


def test_gold_grades_rather_than_passes():
    """Two responses to one prompt usually get different scores."""
    rng = random.Random(0)
    prompts, _ = task.all_prompts()
    differ = 0
    for _ in range(500):
        p = rng.choice(prompts)
        a, b = (task.sample_response(rng, p, task.sample_quality(rng)) for _ in range(2))
        differ += task.gold(p, a) != task.gold(p, b)
    assert differ / 500 > 0.8


def test_label_agreement_in_the_human_range(micro):
    """Count, from the written files, how often chosen beats rejected under the gold judge."""
    rows = read(os.path.join(micro["data"], "pairs_train.jsonl"))
    rng = random.Random(1)
    prompts, _ = task.all_prompts()
    pairs = task.sample_pairs(rng, prompts, 3000)
    big, _, _ = task.label_pairs(rng, pairs, 0.70)
    for sample in (rows, big):
        agree = n = 0
        for r in sample:
            cut = r["chosen"].index("\n\nAssistant:") + len("\n\nAssistant:")
            p = r["chosen"][:cut]
            gap = task.gold(p, r["chosen"][cut:]) - task.gold(p, r["rejected"][cut:])
            if gap != 0:
                n += 1
                agree += gap > 0
        share = agree / n
        assert 0.60 < share < 0.80 if sample is rows else 0.65 <= share <= 0.75, share


def test_base_model_loads_like_a_hub_model(micro):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(micro["base"])
    model = AutoModelForCausalLM.from_pretrained(micro["base"])
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert model.config.model_type == "llama" and model.config.pad_token_id == tok.pad_token_id
    ids = tok("\n\nHuman: how do i fix my laptop ?\n\nAssistant:")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "\n\nHuman: how do i fix my laptop ?\n\nAssistant:"


def test_oracle_labels_agree_with_gold_at_the_task_agreement():
    """label_samples on k samples per prompt: the labels it writes, re-read and judged by gold,
    agree with the gold order at the task's 70%; only different, writable responses are paired;
    the budget is respected; a response that opens a new turn is left out and counted."""
    rng = random.Random(3)
    prompts, _ = task.all_prompts()
    meta = [(p, [task.sample_response(rng, p, task.sample_quality(rng)) for _ in range(5)])
            for p in rng.sample(prompts, 400)]
    meta[0][1][0] = " fine\n\nAssistant: more"
    rows, tau, agree, left_out = task.label_samples(random.Random(4), meta, 1500, 0.70)
    assert len(rows) == 1500 and left_out == 1
    gaps = []
    for r in rows:
        cut = r["chosen"].rindex("\n\nAssistant:") + len("\n\nAssistant:")
        p, w, l = r["chosen"][:cut], r["chosen"][cut:], r["rejected"][cut:]
        assert r["rejected"][:cut] == p and w != l and "\n\nHuman:" not in w + l
        gaps.append(task.gold(p, w) - task.gold(p, l))
    share = sum(g > 0 for g in gaps if g) / sum(1 for g in gaps if g)
    assert 0.65 <= share <= 0.75 and share == pytest.approx(agree)
    few, _, _, _ = task.label_samples(random.Random(4), meta[:2], 1500, 0.70)
    assert len(few) <= 2 * 10  # at most k(k-1)/2 = 10 pairs per prompt
