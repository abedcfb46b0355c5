"""Small helpers shared by the Triton launchers: output allocation, dot precision, launch sizes."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tests set this to True: every output a kernel writes is then allocated NaN-filled (poisoned), so
# an element the kernel forgot to write shows up as NaN.
POISON = False


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer the kernel fully overwrites: empty, or NaN-filled when ``POISON`` is set."""
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 ("ieee") for fp32 inputs, tf32 for fp32 operands otherwise."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


@triton.jit
def mm(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot`` with fp32 accumulation; ``UPCAST`` feeds it fp32 copies (the interpreter's bf16 dot is
    wrong in Triton 3.6; bf16 x bf16 products are exact in fp32, so the result is the same)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


def upcast_dots(dtype: torch.dtype) -> bool:
    """Whether to run ``mm`` on fp32 copies: only under the interpreter, for 16-bit inputs."""
    return interpreted() and dtype in (torch.bfloat16, torch.float16)


def interpreted() -> bool:
    """Whether Triton runs under its CPU interpreter (TRITON_INTERPRET=1)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_launch(x: torch.Tensor) -> None:
    """Triton needs a CUDA tensor unless the interpreter runs; say so in one line instead of a crash."""
    if not x.is_cuda and not interpreted():
        raise RuntimeError("Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")


def _patch_interpreter_index() -> None:
    """Triton 3.6's interpreter turns scalars into 1-element arrays and calls ``int()`` on them, which
    numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted"); a loop bound computed from
    ``tl.program_id`` then fails. Re-register ``__index__`` through ``.item()``. Interpreter only."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_rattention_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._rattention_patched = True
    interpreter._patch_lang_tensor = patched


if interpreted():
    _patch_interpreter_index()
