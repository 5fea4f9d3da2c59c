"""Real OpenSSH servers on 127.0.0.1 for tests and benchmarks.

One ``sshd -D -e -f CONFIG`` per test host, each on its own free port with its own ed25519 host key;
one generated client key logs in to all of them. Run as root, each host logs in as its own Unix
user (``rbt-h0``, ``rbt-h1``, ...; created once, reused, home cleared on start) so that each host
has its own home directory; otherwise every host is the current user, with a per-host working
directory as ``home``. Only processes this harness started are ever stopped.

Usage::

    with SSHDHarness(count=3) as hosts:
        hosts[0].port, hosts[0].user, hosts[0].key_file
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# Helpers and parallel sessions may set RUNBOOK_TEST_USER_PREFIX so that their test users do not collide.
USER_PREFIX = os.environ.get("RUNBOOK_TEST_USER_PREFIX", "rbt-h")
HOME_ROOT = Path("/home")
SUDOERS_DIR = Path("/etc/sudoers.d")


class SSHDUnavailable(RuntimeError):
    """sshd (or ssh-keygen) is not installed, so no real test hosts can start."""


@dataclass
class SSHHost:
    """One running test host: where it listens, who logs in, and how to trust it."""

    name: str
    address: str
    port: int
    user: str
    home: Path
    key_file: Path
    host_public_key: str          # a known_hosts line: "[127.0.0.1]:PORT ssh-ed25519 AAAA..."
    host_key_file: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    log_file: Path | None = None

    @property
    def known_hosts_name(self) -> str:
        """The name OpenSSH and paramiko look this host up by."""
        return f"[{self.address}]:{self.port}"

    def clear_home(self) -> None:
        """Empty the home (or working) directory, keeping the directory and its owner."""
        _empty_dir(self.home)

    def inventory_vars(self) -> dict[str, object]:
        """The Ansible-style connection variables that reach this host."""
        return {
            "ansible_host": self.address,
            "ansible_port": self.port,
            "ansible_user": self.user,
            "ansible_ssh_private_key_file": str(self.key_file),
        }

    def log(self) -> str:
        """Return what sshd wrote so far (for failure messages)."""
        if self.log_file and self.log_file.exists():
            return self.log_file.read_text(errors="replace")
        return ""


def write_known_hosts(path: Path | str, hosts: list[SSHHost]) -> Path:
    """Write a known_hosts file (0600) that trusts exactly these hosts."""
    path = Path(path)
    path.write_text("".join(h.host_public_key + "\n" for h in hosts))
    path.chmod(0o600)
    return path


def write_inventory(path: Path | str, hosts: list[SSHHost], host_vars: dict[str, dict] | None = None,
                    extra: dict[str, object] | None = None) -> Path:
    """Write an Ansible YAML inventory (`all: hosts: NAME: {...}`) for these hosts."""
    entries: dict[str, dict] = {}
    for h in hosts:
        entries[h.name] = {**h.inventory_vars(), **(host_vars or {}).get(h.name, {})}
    doc: dict[str, object] = {"all": {"hosts": entries}}
    if extra:
        doc["all"]["vars"] = dict(extra)  # type: ignore[index]
    path = Path(path)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def chown_tree(root: Path, user: str) -> None:
    """Give a seeded tree to the host's user, so its steps may change what the test prepared."""
    pw = pwd.getpwnam(user)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.lchown(name, pw.pw_uid, pw.pw_gid)


def seed(host: SSHHost, files: dict[str, bytes | str], modes: dict[str, int] | None = None) -> None:
    """Write files (relative to the host's home) owned by the host's user."""
    for rel, content in files.items():
        path = host.home / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        path.chmod((modes or {}).get(rel, 0o644))
    chown_tree(host.home, host.user)


