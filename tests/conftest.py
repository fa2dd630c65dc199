import pytest
import torch

import unlearn_ext as ue

requires_compiled = pytest.mark.skipif(not ue.compiled(), reason="compiled extension not built")


def devices():
    out = ["cpu"]
    if torch.cuda.is_available() and ue.cuda_built():
        out.append(pytest.param("cuda", marks=pytest.mark.cuda))
    return out
