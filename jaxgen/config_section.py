"""The base of every config section: frozen, no unknown keys, no booleans or inf/nan where numbers go, and no
integer JAX could not hold."""

from __future__ import annotations

import typing
from typing import Any

import annotated_types
import pydantic
from pydantic import BaseModel, ConfigDict

# Seeds become 32-bit random keys (JAX's PRNGKey, NumPy's generators): larger ones overflow deep inside.
MAX_SEED = 2**32 - 1
# Counts (steps, sizes, sampling steps) become JAX's default int32 arrays, or sizes of arrays: larger ones
# overflow inside a compiled computation, or ask for more memory than any machine has, after training.
MAX_INT = 2**31 - 1


class Section(BaseModel):
    # inf and nan are never valid where a number is meant (an infinite learning rate poisons the weights).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @pydantic.field_validator("*", mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, value: Any, info: pydantic.ValidationInfo) -> Any:
        # YAML reads yes/no/true/false as booleans, which pydantic would take as 1 and 0.
        if isinstance(value, bool) and _wants_number(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"{str(value).lower()} is a boolean; a number is expected here")
        return value

    @pydantic.field_validator("*", mode="before")
    @classmethod
    def _whole_floats_jax_can_hold(cls, value: Any, info: pydantic.ValidationInfo) -> Any:
        # `1e30` for an integer: named like `10**30`, not as pydantic's "exceeded maximum size" (beyond int64;
        # smaller whole floats pydantic turns into the integers the bound below names).
        if (isinstance(value, float) and value.is_integer() and abs(value) >= 2**63
                and _wants_integer(cls.model_fields[info.field_name].annotation)):
            raise ValueError(f"{value:g} is beyond {MAX_INT:,}, the largest integer JAX holds (int32)")
        return value

    @pydantic.field_validator("*", mode="after")
    @classmethod
    def _integers_jax_can_hold(cls, value: Any, info: pydantic.ValidationInfo) -> Any:
        field = cls.model_fields[info.field_name]
        has_own_bound = any(isinstance(rule, (annotated_types.Le, annotated_types.Lt)) for rule in field.metadata)
        if type(value) is int and abs(value) > MAX_INT and not has_own_bound:
            raise ValueError(f"{value} is beyond {MAX_INT:,}, the largest integer JAX holds (int32)")
        return value


def _wants_number(annotation: Any) -> bool:
    """Whether a field takes int or float values and never a boolean."""
    found = _types_in(annotation)
    return bool({int, float} & found) and bool not in found


def _wants_integer(annotation: Any) -> bool:
    """Whether a field takes int values and never a float."""
    found = _types_in(annotation)
    return int in found and float not in found


def _types_in(annotation: Any) -> set:
    found: set = set()
    pending = [annotation]
    while pending:
        item = pending.pop()
        found.add(item)
        pending.extend(typing.get_args(item))
    return found
