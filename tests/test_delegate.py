"""`delegate_to` on local hosts (LocalConnection, real commands and files): where a step runs, with whose variables,
over how many connections, and what is refused (unknown hosts, metacharacters, templates naming the controller)."""

from __future__ import annotations

import collections
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from runbook import run
from runbook.connections.local import LocalConnection
from runbook.engine import ExecOptions, Executor
from runbook.errors import ConnectionFailed, PlaybookError
from runbook.events import EventStream, RunInfo
from runbook.inventory import Inventory
from runbook.loader import load_playbook, parse_playbook, validate_playbook
from runbook.results import RunMode, RunResult, Status, TaskResult
from tests.helpers import cli, records


def inventory(tmp_path: Path, names: tuple[str, ...] = ("a", "b", "d"), extra: dict[str, dict] | None = None) -> Path:
    """Local hosts, each with its own `dir`; `d` is the usual delegate."""
    hosts: dict[str, dict[str, Any]] = {}
    for n in names:
        (tmp_path / "hosts" / n).mkdir(parents=True, exist_ok=True)
        hosts[n] = {"ansible_connection": "local", "dir": str(tmp_path / "hosts" / n), "color": f"c-{n}",
                    **(extra or {}).get(n, {})}
    path = tmp_path / "inventory.yml"
    path.write_text(yaml.safe_dump({"all": {"hosts": hosts}}, sort_keys=False))
    return path


def playbook(tmp_path: Path, steps: list[dict[str, Any]], **top: Any) -> Path:
    path = tmp_path / "pb.yml"
    path.write_text(yaml.safe_dump({"runbook": "t", "hosts": "a:b", **top, "steps": steps}, sort_keys=False))
    return path


def go(tmp_path: Path, pb: Path, inv: Path, **kw: Any) -> RunResult:
    return run(pb, str(inv), audit_log=str(tmp_path / "audit.jsonl"), state_dir=str(tmp_path / "runs"), **kw)


class Counting(LocalConnection):
    """A local connection that counts how often each host is opened (shared across instances)."""

    opened: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    refuse: frozenset[str] = frozenset()

    def open(self) -> None:
        with self.lock:
            self.opened[self.name] += 1
        if self.name in self.refuse:
            raise ConnectionFailed(self.name, "connection refused")


def execute(pb: Path, inv: Path, mode: RunMode = RunMode.RUN, refuse: frozenset[str] = frozenset()) -> RunResult:
    """Run through the Executor with counting connections (the library's `run` builds real kinds itself)."""
    Counting.opened = collections.Counter()
    Counting.refuse = refuse
    inventory_ = Inventory.load(str(inv))
    book = load_playbook(pb)
    hosts = inventory_.select(book.hosts)
    info = RunInfo("t", mode, str(pb), book.runbook, "", str(inv), "", [h.name for h in hosts], "tester", "ctl",
                   "strict")
    options = ExecOptions(mode=mode, connect=lambda h: Counting(h.name), inventory_hosts=dict(inventory_.hosts))
    return Executor(book, hosts, info, EventStream([]), options).execute()


# --- where it runs, with whose variables ------------------------------------------------------------


def test_a_delegated_step_runs_on_the_delegate_with_the_selected_hosts_variables(tmp_path: Path) -> None:
    inv = inventory(tmp_path)
    log = tmp_path / "hosts" / "d" / "log"
    pb = playbook(tmp_path, [
        {"name": "record", "delegate_to": "d", "shell": f"echo {{{{ inventory_hostname }}}} {{{{ color }}}} >> {log}"},
        {"name": "own", "shell": "echo {{ inventory_hostname }} > {{ dir }}/own"},
    ])
    result = go(tmp_path, pb, inv)
    assert result.exit_code() == 0, result.as_dict()
    assert sorted(log.read_text().splitlines()) == ["a c-a", "b c-b"]   # d's own vars (c-d) are not used
    for h in ("a", "b"):
        r = result.get(h, "record")
        assert r is not None and r.host == h and r.delegated_to == "d"
        assert r.as_dict()["delegated_to"] == "d"
        assert result.get(h, "own").delegated_to is None and "delegated_to" not in result.get(h, "own").as_dict()
        assert (tmp_path / "hosts" / h / "own").read_text() == f"{h}\n"
    finished = [r for r in records(tmp_path / "audit.jsonl") if r["event"] == "task.finished" and r["step_id"] == "record"]
    assert sorted((r["host"], r["delegated_to"]) for r in finished) == [("a", "d"), ("b", "d")]