def free_port() -> int:
    """Ask the kernel for a free loopback port (sshd retries if another process takes it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_sshd() -> str | None:
    """Return the path of sshd, or None."""
    return shutil.which("sshd") or next(
        (p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if os.access(p, os.X_OK)), None)


class SSHDHarness:
    """Start `count` sshd test hosts; stop them (and only them) on `stop()` or leaving `with`."""

    def __init__(self, count: int = 3, *, base_dir: Path | str | None = None,
                 per_host_users: bool | None = None, sudo_between_users: bool = True,
                 start_timeout: float = 10.0) -> None:
        self.count = count
        self._own_base = base_dir is None
        self.base_dir = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="runbook-sshd-"))
        self.per_host_users = (os.geteuid() == 0) if per_host_users is None else per_host_users
        self.sudo_between_users = sudo_between_users
        self.start_timeout = start_timeout
        self.hosts: list[SSHHost] = []
        self.client_key: Path = self.base_dir / "client_ed25519"
        self.sudoers_file: Path | None = None
        self.sshd = find_sshd()
        self._pending: list[subprocess.Popen[bytes]] = []
        self._users: list[tuple[str, Path]] = []

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> list[SSHHost]:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> list[SSHHost]:
        """Generate keys, create users, start every sshd in parallel, wait until each accepts."""
        if self.sshd is None or shutil.which("ssh-keygen") is None:
            raise SSHDUnavailable("sshd or ssh-keygen not found (install openssh-server)")
        if self.per_host_users and os.geteuid() == 0:
            # sshd refuses to start as root without its privilege-separation directory.
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        # Test users must reach their authorized_keys file here: sshd reads it as the user.
        self.base_dir.chmod(0o755)
        if self.per_host_users:
            blocked = [p for p in self.base_dir.parents if not os.stat(p).st_mode & 0o001]
            if blocked:
                raise RuntimeError(f"{blocked[0]} is not traversable by the test users; "
                                   "use a base_dir under /tmp (the default)")
        _keygen(self.client_key, "runbook-test-client")
        try:
            if self.per_host_users:
                # Serially: concurrent useradd calls fight over the /etc/passwd lock.
                self._users = [self._ensure_user(f"{USER_PREFIX}{i}") for i in range(self.count)]
            with ThreadPoolExecutor(max_workers=max(1, self.count)) as pool:
                self.hosts = list(pool.map(self._start_host, range(self.count)))
            if self.per_host_users and self.sudo_between_users:
                self._write_sudoers()
        except BaseException:
            self.stop()
            raise
        return self.hosts

    def stop(self) -> None:
        """Stop the sshd processes this harness started, and remove its sudoers drop-in."""
        for host in self.hosts:
            _terminate(host.process)
        for proc in self._pending:
            _terminate(proc)
        if self.sudoers_file is not None:
            self.sudoers_file.unlink(missing_ok=True)
            self.sudoers_file = None
        if self._own_base:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    # -- one host ------------------------------------------------------------------------------

    def _start_host(self, index: int) -> SSHHost:
        name = f"h{index}"
        hdir = self.base_dir / name
        hdir.mkdir(parents=True, exist_ok=True)
        if self.per_host_users:
            user, home = self._users[index]
        else:
            user = pwd.getpwuid(os.geteuid()).pw_name
            home = hdir / "home"
            home.mkdir(exist_ok=True)
        host_key = hdir / "ssh_host_ed25519_key"
        _keygen(host_key, f"runbook-test-{name}")
        authorized = hdir / "authorized_keys"
        shutil.copyfile(self.client_key.with_suffix(".pub"), authorized)
        authorized.chmod(0o644)
        pub = host_key.with_suffix(".pub").read_text().split()
        last_error = ""
        for _attempt in range(5):
            port = free_port()
            config = hdir / "sshd_config"
            log_file = hdir / "sshd.log"
            config.write_text(_sshd_config(port, host_key, authorized, hdir / "sshd.pid", user))
            with open(log_file, "wb") as log:
                proc = subprocess.Popen([self.sshd, "-D", "-e", "-f", str(config)],
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        start_new_session=True)
            self._pending.append(proc)
            if _wait_listening(port, proc, self.start_timeout):
                self._pending.remove(proc)
                host = SSHHost(name=name, address="127.0.0.1", port=port, user=user, home=home,
                               key_file=self.client_key,
                               host_public_key=f"[127.0.0.1]:{port} {pub[0]} {pub[1]}",
                               host_key_file=host_key, process=proc, log_file=log_file)
                return host
            _terminate(proc)
            self._pending.remove(proc)
            last_error = log_file.read_text(errors="replace")
            if "Address already in use" not in last_error:
                break
        raise RuntimeError(f"sshd for test host {name} did not start:\n{last_error}")

    def _ensure_user(self, user: str) -> tuple[str, Path]:
        """Create the Unix user once (reused across runs) and return it with an emptied home."""
        home = HOME_ROOT / user
        try:
            entry = pwd.getpwnam(user)
            home = Path(entry.pw_dir)
        except KeyError:
            subprocess.run(["useradd", "--create-home", "--home-dir", str(home), "--shell", "/bin/sh",
                            "--user-group", user], check=True, capture_output=True)
        # A fresh account is locked ("!"), and with UsePAM no sshd refuses locked accounts even for
        # keys; "*" means "no password" without locking.
        subprocess.run(["usermod", "-p", "*", user], check=True, capture_output=True)
        entry = pwd.getpwnam(user)
        home.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chown(home, entry.pw_uid, entry.pw_gid)
        _empty_dir(home)
        return user, home

    def _write_sudoers(self) -> None:
        """Let every test user sudo to every other test user (never to root), without a password."""
        if shutil.which("sudo") is None or not SUDOERS_DIR.is_dir():
            return
        # Drop-ins left by harnesses that were killed before stop(): their process is gone.
        for stale in SUDOERS_DIR.glob("runbook-tests-*"):
            pid = stale.name.removeprefix("runbook-tests-")
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                stale.unlink(missing_ok=True)
        users = [h.user for h in self.hosts]
        lines = [f"{u} ALL=({','.join(users)}) NOPASSWD: ALL\n" for u in users]
        # sudo ignores drop-ins whose names contain a dot, so no suffix.
        path = SUDOERS_DIR / f"runbook-tests-{os.getpid()}"
        tmp = path.with_name(path.name + "~tmp")  # names with "~" are ignored too, while checked
        tmp.write_text("".join(lines))
        tmp.chmod(0o440)
        check = subprocess.run(["visudo", "-c", "-q", "-f", str(tmp)], capture_output=True, text=True)
        if check.returncode != 0:
            tmp.unlink()
            raise RuntimeError(f"generated sudoers rules are invalid: {check.stderr}")
        os.replace(tmp, path)
        self.sudoers_file = path


def _sshd_config(port: int, host_key: Path, authorized: Path, pid_file: Path, user: str) -> str:
    return "\n".join([
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f"HostKey {host_key}",
        f"PidFile {pid_file}",
        f"AuthorizedKeysFile {authorized}",
        f"AllowUsers {user}",
        "UsePAM no",
        "StrictModes no",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "UseDNS no",
        "PrintMotd no",
        "PrintLastLog no",
        "LogLevel ERROR",
        "Subsystem sftp internal-sftp",
        "",
    ])


def _empty_dir(path: Path) -> None:
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _keygen(path: Path, comment: str) -> None:
    if path.exists():
        return
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True)


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Poll until the port answers with an SSH banner; False if sshd exited or time ran out."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
                if sock.recv(8).startswith(b"SSH-"):
                    return True
        except OSError:
            pass
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return False


def _children(pid: int) -> list[int]:
    """Pids whose parent is `pid` (sshd's per-connection processes start sessions of their own)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _terminate(proc: subprocess.Popen[bytes] | None) -> None:
    """Stop one sshd we started: its connection children first, then the listener's group."""
    if proc is None or proc.poll() is not None:
        return
    for child in _children(proc.pid):
        try:
            os.kill(child, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextmanager
def root_sudo(users: list[str], prefix: str) -> Iterator[Path]:
    """Let these test users sudo to root without a password while the block runs (a checked sudoers drop-in).

    Drop-ins with `prefix` left by a killed run (its pid gone) are removed first; the rule is checked
    with `visudo -c` under a name sudo ignores (`~`) before it is moved into place.
    """
    for stale in SUDOERS_DIR.glob(prefix + "*"):
        pid = stale.name.removeprefix(prefix)
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            stale.unlink(missing_ok=True)
    path = SUDOERS_DIR / f"{prefix}{os.getpid()}"
    tmp = path.with_name(path.name + "~tmp")
    tmp.write_text("".join(f"{user} ALL=(root) NOPASSWD: ALL\n" for user in users))
    tmp.chmod(0o440)
    check = subprocess.run(["visudo", "-c", "-q", "-f", str(tmp)], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        tmp.unlink()
        raise SSHDUnavailable(f"sudoers rule for the test users is invalid: {check.stderr}")
    os.replace(tmp, path)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
