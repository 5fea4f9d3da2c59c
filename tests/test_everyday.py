"""Everyday use as a new user meets it: what the console shows, what flags mean, what validate agrees with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runbook.cli import main
from runbook.errors import PlaybookError
from runbook.loader import parse_playbook


def exit_code(fn: Any) -> int:
    """The exit code of a CLI call: main() returns it or click's sys.exit raises it."""
    try:
        rc = fn()
    except SystemExit as exc:
        return int(exc.code or 0)
    return int(rc or 0)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def problems_of(text: str) -> list[str]:
    """Every rendered problem of a playbook text that does not load."""
    with pytest.raises(PlaybookError) as err:
        parse_playbook(text, "pb.yml")
    return [p.render() for p in err.value.problems]


# --- booleans, sudo, become -------------------------------------------------------------------

STEP = "runbook: t\nsteps:\n  - name: a\n    shell: 'true'\n"


@pytest.mark.parametrize("key", ["ignore_errors", "read_only", "once"])
@pytest.mark.parametrize("word, meant", [("yes", "true"), ("on", "true"), ("no", "false"), ("Off", "false"),
                                         ("y", "true")])
def test_yaml11_boolean_words_are_refused_with_the_word_to_write(key: str, word: str, meant: str) -> None:
    found = problems_of(STEP + f"    {key}: {word}\n")
    assert len(found) == 1
    assert f"pb.yml:5:{len(key) + 7}: error: `{key}`: expected true or false, got the string '{word}'" in found[0]
    assert f"hint: write `{meant}`" in found[0] and "YAML 1.2" in found[0]


@pytest.mark.parametrize("value, hint", [('"true"', "remove the quotes: `true`"), ("1", "write true or false")])
def test_quoted_or_numeric_booleans_are_refused(value: str, hint: str) -> None:
    found = problems_of(STEP + f"    ignore_errors: {value}\n")
    assert "expected true or false" in found[0] and hint in found[0]


def test_real_booleans_still_load() -> None:
    pb = parse_playbook(STEP + "    ignore_errors: true\n    read_only: false\n    once: true\n", "pb.yml")
    step = pb.steps[0]
    assert (step.ignore_errors, step.read_only, step.once) == (True, False, True)


@pytest.mark.parametrize("word", ["yes", "no", "on", "OFF", "y", "'true'"])
def test_sudo_boolean_words_are_not_user_names(word: str) -> None:
    found = problems_of(STEP + f"    sudo: {word}\n")
    assert len(found) == 1 and "is neither true/false nor a user name" in found[0]
    assert "`sudo: true` runs as root" in found[0]


def test_sudo_number_is_refused() -> None:
    for value, shown in (("0", "an integer 0"), ("1", "an integer 1"), ("1.5", "a number 1.5")):
        assert f"`sudo`: expected true or false or a string, got {shown}" in problems_of(STEP + f"    sudo: {value}\n")[0]


@pytest.mark.parametrize("value, expected", [("true", True), ("false", False), ("postgres", "postgres"),
                                             ("'{{ app_user }}'", "{{ app_user }}")])
def test_sudo_true_false_or_user(value: str, expected: Any) -> None:
    assert parse_playbook(STEP + f"    sudo: {value}\n", "pb.yml").steps[0].sudo == expected


def test_become_keys_are_refused_with_a_hint_naming_sudo() -> None:
    found = problems_of(STEP + "    become: true\n    become_user: postgres\n    become_method: su\n")
    assert any("unknown key `become`" in p and "runbook spells it `sudo`" in p for p in found)
    assert any("unknown key `become_user`" in p and "`sudo: USER`" in p for p in found)
    assert any("unknown key `become_method`" in p and "sudo" in p for p in found)


def test_an_action_spec_boolean_follows_the_same_rule() -> None:
    """The rule lives in the shared strict base model, so every model built on it refuses `yes` too."""
    from pydantic import ValidationError

    from runbook.fields import Strict

    class Spec(Strict):
        force: bool = False
        maybe: bool | None = None

    assert Spec.model_validate({"force": True, "maybe": None}).force is True
    for bad in ({"force": "yes"}, {"maybe": "on"}, {"force": 1}):
        with pytest.raises(ValidationError, match="expected true or false"):
            Spec.model_validate(bad)


