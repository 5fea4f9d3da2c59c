"""The loader: every bad input becomes located problems (file, line, column) with a hint, all at once."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import runbook
from runbook.errors import PlaybookError, Problem, RunbookError
from runbook.loader import compose_all, load_playbook, parse_playbook, parse_yaml, validate_playbook
from runbook.model import Playbook

GOOD = """\
runbook: disk-pressure
vars: {threshold: 85, log_dir: /var/log/app}
steps:
  - name: measure usage
    shell: df --output=pcent /var | tail -1
    read_only: true
    register: usage
  - name: compress old logs
    when: usage.stdout | int > threshold
    shell: find {{ log_dir | quote }} -name '*.log' -exec gzip {} +
"""


def write(tmp_path: Path, text: str | bytes, name: str = "pb.yml") -> Path:
    """Write a playbook file (dedented text, or raw bytes) and return its path."""
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def errors(tmp_path: Path, text: str | bytes) -> list[Problem]:
    """The errors validate_playbook reports for this text (asserting it is invalid)."""
    path = write(tmp_path, text)
    report = validate_playbook(path)
    assert report.playbook is None, "expected the playbook to be invalid"
    assert report.errors
    for p in report.errors:
        assert p.location is not None and p.location.file == str(path)
    return report.errors


def only(tmp_path: Path, text: str | bytes) -> Problem:
    """The one error of this text."""
    found = errors(tmp_path, text)
    assert len(found) == 1, [p.render() for p in found]
    return found[0]


def at(p: Problem) -> tuple[int | None, int | None]:
    assert p.location is not None
    return p.location.line, p.location.column


def test_valid_playbook_loads(tmp_path: Path) -> None:
    pb = load_playbook(write(tmp_path, GOOD))
    assert isinstance(pb, Playbook)
    assert [s.step_id for s in pb.steps] == ["measure-usage", "compress-old-logs"]


def test_library_api_is_exported(tmp_path: Path) -> None:
    assert runbook.load_playbook is load_playbook
    with pytest.raises(RunbookError):
        runbook.load_playbook(tmp_path / "missing.yml")


def test_load_playbook_raises_with_every_error(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        runbook: x
        steps:
          - name: a
            shell: echo
            reigster: r
          - name: b
            sudo: 3
    """)
    with pytest.raises(PlaybookError) as info:
        load_playbook(path)
    rendered = str(info.value)
    assert f"{path}:5:5: error: unknown key `reigster`" in rendered
    assert "did you mean `register`?" in rendered
    assert f"{path}:6:5: error: step has no action" in rendered
    assert f"{path}:7:11: error: `sudo`" in rendered
    assert info.value.exit_code == 4


# --- files that are not YAML text -----------------------------------------------------------

def test_missing_file(tmp_path: Path) -> None:
    report = validate_playbook(tmp_path / "nope.yml")
    (p,) = report.errors
    assert "not found" in p.message and p.location is not None and p.location.file == str(tmp_path / "nope.yml")


def test_directory(tmp_path: Path) -> None:
    report = validate_playbook(tmp_path)
    (p,) = report.errors
    assert "is a directory" in p.message and p.location is not None and p.location.file == str(tmp_path)


def test_binary_file(tmp_path: Path) -> None:
    p = only(tmp_path, b"\x7fELF\x02\x01\x01\x00\x00\x00")
    assert "binary" in p.message


def test_non_utf8_file_points_at_the_bad_byte(tmp_path: Path) -> None:
    p = only(tmp_path, "runbook: x\nsteps:\n  - name: caf\xe9\n".encode("latin-1"))
    assert "not valid UTF-8" in p.message and "0xe9" in p.message
    assert at(p) == (3, 14)


def test_empty_file(tmp_path: Path) -> None:
    p = only(tmp_path, "")
    assert "empty" in p.message and at(p) == (1, 1)


def test_comment_only_file_is_empty(tmp_path: Path) -> None:
    p = only(tmp_path, "# nothing yet\n")
    assert "empty" in p.message


