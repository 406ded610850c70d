"""modeling.py: what the two quantities every stage trains on are, and how a response is drawn.

    r_theta(x, y)   the reward model's score head read at the last real token of prompt + response
    log pi(y | x)   a causal LM's log-probabilities of the response tokens, summed
    y ~ pi(. | x)   one sampled response per prompt (`generate`)

written plainly first (`scores`, `rewards`, `sequence_logps`). Rows may be padded on the left
(PPO's prompts) or the right (the pairs): `positions` starts every row at position 0 on its first
real token, so padding changes nothing, and `last_index` finds each row's last real token.

The reward model and PPO's critic are a `ScalarModel`: the plain `scores`, run for speed in
groups of rows of about one length (the section at the end; tested equal to `scores`).
"""
import torch

import data
import distributed


def positions(mask):
    """Position ids that start at 0 on the first real token, so left padding changes nothing."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def last_index(mask):
    """Index of the last real token of each row, for left or right padding."""
    T = mask.shape[1]
    return T - 1 - mask.flip(-1).long().argmax(-1)


def scores(hf, ids, mask):
    """A one-label sequence-classification model's score at every position, [B, T]: its decoder's
    last hidden states through the score head (a linear map to one number). bf16 -> fp32."""
    h = hf.base_model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).last_hidden_state
    s = hf.score(h)[..., 0]
    return s.to(torch.promote_types(s.dtype, torch.float32))


def rewards(model, ids, mask, params=None):
    """r_theta(x, y) for each row: the score at the last real token. With `params` (name -> tensor),
    r at those parameters instead, through torch.func.functional_call (MetaRM's theta')."""
    s = model(ids, mask) if params is None else torch.func.functional_call(model, params, (ids, mask))
    return s.gather(1, last_index(mask)[:, None]).squeeze(1)


def sequence_logps(model, ids, mask, labels, params=None):
    """log pi(y|x) per row of a causal LM: the sum of the response tokens' log-probabilities
    (labels != -100; data.response_batch writes them). With `params` (name -> tensor), at those
    parameters (torch.func)."""
    kw = dict(input_ids=ids, attention_mask=mask)
    out = model(**kw) if params is None else torch.func.functional_call(model, params, (), kw)
    logits, target = out.logits[:, :-1], labels[:, 1:]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32; fp64 kept
    logp = torch.gather(logits.log_softmax(-1), 2, target.clamp(min=0)[..., None]).squeeze(-1)
    return (logp * (target != -100)).sum(-1)


@torch.no_grad()
def generate(policy, tok, prompt_ids, s, d):
    """y ~ pi(. | x): one sampled response per prompt (s: temperature, top_p, repetition_penalty,
    max_new_tokens). prompt_ids: list of id lists, left-padded here so that every response starts
    at the same column. Returns (query, response) tensors on d's device; the response is padded
    with PAD after its EOS, so PAD never hides a real EOS."""
    query, qmask = data.pad(prompt_ids, tok.pad_token_id, side="left")
    query, qmask = query.to(d.device), qmask.to(d.device)
    with distributed.autocast(d):
        out = distributed.unwrap(policy).generate(
            input_ids=query, attention_mask=qmask, do_sample=True, temperature=s.temperature,
            top_p=s.top_p, repetition_penalty=s.repetition_penalty, max_new_tokens=s.max_new_tokens,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            synced_gpus=d.world > 1 and d.strategy == "fsdp")  # FSDP: every process runs as many forwards
    return query, out[:, query.shape[1]:]


# ---------------------------------------------------------------------------------------------
# Speed: the same scores, the rows run in groups of about one length
# ---------------------------------------------------------------------------------------------
class ScalarModel(torch.nn.Module):
    """A Hugging Face sequence-classification model (one label) as a module: forward -> [B, T]
    scores, those of `scores`. `hf` is the plain model that save_pretrained writes. The reward
    model reads it at the last real token (rewards); PPO's critic at every response token.

    For speed, the rows go through the network in groups of `rows` of about one length, each
    group cut after its longest row's last real token: the padding behind it is work for nothing
    (about a third of a batch of the embedded task). Attention is causal, so the scores up to a
    row's last real token are those of the whole batch, to float rounding (after it, padding, they
    mean nothing, as before). rows = 0: the plain `scores` of the whole batch."""

    rows = 16

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids, attention_mask):
        if not self.rows:
            return scores(self.hf, input_ids, attention_mask)
        ends = last_index(attention_mask) + 1
        by_length = torch.argsort(ends, stable=True)
        parts = []
        for group in by_length.split(self.rows):
            T = int(ends[group].max())
            s = scores(self.hf, input_ids[group, :T], attention_mask[group, :T])
            parts.append(torch.nn.functional.pad(s, (0, input_ids.shape[1] - T)))
        # back in the given order: indexing makes a new tensor, not a view of the head's output
        # (FSDP2 warns that in-place changes to a view would bypass it)
        return torch.cat(parts)[torch.argsort(by_length)]
