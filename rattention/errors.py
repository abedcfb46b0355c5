"""The platform's user-facing errors. Each carries one line that names the field or file and what is
allowed; the command line prints that line alone, never a traceback."""

from __future__ import annotations

import difflib
import re
import typing
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class RattentionError(Exception):
    """Base class: bad input the user can fix. ``str(err)`` is the one-line message."""


class ConfigError(RattentionError, ValueError):
    """A config field has a bad value: the message names the field and what is allowed."""


class DataError(RattentionError):
    """A dataset, shard or input path is missing, corrupt or unusable: the message names the file."""


class TrainingError(RattentionError):
    """Training cannot go on (NaN/inf loss, no checkpoint to resume): the message names the step."""


# A validator's message that names its field first: "warmup_steps: must be <= ...", "model.window: ...".
_NAMED = re.compile(r"^([A-Za-z_][\w.]*): (.*)$", re.S)


def format_validation_error(err: ValidationError, prefix: str = "", model: type | None = None) -> str:
    """The one line for a pydantic error: ``prefix.field.path: message, got <input>``.

    It reports the first error, with ``(and N more)`` when there are several. A validator may name its
    field at the front of its message, relative to where it ran (a section's cross-field check:
    ``train`` + ``warmup_steps: ...``) or in full (a nested model's ConfigError: ``model.window: ...``).
    Its message then carries its own ``got``; pydantic's messages get the input appended.
    """
    errors = err.errors()
    first = errors[0]
    loc = [str(p) for p in first["loc"]]
    kind, msg = first["type"], first["msg"].removeprefix("Value error, ")
    if kind == "value_error" and (m := _NAMED.match(msg)):
        named = m.group(1).split(".")
        loc = named if named[: len(loc)] == loc else [*loc, *named]
        msg = m.group(2)
    if kind == "extra_forbidden":
        msg = "unknown field"
        owner = _owner(model, first["loc"]) if model is not None else None
        close = difflib.get_close_matches(str(loc[-1]), list(owner.model_fields), n=1) if owner else []
        if close:
            msg += f" (did you mean {close[0]!r}?)"
    elif kind == "missing":
        msg = "required field is missing"
    elif (kind != "value_error" and "input" in first and ", got " not in msg
          and not isinstance(first["input"], dict)):  # a missing field's input is its whole section
        msg += f", got {first['input']!r}"
    field = ".".join(p for p in (prefix, *loc) if p) or "config"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{field}: {msg}{more}"


def _owner(model: type, loc: tuple) -> type | None:
    """The pydantic model whose field the last part of ``loc`` names (None where the path leaves models)."""
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(str(part))
        if field is None:
            return None
        ann = field.annotation
        found = [a for a in (ann, *typing.get_args(ann)) if isinstance(a, type) and hasattr(a, "model_fields")]
        if not found:
            return None
        model = found[0]
    return model if hasattr(model, "model_fields") else None
