"""`package:` — make packages present, absent or the latest version, with the host's package manager.

One read finds the manager (apt/dpkg, dnf, yum, apk: the first the host has) and, for every named
package, the installed version and the candidate the package lists offer now. On apt a predicted
change is also simulated (`apt-get -s`, as the login user), so the plan names the dependencies an
install pulls in and the packages a removal takes along.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BeforeValidator, Field

from runbook.actions._system import (PACKAGE_NAME, checked, failed, fingerprint, grammar, read_sections, run_argv,
                                     state_diff)
from runbook.actions.base import Action, FieldKind, Outcome, Prediction, PredictionKind, TaskEnv, TemplatedField
from runbook.errors import RunbookError
from runbook.fields import Strict

_NAME_HINT = "a package name: letters, digits and `+ . _ -` (optionally `:arch`), not starting with `-`; no version pins"
PackageName = Annotated[str, AfterValidator(grammar(PACKAGE_NAME, "package name", _NAME_HINT))]


def _one_or_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


# $@: the package names. Caches are never written by a read (apt builds its cache in memory, dnf -C).
READ_SCRIPT = """\
sec manager
if command -v apt-get >/dev/null 2>&1 && command -v dpkg-query >/dev/null 2>&1; then m=apt
elif command -v dnf >/dev/null 2>&1; then m=dnf
elif command -v yum >/dev/null 2>&1; then m=yum
elif command -v apk >/dev/null 2>&1; then m=apk
else m=none; fi
echo $m
case $m in
apt)
  sec installed
  dpkg-query -W -f='${Package}\\t${Architecture}\\t${db:Status-Abbrev}\\t${Version}\\n' -- "$@" 2>/dev/null
  sec candidates
  apt-cache -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= policy -- "$@" 2>/dev/null ;;
dnf|yum)
  sec installed
  rpm -q --qf '%{NAME}\\t%{ARCH}\\tii\\t%|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}\\n' -- "$@" 2>/dev/null | grep "$(printf '\\t')"
  sec candidates
  $m -q -C repoquery --latest-limit=1 --qf '%{name}\\t%{evr}\\n' -- "$@" 2>/dev/null ;;
apk)
  sec installed
  apk list --installed "$@" 2>/dev/null
  sec candidates
  apk list "$@" 2>/dev/null ;;
esac
sec end
"""

_APK_ENTRY = re.compile(r"^(?P<name>.+)-(?P<version>\d[^-\s]*-r\d+)$")
_APT_INSTALL = ("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-q", "-y", "-o", "DPkg::Lock::Timeout=120",
                "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold")


@dataclass
class Packages:
    """What the host has: its package manager and, per requested name, installed and candidate versions."""

    manager: str
    installed: dict[str, str | None]
    candidate: dict[str, str | None]


def _matches(requested: str, name: str, arch: str) -> bool:
    return requested in (name, f"{name}:{arch}")


def parse_apt(names: list[str], installed: str, candidates: str) -> Packages:
    """Versions from dpkg-query lines (name, arch, status, version) and `apt-cache policy` blocks."""
    have: dict[str, str | None] = dict.fromkeys(names)
    for line in installed.splitlines():
        parts = line.split("\t")
        # db:Status-Abbrev: desired, status, error; status i, W or t means the package is installed.
        if len(parts) == 4 and len(parts[2]) >= 2 and parts[2][1] in "iWt":
            for n in names:
                if _matches(n, parts[0], parts[1]):
                    have[n] = parts[3]
    cand: dict[str, str | None] = dict.fromkeys(names)
    current = None
    for line in candidates.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            current = line[:-1]
        elif current in cand and line.strip().startswith("Candidate:"):
            value = line.split(":", 1)[1].strip()
            cand[current] = None if value == "(none)" else value
    return Packages("apt", have, cand)


def parse_rpm(manager: str, names: list[str], installed: str, candidates: str) -> Packages:
    """Versions from `rpm -q --qf` lines and `repoquery --latest-limit=1` lines (name, epoch:version-release)."""
    have: dict[str, str | None] = dict.fromkeys(names)
    for line in installed.splitlines():
        parts = line.split("\t")
        if len(parts) == 4:
            for n in names:
                if _matches(n, parts[0], parts[1]):
                    have[n] = parts[3]
    cand: dict[str, str | None] = dict.fromkeys(names)
    for line in candidates.splitlines():
        parts = line.split("\t")
        if len(parts) == 2 and parts[0] in cand and cand[parts[0]] is None:
            cand[parts[0]] = parts[1]
    return Packages(manager, have, cand)


def parse_apk(names: list[str], installed: str, candidates: str) -> Packages:
    """Versions from `apk list` lines (`name-1.2-r0 arch {origin} (license) [flags]`)."""
    def versions(text: str) -> dict[str, str]:
        found: dict[str, str] = {}
        for line in text.splitlines():
            m = _APK_ENTRY.match(line.split(" ", 1)[0])
            if m and m.group("name") in names:
                found.setdefault(m.group("name"), m.group("version"))
        return found
    have, cand = versions(installed), versions(candidates)
    return Packages("apk", {n: have.get(n) for n in names}, {n: cand.get(n) for n in names})


def parse(names: list[str], sections: dict[str, str]) -> Packages:
    """The read script's output as Packages."""
    manager = sections.get("manager", "none")
    installed, candidates = sections.get("installed", ""), sections.get("candidates", "")
    if manager == "apt":
        return parse_apt(names, installed, candidates)
    if manager in ("dnf", "yum"):
        return parse_rpm(manager, names, installed, candidates)
    if manager == "apk":
        return parse_apk(names, installed, candidates)
    raise RunbookError("the host has no package manager runbook knows (apt-get with dpkg, dnf, yum or apk)")


