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
           sample.py, read by metarm.py
A local .jsonl/.json file is read here line by line; anything else (a parquet file, a hub name)
goes through `datasets.load_dataset`. Then tokens: prompt + response ids (Encoder), and the batches
the reward models read, X_t (pairs) and X_s (k responses per prompt).
"""
import json
import os
import unicodedata
from collections import Counter

import torch

from cli import UserError

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


class DataError(UserError):
    pass


class Problems:
    """Bad rows: an error naming file, row and problem, or (with skip=True) a count per problem,
    reported at the end. `detail` (what exactly was wrong in this row) is shown in the error but
    not used to group the counts."""

    def __init__(self, skip=False):
        self.skip, self.counts = skip, Counter()

    def __call__(self, where, problem, detail=None):
        if not self.skip:
            raise DataError(f"{where}: {problem}" + (f" ({detail})" if detail else ""))
        self.counts[problem] += 1

    def report(self, path):
        if self.counts:
            parts = ", ".join(f"{n} x {why}" for why, n in self.counts.items())
            print(f"{path}: skipped {sum(self.counts.values())} rows ({parts})", flush=True)


def _short(e):
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e).split(";")[0][:120]


def _surrogate(x):
    """True if a string in x holds a lone surrogate: JSON can spell one, UTF-8 cannot."""
    if isinstance(x, str):
        try:
            x.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(x, dict):
        return any(_surrogate(k) or _surrogate(v) for k, v in x.items())
    if isinstance(x, list):
        return any(_surrogate(v) for v in x)
    return False


def blank(text):
    """Nothing to read: only spaces, control or invisible format characters (zero-width space,
    joiners, BOM), or the HH template's markers around them."""
    for marker in (HUMAN, ASSISTANT):
        text = text.replace(marker, "")
    return all(c.isspace() or unicodedata.category(c) in ("Cf", "Cc", "Zs") for c in text)


def rows(path, problems):
    """(where, row) for every row of a data file, where = 'file, row N' (1-based). A line that
    is not UTF-8 or not JSON is a problem of that row."""
    if os.path.isfile(path) and path.endswith((".jsonl", ".json")):
        with open(path, "rb") as f:
            raw = f.read()
        if path.endswith(".json") and raw.lstrip().startswith(b"["):
            try:
                items = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON ({e})") from None
            except (ValueError, RecursionError) as e:
                raise DataError(f"{path}: not valid JSON ({_short(e)})") from None
            if not isinstance(items, list):
                raise DataError(f"{path}: not a JSON list of rows")
            for i, row in enumerate(items, 1):
                if _surrogate(row):
                    problems(f"{path}, row {i}", "not UTF-8 text", "a lone surrogate (\\ud800-\\udfff escape)")
                    continue
                yield f"{path}, row {i}", row
            return
        for i, line in enumerate(raw.split(b"\n"), 1):
            if not line.strip():
                continue
            where = f"{path}, row {i}"
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                problems(where, "not UTF-8 text", f"byte {line[e.start]:#04x} at column {e.start + 1}")
                continue
            except json.JSONDecodeError as e:
                problems(where, "not valid JSON", f"{e.msg} at column {e.colno}")
                continue
            except (ValueError, RecursionError) as e:  # a number of thousands of digits; nesting too deep
                problems(where, "not valid JSON", _short(e))
                continue
            if _surrogate(row):
                problems(where, "not UTF-8 text", "a lone surrogate (\\ud800-\\udfff escape)")
                continue
            yield where, row
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
        return problems(where, f"missing key {key!r}", f"keys: {sorted(row)}")
    if not isinstance(row[key], str):
        return problems(where, f"{key!r} should be a string", f"got {type(row[key]).__name__}")
    return row[key]


