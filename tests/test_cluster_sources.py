"""The steps' control-machine files shipped with a cluster run (runbook/cluster/sources.py)."""

from __future__ import annotations

import hashlib
import os
import pickle
import stat
import tracemalloc
from pathlib import Path

import pytest

from runbook.cluster import sources as sources_mod
from runbook.cluster.sources import Shipments, collect_sources, install_sources, rendered_sources, step_templates
from runbook.compose import resolve_source
from runbook.engine.options import ExecOptions
from runbook.engine.registers import Registers
from runbook.engine.task import TaskRunner
from runbook.errors import RunbookError
from runbook.events import EventStream
from runbook.facts import Facts
from runbook.graph import TaskKey
from runbook.loader import load_playbook
from runbook.runner import RunRequest, prepare
from tests.helpers import cli

PLAYBOOK = """\
runbook: shipped
steps:
  - name: motd
    upload: {src: files/motd, dest: /tmp/motd}
  - name: motd-again
    upload: {src: files/motd, dest: /tmp/motd2}
  - name: conf
    template: {src: templates/app.conf.j2, dest: /tmp/app.conf}
  - name: per-host
    upload: {src: "files/{{ inventory_hostname }}", dest: /tmp/mine}
  - name: plain
    command: ["true"]
"""


def _playbook(tmp_path: Path) -> Path:
    (tmp_path / "files").mkdir(parents=True)
    (tmp_path / "templates").mkdir()
    (tmp_path / "files" / "motd").write_bytes(b"welcome\x00\xff\n")
    (tmp_path / "templates" / "app.conf.j2").write_text("name={{ inventory_hostname }}\n")
    (tmp_path / "pb.yml").write_text(PLAYBOOK)
    return tmp_path / "pb.yml"


def test_untemplated_sources_are_read_once_and_keyed_by_step(tmp_path: Path) -> None:
    playbook = load_playbook(_playbook(tmp_path))
    got = collect_sources(playbook)
    assert got == {("motd", "files/motd"): b"welcome\x00\xff\n", ("motd-again", "files/motd"): b"welcome\x00\xff\n",
                   ("conf", "templates/app.conf.j2"): b"name={{ inventory_hostname }}\n"}
    assert pickle.loads(pickle.dumps(got)) == got   # it travels in the session's setup


def test_a_missing_source_is_left_to_the_task(tmp_path: Path) -> None:
    playbook = load_playbook(_playbook(tmp_path))
    (tmp_path / "files" / "motd").unlink()
    assert set(collect_sources(playbook)) == {("conf", "templates/app.conf.j2")}


def test_a_worker_reads_the_shipped_copies_not_the_controller_paths(tmp_path: Path) -> None:
    controller = load_playbook(_playbook(tmp_path / "controller"))
    shipped = collect_sources(controller)
    worker = pickle.loads(pickle.dumps(controller))   # as the session's setup arrives
    for path in (tmp_path / "controller" / "files" / "motd", tmp_path / "controller" / "templates" / "app.conf.j2"):
        path.unlink()   # the worker's machine has no playbook directory
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    install_sources(worker, shipped, run_dir)
    steps = {s.step_id: s for s in worker.all_steps()}
    motd = resolve_source(worker, steps["motd"], "files/motd")
    again = resolve_source(worker, steps["motd-again"], "files/motd")
    conf = resolve_source(worker, steps["conf"], "templates/app.conf.j2")
    assert motd.read_bytes() == b"welcome\x00\xff\n" and conf.read_text() == "name={{ inventory_hostname }}\n"
    assert motd == again   # one copy of a file several steps send
    assert motd.parent == run_dir / "sources"
    assert stat.S_IMODE((run_dir / "sources").stat().st_mode) == 0o700
    assert stat.S_IMODE(motd.stat().st_mode) == 0o600
    # a templated path is not shipped: it is still resolved where the task runs
    assert resolve_source(worker, steps["per-host"], "files/h1") == tmp_path / "controller" / "files" / "h1"
    assert resolve_source(controller, steps["motd"], "files/motd") == tmp_path / "controller" / "files" / "motd"


