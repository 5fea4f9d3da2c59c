"""`fetch:` — copy a file from the host into DEST/HOST/ on the control machine."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from collections.abc import Iterator
from typing import Any, ClassVar

from pydantic import Field

from runbook.actions.base import Action, Outcome, Prediction, PredictionKind, TaskEnv, TemplatedField, string_fields
from runbook.errors import RunbookError
from runbook.fields import Strict


class FetchSpec(Strict):
    """Copy a remote file to a local directory, one subdirectory per host."""

    src: str = Field(description="Path on the host.")
    dest: str = Field(description="Local directory; the file lands in DEST/HOST/basename.")


class Fetch(Action):
    """Copy a remote file to a local directory, one subdirectory per host; `changed` when the local copy changed."""

    name = "fetch"
    spec_type: ClassVar[Any] = FetchSpec

    def fields(self) -> Iterator[TemplatedField]:
        return string_fields(self.spec, ("src", "dest"))

    def _paths(self, env: TaskEnv) -> tuple[str, Path]:
        src = str(env.render(self.spec.src))
        # Relative destinations start from the current directory, where the operator runs runbook.
        root = Path(os.path.expanduser(str(env.render(self.spec.dest))))
        # Host names and remote file names are untrusted: each becomes one safe path component, and the
        # result must stay inside the destination (a host named `../../x` must not write elsewhere).
        dest = root / safe_component(env.host) / safe_component(os.path.basename(src.rstrip("/")))
        real_root = root.resolve()
        if real_root not in dest.resolve().parents:
            raise RunbookError(f"fetch destination {dest} is outside {root}",
                               hint="a host name or a symbolic link under the destination points elsewhere")
        return src, dest

    def describe(self, env: TaskEnv) -> str | None:
        src, dest = self._paths(env)
        return f"fetch {src} -> {dest}"

    def plan(self, env: TaskEnv) -> Prediction:
        src, dest = self._paths(env)
        st = env.conn.stat(src)
        if not st.exists:
            return Prediction(PredictionKind.UNKNOWN, f"{src} does not exist on the host now; the fetch would fail unless an "
                              "earlier step creates it", state="absent", command=self.describe(env))
        local = hashlib.sha256(dest.read_bytes()).hexdigest() if dest.is_file() else None
        if local is not None and local == st.sha256:
            return Prediction(PredictionKind.OK, f"{dest} already matches ({st.size} bytes)", state=st.sha256, command=self.describe(env))
        return Prediction(PredictionKind.CHANGE, f"would fetch {st.size} bytes to {dest}", state=st.sha256,
                          command=self.describe(env), data={"size": st.size})

    def apply(self, env: TaskEnv) -> Outcome:
        src, dest = self._paths(env)
        dest.parent.mkdir(parents=True, exist_ok=True)
        before = hashlib.sha256(dest.read_bytes()).hexdigest() if dest.is_file() else None
        tmp = dest.with_name(f".{dest.name}.runbook-tmp")
        try:
            env.conn.get(src, str(tmp))
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            return Outcome(failed=True, message=f"cannot fetch {src}: {exc}", command=self.describe(env))
        after = hashlib.sha256(tmp.read_bytes()).hexdigest()
        os.replace(tmp, dest)
        return Outcome(changed=before != after, message=f"{dest.stat().st_size} bytes -> {dest}",
                       command=self.describe(env), data={"dest": str(dest), "size": dest.stat().st_size, "sha256": after})


def safe_component(name: str) -> str:
    """One path component from untrusted text: no separators, no `.`/`..`, no control characters."""
    text = re.sub(r"[^A-Za-z0-9._@+-]", "_", name)[:200]
    return text if text.strip(".") else "_" + text
