"""The rules file: loading with located errors, matching, targets from alerts (and hostile ones), vars from alerts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runbook.cli import main
from runbook.errors import TemplateError
from runbook.inventory import Inventory
from runbook.serve.bridge import exact_limit, map_hosts
from runbook.serve.models import Alert
from runbook.serve.rules import (RulesError, TargetError, check_host_text, load_rules, render_vars, scalar, strip_port,
                                 target_names, validate_rules_file)
from runbook.serve.worker import route
from tests.serve_support import make_site

ISSUE_EXAMPLE = """\
rules:
  - name: disk-full
    match: {alertname: DiskFull, severity: "~critical|page"}   # labels; a leading ~ is a regex
    status: firing                        # firing (default) | resolved | any
    playbook: disk-pressure.yml           # relative to the rules file
    hosts: "{{ alert.labels.instance }}"  # optional; default: labels.instance without its port
    vars: {threshold: "{{ alert.annotations.threshold | default(85) }}"}
    mode: apply                           # apply (default) | plan
    cooldown: 10m
    breaker: {max_runs: 3, per: 1h, escalate: page-oncall.yml}
    on_resolved: disk-pressure-verify.yml
"""


def alert(labels: dict[str, str] | None = None, *, status: str = "firing", annotations: dict[str, str] | None = None,
          source: str = "alertmanager") -> Alert:
    return Alert(source, status, "f00d", "2026-11-30T10:00:00Z",
                 {"alertname": "DiskFull", "severity": "critical", "instance": "web01:9100", **(labels or {})},
                 annotations or {})


@pytest.fixture
def example(tmp_path: Path) -> Path:
    site = make_site(tmp_path)
    for name in ("disk-pressure", "page-oncall", "disk-pressure-verify"):
        site.playbook(name)
    path = tmp_path / "rules.yml"
    path.write_text(ISSUE_EXAMPLE)
    return path


def write(tmp_path: Path, text: str) -> Path:
    make_site(tmp_path)
    path = tmp_path / "rules.yml"
    path.write_text(text)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(RulesError) as info:
        load_rules(path)
    return [p.render() for p in info.value.problems]


# --- the issue's example ----------------------------------------------------------------------------

def test_issue_example_loads_with_effective_settings(example: Path) -> None:
    rules = load_rules(example)
    [rule] = rules.rules
    assert rule.name == "disk-full" and rule.cooldown == 600
    assert rule.breaker.max_runs == 3 and rule.breaker.per == 3600
    assert rule.playbook == example.parent / "disk-pressure.yml"
    assert rule.escalate == example.parent / "page-oncall.yml"
    assert rule.on_resolved == example.parent / "disk-pressure-verify.yml"


def test_issue_example_matches_labels_regex_and_status(example: Path) -> None:
    [rule] = load_rules(example).rules
    assert rule.matches(alert())
    assert rule.matches(alert({"severity": "page"}))
    assert not rule.matches(alert({"severity": "warning"}))
    assert not rule.matches(alert({"severity": "critical-ish"})), "a regex must match the whole value"
    assert not rule.matches(alert({"alertname": "DiskAlmostFull"}))
    assert not rule.matches(alert(source="hook:deploy")), "an Alertmanager rule does not take generic hooks"
    assert rule.playbook_for(alert()) == ("remediate", rule.playbook)
    assert rule.playbook_for(alert(status="resolved")) == ("resolved", rule.on_resolved)


def test_issue_example_targets_and_vars(example: Path) -> None:
    [rule] = load_rules(example).rules
    assert target_names(rule, alert()) == ["web01"]
    assert render_vars(rule, alert()) == {"threshold": 85}
    assert render_vars(rule, alert(annotations={"threshold": "91"})) == {"threshold": 91}
    assert render_vars(rule, alert(annotations={"threshold": "91; reboot"})) == {"threshold": "91; reboot"}


@pytest.mark.parametrize(("text", "value"), [("85", 85), ("-3", -3), ("0.5", 0.5), ("true", True), ("0644", "0644"),
                                             ("1e9", "1e9"), ("85 ", "85 "), ("", ""), ("9" * 30, "9" * 30)])
def test_rendered_numbers_become_numbers_and_nothing_else_is_parsed(text: str, value: object) -> None:
    assert scalar(text) == value and type(scalar(text)) is type(value)


def test_validate_command_accepts_a_rules_file(example: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(example)]) == 0
    assert "ok — 1 rule(s): disk-full; 3 playbook(s) valid" in capsys.readouterr().out
    assert main(["validate", "--format", "json", str(example)]) == 0
    [report] = json.loads(capsys.readouterr().out)
    assert report["kind"] == "rules" and report["valid"] is True


def test_validate_command_reports_a_broken_playbook_of_a_rule(example: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (example.parent / "page-oncall.yml").write_text("runbook: x\nsteps:\n  - name: a\n    shel: echo\n")
    assert main(["validate", str(example)]) == 4
    err = capsys.readouterr().err
    assert "page-oncall.yml:4:5" in err and "unknown key `shel`" in err


# --- matching -----------------------------------------------------------------------------------------

def test_lists_annotations_status_any_and_missing_labels(tmp_path: Path) -> None:
    rules = load_rules(write(tmp_path, """\
