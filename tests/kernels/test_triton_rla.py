"""Triton residual linear attention (chunked, segment states) against the fp64 reference."""

from __future__ import annotations

import pytest
import torch
from triton_harness import TOL, compare, needs_triton, poison_outputs, qkv  # noqa: F401

from kernels.reference import rla_naive

pytestmark = needs_triton
T = 45  # not a multiple of the 16-query interpreter chunk


@pytest.mark.parametrize("phi", ["sm2", "relu2"])
@pytest.mark.parametrize("hq,hkv", [(4, 1), (2, 2)])
@pytest.mark.parametrize("window", [0, 1, 7, 16, 23, 44])  # 0, 1, <, =, > chunk, >= T - 1 (sees nothing)
def test_rla_matches_reference(window, hq, hkv, phi):
    from kernels.triton_rla import rla

    inputs = qkv(2, T, hq, hkv, 32, torch.float32, seed=window)
    ref = lambda q, k, v: rla_naive(q, k, v, window, phi)
    if window >= T - 1:  # the output is exactly zero: check it is written and has no gradient
        q, k, v = inputs
        out = rla(q, k, v, window, phi)
        assert torch.equal(out, torch.zeros_like(out))
        return
    compare(lambda q, k, v: rla(q, k, v, window, phi), ref, inputs, TOL[torch.float32])


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("phi", ["sm2", "relu2"])
def test_rla_head_dims(d, phi):
    from kernels.triton_rla import rla

    inputs = qkv(1, T, 4, 1, d, torch.float32, seed=d)
    compare(lambda q, k, v: rla(q, k, v, 5, phi), lambda q, k, v: rla_naive(q, k, v, 5, phi), inputs,
            TOL[torch.float32])


@pytest.mark.parametrize("chunk,seg_chunks", [(16, 1), (16, 3), (32, 1)])
def test_rla_chunk_and_segment_sizes(chunk, seg_chunks):
    """The segment length m (states stored every m chunks, recomputed inside) never changes the result."""
    from kernels.triton_rla import rla

    inputs = qkv(1, 70, 2, 1, 32, torch.float32, seed=7)
    compare(lambda q, k, v: rla(q, k, v, 9, "sm2", chunk, seg_chunks),
            lambda q, k, v: rla_naive(q, k, v, 9, "sm2"), inputs, TOL[torch.float32])


@pytest.mark.parametrize("phi", ["sm2", "relu2"])
def test_rla_bf16(phi):
    from kernels.triton_rla import rla

    inputs = qkv(2, T, 4, 1, 64, torch.bfloat16, seed=11)
    compare(lambda q, k, v: rla(q, k, v, 7, phi), lambda q, k, v: rla_naive(q, k, v, 7, phi), inputs,
            TOL[torch.bfloat16])


def test_rla_stores_states_only_at_segment_starts():
    """The saved states are (B, Hkv, ceil(ceil(T/C)/m), 2D, D) fp32, and each is S over the keys before it."""
    from kernels.torch_ops import rla_state
    from kernels.triton_rla import rla_fwd

    q, k, v = qkv(1, 70, 2, 1, 32, torch.float32, seed=2)
    _, states = rla_fwd(q, k, v, 9, "sm2", chunk=16, seg_chunks=2)
    assert states.shape == (1, 1, 3, 64, 32) and states.dtype == torch.float32
    for j in range(3):  # segment j starts at query 32 j and reads the keys < 32 j - 10
        ref = rla_state(k.detach().double().cpu(), v.detach().double().cpu(), 32 * j - 10)
        torch.testing.assert_close(states[:, :, j].double().cpu(), ref, rtol=1e-5, atol=1e-6)
