"""Reading the data every stage uses, with errors that name the file, the row and the problem.

All files use the HH-RLHF schema, so the embedded task and the real data sets share this code:
  pairs    {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: good", "rejected": "...same prompt... bad"}
  sft      {"prompt": "\\n\\nHuman: ...\\n\\nAssistant:", "response": " ..."}  (or an HH "chosen" row)
  prompts  {"prompt": "\\n\\nHuman: ...\\n\\nAssistant:"}                  (or an HH "chosen" row)
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
    import datasets
    name, _, split = path.partition(":")  # "Anthropic/hh-rlhf:test" picks a split
    try:
        if os.path.isfile(name):
            ext = {"parquet": "parquet", "csv": "csv"}.get(name.rsplit(".", 1)[-1], "json")
            ds = datasets.load_dataset(ext, data_files=name, split=split or "train")
        else:
            ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # datasets raises many types; all mean "cannot read this"
        raise DataError(f"cannot load data set {path!r}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}") from None
    for i, row in enumerate(ds, 1):
        yield f"{path}, row {i}", row


def field(row, key, where, problems, kind=str):
    if not isinstance(row, dict):
        return problems(where, f"not a JSON object: {str(row)[:60]!r}")
    if key not in row:
        return problems(where, f"missing key {key!r} (keys: {sorted(row)})")
    if not isinstance(row[key], kind):
        return problems(where, f"{key!r} should be a {kind.__name__}, got {type(row[key]).__name__}")
    return row[key]


def split_transcript(text, where, problems, key="chosen"):
    """'\\n\\nHuman: q\\n\\nAssistant: a' -> ('\\n\\nHuman: q\\n\\nAssistant:', ' a')."""
    if not text.startswith(HUMAN) or ASSISTANT not in text:
        return problems(where, f"{key!r} lacks the '\\n\\nHuman: ...\\n\\nAssistant:' structure: "
                               f"{text[:60]!r}")
    cut = text.rindex(ASSISTANT) + len(ASSISTANT)
    return text[:cut], text[cut:]


def check_prompt(prompt, where, problems):
    if not prompt.startswith(HUMAN) or not prompt.endswith(ASSISTANT):
        return problems(where, "a prompt must start with '\\n\\nHuman:' and end with "
                               f"'\\n\\nAssistant:': {prompt[:60]!r}")
    return prompt


def nonempty(response, where, problems, what="response"):
    if not response.strip():
        return problems(where, f"empty {what}")
    return response


def load_pairs(path, skip_bad=False):
    """[(prompt, chosen_response, rejected_response, where)] from an HH-RLHF-schema file."""
    problems, out = Problems(skip_bad), []
    for where, row in rows(path):
        chosen, rejected = (field(row, k, where, problems) for k in ("chosen", "rejected"))
        if chosen is None or rejected is None:
            continue
        c = split_transcript(chosen, where, problems, "chosen")
        r = split_transcript(rejected, where, problems, "rejected")
        if c is None or r is None:
            continue
        if c[0] != r[0]:
            problems(where, "chosen and rejected do not share the same prompt")
        elif chosen == rejected:
            problems(where, "chosen and rejected are identical")
        elif nonempty(c[1], where, problems, "chosen response") is not None and \
                nonempty(r[1], where, problems, "rejected response") is not None:
            out.append((c[0], c[1], r[1], where))
    return _done(path, out, problems)


def load_sft(path, skip_bad=False):
    """[(prompt, response, where)] from {"prompt", "response"} rows or HH-RLHF rows (their "chosen")."""
    problems, out = Problems(skip_bad), []
    for where, row in rows(path):
        if isinstance(row, dict) and "prompt" not in row and "chosen" in row:
            pr = split_transcript(field(row, "chosen", where, problems) or "", where, problems)
        else:
            p, r = field(row, "prompt", where, problems), field(row, "response", where, problems)
            pr = None if p is None or r is None else (check_prompt(p, where, problems), r)
        if pr is not None and pr[0] is not None and nonempty(pr[1], where, problems) is not None:
            out.append((*pr, where))
    return _done(path, out, problems)


def load_prompts(path, skip_bad=False):
    """[(prompt, where)] from {"prompt"} rows or HH-RLHF rows (the prompt of their "chosen")."""
    problems, out = Problems(skip_bad), []
    for where, row in rows(path):
        if isinstance(row, dict) and "prompt" not in row and "chosen" in row:
            pr = split_transcript(field(row, "chosen", where, problems) or "", where, problems)
            p = pr and pr[0]
        else:
            p = field(row, "prompt", where, problems)
            p = p and check_prompt(p, where, problems)
        if p:
            out.append((p, where))
    return _done(path, out, problems)


def load_meta(path, skip_bad=False):
    """[(prompt, [k responses], where)]: the meta data set S of MetaRM (same k in every row)."""
    problems, out, k = Problems(skip_bad), [], None
    for where, row in rows(path):
        p, rs = field(row, "prompt", where, problems), field(row, "responses", where, problems, list)
        if p is None or rs is None or check_prompt(p, where, problems) is None:
            continue
        if len(rs) < 2 or not all(isinstance(r, str) for r in rs):
            problems(where, "'responses' must be a list of at least 2 strings")
            continue
        if k is not None and len(rs) != k:
            problems(where, f"has {len(rs)} responses, earlier rows have {k}")
            continue
        k = len(rs)
        out.append((p, rs, where))
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
