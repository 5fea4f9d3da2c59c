"""`upload:` — copy a local file to the host when its checksum or mode differs."""

from __future__ import annotations

import base64
import difflib
import hashlib

from collections.abc import Iterator
from typing import Any, ClassVar

from pydantic import Field

from runbook.actions.base import (Action, Outcome, Prediction, PredictionKind, TaskEnv, TemplatedField, task_source,
                                  string_fields)
from runbook.errors import ReadOnlyViolation, RunbookError
from runbook.fields import OctalMode, Strict

# Under `sudo: USER` the file is written by USER: the content arrives base64 on stdin (so the
# login user needs no readable temp file USER could read), lands in a temp file beside the
# target, and is renamed into place.
_SUDO_WRITE = ('set -e; t=$(mktemp "$(dirname -- "$1")/.runbook-XXXXXX"); trap \'rm -f "$t"\' EXIT; '
               'base64 -d > "$t"; chmod "$2" "$t"; mv -f "$t" "$1"; trap - EXIT')

DIFF_LIMIT = 256 * 1024   # larger files are summarised, not diffed

# Read a file as the sudo user: its sha256 on the first line, then (when $2 is 1) its base64 on one line.
_SUDO_READ = 'sha256sum -- "$1" | cut -d" " -f1 && if [ "$2" = 1 ]; then base64 -w0 -- "$1"; fi'


def _is_text(data: bytes) -> bool:
    if b"\x00" in data[:8192]:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def content_diff(old: bytes | None, new: bytes, dest: str) -> str:
    """A unified diff of two file contents, or a size/checksum summary for binary or large files."""
    if old is not None and old == new:
        return ""
    if (old is not None and not _is_text(old)) or not _is_text(new) or len(new) > DIFF_LIMIT or (old and len(old) > DIFF_LIMIT):
        before = f"{len(old)} bytes, sha256 {hashlib.sha256(old).hexdigest()[:16]}" if old is not None else "absent"
        after = f"{len(new)} bytes, sha256 {hashlib.sha256(new).hexdigest()[:16]}"
        return f"binary or large file {dest}: {before} -> {after}\n"
    a = old.decode("utf-8").splitlines(keepends=True) if old is not None else []
    b = new.decode("utf-8").splitlines(keepends=True)
    lines = difflib.unified_diff(a, b, fromfile=f"{dest} (on host)" if old is not None else "/dev/null",
                                 tofile=f"{dest} (new)")
    return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in lines)


class UploadSpec(Strict):
    """Copy a local file to the host when its checksum or mode differs."""

    src: str = Field(description="Control-machine file, relative to the playbook's directory.")
    dest: str = Field(description="Path on the host.")
    mode: OctalMode = None


