"""Saved plan files: building, signing and reading them, and the checks `apply` makes before it runs one.

A plan file travels: it is made on one machine, reviewed, and applied later, maybe elsewhere. So it is
untrusted input when read. It keeps the reviewed playbook text (apply runs that text, never a newer
file), the checksums of the files upload/template steps send, and a salted or keyed hash of the -e
values. Its own sha256 catches accidents; only a signature (HMAC-SHA256 under a plan key) stops
someone who can write the file, so with a key configured unsigned plans are refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import ValidationError as PydanticError

from runbook import __version__
from runbook.actions import ACTIONS
from runbook.documents import PLAN_FORMAT, PLAN_VERSION, PlanSignature, check_plan
from runbook.errors import Location, PlanFileError, PlaybookError, ValidationError
from runbook.state import absolute_sources, write_atomic

if TYPE_CHECKING:
    from runbook.model import Playbook


# --- saved plans ---------------------------------------------------------------------------------

KEY_ENV = "RUNBOOK_PLAN_KEY"
MIN_KEY_BYTES = 16
MAX_KEY_BYTES = 4096
# Domain separation: the plan key signs plans and keys the -e hash; neither value can stand for the other.
_SIGN_CONTEXT = b"runbook plan signature v2\0"
_VARS_CONTEXT = b"runbook plan extra vars v2\0"
_KEY_ID_CONTEXT = b"runbook plan key id\0"
# scrypt (16 MiB, ~40 ms) only when a -e value is secret and no key is configured: guessing a token
# from a stolen plan then costs that much per guess instead of a microsecond.
_SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1, "dklen": 32}
HOST_KEY_LEVELS = {"off": 0, "accept-new": 1, "strict": 2}


def canonical(obj: object) -> str:
    """Canonical JSON (sorted keys, no spaces) for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_text(text: str) -> str:
    """sha256 hex of a text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class PlanKey:
    """A plan key and where it came from; its bytes never appear in a message, a repr or a file."""

    secret: bytes = field(repr=False)
    origin: str

    @property
    def key_id(self) -> str:
        """A short public name of the key, so an error can say "signed with another key"."""
        return hashlib.sha256(_KEY_ID_CONTEXT + self.secret).hexdigest()[:16]


KeyArg = PlanKey | None | Literal["env"]


def _key_from(raw: bytes, origin: str, loc: Location | None) -> PlanKey:
    secret = raw.strip()
    if len(secret) < MIN_KEY_BYTES:
        raise ValidationError(f"plan key from {origin} is too short ({len(secret)} bytes, at least {MIN_KEY_BYTES})",
                              location=loc, hint="make one with: openssl rand -hex 32 > plan.key; chmod 600 plan.key")
    return PlanKey(secret, origin)


def _read_key_file(path: str) -> PlanKey:
    loc = Location(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ValidationError(f"cannot read plan key file {path}: {exc.strerror}", location=loc) from None
    if not stat.S_ISREG(st.st_mode):
        raise ValidationError(f"plan key file {path} is not a regular file", location=loc)
    if st.st_mode & 0o077:
        # Whoever can read the key can sign plans; whoever can write it can swap it for theirs.
        raise ValidationError(f"plan key file {path} is accessible by other users (mode {stat.S_IMODE(st.st_mode):04o})",
                              location=loc, hint=f"chmod 600 {path}")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_KEY_BYTES + 1)
    except OSError as exc:
        raise ValidationError(f"cannot read plan key file {path}: {exc.strerror}", location=loc) from None
    if len(raw) > MAX_KEY_BYTES:
        raise ValidationError(f"plan key file {path} is larger than {MAX_KEY_BYTES} bytes", location=loc,
                              hint="a key is a short random string: openssl rand -hex 32")
    return _key_from(raw, path, loc)


def plan_key(path: str | None = None, environ: Mapping[str, str] | None = None) -> PlanKey | None:
    """The configured plan key: the key file given, else $RUNBOOK_PLAN_KEY (the key itself), else None."""
    if path:
        return _read_key_file(path)
    value = (os.environ if environ is None else environ).get(KEY_ENV)
    if value is None:
        return None
    if len(value) > MAX_KEY_BYTES:
        raise ValidationError(f"{KEY_ENV} is longer than {MAX_KEY_BYTES} bytes", hint="a key is a short random string")
    return _key_from(value.encode("utf-8"), f"${KEY_ENV}", None)


def _resolve_key(key: KeyArg) -> PlanKey | None:
    return plan_key() if key == "env" else key


def signature_of(doc: Mapping[str, object], key: PlanKey) -> str:
    """HMAC-SHA256 under the key of the canonical document without its signature."""
    body = {k: v for k, v in doc.items() if k != "signature"}
    return hmac.new(key.secret, _SIGN_CONTEXT + canonical(body).encode("utf-8"), hashlib.sha256).hexdigest()


def sign_plan(doc: dict, key: PlanKey) -> dict:
    """Add (or replace) the plan's signature; the document is complete, its hash included."""
    doc.pop("signature", None)
    doc["signature"] = {"alg": "hmac-sha256", "key_id": key.key_id, "value": signature_of(doc, key)}
    return doc