# --- -e key=value is text ---------------------------------------------------------------------

def test_extra_vars_key_value_stays_text_json_and_files_keep_types(tmp_path: Path) -> None:
    from runbook.cli import parse_extra_vars

    write(tmp_path / "vars.yml", "n: 90\nflag: true\nversion: '1.10'\n")
    got = parse_extra_vars(("restart_command=true", "version=1.10", "threshold=90", "mode=0644", "empty=",
                            "eq=a=b", "yes=no"))
    assert got == {"restart_command": "true", "version": "1.10", "threshold": "90", "mode": "0644", "empty": "",
                   "eq": "a=b", "yes": "no"}
    assert parse_extra_vars((f"@{tmp_path / 'vars.yml'}",)) == {"n": 90, "flag": True, "version": "1.10"}
    assert parse_extra_vars(('{"n": 90, "flag": true}', "n=91")) == {"n": "91", "flag": True}


def test_extra_vars_reach_the_command_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    pb = write(tmp_path / "pb.yml", "runbook: t\nhosts: localhost\nsteps:\n"
               "  - name: show\n    shell: echo {{ version | quote }} {{ restart_command | quote }}\n"
               "  - name: typed\n    when: not (flag | bool)\n    shell: echo off\n")
    code = exit_code(lambda: main(["run", str(pb), "-e", "version=1.10", "-e", "restart_command=true",
                                   "-e", "flag=false", "--format", "json"]))
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    results = {r["step_id"]: r for r in doc["results"]}
    assert results["show"]["stdout"] == "1.10 true\n"
    assert results["typed"]["stdout"] == "off\n"    # the text `false` is still false as a condition


# --- flags ------------------------------------------------------------------------------------

