"""The pydantic models of the playbook format: durations, limits, steps and their actions."""

from __future__ import annotations

import math
from typing import Any

import pydantic
import pytest

from runbook.model import ACTIONS, Limit, Playbook, Step, Window, parse_duration, parse_limit, slugify


def step(**kw: Any) -> dict[str, Any]:
    """A step mapping with a name and a shell action unless overridden."""
    base: dict[str, Any] = {"name": "do it", "shell": "true"}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


def playbook(**kw: Any) -> dict[str, Any]:
    """A minimal valid playbook mapping with overrides."""
    base: dict[str, Any] = {"runbook": "t", "steps": [step()]}
    base.update(kw)
    return base


@pytest.mark.parametrize("text, seconds", [
    ("30s", 30), ("5m", 300), ("2h", 7200), ("1h30m", 5400), ("250ms", 0.25), ("1.5s", 1.5), ("0s", 0),
    ("90", 90), (12, 12), (2.5, 2.5), (" 5m ", 300), ("1h 2m 3s", 3723), ("1d", 86400), ("7d 12h", 648000),
])
def test_durations_parse_to_seconds(text: Any, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "s", "5x", "five minutes", "-5s", "5m1h", True, None, [], -1, float("inf"), float("nan"), "1h1d", "1w"])
def test_invalid_durations_are_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="duration|boolean"):
        parse_duration(bad)


@pytest.mark.parametrize("text, total, expected", [
    (5, 100, 5), ("5", 100, 5), ("25%", 8, 2), ("1%", 3, 1), ("100%", 7, 7), ("50 %", 3, 2), ("10%", 0, 0),
])
def test_limits_resolve_against_host_counts(text: Any, total: int, expected: int) -> None:
    assert parse_limit(text).of(total) == expected


