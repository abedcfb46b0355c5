"""Triton residual linear attention (chunked, segment states) against the fp64 reference."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from triton_harness import DEVICE, TOL, compare, needs_triton, poison_outputs, qkv  # noqa: F401

from kernels.rla.naive import rla_naive
from kernels.rla.triton import STATE_PASSES, _round_bf16

pytestmark = needs_triton
T = 45  # not a multiple of the 16-query interpreter chunk
# every test runs under each way of making the chunk states (kernels.rla.triton.STATE_PASSES)
by_state_pass = pytest.mark.parametrize("state_pass", STATE_PASSES)
assert set(STATE_PASSES) == {"cumsum", "scan", "segscan"}


def by_state_pass_on(names: str, grid: list[tuple], scan_keeps) -> pytest.MarkDecorator:
    """Each case of ``grid`` under "cumsum" (the default) and "segscan"; "scan", the same kernel as segscan
    with one segment spanning the sequence, on the cases ``scan_keeps(case)`` picks (the interpreter's time
    is CI's budget)."""
    cases = [(*c, p) for c in grid for p in ("cumsum", "segscan")] + [(*c, "scan") for c in grid if scan_keeps(c)]
    return pytest.mark.parametrize(f"{names},state_pass", cases)


WINDOWS = [0, 1, 7, 16, 23, 44]  # 0, 1, <, =, > chunk, >= T - 1 (sees nothing)


@by_state_pass_on("window,hq,hkv,phi",
                  [(w, hq, hkv, phi) for w in WINDOWS for hq, hkv in [(4, 1), (2, 2)] for phi in ["sm2", "relu2"]],
                  lambda c: c[0] in (1, 23) and c[3] == "sm2")
def test_rla_matches_reference(window, hq, hkv, phi, state_pass):
    from kernels.rla.triton import rla

    inputs = qkv(2, T, hq, hkv, 32, torch.float32, seed=window)
    ref = lambda q, k, v: rla_naive(q, k, v, window, phi)
    if window >= T - 1:  # the output is exactly zero: check it is written and has no gradient
        q, k, v = inputs
        out = rla(q, k, v, window, phi, state_pass=state_pass)
        assert torch.equal(out, torch.zeros_like(out))
        return
    compare(lambda q, k, v: rla(q, k, v, window, phi, state_pass=state_pass), ref, inputs, TOL[torch.float32])


@by_state_pass_on("d,phi", [(d, phi) for d in [64, 128] for phi in ["sm2", "relu2"]], lambda c: c == (128, "sm2"))
def test_rla_head_dims(d, phi, state_pass):
    from kernels.rla.triton import rla

    inputs = qkv(1, T, 4, 1, d, torch.float32, seed=d)
    compare(lambda q, k, v: rla(q, k, v, 5, phi, state_pass=state_pass), lambda q, k, v: rla_naive(q, k, v, 5, phi),
            inputs, TOL[torch.float32])


@by_state_pass
@pytest.mark.parametrize("chunk,seg_chunks", [(16, 1), (16, 3), (32, 1)])
def test_rla_chunk_and_segment_sizes(chunk, seg_chunks, state_pass):
    """The segment length m (states stored every m chunks, recomputed inside) never changes the result."""
    from kernels.rla.triton import rla

    inputs = qkv(1, 70, 2, 1, 32, torch.float32, seed=7)
    compare(lambda q, k, v: rla(q, k, v, 9, "sm2", chunk, seg_chunks, state_pass),
            lambda q, k, v: rla_naive(q, k, v, 9, "sm2"), inputs, TOL[torch.float32])


@by_state_pass_on("phi", [("sm2",), ("relu2",)], lambda c: c == ("sm2",))
def test_rla_bf16(phi, state_pass):
    from kernels.rla.triton import rla

    inputs = qkv(2, T, 4, 1, 64, torch.bfloat16, seed=11)
    compare(lambda q, k, v: rla(q, k, v, 7, phi, state_pass=state_pass), lambda q, k, v: rla_naive(q, k, v, 7, phi),
            inputs, TOL[torch.bfloat16])


@by_state_pass
def test_rla_stores_states_only_at_segment_starts(state_pass):
    """The saved states are (B, Hkv, ceil(ceil(T/C)/m), 2D, D) fp32, and each is S over the keys before it."""
    from kernels.rla.chunked import rla_state
    from kernels.rla.triton import rla_fwd

    q, k, v = qkv(1, 70, 2, 1, 32, torch.float32, seed=2)
    _, states = rla_fwd(q, k, v, 9, "sm2", chunk=16, seg_chunks=2, state_pass=state_pass)
    assert states.shape == (1, 1, 3, 64, 32) and states.dtype == torch.float32
    for j in range(3):  # segment j starts at query 32 j and reads the keys < 32 j - 10
        ref = rla_state(k.detach().double().cpu(), v.detach().double().cpu(), 32 * j - 10)
        torch.testing.assert_close(states[:, :, j].double().cpu(), ref, rtol=1e-5, atol=1e-6)


@by_state_pass_on("phi", [("sm2",), ("relu2",)], lambda c: c == ("sm2",))
def test_rla_bf16_operands_one_value_block(phi, state_pass, monkeypatch):
    """GPU tuning options: bf16 operands in the output/dV products (rounded as the GPU rounds; the scans
    then store the forward states in bf16) with one value block of width D (the interpreter's 64 at D=64:
    phi and scores once per row block) stay within the bf16 tolerance (measured at T=512, D=128: 5e-4 on
    o, 3.3e-3 on dv, as without them). The scans' state tiles here are smaller than a row (8 per head,
    softmax statistics read in blocks)."""
    from kernels.rla import triton as triton_rla

    monkeypatch.setitem(triton_rla.INTERP_CFG, "out_lowp", True)
    monkeypatch.setitem(triton_rla.INTERP_CFG, "scan_bk", 16)
    monkeypatch.setitem(triton_rla.INTERP_CFG, "scan_bv", 32)
    inputs = qkv(1, T, 4, 1, 64, torch.bfloat16, seed=12)
    compare(lambda q, k, v: triton_rla.rla(q, k, v, 7, phi, state_pass=state_pass),
            lambda q, k, v: rla_naive(q, k, v, 7, phi), inputs, TOL[torch.bfloat16])


@triton.jit
def _round_kernel(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, _round_bf16(tl.load(X + offs)))


def test_round_bf16_matches_torch():
    """The interpreter's stand-in for the GPU's bf16 cast rounds to nearest, ties to even, like torch."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1024, generator=g) * torch.logspace(-20, 20, 1024)
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2**-126 * (1 + 2**-8)]).repeat(256)
    x = torch.cat([x, ties]).to(DEVICE)
    y = torch.empty_like(x)
    _round_kernel[(1,)](x, y, N=x.numel())
    assert torch.equal(y.cpu(), x.cpu().bfloat16().float())
