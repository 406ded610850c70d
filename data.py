"""Reading the data every stage uses, with errors that name the file, the row and the problem.

Everything is turned into HH-RLHF transcripts, so the embedded task and the real data sets share
the stages' code:
  pairs    {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: good", "rejected": "...same prompt... bad"}
           (HH-RLHF), or TL;DR comparisons (openai/summarize_from_feedback), or PKU-SafeRLHF rows
  sft      {"prompt": "\\n\\nHuman: ...\\n\\nAssistant:", "response": " ..."}, TL;DR {"prompt", "label"},
           or an HH-RLHF row (its "chosen")
  prompts  {"prompt": ...}, an HH-RLHF row, a TL;DR row, a PKU-SafeRLHF row, or Oasst1 messages
           (conversation starts only); a plain-text prompt becomes one human turn
  meta     {"prompt": "...", "responses": [" ...", " ...", ...]}   k responses, as written by
           `ppo.py --sample_only`, read by metarm.py
A local .jsonl/.json file is read here line by line; anything else (a parquet file, a hub name)
goes through `datasets.load_dataset`.
"""
import json
import os
from collections import Counter

import torch

from runtime import UserError

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


class DataError(UserError):
    pass


class Problems:
    """Bad rows: an error naming file and row, or (with skip=True) a count reported at the end."""

    def __init__(self, skip=False):
        self.skip, self.counts = skip, Counter()

    def __call__(self, where, problem):
        if not self.skip:
            raise DataError(f"{where}: {problem}")
        self.counts[problem.split(":")[0]] += 1

    def report(self, path):
        if self.counts:
            parts = ", ".join(f"{n} x {why}" for why, n in self.counts.items())
            print(f"{path}: skipped {sum(self.counts.values())} rows ({parts})", flush=True)


def rows(path):
    """(where, row) for every row of a data file, where = 'file, row N' (1-based)."""
    if os.path.isfile(path) and path.endswith((".jsonl", ".json")):
        with open(path) as f:
            text = f.read()
        if path.endswith(".json") and text.lstrip().startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON ({e})") from None
            for i, row in enumerate(items, 1):
                yield f"{path}, row {i}", row
            return
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, row {i}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield f"{path}, row {i}", row
        return
    if not os.path.exists(path) and (path.startswith(("/", ".")) or os.path.exists(path.split("/")[0])):
        raise DataError(f"data file {path} does not exist")
    yield from _hf_rows(path)


def _hf_rows(path):
    """Rows through datasets.load_dataset. path: a parquet/json/csv file, or a hub name written
    NAME[#CONFIG][@DATA_DIR][:SPLIT], e.g. "Anthropic/hh-rlhf@harmless-base:test" or
    "openai/summarize_from_feedback#comparisons:validation"."""
    import datasets
    name, _, split = path.partition(":")
    name, _, data_dir = name.partition("@")
    name, _, config = name.partition("#")
    try:
        if os.path.isfile(name):
            ext = {"parquet": "parquet", "csv": "csv"}.get(name.rsplit(".", 1)[-1], "json")
            ds = datasets.load_dataset(ext, data_files=name, split=split or "train")
        else:
            ds = datasets.load_dataset(name, config or None, data_dir=data_dir or None, split=split or "train")
    except Exception as e:  # datasets raises many types; all mean "cannot read this"
        raise DataError(f"cannot load data set {path!r}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}") from None
    for i, row in enumerate(ds, 1):
        yield f"{path}, row {i}", row


# ---------------------------------------------------------------------------------------------
# Rows of any supported schema -> HH-RLHF transcripts. Each returns None after reporting a
# problem (an error, or a count when skipping).
# ---------------------------------------------------------------------------------------------
def _text(row, key, where, problems):
    if key not in row:
        return problems(where, f"missing key {key!r} (keys: {sorted(row)})")
    if not isinstance(row[key], str):
        return problems(where, f"{key!r} should be a string, got {type(row[key]).__name__}")
    return row[key]


def as_prompt_text(text, where, problems):
    """An HH prompt as is; a plain-text prompt (PKU-SafeRLHF, TL;DR, Oasst1) as one human turn."""
    if not text.strip():
        return problems(where, "empty prompt")
    if text.startswith(HUMAN):
        if not text.endswith(ASSISTANT):
            return problems(where, f"a prompt that starts with '\\n\\nHuman:' must end with "
                                   f"'\\n\\nAssistant:': {text[-60:]!r}")
        return text
    return f"{HUMAN} {text.strip()}{ASSISTANT}"


