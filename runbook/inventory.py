"""Ansible-compatible inventories (YAML, INI, host_vars/group_vars, directories) and host patterns.

Teams keep their hosts in Ansible inventories; runbook reads those files unchanged and selects hosts
with the patterns they already type. Variable precedence follows Ansible's defaults, lowest first:

1. inline vars of the `all` group (`all: vars:` / `[all:vars]`)
2. inline vars of every other group of the host, parents before children
   (sorted by depth, then `ansible_group_priority`, then name; the later one wins)
3. `group_vars/all` files
4. `group_vars/GROUP` files, in the same group order
5. inline host vars (on the host line / under the host key)
6. `host_vars/HOST` files

so a group_vars/host_vars file overrides the inline vars of its level, as Ansible does.
Merging replaces whole top-level values (Ansible's `hash_behaviour = replace`).
"""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import ipaddress
import json
import os
import re
import shlex
import string
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from collections.abc import Iterable, Iterator, Mapping, Sequence

from runbook.connections import CONNECTIONS
from runbook.errors import InventoryError, Location, Problem, Problems, ValidationError, did_you_mean
from runbook.loader import LocatedDocument, SourceMap, parse_yaml, read_text

Connection = str   # a connection kind: `ssh`, `local`, or a plugin's (runbook.connections)

YAML_EXTENSIONS = (".yml", ".yaml", ".json")
VARS_EXTENSIONS = ("", ".yml", ".yaml", ".json")
# Files a directory inventory skips, as Ansible's INVENTORY_IGNORE_EXTS does, plus docs.
IGNORED_EXTENSIONS = (".orig", ".bak", ".swp", ".retry", ".cfg", ".pyc", ".pyo", ".md", ".rst", ".txt", ".j2", ".sh", ".py")
DEFAULT_INVENTORY_DIR = "inventory"
LOCALHOST_NAMES = ("localhost", "127.0.0.1", "::1")

# Connection settings: each is read from its Ansible names or its native (unprefixed) name.
# The first name of each tuple wins over the others when several are set at the same level.
CONNECTION_VARS: dict[str, tuple[str, ...]] = {
    "host": ("ansible_host", "ansible_ssh_host", "host"),
    "port": ("ansible_port", "ansible_ssh_port", "port"),
    "user": ("ansible_user", "ansible_ssh_user", "user"),
    "key_file": ("ansible_ssh_private_key_file", "ansible_private_key_file", "ssh_private_key_file"),
    "connection": ("ansible_connection", "connection"),
    "become_user": ("ansible_become_user", "become_user"),
}
IGNORED_VARS = ("ansible_ssh_common_args", "ssh_common_args", "ansible_ssh_extra_args", "ansible_ssh_args")
# Ansible connection plugins that mean "OpenSSH" for our purposes.
_SSH_ALIASES = {"ssh": "ssh", "smart": "ssh", "paramiko": "ssh", "paramiko_ssh": "ssh", "local": "local"}


# --- public types --------------------------------------------------------------------------------

@dataclass(frozen=True)
class VarOrigin:
    """Where one variable's value came from: a file position and the level it was set at."""

    location: Location | None
    scope: str          # e.g. "group web (inline)", "group_vars/web.yml", "host vars (inline)", "ssh config"
    rank: int = 0       # precedence level (1..6 above; 7 = ssh config is below everything, see Host)

    def __str__(self) -> str:
        return f"{self.location} ({self.scope})" if self.location else self.scope


@dataclass(frozen=True)
class Host:
    """One target host with its merged variables and resolved connection settings."""

    name: str
    address: str                      # what to connect to (ansible_host, ssh config HostName, or the name)
    port: int = 22
    user: str | None = None           # None: the connection layer's default (the local user)
    key_file: str | None = None
    connection: Connection = "ssh"
    become_user: str | None = None
    proxy_jump: str | None = None
    groups: tuple[str, ...] = ()      # every group of the host, ancestors included, without `all`
    vars: dict[str, Any] = field(default_factory=dict)
    origins: Mapping[str, VarOrigin] = field(default_factory=dict, compare=False, repr=False)
    implicit: bool = False            # the implicit localhost, not part of `all`

    @property
    def is_local(self) -> bool:
        """True when tasks run on the control machine without SSH."""
        return self.connection == "local"


@dataclass
class Group:
    """An inventory group: its direct hosts, child groups and inline vars."""

    name: str
    hosts: list[str] = field(default_factory=list)
    children: list[str] = field(default_factory=list)
    parents: list[str] = field(default_factory=list)
    vars: dict[str, Any] = field(default_factory=dict)
    var_origins: dict[str, VarOrigin] = field(default_factory=dict, repr=False)
    priority: int = 1
    depth: int = 0
    location: Location | None = None


# --- ranges and host patterns in inventory files ---------------------------------------------------

# A range is refused above this many names, and so is an inventory above this many hosts: far more
# than a fleet, and a typo such as `h[1:99999999]` would otherwise exhaust memory while expanding.
MAX_RANGE_HOSTS = 100_000
MAX_INVENTORY_HOSTS = 100_000
# Host entries expanded per inventory, repeats included (a host in three groups counts three times):
# bounds the work of files that re-list one huge range on many lines.
MAX_HOST_ENTRIES = 10 * MAX_INVENTORY_HOSTS
_RANGE_HINT = ("a range is [START:END] or [START:END:STEP] with numbers (web[01:20]) or single letters (db-[a:c]); "
               f"a range expands to at most {MAX_RANGE_HOSTS:,} hosts")


class RangeTooLarge(ValueError):
    """A host range that would expand past MAX_RANGE_HOSTS."""


@dataclass(frozen=True)
class _Range:
    """One `[start:end:step]` of a host name: numbers (zero-padded to `width`) or single letters."""

    start: int
    end: int
    step: int
    width: int = 0
    letters: bool = False

    def __len__(self) -> int:
        return len(range(self.start, self.end + 1, self.step))   # arithmetic: nothing is expanded

    def values(self) -> list[str]:
        if self.letters:
            return [string.ascii_letters[i] for i in range(self.start, self.end + 1, self.step)]
        return [str(i).zfill(self.width) for i in range(self.start, self.end + 1, self.step)]


def _split_range(pattern: str) -> tuple[str, _Range, str] | None:
    """The text before the first `[...]`, that range, and the rest; None without brackets (ValueError when invalid)."""
    if "[" not in pattern:
        return None
    head, _, rest = pattern.partition("[")
    spec, closed, tail = rest.partition("]")
    if not closed:
        raise ValueError(f"invalid range in `{pattern}`: `[` is never closed")
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"invalid range `[{spec}]`: expected [start:end] or [start:end:step]")
    beg, end = parts[0].strip() or "0", parts[1].strip()
    step_text = parts[2].strip() if len(parts) == 3 else "1"
    if not end:
        raise ValueError(f"invalid range `[{spec}]`: the end is missing")
    if not step_text.isdigit() or int(step_text) < 1:
        raise ValueError(f"invalid range `[{spec}]`: the step must be a positive integer")
    step = int(step_text)
    if beg.isdigit() and end.isdigit():
        width = len(beg) if beg.startswith("0") and len(beg) > 1 else 0
        if width and len(end) != width:
            raise ValueError(f"invalid range `[{spec}]`: a zero-padded start needs an end of the same width")
        rng = _Range(int(beg), int(end), step, width)
    elif len(beg) == 1 and len(end) == 1 and beg in string.ascii_letters and end in string.ascii_letters:
        rng = _Range(string.ascii_letters.index(beg), string.ascii_letters.index(end), step, letters=True)
    else:
        raise ValueError(f"invalid range `[{spec}]`: expected two numbers or two single letters")
    if rng.start > rng.end:
        raise ValueError(f"invalid range `[{spec}]`: the start is after the end")
    return head, rng, tail


def count_hostname_range(pattern: str) -> int:
    """How many names `pattern` expands to, computed without expanding it; ValueError when a range is invalid."""
    count, rest = 1, pattern
    while (found := _split_range(rest)) is not None:
        _head, rng, rest = found
        count *= len(rng)
    return count


def expand_hostname_range(pattern: str) -> list[str]:
    """Expand Ansible ranges: `web[01:03]` -> web01, web02, web03; `db-[a:c]`; `[1:9:2]` steps; several ranges multiply.

    Raises RangeTooLarge, before expanding anything, when the names would number more than MAX_RANGE_HOSTS.
    """
    _range_size(pattern)
    return _expand(pattern)


