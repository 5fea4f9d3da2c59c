"""Compose: expand `block:`, `include:` and `role:` steps into flat lists of action steps.

The loader validates the playbook as written; compose then turns its `steps`, `on_failure` and
`handlers` into flat lists of action steps. Each flat step keeps where it came from (file and
document path, for located errors), the groups (blocks, includes, roles) around it, its namespace
and the directories its `template:`/`upload:` sources are searched in. Nothing after compose sees a
structural step: the graph and the scheduler read the groups through `Playbook._groups`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pydantic

from runbook.errors import Location, PlaybookError, Problems
from runbook.model import Playbook, Step

if TYPE_CHECKING:
    from runbook.loader import SourceMap

MAX_INCLUDE_DEPTH = 16        # includes and roles inside each other
MAX_STEPS = 5000              # flat steps of a playbook once everything is expanded
ROLES_ENV = "RUNBOOK_ROLES_PATH"
PARTS = ("block", "rescue", "always")
GroupKind = Literal["block", "include", "role"]
# What a block, include or role step may carry: its identity and order, and what its steps inherit.
GROUP_KEYS = frozenset({"name", "id", "needs", "when", "sudo", "vars", "tags", "block", "rescue", "always", "include", "role"})
Reader = Callable[[Path, str], str]


class KeptFiles:
    """A reader serving the file texts a plan kept (a file not kept, because it held a secret, is read from disk)."""

    def __init__(self, texts: dict[str, str | None]):
        self.texts = dict(texts)

    def __call__(self, path: Path, what: str) -> str:
        text = self.texts.get(str(path))
        return text if text is not None else _read_file(path, what)

    def has(self, path: Path) -> bool:
        """True when the plan kept this file (it need not exist here: the plan may be applied elsewhere)."""
        return str(path.resolve()) in self.texts


@dataclass(frozen=True)
class Origin:
    """Where a step (or group) is written: its file's source map, its path in that document, and how it got here."""

    source: SourceMap
    path: tuple
    chain: tuple[str, ...] = ()     # "file:line" of each include:/role: that brought it in, outermost first

    def locate(self, *keys: str | int) -> Location:
        """The location of the step, or of a key (and item) inside it."""
        return self.source.locate(self.path + tuple(keys))


@dataclass
class Group:
    """A block, include or role: the ids of what each of its parts holds (steps and nested groups)."""

    id: str
    name: str
    kind: GroupKind
    section: str
    parent: tuple[str, str] | None           # (group id, part) around it, None at the top of a section
    parts: dict[str, list[str]]              # "block" (an include's or role's steps), "rescue", "always"
    needs: list[str] | None
    namespace: str                           # the namespace its own id and `needs` are in
    origin: Origin
    inner_namespace: str = ""                # the namespace of its contents (an include's or role's id)
    when: str | None = None                  # its own condition (every step inside has it and-ed into its `when`)
    number: int = 0                          # its position among the playbook's groups (a stable short name)

    @property
    def guarded(self) -> bool:
        """True for a block with `rescue:` or `always:`: its outcome is more than its steps' statuses."""
        return bool(self.parts.get("rescue") or self.parts.get("always"))


@dataclass(frozen=True)
class _Scope:
    """What the steps of one list inherit, and where that list is written."""

    source: SourceMap
    path: tuple
    section: str
    namespace: str = ""
    when: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    sudo: Any = None                          # None: not set by an enclosing group
    vars: dict[str, Any] = field(default_factory=dict)
    search_dirs: tuple[str, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)
    blocks: tuple[tuple[str, str, str], ...] = ()    # (group id, part, kind), outermost first
    chain: tuple[str, ...] = ()
    files: tuple[str, ...] = ()               # resolved include/role files on the way (cycle check)
    role_dir: str | None = None               # inside a role, includes must stay in its directory
    parent: tuple[str, str] | None = None


# --- accessors ----------------------------------------------------------------------------------

def origin(step: Step) -> Origin | None:
    """Where a flat step is written (None for a step that was not composed)."""
    return step._origin


def enclosing_groups(step: Step) -> tuple[tuple[str, str, str], ...]:
    """(group id, part, kind) of every block, include and role around a step, outermost first."""
    return tuple(step._blocks)


