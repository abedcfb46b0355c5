"""The model on CUDA (``make test-gpu`` on a GPU box; skipped elsewhere): the Triton path of every kind
against the torch path of the same weights, forward and every parameter gradient, and decoding through the
cache against the parallel forward. The CPU tests (test_model.py) hold the fp64 contracts; these check that
the kernels the model dispatches to on CUDA keep them, at fp32 and bf16 tolerances."""

from __future__ import annotations

import pytest
import torch

from rattention.config import ModelConfig
from rattention.generate import stepwise_logits
from rattention.model import LM, Attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (make test-gpu)")

SMALL = dict(vocab_size=97, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, seq_len=256)
TOL = {"float32": 2e-4, "bfloat16": 5e-2}


def small(kind: str, dtype: str, **kw) -> LM:
    torch.manual_seed(0)
    m = LM(ModelConfig(**{**SMALL, "kind": kind, "dtype": dtype, **kw})).cuda()
    for name, p in m.named_parameters():  # both branches carry signal
        if name.endswith(("norm_rla", "norm_swa")):
            p.data.uniform_(0.5, 1.5)
    return m


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def loss_and_grads(m: LM, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    m.zero_grad(set_to_none=True)
    logits = m(tokens)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens.roll(-1, 1).flatten())
    loss.backward()
    return logits.detach(), [p.grad.detach().clone() for p in m.parameters() if p.grad is not None]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind,window", [("full", 64), ("swa", 64), ("rattention", 64), ("rattention", 17)])
def test_triton_path_equals_torch_path(kind, window, dtype, monkeypatch):
    m = small(kind, dtype, window=window)
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 200), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(1))
    out, grads = loss_and_grads(m, tokens)
    monkeypatch.setenv("RATTENTION_KERNELS", "torch")
    ref, ref_grads = loss_and_grads(m, tokens)
    errs = {"logits": rel(out, ref),
            **{f"grad[{i}]": rel(a, b) for i, (a, b) in enumerate(zip(grads, ref_grads, strict=True))}}
    bad = {k: v for k, v in errs.items() if not v < TOL[dtype]}
    assert not bad, f"over {TOL[dtype]}: {bad}"


@pytest.mark.parametrize("kind,window", [("full", 16), ("swa", 16), ("rattention", 16), ("rattention", 5)])
def test_decoding_on_cuda_equals_the_parallel_forward(kind, window):
    m = small(kind, "float32", window=window).eval()
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 70), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(2))
    with torch.no_grad():
        ref = m(tokens)
    for prefill in (0, 23):
        assert rel(stepwise_logits(m, tokens, prefill=prefill), ref) < TOL["float32"], prefill


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind,window,qk_norm",
                         [("rattention", 16, False), ("rattention", 5, True), ("swa", 16, False)])
def test_fused_local_decode_through_the_model(kind, window, qk_norm, dtype, monkeypatch):
    """On CUDA the fused Triton step of a local layer (kernels.local_decode, fused=True): eager and replayed
    from a CUDA graph it equals the torch step of the same weights and, in fp32, the parallel forward."""
    from kernels.ops import fused_decode_serves

    m = small(kind, dtype, window=window, qk_norm=qk_norm).eval()
    assert fused_decode_serves(torch.zeros(1, 2, m.cfg.head_dim, device="cuda", dtype=m.cfg.torch_dtype))
    monkeypatch.setattr(Attention, "fused_decode", True)
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 60), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(3))
    with torch.no_grad():
        ref = m(tokens)
    fused = stepwise_logits(m, tokens, prefill=7, static=True)
    graph = stepwise_logits(m, tokens, prefill=7, static=True, cuda_graph=True)
    monkeypatch.setattr(Attention, "fused_decode", False)
    torch_path = stepwise_logits(m, tokens, prefill=7, static=True)
    assert rel(fused, torch_path) < TOL[dtype]
    assert rel(graph, fused) < 1e-6
    if dtype == "float32":
        assert rel(fused, ref) < TOL["float32"]
