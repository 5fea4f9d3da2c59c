"""`print:` — show a templated message (a string or a mapping) on the console and in the results; changes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

from runbook.actions.base import Action, FieldKind, Outcome, Prediction, PredictionKind, TaskEnv, TemplatedField


def message_text(value: Any, indent: str = "") -> str:
    """A rendered message as text: a string as is; a mapping as `key: value` lines, nested values indented.

    Values are written as they are, never JSON-escaped, so the redactor finds every secret in them.
    """
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{indent}{key}:")
                lines.append(message_text(item, indent + "  "))
            else:
                lines.append(f"{indent}{key}: {_scalar(item)}")
        return "\n".join(lines)
    if isinstance(value, list):
        return "\n".join(f"{indent}- {message_text(v, indent + '  ').lstrip()}" if isinstance(v, (dict, list)) and v
                         else f"{indent}- {_scalar(v)}" for v in value)
    return f"{indent}{_scalar(value)}"


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return "{}" if isinstance(value, dict) else "[]"
    return str(value)


def _strings(value: Any, path: tuple[str | int, ...]) -> Iterator[TemplatedField]:
    if isinstance(value, str):
        yield TemplatedField(path, value, FieldKind.TEMPLATE)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, (*path, str(key)))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, (*path, i))


class Print(Action):
    """Show a message: a string, or a mapping of values, templated; in dry runs too, and it never changes anything."""

    name = "print"
    spec_type: ClassVar[Any] = str | dict[str, Any]
    #: Its message is the point: `apply` of a reviewed plan renders it again with that run's values.
    rerun_on_apply = True
    shows_message = True

    def fields(self) -> Iterator[TemplatedField]:
        yield from _strings(self.spec, ())

    def describe(self, env: TaskEnv) -> str | None:
        return "print"

    def _render(self, env: TaskEnv) -> tuple[Any, str]:
        value = env.render(self.spec)
        return value, message_text(value)

    def plan(self, env: TaskEnv) -> Prediction:
        value, text = self._render(env)
        return Prediction(PredictionKind.OK, text, command="print", data={"message": value})

    def apply(self, env: TaskEnv) -> Outcome:
        value, text = self._render(env)
        return Outcome(message=text, command="print", data={"message": value})