def split_transcript(text, where, problems, key="chosen"):
    """'\\n\\nHuman: q\\n\\nAssistant: a' -> ('\\n\\nHuman: q\\n\\nAssistant:', ' a')."""
    if not text.startswith(HUMAN) or ASSISTANT not in text:
        return problems(where, f"{key!r} lacks the '\\n\\nHuman: ...\\n\\nAssistant:' structure: "
                               f"{text[:60]!r}")
    cut = text.rindex(ASSISTANT) + len(ASSISTANT)
    return text[:cut], text[cut:]


def tldr_prompt(info):
    """A TL;DR post as the human turn of a summarisation request."""
    return (f"{HUMAN} Summarize this Reddit post.\nSUBREDDIT: r/{info.get('subreddit') or ''}\n"
            f"TITLE: {info.get('title') or ''}\nPOST: {info.get('post') or info.get('article') or ''}{ASSISTANT}")


def row_to_pair(row, where, problems, pku_preference="safer"):
    """(prompt, chosen response, rejected response) from HH-RLHF, TL;DR comparisons
    (openai/summarize_from_feedback) or PKU-SafeRLHF rows."""
    if not isinstance(row, dict):
        return problems(where, f"not a JSON object: {str(row)[:60]!r}")
    if "summaries" in row and "choice" in row:  # TL;DR comparisons
        s, c = row["summaries"], row["choice"]
        if not (isinstance(s, list) and len(s) == 2 and c in (0, 1) and isinstance(row.get("info"), dict)):
            return problems(where, "a TL;DR comparison needs 'info', two 'summaries' and 'choice' 0 or 1")
        return tldr_prompt(row["info"]), " " + s[c]["text"].strip(), " " + s[1 - c]["text"].strip()
    if "response_0" in row:  # PKU-SafeRLHF
        key = f"{pku_preference}_response_id"
        p, best = _text(row, "prompt", where, problems), row.get(key)
        if p is None or best not in (0, 1):
            return None if p is None else problems(where, f"missing or bad {key!r}")
        return (as_prompt_text(p, where, problems), " " + row[f"response_{best}"].strip(),
                " " + row[f"response_{1 - best}"].strip())
    chosen, rejected = _text(row, "chosen", where, problems), None
    if chosen is not None:
        rejected = _text(row, "rejected", where, problems)
    if chosen is None or rejected is None:
        return None
    c = split_transcript(chosen, where, problems, "chosen")
    r = c and split_transcript(rejected, where, problems, "rejected")
    if not c or not r:
        return None
    if c[0] != r[0]:
        return problems(where, "chosen and rejected do not share the same prompt")
    return c[0], c[1], r[1]


def row_to_prompt(row, where, problems):
    """A prompt from {prompt}, HH-RLHF, TL;DR (comparisons or SFT), PKU-SafeRLHF or Oasst1 rows.
    Oasst1 is a message tree: only conversation starts (a prompter message without a parent) are
    prompts; every other message is counted as skipped, never an error."""
    if not isinstance(row, dict):
        return problems(where, f"not a JSON object: {str(row)[:60]!r}")
    if "message_id" in row and "role" in row:  # Oasst1
        if row["role"] != "prompter" or row.get("parent_id"):
            problems.counts["oasst1 message that does not start a conversation"] += 1
            return None
        text = _text(row, "text", where, problems)
        return text and as_prompt_text(text, where, problems)
    if "info" in row and isinstance(row["info"], dict):  # TL;DR
        return tldr_prompt(row["info"])
    if "prompt" in row:
        p = _text(row, "prompt", where, problems)
        return p and as_prompt_text(p, where, problems)
    if "chosen" in row:
        chosen = _text(row, "chosen", where, problems)
        pr = chosen and split_transcript(chosen, where, problems)
        return pr and pr[0]
    return problems(where, f"missing key 'prompt' (keys: {sorted(row)})")


def row_to_sft(row, where, problems):
    """(prompt, response) from {prompt, response}, TL;DR SFT {prompt, label} or HH-RLHF rows."""
    if not isinstance(row, dict):
        return problems(where, f"not a JSON object: {str(row)[:60]!r}")
    if "prompt" not in row and "chosen" in row:
        chosen = _text(row, "chosen", where, problems)
        return chosen and split_transcript(chosen, where, problems)
    p = _text(row, "prompt", where, problems)
    if p is None:
        return None
    r = _text(row, "label" if "label" in row and "response" not in row else "response", where, problems)
    p = r is not None and as_prompt_text(p, where, problems)
    return p and (p, r if r.startswith(" ") else " " + r)


