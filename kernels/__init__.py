"""Attention kernels for local-global models: reference math, torch CPU paths, Triton GPU kernels.

Import only torch, triton and numpy here: a GPU box without the orchestration stack uses this package.
"""

from kernels.ops import attention, attention_decode, normed_attention, rattention, rla_decode, rla_fold
from kernels.reference import FEATURE_MAPS, feature_map, rms_norm_heads
from kernels.torch_ops import rla_state

__all__ = [
    "FEATURE_MAPS",
    "attention",
    "attention_decode",
    "feature_map",
    "normed_attention",
    "rattention",
    "rla_decode",
    "rla_fold",
    "rla_state",
    "rms_norm_heads",
]
