"""`group:` — make a local group present (with a given gid) or absent: getent, groupadd, groupmod, groupdel."""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field

from runbook.actions._system import (ABSENT, ACCOUNT_NAME, checked, failed, fingerprint, grammar, read_sections,
                                     record_planned, run_argv, state_diff)
from runbook.actions.base import Action, Outcome, Prediction, PredictionKind, TaskEnv, TemplatedField, string_fields
from runbook.fields import Int, Strict

NAME_HINT = "a user or group name: letters, digits and `_ . -`, starting with a letter or `_`, at most 32 characters"
AccountName = Annotated[str, AfterValidator(grammar(ACCOUNT_NAME, "account name", NAME_HINT))]
Id = Annotated[Int, Field(ge=0, le=4294967294)]

# $1: the group name, $2: the wanted gid or "" (to find who holds it).
READ_SCRIPT = """\
sec group
getent group -- "$1"
sec gid_owner
if [ -n "$2" ]; then getent group -- "$2" | cut -d: -f1; fi
sec end
"""


@dataclass
class GroupState:
    """A group as the host's account database has it (None: absent)."""

    gid: int | None
    gid_owner: str        # the group that holds the wanted gid now, if any

    def lines(self) -> list[str]:
        """The group as facts, one per line (for diffs)."""
        return ["absent"] if self.gid is None else ["present", f"gid: {self.gid}"]


def parse_group(sections: dict[str, str]) -> GroupState:
    """The state from the read script: `name:x:gid:members` and the owner of the wanted gid."""
    fields = sections.get("group", "").split("\n", 1)[0].split(":")
    gid = int(fields[2]) if len(fields) >= 3 and fields[2].isdigit() else None
    return GroupState(gid, sections.get("gid_owner", "").split("\n", 1)[0])


class GroupSpec(Strict):
    """Make a local group present (with a given gid) or absent."""

    name: AccountName = Field(description="The group name.")
    gid: Id | None = Field(None, description="The group id; absent: the system picks one.")
    system: bool = Field(False, description="Create it as a system group (only when it is created).")
    state: Literal["present", "absent"] = "present"


def group_commands(spec: GroupSpec, name: str, st: GroupState) -> tuple[list[list[str]], list[str], str | None]:
    """(commands, reasons, refusal) that make the group as wanted; a refusal when it cannot be done."""
    if spec.state == "absent":
        return ([["groupdel", "--", name]], ["delete the group"], None) if st.gid is not None else ([], [], None)
    if spec.gid is not None and st.gid != spec.gid and st.gid_owner and st.gid_owner != name:
        return [], [], f"gid {spec.gid} belongs to group {st.gid_owner}"
    if st.gid is None:
        argv = ["groupadd", *(["-g", str(spec.gid)] if spec.gid is not None else []), *(["-r"] if spec.system else []), "--", name]
        return [argv], ["create the group"], None
    if spec.gid is not None and st.gid != spec.gid:
        return [["groupmod", "-g", str(spec.gid), "--", name]], [f"gid {st.gid} -> {spec.gid}"], None
    return [], [], None


class Group(Action):
    """Make a local group present (with a given gid) or absent."""

    name = "group"
    spec_type: ClassVar[Any] = GroupSpec

    def fields(self) -> Iterator[TemplatedField]:
        return string_fields(self.spec, ("name",))

    def probes_read_only(self) -> bool:
        return True   # plan() runs only `getent group`

    def group(self, env: TaskEnv) -> str:
        """The rendered, checked group name."""
        return checked(env, self.spec.name, ACCOUNT_NAME, "group name", NAME_HINT)

    def describe(self, env: TaskEnv) -> str | None:
        gid = f" (gid {self.spec.gid})" if self.spec.gid is not None and self.spec.state == "present" else ""
        return f"group {self.group(env)}: {self.spec.state}{gid}"

    def read(self, env: TaskEnv, name: str) -> GroupState:
        """The group's entry, and who holds the wanted gid, in one round trip."""
        gid = "" if self.spec.gid is None else str(self.spec.gid)
        return parse_group(read_sections(env, READ_SCRIPT, [name, gid], what=f"group {name}"))

    def _after(self, st: GroupState) -> GroupState:
        if self.spec.state == "absent":
            return GroupState(None, "")
        return GroupState(self.spec.gid if self.spec.gid is not None else st.gid, "")

    def plan(self, env: TaskEnv) -> Prediction:
        name = self.group(env)
        st = self.read(env, name)
        cmds, reasons, refusal = group_commands(self.spec, name, st)
        state = fingerprint({"gid": st.gid, "gid_owner": st.gid_owner})
        data = {"before": None if st.gid is None else {"gid": st.gid}}
        if refusal:
            return Prediction(PredictionKind.FAIL, f"group {name}: {refusal}", state=state, command=self.describe(env), data=data)
        if not cmds:
            return Prediction(PredictionKind.OK, f"group {name} is {self.spec.state}" + (
                f" (gid {st.gid})" if st.gid is not None else ""), state=state, command=self.describe(env), data=data)
        after = self._after(st)
        record_planned(env, "group", name, ABSENT if self.spec.state == "absent" else {"gid": after.gid})
        after_lines = ["present", "gid: (the system picks one)"] if after.gid is None and self.spec.state == "present" else after.lines()
        return Prediction(PredictionKind.CHANGE, f"group {name}: " + "; ".join(reasons),
                          diff=state_diff(st.lines(), after_lines, f"group {name}"), state=state,
                          command="; ".join(shlex.join(c) for c in cmds), data=data)

    def apply(self, env: TaskEnv) -> Outcome:
        name = self.group(env)
        st = self.read(env, name)
        cmds, reasons, refusal = group_commands(self.spec, name, st)
        data: dict[str, Any] = {"before": None if st.gid is None else {"gid": st.gid}}
        if refusal:
            return failed(env, f"group {name}", "checking the gid", None, detail=refusal, data=data)
        if not cmds:
            return Outcome(changed=False, message=f"group {name} is {self.spec.state}", command=self.describe(env),
                           data={**data, "after": data["before"]})
        text = "; ".join(shlex.join(c) for c in cmds)
        for argv in cmds:
            res = run_argv(env, argv)
            if res.rc != 0:
                return failed(env, f"group {name}", f"`{shlex.join(argv)}`", res, command=text, data=data)
        now = self.read(env, name)
        data["after"] = None if now.gid is None else {"gid": now.gid}
        if (now.gid is None) != (self.spec.state == "absent") or (self.spec.gid is not None and self.spec.state == "present"
                                                                  and now.gid != self.spec.gid):
            return failed(env, f"group {name}", "checking the result", None, command=text, data=data,
                          detail=f"the commands succeeded but the group is {' '.join(now.lines())}")
        return Outcome(changed=True, message=f"group {name}: " + "; ".join(reasons), command=text,
                       diff=state_diff(st.lines(), now.lines(), f"group {name}", "now"), data=data)
