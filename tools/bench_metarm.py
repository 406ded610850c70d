"""tools/bench_metarm.py: what one MetaRM step costs, in one process, on the same batches.

Times (median of --repeats after a warm-up; the five are timed in turn within each repeat, and
each ratio is the median of the per-repeat ratios, so that a slower moment of the machine
affects both sides of a ratio alike):
  vanilla      forward + backward of L on the pair batch X_t (a vanilla RM step, no optimizer)
  meta f+b     forward + backward of J on the meta batch X_s
  first_order  metarm.meta_gradient(..., "first_order")  (floor: vanilla + meta f+b)
  exact        metarm.meta_gradient(..., "exact")
  taylor       metarm.meta_gradient(..., "taylor")
on the embedded task's tiny Llama and on a larger one (tens of millions of parameters), both
randomly initialised, with random token batches of the embedded task's lengths.

    python tools/bench_metarm.py                 # both models, prints a markdown table
    python tools/bench_metarm.py --sizes tiny    # the tiny model only
    python tools/bench_metarm.py --parts         # also: what the exact form's extra cost is made of
    python tools/bench_metarm.py --rows 0        # the reward model without its length groups (padding kept)

--parts times the pieces of `exact` against a plain f+b of J: grad J with its graph kept
(create_graph), the f+b of L at theta' through a parameter dict, and the Hessian-vector product
H_J v two ways, reverse over reverse (the backward of grad J . v: what `exact` does) and forward
over reverse (torch.func.jvp of torch.func.grad), with their largest difference.
"""
import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tools/ is one below the stages
sys.path.insert(0, ROOT)

import metarm  # noqa: E402
import modeling  # noqa: E402


SIZES = {"tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4),
         "larger": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8)}


def model_of(size, vocab=1024):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    cfg = LlamaConfig(vocab_size=vocab, num_key_value_heads=SIZES[size]["num_attention_heads"], num_labels=1,
                      pad_token_id=0, max_position_embeddings=256, **SIZES[size])
    torch.manual_seed(0)
    return modeling.ScalarModel(LlamaForSequenceClassification(cfg))


