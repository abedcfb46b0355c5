"""A sweep spec: which run to vary, over which windows and kinds, judged by which metric and tolerance.

A spec names a base run config plus overrides, the local kinds to search (always against the ``full``
baseline), the window grid, the objective (any canonical metric of ``rattention.metrics``), the
tolerance, seeds, a trial budget, parallel slots and each trial's resources, the Optuna storage, and the
mode (``minimal-window`` or ``pareto``). ``load_spec`` reads one from YAML; a bad field raises one
``ConfigError`` line naming it (``grid.windows: ...``).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from rattention import metrics as M
from rattention.config import KINDS, format_validation_error
from rattention.errors import ConfigError
from rattention.run_config import RunConfig, apply_overrides, load_run_config
from rattention.schema import Schema

LOCAL_KINDS = ("swa", "rattention")
BASELINE = "full"
JOURNAL_FILE = "optuna.journal"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_RDB = ("sqlite:///", "postgresql://", "postgresql+", "mysql://", "mysql+", "oracle://", "mssql")
# Run-config fields each trial sets itself, so an override of them would be silently lost.
_TRIAL_FIELDS = {"model.kind": "kinds", "model.window": "grid", "train.seed": "seeds",
                 "tracking.experiment": "name"}


class _Spec(Schema):
    """A spec section: unknown keys are errors; a bad field raises one ConfigError line."""

    model_config = ConfigDict(extra="forbid")
    _prefix: ClassVar[str] = ""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise ConfigError(_one_line(err, type(self), self._prefix)) from None


class Grid(_Spec):
    """Candidate windows: explicit ``windows``, or the powers of two from ``min`` to ``max``."""

    _prefix: ClassVar[str] = "grid"

    windows: list[int] | None = None
    min: int | None = None
    max: int | None = None
    block: int = Field(16, gt=0)  # every window is a multiple of block (the block-aligned grid)

    @model_validator(mode="after")
    def _check(self) -> Grid:
        self.values()
        return self

    def values(self) -> list[int]:
        """The sorted, distinct windows; each > 0 and a multiple of ``block``."""
        if self.windows is not None and (self.min is not None or self.max is not None):
            raise ConfigError(f"{self._prefix}.windows: give either windows or min/max, not both")
        if self.windows is None:
            if self.min is None or self.max is None:
                raise ConfigError(f"{self._prefix}.windows: give windows: [...] or both min and max (powers of two)")
            for key, v in (("min", self.min), ("max", self.max)):
                if v <= 0 or v & (v - 1):
                    raise ConfigError(f"{self._prefix}.{key}: must be a power of two > 0, got {v}")
            if self.min > self.max:
                raise ConfigError(f"{self._prefix}.min: must be <= max ({self.max}), got {self.min}")
            ws = [1 << k for k in range(self.min.bit_length() - 1, self.max.bit_length())]
            key = "min"
        else:
            ws, key = list(self.windows), "windows"
        if not ws:
            raise ConfigError(f"{self._prefix}.windows: empty grid; give at least one window")
        for w in ws:
            if w <= 0:
                raise ConfigError(f"{self._prefix}.{key}: windows must be > 0, got {w}")
            if w % self.block:
                raise ConfigError(f"{self._prefix}.{key}: window {w} is not on the block grid "
                                  f"(a multiple of block={self.block})")
        return sorted(set(ws))


class Objective(_Spec):
    """The metric the search judges a window by, and which way is better."""

    _prefix: ClassVar[str] = "objective"

    metric: str  # a canonical name of rattention.metrics
    direction: Literal["minimize", "maximize"] | None = None  # None: from the metric

    @field_validator("metric")
    @classmethod
    def _canonical(cls, v: str) -> str:
        if not M.is_canonical(v):
            raise ConfigError(f"objective.metric: {M.unknown_metric_message(v)}")
        return v

    def resolved_direction(self) -> str:
        return self.direction or M.default_direction(self.metric)


class Tolerance(_Spec):
    """How far from the baseline still counts as matching it: absolute, relative, or in seed spreads."""

    _prefix: ClassVar[str] = "tolerance"

    kind: Literal["absolute", "relative", "spread"] = "spread"
    value: float = Field(..., ge=0, allow_inf_nan=False)


class Resources(_Spec):
    """What one trial asks Ray for."""

    _prefix: ClassVar[str] = "resources"

    cpus: float = Field(1, gt=0, allow_inf_nan=False)
    gpus: float = Field(0, ge=0, allow_inf_nan=False)


class DataSource(_Spec):
    """Where the trials' tokens come from: an existing dataset, or one the driver builds (once, by fingerprint).

    ``prepare`` holds ``pipelines.tokenize.make_config`` keyword arguments and ``synth`` those of
    ``pipelines.synth.make_config``, both without ``out``: the driver writes them to ``<sweep folder>/data``.
    """

    _prefix: ClassVar[str] = "data"

    path: str | None = None
    prepare: dict[str, Any] | None = None
    synth: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one(self) -> DataSource:
        given = [k for k in ("path", "prepare", "synth") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(f"data: give exactly one of path, prepare, synth; got {', '.join(given) or 'none'}")
        if self.path is not None and not Path(self.path).is_dir():
            raise ConfigError(f"data.path: {self.path}: dataset folder not found "
                              f"(make one with rattention data prepare)")
        if self.prepare is not None:
            _builder_config("prepare", self.prepare)
        if self.synth is not None:
            _builder_config("synth", self.synth)
        return self

    @property
    def builder(self) -> str | None:
        """``prepare`` or ``synth`` when the driver must build the dataset, else None."""
        return "prepare" if self.prepare is not None else "synth" if self.synth is not None else None

    def builder_config(self, out: str | Path) -> Any:
        """The pipeline config that builds the dataset into ``out`` (``PrepareConfig`` or ``SynthConfig``)."""
        if self.builder is None:
            raise ConfigError("data: a dataset path is given; there is nothing to build")
        return _builder_config(self.builder, getattr(self, self.builder), Path(out))


class Pareto(_Spec):
    """The multi-objective mode: the objective metric against cache bytes or training throughput."""

    _prefix: ClassVar[str] = "pareto"

    against: Literal["cache_bytes", "tokens_per_s"] = "cache_bytes"
    context: int = Field(32768, gt=0)  # context length of the cache-bytes objective
    sampler: Literal["nsga2", "tpe"] = "nsga2"
    trials: int = Field(12, gt=0)

    def metric(self) -> str:
        """The canonical name of the second objective."""
        return M.cache_bytes_at(self.context) if self.against == "cache_bytes" else M.TRAIN_THROUGHPUT


class SweepSpec(_Spec):
    """One window search (or Pareto study) over a base run config; see the module docstring."""

    name: str
    base: str
    overrides: list[str] = []
    data: DataSource | None = None
    kinds: list[Literal["swa", "rattention"]] = ["swa", "rattention"]
    grid: Grid
    objective: Objective
    tolerance: Tolerance
    seeds: int | list[int] = 2
    budget: int | None = None
    parallel: int = Field(1, ge=1)
    resources: Resources = Resources()
    storage: str | None = None
    mode: Literal["minimal-window", "pareto"] = "minimal-window"
    pareto: Pareto = Pareto()
    out_dir: str = ".rattention/sweeps"

    # ----- single fields ---------------------------------------------------------------------------

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v) or v in (".", ".."):
            raise ConfigError(f"name: letters, digits, '_', '.' and '-' only (it names the sweep folder), got {v!r}")
        return v

    @field_validator("base")
    @classmethod
    def _base(cls, v: str) -> str:
        if not Path(v).is_file():
            raise ConfigError(f"base: {v}: run config not found")
        return v

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, v: list[str]) -> list[str]:
        for item in v:
            key, sep, _ = item.partition("=")
            key = key.strip()
            if not sep or "." not in key:
                raise ConfigError(f"overrides: expected section.field=value (e.g. train.steps=200), got {item!r}")
            if key in _TRIAL_FIELDS:
                raise ConfigError(f"overrides: {key} is set per trial by the sweep (use {_TRIAL_FIELDS[key]}), "
                                  f"got {item!r}")
        return v

    @field_validator("kinds", mode="before")
    @classmethod
    def _kinds(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not v:
            raise ConfigError(f"kinds: give at least one local kind ({', '.join(LOCAL_KINDS)}), got {v!r}")
        for k in v:
            if k == BASELINE:
                raise ConfigError(f"kinds: 'full' is always the baseline, not a kind to search; allowed "
                                  f"{', '.join(LOCAL_KINDS)}, got {v!r}")
            if k not in LOCAL_KINDS:
                raise ConfigError(f"kinds: unknown kind {k!r}; allowed {', '.join(LOCAL_KINDS)}, got {v!r}")
        if len(set(v)) != len(v):
            raise ConfigError(f"kinds: must be distinct, got {v}")
        return v

    @field_validator("seeds", "budget", "parallel", mode="before")
    @classmethod
    def _no_bool(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, bool):
            raise ConfigError(f"{info.field_name}: expected a number, got {v!r}")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, int):
            if v < 1:
                raise ConfigError(f"seeds: must be a count >= 1 or a list of seeds, got {v}")
        elif not v or len(set(v)) != len(v) or any(s < 0 for s in v):
            raise ConfigError(f"seeds: must be distinct non-negative seeds, at least one, got {v}")
        return v

    @field_validator("budget")
    @classmethod
    def _budget(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ConfigError(f"budget: must be > 0 trials (or null: no cap), got {v}")
        return v

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str | None) -> str | None:
        if v is None or (v.endswith((".journal", ".log")) and "://" not in v) or v.startswith(_RDB):
            return v
        raise ConfigError("storage: expected an RDB URL (sqlite:///..., postgresql://...) or a journal file ending "
                         f".journal or .log, got {v!r}")

    # ----- across fields and against the base run config -------------------------------------------

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        if self.tolerance.kind == "spread" and len(self.seed_list()) < 2:
            raise ConfigError(f"tolerance.kind: 'spread' needs >= 2 seeds to measure the baseline's spread, "
                              f"got seeds={self.seeds!r} (raise seeds or use absolute/relative)")
        if self.budget is not None and self.budget < len(self.seed_list()):
            raise ConfigError(f"budget: must be >= {len(self.seed_list())} (the baseline's seeds) or null, "
                              f"got {self.budget}")
        if self.data is not None and any(o.partition("=")[0].strip() == "data.path" for o in self.overrides):
            raise ConfigError("overrides: data.path conflicts with the spec's data section; remove one")
        cfg = self.base_config()
        T = cfg.seq_len
        ok, hint = M.produced_by(self.objective.metric, cfg.eval, T)
        if not ok:
            raise ConfigError(f"objective.metric: {self.objective.metric} is not measured by the base config; {hint}")
        if self.mode == "pareto":
            ok, hint = M.produced_by(self.pareto.metric(), cfg.eval, T)
            if not ok:
                raise ConfigError(f"pareto.context: {self.pareto.metric()} is not measured by the base config; {hint}")
        too_big = [w for w in self.windows() if w > T]
        if too_big:
            raise ConfigError(f"grid: window {too_big[0]} exceeds model.seq_len={T} of the base config "
                              f"(a window >= T - 1 already sees the whole context)")
        if cfg.train.device == "cuda" and self.resources.gpus == 0:
            raise ConfigError("resources.gpus: the base config trains on cuda (train.device) but trials get no GPU; "
                              "set resources.gpus")
        if self.data is not None and self.data.builder is not None:
            self._check_data(cfg)
        for kind in (BASELINE, *self.kinds):
            for w in [None] if kind == BASELINE else self.windows():
                self.trial_config(kind, w, self.seed_list()[0])
        return self

    def _check_data(self, cfg: RunConfig) -> None:
        """A dataset the driver builds must fit the model: its vocab, and a synthetic sample per context."""
        assert self.data is not None and self.data.builder is not None
        section = self.data.builder
        built = _builder_config(section, getattr(self.data, section))
        if built.vocab_size is not None and built.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"data.{section}.vocab_size: {built.vocab_size} exceeds the base config's "
                              f"model.vocab_size={cfg.model.vocab_size}")
        if section == "synth" and built.seq_len != cfg.seq_len:
            raise ConfigError(f"data.synth.seq_len: must equal model.seq_len={cfg.seq_len} (each sample fills one "
                              f"training context), got {built.seq_len}")

    # ----- derived ---------------------------------------------------------------------------------

    def seed_list(self) -> list[int]:
        """The seeds each point is trained with: ``0..n-1`` for a count ``n``, else the list given."""
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    def windows(self) -> list[int]:
        """The window grid, sorted and distinct."""
        return self.grid.values()

    def direction(self) -> str:
        """``minimize`` or ``maximize``: the objective's, or its metric's default."""
        return self.objective.resolved_direction()

    def folder(self) -> Path:
        """The sweep folder: journal, built dataset, trial runs."""
        return Path(self.out_dir) / self.name

    def storage_url(self) -> str:
        """The Optuna storage: a journal file path (default ``<folder>/optuna.journal``) or an RDB URL."""
        return str(self.folder() / JOURNAL_FILE) if self.storage is None else self.storage

    def journal_path(self) -> Path | None:
        """The journal file when the storage is one, else None (an RDB URL)."""
        url = self.storage_url()
        return None if "://" in url else Path(url)

    def objectives(self) -> list[tuple[str, str]]:
        """(metric, direction) pairs the study optimises: one, or two in pareto mode."""
        out = [(self.objective.metric, self.direction())]
        if self.mode == "pareto":
            out.append((self.pareto.metric(), M.default_direction(self.pareto.metric())))
        return out

    def base_config(self, data_path: str | None = None) -> RunConfig:
        """The base run config with the spec's overrides (and ``data.path`` when given), validated."""
        extra = [] if data_path is None else [f"data.path={json.dumps(str(data_path))}"]
        try:
            return load_run_config(self.base, [*self.overrides, *extra])
        except ConfigError as err:
            raise ConfigError(f"base config: {err}") from None

    def trial_config(self, kind: str, window: int | None, seed: int, data_path: str | None = None,
                     run_root: str | Path | None = None) -> RunConfig:
        """One trial's run: the base with overrides, then its kind, window (kept for ``full``), seed, data
        path and run root, in the study's MLflow experiment. Validated."""
        if kind not in KINDS:
            raise ConfigError(f"kind: must be one of {', '.join(KINDS)}, got {kind!r}")
        if window is None and kind != BASELINE:
            raise ConfigError(f"window: the local kind {kind!r} needs a window, got None")
        extra = [f"model.kind={kind}", f"train.seed={int(seed)}", f"tracking.experiment={json.dumps(self.name)}"]
        if window is not None:
            extra.append(f"model.window={int(window)}")
        if data_path is not None:
            extra.append(f"data.path={json.dumps(str(data_path))}")
        if run_root is not None:
            extra.append(f"train.out_dir={json.dumps(str(run_root))}")
        try:
            return load_run_config(self.base, [*self.overrides, *extra])
        except ConfigError as err:
            raise ConfigError(f"trial {kind} window={window} seed={seed}: {err}") from None

    def estimate(self) -> dict[str, Any]:
        """Upper bounds for ``--dry-run``: trials, and training tokens and FLOPs per trial and in all."""
        from rattention.evaluate import train_flops_per_token

        n_seeds = len(self.seed_list())
        if self.mode == "pareto":
            bound = self.pareto.trials
        else:
            bound = n_seeds + len(self.kinds) * _point_bound(len(self.windows())) * n_seeds
        trials = bound if self.budget is None else min(bound, self.budget)
        cfg = self.base_config()
        tokens = (cfg.train.steps * cfg.data.batch_size * cfg.seq_len * cfg.train.grad_accum * cfg.ray.workers)
        configs = [self.trial_config(BASELINE, None, 0)] + [self.trial_config(k, max(self.windows()), 0)
                                                            for k in self.kinds]
        flops = max(train_flops_per_token(c) for c in configs) * tokens
        return {"mode": self.mode, "trials": trials, "trials_unbounded": bound, "windows": self.windows(),
                "kinds": list(self.kinds), "seeds": self.seed_list(), "parallel": self.parallel,
                "train_tokens_per_trial": tokens, "train_flops_per_trial": flops,
                "train_tokens_total": tokens * trials, "train_flops_total": flops * trials}