def as_prompt_text(text, where, problems):
    """An HH prompt as is; a plain-text prompt (PKU-SafeRLHF, TL;DR, Oasst1) as one human turn."""
    if blank(text):
        return problems(where, "empty prompt", "only spaces or invisible characters")
    if text.startswith(HUMAN):
        if not text.endswith(ASSISTANT):
            return problems(where, "a prompt that starts with '\\n\\nHuman:' must end with "
                                   "'\\n\\nAssistant:'", f"it ends {text[-60:]!r}")
        return text
    return f"{HUMAN} {text.strip()}{ASSISTANT}"


def split_transcript(text, where, problems, key="chosen"):
    """'\\n\\nHuman: q\\n\\nAssistant: a' -> ('\\n\\nHuman: q\\n\\nAssistant:', ' a')."""
    if not text.startswith(HUMAN) or ASSISTANT not in text:
        return problems(where, f"{key!r} lacks the '\\n\\nHuman: ...\\n\\nAssistant:' structure",
                        f"it starts {text[:60]!r}")
    cut = text.rindex(ASSISTANT) + len(ASSISTANT)
    if blank(text[:cut]):
        return problems(where, "empty prompt", "only spaces or invisible characters")
    return text[:cut], text[cut:]


def tldr_prompt(info, where, problems):
    """A TL;DR post as the human turn of a summarisation request."""
    post = info.get("post") or info.get("article")
    if not isinstance(post, str) or blank(post):
        return problems(where, "a TL;DR row needs 'info' with a non-empty 'post' (or 'article')")
    return (f"{HUMAN} Summarize this Reddit post.\nSUBREDDIT: r/{info.get('subreddit') or ''}\n"
            f"TITLE: {info.get('title') or ''}\nPOST: {post}{ASSISTANT}")


def not_object(row, where, problems):
    return problems(where, "not a JSON object", f"got {str(row)[:60]!r}")


def row_to_pair(row, where, problems, pku_preference="safer"):
    """(prompt, chosen response, rejected response) from HH-RLHF, TL;DR comparisons
    (openai/summarize_from_feedback) or PKU-SafeRLHF rows."""
    if not isinstance(row, dict):
        return not_object(row, where, problems)
    if "summaries" in row and "choice" in row:  # TL;DR comparisons
        s, c = row["summaries"], row["choice"]
        if not (isinstance(s, list) and len(s) == 2 and c in (0, 1) and isinstance(row.get("info"), dict)
                and all(isinstance(x, dict) and isinstance(x.get("text"), str) for x in s)):
            return problems(where, "a TL;DR comparison needs 'info', two 'summaries' with a 'text' "
                                   "each and 'choice' 0 or 1")
        prompt = tldr_prompt(row["info"], where, problems)
        return prompt and (prompt, " " + s[c]["text"].strip(), " " + s[1 - c]["text"].strip())
    if "response_0" in row:  # PKU-SafeRLHF
        key = f"{pku_preference}_response_id"
        p, best = _text(row, "prompt", where, problems), row.get(key)
        if p is None:
            return None
        if best not in (0, 1):
            return problems(where, f"missing or bad {key!r}", f"got {best!r}")
        responses = [_text(row, f"response_{i}", where, problems) for i in (0, 1)]
        prompt = None if None in responses else as_prompt_text(p, where, problems)
        return prompt and (prompt, " " + responses[best].strip(), " " + responses[1 - best].strip())
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
        return not_object(row, where, problems)
    if "message_id" in row and "role" in row:  # Oasst1
        if row["role"] != "prompter" or row.get("parent_id"):
            problems.counts["oasst1 message that does not start a conversation"] += 1
            return None
        text = _text(row, "text", where, problems)
        return None if text is None else as_prompt_text(text, where, problems)
    if "info" in row and isinstance(row["info"], dict):  # TL;DR
        return tldr_prompt(row["info"], where, problems)
    if "prompt" in row:
        p = _text(row, "prompt", where, problems)
        return None if p is None else as_prompt_text(p, where, problems)
    if "chosen" in row:
        chosen = _text(row, "chosen", where, problems)
        pr = None if chosen is None else split_transcript(chosen, where, problems)
        return pr and pr[0]
    return problems(where, "missing key 'prompt'", f"keys: {sorted(row)}")


