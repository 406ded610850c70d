"""loading.py: Hugging Face models and tokenizers in and out, with one-line errors: a folder that
does not exist, is an unfinished run, holds no weights, non-finite weights or another
tokenizer; the policy (a causal LM) and the reward model (sequence classification with one
label, wrapped in modeling.ScalarModel); saving a plain `save_pretrained` folder from one
process or from FSDP2 shards.
"""
import json
import os
import shutil

import torch

from cli import UserError, read_json
from distributed import barrier, broadcast_object, unwrap
from modeling import ScalarModel
from run_folder import is_done


def check_model_path(name):
    """Fail early, in one line, on a folder that does not exist, is an unfinished run or holds
    no model."""
    if os.path.isdir(name):
        if os.path.exists(os.path.join(name, "args.json")) and not is_done(name):
            raise UserError(f"{name} is a run folder without its DONE marker: that stage did not "
                            "finish; run it again to resume it")
        if not os.path.exists(os.path.join(name, "config.json")):
            raise UserError(f"{name} has no config.json: not a Hugging Face model folder")
        return
    first = name.split("/")[0]
    if name.startswith(("/", ".", "~")) or os.path.exists(first) or name.count("/") > 1:
        raise UserError(f"model folder {name} does not exist")


def model_kind(name):
    """'reward model', 'causal LM' or None (unknown: a hub name, or no architectures listed), from
    the folder's config.json."""
    path = os.path.join(name, "config.json")
    if not os.path.isfile(path):
        return None
    archs = " ".join(read_json(path).get("architectures") or [])
    if "ForSequenceClassification" in archs:
        return "reward model"
    return "causal LM" if "ForCausalLM" in archs else None


def _from_pretrained(cls, name, **kw):
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # no per-load progress bar, no report on the new score head:
    hf_logging.disable_progress_bar()  # the stages say what they load, in one line
    check_model_path(name)
    local = os.path.isdir(name)
    if local and cls.__name__ != "AutoTokenizer":
        read_json(os.path.join(name, "config.json"))
        if not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(name)):
            raise UserError(f"{name} has a config.json but no weights (*.safetensors): the stage "
                            "that wrote it did not finish saving; delete it and run that stage again")
    try:
        model = cls.from_pretrained(name, **kw)
    except Exception as e:  # transformers, safetensors and the hub raise many types
        first = (str(e).splitlines() or [""])[0][:200]
        if local:
            raise UserError(f"cannot load {name} ({type(e).__name__}: {first}): the folder is damaged; "
                            "delete it and run the stage that wrote it again") from None
        if not isinstance(e, OSError):
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise UserError(f"cannot load {name!r}: it is not a local folder and {why} "
                        f"({first}). Download it where there is network access and pass the "
                        "local folder instead") from None
    if isinstance(model, torch.nn.Module):
        for pname, p in model.named_parameters():
            if not torch.isfinite(p).all():
                raise UserError(f"{name} holds non-finite weights (NaN or inf, first in {pname}): "
                                "it was saved by a run that diverged; train it again")
    return model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_tokenizer(name, tok):
    """Every model loaded beside a tokenizer comes through here (load_causal_lm,
    load_reward_model): a folder that carries a tokenizer of its own must carry `tok`'s, or its
    token ids would mean other things. A hub name or a folder without tokenizer files is taken
    as it is."""
    source = getattr(tok, "name_or_path", "")
    if (not os.path.isdir(name) or not any(os.path.exists(os.path.join(name, f)) for f in TOKENIZER_FILES)
            or (source and os.path.realpath(source) == os.path.realpath(name))):
        return
    same_tokenizer(tok, source or "the tokenizer", load_tokenizer(name), name)


