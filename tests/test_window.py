"""Maintenance windows: openings across DST, blackouts, named windows, located errors, enforcement."""

from __future__ import annotations

import textwrap
from datetime import datetime, timedelta, UTC
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from runbook.errors import EXIT_INVALID, EXIT_WINDOW_CLOSED, WindowClosedError, WindowError
from runbook.loader import parse_playbook
from runbook.model import Window
from runbook.window import (FakeClock, WindowGuard, WindowSchedule, check_can_start, load_windows_file, local_to_utc,
                            resolve_window)

UTC = UTC
BERLIN = ZoneInfo("Europe/Berlin")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def schedule(cron: str, duration: str = "1h", tz: str = "UTC", blackout: list[dict] | None = None,
             name: str | None = None) -> WindowSchedule:
    return WindowSchedule(Window(cron=cron, duration=duration, timezone=tz, blackout=blackout or []), name)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def problems_of(exc: pytest.ExceptionInfo) -> list[tuple[int | None, int | None, str]]:
    return [(p.location.line, p.location.column, p.message) for p in exc.value.problems]


PLAYBOOK = """\
runbook: demo
window: {window}
steps:
  - name: hello
    shell: echo hello
"""


# --- wall clock to UTC ----------------------------------------------------------------------

def test_local_to_utc_maps_skipped_time_to_the_jump_and_repeated_time_to_its_first_occurrence() -> None:
    # 2024-03-31 Berlin: 02:00 CET -> 03:00 CEST at 01:00 UTC; 02:30 does not exist.
    assert local_to_utc(datetime(2024, 3, 31, 2, 30), BERLIN) == utc(2024, 3, 31, 1, 0)
    assert local_to_utc(datetime(2024, 3, 31, 3, 0), BERLIN) == utc(2024, 3, 31, 1, 0)
    # 2024-10-27 Berlin: 02:30 happens twice (CEST then CET); the first is meant.
    assert local_to_utc(datetime(2024, 10, 27, 2, 30), BERLIN) == utc(2024, 10, 27, 0, 30)
    assert local_to_utc(datetime(2024, 7, 1, 2, 30), BERLIN) == utc(2024, 7, 1, 0, 30)


# --- next openings across DST ---------------------------------------------------------------

def test_next_openings_on_the_spring_forward_day_open_when_the_clocks_jump() -> None:
    s = schedule("30 2 * * *", "1h", "Europe/Berlin")
    openings = s.next_openings(utc(2024, 3, 29, 12), 4)
    assert openings == [
        (utc(2024, 3, 30, 1, 30), utc(2024, 3, 30, 2, 30)),   # 02:30 CET
        (utc(2024, 3, 31, 1, 0), utc(2024, 3, 31, 2, 0)),     # 02:30 does not exist: opens at 03:00 CEST
        (utc(2024, 4, 1, 0, 30), utc(2024, 4, 1, 1, 30)),     # 02:30 CEST
        (utc(2024, 4, 2, 0, 30), utc(2024, 4, 2, 1, 30)),
    ]
    # The duration is elapsed time: the spring-forward window still lasts one real hour.
    assert all(close - opening == timedelta(hours=1) for opening, close in openings)


def test_next_openings_on_the_fall_back_day_open_once() -> None:
    s = schedule("0 2 * * *", "2h", "Europe/Berlin")
    openings = [o for o, _ in s.next_openings(utc(2024, 10, 25, 12), 4)]
    # 02:00 happens twice on 27 Oct; the window opens once, at the first (CEST) one.
    assert openings == [utc(2024, 10, 26, 0), utc(2024, 10, 27, 0), utc(2024, 10, 28, 1), utc(2024, 10, 29, 1)]
    assert [o.astimezone(BERLIN).hour for o in openings] == [2, 2, 2, 2]


def test_several_skipped_times_collapse_into_one_opening() -> None:
    s = schedule("*/20 2 * * *", "10m", "Europe/Berlin")
    openings = [o for o, _ in s.next_openings(utc(2024, 3, 30, 23), 2)]
    assert openings == [utc(2024, 3, 31, 1, 0), utc(2024, 4, 1, 0, 0)]


