"""tools/metastep.py: how big is the meta-step? How much MetaRM changes the gradient the optimizer gets.

At a step of vanilla reward modelling the optimizer gets g0 = grad L(theta; X_t) (Eq. 1 on a batch
of pairs). MetaRM gives it instead (metarm.meta_gradient, Eq. 3-5)

    first_order   grad L(theta')                         theta' = theta + eta grad J(theta; X_s)
    exact         (I + eta hess J(theta)) grad L(theta')

For each eta / alpha on a grid (alpha: the reward model's learning rate, from its args.json) and
each of --draws batch draws (X_t from the pairs, X_s from the meta data), this prints

    change   |g - g0| / |g0|       and   cos(g, g0)          for first_order and exact
    noise    |grad L(B2) - g0| / |g0|                         B2: another batch of pairs, same size

as the median [min, max] over the draws, at the reward model's start (the SFT weights and a new
head, seeded as reward_model.py seeds it) and at its end (the trained reward model). When the change
is far below the noise - the difference between two minibatches, which the optimizer already lives
with every step - MetaRM at that eta trains what vanilla reward modelling trains. Norms and dot
products are summed in float64 (in float32 a 135 M-parameter cosine can come out above 1); the
model itself is float64 by default (--dtype).

    python tools/metastep.py --rm_dir runs/default/seed1/rm --meta_data runs/default/seed1/sft_samples/meta.jsonl
"""
import dataclasses
import json
import math
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tools/ is one below the stages
sys.path.insert(0, ROOT)

import cli  # noqa: E402
import data  # noqa: E402
import distributed  # noqa: E402
import loading  # noqa: E402
import metarm  # noqa: E402
from cli import arg  # noqa: E402


@dataclasses.dataclass
class Args:
    rm_dir: str = arg("runs/default/seed1/rm", "the trained reward model (its end); its args.json gives the SFT "
                      "model (its start), the pairs, alpha, the batch size and max_len")
    meta_data: str = arg("runs/default/seed1/sft_samples/meta.jsonl", "meta data S: prompts x k responses")
    data: str = arg("", "preference pairs (empty: those the reward model was trained on)")
    ratios: str = arg("1,10,100,1000,10000", "eta / alpha values, comma separated")
    draws: int = arg(8, "batch draws (X_t, X_s, B2) at each point", check="> 0")
    global_batch: int = arg(0, "pairs in X_t and B2 (0: the reward model's global_batch)", check=">= 0")
    meta_batch: int = arg(4, "prompts in X_s (metarm.py's default)", check="> 0")
    points: str = arg("start,end", "where: start (SFT + new head), end (the trained RM), or both")
    dtype: str = arg("float64", "the model's dtype", ["float64", "float32"])
    out: str = arg("", "also write the figures to this JSON file")
    plot: str = arg("", "instead: print the table of these JSON files (name=file, comma separated) and draw "
                    "the change against eta/alpha into --plot_file (needs matplotlib)")
    plot_file: str = arg("metastep.png", "the figure --plot draws")
    seed: int = arg(1, "seed of the draws (and of the new head at the start: the RM's own seed if 0)", check=">= 0")


# ---------------------------------------------------------------------------------------------
# One draw: the vanilla gradient, the two MetaRM gradients at each eta, and the minibatch noise
# ---------------------------------------------------------------------------------------------
def vanilla_gradient(model, X_t):
    theta = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(metarm.L(model, X_t), theta))


def compare(g, g0):
    """(|g - g0| / |g0|, cos(g, g0)), summed in float64 whatever the gradients' dtype."""
    gg, g0g0, gg0 = distributed.dot(g, g), distributed.dot(g0, g0), distributed.dot(g, g0)
    change = max(gg - 2 * gg0 + g0g0, 0.0) ** 0.5 / g0g0 ** 0.5
    return change, gg0 / (gg * g0g0) ** 0.5


