"""`service:` — make a service started/stopped (or restart/reload it) and enabled/disabled at boot.

The backend follows the host's init system, read in the same round trip as the service's state:
systemd when /run/systemd/system exists (`systemctl show`, `systemctl start|stop|...`), otherwise
SysV init (`service NAME status` or /etc/init.d/NAME, boot links through `update-rc.d` on Debian
or `chkconfig` on Red Hat).
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, model_validator

from runbook.actions._system import (SERVICE_NAME, checked, failed, fingerprint, grammar,
                                     read_sections, run_argv, state_diff)
from runbook.actions.base import Action, Outcome, Prediction, PredictionKind, TaskEnv, TemplatedField, string_fields
from runbook.errors import RunbookError
from runbook.fields import Strict

_NAME_HINT = "a unit or init script name: letters, digits and `_ . @ : + -`, not starting with `-`"
ServiceName = Annotated[str, AfterValidator(grammar(SERVICE_NAME, "service name", _NAME_HINT)),
                        Field(description="The unit (systemd) or init script (SysV) name, e.g. `nginx` or `app@1.service`.")]

# One read: which init system, then the unit's state ($1: the name as given, $2: the SysV script name).
READ_SCRIPT = """\
sec init
if [ -d /run/systemd/system ]; then
  echo systemd
  sec show
  systemctl show --property=LoadState,ActiveState,SubState,UnitFileState -- "$1" 2>&1
else
  echo sysv
  sec script
  if [ -f "/etc/init.d/$2" ]; then echo present; else echo missing; fi
  sec tools
  for t in service update-rc.d chkconfig; do command -v "$t" >/dev/null 2>&1 && echo "$t"; done
  sec status
  if [ -f "/etc/init.d/$2" ]; then
    if command -v service >/dev/null 2>&1; then service "$2" status >/dev/null 2>&1; else "/etc/init.d/$2" status >/dev/null 2>&1; fi
    echo $?
  fi
  sec links
  for f in /etc/rc[2345].d/[SK][0-9][0-9]"$2" /etc/rc.d/rc[2345].d/[SK][0-9][0-9]"$2"; do
    if [ -e "$f" ] || [ -L "$f" ]; then echo "${f##*/}"; fi
  done
  sec chkconfig
  if command -v chkconfig >/dev/null 2>&1 && ! command -v update-rc.d >/dev/null 2>&1; then chkconfig --list "$2" 2>/dev/null; fi
fi
sec end
"""

_RUNNING = {"active", "activating", "reloading"}
_ENABLED = {"enabled", "enabled-runtime"}
_FIXED = {"static", "indirect", "generated", "transient", "alias"}   # no [Install] rules runbook may change


@dataclass
class ServiceState:
    """What the host says about one service, and what the backend needs to change it."""

    backend: Literal["systemd", "sysv"]
    exists: bool
    running: bool = False
    enabled: bool | None = None           # None: cannot be enabled or disabled (static units, no tool)
    why_fixed: str = ""                   # why `enabled` is None
    facts: dict[str, str] = field(default_factory=dict)   # the raw facts (for the fingerprint and outputs)
    tools: tuple[str, ...] = ()
    links: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        """The service as facts, one per line (for diffs)."""
        enabled = "unchangeable" if self.enabled is None else ("yes" if self.enabled else "no")
        return [f"running: {'yes' if self.running else 'no'}", f"enabled: {enabled}"]

    def summary(self) -> dict[str, Any]:
        """What the results' `before`/`after` hold."""
        return {"running": self.running, "enabled": self.enabled}


def parse_systemd(show: str) -> ServiceState:
    """The state from `systemctl show --property=LoadState,ActiveState,SubState,UnitFileState` output."""
    facts = dict(line.split("=", 1) for line in show.splitlines() if "=" in line)
    load, active, unit_file = facts.get("LoadState", ""), facts.get("ActiveState", ""), facts.get("UnitFileState", "")
    st = ServiceState("systemd", exists=load not in ("not-found", ""), running=active in _RUNNING, facts=facts)
    if load == "masked" or unit_file.startswith("masked"):
        st.why_fixed = "the unit is masked (`systemctl unmask` it first)"
    elif unit_file in _ENABLED or unit_file in ("disabled",):
        st.enabled = unit_file in _ENABLED
    else:
        st.why_fixed = (f"the unit is {unit_file or 'not installable'}: it has no [Install] section runbook may "
                        "change, so it cannot be enabled or disabled")
    return st