def help_of(*command: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert exit_code(lambda: main([*command, "--help"])) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", ["run", "plan", "apply", "resume"])
def test_one_format_flag_and_the_old_spelling_hidden(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = help_of(command, capsys=capsys)
    assert "--format [text|json]" in text and "--output" not in text


@pytest.mark.parametrize("command", ["apply", "resume"])
def test_every_option_of_apply_and_resume_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    import click

    from runbook.cli import cli

    cmd = cli.commands[command]
    bare = [p.name for p in cmd.params if isinstance(p, click.Option) and not p.hidden and not (p.help or "").strip()]
    assert bare == []


def test_plan_json_help_says_what_it_prints(capsys: pytest.CaptureFixture[str]) -> None:
    text = " ".join(help_of("plan", capsys=capsys).split())
    assert "every task result" not in text and "the plan document on stdout" in text


@pytest.mark.parametrize("flag", ["--format", "--output"])
def test_format_json_and_its_old_alias(flag: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    pb = write(tmp_path / "pb.yml", "runbook: t\nhosts: localhost\nsteps:\n  - name: hi\n    shell: echo hi\n")
    assert exit_code(lambda: main(["run", str(pb), flag, "json"])) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["stdout"] == "hi\n"


# --- seeing what happened ---------------------------------------------------------------------

def run_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
            text: str, *args: str) -> tuple[int, str, str]:
    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    pb = write(tmp_path / "pb.yml", text)
    code = exit_code(lambda: main(["run", str(pb), *args]))
    out, err = capsys.readouterr()
    return code, out, err


MEASURE = ("runbook: t\nhosts: localhost\nsteps:\n"
           "  - name: measure\n    read_only: true\n    shell: echo 'usage 42%'; echo 'note' >&2\n"
           "  - name: flaky\n    shell: echo x >> n; echo \"attempts so far=$(grep -c x n)\"; exit 3\n    retries: 2\n"
           "    ignore_errors: true\n")


def test_verbose_shows_each_tasks_output_on_the_console(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(tmp_path, monkeypatch, capsys, MEASURE, "-v")
    assert code == 0, err
    assert "localhost: measure: ok" in err and "    stdout| usage 42%" in err and "    stderr| note" in err


def test_failures_show_output_and_attempts_without_verbose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(tmp_path, monkeypatch, capsys, MEASURE)
    assert code == 0, err
    assert "usage 42%" not in err                                    # ok tasks stay one line without -v
    assert "localhost: flaky: retrying (attempt 2 of 3)" in err
    assert "localhost: flaky: retrying (attempt 3 of 3)" in err
    assert "localhost: flaky: failed (ignored) after 3 attempts" in err
    assert "    stdout| attempts so far=3" in err


def test_live_view_on_a_terminal_prints_failures_with_output(tmp_path: Path) -> None:
    import io

    from runbook import run
    from runbook.audit import Redactor
    from runbook.console import ConsoleView, make_console
    from runbook.inventory import Inventory
    from runbook.loader import load_playbook

    out = io.StringIO()
    pb = write(tmp_path / "pb.yml", "runbook: t\nhosts: localhost\nsteps:\n"
               "  - name: a\n    shell: sleep 0.3; echo done-a\n  - name: b\n    needs: []\n    shell: echo boom >&2; exit 4\n")
    view = ConsoleView(make_console(out, color=True), Redactor(), live=True, playbook=load_playbook(pb))
    result = run(pb, Inventory.default(), audit_log=str(tmp_path / "a.jsonl"), state_dir=str(tmp_path / "runs"),
                 observers=[view])
    text = out.getvalue()
    assert result.exit_code() == 2
    assert "boom" in text and "failed" in text and "RECAP" in text
    assert "done-a" not in text                  # without -v only failures print above the live table


def test_make_demo_shows_what_was_checked_and_the_measured_values(tmp_path: Path) -> None:
    from tests.helpers import REPO, cli

    makefile = (REPO / "Makefile").read_text()
    recipe = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "runbook run playbooks/health-check.yml -v" in recipe
    proc = cli("run", "playbooks/health-check.yml", "-v", cwd=REPO,
               env={"RUNBOOK_AUDIT_LOG": str(tmp_path / "audit.jsonl")})
    assert proc.returncode in (0, 2), proc.stderr          # 2: this machine breached a threshold
    err = proc.stderr
    assert "localhost: check-disk-usage: " in err and "fullest mount" in err     # what was checked, concluded
    assert any(ln.startswith("    stdout| ") and "/" in ln for ln in err.splitlines())  # the measured value


# --- small but visible ------------------------------------------------------------------------

def test_audit_verify_without_a_trail_is_invalid_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RUNBOOK_AUDIT_LOG", raising=False)
    assert main(["audit", "verify", "--audit-log", str(tmp_path / "nope.jsonl")]) == 4
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nope.jsonl'}: error: no audit trail at this path" in err and "--audit-log" in err
    assert main(["audit", "verify"]) == 4          # the default places, none there
    # A broken chain still exits 2.
    broken = write(tmp_path / "broken.jsonl", '{"not": "a record"}\n')
    assert main(["audit", "verify", "--audit-log", str(broken)]) == 2


TAGGED = ("runbook: t\nhosts: localhost\nsteps:\n  - name: a\n    shell: touch a\n    tags: [deploy]\n"
          "  - name: b\n    shell: touch b\n    tags: [restart, deploy]\n")


@pytest.mark.parametrize("command", ["run", "plan"])
@pytest.mark.parametrize("flag", ["--tags", "--skip-tags"])
def test_an_unknown_tag_is_an_error_listing_the_known_ones(command: str, flag: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    pb = write(tmp_path / "pb.yml", TAGGED)
    assert exit_code(lambda: main([command, str(pb), flag, "deploy,restrat"])) == 4
    err = capsys.readouterr().err
    assert f"error: {flag}: no step of `t` has the tag `restrat`" in err
    assert "did you mean `restart`? known tags: deploy, restart" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "audit.jsonl").exists()   # nothing started


def test_known_tags_still_select(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    pb = write(tmp_path / "pb.yml", TAGGED)
    assert exit_code(lambda: main(["run", str(pb), "--tags", "restart", "--skip-tags", "always"])) == 0
    assert (tmp_path / "b").exists() and not (tmp_path / "a").exists()


def test_a_playbook_without_tags_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    pb = write(tmp_path / "pb.yml", "runbook: t\nhosts: localhost\nsteps:\n  - name: a\n    shell: touch a\n")
    assert exit_code(lambda: main(["run", str(pb), "--tags", "nosuch", "--audit-log", str(tmp_path / "a.jsonl")])) == 4
    assert "known tags: none (no step has `tags:`)" in capsys.readouterr().err


def _one_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    pb = write(tmp_path / "pb.yml", "runbook: t\nhosts: localhost\nsteps:\n  - name: a\n    shell: 'true'\n")
    assert exit_code(lambda: main(["run", str(pb), "--format", "json"])) == 0
    return str(json.loads(capsys.readouterr().out)["run_id"])


def test_audit_show_prints_whole_run_ids_that_resume_and_run_accept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    run_id = _one_run(tmp_path, monkeypatch, capsys)
    assert len(run_id) > 12
    assert main(["audit", "show"]) == 0
    table = capsys.readouterr().out.splitlines()
    pasted = table[1].split()[2]                      # TIME is two words: date and time
    assert pasted == run_id
    assert main(["audit", "show", "--run", pasted, "--format", "json"]) == 0
    assert {r["run_id"] for r in json.loads(capsys.readouterr().out)} == {run_id}
    assert main(["resume", pasted]) == 0             # a finished run: nothing left, but the id is accepted


def test_runs_has_a_time_column_and_aligned_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from datetime import UTC, datetime

    first = _one_run(tmp_path, monkeypatch, capsys)
    write(tmp_path / "long.yml", "runbook: a-much-longer-playbook-name\nhosts: localhost\nsteps:\n"
          "  - name: a\n    shell: exit 1\n")
    assert exit_code(lambda: main(["run", str(tmp_path / "long.yml"), "--operator", "someone-else"])) == 2
    capsys.readouterr()
    assert main(["runs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["STARTED", "(UTC)", "RUN", "MODE", "STATUS", "PLAYBOOK", "HOSTS", "OPERATOR", "TASKS"]
    assert len(lines) == 3
    row = next(ln for ln in lines if first in ln)
    stamp = datetime.strptime(row[:19], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 3600
    for header in ("RUN", "MODE", "STATUS", "PLAYBOOK", "OPERATOR", "TASKS"):   # every column starts where its header does
        col = lines[0].index(header)
        assert all(ln[col - 2:col] == "  " and ln[col] != " " for ln in lines[1:]), header
    assert "1 failed" in lines[1] + lines[2] and "1 changed" in row


def test_plan_out_refuses_a_missing_directory_before_planning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    pb = write(tmp_path / "pb.yml", "runbook: t\nhosts: localhost\nsteps:\n  - name: a\n    shell: touch a\n")
    assert exit_code(lambda: main(["plan", str(pb), "--out", "plasn/x/plan.json"])) == 4
    err = capsys.readouterr().err
    assert "--out plasn/x/plan.json: the directory plasn/x does not exist" in err and "mkdir -p plasn/x" in err
    assert not (tmp_path / "plasn").exists() and not (tmp_path / "audit.jsonl").exists()
    (tmp_path / "plans").mkdir()
    assert exit_code(lambda: main(["plan", str(pb), "-o", "plans/plan.json"])) == 0
    assert (tmp_path / "plans" / "plan.json").is_file()


def test_gitignore_covers_plan_files_and_the_drain_directory() -> None:
    import subprocess

    from tests.helpers import REPO

    paths = ["plan.json", "restart.plan.json", "drain/web01", "drain/events.log", "playbooks/.runbook/audit.jsonl"]
    proc = subprocess.run(["git", "-C", str(REPO), "check-ignore", "--no-index", *paths], capture_output=True, text=True)
    assert sorted(proc.stdout.split()) == sorted(paths)
    kept = subprocess.run(["git", "-C", str(REPO), "check-ignore", "--no-index", "playbooks/disk-pressure.yml",
                           "inventory/local.yml"], capture_output=True, text=True)
    assert kept.stdout == ""


# --- validation that matches run --------------------------------------------------------------

TYPO = ("runbook: t\nhosts: localhost\nvars: {log_dir: /tmp}\nsteps:\n"
        "  - name: list\n    shell: ls {{ log_dri | quote }}\n"
        "  - name: optional\n    shell: echo {{ maybe | default('x') | quote }}\n    when: other is defined\n"
        "  - name: words\n    shell: 'true'\n    changed_when: yes\n")


def test_a_mistyped_variable_gets_a_did_you_mean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pb = write(tmp_path / "pb.yml", TYPO)
    assert main(["validate", str(pb)]) == 0
    out, err = capsys.readouterr()
    assert f"{pb}:6:12: warning: `log_dri` is not defined by the playbook's vars, secrets or registers\n" \
           "  hint: did you mean `log_dir`?" in err
    assert "`yes` is not defined" in err and "write `true`: in an expression `yes` is a variable name" in err
    assert "maybe" not in err and "other" not in err    # only read behind `default` / `is defined`
    assert out.strip().endswith("2 warning(s)")


def test_strict_makes_them_errors_and_every_output_agrees(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pb = write(tmp_path / "pb.yml", TYPO)
    assert main(["validate", "--strict", str(pb)]) == 4
    out, err = capsys.readouterr()
    assert f"{pb}:6:12: error: `log_dri` is not defined" in err and "warning:" not in err
    assert out.strip() == f"{pb}: invalid (2 error(s), 0 warning(s))" and "ok" not in out
    assert main(["validate", "--strict", "--format", "json", str(pb)]) == 4
    [report] = json.loads(capsys.readouterr().out)
    assert report["valid"] is False
    assert {p["severity"] for p in report["problems"]} == {"error"}
    # Without --strict the same playbook is valid, with warnings, in both outputs.
    assert main(["validate", "--format", "json", str(pb)]) == 0
    [report] = json.loads(capsys.readouterr().out)
    assert report["valid"] is True and {p["severity"] for p in report["problems"]} == {"warning"}


def test_strict_on_a_clean_playbook_still_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pb = write(tmp_path / "pb.yml", "runbook: t\nvars: {d: /tmp}\nsteps:\n  - name: a\n    shell: ls {{ d | quote }}\n")
    assert main(["validate", "--strict", "--format", "json", str(pb)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["valid"] is True


def test_run_warns_of_an_undefined_name_before_it_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(tmp_path, monkeypatch, capsys, TYPO, "-e", "other=1")
    assert code == 2
    warning = "warning: undefined variable `log_dri` (its step fails if it runs)\n  hint: did you mean `log_dir`?"
    assert warning in err and err.index(warning) < err.index("Running t on")
    # A name the inventory or -e defines is not reported.
    code, _, err = run_cli(tmp_path, monkeypatch, capsys, TYPO, "-e", "log_dri=/tmp")
    assert "log_dri" not in err.split("Running t on")[0]


def test_validate_refuses_an_unknown_window_as_run_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "windows.yml", 'windows:\n  saturday-night: {cron: "0 2 * * SAT", duration: 2h}\n')
    pb = write(tmp_path / "pb.yml", "runbook: t\nhosts: localhost\nwindow: saturday-nite\nsteps:\n"
               "  - name: a\n    shell: touch ran\n")
    assert main(["validate", "pb.yml"]) == 4
    out, validate_err = capsys.readouterr()
    assert "pb.yml: invalid (1 error(s)" in out
    assert "pb.yml:3:9: error: unknown window `saturday-nite`" in validate_err
    assert "did you mean `saturday-night`?" in validate_err
    assert exit_code(lambda: main(["run", str(pb), "--audit-log", str(tmp_path / "a.jsonl")])) == 4
    run_err = capsys.readouterr().err
    assert "error: unknown window `saturday-nite`" in run_err and not (tmp_path / "ran").exists()
    # The right name validates; so does an inline window.
    pb.write_text(pb.read_text().replace("saturday-nite", "saturday-night"))
    assert main(["validate", "pb.yml"]) == 0
    (tmp_path / "windows.yml").unlink()
    pb.write_text(pb.read_text().replace("saturday-night", "{cron: '0 2 * * SAT', duration: 2h}"))
    assert main(["validate", "pb.yml"]) == 0


def test_validate_a_named_window_without_windows_yml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    write(tmp_path / "sub" / "pb.yml", "runbook: t\nwindow: nightly\nsteps:\n  - name: a\n    shell: 'true'\n")
    assert main(["validate", "pb.yml", "--format", "json"]) == 4
    [report] = json.loads(capsys.readouterr().out)
    assert report["valid"] is False and "unknown window `nightly`: no windows.yml" in report["problems"][0]["message"]


def test_the_shipped_playbooks_still_validate(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.helpers import REPO

    monkeypatch.chdir(REPO)
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "playbooks").glob("*.yml"))
    assert main(["validate", *files]) == 0, capsys.readouterr()


# --- YAML errors in plain words ---------------------------------------------------------------

@pytest.mark.parametrize("text, where, explained, hint", [
    ("runbook: t\nsteps:\n  - name: a\n    shell: x\n   register: r\n", (5, 4),
     "this line is indented differently from the lines before it", "same indentation"),
    ("runbook: t\nsteps:\n  - name: a\n    shell: x\n     register: r\n", (5, 6),
     "`register:` is indented deeper than the key above it", "align `register:` with the keys above it"),
    ("runbook: t\nsteps:\n  - name: a\n    shell: echo a: b\n", (4, 18),
     "an unquoted value contains `: `", "quote the whole value: 'echo a: b'"),
    ('runbook: t\nsteps:\n  - name: "a\n    shell: x\n  - name: b\n    shell: y\n', (3, 11),
     'the " opened here is never closed', "close the value with the same quote"),
    ("runbook: t\nsteps:\n  - name: a\n    shell: 'echo x\n  - name: b\n    shell: y\n", (4, 12),
     "the ' opened here is never closed", "close the value with the same quote"),
    ("runbook: t\nvars: {a: 1\nsteps:\n  - name: a\n    shell: x\n", (2, 7),
     "the `{` opened here is not closed with `}`", "close it on the same line"),
    ("runbook: t\nsteps:\n  - name: a\n    shell: *.log\n", (4, 12),
     "`*` at the start of a value refers to an anchor", "quote the whole value: '*.log'"),
    ("runbook: t\nsteps:\n  - name: a\n    shell: @x\n", (4, 12),
     "a plain value cannot start with '@'", "quote the whole value: '@x'"),
    ("runbook: t\nsteps:\n  - name: a\n    shell x\n    register: r\n", (4, 5),
     "this line is not `key: value`", "add the colon"),
    ("runbook: t\nvars:\n  a: 1\n  - b\nsteps: []\n", (4, 3),
     "a `-` list item where the lines before it are `key: value` pairs", "indent the list"),
    ("runbook: t\nsteps:\n  - name: a\n    shell: \"echo\" x\n", (4, 19),
     "text follows the closing quote", "quote the whole value"),
    ("runbook: t\nsteps:\n  - name: a\n    shell: | x\n      y\n", (4, 14),
     "text follows `|` or `>` on the same line", "move the text to the next line"),
])
def test_yaml_errors_are_explained_in_plain_words(text: str, where: tuple[int, int], explained: str,
                                                  hint: str) -> None:
    [found] = problems_of(text)
    head, hint_line = found.split("\n")
    assert head.startswith(f"pb.yml:{where[0]}:{where[1]}: error: malformed YAML: {explained}"), found
    assert "(YAML parser: " in head                 # the parser's own words stay, for searching
    assert hint in hint_line


def test_an_unclosed_quote_is_located_at_the_quote_not_the_end_of_the_file() -> None:
    text = "runbook: t\nsteps:\n  - name: 'a\n" + "".join(f"  - name: s{i}\n    shell: x\n" for i in range(50))
    [found] = problems_of(text)
    assert found.startswith("pb.yml:3:11: error: malformed YAML: the ' opened here is never closed")


def test_a_quote_left_open_and_closed_by_a_later_apostrophe_is_reported_where_it_opens() -> None:
    [found] = problems_of("runbook: t\nsteps:\n  - name: 'a\n    shell: it's x\n")
    assert found.startswith("pb.yml:3:11: error: malformed YAML: the ' opened here is closed only on line 4")


# --- re-applying a plan, drift and on_failure ---------------------------------------------------

APPLY_PB = ("runbook: t\nhosts: localhost\nsteps:\n"
            "  - name: flag\n    shell: touch flag\n    creates: flag\n"
            "  - name: count\n    shell: echo run >> counter\n"
            "on_failure:\n  - name: page\n    shell: echo paged >> paged\n")


def _plan_and_apply(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                    ) -> tuple[int, str]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    write(tmp_path / "pb.yml", APPLY_PB)
    assert exit_code(lambda: main(["plan", "pb.yml", "--out", "plan.json"])) == 0
    code = exit_code(lambda: main(["apply", "plan.json", "-y"]))
    return code, capsys.readouterr().err


def test_reapplying_an_applied_plan_says_so_and_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _plan_and_apply(tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert (tmp_path / "counter").read_text() == "run\n"
    code = exit_code(lambda: main(["apply", "plan.json", "-y"]))
    err = capsys.readouterr().err
    assert code == 0, err
    assert "plan.json was already applied: run " in err and "ended ok" in err and "nothing was run again" in err
    assert "drift" not in err
    assert (tmp_path / "counter").read_text() == "run\n" and not (tmp_path / "paged").exists()
    code = exit_code(lambda: main(["apply", "plan.json", "-y", "--format", "json"]))
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["exit_code"] == 0 and out["already_applied"]["status"] == "ok"


def test_drift_is_refused_before_any_change_and_does_not_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    write(tmp_path / "pb.yml", APPLY_PB)
    assert exit_code(lambda: main(["plan", "pb.yml", "--out", "plan.json"])) == 0
    (tmp_path / "flag").write_text("made by hand\n")          # the world moved between review and apply
    capsys.readouterr()
    code = exit_code(lambda: main(["apply", "plan.json", "-y", "--format", "json"]))
    out, err = capsys.readouterr()
    results = {r["step_id"]: r for r in json.loads(out)["results"]}
    assert code == 2
    assert results["flag"]["status"] == "drift" and results["count"]["status"] == "not_run"
    assert "page" not in results and not (tmp_path / "paged").exists()      # no on_failure for drift
    assert not (tmp_path / "counter").exists()
    assert "localhost is stopped before any planned change on it (no on_failure" in err


def test_a_real_failure_still_runs_on_failure_and_a_failed_apply_points_to_resume(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RUNBOOK_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    write(tmp_path / "pb.yml", APPLY_PB.replace("echo run >> counter", "echo run >> counter; test -f ok"))
    assert exit_code(lambda: main(["plan", "pb.yml", "--out", "plan.json"])) == 0
    assert exit_code(lambda: main(["apply", "plan.json", "-y"])) == 2
    assert (tmp_path / "paged").read_text() == "paged\n"
    capsys.readouterr()
    (tmp_path / "ok").write_text("")
    code = exit_code(lambda: main(["apply", "plan.json", "-y"]))
    err = capsys.readouterr().err
    assert "note: this plan was applied before in run " in err and "(status failed); `runbook resume " in err
    assert code == 2 and "drift" in err      # the flag step now drifts (it was made), and that pages no one
    assert (tmp_path / "paged").read_text() == "paged\n"


def test_earlier_applies_are_found_within_the_plans_own_second(tmp_path: Path) -> None:
    from runbook.state import applies_of

    def state(run_id: str, **doc: Any) -> None:
        write(tmp_path / f"{run_id}.json", json.dumps({"run_id": run_id, "mode": "apply", "plan_hash": "h1",
                                                       "status": "ok", **doc}))

    state("20260101T000000Z-000000")                     # the plan's second, a smaller random suffix
    state("20260101T000001Z-aaaaaa", status="failed")
    state("20251231T235959Z-ffffff")                     # before the plan: not its apply
    state("20260101T000002Z-bbbbbb", plan_hash="other")
    state("20260101T000003Z-cccccc", mode="run")
    write(tmp_path / "20260101T000004Z-dddddd.json", "{torn")
    found = applies_of(tmp_path, "h1", after="20260101T000000Z-ffffff")
    assert [(e["run_id"], e["status"]) for e in found] == [("20260101T000000Z-000000", "ok"),
                                                          ("20260101T000001Z-aaaaaa", "failed")]
    assert applies_of(tmp_path / "none", "h1", after="x") == []


def test_yaml_hints_quote_at_most_a_short_piece_of_a_hostile_line() -> None:
    [found] = problems_of("runbook: t\nsteps:\n  - name: a\n    shell: echo " + "a: b " * 20000 + "\n")
    assert len(found) < 600 and "…" in found
