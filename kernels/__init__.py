"""Attention kernels for local-global models, one folder per op (swa/, rla/, merge/), each holding its
reference math (naive.py), its torch CPU path and its Triton GPU kernels; ``kernels.ops`` dispatches.

Import only torch, triton and numpy here: a GPU box without the orchestration stack uses this package.
"""

from kernels.common import FEATURE_MAPS, feature_map, rms_norm_heads
from kernels.ops import attention, attention_decode, local_decode, normed_attention, rattention, rla_decode, rla_fold
from kernels.rla.chunked import rla_state

__all__ = [
    "FEATURE_MAPS",
    "attention",
    "attention_decode",
    "feature_map",
    "local_decode",
    "normed_attention",
    "rattention",
    "rla_decode",
    "rla_fold",
    "rla_state",
    "rms_norm_heads",
]