def _range_size(pattern: str) -> int:
    """count_hostname_range, raising RangeTooLarge above MAX_RANGE_HOSTS."""
    count = count_hostname_range(pattern)
    if count > MAX_RANGE_HOSTS:
        raise RangeTooLarge(f"range `{pattern}` expands to {count:,} hosts: expected at most {MAX_RANGE_HOSTS:,} "
                            "hosts per range")
    return count


def _expand(pattern: str) -> list[str]:
    found = _split_range(pattern)
    if found is None:
        return [pattern]
    head, rng, tail = found
    rests = _expand(tail)
    return [head + v + rest for v in rng.values() for rest in rests]


def parse_host_pattern(text: str) -> tuple[list[str], int | None]:
    """Split an inventory host entry into expanded names and an optional `:port` (IPv6 allowed)."""
    base, port = split_host_port(text)
    return expand_hostname_range(base), port


def split_host_port(text: str) -> tuple[str, int | None]:
    """An inventory host entry without its optional `:port`, ranges not yet expanded (ValueError when malformed)."""
    text = text.strip()
    if not text:
        raise ValueError("empty host name")
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?", text)
    if m and ":" in m.group(1):  # [fe80::1]:2222
        return m.group(1), _port_from_text(m.group(2)) if m.group(2) else None
    try:
        ipaddress.IPv6Address(text)
        return text, None
    except ValueError:
        pass
    # Colons outside brackets: one separates a port, more mean a malformed entry.
    outside = [i for i, _ in _outside_brackets(text, ":")]
    port = None
    if outside:
        if len(outside) > 1:
            raise ValueError(f"invalid host `{text}`: too many `:` (only `NAME:PORT` is allowed)")
        i = outside[0]
        port_text = text[i + 1:]
        if not port_text:
            raise ValueError(f"invalid host `{text}`: ends in `:`, which is reserved for a port")
        if not port_text.isdigit():
            raise ValueError(f"invalid port `{port_text}` in `{text}`: expected a number")
        port = _port_from_text(port_text)
        text = text[:i]
    return text, port


def _port_from_text(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"invalid port {port}: expected 1 to 65535")
    return port


def _outside_brackets(text: str, chars: str) -> Iterator[tuple[int, str]]:
    depth = 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth = max(0, depth - 1)
        elif depth == 0 and ch in chars:
            yield i, ch


# --- building an inventory from files ------------------------------------------------------------

@dataclass
class _HostDef:
    name: str
    vars: dict[str, Any] = field(default_factory=dict)
    var_origins: dict[str, VarOrigin] = field(default_factory=dict)
    location: Location | None = None


_RANK = {"all": 1, "group": 2, "group_vars_all": 3, "group_vars": 4, "host": 5, "host_vars": 6}


class _Builder:
    """Collects groups, hosts and vars from one or more sources, then resolves them into an Inventory."""

    def __init__(self) -> None:
        self.groups: dict[str, Group] = {}
        self.hosts: dict[str, _HostDef] = {}
        self.problems = Problems()
        self.files: list[tuple[str, str]] = []    # (path, sha256) of every file read, for the audit hash
        self.vars_dirs: list[Path] = []
        self.members: dict[str, set[str]] = {}    # group -> its hosts, for membership tests
        self.entries = 0                          # host names expanded so far, repeats included
        self.over_limit = False                   # the inventory hit MAX_INVENTORY_HOSTS: report it once
        self.add_group("all", None)
        self.add_group("ungrouped", None)
        self.add_child("all", "ungrouped", None)

    # groups and hosts

    def add_group(self, name: str, location: Location | None) -> Group:
        group = self.groups.get(name)
        if group is None:
            group = self.groups[name] = Group(name, location=location)
        elif group.location is None:
            group.location = location
        return group

    def ancestors(self, name: str) -> set[str]:
        seen: set[str] = set()
        todo = list(self.groups[name].parents) if name in self.groups else []
        while todo:
            g = todo.pop()
            if g not in seen:
                seen.add(g)
                todo.extend(self.groups[g].parents)
        return seen

    def add_child(self, parent: str, child: str, location: Location | None) -> None:
        self.add_group(parent, location)
        self.add_group(child, location)
        if child == "all":
            self.problems.add(f"group `all` cannot be a child of `{parent}`", location,
                              "every group is already inside `all`; remove this entry", code="inventory-cycle")
            return
        if child == parent or child in self.ancestors(parent):
            chain = " -> ".join(self._path_to(child, parent) + [child])
            self.problems.add(f"group `{child}` is its own ancestor: {chain}", location,
                              f"remove `{child}` from the children of `{parent}`", code="inventory-cycle")
            return
        if child not in self.groups[parent].children:
            self.groups[parent].children.append(child)
            self.groups[child].parents.append(parent)

    def _path_to(self, top: str, bottom: str) -> list[str]:
        """Group names from `top` down to `bottom` along children edges (for cycle messages)."""
        if top == bottom:
            return [top]
        for kid in self.groups[top].children:
            if kid == bottom or bottom in self._descendants(kid):
                return [top] + self._path_to(kid, bottom)
        return [top, bottom]

    def _descendants(self, name: str) -> set[str]:
        seen: set[str] = set()
        todo = list(self.groups[name].children)
        while todo:
            g = todo.pop()
            if g not in seen:
                seen.add(g)
                todo.extend(self.groups[g].children)
        return seen

    def expand_entry(self, entry: str, location: Location | None) -> tuple[list[str], int | None] | None:
        """The names and port of one host entry (`web[01:20]:2222`), or None after recording why not.

        Sizes are counted before anything is expanded, so an oversized range costs no memory.
        """
        try:
            base, port = split_host_port(entry)
            count = _range_size(base)
        except ValueError as exc:
            self.problems.add(str(exc), location, _range_hint(str(exc)), code="invalid-host")
            return None
        self.entries += count
        if self.over_limit:
            return None
        if self.entries > MAX_HOST_ENTRIES:
            self._too_many(location, f"{self.entries:,} host entries (a host listed in several groups counts "
                                     f"each time): expected at most {MAX_HOST_ENTRIES:,} per inventory")
            return None
        names = _expand(base)
        if len(self.hosts) + count > MAX_INVENTORY_HOSTS:
            total = len(self.hosts) + sum(1 for n in dict.fromkeys(names) if n not in self.hosts)
            if total > MAX_INVENTORY_HOSTS:
                self._too_many(location, f"`{entry}` brings the inventory to {total:,} hosts: expected at most "
                                         f"{MAX_INVENTORY_HOSTS:,} hosts per inventory")
                return None
        return names, port

    def _too_many(self, location: Location | None, message: str) -> None:
        self.over_limit = True
        self.problems.add(message, location, "check the range bounds for a typo; runbook reads at most "
                          f"{MAX_INVENTORY_HOSTS:,} hosts per inventory", code="too-many-hosts")

    def add_host(self, group: str, name: str, location: Location | None) -> _HostDef:
        host = self.hosts.get(name)
        if host is None:
            host = self.hosts[name] = _HostDef(name, location=location)
        self.add_group(group, location)
        members = self.members.get(group)
        if members is None:
            members = self.members[group] = set(self.groups[group].hosts)
        if name not in members:   # a set beside the list: a group of 100,000 hosts stays linear to build
            members.add(name)
            self.groups[group].hosts.append(name)
        return host

    def set_group_var(self, group: str, key: str, value: Any, location: Location | None, scope: str) -> None:
        g = self.add_group(group, location)
        if key == "ansible_group_priority":
            try:
                g.priority = int(value)
            except (TypeError, ValueError):
                self.problems.add(f"`ansible_group_priority` must be an integer, got {value!r}", location)
        g.vars[key] = value
        g.var_origins[key] = VarOrigin(location, scope, _RANK["all" if group == "all" else "group"])

    def set_host_var(self, host: str, key: str, value: Any, location: Location | None) -> None:
        h = self.hosts[host]
        h.vars[key] = value
        h.var_origins[key] = VarOrigin(location, "host vars (inline)", _RANK["host"])

    def note_file(self, path: str, text: str) -> None:
        # Absolute: the hash must not depend on the directory the inventory was named from (resume, apply).
        self.files.append((os.path.abspath(path), hashlib.sha256(text.encode()).hexdigest()))


