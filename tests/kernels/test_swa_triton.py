"""Triton sliding-window attention (forward, LSE, backward) against the fp64 reference."""

from __future__ import annotations

import pytest
import torch
from triton_harness import TOL, compare, needs_triton, poison_outputs, qkv, rel_err  # noqa: F401

from kernels.swa.naive import swa_naive

pytestmark = needs_triton
T = 45  # not a multiple of the 16-row interpreter block (GPU blocks: 64/128)


@pytest.mark.parametrize("hq,hkv", [(4, 1), (2, 2)])
@pytest.mark.parametrize("window", [0, 1, 7, 16, 23, 44, 100, None])  # 0, 1, <, =, > block, >= T, full
def test_swa_matches_reference(window, hq, hkv):
    from kernels.swa.triton import swa

    inputs = qkv(2, T, hq, hkv, 32, torch.float32, n_q=1, n_k=2)
    compare(lambda q, k, v: swa(q, k, v, window), lambda q, k, v: swa_naive(q, k, v, window), inputs,
            TOL[torch.float32])


@pytest.mark.parametrize("d", [64, 128])
def test_swa_head_dims(d):
    from kernels.swa.triton import swa

    inputs = qkv(1, T, 4, 1, d, torch.float32, seed=d)
    compare(lambda q, k, v: swa(q, k, v, 16), lambda q, k, v: swa_naive(q, k, v, 16), inputs, TOL[torch.float32])


@pytest.mark.parametrize("window", [7, None])
def test_swa_bf16(window):
    from kernels.swa.triton import swa

    inputs = qkv(2, T, 4, 1, 64, torch.bfloat16, seed=3)
    compare(lambda q, k, v: swa(q, k, v, window), lambda q, k, v: swa_naive(q, k, v, window), inputs,
            TOL[torch.bfloat16])


def test_swa_saves_log_sum_exp():
    """The forward's LSE (base 2) is log2 sum_j exp(scale q.k_j) over the window: what the backward reuses."""
    import math

    from kernels.common import window_mask
    from kernels.swa.triton import swa_fwd

    q, k, v = qkv(1, T, 2, 1, 32, torch.float32, seed=5)
    o, lse = swa_fwd(q, k, v, 7)
    s = torch.einsum("bhtd,bsd->bhts", q.double().cpu(), k[:, 0].double().cpu()) / math.sqrt(32)
    s = s.masked_fill(~window_mask(T, T, 7), float("-inf"))
    assert rel_err(lse, torch.logsumexp(s, -1) / math.log(2)) < 1e-6
    assert rel_err(o, swa_naive(q.double().cpu(), k.double().cpu(), v.double().cpu(), 7)) < 1e-5
