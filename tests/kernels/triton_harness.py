"""Shared harness for the Triton kernel tests: device choice, poisoning, fp64 comparisons.

On CPU the kernels run under TRITON_INTERPRET=1 (CI); on a GPU box the same tests run on CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}

needs_triton = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRET, reason="Triton needs CUDA or TRITON_INTERPRET=1"
)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every kernel output is allocated NaN-filled, so an unwritten element fails the comparison."""
    pytest.importorskip("triton")
    from kernels import triton_utils

    monkeypatch.setattr(triton_utils, "POISON", True)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in fp64 (||x|| where ref is exactly zero); inf where x has NaN/inf."""
    x = x.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if not torch.isfinite(x).all():
        return float("inf")
    n = ref.norm().item()
    return ((x - ref).norm().item() / n) if n > 0 else x.norm().item()


def qkv(b: int, t: int, hq: int, hkv: int, d: int, dtype: torch.dtype, n_q: int = 1, n_k: int = 2, seed: int = 0):
    """Random q-like (B, Hq, T, D) and k-like (B, Hkv, T, D) tensors, as strided model-layout views."""
    g = torch.Generator().manual_seed(seed)

    def view(h):
        x = torch.randn(b, t, h, d, generator=g).to(dtype).to(DEVICE)
        return x.transpose(1, 2).requires_grad_()

    return [view(hq) for _ in range(n_q)] + [view(hkv) for _ in range(n_k)]


def compare(fn, ref_fn, inputs: list[torch.Tensor], tol: float) -> None:
    """Output and every input gradient of fn vs ref_fn run in fp64 on CPU copies."""
    out = fn(*inputs)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    grads = torch.autograd.grad(out, inputs, do.to(out.dtype))
    ref_in = [x.detach().double().cpu().requires_grad_() for x in inputs]
    ref = ref_fn(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, do.double().cpu())
    errs = {"out": rel_err(out, ref)}
    errs.update({f"grad[{i}]": rel_err(a, b) for i, (a, b) in enumerate(zip(grads, ref_grads, strict=True))})
    bad = {k: v for k, v in errs.items() if not v < tol}
    assert not bad, f"relative errors over {tol}: {bad} (all: {errs})"
