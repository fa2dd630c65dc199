"""The package layout a newcomer relies on (README "Where things are"): every op has its schema,
CPU body, CUDA body, reference, wrapper and fake in the predictable place; the import graph has no
cycles; the public names exist."""
from __future__ import annotations

import ast
import pathlib
import re

import unlearn_ext as ue

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "unlearn_ext"


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def internal_imports(path: pathlib.Path, deferred: bool = False) -> set[str]:
    """unlearn_ext modules imported at module level (imports inside functions are deferred on
    purpose and cannot form an import-time cycle); deferred=True: anywhere in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    out = set()
    for node in (ast.walk(tree) if deferred else tree.body):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("unlearn_ext"):
                for alias in node.names:  # `from . import ops` imports the submodule ops
                    sub = f"{target}.{alias.name}"
                    out.add(sub if (ROOT / (sub.replace(".", "/") + ".py")).exists()
                            or (ROOT / sub.replace(".", "/")).is_dir() or sub == "unlearn_ext._C" else target)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("unlearn_ext")}
    return out - {name}


def test_import_graph_has_no_cycles():
    graph = {module_name(p): internal_imports(p) for p in PACKAGE.rglob("*.py")}

    def parents(mod):  # importing a.b.c runs a/__init__ and a/b/__init__ first
        bits = mod.split(".")
        return {".".join(bits[:i]) for i in range(1, len(bits))}

    state, stack = {}, []

    def visit(mod):
        state[mod] = "open"
        stack.append(mod)
        for dep in sorted(graph.get(mod, ())):
            for d in sorted(parents(dep) | {dep}):
                if d == mod or d in parents(mod) or d not in graph:
                    continue
                if state.get(d) == "open":
                    cycle = stack[stack.index(d):] + [d]
                    raise AssertionError("import cycle: " + " -> ".join(cycle))
                if d not in state:
                    visit(d)
        stack.pop()
        state[mod] = "done"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod)


def test_public_names_exist():
    missing = [n for n in ue.__all__ if not hasattr(ue, n)]
    assert not missing, missing
    assert len(set(ue.__all__)) == len(ue.__all__)


def registered_ops() -> list[str]:
    return re.findall(r'^\s*"([a-z_0-9]+)\(', (PACKAGE / "ops" / "schemas.py").read_text(), re.M)


# Ops whose CUDA calls the default kernel (the reference) serves, and why they need no CUDA body.
REFERENCE_ON_CUDA = {
    "select_apply_bin_": "the CUDA select never leaves a selection pending (digit plan 11 + 11 + 10), "
                         "so only a direct call on CUDA tensors reaches it",
    # DeltaGrad's replay ops: their CPU body (replay_cpu.cpp) issues ATen calls only, the reference's
    # own calls in its order, to save Python dispatch on small CPU models; on CUDA the reference makes
    # those same calls (each a kernel launch), and what a C++ body would save there is unmeasured (no GPU).
    "layer_chain_grad_sums_": "the reference issues the same ATen calls (replay_cpu.cpp only saves CPU dispatch)",
    "deltagrad_qn_step_": "the reference issues the same ATen calls (replay_cpu.cpp only saves CPU dispatch)",
    "deltagrad_qn_run_": "the reference issues the same ATen calls (replay_cpu.cpp only saves CPU dispatch)",
}


def test_every_op_has_its_six_places():
    """schema (unlearn_ext/ops/schemas.py), CPU body (csrc/cpu/<family>_cpu.cpp), CUDA body
    (csrc/cuda/<family>_cuda.cu; none for the ops of REFERENCE_ON_CUDA), reference
    (unlearn_ext/reference/<family>.py), wrapper (unlearn_ext/ops/__init__.py) and fake
    (unlearn_ext/ops/fakes.py, FAKES) with its argument check (unlearn_ext/ops/op_checks.py, CHECKS)."""
    ops = registered_ops()
    assert len(ops) >= 16  # the parser must find the registry, not an empty list
    cpu = {p.name[:-len("_cpu.cpp")]: p.read_text() for p in (ROOT / "csrc" / "cpu").glob("*_cpu.cpp")}
    wrappers = (PACKAGE / "ops" / "__init__.py").read_text()
    from unlearn_ext.ops import fakes, op_checks
    problems = []
    for op in ops:
        # registered directly, or listed in the file's per-vector-path op list (csrc/cpu/per_isa_ops.h)
        families = [f for f, text in cpu.items() if f'm.impl("{op}"' in text or f'  X("{op}", ' in text]
        if len(families) != 1:
            problems.append(f"{op}: CPU body in {families or 'no'} csrc/cpu/<family>_cpu.cpp")
            continue
        family = families[0]
        cuda = ROOT / "csrc" / "cuda" / f"{family}_cuda.cu"
        has_cuda = cuda.exists() and f'm.impl("{op}"' in cuda.read_text()
        if op in REFERENCE_ON_CUDA and has_cuda:
            problems.append(f"{op}: has a CUDA body in {cuda.relative_to(ROOT)}; remove it from REFERENCE_ON_CUDA")
        elif op not in REFERENCE_ON_CUDA and not has_cuda:
            problems.append(f"{op}: no CUDA body in {cuda.relative_to(ROOT)}")
        reference = PACKAGE / "reference" / f"{family}.py"
        if not reference.exists() or not re.search(rf"^def {op}\(", reference.read_text(), re.M):
            problems.append(f"{op}: no reference in {reference.relative_to(ROOT)}")
        if not re.search(rf"^def {op}\(", wrappers, re.M):
            problems.append(f"{op}: no wrapper in unlearn_ext/ops/__init__.py")
        if op not in fakes.FAKES:
            problems.append(f"{op}: no fake in unlearn_ext/ops/fakes.py")
        if op not in op_checks.CHECKS:
            problems.append(f"{op}: no argument check in unlearn_ext/ops/op_checks.py")
        if not hasattr(ue.reference, op):
            problems.append(f"{op}: not exported by unlearn_ext.reference")
    assert not problems, "\n".join(problems)
    assert set(REFERENCE_ON_CUDA) <= set(ops)


# The generic multi-tensor walkers (DESIGN section 2; like apex's multi_tensor_apply, they hold no op's
# code) and the only project headers they may include, directly or through one another: multi-tensor
# addressing, float helpers, host/device qualifiers. A family's own header (its math, checks, codec
# geometry or statistics) belongs to the family's files, which include the walker, not the reverse.
WALKER_HEADERS = ["csrc/cpu/cpu_walk.h", "csrc/cuda/cuda_walk.cuh"]
GENERIC_HEADERS = {"csrc/include/unlearn/tensor_list.h", "csrc/include/unlearn/float_math.h",
                   "csrc/include/unlearn/macros.h"}


def project_includes(path: pathlib.Path) -> set[str]:
    """The project headers `path` includes with #include "...", as paths relative to ROOT (looked up
    next to the file, then in csrc/include, as the build does)."""
    out = set()
    for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', path.read_text(), re.M):
        found = [p for p in (path.parent / name, ROOT / "csrc" / "include" / name) if p.exists()]
        assert found, f"{path.relative_to(ROOT)} includes {name}, which is not in the tree"
        out.add(found[0].resolve().relative_to(ROOT).as_posix())
    return out


def included_closure(header: str) -> set[str]:
    seen, todo = set(), [header]
    while todo:
        for inc in project_includes(ROOT / todo.pop()) - seen:
            seen.add(inc)
            todo.append(inc)
    return seen


def test_walker_headers_include_no_family_header():
    problems = []
    for walker in WALKER_HEADERS:
        included = included_closure(walker)
        assert "csrc/include/unlearn/tensor_list.h" in included  # the parser must see the includes
        problems += [f"{walker} includes {inc}, which is not a generic header" for inc in sorted(included - GENERIC_HEADERS)]
    assert not problems, "\n".join(problems)
