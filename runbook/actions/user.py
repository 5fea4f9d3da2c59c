"""`user:` — make a local account present (uid, groups, shell, home, comment, password hash) or absent.

The read is one round trip of getent/id. A `password` is a crypt(3) hash the playbook gives; it is
compared on the host (it arrives on stdin, /etc/shadow's field never leaves the host) and set with
`chpasswd -e` from stdin, so it is on no command line, in no output and in no diff.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field

from runbook.actions._system import (ABSENT, ACCOUNT_NAME, COMMENT_TEXT, PATH_TEXT, checked, failed, fingerprint,
                                     grammar, planned, read_sections, record_planned, run_argv, state_diff)
from runbook.actions.base import Action, FieldKind, Outcome, Prediction, PredictionKind, TaskEnv, TemplatedField, string_fields
from runbook.actions.group import NAME_HINT, AccountName, Id
from runbook.errors import Location, Problem, RunbookError
from runbook.fields import Strict

if TYPE_CHECKING:
    from runbook.model import Playbook

GROUP_REF = rf"(?:{ACCOUNT_NAME}|[0-9]{{1,10}})"
GroupRef = Annotated[str, AfterValidator(grammar(GROUP_REF, "group name", NAME_HINT + " (or a gid)"))]
_PATH_HINT = "an absolute path without `:` or control characters"
PathText = Annotated[str, AfterValidator(grammar(PATH_TEXT, "path", _PATH_HINT))]
CommentText = Annotated[str, AfterValidator(grammar(COMMENT_TEXT, "comment", "one line without `:`"))]
# crypt(3) hashes ($id$...), a locked or disabled entry (! or *, optionally before a hash), or old DES.
HASH = r"[!*]+|[!*]*(?:\$[0-9a-z]{1,10}\$[./0-9A-Za-z$=,+-]{1,400}|[./0-9A-Za-z]{13})"
_HASH_HINT = "a crypt(3) hash such as the output of `openssl passwd -6`, never the password itself"


def _hash(value: str) -> str:
    if "{{" in value or "{%" in value or re.fullmatch(HASH, value):
        return value
    raise ValueError(f"`password` is not a password hash: {_HASH_HINT}")   # the value itself is never echoed


READ_SCRIPT = """\
n=$1; pw=$2; uid=$3; pg=$4; shift 4
sec passwd
getent passwd -- "$n"
sec groups
if getent passwd -- "$n" >/dev/null 2>&1; then id -Gn -- "$n"; fi
sec primary
g=$(getent passwd -- "$n" | cut -d: -f4); if [ -n "$g" ]; then getent group -- "$g" | cut -d: -f1; fi
sec uid_owner
if [ -n "$uid" ]; then getent passwd -- "$uid" | cut -d: -f1; fi
sec pgroup
if [ -n "$pg" ]; then getent group -- "$pg" | cut -d: -f1,3; fi
sec known_groups
for g; do getent group -- "$g" | cut -d: -f1,3; done
sec password
if [ "$pw" = 1 ]; then
  IFS= read -r want || true
  if cur=$(getent shadow -- "$n" 2>/dev/null); then cur=${cur#*:}; cur=${cur%%:*}
    if [ "$cur" = "$want" ]; then echo same; else echo differs; fi
  else echo unreadable; fi
fi
sec end
"""

_FACTS = ("uid", "group", "groups", "shell", "home", "comment")


@dataclass
class UserState:
    """An account as the host has it (exists False: absent) and what the read found around it."""

    exists: bool
    facts: dict[str, str] = field(default_factory=dict)    # uid, gid, group, groups, shell, home, comment
    password: str = ""                                     # same | differs | unreadable | "" (not asked)
    uid_owner: str = ""
    pgroup: tuple[str, str] | None = None                  # (name, gid) of the wanted primary group
    known_groups: dict[str, str] = field(default_factory=dict)   # wanted group (name or gid) -> its name

    def summary(self) -> dict[str, Any] | None:
        """What the results' `before`/`after` hold (never a password hash)."""
        if not self.exists:
            return None
        out: dict[str, Any] = {k: self.facts[k] for k in _FACTS}
        out["uid"] = int(out["uid"])
        out["groups"] = [g for g in out["groups"].split(",") if g]
        return out


def parse_user(sections: dict[str, str]) -> UserState:
    """The state from the read script's sections."""
    pg = sections.get("pgroup", "").split("\n", 1)[0].split(":")
    known = {}
    for line in sections.get("known_groups", "").splitlines():
        name, _, gid = line.partition(":")
        known[name] = name
        known[gid] = name
    st = UserState(False, {}, sections.get("password", ""), sections.get("uid_owner", "").split("\n", 1)[0],
                   (pg[0], pg[1]) if len(pg) == 2 else None, known)
    entry = sections.get("passwd", "").split("\n", 1)[0].split(":")
    if len(entry) >= 7:
        primary = sections.get("primary", "").strip() or entry[3]
        groups = sorted(set(sections.get("groups", "").split()) - {primary})
        st.exists = True
        st.facts = {"uid": entry[2], "gid": entry[3], "group": primary, "groups": ",".join(groups), "comment": entry[4],
                    "home": entry[5], "shell": entry[6]}
    return st


class UserSpec(Strict):
    """Make a local account present (uid, groups, shell, home, comment, password hash) or absent."""

    name: AccountName = Field(description="The account name.")
    state: Literal["present", "absent"] = "present"
    uid: Id | None = None
    group: GroupRef | None = Field(None, description="The primary group (name or gid); it must exist.")
    groups: list[GroupRef] | None = Field(None, max_length=256, description="Supplementary groups; they must exist.")
    append: bool = Field(False, description="Add to `groups` and leave other memberships alone (default: exactly `groups`).")
    shell: PathText | None = None
    home: PathText | None = None
    comment: CommentText | None = None
    system: bool = Field(False, description="Create it as a system account (only when it is created).")
    create_home: bool = Field(True, description="Create the home directory when the account is created.")
    password: Annotated[str, AfterValidator(_hash)] | None = Field(
        None, description="A crypt(3) hash (e.g. from `openssl passwd -6`); never shown in outputs.")
    update_password: Literal["always", "on_create"] = "always"
    remove: bool = Field(False, description="With `state: absent`, also remove the home directory and mail spool.")


@dataclass
class UserPlan:
    """The commands that make the account as wanted, why, the facts expected after, and a refusal if it cannot be."""

    commands: list[list[str]]
    reasons: list[str]
    after: dict[str, str]
    set_password: bool = False
    refusal: str = ""
    missing: list[str] = field(default_factory=list)   # groups the host does not have (yet)


def _wanted(spec: UserSpec, st: UserState) -> dict[str, str]:
    """The facts the spec manages, as the host would show them once applied."""
    want: dict[str, str] = {}
    if spec.uid is not None:
        want["uid"] = str(spec.uid)
    if spec.group is not None:
        want["group"] = st.pgroup[0] if st.pgroup else spec.group
    if spec.groups is not None:
        names = {st.known_groups.get(g, g) for g in spec.groups} - {want.get("group", st.facts.get("group", ""))}
        current = set(filter(None, st.facts.get("groups", "").split(","))) if spec.append else set()
        want["groups"] = ",".join(sorted(names | current))
    for key in ("shell", "home", "comment"):
        if getattr(spec, key) is not None:
            want[key] = getattr(spec, key)
    return want


def _options(spec: UserSpec, want: dict[str, str], st: UserState) -> list[str]:
    """useradd/usermod options for the facts that differ."""
    opts: list[str] = []
    diff = {k: v for k, v in want.items() if st.facts.get(k) != v}
    for key, flag in (("uid", "-u"), ("shell", "-s"), ("home", "-d"), ("comment", "-c")):
        if key in diff:
            opts += [flag, diff[key]]
    if "group" in diff and spec.group is not None:
        opts += ["-g", spec.group]
    if "groups" in diff and spec.groups is not None:
        added = sorted(set(diff["groups"].split(",")) - set(st.facts.get("groups", "").split(",")))
        opts += ["-a", "-G", ",".join(added)] if spec.append and st.exists else ["-G", diff["groups"]]
    return opts


def user_changes(spec: UserSpec, name: str, st: UserState) -> UserPlan:
    """The difference between the account as it is and as the spec wants it."""
    if spec.state == "absent":
        if not st.exists:
            return UserPlan([], [], {})
        return UserPlan([["userdel", *(["-r"] if spec.remove else []), "--", name]], ["delete the account"], {})
    missing = [g for g in ([spec.group] if spec.group else []) + (spec.groups or []) if g not in st.known_groups
               and not (g == spec.group and st.pgroup)]
    if missing:
        return UserPlan([], [], {}, missing=missing)
    if spec.uid is not None and st.uid_owner and st.uid_owner != name:
        return UserPlan([], [], {}, refusal=f"uid {spec.uid} belongs to user {st.uid_owner}")
    want = _wanted(spec, st)
    set_password = spec.password is not None and (not st.exists or (spec.update_password == "always" and st.password != "same"))
    if spec.password is not None and st.exists and spec.update_password == "always" and st.password == "unreadable":
        return UserPlan([], [], {}, refusal="cannot compare the password hash: /etc/shadow is readable by root only")
    opts = _options(spec, want, st)
    cmds, reasons = [], []
    if not st.exists:
        extra = [*(["-r"] if spec.system else []), "-m" if spec.create_home else "-M"]
        cmds.append(["useradd", *opts, *extra, "--", name])
        reasons.append("create the account")
    elif opts:
        cmds.append(["usermod", *opts, "--", name])
        reasons.append("set " + ", ".join(k for k in want if st.facts.get(k) != want[k]))
    if set_password:
        cmds.append(["chpasswd", "-e"])
        reasons.append("set the password hash" if not st.exists else "the password hash differs")
    return UserPlan(cmds, reasons, {**st.facts, **want}, set_password)


def fact_lines(exists: bool, facts: dict[str, str], keys: list[str], password: str = "") -> list[str]:
    """An account as facts, one per line, for the keys the step manages (never a hash)."""
    if not exists:
        return ["absent"]
    lines = ["present", *(f"{k}: {facts[k]}" for k in keys)]
    return lines + ([f"password: {password}"] if password else [])


class User(Action):
    """Make a local account present (uid, groups, shell, home, comment, password hash) or absent."""

    name = "user"
    spec_type: ClassVar[Any] = UserSpec

    def fields(self) -> Iterator[TemplatedField]:
        yield from string_fields(self.spec, ("name", "group", "shell", "home", "comment", "password"))
        for i, g in enumerate(self.spec.groups or []):
            if "{" in g:
                yield TemplatedField(("groups", i), g, FieldKind.TEMPLATE)

    def probes_read_only(self) -> bool:
        return True   # plan() runs only READ_SCRIPT: getent, id, and a hash comparison made on the host

    def check(self, playbook: Playbook, locate: Callable[[tuple[str | int, ...]], Location]) -> list[Problem]:
        if self.spec.password is None or "{" in self.spec.password or self.spec.password.strip("!*") == "":
            return []
        return [Problem("`password` holds a hash written in the playbook: plan files keep the playbook's text",
                        locate(("password",)), "put it in a secret-named variable (`user_password: ...`) or under "
                        "`secrets:` and write `password: \"{{ user_password }}\"`: then every output masks it",
                        severity="warning", code="secret-in-playbook")]

    def _spec(self, env: TaskEnv) -> tuple[str, UserSpec]:
        """The rendered name and spec, each templated field checked again against its grammar."""
        spec = self.spec
        name = checked(env, spec.name, ACCOUNT_NAME, "user name", NAME_HINT)
        values: dict[str, Any] = {}
        for key, pattern in (("group", GROUP_REF), ("shell", PATH_TEXT), ("home", PATH_TEXT), ("comment", COMMENT_TEXT)):
            if isinstance(getattr(spec, key), str):
                values[key] = checked(env, getattr(spec, key), pattern, key, NAME_HINT if key == "group" else _PATH_HINT)
        if spec.groups is not None:
            values["groups"] = [checked(env, g, GROUP_REF, "group name", NAME_HINT) for g in spec.groups]
        if spec.password is not None:
            values["password"] = str(env.render(spec.password)) if "{" in spec.password else spec.password
            if not re.fullmatch(HASH, values["password"]):
                raise RunbookError(f"{env.host}: step `{env.step.step_id}`: `password` did not render to a password hash",
                                   hint=_HASH_HINT)
        return name, spec.model_copy(update={"name": name, **values})

    def describe(self, env: TaskEnv) -> str | None:
        name, spec = self._spec(env)
        return f"user {name}: {spec.state}"

    def read(self, env: TaskEnv, name: str, spec: UserSpec) -> UserState:
        """The account, its groups, the wanted groups and uid, and the hash comparison, in one round trip."""
        ask = spec.password is not None
        args = [name, "1" if ask else "0", "" if spec.uid is None else str(spec.uid), spec.group or "", *(spec.groups or [])]
        return parse_user(read_sections(env, READ_SCRIPT, args, what=f"user {name}",
                                        stdin=(spec.password or "") + "\n" if ask else None))

    @staticmethod
    def _overlay(env: TaskEnv, spec: UserSpec, st: UserState) -> UserState:
        """In a dry run, the groups earlier steps are predicted to create or delete, as if they had."""
        for g in ([spec.group] if spec.group else []) + (spec.groups or []):
            found = planned(env, "group", g)
            if found is ABSENT:
                st.known_groups.pop(g, None)
                st.pgroup = None if g == spec.group else st.pgroup
            elif found is not None:
                st.known_groups[g] = g
                if g == spec.group:
                    st.pgroup = (g, "" if found["gid"] is None else str(found["gid"]))
        return st

    def _keys(self, spec: UserSpec) -> list[str]:
        """The facts a diff shows: those the step manages (all of them for a deletion)."""
        return list(_FACTS) if spec.state == "absent" else [k for k in _FACTS if getattr(spec, k) is not None]

    def plan(self, env: TaskEnv) -> Prediction:
        name, spec = self._spec(env)
        st = self._overlay(env, spec, self.read(env, name, spec))
        up = user_changes(spec, name, st)
        state = fingerprint({"exists": st.exists, "facts": st.facts, "password": st.password, "uid_owner": st.uid_owner,
                             "pgroup": st.pgroup, "known": st.known_groups})
        data = {"before": st.summary()}
        if up.missing:
            return Prediction(PredictionKind.UNKNOWN, f"user {name}: no group {', '.join(up.missing)} on the host now; "
                              "it fails unless an earlier step creates it", state=state, command=self.describe(env), data=data)
        if up.refusal:
            return Prediction(PredictionKind.FAIL, f"user {name}: {up.refusal}", state=state, command=self.describe(env), data=data)
        if not up.commands:
            return Prediction(PredictionKind.OK, f"user {name} is {spec.state}", state=state, command=self.describe(env), data=data)
        record_planned(env, "user", name, ABSENT if spec.state == "absent" else {"exists": True})
        keys = self._keys(spec)
        before = fact_lines(st.exists, st.facts, keys, "(hash differs)" if up.set_password and st.exists else "")
        after = fact_lines(spec.state == "present", up.after, keys, "(new hash)" if up.set_password else "")
        return Prediction(PredictionKind.CHANGE, f"user {name}: " + "; ".join(up.reasons),
                          diff=state_diff(before, after, f"user {name}"), state=state,
                          command="; ".join(shlex.join(c) for c in up.commands), data=data)

    def apply(self, env: TaskEnv) -> Outcome:
        name, spec = self._spec(env)
        st = self.read(env, name, spec)
        up = user_changes(spec, name, st)
        data: dict[str, Any] = {"before": st.summary()}
        if up.missing:
            up.refusal = f"no group {', '.join(up.missing)} on the host"
        if up.refusal:
            return failed(env, f"user {name}", "checking the account", None, detail=up.refusal, data=data)
        if not up.commands:
            return Outcome(changed=False, message=f"user {name} is {spec.state}", command=self.describe(env),
                           data={**data, "after": data["before"]})
        text = "; ".join(shlex.join(c) for c in up.commands)
        for argv in up.commands:
            stdin = f"{name}:{spec.password}\n" if argv[0] == "chpasswd" else None
            res = run_argv(env, argv, stdin=stdin)
            if res.rc != 0:
                return failed(env, f"user {name}", f"`{shlex.join(argv)}`", res, command=text, data=data)
        now = self.read(env, name, spec)
        data["after"] = now.summary()
        if user_changes(spec, name, now).commands:
            return failed(env, f"user {name}", "checking the result", None, command=text, data=data,
                          detail="the commands succeeded but the account still differs: " +
                          "; ".join(user_changes(spec, name, now).reasons))
        keys = self._keys(spec)
        return Outcome(changed=True, message=f"user {name}: " + "; ".join(up.reasons), command=text, data=data,
                       diff=state_diff(fact_lines(st.exists, st.facts, keys), fact_lines(now.exists, now.facts, keys),
                                       f"user {name}", "now"))
