"""Triton merge (two per-head RMSNorms and their sum) against the fp64 reference."""

from __future__ import annotations

import pytest
import torch
from triton_harness import DEVICE, TOL, compare, needs_triton, poison_outputs, qkv  # noqa: F401

from kernels.merge.naive import merge_naive

pytestmark = needs_triton


@pytest.mark.parametrize("two_branches", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_matches_reference(two_branches, dtype):
    from kernels.merge.triton import merge

    a, b = qkv(2, 45, 4, 4, 64, dtype, n_q=2, n_k=0)
    g = torch.Generator().manual_seed(3)
    w_a = torch.randn(4, 64, generator=g).to(DEVICE).requires_grad_()
    w_b = torch.randn(4, 64, generator=g).to(DEVICE).requires_grad_()
    if two_branches:
        compare(lambda a, b, wa, wb: merge(a, b.float(), wa, wb), merge_naive, [a, b, w_a, w_b], TOL[dtype])
    else:
        compare(lambda a, wa: merge(a, None, wa, None), lambda a, wa: merge_naive(a, None, wa, None),
                [a, w_a], TOL[dtype])
