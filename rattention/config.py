"""Validated model config. One bad field gives one line naming the field and what is allowed."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import ConfigDict, ValidationError, field_validator, model_validator

from rattention.errors import ConfigError, format_validation_error
from rattention.schema import Schema

KINDS = ("full", "swa", "rattention")
FEATURE_MAPS = ("sm2", "relu2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


class ModelConfig(Schema):
    """A decoder LM whose layers follow ``layout`` repeated: ``L`` local (kind under study), ``G`` global.

    ``kind='full'`` makes every layer global (the full-attention baseline); ``swa`` and
    ``rattention`` make the ``L`` layers sliding-window, plain or with residual linear attention.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 32
    mlp_hidden: int | None = None  # SwiGLU width; None: 8/3 * d_model rounded up to a multiple of 64
    layout: str = "LLLG"
    kind: Literal["full", "swa", "rattention"] = "rattention"
    window: int = 64  # SWA sees keys j with 0 <= t - j <= window
    feature_map: Literal["sm2", "relu2"] = "sm2"
    qk_norm: bool = False
    rope_theta: float = 10000.0
    # Global layers without RoPE. None resolves by kind: True for the local-global kinds (their G layers
    # are NoPE, as in the paper), False for ``full``, a standard Transformer with RoPE on every layer
    # (an all-NoPE stack has no position information: it copied 6-9% of a span where LLLG copied 98%).
    nope_global: bool | None = None
    tie_embeddings: bool = True
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"
    seq_len: int = 512  # training context length
    # Starting value of the RLA branch's output-norm scale: the paper's 1.0. From 0 the branch's q and k
    # get no gradient, and on every copy beyond the window it stayed at SWA's chance; 1.0 learned it, at a
    # cost of about 0.2 nats of small-scale text loss (benchmarks/rla_norm_init.md). 0 switches it off.
    rla_norm_init: float = 1.0
    # Ablation: give the swa kind RAttention's per-head output norm (no linear branch), to isolate
    # the linear branch's own effect.
    swa_output_norm: bool = False
    rla_chunk: int = 64
    norm_eps: float = 1e-6
    init_std: float = 0.02

    @model_validator(mode="before")
    @classmethod
    def _resolve_nope(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("nope_global") is None:
            data = {**data, "nope_global": data.get("kind", cls.model_fields["kind"].default) != "full"}
        return data

    @field_validator("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "seq_len",
                     "rla_chunk")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"must be > 0, got {v}")
        return v

    @field_validator("window")
    @classmethod
    def _window(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"must be >= 0 (0 = each token sees only itself), got {v}")
        return v

    @field_validator("layout")
    @classmethod
    def _layout(cls, v: str) -> str:
        bad = sorted(set(v) - {"L", "G"})
        if not v or bad:
            raise ValueError(f"letters allowed: L (local), G (global); got {v!r}")
        return v

    @field_validator("mlp_hidden")
    @classmethod
    def _mlp(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"must be > 0 or null, got {v}")
        return v

    @model_validator(mode="after")
    def _heads(self) -> ModelConfig:
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads: {self.n_heads} must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.n_heads * self.head_dim != self.d_model:
            raise ValueError(f"d_model: {self.d_model} must equal n_heads * head_dim "
                             f"({self.n_heads} * {self.head_dim} = {self.n_heads * self.head_dim})")
        return self

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, prefix="model", model=ModelConfig)) from None

    # ----- derived --------------------------------------------------------------------------

    @property
    def hidden(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return ((8 * self.d_model // 3) + 63) // 64 * 64

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def layer_kinds(self) -> list[str]:
        """Per layer: 'global', or the local kind ('swa' / 'rattention')."""
        if self.kind == "full":
            return ["global"] * self.n_layers
        pattern = (self.layout * self.n_layers)[: self.n_layers]
        return [self.kind if c == "L" else "global" for c in pattern]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Validate a mapping; a bad field raises one ConfigError line."""
        return cls(**data)