def test_on_controller_is_delegate_to_controller(tmp_path: Path) -> None:
    inv = inventory(tmp_path)
    out = tmp_path / "ctl.log"
    pb = playbook(tmp_path, [
        {"name": "alias", "on": "controller", "shell": f"echo on {{{{ inventory_hostname }}}} >> {out}"},
        {"name": "spelled", "delegate_to": "controller", "shell": f"echo to {{{{ inventory_hostname }}}} >> {out}"},
    ])
    result = go(tmp_path, pb, inv)
    assert result.exit_code() == 0, result.as_dict()
    assert sorted(out.read_text().splitlines()) == ["on a", "on b", "to a", "to b"]
    assert {r.delegated_to for r in result.results} == {"controller"}


def test_on_and_delegate_to_together_are_a_located_error() -> None:
    with pytest.raises(PlaybookError) as err:
        parse_playbook("runbook: t\nsteps:\n  - name: x\n    on: controller\n    delegate_to: d\n    shell: 'true'\n",
                       "pb.yml")
    assert "give only one of them" in str(err.value)
    assert err.value.problems[0].location.line == 3


def test_a_templated_delegate_is_rendered_per_host(tmp_path: Path) -> None:
    inv = inventory(tmp_path, ("a", "b", "d", "e"), extra={"a": {"backup": "d"}, "b": {"backup": "e"}})
    pb = playbook(tmp_path, [{"name": "save", "delegate_to": "{{ backup }}",
                              "shell": "echo {{ inventory_hostname }} > {{ root }}/{{ backup }}/from"}],
                  vars={"root": str(tmp_path / "hosts")})
    result = go(tmp_path, pb, inv)
    assert result.exit_code() == 0, result.as_dict()
    assert (tmp_path / "hosts" / "d" / "from").read_text() == "a\n"
    assert (tmp_path / "hosts" / "e" / "from").read_text() == "b\n"
    assert result.get("a", "save").delegated_to == "d" and result.get("b", "save").delegated_to == "e"


# --- connections ---------------------------------------------------------------------------------------


def test_one_connection_per_delegate_for_the_whole_run(tmp_path: Path) -> None:
    inv = inventory(tmp_path)
    pb = playbook(tmp_path, [
        {"name": "one", "delegate_to": "d", "shell": "true"},
        {"name": "two", "delegate_to": "d", "shell": "true"},
        {"name": "three", "needs": [], "delegate_to": "d", "shell": "true"},
        {"name": "own", "shell": "true"},
    ])
    result = execute(pb, inv)
    assert result.exit_code() == 0, result.as_dict()
    # Six tasks on d, from two hosts (some of them at once): one connection; a and b their own one each.
    assert Counting.opened == {"a": 1, "b": 1, "d": 1}


def test_an_unreachable_delegate_fails_its_tasks_once_not_its_hosts(tmp_path: Path) -> None:
    inv = inventory(tmp_path)
    pb = playbook(tmp_path, [
        {"name": "side", "needs": [], "shell": "touch {{ dir }}/side"},
        {"name": "via-d", "needs": [], "delegate_to": "d", "shell": "true"},
    ])
    result = execute(pb, inv, refuse=frozenset({"d"}))
    assert result.exit_code() == 2
    for h in ("a", "b"):
        r = result.get(h, "via-d")
        assert r.status == Status.FAILED and "delegate d is unreachable: connection refused" in r.message
        assert result.get(h, "side").status == Status.CHANGED
    assert not result.unreachable            # the hosts themselves were reached
    assert Counting.opened["d"] == 1         # the failure is kept: no second connect attempt


# --- refused delegates -------------------------------------------------------------------------------


