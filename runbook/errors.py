"""The project's exception hierarchy; every error carries a location, what was expected, and a hint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Exit codes, documented in the README; the CLI maps errors to them in one place.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_TASK_FAILED = 2
EXIT_UNREACHABLE = 3
EXIT_INVALID = 4
EXIT_WINDOW_CLOSED = 5
EXIT_ENVIRONMENT = 6    # the control machine cannot record the run (disk full, read-only, permissions)
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Location:
    """A place in a file: 1-based line and column when known."""

    file: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        parts = [self.file]
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        return ":".join(parts)


@dataclass(frozen=True)
class Problem:
    """One finding about an input: an error or a warning, located, with a hint."""

    message: str
    location: Location | None = None
    hint: str | None = None
    severity: Literal["error", "warning"] = "error"
    code: str = "invalid"

    def render(self) -> str:
        """Format as `file:line:col: severity: message` plus an indented hint line."""
        where = f"{self.location}: " if self.location else ""
        text = f"{where}{self.severity}: {self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text

    def as_dict(self) -> dict:
        """Return a JSON-ready mapping."""
        loc = self.location
        return {
            "severity": self.severity,
            "code": self.code,
            "message": self.message,
            "hint": self.hint,
            "file": loc.file if loc else None,
            "line": loc.line if loc else None,
            "column": loc.column if loc else None,
        }


class RunbookError(Exception):
    """Base of every error runbook raises on purpose."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, *, location: Location | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.location = location
        self.hint = hint

    @property
    def problems(self) -> list[Problem]:
        """The findings this error stands for (one, unless a subclass collects several)."""
        return [Problem(self.message, self.location, self.hint)]

    def __str__(self) -> str:
        return "\n".join(p.render() for p in self.problems)


class ValidationError(RunbookError):
    """Invalid input (playbook, inventory, plan file, window): all problems of a file together."""

    exit_code = EXIT_INVALID

    def __init__(self, problems: list[Problem] | str, *, location: Location | None = None, hint: str | None = None):
        if isinstance(problems, str):
            problems = [Problem(problems, location, hint)]
        self._problems = [p for p in problems]
        first = self._problems[0] if self._problems else Problem("invalid input")
        super().__init__(first.message, location=first.location, hint=first.hint)

    @property
    def problems(self) -> list[Problem]:
        return list(self._problems)


class PlaybookError(ValidationError):
    """A playbook that cannot be loaded."""


class InventoryError(ValidationError):
    """An inventory that cannot be loaded, or a pattern that selects nothing."""


class TemplateError(ValidationError):
    """A template that does not parse or render."""


class WindowError(ValidationError):
    """An invalid maintenance window definition."""


class PlanFileError(ValidationError):
    """A saved plan that is corrupt, edited, foreign or too old."""


class DriftError(RunbookError):
    """The world no longer matches a reviewed plan."""

    exit_code = EXIT_INVALID


class ConnectionFailed(RunbookError):
    """A host could not be reached: refused, timed out, authentication failed."""

    exit_code = EXIT_UNREACHABLE

    def __init__(self, host: str, reason: str, *, hint: str | None = None):
        super().__init__(f"{host}: {reason}", hint=hint)
        self.host = host
        self.reason = reason


class HostKeyError(ConnectionFailed):
    """A host key was unknown (and the policy rejects unknown keys) or has changed."""


class ReadOnlyViolation(RunbookError):
    """A dry run tried to change a host; a bug, never allowed."""


class WindowClosedError(RunbookError):
    """A run was asked to start outside its maintenance window."""

    exit_code = EXIT_WINDOW_CLOSED


@dataclass
class Problems:
    """An accumulator of problems that raises them all together."""

    items: list[Problem] = field(default_factory=list)

    def add(self, message: str, location: Location | None = None, hint: str | None = None,
            severity: Literal["error", "warning"] = "error", code: str = "invalid") -> None:
        """Record one problem."""
        self.items.append(Problem(message, location, hint, severity, code))

    @property
    def errors(self) -> list[Problem]:
        """Only the errors."""
        return [p for p in self.items if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        """Only the warnings."""
        return [p for p in self.items if p.severity == "warning"]

    def raise_if_errors(self, cls: type[ValidationError] = ValidationError) -> None:
        """Raise `cls` with every problem (warnings included) when there is at least one error."""
        if self.errors:
            raise cls(sorted(self.items, key=_problem_order))


def _problem_order(p: Problem) -> tuple:
    loc = p.location
    return (loc.file if loc else "", loc.line or 0 if loc else 0, loc.column or 0 if loc else 0)


def close_match(word: str, candidates: list[str] | set[str]) -> str | None:
    """Return the closest candidate to a misspelt word, if any is close."""
    import difflib

    found = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def did_you_mean(word: str, candidates: list[str] | set[str]) -> str | None:
    """Return a 'did you mean X?' hint, or None."""
    match = close_match(word, candidates)
    return f"did you mean `{match}`?" if match else None