rules:
  - name: list
    match: {alertname: [DiskFull, "~Disk.*Soon"], team: ""}
    match_annotations: {runbook: "~https://wiki/.*"}
    status: any
    playbook: fix.yml
"""))
    [rule] = rules.rules
    ok = {"runbook": "https://wiki/disk"}
    assert rule.matches(alert(annotations=ok))
    assert rule.matches(alert({"alertname": "DiskFullSoon"}, annotations=ok))
    assert not rule.matches(alert({"team": "db"}, annotations=ok)), "team must be absent (Prometheus: missing = empty)"
    assert not rule.matches(alert(annotations={"runbook": "elsewhere"}))
    assert rule.playbook_for(alert(status="resolved")) == ("remediate", rule.playbook)


def test_hook_rules_match_only_their_hook(tmp_path: Path) -> None:
    rules = load_rules(write(tmp_path, "rules:\n  - name: deploy\n    hook: deploy\n    match: {app: api}\n    playbook: fix.yml\n"))
    [rule] = rules.rules
    assert rule.matches(Alert("hook:deploy", "firing", "1", "", {"app": "api"}))
    assert not rule.matches(Alert("hook:other", "firing", "1", "", {"app": "api"}))
    assert not rule.matches(Alert("alertmanager", "firing", "1", "", {"app": "api"}))
    assert rules.hook_names == {"deploy"}


# --- located errors -------------------------------------------------------------------------------------

def test_unknown_keys_are_located_with_a_suggestion(tmp_path: Path) -> None:
    found = [p.replace(f"{tmp_path}/", "") for p in
             problems(write(tmp_path, "rules:\n  - name: a\n    playbok: fix.yml\n    breaker: {max_run: 3}\n"))]
    assert any("rules.yml:3:5: error: unknown key `playbok`" in p and "did you mean `playbook`?" in p for p in found)
    assert any("rules.yml:4:15: error: unknown key `max_run`" in p and "max_runs" in p for p in found)


@pytest.mark.parametrize(("text", "expected"), [
    ("rules:\n  - name: a\n    match: {severity: \"~crit(\"}\n    playbook: fix.yml\n",
     "rules.yml:3:23: error: `severity`: invalid regular expression"),
    ("rules:\n  - name: a\n    playbook: missing.yml\n", "rules.yml:3:15: error: playbook missing.yml not found"),
    ("rules:\n  - name: a\n    playbook: fix.yml\n    cooldown: 10 minutes\n", "rules.yml:4:15: error: `cooldown`"),
    ("rules:\n  - name: a\n    playbook: fix.yml\n  - name: a\n    playbook: fix.yml\n",
     "rules.yml:4:11: error: duplicate rule name `a`"),
    ("rules:\n  - name: a\n    playbook: fix.yml\n    vars: {x: \"{{ host.name }}\"}\n",
     "rules.yml:4:15: error: `x`: unknown name `host` in a rule template"),
    ("rules:\n  - name: a\n    playbook: fix.yml\n    hosts: \"{{ alert.labels.instance \"\n",
     "rules.yml:4:12: error: `hosts`: template syntax error"),
    ("rules:\n  - name: a\n    status: resolved\n    playbook: fix.yml\n    on_resolved: verify.yml\n",
     "rules.yml:5:18: error: `on_resolved`: only for rules with `status: firing`"),
    ("rules:\n  - name: a\n    playbook: fix.yml\n    mode: later\n", "rules.yml:4:11: error: `mode`"),
    ("rules:\n  - name: a b\n    playbook: fix.yml\n", "rules.yml:2:11: error: `name`: invalid value 'a b'"),
    ("rules:\n  - name: a\n    playbook: fix.yml\n    breaker: {max_runs: 0}\n", "rules.yml:4:25: error: `max_runs`"),
    ("rules:\n  - name: a\n    playbook: fix.yml\nhooks:\n  deploy: {secret: \"plain-text\"}\n",
     "rules.yml:5:20: error: `secret`: invalid value"),
    ("rules: []\n", "rules.yml:1:8: error: `rules`: must not be empty"),
    ("- name: a\n", "rules.yml:1:1: error: expected a mapping with a `rules:` list"),
    ("# nothing\n", "rules.yml:1:1: error: the rules file is empty"),
    ("rules:\n  - name: a\n\tplaybook: x\n", "rules.yml:3:1: error: malformed YAML"),
])
def test_invalid_rules_files_give_located_errors(tmp_path: Path, text: str, expected: str) -> None:
    found = [p.replace(f"{tmp_path}/", "") for p in problems(write(tmp_path, text))]
    assert any(p.startswith(expected) for p in found), found


def test_a_missing_rules_file_is_a_located_error(tmp_path: Path) -> None:
    report = validate_rules_file(tmp_path / "nope.yml")
    assert report.errors and "rules file not found" in report.errors[0].message


# --- targets: the alert says which host; nothing it says may widen the selection ---------------------------

@pytest.mark.parametrize(("text", "host"), [
    ("web01:9100", "web01"), ("web01", "web01"), ("10.0.0.1:9100", "10.0.0.1"), ("[::1]:9100", "::1"), ("::1", "::1"),
    ("web01.example.com:443", "web01.example.com"),
])
def test_strip_port(text: str, host: str) -> None:
    assert strip_port(text) == host


@pytest.mark.parametrize("hostile", ["web01;reboot", "$(reboot)", "`id`", "web*", "~.*", "web[01:09]", "web:&prod",
                                     "!web01", "a&b", "../../etc", "-oProxyCommand=x", "web01\n", "web01\nweb02", "é", ""])
def test_hostile_host_text_is_refused(hostile: str) -> None:
    with pytest.raises(TargetError):
        check_host_text(strip_port(hostile) if hostile.strip() == hostile else hostile)


def test_host_text_with_whitespace_names_separate_hosts_each_checked(tmp_path: Path) -> None:
    [rule] = load_rules(write(tmp_path, "rules:\n  - name: a\n    playbook: fix.yml\n")).rules
    assert target_names(rule, alert({"instance": "web01 web02,db01:9100"})) == ["web01", "web02", "db01"]
    with pytest.raises(TargetError):
        target_names(rule, alert({"instance": "web01 $(reboot)"}))


def test_alert_hosts_map_to_inventory_by_name_or_address_only(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    inv = Inventory.load(site.inventory)
    assert map_hosts(inv, ["web01", "WEB02", "10.0.0.3"]) == (["web01", "web02", "db01"], [])
    hosts, why = map_hosts(inv, ["all", "web", "nothere"])
    assert hosts == [] and len(why) == 3, "a group name or pattern word never selects hosts"
    assert "`all` is not in the inventory" in why[0]


def test_an_address_shared_by_several_hosts_is_refused(tmp_path: Path) -> None:
    inv = Inventory.from_text("all:\n  hosts:\n    a: {ansible_host: 127.0.0.1}\n    b: {ansible_host: 127.0.0.1}\n")
    hosts, why = map_hosts(inv, ["127.0.0.1"])
    assert hosts == [] and "several inventory hosts (a, b)" in why[0]


def test_a_host_named_like_a_group_is_refused(tmp_path: Path) -> None:
    inv = Inventory.from_text("all:\n  children:\n    web:\n      hosts:\n        web: {}\n        web2: {}\n")
    hosts, why = map_hosts(inv, ["web"])
    assert hosts == [] and "cannot be selected alone" in why[0]


def test_exact_limit_selects_one_host_and_refuses_pattern_characters(tmp_path: Path) -> None:
    inv = Inventory.from_text("all:\n  hosts:\n    web01: {}\n    web010: {}\n    web01x: {}\n")
    assert [h.name for h in inv.select("all", exact_limit("web01"))] == ["web01"]
    with pytest.raises(ValueError):
        exact_limit("web*")


def test_route_records_unknown_hosts_and_templates_that_fail(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    rules = load_rules(write(tmp_path, """\
rules:
  - name: by-label
    playbook: fix.yml
  - name: strict-var
    playbook: fix.yml
    vars: {x: "{{ alert.annotations.missing }}"}
  - name: escape
    playbook: fix.yml
    hosts: "{{ ''.__class__.__mro__ }}"
