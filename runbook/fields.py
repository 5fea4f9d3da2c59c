"""Pydantic field types shared by the playbook model and the actions' spec models: durations, limits, lists."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, StringConstraints, ValidationInfo,
                      field_validator)
from pydantic_core import PydanticCustomError

_DURATION_RE = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*d)?\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*m(?!s))?\s*(?:(\d+(?:\.\d+)?)\s*s)?\s*(?:(\d+)\s*ms)?\s*$")


def parse_duration(value: Any) -> float:
    """Parse `30s`, `5m`, `2h`, `1h30m`, `250ms`, `30d` or a number of seconds into seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 5m or 2h, got a boolean")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        else:
            m = _DURATION_RE.match(text)
            if not m or not any(m.groups()):
                raise ValueError(f"invalid duration {value!r}: expected a number with a unit, like 30s, 5m, 2h or 1h30m")
            d, h, mi, s, ms = m.groups()
            seconds = float(d or 0) * 86400 + float(h or 0) * 3600 + float(mi or 0) * 60 + float(s or 0) + float(ms or 0) / 1000
    else:
        raise ValueError(f"invalid duration {value!r}: expected a number with a unit, like 30s, 5m or 2h")
    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {value!r}: must be a finite number of seconds")
    if seconds < 0:
        raise ValueError(f"invalid duration {value!r}: must not be negative")
    return seconds


def _format_duration(seconds: float) -> str:
    return f"{seconds:g}s"


# What editors see in the JSON Schema: the text forms the validators accept, not the parsed result.
_DURATION_TEXT = Annotated[str, StringConstraints(pattern=r"^\s*(\d+(\.\d+)?\s*(d|h|m|s|ms)?\s*)+$")]
Duration = Annotated[float, BeforeValidator(parse_duration, json_schema_input_type=Annotated[float, Field(ge=0)] | _DURATION_TEXT),
                     PlainSerializer(_format_duration, return_type=str)]


@dataclass(frozen=True)
class Limit:
    """A count or a percentage of hosts (batch sizes, failure limits)."""

    value: float
    percent: bool = False

    def of(self, total: int) -> int:
        """Resolve against a number of hosts; a percentage rounds up so that 1% of 3 hosts is 1."""
        if not self.percent:
            return int(self.value)
        return max(1, math.ceil(total * self.value / 100)) if total else 0

    def __str__(self) -> str:
        return f"{self.value:g}%" if self.percent else str(int(self.value))


def parse_limit(value: Any) -> Limit:
    """Parse an integer or a percentage like `25%`."""
    if isinstance(value, Limit):
        return value
    if isinstance(value, bool):
        raise ValueError("expected an integer or a percentage like 25%, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid limit {value}: must not be negative")
        return Limit(value)
    if isinstance(value, str):
        text = value.strip()
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", text)
        if m:
            pct = float(m.group(1))
            if not 0 <= pct <= 100:
                raise ValueError(f"invalid percentage {value!r}: must be between 0% and 100%")
            return Limit(pct, percent=True)
        if text.isdigit():
            return Limit(int(text))
    raise ValueError(f"invalid limit {value!r}: expected an integer like 5 or a percentage like 25%")


_LIMIT_TEXT = Annotated[str, StringConstraints(pattern=r"^\s*\d+(\.\d+)?\s*%?\s*$")]
LimitValue = Annotated[Limit, BeforeValidator(parse_limit, json_schema_input_type=Annotated[int, Field(ge=0)] | _LIMIT_TEXT),
                       PlainSerializer(str, return_type=str)]


def _no_bool(value: Any) -> Any:
    """Refuse true/false where a number is expected (pydantic would read true as 1)."""
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got a boolean {str(value).lower()}")
    return value


def _none_as_empty(value: Any) -> Any:
    """An empty YAML key (`vars:` with nothing under it) means an empty collection."""
    return {} if value is None else value


def _none_as_empty_list(value: Any) -> Any:
    return [] if value is None else value


Int = Annotated[int, BeforeValidator(_no_bool)]


def _str_list(value: Any) -> Any:
    """Accept a single string where a list of strings is expected."""
    return [value] if isinstance(value, str) else value


StrList = Annotated[list[str], BeforeValidator(_str_list, json_schema_input_type=str | list[str])]


# YAML 1.1 spelled these as booleans (and Ansible still does); runbook reads YAML 1.2, where they are
# strings. They are refused where a boolean is expected rather than silently guessed at.
YAML11_BOOLEANS = {"yes": True, "no": False, "on": True, "off": False, "y": True, "n": False}


def bool_hint(value: Any) -> str:
    """How to write a boolean the author evidently meant (`yes` -> true), for error hints."""
    word = str(value).strip().lower()
    meant = YAML11_BOOLEANS.get(word)
    if meant is None and word in ("true", "false"):
        return f"remove the quotes: `{word}`"
    if meant is None:
        return "write true or false"
    return (f"write `{str(meant).lower()}`: only true and false are booleans in runbook playbooks (YAML 1.2), "
            f"`{value}` is a string")


def strict_bool(value: Any) -> bool:
    """A boolean is true or false: no `yes`/`on`/`1`/quoted `"true"` guessed into one (pydantic's lax mode would)."""
    if isinstance(value, bool):
        return value
    shown = f"the string {value!r}" if isinstance(value, str) else f"{type(value).__name__} {value!r}"
    raise PydanticCustomError("bool_word", "expected true or false, got {shown}", {"shown": shown, "hint": bool_hint(value)})


def _is_bool_field(annotation: Any) -> bool:
    return annotation is bool or (get_origin(annotation) in (Union, UnionType)
                                  and set(get_args(annotation)) == {bool, type(None)})


class Strict(BaseModel):
    """A model that rejects unknown keys (a typo is an error, not a silently ignored key) and non-boolean booleans."""

    model_config = ConfigDict(extra="forbid", populate_by_name=False)

    @field_validator("*", mode="before")
    @classmethod
    def _booleans(cls, value: Any, info: ValidationInfo) -> Any:
        # One rule for every boolean key of every model built on this one (steps, action specs):
        # only true and false; `null` stays allowed where the field is optional.
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and value is not None and _is_bool_field(field.annotation):
            return strict_bool(value)
        return value




def octal_mode(value: Any) -> str | None:
    """Accept a file mode as an octal string like '0644' (YAML 1.2 reads 0644 as the digits 644, never octal)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if value is not None and not re.fullmatch(r"0?[0-7]{3,4}", str(value)):
        raise ValueError(f"invalid mode {value!r}: expected an octal string like '0644'")
    return None if value is None else str(value)


OctalMode = Annotated[str | None, BeforeValidator(octal_mode, json_schema_input_type=str | int | None),
                      Field(description="Octal file mode, e.g. '0644'.")]