def row_to_sft(row, where, problems):
    """(prompt, response) from {prompt, response}, TL;DR SFT {prompt, label} or HH-RLHF rows."""
    if not isinstance(row, dict):
        return not_object(row, where, problems)
    if "prompt" not in row and "chosen" in row:
        chosen = _text(row, "chosen", where, problems)
        return None if chosen is None else split_transcript(chosen, where, problems)
    p = _text(row, "prompt", where, problems)
    if p is None:
        return None
    r = _text(row, "label" if "label" in row and "response" not in row else "response", where, problems)
    p = None if r is None else as_prompt_text(p, where, problems)
    return p and (p, r if r.startswith(" ") else " " + r)


def nonempty(response, where, problems, what="response"):
    if blank(response):
        return problems(where, f"empty {what}")
    return response


def load_pairs(path, skip_bad=False, pku_preference="safer"):
    """[(prompt, chosen_response, rejected_response, where)]: HH-RLHF, TL;DR comparisons or
    PKU-SafeRLHF rows."""
    problems, out = Problems(skip_bad), []
    for where, row in rows(path, problems):
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
    for where, row in rows(path, problems):
        pr = row_to_sft(row, where, problems)
        if pr and nonempty(pr[1], where, problems):
            out.append((*pr, where))
    return _done(path, out, problems)


def load_prompts(path, skip_bad=False):
    """[(prompt, where)] from prompt rows of any supported schema."""
    problems, out = Problems(skip_bad), []
    for where, row in rows(path, problems):
        p = row_to_prompt(row, where, problems)
        if p is not None:
            out.append((p, where))
    return _done(path, out, problems)


