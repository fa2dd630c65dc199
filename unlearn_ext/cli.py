"""Command line: `unlearn-ext demo` (both PCMU examples: certified training, certificates, deletion
requests), `unlearn-ext pcmu synthetic|digits` (one of them) and `unlearn-ext info` (what is built)."""
from __future__ import annotations

import argparse
import json

from . import backend, build_info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="unlearn-ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="PCMU on synthetic data (m* >= 1) and on digits (m* = 0)")
    p = sub.add_parser("pcmu", help="one PCMU example")
    p.add_argument("example", choices=["synthetic", "digits"])
    p.add_argument("--mode", choices=["analytic", "mc"], default="analytic")
    for a in (d, p):
        a.add_argument("--seed", type=int, default=0)
        a.add_argument("--requests", type=int, default=12, help="single-id requests to check")
        a.add_argument("--json", action="store_true", help="print the results as JSON")
    sub.add_parser("info", help="print what is built (backend, CUDA, CPU flags)")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(json.dumps(build_info(), indent=2))
        return 0
    from .pcmu.examples import report, run

    names = ["synthetic", "digits"] if args.command == "demo" else [args.example]
    mode = getattr(args, "mode", "analytic")
    results = [run(name, seed=args.seed, requests=args.requests, mode=mode) for name in names]
    if args.json:
        print(json.dumps({"backend": backend(), "examples": results}, indent=1, default=float))
        return 0
    print(f"unlearn_ext — backend: {backend()}")
    for r in results:
        print(report(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