# ----- loading ---------------------------------------------------------------------------------------

def load_spec(path: str | Path, overrides: list[str] | None = None,
              base_overrides: list[str] | None = None) -> SweepSpec:
    """Read a sweep spec YAML, apply dotted ``key=value`` overrides to it, resolve ``base`` against the
    spec file's folder, and validate everything (base config included); one ConfigError line if bad.
    ``base_overrides`` are appended to the spec's own ``overrides`` of the base run config."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: sweep spec not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        tag = re.search(r"tag '([^']+)'", problem)
        if isinstance(err, yaml.constructor.ConstructorError) and tag:
            raise ConfigError(f"{p}:{where} tag {tag.group(1)!r} is not allowed (plain YAML only)") from None
        raise ConfigError(f"{p}:{where} not valid YAML ({problem})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a text file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of spec fields ({', '.join(SweepSpec.model_fields)}), "
                          f"got {type(data).__name__}")
    data = _apply_spec_overrides(data, overrides or [])
    if base_overrides:
        data["overrides"] = [*(data.get("overrides") or []), *base_overrides]
    base = data.get("base")
    if isinstance(base, str) and not Path(base).is_absolute():
        data["base"] = os.path.normpath(p.parent / base)
    return SweepSpec(**data)


def check_cluster(spec: SweepSpec, resources: Mapping[str, float]) -> None:
    """Refuse a spec whose parallel slots cannot all run at once on a cluster (``ray.cluster_resources()``)."""
    for key, unit, need_each in (("CPU", "cpus", spec.resources.cpus), ("GPU", "gpus", spec.resources.gpus)):
        have = float(resources.get(key, 0) or 0)
        need = spec.parallel * need_each
        if need_each <= 0 or need <= have + 1e-9:
            continue
        if have <= 0:
            raise ConfigError(f"resources.{unit}: trials ask for {_num(need_each)} {key} each; the Ray cluster has no "
                              f"{key}s (set resources.{unit}=0 or join a cluster with {key}s)")
        raise ConfigError(f"parallel: {spec.parallel} slots x {_num(need_each)} {key} need {_num(need)} {key}s; "
                          f"the Ray cluster has {_num(have)} (lower parallel or resources.{unit})")


# ----- helpers -----------------------------------------------------------------------------------------

def _point_bound(n: int) -> int:
    """Most grid points the window search evaluates on an n-point grid: ceil(log2 n) + 2 (a private copy of
    ``sweeps.search.point_bound``, so that a spec loads without the search module)."""
    return math.ceil(math.log2(n)) + 2


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _apply_spec_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``parallel=2``, ``grid.windows=[16,32]``: dotted keys into the spec, values parsed as YAML."""
    return apply_overrides(data, overrides, sectioned=False, example="parallel=2 or grid.windows=[16,32]")


