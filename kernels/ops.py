"""One entry point per op, used by ``rattention``'s attention module and by decoding.

On CUDA with Triton these dispatch to the Triton kernels (``kernels/<op>/triton.py``); elsewhere they
run the torch paths (``kernels.swa.blockwise``, ``kernels.rla.chunked``), with the same signature and
semantics (``kernels/<op>/naive.py``).
"""

from __future__ import annotations

import math
import os

import torch

from kernels.common import feature_map
from kernels.merge.naive import merge_naive
from kernels.rla.chunked import rla_chunked
from kernels.swa.blockwise import swa_blockwise


def use_triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernels serve this tensor: a CUDA tensor, Triton importable, and the
    environment variable ``RATTENTION_KERNELS`` not set to ``torch`` (which forces the torch path,
    e.g. to compare training runs)."""
    if not x.is_cuda or os.environ.get("RATTENTION_KERNELS", "auto") == "torch":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


# ---------------------------------------------------------------------------------------------
# Triton ops, registered with torch.library so that they trace under torch.compile. The Triton
# modules are imported inside the ops: a machine without Triton still imports this file.

_NO_WINDOW = -1  # custom ops take ints: -1 stands for window=None (full causal)


@torch.library.custom_op("rattention::swa_fwd", mutates_args=())
def _swa_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    from kernels.swa.triton import swa_fwd

    return swa_fwd(q, k, v, None if window == _NO_WINDOW else window, scale)


@_swa_fwd_op.register_fake
def _(q, k, v, window, scale):
    b, h, t, d = q.shape
    return q.new_empty(b, h, t, d), q.new_empty(b, h, t, dtype=torch.float32)


@torch.library.custom_op("rattention::swa_bwd", mutates_args=())
def _swa_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                lse: torch.Tensor, window: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from kernels.swa.triton import swa_bwd

    return swa_bwd(do, q, k, v, o, lse, None if window == _NO_WINDOW else window, scale)


@_swa_bwd_op.register_fake
def _(do, q, k, v, o, lse, window, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _swa_setup(ctx, inputs, output):
    q, k, v, window, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.window, ctx.scale = window, scale


def _swa_backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.rattention.swa_bwd(do, q, k, v, o, lse, ctx.window, ctx.scale)
    return dq, dk, dv, None, None


_swa_fwd_op.register_autograd(_swa_backward, setup_context=_swa_setup)


def _rla_sizes(d: int, chunk: int, seg_chunks: int) -> tuple[int, int]:
    from kernels.rla.triton import _sizes

    c, m, _, _ = _sizes(d, chunk or None, seg_chunks or None, None)
    return c, m


@torch.library.custom_op("rattention::rla_fwd", mutates_args=())
def _rla_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, phi: str, chunk: int,
                seg_chunks: int, state_pass: str) -> tuple[torch.Tensor, torch.Tensor]:
    from kernels.rla.triton import rla_fwd

    return rla_fwd(q, k, v, window, phi, chunk or None, seg_chunks or None, state_pass=state_pass or None)


@_rla_fwd_op.register_fake
def _(q, k, v, window, phi, chunk, seg_chunks, state_pass):
    b, h, t, d = q.shape
    c, m = _rla_sizes(d, chunk, seg_chunks)
    nc = -(-t // c)
    ns = -(-nc // m)
    return (q.new_empty(b, h, t, d, dtype=torch.float32),
            q.new_empty(b, k.shape[1], ns, 2 * d, d, dtype=torch.float32))


@torch.library.custom_op("rattention::rla_bwd", mutates_args=())
def _rla_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, states: torch.Tensor,
                window: int, phi: str, chunk: int, seg_chunks: int, state_pass: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from kernels.rla.triton import rla_bwd

    return rla_bwd(do, q, k, v, states, window, phi, chunk or None, seg_chunks or None,
                   state_pass=state_pass or None)


@_rla_bwd_op.register_fake
def _(do, q, k, v, states, window, phi, chunk, seg_chunks, state_pass):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _rla_setup(ctx, inputs, output):
    q, k, v, window, phi, chunk, seg_chunks, state_pass = inputs
    ctx.save_for_backward(q, k, v, output[1])
    ctx.args = (window, phi, chunk, seg_chunks, state_pass)


def _rla_backward(ctx, do, dstates):
    q, k, v, states = ctx.saved_tensors
    dq, dk, dv = torch.ops.rattention.rla_bwd(do, q, k, v, states, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


_rla_fwd_op.register_autograd(_rla_backward, setup_context=_rla_setup)


@torch.library.custom_op("rattention::merge_fwd", mutates_args=())
def _merge_fwd_op(a: torch.Tensor, b: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor, eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from kernels.merge.triton import merge_fwd

    return merge_fwd(a, b, w_a, w_b, eps)


@_merge_fwd_op.register_fake
def _(a, b, w_a, w_b, eps):
    return torch.empty_like(a), a.new_empty(a.shape[:3], dtype=torch.float32), \
        a.new_empty(a.shape[:3], dtype=torch.float32)


@torch.library.custom_op("rattention::norm_fwd", mutates_args=())
def _norm_fwd_op(a: torch.Tensor, w_a: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    from kernels.merge.triton import merge_fwd

    out, ra, _ = merge_fwd(a, None, w_a, None, eps)
    return out, ra


@_norm_fwd_op.register_fake
def _(a, w_a, eps):
    return torch.empty_like(a), a.new_empty(a.shape[:3], dtype=torch.float32)


@torch.library.custom_op("rattention::norm_bwd", mutates_args=())
def _norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    from kernels.merge.triton import norm_bwd

    return norm_bwd(dy, x, w, rstd)


@_norm_bwd_op.register_fake
def _(dy, x, w, rstd):
    return torch.empty_like(x), torch.empty_like(w)


def _merge_setup(ctx, inputs, output):
    a, b, w_a, w_b, _ = inputs
    ctx.save_for_backward(a, b, w_a, w_b, output[1], output[2])


def _merge_backward(ctx, dy, dra, drb):
    a, b, w_a, w_b, ra, rb = ctx.saved_tensors
    da, dwa = torch.ops.rattention.norm_bwd(dy, a, w_a, ra)
    db, dwb = torch.ops.rattention.norm_bwd(dy, b, w_b, rb)
    return da, db, dwa, dwb, None


def _norm_setup(ctx, inputs, output):
    a, w_a, _ = inputs
    ctx.save_for_backward(a, w_a, output[1])


def _norm_backward(ctx, dy, dra):
    a, w_a, ra = ctx.saved_tensors
    da, dwa = torch.ops.rattention.norm_bwd(dy, a, w_a, ra)
    return da, dwa, None


_merge_fwd_op.register_autograd(_merge_backward, setup_context=_merge_setup)
_norm_fwd_op.register_autograd(_norm_backward, setup_context=_norm_setup)


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
                     scale: float | None = None) -> torch.Tensor:
    """``attention`` through the Triton op (any device under TRITON_INTERPRET=1, else CUDA)."""
    window = _NO_WINDOW if window is None else window
    return torch.ops.rattention.swa_fwd(q, k, v, window, _scale(q, scale))[0]


def rla_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, phi: str = "sm2",
               chunk: int = 0, seg_chunks: int = 0, state_pass: str = "") -> torch.Tensor:
    """Residual linear attention through the Triton op, fp32 output; 0 picks the default chunk/segment,
    "" the default state pass (kernels.rla.triton.STATE_PASS)."""
    return torch.ops.rattention.rla_fwd(q, k, v, window, phi, chunk, seg_chunks, state_pass)[0]


def rattention_triton(
    q_rope: torch.Tensor, k_rope: torch.Tensor, q_raw: torch.Tensor, k_raw: torch.Tensor, v: torch.Tensor,
    window: int, w_swa: torch.Tensor, w_rla: torch.Tensor, phi: str = "sm2", eps: float = 1e-6,
    scale: float | None = None, chunk: int = 0, seg_chunks: int = 0, state_pass: str = "",
) -> torch.Tensor:
    """``rattention`` through the Triton ops: SWA, RLA, then the fused two-norm merge."""
    o_swa = attention_triton(q_rope, k_rope, v, window, scale)
    o_rla = rla_triton(q_raw, k_raw, v, window, phi, chunk, seg_chunks, state_pass)
    return torch.ops.rattention.merge_fwd(o_swa, o_rla, w_swa, w_rla, eps)[0]


def normed_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
                            w_swa: torch.Tensor, eps: float = 1e-6, scale: float | None = None) -> torch.Tensor:
    """``normed_attention`` through the Triton ops."""
    return torch.ops.rattention.norm_fwd(attention_triton(q, k, v, window, scale), w_swa, eps)[0]


# ---------------------------------------------------------------------------------------------
# The entry points: Triton on CUDA, the torch paths elsewhere.


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, scale: float | None = None
) -> torch.Tensor:
    """Causal softmax attention, sliding-window when ``window`` is an int, full when None.

    (B, Hq, T, D) queries against (B, Hkv, T, D) keys and values; output in the dtype of q.
    """
    if use_triton(q):
        return attention_triton(q, k, v, window, scale)
    return swa_blockwise(q, k, v, window, scale)


def rattention(
    q_rope: torch.Tensor,
    k_rope: torch.Tensor,
    q_raw: torch.Tensor,
    k_raw: torch.Tensor,
    v: torch.Tensor,
    window: int,
    w_swa: torch.Tensor,
    w_rla: torch.Tensor,
    phi: str = "sm2",
    eps: float = 1e-6,
    scale: float | None = None,
    chunk: int = 64,
) -> torch.Tensor:
    """The RAttention local layer: RMSNorm_swa(SWA(q_rope, k_rope, v)) + RMSNorm_rla(RLA(q_raw, k_raw, v)).

    Output (B, Hq, T, D) in the dtype of q, before the output projection. ``chunk`` is the torch
    path's RLA chunk length; the Triton path uses its tuned one (kernels.rla.triton).
    """
    if use_triton(q_rope):  # the kernels use their own tuned chunk: the function is the same
        return rattention_triton(q_rope, k_rope, q_raw, k_raw, v, window, w_swa, w_rla, phi, eps, scale)
    o_swa = swa_blockwise(q_rope, k_rope, v, window, scale)
    o_rla = rla_chunked(q_raw, k_raw, v, window, phi, chunk)
    return merge_naive(o_swa, o_rla, w_swa, w_rla, eps).to(q_rope.dtype)


def normed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, w_swa: torch.Tensor,
    eps: float = 1e-6, scale: float | None = None,
) -> torch.Tensor:
    """SWA with RAttention's per-head output norm and no linear branch (the ablation switch)."""
    if use_triton(q):
        return normed_attention_triton(q, k, v, window, w_swa, eps, scale)
    return merge_naive(attention(q, k, v, window, scale), None, w_swa, None, eps).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# Decoding: one new token against a cache.


