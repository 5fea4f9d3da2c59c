"""SSH host keys: OpenSSH known_hosts files read the way OpenSSH reads them, and one decision per offered key.

Every key a server offers (the target's and each jump host's) is judged here, never by paramiko's
own store. In this order, and in every mode (`strict`, `accept-new`, `off`):

1. a matching `@revoked` line with this key: refused, even if another line trusts the key;
2. a plain line for the host with this key: trusted;
3. plain lines for the host, none with this key: the key has CHANGED, refused;
4. a matching `@cert-authority` line: the host expects a CA-signed host certificate, which runbook
   cannot check; refused in `strict` and `accept-new` (never recorded), accepted as unknown in `off`;
5. otherwise the host is unknown: refused (`strict`), recorded (`accept-new`) or accepted (`off`).

A line applies to a host when its host field matches the name the host is looked up by: `host` on
port 22, `[host]:port` otherwise. Host fields follow OpenSSH: comma-separated patterns with `*` and
`?`, `!pattern` excludes, case-insensitive, or one hashed name (`|1|salt|hash`). Plain lines of key
types paramiko cannot use are ignored (as OpenSSH ignores what it cannot parse); `@revoked` lines
count whatever their type.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import hmac
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from runbook.errors import HostKeyError, RunbookError

if TYPE_CHECKING:   # paramiko is imported where a key is parsed: a cluster's controller never needs it
    import paramiko

HOST_KEY_MODES = ("strict", "accept-new", "off")
SYSTEM_KNOWN_HOSTS = Path("/etc/ssh/ssh_known_hosts")
REVOKED, CERT_AUTHORITY = "@revoked", "@cert-authority"

# Serialises appends to known-hosts files within this process (flock covers other processes).
_KNOWN_HOSTS_LOCK = threading.Lock()
# What may be written as a host name: anything else could turn the new line into a pattern or a marker.
_RECORDABLE = re.compile(r"[A-Za-z0-9._:%\[\]-]+")

Verdict = Literal["trusted", "revoked", "changed", "certificate", "unknown"]


def fingerprint_of(blob: bytes) -> str:
    """Return the OpenSSH-style fingerprint of a public key blob: `SHA256:` and unpadded base64."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def fingerprint(key: paramiko.PKey) -> str:
    """Return a key's OpenSSH-style fingerprint: `SHA256:` and unpadded base64."""
    return fingerprint_of(key.asbytes())


def known_hosts_name(host: str, port: int | None) -> str:
    """Return the name a host is listed under in known_hosts (`[host]:port` off port 22)."""
    return host if port in (None, 22) else f"[{host}]:{port}"


@lru_cache(maxsize=4096)
def _wildcard(pattern: str) -> re.Pattern[str]:
    # Only * and ? are special (as in OpenSSH): `[host]:port` brackets and dots are literal.
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern), re.DOTALL)


def host_matches(field_text: str, name: str) -> bool:
    """Whether a known_hosts host field applies to `name` (OpenSSH's rules: patterns, `!`, hashes)."""
    name = name.lower()
    if field_text.startswith("|1|"):
        parts = field_text.split("|")
        if len(parts) != 4:
            return False
        try:
            salt, digest = base64.b64decode(parts[2], validate=True), base64.b64decode(parts[3], validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), digest)
    positive = False
    for pattern in field_text.lower().split(","):
        negated = pattern.startswith("!")
        if _wildcard(pattern[1:] if negated else pattern).fullmatch(name):
            if negated:
                return False      # an excluded name never matches, whatever else the line lists
            positive = True
    return positive


@dataclass(frozen=True)
class KnownHost:
    """One usable line of a known_hosts file: where it is, its marker, host field and key."""

    path: Path
    line: int
    marker: str                    # "", "@revoked" or "@cert-authority"
    hosts: str
    key_type: str
    blob: bytes
    usable: bool = field(default=True, compare=False)   # paramiko can parse the key

    @property
    def where(self) -> str:
        """`file:line`, for messages."""
        return f"{self.path}:{self.line}"

    @property
    def fingerprint(self) -> str:
        """The key's OpenSSH-style fingerprint."""
        return fingerprint_of(self.blob)


