"""Payloads that cross the HTTP boundary (Alertmanager webhook v4, generic hooks, approvals) and the alert they become."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

# Bounds: a payload is data from the network, so every collection and string has a ceiling.
MAX_ALERTS = 1000
MAX_LABELS = 64
MAX_VALUE = 4096
MAX_KEY = 128

# Prometheus label names; annotations follow the same rule.
LabelName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=MAX_KEY)]
LabelValue = Annotated[str, StringConstraints(max_length=MAX_VALUE)]
Labels = Annotated[dict[LabelName, LabelValue], Field(max_length=MAX_LABELS)]
# Alertmanager fingerprints are 16 hex digits; generic hooks may send any short id of safe characters.
Fingerprint = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]
Status = Literal["firing", "resolved"]


class AMAlert(BaseModel):
    """One alert of an Alertmanager notification."""

    model_config = ConfigDict(extra="ignore")   # newer Alertmanagers may add fields: ignored, not refused

    status: Status
    labels: Labels
    annotations: Labels = Field(default_factory=dict)
    startsAt: datetime
    endsAt: datetime | None = None
    generatorURL: Annotated[str, StringConstraints(max_length=MAX_VALUE)] = ""
    fingerprint: Fingerprint


class AMPayload(BaseModel):
    """Alertmanager's webhook payload, version 4."""

    model_config = ConfigDict(extra="ignore")

    version: Literal["4"]
    groupKey: Annotated[str, StringConstraints(max_length=MAX_VALUE)] = ""
    truncatedAlerts: int = Field(0, ge=0)
    status: Status
    receiver: Annotated[str, StringConstraints(max_length=MAX_KEY * 4)] = ""
    groupLabels: Labels = Field(default_factory=dict)
    commonLabels: Labels = Field(default_factory=dict)
    commonAnnotations: Labels = Field(default_factory=dict)
    externalURL: Annotated[str, StringConstraints(max_length=MAX_VALUE)] = ""
    alerts: Annotated[list[AMAlert], Field(max_length=MAX_ALERTS)]


class HookEvent(BaseModel):
    """A generic hook's JSON object: optional well-known keys, anything else kept as `alert.payload`."""

    model_config = ConfigDict(extra="allow")

    status: Status = "firing"
    id: Fingerprint | None = None
    labels: Labels = Field(default_factory=dict)
    annotations: Labels = Field(default_factory=dict)
    startsAt: datetime | None = None


class ApprovalDecision(BaseModel):
    """The body of `POST /approvals/ID`."""

    model_config = ConfigDict(extra="forbid")

    decision: Literal["approve", "reject"]
    by: Annotated[str, StringConstraints(pattern=r"^[\w.@+-]{1,64}$")] | None = None
    reason: Annotated[str, StringConstraints(max_length=1000)] | None = None


def _iso(dt: datetime | None) -> str:
    """A normalised UTC timestamp, so two Alertmanagers of an HA pair give the same text for the same instant."""
    if dt is None:
        return ""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def canonical_json(value: Any) -> str:
    """Compact, key-sorted JSON: the same data always gives the same text (and hash)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class Alert:
    """One alert as the server handles it, whatever endpoint it came in by."""

    source: str                  # "alertmanager" or "hook:NAME"
    status: str                  # firing | resolved
    fingerprint: str
    starts_at: str               # normalised ISO timestamp, "" when the source has none
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    ends_at: str = ""
    generator_url: str = ""
    group_key: str = ""
    payload: dict[str, Any] = field(default_factory=dict)   # a generic hook's other keys

    @property
    def dedupe_key(self) -> str:
        """The identity of one delivery-independent alert: the same alert resent gives the same key."""
        return hashlib.sha256(canonical_json([self.source, self.fingerprint, self.starts_at, self.status]).encode()).hexdigest()

    @property
    def name(self) -> str:
        """The alert's name (label `alertname`), or the hook's name."""
        return self.labels.get("alertname") or self.source

    def context(self) -> dict[str, Any]:
        """What rule templates see as `alert`: plain data, never template source."""
        return {"status": self.status, "labels": dict(self.labels), "annotations": dict(self.annotations),
                "startsAt": self.starts_at, "endsAt": self.ends_at, "fingerprint": self.fingerprint,
                "generatorURL": self.generator_url, "source": self.source, "name": self.name,
                "payload": dict(self.payload)}

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready mapping for the queue."""
        return {"source": self.source, "status": self.status, "fingerprint": self.fingerprint,
                "starts_at": self.starts_at, "labels": self.labels, "annotations": self.annotations,
                "ends_at": self.ends_at, "generator_url": self.generator_url, "group_key": self.group_key,
                "payload": self.payload}

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Alert:
        """The inverse of `to_record`."""
        return cls(**data)


def alerts_from_alertmanager(payload: AMPayload) -> list[Alert]:
    """The alerts of one Alertmanager notification."""
    return [Alert("alertmanager", a.status, a.fingerprint, _iso(a.startsAt), dict(a.labels), dict(a.annotations),
                  _iso(a.endsAt), a.generatorURL, payload.groupKey) for a in payload.alerts]


def alert_from_hook(name: str, event: HookEvent, body: dict[str, Any]) -> Alert:
    """A generic hook's event as an alert; without `id`, its fingerprint is a hash of its labels or of the body."""
    extra = {k: v for k, v in body.items() if k not in HookEvent.model_fields}
    scalars = [(k, str(v)) for k, v in extra.items()
               if isinstance(v, (str, int, float, bool)) and len(str(v)) <= MAX_VALUE and k.isidentifier() and k.isascii()]
    labels = dict(event.labels) or dict(scalars[:MAX_LABELS])
    starts = _iso(event.startsAt)
    if event.id:
        fingerprint = event.id
    else:
        # No id and no start time: the body is the identity, so a redelivered body is the same event.
        basis = labels if starts else body
        fingerprint = hashlib.sha256(canonical_json(basis).encode()).hexdigest()[:16]
    return Alert(f"hook:{name}", event.status, fingerprint, starts, labels, dict(event.annotations), payload=extra)