def _one_line(err: ValidationError, cls: type[BaseModel], prefix: str = "") -> str:
    """One ``field.path: what is wrong`` line, with did-you-mean for unknown keys and ``got X`` for bad values."""
    first = err.errors()[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):
        return str(cause)  # the spec's own checks name their full field path
    return format_validation_error(err, prefix=prefix, model=cls)


def _check_kwargs(section: str, kwargs: dict[str, Any], allowed: list[str]) -> None:
    """Names of a dataset builder's keyword arguments: known ones, and never ``out`` (the driver sets it)."""
    for key in kwargs:
        if key == "out":
            raise ConfigError(f"data.{section}.out: set by the sweep (<sweep folder>/data); remove it")
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            names = ", ".join(a for a in allowed if a != "out")
            hint = f" (did you mean {close[0]!r}?)" if close else f"; allowed: {names}"
            raise ConfigError(f"data.{section}.{key}: unknown field{hint}")


def _check_task_params(synth: dict[str, Any]) -> None:
    from rattention.tasks import TASKS, task_parameters

    kind = synth.get("kind")
    if kind not in TASKS:
        raise ConfigError(f"data.synth.kind: must be one of {', '.join(TASKS)}, got {kind!r}")
    params = synth.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"data.synth.params: expected a mapping of {kind} parameters, got {params!r}")
    allowed = task_parameters(kind)
    for name in params:
        if name not in allowed:
            raise ConfigError(f"data.synth.params.{name}: not a parameter of {kind}; allowed: {', '.join(allowed)}")


def _builder_config(section: str, kwargs: dict[str, Any], out: Path = Path("<sweep folder>/data")) -> Any:
    """The dataset builder's config (``PrepareConfig`` or ``SynthConfig``), validated by the pipeline's own
    ``make_config`` after a check of the names; nothing runs and Ray is not imported."""
    if section == "prepare":
        from pipelines.tokenize import PrepareConfig as Config
        from pipelines.tokenize import make_config
    else:
        from pipelines.synth import SynthConfig as Config
        from pipelines.synth import make_config
    _check_kwargs(section, kwargs, list(Config.model_fields))
    if section == "synth":
        _check_task_params(kwargs)
    try:
        return make_config(out=out, **kwargs)
    except ConfigError as err:
        raise ConfigError(f"data.{section}.{err}") from None