def enclosing_blocks(step: Step) -> tuple[str, ...]:
    """Ids of the `block:` groups around a step, outermost first."""
    return tuple(g for g, _, kind in step._blocks if kind == "block")


def namespace(step: Step) -> str:
    """The include/role namespace of a step (`nginx/`, `setup/db/`), or "" for the playbook's own steps."""
    return str(step._namespace)


def search_dirs(step: Step) -> tuple[str, ...]:
    """Directories searched first for a step's `template:`/`upload:` sources (a role's templates/ and files/)."""
    return tuple(step._search_dirs)


def role_defaults(step: Step) -> dict[str, Any]:
    """The defaults.yml variables of the role a step comes from (lowest precedence)."""
    return dict(step._defaults)


def own_when(step: Step) -> tuple[bool, str | None]:
    """(True, the step's own `when` as written) when its `when` has conditions of enclosing groups and-ed in."""
    own = step._own_when
    return (False, step.when) if own == "<own>" else (True, own)


def rescue_of(step: Step) -> tuple[str, ...]:
    """Ids of the blocks whose `rescue:` holds this step: it runs only where such a block failed."""
    return tuple(g for g, part, _ in step._blocks if part == "rescue")


def resolve_source(playbook: Playbook, step: Step, path: str) -> Path:
    """A control-machine source file of a step: found in its search dirs first, else beside the playbook."""
    from runbook.template import resolve_local

    shipped = playbook._shipped.get((step.step_id, path))
    if shipped is not None:   # on a cluster worker: the controller's file, sent with the run
        return Path(shipped)
    p = Path(os.path.expanduser(path))
    if not p.is_absolute():
        for d in search_dirs(step):
            candidate = Path(d) / p
            if candidate.exists():
                return candidate
    return resolve_local(playbook, path)


_PLAYBOOK_DIR = re.compile(r"^\{\{-?\s*playbook_dir\s*-?\}\}")   # the one leading value the author fixes


def confined_source(playbook: Playbook, step: Step, template: str, path: str) -> Path:
    """`path`, rendered from the source path `template`, resolved as resolve_source does if it stays below
    the directory the template writes out before its first placeholder.

    Its values may come from inventory, `-e` or an alert's labels: `files/{{ app }}.conf` with
    `app=../../../etc/shadow` must not send the control machine's files to a host. A template that
    starts with a placeholder (`{{ backup_dir }}/x.tar`) hands the whole location to its value, as
    its author chose; a leading `{{ playbook_dir }}` counts as written (it is the playbook's directory).
    Lexical (`..`, absolute values): a symbolic link the author put there still works.
    """
    from runbook.errors import RunbookError

    found = resolve_source(playbook, step, path)
    if playbook._shipped.get((step.step_id, path)) is not None:
        return found   # the controller resolved and checked it before sending it
    base = Path(playbook._source.file).resolve().parent if playbook._source is not None else Path.cwd()
    template = _PLAYBOOK_DIR.sub(lambda _: str(base), template, count=1)
    written = template[:template.index("{")] if "{" in template else template
    written = written[:written.rfind("/") + 1]
    if not written and template.startswith("{"):
        return found
    prefix = Path(os.path.expanduser(written))
    bases = [prefix] if prefix.is_absolute() else [Path(d).absolute() for d in search_dirs(step)] + [base]
    roots = [Path(os.path.normpath(b / prefix)) for b in bases]
    where = Path(os.path.normpath(found if found.is_absolute() else Path.cwd() / found))
    if not any(where.is_relative_to(root) for root in roots):
        raise RunbookError(f"source path {path!r} (from {template!r}) is outside {roots[-1]}",
                           hint="a value in a source path can pick a file below the directory written before it, "
                                "not leave it (`..`, an absolute path)")
    return found


def step_sources(playbook: Playbook) -> Iterator[tuple[Step, str, Path]]:
    """Each untemplated control-machine file a step sends: the step, its path as written, where it resolves."""
    from runbook.actions import action_for   # not at the top: the actions import the model, as compose does

    for step in playbook.all_steps():
        for src in action_for(step).local_sources():
            yield step, src, resolve_source(playbook, step, src)


def groups(playbook: Playbook) -> dict[str, Group]:
    """The playbook's blocks, includes and roles by id."""
    return dict(playbook._groups)