def test_hostile_source_keys_write_nothing_outside_the_run_dir(tmp_path: Path) -> None:
    """Names come from the controller's steps, but the copies are named by content: no path of theirs is written."""
    playbook = load_playbook(_playbook(tmp_path / "pb"))
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    hostile = {("motd", "../../escaped"): b"x", ("conf", "/etc/runbook-escaped"): b"y", ("conf", "a/../../b"): b"z"}
    install_sources(playbook, hostile, run_dir)
    assert sorted(p.name for p in (run_dir / "sources").iterdir()) == sorted(
        hashlib.sha256(d).hexdigest() for d in (b"x", b"y", b"z"))
    assert not (tmp_path / "escaped").exists() and not Path("/etc/runbook-escaped").exists()
    assert [p for p in tmp_path.rglob("*") if p.is_file() and "run" not in p.parts and "pb" not in p.parts] == []


def test_an_oversize_source_is_refused_without_reading_it_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    playbook = load_playbook(_playbook(tmp_path))
    with open(tmp_path / "files" / "motd", "r+b") as f:
        f.truncate(256 * 2**20)   # sparse: 256 MiB on no disk
    monkeypatch.setattr(sources_mod, "MAX_SHIPPED", 1024)
    tracemalloc.start()
    try:
        with pytest.raises(RunbookError, match="source files pass"):
            collect_sources(playbook)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, peak


def test_a_source_that_is_not_a_regular_file_is_left_to_its_task(tmp_path: Path) -> None:
    playbook = load_playbook(_playbook(tmp_path))
    (tmp_path / "files" / "motd").unlink()
    os.mkfifo(tmp_path / "files" / "motd")   # no writer: opening it to read would wait forever
    assert all("motd" not in src for _, src in collect_sources(playbook))


def test_too_much_to_ship_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    playbook = load_playbook(_playbook(tmp_path))
    monkeypatch.setattr(sources_mod, "MAX_SHIPPED", 16)
    with pytest.raises(RunbookError, match="source files pass") as caught:
        collect_sources(playbook)
    assert "deploy the playbook directory on the workers" in str(caught.value.hint)


def test_each_worker_gets_a_steps_sources_with_its_first_order_only(tmp_path: Path) -> None:
    playbook = load_playbook(_playbook(tmp_path))
    ship = Shipments(collect_sources(playbook))
    first = ship.take("tcp://w1", "motd")
    assert first == {("motd", "files/motd"): b"welcome\x00\xff\n"}
    assert ship.take("tcp://w1", "motd") == {}           # its next orders there carry nothing
    assert ship.take("tcp://w2", "motd") == first        # another worker (a moved host's new one) gets them
    assert ship.take("tcp://w1", "conf") == {("conf", "templates/app.conf.j2"): b"name={{ inventory_hostname }}\n"}
    assert ship.take("tcp://w1", "plain") == {} and ship.take("tcp://w1", "per-host") == {}


def test_sources_arriving_in_several_orders_accumulate_on_the_worker(tmp_path: Path) -> None:
    playbook = load_playbook(_playbook(tmp_path / "pb"))
    shipped = collect_sources(playbook)
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    for key, data in shipped.items():   # one order at a time, as a run's orders arrive
        install_sources(playbook, {key: data}, run_dir)
    install_sources(playbook, {("motd", "files/motd"): shipped[("motd", "files/motd")]}, run_dir)   # again: no error
    assert set(playbook._shipped) == set(shipped)
    assert len(list((run_dir / "sources").iterdir())) == 2   # motd (two steps) and the template