def test_an_unknown_literal_delegate_is_a_located_error_before_any_host_is_touched(tmp_path: Path) -> None:
    inv = inventory(tmp_path)
    pb = playbook(tmp_path, [{"name": "first", "shell": "touch {{ dir }}/touched"},
                             {"name": "x", "delegate_to": "dd", "shell": "true"}])
    with pytest.raises(PlaybookError) as err:
        go(tmp_path, pb, inv)
    problem = err.value.problems[0]
    assert "`delegate_to: dd`: no such host in the inventory" in problem.message
    assert problem.hint == "did you mean `d`?"
    assert (problem.location.file, problem.location.line) == (str(pb), 7)
    assert not (tmp_path / "hosts" / "a" / "touched").exists()
    proc = cli("plan", str(pb), "-i", str(inv), "--audit-log", str(tmp_path / "a.jsonl"))
    assert proc.returncode == 4 and "pb.yml:7" in proc.stderr and "no such host" in proc.stderr


def test_a_delegate_outside_the_inventory_is_refused_even_when_it_resolves(tmp_path: Path) -> None:
    # `localhost` is Ansible's implicit host, but a delegate must be listed: it would be the control machine.
    inv = inventory(tmp_path)
    pb = playbook(tmp_path, [{"name": "x", "delegate_to": "localhost", "shell": "true"}])
    with pytest.raises(PlaybookError, match="no such host"):
        go(tmp_path, pb, inv)


@pytest.mark.parametrize("name", ["d; touch /tmp/owned", "../d", "d/../../etc", "$(id)", "d`id`", "-oProxyCommand=x",
                                  "d d", "", "d\n"])
def test_a_literal_delegate_with_metacharacters_is_invalid(name: str, tmp_path: Path) -> None:
    pb = playbook(tmp_path, [{"name": "x", "delegate_to": name, "shell": "true"}])
    report = validate_playbook(pb)
    if name == "d\n":   # surrounding whitespace is not part of a name
        assert not report.errors
        return
    assert report.errors, name
    assert "delegate_to" in report.errors[0].message and report.errors[0].location.line == 5


@pytest.mark.parametrize("value", ["h9", "d; touch {marker}", "../../d", "controller", "localhost", "d $(touch {marker})"])
def test_a_delegate_rendered_from_an_inventory_value_is_refused_unless_it_names_an_inventory_host(
        value: str, tmp_path: Path) -> None:
    marker = tmp_path / "owned"
    inv = inventory(tmp_path, extra={"a": {"target": value.format(marker=marker)}, "b": {"target": "d"}})
    pb = playbook(tmp_path, [{"name": "x", "delegate_to": "{{ target }}", "shell": "echo {{ inventory_hostname }} >> "
                              + str(tmp_path / "ran")}])
    result = go(tmp_path, pb, inv)
    r = result.get("a", "x")
    assert r.status == Status.FAILED and r.delegated_to is None, r
    assert "rendered from `{{ target }}`" in r.message or "delegate_to `" in r.message
    assert not marker.exists()
    assert result.get("b", "x").status == Status.CHANGED and result.get("b", "x").delegated_to == "d"
    assert (tmp_path / "ran").read_text() == "b\n"   # a's step ran nowhere


def test_a_delegate_from_extra_vars_naming_a_host_outside_the_inventory_is_refused(tmp_path: Path) -> None:
    inv = inventory(tmp_path)
    pb = playbook(tmp_path, [{"name": "x", "delegate_to": "{{ where }}", "shell": "true"}])
    result = go(tmp_path, pb, inv, extra_vars={"where": "evil.example.com"})
    assert {r.status for r in result.results} == {Status.FAILED}
    assert "delegate_to `evil.example.com` (rendered from `{{ where }}`) is not a host of the inventory" in \
        result.get("a", "x").message
    result = go(tmp_path, pb, inv, extra_vars={"where": "controller"})
    assert "names the control machine" in result.get("a", "x").message


def test_a_refused_delegate_of_a_skipped_step_only_skips(tmp_path: Path) -> None:
    inv = inventory(tmp_path)
    pb = playbook(tmp_path, [{"name": "x", "when": "false", "delegate_to": "{{ nowhere }}", "shell": "true"}])
    result = go(tmp_path, pb, inv)
    assert result.exit_code() == 0 and {r.status for r in result.results} == {Status.SKIPPED}