def units(playbook: Playbook, section: str) -> list[str]:
    """The top-level unit ids (steps and groups) of a section, in file order."""
    return list(playbook._units.get(section, []))


def group_steps(playbook: Playbook, group_id: str, parts: tuple[str, ...] = PARTS) -> list[str]:
    """Every flat step id inside a group's parts (nested groups expanded), in order."""
    out: list[str] = []
    grp = playbook._groups[group_id]
    for part in parts:
        for unit in grp.parts.get(part, []):
            if unit in playbook._groups:
                out.extend(group_steps(playbook, unit))
            else:
                out.append(unit)
    return out


def has_structure(playbook: Playbook) -> bool:
    """True when any step came from a block, include or role."""
    return bool(playbook._groups)


def locate(playbook: Playbook, step: Step, *keys: str | int) -> Location:
    """Location of a flat step (or a key inside it) in the file it is written in."""
    found = origin(step)
    if found is not None:
        return found.locate(*keys)
    source = playbook._source
    for section in ("steps", "on_failure", "handlers"):
        for i, s in enumerate(getattr(playbook, section, None) or []):
            if s is step:
                return source.locate((section, i, *keys)) if source else Location("<playbook>")
    return Location(source.file if source else "<playbook>")


# --- composing --------------------------------------------------------------------------------

def compose(playbook: Playbook, source: SourceMap | None, reader: Reader | None = None) -> Playbook:
    """Expand blocks, includes, roles and vars_files in place; raise PlaybookError with every problem found."""
    composer = _Composer(playbook, source, reader)
    composer.run()
    return playbook