def test_next_openings_in_new_york_across_the_spring_change() -> None:
    s = schedule("0 1 * * SUN", "3h", "America/New_York")
    openings = [o for o, _ in s.next_openings(utc(2024, 3, 1), 3)]
    # 1:00 EST = 06:00 UTC before 10 March; 1:00 EDT = 05:00 UTC after.
    assert openings == [utc(2024, 3, 3, 6), utc(2024, 3, 10, 6), utc(2024, 3, 17, 5)]


def test_next_openings_are_strictly_after_and_in_utc() -> None:
    s = schedule("0 2 * * *")
    openings = s.next_openings(utc(2024, 1, 1, 2), 2)
    assert openings[0][0] == utc(2024, 1, 2, 2)
    assert all(o.tzinfo == UTC and c.tzinfo == UTC for o, c in openings)
    assert s.next_openings(utc(2024, 1, 1), 0) == []


# --- open, current, closes_at ---------------------------------------------------------------

def test_is_open_current_and_closes_at() -> None:
    s = schedule("0 2 * * SAT", "2h")  # 2024-01-06 is a Saturday
    assert s.current(utc(2024, 1, 6, 1, 59)) is None
    assert s.current(utc(2024, 1, 6, 2, 0)) == (utc(2024, 1, 6, 2), utc(2024, 1, 6, 4))
    assert s.current(utc(2024, 1, 6, 3, 59)) == (utc(2024, 1, 6, 2), utc(2024, 1, 6, 4))
    assert s.current(utc(2024, 1, 6, 4, 0)) is None  # the close is exclusive
    assert s.is_open(utc(2024, 1, 6, 3)) and not s.is_open(utc(2024, 1, 7, 3))
    assert s.closes_at(utc(2024, 1, 6, 2, 30)) == utc(2024, 1, 6, 4)
    assert s.closes_at(utc(2024, 1, 5, 2, 30)) is None


def test_window_opened_the_day_before_is_found_by_looking_back() -> None:
    s = schedule("0 22 * * FRI", "8h", "Europe/Berlin")  # Fri 22:00 to Sat 06:00 local
    assert s.current(utc(2024, 1, 6, 4)) == (utc(2024, 1, 5, 21), utc(2024, 1, 6, 5))


def test_current_in_the_repeated_autumn_hour() -> None:
    s = schedule("30 2 * * *", "1h", "Europe/Berlin")
    # 01:15 UTC is 02:15 CET, the second pass through 02:xx; the window opened at 02:30 CEST (00:30 UTC).
    assert s.current(utc(2024, 10, 27, 1, 15)) == (utc(2024, 10, 27, 0, 30), utc(2024, 10, 27, 1, 30))
    assert not s.is_open(utc(2024, 10, 27, 1, 45))


def test_overlapping_openings_extend_the_close() -> None:
    s = schedule("0 * * * *", "90m")
    assert s.current(utc(2024, 1, 1, 10, 45)) == (utc(2024, 1, 1, 10), utc(2024, 1, 1, 11, 30))
    assert s.current(utc(2024, 1, 1, 11, 15)) == (utc(2024, 1, 1, 10), utc(2024, 1, 1, 12, 30))


# --- blackouts ------------------------------------------------------------------------------

def test_blackout_skips_openings_and_a_date_only_end_includes_the_whole_day() -> None:
    s = schedule("0 2 * * *", "2h", "Europe/Berlin",
                 blackout=[{"start": "2024-12-20", "end": "2024-12-22", "reason": "holiday freeze"}])
    openings = [o.astimezone(BERLIN).date().isoformat() for o, _ in s.next_openings(utc(2024, 12, 18, 12), 3)]
    assert openings == ["2024-12-19", "2024-12-23", "2024-12-24"]
    assert not s.is_open(utc(2024, 12, 22, 1, 30))  # 02:30 local on the last day of the freeze
    assert s.blackout_at(utc(2024, 12, 22, 22, 59)) is not None  # 23:59 local, still the 22nd
    assert s.blackout_at(utc(2024, 12, 22, 23, 0)) is None  # midnight local: the freeze is over


def test_blackout_with_date_times_and_offsets() -> None:
    s = schedule("0 * * * *", "30m", "UTC",
                 blackout=[{"start": "2024-05-01T10:00", "end": "2024-05-01T12:00+00:00"}])
    openings = [o for o, _ in s.next_openings(utc(2024, 5, 1, 8, 30), 3)]
    assert openings == [utc(2024, 5, 1, 9), utc(2024, 5, 1, 12), utc(2024, 5, 1, 13)]  # a date-time end is exclusive


