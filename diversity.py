"""diversity.py: how varied a set of responses is (the paper's Table 3), each checked by hand in
tests/test_evaluate.py: Self-BLEU averaged over n = 2..5 (higher: less diverse) and distinct-n
(higher: more diverse), on whitespace tokens.
"""
import collections
import math


def ngrams(tokens, n):
    return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(hyp, best, ref_lengths, max_n):
    """Sentence BLEU of token list `hyp` with uniform weights over 1..max_n, as in Self-BLEU
    (Zhu et al. 2018): n-gram counts clipped by best[n][g], the largest count of n-gram g in any
    reference; the closest reference length for the brevity penalty; 'method 1' smoothing (a
    zero count becomes 0.1)."""
    log_p = 0.0
    for n in range(1, max_n + 1):
        counts = ngrams(hyp, n)
        clipped = sum(min(c, best[n][g]) for g, c in counts.items())
        log_p += math.log((clipped or 0.1) / max(1, sum(counts.values()))) / max_n
    c = len(hyp)
    r = min((abs(x - c), x) for x in ref_lengths)[1]
    bp = 1.0 if c > r else math.exp(1 - r / max(c, 1))
    return bp * math.exp(log_p)


class _Leave1Out(dict):
    """The largest count of each n-gram over all texts but one: the top two counts are kept
    with the owner of the top one, so each text's references cost nothing to build."""

    def __init__(self, counters, skip):
        super().__init__()
        self.counters, self.skip = counters, skip

    def __missing__(self, g):
        (c1, owner), c2 = self.counters[g]
        return c2 if owner == self.skip else c1


def self_bleu(texts, max_n):
    """Mean BLEU of each text against all the others (higher: less diverse)."""
    toks = [t.split() for t in texts]
    top = [None]
    for n in range(1, max_n + 1):  # per n-gram: (largest count, its text), second largest count
        t = {}
        for i, tk in enumerate(toks):
            for g, c in ngrams(tk, n).items():
                (c1, o1), c2 = t.get(g, ((0, -1), 0))
                t[g] = ((c, i), c1) if c > c1 else ((c1, o1), max(c2, c))
        top.append(t)
    lengths = [len(t) for t in toks]
    total = 0.0
    for i, tk in enumerate(toks):
        best = [None] + [_Leave1Out(top[n], i) for n in range(1, max_n + 1)]
        total += bleu(tk, best, lengths[:i] + lengths[i + 1:], max_n)
    return total / len(toks)


def distinct(texts, n):
    """Distinct n-grams over all n-grams of all texts (higher: more diverse)."""
    grams = collections.Counter()
    for t in texts:
        grams += ngrams(t.split(), n)
    return len(grams) / max(1, sum(grams.values()))


def diversity(texts):
    sb = {n: self_bleu(texts, n) for n in (2, 3, 4, 5)}
    return {"self_bleu": sum(sb.values()) / 4, **{f"self_bleu_{n}": v for n, v in sb.items()},
            "distinct_1": distinct(texts, 1), "distinct_2": distinct(texts, 2)}