class _Composer:
    """One composition: the flat lists, the groups, the files read and the problems found."""

    def __init__(self, playbook: Playbook, source: SourceMap | None, reader: Reader | None):
        from runbook.loader import SourceMap

        self.playbook = playbook
        self.source = source or SourceMap("<playbook>")
        self.base = Path(self.source.file).resolve().parent if source is not None else Path.cwd()
        self.problems = Problems()
        self.src = _Files(reader or _read_file, self.problems)
        self.groups: dict[str, Group] = {}
        self.count = 0
        self.ids: dict[str, Location] = {}
        self.role_handlers: list[Step] = []

    def run(self) -> None:
        pb = self.playbook
        self.src.vars_files(pb, self.source, self.base)
        layout: dict[str, list[str]] = {}
        flat: dict[str, list[Step]] = {}
        sections = ["steps", "on_failure"] + (["handlers"] if "handlers" in type(pb).model_fields else [])
        for section in sections:
            out: list[Step] = []
            scope = _Scope(self.source, (section,), section)
            layout[section] = self._list(list(getattr(pb, section) or []), scope, out)
            flat[section] = out
        if self.role_handlers and "handlers" in flat:
            flat["handlers"].extend(self.role_handlers)
        self.problems.raise_if_errors(PlaybookError)
        for section, steps in flat.items():
            setattr(pb, section, steps)
        pb._groups = self.groups
        pb._units = layout
        pb._files = self.src.files

    # --- lists and steps ------------------------------------------------------------------------

    def _list(self, steps: list[Step], scope: _Scope, out: list[Step]) -> list[str]:
        """Flatten one list of steps into `out`; return the ids of its units."""
        ids: list[str] = []
        for i, step in enumerate(steps):
            at = replace(scope, path=scope.path + (i,))
            unit = self._unit(step, at, out)
            if unit is not None:
                ids.append(unit)
        return ids

    def _unit(self, step: Step, scope: _Scope, out: list[Step]) -> str | None:
        structure = step.structure()
        if not structure:
            return self._flat(step, scope, out)
        if self.count > MAX_STEPS:
            return None
        self._unused_keys(step, scope, structure[0])
        if structure[0] == "block":
            return self._block(step, scope, out)
        return self._include(step, scope, out, "role" if structure[0] == "role" else "include")

    def _unused_keys(self, step: Step, scope: _Scope, kind: str) -> None:
        """Keys a block, include or role would silently ignore (`ignore_errors`, `retries`, ...) are errors."""
        fields = type(step).model_fields
        for name in sorted(step.model_fields_set - GROUP_KEYS):
            key = fields[name].alias or name if name in fields else name
            self.problems.add(f"`{key}` does nothing on a `{kind}:` step", scope.source.locate(scope.path + (key,), key=True),
                              f"put it on the steps inside; a `{kind}:` step passes on only "
                              "`when`, `sudo`, `vars` and `tags`", code="group-key")

    def _flat(self, step: Step, scope: _Scope, out: list[Step]) -> str | None:
        self.count += 1
        if self.count == MAX_STEPS + 1:
            self.problems.add(f"the playbook expands to more than {MAX_STEPS} steps", scope.source.locate(scope.path),
                              "includes and roles may not multiply without bound; split the playbook", code="too-many-steps")
        if self.count > MAX_STEPS:
            return None
        update: dict[str, Any] = {}
        if scope.namespace:
            update["id"] = scope.namespace + step.step_id
        if scope.when:
            update["when"] = _all_of([*scope.when, *([step.when] if step.when is not None else [])])
        if scope.tags:
            update["tags"] = list(dict.fromkeys([*step.tags, *scope.tags]))
        if scope.sudo is not None and "sudo" not in step.model_fields_set:
            update["sudo"] = scope.sudo
        if scope.vars:
            update["vars"] = {**scope.vars, **step.vars}
        flat = step.model_copy(update=update) if update else step
        flat._own_when = step.when if scope.when else "<own>"
        flat._origin = Origin(scope.source, scope.path, scope.chain)
        flat._blocks = scope.blocks
        flat._namespace = scope.namespace
        flat._search_dirs = scope.search_dirs
        flat._defaults = dict(scope.defaults)
        out.append(flat)
        return flat.step_id

    def _group_id(self, step: Step, scope: _Scope, kind: str) -> str:
        gid = scope.namespace + step.step_id
        where = scope.source.locate(scope.path + (("id",) if scope.path + ("id",) in scope.source.keys else ()))
        if gid in self.ids:
            first = self.ids[gid]
            self.problems.add(f"duplicate id `{gid}` (first used at {first})", where,
                              f"give the {kind} an explicit, unique `id:`", code="duplicate-id")
        self.ids.setdefault(gid, where)
        return gid

    def _inherit(self, step: Step, scope: _Scope) -> _Scope:
        """The scope of a group's contents: its when, tags, sudo and vars on top of the enclosing ones."""
        return replace(scope, when=scope.when + ((step.when,) if step.when is not None else ()),
                       tags=tuple(dict.fromkeys([*scope.tags, *step.tags])),
                       sudo=step.sudo if "sudo" in step.model_fields_set else scope.sudo,
                       vars={**scope.vars, **step.vars})

    def _block(self, step: Step, scope: _Scope, out: list[Step]) -> str:
        gid = self._group_id(step, scope, "block")
        if scope.section != "steps" and step.structural_parts():
            part = step.structural_parts()[0]
            self.problems.add(f"`{part}` is for blocks in `steps`, not in `{scope.section}`",
                              scope.source.locate(scope.path + (part,), key=True),
                              f"{scope.section} steps run one after another whatever happens: "
                              "use `ignore_errors: true` on a step instead", code="misplaced-rescue")
        grp = Group(gid, step.name, "block", scope.section, scope.parent, {}, step.needs, scope.namespace,
                    Origin(scope.source, scope.path, scope.chain), scope.namespace, step.when)
        grp.number = len(self.groups)
        self.groups[gid] = grp
        inner = self._inherit(step, scope)
        for part in PARTS:
            steps = getattr(step, part)
            if steps is None:
                continue
            if not steps:
                self.problems.add(f"`{part}` is empty", scope.source.locate(scope.path + (part,)),
                                  f"list steps under `{part}:`, or remove it", code="empty-block")
            part_scope = replace(inner, path=scope.path + (part,), blocks=scope.blocks + ((gid, part, "block"),),
                                 parent=(gid, part))
            grp.parts[part] = self._list(steps, part_scope, out)
        return gid

    # --- include and role -------------------------------------------------------------------------

    def _include(self, step: Step, scope: _Scope, out: list[Step], kind: GroupKind) -> str | None:
        key_loc = scope.source.locate(scope.path + (kind,))
        here = f"{key_loc.file}:{key_loc.line}"
        if len(scope.files) >= MAX_INCLUDE_DEPTH:
            self.problems.add(f"includes and roles are nested more than {MAX_INCLUDE_DEPTH} deep", key_loc,
                              "flatten the includes", code="include-depth")
            return None
        found = self._role(step, scope, key_loc) if kind == "role" else self._include_file(step, scope, key_loc)
        if found is None:
            return None
        path, search, role_dir, defaults = found
        resolved = str(path.resolve())
        if resolved in scope.files:
            names = [_short(f, self.base) for f in (*scope.files[scope.files.index(resolved):], resolved)]
            self.problems.add(f"include cycle: {' -> '.join(names)}", key_loc,
                              "an included file (or role) may not include itself, directly or not", code="include-cycle")
            return None
        steps = self.src.steps(path, key_loc, scope.chain + (here,), f"{kind} file")
        if steps is None:
            return None
        gid = self._group_id(step, scope, kind)
        grp = Group(gid, step.name, kind, scope.section, scope.parent, {}, step.needs, scope.namespace,
                    Origin(scope.source, scope.path, scope.chain), gid + "/", step.when)
        grp.number = len(self.groups)
        self.groups[gid] = grp
        doc_steps, doc_source = steps
        inner = replace(self._inherit(step, scope), source=doc_source, path=(), namespace=gid + "/",
                        search_dirs=search + scope.search_dirs, defaults={**scope.defaults, **defaults},
                        blocks=scope.blocks + ((gid, "block", kind),), chain=scope.chain + (here,),
                        files=scope.files + (resolved,), role_dir=role_dir, parent=(gid, "block"))
        grp.parts["block"] = self._list(doc_steps, inner, out)
        if kind == "role":
            self._role_handlers(Path(role_dir or path.parent), inner)
        return gid

    def _include_file(self, step: Step, scope: _Scope, loc: Location) -> tuple[Path, tuple[str, ...], str | None, dict] | None:
        text = str(step.include)
        if "{{" in text or "{%" in text:
            self.problems.add("`include` is a plain path: it is read when the playbook loads, before any variable "
                              "is known", loc, "write the file's path without {{ }}", code="templated-include")
            return None
        base = Path(scope.source.file).resolve().parent if scope.source.file != "<playbook>" else self.base
        path = (base / os.path.expanduser(text)) if not Path(os.path.expanduser(text)).is_absolute() else Path(text)
        if scope.role_dir is not None and not _inside(path, Path(scope.role_dir)):
            self.problems.add(f"`include: {text}` leaves the role's directory", loc,
                              "a role includes only files inside roles/NAME/", code="include-escape")
            return None
        return path, (str(path.resolve().parent),), scope.role_dir, {}

    def _role(self, step: Step, scope: _Scope, loc: Location) -> tuple[Path, tuple[str, ...], str | None, dict] | None:
        name = str(step.role)
        if name in (".", "..") or "/" in name or "\\" in name:
            self.problems.add(f"invalid role name `{name}`", loc, "a role name is letters, digits, `_`, `.` and `-`",
                              code="role-name")
            return None
        dirs = [self.base / "roles", *(Path(p) for p in os.environ.get(ROLES_ENV, "").split(":") if p)]
        role_dir = next((d / name for d in dirs if self.src.exists(d / name / "steps.yml")), None)
        if role_dir is None:
            looked = ", ".join(str(d / name / "steps.yml") for d in dirs)
            self.problems.add(f"role `{name}` not found (looked for {looked})", loc,
                              f"create roles/{name}/steps.yml beside the playbook, or add its parent directory to "
                              f"${ROLES_ENV}", code="missing-role")
            return None
        defaults = self.src.mapping(role_dir / "defaults.yml", loc)
        search = tuple(str(role_dir / d) for d in ("templates", "files")) + (str(role_dir),)
        return role_dir / "steps.yml", search, str(role_dir.resolve()), defaults

    def _role_handlers(self, role_dir: Path, scope: _Scope) -> None:
        path = role_dir / "handlers.yml"
        if not self.src.exists(path) or "handlers" not in type(self.playbook).model_fields:
            return
        loaded = self.src.steps(path, scope.source.locate(()), scope.chain, "role handlers file")
        if loaded is None:
            return
        steps, source = loaded
        hscope = replace(scope, source=source, path=(), section="handlers", blocks=(), parent=None)
        self._list(steps, hscope, self.role_handlers)

