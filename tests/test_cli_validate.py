"""`runbook validate`, `graph` and `schema` from the command line, and a fuzz test of the loader."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runbook.cli import main
from runbook.errors import RunbookError
from runbook.graph import StepGraph, expand
from runbook.loader import ValidationReport, parse_yaml, validate_playbook
from runbook.model import Playbook

GOOD = """\
runbook: disk-pressure
description: Free space on /var when usage crosses a threshold
hosts: web:&prod
vars: {threshold: 85, log_dir: /var/log/app}
secrets: {api_token: env:PAGER_TOKEN}
concurrency: 10
batch: 25%
max_failures: 10%
window: {cron: "0 2 * * SAT", duration: 2h, timezone: UTC}
steps:
  - name: measure usage
    shell: df --output=pcent /var | tail -1 | tr -dc 0-9
    read_only: true
    register: usage
  - name: compress old logs
    when: usage.stdout | int > threshold
    shell: find {{ log_dir | quote }} -name '*.log' -mtime +1 -exec gzip {} +
    unless: test -z "$(find {{ log_dir | quote }} -name '*.log' -mtime +1)"
  - name: clean tmp
    needs: [measure-usage]
    command: [systemd-tmpfiles, --clean]
    sudo: true
  - name: verify
    needs: [compress-old-logs, clean-tmp]
    shell: test "$(df --output=pcent /var | tail -1 | tr -dc 0-9)" -lt {{ threshold | int }}
    retries: 3
    delay: 5s
on_failure:
  - name: page on-call
    on: controller
    shell: echo "disk-pressure failed on "{{ host.name | quote }}
