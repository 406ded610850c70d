"""tools/gradcheck.py: how MetaRM's three gradient forms (metarm.meta_gradient) relate as eta shrinks,
in float64, and the exact form against a central finite difference.

  exact - taylor = O(eta^2)        first_order - taylor = O(eta)

so the fitted log-log slopes of |exact - taylor| and |first_order - taylor| against eta are 2
and 1. On the SFT model and the task's batches when they exist (after `bash iterate.sh`), else
on a tiny random GPT-2 reward model and random token rows (a fresh clone).

    python tools/gradcheck.py
"""
import dataclasses
import math
import os
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tools/ is one below the stages
sys.path.insert(0, ROOT)

import cli  # noqa: E402
import data  # noqa: E402
import distributed  # noqa: E402
import loading  # noqa: E402
import metarm  # noqa: E402
import modeling  # noqa: E402
from cli import arg  # noqa: E402


@dataclasses.dataclass
class Args:
    sft_dir: str = arg("runs/default/seed1/sft", "the SFT model whose new reward head is checked")
    init_rm: str = arg("", "check this reward model instead of a new head on the SFT model")
    data: str = arg("runs/default/task/data/pairs_train.jsonl", "preference pairs: the first 4 are X_t")
    meta_data: str = arg("runs/default/seed1/sft_samples/meta.jsonl", "meta data: the first 2 prompts are X_s")
    max_len: int = arg(128, "maximum prompt + response tokens", check="> 0")
    truncate: bool = arg(False, "cut pairs longer than max_len instead of stopping")
    seed: int = arg(1, "seed for the new head and the direction of the finite difference")


# ---------------------------------------------------------------------------------------------
def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def finite_difference(net, X_t, X_s, k, eta, direction, eps):
    """Central difference of F(theta) = L(theta + eta grad J(theta)) along `direction`."""
    names, theta = zip(*[(n, p) for n, p in net.named_parameters() if p.requires_grad])
    def F(sign):
        moved = [p + sign * eps * v for p, v in zip(theta, direction)]
        with sdpa_kernel(SDPBackend.MATH):
            g = torch.autograd.grad(metarm.J(net, X_s, k, dict(zip(names, moved))), moved)
        with torch.no_grad():
            return metarm.L(net, X_t, dict(zip(names, metarm.ascend(moved, g, eta))))
    return (F(1) - F(-1)) / (2 * eps)


def check_table(net, X_t, X_s, k, etas):
    """Rows (eta, |exact - taylor|, |first_order - taylor|) and the fitted log-log slopes."""
    rows = []
    for eta in etas:
        g = {m: flat(metarm.meta_gradient(net, X_t, X_s, k, eta, m)[0]) for m in ("exact", "first_order", "taylor")}
        rows.append((eta, float((g["exact"] - g["taylor"]).norm()), float((g["first_order"] - g["taylor"]).norm())))
    return rows, slope([r[0] for r in rows], [r[1] for r in rows]), slope([r[0] for r in rows], [r[2] for r in rows])


def toy_problem(vocab=50, k=3):
    """A float64 GPT-2 reward model (2 layers, width 16; GPT-2 computes in the model's dtype
    throughout) with rewards of order one, 4 pairs and 2 prompts x k responses of random tokens."""
    from transformers import GPT2Config, GPT2ForSequenceClassification
    cfg = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=2, n_head=2, num_labels=1,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = GPT2ForSequenceClassification(cfg)
    hf.score.weight.data.normal_(0, 0.3)
    rows = lambda n: data.pad([torch.randint(1, vocab, (int(torch.randint(4, 10, ())),)).tolist()
                               for _ in range(n)], 0)
    return modeling.ScalarModel(hf).double(), rows(8), rows(2 * k), k


def slope(x, y):
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(v) for v in x], [math.log(v) for v in y]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main(argv=None):
    args = cli.parse_args(Args, __doc__, argv)
    torch.manual_seed(args.seed)
    d = distributed.Dist()
    if os.path.isdir(args.init_rm or args.sft_dir) and os.path.isfile(args.meta_data):
        tok = loading.load_tokenizer(args.sft_dir)
        net = loading.load_reward_model(args.init_rm or args.sft_dir, tok, trained=bool(args.init_rm)).double()
        X_t = data.pair_batch(data.encode_pairs(tok, data.load_pairs(args.data)[:4], args.max_len, args.truncate), tok.pad_token_id, d.device)
        X_s, k = data.meta_batch(data.encode_meta(tok, data.load_meta(args.meta_data)[:2], args.max_len), tok.pad_token_id, d.device)
        eta0 = 0.04  # small enough for the leading term to dominate (the training default is far larger)
    else:
        print(f"{args.sft_dir} or {args.meta_data} does not exist: a tiny random model and random token rows")
        net, X_t, X_s, k = toy_problem()
        eta0 = 1e-3  # its gradients are larger: the leading term dominates from a smaller eta
    rows, s_exact, s_first = check_table(net, X_t, X_s, k, [eta0 / 2**i for i in range(6)])
    print(f"gradient check: float64, {sum(p.numel() for p in net.parameters())} parameters, "
          f"4 pairs, 2 prompts x {k} responses")
    print(f"{'eta':>10} {'|exact - taylor|':>18} {'|first_order - taylor|':>24}")
    for eta, a, b in rows:
        print(f"{eta:10.4g} {a:18.3e} {b:24.3e}")
    print(f"{'slope':>10} {s_exact:18.2f} {s_first:24.2f}   (expected: 2 and 1)")
    v = [torch.randn_like(p) for p in net.parameters()]
    exact = flat(metarm.meta_gradient(net, X_t, X_s, k, eta0, "exact")[0])
    fd = float(finite_difference(net, X_t, X_s, k, eta0, v, 1e-5))
    an = float(exact @ flat(v))
    print(f"exact . v = {an:.10g}; central finite difference of L(theta + eta grad J(theta)) "
          f"along v = {fd:.10g}; relative error {abs(an - fd) / abs(fd):.1e}")


if __name__ == "__main__":
    cli.guard(main)
