"""Facts: what a host is (OS, kernel, CPUs, memory, mounts, addresses, init, packages, sudo), gathered read-only.

One fixed shell script runs over the host's connection, in one round trip, and prints one JSON
object of raw text sections (no value is ever pasted into it). Everything is parsed here, on the
control machine, defensively: the host's output is untrusted, so oversize or malformed output is a
clear `FactsError`, and a section that does not parse (or a value with characters that do not
belong in it) leaves its fact null. Every key is documented in docs/playbook-format.md (Facts).
"""

from __future__ import annotations

import ipaddress
import json
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from runbook.connections import Connection
from runbook.errors import EXIT_TASK_FAILED, RunbookError

#: Bytes of gather output accepted; the script bounds every section well below this.
MAX_OUTPUT = 64 * 1024
#: Seconds the whole gather may take (each probe that could hang has its own 5 s limit inside).
GATHER_TIMEOUT = 60.0
MAX_MOUNTS = 128
MAX_TEXT = 256

# The script: fixed text, run as `sh -c SCRIPT` (POSIX sh, awk, coreutils-or-busybox). Each section
# is `@name` then its lines prefixed with `|`, so no output line can pose as another section; one
# awk turns them into a JSON object of strings, escaping per character (portable across awks).
GATHER_SCRIPT = r"""
PATH="$PATH:/usr/sbin:/sbin:/usr/bin:/bin"; export PATH; LC_ALL=C; export LC_ALL
if command -v timeout >/dev/null 2>&1; then T="timeout 5"; else T=""; fi
sec() { printf '@%s\n' "$1"; }
emit() { head -c 16384 | cut -c1-512 | sed 's/^/|/'; }
{
sec system; uname -s 2>/dev/null | emit
sec kernel; uname -r 2>/dev/null | emit
sec machine; uname -m 2>/dev/null | emit
sec hostname; { hostname 2>/dev/null || uname -n 2>/dev/null; } | emit
sec fqdn; $T hostname -f 2>/dev/null | emit
sec cpus; { getconf _NPROCESSORS_ONLN 2>/dev/null || nproc 2>/dev/null; } | emit
sec os_release; { cat /etc/os-release 2>/dev/null || cat /usr/lib/os-release 2>/dev/null; } | emit
sec meminfo; grep -E '^(MemTotal|MemAvailable):' /proc/meminfo 2>/dev/null | emit
sec df; $T df -P -k 2>/dev/null | head -n 129 | emit
sec fstypes; awk '{print $2, $3}' /proc/mounts 2>/dev/null | head -n 512 | emit
sec route4; $T ip -4 route get 1.1.1.1 2>/dev/null | head -n 2 | emit
sec route6; $T ip -6 route get 2001:4860:4860::8888 2>/dev/null | head -n 2 | emit
sec init; { if [ -d /run/systemd/system ]; then echo systemd;
  elif [ -x /sbin/openrc-run ] || [ -x /usr/sbin/openrc-run ]; then echo openrc;
  else cat /proc/1/comm 2>/dev/null; fi; } | emit
sec pkg; for p in apt-get dnf yum zypper apk pacman emerge pkg brew; do
  if command -v "$p" >/dev/null 2>&1; then echo "$p"; break; fi; done | emit
sec user; id -un 2>/dev/null | emit
sec uid; id -u 2>/dev/null | emit
sec sudo; if command -v sudo >/dev/null 2>&1 && $T sudo -n true </dev/null >/dev/null 2>&1; then echo yes;
  else echo no; fi | emit
} | awk '
function esc(s,   out, i, c, n) {
  out = ""; n = length(s)
  for (i = 1; i <= n; i++) {
    c = substr(s, i, 1)
    if (c == "\\") out = out "\\\\"
    else if (c == "\"") out = out "\\\""
    else if (c == "\t") out = out " "
    else if (c < " " || c == "\177") out = out ""
    else out = out c
  }
  return out
}
BEGIN { printf "{"; n = 0; open = 0 }
/^@/ { if (open) printf "\""; printf "%s\"%s\": \"", (n ? ", " : ""), esc(substr($0, 2)); n++; open = 1; first = 1; next }
/^\|/ { if (!open) next; printf "%s%s", (first ? "" : "\\n"), esc(substr($0, 2)); first = 0; next }
END { if (open) printf "\""; printf "}\n" }
'
"""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,252}$")           # host names, FQDNs
_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+~:-]{0,127}$")      # kernel release, versions, ids
_WORD = re.compile(r"^[a-z0-9][a-z0-9_.+-]{0,63}$")               # init system, package manager
_IFACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,31}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# os-release ID (and ID_LIKE) -> family; the first family an ID or ID_LIKE word names wins.
_FAMILIES = {
    "debian": "debian", "ubuntu": "debian", "linuxmint": "debian", "raspbian": "debian", "pop": "debian",
    "kali": "debian", "devuan": "debian", "elementary": "debian",
    "rhel": "redhat", "fedora": "redhat", "centos": "redhat", "rocky": "redhat", "almalinux": "redhat",
    "ol": "redhat", "amzn": "redhat", "scientific": "redhat",
    "sles": "suse", "suse": "suse", "opensuse": "suse", "opensuse-leap": "suse", "opensuse-tumbleweed": "suse",
    "arch": "arch", "manjaro": "arch", "endeavouros": "arch",
    "alpine": "alpine", "gentoo": "gentoo", "void": "void", "nixos": "nixos",
}
_PACKAGE_MANAGERS = {"apt-get": "apt", "dnf": "dnf", "yum": "yum", "zypper": "zypper", "apk": "apk",
                     "pacman": "pacman", "emerge": "portage", "pkg": "pkg", "brew": "brew"}


