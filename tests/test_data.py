"""Bad input gets an error naming the file, the row and the problem; skipping is counted."""
import json
import re

import pytest

import cli
import data
import loading
import sft
from conftest import assert_cli_error

GOOD = {"chosen": "\n\nHuman: how do i fix my laptop ?\n\nAssistant: restart the laptop .",
        "rejected": "\n\nHuman: how do i fix my laptop ?\n\nAssistant: stir the sauce ."}


def write(tmp_path, rows, name="f.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("bad,message", [
    ('{"chosen": "x", ', "row 2: not valid JSON"),
    ({"chosen": GOOD["chosen"]}, "row 2: missing key 'rejected'"),
    ({"chosen": GOOD["chosen"], "rejected": GOOD["chosen"]}, "row 2: chosen and rejected are identical"),
    ({"chosen": GOOD["chosen"], "rejected": "\n\nHuman: hello\n\nAssistant: hi"}, "row 2: chosen and rejected do not share"),
    ({"chosen": "\n\nHuman: how do i fix my laptop ?\n\nAssistant: ", "rejected": GOOD["rejected"]}, "row 2: empty chosen response"),
    ({"chosen": "how do i fix it? restart", "rejected": GOOD["rejected"]}, "row 2: 'chosen' lacks the"),
    ({"chosen": 3, "rejected": GOOD["rejected"]}, "row 2: 'chosen' should be a string"),
    ([1, 2], "row 2: not a JSON object"),
    ('{"chosen": ' + "9" * 5000 + "}", "row 2: not valid JSON (Exceeds the limit"),
    ("[" * 100000 + "]" * 100000, "row 2: not valid JSON (nested too deeply)"),
    ('{"chosen": "\\ud800 hi", "rejected": "x"}', "row 2: not UTF-8 text (a lone surrogate"),
    ({"chosen": "\n\nHuman: \u200b \ufeff\n\nAssistant: a", "rejected": "\n\nHuman: \u200b \ufeff\n\nAssistant: b"},
     "row 2: empty prompt"),
    ({"chosen": GOOD["chosen"].replace("restart the laptop .", "\u200b\u2060"), "rejected": GOOD["rejected"]},
     "row 2: empty chosen response"),
])
def test_bad_pair_rows(tmp_path, bad, message):
    path = write(tmp_path, [GOOD, bad, GOOD])
    with pytest.raises(data.DataError) as e:
        data.load_pairs(path)
    assert str(e.value).startswith(path) and message in str(e.value)


def test_skipping_is_counted_and_reported(tmp_path, capsys):
    path = write(tmp_path, [GOOD, {"chosen": GOOD["chosen"]}, GOOD, {"chosen": GOOD["chosen"], "rejected": GOOD["chosen"]}])
    rows = data.load_pairs(path, skip_bad=True)
    assert len(rows) == 2
    out = capsys.readouterr().out
    assert "skipped 2 rows" in out and "missing key 'rejected'" in out and "identical" in out


def test_bad_sft_prompt_and_meta_rows(tmp_path):
    sft = write(tmp_path, [{"prompt": "\n\nHuman: hi\n\nAssistant:", "response": "  "}], "sft.jsonl")
    with pytest.raises(data.DataError, match="row 1: empty response"):
        data.load_sft(sft)
    prompts = write(tmp_path, [{"prompt": "\n\nHuman: hi\n\nAssistant:"}, {"prompt": "\n\nHuman: hi"}], "p.jsonl")
    with pytest.raises(data.DataError, match=r"p.jsonl, row 2: a prompt that starts with .* must end with"):
        data.load_prompts(prompts)
    # a plain-text prompt is one human turn
    plain = write(tmp_path, [{"prompt": "  what is a good name for a cat?  "}], "plain.jsonl")
    assert data.load_prompts(plain)[0][0] == "\n\nHuman: what is a good name for a cat?\n\nAssistant:"
    meta = write(tmp_path, [{"prompt": "\n\nHuman: hi\n\nAssistant:", "responses": [" a", " b"]},
                            {"prompt": "\n\nHuman: yo\n\nAssistant:", "responses": [" a", " b", " c"]}], "m.jsonl")
    with pytest.raises(data.DataError, match="m.jsonl, row 2: has another number of responses than the first rows. 2 \\(3\\)"):
        data.load_meta(meta)


