"""The `--cluster` address (`local:N`, `tcp://HOST:PORT`, `tls://HOST:PORT`) and zone names, validated."""

from __future__ import annotations

import re
from dataclasses import dataclass

from runbook.errors import ValidationError

CLUSTER_ENV = "RUNBOOK_CLUSTER"
ZONE_VAR = "runbook_zone"            # inventory variable: the zone a host's tasks must run in
ZONE_RESOURCE = "zone:"              # a worker of zone NAME has the Dask resource `zone:NAME=1`
MAX_LOCAL_WORKERS = 64
ZONE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_REMOTE = re.compile(r"(tcp|tls)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]{0,252}):([0-9]{1,5})")
_LOCAL = re.compile(r"local:([0-9]{1,3})")


@dataclass(frozen=True)
class ClusterSpec:
    """Where tasks run: N local worker processes, or the workers of a running scheduler."""

    local_workers: int | None = None
    address: str | None = None

    def __str__(self) -> str:
        return f"local:{self.local_workers}" if self.local_workers is not None else str(self.address)

    @property
    def tls(self) -> bool:
        """Whether the scheduler is reached over TLS."""
        return bool(self.address and self.address.startswith("tls://"))


def parse_cluster(text: str) -> ClusterSpec:
    """Read a `--cluster` value; anything else is invalid input with the accepted forms as the hint."""
    value = text.strip()
    hint = "use local:N (N local worker processes), tcp://HOST:8786 or tls://HOST:8786 (a running `dask scheduler`)"
    local = _LOCAL.fullmatch(value)
    if local:
        n = int(local.group(1))
        if not 1 <= n <= MAX_LOCAL_WORKERS:
            raise ValidationError(f"--cluster {value}: between 1 and {MAX_LOCAL_WORKERS} local workers", hint=hint)
        return ClusterSpec(local_workers=n)
    remote = _REMOTE.fullmatch(value)
    if remote and 1 <= int(remote.group(3)) <= 65535:
        return ClusterSpec(address=value)
    shown = value if len(value) <= 80 and value.isprintable() else repr(value[:80]) + "…"
    raise ValidationError(f"--cluster {shown}: not a cluster address", hint=hint)


def check_zone(name: object, where: str, what: str = "zone") -> str:
    """A zone (or worker) name: letters, digits, `_.-`, at most 63; it lands on a Dask command line, so nothing else passes."""
    if isinstance(name, str) and ZONE.fullmatch(name):
        return name
    shown = repr(name)[:80]
    raise ValidationError(f"{where}: invalid {what} {shown}",
                          hint=f"a {what} is 1-63 letters, digits, `_`, `.` or `-`, starting with a letter or digit")


def zone_of_resources(resources: dict[str, float] | None) -> str | None:
    """The zone a worker serves, from its Dask resources (`zone:NAME`), or None."""
    for name, amount in (resources or {}).items():
        if name.startswith(ZONE_RESOURCE) and amount and ZONE.fullmatch(name[len(ZONE_RESOURCE):]):
            return name[len(ZONE_RESOURCE):]
    return None