def same_tokenizer(tok, name, other, other_name):
    """Refuse two models whose tokenizers differ (vocabulary or special tokens): their token ids
    would mean different things to each other."""
    specials = lambda t: (t.pad_token_id, t.eos_token_id, t.bos_token_id, len(t))
    if specials(tok) != specials(other) or tok.get_vocab() != other.get_vocab():
        raise UserError(f"the tokenizers of {name} and {other_name} differ (vocabulary or special "
                        "tokens): both models must come from the same SFT model")


def no_dropout(model):
    """Dropout off everywhere: RLHF log-probabilities and rewards must be deterministic."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                "summary_first_dropout", "classifier_dropout"):
        if getattr(model.config, key, None):
            setattr(model.config, key, 0.0)
    return model


def load_tokenizer(name):
    from transformers import AutoTokenizer
    tok = _from_pretrained(AutoTokenizer, name)
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        # Llama-2 has no PAD; a PAD equal to EOS would make a real EOS look like padding.
        tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def load_causal_lm(name, tok):
    from transformers import AutoModelForCausalLM
    if model_kind(name) == "reward model":
        raise UserError(f"{name} is a reward model (sequence classification), not a causal LM: "
                        "pass a policy (an SFT, DPO or PPO folder)")
    check_tokenizer(name, tok)
    model = _from_pretrained(AutoModelForCausalLM, name, dtype=torch.float32)
    return _fit_vocab(no_dropout(model), tok)


def load_reward_model(name, tok, trained=True):
    """A one-label sequence-classification model: a trained reward model (a folder that
    reward_model.py or metarm.py wrote: sequence classification, with reward_stats.json), or,
    with trained=False, a new score head on an SFT model."""
    from transformers import AutoModelForSequenceClassification
    kind = model_kind(name)
    if trained and (kind != "reward model" or not os.path.isfile(os.path.join(name, "reward_stats.json"))):
        raise UserError(
            f"{name} is not a reward model ({kind or 'no sequence-classification config.json'}"
            f"{'' if kind != 'reward model' else ', no reward_stats.json'}): pass a folder that "
            "reward_model.py or metarm.py wrote (for an outside RM, add a reward_stats.json "
            '{"mean": 0.0, "std": 1.0})')
    if not trained and kind == "reward model":
        raise UserError(f"{name} is a reward model, not the SFT model a new reward model "
                        "starts from (bilevel_rm.py --init_rm starts from a reward model)")
    check_tokenizer(name, tok)
    hf = _from_pretrained(AutoModelForSequenceClassification, name, num_labels=1, dtype=torch.float32)
    if not hasattr(hf, "score"):
        raise UserError(f"{type(hf).__name__} has no 'score' head; use a decoder model "
                        "(Llama, Mistral, Qwen2, GPT-2, ...)")
    return ScalarModel(_fit_vocab(no_dropout(hf), tok))


def _fit_vocab(model, tok):
    if model.get_input_embeddings().weight.shape[0] < len(tok):
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id = tok.pad_token_id
    return model


def save_model(model, tok, out_dir, d, extra=None):
    """Gather the full weights and save a plain save_pretrained folder (rank 0 writes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    inner = unwrap(model)
    hf = getattr(inner, "hf", inner)
    if hf is not inner:  # a wrapper such as ScalarModel: strip its prefix
        sd = {k[len("hf."):]: v for k, v in sd.items() if k.startswith("hf.")}
    bad = broadcast_object(next((k for k, v in sd.items() if not torch.isfinite(v).all()), None))
    if bad:
        raise UserError(f"{out_dir}: the weights to save are not finite (NaN or inf, first in {bad}); "
                        "nothing saved, no DONE written: lower the learning rate (or eta) and run again")
    if d.main:
        tmp = os.path.join(out_dir, "model.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        hf.save_pretrained(tmp, state_dict=sd)
        tok.save_pretrained(tmp)
        for name, obj in (extra or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(obj, f, indent=2)
        for name in sorted(os.listdir(tmp), key=lambda n: n == "DONE"):  # a DONE marker last
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        os.rmdir(tmp)
    barrier()
