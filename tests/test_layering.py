"""The import graph reads top-down (README "Where things are"): every module of the package sits on
one layer, and a module imports only from its own layer or the layers below it -- deferred imports
inside functions included, since they are edges of the design all the same. On top of that:
production code never takes anything from `reference` (the pure-PyTorch truth the kernels are
tested against) except `ops`, which serves it as the fallback; and the method families do not
import one another. A new module must be placed on a layer here, or this test fails."""
from __future__ import annotations

import ast
import pathlib

import pytest

from test_layout import PACKAGE, ROOT, internal_imports, module_name

# Bottom to top. A module belongs to the first entry that is its name or a package above it.
LAYERS = [
    ("formats", ["unlearn_ext.codec_format", "unlearn_ext.rng_format", "unlearn_ext.radix", "unlearn_ext.durable",
                 "unlearn_ext.ledger_journal",
                 "unlearn_ext.parameters", "unlearn_ext.forward", "unlearn_ext.chain_format"]),
    ("reference", ["unlearn_ext.reference"]),
    ("ops", ["unlearn_ext.ops", "unlearn_ext.checks", "unlearn_ext.rng", "unlearn_ext.selection",
             "unlearn_ext._C"]),
    ("foundation", ["unlearn_ext.data", "unlearn_ext.loading", "unlearn_ext.recipe", "unlearn_ext.policy", "unlearn_ext.backward_passes",
                    "unlearn_ext.loss_probe",
                    "unlearn_ext.per_sample", "unlearn_ext.model_state", "unlearn_ext.step_log", "unlearn_ext.unlearner",
                    "unlearn_ext.ledger", "unlearn_ext.history", "unlearn_ext.metrics", "unlearn_ext.mia",
                    "unlearn_ext.spdgan"]),
    ("families", ["unlearn_ext.baselines", "unlearn_ext.pcmu", "unlearn_ext.mini", "unlearn_ext.perturb"]),
    # distributed: the families across ranks (it drives PCMU, the ledger and the selection)
    ("top", ["unlearn_ext.engine", "unlearn_ext.loop_guard", "unlearn_ext.distributed", "unlearn_ext.evaluate", "unlearn_ext.cli", "unlearn_ext.__main__",
             "unlearn_ext"]),
]
FAMILIES = dict(LAYERS)["families"]
REFERENCE_USERS = ("unlearn_ext.reference", "unlearn_ext.ops")


def owner(module: str, groups) -> str | None:
    """The entry of `groups` that `module` is, or sits inside (most specific first)."""
    for group in sorted(groups, key=len, reverse=True):
        if module == group or module.startswith(group + "."):
            return group
    return None


def layer_of(module: str) -> int | None:
    # The package itself (its __init__) is one module on top, not a prefix of every module.
    found = [(len(g), i) for i, (_, groups) in enumerate(LAYERS) for g in groups
             if module == g or (g != "unlearn_ext" and module.startswith(g + "."))]
    return max(found)[1] if found else None


def all_imports(path: pathlib.Path) -> set[str]:
    """unlearn_ext modules imported anywhere in the file (module level or inside functions)."""
    return internal_imports(path, deferred=True)


def edges() -> list[tuple[str, str]]:
    return sorted((module_name(p), dep) for p in PACKAGE.rglob("*.py") for dep in all_imports(p))


def violations(graph: list[tuple[str, str]]) -> list[str]:
    out = []
    for src, dst in graph:
        ls, ld = layer_of(src), layer_of(dst)
        if ls is None or ld is None:
            out.append(f"{src if ls is None else dst}: on no layer (add it to LAYERS in tests/test_layering.py)")
            continue
        if ld > ls:
            out.append(f"{src} ({LAYERS[ls][0]}) imports {dst} ({LAYERS[ld][0]}), a layer above it")
        if owner(dst, ["unlearn_ext.reference"]) and not owner(src, REFERENCE_USERS):
            out.append(f"{src} imports {dst}: production code takes nothing from the reference")
        fs, fd = owner(src, FAMILIES), owner(dst, FAMILIES)
        if fs and fd and fs != fd:
            out.append(f"{src} imports {dst}: one method family imports another")
    return out


def test_every_module_is_on_a_layer():
    unplaced = sorted(m for m in (module_name(p) for p in PACKAGE.rglob("*.py")) if layer_of(m) is None)
    assert not unplaced, f"modules on no layer (add them to LAYERS): {unplaced}"


def test_the_import_graph_has_no_edge_against_the_layering():
    graph = edges()
    assert len(graph) > 100  # the parser must find the graph, not an empty list
    assert not violations(graph), "\n".join(violations(graph))


@pytest.mark.parametrize("edge, rule", [
    (("unlearn_ext.data", "unlearn_ext.pcmu.trainer"), "a layer above it"),
    (("unlearn_ext.history.codecs", "unlearn_ext.reference.codecs"), "takes nothing from the reference"),
    (("unlearn_ext.mini.unlearner", "unlearn_ext.perturb.scores"), "one method family imports another"),
    (("unlearn_ext.ops.fakes", "unlearn_ext.evaluate.harness"), "a layer above it"),
    (("unlearn_ext.newthing", "unlearn_ext.data"), "on no layer"),
])
def test_each_rule_catches_an_edge_against_it(edge, rule):
    found = violations([edge])
    assert len(found) == 1 and rule in found[0], found
