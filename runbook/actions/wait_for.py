"""`wait_for:` — wait until a TCP port accepts (seen from the host), a file exists, or a command succeeds."""

from __future__ import annotations

import shlex
import time

from runbook.actions.base import Action, Outcome, Prediction, TaskEnv
from runbook.errors import RunbookError

# Probe a TCP port from the host itself with whatever it has: bash's /dev/tcp, nc, or python3.
_PORT_PROBE = ("h={h}; p={p}; "
               "if command -v bash >/dev/null 2>&1; then bash -c \"exec 3<>/dev/tcp/$h/$p\" 2>/dev/null; "
               "elif command -v nc >/dev/null 2>&1; then nc -z -w 2 \"$h\" \"$p\"; "
               "else python3 -c \"import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 2)\" \"$h\" \"$p\" 2>/dev/null; fi")


class WaitFor(Action):
    """Poll a condition on the host until it holds or the timeout passes."""

    name = "wait_for"

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
        if self._holds(env):
            return Prediction("ok", "the condition holds now", command=self.describe(env))
        return Prediction("unknown", f"the condition does not hold now; the run would wait up to {self.spec.timeout:g}s",
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
