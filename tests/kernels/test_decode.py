"""The fused local-layer decode step (kernels.decode.triton.local_decode) against its torch path
(kernels.decode.naive.local_decode_naive, the model's decode ops): output, ring writes and the folded RLA state, for
SWA and RAttention, GQA groups, partly empty / exactly full / wrapped rings, ring sizes that are not a
multiple of the key block, both feature maps, raw-key ring or un-rotated leaving key.

On CPU the kernel runs under TRITON_INTERPRET=1 (small shapes); on a GPU box the same tests run on CUDA."""

from __future__ import annotations

import os

import pytest
import torch

from kernels.decode.naive import local_decode_naive
from kernels.decode.triton import local_decode
from rattention.model import rope_cos_sin

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRET, reason="Triton needs CUDA or TRITON_INTERPRET=1")
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
BLOCK_N = 16  # the key block: rings of 7, 20 and 33 slots are not multiples of it


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """The kernel's output is allocated NaN-filled, so an element it forgot to write fails the comparison."""
    pytest.importorskip("triton")
    from kernels import triton_utils

    monkeypatch.setattr(triton_utils, "POISON", True)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in fp64; inf where x is not finite."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(x).all():
        return float("inf")
    n = ref.norm().item()
    return (x - ref).norm().item() / n if n > 0 else x.norm().item()