"""


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def write(tmp_path: Path, text: str | bytes, name: str = "pb.yml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_valid_playbook(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD)
    code, out, err = run(["validate", str(path)], capsys)
    assert code == 0, err
    assert out == f"{path}: ok — runbook `disk-pressure`, 4 step(s) + 1 on_failure\n"
    assert err == ""


def test_warnings_pass_unless_strict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "runbook: x\nsteps:\n  - name: a\n    shell: rm -rf {{ dir }}\n")
    code, out, err = run(["validate", str(path)], capsys)
    assert code == 0 and "2 warning(s)" in out
    assert f"{path}:4:19: warning: `{{{{ dir }}}}` is interpolated into a shell command without `| quote`" in err
    assert f"{path}:4:12: warning: `dir` is not defined" in err
    code, _, _ = run(["validate", "--strict", str(path)], capsys)
    assert code == 4


# Each bad input: the text, and the (line, column, message fragment) the CLI must print.
BAD: dict[str, tuple[str | bytes, int, int, str]] = {
    "malformed": ("runbook: x\nsteps: [\n", 3, 1, "malformed YAML"),
    "empty": ("", 1, 1, "empty"),
    "list": ("- name: a\n  shell: x\n", 1, 1, "expected a mapping"),
    "wrong-type": ("runbook: x\nsteps:\n  - name: a\n    shell: x\n    retries: many\n", 5, 14, "expected an integer"),
    "missing-key": ("runbook: x\nsteps:\n  - shell: x\n", 3, 5, "missing required key `name`"),
    "two-actions": ("runbook: x\nsteps:\n  - name: a\n    shell: x\n    command: [ls]\n", 5, 5, "2 actions"),
    "no-action": ("runbook: x\nsteps:\n  - name: a\n", 3, 5, "no action"),
    "unknown-key": ("runbook: x\nsteps:\n  - name: a\n    shell: x\n    reigster: r\n", 5, 5, "unknown key `reigster`"),
    "duplicate-key": ("runbook: x\nrunbook: y\nsteps: [{name: a, shell: x}]\n", 2, 1, "duplicate key `runbook`"),
    "duplicate-id": ("runbook: x\nsteps:\n  - {name: a, shell: x}\n  - {name: a, shell: y}\n", 4, 12, "duplicate step id"),
    "unknown-needs": ("runbook: x\nsteps:\n  - {name: a, shell: x}\n  - {name: b, shell: x, needs: [aa]}\n", 4, 33,
                      "needs unknown step `aa`"),
    "self-dependency": ("runbook: x\nsteps:\n  - {name: a, shell: x, needs: [a]}\n", 3, 33, "needs itself"),
    "cycle": ("runbook: x\nsteps:\n  - {name: a, shell: x, needs: [b]}\n  - {name: b, shell: x}\n", 3, 33,
              "dependency cycle: a -> b -> a"),
    "duration": ("runbook: x\nsteps:\n  - name: a\n    shell: x\n    delay: 5 parsecs\n", 5, 12, "invalid duration"),
    "percentage": ("runbook: x\nbatch: 120%\nsteps: [{name: a, shell: x}]\n", 2, 8, "between 0% and 100%"),
    "jinja": ("runbook: x\nsteps:\n  - name: a\n    shell: echo {{ x\n", 4, 12, "template syntax error"),
    "binary": (b"runbook: x\nst\x00\x01\x02eps", 2, 3, "binary"),
    "non-utf8": (b"runbook: \xff\n", 1, 10, "not valid UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_4_with_a_located_message(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, line, column, fragment = BAD[case]
    path = write(tmp_path, text)
    code, out, err = run(["validate", str(path)], capsys)
    assert code == 4
    assert "Traceback" not in out + err
    assert f"{path}: invalid (" in out
    where = f"{path}:{line}:{column}: error: "
    assert any(ln.startswith(where) and fragment in ln for ln in err.splitlines()), err


@pytest.mark.parametrize("case", ["missing", "directory"])
def test_missing_file_and_directory(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nope.yml" if case == "missing" else tmp_path
    code, out, err = run(["validate", str(path)], capsys)
    assert code == 4 and "Traceback" not in err
    assert err.startswith(f"{path}: error: ") and ("not found" in err or "directory" in err)


def test_several_files_report_each(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, GOOD, "good.yml")
    bad = write(tmp_path, "runbook: x\nsteps: []\n", "bad.yml")
    code, out, _ = run(["validate", str(good), str(bad)], capsys)
    assert code == 4
    assert out.splitlines() == [f"{good}: ok — runbook `disk-pressure`, 4 step(s) + 1 on_failure",
                                f"{bad}: invalid (1 error(s), 0 warning(s))"]


def test_json_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, GOOD, "good.yml")
    bad = write(tmp_path, "runbook: x\nsteps:\n  - name: a\n    shell: x\n    reigster: r\n", "bad.yml")
    code, out, err = run(["validate", "--format", "json", str(good), str(bad)], capsys)
    assert code == 4 and err == ""
    doc = json.loads(out)
    assert doc[0] == {"file": str(good), "kind": "playbook", "valid": True, "steps": 5, "problems": []}
    assert doc[1]["valid"] is False and doc[1]["steps"] is None
    assert doc[1]["problems"] == [{"severity": "error", "code": "unknown-key", "message": "unknown key `reigster`",
                                   "hint": "did you mean `register`?", "file": str(bad), "line": 5, "column": 5}]


def test_usage_errors_exit_4(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["validate"], capsys)
    assert code == 4 and "Missing argument" in err


@pytest.mark.parametrize("fmt, expected", [
    ("text", ["layer 2  (parallel)", "  clean-tmp [command]  <- measure-usage"]),
    ("dot", ['"measure-usage" -> "clean-tmp";', '"clean-tmp" -> "verify";']),
    ("mermaid", ["flowchart TD", "  s0 --> s2"]),
])
def test_graph_formats(fmt: str, expected: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["graph", str(write(tmp_path, GOOD)), "--format", fmt], capsys)
    assert code == 0, err
    for line in expected:
        assert line in out.splitlines() or line in out


def test_graph_of_invalid_playbook_exits_4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, BAD["cycle"][0])
    code, out, err = run(["graph", str(path)], capsys)
    assert code == 4 and out == ""
    assert f"{path}:3:33: error: dependency cycle: a -> b -> a" in err


# --- JSON Schema ---------------------------------------------------------------------------------------

def _check(instance: Any, schema: dict[str, Any], root: dict[str, Any], where: str = "$") -> list[str]:
    """A small JSON Schema checker for the keywords pydantic emits (jsonschema is not a dependency)."""
    if "$ref" in schema:
        return _check(instance, root["$defs"][schema["$ref"].split("/")[-1]], root, where)
    errors: list[str] = []
    if "anyOf" in schema:
        failures = [_check(instance, s, root, where) for s in schema["anyOf"]]
        if all(failures):
            errors.append(f"{where}: no alternative matches: {failures}")
        if set(schema) <= {"anyOf", "description", "title"}:
            return errors
    kind = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    if kind == "integer":
        ok = isinstance(instance, int) and not isinstance(instance, bool)
    elif kind == "number":
        ok = isinstance(instance, (int, float)) and not isinstance(instance, bool)
    elif kind is not None:
        ok = isinstance(instance, types[kind])
    else:
        ok = True
    if not ok:
        return [f"{where}: expected {kind}, got {instance!r}"]
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{where}: not in {schema['enum']}")
    if "const" in schema and instance != schema["const"]:
        errors.append(f"{where}: not {schema['const']}")
    if isinstance(instance, str) and "pattern" in schema and not re.search(schema["pattern"], instance):
        errors.append(f"{where}: {instance!r} does not match {schema['pattern']}")
    if isinstance(instance, (int, float)) and "minimum" in schema and instance < schema["minimum"]:
        errors.append(f"{where}: below minimum")
    if isinstance(instance, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in instance:
                errors.append(f"{where}: missing {key}")
        for key, value in instance.items():
            if key in props:
                errors += _check(value, props[key], root, f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{where}: unexpected key {key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += _check(value, schema["additionalProperties"], root, f"{where}.{key}")
    if isinstance(instance, list) and "items" in schema:
        for i, item in enumerate(instance):
            errors += _check(item, schema["items"], root, f"{where}[{i}]")
        if len(instance) < schema.get("minItems", 0):
            errors.append(f"{where}: too few items")
    return errors


def test_schema_is_json_and_describes_the_format(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["schema"], capsys)
    assert code == 0
    schema = json.loads(out)
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["additionalProperties"] is False and set(schema["required"]) == {"runbook", "steps"}
    assert {"runbook", "hosts", "vars", "secrets", "concurrency", "batch", "max_failures", "window", "steps",
            "on_failure"} <= set(schema["properties"])
    step = schema["$defs"]["Step"]
    assert step["additionalProperties"] is False and "required" not in step
    # a name, unless the step is a role or an include (which the model names after what it brings in)
    assert step["anyOf"] == [{"required": ["name"]}, {"required": ["role"]}, {"required": ["include"]}]
    assert {"assert", "register", "shell", "command", "needs", "when", "sudo", "once", "on"} <= set(step["properties"])
    assert "assert_" not in step["properties"] and "register_as" not in step["properties"]
    # The playbook language: loops, handlers, blocks, reuse, delegation, facts, print.
    assert {"loop", "loop_var", "index_var", "label", "loop_concurrency", "notify", "flush_handlers", "block", "rescue",
            "always", "include", "role", "vars", "delegate_to", "print"} <= set(step["properties"])
    assert {"handlers", "vars_files", "facts"} <= set(schema["properties"])


def test_valid_playbook_validates_against_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    data = parse_yaml(GOOD, "good.yml").data  # runbook's YAML 1.2 reading: `on:` is a key, not true
    data["steps"].append({"name": "check", "assert": "usage.rc == 0", "tags": "x", "timeout": 30})
    data["steps"].append({"name": "ok", "approve": "go?", "env": {"A": 1}})
    data["steps"].append({"name": "wait", "wait_for": {"port": 22, "timeout": "1m30s"}})
    data["steps"].append({"role": "web"})   # a role needs no name
    assert _check(data, schema, schema) == []
    assert _check({"runbook": "x", "steps": [{"shell": "true"}]}, schema, schema), "a nameless action step passed"
    # and it is not vacuous: a wrong document fails it
    assert _check({"runbook": "x", "steps": [{"name": "a", "reigster": 1}], "batch": "lots"}, schema, schema)


# --- fuzz ------------------------------------------------------------------------------------------------

_FUZZ_DIR = Path(tempfile.mkdtemp(prefix="runbook-fuzz-"))
_FUZZ_FILE = _FUZZ_DIR / "fuzz.yml"
BASE: dict[str, Any] = parse_yaml(GOOD, "good.yml").data

_KEYS = sorted({*Playbook.model_fields, "assert", "register", *[
    "name", "id", "needs", "shell", "command", "upload", "template", "fetch", "wait_for", "approve", "when", "sudo",
    "timeout", "retries", "delay", "until", "ignore_errors", "changed_when", "failed_when", "creates", "removes",
    "unless", "only_if", "read_only", "on", "once", "tags", "env", "cron", "duration", "src", "dest", "port", "that"]})

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["30s", "5m", "2h", "-1s", "25%", "150%", "0%", "{{ x }}", "{{ x", "{% if %}", "a -> b",
                     "env:X", "file:/y", "controller", "0 2 * * SAT", "@daily", "Europe", "measure-usage", "x" * 300]),
)
keys = st.one_of(st.sampled_from(_KEYS), st.text(max_size=10), st.integers(), st.booleans(), st.none())
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(keys, inner, max_size=4)), max_leaves=12)


def _paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a nested structure."""
    found = [prefix]
    if isinstance(data, dict):
        for k, v in data.items():
            found += _paths(v, prefix + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found += _paths(v, prefix + (i,))
    return found


@st.composite
def near_valid(draw: st.DrawFn) -> Any:
    """The good playbook with a few random mutations: values replaced, keys renamed, dropped or added."""
    data = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(data) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent: Any = data
        for part in path[:-1]:
            parent = parent[part]
        last = path[-1]
        action = draw(st.sampled_from(["replace", "rename", "drop", "add"]))
        if action == "replace":
            parent[last] = draw(values)
        elif action == "rename" and isinstance(parent, dict):
            new = draw(keys)
            parent[new] = parent.pop(last)
        elif action == "drop":
            del parent[last]
        elif isinstance(parent, dict):
            parent[draw(keys)] = draw(values)
        else:
            parent.append(draw(values))
    return data


def _dump(data: Any) -> str:
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


def _check_validate(text: str | bytes) -> None:
    """validate_playbook returns a report (never raises); problems are located and each is reported once."""
    if isinstance(text, bytes):
        _FUZZ_FILE.write_bytes(text)
    else:
        _FUZZ_FILE.write_text(text, encoding="utf-8", errors="surrogatepass")
    report = validate_playbook(_FUZZ_FILE)
    assert isinstance(report, ValidationReport)
    seen = set()
    for p in report.problems:
        assert p.location is not None and p.location.file == str(_FUZZ_FILE), p.render()
        assert p.location.line is not None and p.location.column is not None, p.render()
        assert (p.message, p.location) not in seen, f"reported twice: {p.render()}"
        seen.add((p.message, p.location))
    if report.playbook is not None:
        assert not report.errors
        g = StepGraph.build(report.playbook)
        g.to_text(), g.to_dot(), g.to_mermaid()
        expand(g, ["h1", "h2"])
    else:
        assert report.errors


FUZZ = settings(max_examples=700, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)


@FUZZ
@given(near_valid())
def test_fuzz_near_valid_playbooks(data: Any) -> None:
    _check_validate(_dump(data))


@FUZZ
@given(st.dictionaries(keys, values, max_size=6) | values)
def test_fuzz_random_structures(data: Any) -> None:
    _check_validate(_dump(data))


_yamlish = st.lists(st.sampled_from(["runbook:", "steps:", "- ", "  ", "\n", "name: a", "shell: x", "{", "}", "[", "]",
                                     ",", ":", "&a ", "*a", "<<: ", "!!int ", "!!bool ", "? ", "|", ">", "'", '"', "#",
                                     "\t", "---\n", "needs: [a]", "x", "1", "%", "{{", "}}", "\x07", "é"]), max_size=40)


@FUZZ
@given(st.one_of(_yamlish.map("".join), st.text(max_size=200)))
def test_fuzz_yamlish_text(text: str) -> None:
    _check_validate(text)


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=100))
def test_fuzz_bytes(raw: bytes) -> None:
    _check_validate(raw)