def check_signature(doc: dict, key: PlanKey | None, path: str, *, allow_unverified: bool = False) -> None:
    """Refuse an unsigned or badly signed plan when a key is configured (and a signed one when none is)."""
    loc = Location(path)
    raw = doc.get("signature")
    if key is None:
        if raw is not None and not allow_unverified:
            raise PlanFileError("plan is signed, but no plan key is configured to check the signature", location=loc,
                                hint=f"give the key with --sign-key FILE or ${KEY_ENV}")
        return
    if raw is None:
        raise PlanFileError(f"plan is not signed, and a plan key is configured ({key.origin})", location=loc,
                            hint=f"only plans signed with this key are accepted: plan again with --sign-key (or ${KEY_ENV})")
    try:
        sig = PlanSignature.model_validate(raw)
    except PydanticError:
        raise PlanFileError("malformed plan signature", location=loc, hint="plan again with the key") from None
    if sig.key_id != key.key_id:
        raise PlanFileError(f"plan was signed with another key (key id {sig.key_id}; the configured key is {key.key_id})",
                            location=loc, hint="plan again with this key, or configure the key the plan was signed with")
    if not hmac.compare_digest(sig.value, signature_of(doc, key)):
        raise PlanFileError("plan signature does not match: the plan was changed after it was signed", location=loc,
                            hint="a reviewed plan must not be edited; plan again")


def extra_vars_digest(extra_vars: Mapping[str, object], salt: str, scheme: str, key: PlanKey | None) -> str:
    """The plan's hash of the -e values: keyed by the plan key, or salted (scrypt when a value is secret)."""
    data = canonical(dict(extra_vars)).encode("utf-8")
    salt_bytes = bytes.fromhex(salt)
    if scheme == "keyed":
        if key is None:
            raise ValidationError("the plan's extra vars hash is keyed, and no plan key is configured",
                                  hint=f"give the key with --sign-key FILE or ${KEY_ENV}")
        return hmac.new(key.secret, _VARS_CONTEXT + salt_bytes + data, hashlib.sha256).hexdigest()
    if scheme == "scrypt":
        return hashlib.scrypt(_VARS_CONTEXT + data, salt=salt_bytes, **_SCRYPT).hex()
    return hmac.new(salt_bytes, _VARS_CONTEXT + data, hashlib.sha256).hexdigest()


def extra_vars_fields(extra_vars: Mapping[str, object], redactor, key: PlanKey | None) -> dict[str, str]:
    """The plan fields that let apply tell the -e values are the same without keeping secret ones in clear."""
    salt = secrets.token_hex(16)
    has_secret = redactor.redact(dict(extra_vars)) != dict(extra_vars)
    scheme = "keyed" if key is not None else "scrypt" if has_secret else "salted"
    return {"extra_vars_salt": salt, "extra_vars_scheme": scheme,
            "extra_vars_hash": extra_vars_digest(extra_vars, salt, scheme, key)}