def test_a_freeze_that_begins_mid_window_closes_it() -> None:
    s = schedule("0 22 * * *", "4h", "UTC", blackout=[{"start": "2024-12-20", "end": "2024-12-21"}])
    assert s.current(utc(2024, 12, 19, 23)) == (utc(2024, 12, 19, 22), utc(2024, 12, 20, 0))
    assert not s.is_open(utc(2024, 12, 20, 0, 30))


def test_long_blackout_is_jumped_not_walked() -> None:
    s = schedule("* * * * *", "1m", "UTC", blackout=[{"start": "2024-01-01", "end": "2024-12-31"}])
    assert s.next_openings(utc(2023, 12, 31, 23, 58), 2) == [
        (utc(2023, 12, 31, 23, 59), utc(2024, 1, 1)),
        (utc(2025, 1, 1), utc(2025, 1, 1, 0, 1)),
    ]


# --- named windows and located errors -------------------------------------------------------

def test_load_windows_file(tmp_path: Path) -> None:
    path = write(tmp_path / "windows.yml", """
        windows:
          saturday-night:
            cron: "0 2 * * SAT"
            duration: 2h
            timezone: Europe/Berlin
            blackout:
              - {start: 2024-12-20, end: 2025-01-02, reason: year-end freeze}
          daily: {cron: "0 3 * * *", duration: 30m}
        """)
    windows = load_windows_file(path)
    assert set(windows) == {"saturday-night", "daily"}
    assert windows["saturday-night"].duration == 7200 and windows["daily"].timezone == "UTC"
    assert windows["saturday-night"].blackout[0].reason == "year-end freeze"


@pytest.mark.parametrize("entry, at, message", [
    ('{cron: "0 25 * * *", duration: 1h}', '"0 25', "invalid cron expression"),
    ('{cron: "0 2 * * *", duration: 1h, timezone: Mars/Olympus}', "Mars", "unknown timezone"),
    ('{cron: "0 2 * * *", duration: 0}', "0}", "must be positive"),
    ('{cron: "0 2 * * *", duration: -5}', "-5", "must not be negative"),
    ('{cron: "0 2 * * *", duration: 1h, timezon: UTC}', "timezon", "unknown key `timezon`"),
    ('{cron: "0 0 31 2 *", duration: 1h}', '"0 0 31', "never fires"),
    ('{cron: "0 2 * * *", duration: 1h, blackout: [{start: 2024-12-20, end: 2024-12-01}]}', "2024-12-01",
     "ends (2024-12-01) before it starts (2024-12-20)"),
    ('{cron: "0 2 * * *", duration: 1h, blackout: [{start: soon, end: 2024-12-01}]}', "soon", "invalid blackout date 'soon'"),
])
def test_each_bad_window_is_a_located_error(tmp_path: Path, entry: str, at: str, message: str) -> None:
    path = tmp_path / "windows.yml"
    path.write_text(f"windows:\n  w: {entry}\n")
    with pytest.raises(WindowError) as exc:
        load_windows_file(path)
    assert exc.value.exit_code == EXIT_INVALID
    (problem,) = exc.value.problems
    assert message in problem.message
    # Located at the offending value (or key): line 2, the column where `at` begins.
    column = len("  w: ") + entry.index(at) + 1
    assert (problem.location.file, problem.location.line, problem.location.column) == (str(path), 2, column)
    assert problem.hint


def test_overlapping_blackouts_are_located_at_the_later_one(tmp_path: Path) -> None:
    path = write(tmp_path / "windows.yml", """
        windows:
          w:
            cron: "0 2 * * *"
            duration: 1h
            timezone: Europe/Berlin
            blackout:
              - {start: 2024-12-20, end: 2024-12-31}
              - {start: 2024-06-01, end: 2024-06-02}
              - {start: 2024-12-31, end: 2025-01-05}
        """)
    with pytest.raises(WindowError) as exc:
        load_windows_file(path)
    # 2024-12-31 is inside the first blackout (a date-only end includes the whole day).
    assert problems_of(exc) == [(9, 9, "blackout 3 overlaps blackout 1 (line 7)")]
    assert "merge" in exc.value.problems[0].hint


