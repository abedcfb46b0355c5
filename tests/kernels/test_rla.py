"""The torch CPU paths (blockwise SWA, chunked RLA) against the O(T^2) reference, in fp64."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.reference import feature_map, merge_naive, rla_naive, swa_naive
from kernels.torch_ops import rla_chunked, rla_state, swa_blockwise


def rand(*shape, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)


def qkv(b, hq, hkv, t, d, seed=0):
    return rand(b, hq, t, d, seed=seed, grad=True), rand(b, hkv, t, d, seed=seed + 1, grad=True), rand(
        b, hkv, t, d, seed=seed + 2, grad=True)


def rel(a, b):
    """Relative error; 0 when both are exactly zero (e.g. q/k gradients at window 0)."""
    if b.norm() == 0:
        return a.norm().item()
    return ((a - b).norm() / b.norm()).item()


C = 8


@pytest.mark.parametrize("window", [0, 1, C - 1, C, C + 1, 40])
@pytest.mark.parametrize("hq,hkv", [(4, 1), (2, 2)])
@pytest.mark.parametrize("phi", ["sm2", "relu2"])
def test_chunked_rla_matches_naive(window, hq, hkv, phi):
    t = 29  # not a multiple of the chunk
    q, k, v = qkv(2, hq, hkv, t, 16)
    ref = rla_naive(q, k, v, window, phi)
    out = rla_chunked(q, k, v, window, phi, chunk=C)
    if window >= t - 1:
        assert torch.count_nonzero(ref) == 0
    assert rel(out, ref) < 1e-12
    dout = rand(*ref.shape, seed=7)
    g_ref = torch.autograd.grad(ref, (q, k, v), dout, allow_unused=True)
    g_out = torch.autograd.grad(out, (q, k, v), dout, allow_unused=True)
    for a, b in zip(g_out, g_ref, strict=True):
        if a is None or b is None:  # no key is ever read (w >= T - 1): no gradient path at all
            assert window >= t - 1
        else:
            assert rel(a, b) < 1e-12


@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 40), window=st.integers(0, 45), chunk=st.integers(1, 17),
       group=st.sampled_from([1, 2, 4]), phi=st.sampled_from(["sm2", "relu2"]))
def test_chunked_rla_property(t, window, chunk, group, phi):
    q, k, v = qkv(1, 2 * group, 2, t, 8, seed=t * 131 + window)
    ref = rla_naive(q, k, v, window, phi)
    out, state = rla_chunked(q, k, v, window, phi, chunk=chunk, return_state=True)
    assert torch.allclose(out, ref, atol=1e-11, rtol=1e-10)
    # the final state holds keys i <= T - w - 2, where decoding continues
    assert torch.allclose(state, rla_state(k, v, t - window - 1, phi), atol=1e-11)


def test_chunked_rla_gradcheck():
    q, k, v = qkv(1, 2, 1, 7, 4)
    for phi in ("sm2", "relu2"):
        assert torch.autograd.gradcheck(lambda q, k, v, phi=phi: rla_chunked(q, k, v, 2, phi, chunk=3), (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: swa_blockwise(q, k, v, 2, block=3), (q, k, v))


def test_rla_reads_exactly_the_keys_outside_the_window():
    # o[t] = sum_{j <= t-w-1} (phi(q_t).phi(k_j)) v_j: check with one-hot values per key position.
    t, w, d = 10, 3, 10
    q, k = rand(1, 1, t, d), rand(1, 1, t, d, seed=1)
    v = torch.eye(t, dtype=torch.float64)[None, None]  # v_j = e_j
    out = rla_chunked(q, k, v, w, "sm2", chunk=4)
    for ti in range(t):
        seen = (out[0, 0, ti] != 0).nonzero().flatten().tolist()
        assert seen == list(range(0, max(0, ti - w)))


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


def test_feature_maps():
    x = rand(3, 5)
    sm = feature_map(x, "sm2")
    assert sm.shape == (3, 10)
    assert torch.allclose(sm[:, :5].sum(-1), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(sm[:, 5:], torch.softmax(-x, -1))
    r = feature_map(x, "relu2")
    assert torch.equal(r[:, :5] - r[:, 5:], x) and (r >= 0).all()
    with pytest.raises(ValueError, match="allowed: sm2, relu2"):
        feature_map(x, "elu")


def test_merge_is_per_head_rmsnorm():
    o1, o2 = rand(1, 2, 5, 4), rand(1, 2, 5, 4, seed=1)
    w1, w2 = rand(2, 4, seed=2), rand(2, 4, seed=3)
    out = merge_naive(o1, o2, w1, w2, eps=0.0)
    expect = sum(o / o.pow(2).mean(-1, keepdim=True).sqrt() * w[None, :, None, :] for o, w in ((o1, w1), (o2, w2)))
    assert rel(out, expect) < 1e-14
