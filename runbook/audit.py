"""The audit trail: redaction, a private structlog pipeline, a hash-chained JSON Lines file, verify.

Record format (one JSON object per line, canonical JSON: sorted keys, `(",", ":")` separators,
UTF-8 without ASCII escaping):

- `event` (e.g. `task.finished`), `run_id`, `seq` (1, 2, 3 ... within one run id),
  `timestamp` (UTC, ISO 8601 with `Z`), the event's own fields;
- `prev`: the `hash` of the previous record in the file (`"0" * 64` for the first record);
- `hash`: sha256 hex of the record's canonical JSON *without* its `hash` key. So `prev` is
  the sha256 of the previous record's canonical JSON (minus its own `hash`), and every run
  appended to one file extends one chain.

What the chain proves, and what it does not:

- An edited field, a record removed from the middle, two records swapped, a record inserted and
  a line cut short in the middle of the file all break the chain at the first affected line.
- Records removed from the *end* leave a valid (shorter) chain. Mitigation: every run ends with
  `run.finished` (carrying `records`, the run's record count), so a cut tail shows up as an
  *incomplete* run in `verify`; a run still in progress looks the same. For stronger
  guarantees, copy `VerifyReport.head` (the last hash) somewhere the operator cannot edit.
- There is no secret key: someone who rewrites the whole file from a point onward, recomputing
  every hash, is not detected. The chain is tamper-evident against edits, not a signature.

Crash safety: each record is one `write()` under an exclusive `flock`. A crash mid-write can
leave a partial last line (a *torn tail*). `verify` reports it as its own kind (`torn`). The next
writer ends the partial line with a newline and first appends an `audit.recovered` record whose
`torn_sha256` names the partial line's bytes and whose `prev` skips it, so the chain stays valid;
`verify` then lists the sealed line in `notes` instead of failing.
"""

from __future__ import annotations

import dataclasses
import fcntl
import fnmatch
import getpass
import hashlib
import json
import os
import re
import subprocess
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, UTC
from enum import Enum
from pathlib import Path
from typing import Any

import structlog

from runbook.errors import Location, RunbookError
from runbook.events import Observer, RunInfo, TaskRef
from runbook.results import RunResult, TaskResult

GENESIS = "0" * 64
AUDIT_ENV = "RUNBOOK_AUDIT_LOG"
OPERATOR_ENV = "RUNBOOK_OPERATOR"
RECOVERED_EVENT = "audit.recovered"

# Keys the chain itself owns; redaction must not touch them and events must not use them.
_CHAIN_KEYS = ("prev", "hash")
_STRUCTURAL_KEYS = frozenset({"event", "run_id", "seq", "timestamp"})


class AuditError(RunbookError):
    """The audit trail cannot be written or read."""


# --------------------------------------------------------------------------------------------
# Redaction
# --------------------------------------------------------------------------------------------

_SECRET_NAME = re.compile(r"password|passwd|passphrase|token|secret|credential|api[-_]?key", re.IGNORECASE)
_SECRET_SUFFIX = re.compile(r"[-_](?:key|pass)$", re.IGNORECASE)

# A number under a secret-named key is masked only from this many characters on (as written in
# decimal, sign and point included): a shorter one has too few values for masking to hide it from
# anyone who can guess, and masking it would blank exit codes, ports, counts and durations in every
# output. A short numeric secret written as a string (`pin_secret: "4711"`) is always masked.
MIN_SECRET_NUMBER_LEN = 6
# A line of a multi-line secret (a PEM key) is masked on its own from this length on, so output
# that shows only part of the secret does not show those lines in clear either.
MIN_SECRET_LINE_LEN = 8
# Texts under a secret-like name that are settings, not secrets: `password_authentication: "no"`
# must not mask every "no" of a run. Shorter than 3 characters, or a yes/no word: not masked
# (a secret that short protects nothing anyway). Values declared under `secrets:` are always masked.
MIN_SECRET_TEXT_LEN = 3
SETTING_WORDS = frozenset({"yes", "no", "on", "off", "true", "false", "none", "null", "enabled", "disabled"})


def is_secret_name(name: str) -> bool:
    """True when a variable name looks like it holds a secret (`*password*`, `*token*`, `*_key`, `*_pass`...)."""
    return bool(_SECRET_NAME.search(name) or _SECRET_SUFFIX.search(name))


