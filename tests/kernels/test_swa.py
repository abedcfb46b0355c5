"""The torch blockwise SWA against the O(T^2) reference and SDPA, in fp64."""

import pytest
import torch
import torch.nn.functional as F
from fp64 import qkv, rand, rel

from kernels.swa.blockwise import swa_blockwise
from kernels.swa.naive import swa_naive


@pytest.mark.parametrize("window", [0, 1, 5, 8, 30, None])
@pytest.mark.parametrize("hq,hkv", [(4, 1), (2, 2)])
def test_blockwise_swa_matches_naive(window, hq, hkv):
    q, k, v = qkv(2, hq, hkv, 23, 16)
    ref = swa_naive(q, k, v, window)
    out = swa_blockwise(q, k, v, window, block=8)
    assert rel(out, ref) < 1e-12
    dout = rand(*ref.shape, seed=3)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout),
                    strict=True):
        assert rel(a, b) < 1e-12


def test_window_zero_attends_only_to_itself():
    q, k, _ = qkv(1, 2, 2, 9, 8)
    v = rand(1, 2, 9, 8, seed=5)
    assert torch.allclose(swa_blockwise(q, k, v, 0, block=4), v, atol=1e-14)
    assert torch.allclose(swa_naive(q, k, v, 0), v, atol=1e-14)


def test_full_equals_sdpa_causal():
    q, k, v = qkv(2, 4, 2, 17, 8)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    assert rel(swa_naive(q, k, v, None), ref) < 1e-12
    assert rel(swa_blockwise(q, k, v, None), ref) < 1e-12