# --- dry runs ----------------------------------------------------------------------------------------------


def test_a_dry_run_through_a_delegate_changes_nothing_on_it(tmp_path: Path) -> None:
    inv = inventory(tmp_path)
    src = tmp_path / "conf"
    src.write_text("x=1\n")
    d = tmp_path / "hosts" / "d"
    pb = playbook(tmp_path, [
        {"name": "look", "delegate_to": "d", "read_only": True, "shell": f"ls {d}", "register": "seen"},
        {"name": "write", "delegate_to": "d", "shell": f"touch {d}/{{{{ inventory_hostname }}}}"},
        {"name": "send", "delegate_to": "d", "upload": {"src": str(src), "dest": f"{d}/conf-{{{{ inventory_hostname }}}}"}},
    ], on_failure=[{"name": "undo", "delegate_to": "d", "shell": f"touch {d}/rescued"}])
    result = go(tmp_path, pb, inv, mode="plan")
    assert list(d.iterdir()) == []
    assert result.get("a", "send").prediction is not None and str(result.get("a", "send").prediction) == "change"
    assert result.get("a", "look").status == Status.OK and result.get("a", "look").delegated_to == "d"


def test_a_dry_run_predicts_on_failure_steps_instead_of_running_them(tmp_path: Path) -> None:
    inv = inventory(tmp_path)
    pb = playbook(tmp_path, [{"name": "bad", "assert": "1 == 2"}],
                  on_failure=[{"name": "rescue", "shell": "touch {{ dir }}/rescued"}])
    result = go(tmp_path, pb, inv, mode="plan")
    assert not (tmp_path / "hosts" / "a" / "rescued").exists()
    rescue = result.get("a", "rescue")
    assert rescue is not None and rescue.on_failure and rescue.prediction is not None
    assert go(tmp_path, pb, inv).get("a", "rescue").status == Status.CHANGED   # a real run still rescues
    assert (tmp_path / "hosts" / "a" / "rescued").exists()


# --- results files ------------------------------------------------------------------------------------------


def test_results_keep_where_a_task_ran_and_old_files_still_read() -> None:
    res = TaskResult("a", "x", "shell", Status.OK, delegated_to="d")
    assert TaskResult.from_dict(json.loads(json.dumps(res.as_dict()))).delegated_to == "d"
    old = {k: v for k, v in TaskResult("a", "x", "shell", Status.OK).as_dict().items()}
    assert "delegated_to" not in old
    assert TaskResult.from_dict(old).delegated_to is None


def test_the_console_names_the_host_and_where_it_ran(tmp_path: Path) -> None:
    inv = inventory(tmp_path)
    pb = playbook(tmp_path, [{"name": "x", "delegate_to": "d", "shell": "true"}])
    proc = cli("run", str(pb), "-i", str(inv), "--audit-log", str(tmp_path / "a.jsonl"))
    assert proc.returncode == 0, proc.stderr
    assert "a: x (on d): changed" in proc.stderr and "b: x (on d): changed" in proc.stderr


def test_sudo_on_a_delegate_uses_the_delegates_become_user(tmp_path: Path) -> None:
    import os
    import shutil

    if os.geteuid() != 0 or shutil.which("sudo") is None:
        pytest.skip("needs root and sudo (to become another user without a password)")
    inv = inventory(tmp_path, extra={"a": {"become_user": "root"}, "d": {"become_user": "nobody"}})
    pb = playbook(tmp_path, [{"name": "who", "delegate_to": "d", "sudo": True, "shell": "id -un"},
                             {"name": "me", "sudo": True, "shell": "id -un"}], hosts="a")
    result = go(tmp_path, pb, inv)
    assert result.exit_code() == 0, result.as_dict()
    assert result.get("a", "who").stdout == "nobody\n" and result.get("a", "me").stdout == "root\n"