def test_top_level_list(tmp_path: Path) -> None:
    p = only(tmp_path, "# a list\n- name: a\n  shell: x\n")
    assert "expected a mapping" in p.message and "got a list" in p.message
    assert at(p) == (2, 1)


def test_top_level_scalar(tmp_path: Path) -> None:
    p = only(tmp_path, "just words\n")
    assert "expected a mapping" in p.message and at(p) == (1, 1)


def test_several_documents(tmp_path: Path) -> None:
    p = only(tmp_path, "runbook: a\n---\nrunbook: b\n")
    assert "several YAML documents" in p.message and at(p) == (3, 1)


# --- malformed YAML ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, line, column", [
    ("runbook: x\nsteps: [\n", 3, 1),                      # unclosed flow sequence
    ("runbook: x\nsteps:\n  - name: a\n   shell: b\n", 4, 4),  # bad indentation
    ("runbook: 'x\n", 1, 10),                              # unclosed quote: where it opens
    ("runbook: x\n\tsteps: []\n", 2, 1),                   # tab indentation
    ("a: *nowhere\n", 1, 4),                               # unknown alias
])
def test_malformed_yaml(tmp_path: Path, text: str, line: int, column: int) -> None:
    p = only(tmp_path, text)
    assert p.message.startswith("malformed YAML") and p.hint
    assert at(p) == (line, column)


def test_tab_indentation_gets_a_tab_hint(tmp_path: Path) -> None:
    p = only(tmp_path, "runbook: x\n\tsteps: []\n")
    assert p.hint and "tabs" in p.hint


def test_control_character(tmp_path: Path) -> None:
    p = only(tmp_path, "runbook: x\ndescription: a\x07b\n")
    assert "#x0007" in p.message and at(p) == (2, 15)


def test_deep_nesting_is_an_error_not_a_crash(tmp_path: Path) -> None:
    p = only(tmp_path, "vars: " + "[" * 5000 + "]" * 5000 + "\n")
    assert "nested too deeply" in p.message


def test_recursive_alias(tmp_path: Path) -> None:
    p = only(tmp_path, "runbook: x\nvars: &v {self: *v}\n")
    assert "recursive" in p.message and at(p) == (2, 7)  # PyYAML keeps no position for an alias: the anchor's


def test_alias_bomb_is_bounded(tmp_path: Path) -> None:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 10) + "]")
    p = only(tmp_path, "\n".join(lines) + "\n")
    assert "too large" in p.message


@pytest.mark.parametrize("text, line, column", [
    ("runbook: x\nconcurrency: !!int many\n", 2, 14),
    ("runbook: !!bool maybe\n", 1, 10),
    ("runbook: !!python/object:os.system x\n", 1, 10),
    ("runbook: !!timestamp never\n", 1, 10),
])
def test_bad_tags(tmp_path: Path, text: str, line: int, column: int) -> None:
    p = only(tmp_path, text)
    assert p.message.startswith("invalid value") and at(p) == (line, column)


def test_duplicate_keys_are_errors(tmp_path: Path) -> None:
    found = errors(tmp_path, """\
        runbook: x
        steps:
          - name: a
            shell: one
            shell: two
        runbook: y
    """)
    assert [(p.code, at(p)) for p in found] == [("duplicate-key", (5, 5)), ("duplicate-key", (6, 1))]
    assert found[0].message == "duplicate key `shell` (first defined at line 4)"


def test_merge_keys_work_and_explicit_keys_win(tmp_path: Path) -> None:
    pb = load_playbook(write(tmp_path, """\
        runbook: x
        vars:
          base: &base {retries: 2, sudo: true}
        steps:
          - <<: *base
            name: a
            shell: x
            retries: 5
    """))
    assert pb.steps[0].retries == 5 and pb.steps[0].sudo is True


def test_yaml_12_scalars(tmp_path: Path) -> None:
    pb = load_playbook(write(tmp_path, """\
        runbook: x
        vars: {answer: no, mode: 0644, flag: true}
        steps:
          - name: a
            on: controller
            shell: x
    """))
    assert pb.vars == {"answer": "no", "mode": 644, "flag": True}
    assert pb.steps[0].on == "controller"