class _Files:
    """The files a composition reads: each read once, its text recorded (for plans), problems located."""

    def __init__(self, reader: Reader, problems: Problems):
        self.reader = reader
        self.problems = problems
        self.files: dict[str, str] = {}
        self.parsed: dict[str, tuple[list[Step], SourceMap] | None] = {}

    def exists(self, path: Path) -> bool:
        """Whether a file is there (or kept by the plan being applied)."""
        return path.is_file() or (isinstance(self.reader, KeptFiles) and self.reader.has(path))

    def mapping(self, path: Path, loc: Location) -> dict[str, Any]:
        """A role's defaults.yml: a mapping of variables, or {} when it is not there."""
        if not self.exists(path):
            return {}
        doc = self.document(path, loc, "role defaults")
        if doc is None or doc.data is None:
            return {}
        if not isinstance(doc.data, dict):
            self.problems.add(f"role defaults {path} must be a mapping of variables", doc.source.locate(()),
                              "write `name: value` lines", code="bad-defaults")
            return {}
        return dict(doc.data)

    def document(self, path: Path, loc: Location, what: str) -> Any:
        """A YAML file parsed with positions, its text recorded; None (a problem added) when it cannot be read."""
        from runbook.loader import parse_yaml

        resolved = path.resolve()
        try:
            text = self.reader(resolved, what)
        except PlaybookError as exc:
            for p in exc.problems:
                hint = (f"paths are relative to the file that names them ({Path(loc.file).resolve().parent})"
                        if "not found" in p.message else p.hint)
                self.problems.add(f"{p.message}: {path}", loc, hint, code="missing-file")
            return None
        self.files[str(resolved)] = text
        try:
            return parse_yaml(text, str(path))
        except PlaybookError as exc:
            self.problems.items.extend(exc.problems)
            return None

    def steps(self, path: Path, loc: Location, chain: tuple[str, ...], what: str) -> tuple[list[Step], SourceMap] | None:
        """The validated steps of an included file (a YAML list of steps); each file is read and checked once."""
        key = str(path.resolve())
        if key not in self.parsed:
            self.parsed[key] = self._read_steps(path, loc, chain, what)
        return self.parsed[key]

    def _read_steps(self, path: Path, loc: Location, chain: tuple[str, ...], what: str) -> tuple[list[Step], SourceMap] | None:
        from runbook.loader import pydantic_problems, raw_action_problems

        doc = self.document(path, loc, what)
        if doc is None:
            return None
        data = doc.data
        if not isinstance(data, list):
            self.problems.add(f"{what} {path} must be a list of steps", doc.source.locate(()),
                              "write each step as a `- name: ...` item", code="bad-include")
            return None
        steps: list[Step] = []
        via = f"included from {' via '.join(reversed(chain))}" if chain else None
        for i, raw in enumerate(data):
            try:
                steps.append(Step.model_validate(raw))
            except pydantic.ValidationError as exc:
                found = raw_action_problems(raw, (i,), doc.source) + pydantic_problems(exc, data, doc.source, root=(i,))
                for p in {(p.message, p.location): p for p in found}.values():
                    self.problems.items.append(replace(p, hint=f"{p.hint}; {via}" if p.hint and via else p.hint or via))
        return (steps, doc.source) if len(steps) == len(data) else None

    def vars_files(self, pb: Playbook, source: SourceMap, base: Path) -> None:
        """Merge the playbook's vars_files over its vars (later files win)."""
        merged: dict[str, Any] = {}
        for i, name in enumerate(pb.vars_files):
            loc = source.locate(("vars_files", i))
            text = self._render_path(name, loc, pb)
            if text is None:
                continue
            path = Path(os.path.expanduser(text))
            path = path if path.is_absolute() else base / path
            doc = self.document(path, loc, "vars file")
            if doc is None:
                continue
            if doc.data is None:
                continue
            if not isinstance(doc.data, dict) or not all(isinstance(k, str) for k in doc.data):
                self.problems.add(f"vars file {path} must be a mapping of variables", doc.source.locate(()),
                                  "write `name: value` lines", code="bad-vars-file")
                continue
            merged.update(doc.data)
        if merged:
            pb.vars = {**pb.vars, **merged}

    def _render_path(self, text: str, loc: Location, pb: Playbook) -> str | None:
        if "{" not in text:
            return text
        from runbook.errors import TemplateError
        from runbook.template import render

        try:
            return render(text, dict(pb.vars))
        except TemplateError as exc:
            self.problems.add(f"vars file path `{text}`: {exc.message}", loc,
                              "a vars_files path may use the playbook's `vars:` only (not the inventory or -e)",
                              code="vars-file-path")
            return None


