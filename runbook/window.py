"""Maintenance windows: when a window is open, its next openings, named windows, and enforcement helpers."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta, UTC
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import pydantic
from croniter import CroniterError, croniter

from runbook.errors import Location, PlaybookError, Problem, Problems, WindowClosedError, WindowError, did_you_mean
from runbook.loader import SourceMap, parse_yaml, pydantic_problems, read_text
from runbook.model import Playbook, Window

UTC = UTC

# File names of the shared named-window file, nearest first in each directory searched.
WINDOWS_FILES = ("windows.yml", "windows.yaml")

# How far ahead (and back) a search for openings goes before giving up: a cron expression that
# never fires (`0 0 31 2 *`) or a blackout covering everything must not loop forever.
SEARCH_HORIZON = timedelta(days=5 * 366)

# Offsets change by at most a couple of hours (DST is 1h, rarely 30min or 2h); starting the
# wall-clock walk this far beyond the target makes sure no opening near a change is missed.
_WALL_CLOCK_MARGIN = timedelta(hours=3)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


# --- clocks ---------------------------------------------------------------------------------

class Clock(Protocol):
    """Where the time comes from: the system clock in production, a fake one in tests."""

    def now(self) -> datetime:
        """The current time, timezone-aware, in UTC."""
        ...

    def sleep(self, seconds: float, stop: threading.Event | None = None) -> None:
        """Wait `seconds`, returning early when `stop` is set."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        """The current time, timezone-aware, in UTC."""
        return datetime.now(UTC)

    def sleep(self, seconds: float, stop: threading.Event | None = None) -> None:
        """Wait `seconds`, returning early when `stop` is set."""
        if seconds <= 0:
            return
        if stop is not None:
            stop.wait(seconds)
        else:
            time.sleep(seconds)


class FakeClock:
    """A clock for tests: time moves only when told to; sleeping advances it at once."""

    def __init__(self, start: datetime):
        self._now = _aware_utc(start)
        self._lock = threading.Lock()
        self.sleeps: list[float] = []

    def now(self) -> datetime:
        """The current fake time, in UTC."""
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward by `seconds`."""
        with self._lock:
            self._now += timedelta(seconds=seconds)

    def set(self, dt: datetime) -> None:
        """Jump to `dt` (timezone-aware)."""
        with self._lock:
            self._now = _aware_utc(dt)

    def sleep(self, seconds: float, stop: threading.Event | None = None) -> None:
        """Record the sleep and advance time by `seconds` without waiting."""
        self.sleeps.append(seconds)
        if seconds > 0:
            self.advance(seconds)


def _aware_utc(dt: datetime) -> datetime:
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"expected a timezone-aware datetime, got {dt!r}")
    return dt.astimezone(UTC)


# --- cron in a timezone ---------------------------------------------------------------------

