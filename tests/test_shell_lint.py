"""The shell-quoting lint: contexts, expression classes, argv lists, positions, real shells, shipped examples, the CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runbook.shell_lint import (
    CODES,
    INSIDE_BACKTICKS,
    INSIDE_COMMENT,
    INSIDE_QUOTES,
    UNQUOTED,
    UNSAFE_PREFIX,
    ShellFinding,
    argv_findings,
    locate_in_file,
    shell_findings,
    shell_script_positions,
)
from runbook.template import render
from tests.helpers import cli

ROOT = Path(__file__).resolve().parents[1]
def _shells() -> list[str]:
    """The POSIX shells on this machine, each once (`sh` is often `dash` under another name)."""
    found: dict[str, str] = {}
    for name in ("sh", "bash", "dash", "zsh", "ksh"):
        path = shutil.which(name)
        if path:
            found.setdefault(os.path.realpath(path), name)
    return list(found.values())


SHELL_BINARIES = _shells()


def codes(text: str) -> list[str]:
    """The finding codes of a template, in order."""
    return [f.code for f in shell_findings(text)]


# ---------------------------------------------------------------------------------------------
# Where an interpolation stands
# ---------------------------------------------------------------------------------------------

SAFE = [
    "echo {{ v | quote }}",
    "echo x{{ v | quote }}y",
    "echo \"failed on \"{{ host.name | quote }}",
    "echo 'a' {{ v | quote }} 'b'",
    "test -z \"$(find {{ d | quote }} -name '*.log')\"",
    "x=$(cat {{ f | quote }}); echo \"$x\"",
    "echo \"$(echo \"$(cat {{ f | quote }})\")\"",
    "echo \"it's\" {{ v | quote }}",
    "echo \"a\\\"b\" {{ v | quote }}",
    "echo 'a\"b' {{ v | quote }}",
    "echo a#{{ v | quote }}",
    "echo $#{{ v | quote }}",
    "echo ${x#a} {{ v | quote }}",
    "echo ${x:-{{ v | quote }}} ${x:-${y:-a}{{ v | quote }}}",
    "echo '#' {{ v | quote }}",
    "printf '%s' {{ manifest.stdout | quote }} | sha256sum -c --quiet -",
    "for p in {{ paths | quote_path }}; do echo \"$p\"; done",
    "echo \"{{ n | int }}\" '{{ n | float }}' $(( {{ n | int }} + 1 ))",
    "echo \"{{ xs | length }} {{ xs | count }} {{ n | abs }} {{ n | round }}\"",
    "echo \"{{ a > b }} {{ not a }} {{ a is defined }} {{ 1 + 2 }} {{ -(n | int) }}\"",
    "echo \"{{ 42 }} {{ 1.5 }} {{ true }} {{ none }}\"",
    "echo {{ v | quote if c else '' }}",
    "echo '{{ 'literal text' }}'",
    "echo '{{ 'a' ~ 'b' }}'",
    "{{ restart_command | shell_code }}",
    "echo \"{{ cmd | shell_code }}\"",
    "# a comment without templates\necho {{ v | quote }}",
    "echo hi # done\necho {{ v | quote }}",
    "cat <<EOF\nplain\nEOF\necho {{ v | quote }}",
    "cat <<-EOF\n\tplain\n\tEOF\necho {{ v | quote }}",
    "cat <<'EOF'\nplain $x\nEOF\necho {{ v | quote }}",
    "cat <<EOF; echo {{ v | quote }}\nbody\nEOF",
    "cat <<<'here string' {{ v | quote }}",
    "echo $(( 1 << 2 )) {{ v | quote }}",
    "echo $(( (1) + 2 )) $[1] {{ v | quote }}",
    "echo \\\\{{ v | quote }}",
    "echo \\\n{{ v | quote }}",
    "echo $(echo ')') {{ v | quote }}",
    "echo {% raw %}{{ not jinja }}{% endraw %} {{ v | quote }}",
    "echo {# '\" a jinja comment #} {{ v | quote }}",
    "{% for p in paths %}echo {{ p | quote }}\n{% endfor %}",
    "echo {{ {'a': v}['a'] | quote }} {{ {'b': {'c': 1}}['b']['c'] | int }}",
    "echo {{ v | replace('}}', 'x') | quote }}",
    "no templates here: \"$(date)\" `date`",
    "",
]


@pytest.mark.parametrize("text", SAFE)
def test_safe_interpolations_have_no_findings(text: str) -> None:
    assert shell_findings(text) == []


UNSAFE = [
    # (template, expected codes in order)
    ('echo "x {{ v | quote }}" > out', [INSIDE_QUOTES]),
    ("echo 'x {{ v | quote }}'", [INSIDE_QUOTES]),
    ('echo "x {{ v }}"', [INSIDE_QUOTES]),
    ("echo $'x {{ v | quote }}'", [INSIDE_QUOTES]),
    ('echo $"x {{ v | quote }}"', [INSIDE_QUOTES]),
    ("echo {{ v }}", [UNQUOTED]),
    ("echo {{ v | upper }}", [UNQUOTED]),
    ("echo {{ v | quote | upper }}", [UNQUOTED]),
    ("echo {{ xs | join(' ') }}", [UNQUOTED]),
    ("echo {{ v ~ 'x' }}", [UNQUOTED]),
    ("echo {{ 'x' + v }}", [UNQUOTED]),
    ("echo {{ '%s' % v }}", [UNQUOTED]),
    ("echo {{ v * 2 }}", [UNQUOTED]),
    ("echo {{ a or b }}", [UNQUOTED]),
    ("echo {{ v if c else w | quote }}", [UNQUOTED]),
    ("echo `cat {{ f | quote }}`", [INSIDE_BACKTICKS]),
    ('echo "`cat {{ f | quote }}`"', [INSIDE_BACKTICKS]),
    ("echo `echo $(cat {{ f | quote }})`", [INSIDE_BACKTICKS]),
    ("# note {{ v | quote }}\necho hi", [INSIDE_COMMENT]),
    ("echo hi # {{ v | quote }}", [INSIDE_COMMENT]),
    ("echo hi;# {{ v | quote }}", [INSIDE_COMMENT]),
    ("x=$(# {{ v | quote }}\necho)", [INSIDE_COMMENT]),
    ("cat <<EOF\nhello {{ v | quote }}\nEOF", [INSIDE_QUOTES]),
    ("cat <<'EOF'\nhello {{ v | quote }}\nEOF", [INSIDE_QUOTES]),
    ("cat <<-EOF\n\thello\n\t{{ v | quote }}\n\tEOF", [INSIDE_QUOTES]),
    ("cat <<A <<B\na\nA\n{{ v | quote }}\nB\necho {{ w | quote }}", [INSIDE_QUOTES]),
    ("cat <<EOF\nEOF {{ v | quote }}\nEOF", [INSIDE_QUOTES]),
    ("echo $(( {{ v | quote }} + 1 ))", [INSIDE_QUOTES]),
    ("(( {{ v | quote }} > 1 ))", [INSIDE_QUOTES]),
    ("echo $[ {{ v | quote }} + 1 ]", [INSIDE_QUOTES]),
    ("(( $(echo {{ v | quote }}) > 1 ))", [INSIDE_QUOTES]),
    ("echo $((case a in a) echo {{ v | quote }};; esac))", [INSIDE_QUOTES]),
    ('echo "${x:-{{ v | quote }}}"', [INSIDE_QUOTES]),
    ('echo "${x:-${y:-a}{{ v | quote }}}"', [INSIDE_QUOTES]),
    ("echo ${x:-\"{{ v | quote }}\"}", [INSIDE_QUOTES]),
    ("echo ${x:-{{ v }}}", [UNQUOTED]),
    ("echo ${{ v | quote }}", [UNSAFE_PREFIX]),
    ("echo \\{{ v | quote }}", [UNSAFE_PREFIX]),
    ("echo {% raw %}'{% endraw %}{{ v | quote }}{% raw %}'{% endraw %}", [INSIDE_QUOTES]),
    ("echo {{ \"'\" }}{{ v | quote }}{{ \"'\" }}", [INSIDE_QUOTES]),
    ("echo \"{% if a %}{{ v | quote }}{% endif %}\"", [INSIDE_QUOTES]),
    ("{{ cmd }}", [UNQUOTED]),
    ("echo \"a\" {{ v }} 'b' \"{{ w | quote }}\" `{{ x | quote }}` {{ y | quote }}",
     [UNQUOTED, INSIDE_QUOTES, INSIDE_BACKTICKS]),
]


@pytest.mark.parametrize(("text", "expected"), UNSAFE)
def test_unsafe_interpolations_are_found(text: str, expected: list[str]) -> None:
    assert codes(text) == expected


def test_whitespace_control_joins_words() -> None:
    # `{{-` removes the space before it: the value is glued to the `$` (ANSI-C quoting in bash).
    assert codes("echo $ {{- v | quote }}") == [UNSAFE_PREFIX]
    assert codes("echo $ {{ v | quote }}") == []
    # `-%}` removes the newline that would have ended the comment.
    assert codes("echo # x {%- if a -%}\n{{ v | quote }}{% endif %}") == [INSIDE_COMMENT]
    assert codes("echo # x {% if a %}\n{{ v | quote }}{% endif %}") == []


def test_a_template_that_does_not_parse_has_no_findings() -> None:
    # The template check reports the syntax error; the lint says nothing rather than guess.
    assert shell_findings('echo "{{ v | quote }"') == []
    assert shell_findings('echo "{{ v | quote }}" {% if %}') == []


# ---------------------------------------------------------------------------------------------
# What a finding says
# ---------------------------------------------------------------------------------------------

def test_finding_fields_and_position() -> None:
    text = 'set -e\nmkdir -p out\necho "failed on {{ host.name | quote }}" >&2\n'
    [f] = shell_findings(text)
    assert isinstance(f, ShellFinding)
    assert f.code == INSIDE_QUOTES and f.code in CODES
    assert f.expression == "host.name | quote"
    assert f.source == "{{ host.name | quote }}"
    assert text[f.offset:f.offset + len(f.source)] == f.source
    assert (f.line, f.column) == (3, len('echo "failed on ') + 1)
    assert f.context == "double quotes"
    assert "single quotes" in f.message and "plain characters inside double quotes" in f.message
    assert "$(...)" in f.message
    assert 'echo "failed on "{{ host.name | quote }}' in f.hint


def test_messages_and_hints_per_context() -> None:
    def one(text: str) -> ShellFinding:
        [f] = shell_findings(text)
        return f

    f = one("echo {{ v | upper }}")
    assert f.code == UNQUOTED and "without `| quote`" in f.message and "`{{ v | upper | quote }}`" in f.hint
    f = one("echo 'x {{ v }}'")
    assert f.context == "single quotes" and "ends the quoting" in f.message and "outside the quotes" in f.hint
    f = one("echo $(( {{ v }} ))")
    assert "arithmetic" in f.context and "`{{ v | int }}`" in f.hint
    f = one("echo `{{ v | quote }}`")
    assert "backtick in the value ends" in f.message and "$(...)" in f.hint
    f = one("# {{ v | quote }}")
    assert "newline in the value ends the comment" in f.message and "{# ... #}" in f.hint
    f = one("cat <<EOF\n{{ v | quote }}\nEOF")
    assert "here-document" in f.context and "delimiter" in f.message and "printf" in f.hint
    f = one('echo "${x:-{{ v | quote }}}"')
    assert "parameter expansion" in f.context and 'v={{ v | quote }}' in f.hint
    f = one("echo \\{{ v | quote }}")
    assert "backslash" in f.context and "escapes the opening quote" in f.message
    f = one("echo ${{ v | quote }}")
    assert "`$`" in f.context and "ANSI-C" in f.message


def test_occurrences_count_identical_placeholders() -> None:
    text = 'echo {{ v | quote }} "{{ v | quote }}" "{{ v | quote }}"'
    found = shell_findings(text)
    assert [(f.code, f.occurrence) for f in found] == [(INSIDE_QUOTES, 1), (INSIDE_QUOTES, 2)]
    assert [f.column for f in found] == [m.start() + 1 for m in re.finditer(r"\{\{", text)][1:]


def test_locate_in_file_plain_quoted_and_block_scalars() -> None:
    doc = ("runbook: x\n"
           "steps:\n"
           "  - shell: echo {{ v | quote }} \"{{ v | quote }}\"\n"
           "  - shell: \"echo \\\"{{ w | quote }}\\\"\"\n"
           "  - shell: |\n"
           "      set -e\n"
           "      echo 'a {{ w | quote }}'\n")
    data = yaml.compose(doc)
    steps = data.value[1][1].value

    def start(i: int) -> int:
        return steps[i].value[0][1].start_mark.index

    [f0] = shell_findings(yaml.safe_load(doc)["steps"][0]["shell"])
    assert locate_in_file(doc, start(0), f0) == (3, doc.splitlines()[2].rindex("{{") + 1)
    [f1] = shell_findings(yaml.safe_load(doc)["steps"][1]["shell"])
    assert locate_in_file(doc, start(1), f1) == (4, doc.splitlines()[3].index("{{") + 1)
    [f2] = shell_findings(yaml.safe_load(doc)["steps"][2]["shell"])
    assert (f2.line, f2.column) == (2, len("echo 'a ") + 1)
    assert locate_in_file(doc, start(2), f2) == (7, doc.splitlines()[6].index("{{") + 1)
    # Not found before the end of the value: the caller falls back to the value's own position.
    assert locate_in_file(doc, start(2), f2, value_end=start(2) + 5) is None
    assert locate_in_file("nothing here", 0, f2) is None


# ---------------------------------------------------------------------------------------------
# `command:` argv lists
# ---------------------------------------------------------------------------------------------

ARGV = [
    (["sh", "-c", "S"], [2]),
    (["bash", "-c", "S", "name", "arg1"], [2]),
    (["/bin/sh", "-c", "S"], [2]),
    (["/usr/bin/bash", "-lc", "S"], [2]),
    (["dash", "-ec", "S"], [2]),
    (["zsh", "-c", "S"], [2]),
    (["ksh", "-c", "S"], [2]),
    (["bash", "-e", "-c", "S"], [3]),
    (["bash", "-c", "-e", "S"], [3]),
    (["bash", "-euo", "pipefail", "-c", "S"], [4]),
    (["bash", "-o", "pipefail", "-c", "S"], [4]),
    (["bash", "--norc", "--noprofile", "-c", "S"], [4]),
    (["bash", "--rcfile", "/x", "-c", "S"], [4]),
    (["bash", "-c", "--", "S"], [3]),
    (["env", "A=1", "sh", "-c", "S"], [4]),
    (["/usr/bin/env", "-i", "bash", "-c", "S"], [4]),
    (["sudo", "-u", "app", "sh", "-c", "S"], [5]),
    (["sudo", "-n", "env", "X=1", "/bin/bash", "-ec", "S", "a"], [6]),
    (["timeout", "5", "sh", "-c", "S"], [4]),
    (["find", ".", "-exec", "sh", "-c", "S", "sh", "{}", ";"], [5]),
    (["xargs", "-0", "sh", "-c", "S"], [4]),
    (["su", "-", "postgres", "-c", "S"], [4]),
    (["runuser", "app", "-c", "S"], [3]),
    # not a shell script
    (["sh", "script.sh", "-c", "x"], []),
    (["sh", "-e", "script.sh"], []),
    (["sh", "-c"], []),
    (["python3", "-c", "S"], []),
    (["grep", "-c", "sh", "file"], []),
    (["echo", "sh"], []),
    (["systemd-tmpfiles", "--clean"], []),
    (["{{ shell }}", "-c", "S"], []),
    ([], []),
]


@pytest.mark.parametrize(("argv", "expected"), ARGV)
def test_shell_script_positions(argv: list[str], expected: list[int]) -> None:
    assert shell_script_positions(argv) == expected


def test_argv_findings_lint_only_the_script() -> None:
    argv = ["sh", "-c", 'echo "{{ a | quote }}" {{ b }}', "sh", "{{ c }}", '"{{ d | quote }}"']
    found = argv_findings(argv)
    assert [(i, f.code, f.expression) for i, f in found] == [(2, INSIDE_QUOTES, "a | quote"), (2, UNQUOTED, "b")]
    # The shipped pattern: the value reaches the script as "$1", never as code.
    assert argv_findings(["sh", "-c", 'cd "$1" && ls', "sh", "{{ dir }}"]) == []
    assert argv_findings(["echo", '"{{ v }}"']) == []


# ---------------------------------------------------------------------------------------------
# Real shells: what the lint calls unsafe can be exploited; what it calls safe cannot
# ---------------------------------------------------------------------------------------------

PAYLOADS = [
    "$(touch pwned)",
    "`touch pwned`",
    "'; touch pwned; '",
    '"; touch pwned; "',
    "x\ntouch pwned\n",
    "x\nEOF\ntouch pwned\n",
    "a[$(touch pwned)]",
    "\\'; touch pwned #",
    "}; touch pwned; {",
    ") ; touch pwned ; (",
    "'\"$(touch pwned)\"'",
    "$'\\x27'; touch pwned",
    "`; touch pwned; `",
]


def pwned(scripts: list[str], shell: str) -> list[bool]:
    """Run each rendered script with `shell` in a fresh directory of its own; which ones created `pwned` there."""
    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        for i, script in enumerate(scripts):
            (base / f"s{i}").write_text(script)
            (base / f"d{i}").mkdir()
        # One driver process runs them all (one Python spawn per shell, not per script); each runs on
        # its own, so a syntax error in one cannot hide another.
        driver = f'for i in $(seq 0 {len(scripts) - 1}); do (cd "d$i" && {shell} ../"s$i") </dev/null >/dev/null 2>&1; done'
        subprocess.run(["sh", "-c", driver], cwd=d, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        return [(base / f"d{i}" / "pwned").exists() for i in range(len(scripts))]


def rendered(text: str, payload: str) -> str:
    """The template rendered with every variable the tests use set to the payload."""
    ctx: dict[str, Any] = {name: payload for name in ("v", "w", "f", "d", "x", "a", "b")}
    ctx.update(host={"name": payload}, manifest={"stdout": payload}, paths=[payload], xs=[payload], n=-7, c=True)
    return render(text, ctx)


def exploited_by(text: str, shells: list[str]) -> list[tuple[str, str]]:
    """(shell, payload) pairs that made the rendered template run `touch pwned`."""
    scripts = [rendered(text, p) for p in PAYLOADS]
    return [(sh, p) for sh in shells for p, hit in zip(PAYLOADS, pwned(scripts, sh)) if hit]


pytestmark_shells = pytest.mark.skipif(not SHELL_BINARIES, reason="no POSIX shell on this machine")

EXPLOITABLE = [
    'echo "x {{ v | quote }}" > out',
    "echo 'x {{ v | quote }}'",
    "echo `echo {{ v | quote }}`",
    "# {{ v | quote }}",
    "cat <<EOF\n{{ v | quote }}\nEOF",
    "cat <<'EOF'\n{{ v | quote }}\nEOF",
    "echo {{ v }}",
    'echo "${x:-{{ v | quote }}}"',
    "echo \\{{ v | quote }}",
    "(( $(echo {{ v | quote }}) ))",
    "echo $[ {{ v | quote }} ]",
]


@pytestmark_shells
@pytest.mark.parametrize("text", EXPLOITABLE)
def test_what_the_lint_flags_is_really_exploitable(text: str) -> None:
    assert shell_findings(text), text
    assert exploited_by(text, SHELL_BINARIES), f"no payload ran code through {text!r}: the test payloads are too weak"


@pytestmark_shells
def test_double_quoted_arithmetic_runs_code_in_bash() -> None:
    if not shutil.which("bash"):
        pytest.skip("bash is not installed")
    text = "echo $(( {{ v | quote }} + 1 ))"
    assert codes(text) == [INSIDE_QUOTES]
    assert ("bash", "a[$(touch pwned)]") in exploited_by(text, ["bash"])


@pytestmark_shells
@pytest.mark.parametrize("text", [t for t in SAFE if "{{" in t and "restart_command" not in t and "cmd |" not in t])
def test_what_the_lint_calls_safe_resists_every_payload(text: str) -> None:
    assert exploited_by(text, SHELL_BINARIES) == []


# Pieces of shell text (and placeholders) that random templates are made of; nothing in them can
# do harm beyond the payload's `touch pwned` in a temporary directory.
TOKENS = ["echo ", "cat ", "a", " ", "'", '"', "`", "$(", ")", "${x:-", "}", "$((", "))", "((", "#", "\n", "\\", ";",
          " && ", " | ", "<<EOF\n", "\nEOF\n", "<<-EOF\n", "\n\tEOF\n", "<<'EOF'\n", "$", "$'", "x=", "1",
          "{{ v | quote }}", "{{ v | quote }}", "{{ v | quote }}", "{{ v }}", "{{ n | int }}", "{% raw %}'{% endraw %}"]


@pytestmark_shells
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=12))
def test_property_no_finding_means_no_payload_runs(tokens: list[str]) -> None:
    text = "".join(tokens)
    if "{{" not in text or shell_findings(text):
        return
    assert exploited_by(text, SHELL_BINARIES) == [], text


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from([*TOKENS, "{{ 'lit' }}", "{# c #}", "{% if a %}", "{% endif %}", "{{- v -}}"]),
                max_size=20))
def test_property_findings_point_at_their_placeholders(tokens: list[str]) -> None:
    text = "".join(tokens)
    for f in shell_findings(text):
        assert text[f.offset:f.offset + len(f.source)] == f.source
        assert f.source.startswith("{{") and f.source.endswith("}}")
        before = text[:f.offset]
        assert (f.line, f.column) == (before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1)
        assert f.code in CODES and f.message and f.hint


# ---------------------------------------------------------------------------------------------
# Shipped examples stay fixed
# ---------------------------------------------------------------------------------------------

SHELL_KEYS = ("shell", "unless", "only_if")


def shell_texts(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], str, list[ShellFinding]]]:
    """(path, text, findings) for every shell context of a playbook-like YAML document (fragments too)."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = (*path, key)
            wait_for_command = key == "command" and bool(path) and path[-1] == "wait_for"
            if (key in SHELL_KEYS or wait_for_command) and isinstance(value, str):
                yield here, value, shell_findings(value)
            elif key == "command" and isinstance(value, list):
                yield here, json.dumps(value), [f for _, f in argv_findings(value)]
            yield from shell_texts(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from shell_texts(value, (*path, i))


def shipped_documents(marked_unsafe: bool = False) -> Iterator[tuple[str, Any]]:
    """Every shipped playbook, and every ```yaml block of the README and the docs.

    A block fenced ```yaml unsafe shows what not to do; those come only with `marked_unsafe`.
    """
    if not marked_unsafe:
        for path in sorted((ROOT / "playbooks").glob("*.yml")):
            yield str(path.relative_to(ROOT)), yaml.safe_load(path.read_text())
    for path in [ROOT / "README.md", ROOT / "playbooks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        # Fences may be indented (inside a list item); their content is indented alike.
        for m in re.finditer(r"^[ \t]*```ya?ml([^\n]*)\n(.*?)^[ \t]*```", text, re.MULTILINE | re.DOTALL):
            if (m.group(1).strip() == "unsafe") == marked_unsafe:
                line = text.count("\n", 0, m.start()) + 1
                yield f"{path.relative_to(ROOT)}:{line}", yaml.safe_load(textwrap.dedent(m.group(2)))


def test_examples_marked_unsafe_really_are() -> None:
    marked = list(shipped_documents(marked_unsafe=True))
    assert any(name.startswith("docs/security.md:") for name, _ in marked)
    for name, doc in marked:
        assert any(found for _, _, found in shell_texts(doc)), f"{name} is fenced `yaml unsafe` but the lint finds nothing"


def test_no_shipped_example_interpolates_unsafely() -> None:
    linted, problems = [], []
    for name, doc in shipped_documents():
        for path, _text, found in shell_texts(doc):
            linted.append((name, path))
            problems += [f"{name} {'.'.join(map(str, path))}: {f.code}: {f.source} ({f.context})" for f in found]
    assert problems == []
    # The walk really reached the examples that used to teach the unsafe pattern, and plenty more.
    assert any(n.startswith("README.md:") and p == ("on_failure", 0, "shell") for n, p in linted)
    assert any(n.startswith("docs/playbook-format.md") and p == ("on_failure", 0, "shell") for n, p in linted)
    assert any(p[-2:] == ("wait_for", "command") for _, p in linted)
    assert any(p[-1] == "command" for _, p in linted)
    assert len(linted) > 60


def test_the_walk_would_catch_the_old_readme_example() -> None:
    doc = yaml.safe_load('on_failure:\n  - on: controller\n    shell: echo "failed on {{ host.name | quote }}"\n')
    [(_, _, found)] = list(shell_texts(doc))
    assert [f.code for f in found] == [INSIDE_QUOTES]


# ---------------------------------------------------------------------------------------------
# End to end through the real CLI
# ---------------------------------------------------------------------------------------------

ATTACK = """\
runbook: attack
vars: {v: hello}
steps:
  - name: echo it
    shell: echo "x {{ v | quote }}" > out
"""

FIXED = """\
runbook: fixed
vars: {v: hello}
steps:
  - name: echo it
    shell: echo "x "{{ v | quote }} > out
"""


def column_of(text: str, line: int, needle: str = "{{") -> int:
    """1-based column of `needle` on a 1-based line of `text`."""
    return text.splitlines()[line - 1].index(needle) + 1


def test_validate_flags_the_attack_that_really_runs(tmp_path: Path) -> None:
    playbook = tmp_path / "attack.yml"
    playbook.write_text(ATTACK)
    marker = tmp_path / "pwned"
    # The attack is real: a value passed with -e runs as a command on the control machine.
    run = cli("run", str(playbook), "-e", f"v=$(touch {marker})", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert marker.exists()
    # validate warns, naming the place and the reason ...
    warned = cli("validate", str(playbook), cwd=tmp_path)
    assert warned.returncode == 0, warned.stdout + warned.stderr
    where = f"{playbook}:5:{column_of(ATTACK, 5)}: warning:"
    assert where in warned.stderr and "double quotes" in warned.stderr, warned.stderr
    # ... and --strict refuses it (exit 4) with the code, line and column.
    strict = cli("validate", "--strict", "--format", "json", str(playbook), cwd=tmp_path)
    assert strict.returncode == 4, strict.stdout + strict.stderr
    [report] = json.loads(strict.stdout)
    found = [p for p in report["problems"] if "inside-quotes" in p["code"]]
    assert [(p["line"], p["column"], p["severity"]) for p in found] == [(5, column_of(ATTACK, 5), "error")]   # --strict: an error everywhere
    assert "`quote`" in found[0]["message"] and found[0]["hint"]


def test_validate_lints_wait_for_command_and_sh_c_scripts(tmp_path: Path) -> None:
    text = """\
runbook: more-shells
vars: {v: hello}
steps:
  - name: wait
    wait_for:
      command: test -e "{{ v | quote }}"
      timeout: 1s
  - name: argv
    command: [sh, -c, 'echo "{{ v | quote }}" $1', sh, "{{ v }}"]
  - name: plain argv
    command: [echo, '"{{ v }}"']
"""
    playbook = tmp_path / "more.yml"
    playbook.write_text(text)
    strict = cli("validate", "--strict", "--format", "json", str(playbook), cwd=tmp_path)
    assert strict.returncode == 4, strict.stdout + strict.stderr
    [report] = json.loads(strict.stdout)
    found = [(p["line"], p["column"]) for p in report["problems"] if "inside-quotes" in p["code"]]
    assert found == [(6, column_of(text, 6)), (9, column_of(text, 9))]
    assert [p for p in report["problems"] if p["line"] in (9, 11) and "inside-quotes" not in p["code"]] == []


def test_the_fixed_example_keeps_the_value_as_text(tmp_path: Path) -> None:
    playbook = tmp_path / "fixed.yml"
    playbook.write_text(FIXED)
    marker = tmp_path / "pwned"
    payload = f"$(touch {marker}) `touch {marker}` '; touch {marker}; '"
    run = cli("run", str(playbook), "-e", json.dumps({"v": payload}), cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert not marker.exists()
    outs = list(tmp_path.rglob("out"))
    assert len(outs) == 1 and outs[0].read_text() == f"x {payload}\n"
    assert shell_findings(yaml.safe_load(FIXED)["steps"][0]["shell"]) == []
    strict = cli("validate", "--strict", str(playbook), cwd=tmp_path)
    assert strict.returncode == 0, strict.stdout + strict.stderr