def test_hh_rows_split_at_the_last_assistant_turn(tmp_path):
    text = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d"
    path = write(tmp_path, [{"chosen": text, "rejected": text[:-1] + "e"}])
    [(prompt, chosen, rejected, where)] = data.load_pairs(path)
    assert prompt == "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:" and chosen == " d" and rejected == " e"
    assert where.endswith("row 1")


def test_cli_errors_are_one_line(tmp_path, micro, capsys):
    """A user mistake ends with one 'error:' line and status 2, not a traceback."""
    bad = write(tmp_path, [{"prompt": "\n\nHuman: hi\n\nAssistant:", "response": " ok"}, {"prompt": "x"}], "sft.jsonl")
    cases = [
        (["--data", bad], "sft.jsonl, row 2: missing key 'response'"),
        (["--data", str(tmp_path / "nope.jsonl")], "does not exist"),
        (["--model_name_or_path", str(tmp_path / "no_model")], "does not exist"),
        (["--model_name_or_path", "meta-llama/Llama-2-7b-hf"], "cannot load 'meta-llama/Llama-2-7b-hf'"),
    ]
    for i, (extra, message) in enumerate(cases):
        args = ["--model_name_or_path", micro["base"], "--data", f"{micro['data']}/sft.jsonl",
                "--output_dir", str(tmp_path / "out"), *extra]
        if i == 0:  # as from the command line: one 'error:' line, status 2, no traceback
            assert_cli_error("sft.py", *args, message=message, capsys=capsys)
        else:
            with pytest.raises(cli.UserError, match=re.escape(message)):
                sft.main(args)


def test_too_long_rows(micro):
    import loading
    tok = loading.load_tokenizer(micro["base"])
    prompt, response = "\n\nHuman: how do i fix my laptop ?\n\nAssistant:", " restart the laptop ."
    p_ids, r_ids = tok(prompt)["input_ids"], tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with pytest.raises(data.DataError, match=r"f.jsonl, row 3: .* more than --max_len 10"):
        data.Encoder(tok, max_len=10)(prompt, response, "f.jsonl, row 3")
    # the prompt is cut from the left first (keeping at least half of max_len) ...
    enc = data.Encoder(tok, max_len=10, truncate=True)
    p, r = enc(prompt, response)
    assert r == r_ids and p == p_ids[len(p_ids) - (10 - len(r_ids)):]
    assert len(enc.cut["prompt cut from the left"]) == 1 and "response cut from the right" not in enc.cut
    # ... then the response from the right
    enc = data.Encoder(tok, max_len=6, truncate=True)
    p, r = enc(prompt, response)
    assert p == p_ids[-3:] and r == r_ids[:3] and len(enc.cut["response cut from the right"]) == 1


def test_special_token_strings_in_rows_stay_text(micro):
    """A '</s>' or '<pad>' written in a row is text: no EOS, BOS or PAD id comes from it (PPO
    would take a literal <pad> in a prompt for padding), and it decodes back as written."""
    tok = loading.load_tokenizer(micro["base"])
    specials = {tok.eos_token_id, tok.pad_token_id, tok.bos_token_id}
    written = " ".join(tok.all_special_tokens)
    enc = data.Encoder(tok, 256)
    p, r = "\n\nHuman: say " + written + " ?\n\nAssistant:", " " + written + " ."
    prompt_ids, response_ids = enc(p, r)
    assert not specials & set(prompt_ids[1:]), prompt_ids  # [0]: the tokenizer's own BOS
    assert response_ids[-1] == tok.eos_token_id and not specials & set(response_ids[:-1])
    assert tok.decode(response_ids, skip_special_tokens=True) == r
    assert written in tok.decode(prompt_ids, skip_special_tokens=True)


def test_a_pair_cut_on_both_sides_is_one_row(micro, capsys):
    tok = loading.load_tokenizer(micro["base"])
    long = " restart the laptop and then restart it again and again ."
    pairs = [("\n\nHuman: how do i fix my laptop ?\n\nAssistant:", long, long + " no", "f.jsonl, row 1")]
    data.encode_pairs(tok, pairs, 8, True, "f.jsonl")
    assert "f.jsonl: 1 rows truncated (response cut from the right, --max_len 8)" in capsys.readouterr().out