@pytest.mark.parametrize("bad", ["abc", "150%", "-1", -1, True, 2.5, "%", None, "5%%"])
def test_invalid_limits_are_refused(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_limit(bad)


def test_limit_renders_back_to_its_text() -> None:
    assert str(Limit(25, percent=True)) == "25%"
    assert str(Limit(3)) == "3"


@pytest.mark.parametrize("name, slug", [
    ("measure usage", "measure-usage"), ("Restart  NGINX!", "restart-nginx"), ("Café crème", "cafe-creme"), ("???", "step"),
])
def test_slugify(name: str, slug: str) -> None:
    assert slugify(name) == slug


def test_valid_playbook_with_every_feature() -> None:
    pb = Playbook.model_validate(playbook(
        hosts="web:&prod", vars={"x": 1}, secrets={"t": "env:TOKEN"}, concurrency=4, batch="25%", max_failures=2,
        window={"cron": "0 2 * * SAT", "duration": "2h", "timezone": "Europe/Berlin"},
        steps=[step(register="out", sudo="postgres", timeout="30s", retries=2, delay="5s", tags="x", env={"A": 1, "B": True}),
               step(name="copy", shell=None, upload={"src": "a", "dest": "/b", "mode": 644}),
               step(name="check", shell=None, **{"assert": "out.rc == 0"}),
               step(name="ok?", shell=None, approve="go on?"),
               step(name="wait", shell=None, wait_for={"port": 22, "timeout": "1m"})],
        on_failure=[step(name="page", on="controller", once=True)],
    ))
    first = pb.steps[0]
    assert first.register_as == "out" and first.sudo == "postgres" and first.timeout == 30 and first.delay == 5
    assert first.tags == ["x"] and first.env == {"A": "1", "B": "true"}
    assert pb.steps[1].action == "upload" and pb.steps[1].action_spec.mode == "644"
    assert pb.steps[2].action_spec.that == ["out.rc == 0"]
    assert pb.steps[3].action_spec.prompt == "go on?"
    assert pb.steps[4].action_spec.timeout == 60
    assert pb.batch == Limit(25, percent=True) and pb.max_failures == Limit(2)
    assert isinstance(pb.window, Window) and pb.window.duration == 7200
    assert [s.step_id for s in pb.all_steps()] == ["do-it", "copy", "check", "ok", "wait", "page"]
    assert pb.step("page").on == "controller"


def test_defaults() -> None:
    pb = Playbook.model_validate(playbook())
    assert pb.hosts == "all" and pb.concurrency == 10 and pb.batch is None and pb.window is None
    s = pb.steps[0]
    assert s.needs is None and s.sudo is False and s.retries == 0 and not s.read_only and s.guards == {}


def test_empty_collections_may_be_left_blank() -> None:
    pb = Playbook.model_validate(playbook(vars=None, secrets=None, on_failure=None, steps=[step(tags=None, env=None)]))
    assert pb.vars == {} and pb.secrets == {} and pb.on_failure == [] and pb.steps[0].tags == []


def test_guards_are_collected() -> None:
    s = Step.model_validate(step(creates="/a", unless="test -f /b"))
    assert s.guards == {"creates": "/a", "unless": "test -f /b"}


def test_every_action_is_accepted() -> None:
    specs = {"shell": "x", "command": ["ls"], "upload": {"src": "a", "dest": "b"}, "template": {"src": "a", "dest": "b"},
             "fetch": {"src": "a", "dest": "b"}, "wait_for": {"path": "/x"}, "assert": ["1 == 1"], "approve": {}}
    assert set(specs) <= set(ACTIONS)
    for action, spec in specs.items():
        s = Step.model_validate({"name": "n", action: spec})
        assert s.action == action


def _errors(data: dict[str, Any]) -> list[dict[str, Any]]:
    with pytest.raises(pydantic.ValidationError) as info:
        Playbook.model_validate(data)
    return info.value.errors()


def test_two_actions_and_no_action_are_refused() -> None:
    (err,) = _errors(playbook(steps=[step(command=["ls"])]))
    assert "2 actions (shell, command)" in err["msg"]
    (err,) = _errors(playbook(steps=[{"name": "idle"}]))
    assert "no action" in err["msg"]


@pytest.mark.parametrize("data, loc", [
    (playbook(extra=1), ("extra",)),
    (playbook(steps=[step(reigster="x")]), ("steps", 0, "reigster")),
    (playbook(steps=[step(retries=True)]), ("steps", 0, "retries")),
    (playbook(steps=[step(retries=-1)]), ("steps", 0, "retries")),
    (playbook(concurrency=0), ("concurrency",)),
    (playbook(batch=0), ("batch",)),
    (playbook(batch="0%"), ("batch",)),
    (playbook(secrets={"a": "plain"}), ("secrets", "a")),
    (playbook(steps=[step(id="-bad")]), ("steps", 0, "id")),
    (playbook(steps=[step(register="1x")]), ("steps", 0, "register")),
    (playbook(steps=[step(on="remote")]), ("steps", 0, "on")),
    (playbook(steps=[]), ("steps",)),
    (playbook(steps=[step(shell=None, command=[])]), ("steps", 0, "command")),
    (playbook(steps=[step(shell=None, wait_for={"port": 1, "path": "/x"})]), ("steps", 0, "wait_for")),
    (playbook(steps=[step(shell=None, wait_for={"port": 70000})]), ("steps", 0, "wait_for", "port")),
    (playbook(steps=[step(shell=None, upload={"src": "a", "dest": "b", "mode": "0999"})]), ("steps", 0, "upload", "mode")),
    (playbook(schedule="every day"), ("schedule",)),
])
def test_invalid_values_are_refused_at_their_location(data: dict[str, Any], loc: tuple) -> None:
    locs = [tuple(e["loc"]) for e in _errors(data)]
    # A union (e.g. `port`: a number or a template) adds its alternatives' tags after the location.
    assert any(found[:len(loc)] == loc for found in locs), locs


@pytest.mark.parametrize("window, field", [
    ({"cron": "bad", "duration": "1h"}, "cron"),
    ({"cron": "* * * * * * *", "duration": "1h"}, "cron"),
    ({"cron": "0 2 * * *", "duration": "0s"}, "duration"),
    ({"cron": "0 2 * * *", "duration": "1h", "timezone": "Mars/Olympus"}, "timezone"),
    ({"cron": "0 2 * * *", "duration": "1h", "timezone": "Europe"}, "timezone"),  # a directory of the tz database
    ({"cron": "0 2 * * *", "duration": "1h", "timezone": "x" * 5000}, "timezone"),  # too long for the filesystem
])
def test_invalid_windows_are_refused(window: dict[str, Any], field: str) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        Window.model_validate(window)
    assert [e["loc"] for e in info.value.errors()] == [(field,)]


def test_window_accepts_cron_aliases() -> None:
    assert Window.model_validate({"cron": "@daily", "duration": "1h"}).cron == "@daily"


def test_durations_serialize_as_seconds_text() -> None:
    dumped = Playbook.model_validate(playbook(steps=[step(delay="1m")])).model_dump(by_alias=True)
    assert dumped["steps"][0]["delay"] == "60s"
    assert not math.isnan(parse_duration("0.5s"))
