"""unlearn-ext: compare machine-unlearning methods with retraining, on bundled or your own data.

  unlearn-ext demo                      one method per family on digits, forget ratios 1-30 %%:
                                        a table, report.md and plots in ./unlearn-ext-demo
  unlearn-ext eval --data mnist1d --model logreg --methods pcmu,finetune --ratios 0.05,0.2 --seeds 0,1
                                        the same harness with your choices (--json FILE for every number)
  unlearn-ext pcmu synthetic|digits     PCMU's certificates and deletion requests on one example
  unlearn-ext bench                     the kernel benchmarks (ratios against eager PyTorch)
  unlearn-ext info                      what is built (backend, CUDA, CPU flags)

Every table shows the model before unlearning (original) and retraining from scratch without the
forgotten samples (retrain), the gold standard; see README for what each column means.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import backend, build_info

DEMO_RATIOS = "0.01,0.05,0.1,0.2,0.3"


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"forget ratios must be in (0, 1), e.g. 0.05,0.2; got {text!r}")
    return values


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"seeds must be integers >= 0, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one method name")
    return names


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _parser() -> argparse.ArgumentParser:
    from .evaluate import methods, models, settings

    parser = argparse.ArgumentParser(prog="unlearn-ext", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    available = ",".join(methods.AVAILABLE)
    demo = sub.add_parser("demo", help="one method per family on digits against retraining")
    ev = sub.add_parser("eval", help="the evaluation harness with your data, model, methods, ratios, seeds")
    ev.add_argument("--data", default="digits", help="digits | digits-pixels | mnist1d | PATH.npz with x (n x d), y (n), "
                    "optional x_test/y_test (default digits)")
    ev.add_argument("--model", default="mlp", choices=models.NAMES, help="default mlp (tanh, 64 hidden)")
    ev.add_argument("--widths", type=_ints, default=None, help="hidden widths of the MLP, e.g. 128,128")
    ev.add_argument("--methods", type=_names, default=list(methods.DEMO),
                    help=f"comma-separated from {', '.join(methods.ALL)} (available now: {available}; default "
                    f"{','.join(methods.DEMO)})")
    ev.add_argument("--ratios", type=_floats, default=_floats("0.05,0.2"), help="forget ratios, default 0.05,0.2")
    ev.add_argument("--seeds", type=_ints, default=[0], help="training seeds, default 0")
    ev.add_argument("--epochs", type=_positive, default=None, help="training epochs (default per model)")
    ev.add_argument("--label-noise", type=float, default=0.0,
                    help="flip this fraction of training labels (drawn per training seed; the memorizing setting uses 0.2)")
    ev.add_argument("--limit", type=_positive, default=None, help="keep only the first N training samples")
    ev.add_argument("--noise-floor", type=int, default=2, help="retrains with other seeds per ratio (default 2)")
    ev.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ev.add_argument("--setting", default=None, choices=list(settings.SETTINGS),
                    help="a named setting (data, model, SGD training) of the per-method scripts; "
                         "replaces --data/--model/--widths/--label-noise/--limit (unlearn_ext/evaluate/settings.py)")
    for p, default in ((demo, False), (ev, True)):
        p.add_argument("--ud", action=argparse.BooleanOptionalAction, default=default,
                       help="SPD-GAN's unlearning degree column where |F| >= 30 (about doubles the run time; "
                       f"default {'on' if default else 'off'})")
    for p in (demo, ev):
        p.add_argument("--out", default=None, help="folder for report.md and plots "
                       "(demo: ./unlearn-ext-demo; eval: none unless given)")
        p.add_argument("--json", dest="json_path", default=None, metavar="FILE",
                       help="write every record and the summary as JSON (schema in README)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    pc = sub.add_parser("pcmu", help="PCMU's certificates and deletion requests on one example")
    pc.add_argument("example", choices=["synthetic", "digits"])
    pc.add_argument("--mode", choices=["analytic", "mc"], default="analytic")
    pc.add_argument("--seed", type=int, default=0)
    pc.add_argument("--requests", type=_positive, default=12, help="single-id requests to check")
    pc.add_argument("--json", action="store_true", help="print the results as JSON")
    sub.add_parser("bench", help="run the kernel benchmarks (pytest-benchmark) and print the ratios")
    sub.add_parser("info", help="print what is built (backend, CUDA, CPU flags)")
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        print(json.dumps(build_info(), indent=2))
        return 0
    if args.command == "pcmu":
        return _pcmu(args)
    if args.command == "bench":
        return _bench()
    return _evaluate(parser, args)


def _pcmu(args) -> int:
    from .pcmu.examples import report, run

    result = run(args.example, seed=args.seed, requests=args.requests, mode=args.mode)
    if args.json:
        print(json.dumps({"backend": backend(), "examples": [result]}, indent=1, default=float))
    else:
        print(f"unlearn_ext — backend: {backend()}")
        print(report(result))
    return 0


def _bench() -> int:
    import subprocess

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench_dir = os.path.join(here, "benchmarks")
    if not os.path.isdir(bench_dir):
        print("unlearn-ext: the benchmarks ship with the source tree (benchmarks/), not with an installed "
              "wheel; run this from a checkout", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", "pytest", bench_dir, "-q", "--benchmark-only",
                            "-p", "no:cacheprovider"])


def _evaluate(parser, args) -> int:
    import torch

    from .evaluate import datasets, harness, methods, report, settings

    demo = args.command == "demo"
    if demo:
        data_name, model, names, ratios, seeds = "digits", "mlp", list(methods.DEMO), _floats(DEMO_RATIOS), [0]
        epochs, widths, noise, label_noise, limit, device = None, None, 2, 0.0, None, "cpu"
        out, setting = args.out or "unlearn-ext-demo", None
    else:
        data_name, model, names, ratios, seeds = args.data, args.model, args.methods, args.ratios, args.seeds
        epochs, widths, noise, label_noise = args.epochs, args.widths, args.noise_floor, args.label_noise
        limit, device, out = args.limit, args.device, args.out
        setting = settings.get(args.setting) if args.setting else None
        if setting is not None:
            if (data_name, model, widths, label_noise, limit) != ("digits", "mlp", None, 0.0, None):
                parser.error(f"--setting {setting.name} fixes --data, --model, --widths, --label-noise and "
                             "--limit; give either the setting or those options")
            data_name, model, widths = setting.data, setting.model, setting.widths
            label_noise, limit = setting.label_noise, setting.limit
        if not 0 <= label_noise < 1:
            parser.error(f"--label-noise must be in [0, 1), got {label_noise}")
        if noise < 0:
            parser.error(f"--noise-floor must be >= 0, got {noise}")
        if device not in ("cpu", "cuda"):
            parser.error(f"--device must be cpu or cuda, got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available here")
        if device == "cuda":
            parser.error("--device cuda: the harness runs its small models on the CPU in this release")
    try:
        methods.resolve(names)
        ds = datasets.load(data_name, label_noise=label_noise, limit=limit)  # validated here, named in the title
        data = datasets.per_seed(data_name, label_noise=label_noise, limit=limit) if label_noise > 0 else ds
    except (ValueError, datasets.DatasetError) as exc:
        parser.error(str(exc))
    title = f"unlearn_ext: {ds.name}, {model}, ratios {', '.join(f'{r:g}' for r in ratios)}, seeds {seeds}"
    began = time.perf_counter()
    sgd = setting.sgd if setting is not None else None
    records = _run_with_progress(harness, data, model, names, ratios, seeds, epochs, widths, noise, args.quiet,
                                 args.ud, sgd)
    summary = harness.summarize(records)
    report.print_table(summary, title)
    notes = [f"backend: {backend()}; {time.perf_counter() - began:.0f} s on this machine",
             f"n = {len(ds.y)} training samples, {len(ds.y_test)} test samples; methods: {', '.join(names)}"]
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
            f.write(report.markdown(summary, title, notes))
        pngs = report.plots(summary, out)
        print(f"wrote {os.path.join(out, 'report.md')} and {', '.join(pngs)}")
    if args.json_path:
        payload = {"schema": harness.RECORD_FIELDS, "records": records, "summary": summary,
                   "settings": {"data": ds.name, "model": model, "methods": names, "ratios": ratios,
                                "seeds": seeds, "epochs": epochs, "label_noise": label_noise, "ud": args.ud,
                                "setting": setting.name if setting is not None else None}}
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1, default=float)
        print(f"wrote {args.json_path}")
    return 0


def _run_with_progress(harness, ds, model, names, ratios, seeds, epochs, widths, noise, quiet, ud=False, sgd=None):
    kwargs = dict(model=model, methods=names, ratios=ratios, seeds=seeds, epochs=epochs, widths=widths,
                  noise_floor_seeds=noise, ud=ud, sgd=sgd)
    if quiet:
        return harness.evaluate(ds, **kwargs)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    total = len(seeds) * (1 + len(names) + len(ratios) * (1 + len(names) + int(ud)))
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), transient=False) as bar:
        task = bar.add_task("training", total=total)
        return harness.evaluate(ds, progress=lambda what: bar.update(task, advance=1, description=what), **kwargs)


if __name__ == "__main__":
    raise SystemExit(main())