class Upload(Action):
    """Copy a local file to the host when its checksum or mode differs."""

    name = "upload"
    spec_type: ClassVar[Any] = UploadSpec

    def fields(self) -> Iterator[TemplatedField]:
        return string_fields(self.spec, ("src", "dest"))

    def local_sources(self) -> list[str]:
        return [] if "{" in self.spec.src else [self.spec.src]

    def source_templates(self) -> list[str]:
        return [self.spec.src] if "{" in self.spec.src else []

    def content(self, env: TaskEnv) -> bytes:
        """The bytes the file on the host should hold."""
        src = task_source(env, self.step, self.spec.src)
        try:
            return src.read_bytes()
        except OSError as exc:
            raise RunbookError(f"cannot read {src}: {exc.strerror}", hint="paths are relative to the playbook's directory") from None

    def _target(self, env: TaskEnv) -> tuple[str, int | None, bytes]:
        dest = env.render(self.spec.dest)
        mode = int(self.spec.mode, 8) if self.spec.mode else None
        return dest, mode, self.content(env)

    def describe(self, env: TaskEnv) -> str | None:
        return f"{self.name} {self.spec.src} -> {self.spec.dest}"

    def probes_read_only(self) -> bool:
        # Its only commands read a file as the sudo user (sha256sum, base64): read-only by contract.
        return True

    @staticmethod
    def _sudo_read(env: TaskEnv, path: str, want_content: bool) -> tuple[str | None, bytes | None]:
        """(sha256, bytes if asked and small enough) of a file read as the sudo user, in one round trip."""
        try:
            res = env.conn.run(["sh", "-c", _SUDO_READ, "sh", path, "1" if want_content else "0"],
                               timeout=env.step.timeout or 60.0, sudo=env.sudo())
        except ReadOnlyViolation:  # a dry run without read access to commands
            return None, None
        lines = res.stdout.split("\n", 1)
        digest = lines[0].strip()
        if res.rc != 0 or len(digest) != 64:
            return None, None
        if not want_content or res.truncated or len(lines) < 2:
            return digest, None    # output bounded by the connection: too large to diff here
        try:
            data = base64.b64decode(lines[1].strip(), validate=True)
        except ValueError:
            return digest, None
        return digest, data if hashlib.sha256(data).hexdigest() == digest else None

    def _compare(self, env: TaskEnv, dest: str, mode: int | None, data: bytes) -> tuple[bool, str, str | None, str]:
        """(needs change, reason, diff, state fingerprint) from one stat (and a read when it differs)."""
        st = env.conn.stat(dest)
        sudo_old = None
        if st.exists and st.sha256 is None and env.sudo():
            # Unreadable by the login user: compare as the user the step writes as.
            st.sha256, sudo_old = self._sudo_read(env, dest, want_content=st.size <= DIFF_LIMIT)
        want = hashlib.sha256(data).hexdigest()
        state = f"{st.sha256}:{st.mode:o}" if st.exists and st.mode is not None else ("absent" if not st.exists else str(st.sha256))
        if not st.exists:
            return True, f"{dest} does not exist", content_diff(None, data, dest), state
        content_same = st.sha256 == want
        mode_same = mode is None or st.mode == mode
        if content_same and mode_same:
            return False, "checksum and mode match", None, state
        reasons = []
        diff = None
        if not content_same:
            reasons.append("content differs")
            old = sudo_old if sudo_old is not None else (env.conn.read(dest) if st.size <= DIFF_LIMIT else None)
            diff = content_diff(old, data, dest) if old is not None else (
                f"large file {dest}: {st.size} bytes -> {len(data)} bytes\n")
        if not mode_same:
            reasons.append(f"mode {st.mode:04o} -> {mode:04o}")
        return True, ", ".join(reasons), diff, state

    def plan(self, env: TaskEnv) -> Prediction:
        dest, mode, data = self._target(env)
        change, reason, diff, state = self._compare(env, dest, mode, data)
        return Prediction(PredictionKind.CHANGE if change else PredictionKind.OK, reason, diff=diff, state=state, command=self.describe(env))

    def apply(self, env: TaskEnv) -> Outcome:
        dest, mode, data = self._target(env)
        change, reason, diff, _ = self._compare(env, dest, mode, data)
        if not change:
            return Outcome(changed=False, message=reason, command=self.describe(env))
        sudo = env.sudo()
        if sudo:
            argv = ["sh", "-c", _SUDO_WRITE, "sh", dest, f"{mode or 0o644:o}"]
            res = env.conn.run(argv, timeout=env.step.timeout, sudo=sudo, stdin=base64.b64encode(data).decode("ascii"))
            if res.rc != 0:
                return Outcome(failed=True, rc=res.rc, stderr=res.stderr, message=f"cannot install {dest}: {res.stderr.strip()}")
        else:
            try:
                env.conn.put(data, dest, mode)
            except OSError as exc:
                return Outcome(failed=True, message=f"cannot write {dest}: {exc}", command=self.describe(env))
        return Outcome(changed=True, message=reason, diff=diff, command=self.describe(env),
                       data={"dest": dest, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