def test_touching_blackouts_do_not_overlap(tmp_path: Path) -> None:
    path = write(tmp_path / "windows.yml", """
        windows:
          w:
            cron: "0 2 * * *"
            duration: 1h
            blackout:
              - {start: 2024-12-20, end: 2024-12-24}
              - {start: 2024-12-25, end: 2025-01-01}
        """)
    assert len(load_windows_file(path)["w"].blackout) == 2


def test_windows_file_structure_errors(tmp_path: Path) -> None:
    path = write(tmp_path / "windows.yml", """
        saturday-night: {cron: "0 2 * * SAT", duration: 2h}
        """)
    with pytest.raises(WindowError) as exc:
        load_windows_file(path)
    messages = [p.message for p in exc.value.problems]
    assert "unknown key `saturday-night`" in messages and "missing required key `windows`" in messages
    assert "windows:" in exc.value.problems[0].hint

    (tmp_path / "empty.yml").write_text("# nothing yet\n")
    with pytest.raises(WindowError, match="empty"):
        load_windows_file(tmp_path / "empty.yml")
    with pytest.raises(WindowError, match="not found"):
        load_windows_file(tmp_path / "missing.yml")
    write(tmp_path / "bad-name.yml", 'windows:\n  "bad name": {cron: "0 2 * * *", duration: 1h}\n')
    with pytest.raises(WindowError, match="invalid window name"):
        load_windows_file(tmp_path / "bad-name.yml")


def test_resolve_named_window_beside_the_playbook_then_in_its_parent(tmp_path: Path) -> None:
    write(tmp_path / "windows.yml", 'windows:\n  parent-window: {cron: "0 4 * * *", duration: 1h}\n')
    write(tmp_path / "playbooks" / "windows.yml", 'windows:\n  near: {cron: "0 2 * * *", duration: 2h, timezone: Europe/Berlin}\n')
    path = tmp_path / "playbooks" / "p.yml"
    near = resolve_window(parse_playbook(PLAYBOOK.format(window="near"), str(path)), path)
    assert near is not None and near.name == "near" and near.tz == BERLIN
    far = resolve_window(parse_playbook(PLAYBOOK.format(window="parent-window"), str(path)), path)
    assert far is not None and far.name == "parent-window" and far.window.cron == "0 4 * * *"


def test_unknown_named_window_is_located_at_the_window_key_with_a_suggestion(tmp_path: Path) -> None:
    write(tmp_path / "windows.yml", 'windows:\n  saturday-night: {cron: "0 2 * * SAT", duration: 2h}\n')
    path = tmp_path / "p.yml"
    playbook = parse_playbook(PLAYBOOK.format(window="saturday-nite"), str(path))
    with pytest.raises(WindowError) as exc:
        resolve_window(playbook, path)
    assert problems_of(exc)[0][:2] == (2, 9)
    assert "unknown window `saturday-nite`" in exc.value.message
    assert exc.value.hint == "did you mean `saturday-night`?"
    assert exc.value.exit_code == EXIT_INVALID


