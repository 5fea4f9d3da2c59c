"""Which worker runs each host's tasks: the same one for the whole run, in the host's zone, spread evenly."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from runbook.cluster.address import ZONE_VAR, check_zone
from runbook.errors import Problem, ValidationError


@dataclass(frozen=True)
class WorkerInfo:
    """A worker as the scheduler lists it: its address, name and zone (None: it serves any host)."""

    address: str
    name: str
    zone: str | None = None


def host_zone(name: str, variables: dict[str, object]) -> str | None:
    """The zone a host's inventory asks for (`runbook_zone`), validated, or None."""
    if ZONE_VAR not in variables or variables[ZONE_VAR] in (None, ""):
        return None
    return check_zone(variables[ZONE_VAR], f"host {name}: inventory variable {ZONE_VAR}")


class Router:
    """Assigns hosts to workers: zone hosts to their zone's workers, others to workers of no zone (else any).

    The least loaded eligible worker gets the next host, so hosts spread evenly; a host keeps its
    worker for the run (its connection lives there) until that worker is lost.
    """

    def __init__(self, workers: Sequence[WorkerInfo], hosts: Sequence[tuple[str, str | None]]):
        self.workers = {w.address: w for w in workers}
        self.zones = dict(hosts)
        self.of: dict[str, str] = {}
        self.load = dict.fromkeys(self.workers, 0)
        self.lost: set[str] = set()
        self._lock = threading.Lock()
        self._check()
        for host, zone in hosts:
            target = self._pick(zone)
            assert target is not None   # _check made sure
            self._place(host, target)

    def _check(self) -> None:
        """Before anything runs: every zone a host names needs a worker, and some worker must exist."""
        if not self.workers:
            raise ValidationError("the cluster has no worker", hint="start workers: runbook worker tcp://SCHEDULER:8786")
        missing: dict[str, list[str]] = {}
        for host, zone in self.zones.items():
            if zone is not None and not self._eligible(zone):
                missing.setdefault(zone, []).append(host)
        if missing:
            known = sorted({w.zone for w in self.workers.values() if w.zone}) or ["none"]
            raise ValidationError([Problem(
                f"zone `{zone}` has no worker, but {len(hosts)} host(s) must run there: "
                + ", ".join(hosts[:5]) + (f" and {len(hosts) - 5} more" if len(hosts) > 5 else ""), None,
                f"start one near them: runbook worker tcp://SCHEDULER:8786 --zone {zone} (zones with workers: "
                f"{', '.join(known)})") for zone, hosts in sorted(missing.items())])

    def _eligible(self, zone: str | None) -> list[str]:
        alive = [w for a, w in self.workers.items() if a not in self.lost]
        if zone is not None:
            return [w.address for w in alive if w.zone == zone]
        unzoned = [w.address for w in alive if w.zone is None]
        return unzoned or [w.address for w in alive]

    def _pick(self, zone: str | None) -> str | None:
        eligible = self._eligible(zone)
        return min(eligible, key=lambda a: (self.load[a], a)) if eligible else None

    def _place(self, host: str, address: str) -> None:
        self.of[host] = address
        self.load[address] += 1

    def eligible(self) -> list[str]:
        """Every worker some host of the run may run on (it needs the run's session)."""
        return sorted({a for zone in set(self.zones.values()) for a in self._eligible(zone)})

    def worker_of(self, host: str) -> str | None:
        """The worker that runs `host`'s tasks now (None: its zone has no worker left)."""
        with self._lock:
            return self.of.get(host)

    def worker_lost(self, address: str) -> dict[str, str | None]:
        """Move every host of a lost worker to another worker of its zone; returns host -> new worker (or None)."""
        with self._lock:
            if address in self.lost or address not in self.workers:
                return {}
            self.lost.add(address)
            moved: dict[str, str | None] = {}
            for host in sorted(h for h, a in self.of.items() if a == address):
                del self.of[host]
                target = self._pick(self.zones.get(host))
                if target is not None:
                    self._place(host, target)
                moved[host] = target
            return moved