def _read(path: Path, what: str) -> str:
    """read_text, but raising InventoryError with inventory wording."""
    try:
        return read_text(path, what)
    except ValidationError as exc:
        problems = [Problem(p.message.replace("expected a YAML file", "expected a file"), p.location,
                            p.hint if "name a .yml" not in (p.hint or "") else None, p.severity, p.code)
                    for p in exc.problems]
        raise InventoryError(problems) from None


def _strip_comments_only(text: str) -> bool:
    """True when a YAML text holds nothing but blank lines, comments and document markers."""
    return all(not ln.strip() or ln.lstrip().startswith("#") or ln.strip() in ("---", "...") for ln in text.splitlines())


def _parse_yaml(text: str, fname: str) -> LocatedDocument:
    try:
        return parse_yaml(text, fname)
    except ValidationError as exc:   # the loader's error class names playbooks; the problems are the same
        raise InventoryError(exc.problems) from None


# YAML inventories -----------------------------------------------------------------------------------

_GROUP_KEYS = ("hosts", "children", "vars")


def _load_yaml_inventory(b: _Builder, path: Path, text: str) -> None:
    fname = str(path)
    if _strip_comments_only(text):
        b.problems.add("the inventory file is empty", Location(fname, 1, 1), "add `all:` with `hosts:`", severity="warning",
                       code="empty-inventory")
        return
    doc = _parse_yaml(text, fname)
    src = doc.source
    if not isinstance(doc.data, dict):
        b.problems.add(f"expected a mapping of groups at the top of the inventory, got {_kind(doc.data)}", src.locate(()),
                       "start with `all:` and put `hosts:`, `children:` and `vars:` under it")
        return
    for name, gdata in doc.data.items():
        if not isinstance(name, str):
            b.problems.add(f"a group name must be a string, got {name!r}", src.locate((name,), key=True))
            continue
        _yaml_group(b, src, name, gdata, (name,), parent=None)


def _yaml_group(b: _Builder, src: SourceMap, name: str, data: Any, path: tuple, parent: str | None) -> None:
    loc = src.locate(path, key=True)
    if data is not None and not isinstance(data, dict):
        # Ansible skips such a group with a warning; under `children:` it then fails on the unknown child group.
        message = f"skipping group `{name}`: expected a mapping with `hosts:`, `children:` or `vars:`, got {_kind(data)}"
        hint = "a group holds `hosts:`, `children:` and `vars:` mappings, or nothing"
        if parent is not None and name not in b.groups:
            b.problems.add(f"group `{name}`: expected a mapping with `hosts:`, `children:` or `vars:`, got {_kind(data)}",
                           src.locate(path), hint)
            return
        b.problems.add(message, src.locate(path), hint, severity="warning", code="skipped-group")
        if parent is not None:
            b.add_child(parent, name, loc)
        return
    b.add_group(name, loc)
    if parent is not None:
        b.add_child(parent, name, loc)
    if data is None:
        return
    found = _yaml_sections(b, src, name, data, path)
    if found is None:
        return
    sections, bare = found
    # Keys are read in file order, so hosts keep the order in which the file lists them.
    for key, value in sections.items():
        kpath = path + (key,)
        if value is None:
            continue   # an empty key, known or not, is skipped quietly, as Ansible does
        if not isinstance(value, dict):
            b.problems.add(f"skipping key `{key}` in group `{name}`: it is {_kind(value)}, not a mapping",
                           src.locate(kpath, key=True), _misplaced_hint(name, parent, str(key)), severity="warning",
                           code="skipped-key")
        elif key == "vars":
            for k, v in value.items():
                b.set_group_var(name, str(k), v, bare.get(key) or src.locate(kpath + (k,), key=True), f"group {name} (inline)")
        elif key == "children":
            _yaml_children(b, src, name, value, kpath)
        elif key == "hosts":
            _yaml_hosts(b, src, name, value, kpath, bare.get(key))
        else:
            hint = did_you_mean(str(key), list(_GROUP_KEYS)) or _misplaced_hint(name, parent, str(key))
            b.problems.add(f"skipping unknown key `{key}` in group `{name}`: only `vars`, `children` and `hosts` are valid",
                           src.locate(kpath, key=True), hint, severity="warning", code="skipped-key")


def _yaml_sections(b: _Builder, src: SourceMap, name: str, data: dict, path: tuple
                   ) -> tuple[dict, dict[str, Location]] | None:
    """A group's keys with `hosts: NAME` (a bare string) read as one entry, and where each bare name stands.

    None when a section is neither a mapping, nor a name, nor empty.
    """
    out = dict(data)
    bare: dict[str, Location] = {}
    for section in _GROUP_KEYS:
        value = out.get(section)
        if isinstance(value, str):
            # `hosts:` followed by a bare `web01`: Ansible reads it as `web01:`, a mapping of one entry.
            out[section] = {value: None}
            bare[section] = src.locate(path + (section,))
            if section == "hosts" and any(c.isspace() for c in value):
                b.problems.add(f"group `{name}`: `hosts: {value}` is one host whose name holds a space",
                               bare[section], "write each host as a key ending in `:` on its own line",
                               severity="warning", code="bare-host-name")
        elif value is not None and not isinstance(value, dict):
            hint = None
            if section == "hosts" and isinstance(value, list):
                hint = "`hosts` is a mapping: write each host as a key ending in `:` (e.g. `web01:`), not a `- web01` list"
            elif section == "children" and isinstance(value, list):
                hint = "write each child group as a key ending in `:`"
            what = "a mapping of host names" if section == "hosts" else "a mapping of groups" if section == "children" else "a mapping"
            b.problems.add(f"group `{name}`: `{section}` must be {what}, got {_kind(value)}", src.locate(path + (section,)), hint)
            return None
    return out, bare


def _misplaced_hint(group: str, parent: str | None, key: str) -> str:
    """A `vars:` indented under `children:` becomes a group named `vars`: say so."""
    if group in _GROUP_KEYS and parent is not None:
        return (f"`{group}:` is indented under `children:` of `{parent}`, so it is read as a group named `{group}`; "
                f"indent it like `children:` to make `{key}` part of `{parent}`'s `{group}`")
    return "a group holds only `hosts:`, `children:` and `vars:`"


def _yaml_children(b: _Builder, src: SourceMap, name: str, children: dict, path: tuple) -> None:
    for child, cdata in children.items():
        if not isinstance(child, str):
            b.problems.add(f"a group name must be a string, got {child!r}", src.locate(path + (child,), key=True))
            continue
        _yaml_group(b, src, child, cdata, path + (child,), parent=name)


def _yaml_hosts(b: _Builder, src: SourceMap, name: str, hosts: dict, path: tuple, bare: Location | None = None) -> None:
    for entry, hvars in hosts.items():
        hpath = path + (entry,)
        hloc = bare or src.locate(hpath, key=True)
        if not hvars:
            hvars = None   # `web01:`, `web01: {}` and even `web01: []` mean no variables, as in Ansible
        elif not isinstance(hvars, dict):
            b.problems.add(f"host `{entry}`: expected a mapping of variables or nothing, got {_kind(hvars)}",
                           src.locate(hpath), "write `key: value` pairs under the host, or leave it empty")
            continue
        expanded = b.expand_entry(str(entry), hloc)
        if expanded is None:
            continue
        names, port = expanded
        for hname in names:
            b.add_host(name, hname, hloc)
            if port is not None:
                b.set_host_var(hname, "ansible_port", port, hloc)
            for k, v in (hvars or {}).items():
                b.set_host_var(hname, str(k), v, src.locate(hpath + (k,), key=True))


def _range_hint(message: str) -> str | None:
    if "expands to" in message:
        return (f"check the range bounds for a typo; a larger fleet goes into several ranges, up to "
                f"{MAX_INVENTORY_HOSTS:,} hosts per inventory")
    if "range" in message:
        return _RANGE_HINT
    if "port" in message:
        return "a port is a number from 1 to 65535, e.g. `db01:2222`"
    return None


def _kind(value: Any) -> str:
    kinds = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list",
             dict: "a mapping", type(None): "nothing"}
    return kinds.get(type(value), type(value).__name__)


# INI inventories --------------------------------------------------------------------------------------

_SECTION_RE = re.compile(r"^\[([^:\]\s]+)(?::(\w+))?\]\s*(?:[#;].*)?$")
_CHILD_RE = re.compile(r"^([^:\]\s]+)\s*(?:[#;].*)?$")
# A host line may start with a range (`[1:2].host`): the bracket closes inside the first word, and more follows.
_LEADING_RANGE_RE = re.compile(r"^\[[^\]\s]*\][^\s#;]")


