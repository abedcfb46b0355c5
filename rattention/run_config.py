"""One run = one validated config: model, data, train, eval, tracking, ray.

Configs are YAML files with dotted ``key=value`` overrides (``train.lr=3e-4``). A bad field raises one
``ConfigError`` line naming it (``train.lr: must be > 0, got -1``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from rattention.config import ModelConfig
from rattention.errors import ConfigError, format_validation_error
from rattention.schema import Schema


class _Section(Schema):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where the tokens come from: a dataset folder made by ``rattention data prepare``."""

    path: str = "data/stdlib"  # dataset folder: manifest.json, tokenizer.json, {split}-{index:06d}.tar
    train_split: str = "train"
    val_split: str = "val"
    seq_len: int | None = None  # None: model.seq_len (they must agree when both are set)
    batch_size: int = Field(8, gt=0)  # sequences per micro-batch, per worker
    # Before training, read every shard once against the manifest's sha256 (and check its token ids);
    # false skips that read (a shard's presence, size and the tokenizer are still checked).
    verify_checksums: bool = Field(True, strict=True)
    # Score only the answer tokens (a synthetic task's mask.npy): the training loss and the validation
    # loss then cover the answers alone. None: on when the dataset carries a mask, off otherwise.
    answer_only: bool | None = None


class TrainConfig(_Section):
    """The optimisation: AdamW, linear warmup then cosine decay to ``min_lr_ratio * lr``."""

    steps: int = Field(200, gt=0)  # optimizer steps
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)  # max global grad norm; 0 disables clipping
    grad_accum: int = Field(1, gt=0)  # micro-batches per optimizer step
    seed: int = 0
    checkpoint_every: int = Field(100, ge=0)  # steps between checkpoints; 0: only the final one
    keep_checkpoints: int = Field(2, gt=0)
    compile: bool = False  # torch.compile the model
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = Field(10, gt=0)
    out_dir: str = "runs"  # run folders go to out_dir/run_name
    run_name: str | None = None  # None: <kind>-w<window>-<time>

    @model_validator(mode="after")
    def _warmup(self) -> TrainConfig:
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps: must be <= train.steps ({self.steps}), got {self.warmup_steps}")
        return self