# --- structure ---------------------------------------------------------------------------------

def test_wrong_types(tmp_path: Path) -> None:
    found = errors(tmp_path, """\
        runbook: [x]
        concurrency: lots
        steps:
          - name: a
            shell: {x: 1}
            retries: true
            tags: 5
    """)
    assert [(at(p), p.message) for p in found] == [
        ((1, 10), "`runbook`: expected a string, got a list"),
        ((2, 14), "`concurrency`: expected an integer, got a string 'lots'"),
        ((5, 12), "`shell`: expected a string, got a mapping"),
        ((6, 14), "`retries`: expected an integer, got a boolean true"),
        ((7, 11), "`tags`: expected a list, got an integer 5"),
    ]


@pytest.mark.parametrize("value, column", [("[true]", 15), ("[ls, 1]", 19), ("[[a]]", 15)])
def test_wrong_typed_command_item_is_reported_once(tmp_path: Path, value: str, column: int) -> None:
    p = only(tmp_path, f"runbook: x\nsteps:\n  - name: a\n    command: {value}\n")
    assert "`command`: expected a string" in p.message and at(p) == (4, column)


@pytest.mark.parametrize("key, value, expected", [
    ("sudo", "3", "`sudo`: expected true or false or a string, got an integer 3"),
    ("sudo", "[root]", "`sudo`: expected true or false or a string, got a list"),
    ("changed_when", "{a: 1}", "`changed_when`: expected a string or true or false, got a mapping"),
    ("failed_when", "1.5", "`failed_when`: expected a string or true or false, got a number 1.5"),
])
def test_union_fields_report_once(tmp_path: Path, key: str, value: str, expected: str) -> None:
    p = only(tmp_path, f"runbook: x\nsteps:\n  - name: a\n    shell: x\n    {key}: {value}\n")
    assert p.message == expected and at(p) == (5, 7 + len(key))


def test_window_union_reports_the_mapping_branch_only(tmp_path: Path) -> None:
    found = errors(tmp_path, """\
        runbook: x
        window: {cron: bad, duration: 2x}
        steps: [{name: a, shell: x}]
    """)
    assert [(at(p), p.message.split(":")[0]) for p in found] == [((2, 16), "`cron`"), ((2, 31), "`duration`")]


def test_window_missing_key(tmp_path: Path) -> None:
    p = only(tmp_path, "runbook: x\nwindow: {duration: 2h}\nsteps: [{name: a, shell: x}]\n")
    assert p.message == "missing required key `cron` in `window`" and at(p) == (2, 9)


def test_window_wrong_type(tmp_path: Path) -> None:
    p = only(tmp_path, "runbook: x\nwindow: 5\nsteps: [{name: a, shell: x}]\n")
    assert p.message == "`window`: expected a mapping or a string, got an integer 5" and at(p) == (2, 9)


def test_missing_required_keys(tmp_path: Path) -> None:
    found = errors(tmp_path, "description: d\nsteps:\n  - shell: x\n")
    assert [(at(p), p.message) for p in found] == [
        ((1, 1), "missing required key `runbook`"),
        ((3, 5), "missing required key `name` in step 1"),
    ]
    assert found[0].hint and "runbook: NAME" in found[0].hint
    assert found[1].hint and "name:" in found[1].hint


def test_missing_steps(tmp_path: Path) -> None:
    p = only(tmp_path, "runbook: x\n")
    assert p.message == "missing required key `steps`" and p.hint == "add a `steps:` list"


def test_empty_steps(tmp_path: Path) -> None:
    p = only(tmp_path, "runbook: x\nsteps: []\n")
    assert p.message == "`steps`: must not be empty" and at(p) == (2, 8)


def test_two_actions_point_at_the_second(tmp_path: Path) -> None:
    p = only(tmp_path, "runbook: x\nsteps:\n  - name: a\n    shell: x\n    command: [ls]\n")
    assert "2 actions (shell, command)" in p.message and at(p) == (5, 5)
    assert p.hint and "shell" in p.hint