def test_named_window_without_any_windows_file(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "p.yml"
    path.parent.mkdir()
    with pytest.raises(WindowError, match="no windows.yml") as exc:
        resolve_window(parse_playbook(PLAYBOOK.format(window="nightly"), str(path)), path)
    assert exc.value.location.line == 2


def test_inline_window_errors_are_located_in_the_playbook(tmp_path: Path) -> None:
    path = tmp_path / "p.yml"
    text = textwrap.dedent("""\
        runbook: demo
        window:
          cron: "0 2 * * *"
          duration: 1h
          blackout:
            - {start: 2024-12-20, end: 2024-12-19}
        steps:
          - name: hello
            shell: echo hello
        """)
    with pytest.raises(WindowError) as exc:
        resolve_window(parse_playbook(text, str(path)), path)
    assert problems_of(exc) == [(6, 32, "blackout ends (2024-12-19) before it starts (2024-12-20)")]
    # Model-level problems of an inline window are reported by the loader, located too.
    from runbook.errors import PlaybookError
    with pytest.raises(PlaybookError) as bad:
        parse_playbook(text.replace('"0 2 * * *"', '"0 2 * *"'), str(path))
    assert any(p.location.line == 3 and "cron" in p.message for p in bad.value.problems)


def test_playbook_without_window_resolves_to_none(tmp_path: Path) -> None:
    text = "runbook: demo\nsteps:\n  - name: hello\n    shell: echo hello\n"
    assert resolve_window(parse_playbook(text, str(tmp_path / "p.yml")), tmp_path / "p.yml") is None


# --- enforcement ----------------------------------------------------------------------------

def test_check_can_start_passes_inside_the_window() -> None:
    check_can_start(schedule("0 2 * * SAT", "2h"), FakeClock(utc(2024, 1, 6, 3)))


def test_check_can_start_says_when_the_window_next_opens_in_local_time_and_utc() -> None:
    s = schedule("0 2 * * SAT", "2h", "Europe/Berlin", name="saturday-night")
    with pytest.raises(WindowClosedError) as exc:
        check_can_start(s, FakeClock(utc(2024, 1, 3, 12)))  # a Wednesday
    message = str(exc.value)
    assert exc.value.exit_code == EXIT_WINDOW_CLOSED
    assert "`saturday-night` is closed" in message
    assert "Sat 2024-01-06 02:00 CET (Europe/Berlin)" in message   # local
    assert "2024-01-06 01:00 UTC" in message                       # UTC
    assert "for 2h" in message
    assert '--ignore-window --reason "..."' in exc.value.hint


def test_check_can_start_in_a_blackout_names_it() -> None:
    s = schedule("0 2 * * *", "2h", "UTC", blackout=[{"start": "2024-12-20", "end": "2024-12-31", "reason": "freeze"}])
    with pytest.raises(WindowClosedError) as exc:
        check_can_start(s, FakeClock(utc(2024, 12, 24, 2, 30)))
    assert "blackout: freeze" in exc.value.message
    assert "next opens Wed 2025-01-01 02:00 UTC" in exc.value.message


def test_window_guard_with_max_duration() -> None:
    clock = FakeClock(utc(2024, 1, 6, 2))
    guard = WindowGuard(schedule("0 2 * * SAT", "2h"), clock)
    assert guard.closes_at == utc(2024, 1, 6, 4)
    assert guard.allows_start() and guard.allows_start(3600)
    clock.set(utc(2024, 1, 6, 3, 30))
    assert guard.allows_start(1800)            # finishes exactly at the close
    assert not guard.allows_start(1801)        # would overrun the close
    assert guard.allows_start(None)
    clock.set(utc(2024, 1, 6, 4))
    assert not guard.allows_start() and guard.closes_at is None


def test_window_guard_stays_closed_even_when_a_later_window_opens() -> None:
    clock = FakeClock(utc(2024, 1, 1, 10, 0))
    guard = WindowGuard(schedule("0 * * * *", "30m"), clock)
    clock.set(utc(2024, 1, 1, 11, 5))  # the 11:00 window is open, but the run's window closed at 10:30
    assert not guard.allows_start()


def test_window_guard_follows_overlapping_openings_without_a_gap() -> None:
    clock = FakeClock(utc(2024, 1, 1, 10, 0))
    guard = WindowGuard(schedule("0 * * * *", "90m"), clock)
    assert guard.closes_at == utc(2024, 1, 1, 11, 30)
    clock.set(utc(2024, 1, 1, 11, 20))
    assert guard.allows_start(3600) and guard.closes_at == utc(2024, 1, 1, 12, 30)


def test_window_guard_made_outside_the_window_allows_nothing() -> None:
    guard = WindowGuard(schedule("0 2 * * SAT", "2h"), FakeClock(utc(2024, 1, 3)))
    assert not guard.allows_start() and guard.closes_at is None


def test_fake_clock() -> None:
    clock = FakeClock(datetime(2024, 1, 1, 12, tzinfo=BERLIN))
    assert clock.now() == utc(2024, 1, 1, 11) and clock.now().tzinfo == UTC
    clock.advance(90)
    clock.sleep(30)
    assert clock.now() == utc(2024, 1, 1, 11, 2) and clock.sleeps == [30]
    with pytest.raises(ValueError):
        FakeClock(datetime(2024, 1, 1))