def one_draw(model, X_t, X_s, k, B2, etas):
    """{"noise": ..., "first_order": [(change, cos) per eta], "exact": [...]} for one draw."""
    g0 = vanilla_gradient(model, X_t)
    out = {"noise": compare(vanilla_gradient(model, B2), g0)[0], "first_order": [], "exact": []}
    for eta in etas:
        for form in ("first_order", "exact"):
            g, _ = metarm.meta_gradient(model, X_t, X_s, k, eta, form)
            out[form].append(compare(g, g0))
    return out


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure_point(model, pairs, samples, pad_id, batch, meta_batch, etas, draws, seed):
    """The figures over `draws` draws: X_t, B2 (disjoint, `batch` pairs each) and X_s
    (`meta_batch` prompts) drawn afresh each time."""
    g = torch.Generator().manual_seed(seed)
    if len(pairs) < 2 * batch:
        raise cli.UserError(f"{len(pairs)} pairs: two disjoint batches of {batch} need {2 * batch}")
    rows = []
    for _ in cli.progress(range(draws), distributed.Dist(), total=draws, desc="draws"):
        order = torch.randperm(len(pairs), generator=g).tolist()
        X_t = data.pair_batch([pairs[i] for i in order[:batch]], pad_id, "cpu")
        B2 = data.pair_batch([pairs[i] for i in order[batch:2 * batch]], pad_id, "cpu")
        picked = torch.randperm(len(samples), generator=g)[:meta_batch].tolist()
        X_s, k = data.meta_batch([samples[i] for i in picked], pad_id, "cpu")
        rows.append(one_draw(model, X_t, X_s, k, B2, etas))
    result = {"noise": summary([r["noise"] for r in rows])}
    for form in ("first_order", "exact"):
        result[form] = [{"change": summary([r[form][i][0] for r in rows]), "cos": summary([r[form][i][1] for r in rows])}
                        for i in range(len(etas))]
    return result


def rms_norms_in_model_dtype(model):
    """Llama-family RMSNorm casts to float32 inside, which would make a float64 measurement a
    float32 one (1e-7 at best, above the smallest changes measured here): in a float64 model,
    each RMSNorm computes its own formula in float64 instead."""
    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = forward.__get__(module)
    return model


# ---------------------------------------------------------------------------------------------
def fmt(s, spec=".2e"):
    return f"{s['median']:{spec}} [{s['min']:{spec}}, {s['max']:{spec}}]"


def print_table(name, point, result, ratios, alpha):
    print(f"\n{name}, {point}: minibatch noise |grad L(B2) - g0| / |g0| = {fmt(result['noise'])}")
    print(f"{'eta/alpha':>10} {'eta':>9} | {'first_order change':>32} {'cos':>8} | {'exact change':>32} {'cos':>8} | "
          f"{'change / noise':>14}")
    for i, r in enumerate(ratios):
        fo, ex = result["first_order"][i], result["exact"][i]
        print(f"{r:>10g} {r * alpha:>9.2g} | {fmt(fo['change']):>32} {fo['cos']['median']:>8.5f} | "
              f"{fmt(ex['change']):>32} {ex['cos']['median']:>8.5f} | "
              f"{ex['change']['median'] / result['noise']['median']:>14.2e}")