def test_no_action(tmp_path: Path) -> None:
    p = only(tmp_path, "runbook: x\nsteps:\n  - name: a\n    sudo: true\n")
    assert "no action" in p.message and at(p) == (3, 5)


def test_unknown_keys_with_did_you_mean(tmp_path: Path) -> None:
    found = errors(tmp_path, """\
        runbook: x
        stesp: []
        steps:
          - name: a
            shell: x
            reigster: r
            wait_for: {prot: 22}
    """)
    by_msg = {p.message: (at(p), p.hint) for p in found}
    assert by_msg["unknown key `stesp`"] == ((2, 1), "did you mean `steps`?")
    assert by_msg["unknown key `reigster`"] == ((6, 5), "did you mean `register`?")
    assert by_msg["unknown key `prot`"] == ((7, 16), "did you mean `port`?")


def test_unknown_key_without_close_match_lists_allowed_keys(tmp_path: Path) -> None:
    p = next(p for p in errors(tmp_path, "runbook: x\nzzzzzz: 1\nsteps: [{name: a, shell: x}]\n") if p.code == "unknown-key")
    assert p.hint and p.hint.startswith("allowed keys: runbook, description")


def test_non_string_keys(tmp_path: Path) -> None:
    found = errors(tmp_path, "runbook: x\nvars: {1: one}\n~: nothing\nsteps: [{name: a, shell: x}]\n")
    assert sorted((at(p), p.code) for p in found) == [((2, 8), "invalid-key"), ((3, 1), "invalid-key")]


@pytest.mark.parametrize("key, value, fragment", [
    ("delay", "5 minutes", "invalid duration"),
    ("delay", "-3s", "invalid duration"),
    ("timeout", ".inf", "finite"),
    ("timeout", "true", "boolean"),
])
def test_invalid_durations(tmp_path: Path, key: str, value: str, fragment: str) -> None:
    p = only(tmp_path, f"runbook: x\nsteps:\n  - name: a\n    shell: x\n    {key}: {value}\n")
    assert fragment in p.message and p.message.startswith(f"`{key}`") and at(p) == (5, 7 + len(key))


@pytest.mark.parametrize("key, value, fragment", [
    ("batch", "150%", "between 0% and 100%"),
    ("batch", "0%", "at least 1"),
    ("batch", "lots", "invalid limit"),
    ("max_failures", "-5%", "invalid limit"),
    ("max_failures", "2.5", "invalid limit"),
])
def test_invalid_percentages(tmp_path: Path, key: str, value: str, fragment: str) -> None:
    p = only(tmp_path, f"runbook: x\n{key}: {value}\nsteps: [{{name: a, shell: x}}]\n")
    assert fragment in p.message and at(p) == (2, len(key) + 3)


def test_bad_secret_reference(tmp_path: Path) -> None:
    p = only(tmp_path, "runbook: x\nsecrets: {token: hunter2}\nsteps: [{name: a, shell: x}]\n")
    assert p.hint and "env:VARIABLE" in p.hint and at(p) == (2, 18)


def test_all_errors_of_a_file_are_reported_together(tmp_path: Path) -> None:
    found = errors(tmp_path, """\
        runbook: x
        batch: 200%
        steps:
          - name: a
            shell: x
            delay: soon
          - name: b
            shell: y
            needs: [c]
          - name: b
            shell: z
            when: "x =="
    """)
    codes = [p.code for p in found]
    # structure problems stop the later checks, so the second file tells the rest
    assert len(found) == 2 and at(found[0]) == (2, 8) and at(found[1]) == (6, 12), codes
    found = errors(tmp_path, """\
        runbook: x
        steps:
          - name: a
            shell: x
          - name: b
            shell: y
            needs: [c]
          - name: b
            shell: z
            when: "x =="
    """)
    assert [(p.code, at(p)) for p in found] == [("unknown-needs", (7, 13)), ("duplicate-id", (8, 11)),
                                                ("template-syntax", (10, 11))]
    assert [at(p)[0] for p in found] == sorted(at(p)[0] for p in found)  # in file order