def nonempty(response, where, problems, what="response"):
    if not response.strip():
        return problems(where, f"empty {what}")
    return response


def load_pairs(path, skip_bad=False, pku_preference="safer"):
    """[(prompt, chosen_response, rejected_response, where)]: HH-RLHF, TL;DR comparisons or
    PKU-SafeRLHF rows."""
    problems, out = Problems(skip_bad), []
    for where, row in rows(path):
        pair = row_to_pair(row, where, problems, pku_preference)
        if pair is None or pair[0] is None:
            continue
        p, c, r = pair
        if c == r:
            problems(where, "chosen and rejected are identical")
        elif nonempty(c, where, problems, "chosen response") and nonempty(r, where, problems, "rejected response"):
            out.append((p, c, r, where))
    return _done(path, out, problems)


def load_sft(path, skip_bad=False):
    """[(prompt, response, where)] from {prompt, response}, TL;DR {prompt, label} or HH-RLHF rows."""
    problems, out = Problems(skip_bad), []
    for where, row in rows(path):
        pr = row_to_sft(row, where, problems)
        if pr and pr[0] and nonempty(pr[1], where, problems):
            out.append((*pr, where))
    return _done(path, out, problems)


def load_prompts(path, skip_bad=False):
    """[(prompt, where)] from prompt rows of any supported schema."""
    problems, out = Problems(skip_bad), []
    for where, row in rows(path):
        p = row_to_prompt(row, where, problems)
        if p:
            out.append((p, where))
    return _done(path, out, problems)


def load_meta(path, skip_bad=False):
    """[(prompt, [k responses], where)]: the meta data set S of MetaRM (same k in every row)."""
    problems, out, k = Problems(skip_bad), [], None
    for where, row in rows(path):
        if not isinstance(row, dict):
            problems(where, f"not a JSON object: {str(row)[:60]!r}")
            continue
        p = _text(row, "prompt", where, problems)
        rs = row.get("responses")
        if p is None or as_prompt_text(p, where, problems) is None:
            continue
        if not isinstance(rs, list) or len(rs) < 2 or not all(isinstance(r, str) for r in rs):
            problems(where, "'responses' must be a list of at least 2 strings")
            continue
        if k is not None and len(rs) != k:
            problems(where, f"has {len(rs)} responses, earlier rows have {k}")
            continue
        k = len(rs)
        out.append((as_prompt_text(p, where, problems), rs, where))
    return _done(path, out, problems)


def _done(path, out, problems):
    problems.report(path)
    if not out:
        raise DataError(f"{path}: no usable rows")
    return out


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------
class Encoder:
    """prompt + response -> token ids. The prompt and the response are tokenized separately and
    joined, exactly as a policy generates a response after the prompt's tokens; EOS ends every
    response. Longer than max_len: an error naming the row, or (truncate=True) the prompt is cut
    from the left, then the response from the right, and the cuts are counted and reported."""

    def __init__(self, tok, max_len, truncate=False):
        self.tok, self.max_len, self.truncate, self.cut = tok, max_len, truncate, Counter()

    def prompt(self, prompt):
        return self.tok(prompt)["input_ids"]

    def __call__(self, prompt, response, where="", eos=True):
        p = self.prompt(prompt)
        r = self.tok(response, add_special_tokens=False)["input_ids"] + ([self.tok.eos_token_id] if eos else [])
        if len(p) + len(r) > self.max_len:
            if not self.truncate:
                raise DataError(f"{where}: {len(p) + len(r)} tokens, more than --max_len "
                                f"{self.max_len}; raise --max_len, or pass --truncate true to cut "
                                "long rows (counted and reported)")
            keep = min(len(p), max(self.max_len - len(r), self.max_len // 2))
            self.cut["prompt cut from the left"] += keep < len(p)
            p = p[len(p) - keep:]
            self.cut["response cut from the right"] += len(p) + len(r) > self.max_len
            r = r[:self.max_len - len(p)]
        return p, r

    def report(self, what):
        for why, n in self.cut.items():
            if n:
                print(f"{what}: {n} rows truncated ({why}, --max_len {self.max_len})", flush=True)


def pad(seqs, pad_id, side="right"):
    """List of id lists -> (input_ids, attention_mask), padded on `side`."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(n - len(s), n)
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask
