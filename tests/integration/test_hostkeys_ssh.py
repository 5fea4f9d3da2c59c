"""Host-key checking against real sshd hosts: @revoked, @cert-authority, changed keys in every mode, patterns.

Where runbook's rule is OpenSSH's, the real `ssh` client reads the same known_hosts file and must
come to the same decision (strict mode). Where runbook is deliberately stricter (revoked and changed
keys under `off`, certificate-only hosts under `accept-new`), the tests say so.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from runbook.connections.hostkeys import HostKeyPolicy, host_matches, read_known_hosts
from runbook.connections.ssh import SSHConnection, fingerprint
from runbook.errors import HostKeyError, RunbookError
from tests.integration.test_connection_ssh import variant_sshd
from tests.sshd import SSHHost

pytestmark = pytest.mark.ssh

MODES = ["strict", "accept-new", "off"]


def connect(host: SSHHost, known_hosts: Path, mode: str = "strict", **kwargs: object) -> SSHConnection:
    """Open a connection to a test host with this known_hosts file and mode (raises on refusal)."""
    conn = SSHConnection(host.name, host.address, host.port, host.user, str(host.key_file), known_hosts=str(known_hosts),
                         host_key_checking=mode, connect_timeout=5.0, **kwargs)  # type: ignore[arg-type]
    conn.open()
    return conn


def refused(host: SSHHost, known_hosts: Path, mode: str = "strict", **kwargs: object) -> HostKeyError:
    """Connect, expecting a HostKeyError; return it."""
    with pytest.raises(HostKeyError) as info:
        connect(host, known_hosts, mode, **kwargs).close()
    return info.value


def accepted(host: SSHHost, known_hosts: Path, mode: str = "strict") -> bool:
    """Whether runbook connects and runs a command."""
    try:
        conn = connect(host, known_hosts, mode)
    except HostKeyError:
        return False
    try:
        return conn.run("echo ok").stdout == "ok\n"
    finally:
        conn.close()


def openssh_accepts(host: SSHHost, known_hosts: Path) -> bool:
    """Whether the real OpenSSH client, strict, with only this known_hosts file, logs in."""
    proc = subprocess.run(
        ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}",
         "-o", "GlobalKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-i", str(host.key_file), "-p", str(host.port),
         f"{host.user}@{host.address}", "true"], capture_output=True, text=True, timeout=30)
    return proc.returncode == 0


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """Another ed25519 key: (type, base64, fingerprint) — an impostor's host key, or a CA key."""
    path = tmp_path_factory.mktemp("stranger") / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    key_type, blob = path.with_suffix(".pub").read_text().split()[:2]
    return key_type, blob, fingerprint(paramiko.Ed25519Key(filename=str(path)))


def key_of(host: SSHHost) -> tuple[str, str, str]:
    """The host's own key: (type, base64, fingerprint)."""
    key_type, blob = host.host_public_key.split()[1:3]
    return key_type, blob, fingerprint(paramiko.Ed25519Key(filename=str(host.host_key_file)))


def write(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    path.chmod(0o600)
    return path


# --- @revoked ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("also_trusted", [False, True], ids=["revoked-only", "revoked-and-trusted"])
@pytest.mark.parametrize("mode", MODES)
def test_revoked_key_is_refused_in_every_mode(ssh_host: SSHHost, tmp_path: Path, mode: str, also_trusted: bool) -> None:
    key_type, blob, fp = key_of(ssh_host)
    lines = ["# keys we must never trust again", f"@revoked * {key_type} {blob} stolen-2026-01"]
    if also_trusted:   # an older line still trusts it: revocation wins, as in OpenSSH
        lines.append(ssh_host.host_public_key)
    kh = write(tmp_path / "known_hosts", *lines)
    before = kh.read_text()
    error = refused(ssh_host, kh, mode)
    message = str(error)
    assert "REVOKED" in message and ssh_host.known_hosts_name in message
    assert key_type in message and fp in message
    assert f"{kh}:2" in message
    assert error.hint and "never trust" in error.hint
    assert kh.read_text() == before   # accept-new appended nothing
    if mode == "strict":
        assert not openssh_accepts(ssh_host, kh)


def test_revoked_line_applies_only_to_hosts_its_patterns_match(ssh_host: SSHHost, tmp_path: Path) -> None:
    key_type, blob, _ = key_of(ssh_host)
    kh = write(tmp_path / "known_hosts", f"@revoked old-web.example,[10.0.0.9]:* {key_type} {blob}", ssh_host.host_public_key)
    assert accepted(ssh_host, kh)
    assert openssh_accepts(ssh_host, kh)


def test_revoked_jump_host_key_is_refused(ssh_hosts: list[SSHHost], tmp_path: Path) -> None:
    if len(ssh_hosts) < 2:
        pytest.skip("needs two test hosts")
    target, jump = ssh_hosts[0], ssh_hosts[1]
    key_type, blob, fp = key_of(jump)
    kh = write(tmp_path / "known_hosts", target.host_public_key, jump.host_public_key, f"@revoked * {key_type} {blob}")
    error = refused(target, kh, "accept-new", proxy_jump=f"{jump.user}@{jump.address}:{jump.port}")
    assert jump.known_hosts_name in str(error) and fp in str(error) and f"{kh}:3" in str(error)


# --- changed keys ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_changed_key_is_refused_in_every_mode(ssh_host: SSHHost, tmp_path: Path, stranger: tuple[str, str, str],
                                              mode: str) -> None:
    other_type, other_blob, expected = stranger
    _, _, offered = key_of(ssh_host)
    kh = write(tmp_path / "known_hosts", "# web", f"{ssh_host.known_hosts_name} {other_type} {other_blob}")
    before = kh.read_text()
    message = str(refused(ssh_host, kh, mode))
    assert "CHANGED" in message and ssh_host.known_hosts_name in message
    assert f"expected {other_type} {expected} ({kh}:2)" in message
    assert f"offered {other_type} {offered}" in message
    assert kh.read_text() == before


def test_changed_key_under_a_wildcard_pattern(ssh_host: SSHHost, tmp_path: Path, stranger: tuple[str, str, str]) -> None:
    other_type, other_blob, expected = stranger
    kh = write(tmp_path / "known_hosts", f"[127.0.0.1]:* {other_type} {other_blob}")
    message = str(refused(ssh_host, kh, "off"))
    assert "CHANGED" in message and expected in message and f"{kh}:1" in message
    assert not openssh_accepts(ssh_host, kh)


def test_off_still_accepts_unknown_hosts_and_records_nothing(ssh_host: SSHHost, tmp_path: Path,
                                                            stranger: tuple[str, str, str]) -> None:
    other_type, other_blob, _ = stranger
    kh = write(tmp_path / "known_hosts", f"other.example {other_type} {other_blob}")
    assert accepted(ssh_host, kh, "off")
    assert kh.read_text() == f"other.example {other_type} {other_blob}\n"


# --- @cert-authority ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["strict", "accept-new"])
def test_host_needing_a_certificate_is_refused_clearly(ssh_host: SSHHost, tmp_path: Path,
                                                       stranger: tuple[str, str, str], mode: str) -> None:
    ca_type, ca_blob, _ = stranger
    kh = write(tmp_path / "known_hosts", f"@cert-authority [127.0.0.1]:*,*.example.com {ca_type} {ca_blob}")
    before = kh.read_text()
    error = refused(ssh_host, kh, mode)
    message = str(error)
    assert "@cert-authority" in message and f"{kh}:1" in message
    assert "runbook does not support" in message and "certificate" in message
    assert key_of(ssh_host)[2] in message            # what it offered instead
    assert error.hint and "plain key" in error.hint
    assert kh.read_text() == before                  # accept-new does not fall back to recording it


def test_certificate_host_under_off_is_accepted_like_an_unknown_host(ssh_host: SSHHost, tmp_path: Path,
                                                                    stranger: tuple[str, str, str]) -> None:
    ca_type, ca_blob, _ = stranger
    kh = write(tmp_path / "known_hosts", f"@cert-authority * {ca_type} {ca_blob}")
    assert accepted(ssh_host, kh, "off")
    assert kh.read_text() == f"@cert-authority * {ca_type} {ca_blob}\n"


def test_cert_authority_for_other_hosts_does_not_apply(ssh_host: SSHHost, tmp_path: Path,
                                                       stranger: tuple[str, str, str]) -> None:
    ca_type, ca_blob, _ = stranger
    kh = write(tmp_path / "known_hosts", f"@cert-authority *.example.com {ca_type} {ca_blob}")
    message = str(refused(ssh_host, kh, "strict"))
    assert "unknown host key" in message and "certificate" not in message
    assert accepted(ssh_host, kh, "accept-new")       # and recorded, like any new host
    assert ssh_host.host_public_key in kh.read_text().splitlines()


def test_plain_key_beside_a_cert_authority_is_used(ssh_host: SSHHost, tmp_path: Path,
                                                   stranger: tuple[str, str, str]) -> None:
    ca_type, ca_blob, _ = stranger
    kh = write(tmp_path / "known_hosts", f"@cert-authority * {ca_type} {ca_blob}", ssh_host.host_public_key)
    assert accepted(ssh_host, kh)
    assert openssh_accepts(ssh_host, kh)


# --- host patterns, as OpenSSH reads them ------------------------------------------------------------

def _hashed(tmp_path: Path, host: SSHHost) -> str:
    plain = write(tmp_path / "to_hash", host.host_public_key)
    subprocess.run(["ssh-keygen", "-H", "-f", str(plain)], check=True, capture_output=True)
    return plain.read_text().strip()


