"""`wait_for:` — wait until a TCP port accepts (seen from the host), a file exists, or a command succeeds."""

from __future__ import annotations

import shlex
import time

from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from runbook.actions.base import Action, FieldKind, Outcome, Prediction, PredictionKind, TaskEnv, TemplatedField, string_fields
from runbook.errors import RunbookError
from runbook.fields import Duration, Int, Strict

# Probe a TCP port from the host itself with whatever it has: bash's /dev/tcp, nc, or python3.
_PORT_PROBE = ("h={h}; p={p}; "
               "if command -v bash >/dev/null 2>&1; then bash -c \"exec 3<>/dev/tcp/$h/$p\" 2>/dev/null; "
               "elif command -v nc >/dev/null 2>&1; then nc -z -w 2 \"$h\" \"$p\"; "
               "else python3 -c \"import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 2)\" \"$h\" \"$p\" 2>/dev/null; fi")


class WaitForSpec(Strict):
    """Wait until a TCP port accepts, a file exists, or a command succeeds."""

    port: Annotated[Int, Field(ge=1, le=65535)] | Annotated[str, Field(pattern=r"\{\{")] | None = Field(
        None, description="A TCP port, or a template that renders to one, e.g. '{{ app_port }}'.")
    host: str = "127.0.0.1"
    path: str | None = None
    command: str | None = None
    state: Literal["present", "absent", "started", "stopped"] = "present"
    timeout: Duration = 60.0
    interval: Duration = 1.0

    @model_validator(mode="after")
    def _one_target(self) -> WaitForSpec:
        targets = [k for k in ("port", "path", "command") if getattr(self, k) is not None]
        if len(targets) != 1:
            raise ValueError("wait_for needs exactly one of `port`, `path` or `command`")
        return self


class WaitFor(Action):
    """Wait until a TCP port accepts (seen from the host), a file exists, or a command succeeds."""

    name = "wait_for"
    spec_type: ClassVar[Any] = WaitForSpec
    rerun_on_apply = True

    def fields(self) -> Iterator[TemplatedField]:
        yield from string_fields(self.spec, ("host", "path", "port"))
        yield from string_fields(self.spec, ("command",), FieldKind.SHELL)

    def probes_read_only(self) -> bool:
        # The port and path probes are runbook's own read-only commands; a user's `command` may write,
        # so a dry run does not run it (mark the step read_only to run it for real in a plan).
        return self.spec.command is None

    def _probe(self, env: TaskEnv) -> tuple[str, bool]:
        """(description, wanted rc==0): the probe command and whether success means the condition holds."""
        spec = self.spec
        if spec.port is not None:
            host = env.render(spec.host)
            cmd = _PORT_PROBE.format(h=shlex.quote(host), p=self._port(env))
            return cmd, spec.state in ("present", "started")
        if spec.path is not None:
            return f"test -e {shlex.quote(env.render(spec.path))}", spec.state in ("present", "started")
        return env.render(spec.command), spec.state in ("present", "started")

    def _port(self, env: TaskEnv) -> int:
        """The port, rendered when it is a template."""
        text = str(env.render(self.spec.port)).strip() if isinstance(self.spec.port, str) else str(self.spec.port)
        if not text.isdigit() or not 1 <= int(text) <= 65535:
            raise RunbookError(f"wait_for port `{self.spec.port}` rendered to {text!r}, expected a port number 1-65535",
                               hint="check the variable it refers to")
        return int(text)

    def describe(self, env: TaskEnv) -> str | None:
        spec = self.spec
        if spec.port is not None:
            return f"wait for port {env.render(spec.host)}:{self._port(env)} ({spec.state})"
        if spec.path is not None:
            return f"wait for {env.render(spec.path)} ({spec.state})"
        return f"wait for `{env.render(spec.command)}` to succeed"

    def _holds(self, env: TaskEnv) -> bool:
        cmd, want_success = self._probe(env)
        res = env.conn.run(cmd, timeout=max(5.0, self.spec.interval * 2))
        return (res.rc == 0) == want_success

    def plan(self, env: TaskEnv) -> Prediction:
        if not self.probes_read_only():
            return Prediction(PredictionKind.UNKNOWN, "a wait_for command is not run in a dry run (it might change "
                              "something); mark the step read_only to run it in plans", command=self.describe(env))
        if self._holds(env):
            return Prediction(PredictionKind.OK, "the condition holds now", command=self.describe(env))
        return Prediction(PredictionKind.UNKNOWN, f"the condition does not hold now; the run would wait up to {self.spec.timeout:g}s",
                          command=self.describe(env))

    def apply(self, env: TaskEnv) -> Outcome:
        deadline = time.monotonic() + self.spec.timeout
        waited = 0.0
        start = time.monotonic()
        while True:
            if self._holds(env):
                waited = time.monotonic() - start
                return Outcome(changed=False, message=f"condition met after {waited:.1f}s", command=self.describe(env))
            if time.monotonic() >= deadline or env.cancelled():
                return Outcome(failed=True, message=f"timed out after {self.spec.timeout:g}s: {self.describe(env)}",
                               command=self.describe(env))
            time.sleep(min(self.spec.interval, max(0.0, deadline - time.monotonic())))
