"""Defines every op with torch.library, whether or not the compiled extension is built:

  * the schemas (schemas.py);
  * the pure-PyTorch reference as each op's default kernel (CompositeExplicitAutograd): it serves
    every device the compiled build has no kernel for, all of them under
    UNLEARN_EXT_BACKEND=reference or without a build, and calls whose lists are all empty (they
    carry no tensor, hence no device key to pick a kernel by);
  * the fakes (fakes.py) for torch.compile and meta tensors.

The compiled CPU and CUDA kernels (csrc/cpu, csrc/cuda) register for their own keys and override
the reference there; csrc/ops.cpp adds the autograd kernels. The reference kernels and the fakes
run the op's argument check (op_checks.py) first, so every backend refuses a bad call alike.
"""
from __future__ import annotations

import functools

import torch

from .. import reference
from . import fakes, loader, op_checks
from .schemas import SCHEMAS, op_name

NAMESPACE = "unlearn_ext"
NAMES = tuple(op_name(s) for s in SCHEMAS)

# The registrations live as long as this object (the module keeps it for the process's lifetime).
LIBRARY = torch.library.Library(NAMESPACE, "DEF")


def checked(name: str, body):
    """body behind op `name`'s argument check and the written-tensor check."""
    check = op_checks.CHECKS[name]
    schema = getattr(torch.ops.unlearn_ext, name).default._schema

    @functools.wraps(body)
    def kernel(*args):
        op_checks.check_written(schema, args)  # first, as csrc/ops.cpp checks before the kernels do
        check(*args)
        return body(*args)
    return kernel


def reference_kernel(name: str):
    """The reference of op `name` as the dispatcher runs it: behind the op's checks, refusing what
    torch refuses for an in-place op (a leaf that requires grad, in grad mode), computed without
    autograd: the ops have no derivative, so their outputs carry no gradient function (a backward
    through them raises) instead of one derived from the reference's arithmetic. The compiled
    build's autograd kernels (csrc/ops.cpp) do the same before any kernel, the reference included."""
    body = getattr(reference, name)
    schema = getattr(torch.ops.unlearn_ext, name).default._schema

    def run(*args):
        if torch.is_grad_enabled():
            for t in op_checks.written_tensors(schema, args):
                torch._check(not (t.is_leaf and t.requires_grad), lambda: "a leaf Variable that requires grad "
                             "is being used in an in-place operation.")
        with torch.no_grad():
            return body(*args)
    return checked(name, run)


def _register() -> None:
    for schema in SCHEMAS:
        LIBRARY.define(schema)
    for name in NAMES:
        LIBRARY.impl(name, reference_kernel(name), "CompositeExplicitAutograd")
        torch.library.register_fake(f"{NAMESPACE}::{name}", lib=LIBRARY)(checked(name, fakes.FAKES[name]))
    if loader.compiled():
        loader._C.register_autograd_kernels()


_register()
