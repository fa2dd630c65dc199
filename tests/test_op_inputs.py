"""Public op APIs name the input they refuse (instead of failing deep inside)."""
import pytest
import torch

import unlearn_ext as ue


def test_topk_per_tensor_names_the_tensor_k_does_not_fit():
    scores = [torch.randn(10), torch.randn(1), torch.randn(5)]
    with pytest.raises(ValueError, match=r"scores\[1\] \(shape \[1\]\): k must be in \[0, 1\]"):
        ue.topk_per_tensor(scores, 3)


def test_smooth_quantize_refuses_meta_tensors():
    with pytest.raises(ValueError, match="smooth_quantize returns the smallest radius.*meta tensors do not hold"):
        ue.smooth_quantize([torch.empty(4, device="meta")], tau=0.1, sigma=0.05)