def random_batch(rows, seed, vocab=1024, lengths=(20, 40)):
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(lengths[0], lengths[1] + 1, (rows,), generator=g)
    ids = torch.zeros(rows, lengths[1], dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, L in enumerate(n.tolist()):
        ids[i, :L] = torch.randint(3, vocab, (L,), generator=g)
        mask[i, :L] = 1
    return ids, mask


def timed(fs, repeats):
    """{name: [seconds per repeat]}: every f once per repeat, in turn, after one warm-up call each."""
    for f in fs.values():
        f()
    times = {name: [] for name in fs}
    for _ in range(repeats):
        for name, f in fs.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return times


def ratio(a, b):
    return statistics.median(x / y for x, y in zip(a, b))


def bench(size, n_pairs, m, k, eta, repeats):
    model = model_of(size)
    X_t, X_s = random_batch(2 * n_pairs, 1), random_batch(m * k, 2)
    params = [p for p in model.parameters()]

    def backward(loss_fn):
        def f():
            loss_fn().backward()
            for p in params:
                p.grad = None
        return f
    fs = {"vanilla": backward(lambda: metarm.L(model, X_t)), "meta f+b": backward(lambda: metarm.J(model, X_s, k))}
    for mode in ("first_order", "exact", "taylor"):
        fs[mode] = lambda mode=mode: metarm.meta_gradient(model, X_t, X_s, k, eta, mode)
    t = timed(fs, repeats)
    return sum(p.numel() for p in params), t


def parts(size, n_pairs, m, k, repeats):
    """{name: [seconds per repeat]} of the exact form's pieces, and max |H v (rev) - H v (fwd)|."""
    from torch.func import grad, jvp
    model = model_of(size)
    X_t, X_s = random_batch(2 * n_pairs, 1), random_batch(m * k, 2)
    named = {n: p.detach() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    v = {n: torch.randn(p.shape, generator=g) for n, p in named.items()}
    J_of = lambda ps: metarm.J(model, X_s, k, ps)

    def leaves():
        return {n: p.clone().requires_grad_() for n, p in named.items()}

    def fb_J():
        ps = leaves()
        torch.autograd.grad(J_of(ps), list(ps.values()))

    def grad_J_with_graph():
        ps = leaves()
        with metarm.twice():
            torch.autograd.grad(J_of(ps), list(ps.values()), create_graph=True)

    def fb_L_at_theta_prime():
        ps = leaves()
        torch.autograd.grad(metarm.L(model, X_t, ps), list(ps.values()))

    def hvp_reverse():
        ps = leaves()
        with metarm.twice():
            gJ = torch.autograd.grad(J_of(ps), list(ps.values()), create_graph=True)
        return torch.autograd.grad(gJ, list(ps.values()), grad_outputs=list(v.values()))

    def hvp_forward():
        with metarm.twice():
            return list(jvp(grad(J_of), (named,), (v,))[1].values())
    diff = max(float((a - b).abs().max()) for a, b in zip(hvp_reverse(), hvp_forward()))
    fs = {"f+b of J": fb_J, "grad J, graph kept": grad_J_with_graph, "f+b of L at theta'": fb_L_at_theta_prime,
          "H_J v, reverse over reverse": hvp_reverse, "H_J v, forward over reverse": hvp_forward}
    return timed(fs, repeats), diff


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,larger", help="comma-separated: tiny, larger")
    ap.add_argument("--pairs", type=int, default=16, help="n: preference pairs in X_t")
    ap.add_argument("--prompts", type=int, default=8, help="m: prompts in X_s")
    ap.add_argument("--k", type=int, default=5, help="responses per prompt in X_s")
    ap.add_argument("--eta", type=float, default=0.5, help="the ascent step")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per entry (median)")
    ap.add_argument("--parts", action="store_true", help="also time the pieces of the exact form")
    ap.add_argument("--rows", type=int, default=modeling.ScalarModel.rows,
                    help="rows per length group of the reward model (modeling.ScalarModel; 0: the plain scores of the whole batch, padding kept)")
    args = ap.parse_args()
    modeling.ScalarModel.rows = args.rows  # 0: modeling.scores, the whole batch, padding kept
    print(f"one process, {torch.get_num_threads()} threads; X_t = {args.pairs} pairs, "
          f"X_s = {args.prompts} prompts x {args.k} responses, 20-40 tokens each; "
          + (f"reward-model length groups of {args.rows} rows\n" if args.rows else "no length groups (the plain scores)\n"))
    print("| model | parameters | vanilla (s) | meta f+b (s) | first_order (s) | exact (s) | taylor (s) "
          "| first_order / floor | exact / first_order | taylor / first_order |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        n, t = bench(size, args.pairs, args.prompts, args.k, args.eta, args.repeats)
        floor = [a + b for a, b in zip(t["vanilla"], t["meta f+b"])]
        med = {name: statistics.median(v) for name, v in t.items()}
        print(f"| {size} | {n / 1e6:.1f}M | {med['vanilla']:.3f} | {med['meta f+b']:.3f} | {med['first_order']:.3f} | "
              f"{med['exact']:.3f} | {med['taylor']:.3f} | {ratio(t['first_order'], floor):.2f} | "
              f"{ratio(t['exact'], t['first_order']):.2f} | {ratio(t['taylor'], t['first_order']):.2f} |", flush=True)
    if args.parts:
        print("\n| model | piece | s | / f+b of J |\n|---|---|---|---|")
        for size in args.sizes.split(","):
            t, diff = parts(size, args.pairs, args.prompts, args.k, args.repeats)
            for name, v in t.items():
                print(f"| {size} | {name} | {statistics.median(v):.3f} | {ratio(v, t['f+b of J']):.2f} |", flush=True)
            print(f"| {size} | max abs difference of the two H_J v | {diff:.1e} | |", flush=True)

if __name__ == "__main__":
    main()
