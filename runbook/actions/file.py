"""`file:` — make a path a file, a directory, a symlink, absent or touched, with a mode, owner and group."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from runbook.actions._resource import (LINK_SCRIPT, MKDIR_SCRIPT, RECURSE_APPLY_SCRIPT, REMOVE_SCRIPT, TOUCH_SCRIPT,
                                       Change, Info, PathState, ResourceAction, account, attr_changes, attr_diff,
                                       attr_problem, host_path, mode_text, parent_of, planned_after, planned_below,
                                       read_state, run_op, set_attrs, sh, shown, unreadable_reason, unwritable_reason)
from runbook.actions.base import TaskEnv, TemplatedField, string_fields
from runbook.errors import RunbookError
from runbook.fields import OctalMode, Strict


class FileSpec(Strict):
    """Make a path a file, a directory, a symlink, absent or touched, with a mode, owner and group."""

    path: str = Field(description="Path on the host (absolute, or ~/...).")
    state: Literal["file", "directory", "link", "absent", "touch"] = Field(
        "file", description="file: it must exist (attributes only); directory: created with its parents; link: a "
                            "symlink to `src`; absent: removed (directories recursively); touch: created empty if missing.")
    mode: OctalMode = None
    owner: str | None = Field(None, description="User name or uid.")
    group: str | None = Field(None, description="Group name or gid.")
    src: str | None = Field(None, description="state: link — what the symlink points to (kept as written).")
    recurse: bool = Field(False, description="state: directory — set mode/owner/group on everything below too.")
    force: bool = Field(False, description="state: link — replace a regular file or symlink at `path`.")

    @model_validator(mode="after")
    def _consistent(self) -> FileSpec:
        if self.state == "link" and not self.src:
            raise ValueError("state: link needs `src` (what the symlink points to)")
        if self.src is not None and self.state != "link":
            raise ValueError("`src` is only for state: link")
        if self.recurse and self.state != "directory":
            raise ValueError("`recurse` is only for state: directory")
        if self.mode is not None and self.state in ("link", "absent"):
            raise ValueError(f"`mode` does not apply to state: {self.state} (a symlink has no mode of its own on Linux)")
        if (self.owner or self.group) and self.state == "absent":
            raise ValueError("`owner`/`group` do not apply to state: absent")
        if self.force and self.state != "link":
            raise ValueError("`force` is only for state: link")
        return self


class File(ResourceAction):
    """Make a path a file, a directory, a symlink, absent or touched, with a mode, owner and group."""

    name = "file"
    spec_type: ClassVar[Any] = FileSpec

    def fields(self) -> Iterator[TemplatedField]:
        return string_fields(self.spec, ("path", "owner", "group", "src"))

    def describe(self, env: TaskEnv) -> str | None:
        spec = self.spec
        return f"file {shown(env, spec.path)} ({spec.state}{' -> ' + shown(env, spec.src) if spec.src else ''})"

    def compute(self, env: TaskEnv) -> Change:
        spec = self.spec
        path = host_path(env, spec.path, "path")
        if path in ("/", "~") and (spec.state == "absent" or spec.recurse):
            raise RunbookError(f"{env.host}: refusing state: {spec.state}{' recurse' if spec.recurse else ''} on {path}",
                               hint="name the directory to manage below it")
        owner, group = account(env, spec.owner, "owner"), account(env, spec.group, "group")
        mode = mode_text(spec.mode)
        state = read_state(env, path, content=False, follow=spec.state not in ("link", "absent"), owner=owner,
                           group=group, recurse=spec.recurse, recurse_mode=mode, count=spec.state == "absent")
        change = Change(state)
        change.fail = unreadable_reason(env, state)
        if change.fail is None:
            getattr(self, "_" + spec.state)(env, change, mode, owner, group)
        if change.ops and not change.fail:
            kind = {"touch": state.kind if state.exists else "file", "file": "file"}.get(spec.state, spec.state)
            change.planned[state.path] = planned_after(
                state, kind, mode, content=b"" if spec.state == "touch" and not state.exists else None,
                target=change.after.get("src"))
        change.diff = attr_diff(state.path, change.before, change.after) if change.ops else None
        return change

    # --- one method per state -----------------------------------------------------------------------

    def _file(self, env: TaskEnv, change: Change, mode: str | None, owner: str | None, group: str | None) -> None:
        state = change.state
        if not state.exists:
            change.fail = f"{state.path} does not exist (state: file never creates one; use state: touch or copy)"
        elif state.dangling:
            change.fail = f"{state.path} is a symlink to {state.target!r}, which does not exist"
        elif state.kind != "file":
            change.fail = f"{state.path} is a {state.kind}, not a regular file"
        else:
            self._attrs(env, change, state.info, mode, owner, group)

    def _directory(self, env: TaskEnv, change: Change, mode: str | None, owner: str | None, group: str | None) -> None:
        state = change.state
        if not state.exists:
            if state.ancestor_kind == "notdir":
                change.fail = f"cannot create directory {state.path}: {state.ancestor} is not a directory"
                return
            parents = "" if state.ancestor == parent_of(state.path) else f" (and its missing parents below {state.ancestor})"
            self._create(env, change, f"create directory {state.path}{parents}", "directory", MKDIR_SCRIPT,
                         mode, owner, group)
        elif state.dangling:
            change.fail = f"{state.path} is a symlink to {state.target!r}, which does not exist"
        elif state.kind != "directory":
            change.fail = f"{state.path} exists and is a {state.kind}, not a directory"
        else:
            self._attrs(env, change, state.info, mode, owner, group)
            if self.spec.recurse:
                self._recurse(env, change, mode, owner, group)

    def _link(self, env: TaskEnv, change: Change, mode: str | None, owner: str | None, group: str | None) -> None:
        state = change.state
        src = str(env.render(self.spec.src))
        if not src or "\x00" in src:
            raise RunbookError(f"{env.host}: `src` rendered to {src!r}: expected a symlink target", hint="check the variable")
        change.after.update({"state": "link", "src": src})
        old_kind = state.lstat.kind if state.lstat else "absent"
        change.before["state"] = old_kind
        if old_kind == "link":
            change.before["src"] = state.target
        op = _op(env, sh(LINK_SCRIPT, state.path, src), "create the symlink", state.path)
        if not (old_kind == "link" and state.target == src):
            change.fail = unwritable_reason(env, state)
            if change.fail:
                return
        if not state.exists:
            if state.ancestor != parent_of(state.path) or state.ancestor_kind != "dir":
                change.fail = f"cannot create symlink {state.path}: directory {parent_of(state.path)} does not exist"
                return
            change.add(f"create symlink {state.path} -> {src}", op)
        elif old_kind == "link" and state.target == src:
            pass
        elif old_kind == "link" or (old_kind == "file" and self.spec.force):
            change.add(f"{state.path}: {old_kind} {_arrow(state)}replaced by a symlink -> {src}", op)
        elif old_kind == "file":
            change.fail = f"{state.path} is a regular file; force: true replaces it with the symlink"
            return
        else:
            change.fail = f"{state.path} is a {old_kind}; a symlink does not replace it"
            return
        info = state.lstat if not change.ops else None
        self._attrs(env, change, info, None, owner, group, link=True)

    def _absent(self, env: TaskEnv, change: Change, mode: str | None, owner: str | None, group: str | None) -> None:
        state = change.state
        change.ok_reason = f"{state.path} is already absent"
        if not state.exists or state.lstat is None:
            return
        kind = state.lstat.kind
        change.fail = unwritable_reason(env, state)
        if change.fail:
            return
        change.before["state"], change.after["state"] = kind, "absent"
        below = "everything below it" if state.entries is None else f"the {state.entries} entries below it"
        what = f"remove directory {state.path} and {below}" if kind == "directory" else f"remove {kind} {state.path}"
        change.add(what, _op(env, sh(REMOVE_SCRIPT, state.path), "remove", state.path))

    def _touch(self, env: TaskEnv, change: Change, mode: str | None, owner: str | None, group: str | None) -> None:
        state = change.state
        if not state.exists:
            if state.ancestor != parent_of(state.path) or state.ancestor_kind != "dir":
                change.fail = f"cannot create {state.path}: directory {parent_of(state.path)} does not exist"
                return
            self._create(env, change, f"create empty file {state.path}", "file", TOUCH_SCRIPT, mode, owner, group)
        elif state.dangling:
            change.fail = f"{state.path} is a symlink to {state.target!r}, which does not exist"
        else:
            # An existing path keeps its content and times: touch is idempotent here (see docs/actions.md).
            self._attrs(env, change, state.info, mode, owner, group)

    # --- shared parts ---------------------------------------------------------------------------------

    def _create(self, env: TaskEnv, change: Change, what: str, kind: str, script: str, mode: str | None,
                owner: str | None, group: str | None) -> None:
        """Create the path, then give it every attribute the step names (new paths get them all)."""
        state = change.state
        change.fail = unwritable_reason(env, state)
        if change.fail:
            return
        change.before["state"], change.after["state"] = "absent", kind
        change.add(what, _op(env, sh(script, state.path), f"create {kind}", state.path))
        self._attrs(env, change, None, mode, owner, group)

    def _attrs(self, env: TaskEnv, change: Change, info: Info | None, mode: str | None, owner: str | None,
               group: str | None, link: bool = False) -> None:
        """Close the difference in mode/owner/group (info None: the path is new, so set every one given)."""
        state = change.state
        problem = attr_problem(env, state, info, owner, group, mode)
        if info is None:
            after = {k: v for k, v in (("mode", mode), ("owner", owner), ("group", group)) if v}
            before: dict[str, str] = {}
        else:
            before, after = attr_changes(state, info, mode, owner, group)
        if problem and after:
            change.fail = problem
            return
        change.before.update(before)
        change.after.update(after)
        if not after:
            return
        if info is not None:
            parts = ", ".join(f"{k} {before[k]} -> {after[k]}" for k in after)
            change.reasons.append(f"{state.path}: {parts}")
            change.ops.append(set_attrs(env, state.path, after.get("mode"), after.get("owner"), after.get("group"), link))
        else:
            change.reasons[-1] += " (" + ", ".join(f"{k} {v}" for k, v in after.items()) + ")"
            change.ops.append(set_attrs(env, state.path, mode, owner, group, link))

    def _recurse(self, env: TaskEnv, change: Change, mode: str | None, owner: str | None, group: str | None) -> None:
        state = change.state
        below = {k: v for k, v in self._below(env, state, mode).items() if v[0]}
        if not below:
            return
        if state.uid != 0 and ("owner" in below or "group" in below):
            change.fail = f"changing the owner or group below {state.path} needs root: use sudo: true"
            return
        for key, (count, names) in below.items():
            example = ", ".join(names[:3]) + (", ..." if count > len(names[:3]) else "")
            change.reasons.append(f"{count} {'entry' if count == 1 else 'entries'} below {state.path} differ in {key} ({example})")
            change.before[f"{key} below"], change.after[f"{key} below"] = f"{count} differ", {
                "mode": mode, "owner": owner, "group": group}[key]
        change.ops.append(_op(env, sh(RECURSE_APPLY_SCRIPT, state.path, (mode or "") if "mode" in below else "",
                                      (owner or "") if "owner" in below else "", (group or "") if "group" in below else ""),
                              "set the attributes below", state.path))


    @staticmethod
    def _below(env: TaskEnv, state: PathState, mode: str | None) -> dict[str, tuple[int, list[str]]]:
        """Entries below that differ: as the host has them, plus those earlier steps of a dry run create."""
        below = {k: (n, list(names)) for k, (n, names) in state.below.items()}
        wanted = {"mode": int(mode, 8) if mode else None, "owner": state.want_uid, "group": state.want_gid}
        for path, planned in planned_below(env, state.path).items():
            now = {"mode": None if planned.kind == "link" else planned.mode, "owner": planned.uid, "group": planned.gid}
            for key, want in wanted.items():
                if want is not None and want != -1 and now[key] is not None and now[key] != want:
                    count, names = below.get(key, (0, []))
                    below[key] = (count + 1, [*names, path])
        return below


def _op(env: TaskEnv, argv: list[str], what: str, path: str) -> Any:
    def op() -> dict[str, Any]:
        run_op(env, argv, what, path)
        return {}
    return op


def _arrow(state: PathState) -> str:
    return f"-> {state.target} " if state.target is not None else ""