def _all_of(conditions: list[str]) -> str:
    """One `when` that holds when every condition holds (an enclosing group's first)."""
    from runbook.template import strip_braces

    if len(conditions) == 1:
        return conditions[0]
    return " and ".join(f"({strip_braces(c)})" for c in conditions)


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _short(path: str, base: Path) -> str:
    try:
        return str(Path(path).relative_to(base))
    except ValueError:
        return path


def _read_file(path: Path, what: str) -> str:
    from runbook.loader import read_text

    return read_text(path, what)


# --- dependencies -------------------------------------------------------------------------------

@dataclass
class SectionEdges:
    """The step edges of a composed section: (a, b) -> settled, and the guarded groups each step waits on."""

    edges: dict[tuple[str, str], bool] = field(default_factory=dict)
    gates: dict[str, list[str]] = field(default_factory=dict)


_Dep = tuple[list[tuple[str, bool]], list[str]]   # (flat step, settled) edges to add, and groups to gate on


class _EdgeBuilder:
    """Turns a section's units (steps, blocks, includes, roles) and their `needs` into flat step edges.

    A step after a group waits for the group's last steps; after a block with `rescue:`/`always:`
    it waits until every step of the block settled and then for the block's outcome (a gate). A
    rescue step waits for every step of its block, whatever their status (a settled edge); an
    always step for every step of the block and its rescue.
    """

    def __init__(self, playbook: Playbook, section: str, steps: dict[str, Step], problems: Problems):
        self.pb = playbook
        self.section = section
        self.steps = steps
        self.groups = {k: g for k, g in playbook._groups.items() if g.section == section}
        self.problems = problems
        self.out = SectionEdges()

    def build(self) -> SectionEdges:
        self._list(units(self.pb, self.section), "", ([], []), ())
        return self.out

    def _needs(self, unit: str) -> list[str] | None:
        return self.groups[unit].needs if unit in self.groups else self.steps[unit].needs

    def _locate(self, unit: str, *keys: str | int) -> Location:
        if unit in self.groups:
            return self.groups[unit].origin.locate(*keys)
        return locate(self.pb, self.steps[unit], *keys)

    def resolve(self, need: str, ns: str) -> str | None:
        """The unit a `needs` entry names: an id of the same file (namespace), or a full id like `role/step`."""
        for candidate in (ns + need, need if "/" in need else None):
            if candidate is not None and (candidate in self.steps or candidate in self.groups):
                return candidate
        return None

    def dep(self, unit: str) -> _Dep:
        """What waiting for a unit means: edges from its steps, and the gate of a guarded group."""
        if unit not in self.groups:
            return [(unit, False)], []
        grp = self.groups[unit]
        if grp.guarded:
            return [(s, True) for s in group_steps(self.pb, unit)], [unit]
        edges: list[tuple[str, bool]] = []
        gates: list[str] = []
        for sink in self._sinks(grp.parts.get("block", []), grp.inner_namespace):
            e, g = self.dep(sink)
            edges.extend(e)
            gates.extend(g)
        return edges, gates

    def _sinks(self, members: list[str], ns: str) -> list[str]:
        """The units of a list no other unit of the list waits for."""
        waited: set[str] = set()
        for i, unit in enumerate(members):
            needs = self._needs(unit)
            if needs is None:
                if i > 0:
                    waited.add(members[i - 1])
            else:
                waited.update(r for n in needs if (r := self.resolve(n, ns)) is not None)
        return [u for u in members if u not in waited]

    def _own(self, unit: str, members: list[str], i: int, ns: str, around: tuple[str, ...]) -> _Dep:
        needs = self._needs(unit)
        if needs is None:
            return self.dep(members[i - 1]) if i > 0 else ([], [])
        edges: list[tuple[str, bool]] = []
        gates: list[str] = []
        for j, need in enumerate(needs):
            target = self.resolve(need, ns)
            if target == unit or target in around:
                what = "itself" if target == unit else f"the block `{target}` it is in"
                self.problems.add(f"`{unit}` needs {what}", self._locate(unit, "needs", j),
                                  "remove it from `needs`", code="self-dependency")
            elif target is None:
                known = [u for u in (*self.steps, *self.groups) if u.startswith(ns) and "/" not in u[len(ns):]]
                from runbook.errors import did_you_mean

                hint = did_you_mean(ns + need, [*self.steps, *self.groups]) or (
                    f"known ids: {', '.join(k[len(ns):] for k in known)}" if known else None)
                self.problems.add(f"step `{unit}` needs unknown step `{need}`", self._locate(unit, "needs", j), hint,
                                  code="unknown-needs")
            else:
                e, g = self.dep(target)
                edges.extend(e)
                gates.extend(g)
        return edges, gates

    def _list(self, members: list[str], ns: str, entry: _Dep, around: tuple[str, ...]) -> None:
        for i, unit in enumerate(members):
            own_edges, own_gates = self._own(unit, members, i, ns, around)
            incoming = (own_edges + entry[0], own_gates + entry[1])
            if unit not in self.groups:
                for a, settled in incoming[0]:
                    if a != unit:
                        key = (a, unit)
                        self.out.edges[key] = self.out.edges.get(key, False) or settled
                if incoming[1]:
                    self.out.gates.setdefault(unit, []).extend(g for g in incoming[1]
                                                               if g not in self.out.gates.get(unit, []))
                continue
            grp = self.groups[unit]
            inside = around + (unit,)
            for part in PARTS:
                if part not in grp.parts:
                    continue
                before = {"block": (), "rescue": ("block",), "always": ("block", "rescue")}[part]
                after = [(s, True) for s in group_steps(self.pb, unit, before)]
                self._list(grp.parts[part], grp.inner_namespace, (incoming[0] + after, incoming[1]), inside)