def markdown(named_files):
    """The table docs/results.md shows: per model and point, the noise and, per eta/alpha, the
    median change of each form as a share of the median noise, with first_order's cosine."""
    lines = ["| model | parameters | alpha | point | noise | eta/alpha | first_order change / noise | exact change / noise | cos(first_order, vanilla) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, path in named_files:
        res = cli.read_json(path)
        for point in ("start", "end"):
            if point not in res:
                continue
            r = res[point]
            noise = r["noise"]["median"]
            for i, ratio in enumerate(res["ratios"]):
                fo, ex = r["first_order"][i], r["exact"][i]
                lines.append(f"| {name} | {r['parameters'] / 1e6:.1f} M | {res['alpha']:g} | {point} | "
                             f"{noise:.2f} [{r['noise']['min']:.2f}, {r['noise']['max']:.2f}] | {ratio:g} | "
                             f"{fo['change']['median'] / noise:.1e} | {ex['change']['median'] / noise:.1e} | "
                             f"{fo['cos']['median']:.4f} |")
    return "\n".join(lines)


def plot(named_files, out):
    """The exact form's change against eta/alpha, one line per model and point, with each one's
    minibatch noise (median, and the band of its draws) as a dashed line and a band."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise cli.UserError("--plot needs matplotlib (pip install matplotlib)") from None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, point in zip(axes, ("start", "end")):
        for i, (name, path) in enumerate(named_files):
            with open(path) as f:
                res = json.load(f)
            if point not in res:
                continue
            color = f"C{i}"
            x = [r for r in res["ratios"] if r > 0]
            ex = [e for r, e in zip(res["ratios"], res[point]["exact"]) if r > 0]
            ax.plot(x, [e["change"]["median"] for e in ex], "o-", color=color, label=f"{name}: exact")
            fo = [e for r, e in zip(res["ratios"], res[point]["first_order"]) if r > 0]
            ax.plot(x, [e["change"]["median"] for e in fo], "x:", color=color, label=f"{name}: first_order")
            noise = res[point]["noise"]
            ax.axhline(noise["median"], color=color, ls="--", lw=1)
            ax.axhspan(noise["min"], noise["max"], color=color, alpha=0.12)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("eta / alpha")
        ax.set_title({"start": "start (SFT + new head)", "end": "end (trained RM)"}[point])
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("|g - g0| / |g0|  (dashed, band: minibatch noise)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out + ".tmp.png", dpi=110)
    os.replace(out + ".tmp.png", out)
    print(f"wrote {out}")


def main(argv=None):
    args = cli.parse_args(Args, __doc__, argv)
    if args.plot:
        named = [item.split("=", 1) for item in args.plot.split(",")]
        if any(len(n) != 2 or not os.path.isfile(n[1]) for n in named):
            raise cli.UserError(f"--plot {args.plot}: name=file.json pairs, comma separated, each file existing")
        print(markdown(named))
        return plot(named, args.plot_file)
    made = os.path.join(args.rm_dir, "args.json")
    if not os.path.isfile(made):
        raise cli.UserError(f"{made} does not exist: --rm_dir must be a folder reward_model.py or metarm.py wrote")
    with open(made) as f:
        rm_args = json.load(f)
    alpha, batch = rm_args["lr"], args.global_batch or rm_args["global_batch"]
    ratios = [float(r) for r in args.ratios.split(",")]
    if any(not math.isfinite(r) or r < 0 for r in ratios):
        raise cli.UserError(f"--ratios {args.ratios}: numbers >= 0, comma separated")
    points = args.points.split(",")
    if not points or set(points) - {"start", "end"}:
        raise cli.UserError(f"--points {args.points}: start, end, or start,end")
    dtype = getattr(torch, args.dtype)
    tok = loading.load_tokenizer(args.rm_dir)
    pairs_file = args.data or rm_args["data"]
    pairs = data.encode_pairs(tok, data.load_pairs(pairs_file), rm_args["max_len"], True, pairs_file)
    samples = data.encode_meta(tok, data.load_meta(args.meta_data), rm_args["max_len"], args.meta_data)
    results = {"rm_dir": args.rm_dir, "alpha": alpha, "ratios": ratios, "global_batch": batch,
               "meta_batch": args.meta_batch, "draws": args.draws, "dtype": args.dtype}
    for point in points:
        if point == "start":
            cli.set_seed(args.seed or rm_args["seed"])  # the new head, as reward_model.py draws it
            model = loading.load_reward_model(rm_args["sft_dir"], tok, trained=False)
        else:
            model = loading.load_reward_model(args.rm_dir, tok, trained=True)
        model = model.to(dtype).eval()  # eval: no dropout; the RMs here have none anyway
        if dtype == torch.float64:
            rms_norms_in_model_dtype(model)
        n = sum(p.numel() for p in model.parameters())
        results[point] = measure_point(model, pairs, samples, tok.pad_token_id, batch, args.meta_batch,
                                       [r * alpha for r in ratios], args.draws, args.seed)
        results[point]["parameters"] = n
        print_table(f"{args.rm_dir} ({n / 1e6:.1f} M parameters, alpha {alpha:g}, {batch} pairs, "
                    f"{args.meta_batch} x {len(samples[0])} meta rows, {args.draws} draws, {args.dtype})",
                    point, results[point], ratios, alpha)
    if args.out:  # a temporary name, then renamed: never a half-written file
        with open(args.out + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    cli.guard(main)