def test_a_run_whose_sources_pass_the_limit_stops_before_any_host_with_a_clear_error(tmp_path: Path) -> None:
    """Through the CLI, with the real limit: a message and a hint, no traceback, nothing recorded as run."""
    _playbook(tmp_path)
    with open(tmp_path / "files" / "motd", "r+b") as f:
        f.truncate(sources_mod.MAX_SHIPPED + 1)   # sparse
    (tmp_path / "inv.yml").write_text("all:\n  hosts:\n    web1: {ansible_host: 127.0.0.1, ansible_port: 9}\n")
    proc = cli("run", "pb.yml", "-i", "inv.yml", "--audit-log", "audit.jsonl", "--cluster", "local:2", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "the playbook's source files pass 64 MiB" in proc.stderr and "hint: too much to send" in proc.stderr
    assert "Traceback" not in proc.stderr
    trail = tmp_path / "audit.jsonl"
    assert not trail.exists() or "task." not in trail.read_text()


RENDERED = """\
runbook: rendered
steps:
  - name: per-host
    upload: {src: "files/{{ inventory_hostname }}.conf", dest: /tmp/mine}
  - name: per-item
    copy: {src: "files/{{ item }}", dest: "/tmp/{{ item }}"}
    loop: "{{ wanted }}"
  - name: by-register
    upload: {src: "files/{{ pick.stdout }}", dest: /tmp/picked}
  - name: by-facts
    upload: {src: "files/{{ facts.hostname }}", dest: /tmp/by-facts}
  - name: plain
    upload: {src: files/motd, dest: /tmp/motd}
"""


def _runner(tmp_path: Path, wanted: list[str]) -> TaskRunner:
    _playbook(tmp_path)
    (tmp_path / "pb.yml").write_text(RENDERED)
    (tmp_path / "inv.yml").write_text("all:\n  hosts:\n    web1: {ansible_connection: local}\n")
    prepared = prepare(tmp_path / "pb.yml", str(tmp_path / "inv.yml"), RunRequest(extra_vars={"wanted": wanted}))
    runner = TaskRunner(prepared.playbook, prepared.steps, {h.name: h for h in prepared.hosts}, prepared.info,
                        EventStream([]), ExecOptions(extra_vars={"wanted": wanted}), Registers(["web1"]),
                        lambda *a, **k: pytest.fail("nothing connects to render a source path"))
    runner.facts.gatherer = lambda host, conn: pytest.fail("nothing gathers to render a source path")
    return runner


def _rendered(runner: TaskRunner, step: str) -> dict[tuple[str, str], Path]:
    templates = step_templates(runner.playbook).get(step)
    return rendered_sources(runner, TaskKey(step, "web1"), runner.steps.step(step), templates) if templates else {}


def test_templated_source_paths_render_on_the_controller_per_task_and_item(tmp_path: Path) -> None:
    runner = _runner(tmp_path, ["a.txt", "b.txt", "a.txt"])
    assert _rendered(runner, "per-host") == {("per-host", "files/web1.conf"): tmp_path / "files" / "web1.conf"}
    assert _rendered(runner, "per-item") == {("per-item", "files/a.txt"): tmp_path / "files" / "a.txt",
                                             ("per-item", "files/b.txt"): tmp_path / "files" / "b.txt"}
    assert _rendered(runner, "by-register") == {}   # `pick` is not set yet: left to the worker
    runner.registers.store("web1", "pick", {"stdout": "motd"}, shared=False)
    assert _rendered(runner, "by-register") == {("by-register", "files/motd"): tmp_path / "files" / "motd"}
    assert _rendered(runner, "by-facts") == {}      # facts not gathered yet: never gathered for this
    runner.facts.put("web1", Facts(hostname="web1.example"))
    assert _rendered(runner, "by-facts") == {("by-facts", "files/web1.example"): tmp_path / "files" / "web1.example"}
    assert _rendered(runner, "plain") == {}         # untemplated: shipped with the run's set-up


def test_a_loop_with_too_many_items_is_left_to_the_worker(tmp_path: Path) -> None:
    runner = _runner(tmp_path, [f"f{i}" for i in range(sources_mod.MAX_RENDERED_ITEMS + 1)])
    assert _rendered(runner, "per-item") == {}


def test_rendered_files_go_once_per_worker_read_once_within_the_budget(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a").write_bytes(b"A" * 10)
    (tmp_path / "big").write_bytes(b"B" * 100)
    monkeypatch.setattr(sources_mod, "MAX_SHIPPED", 50)
    ship = Shipments({("s0", "x"): b"X" * 20})   # 30 bytes of room left
    files = {("s1", "a"): tmp_path / "a", ("s1", "big"): tmp_path / "big", ("s1", "gone"): tmp_path / "gone"}
    assert ship.rendered("w1", files) == {("s1", "a"): b"A" * 10}   # too big, and missing: left to the worker
    assert ship.rendered("w1", files) == {}
    (tmp_path / "a").write_bytes(b"changed")
    assert ship.rendered("w2", files) == {("s1", "a"): b"A" * 10}   # what the run read once, not a new version


def test_a_rendered_source_path_that_leaves_its_directory_is_never_read_on_the_controller(tmp_path: Path) -> None:
    """An item (from -e, inventory, an alert) of `../../..`: the controller neither reads nor ships the file."""
    secret = tmp_path / "controller-only.key"
    secret.write_text("private\n")
    runner = _runner(tmp_path, ["a.txt", f"../{secret.name}", str(secret)])
    assert _rendered(runner, "per-item") == {("per-item", "files/a.txt"): tmp_path / "files" / "a.txt",
                                             ("per-item", f"files/{secret}"): tmp_path / "files" / str(secret).lstrip("/")}
    runner.registers.store("web1", "pick", {"stdout": "../../../../../../etc/passwd"}, shared=False)
    assert _rendered(runner, "by-register") == {}