class EvalConfig(_Section):
    """What ``rattention eval`` (and the end of training) measures."""

    enabled: bool = True  # evaluate at the end of training
    val_batches: int = Field(8, gt=0)  # validation batches (of data.batch_size sequences)
    buckets: list[int] = [0, 64, 256]  # bucket starts; the last bucket runs to the end of the context
    copy_span: int = Field(32, gt=1)  # tokens in the repeated span
    copy_distances: list[int] | None = None  # None: window // 2 and 2 * window (below and above the window)
    copy_samples: int = Field(8, gt=0)
    tasks: list[str] = []  # synthetic tasks from rattention.tasks: mqar, niah, passkey, vt
    # Fixed task parameters, e.g. {mqar: {gap: 256, num_pairs: 8}}. Without them a task's evidence is
    # placed relative to the window (MQAR's gap = window + 1) and only answers beyond the window are
    # scored; with them every window sees the same samples and every answer is scored, so the metric
    # compares across windows (what a window sweep needs).
    task_params: dict[str, dict[str, Any]] = {}
    task_lengths: list[int] = [1, 2, 4]  # multiples of the training length
    task_samples: int = Field(16, gt=0)
    decode_tokens: int = Field(64, ge=0)  # tokens generated to time decoding; 0 skips it

    @field_validator("buckets")
    @classmethod
    def _buckets(cls, v: list[int]) -> list[int]:
        if not v or v[0] != 0 or any(b <= a for a, b in zip(v, v[1:], strict=False)):
            raise ValueError(f"must start at 0 and increase strictly, got {v}")
        return v

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        from rattention.tasks import TASKS

        bad = [t for t in v if t not in TASKS]
        if bad:
            raise ValueError(f"unknown task {bad[0]!r}; allowed: {', '.join(TASKS)}")
        return v

    @field_validator("task_params")
    @classmethod
    def _task_params(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from rattention.tasks import TASKS, task_parameters

        for task, params in v.items():
            if task not in TASKS:
                raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
            allowed = task_parameters(task)
            for name in params:
                if name not in allowed:
                    raise ValueError(f"{task}.{name}: not a parameter of {task}; allowed: {', '.join(allowed)}")
        return v

    @field_validator("copy_distances")
    @classmethod
    def _distances(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(d <= 0 for d in v):
            raise ValueError(f"must be positive token distances, got {v}")
        return v

    @field_validator("task_lengths")
    @classmethod
    def _lengths(cls, v: list[int]) -> list[int]:
        if any(m <= 0 for m in v):
            raise ValueError(f"must be positive multiples of the training length, got {v}")
        return v


class TrackingConfig(_Section):
    """MLflow: where runs go. No URI and no MLFLOW_TRACKING_URI: a local server is started."""

    uri: str | None = None
    experiment: str = "rattention"
    server_dir: str = ".mlflow"  # the local server's SQLite file and artifacts, when one is started
    system_metrics: bool = True  # log system/* metrics (CPU, memory, GPU memory) with the training metrics


RAY_ADDRESS_FORMS = "auto, HOST:PORT, ray://HOST:PORT or http://HOST:PORT"


def check_ray_address(address: str | None, field: str | None = None) -> str | None:
    """``address`` when it has a form Ray joins (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``, the job
    server's ``http(s)://HOST:PORT``), else one ConfigError line naming ``field``."""
    if address is None or address == "auto":
        return address
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    scheme = address.split("://", 1)[0] if "://" in address else ""
    if not sep or not host or not port.isdigit() or scheme not in ("", "ray", "http", "https"):
        what = f"{address!r} is not a Ray address; use {RAY_ADDRESS_FORMS}, or leave it unset for a local Ray"
        raise ConfigError(f"{field}: {what}" if field else what)
    return address


class RayConfig(_Section):
    """Ray Train: workers, GPUs, restarts. ``local_mode`` runs the loop in the driver process."""

    address: str | None = None  # None: RAY_ADDRESS or a local Ray
    workers: int = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    cpus_per_worker: float = Field(1, gt=0)
    max_failures: int = Field(0, ge=-1)  # worker restarts from the last checkpoint; -1: unlimited
    local_mode: bool = False

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        return check_ray_address(v)


class RunConfig(_Section):
    """A whole run. Unknown sections or fields are errors."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _seq_len(self) -> RunConfig:
        if self.data.seq_len is None:
            self.data.seq_len = self.model.seq_len
        elif self.data.seq_len != self.model.seq_len:
            raise ValueError(f"data.seq_len: must equal model.seq_len ({self.model.seq_len}), "
                             f"got {self.data.seq_len}")
        return self

    @property
    def seq_len(self) -> int:
        return self.model.seq_len

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-safe)."""
        return self.model_dump(mode="json")

    def flat(self) -> dict[str, Any]:
        """Flattened ``section.field`` mapping: the MLflow params."""
        return flatten(self.to_dict())

    def with_absolute_paths(self) -> RunConfig:
        """The same run with its folders (dataset, run root, local MLflow store) made absolute against the
        current folder, so that workers started elsewhere (Ray Train's, in another working folder) find them.
        None of these is part of the run's identity."""
        d = self.to_dict()
        d["data"]["path"] = str(Path(self.data.path).absolute())
        d["train"]["out_dir"] = str(Path(self.train.out_dir).absolute())
        d["tracking"]["server_dir"] = str(Path(self.tracking.server_dir).absolute())
        return parse_run_config(d)


def parse_run_config(data: dict[str, Any]) -> RunConfig:
    """Validate a nested mapping; a bad field raises one ConfigError line naming it."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping of sections {list(RunConfig.model_fields)}, "
                          f"got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model=RunConfig)) from None


def apply_overrides(data: dict[str, Any], overrides: list[str], sectioned: bool = True,
                    example: str = "train.lr=3e-4") -> dict[str, Any]:
    """Set dotted ``key=value`` pairs into a nested dict; values parse as YAML (``3e-4``, ``[1,2]``, ``null``).

    ``sectioned``: every key must name a section and a field (run configs); sweep specs also take
    top-level keys (``parallel=2``).
    """
    out = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or (sectioned and "." not in key):
            shape = "section.field=value" if sectioned else "field=value"
            raise ConfigError(f"override {item!r}: expected {shape}, e.g. {example}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or start from defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            tag = re.search(r"tag '([^']+)'", str(getattr(err, "problem", "") or ""))
            if isinstance(err, yaml.constructor.ConstructorError) and tag:  # e.g. !!python/object/apply
                at = f"{where}:" if where else ""
                raise ConfigError(f"{p}:{at} tag {tag.group(1)!r} is not allowed (plain YAML only)") from None
            raise ConfigError(f"{p}:{where} not valid YAML") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not a text file") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping of sections {list(RunConfig.model_fields)}")
    return parse_run_config(_floats(apply_overrides(data, overrides or [])))


def dump_run_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (the run folder's ``config.yaml``)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


_SCI = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _floats(d: Any) -> Any:
    """YAML 1.1 (PyYAML) reads ``3e-4`` as a string; read such strings as floats."""
    if isinstance(d, dict):
        return {k: _floats(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_floats(v) for v in d]
    if isinstance(d, str) and _SCI.match(d):
        return float(d)
    return d