CASES = {
    # name: (lines, accepted?) — {name}: the host's lookup name, {key}: its key, {other}: a stranger's key
    "exact": (["{name} {key}"], True),
    "upper-case name": (["{NAME} {key}"], True),
    "hashed name": (["{hashed}"], True),
    "question-mark wildcard": (["[127.0.0.?]:* {key}"], True),
    "one of several patterns": (["db.example,{name},web.example {key}"], True),
    "negated pattern excludes": (["[127.0.0.1]:*,!{name} {key}"], False),
    "port 22 entry is not this port": (["[127.0.0.1]:22 {key}"], False),
    "other host only": (["web.example {key}"], False),
    "changed under a pattern": (["[127.*]:* {other}"], False),
    "revoked under a pattern": (["@revoked [127.*]:* {key}", "{name} {key}"], False),
    "cert-authority and plain key": (["@cert-authority * {other}", "{name} {key}"], True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_decision_as_openssh(ssh_host: SSHHost, tmp_path: Path, stranger: tuple[str, str, str], case: str) -> None:
    lines, expected = CASES[case]
    key_type, blob, _ = key_of(ssh_host)
    values = {"name": ssh_host.known_hosts_name, "NAME": ssh_host.known_hosts_name.upper(), "key": f"{key_type} {blob}",
              "other": f"{stranger[0]} {stranger[1]}", "hashed": _hashed(tmp_path, ssh_host) if "{hashed}" in lines[0] else ""}
    kh = write(tmp_path / "known_hosts", *(line.format(**values) for line in lines))
    assert openssh_accepts(ssh_host, kh) is expected, "the oracle disagrees with the case table"
    assert accepted(ssh_host, kh) is expected


# --- hostile and broken known_hosts files -----------------------------------------------------------

def test_hostile_lines_are_skipped_never_matched_and_never_crash(ssh_host: SSHHost, tmp_path: Path,
                                                                stranger: tuple[str, str, str]) -> None:
    other = f"{stranger[0]} {stranger[1]}"
    dss = base64.b64encode(b"\x00\x00\x00\x07ssh-dss" + b"\x00\x00\x00\x01\x01" * 4).decode()
    hostile = [
        f".* {other}",                       # a regex would match everything: patterns are globs, not regexes
        f"(a|[127.0.0.1]:.*)+ {other}",
        f"|1|not-base64|@@@ {other}",          # a broken hashed name
        f"|1|{'A' * 28}| {other}",
        "@evil * ssh-ed25519 AAAA",           # unknown marker: skipped, as OpenSSH does
        "@revoked",                            # marker without a key
        f"{ssh_host.known_hosts_name} ssh-ed25519 !!!not-base64!!!",
        f"{ssh_host.known_hosts_name} ssh-dss {dss}",   # a type paramiko lacks: ignored, as before
        "\x00\x01\x02 binary garbage \xff",
        "x" * 1_000_000,                       # one enormous line
        f"{ssh_host.known_hosts_name}",       # name only
    ]
    kh = write(tmp_path / "known_hosts", *hostile, ssh_host.host_public_key)
    assert accepted(ssh_host, kh)
    # Without the real line, none of them makes the host known (so strict refuses it as unknown, not CHANGED).
    write(kh, *hostile)
    assert "unknown host key" in str(refused(ssh_host, kh))


def test_recording_never_glues_onto_a_last_line_without_newline(ssh_host: SSHHost, tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text("# hand-edited, no newline at the end")
    assert accepted(ssh_host, kh, "accept-new")
    assert kh.read_text() == f"# hand-edited, no newline at the end\n{ssh_host.host_public_key}\n"
    found = subprocess.run(["ssh-keygen", "-F", ssh_host.known_hosts_name, "-f", str(kh)], capture_output=True)
    assert found.returncode == 0


def test_names_that_would_inject_lines_are_never_recorded(ssh_host: SSHHost, tmp_path: Path) -> None:
    key = paramiko.Ed25519Key(filename=str(ssh_host.host_key_file))
    kh = tmp_path / "known_hosts"
    policy = HostKeyPolicy("evil", "accept-new", kh, system_files=())
    for name in ("web\n@cert-authority * ssh-ed25519 AAAA", "web,*", "*", "!web", "web example", "|1|x|y", "#web"):
        with pytest.raises(HostKeyError) as info:
            policy.check(name, key)
        assert "will not record" in str(info.value)
    assert not kh.exists()


def test_unreadable_known_hosts_is_a_clear_error_in_every_mode(ssh_host: SSHHost, tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    kh.mkdir()        # a directory where the file should be: unreadable even for root
    for mode in MODES:
        with pytest.raises(RunbookError) as info:
            connect(ssh_host, kh, mode)
        assert f"cannot read known-hosts file {kh}" in str(info.value)


def test_pattern_rules() -> None:
    assert host_matches("web*.example,!web9.example", "WEB1.example")
    assert not host_matches("web*.example,!web9.example", "web9.example")
    assert not host_matches("!web9.example", "web1.example")          # a negation alone matches nothing
    assert host_matches("[10.0.0.?]:2222", "[10.0.0.5]:2222")
    assert not host_matches("[10.0.0.?]:2222", "[10.0.0.15]:2222")
    assert not host_matches("10.0.0.1", "[10.0.0.1]:2222")
    assert not host_matches("web.example", "webXexample")              # a dot is a dot


def test_known_hosts_is_read_again_when_it_changes(tmp_path: Path, ssh_host: SSHHost) -> None:
    kh = write(tmp_path / "known_hosts", ssh_host.host_public_key)
    assert len(read_known_hosts([kh])) == 1
    key_type, blob, _ = key_of(ssh_host)
    write(kh, f"@revoked * {key_type} {blob}", ssh_host.host_public_key)
    assert [e.marker for e in read_known_hosts([kh])] == ["@revoked", ""]


# --- a host with two host keys: the known type is negotiated first ----------------------------------

@pytest.fixture
def two_key_host(ssh_host: SSHHost, tmp_path: Path) -> Iterator[tuple[SSHHost, str]]:
    """The first test host's sshd again on a new port, with an RSA host key besides its ed25519 one."""
    rsa = tmp_path / "ssh_host_rsa_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(rsa)], check=True)
    with variant_sshd(ssh_host, tmp_path, f"HostKey {rsa}") as host:
        key_type, blob = rsa.with_suffix(".pub").read_text().split()[:2]
        yield host, f"[{host.address}]:{host.port} {key_type} {blob}"


def test_host_known_by_its_rsa_key_is_not_mistaken_for_changed(two_key_host: tuple[SSHHost, str], tmp_path: Path) -> None:
    host, rsa_line = two_key_host
    kh = write(tmp_path / "known_hosts", rsa_line)
    # Unasked, paramiko would negotiate ed25519 first: a key this file does not list.
    assert accepted(host, kh, "strict")
    assert openssh_accepts(host, kh)