class FactsError(RunbookError):
    """Facts could not be gathered on a host (the script failed, or its output was unusable)."""

    exit_code = EXIT_TASK_FAILED   # like a failed task: the host answered, the gather did not work

    def __init__(self, host: str, reason: str):
        super().__init__(f"facts of {host}: {reason}",
                         hint="`runbook facts HOST -i INVENTORY` shows what the gather finds on a host")
        self.host = host
        self.reason = reason


@dataclass(frozen=True)
class Mount:
    """One mounted file system, as `df -P` reports it (sizes in bytes)."""

    mount: str
    device: str
    fstype: str | None
    size_bytes: int
    used_bytes: int
    available_bytes: int
    used_percent: float | None


@dataclass(frozen=True)
class Route:
    """The route the host would use for the internet: its source address, interface and gateway."""

    address: str
    interface: str | None
    gateway: str | None


@dataclass(frozen=True)
class Facts:
    """What one host is; a fact the host did not report (or reported unreadably) is None."""

    os_family: str | None = None
    distribution: str | None = None
    distribution_version: str | None = None
    distribution_release: str | None = None
    distribution_name: str | None = None
    system: str | None = None
    kernel: str | None = None
    architecture: str | None = None
    hostname: str | None = None
    fqdn: str | None = None
    cpu_count: int | None = None
    memory_total_bytes: int | None = None
    memory_available_bytes: int | None = None
    mounts: tuple[Mount, ...] = ()
    default_ipv4: Route | None = None
    default_ipv6: Route | None = None
    init_system: str | None = None
    package_manager: str | None = None
    user: str | None = None
    uid: int | None = None
    can_sudo: bool | None = None
    problems: tuple[str, ...] = field(default=())   # sections left null, and why (for `runbook facts`)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: what templates see as `facts` and `runbook facts` prints."""
        out = asdict(self)
        out["mounts"] = [dict(m) for m in out["mounts"]]
        out["problems"] = list(self.problems)
        return out


# --- parsing -----------------------------------------------------------------------------------------


def parse_gather(host: str, stdout: str, *, truncated: bool = False) -> Facts:
    """The facts in a gather's output; FactsError when it is oversize or not the JSON object the script prints."""
    if truncated or len(stdout.encode("utf-8", errors="replace")) > MAX_OUTPUT:
        raise FactsError(host, f"the gather printed more than {MAX_OUTPUT // 1024} KiB (not what the script prints)")
    try:
        doc = json.loads(stdout)
    except (ValueError, RecursionError) as exc:
        raise FactsError(host, f"the gather's output is not JSON ({type(exc).__name__} at {_where(exc)})") from None
    if not isinstance(doc, dict):
        raise FactsError(host, f"the gather's output is JSON {type(doc).__name__}, not an object")
    sections = {str(k): v for k, v in doc.items() if isinstance(v, str)}
    return _Parser(sections).facts()


def _where(exc: Exception) -> str:
    pos = getattr(exc, "pos", None)
    return f"character {pos}" if isinstance(pos, int) else "the start"


def clean_text(value: str, limit: int = MAX_TEXT) -> str | None:
    """Free text from a host: control characters dropped, trimmed, bounded; None when empty."""
    text = _CONTROL.sub("", value).strip()
    return text[:limit] or None


