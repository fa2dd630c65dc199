"""Evaluation of the history methods on digits (docs/design.md §8; the history methods. table), through the
evaluation harness.

    PYTHONPATH=. python scripts/eval_history_methods.py --seeds 0 1 2 [--settings logreg mlp overfit]
        [--ratios 0.01 0.1] [--anchor-curvature] [--no-deltagrad] [--epochs N] [--out table.md] [--json FILE]

A thin wrapper of `unlearn_ext.evaluate`: setting logreg / mlp / overfit is the harness's named
setting history-logreg / history-mlp / overfit (unlearn_ext/evaluate/settings.py), the rows are
the harness's methods mini (fp32 anchors), mini-int8 (int8 anchors), deltagrad and, with
--anchor-curvature, mini-anchors (unlearn_ext/evaluate/methods.py), so the same seeds give the same
table as

    unlearn-ext eval --setting history-logreg --methods mini,mini-int8,deltagrad --ratios 0.01,0.1 \
        --seeds 0,1,2 --noise-floor 0

(the wall-time columns aside). After the table: docs/design.md §8's precondition of the memorizing
setting (original MIA AUC >= retraining's + 0.2) and the target there (Mini's MIA AUC within
0.05 of retraining's). Hyperparameters are Mini's and DeltaGrad's defaults (Mini: m and k from a
budget of 0.30 of retraining's sample-gradients, mini/budget.py — on digits k = 8 and m = 568-974 —
delta rule 'end'; DeltaGrad: burn-in 10, period 5, memory 2), fixed on held-out seeds before these
seeds were run (seeds 100-102; benchmarks/RESULTS.md).

The data are the harness's `digits-pixels` (pixels / 16, a 1400 / 397 split); label flips of the
overfit setting, the noise floor and the table's columns are the harness's (to try other Mini
settings, construct MiniUnlearner directly).
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from unlearn_ext.evaluate import report, settings, summarize

SETTINGS = {"logreg": "history-logreg", "mlp": "history-mlp", "overfit": "overfit"}  # script name -> harness setting
RATIOS = (0.01, 0.05, 0.10, 0.20, 0.30)


def methods(deltagrad: bool = True, anchor_curvature: bool = False) -> list[str]:
    return ["mini", "mini-int8"] + (["deltagrad"] if deltagrad else []) + (["mini-anchors"] if anchor_curvature else [])


def run_setting(name: str, seeds, ratios, names, epochs=None, noise_floor: int = 0, log=print) -> list[dict]:
    """The harness's records for one of this script's settings."""
    return settings.evaluate_setting(SETTINGS[name], methods=names, ratios=list(ratios), seeds=list(seeds),
                                     epochs=epochs, noise_floor_seeds=noise_floor, progress=log)


def mia_summary(summary: list[dict], ratios) -> str:
    """Original - retrain MIA AUC (the memorizing precondition, >= 0.2) and |method - retrain|
    (the target for Mini, <= 0.05), means over seeds, per ratio."""
    out = ["", "MIA AUC (mean over seeds): original - retrain (precondition >= 0.2) | |mini - retrain| (target <= 0.05)"
           " | |deltagrad - retrain|"]
    for ratio in ratios:
        mia = {s["method"]: s["mia_auc"] for s in summary if s["ratio"] == ratio}
        gaps = [f"{abs(mia[k] - mia['retrain']):.3f}" if k in mia else "-" for k in ("mini", "deltagrad")]
        out.append(f"  {ratio:.0%}: {mia['original'] - mia['retrain']:+.3f} | {gaps[0]} | {gaps[1]}")
    return "\n".join(out)


def table(name: str, records: list[dict], seeds, ratios) -> str:
    summary = summarize(records)
    title = f"{name} ({SETTINGS[name]}), mean over seeds {list(seeds)}"
    return report.markdown(summary, title, []) + mia_summary(summary, ratios)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    ap.add_argument("--out", help="also write the markdown tables here")
    ap.add_argument("--json", dest="json_path", help="write every record (the harness's schema) here")
    ap.add_argument("--epochs", type=int, help="override the setting's epochs (quick runs)")
    ap.add_argument("--noise-floor", type=int, default=0, help="retrains with other seeds per ratio (default 0)")
    ap.add_argument("--anchor-curvature", action="store_true",
                    help="add the mini-anchors row (Mini with curvature='anchors')")
    ap.add_argument("--no-deltagrad", action="store_true", help="skip DeltaGrad (slow)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    text = [f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{args.threads} thread(s); {time.strftime('%Y-%m-%d')}"]
    names = methods(not args.no_deltagrad, args.anchor_curvature)
    everything = []
    for name in args.settings:
        records = run_setting(name, args.seeds, args.ratios, names, args.epochs, args.noise_floor,
                              lambda msg: print(msg, flush=True))
        everything += records
        text.append(table(name, records, args.seeds, args.ratios))
        print(text[-1], flush=True)
    text.append(f"\nTotal {time.perf_counter() - began:.0f} s")
    print(text[-1])
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(text) + "\n")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"records": everything}, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
