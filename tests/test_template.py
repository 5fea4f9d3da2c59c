"""Templates: the sandbox, strict undefined names, filters, precedence, and the checks `validate` runs."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from runbook.errors import Problem, TemplateError
from runbook.loader import parse_playbook, validate_playbook
from runbook.checks import check_playbook_templates
from runbook.template import build_context, evaluate, render, render_value, resolve_local, truth


def pb_problems(text: str, known_vars: set[str] | None = None) -> list[Problem]:
    """Template problems of a playbook given as dedented text."""
    return check_playbook_templates(parse_playbook(textwrap.dedent(text), "t.yml"), known_vars=known_vars)


def at(p: Problem) -> tuple[int | None, int | None]:
    assert p.location is not None and p.location.file == "t.yml"
    return p.location.line, p.location.column


# --- rendering -----------------------------------------------------------------------------------

def test_render_and_plain_strings() -> None:
    assert render("hello {{ who }}", {"who": "world"}) == "hello world"
    assert render("no markers", {}) == "no markers"
    assert render("{{ n + 1 }}\n", {"n": 1}) == "2\n"  # trailing newline kept
    assert render("<{{ x }}>", {"x": "&"}) == "<&>"  # no HTML escaping


def test_render_value_walks_structures() -> None:
    assert render_value({"a": ["{{ x }}", 1], "b": "{{ x }}!"}, {"x": "v"}) == {"a": ["v", 1], "b": "v!"}


def test_strict_undefined() -> None:
    with pytest.raises(TemplateError) as info:
        render("{{ missing }}", {})
    (p,) = info.value.problems
    assert "undefined" in p.message and "missing" in p.message and p.hint and "`missing`" in p.hint
    with pytest.raises(TemplateError):
        render("{{ host.nope }}", {"host": {"name": "h"}})
    with pytest.raises(TemplateError):
        evaluate("missing > 1", {})


@pytest.mark.parametrize("text", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ x.__class__ }}",
    "{{ run.__globals__ }}",
])
def test_sandbox_blocks_unsafe_access(text: str) -> None:
    with pytest.raises(TemplateError) as info:
        render(text, {"x": 1, "run": lambda: None, "cycler": object()})
    assert "unsafe" in info.value.problems[0].message or "undefined" in info.value.problems[0].message


def test_sandbox_is_immutable() -> None:
    items: list[int] = []
    with pytest.raises(TemplateError):
        render("{{ items.append(1) }}", {"items": items})
    assert items == []


def test_syntax_errors_are_template_errors() -> None:
    with pytest.raises(TemplateError) as info:
        render("{{ x ", {"x": 1})
    assert "syntax" in info.value.problems[0].message


def test_runtime_errors_are_template_errors() -> None:
    with pytest.raises(TemplateError):
        render("{{ 1 / 0 }}", {})
    with pytest.raises(TemplateError):
        render("{{ 'x' | from_json }}", {})


@pytest.mark.parametrize("value, quoted", [
    ("plain", "plain"), ("two words", "'two words'"), ("it's", "'it'\"'\"'s'"), ("$(rm -rf /)", "'$(rm -rf /)'"),
    (["a b", "c"], "'a b' c"), (5, "5"),
])
def test_quote_filter(value: Any, quoted: str) -> None:
    assert render("{{ v | quote }}", {"v": value}) == quoted


def test_other_filters() -> None:
    ctx = {"p": "/var/log/app.log", "d": {"b": 1, "a": [2]}, "n": 1536, "s": "ok: 42\nnext"}
    assert render("{{ p | basename }} {{ p | dirname }}", ctx) == "app.log /var/log"
    assert render("{{ d | to_json }}", ctx) == '{"a": [2], "b": 1}'
    assert render("{{ n | human_bytes }}", ctx) == "1.5 KiB"
    assert render("{{ s | regex_search('(\\\\d+)', 1) }}", ctx) == "42"
    assert render("{{ s | lines | length }}", ctx) == "2"
    assert render("{{ 'aGk=' | b64decode }}{{ 'hi' | b64encode }}", ctx) == "hiaGk="


@pytest.mark.parametrize("expr, expected", [
    ("x > 1", True), ("x > 5", False), ("{{ x > 1 }}", True), ("'false'", False), ("'no'", False), ("''", False),
    ("'yes'", True), ("'OFF'", False), ("' 0 '", False), ("'hello'", True), ("out.stdout", True), ("out.err", False),
    (True, True), (False, False), ("out.rc == 0", True), ("[]", False),
])
def test_truth(expr: Any, expected: bool) -> None:
    assert truth(expr, {"x": 2, "out": {"rc": 0, "stdout": "/dev/sda1", "err": ""}}) is expected


def test_evaluate_returns_values() -> None:
    assert evaluate("x * 2", {"x": 21}) == 42
    assert evaluate("usage.stdout | int > threshold", {"usage": {"stdout": "91"}, "threshold": 85}) is True


# --- variable precedence ----------------------------------------------------------------------------

def _ctx(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = dict(playbook_vars={}, inventory_vars={}, registers={}, extra_vars={}, secrets={}, builtins={})
    base.update(kw)
    return build_context(**base)


def test_precedence_lowest_first() -> None:
    ctx = _ctx(playbook_vars={"a": "pb", "b": "pb", "c": "pb", "d": "pb", "e": "pb"},
               inventory_vars={"b": "inv", "c": "inv", "d": "inv", "e": "inv"},
               secrets={"c": "sec", "d": "sec", "e": "sec"},
               registers={"d": "reg", "e": "reg"},
               extra_vars={"e": "extra"},
               builtins={"host": {"name": "h1"}})
    assert [ctx[k] for k in "abcde"] == ["pb", "inv", "sec", "reg", "extra"]
    assert ctx["secrets"] == {"c": "sec", "d": "sec", "e": "sec"} and ctx["host"] == {"name": "h1"}


def test_playbook_vars_render_in_dependency_order() -> None:
    ctx = _ctx(playbook_vars={"path": "{{ base }}/{{ host.name }}", "base": "{{ root }}/app", "root": "/srv",
                              "list": ["{{ path }}"]},
               builtins={"host": {"name": "h1"}})
    assert ctx["path"] == "/srv/app/h1" and ctx["base"] == "/srv/app" and ctx["list"] == ["/srv/app/h1"]


def test_overridden_playbook_vars_are_not_rendered() -> None:
    ctx = _ctx(playbook_vars={"a": "{{ nope }}"}, inventory_vars={"a": "{{ literal }}"})
    assert ctx["a"] == "{{ literal }}"


def test_playbook_vars_loop_is_an_error() -> None:
    with pytest.raises(TemplateError) as info:
        _ctx(playbook_vars={"a": "{{ b }}", "b": "{{ a }}"})
    assert "a -> b -> a" in info.value.problems[0].message


# --- the shell-safety lint --------------------------------------------------------------------------

def test_lint_warns_on_shell_fields_only() -> None:
    problems = pb_problems("""\
        runbook: x
        vars: {dir: /tmp, n: 3}
        steps:
          - name: a
            shell: rm -rf {{ dir }}
            unless: test -d {{ dir }}
            creates: "{{ dir }}/done"
          - name: b
            command: [rm, -rf, "{{ dir }}"]
          - name: c
            shell: ls {{ dir | quote }} && sleep {{ n | int }}
    """)
    # Located at the expression itself (the shell lint of runbook/shell_lint.py; more cases in test_shell_lint.py).
    assert [(p.code, p.severity, at(p)) for p in problems] == [
        ("unquoted", "warning", (5, 19)), ("unquoted", "warning", (6, 21))]
    assert "`{{ dir }}`" in problems[0].message and problems[0].hint and "{{ dir | quote }}" in problems[0].hint


# --- syntax and undefined names --------------------------------------------------------------------

def test_syntax_errors_are_located_in_every_templated_field() -> None:
    problems = pb_problems("""\
        runbook: x
        vars: {greeting: "{{ oops"}
        steps:
          - name: a
            shell: echo {{ x
            when: "1 +"
          - name: b
            command: [echo, "{% if %}"]
            env: {A: "{{ }}"}
          - name: c
            assert: ["x ==", "1 == 1"]
          - name: d
            upload: {src: "{{ }}", dest: /x}
    """)
    errors = [p for p in problems if p.severity == "error"]
    assert all(p.code == "template-syntax" for p in errors)
    assert [at(p) for p in errors] == [(2, 18), (5, 12), (6, 11), (8, 21), (9, 14), (11, 14), (13, 19)]


def test_undefined_variables_warn_with_location() -> None:
    problems = pb_problems("""\
        runbook: x
        vars: {threshold: 85}
        secrets: {token: env:T}
        steps:
          - name: a
            shell: "true"
            register: out
          - name: b
            when: out.rc == 0 and treshold > 1 and token
            shell: echo {{ host.name | quote }} {{ inventory_hostname | quote }}
    """)
    (p,) = problems
    assert p.severity == "warning" and p.code == "undefined-variable" and at(p) == (9, 11)
    assert "`treshold`" in p.message


def test_undefined_variables_are_errors_when_every_source_is_known() -> None:
    problems = pb_problems("""\
        runbook: x
        vars: {threshold: 85}
        steps:
          - name: a
            when: treshold > 1 and from_inventory
            shell: "true"
    """, known_vars={"from_inventory"})
    (p,) = problems
    assert p.severity == "error" and p.message == "undefined variable `treshold`" and p.hint == "did you mean `threshold`?"


def test_template_file_is_checked(tmp_path: Path) -> None:
    (tmp_path / "good.j2").write_text("port={{ port }}\n")
    (tmp_path / "bad.j2").write_text("port={{ port \n")
    path = tmp_path / "pb.yml"
    path.write_text(textwrap.dedent("""\
        runbook: x
        vars: {port: 80}
        steps:
          - {name: a, template: {src: good.j2, dest: /etc/a}}
          - {name: b, template: {src: bad.j2, dest: /etc/b}}
          - {name: c, template: {src: missing.j2, dest: /etc/c}}
    """))
    report = validate_playbook(path)
    assert [(p.code, p.location.line if p.location else None) for p in report.errors] == [
        ("template-syntax", 5), ("missing-file", 6)]
    assert report.playbook is None


def test_resolve_local_is_relative_to_the_playbook(tmp_path: Path) -> None:
    path = tmp_path / "pb.yml"
    path.write_text("runbook: x\nsteps: [{name: a, shell: x}]\n")
    report = validate_playbook(path)
    assert report.playbook is not None
    assert resolve_local(report.playbook, "files/a") == tmp_path.resolve() / "files/a"
    assert resolve_local(report.playbook, "/abs") == Path("/abs")


def test_result_is_defined_in_changed_when_failed_when_and_until_only() -> None:
    """The step's own result is `result` in changed_when/failed_when/until; elsewhere it is undefined."""
    problems = pb_problems("""
        runbook: t
        steps:
          - name: a
            shell: "true"
            changed_when: result.rc == 0
            failed_when: result.rc > 1
            until: result.stdout != ''
            retries: 2
          - name: b
            shell: "echo {{ result.stdout | quote }}"
        """)
    undefined = [p for p in problems if p.code == "undefined-variable"]
    assert len(undefined) == 1 and undefined[0].location.line == 11  # only in step b's shell


def test_a_bare_undefined_name_in_a_condition_is_a_clear_error() -> None:
    from runbook.errors import TemplateError

    with pytest.raises(TemplateError, match="undefined variable in `nosuch`"):
        truth("nosuch", {})
