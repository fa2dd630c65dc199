"""unlearn-ext: compare machine-unlearning methods with retraining, on bundled or your own data.

  unlearn-ext demo                      one method per family on digits, forget ratios 1-30 %:
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
import shlex
import sys
import time

from . import __version__, backend, build_info

DEMO_RATIOS = "0.01,0.05,0.1,0.2,0.3"
MAX_SEED = 2**31 - 1  # seeds are offset (other-seed retrains) and passed to torch and numpy


class _Parser(argparse.ArgumentParser):
    """argparse with every refusal on one line (`unlearn-ext eval: error: ...`, exit code 2): the
    usage block is in --help, not in front of the reason."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())} (see --help)\n")


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
    if any(v > MAX_SEED for v in values):
        raise argparse.ArgumentTypeError(f"seeds must be integers in 0..{MAX_SEED}, got {text!r}")
    return values


def _widths(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"hidden widths must be integers >= 1, e.g. 128,128; got {text!r}")
    return values


def _names(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one method name")
    return names


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _parser() -> argparse.ArgumentParser:
    from .evaluate import methods, models, pcmu_profiles, perturb_options, settings, training

    parser = _Parser(prog="unlearn-ext", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"unlearn-ext {__version__} ({backend()})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    available = ",".join(methods.AVAILABLE)
    demo = sub.add_parser("demo", help="one method per family on digits against retraining")
    ev = sub.add_parser("eval", help="the evaluation harness with your data, model, methods, ratios, seeds")
    ev.add_argument("--data", default="digits", help="digits | digits-pixels | mnist1d | tokens | corpus (documents "
                    "for --model causal-lm) | cifar10:DIR | "
                    "cifar100:DIR | an image folder (one subfolder per class) | PATH.npz with x (n x d table, n x T "
                    "integer tokens, n x C x L signals or n x C x H x W images), y (n), optional x_test/y_test "
                    "(default digits)")
    ev.add_argument("--model", default="mlp", help=f"{' | '.join(models.NAMES)} | package.module:factory (your "
                    "factory(input_shape, classes) returning a torch.nn.Module); default mlp (tanh, 64 hidden)")
    ev.add_argument("--widths", type=_widths, default=None, help="hidden widths of the MLP, e.g. 128,128")
    ev.add_argument("--norm", choices=("group", "batch"), default=None, help="resnet's normalization (default group)")
    ev.add_argument("--dropout", type=_number, default=None, help="dropout rate of transformer and causal-lm "
                    "(default 0)")
    ev.add_argument("--methods", type=_names, default=list(methods.DEMO),
                    help=f"comma-separated from {', '.join(methods.ALL)} (available now: {available}; default "
                    f"{','.join(methods.DEMO)})")
    ev.add_argument("--ratios", type=_floats, default=_floats("0.05,0.2"), help="forget ratios, default 0.05,0.2")
    ev.add_argument("--seeds", type=_ints, default=[0], help="training seeds, default 0")
    ev.add_argument("--optimizer", default="sgd", help=f"{' | '.join(training.OPTIMIZERS)} (default sgd)")
    ev.add_argument("--lr", type=_number, default=None, help="learning rate (default per model)")
    ev.add_argument("--momentum", type=_number, default=None, help="momentum of --optimizer momentum")
    ev.add_argument("--weight-decay", type=_number, default=None, help="weight decay (default per model)")
    ev.add_argument("--schedule", default="constant", help=f"learning-rate schedule: {' | '.join(training.SCHEDULES)}")
    ev.add_argument("--epochs", type=_positive, default=None, help="training epochs (default per model)")
    ev.add_argument("--batch-size", type=_positive, default=None, help="batch size (default per model)")
    ev.add_argument("--label-noise", type=float, default=0.0,
                    help="flip this fraction of training labels (drawn per training seed; the memorizing setting uses 0.2)")
    ev.add_argument("--limit", type=_positive, default=None, help="keep only the first N training samples")
    ev.add_argument("--noise-floor", type=_count, default=2, help="retrains with other seeds per ratio (default 2)")
    ev.add_argument("--device", default="cpu", help="cpu (default) or cuda (where a CUDA device is available)")
    ev.add_argument("--pcmu", default=None, metavar="KEY=VALUE,...",
                    help="PCMU's training settings over its model family's defaults, e.g. lr=0.01,epochs=10; keys: "
                    f"{', '.join(pcmu_profiles.KEYS)} (defaults: unlearn_ext/evaluate/pcmu_profiles.py)")
    ev.add_argument("--perturb", default=None, metavar="KEY=VALUE,...",
                    help="Top-K / Random-k's settings over their model family's defaults, e.g. "
                    f"k=0.1,guard=0.01 (guard=off, guard_budget=none unset them); keys: "
                    f"{', '.join(perturb_options.KEYS)} (defaults: unlearn_ext/evaluate/methods.py)")
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
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["unlearn-ext", *argv])
    if args.command == "info":
        print(json.dumps(build_info(), indent=2))
        return 0
    if args.command == "pcmu":
        return _pcmu(args)
    if args.command == "bench":
        return _bench()
    return _evaluate(parser, args)


def _pcmu(args) -> int:
    from .evaluate.pcmu_examples import report, run

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


def _check_output_paths(parser, out: str | None, json_path: str | None) -> None:
    """Refuses, before any work, output paths the results could not be written to (a run must not
    end by losing its results)."""
    if out:
        if os.path.exists(out) and not os.path.isdir(out):
            parser.error(f"--out {out}: exists and is not a folder")
        ancestor = os.path.abspath(out)
        while not os.path.exists(ancestor):
            ancestor = os.path.dirname(ancestor)
        if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
            parser.error(f"--out {out}: cannot create or write it ({ancestor} is not a writable folder)")
    if json_path:
        if os.path.isdir(json_path):
            parser.error(f"--json {json_path}: is a folder; give a file name")
        folder = os.path.dirname(os.path.abspath(json_path))
        inside_out = out is not None and folder == os.path.abspath(out)  # created before the JSON is written
        if not os.path.isdir(folder) and not inside_out:
            parser.error(f"--json {json_path}: folder {folder} does not exist")
        if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
            parser.error(f"--json {json_path}: folder {folder} is not writable")


def _evaluate(parser, args) -> int:
    import torch

    from .evaluate import (datasets, harness, methods, models, pcmu_profiles, perturb_options, precondition, report,
                           settings, training)

    demo = args.command == "demo"
    _check_output_paths(parser, args.out or ("unlearn-ext-demo" if demo else None), args.json_path)
    model_options, recipe = {}, training.RecipeOptions()
    if demo:
        data_name, model, names, ratios, seeds = "digits", "mlp", list(methods.DEMO), _floats(DEMO_RATIOS), [0]
        widths, noise, label_noise, limit, device = None, 2, 0.0, None, "cpu"
        out, setting = args.out or "unlearn-ext-demo", None
    else:
        data_name, model, names, ratios, seeds = args.data, args.model, args.methods, args.ratios, args.seeds
        widths, noise, label_noise = args.widths, args.noise_floor, args.label_noise
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
        if device not in ("cpu", "cuda"):
            parser.error(f"--device must be cpu or cuda, got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False)")
        if args.norm is not None and model != "resnet":
            parser.error(f"--norm applies to --model resnet, not {model}")
        if args.dropout is not None and model not in ("transformer", "causal-lm"):
            parser.error(f"--dropout applies to --model transformer or causal-lm, not {model}")
        if args.dropout is not None and not 0 <= args.dropout < 1:
            parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
        if widths is not None and model not in ("mlp", "mlp-wide"):
            parser.error(f"--widths applies to --model mlp or mlp-wide, not {model}")
        model_options = {k: v for k, v in (("norm", args.norm), ("dropout", args.dropout)) if v is not None}
        recipe = training.RecipeOptions(optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
                                        weight_decay=args.weight_decay, schedule=args.schedule, epochs=args.epochs,
                                        batch_size=args.batch_size)
    sgd = setting.sgd if setting is not None else None
    pcmu_text = None if demo else args.pcmu
    perturb_text = None if demo else args.perturb
    try:  # everything the run needs, checked before it starts
        methods.resolve(names)
        pcmu_overrides = pcmu_profiles.parse(pcmu_text) if pcmu_text is not None else {}
        if pcmu_text is not None and "pcmu" not in names:
            raise ValueError("--pcmu sets the pcmu method's training, which --methods does not include")
        perturb_overrides = perturb_options.parse(perturb_text) if perturb_text is not None else {}
        perturbers = methods.perturb_family(**perturb_overrides) if perturb_text is not None else {}
        if perturb_text is not None and not set(perturbers) & set(names):
            raise ValueError(f"--perturb sets the settings of {', '.join(perturbers)}, which --methods does not "
                             "include")
        _refuse_ignored_perturb_keys(methods, names, model, perturb_overrides)
        pcmu_settings = pcmu_profiles.settings_for(model, pcmu_overrides)
        recipe.check()
        form = models.reads(model)
        ds = datasets.load(data_name, form=form, label_noise=label_noise, limit=limit)  # named in the title
        data = datasets.per_seed(data_name, form=form, label_noise=label_noise, limit=limit) if label_noise > 0 else ds
        harness.check_forget_sizes(len(ds.y), ratios)
        harness.build_model(ds, model, seeds[0], widths, model_options)
        # PCMU with the run's settings in place of the registry's entry (which has no overrides)
        # and the perturbation methods with --perturb's settings (new entries; the registry is unchanged)
        run_methods = [methods.pcmu_method(pcmu_overrides) if n == "pcmu" else perturbers.get(n, n) for n in names]
        harness.check_validation(methods.resolve(run_methods), model, len(ds.y_test))
    except pcmu_profiles.PCMUSettingError as exc:
        parser.error(f"--pcmu {pcmu_text}: {exc}")
    except perturb_options.PerturbSettingError as exc:
        parser.error(f"--perturb {perturb_text}: {exc}")
    except ValueError as exc:  # DatasetError, ModelError, RecipeError and the checks' refusals
        parser.error(str(exc))
    title = f"unlearn_ext: {ds.name}, {model}, ratios {', '.join(f'{r:g}' for r in ratios)}, seeds {seeds}"
    began = time.perf_counter()
    records = _run_with_progress(harness, data, args.quiet, model=model, methods=run_methods, ratios=ratios, seeds=seeds,
                                 widths=widths, noise_floor_seeds=noise, ud=args.ud, sgd=sgd, recipe=recipe,
                                 model_options=model_options, device=device)
    summary = harness.summarize(records)
    report.print_table(summary, title)
    memorization = precondition.check(records)
    memorization_lines = precondition.lines(memorization, memorizing_asked=label_noise > 0)
    for line in memorization_lines:
        print(line)
    trained = recipe.resolved(model, sgd)
    tested, (_, validation_y) = harness.carve_validation(ds)
    notes = [f"command: `{args.command_line}`",
             f"backend: {backend()}; device: {device}; {time.perf_counter() - began:.0f} s on this machine",
             f"n = {len(ds.y)} training samples, {len(tested.y_test)} test samples and a validation split of "
             f"{len(validation_y)} carved from the test pool ({ds.kind}, one sample "
             f"{'x'.join(map(str, ds.input_shape))}); methods: {', '.join(names)}",
             "training recipe: " + ", ".join(f"{k} {v}" for k, v in trained.items() if v is not None)
             + (f"; model options: {model_options}" if model_options else "")] + _data_notes(ds) + memorization_lines
    if perturb_text is not None:
        used = [n for n in names if n in perturbers]  # each reads every key (_refuse_ignored_perturb_keys)
        notes.append(f"perturbation settings (--perturb, over the model family's) of {', '.join(used)}: "
                     f"{perturb_overrides}")
    if "pcmu" in names:
        notes.append(f"PCMU training ({pcmu_profiles.profile_of(model)} profile"
                     + (f", with --pcmu {pcmu_text}" if pcmu_text else "") + "): "
                     + ", ".join(f"{k} {v}" for k, v in pcmu_settings.items()))
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
            f.write(report.markdown(summary, title, notes))
        pngs = report.plots(summary, out)
        print(f"wrote {os.path.join(out, 'report.md')} and {', '.join(pngs)}")
    if args.json_path:
        payload = {"schema": harness.RECORD_FIELDS, "records": records, "summary": summary,
                   "settings": {"command": args.command_line, "data": ds.name, "data_kind": ds.kind,
                                "input_shape": list(ds.input_shape), "model": model, "model_options": model_options,
                                "methods": names, "ratios": ratios, "seeds": seeds, "epochs": trained["epochs"],
                                "recipe": trained, "label_noise": label_noise, "ud": args.ud, "device": device,
                                "setting": setting.name if setting is not None else None,
                                "pcmu": pcmu_settings if "pcmu" in names else None,
                                "memorization": memorization}}
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1, default=float)
        print(f"wrote {args.json_path}")
    return 0