def commands(manager: str, verb: str, names: list[str]) -> list[str]:
    """The command that installs, upgrades or removes `names`, or refreshes the lists (`update`, no names)."""
    if manager == "apt":
        if verb == "update":
            return ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-q", "update"]
        return [*_APT_INSTALL, "remove" if verb == "remove" else "install", "--", *names]
    if manager in ("dnf", "yum"):
        sub = {"update": "makecache", "install": "install", "upgrade": "upgrade", "remove": "remove"}[verb]
        return [manager, "-y", "-q", sub] + (["--", *names] if names else [])
    sub = {"update": "update", "install": "add", "upgrade": "add", "remove": "del"}[verb]
    return ["apk", sub, *(["-u"] if verb == "upgrade" else []), *names]


@dataclass
class Change:
    """What a package step would do: the commands, per name the version after, and names no list offers."""

    steps: list[tuple[str, list[str]]]     # (verb, names)
    after: dict[str, str | None]
    missing: list[str]


def plan_changes(state: str, pk: Packages) -> Change:
    """The difference between the packages as they are and as `state` wants them."""
    after = dict(pk.installed)
    install, upgrade, remove, missing = [], [], [], []
    for n, have in pk.installed.items():
        cand = pk.candidate.get(n)
        if state == "absent":
            if have is not None:
                remove.append(n)
                after[n] = None
        elif have is None:
            if cand is None:
                missing.append(n)
            else:
                install.append(n)
                after[n] = cand
        elif state == "latest" and cand is not None and cand != have:
            upgrade.append(n)
            after[n] = cand
    steps = [(verb, names) for verb, names in (("install", install), ("upgrade", upgrade), ("remove", remove)) if names]
    return Change(steps, after, missing)


def simulated(text: str) -> dict[str, tuple[str | None, str | None]]:
    """Packages an `apt-get -s` run would touch: name -> (version before, version after)."""
    found: dict[str, tuple[str | None, str | None]] = {}
    for line in text.splitlines():
        m = re.match(r"^Inst (\S+) (?:\[(\S+)\] )?\((\S+)", line)
        if m:
            found[m.group(1)] = (m.group(2), m.group(3))
        m = re.match(r"^Remv (\S+) \[(\S+)\]", line)
        if m:
            found[m.group(1)] = (m.group(2), None)
    return found


def _line(name: str, version: str | None) -> str:
    return f"{name}: {version or 'absent'}"


class PackageSpec(Strict):
    """Make packages present, absent or the latest version."""

    name: Annotated[list[PackageName], BeforeValidator(_one_or_list, json_schema_input_type=str | list[str]),
                    Field(min_length=1, max_length=200, description="One package name or a list.")]
    state: Literal["present", "absent", "latest"] = "present"
    update_cache: bool = Field(False, description="Refresh the package lists before installing (apply only; a plan "
                               "reads the lists the host has).")


