"""Shared machinery of the resource actions (file, copy, line, block, sysctl): read a path's state in
one round trip, describe the difference, and apply it with fixed shell scripts that take every
value as an argument (never as shell text).

Every remote command here is an argv list `["sh", "-c", SCRIPT, "sh", ARG...]`: SCRIPT is a
constant of this module and paths, contents, owners and modes arrive as positional arguments, so
no value can change what the shell runs. Reads run with the step's sudo, like its writes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import posixpath
import re
import stat as stat_mod
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field, model_validator

from runbook.actions.base import Action, Outcome, Prediction, PredictionKind, TaskEnv
from runbook.actions.upload import content_diff
from runbook.errors import RunbookError
from runbook.fields import OctalMode, Strict

#: Content up to this size comes back with the state read (base64 fits the connections' default output limit).
INLINE_LIMIT = 64 * 1024
#: Larger files are read in pieces of this size, each one command (a file to edit, or to diff).
CHUNK = 24 * 1024
#: Files larger than this are not edited line by line (line, block, sysctl): too big to be a config file.
EDIT_LIMIT = 8 * 1024 * 1024

_NAME = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?|\d{1,10})$")

# Shell functions shared by the read scripts. `rb_path` expands a leading ~ as a shell step's
# `quote_path` would (to $HOME of the user the step runs as: sudo -H sets it).
_LIB = r"""
rb_count() { n=$(find -H "$p" -mindepth 1 "$@" -printf x | wc -c); printf '%s ' "$n"; find -H "$p" -mindepth 1 "$@" -print0 | head -z -n 5 | base64 -w0; echo; }
rb_b64() { printf '%s' "$1" | base64 -w0; echo; }
rb_w() { if [ -w "$2" ]; then echo "$1 1"; else echo "$1 0"; fi; }
rb_path() { case $1 in "~") p=$HOME ;; "~/"*) p=$HOME/${1#"~/"} ;; *) p=$1 ;; esac; }
rb_ids() {
  printf 'me %s %s\n' "$(id -u)" "$(id -G)"; printf 'umask %s\n' "$(umask)"
  if [ -n "$1" ]; then u=$(id -u -- "$1" 2>/dev/null) || case $1 in *[!0-9]*) u=- ;; *) u=$1 ;; esac; printf 'uid %s\n' "$u"; fi
  if [ -n "$2" ]; then g=$(getent group -- "$2" 2>/dev/null | cut -d: -f3) || g=;
    [ -n "$g" ] || case $2 in *[!0-9]*) g=- ;; *) g=$2 ;; esac; printf 'gid %s\n' "$g"; fi
}
rb_state() {
  rb_path "$1"; lim=$2; follow=$3
  printf 'path '; rb_b64 "$p"
  if [ ! -e "$p" ] && [ ! -L "$p" ]; then
    a=$p
    while [ "$a" != / ]; do
      a=${a%/*}; [ -n "$a" ] || a=/
      if [ -e "$a" ] || [ -L "$a" ]; then break; fi
    done
    if [ -d "$a" ]; then if [ -x "$a" ]; then k=dir; else k=denied; fi; else k=notdir; fi
    rb_w dirw "$a"; printf 'absent %s ' "$k"; rb_b64 "$a"; return 0
  fi
  stat -c 'lstat %f %a %u %g %U %G %s' -- "$p" || return 3
  d=${p%/*}; rb_w dirw "${d:-/}"
  f=$p
  if [ -L "$p" ]; then
    printf 'target %s\n' "$(readlink -- "$p" | base64 -w0)"
    if [ "$follow" != 1 ]; then return 0; fi
    if [ ! -e "$p" ]; then echo dangling; return 0; fi
    stat -L -c 'follow %f %a %u %g %U %G %s' -- "$p" || return 3
    printf 'real %s\n' "$(readlink -f -- "$p" | base64 -w0)"
    r=$(readlink -f -- "$p"); d=${r%/*}; rb_w realdirw "${d:-/}"
  fi
  if [ -f "$f" ]; then
    if [ ! -r "$f" ]; then echo unreadable; return 0; fi
    size=$(stat -L -c %s -- "$f")
    if [ "$lim" -gt 0 ] && [ "$size" -le "$lim" ]; then echo content; base64 < "$f" || return 4
    else printf 'sha %s\n' "$(sha256sum < "$f" | cut -d' ' -f1)"; fi
  fi
}
"""

# $1 path, $2 content limit, $3 follow links, $4 owner, $5 group, $6 recurse with mode $7, $8 count entries,
# $9 another file to read first (a sysctl's live value).
# Content comes last (it runs to the end of the output), so the counts come before it for directories only.
STATE_SCRIPT = _LIB + r"""
if [ -n "$9" ]; then
  if [ -r "$9" ] && v=$(base64 -w0 < "$9"); then w=r; if [ -w "$9" ]; then w=w; fi; printf 'extra %s %s\n' "$w" "$v"
  else echo noextra; fi
fi
rb_ids "$4" "$5"; rb_state "$1" "$2" "$3" || exit $?
if [ -d "$p" ]; then
  if [ "$6" = 1 ]; then
    if [ -n "$7" ]; then printf 'rmode '; rb_count ! -type l ! -perm "$7"; fi
    if [ -n "$4" ] && [ "$u" != - ]; then printf 'rowner '; rb_count ! -uid "$u"; fi
    if [ -n "$5" ] && [ "$g" != - ]; then printf 'rgroup '; rb_count ! -gid "$g"; fi
  fi
  if [ "$8" = 1 ] && [ ! -L "$p" ]; then printf 'entries %s\n' "$(find "$p" -mindepth 1 -printf x | wc -c)"; fi
fi
"""

CHUNK_SCRIPT = 'dd if="$1" bs="$2" skip="$3" count=1 2>/dev/null | base64'

# Replace a file atomically: check it is still what was read ($2: its sha256, `absent` or `link`),
# write a temp file beside it from base64 on stdin, give it the old or the wanted owner, group and
# mode, let the validator judge it (`sh -c "$7" sh TEMP`), keep a backup, then rename it into place.
WRITE_SCRIPT = r"""
set -e
d=$1; want=$2; mode=$3; owner=$4; group=$5; backup=$6; check=$7; parents=$8
dir=${d%/*}; [ -n "$dir" ] || dir=/
if [ -L "$d" ]; then cur=link; elif [ -e "$d" ]; then cur=$(sha256sum < "$d"); cur=${cur%% *}; else cur=absent; fi
if [ "$cur" != "$want" ]; then echo "it changed after it was read; nothing written" >&2; exit 90; fi
if [ "$parents" = 1 ] && [ ! -d "$dir" ]; then mkdir -p -- "$dir"; fi
t=$(mktemp -- "$dir/.runbook-XXXXXXXX")
trap 'rm -f -- "$t"' EXIT
base64 -d > "$t"
if [ "$cur" != absent ] && [ "$cur" != link ]; then
  chown --reference="$d" -- "$t" 2>/dev/null || [ "$(stat -c %u:%g -- "$d")" = "$(stat -c %u:%g -- "$t")" ] ||
    { echo "cannot keep the owner and group of the file (it is not ours): use sudo" >&2; exit 91; }
fi
if [ -n "$owner" ]; then chown -- "$owner" "$t"; fi
if [ -n "$group" ]; then chgrp -- "$group" "$t"; fi
if [ -n "$mode" ]; then chmod -- "0$mode" "$t"
elif [ "$cur" != absent ] && [ "$cur" != link ]; then chmod --reference="$d" -- "$t"
else chmod -- "$(printf '0%04o' $((0666 & ~$(umask))))" "$t"; fi
sync -- "$t" 2>/dev/null || true
if [ -n "$check" ]; then
  if ! out=$(sh -c "$check" sh "$t" 2>&1 </dev/null); then printf '%s\n' "$out" >&2; echo validate-failed; exit 92; fi
fi
if [ "$backup" = 1 ] && [ "$cur" != absent ] && [ "$cur" != link ]; then
  b=$d.$(date -u +%Y%m%dT%H%M%SZ).bak; if [ -e "$b" ]; then b=$b.$$; fi
  cp -p -- "$d" "$b"; printf 'backup %s\n' "$(printf '%s' "$b" | base64 -w0)"
fi
mv -f -- "$t" "$d"; trap - EXIT
"""

# Owner, group, then mode (chown clears set-id bits, so the mode comes last); $5=1: the link itself.
ATTRS_SCRIPT = r"""
set -e
p=$1; mode=$2; owner=$3; group=$4
if [ "$5" = 1 ]; then
  if [ -n "$owner" ]; then chown -h -- "$owner" "$p"; fi
  if [ -n "$group" ]; then chgrp -h -- "$group" "$p"; fi
else
  if [ -n "$owner" ]; then chown -- "$owner" "$p"; fi
  if [ -n "$group" ]; then chgrp -- "$group" "$p"; fi
fi
if [ -n "$mode" ]; then chmod -- "0$mode" "$p"; fi
"""

RECURSE_APPLY_SCRIPT = r"""
set -e
p=$1; mode=$2; owner=$3; group=$4
if [ -n "$owner" ]; then find "$p" -mindepth 1 ! -user "$owner" -exec chown -h -- "$owner" {} +; fi
if [ -n "$group" ]; then find "$p" -mindepth 1 ! -group "$group" -exec chgrp -h -- "$group" {} +; fi
if [ -n "$mode" ]; then find "$p" -mindepth 1 ! -type l ! -perm "$mode" -exec chmod -- "0$mode" {} +; fi
"""

MKDIR_SCRIPT = 'mkdir -p -- "$1"'
TOUCH_SCRIPT = 'set -C; : > "$1"'
REMOVE_SCRIPT = 'rm -rf -- "$1"'
LINK_SCRIPT = r"""
set -e
p=$1; dir=${p%/*}; [ -n "$dir" ] || dir=/
t=$(mktemp -u -- "$dir/.runbook-XXXXXXXX")
ln -s -- "$2" "$t"
mv -fT -- "$t" "$p"
"""


class ApplyError(RunbookError):
    """A change command failed on the host: the message names the host, the path and what failed."""

    def __init__(self, message: str, *, stderr: str = "", rc: int | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.stderr = stderr
        self.rc = rc


@dataclass
class Info:
    """One `stat` line: file type, permission bits, owner and group (numbers and names), size."""

    kind: str              # file, directory, link, other
    mode: int
    uid: int
    gid: int
    user: str
    group: str
    size: int

    def attrs(self) -> dict[str, str]:
        """Mode, owner and group as people read them."""
        return {"mode": f"{self.mode:04o}", "owner": self.user if self.user != "UNKNOWN" else str(self.uid),
                "group": self.group if self.group != "UNKNOWN" else str(self.gid)}


@dataclass
class PathState:
    """What is at a path on the host, as one state read saw it."""

    path: str                               # absolute, ~ expanded
    fingerprint: str
    exists: bool = False
    ancestor: str | None = None             # absent: the nearest existing ancestor
    ancestor_kind: str | None = None        # dir, denied (not searchable), notdir
    lstat: Info | None = None
    target: str | None = None               # a symlink's target, as written
    follow: Info | None = None              # what a followed symlink leads to
    dangling: bool = False
    real: str | None = None                 # the followed symlink's canonical path
    content: bytes | None = None
    sha256: str | None = None
    unreadable: bool = False
    uid: int = -1                           # who read it (the sudo user)
    groups: tuple[int, ...] = ()
    umask: int = 0o022
    want_uid: int | None = None             # the requested owner and group, resolved on the host (-1: no such)
    want_gid: int | None = None
    below: dict[str, tuple[int, list[str]]] = field(default_factory=dict)   # recurse: mode/owner/group -> (count, first names)
    entries: int | None = None              # a directory's entries, counted for removal
    planned: bool = False                   # (partly) what an earlier step of this dry run leaves
    dirw: bool = True                       # the directory it is in (absent: the nearest existing one) is writable
    realdirw: bool = True                   # the same for the end of a followed symlink
    extra: bytes | None = None              # the other file read with the state (a sysctl's live value)
    extra_writable: bool = False

    @property
    def info(self) -> Info | None:
        """The stat of what the path leads to: the followed target of a symlink, else the path itself."""
        return self.follow or self.lstat

    @property
    def kind(self) -> str:
        """absent, file, directory, link (a link not followed or dangling) or other."""
        if not self.exists:
            return "absent"
        info = self.info
        return "link" if self.lstat and self.lstat.kind == "link" and (self.follow is None) else (info.kind if info else "other")


def _kind(raw_hex: str) -> str:
    mode = int(raw_hex, 16)
    if stat_mod.S_ISLNK(mode):
        return "link"
    if stat_mod.S_ISDIR(mode):
        return "directory"
    return "file" if stat_mod.S_ISREG(mode) else "other"


def _info(words: list[str]) -> Info:
    raw, mode, uid, gid, user, group, size = words
    return Info(_kind(raw), int(mode, 8), int(uid), int(gid), user, group, int(size))


def _b64(text: str) -> str:
    return base64.b64decode(text.strip()).decode("utf-8", errors="surrogateescape")


def parse_state(out: str) -> PathState:
    """Parse the state script's output (raises ValueError on anything unexpected)."""
    # The fingerprint is of what was found, not of where: a path that renders differently at apply time
    # (a run id in it) is not drift by itself, only a different state there is.
    found = "\n".join(line for line in out.split("\n") if not line.startswith("path "))
    state = PathState(path="", fingerprint=hashlib.sha256(found.encode("utf-8", "surrogateescape")).hexdigest())
    lines = out.split("\n")
    for i, line in enumerate(lines):
        tag, _, rest = line.partition(" ")
        words = rest.split()
        if tag == "content":
            state.content = base64.b64decode("".join(lines[i + 1:]), validate=False)
            state.sha256 = hashlib.sha256(state.content).hexdigest()
            break
        if tag == "me":
            state.uid, state.groups = int(words[0]), tuple(int(w) for w in words[1:])
        elif tag == "umask":
            state.umask = int(words[0], 8)
        elif tag in ("uid", "gid"):
            setattr(state, "want_" + tag, -1 if words[0] == "-" else int(words[0]))
        elif tag == "path":
            state.path = _b64(rest)
        elif tag == "absent":
            state.ancestor_kind, state.ancestor = words[0], _b64(words[1] if len(words) > 1 else "")
        elif tag == "lstat":
            state.exists, state.lstat = True, _info(words)
        elif tag == "target":
            state.target = _b64(rest).removesuffix("\n")
        elif tag == "follow":
            state.follow = _info(words)
        elif tag == "real":
            state.real = _b64(rest).removesuffix("\n")
        elif tag == "dangling":
            state.dangling = True
        elif tag == "sha":
            state.sha256 = words[0]
        elif tag == "unreadable":
            state.unreadable = True
        elif tag in ("rmode", "rowner", "rgroup"):
            names = _b64(words[1]).split("\x00") if len(words) > 1 else []
            state.below[tag[1:]] = (int(words[0]), [n for n in names if n])
        elif tag == "entries":
            state.entries = int(words[0])
        elif tag in ("dirw", "realdirw"):
            setattr(state, tag, words[0] == "1")
        elif tag == "extra":
            state.extra, state.extra_writable = base64.b64decode(words[1] if len(words) > 1 else ""), words[0] == "w"
        elif tag == "noextra":
            state.extra = None
        elif tag:
            raise ValueError(f"unexpected line {line[:60]!r}")
    if not state.path:
        raise ValueError("no path line")
    return state


# --- what earlier steps of a dry run are predicted to leave ----------------------------------------------
#
# A plan reads every host as it is now; a resource step that follows one predicted to create a
# directory or write a file must predict from what that step leaves, or `file: directory` then
# `copy` into it would predict a failure. So in a plan each predicted change records the path's
# state after it, per run and host, and later reads of that path (or below it) see that state.


@dataclass
class Planned:
    """A path as an earlier step of this dry run is predicted to leave it."""

    kind: str                           # file, directory, link, absent
    mode: int = 0o644
    uid: int = -1
    gid: int = -1
    content: bytes | None = None
    target: str | None = None


_PLANNED: OrderedDict[tuple[str, str], dict[str, Planned]] = OrderedDict()
_PLANNED_RUNS = 64          # a long-lived process (runbook serve) plans many runs: keep the last few
_PLANNED_LOCK = threading.Lock()


def _plan_key(env: TaskEnv) -> tuple[str, str] | None:
    run = env.vars.get("run")
    if not isinstance(run, dict) or str(run.get("mode")) != "plan":
        return None
    return str(run.get("id")), env.host


def record_planned(env: TaskEnv, path: str, planned: Planned) -> None:
    """Remember, for later steps of this dry run on this host, what a predicted change leaves at `path`."""
    key = _plan_key(env)
    if key is None:
        return
    with _PLANNED_LOCK:
        paths = _PLANNED.setdefault(key, {})
        _PLANNED.move_to_end(key)
        while len(_PLANNED) > _PLANNED_RUNS:
            _PLANNED.popitem(last=False)
        if planned.kind == "absent":
            for other in [p for p in paths if p.startswith(path.rstrip("/") + "/")]:
                del paths[other]
        paths[path] = planned


def _planned_at(env: TaskEnv, path: str) -> tuple[str, Planned] | None:
    """The planned state that decides `path`: its own, an absent ancestor's, or a directory planned below it."""
    key = _plan_key(env)
    if key is None:
        return None
    with _PLANNED_LOCK:
        paths = dict(_PLANNED.get(key, {}))
    if path in paths:
        return path, paths[path]
    parent = path
    while parent not in ("", "/"):
        parent = posixpath.dirname(parent)
        found = paths.get(parent)
        if found is not None and found.kind != "directory":
            return parent, found     # removed, or replaced by a file or link: nothing below it exists
        if found is not None:
            break
    return None


def _planned_dir(env: TaskEnv, path: str) -> bool:
    """True when this dry run plans `path` as a directory (itself, or as a parent of a planned directory)."""
    key = _plan_key(env)
    if key is None:
        return False
    with _PLANNED_LOCK:
        paths = dict(_PLANNED.get(key, {}))
    return any(k == path or k.startswith(path.rstrip("/") + "/") for k, v in paths.items()
               if v.kind == "directory")


def planned_below(env: TaskEnv, path: str) -> dict[str, Planned]:
    """The paths below `path` that earlier steps of this dry run are predicted to leave, by path."""
    key = _plan_key(env)
    if key is None:
        return {}
    prefix = path.rstrip("/") + "/"
    with _PLANNED_LOCK:
        return {k: v for k, v in _PLANNED.get(key, {}).items() if k.startswith(prefix) and v.kind != "absent"}


def overlay(env: TaskEnv, state: PathState) -> PathState:
    """The state read, with what earlier predicted changes of this dry run leave at the path."""
    found = _planned_at(env, state.path)
    if found is None and not state.exists and _planned_dir(env, state.path):
        # A parent that `mkdir -p` of a planned directory creates: the umask's mode, the reader's ids.
        found = state.path, Planned("directory", 0o777 & ~state.umask, state.uid, (state.groups or (-1,))[0])
    if found is None:
        if not state.exists and state.ancestor_kind == "dir" and _planned_dir(env, parent_of(state.path)):
            state.ancestor, state.planned = parent_of(state.path), True
        return state
    where, planned = found
    new = PathState(path=state.path, fingerprint=state.fingerprint + ":planned", uid=state.uid, groups=state.groups,
                    umask=state.umask, want_uid=state.want_uid, want_gid=state.want_gid, planned=True,
                    below=state.below, extra=state.extra, extra_writable=state.extra_writable,
                    dirw=state.dirw, realdirw=state.realdirw)
    if planned.kind == "absent":
        new.ancestor, new.ancestor_kind = parent_of(where), "dir"
        return new
    if where != state.path:
        new.ancestor, new.ancestor_kind = where, "notdir"
        return new
    kinds = {"file": "8000", "directory": "4000", "link": "a000"}
    info = Info(_kind(kinds[planned.kind]), planned.mode, planned.uid, planned.gid, str(planned.uid), str(planned.gid),
                len(planned.content or b""))
    new.exists, new.lstat, new.target = True, info, planned.target
    if planned.content is not None:
        new.content, new.sha256 = planned.content, hashlib.sha256(planned.content).hexdigest()
    elif state.exists and state.kind == planned.kind:
        # Only its attributes were planned to change: the content is what the host has.
        new.content, new.sha256, new.unreadable = state.content, state.sha256, state.unreadable
        info.size = state.info.size if state.info else 0
    return new


def planned_after(state: PathState, kind: str, mode: str | None, *, content: bytes | None = None,
                  target: str | None = None) -> Planned:
    """What a change leaves: the wanted attributes, else the current ones, else a new path's defaults."""
    info = state.info if state.exists and state.kind == kind else None
    default_mode = 0o777 if kind == "link" else (0o777 if kind == "directory" else 0o666) & ~state.umask
    uid = state.want_uid if state.want_uid not in (None, -1) else info.uid if info else state.uid
    gid = state.want_gid if state.want_gid not in (None, -1) else info.gid if info else (state.groups or (-1,))[0]
    return Planned(kind, int(mode, 8) if mode else info.mode if info else default_mode, uid, gid, content, target)


# --- inputs ------------------------------------------------------------------------------------------


def host_path(env: TaskEnv, value: str, key: str) -> str:
    """A rendered host path: absolute or ~-relative, no NUL, trailing slashes dropped."""
    text = str(env.render(value))
    if not text or "\x00" in text:
        raise RunbookError(f"{env.host}: `{key}` rendered to {text!r}: expected a path",
                           hint="give an absolute path or one starting with ~/")
    if not (text.startswith("/") or text == "~" or text.startswith("~/")):
        raise RunbookError(f"{env.host}: `{key}` {text!r} is not an absolute path",
                           hint="give an absolute path or one starting with ~/ (the home of the user the step runs as)")
    return text.rstrip("/") or "/"


def account(env: TaskEnv, value: str | None, key: str) -> str | None:
    """A rendered user or group name (or number), checked so it cannot be taken for an option or a user:group pair."""
    if value is None:
        return None
    text = str(env.render(value)).strip()
    if not _NAME.fullmatch(text):
        raise RunbookError(f"{env.host}: `{key}` {text!r} is not a valid {'user' if key == 'owner' else 'group'} name",
                           hint="letters, digits, _ . - (not first), at most 32 characters, or a number")
    return text


def mode_text(mode: str | None) -> str | None:
    """A validated octal mode as four digits ('0644'), or None."""
    return None if mode is None else f"{int(mode, 8):04o}"


def shown(env: TaskEnv, text: str | None) -> str:
    """A templated value rendered for the console and the audit trail (the raw text if it cannot be)."""
    if text is None:
        return ""
    try:
        return str(env.render(text))
    except RunbookError:
        return text


def who(env: TaskEnv) -> str:
    """Whom the step runs as, for messages."""
    sudo = env.sudo()
    return "the login user" if not sudo else ("root" if sudo is True else f"user {sudo}")


def sh(script: str, *args: str) -> list[str]:
    """The argv that runs a constant script with its arguments as positional parameters."""
    return ["sh", "-c", script, "sh", *args]


# --- reading -----------------------------------------------------------------------------------------


def read_state(env: TaskEnv, path: str, *, content: bool, follow: bool, owner: str | None = None,
               group: str | None = None, recurse_mode: str | None = None, recurse: bool = False,
               count: bool = False, extra: str | None = None) -> PathState:
    """The state of `path` in one command as the step's user: type, mode, owner, link target, content or sha256."""
    def args(limit: int) -> list[str]:
        return sh(STATE_SCRIPT, path, str(limit), "1" if follow else "0", owner or "", group or "",
                  "1" if recurse else "0", recurse_mode or "", "1" if count else "0", extra or "")

    res = env.run(args(INLINE_LIMIT if content else 0))
    if res.truncated and content:
        # The connection keeps less output than the content: read the state alone, then the content in pieces.
        res = env.run(args(0))
    if res.rc != 0 or res.truncated:
        raise RunbookError(f"{env.host}: cannot read the state of {path} as {who(env)}: "
                           f"{res.stderr.strip() or f'exit status {res.rc}'}",
                           hint="the host needs a POSIX sh and GNU coreutils (stat, base64, sha256sum)")
    try:
        state = parse_state(res.stdout)
    except (ValueError, IndexError, binascii.Error) as exc:
        raise RunbookError(f"{env.host}: cannot read the state of {path}: unexpected output ({exc})",
                           hint="the host needs a POSIX sh and GNU coreutils (stat, base64, sha256sum)") from None
    return overlay(env, state)


def full_content(env: TaskEnv, state: PathState, limit: int = EDIT_LIMIT) -> bytes:
    """The content of the (followed) regular file at `state.path`, reading it in pieces when it was not inline."""
    if state.content is not None:
        return state.content
    info = state.info
    if info is None or state.sha256 is None:
        raise RunbookError(f"{env.host}: cannot read {state.path} as {who(env)}", hint="use sudo, or check the path")
    if info.size > limit:
        raise RunbookError(f"{env.host}: {state.path} is {info.size} bytes, larger than the {limit} bytes runbook edits",
                           hint="manage a file this large with copy or template")
    parts = []
    for index in range((info.size + CHUNK - 1) // CHUNK):
        res = env.run(sh(CHUNK_SCRIPT, state.path, str(CHUNK), str(index)))
        if res.rc != 0 or res.truncated:
            raise RunbookError(f"{env.host}: cannot read {state.path} (piece {index}): {res.stderr.strip() or res.rc}",
                               hint="the connection's output limit must be at least 32 KiB")
        parts.append(base64.b64decode(res.stdout))
    data = b"".join(parts)
    if hashlib.sha256(data).hexdigest() != state.sha256:
        raise RunbookError(f"{env.host}: {state.path} changed while it was being read", hint="run the step again")
    state.content = data
    return data


def unwritable_reason(env: TaskEnv, state: PathState, follow: bool = False) -> str | None:
    """Why a file cannot be created, replaced or removed there: its directory is not writable by the step's user."""
    followed = follow and state.real is not None
    if state.realdirw if followed else state.dirw:
        return None
    where = parent_of(state.real) if followed and state.real else (
        state.ancestor if not state.exists and state.ancestor else parent_of(state.path))
    why = "use sudo" if state.uid != 0 else "a read-only file system?"
    return f"cannot write {state.path}: {where} is not writable by {who(env)} ({why})"


def unreadable_reason(env: TaskEnv, state: PathState) -> str | None:
    """Why the state of the path cannot be known (a parent that may not be searched), or None."""
    if not state.exists and state.ancestor_kind == "denied":
        return (f"cannot tell whether {state.path} exists: {state.ancestor} may not be searched by {who(env)}; "
                "use sudo")
    return None


def attr_problem(env: TaskEnv, state: PathState, info: Info | None, owner: str | None, group: str | None,
                 mode: str | None = None) -> str | None:
    """Why setting these attributes would fail (unknown name, not root, not a member, not the owner), or None."""
    if owner and state.want_uid == -1:
        return f"cannot give {state.path} to user {owner!r}: no such user on the host"
    if group and state.want_gid == -1:
        return f"cannot give {state.path} to group {group!r}: no such group on the host"
    if state.uid == 0:
        return None
    current = info.uid if info else state.uid
    if mode and info is not None and info.uid != state.uid and int(mode, 8) != info.mode:
        return (f"changing the mode of {state.path} needs its owner ({info.attrs()['owner']}) or root, and "
                f"{who(env)} is uid {state.uid}: use sudo")
    if owner and state.want_uid not in (None, current):
        return (f"changing the owner of {state.path} to {owner} needs root, and {who(env)} is uid {state.uid}: "
                "use sudo: true")
    if (group and state.want_gid not in (None, info.gid if info else -2)
            and (state.want_gid not in state.groups or (info is not None and info.uid != state.uid))):
        return f"{who(env)} may not give {state.path} to group {group}: use sudo: true"
    return None


# --- the difference and how it is applied ---------------------------------------------------------------


Op = Callable[[], dict[str, Any]]


@dataclass
class Change:
    """The difference between the host and the step: why, the diff, and the operations that close it."""

    state: PathState
    reasons: list[str] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    diff: str | None = None
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    fail: str | None = None
    ok_reason: str = "already as wanted"
    data: dict[str, Any] = field(default_factory=dict)
    planned: dict[str, Planned] = field(default_factory=dict)   # what the change leaves, for later steps of a plan

    def add(self, reason: str, op: Op) -> None:
        """One part of the difference and how to close it."""
        self.reasons.append(reason)
        self.ops.append(op)

    @property
    def reason(self) -> str:
        """The prediction's reason in one line."""
        return self.fail or ("; ".join(self.reasons) if self.ops else self.ok_reason)


def attr_changes(state: PathState, info: Info | None, mode: str | None, owner: str | None,
                 group: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """(before, after) of the attributes that differ on an existing path (by number: names may be numbers)."""
    before: dict[str, str] = {}
    after: dict[str, str] = {}
    if info is None:
        return before, after
    now = info.attrs()
    if owner and state.want_uid not in (None, info.uid):
        before["owner"], after["owner"] = now["owner"], owner
    if group and state.want_gid not in (None, info.gid):
        before["group"], after["group"] = now["group"], group
    if mode and int(mode, 8) != info.mode:
        before["mode"], after["mode"] = now["mode"], mode
    return before, after


def attr_diff(path: str, before: dict[str, Any], after: dict[str, Any]) -> str:
    """A unified-style diff of attribute lines (`mode: 0644`), only the keys that change."""
    keys = [k for k in after if before.get(k) != after.get(k)]
    if not keys:
        return ""
    lines = [f"--- {path} (on host)\n", f"+++ {path} (after)\n"]
    lines += [f"-{k}: {before[k]}\n" for k in keys if before.get(k) is not None]
    lines += [f"+{k}: {after[k]}\n" for k in keys if after.get(k) is not None]
    return "".join(lines)


def run_op(env: TaskEnv, argv: list[str], what: str, path: str, stdin: str | None = None) -> str:
    """Run one change command with the step's sudo; raise ApplyError naming host, path and failure."""
    res = env.conn.run(argv, env=None, timeout=env.step.timeout, sudo=env.sudo(), stdin=stdin)
    if res.rc != 0:
        err = res.stderr.strip() or res.stdout.strip() or f"exit status {res.rc}"
        raise ApplyError(f"{env.host}: cannot {what} {path}: {err}", stderr=res.stderr, rc=res.rc)
    return res.stdout


def write_file(env: TaskEnv, path: str, data: bytes, expect: str, *, mode: str | None, owner: str | None,
               group: str | None, backup: bool, validate: str | None, parents: bool = False) -> dict[str, Any]:
    """Atomically replace `path` with `data` (see WRITE_SCRIPT); returns {'backup': PATH} when one was kept."""
    check = validate_command(validate) if validate else ""
    argv = sh(WRITE_SCRIPT, path, expect, mode or "", owner or "", group or "", "1" if backup else "0",
              check, "1" if parents else "0")
    res = env.conn.run(argv, timeout=env.step.timeout, sudo=env.sudo(), stdin=base64.b64encode(data).decode("ascii"))
    if res.rc == 92 and "validate-failed" in res.stdout:
        raise ApplyError(f"{env.host}: {path}: `{validate}` rejected the candidate: "
                         f"{res.stderr.strip() or 'no output'} ({path} is untouched)",
                         stderr=res.stderr, rc=res.rc, hint="fix the content, or the validate command")
    if res.rc != 0:
        raise ApplyError(f"{env.host}: cannot write {path} as {who(env)}: {res.stderr.strip() or f'exit status {res.rc}'}",
                         stderr=res.stderr, rc=res.rc)
    out: dict[str, Any] = {}
    for line in res.stdout.splitlines():
        if line.startswith("backup "):
            out["backup"] = _b64(line[7:])
    return out


def validate_command(text: str) -> str:
    """A validate command with its `%s` replaced by the candidate's path as a positional parameter ("$1")."""
    if "%s" not in text:
        raise RunbookError(f"validate command {text!r} has no %s", hint="write %s where the candidate file's path goes")
    return text.replace("%s", '"$1"')


def set_attrs(env: TaskEnv, path: str, mode: str | None, owner: str | None, group: str | None,
              link: bool = False) -> Op:
    """An operation that sets owner, group and mode (of the link itself when `link`)."""
    def op() -> dict[str, Any]:
        run_op(env, sh(ATTRS_SCRIPT, path, mode or "", owner or "", group or "", "1" if link else "0"),
               "set the attributes of", path)
        return {}
    return op


def expected(state: PathState, follow: bool) -> str:
    """What WRITE_SCRIPT must find where it writes before it replaces it: a sha256, `absent` or `link`."""
    if not state.exists:
        return "absent"
    if state.lstat and state.lstat.kind == "link" and not (follow and state.follow):
        return "link"
    return state.sha256 or "unknown"


def content_target(env: TaskEnv, state: PathState, follow: bool) -> str:
    """The file a content action writes: the path, or the end of its symlink chain when following."""
    if follow and state.real:
        return state.real
    return state.path


# --- the base class ------------------------------------------------------------------------------------


class ResourceAction(Action):
    """An action that makes a path (or a setting) true: `compute` the difference, report it or close it."""

    def probes_read_only(self) -> bool:
        # Its only commands in a plan are this module's state reads (stat, readlink, sha256sum, base64).
        return True

    def compute(self, env: TaskEnv) -> Change:
        """Read the host once and work out what differs."""
        raise NotImplementedError

    def plan(self, env: TaskEnv) -> Prediction:
        change = self.compute(env)
        kind = PredictionKind.FAIL if change.fail else PredictionKind.CHANGE if change.ops else PredictionKind.OK
        if kind == PredictionKind.CHANGE:
            for path, planned in change.planned.items():
                record_planned(env, path, planned)
        return Prediction(kind, change.reason, diff=change.diff or None, state=change.state.fingerprint,
                          command=self.describe(env), data=self._data(change))

    def apply(self, env: TaskEnv) -> Outcome:
        change = self.compute(env)
        if change.fail:
            return Outcome(failed=True, message=f"{env.host}: {change.fail}", command=self.describe(env),
                           data=self._data(change))
        if not change.ops:
            return Outcome(changed=False, message=change.reason, command=self.describe(env), data=self._data(change))
        extra: dict[str, Any] = {}
        for op in change.ops:
            try:
                extra.update(op())
            except ApplyError as exc:
                return Outcome(failed=True, rc=exc.rc, stderr=exc.stderr, message=exc.message,
                               command=self.describe(env), diff=change.diff or None, data=self._data(change))
        return Outcome(changed=True, message=change.reason, diff=change.diff or None, command=self.describe(env),
                       data={**self._data(change), **extra})

    @staticmethod
    def _data(change: Change) -> dict[str, Any]:
        data: dict[str, Any] = {"path": change.state.path, **change.data}
        if change.ops:
            data["before"], data["after"] = change.before, change.after
        return data


def parent_of(path: str) -> str:
    """The directory a path is in."""
    return posixpath.dirname(path) or "/"


# --- actions that write a whole file: copy, line, block, sysctl's persist file ----------------------------


class ContentOptions(Strict):
    """The keys every action that writes a whole file shares: attributes, backup and validation."""

    mode: OctalMode = None
    owner: str | None = Field(None, description="User name or uid.")
    group: str | None = Field(None, description="Group name or gid.")
    backup: bool = Field(False, description="Keep a timestamped copy (PATH.YYYYmmddTHHMMSSZ.bak) before replacing.")
    # `validate` would shadow a pydantic method: the attribute is validate_, the key `validate`.
    validate_: str | None = Field(None, alias="validate", description=(
        "Command run on the candidate file before it replaces the original; %s is the candidate's path "
        "(e.g. `sshd -t -f %s`). Its failure fails the step and leaves the original untouched."))

    @model_validator(mode="after")
    def _validate_has_placeholder(self) -> ContentOptions:
        if self.validate_ is not None and "%s" not in self.validate_:
            raise ValueError("`validate` needs %s where the candidate file's path goes, e.g. `sshd -t -f %s`")
        return self


def blocked_file(env: TaskEnv, state: PathState, follow: bool) -> str | None:
    """Why a whole file cannot be written at `state.path`: a directory there, a missing parent, no read access."""
    if state.kind == "directory":
        return f"{state.path} is a directory, not a file"
    if state.dangling and follow:
        return f"{state.path} is a symlink to {state.target!r}, which does not exist"
    if state.exists and state.kind == "other":
        return f"{state.path} is not a regular file"
    if state.kind == "file" and (state.unreadable or state.sha256 is None):
        return f"cannot read {state.path} as {who(env)}: permission denied; use sudo"
    return None


@dataclass
class Wanted:
    """A whole file as a step wants it."""

    data: bytes
    mode: str | None = None
    owner: str | None = None
    group: str | None = None
    backup: bool = False
    validate: str | None = None
    follow: bool = True
    parents: bool = False        # create missing parent directories (line/block `create`)


def plan_write(env: TaskEnv, change: Change, want: Wanted, diff_limit: int) -> None:
    """Close the difference between the file read into `change.state` and `want`: attributes, or content and attributes."""
    state = change.state
    target = content_target(env, state, want.follow)
    info = state.info if state.kind == "file" else None
    new_sha = hashlib.sha256(want.data).hexdigest()
    problem = attr_problem(env, state, info, want.owner, want.group, want.mode)
    before, after = attr_changes(state, info, want.mode, want.owner, want.group)
    if info is not None and state.sha256 == new_sha:
        if after:
            change.fail = problem
            change.before.update(before)
            change.after.update(after)
            change.add(f"{target}: " + ", ".join(f"{k} {before[k]} -> {after[k]}" for k in after),
                       set_attrs(env, target, after.get("mode"), after.get("owner"), after.get("group")))
            change.diff = attr_diff(target, before, after)
            change.planned[target] = change.planned[state.path] = planned_after(state, "file", want.mode)
        return
    if not state.exists and not want.parents and (state.ancestor != parent_of(state.path) or state.ancestor_kind != "dir"):
        change.fail = f"cannot create {state.path}: directory {parent_of(state.path)} does not exist"
        return
    problem = problem or unwritable_reason(env, state, want.follow)
    if problem:
        change.fail = problem
        return
    if info is None:
        after = {k: v for k, v in (("mode", want.mode), ("owner", want.owner), ("group", want.group)) if v}
        attrs = " (" + ", ".join(f"{k} {v}" for k, v in after.items()) + ")" if after else ""
        what = (f"replace symlink {state.path} -> {state.target} with a file" if state.kind == "link"
                else f"create {target}") + attrs
    else:
        what = f"{target}: content differs" + "".join(f", {k} {before[k]} -> {v}" for k, v in after.items())
    change.before.update({"state": state.kind, **before} if info is None else before)
    change.after.update({"state": "file", **after} if info is None else after)
    change.before["sha256"], change.after["sha256"] = state.sha256 if info else None, new_sha
    expect = expected(state, want.follow)
    change.add(what, lambda: write_file(env, target, want.data, expect, mode=want.mode, owner=want.owner,
                                        group=want.group, backup=want.backup, validate=want.validate,
                                        parents=want.parents))
    old = full_content(env, state, diff_limit) if info is not None and info.size <= diff_limit else None
    diff = (content_diff(old, want.data, target) if info is None or old is not None
            else f"large file {target}: {info.size} bytes -> {len(want.data)} bytes\n")
    change.diff = diff + attr_diff(target, before if info else {}, after if info else {})
    change.planned[target] = change.planned[state.path] = planned_after(state, "file", want.mode, content=want.data)