def test_parse_playbook_from_text() -> None:
    pb = parse_playbook(GOOD, "inline.yml")
    assert pb.runbook == "disk-pressure" and pb._source.file == "inline.yml"
    with pytest.raises(PlaybookError) as info:
        parse_playbook("runbook: [", "inline.yml")
    assert info.value.problems[0].location is not None and info.value.problems[0].location.file == "inline.yml"


def test_source_map_locates_keys_and_values() -> None:
    doc = parse_yaml("a:\n  b: [1, 2]\n", "f.yml")
    assert str(doc.source.locate(("a", "b", 1))) == "f.yml:2:10"
    assert str(doc.source.locate(("a", "b"), key=True)) == "f.yml:2:3"
    assert str(doc.source.locate(("a", "zzz"))) == "f.yml:2:3"  # nearest located ancestor


# --- libyaml composes, PyYAML's parser decides what libyaml rejects ------------------------------------

def _tree(node: Any) -> Any:
    """A node as comparable data: kind, tag, scalar value, and where it starts (line, column, index: what runbook reads)."""
    marks = (node.start_mark.line, node.start_mark.column, node.start_mark.index)
    if isinstance(node, yaml.ScalarNode):
        return ("scalar", node.tag, node.value, marks)
    if isinstance(node, yaml.SequenceNode):
        return ("seq", node.tag, marks, [_tree(n) for n in node.value])
    return ("map", node.tag, marks, [(_tree(k), _tree(v)) for k, v in node.value])


def _composed(text: str, fast: bool) -> Any:
    try:
        return [_tree(n) for n in compose_all(text, fast=fast)]
    except Exception as exc:   # the pure parser's verdict, as the caller would get it
        return ("error", type(exc).__name__, str(exc))


_EDGES = ["k: v\n", "\ufeffk: v\n", "k:\tv\n", "%YAML 1.2\n---\nk: v\n", "k: v\x85l: w\n", "k: v\r\nl: w\r\n",
          "a: &x {b: 1}\nc:\n  <<: *x\n  d: 2\n", "é€😀: \"é€😀\"\n- x\n", "k: 'it''s'\nl: \"\\u00e9\\t\"\n",
          "? [a, b]\n: c\n", "k: |\n  one\n   two\n", "k: >-\n  one\n  two\n", "---\na: 1\n---\nb: 2\n",
          "x" * 1100 + ": v\n", "[" * 150 + "]" * 150, "[" * 1500 + "]" * 1500,
          "".join("  " * i + "a:\n" for i in range(1200)) + "  " * 1200 + "x\n", "k: !!binary aGk=\n",
          "on: yes\nno: off\nmode: 0644\nn: 1_000\nt: 1:30\n", "k: v\n...\n", "- !custom x\n", "\x07k: v\n"]


@pytest.mark.parametrize("text", _EDGES)
def test_libyaml_composes_what_pyyaml_composes_or_leaves_it_to_pyyaml(text: str) -> None:
    assert _composed(text, fast=True) == _composed(text, fast=False)


_YAMLISH = st.lists(st.sampled_from(["a:", "b: 1", "- ", "  ", "\n", "\t", "{", "}", "[", "]", ",", ":", "&a ", "*a",
                                     "<<: ", "!!int ", "!!str ", "? ", "|", ">", "'", '"', "#", "---\n", "...\n",
                                     "é", "😀", "\r\n", "\x85", "%", "@", "`", "0644", "yes", "~", "\ufeff"]),
                    max_size=40).map("".join)


@settings(max_examples=int(os.environ.get("RB_YAML_EXAMPLES", "600")), deadline=None, database=None)
@given(st.one_of(_YAMLISH, st.text(max_size=120)))
def test_what_pyyaml_accepts_libyaml_composes_alike_and_what_libyaml_rejects_pyyaml_decides(text: str) -> None:
    fast, pure = _composed(text, fast=True), _composed(text, fast=False)
    if not isinstance(pure, tuple) or isinstance(fast, tuple):   # a tuple: that parser's error
        assert fast == pure
    # else: libyaml read what PyYAML refuses (say `|#`): the document is taken, as libyaml reads it