def section_edges(playbook: Playbook, section: str, steps: dict[str, Step], problems: Problems) -> SectionEdges:
    """The flat step edges of a composed section (with blocks, includes or roles), problems located."""
    return _EdgeBuilder(playbook, section, steps, problems).build()


# --- listing and starting part-way ----------------------------------------------------------------

def step_listing(playbook: Playbook) -> list[dict[str, Any]]:
    """Every flat step in run order per section: id, name, action, tags, enclosing groups and where it is written."""
    out: list[dict[str, Any]] = []
    for section in ("steps", "on_failure", "handlers"):
        for step in getattr(playbook, section, None) or []:
            around = enclosing_groups(step)
            out.append({"section": section, "id": step.step_id, "name": step.name,
                        "action": step.action if step.actions_present() else "",
                        "tags": list(step.tags), "block": " > ".join(f"{g}:{part}" if kind == "block" and part != "block"
                                                                    else g for g, part, kind in around),
                        "location": str(locate(playbook, step))})
    return out


def find_step(playbook: Playbook, wanted: str, flag: str = "--start-at-step") -> Step:
    """The main step a flag names, by id or else by name; unknown or ambiguous is a ValidationError with a hint."""
    from runbook.errors import ValidationError, did_you_mean

    steps = list(playbook.steps)
    by_id = [s for s in steps if s.step_id == wanted]
    if by_id:
        return by_id[0]
    by_name = [s for s in steps if s.name == wanted]
    if len(by_name) == 1:
        return by_name[0]
    if by_name:
        raise ValidationError(f"{flag} {wanted}: {len(by_name)} steps have this name", hint="give the step's id: "
                              + ", ".join(s.step_id for s in by_name))
    hint = did_you_mean(wanted, [*(s.step_id for s in steps), *(s.name for s in steps)])
    raise ValidationError(f"{flag} {wanted}: no step of `{playbook.runbook}` has this id or name",
                          hint=(hint + " " if hint else "") + "`runbook run PLAYBOOK --list-steps` lists them")