DECODE_KEY_BLOCK = 256  # attention_decode's key block; reserved global caches hold a multiple of it


def key_block(s: int, most: int = DECODE_KEY_BLOCK) -> int:
    """The key block ``attention_decode`` splits a cache of s slots into: the largest divisor of s up to
    ``most`` (so the blocks are views: a reserved global buffer, a ring of 4097 in blocks of 241), or
    ``most`` when s has none of at least most/8 (the tail then costs a copy); s itself below 4 blocks."""
    if s < 4 * most:
        return s
    block = next(d for d in range(most, 0, -1) if s % d == 0)
    return block if block >= most // 8 else most


def attention_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """One query step: q (B, Hq, 1, D) against cached k, v (B, Hkv, S, D), the slots where ``valid`` (S,)
    is False masked out; output (B, Hq, 1, D) in v's dtype.

    The value sum is split over the key axis in blocks (``key_block``; flash-decoding's split-K, in torch),
    so B*Hkv*S/block small matmuls run side by side instead of B*Hkv long ones (on the H200 the unsplit
    form cost ~1.2 ms per global layer at 32K, batch 1); the partials add up in fp32 (fp64 for fp64).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    b, hkv, s, d = k.shape
    g = q.shape[1] // hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q.reshape(b, hkv, g, d), k.transpose(-1, -2)).to(acc) * scale
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    p = torch.softmax(scores, dim=-1).to(v.dtype)  # (B, Hkv, g, S)
    block = key_block(s)
    if block == s:
        return torch.matmul(p, v).reshape(b, hkv * g, 1, d)
    n = s // block
    m = n * block
    blocks = torch.matmul(p[..., :m].reshape(b, hkv, g, n, block).transpose(2, 3),
                          v[:, :, :m].reshape(b, hkv, n, block, d))  # (B, Hkv, n, g, D)
    o = blocks.sum(dim=2, dtype=acc)
    if m < s:
        o = o + torch.matmul(p[..., m:], v[:, :, m:]).to(acc)
    return o.to(v.dtype).reshape(b, hkv * g, 1, d)


def rla_decode(q_raw: torch.Tensor, state: torch.Tensor, phi: str = "sm2") -> torch.Tensor:
    """One query step of RLA: phi(q) @ S, q (B, Hq, 1, D), S (B, Hkv, 2D, D) -> (B, Hq, 1, D) fp32."""
    b, hq, _, d = q_raw.shape
    hkv = state.shape[1]
    fq = feature_map(q_raw, phi).reshape(b, hkv, hq // hkv, 2 * d).to(state.dtype)
    return torch.einsum("bhgf,bhfd->bhgd", fq, state).reshape(b, hq, 1, d)


def rla_fold(state: torch.Tensor, k_raw: torch.Tensor, v: torch.Tensor, phi: str = "sm2") -> torch.Tensor:
    """Fold keys leaving the window into the state: S + phi(k)^T v, k and v (B, Hkv, n, D)."""
    return state + torch.einsum("bhsf,bhsd->bhfd", feature_map(k_raw, phi).to(state.dtype), v.to(state.dtype))


# The fused Triton decode step of a local layer stays opt-in until a GPU run has checked and timed it
# (it passes the interpreter tests; `python benchmarks/bench_decode.py` times both paths side by side).
FUSED_DECODE = False


def fused_decode_serves(q: torch.Tensor) -> bool:
    """Whether the fused decode step can serve a step whose query is ``q`` (B, Hq, D): the Triton path is
    on for it (``use_triton``), it is 16- or 32-bit, and the head dim is a power of two >= 16."""
    d = q.shape[-1]
    return d >= 16 and d & (d - 1) == 0 and q.dtype != torch.float64 and use_triton(q)


def local_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_ring: torch.Tensor, v_ring: torch.Tensor,
    pos: torch.Tensor, w_swa: torch.Tensor | None = None, eps: float = 1e-6, *, fused: bool | None = None,
    **rla: object,
) -> torch.Tensor:
    """One local layer's decode step (fold the leaving key into S, write the new key, attend over the
    ring, read phi(q) S, merge by the two norms): ``kernels.decode.naive.local_decode_naive``'s signature
    and in-place effects. ``fused``: True runs the one-launch Triton step (``kernels.decode.triton``; on
    CPU only under TRITON_INTERPRET=1), False the torch path, None the Triton step where ``FUSED_DECODE``
    is on and it serves ``q``."""
    if fused is None:
        fused = FUSED_DECODE and fused_decode_serves(q)
    if fused:
        from kernels.decode.triton import local_decode as local_decode_fused

        return local_decode_fused(q, k, v, k_ring, v_ring, pos, w_swa, eps, **rla)
    from kernels.decode.naive import local_decode_naive

    return local_decode_naive(q, k, v, k_ring, v_ring, pos, w_swa, eps, **rla)