def _match(pattern: re.Pattern[str], value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value if pattern.match(value) else None


def _int(value: str | None, *, low: int = 0, high: int = 2 ** 62) -> int | None:
    try:
        n = int((value or "").strip())
    except ValueError:
        return None
    return n if low <= n <= high else None


class _Parser:
    """Turns the raw sections into typed facts, field by field; what does not parse stays None."""

    def __init__(self, sections: Mapping[str, str]):
        self.raw = sections
        self.problems: list[str] = []

    def line(self, name: str) -> str | None:
        text = self.raw.get(name, "")
        first = text.split("\n", 1)[0].strip()
        return first or None

    def checked(self, name: str, pattern: re.Pattern[str]) -> str | None:
        value = self.line(name)
        found = _match(pattern, value)
        if value is not None and found is None:
            self.problems.append(f"{name}: unexpected characters, left null")
        return found

    def facts(self) -> Facts:
        release = os_release(self.raw.get("os_release", ""))
        system = self.checked("system", _TOKEN)
        total, available = self.memory()
        sudo = self.line("sudo")
        return Facts(
            os_family=os_family(release.get("ID"), release.get("ID_LIKE"), system),
            distribution=_match(_TOKEN, release.get("ID", "").lower() or None),
            distribution_version=_match(_TOKEN, release.get("VERSION_ID")),
            distribution_release=_match(_TOKEN, release.get("VERSION_CODENAME")),
            distribution_name=clean_text(release.get("PRETTY_NAME") or release.get("NAME") or ""),
            system=system, kernel=self.checked("kernel", _TOKEN), architecture=self.checked("machine", _TOKEN),
            hostname=self.checked("hostname", _NAME), fqdn=self.checked("fqdn", _NAME),
            cpu_count=_int(self.line("cpus"), low=1, high=1 << 20),
            memory_total_bytes=total, memory_available_bytes=available,
            mounts=tuple(self.mounts()),
            default_ipv4=route(self.raw.get("route4", ""), 4), default_ipv6=route(self.raw.get("route6", ""), 6),
            init_system=_match(_WORD, (self.line("init") or "").lower() or None),
            package_manager=_PACKAGE_MANAGERS.get(self.line("pkg") or ""),
            user=self.checked("user", _NAME), uid=_int(self.line("uid"), high=2 ** 32),
            can_sudo={"yes": True, "no": False}.get(sudo or ""),
            problems=tuple(self.problems))

    def memory(self) -> tuple[int | None, int | None]:
        values: dict[str, int] = {}
        for ln in self.raw.get("meminfo", "").split("\n"):
            hit = re.match(r"^(MemTotal|MemAvailable):\s+(\d{1,15})\s*kB\s*$", ln.strip())
            if hit:
                values[hit.group(1)] = int(hit.group(2)) * 1024
        return values.get("MemTotal"), values.get("MemAvailable")

    def mounts(self) -> Iterator[Mount]:
        types: dict[str, str] = {}
        for ln in self.raw.get("fstypes", "").split("\n"):
            parts = ln.split(" ")
            if len(parts) == 2 and _match(_TOKEN, parts[1]):
                types[_unescape_mount(parts[0])] = parts[1]
        count = 0
        for ln in self.raw.get("df", "").split("\n")[1:]:
            mount = _df_line(ln, types)
            if mount is not None and count < MAX_MOUNTS:
                count += 1
                yield mount


def _unescape_mount(text: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash in paths as octal escapes (`\\040`)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _df_line(line: str, types: Mapping[str, str]) -> Mount | None:
    """One `df -P -k` line: device, 1K-blocks, used, available, capacity, mount point (which may hold spaces)."""
    parts = line.split(None, 5)
    if len(parts) != 6:
        return None
    device, blocks, used, avail, _capacity, mount = parts
    numbers = [_int(v, high=2 ** 52) for v in (blocks, used, avail)]
    if any(n is None for n in numbers):
        return None
    size, used_k, avail_k = (n * 1024 for n in numbers if n is not None)
    path = clean_text(mount, 4096)
    if path is None or not path.startswith("/"):
        return None
    percent = round(used_k * 100 / (used_k + avail_k), 1) if used_k + avail_k else None
    return Mount(mount=path, device=clean_text(device, 1024) or "", fstype=types.get(path), size_bytes=size,
                 used_bytes=used_k, available_bytes=avail_k, used_percent=percent)


def os_release(text: str) -> dict[str, str]:
    """The KEY=value pairs of /etc/os-release (quotes removed, control characters dropped)."""
    out: dict[str, str] = {}
    for ln in text.split("\n")[:200]:
        hit = re.match(r"^([A-Z][A-Z0-9_]{0,63})=(.*)$", ln.strip())
        if not hit:
            continue
        value = hit.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        out[hit.group(1)] = _CONTROL.sub("", value)[:MAX_TEXT]
    return out


def os_family(os_id: str | None, id_like: str | None, system: str | None) -> str | None:
    """The family (debian, redhat, suse, arch, alpine, ...) from os-release, else from the kernel's name."""
    for word in [(os_id or "").lower(), *(id_like or "").lower().split()]:
        if word in _FAMILIES:
            return _FAMILIES[word]
    if system:
        name = system.lower()
        if name == "linux":
            return _match(_WORD, (os_id or "").lower() or None) or "linux"
        return _match(_WORD, name)
    return None


def route(text: str, version: int) -> Route | None:
    """`ip route get` output: `DEST [via GW] dev IFACE [src ADDR] ...`; None without a usable source address."""
    words = text.split("\n", 1)[0].split()
    values = {words[i]: words[i + 1] for i in range(len(words) - 1) if words[i] in ("via", "dev", "src")}
    address = _ip(values.get("src"), version)
    if address is None:
        return None
    return Route(address=address, interface=_match(_IFACE, values.get("dev")), gateway=_ip(values.get("via"), version))


def _ip(text: str | None, version: int) -> str | None:
    try:
        addr = ipaddress.ip_address((text or "").strip())
    except ValueError:
        return None
    return str(addr) if addr.version == version else None


# --- gathering and the run's store -----------------------------------------------------------------


def gather(host: str, conn: Connection) -> Facts:
    """Run the gather script over an open connection (read-only by contract) and parse what it prints."""
    result = conn.run(GATHER_SCRIPT, timeout=GATHER_TIMEOUT)
    if result.timed_out:
        raise FactsError(host, f"the gather did not finish within {GATHER_TIMEOUT:.0f}s")
    if result.rc != 0 or not result.stdout.strip():
        err = clean_text(result.stderr.strip().split("\n")[-1] if result.stderr.strip() else "", 200)
        raise FactsError(host, f"the gather script failed (rc={result.rc})" + (f": {err}" if err else ""))
    return parse_gather(host, result.stdout, truncated=result.truncated)


class FactStore:
    """The facts of one run, per host: gathered once (the first caller gathers, others wait), failures kept too.

    It lives beside the run's registers and pickles without its locks, so a distributed run can ship
    what was gathered (`snapshot`) and seed a store elsewhere (`FactStore(known)`).
    """

    def __init__(self, known: Mapping[str, Facts] | None = None,
                 gatherer: Callable[[str, Connection], Facts] = gather):
        self._known: dict[str, Facts] = dict(known or {})
        self._failed: dict[str, FactsError] = {}
        self.gatherer = gatherer   # a distributed run's controller asks a host's worker instead
        self._lock = threading.Lock()
        self._host_locks: dict[str, threading.Lock] = {}
        self._dicts: dict[str, dict[str, Any]] = {}
        self.gathers = 0   # how many gathers ran (one per host per run)

    def get(self, host: str, conn: Callable[[], Connection]) -> Facts:
        """The host's facts, gathered over `conn()` on first use; the same FactsError again if that failed."""
        with self._lock:
            if host in self._known:
                return self._known[host]
            lock = self._host_locks.setdefault(host, threading.Lock())
        with lock:
            with self._lock:
                if host in self._known:
                    return self._known[host]
                if host in self._failed:
                    raise self._failed[host]
                self.gathers += 1
            try:
                facts = self.gatherer(host, conn())
            except FactsError as exc:
                with self._lock:
                    self._failed[host] = exc
                raise
            with self._lock:
                self._known[host] = facts
            return facts

    def put(self, host: str, facts: Facts) -> None:
        """Facts of `host` gathered by another process of the run; the first ones a host gets stay."""
        with self._lock:
            self._known.setdefault(host, facts)

    def known(self, host: str) -> Facts | None:
        """The host's facts when already gathered, without gathering."""
        with self._lock:
            return self._known.get(host)

    def values(self, host: str) -> dict[str, Any] | None:
        """The host's facts as templates see them (made once per host, not per task), or None before the gather."""
        with self._lock:
            found = self._dicts.get(host)
            if found is None and host in self._known:
                found = self._dicts[host] = self._known[host].as_dict()
            return found

    def snapshot(self) -> dict[str, Facts]:
        """Every host's gathered facts (for shipping to another process)."""
        with self._lock:
            return dict(self._known)

    def __getstate__(self) -> dict[str, Any]:
        return {"known": self.snapshot(), "gatherer": self.gatherer}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["known"], state["gatherer"])  # type: ignore[misc]


class FactsView(Mapping[str, Any]):
    """`facts` in a template before they were gathered: the first read gathers them (once per host per run)."""

    def __init__(self, store: FactStore, host: str, conn: Callable[[], Connection]):
        self._store = store
        self._host = host
        self._conn = conn
        self._value: dict[str, Any] | None = None

    def _facts(self) -> dict[str, Any]:
        if self._value is None:
            self._store.get(self._host, self._conn)
            self._value = self._store.values(self._host)
        assert self._value is not None   # get() returned: the facts are known
        return self._value

    def __getitem__(self, key: str) -> Any:
        return self._facts()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._facts())

    def __len__(self) -> int:
        return len(self._facts())


__all__ = ["GATHER_SCRIPT", "FactStore", "Facts", "FactsError", "FactsView", "Mount", "Route", "gather",
           "parse_gather"]