def build_plan(prepared, request, result, *, key: KeyArg = "env") -> dict:
    """The plan document of a dry run: identity, inputs, the playbook text and every prediction (secrets redacted)."""
    key = _resolve_key(key)
    red = prepared.redactor
    order = {sid: i for i, sid in enumerate(prepared.steps.order())}
    gates = {name: cls.asks_operator for name, cls in ACTIONS.all().items()}   # once, not per prediction
    preds = []
    position = {h: i for i, h in enumerate(prepared.info.hosts)}   # not list.index: O(tasks x hosts) at scale
    for r in sorted((r for r in result.results if not r.on_failure),
                    key=lambda r: (position.get(r.host, 0), order.get(r.parent or r.step_id, 0),
                                   -1 if r.item_index is None else r.item_index)):   # a loop's step, then its items
        kind = str(r.prediction) if r.prediction else {"not_run": "not_run", "unreachable": "unknown", "failed": "fail"}.get(
            r.status.value, r.status.value)
        # Free text is redacted; the structure (names, the prediction) is not text a secret could be in.
        preds.append({
            "host": r.host, "step_id": r.step_id, "action": r.action, "prediction": kind,
            "reason": red.redact(r.message), "diff": red.redact(r.diff), "state": red.redact(r.state),
            "command": red.redact(r.command),
            "gate": gates.get(r.action, False), "read_only": r.read_only,
            **_loop_fields(r, red),
            **({"delegated_to": r.delegated_to} if r.delegated_to else {}),   # delegate_to: where it would run
        })
    doc = {
        "format": PLAN_FORMAT, "version": PLAN_VERSION, "runbook_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "created_ts": time.time(),
        "operator": prepared.info.operator, "control_host": prepared.info.control_host, "run_id": prepared.info.run_id,
        "playbook": {"path": prepared.playbook_path, "name": prepared.playbook.runbook, "hash": prepared.info.playbook_hash,
                     "text": _kept_text(prepared.playbook, red), "files": _kept_files(prepared.playbook, red)},
        "inventory": {"source": absolute_sources(prepared.info.inventory_source), "hash": prepared.info.inventory_hash},
        "limit": request.limit, "tags": sorted(request.tags), "skip_tags": sorted(request.skip_tags),
        "extra_vars": red.redact(dict(request.extra_vars)), **extra_vars_fields(request.extra_vars, red, key),
        "host_key_checking": prepared.info.host_key_checking,
        "hosts": list(prepared.info.hosts), "unreachable": red.redact(dict(result.unreachable)),
        "predictions": preds,
        "local_files": local_files(prepared.playbook),
    }
    doc["hash"] = sha256_text(canonical(doc))
    if key is not None:
        sign_plan(doc, key)
    check_plan(doc, "<new plan>")   # what we write must be what we accept when reading it back
    return doc


def _loop_fields(r, red) -> dict:
    """A loop's fields of a prediction: an item names its step, label and position; the step counts its items."""
    if r.parent is not None:
        # Labels are redacted when made; again here, as everything a plan file shows.
        return {"step_id": red.redact(r.step_id), "parent": r.parent, "item_label": red.redact(r.item_label),
                "item_index": r.item_index}
    return {"items": r.items} if r.items is not None else {}


def _kept_text(playbook: Playbook, redactor) -> str | None:
    """The playbook text the plan keeps for apply; None when it holds a secret value (a plan never does)."""
    source = playbook._source
    if source is None or not source.text or redactor.redact_text(source.text) != source.text:
        return None   # apply then runs the file on disk, after checking it against the plan's sha256
    return str(source.text)


def _kept_files(playbook: Playbook, redactor) -> dict[str, str | None]:
    """The text of every file the playbook brought in (includes, roles, vars_files), kept like the playbook's."""
    return {path: None if redactor.redact_text(text) != text else text for path, text in sorted(playbook._files.items())}


def _kept_reader(doc: dict, plan_file: str):
    """A file reader for compose that serves the texts the plan kept (each checked against its sha256)."""
    from runbook.compose import KeptFiles

    kept = doc["playbook"].get("files") or {}
    digests = doc.get("local_files") or {}
    if not isinstance(kept, dict) or not all(isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in kept.items()):
        raise PlanFileError("malformed plan file: `playbook.files` must map paths to texts", location=Location(plan_file),
                            hint="make a new plan with `runbook plan ... --out FILE`")
    for path, text in kept.items():
        if text is not None and digests.get(path) != sha256_text(text):
            raise PlanFileError(f"the text of {path} kept in the plan does not match its sha256", location=Location(plan_file),
                                hint="the plan was edited after it was made; plan again")

    return KeptFiles(kept)


