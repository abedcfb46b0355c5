"""fp64 helpers of the torch-path tests (naive, blockwise, chunked): seeded tensors, relative error.

No Triton here: these tests run on a machine without it.
"""

import torch


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