def step_inputs(b: int, hq: int, hkv: int, d: int, size: int, pos: int, dtype: torch.dtype, kind: str,
                phi: str = "sm2", raw_ring: bool = False, seed: int = 0) -> tuple[tuple, dict]:
    """Random inputs of one decode step at position ``pos``: query, new key/value, rings (slots never
    written before the window fills hold zeros, as in the cache), S, norm scales, angles at pos-w-1."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt).to(DEVICE)

    q, k, v = r(b, hq, d), r(b, hkv, d), r(b, hkv, d)
    k_ring, v_ring = r(b, hkv, size, d), r(b, hkv, size, d)
    unwritten = torch.arange(size, device=DEVICE) >= pos  # slots pos.. hold no position yet when pos < size
    if pos < size:
        k_ring[:, :, unwritten] = 0
        v_ring[:, :, unwritten] = 0
    w_swa = (torch.rand(hq, d, generator=g) + 0.5).to(dtype).to(DEVICE)
    args = (q, k, v, k_ring, v_ring, torch.tensor(pos, device=DEVICE), None if kind == "swa" else w_swa, 1e-6)
    kw: dict = {}
    if kind == "rattention":
        kw = dict(q_raw=r(b, hq, d), k_raw=r(b, hkv, d), state=0.1 * r(b, hkv, 2 * d, d, dt=torch.float32),
                  w_rla=(torch.rand(hq, d, generator=g) + 0.5).to(dtype).to(DEVICE), phi=phi)
        if raw_ring:
            kw["k_raw_ring"] = r(b, hkv, size, d)
        else:
            cos, sin = rope_cos_sin(torch.tensor([pos - size]), d, 10000.0, torch.float32)
            kw["rope_leaving"] = (cos.to(DEVICE), sin.to(DEVICE))
    return args, kw


def copies(args: tuple, kw: dict) -> tuple[tuple, dict]:
    """Fresh copies of the tensors a step updates in place (rings, state), the rest shared."""
    args = tuple(a.clone() if i in (3, 4) else a for i, a in enumerate(args))
    kw = {k: v.clone() if k in ("state", "k_raw_ring") else v for k, v in kw.items()}
    return args, kw


def check_step(args: tuple, kw: dict, tol: float) -> None:
    """The fused step against the torch step: output within tol, rings written the same, S folded the same."""
    fa, fkw = copies(args, kw)
    ta, tkw = copies(args, kw)
    out = local_decode(*fa, **fkw, block_n=BLOCK_N)
    ref = local_decode_naive(*ta, **tkw)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert rel_err(out, ref) < tol, rel_err(out, ref)
    assert torch.equal(fa[3], ta[3]) and torch.equal(fa[4], ta[4])  # the new key and value in their slot
    if "k_raw_ring" in fkw:
        assert torch.equal(fkw["k_raw_ring"], tkw["k_raw_ring"])
    if "state" in fkw:
        assert rel_err(fkw["state"], tkw["state"]) < 1e-6


SIZE = 20  # ring of w+1 = 20 slots
POSITIONS = {"empty-but-one": 0, "partly-empty": 6, "exactly-full": SIZE - 1, "first-fold": SIZE,
             "wrapped": 2 * SIZE + 7}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("ring", POSITIONS)
@pytest.mark.parametrize("kind,hq,hkv,d,phi,raw_ring", [
    ("rattention", 4, 1, 16, "sm2", False),
    ("rattention", 2, 2, 32, "relu2", True),
    ("rattention", 6, 2, 16, "sm2", True),  # a group of 3: padded to the 16-row dot tile
    ("swa", 4, 1, 32, "sm2", False),  # with RAttention's per-head output norm
    ("swa-plain", 2, 2, 16, "sm2", False),  # no output norm
], ids=["ratt-g4-d16-sm2", "ratt-g1-d32-relu2-raw", "ratt-g3-d16-raw", "swa-normed-g4-d32", "swa-g1-d16"])
def test_fused_step_matches_torch_step(kind, hq, hkv, d, phi, raw_ring, ring, dtype):
    args, kw = step_inputs(2, hq, hkv, d, SIZE, POSITIONS[ring], dtype, kind.split("-")[0], phi, raw_ring)
    if kind == "swa":  # normed SWA: the norm scale without the linear branch
        args = args[:6] + (torch.rand(hq, d, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE) + 0.5,
                           1e-6)
    check_step(args, kw, TOL[dtype])


@pytest.mark.parametrize("size", [7, 33])
def test_fused_step_other_ring_sizes(size):
    """A ring shorter than one key block, and one just over two blocks, wrapped."""
    args, kw = step_inputs(1, 4, 2, 16, size, 3 * size + 2, torch.float32, "rattention")
    check_step(args, kw, TOL[torch.float32])


def test_fused_steps_through_a_sequence():
    """Twelve consecutive steps over a ring of 5 from an empty cache: the ring fills, wraps, and S folds a key
    every step past the window; rings and S stay equal to the torch path's (fp32 reference against fp64)."""
    size, d = 5, 16
    args, kw = step_inputs(1, 2, 1, d, size, 0, torch.float32, "rattention", "sm2")
    state = torch.zeros_like(kw["state"])
    fused = dict(k_ring=torch.zeros_like(args[3]), v_ring=torch.zeros_like(args[4]), state=state)
    exact = {k: v.double() for k, v in fused.items()}
    g = torch.Generator().manual_seed(5)
    for pos in range(12):
        q, k, v, q_raw = (torch.randn(1, h, d, generator=g).to(DEVICE) for h in (2, 1, 1, 2))
        cos, sin = rope_cos_sin(torch.tensor([pos - size]), d, 10000.0, torch.float64)
        common = dict(q_raw=q_raw, k_raw=k, w_rla=kw["w_rla"], phi="sm2")
        out = local_decode(q, k, v, fused["k_ring"], fused["v_ring"], torch.tensor(pos, device=DEVICE), args[6], 1e-6,
                           state=fused["state"], rope_leaving=(cos.float().to(DEVICE), sin.float().to(DEVICE)),
                           block_n=BLOCK_N, **common)
        ref = local_decode_naive(q.double(), k.double(), v.double(), exact["k_ring"], exact["v_ring"],
                                 torch.tensor(pos, device=DEVICE), args[6].double(), 1e-6, state=exact["state"],
                                 rope_leaving=(cos.to(DEVICE), sin.to(DEVICE)),
                                 **{**common, "q_raw": q_raw.double(), "k_raw": k.double(),
                                    "w_rla": kw["w_rla"].double()})
        assert rel_err(out, ref) < 1e-5, pos
    assert rel_err(fused["state"], exact["state"]) < 1e-5 and exact["state"].abs().max() > 0
    assert rel_err(fused["k_ring"], exact["k_ring"]) == 0


def test_fused_step_refuses_what_it_cannot_serve():
    args, kw = step_inputs(1, 2, 1, 16, 5, 3, torch.float32, "rattention")
    with pytest.raises(ValueError, match="rope_leaving"):
        local_decode(*args, **{**kw, "rope_leaving": None})
    bad = step_inputs(1, 2, 1, 16, 5, 3, torch.float32, "swa")[0]
    with pytest.raises(ValueError, match="head_dim"):
        local_decode(*(x[..., :12] if isinstance(x, torch.Tensor) and x.dim() > 1 else x for x in bad))
