"""The jaxtyping shapes of the public tensor functions are checked at run time in this suite (conftest.py)."""

import jaxtyping
import pytest
import torch

from selfrepair.analysis import local_effects
from selfrepair.engine import ablated_pattern, expand_kv


def test_a_wrong_rank_is_caught():
    """expand_kv takes [batch, pos, kv_head, d_head]: a 3-d tensor fails the annotation, not somewhere inside."""
    assert expand_kv(torch.zeros(2, 3, 1, 4), 2).shape == (2, 3, 2, 4)
    with pytest.raises(jaxtyping.TypeCheckError):
        expand_kv(torch.zeros(2, 3, 4), 2)


def test_dimensions_are_bound_across_arguments():
    """local_effects: scores [R, n] and values [R, n, d_head] must agree on R and n."""
    R, n, d = 2, 5, 3
    mask = torch.ones(R, n, dtype=torch.bool)
    keys = torch.tensor([[1, 2], [3, 4]])
    ok = local_effects(torch.randn(R, n), torch.randn(R, n, d), torch.randn(R, d), mask, keys)
    assert ok["effect_joint"].shape == (R,)
    with pytest.raises(jaxtyping.TypeCheckError):
        local_effects(torch.randn(R, n), torch.randn(R, n + 1, d), torch.randn(R, d), mask, keys)


def test_dtypes_are_checked():
    """ablated_pattern's masks are Bool: an integer mask is refused by the annotation."""
    a = torch.randn(2, 4)
    m = torch.ones(2, 4, dtype=torch.bool)
    assert torch.allclose(ablated_pattern(a, m, torch.zeros_like(m)).sum(-1), torch.ones(2))
    with pytest.raises(jaxtyping.TypeCheckError):
        ablated_pattern(a, m.long(), torch.zeros_like(m))
