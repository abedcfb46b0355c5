"""The entry points in kernels.ops: torch path on CPU, Triton custom ops (interpreter), torch.compile."""

from __future__ import annotations

import pytest
import torch
from triton_harness import DEVICE, TOL, compare, needs_triton, poison_outputs, qkv  # noqa: F401

import kernels
from kernels import ops
from kernels.common import feature_map
from kernels.merge.naive import merge_naive, rattention_naive
from kernels.rla.chunked import rla_state
from kernels.rla.naive import rla_naive
from kernels.swa.naive import swa_naive


def _weights(hq, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(1 + 0.3 * torch.randn(hq, d, generator=g)).to(DEVICE).requires_grad_() for _ in range(2)]


@needs_triton
@pytest.mark.parametrize("state_pass", ["cumsum", "scan", "segscan"])  # kernels.rla.triton.STATE_PASSES
@pytest.mark.parametrize("window", [0, 9, 40])
def test_rattention_triton_op_matches_reference(window, state_pass):
    q, qr, k, kr, v = qkv(2, 40, 4, 1, 32, torch.float32, n_q=2, n_k=3)
    ws, wr = _weights(4, 32)
    fn = lambda *a: ops.rattention_triton(*a[:5], window, a[5], a[6], "sm2", 1e-6, None, 16, 2, state_pass)
    ref = lambda *a: rattention_naive(*a[:5], window, a[5], a[6])
    compare(fn, ref, [q, k, qr, kr, v, ws, wr], TOL[torch.float32])


@needs_triton
def test_normed_attention_and_attention_triton_ops():
    q, k, v = qkv(2, 40, 4, 2, 32, torch.float32)
    (ws, _) = _weights(4, 32)
    compare(lambda q, k, v, w: ops.normed_attention_triton(q, k, v, 5, w),
            lambda q, k, v, w: merge_naive(swa_naive(q, k, v, 5), None, w, None), [q, k, v, ws], TOL[torch.float32])
    compare(lambda q, k, v: ops.attention_triton(q, k, v, None), lambda q, k, v: swa_naive(q, k, v, None),
            [q, k, v], TOL[torch.float32])


@needs_triton
def test_ops_trace_under_torch_compile():
    """The custom ops have fake implementations and autograd: a full graph compiles and matches eager."""
    q, qr, k, kr, v = qkv(1, 40, 2, 1, 32, torch.float32, n_q=2, n_k=3)
    ws, wr = _weights(2, 32)
    fn = lambda *a: ops.rattention_triton(a[0], a[2], a[1], a[3], a[4], 7, a[5], a[6], "relu2", 1e-6, None, 16, 2)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    ins = [q, qr, k, kr, v, ws, wr]
    out, out_c = fn(*ins), compiled(*ins)
    do = torch.randn_like(out)
    g, g_c = torch.autograd.grad(out, ins, do), torch.autograd.grad(out_c, ins, do)
    torch.testing.assert_close(out_c, out)
    for a, b in zip(g_c, g, strict=True):
        torch.testing.assert_close(a, b)


def test_cpu_entry_points_use_the_torch_path_and_match_reference():
    """On CPU the public ops run the torch paths (swa.blockwise, rla.chunked); same semantics as the reference
    (fp64 inputs)."""
    g = torch.Generator().manual_seed(0)
    q, qr = (torch.randn(2, 4, 33, 16, generator=g, dtype=torch.float64) for _ in range(2))
    k, kr, v = (torch.randn(2, 2, 33, 16, generator=g, dtype=torch.float64) for _ in range(3))
    ws, wr = (torch.randn(4, 16, generator=g, dtype=torch.float64) for _ in range(2))
    for w in (0, 5, None):
        torch.testing.assert_close(kernels.attention(q, k, v, w), swa_naive(q, k, v, w))
    torch.testing.assert_close(kernels.rattention(q, k, qr, kr, v, 5, ws, wr, chunk=8),
                               rattention_naive(q, k, qr, kr, v, 5, ws, wr))
    torch.testing.assert_close(kernels.normed_attention(q, k, v, 5, ws),
                               merge_naive(swa_naive(q, k, v, 5), None, ws, None))


def test_decode_helpers_continue_the_parallel_pass():
    """attention_decode at the last position and rla_decode/rla_fold equal the reference's last row."""
    g = torch.Generator().manual_seed(1)
    t, w = 20, 4
    q = torch.randn(1, 4, t, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, t, 16, generator=g, dtype=torch.float64) for _ in range(2))
    o = kernels.attention_decode(q[:, :, -1:], k[:, :, t - 1 - w:], v[:, :, t - 1 - w:])
    torch.testing.assert_close(o, swa_naive(q, k, v, w)[:, :, -1:])
    state = rla_state(k, v, t - w - 2)  # keys < t-w-2; fold the key t-w-2 as it leaves the window
    state = kernels.rla_fold(state, k[:, :, t - w - 2:t - w - 1], v[:, :, t - w - 2:t - w - 1])
    torch.testing.assert_close(kernels.rla_decode(q[:, :, -1:], state), rla_naive(q, k, v, w)[:, :, -1:])
    assert feature_map(q, "sm2").shape[-1] == 32