def test_delegate_to_on_a_block_is_refused_rather_than_dropped(tmp_path: Path) -> None:
    pb = playbook(tmp_path, [{"name": "grp", "delegate_to": "d", "block": [{"name": "inner", "shell": "true"}]}])
    report = validate_playbook(pb)
    assert report.errors and "does not reach the steps inside it" in report.errors[0].message
    assert report.errors[0].location.line == 4


def test_a_looped_step_delegates_each_item(tmp_path: Path) -> None:
    inv = inventory(tmp_path, ("a", "d", "e"))
    pb = playbook(tmp_path, [{"name": "fan", "loop": ["d", "e"], "delegate_to": "{{ item }}",
                              "shell": "echo {{ inventory_hostname }} > {{ root }}/{{ item }}/got"}],
                  hosts="a", vars={"root": str(tmp_path / "hosts")})
    result = go(tmp_path, pb, inv)
    assert result.exit_code() == 0, result.as_dict()
    items = sorted((r.step_id, r.delegated_to) for r in result.results if r.parent == "fan")
    assert [where for _, where in items] == ["d", "e"]
    assert (tmp_path / "hosts" / "d" / "got").read_text() == "a\n" == (tmp_path / "hosts" / "e" / "got").read_text()


def test_a_step_delegated_to_its_own_host_runs_there_as_usual(tmp_path: Path) -> None:
    inv = inventory(tmp_path)
    pb = playbook(tmp_path, [{"name": "self", "delegate_to": "{{ inventory_hostname }}", "shell": "true"},
                             {"name": "literal", "delegate_to": "a", "shell": "true"}])
    result = execute(pb, inv)
    assert result.exit_code() == 0, result.as_dict()
    assert result.get("a", "self").delegated_to is None and result.get("a", "literal").delegated_to is None
    assert result.get("b", "literal").delegated_to == "a"
    assert Counting.opened == {"a": 2, "b": 1}   # a: its own connection, and the delegate connection b's step uses


def test_a_saved_plan_names_where_a_step_would_run_and_applies(tmp_path: Path) -> None:
    inv = inventory(tmp_path)
    log = tmp_path / "hosts" / "d" / "log"
    pb = playbook(tmp_path, [{"name": "record", "delegate_to": "d", "shell": f"echo {{{{ inventory_hostname }}}} >> {log}"}])
    out = tmp_path / "plan.json"
    audit = str(tmp_path / "a.jsonl")
    planned = cli("plan", str(pb), "-i", str(inv), "--audit-log", audit, "--out", str(out))
    assert planned.returncode == 0, planned.stderr
    assert "? record (on d)  unknown" in planned.stdout and not log.exists()
    doc = json.loads(out.read_text())
    assert {p["host"]: p["delegated_to"] for p in doc["predictions"]} == {"a": "d", "b": "d"}
    assert "record (on d)" in cli("show", str(out)).stdout
    applied = cli("apply", str(out), "--audit-log", audit, "-y")
    assert applied.returncode == 0, applied.stderr
    assert sorted(log.read_text().split()) == ["a", "b"]


def test_validate_with_an_inventory_finds_an_unknown_delegate_located(tmp_path: Path) -> None:
    """`validate -i INV` catches a misspelt literal delegate before any run, with the file, line and a did-you-mean."""
    import subprocess
    import sys

    pb = tmp_path / "pb.yml"
    pb.write_text("runbook: t\nsteps:\n  - name: drain\n    delegate_to: lb01\n    shell: 'true'\n")
    inv = tmp_path / "inv.yml"
    inv.write_text("all:\n  hosts:\n    web1: {ansible_connection: local}\n    lb1: {ansible_connection: local}\n")

    def validate(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "runbook", "validate", str(pb), *extra], capture_output=True, text=True)

    assert validate().returncode == 0   # without an inventory the name cannot be checked
    found = validate("-i", str(inv))
    assert found.returncode == 4
    assert f"{pb}:4:18: error: `delegate_to: lb01`: no such host in the inventory" in found.stderr
    assert "did you mean `lb1`?" in found.stderr
    pb.write_text(pb.read_text().replace("lb01", "lb1"))
    assert validate("-i", str(inv)).returncode == 0