"""))
    inv = Inventory.load(site.inventory)
    r = route(alert({"instance": "nothere:9100"}), rules, inv)
    assert r.jobs == []
    codes = sorted(code for _, code, _ in r.ignored)
    assert codes == ["template_error", "template_error", "unknown_host"], r.ignored
    r = route(alert(), rules, inv)
    assert [(j.rule, j.host) for j in r.jobs] == [("by-label", "web01")]


# --- vars: payload text is data ----------------------------------------------------------------------------

def test_payload_text_is_never_rendered_as_a_template(tmp_path: Path) -> None:
    [rule] = load_rules(write(tmp_path, "rules:\n  - name: a\n    playbook: fix.yml\n"
                                        "    vars: {v: \"{{ alert.annotations.summary }}\", n: [\"{{ alert.labels.instance }}\"]}\n")).rules
    hostile = "{{ 7 * 7 }} {% for x in range(3) %}x{% endfor %} $(reboot)"
    assert render_vars(rule, alert(annotations={"summary": hostile})) == {"v": hostile, "n": ["web01:9100"]}


def test_rule_templates_are_sandboxed(tmp_path: Path) -> None:
    [rule] = load_rules(write(tmp_path, "rules:\n  - name: a\n    playbook: fix.yml\n"
                                        "    vars: {v: \"{{ alert.labels.__class__.__init__.__globals__ }}\"}\n")).rules
    with pytest.raises(TemplateError):
        render_vars(rule, alert())


def test_a_generic_hook_body_without_labels_gives_bounded_labels() -> None:
    from runbook.serve.models import HookEvent, alert_from_hook

    body = {f"k{i}": i for i in range(200)} | {"nested": {"a": 1}, "bad key": "x", "ünï": "x", "long": "x" * 5000}
    a = alert_from_hook("h", HookEvent.model_validate(body), body)
    assert len(a.labels) == 64 and a.labels["k0"] == "0" and "nested" not in a.labels and "bad key" not in a.labels
    same = alert_from_hook("h", HookEvent.model_validate(body), body)
    assert a.dedupe_key == same.dedupe_key, "the same body is the same event"
    other = alert_from_hook("h", HookEvent.model_validate({**body, "k0": 1}), {**body, "k0": 1})
    assert other.dedupe_key != a.dedupe_key
