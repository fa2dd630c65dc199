"""Evaluation of the history methods on digits (DESIGN section 8; issue 12's table).

    PYTHONPATH=. python scripts/eval_history_methods.py --seeds 0 1 2 [--settings logreg mlp overfit]

Per setting and seed one model is trained (recording Mini-Unlearning's anchors in fp32 and int8 and
DeltaGrad's per-step int8 history); per forget ratio a random forget set (seeded) is unlearned by
retraining, Mini-Unlearning (fp32 and int8 anchors) and DeltaGrad; rows are means over seeds.
Hyperparameters (Mini: m, k; DeltaGrad: j0, T0, m) are fixed in SETTINGS below, chosen before
these seeds were run (DESIGN / paper defaults scaled to the run length; Mini's m = 1024 over 512
(and its drift rule) chosen on seeds 100-101, see benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import copy
import platform
import time
from collections import defaultdict

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

import unlearn_ext as ue
from unlearn_ext.mini.vectors import FlatModel
from unlearn_ext.pcmu.examples import load

RATIOS = (0.01, 0.05, 0.10, 0.20, 0.30)

# Models and runs. logreg: weight decay 1e-3, SGD stopped before convergence; mlp: tanh 64-64-10;
# overfit (DESIGN 8's memorizing setting): 300 samples, label noise, wide MLP, no weight decay.
SETTINGS = {
    "logreg": dict(hidden=None, n=1400, noise=0.0, epochs=40, batch=128, lr=0.5, wd=1e-3,
                   mini=dict(curvature_samples=1024, lanczos_steps=10), dg=dict(burn_in=10, period=5, memory=2)),
    "mlp": dict(hidden=[64], n=1400, noise=0.0, epochs=40, batch=128, lr=0.3, wd=1e-3,
                mini=dict(curvature_samples=1024, lanczos_steps=10), dg=dict(burn_in=10, period=5, memory=2)),
    # overfit: 20% label noise, lr 0.5, 300 epochs (train accuracy 1.0). DESIGN 8 says ~10% noise, but
    # on digits 10% (n 100-300, up to 300 epochs) left original - retrain MIA AUC at 0.10-0.19, below
    # the precondition 0.2; 20% gave 0.26-0.30 (chosen on seeds 100-101, 10% forgotten).
    "overfit": dict(hidden=[256], n=300, noise=0.2, epochs=300, batch=32, lr=0.5, wd=0.0,
                    mini=dict(curvature_samples=1024, lanczos_steps=10), dg=dict(burn_in=10, period=5, memory=2)),
}


def make_model(d_in, hidden, classes, seed):
    torch.manual_seed(seed)
    if not hidden:
        return torch.nn.Linear(d_in, classes)
    layers, width = [], d_in
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.Tanh()]
        width = h
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, classes))


def dataset(setting, seed):
    x, y, xt, yt = load("digits")
    x, y = x[:setting["n"]], y[:setting["n"]].clone()
    if setting["noise"]:
        g = torch.Generator().manual_seed(1000 + seed)
        flip = torch.rand(len(y), generator=g) < setting["noise"]
        y[flip] = (y[flip] + torch.randint(1, 10, (int(flip.sum()),), generator=g)) % 10
    return ue.TrainingData(x, y), xt, yt


def accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean()) if len(y) else float("nan")


def mia_auc(model, forget_x, forget_y, test_x, test_y):
    """Loss-threshold attack: AUC of -loss separating forget (members, 1) from test (0)."""
    with torch.no_grad():
        lf = torch.nn.functional.cross_entropy(model(forget_x), forget_y, reduction="none")
        lt = torch.nn.functional.cross_entropy(model(test_x), test_y, reduction="none")
    scores = torch.cat([-lf, -lt]).numpy()
    labels = np.r_[np.ones(len(lf)), np.zeros(len(lt))]
    return float(roc_auc_score(labels, scores))


def run_setting(name, seeds, ratios, log, mini_overrides=None, deltagrad=True, variants=()):
    s = dict(SETTINGS[name])
    s["mini"] = {**s["mini"], **(mini_overrides or {})}
    rows = defaultdict(lambda: defaultdict(list))  # (ratio, method) -> column -> values
    extra = defaultdict(list)
    for seed in seeds:
        data, xt, yt = dataset(s, seed)
        init = make_model(64, s["hidden"], 10, seed)
        config = ue.SGDConfig(epochs=s["epochs"], batch_size=s["batch"], lr=s["lr"], weight_decay=s["wd"], seed=seed)
        t0 = time.perf_counter()
        trained = ue.train_sgd(copy.deepcopy(init), data, config)
        train_seconds = time.perf_counter() - t0
        stores = {}
        for codec in ("fp32", "int8"):
            m = copy.deepcopy(init)
            stores[codec] = ue.mini_store(m, codec=codec)
            ue.train_recording_anchors(m, data, config, stores[codec])
        m = copy.deepcopy(init)
        dg_store = ue.step_store(m, params="int8", grads="int8")
        ue.train_recording_steps(m, data, config, dg_store)
        flat = FlatModel(trained, data)
        w_star = flat.flat()
        for ratio in ratios:
            r = max(1, round(ratio * len(data)))
            g = torch.Generator().manual_seed(10_000 * seed + int(ratio * 1000))
            forget = data.ids[torch.randperm(len(data), generator=g)[:r]].sort().values
            fx, fy = data.batch(forget)
            rx, ry = data.batch(data.without(forget))
            t0 = time.perf_counter()
            retrained = ue.retrain(init, data, config, forget)
            retrain_seconds = time.perf_counter() - t0
            w_r = FlatModel(retrained, data).flat()
            d0 = float((w_star - w_r).norm())
            retrain_cost = ue.retrain_cost(data, config, forget)

            def add(method, model, seconds, cost, hbytes, status=""):
                w = FlatModel(model, data).flat()
                row = rows[(ratio, method)]
                row["d/d0"].append(float((w - w_r).norm()) / d0)
                row["test"].append(accuracy(model, xt, yt))
                row["retain"].append(accuracy(model, rx, ry))
                row["forget"].append(accuracy(model, fx, fy))
                row["MIA"].append(mia_auc(model, fx, fy, xt, yt))
                row["seconds"].append(seconds)
                row["cost"].append(cost / retrain_cost)
                row["bytes"].append(hbytes)
                if status and status != "unlearned":
                    row["fallbacks"].append(1)

            add("original", trained, 0.0, 0, 0)
            add("retrain", retrained, retrain_seconds, retrain_cost, 0)
            for label, store in (("mini fp32", stores["fp32"]), ("mini int8", stores["int8"])):
                m = copy.deepcopy(trained)
                rep = ue.MiniUnlearner(m, data, store, seed=seed, **s["mini"]).unlearn(forget)
                add(label, m, rep.seconds, rep.sample_gradients, rep.history_bytes_read, rep.status)
            for label, kw in variants:  # extra Mini rows (fp32 anchors), e.g. curvature="anchors"
                m = copy.deepcopy(trained)
                rep = ue.MiniUnlearner(m, data, stores["fp32"], seed=seed, **{**s["mini"], **kw}).unlearn(forget)
                add(label, m, rep.seconds, rep.sample_gradients, rep.history_bytes_read, rep.status)
            if deltagrad:
                m = copy.deepcopy(trained)
                rep = ue.DeltaGradUnlearner(m, data, dg_store, **s["dg"]).unlearn(forget)
                add("deltagrad", m, rep.seconds, rep.sample_gradients, rep.history_bytes_read, rep.status)
            log(f"{name} seed {seed} ratio {ratio:.2f}: " + ", ".join(
                f"{k} {rows[(ratio, k)]['d/d0'][-1]:.3f}" for k in ("mini fp32", "mini int8", "deltagrad")
                + tuple(label for label, _ in variants) if rows[(ratio, k)]["d/d0"]))
        extra["train_seconds"].append(train_seconds)
    return rows, extra


def table(name, rows, ratios, seeds, extra_methods=()):
    cols = ["d/d0", "test", "retain", "forget", "MIA", "seconds", "cost", "bytes"]
    out = [f"\n#### {name} (mean over seeds {seeds}; d/d0 also min-max)\n",
           "| ratio | method | d/d0 | test | retain | forget | MIA AUC | wall s | cost vs retrain | history bytes | fallbacks |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for ratio in ratios:
        for method in ("original", "retrain", "mini fp32", "mini int8", "deltagrad", *extra_methods):
            row = rows[(ratio, method)]
            if not row["d/d0"]:
                continue
            cells = []
            for c in cols:
                v = np.mean(row[c])
                if c == "d/d0":
                    cells.append(f"{v:.3f} ({min(row[c]):.2f}-{max(row[c]):.2f})")
                elif c == "bytes":
                    cells.append(f"{int(v):,}")
                elif c in ("seconds",):
                    cells.append(f"{v:.3f}")
                else:
                    cells.append(f"{v:.3f}")
            out.append(f"| {ratio:.0%} | {method} | " + " | ".join(cells) + f" | {len(row['fallbacks'])} |")
    return "\n".join(out)


def mia_summary(rows, ratios):
    """DESIGN 8's precondition of the memorizing setting (original MIA AUC >= retraining's + 0.2)
    and issue 12's target there (Mini's MIA AUC within 0.05 of retraining's), per ratio (means)."""
    out = ["", "MIA AUC (mean over seeds): original - retrain (precondition >= 0.2) | |mini - retrain| (target <= 0.05)"
           " | |deltagrad - retrain|"]
    for ratio in ratios:
        mia = {k: np.mean(rows[(ratio, k)]["MIA"]) for k in ("original", "retrain", "mini fp32", "deltagrad")
               if rows[(ratio, k)]["MIA"]}
        gaps = [f"{abs(mia[k] - mia['retrain']):.3f}" if k in mia else "-" for k in ("mini fp32", "deltagrad")]
        out.append(f"  {ratio:.0%}: {mia['original'] - mia['retrain']:+.3f} | {gaps[0]} | {gaps[1]}")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    ap.add_argument("--out", help="also write the markdown tables here")
    ap.add_argument("--curvature-samples", type=int, help="override Mini's m (choosing it on held-out seeds)")
    ap.add_argument("--lanczos-steps", type=int, help="override Mini's k")
    ap.add_argument("--delta-rule", choices=["end", "interp"], help="override Mini's delta rule")
    ap.add_argument("--anchor-curvature", action="store_true",
                    help="add a row for Mini with curvature='anchors' (curvature at every anchor)")
    ap.add_argument("--no-deltagrad", action="store_true", help="skip DeltaGrad (slow; for choosing Mini's settings)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    text = [f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{args.threads} thread(s); {time.strftime('%Y-%m-%d')}"]
    for name in args.settings:
        overrides = {k: v for k, v in (("curvature_samples", args.curvature_samples),
                                       ("lanczos_steps", args.lanczos_steps), ("delta_rule", args.delta_rule)) if v}
        variants = [("mini anchors", dict(curvature="anchors"))] if args.anchor_curvature else []
        rows, extra = run_setting(name, args.seeds, args.ratios, lambda msg: print(msg, flush=True), overrides,
                                  not args.no_deltagrad, variants)
        text.append(table(name, rows, args.ratios, args.seeds, [label for label, _ in variants]))
        text.append(mia_summary(rows, args.ratios))
        print(text[-1], flush=True)
    text.append(f"\nTotal {time.perf_counter() - began:.0f} s")
    print(text[-1])
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