class Package(Action):
    """Make packages present, absent or the latest version (apt, dnf, yum or apk)."""

    name = "package"
    spec_type: ClassVar[Any] = PackageSpec

    def fields(self) -> Iterator[TemplatedField]:
        for i, n in enumerate(self.spec.name):
            if "{" in n:
                yield TemplatedField(("name", i), n, FieldKind.TEMPLATE)

    def probes_read_only(self) -> bool:
        return True   # plan() runs only READ_SCRIPT (dpkg-query, apt-cache policy, rpm -q, ...) and apt-get -s

    def names(self, env: TaskEnv) -> list[str]:
        """The rendered, checked package names (a template may render to several, space-separated)."""
        out: list[str] = []
        for n in self.spec.name:
            words = str(env.render(n)).split() if "{" in n else [n]
            out.extend(checked(env, w, PACKAGE_NAME, "package name", _NAME_HINT) for w in words)
        if not out:
            raise RunbookError(f"{env.host}: step `{env.step.step_id}`: the package names rendered to nothing")
        return list(dict.fromkeys(out))

    def describe(self, env: TaskEnv) -> str | None:
        return f"package {' '.join(self.names(env))}: {self.spec.state}"

    def read(self, env: TaskEnv, names: list[str]) -> Packages:
        """Installed and candidate versions of `names`, and the package manager, in one round trip."""
        sections = read_sections(env, READ_SCRIPT, names, what=f"package {' '.join(names)}")
        try:
            return parse(names, sections)
        except RunbookError as exc:
            raise RunbookError(f"{env.host}: package {' '.join(names)}: {exc.message}", hint=exc.hint) from None

    def _simulate(self, env: TaskEnv, pk: Packages, change: Change) -> dict[str, tuple[str | None, str | None]]:
        """What apt would also install or remove (a simulation as the login user); {} elsewhere or on error."""
        if pk.manager != "apt" or not change.steps:
            return {}
        verb = "remove" if change.steps[0][0] == "remove" else "install"
        names = [n for _, ns in change.steps for n in ns]
        argv = ["apt-get", "-s", "-q", "-o", "Dir::Cache::pkgcache=", "-o", "Dir::Cache::srcpkgcache=", verb, "--", *names]
        res = run_argv(env, argv, sudo=False)
        return simulated(res.stdout) if res.rc == 0 else {}

    def plan(self, env: TaskEnv) -> Prediction:
        names = self.names(env)
        pk = self.read(env, names)
        change = plan_changes(self.spec.state, pk)
        state = fingerprint({"manager": pk.manager, "installed": pk.installed, "candidate": pk.candidate})
        data = {"manager": pk.manager, "before": pk.installed, "after": change.after}
        label = f"package {' '.join(names)}"
        note = " (update_cache: apply refreshes the lists first; this plan read them as they are)" if self.spec.update_cache else ""
        if change.missing:
            return Prediction(PredictionKind.UNKNOWN, f"{label}: no candidate for {', '.join(change.missing)} in the "
                              f"{pk.manager} lists now; it fails unless they are refreshed or an earlier step adds a source{note}",
                              state=state, command=self.describe(env), data=data)
        if not change.steps:
            return Prediction(PredictionKind.OK, f"{label}: {self.spec.state} ({pk.manager}: "
                              + ", ".join(_line(n, v) for n, v in pk.installed.items()) + f"){note}",
                              state=state, command=self.describe(env), data=data)
        before, after = dict(pk.installed), dict(change.after)
        for n, (old, new) in self._simulate(env, pk, change).items():
            if n not in before:
                before[n], after[n] = old, new
        extra = [n for n in after if n not in pk.installed]
        reason = "; ".join(f"{verb} {' '.join(ns)}" for verb, ns in change.steps)
        if extra:
            reason += f"; with {', '.join(extra)}"
        return Prediction(PredictionKind.CHANGE, f"{label}: {reason}{note}",
                          diff=state_diff([_line(n, v) for n, v in before.items()], [_line(n, v) for n, v in after.items()],
                                          label),
                          state=state, data={**data, "after": after},
                          command="; ".join(shlex.join(commands(pk.manager, verb, ns)) for verb, ns in change.steps))

    def apply(self, env: TaskEnv) -> Outcome:
        names = self.names(env)
        label = f"package {' '.join(names)}"
        pk = self.read(env, names)
        if self.spec.update_cache:
            res = run_argv(env, commands(pk.manager, "update", []))
            if res.rc != 0:
                return failed(env, label, "refreshing the package lists", res, command=shlex.join(commands(pk.manager, "update", [])))
            pk = self.read(env, names)
        change = plan_changes(self.spec.state, pk)
        data: dict[str, Any] = {"manager": pk.manager, "before": pk.installed}
        if change.missing:
            return failed(env, label, "finding a candidate", None, data=data,
                          detail=f"no candidate for {', '.join(change.missing)} in the {pk.manager} lists")
        if not change.steps:
            return Outcome(changed=False, message=f"{label}: {self.spec.state}", command=self.describe(env),
                           data={**data, "after": pk.installed})
        text = "; ".join(shlex.join(commands(pk.manager, verb, ns)) for verb, ns in change.steps)
        for verb, ns in change.steps:
            res = run_argv(env, commands(pk.manager, verb, ns))
            if res.rc != 0:
                return failed(env, label, f"`{shlex.join(commands(pk.manager, verb, ns))}`", res, command=text, data=data)
        now = self.read(env, names)
        data["after"] = now.installed
        wrong = [n for n, v in now.installed.items() if (v is None) != (self.spec.state == "absent")
                 or (self.spec.state == "latest" and now.candidate.get(n) not in (None, v))]
        diff = state_diff([_line(n, v) for n, v in pk.installed.items()], [_line(n, v) for n, v in now.installed.items()],
                          label, "now") or None
        if wrong:
            return failed(env, label, "checking the result", None, command=text, data=data,
                          detail=f"the commands succeeded but {', '.join(_line(n, now.installed[n]) for n in wrong)}")
        return Outcome(changed=True, message=f"{label}: " + "; ".join(f"{verb} {' '.join(ns)}" for verb, ns in change.steps),
                       command=text, diff=diff, data=data)