@settings(max_examples=150, deadline=None, database=None)
@given(st.one_of(near_valid().map(_dump), _yamlish.map("".join)))
def test_fuzz_through_the_cli(text: str) -> None:
    _FUZZ_FILE.write_text(text, encoding="utf-8", errors="surrogatepass")
    for argv in (["validate", str(_FUZZ_FILE)], ["validate", "--format", "json", str(_FUZZ_FILE)], ["graph", str(_FUZZ_FILE)]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except RunbookError:  # main maps these itself, so this would be a CLI bug, but it is still ours
                raise AssertionError("main() let a RunbookError escape") from None
        assert code in (0, 4), (argv, code, err.getvalue())
        assert "Traceback" not in err.getvalue()
        if argv[1] == "--format":
            json.loads(out.getvalue())


def test_validate_accepts_windows_file_beside_playbooks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`runbook validate playbooks/*.yml` also checks windows.yml, as named windows rather than as a playbook."""
    good = tmp_path / "windows.yml"
    good.write_text("windows:\n  sat:\n    cron: '0 2 * * SAT'\n    duration: 2h\n")
    assert main(["validate", str(good)]) == 0
    assert "1 named window(s): sat" in capsys.readouterr().out
    good.write_text("windows:\n  sat:\n    cron: '0 2 * * SAT'\n    duration: 0s\n")
    assert main(["validate", str(good)]) == 4
    assert f"{good}:4:" in capsys.readouterr().err


def test_validate_counts_the_expanded_steps_and_handlers_but_not_flush_points(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "roles/r").mkdir(parents=True)
    (tmp_path / "roles/r/steps.yml").write_text("- name: one\n  shell: 'true'\n  notify: h\n- name: two\n  shell: 'true'\n")
    (tmp_path / "roles/r/handlers.yml").write_text("- name: h\n  shell: 'true'\n")
    pb = tmp_path / "pb.yml"
    pb.write_text("runbook: t\nsteps:\n  - role: r\n  - name: now\n    flush_handlers: true\n  - name: last\n"
                  "    shell: 'true'\nhandlers:\n  - name: mine\n    shell: 'true'\n")
    code, out, _ = run(["validate", str(pb)], capsys)
    assert code == 0 and out == f"{pb}: ok — runbook `t`, 3 step(s) + 2 handler(s)\n"
