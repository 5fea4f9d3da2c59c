"""The durable queue and the safety decisions: dedupe, coalescing, recovery, cooldown, breaker, window, one server per queue."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runbook.serve.bridge import WindowState
from runbook.serve.models import Alert
from runbook.serve.queue import NewJob, Queue, QueueError, ServerLock
from runbook.serve.rules import load_rules
from runbook.serve.safety import Safety
from tests.serve_support import make_site


def alert(fp: str = "aa", starts: str = "2026-11-30T10:00:00Z", status: str = "firing") -> Alert:
    return Alert("alertmanager", status, fp, starts, {"alertname": "DiskFull", "instance": "web01"})


@pytest.fixture
def queue(tmp_path: Path) -> Queue:
    return Queue(tmp_path / "serve.db")


def test_the_same_alert_is_stored_once_however_often_it_is_delivered(queue: Queue) -> None:
    first = queue.accept([alert()], "r1")
    assert len(first.new) == 1 and first.duplicates == 0
    for i in range(4):
        again = queue.accept([alert()], f"r{i + 2}")
        assert again.new == [] and again.duplicates == 1 and again.fresh == [False]
    assert len(queue.pending_alerts()) == 1
    _, meta = queue.alert(first.new[0]) or (None, {})
    assert meta["deliveries"] == 5 and meta["request_id"] == "r1"


def test_a_new_start_time_or_status_is_a_new_alert(queue: Queue) -> None:
    got = queue.accept([alert(), alert(starts="2026-11-30T11:00:00Z"), alert(status="resolved"), alert(fp="bb")], "r")
    assert len(got.new) == 4 and got.fresh == [True] * 4


def test_accepted_alerts_survive_closing_the_database(tmp_path: Path) -> None:
    q = Queue(tmp_path / "serve.db")
    q.accept([alert()], "r1")
    q.close()
    # A separate process reads it back: what was acknowledged is on disk, not in this process's memory.
    code = ("import sys; from runbook.serve.queue import Queue; "
            "print(len(Queue(sys.argv[1]).pending_alerts()))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "serve.db")], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "1"


def test_a_queued_job_absorbs_later_alerts_for_the_same_rule_host_and_kind(queue: Queue) -> None:
    a1, a2, a3 = (queue.accept([alert(fp=f)], "r").new[0] for f in ("a1", "a2", "a3"))
    job = NewJob("disk", "web01", "remediate", "/p.yml", "apply")
    [(j1, folded1)] = queue.dispatch(a1, [job], "1")
    [(j2, folded2)] = queue.dispatch(a2, [job], "1")
    assert (folded1, folded2) == (False, True) and j1 == j2
    stored = queue.job(j1)
    assert stored is not None and stored.alerts == 2
    assert queue.job_alert_ids(j1) == [a1, a2]
    queue.update(j1, state="running", counted=1)
    [(j3, folded3)] = queue.dispatch(a3, [job], "1")
    assert not folded3 and j3 != j1, "a running job takes no more alerts: the next one queues behind it"


def test_runnable_takes_one_job_per_free_host(queue: Queue) -> None:
    aid = queue.accept([alert()], "r").new[0]
    queue.dispatch(aid, [NewJob("a", "web01", "remediate", "/p", "apply"), NewJob("b", "web01", "remediate", "/p", "apply"),
                         NewJob("a", "web02", "remediate", "/p", "apply")], "3")
    assert [(j.rule, j.host) for j in queue.runnable(1e12, set(), 10)] == [("a", "web01"), ("a", "web02")]
    assert [(j.rule, j.host) for j in queue.runnable(1e12, {"web01"}, 10)] == [("a", "web02")]
    assert len(queue.runnable(1e12, set(), 1)) == 1


def test_recover_requeues_running_jobs_to_resume_their_run(queue: Queue) -> None:
    aid = queue.accept([alert()], "r").new[0]
    [(jid, _)] = queue.dispatch(aid, [NewJob("a", "web01", "remediate", "/p", "apply")], "1")
    queue.update(jid, state="running", counted=1, run_id="RUN1", started_at=1.0)
    [job] = queue.recover()
    assert job.id == jid
    again = queue.job(jid)
    assert again is not None and again.state == "queued" and again.resume_run_id == "RUN1" and again.counted


def test_decide_approves_only_pending_plans(queue: Queue) -> None:
    aid = queue.accept([alert()], "r").new[0]
    [(jid, _)] = queue.dispatch(aid, [NewJob("a", "web01", "remediate", "/p", "plan")], "1")
    assert queue.decide(jid, True, "me", None) is None, "not planned yet"
    queue.update(jid, state="awaiting_approval")
    job = queue.decide(jid, True, "me", "looks right")
    assert job is not None and job.state == "queued" and job.phase == "apply" and job.decided_by == "me"
    assert queue.decide(jid, False, "me", None) is None, "decided once"


def test_one_server_per_queue(tmp_path: Path) -> None:
    lock = ServerLock(tmp_path / "serve.db")
    lock.acquire()
    with pytest.raises(QueueError, match="another `runbook serve`"):
        ServerLock(tmp_path / "serve.db").acquire()
    lock.release()
    ServerLock(tmp_path / "serve.db").acquire()


def test_an_unusable_database_path_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(QueueError, match="cannot open the queue database"):
        Queue(tmp_path / "file" / "serve.db")


# --- safety -----------------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def _rule(tmp_path: Path, extra: str = "") -> tuple[Queue, Safety, Clock, object]:
    make_site(tmp_path)
    (tmp_path / "rules.yml").write_text("rules:\n  - name: disk\n    playbook: fix.yml\n    cooldown: 60s\n"
                                        "    breaker: {max_runs: 2, per: 1h, escalate: escalate.yml}\n" + extra)
    [rule] = load_rules(tmp_path / "rules.yml").rules
    q = Queue(tmp_path / "serve.db")
    clock = Clock()
    return q, Safety(q, clock), clock, rule


def _job(q: Queue, fp: str, kind: str = "remediate"):
    aid = q.accept([alert(fp=fp)], "r").new[0]
    [(jid, _)] = q.dispatch(aid, [NewJob("disk", "web01", kind, "/p", "apply")], "1")
    job = q.job(jid)
    assert job is not None
    return job


def _ran(q: Queue, job, start: float, end: float) -> None:
    q.update(job.id, state="succeeded", counted=1, started_at=start, finished_at=end)


def test_cooldown_suppresses_until_it_has_passed_since_the_last_run_ended(tmp_path: Path) -> None:
    q, safety, clock, rule = _rule(tmp_path)
    first = _job(q, "1")
    assert safety.decide(first, rule, None).action == "run"
    _ran(q, first, clock.t, clock.t + 5)
    clock.t += 30
    d = safety.decide(_job(q, "2"), rule, None)
    assert d.action == "suppress" and d.code == "cooldown" and "cooldown 60s" in d.reason
    clock.t += 40
    assert safety.decide(_job(q, "3"), rule, None).action == "run"


def test_cooldown_is_kept_per_kind_so_the_resolved_playbook_still_runs(tmp_path: Path) -> None:
    q, safety, clock, rule = _rule(tmp_path)
    _ran(q, _job(q, "1"), clock.t, clock.t)
    assert safety.decide(_job(q, "2", kind="resolved"), rule, None).action == "run"


def test_breaker_opens_at_its_limit_escalates_once_and_closes_after_its_period(tmp_path: Path) -> None:
    q, safety, clock, rule = _rule(tmp_path)
    for i in range(2):
        job = _job(q, f"run{i}")
        assert safety.decide(job, rule, None).action == "run"
        _ran(q, job, clock.t, clock.t + 1)
        clock.t += 120   # past the cooldown
    third = safety.decide(_job(q, "third"), rule, None)
    assert third.action == "suppress" and third.code == "breaker" and third.breaker_opened
    fourth = safety.decide(_job(q, "fourth"), rule, None)
    assert fourth.action == "suppress" and fourth.code == "breaker" and not fourth.breaker_opened, "escalate once"
    assert q.breakers.all_open() == [("disk", "web01")]
    clock.t += 3600
    later = safety.decide(_job(q, "later"), rule, None)
    assert later.action == "run" and later.breaker_closed and q.breakers.all_open() == []


def test_escalations_and_started_jobs_skip_cooldown_and_breaker(tmp_path: Path) -> None:
    q, safety, clock, rule = _rule(tmp_path)
    _ran(q, _job(q, "1"), clock.t, clock.t)
    assert safety.decide(_job(q, "e", kind="escalate"), rule, None).action == "run"
    resumed = _job(q, "2")
    q.update(resumed.id, counted=1)
    resumed = q.job(resumed.id)
    assert resumed is not None and safety.decide(resumed, rule, None).action == "run"


def test_outside_the_window_defer_or_suppress(tmp_path: Path) -> None:
    q, safety, clock, rule = _rule(tmp_path)
    closed = WindowState(False, clock.t + 3600, "`w`")
    d = safety.decide(_job(q, "1"), rule, closed)
    assert d.action == "defer" and d.not_before == clock.t + 3600
    q2, safety2, _, rule2 = _rule(tmp_path / "b", "    outside_window: suppress\n")
    d2 = safety2.decide(_job(q2, "1"), rule2, closed)
    assert d2.action == "suppress" and d2.code == "window"
    assert safety.decide(_job(q, "2"), rule, WindowState(True)).action == "run"