def write_plan(doc: dict, path: str) -> None:
    """Save a plan file (0600: it describes the fleet)."""
    write_atomic(Path(path), json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    os.chmod(path, 0o600)


def load_plan(path: str, *, max_age: float = 24 * 3600, now: float | None = None, key: KeyArg = "env",
              allow_unverified: bool = False) -> dict:
    """Read a plan file and refuse it when corrupt, foreign, badly signed, edited or too old.

    `key`: the plan key ("env": $RUNBOOK_PLAN_KEY if set). `allow_unverified`: read a signed plan
    without a key (for display only; apply needs the key).
    """
    key = _resolve_key(key)
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
        older = isinstance(doc.get("version"), int) and doc["version"] < PLAN_VERSION
        raise PlanFileError(f"plan made by runbook {doc.get('runbook_version')} (plan format {doc.get('version')}); "
                            f"this is runbook {__version__} (plan format {PLAN_VERSION})", location=loc,
                            hint="plan again with this version" + (
                                " (older plan formats do not keep the reviewed playbook, so they cannot be applied safely)"
                                if older else ""))
    check_signature(doc, key, path, allow_unverified=allow_unverified)
    body = {k: v for k, v in doc.items() if k not in ("hash", "signature")}
    if not isinstance(doc.get("hash"), str) or not hmac.compare_digest(doc["hash"].encode(), sha256_text(canonical(body)).encode()):
        raise PlanFileError("plan file was modified after it was made (hash mismatch)", location=loc,
                            hint="a reviewed plan must not be edited; plan again")
    check_plan(doc, path)
    _check_kept_text(doc, path)
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
    from runbook.compose import step_sources

    out: dict[str, str] = {}
    paths = [path for _, _, path in step_sources(playbook)]   # templated paths are per host: their content is in the diff
    # The files the playbook is made of besides itself (includes, roles, vars_files): what apply runs.
    paths.extend(Path(p) for p in playbook._files)
    for path in paths:
        try:
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            out[str(path)] = "unreadable"
    return out


def _check_kept_text(doc: dict, plan_file: str) -> None:
    """The kept playbook text is the one the plan's sha256 (and so `show` and the drift check) stands for."""
    pb = doc["playbook"]
    if pb["text"] is not None and not hmac.compare_digest(sha256_text(pb["text"]).encode(), str(pb["hash"]).encode()):
        raise PlanFileError("the playbook text kept in the plan does not match the plan's playbook sha256",
                            location=Location(plan_file), hint="the plan was edited after it was made; plan again")


def reviewed_playbook(doc: dict, plan_file: str) -> Playbook:
    """The playbook apply runs: the text the plan keeps, parsed with its original path (relative files resolve there)."""
    from runbook.checks import check_playbook_templates
    from runbook.loader import load_playbook, parse_playbook

    pb = doc["playbook"]
    if pb["text"] is None:
        return load_playbook(pb["path"])   # it held a secret: drift_between checks the file's sha256
    _check_kept_text(doc, plan_file)
    playbook = parse_playbook(pb["text"], pb["path"], reader=_kept_reader(doc, plan_file))
    errors = [p for p in check_playbook_templates(playbook) if p.severity == "error"]
    if errors:
        raise PlaybookError(errors)
    return playbook


def host_key_level(planned: str | None, flag: str | None, plan_file: str | None = None) -> str:
    """The host-key policy of an apply: the stricter of the flag and the plan; a plan alone cannot lower it."""
    plan_level = planned or "strict"
    for value in (plan_level, flag):
        if value is not None and value not in HOST_KEY_LEVELS:
            raise ValidationError(f"unknown host_key_checking {value!r}", hint="one of: strict, accept-new, off")
    if flag is None:
        if plan_level != "strict":
            raise ValidationError(
                f"the plan sets host_key_checking: {plan_level} (below the default, strict); "
                "a plan file cannot lower a safety setting on its own",
                location=Location(plan_file) if plan_file else None,
                hint=f"if that is intended, say so on the command line: --host-key-checking {plan_level}")
        return plan_level
    return max(flag, plan_level, key=HOST_KEY_LEVELS.__getitem__)


def _playbook_file_drift(doc: dict) -> str | None:
    """The playbook file on disk differs from the reviewed text: apply would not run the edit, so it says so."""
    path = Path(doc["playbook"]["path"])
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None   # applied elsewhere: the reviewed text is in the plan
    except (OSError, UnicodeDecodeError):
        return f"playbook {path} is unreadable"
    return None if sha256_text(text) == doc["playbook"]["hash"] else f"playbook {path} changed since the plan"


def drift_between(doc: dict, prepared, extra_vars: dict, *, key: KeyArg = "env") -> list[str]:
    """What differs between a plan and the inputs of the apply run: playbook, files sent, inventory, vars, hosts."""
    key = _resolve_key(key)
    out = []
    # Files uploaded or rendered by the playbook are inputs too: otherwise apply would send content
    # nobody reviewed.
    now = local_files(prepared.playbook)
    for path, digest in sorted((doc.get("local_files") or {}).items()):
        if now.get(path) != digest:
            out.append(f"file {path} changed since the plan")
    if doc["playbook"]["hash"] != prepared.info.playbook_hash:
        out.append(f"playbook {doc['playbook']['path']} changed since the plan")
    elif (disk := _playbook_file_drift(doc)) is not None:
        out.append(disk)
    if doc["inventory"]["hash"] != prepared.info.inventory_hash:
        out.append(f"inventory {doc['inventory']['source']} changed since the plan")
    given = extra_vars_digest(extra_vars, doc["extra_vars_salt"], doc["extra_vars_scheme"], key)
    if not hmac.compare_digest(given.encode(), str(doc["extra_vars_hash"]).encode()):
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
    from runbook.engine import SavedPrediction

    return {(p["step_id"], p["host"]): SavedPrediction(p["prediction"], p.get("reason") or "", p.get("state"))
            for p in doc["predictions"]}