def _refuse_ignored_perturb_keys(methods, names, model: str, overrides: dict) -> None:
    """Every --perturb key must be read by every selected method of the perturbation family, so that
    no row of the table silently ran without a setting the report lists; refuses the others in one
    line naming each key, the methods that would ignore it and what those read."""
    ignored = methods.perturb_keys_ignored(names, model, overrides)
    groups: dict[tuple, list[str]] = {}
    for key, ignoring in ignored.items():
        groups.setdefault(tuple(ignoring), []).append(key)
    if groups:
        parts = [f"{', '.join(keys)}: not read by " + ", ".join(
            f"{n} (it reads {', '.join(methods.perturb_keys_read(n, model, overrides))})" for n in ignoring)
            for ignoring, keys in groups.items()]
        raise ValueError(f"--perturb {'; '.join(parts)}; drop those keys or evaluate those methods in a run of "
                         "their own")


def _data_notes(ds) -> list[str]:
    """What the columns mean where they differ from a classifier's."""
    if ds.kind != "documents":
        return []
    return ["documents: each training item is one document (forget sets are whole documents, named by their "
            "corpus ids); test / retain / forget are next-token accuracies over the documents' tokens; the MIA "
            "reads each document's mean next-token loss"]


def _run_with_progress(harness, ds, quiet, **kwargs):
    if quiet:
        return harness.evaluate(ds, **kwargs)
    seeds, names, ratios = kwargs["seeds"], kwargs["methods"], kwargs["ratios"]
    total = len(seeds) * (1 + len(names) + len(ratios) * (1 + len(names) + int(kwargs["ud"])))
    if not sys.stdout.isatty():
        # Output to a log file or a pipe: the live bar would reach it only when the run ends, so one line
        # per finished step instead, flushed at once, on stderr (stdout keeps the table).
        done, began = [0], time.monotonic()

        def line(what: str) -> None:
            done[0] += 1
            print(f"[{done[0]}/{total}] {time.monotonic() - began:.0f} s  {what}", file=sys.stderr, flush=True)
        return harness.evaluate(ds, progress=line, **kwargs)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), transient=False) as bar:
        task = bar.add_task("training", total=total)
        return harness.evaluate(ds, progress=lambda what: bar.update(task, advance=1, description=what), **kwargs)


if __name__ == "__main__":
    raise SystemExit(main())