def _ini_value(text: str) -> Any:
    """Interpret an INI value as Ansible does: a Python literal when it is one, else the text."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text
    # Sets and bytes are not variables (and do not serialise); keep the text.
    return text if isinstance(value, (set, bytes, complex)) else value


def _load_ini_inventory(b: _Builder, path: Path, text: str) -> None:
    fname = str(path)
    group, state = "ungrouped", "hosts"
    pending: dict[str, dict[str, Any]] = {}   # groups used before being declared: Ansible's pending_declarations
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        col = len(raw) - len(raw.lstrip()) + 1
        loc = Location(fname, lineno, col)
        if line.startswith("[") and not _LEADING_RANGE_RE.match(line):
            m = _SECTION_RE.match(line)
            if not m:
                b.problems.add(f"invalid section header `{line}`", loc,
                               "a section is [group], [group:vars] or [group:children]; group names have no spaces")
                group, state = "", "skip"
                continue
            group, state = m.group(1), m.group(2) or "hosts"
            if state not in ("hosts", "vars", "children"):
                hint = did_you_mean(state, ["vars", "children", "hosts"]) or "use [group], [group:vars] or [group:children]"
                b.problems.add(f"section `[{group}:{state}]` has an unknown type `{state}`", loc, hint)
                state = "skip"
                continue
            if group not in b.groups and state == "vars" and group not in pending:
                pending[group] = {"line": loc, "state": "vars", "parents": []}
            b.add_group(group, loc)
            if group in pending and state != "vars":
                decl = pending.pop(group)
                for parent, ploc in decl["parents"]:
                    b.add_child(parent, group, ploc)
            continue
        if state == "skip":
            continue
        if state == "hosts":
            _ini_host_line(b, fname, lineno, raw, group, loc)
        elif state == "vars":
            if "=" not in line:
                b.problems.add(f"expected `key=value`, got `{line}`", loc, f"lines under [{group}:vars] set one variable each")
                continue
            key, value = (part.strip() for part in line.split("=", 1))
            if not key:
                b.problems.add(f"missing variable name before `=` in `{line}`", loc)
                continue
            b.set_group_var(group, key, _ini_value(value), loc, f"group {group} (inline)")
        else:  # children
            m = _CHILD_RE.match(line)
            if not m:
                b.problems.add(f"expected one group name per line under [{group}:children], got `{line}`", loc,
                               "group names have no spaces, `:` or `]`")
                continue
            child = m.group(1)
            if child in b.groups:
                b.add_child(group, child, loc)
            else:
                pending.setdefault(child, {"line": loc, "state": "children", "parents": []})["parents"].append((group, loc))
    for name, decl in pending.items():
        if decl["state"] == "vars":
            b.problems.add(f"section `[{name}:vars]` sets variables of a group that is never declared", decl["line"],
                           did_you_mean(name, [g for g in b.groups if g != name])
                           or f"declare it with a [{name}] or [{name}:children] section")
        else:
            parent, ploc = decl["parents"][-1]
            known = [g for g in b.groups if g != name]
            b.problems.add(f"[{parent}:children] includes `{name}`, a group that is never declared", ploc,
                           did_you_mean(name, known) or f"declare it with a [{name}] section (it may be empty)")


def _ini_host_line(b: _Builder, fname: str, lineno: int, raw: str, group: str, loc: Location) -> None:
    try:
        tokens = shlex.split(raw, comments=True)
    except ValueError as exc:
        b.problems.add(f"cannot parse host line: {exc}", loc, "check the quotes on this line")
        return
    if not tokens:
        return
    entry, assignments = tokens[0], tokens[1:]
    if "=" in entry:
        b.problems.add(f"expected a host name first, got `{entry}`", loc,
                       f"variables for the whole group go under a [{group}:vars] section")
        return
    expanded = b.expand_entry(entry, loc)
    if expanded is None:
        return
    names, port = expanded
    parsed: list[tuple[str, Any, Location]] = []
    for tok in assignments:
        if "=" not in tok:
            b.problems.add(f"expected `key=value` after the host name, got `{tok}`", _token_loc(fname, lineno, raw, tok),
                           "quote values that contain spaces: key=\"a value\"")
            return
        k, v = tok.split("=", 1)
        if not k:
            b.problems.add(f"missing variable name in `{tok}`", _token_loc(fname, lineno, raw, tok))
            return
        parsed.append((k, _ini_value(v), _token_loc(fname, lineno, raw, tok)))
    for hname in names:
        b.add_host(group, hname, loc)
        if port is not None:
            b.set_host_var(hname, "ansible_port", port, loc)
        for k, v, vloc in parsed:
            b.set_host_var(hname, k, v, vloc)


def _token_loc(fname: str, lineno: int, raw: str, token: str) -> Location:
    key = token.split("=", 1)[0] + "="
    col = raw.find(key)
    return Location(fname, lineno, col + 1 if col >= 0 else None)


# Sources, directories, group_vars / host_vars ---------------------------------------------------------

def _is_yaml_file(path: Path) -> bool:
    return path.suffix.lower() in YAML_EXTENSIONS


def _skipped_in_directory(path: Path) -> bool:
    name = path.name
    return (name.startswith(".") or name.endswith("~") or path.suffix.lower() in IGNORED_EXTENSIONS
            or name.lower().startswith(("readme", "example.")))


def _inventory_files(directory: Path) -> list[Path]:
    """Inventory files of a directory, sorted, recursing into subdirectories except group_vars/host_vars."""
    out: list[Path] = []
    for entry in sorted(directory.iterdir()):
        if entry.is_dir():
            if entry.name not in ("group_vars", "host_vars") and not entry.name.startswith("."):
                out.extend(_inventory_files(entry))
        elif not _skipped_in_directory(entry):
            out.append(entry)
    return out


def _load_source(b: _Builder, source: str | os.PathLike) -> None:
    text_source = str(source)
    path = Path(source).expanduser()
    if not path.exists() and "," in text_source:
        # Ansible's host_list form: -i 'web01,web02,' (the trailing comma makes a single host a list)
        for name in (n.strip() for n in text_source.split(",")):
            if name:
                expanded = b.expand_entry(name, Location(text_source))
                if expanded is None:
                    continue
                names, port = expanded
                for n in names:
                    b.add_host("ungrouped", n, None)
                    if port is not None:
                        b.set_host_var(n, "ansible_port", port, Location(text_source))
        b.files.append((text_source, hashlib.sha256(text_source.encode()).hexdigest()))
        return
    if not path.exists():
        raise InventoryError([Problem("inventory not found", Location(text_source),
                                      "give a file or a directory with -i, or a comma-separated host list like `web01,web02,`")])
    if path.is_dir():
        b.vars_dirs.append(path)
        files = _inventory_files(path)
        if not files:
            b.problems.add("the inventory directory holds no inventory file", Location(text_source),
                           "add a .yml or .ini file to it", severity="warning", code="empty-inventory")
        for f in files:
            _load_file(b, f)
    else:
        b.vars_dirs.append(path.parent)
        _load_file(b, path)


def _load_file(b: _Builder, path: Path) -> None:
    text = _read(path, "inventory")
    b.note_file(str(path), text)
    if _is_yaml_file(path):
        try:
            _load_yaml_inventory(b, path, text)
        except InventoryError as exc:
            b.problems.items.extend(exc.problems)
    else:
        if all(not ln.strip() or ln.lstrip()[0] in "#;" for ln in text.splitlines()):
            b.problems.add("the inventory file is empty", Location(str(path), 1, 1), "add `[group]` sections with hosts",
                           severity="warning", code="empty-inventory")
            return
        before = len(b.problems.errors)
        _load_ini_inventory(b, path, text)
        if len(b.problems.errors) > before and re.match(r"^\s*(---|all:|[\w.-]+:\s*$)", text):
            b.problems.add("this file looks like YAML but is read as INI because of its name", Location(str(path), 1, 1),
                           "name YAML inventories .yml or .yaml", severity="warning")


def _vars_files(base: Path, name: str) -> list[Path]:
    """The files holding variables for NAME under group_vars/ or host_vars/: NAME.yml etc., or NAME/*."""
    out: list[Path] = []
    if "/" in name or os.sep in name or name in (".", ".."):
        return out   # a name like `../../etc/x` or `/srv/chroot` must not reach files outside group_vars/host_vars
    for ext in VARS_EXTENSIONS:
        candidate = base / f"{name}{ext}"
        if candidate.is_file():
            out.append(candidate)
    folder = base / name
    if folder.is_dir():
        for entry in sorted(folder.rglob("*")):
            if entry.is_file() and not _skipped_in_directory(entry) and entry.suffix.lower() in VARS_EXTENSIONS:
                out.append(entry)
    return out


def _load_vars_file(b: _Builder, path: Path, cache: dict[Path, list[tuple[str, Any, Location]]]) -> list[tuple[str, Any, Location]]:
    if path in cache:
        return cache[path]
    result: list[tuple[str, Any, Location]] = []
    cache[path] = result
    try:
        text = _read(path, "variables file")
    except InventoryError as exc:
        b.problems.items.extend(exc.problems)
        return result
    b.note_file(str(path), text)
    if _strip_comments_only(text):
        return result
    try:
        doc = _parse_yaml(text, str(path))
    except InventoryError as exc:
        b.problems.items.extend(exc.problems)
        return result
    if not isinstance(doc.data, dict):
        b.problems.add(f"expected a mapping of variables, got {_kind(doc.data)}", doc.source.locate(()),
                       "write one `name: value` per line")
        return result
    for k, v in doc.data.items():
        result.append((str(k), v, doc.source.locate((k,), key=True)))
    return result


# --- resolution ------------------------------------------------------------------------------------

def _compute_depths(groups: dict[str, Group]) -> None:
    """Depth = the longest path from `all`, as Ansible sets it; children merge after parents."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, stack: set[str]) -> None:
        if name in stack or name in seen:
            return
        stack.add(name)
        for parent in groups[name].parents:
            visit(parent, stack)
        stack.discard(name)
        seen.add(name)
        order.append(name)

    for name in groups:
        visit(name, set())
    for name in order:
        g = groups[name]
        parent_depths = [groups[p].depth + 1 for p in g.parents]
        g.depth = max(parent_depths, default=0)


class Inventory:
    """Hosts and groups loaded from Ansible inventories, with host pattern selection."""

    def __init__(self, groups: dict[str, Group], hosts: dict[str, Host], *, sources: list[str],
                 warnings: list[Problem] | None = None, files: list[tuple[str, str]] | None = None,
                 implicit: Mapping[str, Host] | None = None):
        self.groups = groups
        self.hosts = hosts
        self.sources = sources
        self.warnings: list[Problem] = list(warnings or [])
        self._files = list(files or [])
        self._implicit = dict(implicit or {})    # the implicit localhost under each of its names, with its vars
        self._group_hosts: dict[str, list[str]] = {}
        # Ansible's localhost: the first localhost-like host of the inventory stands for every localhost name.
        self._localhost = next((n for n in hosts if n in LOCALHOST_NAMES), None)

    # construction

    @classmethod
    def load(cls, sources: str | os.PathLike | Sequence[str | os.PathLike] | None = None, *,
             ssh_config: str | os.PathLike | None | Literal[False] = None) -> Inventory:
        """Load inventories (files, directories or `a,b,` host lists); None means the default inventory.

        `ssh_config`: a path, None for ~/.ssh/config when it exists, or False to ignore SSH config.
        """
        if sources is None:
            return cls.default(ssh_config=ssh_config)
        if isinstance(sources, (str, os.PathLike)):
            sources = [sources]
        b = _Builder()
        for src in sources:
            _load_source(b, src)
        return _resolve(b, [str(s) for s in sources], ssh_config)

    @classmethod
    def from_text(cls, text: str, *, fmt: Literal["yaml", "ini"] = "yaml", filename: str | None = None,
                  ssh_config: str | os.PathLike | None | Literal[False] = False) -> Inventory:
        """Load an inventory from a string (tests, embedding); no group_vars/host_vars are read."""
        b = _Builder()
        name = filename or f"<inventory.{'yml' if fmt == 'yaml' else 'ini'}>"
        b.note_file(name, text)
        if fmt == "yaml":
            try:
                _load_yaml_inventory(b, Path(name), text)
            except InventoryError as exc:
                b.problems.items.extend(exc.problems)
        else:
            _load_ini_inventory(b, Path(name), text)
        return _resolve(b, [name], ssh_config)

    @classmethod
    def local(cls) -> Inventory:
        """The local machine only: `localhost` with `connection: local`, for a first run without SSH."""
        b = _Builder()
        b.add_host("ungrouped", "localhost", None)
        b.set_host_var("localhost", "ansible_connection", "local", None)
        b.hosts["localhost"].var_origins["ansible_connection"] = VarOrigin(None, "default inventory (local machine)",
                                                                           _RANK["host"])
        return _resolve(b, ["<local machine>"], False)

    @classmethod
    def default(cls, cwd: str | os.PathLike | None = None, *,
                ssh_config: str | os.PathLike | None | Literal[False] = None) -> Inventory:
        """With no -i: `./inventory/` when it exists, else the local machine only."""
        base = Path(cwd) if cwd is not None else Path.cwd()
        directory = base / DEFAULT_INVENTORY_DIR
        if directory.is_dir():
            return cls.load([directory], ssh_config=ssh_config)
        return cls.local()

    # queries

    @property
    def source(self) -> str:
        """A short description of where the inventory came from (for the audit trail)."""
        return ", ".join(self.sources)

    def content_hash(self) -> str:
        """sha256 over every file read (inventory, group_vars, host_vars), in reading order."""
        h = hashlib.sha256()
        for path, digest in self._files:
            h.update(f"{path}\0{digest}\n".encode())
        return h.hexdigest()

    def get(self, name: str) -> Host:
        """One host by name (the implicit localhost included); InventoryError when unknown."""
        if name in self.hosts:
            return self.hosts[name]
        if name in LOCALHOST_NAMES:
            if self._localhost is not None:
                return self.hosts[self._localhost]
            return self._implicit.get(name) or _implicit_localhost(name)
        raise InventoryError([Problem(f"unknown host `{name}`", None,
                                      did_you_mean(name, list(self.hosts)) or f"known hosts: {_listing(self.hosts)}",
                                      code="unknown-host")])

    def group_hosts(self, name: str) -> list[str]:
        """Hosts of a group in Ansible's order: its own hosts, then its children's, level by level, each host once."""
        if name not in self._group_hosts:
            order, seen, level = [name], {name}, [name]
            while level:
                # Ansible walks one level at a time; between grandchildren of different children its order is
                # that of an in-memory set, which varies from run to run. Here: the order of the file.
                nxt: list[str] = []
                for g in level:
                    for kid in self.groups[g].children:
                        if kid not in seen:
                            seen.add(kid)
                            nxt.append(kid)
                order.extend(nxt)
                level = nxt
            self._group_hosts[name] = list(dict.fromkeys(h for g in order for h in self.groups[g].hosts))
        return list(self._group_hosts[name])

    def select(self, pattern: str | None = "all", limit: str | None = None) -> list[Host]:
        """Hosts matching an Ansible pattern (then `limit`), in Ansible's order; InventoryError when none match."""
        pattern = "all" if pattern is None or not str(pattern).strip() else str(pattern)
        sel = _Selection(self)
        names = sel.evaluate(pattern, "host pattern")
        if not names:
            raise InventoryError([Problem(f"host pattern `{pattern}` selects no host", None,
                                          f"known groups: {_listing(self._group_names())}", code="no-hosts")])
        if limit is not None and str(limit).strip():
            allowed = set(sel.evaluate(str(limit), "--limit"))
            names = [n for n in names if n in allowed]
            if not names:
                raise InventoryError([Problem(f"--limit `{limit}` leaves no host of pattern `{pattern}`", None,
                                              f"known groups: {_listing(self._group_names())}", code="no-hosts")])
        return [self.get(n) for n in names]

    def limit_warnings(self, limit: str | None) -> list[Problem]:
        """Why a listing under `limit` leaves out a host that the limit does select (the implicit localhost)."""
        if not limit or not str(limit).strip():
            return []
        implicit = [n for n in self.names(str(limit), what="--limit") if n not in self.hosts]
        return [Problem(f"`{n}` is not in the inventory: the implicit localhost (connection: local) that patterns "
                        "naming it select belongs to no group, so it is not listed, as in ansible-inventory", None,
                        f"`runbook inventory --host {n}` shows its variables; add it to the inventory to list it",
                        severity="warning", code="implicit-localhost") for n in implicit]

    def names(self, pattern: str, *, what: str = "host pattern") -> list[str]:
        """Names of the hosts a pattern selects, in Ansible's order; [] when none (an unknown term is an error)."""
        return _Selection(self).evaluate(pattern, what)

    def _group_names(self) -> list[str]:
        return [g for g in self.groups if g != "all" and (g != "ungrouped" or self.groups[g].hosts)]

    def _limited(self, limit: str | None) -> set[str]:
        """Inventory hosts a --limit keeps (every host without one)."""
        if not limit:
            return set(self.hosts)
        return {n for n in self.names(limit, what="--limit") if n in self.hosts}

    # renderings for `runbook inventory`

    def to_ansible_json(self, limit: str | None = None) -> dict[str, Any]:
        """The shape of `ansible-inventory --list`: groups with hosts/children, and `_meta.hostvars`."""
        available = self._limited(limit)
        out: dict[str, Any] = {"_meta": {"hostvars": {}}}
        for name in self.hosts:
            if name in available and self.hosts[name].vars:
                out["_meta"]["hostvars"][name] = _jsonable(dict(self.hosts[name].vars))
        seen: set[str] = set()

        def emit(group: Group) -> None:
            entry: dict[str, Any] = {}
            if group.name != "all":
                hosts = [h for h in group.hosts if h in available]
                if hosts:
                    entry["hosts"] = hosts
            if group.children:
                entry["children"] = list(group.children)
            if entry:
                out[group.name] = entry
            for kid in group.children:
                if kid not in seen:
                    seen.add(kid)
                    emit(self.groups[kid])

        emit(self.groups["all"])
        return out

    def graph(self, group: str = "all", limit: str | None = None) -> str:
        """A tree of groups and hosts, like `ansible-inventory --graph`."""
        if group not in self.groups:
            raise InventoryError([Problem(f"unknown group `{group}`", None,
                                          did_you_mean(group, list(self.groups)) or f"known groups: {_listing(self.groups)}")])
        available = self._limited(limit)
        lines: list[str] = []

        def walk(name: str, depth: int) -> None:
            lines.append(_graph_line(f"@{name}:", depth))
            g = self.groups[name]
            for kid in sorted(g.children):
                walk(kid, depth + 1)
            if name != "all":
                for h in sorted(g.hosts):
                    if h in available:
                        lines.append(_graph_line(h, depth + 1))

        walk(group, 0)
        return "\n".join(lines)

    def describe_host(self, name: str) -> dict[str, Any]:
        """One host's groups, connection settings and merged variables, each with where it came from."""
        host = self.get(name)
        conn = {
            "address": host.address, "port": host.port, "user": host.user, "key_file": host.key_file,
            "connection": host.connection, "become_user": host.become_user, "proxy_jump": host.proxy_jump,
        }
        origins = dict(host.origins)
        return {
            "name": host.name,
            "groups": list(host.groups),
            "connection": {k: {"value": v, "from": str(origins[f"@{k}"]) if f"@{k}" in origins else "default"}
                           for k, v in conn.items()},
            "vars": {k: {"value": _jsonable(v), "from": str(origins[k]) if k in origins else "unknown"}
                     for k, v in host.vars.items()},
        }


# --- host patterns -----------------------------------------------------------------------------------

@dataclass
class _Selection:
    """One evaluation of a pattern and its --limit, in Ansible's order.

    The union terms keep their order (`g2:g1` lists g2's hosts first), then `&` terms and `!` terms
    filter that list; each host comes out once, where it first appeared.
    """

    inventory: Inventory
    localhost: str | None = None    # Ansible makes one implicit localhost, named as it was first asked for

    def evaluate(self, pattern: str, what: str) -> list[str]:
        terms = split_pattern(pattern)
        if not terms:
            raise InventoryError([Problem(f"empty {what}", None, "use `all` for every host")])
        regular = [t for t in terms if t[0] not in "&!"] or ["all"]   # only `&`/`!` terms: start from all
        ordered = regular + [t for t in terms if t[0] == "&"] + [t for t in terms if t[0] == "!"]
        result: dict[str, None] = {}
        for t in ordered:
            if t in self.inventory.hosts:
                # A term that is a host's name is that host, even when a group has the name (Ansible).
                result.setdefault(t, None)
            elif t[0] == "&":
                keep = set(self.match_term(t, pattern, what))
                result = {n: None for n in result if n in keep}
            elif t[0] == "!":
                drop = set(self.match_term(t, pattern, what))
                result = {n: None for n in result if n not in drop}
            else:
                result.update(dict.fromkeys(self.match_term(t, pattern, what)))
        return list(result)

    def match_term(self, term: str, whole: str, what: str) -> list[str]:
        """Hosts of one term (a group, a host, a glob or a ~regex, with an optional [subscript]), repeats kept."""
        inv = self.inventory
        base, subscript = _split_subscript(term[1:] if term[0] in "&!" else term)
        if not base:
            raise InventoryError([Problem(f"empty term `{term}` in {what} `{whole}`", None,
                                          "remove the doubled or trailing `&` or `!`")])
        match = _term_matcher(base, whole, what)
        groups = [g for g in inv.groups if match(g)]
        names = [n for g in groups for n in inv.group_hosts(g)]   # repeats across groups count for [subscripts]
        if not groups or base.startswith("~") or any(c in base for c in ".?*["):
            names.extend(n for n in inv.hosts if match(n))
        if not names and base in LOCALHOST_NAMES:
            if inv._localhost is None:
                self.localhost = self.localhost or base
            names = [inv._localhost or self.localhost or base]
        if not names and not groups:
            known = inv._group_names()
            guess = did_you_mean(base, known + list(inv.hosts))
            hint = f"{guess + ' ' if guess else ''}known groups: {_listing(known)}"
            raise InventoryError([Problem(f"term `{term}` of {what} `{whole}` matches no group and no host", None, hint,
                                          code="no-hosts")])
        return _apply_subscript(names, subscript, term, whole, what) if subscript is not None else names


def _term_matcher(base: str, whole: str, what: str) -> Any:
    """A `match(name)` for a ~regex (anchored at the start) or a glob (the whole name)."""
    if base.startswith("~"):
        try:
            return re.compile(base[1:]).match
        except re.error as exc:
            raise InventoryError([Problem(f"invalid regular expression `{base[1:]}` in {what} `{whole}`: {exc}",
                                          None, "a pattern starting with `~` is a Python regular expression")]) from None
    return re.compile(fnmatch.translate(base)).match


_LABEL_RANGE = r"\[(?:[a-z]:[a-z]|[0-9]+:[0-9]+)(?::[0-9]+)?\]"
_LABEL = rf"(?:\w|{_LABEL_RANGE})(?:[\w-]|{_LABEL_RANGE})*(?<![_-])"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*", re.IGNORECASE)
_HOSTPORT_RE = re.compile(r"((?:[^:\[\]]|\[[^\]]*\])*):[0-9]+")
_BRACKETED_HOSTPORT_RE = re.compile(r"\[(.+)\]:[0-9]+")


def _is_address(text: str) -> bool:
    """True for one host, address or range with an optional :port, which a pattern keeps whole despite its colons."""
    m = _BRACKETED_HOSTPORT_RE.fullmatch(text) or _HOSTPORT_RE.fullmatch(text)
    host = m.group(1) if m else text
    try:
        ipaddress.IPv6Address(host)
        return True
    except ValueError:
        return bool(_HOSTNAME_RE.fullmatch(host))


def split_pattern(pattern: str) -> list[str]:
    """Split an Ansible host pattern into terms, as Ansible does.

    With a comma, only commas separate (`a:b,c` is `a:b` and `c`). Without one, a single host or address
    (`fe80::1`, `web[1:3]`, `web:22`) stays whole, and otherwise `:` and whitespace separate, with
    [brackets] kept whole. One extension: a comma inside `{...}` (a regex repeat) does not separate.
    """
    pattern = pattern.strip()
    commas = [i for i, ch in _outside_braces(pattern) if ch == ","]
    if commas:
        bounds = [-1, *commas, len(pattern)]
        terms = [pattern[a + 1:b] for a, b in zip(bounds, bounds[1:])]
    elif _is_address(pattern):
        terms = [pattern]
    else:
        terms = re.findall(r"(?:[^\s:\[\]{}]|\[[^\]]*\]|\{[^}]*\})+", pattern)
    return [t.strip() for t in terms if t.strip()]


def _outside_braces(text: str) -> Iterator[tuple[int, str]]:
    depth = 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        elif depth == 0:
            yield i, ch


# As Ansible: `[N]` (negative allowed), `[START:END]` or `[START:]`, and the deprecated `[START-END]`.
_SUBSCRIPT_RE = re.compile(r"^(.+)\[(?:(-?[0-9]+)|([0-9]+)([:-])([0-9]*))\]$")


def _split_subscript(term: str) -> tuple[str, tuple[int, int | None] | None]:
    """`web[0]`, `web[-1]`, `web[1:3]` (inclusive, as in Ansible), `web[2:]`; a regex keeps its brackets."""
    m = _SUBSCRIPT_RE.match(term)
    if not m or term.startswith("~"):
        return term, None
    base, single, start, _sep, end = m.groups()
    if single is not None:
        return base, (int(single), None)
    return base, (int(start), int(end) if end else -1)


def _apply_subscript(names: list[str], sub: tuple[int, int | None], term: str, whole: str, what: str) -> list[str]:
    """Ansible's rules: `[N]` is one host; `[A:B]` is A..B inclusive, `[A:]` to the end; `[A:0]` is `[A]`."""
    start, end = sub
    if not names:
        return names
    if end:   # as in Ansible, an end of 0 falls through to the single index
        return names[start: (len(names) if end == -1 else end + 1)]
    if -len(names) <= start < len(names):
        return [names[start]]
    raise InventoryError([Problem(f"subscript in `{term}` ({what} `{whole}`) is out of range: it selects "
                                  f"{len(names)} host(s)", None, f"use an index from 0 to {len(names) - 1}")])


def _graph_line(text: str, depth: int) -> str:
    return ("  |" * depth + "--" + text) if depth else text


def _listing(names: Iterable[str], limit: int = 20) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "") if names else "(none)"


def _jsonable(value: Any) -> Any:
    """Values from INI literals may be tuples; JSON wants lists."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _implicit_localhost(name: str = "localhost") -> Host:
    origin = VarOrigin(None, "implicit localhost", 0)
    return Host(name=name, address=name, connection="local", vars={"ansible_connection": "local"},
                origins={"@connection": origin, "ansible_connection": origin}, implicit=True)


# --- resolution ----------------------------------------------------------------------------------------

def _reconcile_groups(b: _Builder) -> None:
    """Ansible's reconcile: parentless groups join `all`, then hosts in no group but `all` join `ungrouped`."""
    groups = b.groups
    for g in groups.values():
        if g.name != "all" and not g.parents:
            groups["all"].children.append(g.name)
            g.parents.append("all")
    in_real_group = {h for g in groups.values() if g.name not in ("all", "ungrouped") for h in g.hosts}
    ungrouped = groups["ungrouped"]
    ungrouped.hosts = [h for h in ungrouped.hosts if h not in in_real_group]
    placed = in_real_group | set(ungrouped.hosts)
    for h in groups["all"].hosts:
        if h in placed:
            continue
        if h in groups and h not in ("all", "ungrouped"):
            # Ansible adds "the child named h" to ungrouped, and a group of that name wins over the host.
            b.add_child("ungrouped", h, b.hosts[h].location)
        else:
            ungrouped.hosts.append(h)
            placed.add(h)
    _compute_depths(groups)


class _VarsMerger:
    """Merges one host's variables level by level, reading each group_vars/host_vars file once."""

    def __init__(self, b: _Builder, dirs: list[Path]) -> None:
        self.b = b
        self.cache: dict[Path, list[tuple[str, Any, Location]]] = {}
        self.listed: dict[tuple[str, str], list[Path]] = {}
        self.bases = {kind: [d / kind for d in dirs if (d / kind).is_dir()] for kind in ("group_vars", "host_vars")}

    def files(self, kind: str, name: str) -> list[Path]:
        key = (kind, name)
        if key not in self.listed:   # many hosts share groups: look each group's files up once
            self.listed[key] = [f for base in self.bases[kind] for f in _vars_files(base, name)]
        return self.listed[key]

    def merge(self, name: str, mine: list[Group], host_items: list[tuple[str, Any, VarOrigin]]
              ) -> tuple[dict[str, Any], dict[str, VarOrigin], dict[str, int]]:
        """(merged vars, where each came from, which merge step set it last: decides between aliases)."""
        merged: dict[str, Any] = {}
        origins: dict[str, VarOrigin] = {}
        layer_of: dict[str, int] = {}
        all_group = self.b.groups["all"]
        layers: list[Iterable[tuple[str, Any, VarOrigin]]] = [
            [(k, v, all_group.var_origins[k]) for k, v in all_group.vars.items()],
            *([(k, v, g.var_origins[k]) for k, v in g.vars.items()] for g in mine),
            *(self._file_items(f, "group_vars/all", "group_vars_all") for f in self.files("group_vars", "all")),
            *(self._file_items(f, f"group_vars/{g.name}", "group_vars")
              for g in mine for f in self.files("group_vars", g.name)),
            host_items,
            *(self._file_items(f, f"host_vars/{name}", "host_vars") for f in self.files("host_vars", name)),
        ]
        for i, items in enumerate(layers, 1):
            for k, v, o in items:
                merged[k], origins[k], layer_of[k] = v, o, i
        return merged, origins, layer_of

    def _file_items(self, path: Path, scope: str, rank: str) -> list[tuple[str, Any, VarOrigin]]:
        return [(k, v, VarOrigin(loc, scope, _RANK[rank])) for k, v, loc in _load_vars_file(self.b, path, self.cache)]


def _warn_unused_vars_files(b: _Builder, dirs: list[Path]) -> None:
    for d in dirs:
        for kind in ("group_vars", "host_vars"):
            base = d / kind
            if not base.is_dir():
                continue
            names = set(b.groups) if kind == "group_vars" else set(b.hosts) | set(LOCALHOST_NAMES)  # implicit localhost
            for entry in sorted(base.iterdir()):
                stem = entry.name if entry.is_dir() else (entry.stem if entry.suffix.lower() in YAML_EXTENSIONS else entry.name)
                if stem not in names and not _skipped_in_directory(entry):
                    known = list(b.groups) if kind == "group_vars" else list(b.hosts)
                    b.problems.add(f"`{kind}/{entry.name}` matches no {'group' if kind == 'group_vars' else 'host'}"
                                   " of the inventory", Location(str(entry)),
                                   did_you_mean(stem, known) or "its variables are not used", severity="warning",
                                   code="unused-vars-file")


def _resolve(b: _Builder, sources: list[str], ssh_config: str | os.PathLike | None | Literal[False]) -> Inventory:
    """Reconcile groups (ungrouped, depths), merge variables by precedence, resolve connection settings."""
    groups, problems = b.groups, b.problems
    _reconcile_groups(b)
    for name in b.hosts:
        if name in groups and name not in ("all", "ungrouped"):
            problems.add(f"`{name}` is both a host and a group; the pattern `{name}` selects the host, while "
                         f"`{name}[0]`, `&{name}`, `!{name}` and globs select the group", b.hosts[name].location,
                         "rename one of them", severity="warning", code="host-group-clash")
    host_groups: dict[str, set[str]] = {h: set() for h in b.hosts}
    for g in groups.values():
        lineage = {g.name} | _ancestors(groups, g.name)
        for h in g.hosts:
            host_groups[h].update(lineage)
    seen_dirs: list[Path] = []
    for d in b.vars_dirs:
        if d.resolve() not in [s.resolve() for s in seen_dirs]:
            seen_dirs.append(d)
    _warn_unused_vars_files(b, seen_dirs)
    merger = _VarsMerger(b, seen_dirs)
    hosts: dict[str, Host] = {}
    ssh_lookup = _ssh_config_lookup(ssh_config, problems)
    warned: set[Location | None] = set()
    for name, hdef in b.hosts.items():
        mine = sorted((groups[g] for g in host_groups[name] if g != "all"), key=lambda g: (g.depth, g.priority, g.name))
        merged, origins, layer_of = merger.merge(name, mine, [(k, v, hdef.var_origins[k]) for k, v in hdef.vars.items()])
        for k in IGNORED_VARS:
            if k in merged and origins[k].location not in warned:
                warned.add(origins[k].location)
                problems.add(f"`{k}` is not supported and is ignored", origins[k].location,
                             "set ProxyJump or other options in ~/.ssh/config instead", severity="warning",
                             code="ignored-var")
        hosts[name] = _make_host(name, merged, origins, layer_of, tuple(g.name for g in mine), ssh_lookup, problems)
    implicit: dict[str, Host] = {}
    if not any(n in LOCALHOST_NAMES for n in b.hosts):
        # Ansible's implicit localhost: the vars of `all`, `group_vars/all`, host_vars/NAME and connection local.
        local_var = [("ansible_connection", "local", VarOrigin(None, "implicit localhost", _RANK["host"]))]
        for name in LOCALHOST_NAMES:
            merged, origins, layer_of = merger.merge(name, [], local_var)
            implicit[name] = replace(_make_host(name, merged, origins, layer_of, (), ssh_lookup, problems), implicit=True)
    problems.raise_if_errors(InventoryError)
    # Hosts keep the order in which they were first defined.
    return Inventory(groups, hosts, sources=sources, warnings=problems.warnings, files=b.files, implicit=implicit)


def _ancestors(groups: dict[str, Group], name: str) -> set[str]:
    seen: set[str] = set()
    todo = list(groups[name].parents)
    while todo:
        g = todo.pop()
        if g not in seen:
            seen.add(g)
            todo.extend(groups[g].parents)
    return seen


def _pick(merged: dict[str, Any], layer_of: dict[str, int], setting: str) -> tuple[Any, str | None]:
    """The value of a connection setting: the alias set at the highest precedence level, Ansible's name on a tie."""
    best: tuple[int, int] | None = None
    chosen: str | None = None
    names = CONNECTION_VARS[setting]
    for i, key in enumerate(names):
        if key in merged:
            rank = (layer_of.get(key, 0), -i)
            if best is None or rank > best:
                best, chosen = rank, key
    return (merged[chosen], chosen) if chosen else (None, None)


def _make_host(name: str, merged: dict[str, Any], origins: dict[str, VarOrigin], layer_of: dict[str, int],
               groups: tuple[str, ...],
               ssh_lookup: Any, problems: Problems) -> Host:
    conn_origins: dict[str, VarOrigin] = {}
    values: dict[str, Any] = {}
    for setting in CONNECTION_VARS:
        value, key = _pick(merged, layer_of, setting)
        if key is not None:
            values[setting] = value
            conn_origins[f"@{setting}"] = origins.get(key, VarOrigin(None, "inventory"))

    def bad(setting: str, message: str, hint: str | None = None) -> None:
        o = conn_origins.get(f"@{setting}")
        problems.add(f"host `{name}`: {message}", o.location if o else None, hint, code="invalid-connection")

    connection: Connection = "ssh"
    if "connection" in values:
        raw = str(values["connection"]).strip().lower()
        if raw in _SSH_ALIASES:
            connection = _SSH_ALIASES[raw]
        elif raw in CONNECTIONS:
            connection = raw
        else:
            bad("connection", f"unsupported connection `{values['connection']}`",
                f"use one of: {', '.join(CONNECTIONS.names())}")
    port: int | None = None
    if "port" in values:
        raw_port = values["port"]
        if isinstance(raw_port, bool) or not (isinstance(raw_port, int) or (isinstance(raw_port, str) and raw_port.strip().isdigit())):
            bad("port", f"invalid port {raw_port!r}: expected a number from 1 to 65535")
        else:
            port = int(raw_port)
            if not 1 <= port <= 65535:
                bad("port", f"invalid port {port}: expected a number from 1 to 65535")
                port = None
    strings: dict[str, str | None] = {}
    for setting in ("host", "user", "key_file", "become_user"):
        v = values.get(setting)
        if v is None:
            strings[setting] = None
        elif isinstance(v, (dict, list, tuple, bool)):
            bad(setting, f"`{setting}` must be a string, got {_kind(v)}")
            strings[setting] = None
        else:
            strings[setting] = str(v).strip() or None

    # ~/.ssh/config, looked up by the address OpenSSH would be given; inventory values win over it.
    target = strings["host"] or name
    address, proxy_jump = target, None
    user, key_file = strings["user"], strings["key_file"]
    if connection == "ssh" and ssh_lookup is not None:
        cfg, cfg_origin = ssh_lookup(target)
        if cfg.get("hostname") and cfg["hostname"] != target:
            address = cfg["hostname"]
            conn_origins["@address"] = cfg_origin
        if port is None and cfg.get("port"):
            try:
                port = int(cfg["port"])
                conn_origins["@port"] = cfg_origin
            except ValueError:
                pass
        if user is None and cfg.get("user"):
            user = cfg["user"]
            conn_origins["@user"] = cfg_origin
        if key_file is None and cfg.get("identityfile"):
            key_file = cfg["identityfile"][0]
            conn_origins["@key_file"] = cfg_origin
        if cfg.get("proxyjump") and cfg["proxyjump"].lower() != "none":
            proxy_jump = cfg["proxyjump"]
            conn_origins["@proxy_jump"] = cfg_origin
    if "@host" in conn_origins and "@address" not in conn_origins:
        conn_origins["@address"] = conn_origins["@host"]
    if key_file:
        key_file = os.path.expanduser(key_file)
    all_origins = dict(origins)
    all_origins.update(conn_origins)
    return Host(name=name, address=address, port=port or 22, user=user, key_file=key_file, connection=connection,
                become_user=strings["become_user"], proxy_jump=proxy_jump, groups=groups, vars=merged,
                origins=all_origins)


def _ssh_config_lookup(ssh_config: str | os.PathLike | None | Literal[False], problems: Problems) -> Any:
    """A function host -> (settings, origin) reading an OpenSSH client config, or None when there is none."""
    if ssh_config is False:
        return None
    path = Path(ssh_config).expanduser() if ssh_config is not None else Path("~/.ssh/config").expanduser()
    if not path.is_file():
        if ssh_config is not None:
            problems.add("SSH config file not found", Location(str(path)), severity="warning")
        return None
    import paramiko

    try:
        config = paramiko.SSHConfig.from_path(str(path))
    except (OSError, ValueError, paramiko.ssh_exception.ConfigParseError) as exc:
        problems.add(f"cannot read SSH config: {exc}", Location(str(path)), "fix the file or remove it", severity="warning")
        return None
    origin = VarOrigin(Location(str(path)), "ssh config", 0)

    def lookup(host: str) -> tuple[dict[str, Any], VarOrigin]:
        try:
            return dict(config.lookup(host)), origin
        except Exception as exc:  # paramiko raises assorted errors for Match exec / canonicalisation
            problems.add(f"SSH config lookup for `{host}` failed: {exc}", Location(str(path)), severity="warning")
            return {}, origin

    return lookup


# --- convenience ---------------------------------------------------------------------------------------

def load_inventory(sources: str | os.PathLike | Sequence[str | os.PathLike] | None = None, *,
                   ssh_config: str | os.PathLike | None | Literal[False] = None) -> Inventory:
    """Load inventories, or the default one when `sources` is None (see Inventory.default)."""
    return Inventory.load(sources, ssh_config=ssh_config)


def inventory_report(inventory: Inventory, *, mode: Literal["list", "graph", "host"], limit: str | None = None,
                     host: str | None = None, group: str = "all") -> str:
    """The text `runbook inventory --list | --graph | --host NAME` prints."""
    if mode == "list":
        return json.dumps(inventory.to_ansible_json(limit), indent=4, sort_keys=True)  # as ansible-inventory prints it
    if mode == "graph":
        return inventory.graph(group, limit)
    if host is None:
        raise InventoryError("--host needs a host name")
    # The limit's own hosts, the implicit localhost included (it is in no group, so not in `all`).
    if limit and host not in inventory.names(limit, what="--limit"):
        raise InventoryError([Problem(f"host `{host}` is outside --limit `{limit}`", None)])
    return json.dumps(inventory.describe_host(host), indent=4)


__all__ = [
    "CONNECTION_VARS", "MAX_HOST_ENTRIES", "MAX_INVENTORY_HOSTS", "MAX_RANGE_HOSTS", "Group", "Host", "Inventory",
    "RangeTooLarge", "VarOrigin", "count_hostname_range", "expand_hostname_range", "inventory_report", "load_inventory",
    "parse_host_pattern", "split_host_port", "split_pattern",
]