def parse_line(path: Path, number: int, text: str) -> KnownHost | None:
    """Parse one known_hosts line; None for comments, blanks and lines OpenSSH would skip too."""
    words = text.split()
    if not words or words[0].startswith("#"):
        return None
    marker = ""
    if words[0].startswith("@"):
        marker, words = words[0], words[1:]
        if marker not in (REVOKED, CERT_AUTHORITY):
            return None
    if len(words) < 3:
        return None
    hosts, key_type, encoded = words[:3]
    try:
        blob = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return None
    usable = True
    if not marker:
        import paramiko

        try:
            paramiko.PKey.from_type_string(key_type, blob)
        except Exception:  # a type paramiko lacks (ssh-dss, sk-*) or a corrupt key: OpenSSH may still use it
            usable = False
    return KnownHost(path, number, marker, hosts, key_type, blob, usable)


_CACHE: dict[Path, tuple[tuple[int, int, int, int], list[KnownHost]]] = {}
_CACHE_LOCK = threading.Lock()


def read_known_hosts(paths: Sequence[Path], *, fresh: bool = False) -> list[KnownHost]:
    """Every usable line of these files, in order; missing files are empty, unreadable ones an error."""
    found: list[KnownHost] = []
    for path in paths:
        try:
            st = path.stat()
            signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            with _CACHE_LOCK:
                cached = None if fresh else _CACHE.get(path)
            if cached is not None and cached[0] == signature:
                found.extend(cached[1])
                continue
            lines = path.read_text(errors="replace").splitlines()
        except (FileNotFoundError, NotADirectoryError):
            continue
        except (PermissionError, IsADirectoryError) as exc:
            raise RunbookError(f"cannot read known-hosts file {path}: {exc.strerror}",
                               hint="fix its permissions or pass another file with --known-hosts") from exc
        entries = [e for n, text in enumerate(lines, 1) if (e := parse_line(path, n, text)) is not None]
        with _CACHE_LOCK:  # parsing keys is the slow part; a run opens one connection per host
            _CACHE[path] = (signature, entries)
        found.extend(entries)
    return found


@dataclass(frozen=True)
class Judgement:
    """What known_hosts says about one offered key, with the lines that say it."""

    verdict: Verdict
    lines: tuple[KnownHost, ...] = ()


def judge(entries: Sequence[KnownHost], name: str, blob: bytes) -> Judgement:
    """Decide about an offered key blob for a host name (the order is the module docstring's)."""
    mine = [e for e in entries if host_matches(e.hosts, name)]
    revoked = [e for e in mine if e.marker == REVOKED and e.blob == blob]
    if revoked:
        return Judgement("revoked", tuple(revoked))
    plain = [e for e in mine if not e.marker and e.usable]
    same = [e for e in plain if e.blob == blob]
    if same:
        return Judgement("trusted", tuple(same))
    if plain:
        return Judgement("changed", tuple(plain))
    authorities = [e for e in mine if e.marker == CERT_AUTHORITY]
    if authorities:
        return Judgement("certificate", tuple(authorities))
    return Judgement("unknown")


