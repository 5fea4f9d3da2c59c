"""Bounded command output: each stream keeps a head and a tail; the middle is counted and dropped while reading.

A step that prints 200 MB on many hosts must not hold 200 MB per host on the controller. Both
built-in kinds read through `OutputCapture`, so their results agree: at most `limit` bytes of head
and `limit` bytes of tail per stream, the exact byte counts, and a marker line where bytes were left
out. Output of up to twice the limit is kept whole.
"""

from __future__ import annotations

from runbook.connections.base import CommandResult, ConnectOptions
from runbook.errors import RunbookError

#: Bytes of head and of tail kept per stream, unless ConnectOptions.output_limit says otherwise.
DEFAULT_OUTPUT_LIMIT: int = ConnectOptions.output_limit


def check_output_limit(limit: object) -> int:
    """Return a valid output limit (a positive number of bytes) or raise a RunbookError."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise RunbookError(f"invalid output limit {limit!r}",
                           hint="give the bytes of head and of tail to keep per stream, a positive integer (default 65536)")
    return limit


def size_text(count: int) -> str:
    """A byte count as people read it: `512 bytes`, `64 KiB`, `187.3 MiB`."""
    if count < 1024:
        return f"{count} bytes"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f}".removesuffix(".0") + f" {unit}"


def omission_marker(omitted: int, limit: int) -> str:
    """The line put between head and tail."""
    return f"\n... [runbook: {size_text(omitted)} of output omitted; {size_text(limit)} head and tail kept] ...\n"


def _whole_head(data: bytes) -> bytes:
    """Drop a UTF-8 sequence cut in two at the end, so the kept head decodes without a stray U+FFFD."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:           # a lead or ASCII byte: how long should its sequence be?
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            return data[:-back] if need > back else data
    return data


def _whole_tail(data: bytes) -> bytes:
    """Drop continuation bytes at the start, whose lead byte went with the omitted middle."""
    start = 0
    while start < min(3, len(data)) and data[start] & 0xC0 == 0x80:
        start += 1
    return data[start:]


class OutputCapture:
    """One stream of a command: the first and last `limit` bytes, and how many bytes there were."""

    __slots__ = ("head", "limit", "tail", "total")

    def __init__(self, limit: int = DEFAULT_OUTPUT_LIMIT) -> None:
        self.limit = check_output_limit(limit)
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        """Take the next chunk; what falls between head and tail is only counted."""
        self.total += len(data)
        room = self.limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            excess = len(self.tail) - self.limit
            if excess > 0:
                del self.tail[:excess]    # CPython trims a bytearray's front without copying the rest

    @property
    def truncated(self) -> bool:
        """Whether bytes were left out."""
        return self.total > len(self.head) + len(self.tail)

    def text(self) -> str:
        """The decoded output: whole, or head, the omission marker, and tail."""
        if not self.truncated:
            return (bytes(self.head) + bytes(self.tail)).decode("utf-8", errors="replace")
        head, tail = _whole_head(bytes(self.head)), _whole_tail(bytes(self.tail))
        omitted = self.total - len(head) - len(tail)
        return (head.decode("utf-8", errors="replace") + omission_marker(omitted, self.limit)
                + tail.decode("utf-8", errors="replace"))


def command_result(rc: int, out: OutputCapture, err: OutputCapture, duration: float, timed_out: bool) -> CommandResult:
    """The CommandResult of a command read through two captures."""
    return CommandResult(rc, out.text(), err.text(), duration, timed_out, stdout_bytes=out.total,
                         stderr_bytes=err.total, truncated=out.truncated or err.truncated)
