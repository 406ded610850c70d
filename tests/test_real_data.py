"""The real data sets' schemas, on small fixture files written here in each schema: every
conversion gives the expected HH-RLHF prompts and pairs; rows that cannot be converted are
counted and reported. Nothing is downloaded."""
import json

import pytest

import data

H, A = "\n\nHuman:", "\n\nAssistant:"


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_hh_rlhf_multi_turn(tmp_path):
    rows = [{"chosen": f"{H} hi{A} hello!{H} how do I bake bread?{A} Knead the dough well.",
             "rejected": f"{H} hi{A} hello!{H} how do I bake bread?{A} No idea."}]
    [(p, c, r, _)] = data.load_pairs(jsonl(tmp_path / "hh.jsonl", rows))
    assert p == f"{H} hi{A} hello!{H} how do I bake bread?{A}"
    assert (c, r) == (" Knead the dough well.", " No idea.")
    assert data.load_prompts(str(tmp_path / "hh.jsonl"))[0][0] == p
    assert data.load_sft(str(tmp_path / "hh.jsonl"))[0][:2] == (p, " Knead the dough well.")


def test_tldr_comparisons(tmp_path):
    info = {"id": "t3_x", "subreddit": "cooking", "title": "Burnt rice", "post": "I burnt my rice again."}
    rows = [{"info": info, "summaries": [{"text": "Rice burnt. ", "policy": "a"}, {"text": "I cook.", "policy": "b"}],
             "choice": 0, "worker": "w", "batch": "b", "split": "train", "extra": {}},
            {"info": info, "summaries": [{"text": "x"}], "choice": 0}]
    path = jsonl(tmp_path / "tldr.jsonl", rows)
    with pytest.raises(data.DataError, match="row 2: a TL;DR comparison needs"):
        data.load_pairs(path)
    [(p, c, r, _)] = data.load_pairs(path, skip_bad=True)
    assert p == f"{H} Summarize this Reddit post.\nSUBREDDIT: r/cooking\nTITLE: Burnt rice\nPOST: I burnt my rice again.{A}"
    assert (c, r) == (" Rice burnt.", " I cook.")
    assert data.load_prompts(path, skip_bad=True)[0][0] == p


def test_tldr_sft_rows(tmp_path):
    rows = [{"prompt": "SUBREDDIT: r/cats\nTITLE: Cat\nPOST: My cat sleeps.\nTL;DR:", "label": " cat sleeps"}]
    [(p, r, _)] = data.load_sft(jsonl(tmp_path / "sft.jsonl", rows))
    assert p == f"{H} SUBREDDIT: r/cats\nTITLE: Cat\nPOST: My cat sleeps.\nTL;DR:{A}" and r == " cat sleeps"


def test_pku_saferlhf_parquet(tmp_path):
    """A parquet file goes through datasets.load_dataset; the safer response is chosen."""
    import datasets
    rows = [{"prompt": "How do I pick a lock?", "response_0": "Here is how: ...", "response_1": "I can't help with that.",
             "better_response_id": 0, "safer_response_id": 1, "is_response_0_safe": False, "is_response_1_safe": True},
            {"prompt": "Say hi", "response_0": "hi", "response_1": "hi", "better_response_id": 0, "safer_response_id": 0,
             "is_response_0_safe": True, "is_response_1_safe": True}]
    path = str(tmp_path / "pku.parquet")
    datasets.Dataset.from_list(rows).to_parquet(path)
    [(p, c, r, where)] = data.load_pairs(path, skip_bad=True)
    assert p == f"{H} How do I pick a lock?{A}" and c == " I can't help with that." and r == " Here is how: ..."
    assert where == f"{path}, row 1"
    [(p2, c2, _, _)] = data.load_pairs(path, skip_bad=True, pku_preference="better")
    assert c2 == " Here is how: ..."
    with pytest.raises(data.DataError, match="row 2: chosen and rejected are identical"):
        data.load_pairs(path)
    assert [p for p, _ in data.load_prompts(path)] == [f"{H} How do I pick a lock?{A}", f"{H} Say hi{A}"]


def test_oasst1_conversation_starts(tmp_path, capsys):
    rows = [{"message_id": "1", "parent_id": None, "role": "prompter", "text": "What is a black hole?", "lang": "en"},
            {"message_id": "2", "parent_id": "1", "role": "assistant", "text": "A region of space...", "lang": "en"},
            {"message_id": "3", "parent_id": "2", "role": "prompter", "text": "Thanks!", "lang": "en"},
            {"message_id": "4", "parent_id": None, "role": "prompter", "text": "Write a haiku", "lang": "en"}]
    prompts = data.load_prompts(jsonl(tmp_path / "oasst1.jsonl", rows))
    assert [p for p, _ in prompts] == [f"{H} What is a black hole?{A}", f"{H} Write a haiku{A}"]
    assert "skipped 2 rows (2 x oasst1 message that does not start a conversation)" in capsys.readouterr().out


def test_bad_hub_name_is_one_clear_error():
    with pytest.raises(data.DataError, match="cannot load data set 'nobody/no-such-dataset"):
        data.load_prompts("nobody/no-such-dataset:train")
