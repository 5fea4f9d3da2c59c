"""Dry run support: the read-only connection, saved plan files, and drift checks for `apply`."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from runbook import __version__
from runbook.errors import Location, PlanFileError, ReadOnlyViolation
from runbook.state import absolute_sources, write_atomic
from runbook.template import resolve_local

if TYPE_CHECKING:
    from runbook.connections import CommandResult, Connection, FileStat


# --- saved plans ---------------------------------------------------------------------------------

PLAN_FORMAT = "runbook-plan"
PLAN_VERSION = 1


def canonical(obj: object) -> str:
    """Canonical JSON (sorted keys, no spaces) for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_text(text: str) -> str:
    """sha256 hex of a text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def vars_hash(extra_vars: dict) -> str:
    """Hash of the extra vars, so apply can tell that they are the same without storing secrets in clear."""
    return sha256_text(canonical(extra_vars))


def build_plan(prepared, request, result) -> dict:
    """The plan document of a dry run: identity, inputs' hashes, and every prediction (secrets redacted)."""
    red = prepared.redactor
    order = {sid: i for i, sid in enumerate(prepared.steps.order())}
    preds = []
    for r in sorted((r for r in result.results if not r.data.get("on_failure")),
                    key=lambda r: (prepared.info.hosts.index(r.host) if r.host in prepared.info.hosts else 0,
                                   order.get(r.step_id, 0))):
        kind = r.data.get("prediction") or {"not_run": "not_run", "unreachable": "unknown", "failed": "fail"}.get(
            r.status.value, r.status.value)
        preds.append(red.redact({
            "host": r.host, "step_id": r.step_id, "action": r.action, "prediction": kind, "reason": r.message,
            "diff": r.diff, "state": r.data.get("state"), "command": r.command, "gate": bool(r.data.get("gate")),
            "read_only": bool(r.data.get("read_only")),
        }))
    doc = {
        "format": PLAN_FORMAT, "version": PLAN_VERSION, "runbook_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "created_ts": time.time(),
        "operator": prepared.info.operator, "control_host": prepared.info.control_host, "run_id": prepared.info.run_id,
        "playbook": {"path": prepared.playbook_path, "name": prepared.playbook.runbook, "hash": prepared.info.playbook_hash},
        "inventory": {"source": absolute_sources(prepared.info.inventory_source), "hash": prepared.info.inventory_hash},
        "limit": request.limit, "tags": sorted(request.tags), "skip_tags": sorted(request.skip_tags),
        "extra_vars": red.redact(dict(request.extra_vars)), "extra_vars_hash": vars_hash(dict(request.extra_vars)),
        "host_key_checking": prepared.info.host_key_checking,
        "hosts": list(prepared.info.hosts), "unreachable": red.redact(dict(result.unreachable)),
        "predictions": preds,
        "local_files": local_files(prepared.playbook),
    }
    doc["hash"] = sha256_text(canonical(doc))
    return doc


def write_plan(doc: dict, path: str) -> None:
    """Save a plan file (0600: it describes the fleet)."""
    write_atomic(Path(path), json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    os.chmod(path, 0o600)


def load_plan(path: str, *, max_age: float = 24 * 3600, now: float | None = None) -> dict:
    """Read a plan file and refuse it when corrupt, foreign, edited or too old."""
    loc = Location(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanFileError(f"plan file not found: {path}", location=loc, hint="make one with `runbook plan PLAYBOOK --out FILE`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanFileError(f"cannot read plan file: {exc}", location=loc) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanFileError(f"corrupt plan file: {exc.msg}", location=Location(path, exc.lineno, exc.colno),
                            hint="make a new plan with `runbook plan ... --out FILE`") from None
    if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
        raise PlanFileError("not a runbook plan file", location=loc, hint="make one with `runbook plan ... --out FILE`")
    if doc.get("version") != PLAN_VERSION or doc.get("runbook_version") != __version__:
        raise PlanFileError(f"plan made by runbook {doc.get('runbook_version')} (plan format {doc.get('version')}); "
                            f"this is runbook {__version__} (plan format {PLAN_VERSION})", location=loc,
                            hint="plan again with this version")
    body = {k: v for k, v in doc.items() if k != "hash"}
    if doc.get("hash") != sha256_text(canonical(body)):
        raise PlanFileError("plan file was modified after it was made (hash mismatch)", location=loc,
                            hint="a reviewed plan must not be edited; plan again")
    age = (now if now is not None else time.time()) - float(doc.get("created_ts", 0))
    if age > max_age:
        raise PlanFileError(f"plan is {age / 3600:.1f} h old (limit {max_age / 3600:g} h)", location=loc,
                            hint="plan again, or raise the limit with --max-age")
    return doc


def plan_hash(doc: dict) -> str:
    """The hash that ties an apply run to the reviewed plan."""
    return str(doc["hash"])


def local_files(playbook) -> dict[str, str]:
    """sha256 of each control-machine file an upload/template step sends (its content is reviewed as a diff)."""
    out: dict[str, str] = {}
    for step in playbook.all_steps():
        src = getattr(step.action_spec, "src", None) if step.action in ("upload", "template") else None
        if not isinstance(src, str) or "{" in src:
            continue  # a templated path is only known per host; its content shows in the diff
        path = resolve_local(playbook, src)
        try:
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            out[str(path)] = "unreadable"
    return out


def drift_between(doc: dict, prepared, extra_vars: dict) -> list[str]:
    """What differs between a plan and the inputs of the apply run: playbook, inventory, vars, hosts."""
    out = []
    # Files uploaded or rendered by the playbook are inputs too: otherwise apply would send content
    # nobody reviewed (plans made before this check have no `local_files`).
    now = local_files(prepared.playbook)
    for path, digest in sorted((doc.get("local_files") or {}).items()):
        if now.get(path) != digest:
            out.append(f"file {path} changed since the plan")
    if doc["playbook"]["hash"] != prepared.info.playbook_hash:
        out.append(f"playbook {doc['playbook']['path']} changed since the plan")
    if doc["inventory"]["hash"] != prepared.info.inventory_hash:
        out.append(f"inventory {doc['inventory']['source']} changed since the plan")
    if doc["extra_vars_hash"] != vars_hash(extra_vars):
        redacted = sorted(k for k, v in (doc.get("extra_vars") or {}).items() if isinstance(v, str) and "***" in v)
        out.append("extra vars (-e) differ from the plan's" + (
            f"; the plan stores {', '.join(redacted)} redacted: pass the same -e values to apply again" if redacted else ""))
    if list(doc["hosts"]) != list(prepared.info.hosts):
        added = sorted(set(prepared.info.hosts) - set(doc["hosts"]))
        removed = sorted(set(doc["hosts"]) - set(prepared.info.hosts))
        out.append("selected hosts differ" + (f"; new: {', '.join(added)}" if added else "")
                   + (f"; gone: {', '.join(removed)}" if removed else ""))
    return out


def saved_predictions(doc: dict) -> dict:
    """The plan's predictions keyed by (step id, host), for the executor."""
    from runbook.executor import SavedPrediction

    return {(p["step_id"], p["host"]): SavedPrediction(p["prediction"], p.get("reason") or "", p.get("state"))
            for p in doc["predictions"]}