def local_to_utc(naive: datetime, tz: ZoneInfo) -> datetime:
    """Map a wall-clock time in `tz` to the UTC instant it names.

    A time repeated by the autumn change means its first occurrence (summer time); a time skipped
    by the spring change means the moment the clocks jump (02:30 on a 02:00->03:00 day is 03:00).
    """
    first = naive.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if first.astimezone(tz).replace(tzinfo=None) == naive:
        return first
    # Skipped wall-clock time: the transition lies between the two readings of `naive`; find the
    # first second whose wall-clock time is past `naive` (transitions fall on whole seconds).
    other = naive.replace(tzinfo=tz, fold=1).astimezone(UTC)
    lo, hi = min(first, other), max(first, other)
    while hi - lo > timedelta(seconds=1):
        mid = lo + timedelta(seconds=int((hi - lo).total_seconds()) // 2)
        if mid.astimezone(tz).replace(tzinfo=None) > naive:
            hi = mid
        else:
            lo = mid
    return hi


class CronSeries:
    """The instants a cron expression names, evaluated on the wall clock of a timezone.

    croniter walks naive wall-clock times (so each wall-clock time occurs once a day even on the
    autumn change, where a tz-aware croniter fires twice); `local_to_utc` maps them to instants.
    """

    def __init__(self, expression: str, tz: ZoneInfo):
        self.expression = expression
        self.tz = tz

    def _local(self, at: datetime) -> datetime:
        return _aware_utc(at).astimezone(self.tz).replace(tzinfo=None)

    def after(self, after: datetime) -> Iterator[datetime]:
        """Instants strictly after `after`, ascending, in UTC (stops at the search horizon)."""
        after = _aware_utc(after)
        limit = after + SEARCH_HORIZON
        it = croniter(self.expression, self._local(after) - _WALL_CLOCK_MARGIN)
        last: datetime | None = None
        while True:
            try:
                instant = local_to_utc(it.get_next(datetime), self.tz)
            except CroniterError:
                return
            if instant > limit:
                return
            if instant <= after or instant == last:
                continue  # before the start (margin) or a skipped time already named
            last = instant
            yield instant

    def at_or_before(self, at: datetime) -> Iterator[datetime]:
        """Instants at or before `at`, newest first, in UTC (stops at the search horizon)."""
        at = _aware_utc(at)
        limit = at - SEARCH_HORIZON
        it = croniter(self.expression, self._local(at) + _WALL_CLOCK_MARGIN)
        last: datetime | None = None
        while True:
            try:
                instant = local_to_utc(it.get_prev(datetime), self.tz)
            except CroniterError:
                return
            if instant < limit:
                return
            if instant > at or instant == last:
                continue
            last = instant
            yield instant

    def latest(self, at: datetime) -> datetime | None:
        """The newest instant at or before `at`, if any."""
        return next(self.at_or_before(at), None)


# --- blackouts ------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlackoutRange:
    """A parsed blackout: [start, end) in UTC; a date-only end covers that whole day."""

    start: datetime
    end: datetime
    reason: str | None = None

    def covers(self, at: datetime) -> bool:
        """Whether `at` falls inside the blackout."""
        return self.start <= at < self.end


def _parse_point(text: str, tz: ZoneInfo, *, end: bool) -> datetime:
    """Parse a blackout date (local midnight; for an end, the next midnight) or date-time."""
    text = text.strip()
    if _DATE_RE.match(text):
        day = date.fromisoformat(text)
        if end:
            day += timedelta(days=1)  # a date-only end includes that whole day
        return local_to_utc(datetime(day.year, day.month, day.day), tz)
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        return local_to_utc(dt, tz)
    return dt.astimezone(UTC)


def _blackout_ranges(window: Window) -> list[BlackoutRange]:
    tz = ZoneInfo(window.timezone)
    return [BlackoutRange(_parse_point(b.start, tz, end=False), _parse_point(b.end, tz, end=True), b.reason)
            for b in window.blackout]


def window_problems(window: Window, source: SourceMap | None, path: tuple = ()) -> list[Problem]:
    """Checks the model cannot do alone: blackout dates, their order and overlaps, a cron that never fires."""
    def loc(*sub: Any) -> Location | None:
        return source.locate(path + sub) if source is not None else None

    problems: list[Problem] = []
    tz = ZoneInfo(window.timezone)
    parsed: list[tuple[int, BlackoutRange]] = []
    for i, b in enumerate(window.blackout):
        points: dict[str, datetime] = {}
        for key in ("start", "end"):
            value = getattr(b, key)
            try:
                points[key] = _parse_point(value, tz, end=key == "end")
            except ValueError:
                problems.append(Problem(
                    f"`{key}`: invalid blackout date {value!r}", loc("blackout", i, key),
                    "use an ISO 8601 date like 2024-12-20, or a date-time like 2024-12-20T18:00 "
                    f"(read in the window's timezone, {window.timezone}, unless it has an offset)"))
        if len(points) < 2:
            continue
        if points["start"] >= points["end"]:
            problems.append(Problem(
                f"blackout ends ({b.end}) before it starts ({b.start})", loc("blackout", i, "end"),
                "swap `start` and `end`; a date-only `end` includes that whole day"))
            continue
        parsed.append((i, BlackoutRange(points["start"], points["end"], b.reason)))
    parsed.sort(key=lambda item: item[1].start)
    for (i_prev, prev), (i_next, nxt) in zip(parsed, parsed[1:]):
        if nxt.start < prev.end:
            first, second = sorted((i_prev, i_next))
            where = loc("blackout", first)
            line = f" (line {where.line})" if where is not None and where.line else ""
            problems.append(Problem(
                f"blackout {second + 1} overlaps blackout {first + 1}{line}", loc("blackout", second),
                "merge overlapping blackouts into one range"))
    if not problems and next(CronSeries(window.cron, tz).after(datetime.now(UTC)), None) is None:
        problems.append(Problem(f"`cron`: the expression {window.cron!r} never fires", loc("cron"),
                                "check the day of month against the month (there is no 31 February)"))
    return problems


# --- the schedule of one window -------------------------------------------------------------

class WindowSchedule:
    """When one maintenance window is open: its openings, closings and blackouts, in UTC."""

    def __init__(self, window: Window, name: str | None = None, location: Location | None = None):
        problems = window_problems(window, None)
        if problems:
            if location is not None:
                problems = [Problem(p.message, p.location or location, p.hint) for p in problems]
            raise WindowError(problems)
        self.window = window
        self.name = name
        self.location = location
        self.tz = ZoneInfo(window.timezone)
        self.duration = timedelta(seconds=window.duration)
        self.cron = CronSeries(window.cron, self.tz)
        self.blackouts = _blackout_ranges(window)

    def __repr__(self) -> str:
        return f"WindowSchedule({self.describe()})"

    def describe(self) -> str:
        """One line: name, cron, duration and timezone."""
        label = f"`{self.name}` " if self.name else ""
        return f"{label}(cron {self.window.cron!r}, {format_duration(self.window.duration)}, {self.window.timezone})"

    def blackout_at(self, at: datetime) -> BlackoutRange | None:
        """The blackout covering `at`, if any."""
        at = _aware_utc(at)
        return next((b for b in self.blackouts if b.covers(at)), None)

    def _close(self, opening: datetime) -> datetime:
        """When the window opened at `opening` closes: after its duration, or when a blackout begins."""
        close = opening + self.duration
        for b in self.blackouts:
            if opening < b.start < close:
                close = b.start  # a change freeze that begins mid-window closes it
        return close

    def current(self, at: datetime) -> tuple[datetime, datetime] | None:
        """(open, close) of the window containing `at`, or None when it is closed.

        Openings within one duration before `at` are examined; when windows overlap the result
        spans from the earliest still-open opening to the latest close.
        """
        at = _aware_utc(at)
        found: tuple[datetime, datetime] | None = None
        for opening in self.cron.at_or_before(at):
            if opening <= at - self.duration:
                break
            if self.blackout_at(opening) is not None:
                continue
            close = self._close(opening)
            if at < close:
                found = (opening, close if found is None else max(close, found[1]))
        return found

    def is_open(self, at: datetime) -> bool:
        """Whether the window is open at `at`."""
        return self.current(at) is not None

    def closes_at(self, at: datetime) -> datetime | None:
        """When the window open at `at` closes, or None when it is closed."""
        span = self.current(at)
        return span[1] if span else None

    def openings_after(self, after: datetime) -> Iterator[tuple[datetime, datetime]]:
        """(open, close) of every opening strictly after `after`, skipping blackouts (lazy)."""
        cursor = _aware_utc(after)
        while True:
            jumped = False
            for opening in self.cron.after(cursor):
                blackout = self.blackout_at(opening)
                if blackout is not None:
                    # Jump past the blackout instead of stepping through every opening inside it.
                    cursor = blackout.end - timedelta(microseconds=1)
                    jumped = True
                    break
                yield opening, self._close(opening)
            if not jumped:
                return

    def next_openings(self, after: datetime, n: int) -> list[tuple[datetime, datetime]]:
        """The next `n` (open, close) pairs strictly after `after`, skipping blackouts."""
        out: list[tuple[datetime, datetime]] = []
        for span in self.openings_after(after):
            if len(out) >= n:
                break
            out.append(span)
        return out


def format_duration(seconds: float) -> str:
    """`7200` -> `2h`, `5400` -> `1h30m`, `45` -> `45s`."""
    total = int(round(seconds))
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    text = (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{s}s" if s else "")
    return text or "0s"


def format_local_and_utc(at: datetime, tz: ZoneInfo) -> str:
    """`Sat 2024-03-30 02:00 CET (Europe/Berlin) = 2024-03-30 01:00 UTC`."""
    local = _aware_utc(at).astimezone(tz)
    utc = _aware_utc(at)
    if str(tz.key) == "UTC":
        return f"{utc:%a %Y-%m-%d %H:%M} UTC"
    return f"{local:%a %Y-%m-%d %H:%M} {local.tzname()} ({tz.key}) = {utc:%Y-%m-%d %H:%M} UTC"


# --- named windows --------------------------------------------------------------------------

_WINDOW_KEYS = [f.alias or n for n, f in Window.model_fields.items()]


class _PrefixedErrors:
    """A pydantic ValidationError seen from the document root (errors of one windows.yml entry)."""

    def __init__(self, exc: pydantic.ValidationError, prefix: tuple):
        self._exc = exc
        self._prefix = prefix

    def errors(self) -> list[dict[str, Any]]:
        return [{**e, "loc": self._prefix + tuple(e["loc"])} for e in self._exc.errors()]


_FIELD_HINTS = {
    "cron": 'five fields, minute hour day-of-month month day-of-week, e.g. "0 2 * * SAT" (Saturdays at 02:00)',
    "duration": "a positive duration like 90m, 2h or 1h30m",
    "timezone": "an IANA timezone name like UTC, Europe/Berlin or America/New_York",
}


def _with_hint(problem: Problem) -> Problem:
    """Add the field's usual hint to a model problem that has none."""
    if problem.hint is None:
        for key, hint in _FIELD_HINTS.items():
            if problem.message.startswith(f"`{key}`:"):
                return Problem(problem.message, problem.location, hint, problem.severity, problem.code)
    return problem


def load_windows_file(path: str | os.PathLike) -> dict[str, Window]:
    """Load a windows.yml (`windows: {NAME: {cron, duration, timezone, blackout}}`); raise WindowError with every problem."""
    filename = str(path)
    top_hint = "a windows file is `windows:` followed by named windows, e.g.\n" \
               "  windows:\n    saturday-night: {cron: \"0 2 * * SAT\", duration: 2h, timezone: UTC}"
    try:
        text = read_text(path, "windows file")
    except PlaybookError as exc:  # read_text speaks for playbooks; here the same problems are window errors
        raise WindowError(exc.problems) from None
    if not text.strip() or all(not ln.strip() or ln.lstrip().startswith("#") for ln in text.splitlines()):
        raise WindowError([Problem("the windows file is empty", Location(filename, 1, 1), top_hint)])
    doc = parse_yaml(text, filename, WindowError)  # type: ignore[arg-type]
    data, source = doc.data, doc.source
    problems = Problems()
    if not isinstance(data, dict):
        raise WindowError([Problem("expected a mapping with a `windows:` key", Location(filename, 1, 1), top_hint)])
    for key in data:
        if key != "windows":
            problems.add(f"unknown key `{key}`", source.locate((key,), key=True),
                         did_you_mean(str(key), ["windows"]) or top_hint)
    entries = data.get("windows")
    if "windows" not in data:
        problems.add("missing required key `windows`", Location(filename, 1, 1), top_hint)
    elif not isinstance(entries, dict):
        problems.add("`windows`: expected a mapping of window names to windows", source.locate(("windows",)), top_hint)
    windows: dict[str, Window] = {}
    for name, entry in (entries.items() if isinstance(entries, dict) else []):
        base = ("windows", name)
        if not _NAME_RE.match(str(name)):
            problems.add(f"invalid window name {name!r}", source.locate(base, key=True),
                         "window names are letters, digits, `-`, `_` and `.`, starting with a letter or digit")
        if not isinstance(entry, dict):
            problems.add(f"`{name}`: expected a mapping with `cron`, `duration` and `timezone`", source.locate(base),
                         "e.g. `saturday-night: {cron: \"0 2 * * SAT\", duration: 2h, timezone: UTC}`")
            continue
        known = {k: v for k, v in entry.items() if k in _WINDOW_KEYS}
        for key in entry:
            if key not in _WINDOW_KEYS:
                problems.add(f"unknown key `{key}`", source.locate(base + (key,), key=True),
                             did_you_mean(str(key), _WINDOW_KEYS) or f"allowed keys: {', '.join(_WINDOW_KEYS)}",
                             code="unknown-key")
        try:
            window = Window.model_validate(known)
        except pydantic.ValidationError as exc:
            found = pydantic_problems(_PrefixedErrors(exc, base), data, source)  # type: ignore[arg-type]
            problems.items.extend(_with_hint(p) for p in found)
            continue
        problems.items.extend(window_problems(window, source, base))
        windows[str(name)] = window
    problems.raise_if_errors(WindowError)
    return windows


def windows_files_for(playbook_path: str | os.PathLike) -> list[Path]:
    """The windows files a playbook sees: beside it, then in its parent directory (existing ones only)."""
    here = Path(playbook_path).resolve().parent
    found: list[Path] = []
    for directory in (here, here.parent):
        for name in WINDOWS_FILES:
            candidate = directory / name
            if candidate.is_file() and candidate not in found:
                found.append(candidate)
                break  # windows.yml wins over windows.yaml in the same directory
    return found


def resolve_window(playbook: Playbook, playbook_path: str | os.PathLike) -> WindowSchedule | None:
    """The playbook's window, inline or named (looked up in windows.yml beside it, then in its parent)."""
    source: SourceMap | None = playbook._source
    where = source.locate(("window",)) if source is not None else Location(str(playbook_path))
    if playbook.window is None:
        return None
    if isinstance(playbook.window, Window):
        problems = window_problems(playbook.window, source, ("window",))
        if problems:
            raise WindowError(problems)
        return WindowSchedule(playbook.window, None, where)
    name = playbook.window
    files = windows_files_for(playbook_path)
    known: list[str] = []
    for path in files:
        windows = load_windows_file(path)
        if name in windows:
            return WindowSchedule(windows[name], name, where)
        known.extend(windows)
    if not files:
        here = Path(playbook_path).resolve().parent
        raise WindowError([Problem(
            f"unknown window `{name}`: no windows.yml in {here} or {here.parent}", where,
            f"define it in {here / 'windows.yml'} under `windows:`, or write the window inline "
            "as `window: {cron: ..., duration: ..., timezone: ...}`")])
    hint = did_you_mean(name, known) or (
        f"known windows: {', '.join(sorted(set(known)))}" if known else f"{files[0]} defines no windows")
    raise WindowError([Problem(f"unknown window `{name}` (looked in {', '.join(str(f) for f in files)})", where, hint)])


# --- enforcement ----------------------------------------------------------------------------

def check_can_start(schedule: WindowSchedule, clock: Clock) -> None:
    """Return when the window is open now; otherwise raise WindowClosedError saying when it next opens."""
    now = clock.now()
    if schedule.is_open(now):
        return
    label = f"maintenance window `{schedule.name}`" if schedule.name else "the maintenance window"
    blackout = schedule.blackout_at(now)
    why = ""
    if blackout is not None:
        why = f" (blackout{': ' + blackout.reason if blackout.reason else ''}, until " \
              f"{format_local_and_utc(blackout.end, schedule.tz)})"
    upcoming = schedule.next_openings(now, 1)
    if upcoming:
        opening, closing = upcoming[0]
        when = (f"it next opens {format_local_and_utc(opening, schedule.tz)}, "
                f"for {format_duration((closing - opening).total_seconds())}")
    else:
        when = f"it does not open in the next {SEARCH_HORIZON.days // 366} years"
    raise WindowClosedError(
        f"{label} is closed{why}; {when}",
        location=schedule.location,
        hint='wait for the window, or override it with --ignore-window --reason "..." (recorded in the audit trail)')


class WindowGuard:
    """Asked by the executor before each task: may new work start in the window the run started in?"""

    def __init__(self, schedule: WindowSchedule, clock: Clock):
        self.schedule = schedule
        self.clock = clock
        self._close = schedule.closes_at(clock.now())
        self._closed = self._close is None

    @property
    def closes_at(self) -> datetime | None:
        """When the window closes (None once it has closed, or if it was closed when the guard was made)."""
        if self._closed:
            return None
        self._refresh(self.clock.now())
        return None if self._closed else self._close

    def _refresh(self, now: datetime) -> None:
        if self._closed or self._close is None:
            self._closed = True
            return
        if now >= self._close:
            # Once the window has closed the run stays closed, even if a later window is open by now.
            self._closed = True
            return
        later = self.schedule.closes_at(now)
        if later is not None and later > self._close:
            self._close = later  # an overlapping opening extends the window without a gap

    def allows_start(self, max_duration: float | None = None) -> bool:
        """Whether a task may start now: the window is still open and `max_duration` seconds fit before it closes."""
        now = self.clock.now()
        self._refresh(now)
        if self._closed or self._close is None:
            return False
        return max_duration is None or now + timedelta(seconds=max_duration) <= self._close
