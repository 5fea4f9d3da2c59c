"""Plugins: a toy action and a toy connection, installed from a test directory through entry points only."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from runbook.actions import ACTIONS, Action
from runbook.connections import CONNECTIONS
from runbook.errors import RunbookError
from runbook.plugins import Registry
from tests.helpers import REPO, cli

TOY_MODULE = '''
"""A third-party package: one action and one connection kind, nothing else."""
import json, os
from typing import Any, ClassVar
from runbook.actions import Action, Outcome, Prediction, PredictionKind
from runbook.actions.base import FieldKind, TemplatedField
from runbook.connections.local import LocalConnection


class Toy(Action):
    """Write a greeting into a file on the host; predicts exactly."""

    name = "toy"
    spec_type: ClassVar[Any] = str

    def fields(self):
        yield TemplatedField((), self.spec, FieldKind.TEMPLATE)

    def _path(self, env):
        return os.path.join(env.vars["toy_dir"], "greeting")

    def plan(self, env):
        have = env.conn.read(self._path(env))
        want = env.render(self.spec).encode()
        if have == want:
            return Prediction(PredictionKind.OK, "greeting already there")
        return Prediction(PredictionKind.CHANGE, "would write the greeting")

    def apply(self, env):
        want = env.render(self.spec).encode()
        if env.conn.read(self._path(env)) == want:
            return Outcome(message="unchanged")
        env.conn.put(want, self._path(env))
        return Outcome(changed=True, message="written", stdout=want.decode())


class ToyConnection(LocalConnection):
    """A connection kind that logs every call it serves (and runs them locally)."""

    kind = "toy"
    host_vars: ClassVar[tuple] = ("toy_log",)

    def __init__(self, name, log):
        super().__init__(name)
        self.log = log

    @classmethod
    def for_host(cls, host, options):
        return cls(host.name, host.vars["toy_log"])

    def _note(self, what):
        with open(self.log, "a") as fh:
            fh.write(json.dumps([self.name, what]) + "\\n")

    def open(self):
        self._note("open")

    def read(self, path):
        self._note("read")
        return super().read(path)

    def put(self, data, path, mode=None):
        self._note("put")
        return super().put(data, path, mode)
'''


@pytest.fixture
def plugin_path(tmp_path: Path) -> Path:
    """A directory holding the toy package and its dist-info with entry points (as pip would install it)."""
    site = tmp_path / "site"
    (site / "toyplug").mkdir(parents=True)
    (site / "toyplug" / "__init__.py").write_text(TOY_MODULE)
    dist = site / "toyplug-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""\
        [runbook.actions]
        toy = toyplug:Toy

        [runbook.connections]
        toy = toyplug:ToyConnection
    """))
    return site


def _files(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    box = tmp_path / "box"
    box.mkdir()
    log = tmp_path / "calls.jsonl"
    inv = tmp_path / "inv.yml"
    inv.write_text(json.dumps({"all": {"hosts": {"t1": {"ansible_connection": "toy", "toy_log": str(log),
                                                         "toy_dir": str(box)}}}}))
    pb = tmp_path / "toy.yml"
    pb.write_text(textwrap.dedent("""\
        runbook: toy
        steps:
          - name: greet
            toy: "hello {{ inventory_hostname }}"
    """))
    return box, log, inv, pb


def test_a_plugin_action_and_connection_run_without_touching_runbook(tmp_path: Path, plugin_path: Path) -> None:
    box, log, inv, pb = _files(tmp_path)
    env = {"PYTHONPATH": f"{REPO}:{plugin_path}", "RUNBOOK_AUDIT_LOG": str(tmp_path / "audit.jsonl")}
    assert cli("validate", "--strict", str(pb), env=env).returncode == 0
    schema = json.loads(cli("schema", env=env).stdout)
    assert "toy" in json.dumps(schema)

    planned = cli("plan", str(pb), "-i", str(inv), "--output", "json", env=env)
    assert planned.returncode == 0, planned.stderr
    [pred] = json.loads(planned.stdout)["predictions"]
    assert (pred["action"], pred["prediction"]) == ("toy", "change")
    assert not (box / "greeting").exists()            # the dry run wrote nothing

    ran = cli("run", str(pb), "-i", str(inv), "--output", "json", env=env)
    assert ran.returncode == 0, ran.stderr
    [res] = json.loads(ran.stdout)["results"]
    assert (res["action"], res["status"]) == ("toy", "changed")
    assert (box / "greeting").read_text() == "hello t1"
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert ["t1", "put"] in calls and ["t1", "open"] in calls   # every call went through the toy connection

    again = cli("plan", str(pb), "-i", str(inv), "--output", "json", env=env)
    assert json.loads(again.stdout)["predictions"][0]["prediction"] == "ok"


def test_without_the_plugin_the_key_is_a_located_error(tmp_path: Path) -> None:
    _, _, _, pb = _files(tmp_path)
    out = cli("validate", str(pb))
    assert out.returncode == 4
    assert "toy.yml:3:5" in out.stderr + out.stdout and "Traceback" not in out.stderr


def test_unknown_connection_kind_names_the_known_ones(tmp_path: Path) -> None:
    _, _, inv, pb = _files(tmp_path)
    pb.write_text("runbook: x\nsteps:\n  - name: a\n    shell: 'true'\n")
    out = cli("run", str(pb), "-i", str(inv))
    assert out.returncode == 4
    assert "unsupported connection `toy`" in out.stderr and "local" in out.stderr and "ssh" in out.stderr


def test_registry_refuses_what_is_not_an_action() -> None:
    with pytest.raises(RunbookError, match="not a subclass"):
        ACTIONS.add("bogus", object)

    class Nameless(Action):
        spec_type = str

    with pytest.raises(RunbookError, match="must set `name = 'nameless'`"):
        ACTIONS.add("nameless", Nameless)
    assert "bogus" not in ACTIONS and "nameless" not in ACTIONS


def test_registry_names_a_broken_plugin_instead_of_a_traceback() -> None:
    reg: Registry[object] = Registry("runbook.none", "widget", {"w": "runbook.no_such_module:W"}, lambda n, c: c)
    with pytest.raises(RunbookError, match="cannot load widget plugin `w`"):
        reg.get("w")
    with pytest.raises(RunbookError, match="unknown widget `x`") as info:
        reg.get("x")
    assert info.value.hint == "known: w"


def test_builtin_kinds_declare_the_host_variables_they_read() -> None:
    assert "ansible_host" in CONNECTIONS.get("ssh").host_vars
    assert set(CONNECTIONS.names()) >= {"ssh", "local"}