class HostKeyPolicy:
    """The host-key decision for one inventory host's connections (the target and its jump hosts)."""

    def __init__(self, who: str, mode: str, known_hosts: Path,
                 system_files: Sequence[Path] = (SYSTEM_KNOWN_HOSTS,)) -> None:
        if mode not in HOST_KEY_MODES:
            raise RunbookError(f"unknown host key checking mode {mode!r}", hint="use one of: " + ", ".join(HOST_KEY_MODES))
        self.who = who
        self.mode = mode
        self.known_hosts = known_hosts
        self.system_files = tuple(system_files)

    def _files(self) -> list[Path]:
        return [self.known_hosts, *self.system_files]

    def preferred_types(self, name: str) -> list[str]:
        """Key types known_hosts lists for the host, in file order (negotiated first, as OpenSSH does)."""
        types: list[str] = []
        for e in read_known_hosts(self._files()):
            if not e.marker and e.usable and e.key_type not in types and host_matches(e.hosts, name):
                types.append(e.key_type)
        return types

    def check(self, name: str, key: paramiko.PKey) -> None:
        """Accept the key offered for `name`, record it (accept-new), or raise HostKeyError."""
        judgement = judge(read_known_hosts(self._files()), name, key.asbytes())
        if judgement.verdict == "trusted":
            return
        if judgement.verdict == "unknown" and self.mode == "off":
            return
        if judgement.verdict == "certificate" and self.mode == "off":
            return  # cannot be checked here; off accepts what it cannot check, as for unknown hosts
        if judgement.verdict == "unknown" and self.mode == "accept-new":
            self._record(name, key)
            return
        raise self.refusal(name, key, judgement)

    def refusal(self, name: str, key: paramiko.PKey, judgement: Judgement) -> HostKeyError:
        """The error for a refused key: what known_hosts said, where, and what to do."""
        offered = f"{key.get_name()} {fingerprint(key)}"
        lines = judgement.lines
        if judgement.verdict == "revoked":
            return HostKeyError(
                self.who, f"host key for {name} is REVOKED: {offered} is marked @revoked at {lines[0].where}",
                hint="never trust this key again; the host needs a new key, verified out of band and added to known_hosts")
        if judgement.verdict == "changed":
            same_type = [e for e in lines if e.key_type == key.get_name()] or list(lines)
            expected = ", ".join(f"{e.key_type} {e.fingerprint} ({e.where})" for e in same_type[:3])
            more = f" and {len(same_type) - 3} more" if len(same_type) > 3 else ""
            return HostKeyError(
                self.who, f"host key for {name} has CHANGED: expected {expected}{more}, offered {offered}",
                hint="this may be an attack, or the host was reinstalled; verify the new fingerprint out of band, "
                     f"then remove the old line {same_type[0].where} (ssh-keygen -R '{name}' -f {same_type[0].path})")
        if judgement.verdict == "certificate":
            return HostKeyError(
                self.who, f"host {name} is covered by @cert-authority at {lines[0].where} and needs a CA-signed host "
                          f"certificate, which runbook does not support yet; it offered the plain key {offered}",
                hint=f"verify that fingerprint out of band, then add the host's plain key to {self.known_hosts} "
                     f"(ssh-keyscan -t {key.get_name()} -p PORT HOST >> {self.known_hosts})")
        return HostKeyError(
            self.who, f"unknown host key for {name} ({offered}); not in {self.known_hosts}",
            hint=f"verify the fingerprint, then add it (ssh-keyscan -p PORT HOST >> {self.known_hosts}) "
                 "or connect once with --host-key-checking accept-new")

    def _record(self, name: str, key: paramiko.PKey) -> None:
        """Append a first-seen key (accept-new), judging again under the lock: another writer may have won."""
        if not _RECORDABLE.fullmatch(name):
            raise HostKeyError(self.who, f"will not record a host key for {name!r}: the name has characters "
                                         "known_hosts would read as patterns or separators",
                               hint="check ansible_host and ~/.ssh/config HostName for this host")
        path = self.known_hosts
        with _KNOWN_HOSTS_LOCK:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "r+b") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                # Trust the file, not what was read before the handshake.
                judgement = judge(read_known_hosts(self._files(), fresh=True), name, key.asbytes())
                if judgement.verdict == "trusted":
                    return
                if judgement.verdict != "unknown":
                    raise self.refusal(name, key, judgement)
                size = os.fstat(fd).st_size
                handle.seek(max(0, size - 1))
                # Never glue the new line onto a last line that has no newline.
                lead = b"\n" if size and handle.read(1) != b"\n" else b""
                handle.write(lead + f"{name} {key.get_name()} {key.get_base64()}\n".encode())
                handle.flush()
