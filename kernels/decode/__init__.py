"""Decoding kernels: one new token per sequence against a local layer's ring (and RLA state): the torch
path (naive.py) and the fused Triton step (triton.py), dispatched by ``kernels.ops.local_decode``."""
