"""Handlers: validation, graph shape and renderings, and their behaviour on local hosts (real commands, no SSH)."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from runbook import run
from runbook.engine import SavedPrediction
from runbook.graph import StepGraph, TaskKey, expand
from runbook.handlers import handler_id_of, task_id, tasks_per_host
from runbook.loader import load_playbook, parse_playbook, validate_playbook
from runbook.results import RunResult, Status
from tests.helpers import EventRecorder, InventoryWriter


def write(tmp_path: Path, text: str, name: str = "pb.yml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems(tmp_path: Path, text: str) -> list[tuple[int | None, str, str | None, str]]:
    """(line, message, hint, code) of every error `validate` reports."""
    report = validate_playbook(write(tmp_path, text))
    return [(p.location.line if p.location else None, p.message, p.hint, p.code) for p in report.errors]


# --- validation -------------------------------------------------------------------------------------

def test_notify_of_an_unknown_handler_is_located_with_a_did_you_mean(tmp_path: Path) -> None:
    found = problems(tmp_path, """\
        runbook: t
        steps:
          - name: write config
            shell: "true"
            notify: [restart app, restrat nginx]
        handlers:
          - name: restart app
            shell: "true"
          - name: restart nginx
            shell: "true"
        """)
    assert found == [(5, "`notify` names unknown handler `restrat nginx`", "did you mean `restart nginx`?", "unknown-handler")]


def test_notify_as_a_single_string_and_by_id(tmp_path: Path) -> None:
    pb = load_playbook(write(tmp_path, """\
        runbook: t
        steps:
          - {name: a, shell: "true", notify: restart app}
          - {name: b, shell: "true", notify: rl}
        handlers:
          - {name: restart app, shell: "true"}
          - {name: reload it, id: rl, shell: "true"}
        """))
    assert [s.notify for s in pb.steps] == [["restart app"], ["rl"]]
    g = StepGraph.build(pb)
    assert {"handler:restart-app", "handler:rl"} <= set(g.graph)


def test_a_notify_without_handlers_says_to_add_them(tmp_path: Path) -> None:
    [(line, message, hint, _)] = problems(tmp_path, """\
        runbook: t
        steps:
          - {name: a, shell: "true", notify: restart}
        """)
    assert line == 3 and "unknown handler `restart`" in message and "no `handlers:`" in (hint or "")


def test_duplicate_handler_names_and_ids_are_errors(tmp_path: Path) -> None:
    found = problems(tmp_path, """\
        runbook: t
        steps:
          - {name: a, shell: "true", notify: restart}
        handlers:
          - name: restart
            shell: "true"
          - name: restart
            shell: "false"
          - name: other
            id: restart
            shell: "false"
        """)
    assert [(line, code) for line, _, _, code in found] == [(7, "duplicate-handler"), (10, "duplicate-handler")]
    assert "first used at line 5" in found[0][1]


def test_handler_misuse_is_located(tmp_path: Path) -> None:
    found = problems(tmp_path, """\
        runbook: t
        steps:
          - {name: a, shell: "true", notify: [one, two]}
        handlers:
          - name: one
            shell: "true"
            needs: [a]
          - name: two
            shell: "true"
            notify: one
          - name: three
            once: true
            shell: "true"
        """)
    by_code = {code: (line, message, hint) for line, message, hint, code in found}
    assert by_code["handler-needs"][0] == 7
    assert by_code["notify-order"][0] == 10 and "listed before it" in by_code["notify-order"][1]
    assert "move `one` below `two`" in (by_code["notify-order"][2] or "")
    assert by_code["handler-once"][0] == 12


def test_flush_handlers_with_an_action_or_conditions_is_an_error(tmp_path: Path) -> None:
    found = problems(tmp_path, """\
        runbook: t
        steps:
          - {name: a, shell: "true", notify: h}
          - name: flush
            flush_handlers: true
            shell: "true"
          - name: flush again
            flush_handlers: true
            when: x
        handlers:
          - {name: h, shell: "true"}
        """)
    assert [(line, code) for line, _, _, code in found] == [(6, "flush-action"), (9, "flush-keys")]


def test_on_failure_cannot_notify_and_a_handler_cannot_notify_itself(tmp_path: Path) -> None:
    found = problems(tmp_path, """\
        runbook: t
        steps:
          - {name: a, shell: "true", notify: h}
        on_failure:
          - {name: page, shell: "true", notify: h}
        handlers:
          - {name: h, shell: "true", notify: h}
        """)
    assert sorted(code for *_, code in found) == ["notify-on-failure", "notify-order"]


def test_a_step_before_a_flush_point_cannot_need_one_after_it(tmp_path: Path) -> None:
    # `x` waits for the flush point, which waits for `a`, which needs `x`: a loop only the handlers close.
    found = problems(tmp_path, """\
        runbook: t
        steps:
          - {name: a, shell: "true", notify: h, needs: [x]}
          - {name: b, shell: "true", needs: []}
          - {name: f, flush_handlers: true}
          - {name: x, shell: "true"}
        handlers:
          - {name: h, shell: "true"}
        """)
    assert [(line, code) for line, _, _, code in found] == [(3, "cycle")]
    assert "through a flush_handlers point" in found[0][1] and "handler:h:f" in found[0][1]


def test_a_step_id_cannot_pose_as_a_handler_task(tmp_path: Path) -> None:
    # Task ids of handlers hold `:`; a step id cannot, so no step can collide with (or forge) one.
    found = problems(tmp_path, """\
        runbook: t
        steps:
          - {name: a, id: "handler:h", shell: "true"}
        """)
    assert found and found[0][0] == 3
    assert handler_id_of("handler:h:flush") == "h" and handler_id_of("h") is None
    assert task_id("h") == "handler:h" and task_id("h", "f") == "handler:h:f"


def test_notify_names_are_never_rendered_as_templates(tmp_path: Path) -> None:
    found = problems(tmp_path, """\
        runbook: t
        steps:
          - {name: a, shell: "true", notify: "{{ lookup('pipe', 'touch /tmp/pwned-rb') }}"}
        handlers:
          - {name: h, shell: "true"}
        """)
    assert [code for *_, code in found] == ["unknown-handler"]
    assert not Path("/tmp/pwned-rb").exists()


# --- graph --------------------------------------------------------------------------------------------

GRAPH_PB = """\
    runbook: t
    steps:
      - {name: write config, shell: "true", notify: restart app}
      - {name: side, shell: "true", needs: []}
      - {name: write other, shell: "true", notify: [reload app, restart app], needs: [write-config]}
      - {name: flush now, flush_handlers: true}
      - {name: later, shell: "true", notify: restart app}
      - {name: quiet, shell: "true"}
    handlers:
      - {name: restart app, shell: "true", notify: reload app}
      - {name: reload app, id: reload, shell: "true"}
      - {name: never, shell: "true"}
    """


def test_handler_instances_wait_for_their_segment_and_the_next_steps_wait_for_them(tmp_path: Path) -> None:
    g = StepGraph.build(load_playbook(write(tmp_path, GRAPH_PB)))
    assert g.order() == ["write-config", "side", "write-other", "handler:restart-app:flush-now", "handler:reload:flush-now",
                         "later", "quiet", "handler:restart-app", "handler:reload"]
    edges = set(g.graph.edges)
    # The flush point waits for every leaf of its segment (`side` is a root nothing else needs).
    assert {("side", "handler:restart-app:flush-now"), ("write-other", "handler:restart-app:flush-now")} <= edges
    # Listed order, not notification order; the step after the flush waits for the last handler.
    assert ("handler:restart-app:flush-now", "handler:reload:flush-now") in edges
    assert ("handler:reload:flush-now", "later") in edges
    assert ("quiet", "handler:restart-app") in edges and ("handler:restart-app", "handler:reload") in edges
    assert "flush-now" not in g.graph and "handler:never" not in g.graph
    inst = g.graph.nodes["handler:reload"]["handler"]
    # Notified at the end only through `restart app`, which `later` notifies.
    assert [n.task_id for n in inst.notifiers] == ["handler:restart-app"]
    assert tasks_per_host(g.playbook) == 5 + 4


def test_the_task_graph_has_a_handler_instance_per_host(tmp_path: Path) -> None:
    g = StepGraph.build(load_playbook(write(tmp_path, GRAPH_PB)))
    tasks = expand(g, ["h1", "h2"])
    assert TaskKey("handler:reload", "h2") in tasks
    assert tasks.has_edge(TaskKey("quiet", "h1"), TaskKey("handler:restart-app", "h1"))
    assert not tasks.has_edge(TaskKey("quiet", "h1"), TaskKey("handler:restart-app", "h2"))


def test_renderings_show_handlers(tmp_path: Path) -> None:
    text = GRAPH_PB.replace("{name: never,", '{name: "say \\"hi\\" <b>",')
    pb = load_playbook(write(tmp_path, text.replace("quiet, shell", 'quiet, notify: "say \\"hi\\" <b>", shell')))
    g = StepGraph.build(pb)
    assert "handler:restart-app [shell]  <- quiet  (handler at the end, notified by later)" in g.to_text()
    dot = g.to_dot()
    assert '"handler:reload" [label="reload app\\n[shell]", style="rounded,dashed"];' in dot
    assert 'label="say \\"hi\\" <b>\\n[shell]"' in dot   # quotes escaped: no attribute injection
    mermaid = g.to_mermaid()
    assert '{{"reload app<br/><small>handler:reload · shell</small>"}}' in mermaid
    assert "say #quot;hi#quot; #60;b#62;" in mermaid


def test_parse_playbook_keeps_handlers_for_apply(tmp_path: Path) -> None:
    pb = parse_playbook(textwrap.dedent(GRAPH_PB), str(tmp_path / "pb.yml"))
    assert [h.step_id for h in pb.handlers] == ["restart-app", "reload", "never"]
    assert pb.step("handler:reload:flush-now") is pb.handlers[1]
    assert [s.step_id for s in pb.all_steps()][-3:] == ["restart-app", "reload", "never"]


# --- behaviour on local hosts ------------------------------------------------------------------------

@pytest.fixture
def go(tmp_path: Path, local_inventory: InventoryWriter) -> Callable[..., RunResult]:
    """`go(playbook_dict, hosts=["a"], **run_kwargs)`: run over local hosts that each have a `dir`."""

    def run_it(doc: dict[str, Any], hosts: list[str] | None = None, **kw: Any) -> RunResult:
        inv = local_inventory(hosts or ["a"])
        pb = tmp_path / "pb.yml"
        pb.write_text(yaml.safe_dump({"runbook": "t", **doc}, sort_keys=False))
        return run(pb, str(inv), audit_log=str(tmp_path / "audit.jsonl"), state_dir=str(tmp_path / "runs"), **kw)

    return run_it


def log(tmp_path: Path, host: str) -> list[str]:
    path = tmp_path / "hosts" / host / "log"
    return path.read_text().split() if path.exists() else []


def status(result: RunResult, host: str, sid: str) -> tuple[str, str]:
    r = result.get(host, sid)
    assert r is not None, f"no result for {host}/{sid}"
    return r.status.value, r.message


def echo(word: str, **extra: Any) -> dict[str, Any]:
    return {"name": word, "shell": f"echo {word} >> {{{{ dir }}}}/log", **extra}


CHANGES_ON_B = {"changed_when": "inventory_hostname == 'b'"}


def test_a_handler_runs_once_per_host_after_the_steps_in_listed_order(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    result = go({"steps": [echo("one", notify=["second", "first"]), echo("two", notify="first"), echo("three")],
                 "handlers": [echo("first"), echo("second")]})
    assert result.exit_code() == 0
    assert log(tmp_path, "a") == ["one", "two", "three", "first", "second"]
    assert status(result, "a", "handler:first") == ("changed", "notified by `one`, `two` (changed)")


def test_a_handler_runs_only_on_hosts_where_a_notifier_changed(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    result = go({"steps": [echo("conf", **CHANGES_ON_B, notify="restart")], "handlers": [echo("restart")]},
                hosts=["a", "b"])
    assert result.exit_code() == 0
    assert log(tmp_path, "a") == ["conf"] and log(tmp_path, "b") == ["conf", "restart"]
    assert status(result, "a", "handler:restart") == ("skipped", "not notified: `conf` did not change on this host")
    assert result.recap()["a"]["skipped"] == 1


def test_flush_handlers_runs_them_before_the_next_steps_and_again_at_the_end(
        tmp_path: Path, go: Callable[..., RunResult]) -> None:
    result = go({"steps": [echo("conf", notify="restart"), {"name": "flush", "flush_handlers": True},
                           echo("after", notify="restart"), echo("last")],
                 "handlers": [echo("restart", notify="reload"), echo("reload")]})
    assert result.exit_code() == 0
    assert log(tmp_path, "a") == ["conf", "restart", "reload", "after", "last", "restart", "reload"]
    assert status(result, "a", "handler:reload:flush") == ("changed", "notified by `restart` (changed)")


def test_a_flush_point_with_nothing_notified_is_only_a_barrier(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    result = go({"steps": [echo("one"), {"name": "flush", "flush_handlers": True}, echo("two")]})
    assert result.exit_code() == 0 and log(tmp_path, "a") == ["one", "two"]
    assert [r.step_id for r in result.results] == ["one", "two"]   # a flush point is no task


def test_a_host_that_failed_does_not_run_its_handlers(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    result = go({"steps": [echo("conf", notify="restart"), {"name": "check", "shell": "test {{ inventory_hostname }} = a"}],
                 "handlers": [echo("restart")]}, hosts=["a", "b"])
    assert log(tmp_path, "a") == ["conf", "restart"] and log(tmp_path, "b") == ["conf"]
    assert status(result, "b", "handler:restart") == ("not_run", "upstream step `check` failed")


def test_an_ignored_failure_does_not_notify(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    result = go({"steps": [{"name": "try", "shell": "false", "ignore_errors": True, "notify": "restart"}],
                 "handlers": [echo("restart")]})
    assert status(result, "a", "handler:restart")[0] == "skipped" and log(tmp_path, "a") == []


def test_tags_filter_handlers_like_steps(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    doc = {"steps": [echo("conf", notify=["restart", "audit"], tags=["conf"])],
           "handlers": [echo("restart", tags=["conf"]), echo("audit")]}
    result = go(doc, tags=frozenset({"conf"}))
    assert log(tmp_path, "a") == ["conf", "restart"]
    assert status(result, "a", "handler:audit") == ("skipped", "tag filter")


def test_a_looped_notifier_counts_by_its_aggregate_result_and_a_handler_may_loop(
        tmp_path: Path, go: Callable[..., RunResult]) -> None:
    doc = {"steps": [{"name": "conf", "loop": ["x", "y"], "shell": "echo {{ item }} >> {{ dir }}/log",
                      "changed_when": "item == 'y' and inventory_hostname == 'b'", "notify": "restart"}],
           "handlers": [{"name": "restart", "loop": ["r1", "r2"], "shell": "echo {{ item }} >> {{ dir }}/log"}]}
    result = go(doc, hosts=["a", "b"])
    assert result.exit_code() == 0
    assert log(tmp_path, "a") == ["x", "y"] and log(tmp_path, "b") == ["x", "y", "r1", "r2"]
    assert status(result, "a", "handler:restart")[0] == "skipped"
    plan = go(doc, hosts=["a", "b"], mode="plan")
    assert status(plan, "a", "handler:restart")[0] == "unknown"   # changed_when reads the output


def test_a_handler_may_share_a_steps_name(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    result = go({"steps": [{"name": "restart", "shell": "echo step >> {{ dir }}/log", "notify": "restart"}],
                 "handlers": [{"name": "restart", "shell": "echo handler >> {{ dir }}/log", "register": "r"}]})
    assert result.exit_code() == 0 and log(tmp_path, "a") == ["step", "handler"]


def test_a_once_notifier_notifies_every_host(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    result = go({"steps": [{"name": "ticket", "shell": "true", "once": True, "notify": "restart"}],
                 "handlers": [echo("restart")]}, hosts=["a", "b"])
    assert result.exit_code() == 0 and log(tmp_path, "a") == log(tmp_path, "b") == ["restart"]


def test_resume_runs_a_handler_whose_notifier_changed_in_the_earlier_run(
        tmp_path: Path, go: Callable[..., RunResult]) -> None:
    doc = {"steps": [echo("conf", notify="restart")], "handlers": [echo("restart")]}
    first = go(doc)
    done = first.get("a", "conf")
    assert done is not None and done.status == Status.CHANGED
    (tmp_path / "hosts" / "a" / "log").unlink()
    # As `resume` passes them: the earlier run's finished tasks; the handler had not run.
    result = go(doc, mode="resume", previous={TaskKey("conf", "a"): done})
    assert log(tmp_path, "a") == ["restart"]
    assert status(result, "a", "handler:restart")[0] == "changed"


def test_events_and_audit_name_handler_tasks(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    recorder = EventRecorder()
    go({"steps": [echo("conf", notify="restart")], "handlers": [echo("restart")]}, observers=[recorder])
    assert ("task_finished", ("a", "handler:restart", "changed")) in recorder.events
    trail = (tmp_path / "audit.jsonl").read_text()
    assert '"step_id": "handler:restart"' in trail or '"step_id":"handler:restart"' in trail


# --- plan and apply on local hosts -------------------------------------------------------------------

def test_plan_predicts_handlers_from_their_notifiers(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    (tmp_path / "hosts").mkdir()
    for h, content in (("a", "new\n"), ("b", "old\n")):
        (tmp_path / "hosts" / h).mkdir()
        (tmp_path / "hosts" / h / "conf").write_text(content)
    doc = {"steps": [{"name": "write config", "copy": {"dest": "{{ dir }}/conf", "content": "new\n"}, "notify": "restart"},
                     {"name": "unguarded", "shell": "true", "notify": "reload"}],
           "handlers": [echo("restart"), echo("reload"), {"name": "stay", "shell": "true", "changed_when": False}]}
    doc["steps"][0]["notify"] = ["restart", "stay"]
    result = go(doc, hosts=["a", "b"], mode="plan")
    got = {(r.host, r.step_id): (r.prediction.value if r.prediction else None, r.message) for r in result.results}
    assert got[("a", "handler:restart")] == ("skip", "not notified: `write config` is predicted no change on this host")
    assert got[("b", "handler:restart")][0] == "change"
    assert got[("b", "handler:restart")][1].startswith("would run: notified by `write config` (predicted change)")
    assert got[("b", "handler:reload")][0] == "unknown"
    assert got[("b", "handler:reload")][1].startswith("notified only if `unguarded` changes (its prediction is unknown)")
    # Notified, but its own prediction (changed_when: false) stands, with why it runs.
    assert got[("b", "handler:stay")][0] == "ok" and got[("b", "handler:stay")][1].startswith("notified by `write config`")
    assert log(tmp_path, "a") == log(tmp_path, "b") == []   # a dry run changes nothing


def test_apply_decides_handlers_from_what_notifiers_really_did(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    recorder = EventRecorder()
    doc = {"steps": [echo("conf", **CHANGES_ON_B, notify="restart")], "handlers": [echo("restart")]}
    # A reviewed plan that got both hosts wrong: the handler runs where its notifier changed (b), with
    # a warning, and is skipped where it did not (a), saying what the plan expected.
    predictions = {TaskKey("conf", "a"): SavedPrediction("change", "would run"),
                   TaskKey("handler:restart", "a"): SavedPrediction("change", "notified"),
                   TaskKey("conf", "b"): SavedPrediction("unknown", "a command"),
                   TaskKey("handler:restart", "b"): SavedPrediction("skip", "not notified")}
    result = go(doc, hosts=["a", "b"], mode="apply", predictions=predictions, observers=[recorder])
    assert log(tmp_path, "a") == ["conf"] and log(tmp_path, "b") == ["conf", "restart"]
    assert status(result, "a", "handler:restart") == (
        "skipped", "not notified: `conf` did not change on this host; the reviewed plan expected it to run")
    warnings = [m for kind, m in recorder.events if kind == "notice" and "handler:restart" in m]
    assert warnings and "b: `handler:restart` runs although the reviewed plan said skip" in warnings[0]


# --- roles and blocks (compose) -------------------------------------------------------------------------

def write_roles(tmp_path: Path) -> None:
    for role in ("web", "db"):
        d = tmp_path / "roles" / role
        d.mkdir(parents=True)
        (d / "steps.yml").write_text(f"- name: {role} conf\n  shell: echo {role}conf >> {{{{ dir }}}}/log\n  notify: restart\n")
        (d / "handlers.yml").write_text(f"- name: restart\n  shell: echo {role}-restart >> {{{{ dir }}}}/log\n")


def test_roles_handlers_are_namespaced_and_a_roles_step_notifies_its_own(
        tmp_path: Path, local_inventory: InventoryWriter) -> None:
    write_roles(tmp_path)
    pb = write(tmp_path, """\
        runbook: t
        steps:
          - role: web
          - role: db
          - {name: top, shell: "echo top >> {{ dir }}/log", notify: [db/restart]}
        handlers:
          - {name: restart, shell: "echo top-restart >> {{ dir }}/log"}
        """)
    g = StepGraph.build(load_playbook(pb))
    inst = g.graph.nodes["handler:db/restart"]["handler"]
    assert [n.task_id for n in inst.notifiers] == ["db/db-conf", "top"]
    assert "handler:restart" not in g.graph   # the playbook's own `restart`: nobody notified it
    result = run(pb, str(local_inventory(["a"])), audit_log=str(tmp_path / "audit.jsonl"), state_dir=str(tmp_path / "runs"))
    assert result.exit_code() == 0
    assert log(tmp_path, "a") == ["webconf", "dbconf", "top", "web-restart", "db-restart"]


def test_a_bare_name_several_roles_have_is_ambiguous(tmp_path: Path) -> None:
    write_roles(tmp_path)
    [(line, message, hint, code)] = problems(tmp_path, """\
        runbook: t
        steps:
          - role: web
          - role: db
          - {name: top, shell: "true", notify: restart}
        """)
    assert (line, code) == (5, "unknown-handler")
    assert hint == "several roles or includes have it: name one as `web/restart` or `db/restart`"


def test_a_block_in_handlers_is_refused(tmp_path: Path) -> None:
    found = problems(tmp_path, """\
        runbook: t
        steps:
          - {name: a, shell: "true", notify: one}
        handlers:
          - name: grouped
            block:
              - {name: one, shell: "true"}
        """)
    assert [(line, code) for line, *_, code in found] == [(7, "handler-group")]


def test_the_console_counts_handler_tasks(tmp_path: Path) -> None:
    from runbook.console import _Progress

    progress = _Progress(["h1", "h2"], load_playbook(write(tmp_path, GRAPH_PB)))
    assert progress.total == {"h1": 9, "h2": 9}
    assert progress.attempts["handler:reload:flush-now"] == 1 and progress.attempts["handler:restart-app"] == 1


# --- hostile input and reports ------------------------------------------------------------------------------

def test_flush_points_times_handlers_cannot_blow_up_the_graph(tmp_path: Path) -> None:
    # 23 KB of YAML (one aliased notify list) would otherwise be 40,000 handler tasks per host.
    names = [f"h{i}" for i in range(200)]
    steps: list[dict[str, Any]] = []
    for k in range(200):
        steps += [{"name": f"s{k}", "shell": "true", "notify": names}, {"name": f"f{k}", "flush_handlers": True}]
    path = tmp_path / "big.yml"
    path.write_text(yaml.safe_dump({"runbook": "big", "steps": steps, "handlers": [{"name": n, "shell": "true"} for n in names]}))
    report = validate_playbook(path)
    assert [p.code for p in report.errors] == ["too-many-handlers"]
    assert report.errors[0].location is not None and report.errors[0].location.line


def test_the_html_report_lists_handler_tasks(tmp_path: Path, go: Callable[..., RunResult],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from runbook.cli import main

    result = go({"steps": [echo("conf", notify="restart")], "handlers": [echo("restart")]})
    out = tmp_path / "report.html"
    code = main(["report", result.run_id, "--audit-log", str(tmp_path / "audit.jsonl"), "--state-dir",
                 str(tmp_path / "runs"), "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    html = out.read_text()
    assert "handler:restart" in html and "notified by" in html


def test_notifier_names_in_reasons_cannot_drive_the_terminal(tmp_path: Path, go: Callable[..., RunResult]) -> None:
    name = "conf\x1b]0;pwned\x07\x1b[2J"
    result = go({"steps": [{"name": name, "id": "conf", "shell": "true", "changed_when": False, "notify": "restart"}],
                 "handlers": [echo("restart")]})
    reason = status(result, "a", "handler:restart")[1]
    assert "\x1b" not in reason and "\x07" not in reason
    assert reason == "not notified: `conf\\x1b]0;pwned\\x07\\x1b[2J` did not change on this host"



def test_a_host_whose_rescue_failed_runs_no_handlers_even_when_always_succeeded(
        tmp_path: Path, go: Callable[..., RunResult]) -> None:
    """The block's `always:` steps are the segment's last steps; the host still failed in the block."""
    guarded = {"name": "risky", "block": [echo("conf", notify="restart"), {"name": "try", "shell": "false"}],
               "rescue": [{"name": "undo", "shell": "false"}], "always": [echo("cleanup")]}
    result = go({"steps": [guarded], "handlers": [echo("restart")]})
    assert result.exit_code() == 2 and log(tmp_path, "a") == ["conf", "cleanup"]
    assert status(result, "a", "handler:restart")[0] == "not_run"
    assert "block `risky` failed" in status(result, "a", "handler:restart")[1]
    # At a flush point right after such a block, neither its handlers nor the steps after it run,
    # also when nothing was notified.
    (tmp_path / "hosts" / "a" / "log").unlink()
    quiet = {**guarded, "block": [echo("conf"), {"name": "try", "shell": "false"}]}
    result = go({"steps": [quiet, {"name": "flush", "flush_handlers": True}, echo("after")],
                 "handlers": [echo("restart")]})
    assert log(tmp_path, "a") == ["conf", "cleanup"]
    assert status(result, "a", "after")[0] == "not_run" and "block `risky` failed" in status(result, "a", "after")[1]


def test_a_rescued_host_runs_its_handlers_and_a_flush_point_may_stand_in_a_block(
        tmp_path: Path, go: Callable[..., RunResult]) -> None:
    result = go({"steps": [{"name": "risky", "block": [echo("conf", notify="restart"), {"name": "flush", "flush_handlers": True},
                                                       {"name": "try", "shell": "false"}],
                            "rescue": [echo("fix")]},
                           echo("after", notify="restart")],
                 "handlers": [echo("restart")]})
    assert result.exit_code() == 0
    assert log(tmp_path, "a") == ["conf", "restart", "fix", "after", "restart"]