def secret_var_names(vars: Mapping[str, Any]) -> set[str]:
    """Names of variables, at any nesting depth, that look secret."""
    found: set[str] = set()
    for name, value in vars.items():
        if is_secret_name(str(name)):
            found.add(str(name))
        if isinstance(value, Mapping):
            found |= secret_var_names(value)
    return found


def _secret_forms(value: Any) -> Iterator[str]:
    """The texts to mask for one scalar found under a secret name (bools and None are not secrets)."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        text = str(value)
        if len(text) >= MIN_SECRET_NUMBER_LEN:
            yield text
        return
    text = value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)
    if not text.strip():
        return                                # masking blanks would mask every space in every output
    if len(text.strip()) < MIN_SECRET_TEXT_LEN or text.strip().lower() in SETTING_WORDS:
        return
    yield text
    # Commands and files often trim a value or show it line by line.
    if text.strip() != text:
        yield text.strip()
    if "\n" in text:
        yield from (line.strip() for line in text.splitlines() if len(line.strip()) >= MIN_SECRET_LINE_LEN)


def secret_values_in(values: Mapping[Any, Any]) -> Iterator[str]:
    """Every text to mask in a mapping of variables, at any depth.

    Under a secret-named key (`api_tokens: [...]`, `svc_secret: {user: .., pw: ..}`) every scalar
    is a secret, at any depth; elsewhere mappings and lists are searched for secret-named keys
    (`svc: {token: x}`, `users: [{password: x}]`). Keys themselves are never secrets. Iterative,
    and each container is visited once, so deep or self-referencing data cannot exhaust the stack.
    """
    stack: list[tuple[Any, bool]] = [(values, False)]
    seen: set[int] = set()
    while stack:
        value, secret = stack.pop()
        if isinstance(value, (Mapping, list, tuple, set, frozenset)):
            if id(value) in seen:
                continue
            seen.add(id(value))
            if isinstance(value, Mapping):
                stack.extend((v, secret or is_secret_name(str(k))) for k, v in value.items())
            else:
                stack.extend((v, secret) for v in value)
        elif secret:
            yield from _secret_forms(value)


class Redactor:
    """Replaces every occurrence of known secret values with a mask.

    Any non-empty value is a secret once added; a very short secret (say `"1"`) is masked
    everywhere it occurs, which makes output hard to read, so keep secrets long. Encoded forms
    of a secret (base64, URL-encoding, a hash) are not recognised. Reading (`redact*`) is
    thread-safe; `add` swaps in a new compiled pattern atomically.
    """

    def __init__(self, secret_values: Iterable[str] = (), mask: str = "***"):
        self.mask = mask
        self._lock = threading.Lock()
        self._secrets: frozenset[str] = frozenset()
        self._pattern: re.Pattern[str] | None = None
        self.add_all(secret_values)

    @classmethod
    def from_vars(cls, vars: Mapping[str, Any], declared_secrets: Mapping[str, str] | None = None,
                  mask: str = "***") -> Redactor:
        """A redactor for the values of secret-looking variables plus the declared `secrets:`."""
        redactor = cls(mask=mask)
        redactor.add_secrets_in(vars)
        redactor.add_all(str(v) for v in (declared_secrets or {}).values() if v is not None)
        return redactor

    @property
    def secrets(self) -> frozenset[str]:
        """The secret values known so far."""
        return self._secrets

    def add(self, value: str) -> None:
        """Register one more secret value (empty values are ignored)."""
        self.add_all((value,))

    def add_all(self, values: Iterable[str]) -> None:
        """Register several secret values at once (one pattern rebuild; empty values are ignored)."""
        new = {str(v) for v in values} - {""}
        with self._lock:
            if new <= self._secrets:
                return
            secrets = self._secrets | new
            # Longest first: alternation takes the first alternative that matches, so a secret
            # that contains another is masked whole, leaving no tail of it behind.
            ordered = sorted(secrets, key=lambda s: (-len(s), s))
            pattern = re.compile("|".join(re.escape(s) for s in ordered))
            self._secrets, self._pattern = secrets, pattern

    def add_secrets_in(self, values: Mapping[Any, Any]) -> None:
        """Register every secret inside a mapping of variables, at any depth (see `secret_values_in`)."""
        self.add_all(secret_values_in(values))

    def redact_text(self, s: str) -> str:
        """Return `s` with every secret replaced by the mask."""
        pattern = self._pattern  # one read: a concurrent add() cannot give us a half-built state
        if pattern is None or not s:
            return s
        return pattern.sub(self.mask, s)

    def redact(self, obj: Any) -> Any:
        """Return a redacted copy of str / list / tuple / set (as list) / dict / dataclass or pydantic model (as dict); other values as is."""
        if isinstance(obj, Enum):
            obj = obj.value
        if isinstance(obj, str):
            return self.redact_text(str(obj))
        if isinstance(obj, Mapping):
            return {self.redact(k) if isinstance(k, str) else k: self.redact(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.redact(v) for v in obj]
        if isinstance(obj, tuple):
            return tuple(self.redact(v) for v in obj)
        if isinstance(obj, (set, frozenset)):
            return [self.redact(v) for v in sorted(obj, key=str)]
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return self.redact(dataclasses.asdict(obj))
        if not isinstance(obj, type) and callable(getattr(obj, "model_dump", None)):
            return self.redact(obj.model_dump())      # a pydantic model
        if isinstance(obj, (int, float)) and not isinstance(obj, bool) and self._pattern is not None:
            # A numeric secret (a PIN in a var) must not survive as a JSON number.
            text = str(obj)
            redacted = self.redact_text(text)
            return obj if redacted == text else redacted
        return obj


# --------------------------------------------------------------------------------------------
# Canonical JSON and hashing
# --------------------------------------------------------------------------------------------

def canonical_json(record: Mapping[str, Any]) -> str:
    """The one serialisation that is hashed and written: sorted keys, compact, UTF-8."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def record_hash(record: Mapping[str, Any]) -> str:
    """sha256 hex of a record's canonical JSON without its own `hash` key."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def _json_safe(value: Any) -> Any:
    """Turn values into plain JSON types (enums, paths, datetimes, dataclasses, sets)."""
    if isinstance(value, Enum):
        return _json_safe(value.value)
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_json_safe(v) for v in value), key=str)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _json_safe(dataclasses.asdict(value))
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


# --------------------------------------------------------------------------------------------
# The processor chain (structlog): each step adds or transforms one thing in the event dict
# --------------------------------------------------------------------------------------------

add_timestamp = structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp")


class SequenceNumbers:
    """Adds `seq`: 1, 2, 3 ... per run id (one AuditTrail writes one run id's records)."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def __call__(self, _logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        run_id = str(event_dict.get("run_id"))
        self._last[run_id] = self._last.get(run_id, 0) + 1
        event_dict["seq"] = self._last[run_id]
        return event_dict

    def current(self, run_id: str) -> int:
        """The last sequence number handed out for a run (0 before the first)."""
        return self._last.get(run_id, 0)


def make_json_safe(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Converts every value to a plain JSON type so that hashing and rendering agree."""
    return {str(k): _json_safe(v) for k, v in event_dict.items()}


class Redact:
    """Masks secret values anywhere in the event (keys and values, nested)."""

    def __init__(self, redactor: Redactor):
        self.redactor = redactor

    def __call__(self, _logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        # Keys the trail generates itself stay as they are: a short numeric secret must not mask
        # a sequence number or a timestamp and so break the trail's own structure.
        return {k: v if k in _STRUCTURAL_KEYS else self.redactor.redact(v) for k, v in event_dict.items()}


class HashChain:
    """Adds `prev` (the previous record's hash) and `hash`; the writer sets `prev` under the file lock."""

    def __init__(self) -> None:
        self.prev = GENESIS

    def __call__(self, _logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        for key in _CHAIN_KEYS:
            event_dict.pop(key, None)
        event_dict["prev"] = self.prev
        event_dict["hash"] = record_hash(event_dict)
        self.prev = event_dict["hash"]
        return event_dict


def render_line(_logger: Any, _method: str, event_dict: dict[str, Any]) -> str:
    """Renders the record as its canonical JSON (the string the sink writes as one line)."""
    return canonical_json(event_dict)


class _LockedFileSink:
    """The wrapped 'logger': writes each rendered line to the fd the trail holds locked."""

    def __init__(self) -> None:
        self.fd: int | None = None

    def msg(self, line: str) -> None:
        """Write one line in as few syscalls as the kernel allows."""
        assert self.fd is not None, "the audit sink is written only under the trail's lock"
        data = (line + "\n").encode("utf-8")
        while data:
            written = os.write(self.fd, data)
            data = data[written:]


# --------------------------------------------------------------------------------------------
# Reading the tail of the file under the lock
# --------------------------------------------------------------------------------------------

@dataclass
class _Tail:
    prev: str                 # hash to chain the next record to
    needs_newline: bool       # the file does not end with "\n"
    torn: bytes | None        # an unterminated partial record to seal, if any


def _hash_of_line(line: bytes) -> str:
    """The hash a next record chains to: the record's own hash, or a hash of whatever is there."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return hashlib.sha256(line).hexdigest()
    if isinstance(record, dict):
        stored = record.get("hash")
        return stored if isinstance(stored, str) else record_hash(record)
    return hashlib.sha256(line).hexdigest()


def _is_valid_record(line: bytes) -> bool:
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False
    return isinstance(record, dict) and record.get("hash") == record_hash(record)


def _read_tail(fd: int) -> _Tail:
    """Find the last complete record (and a torn partial line after it) by reading backwards."""
    size = os.fstat(fd).st_size
    if size == 0:
        return _Tail(GENESIS, False, None)
    chunk = 65536
    pos, buf = size, b""
    # Three newlines guarantee we hold the last complete line whole, torn tail or not.
    while pos > 0 and buf.count(b"\n") < 3:
        step = min(chunk, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
    lines = buf.split(b"\n")
    if pos > 0:
        lines = lines[1:]                      # the first piece may be cut; we never need it
    fragment = lines.pop()                     # after the last "\n": b"" when the file ends with one
    if fragment and _is_valid_record(fragment):
        # The crash came after the record but before its newline: the record is whole.
        return _Tail(_hash_of_line(fragment), True, None)
    complete = [ln for ln in lines if ln]
    prev = _hash_of_line(complete[-1]) if complete else GENESIS
    if fragment:
        return _Tail(prev, True, fragment)
    return _Tail(prev, False, None)


# --------------------------------------------------------------------------------------------
# The observer
# --------------------------------------------------------------------------------------------

def default_audit_path(playbook_path: str | None) -> Path:
    """`$RUNBOOK_AUDIT_LOG`, else `<playbook dir>/.runbook/audit.jsonl`, else `./.runbook/audit.jsonl`."""
    env = os.environ.get(AUDIT_ENV)
    if env:
        return Path(env).expanduser()
    base = Path(playbook_path).expanduser().resolve().parent if playbook_path else Path.cwd()
    return base / ".runbook" / "audit.jsonl"


def _truncated(prefix: str, text: str, limit: int) -> dict[str, Any]:
    """Output fields: the (already redacted) text cut to `limit`, plus its full length and sha256."""
    return {
        prefix: text[:limit],
        f"{prefix}_len": len(text),
        f"{prefix}_sha256": hashlib.sha256(text.encode("utf-8", "replace")).hexdigest(),
        f"{prefix}_truncated": len(text) > limit,
    }


class AuditTrail(Observer):
    """An observer that appends every lifecycle event to a hash-chained JSON Lines file.

    Safe across threads and processes: each record is written under an exclusive `flock`, after
    re-reading the file's last record to chain to, so concurrent runs interleave into one chain.
    One AuditTrail writes the records of one run id at a time (a resumed run gets a new run id).
    Write failures raise `AuditError`: a run that cannot be audited should not go on silently.
    """

    critical = True   # a run that cannot be audited must not go on silently
    what = "the audit trail"

    def __init__(self, path: str | Path, redactor: Redactor | None = None, *, output_limit: int = 4096):
        self.path = Path(path)
        self.redactor = redactor or Redactor()
        self.output_limit = max(0, int(output_limit))
        self._lock = threading.Lock()
        self._fd: int | None = None                  # kept open from run.started to run.finished
        # (inode, size, hash) after our last write: when the file is still exactly that, the tail
        # need not be read again (another writer would have changed its size).
        self._known_end: tuple[int, int, str] | None = None
        self._sink = _LockedFileSink()
        self._seq = SequenceNumbers()
        self._chain = HashChain()
        # A private pipeline: wrap_logger with every setting given explicitly never reads or
        # changes structlog's global configuration, so an embedding application keeps its own.
        processors: list[Any] = [add_timestamp, self._seq, make_json_safe, Redact(self.redactor), self._chain, render_line]
        self._logger = structlog.wrap_logger(
            self._sink,
            processors=processors,
            wrapper_class=structlog.BoundLogger,
            context_class=dict,
            cache_logger_on_first_use=False,
        )

    # -- writing ------------------------------------------------------------------------------

    def _open(self) -> int:
        created = not self.path.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot open the audit trail: {exc.strerror}", location=Location(str(self.path)),
                             hint=f"check the directory's permissions, or choose another file with "
                                  f"--audit-log or {AUDIT_ENV}") from exc
        if created:
            # Make the new directory entry durable too, so a crash cannot lose the whole file.
            try:
                dfd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except OSError:
                pass
        return fd

    def append(self, run_id: str, event: str, fields: Mapping[str, Any], *, sync: bool = False) -> None:
        """Append one record (event name, run id, fields) to the file, chained and redacted."""
        for key in ("event", "run_id", "seq", "timestamp", *_CHAIN_KEYS):
            if key in fields:
                raise ValueError(f"audit field {key!r} is reserved")
        with self._lock:
            fd = self._fd if self._fd is not None else self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                st = os.fstat(fd)
                known = self._known_end
                if known is not None and known[:2] == (st.st_ino, st.st_size):
                    tail = _Tail(known[2], False, None)
                else:
                    tail = _read_tail(fd)
                self._sink.fd = fd
                if tail.needs_newline:
                    os.write(fd, b"\n")
                self._chain.prev = tail.prev
                log = self._logger.bind(run_id=run_id)
                if tail.torn is not None:
                    log.msg(RECOVERED_EVENT, torn_len=len(tail.torn),
                            torn_sha256=hashlib.sha256(tail.torn).hexdigest(),
                            note="the previous line is a partial record left by an interrupted write")
                log.msg(event, **fields)
                if sync or tail.torn is not None:
                    os.fsync(fd)
                self._known_end = (st.st_ino, os.fstat(fd).st_size, self._chain.prev)
            except OSError as exc:
                self._known_end = None
                raise AuditError(f"cannot write the audit trail: {exc.strerror}",
                                 location=Location(str(self.path)),
                                 hint="check free space and permissions of the audit file") from exc
            finally:
                self._sink.fd = None
                if fd == self._fd:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                else:
                    os.close(fd)   # closing releases the flock

    def _keep_open(self, keep: bool) -> None:
        """Hold the file open for a whole run (fewer syscalls per record); release it at the end."""
        with self._lock:
            if keep and self._fd is None:
                self._fd = self._open()
            elif not keep and self._fd is not None:
                os.close(self._fd)
                self._fd = None
                self._known_end = None

    # -- the Observer hooks -------------------------------------------------------------------

    def run_started(self, run: RunInfo) -> None:
        """Record who runs what, where: every field of RunInfo."""
        fields = dataclasses.asdict(run)
        fields.pop("run_id")
        fields["extra_vars"] = self.redactor.redact(fields.get("extra_vars") or {})
        fields["pid"] = os.getpid()
        self._keep_open(True)
        self.append(run.run_id, "run.started", fields, sync=True)

    def task_started(self, run: RunInfo, task: TaskRef) -> None:
        """Record a task starting on a host."""
        self.append(run.run_id, "task.started", {
            # A loop item's id holds its label (made redacted; again here, as for every text kept).
            "host": task.host, "step_id": self.redactor.redact(task.step_id) if "[" in task.step_id else task.step_id,
            "step_name": task.step_name,
            "action": task.action, "attempt": task.attempt,
            "command": self.redactor.redact(task.command),
        })

    def task_finished(self, run: RunInfo, result: TaskResult) -> None:
        """Record a task's outcome; outputs are redacted *before* truncating and hashing."""
        r = self.redactor
        fields: dict[str, Any] = {
            "host": result.host, "step_id": result.step_id, "action": result.action,
            "command": r.redact(result.command), "rc": result.rc, "status": str(result.status),
            "changed": result.changed, "ignored": result.ignored,
            "duration": round(result.duration, 3), "attempts": result.attempts,
            "message": r.redact(result.message),
            "started_at": result.started_at, "finished_at": result.finished_at,
        }
        # Redact first: truncating first could cut a secret in half and leave its prefix in clear,
        # and hashing clear text would be an oracle for guessing the secret.
        fields |= _truncated("stdout", r.redact_text(result.stdout or ""), self.output_limit)
        fields |= _truncated("stderr", r.redact_text(result.stderr or ""), self.output_limit)
        if result.diff:
            fields |= _truncated("diff", r.redact_text(result.diff), self.output_limit)
        if result.data:
            fields["data"] = r.redact(result.data)
        if result.parent is not None:   # a loop item: `step_id` is `step[label]`
            fields |= {"step_id": r.redact(result.step_id), "parent": result.parent, "item_label": r.redact(result.item_label),
                       "item_index": result.item_index}
        if result.items is not None:    # a looped step's own result
            fields["items"] = result.items
        if result.rescued:              # carried by a resume: its block's rescue handled it in the earlier run
            fields["rescued"] = True
        if result.delegated_to:         # delegate_to: where it ran for `host`
            fields["delegated_to"] = result.delegated_to
        self.append(run.run_id, "task.finished", fields)

    def host_unreachable(self, run: RunInfo, host: str, reason: str) -> None:
        """Record a host that could not be reached."""
        self.append(run.run_id, "host.unreachable", {"host": host, "reason": self.redactor.redact(reason)})

    def approval(self, run: RunInfo, host: str, step_id: str, granted: bool, who: str) -> None:
        """Record an approval decision and who made it."""
        event = "approval.granted" if granted else "approval.denied"
        self.append(run.run_id, event, {"host": host, "step_id": step_id, "who": who})

    def block_rescued(self, run: RunInfo, host: str, block: str, step_ids: list[str]) -> None:
        """Record that a block's rescue handled these failed steps of a host: they count as rescued, not failed."""
        self.append(run.run_id, "block.rescued", {"host": host, "block": block, "steps": step_ids})

    def notice(self, run: RunInfo, level: str, message: str) -> None:
        """Record a notice (e.g. a warning the operator saw)."""
        self.append(run.run_id, "notice", {"level": level, "message": self.redactor.redact(message)})

    def run_interrupted(self, run: RunInfo, reason: str) -> None:
        """Record an interrupt, durably."""
        self.append(run.run_id, "run.interrupted", {"reason": self.redactor.redact(reason)}, sync=True)

    def run_finished(self, run: RunInfo, result: RunResult) -> None:
        """Record the run's totals, durably; `records` counts this run's records including this one."""
        self.append(run.run_id, "run.finished", {
            "totals": dict(result.totals()),
            "wall_time": round(result.wall_time, 3),
            "exit_code": result.exit_code(),
            "interrupted": result.interrupted,
            "stop_reason": self.redactor.redact(result.stop_reason),
            "unreachable": self.redactor.redact(result.unreachable),
            "records": self._seq.current(run.run_id) + 1,
        }, sync=True)
        self._keep_open(False)


# --------------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------------

@dataclass
class VerifyReport:
    """The outcome of checking a trail: the first problem (1-based line) or ok.

    `kind` says what the problem is: `tampered` (chain or hash broken: edited, removed,
    reordered, inserted, cut short mid-file), `torn` (a partial last line: an interrupted write,
    or the file cut off there), `sequence` (seq numbers of a run not consecutive), `missing`.
    `notes` lists things that are not failures (sealed torn lines); `incomplete_runs` the run
    ids with `run.started` but no `run.finished` (crashed, in progress, or the file's end removed).
    """

    ok: bool
    records: int
    problem: str | None = None
    line: int | None = None
    kind: str | None = None
    path: str = ""
    notes: list[str] = field(default_factory=list)
    incomplete_runs: list[str] = field(default_factory=list)
    head: str | None = None

    @property
    def location(self) -> Location:
        """Where the problem is (file, and line when known)."""
        return Location(self.path, self.line)

    def render(self) -> str:
        """A short human report."""
        if self.ok:
            text = f"{self.path}: ok: {self.records} records, chain intact (head {self.head or GENESIS})"
        else:
            text = f"{self.location}: {self.kind}: {self.problem}"
        lines = [text] + [f"  note: {n}" for n in self.notes]
        if self.incomplete_runs:
            lines.append(f"  incomplete runs (no run.finished): {', '.join(self.incomplete_runs)}")
        return "\n".join(lines)


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("hash"), str) or "prev" not in record:
        return None
    return record


def verify(path: str | Path) -> VerifyReport:
    """Check every line of a trail: JSON, own hash, chain to the previous record, per-run sequence."""
    path = Path(path)
    report = VerifyReport(ok=True, records=0, path=str(path))

    def fail(kind: str, line: int, problem: str) -> VerifyReport:
        report.ok, report.kind, report.line, report.problem = False, kind, line, problem
        return report

    try:
        fh = path.open("rb")
    except FileNotFoundError:
        report.ok, report.kind, report.problem = False, "missing", "no audit trail at this path"
        return report
    except OSError as exc:
        raise AuditError(f"cannot read the audit trail: {exc.strerror}", location=Location(str(path)),
                         hint="check the file's permissions") from exc

    expected_prev, prev_line = GENESIS, 0
    seqs: dict[str, int] = {}
    open_runs: dict[str, None] = {}          # insertion-ordered set
    pending_torn: tuple[int, bytes] | None = None   # an unparseable line awaiting its seal
    with fh:
        # A snapshot: writers append whole lines under LOCK_EX, so the size seen under LOCK_SH ends
        # on a record boundary; a run writing meanwhile is not mistaken for a torn tail.
        fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
        size = os.fstat(fh.fileno()).st_size
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        consumed = 0
        for number, raw in enumerate(fh, start=1):
            if consumed >= size:
                break
            raw = raw[: size - consumed]
            consumed += len(raw)
            terminated = raw.endswith(b"\n")
            body = raw[:-1] if terminated else raw
            record = _parse(body)
            if pending_torn is not None:
                torn_no, torn_raw = pending_torn
                sealed = (record is not None and record.get("event") == RECOVERED_EVENT
                          and record.get("torn_sha256") == hashlib.sha256(torn_raw).hexdigest())
                if not sealed:
                    return fail("tampered", torn_no, "not a valid audit record (edited, inserted, or cut short)")
                report.notes.append(f"line {torn_no}: partial record from an interrupted write, "
                                    f"sealed by line {number}")
                pending_torn = None
            if record is None:
                if not terminated:
                    return fail("torn", number, "the last line is a partial record: a write was interrupted "
                                                "(crash), or the file was cut off here; the next run seals it")
                pending_torn = (number, body)
                continue
            if record["hash"] != record_hash(record):
                return fail("tampered", number, "record was modified: its hash does not match its content")
            if record["prev"] != expected_prev:
                where = f"line {prev_line}" if prev_line else "the start of the file"
                return fail("tampered", number, f"chain broken: `prev` does not match the record at {where}; "
                                                "a record was removed, inserted or reordered here")
            run_id = str(record.get("run_id"))
            seq = record.get("seq")
            want = seqs.get(run_id, 0) + 1
            if seq != want:
                return fail("sequence", number, f"run {run_id}: sequence number {seq}, expected {want}")
            seqs[run_id] = want
            if record.get("event") == "run.started":
                open_runs[run_id] = None
            elif record.get("event") == "run.finished":
                open_runs.pop(run_id, None)
                if record.get("records", want) != want:
                    return fail("sequence", number, f"run {run_id}: run.finished counts {record.get('records')} "
                                                    f"records, the trail holds {want}")
            expected_prev, prev_line = record["hash"], number
            report.records += 1
    if pending_torn is not None:
        # An unparseable final line that does end in "\n": nobody sealed it, so it was not a crash.
        return fail("tampered", pending_torn[0], "not a valid audit record (edited, inserted, or cut short)")
    report.head = expected_prev if report.records else None
    report.incomplete_runs = list(open_runs)
    return report


# --------------------------------------------------------------------------------------------
# Reading and showing history
# --------------------------------------------------------------------------------------------

def _record_time(record: Mapping[str, Any]) -> datetime | None:
    try:
        return datetime.fromisoformat(str(record["timestamp"]))
    except (KeyError, ValueError):
        return None


def read_records(path: str | Path, *, run: str | None = None, host: str | None = None,
                 since: datetime | None = None, event: str | None = None) -> list[dict]:
    """Records of a trail, filtered: run id (or its prefix), host, time (naive = local), event (glob).

    A host filter keeps the records about that host and the `run.started` records that list it.
    Lines that are not valid records are skipped: `verify` is the place to report them.
    """
    path = Path(path)
    if since is not None and since.tzinfo is None:
        since = since.astimezone()
    out: list[dict] = []
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return out
    except OSError as exc:
        raise AuditError(f"cannot read the audit trail: {exc.strerror}", location=Location(str(path)),
                         hint="check the file's permissions") from exc
    with fh:
        for raw in fh:
            record = _parse(raw.rstrip(b"\n"))
            if record is None:
                continue
            if run is not None and not str(record.get("run_id", "")).startswith(run):
                continue
            if host is not None and record.get("host") != host and host not in (record.get("hosts") or []):
                continue
            if event is not None and not fnmatch.fnmatchcase(str(record.get("event", "")), event):
                continue
            if since is not None:
                when = _record_time(record)
                if when is None or when < since:
                    continue
            out.append(record)
    return out


def _status_of(record: Mapping[str, Any]) -> str:
    name = record.get("event")
    if name == "task.finished":
        return str(record.get("status", ""))
    if name == "run.finished":
        totals = record.get("totals") or {}
        summary = " ".join(f"{k}={v}" for k, v in sorted(totals.items()))
        return f"exit {record.get('exit_code')}" + (f" ({summary})" if summary else "")
    if name == "run.started":
        return str(record.get("mode", ""))
    if name in ("approval.granted", "approval.denied"):
        return f"by {record.get('who', '?')}"
    if name in ("host.unreachable", "run.interrupted"):
        return str(record.get("reason", ""))
    if name == "notice":
        return f"{record.get('level', '')}: {record.get('message', '')}"
    return ""


def format_table(records: list[dict]) -> str:
    """A readable history: time, run, operator, host, event, step, status (one row per record)."""
    operators = {r.get("run_id"): r.get("operator") for r in records if r.get("event") == "run.started"}
    header = ("TIME (UTC)", "RUN", "OPERATOR", "HOST", "EVENT", "STEP", "STATUS")
    rows: list[tuple[str, ...]] = [header]
    for r in records:
        when = _record_time(r)
        stamp = when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if when else "-"
        host = r.get("host")
        if host is None and r.get("event") == "run.started":
            hosts = r.get("hosts") or []
            host = ",".join(hosts[:3]) + (f",+{len(hosts) - 3}" if len(hosts) > 3 else "")
        status = _status_of(r).replace("\n", " ")
        # The whole run id: it is what `resume` and `--run` take, so it must survive a copy and paste.
        rows.append((stamp, str(r.get("run_id", "-")), str(operators.get(r.get("run_id")) or "-"),
                     str(host or "-"), str(r.get("event", "-")), str(r.get("step_id") or "-"),
                     status[:60]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


# --------------------------------------------------------------------------------------------
# Who and which version
# --------------------------------------------------------------------------------------------

def git_commit_of(path: str | Path) -> str | None:
    """The HEAD commit of the git repository containing a file, or None (no repo, no git)."""
    p = Path(path).expanduser()
    where = p if p.is_dir() else p.parent
    try:
        proc = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=3, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = proc.stdout.strip()
    return commit if proc.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def operator_name(explicit: str | None) -> str:
    """Who runs this: the explicit name, else $RUNBOOK_OPERATOR, else the OS user."""
    if explicit and explicit.strip():
        return explicit.strip()
    env = os.environ.get(OPERATOR_ENV, "").strip()
    if env:
        return env
    try:
        return getpass.getuser()
    except (OSError, KeyError, ImportError):
        # A container uid without a passwd entry: still say who, by number.
        return f"uid:{os.getuid()}"