def parse_sysv(sections: dict[str, str], script: str) -> ServiceState:
    """The state of /etc/init.d/SCRIPT from the SysV half of the read script."""
    tools = tuple(sections.get("tools", "").split())
    links = tuple(sections.get("links", "").split())
    status = sections.get("status", "").strip()
    facts = {"script": sections.get("script", ""), "status": status, "links": " ".join(links),
             "chkconfig": sections.get("chkconfig", "")}
    st = ServiceState("sysv", exists=sections.get("script") == "present", tools=tools, links=links, facts=facts)
    # LSB status codes: 0 running; 1-3 dead or not running; 4 and anything else: status unknown.
    if st.exists and status not in ("0", "1", "2", "3"):
        raise RunbookError(f"`service {script} status` gave exit status {status or '?'} (LSB: status unknown)",
                           hint="the init script must implement `status` (exit 0 when running, 3 when stopped)")
    st.running = status == "0"
    if "update-rc.d" in tools:
        st.enabled = any(link.startswith("S") for link in links)
    elif "chkconfig" in tools:
        levels = sections.get("chkconfig", "").split()[1:]
        st.enabled = any(level in levels for level in ("2:on", "3:on", "4:on", "5:on"))
    else:
        st.why_fixed = "the host has neither update-rc.d nor chkconfig to change boot links"
    return st


def sysv_name(name: str) -> str:
    """The init script of a unit name (`app.service` is /etc/init.d/app)."""
    return name.removesuffix(".service")


@dataclass
class ServicePlan:
    """The commands that make the service as wanted, why, and the state expected after them."""

    commands: list[list[str]]
    reasons: list[str]
    after: ServiceState


class ServiceSpec(Strict):
    """Make a service started, stopped, restarted or reloaded, and enabled or disabled at boot."""

    name: ServiceName
    state: Literal["started", "stopped", "restarted", "reloaded"] | None = Field(
        None, description="`restarted` and `reloaded` always change (a stopped service is started).")
    enabled: bool | None = Field(None, description="Start at boot (systemd `enable`, SysV boot links).")

    @model_validator(mode="after")
    def _something(self) -> ServiceSpec:
        if self.state is None and self.enabled is None:
            raise ValueError("service needs `state`, `enabled` or both")
        return self


def control(st: ServiceState, name: str, verb: str) -> list[str]:
    """The command that starts/stops/restarts/reloads the service on its backend."""
    if st.backend == "systemd":
        return ["systemctl", verb, "--", name]
    script = sysv_name(name)
    return ["service", script, verb] if "service" in st.tools else [f"/etc/init.d/{script}", verb]


def boot(st: ServiceState, name: str, enable: bool) -> list[list[str]]:
    """The commands that enable or disable the service at boot on its backend."""
    if st.backend == "systemd":
        return [["systemctl", "enable" if enable else "disable", "--", name]]
    script = sysv_name(name)
    if "update-rc.d" in st.tools:
        # `enable` only flips existing links; with none yet, `defaults` makes them from the LSB header.
        return [["update-rc.d", script, "enable" if st.links else "defaults"]] if enable else [["update-rc.d", script, "disable"]]
    return [["chkconfig", "--add", script], ["chkconfig", script, "on"]] if enable else [["chkconfig", script, "off"]]


def plan_changes(spec: ServiceSpec, name: str, st: ServiceState) -> ServicePlan:
    """The difference between the service as it is and as the spec wants it."""
    after = ServiceState(st.backend, st.exists, st.running, st.enabled, st.why_fixed, dict(st.facts), st.tools, st.links)
    commands: list[list[str]] = []
    reasons: list[str] = []
    verb = {"started": "start", "stopped": "stop", "restarted": "restart", "reloaded": "reload"}.get(spec.state or "")
    if verb in ("restart", "reload"):
        verb = verb if st.running else "start"     # a stopped service is started (there is nothing to reload)
        reasons.append(f"{verb} ({spec.state} always changes)" if st.running else f"start (it is stopped; {spec.state})")
    elif (verb == "start" and st.running) or (verb == "stop" and not st.running):
        verb = None
    elif verb:
        reasons.append(f"{verb} (it is {'running' if st.running else 'stopped'})")
    if verb and verb != "stop" and st.facts.get("LoadState") == "masked":
        raise RunbookError("the unit is masked, so it cannot be started", hint="`systemctl unmask` it first")
    if verb:
        commands.append(control(st, name, verb))
        after.running = verb != "stop"
    if spec.enabled is not None:
        if st.enabled is None:
            raise RunbookError(f"cannot make it {'enabled' if spec.enabled else 'disabled'}: {st.why_fixed}",
                               hint="drop `enabled` from the step, or fix the unit")
        if st.enabled != spec.enabled:
            commands.extend(boot(st, name, spec.enabled))
            reasons.append("enable at boot" if spec.enabled else "disable at boot")
            after.enabled = spec.enabled
    return ServicePlan(commands, reasons, after)


