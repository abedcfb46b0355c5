"""The base of every config and spec model: unknown keys are refused, and a boolean is not a number.

pydantic's lax mode reads ``true`` as 1 for an integer field and ``1`` as true for a boolean one; here
each is refused with one line naming the field. Numbers written as strings (YAML reads ``3e-4`` as a
string) still parse, so ``train.lr=3e-4`` works.
"""

from __future__ import annotations

import types
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, model_validator


def _scalars(annotation: Any) -> set[type]:
    """The plain types an annotation admits: ``int | None`` -> {int, NoneType}."""
    if get_origin(annotation) in (Union, types.UnionType):
        return set().union(*(_scalars(a) for a in get_args(annotation)))
    return {annotation} if isinstance(annotation, type) else set()


class Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, value in data.items():
            field = cls.model_fields.get(name)
            if field is None:
                continue
            kinds = _scalars(field.annotation)
            if isinstance(value, bool) and bool not in kinds and kinds & {int, float}:
                raise ValueError(f"{name}: must be a number, not a boolean, got {value!r}")
            if (isinstance(value, int | float) and not isinstance(value, bool) and bool in kinds
                    and not kinds & {int, float}):
                raise ValueError(f"{name}: must be true or false, got {value!r}")
        return data