def load_meta(path, skip_bad=False):
    """[(prompt, [k responses], where)]: the meta data set S of MetaRM, the same k in every row.
    Rows of another k than the first row's are an error; skipping, the rows of the most common k
    are kept and the others counted."""
    problems, good = Problems(skip_bad), []
    for where, row in rows(path, problems):
        if not isinstance(row, dict):
            not_object(row, where, problems)
            continue
        p = _text(row, "prompt", where, problems)
        rs = row.get("responses")
        p = None if p is None else as_prompt_text(p, where, problems)
        if p is None:
            continue
        if not isinstance(rs, list) or len(rs) < 2 or not all(isinstance(r, str) for r in rs):
            problems(where, "'responses' must be a list of at least 2 strings")
            continue
        good.append((p, rs, where))
    ks = Counter(len(rs) for _, rs, _ in good)
    k = ks.most_common(1)[0][0] if skip_bad and ks else (len(good[0][1]) if good else None)
    out = []
    for p, rs, where in good:
        if len(rs) != k:
            problems(where, f"has another number of responses than the {'most common' if skip_bad else 'first'} "
                            f"rows' {k}", f"{len(rs)}")
        else:
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
        self.tok, self.max_len, self.truncate = tok, max_len, truncate
        self.cut = {}  # why -> the rows cut so (a pair's two sides are one row)
        self.calls = 0

    def prompt(self, prompt):
        # split_special_tokens: a "</s>" or "<pad>" written in a row is text, tokenized as text;
        # only the encoder itself puts BOS, EOS and PAD ids in a sequence
        return self.tok(prompt, split_special_tokens=True)["input_ids"]

    def __call__(self, prompt, response, where="", eos=True):
        self.calls += 1
        p = self.prompt(prompt)
        r = (self.tok(response, add_special_tokens=False, split_special_tokens=True)["input_ids"]
             + ([self.tok.eos_token_id] if eos else []))
        if len(p) + len(r) > self.max_len:
            if not self.truncate:
                raise DataError(f"{where}: {len(p) + len(r)} tokens, more than --max_len "
                                f"{self.max_len}; raise --max_len, or pass --truncate true to cut "
                                "long rows (counted and reported)")
            keep = min(len(p), max(self.max_len - len(r), self.max_len // 2))
            row = where or f"call {self.calls}"
            if keep < len(p):
                self.cut.setdefault("prompt cut from the left", set()).add(row)
            p = p[len(p) - keep:]
            if len(p) + len(r) > self.max_len:
                self.cut.setdefault("response cut from the right", set()).add(row)
            r = r[:self.max_len - len(p)]
        return p, r

    def report(self, what):
        for why, cut in self.cut.items():
            n = len(cut)
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


# ---------------------------------------------------------------------------------------------
# Batches: X_t (preference pairs) and X_s (k responses per prompt), as the reward models read them
# ---------------------------------------------------------------------------------------------
def encode_prompts(tok, prompts, max_len, truncate, path=""):
    """Prompt texts -> token-id lists, as a policy is given them. Longer than max_len: an error
    naming the prompt, or (truncate=True) cut from the left, keeping the end of the dialogue where
    the response starts; the cuts are reported under `path`."""
    enc = Encoder(tok, max_len)
    ids = [enc.prompt(p) for p in prompts]
    long = [i for i, x in enumerate(ids) if len(x) > max_len]
    if long and not truncate:
        raise DataError(f"{path}: a prompt of {len(ids[long[0]])} tokens is longer than --max_prompt_len "
                        f"{max_len}: {prompts[long[0]][:60]!r}; raise it or pass --truncate true")
    if long:
        print(f"{path}: {len(long)} prompts truncated (cut from the left, --max_prompt_len {max_len})", flush=True)
    return [x[-max_len:] for x in ids]


def encode_pairs(tok, pairs, max_len, truncate, path="", joined=True):
    """Pairs -> [(chosen, rejected)], each side prompt + response as one id list (a reward model's
    rows), or with joined=False as (prompt_ids, response_ids) (a policy's: DPO scores the response
    tokens alone); cuts are reported under `path`."""
    enc = Encoder(tok, max_len, truncate)
    side = (lambda p, r: p + r) if joined else (lambda p, r: (p, r))
    out = [(side(*enc(p, w, where)), side(*enc(p, l, where))) for p, w, l, where in pairs]
    enc.report(path)
    return out


def response_batch(examples, pad_id):
    """[(prompt_ids, response_ids)] -> input_ids, attention_mask, labels (right padded; labels are
    -100 on prompt and padding tokens, the token itself on response tokens)."""
    ids, mask = pad([p + r for p, r in examples], pad_id, side="right")
    labels = torch.full_like(ids, -100)
    for i, (p, r) in enumerate(examples):
        labels[i, len(p):len(p) + len(r)] = torch.tensor(r)
    return ids, mask, labels


def pair_batch(examples, pad_id, device):
    """[(chosen_ids, rejected_ids)] -> X_t, one right-padded batch: n chosen rows, then n rejected rows."""
    ids, mask = pad([c for c, _ in examples] + [r for _, r in examples], pad_id)
    return ids.to(device), mask.to(device)


def encode_meta(tok, meta, max_len, path=""):
    """Meta rows -> [[k token-id lists]] (prompt + response each). Policy samples longer than
    max_len are cut, not fatal; the cuts are reported under `path`."""
    enc = Encoder(tok, max_len, truncate=True)
    out = [[sum(enc(p, s, where), []) for s in rs] for p, rs, where in meta]
    enc.report(path)
    return out


def meta_batch(samples, pad_id, device):
    """Encoded meta rows -> (X_s, k): m*k right-padded rows, the k responses of each prompt together."""
    ids, mask = pad([seq for row in samples for seq in row], pad_id)
    return (ids.to(device), mask.to(device)), len(samples[0])


def decode_responses(tok, response):
    """Response ids -> text, cut at the first EOS, without special tokens."""
    texts = []
    for row in response.tolist():
        if tok.eos_token_id in row:
            row = row[:row.index(tok.eos_token_id)]
        texts.append(tok.decode(row, skip_special_tokens=True))
    return texts