class Service(Action):
    """Make a service started, stopped, restarted or reloaded, and enabled or disabled at boot."""

    name = "service"
    spec_type: ClassVar[Any] = ServiceSpec

    def fields(self) -> Iterator[TemplatedField]:
        return string_fields(self.spec, ("name",))

    def probes_read_only(self) -> bool:
        return True   # plan() runs only READ_SCRIPT: systemctl show, `service X status`, ls of boot links

    def unit(self, env: TaskEnv) -> str:
        """The rendered, checked service name."""
        return checked(env, self.spec.name, SERVICE_NAME, "service name", _NAME_HINT)

    def describe(self, env: TaskEnv) -> str | None:
        wanted = [w for w in (self.spec.state, None if self.spec.enabled is None else
                              ("enabled" if self.spec.enabled else "disabled")) if w]
        return f"service {self.unit(env)}: {', '.join(wanted)}"

    def read(self, env: TaskEnv, name: str) -> ServiceState:
        """The service's state and the host's init system, in one round trip."""
        sections = read_sections(env, READ_SCRIPT, [name, sysv_name(name)], what=f"service {name}")
        try:
            if sections.get("init") == "systemd":
                return parse_systemd(sections.get("show", ""))
            return parse_sysv(sections, sysv_name(name))
        except RunbookError as exc:
            raise RunbookError(f"{env.host}: service {name}: {exc.message}", hint=exc.hint) from None

    def _decide(self, env: TaskEnv) -> tuple[str, ServiceState, ServicePlan | str]:
        """(name, state, plan) — or a reason instead of a plan when the service cannot be made as wanted."""
        name = self.unit(env)
        st = self.read(env, name)
        if not st.exists:
            where = "no such unit" if st.backend == "systemd" else f"/etc/init.d/{sysv_name(name)} does not exist"
            return name, st, f"{where} ({st.backend})"
        try:
            return name, st, plan_changes(self.spec, name, st)
        except RunbookError as exc:
            return name, st, f"{exc.message} ({st.backend})"

    def plan(self, env: TaskEnv) -> Prediction:
        name, st, decided = self._decide(env)
        state = fingerprint({"backend": st.backend, **st.facts})
        data = {"backend": st.backend, "before": st.summary() if st.exists else None}
        if isinstance(decided, str):
            if not st.exists:
                return Prediction(PredictionKind.UNKNOWN, f"service {name}: {decided} now; it fails unless an earlier "
                                  "step installs it", state=state, command=self.describe(env), data=data)
            return Prediction(PredictionKind.FAIL, f"service {name}: {decided}", state=state, command=self.describe(env), data=data)
        if not decided.commands:
            return Prediction(PredictionKind.OK, f"service {name} is as wanted ({st.backend}: "
                              f"{'running' if st.running else 'stopped'}, enabled: {st.lines()[1].split(': ')[1]})",
                              state=state, command=self.describe(env), data=data)
        return Prediction(PredictionKind.CHANGE, f"service {name}: " + "; ".join(decided.reasons),
                          diff=state_diff(st.lines(), decided.after.lines(), f"service {name}") or None, state=state,
                          command="; ".join(shlex.join(c) for c in decided.commands),
                          data={**data, "after": decided.after.summary()})

    def apply(self, env: TaskEnv) -> Outcome:
        name, st, decided = self._decide(env)
        data: dict[str, Any] = {"backend": st.backend, "before": st.summary() if st.exists else None}
        if isinstance(decided, str):
            return failed(env, f"service {name}", "reading its state", None, detail=decided, data=data)
        if not decided.commands:
            return Outcome(changed=False, message=f"service {name} is as wanted", command=self.describe(env),
                           data={**data, "after": st.summary()})
        text = "; ".join(shlex.join(c) for c in decided.commands)
        for argv in decided.commands:
            res = run_argv(env, argv)
            if res.rc != 0:
                return failed(env, f"service {name}", f"`{shlex.join(argv)}`", res, command=text, data=data)
        now = self.read(env, name)
        data["after"] = now.summary()
        diff = state_diff(st.lines(), now.lines(), f"service {name}", "now") or None
        if self.spec.state and now.running != (self.spec.state != "stopped"):
            return failed(env, f"service {name}", "checking the result", None, command=text, data=data,
                          detail=f"the commands succeeded but it is {'running' if now.running else 'not running'} "
                                 f"({', '.join(f'{k}={v}' for k, v in now.facts.items() if v)})")
        if self.spec.enabled is not None and now.enabled != self.spec.enabled:
            return failed(env, f"service {name}", "checking the result", None, command=text, data=data,
                          detail=f"the commands succeeded but it is {'enabled' if now.enabled else 'not enabled'} at boot")
        return Outcome(changed=True, message=f"service {name}: " + "; ".join(decided.reasons), command=text,
                       diff=diff, data=data)


__all__ = ["Service", "ServiceSpec", "ServiceState", "boot", "control", "parse_systemd",
           "parse_sysv", "plan_changes"]
