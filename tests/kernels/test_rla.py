"""The torch chunked RLA and the state S against the O(T^2) reference, in fp64; the feature maps."""

import pytest
import torch
from fp64 import qkv, rand, rel
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.common import feature_map
from kernels.rla.chunked import rla_chunked, rla_state
from kernels.rla.naive import rla_naive
from kernels.swa.blockwise import swa_blockwise

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
