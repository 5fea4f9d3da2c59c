"""The static checks `validate` runs over a playbook's templates: syntax, undefined names, shell safety."""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Iterator

import jinja2
from jinja2 import meta, nodes

from runbook.actions import FieldKind, TemplatedField, action_for
from runbook.errors import Location, Problem, close_match
from runbook.fields import YAML11_BOOLEANS
from runbook.model import CONTROLLER, MAX_LOOP_ITEMS, Playbook, Step
from runbook.shell_lint import locate_in_file, shell_findings
from runbook.template import BUILTINS, environment, strip_braces

# Step keys (not actions) that are templates; guards that run through a shell.
STEP_TEMPLATE_FIELDS = ("creates", "removes", "sudo", "delegate_to")
STEP_SHELL_FIELDS = ("unless", "only_if")
EXPRESSION_FIELDS = ("when", "until", "changed_when", "failed_when")


def step_templates(step: Step) -> Iterator[TemplatedField]:
    """Every templated string of a step, with its path inside the step and how it is used."""
    for f in STEP_TEMPLATE_FIELDS:
        value = getattr(step, f)
        if isinstance(value, str):
            yield TemplatedField((f,), value, FieldKind.TEMPLATE)
    for f in STEP_SHELL_FIELDS:
        value = getattr(step, f)
        if isinstance(value, str):
            yield TemplatedField((f,), value, FieldKind.SHELL)
    for f in EXPRESSION_FIELDS:
        value = getattr(step, f)
        if isinstance(value, str):
            yield TemplatedField((f,), value, FieldKind.EXPRESSION)
    for k, v in step.env.items():
        yield TemplatedField(("env", k), v, FieldKind.TEMPLATE)
    yield from _loop_templates(step)
    for field in action_for(step).fields():
        yield TemplatedField((step.action, *field.path), field.text, field.kind)


def _loop_templates(step: Step) -> Iterator[TemplatedField]:
    """The loop's expression (or the strings of its literal items) and its label."""
    if isinstance(step.loop, str):
        yield TemplatedField(("loop",), step.loop, FieldKind.EXPRESSION)
    elif step.loop is not None:
        stack: list[tuple[tuple[str | int, ...], object]] = [(("loop",), step.loop)]
        while stack:
            path, value = stack.pop()
            if isinstance(value, str) and "{" in value:
                yield TemplatedField(path, value, FieldKind.TEMPLATE)
            elif isinstance(value, dict):
                stack.extend(((*path, str(k)), v) for k, v in value.items())
            elif isinstance(value, list):
                stack.extend(((*path, i), v) for i, v in enumerate(value))
    if step.label is not None:
        yield TemplatedField(("label",), step.label, FieldKind.TEMPLATE)


# Names a loop variable must not take: the built-ins, a step's own `result`, and `loop` (kept for loop details).
RESERVED_LOOP_NAMES = BUILTINS | {"result", "loop", "and", "or", "not", "in", "is", "if", "else"}
LOOP_OPTIONS = ("loop_var", "index_var", "label", "loop_concurrency")


def loop_locals(step: Step) -> set[str]:
    """The names a looped step's own templates may use: its loop variable and index variable."""
    if step.loop is None:
        return set()
    return {step.loop_name} | ({step.index_var} if step.index_var else set())


def loop_problems(step: Step, locate: Callable[[str], Location]) -> list[Problem]:
    """Misused loop keys of one step: loop options without `loop`, a reserved or doubled loop variable name."""
    found: list[Problem] = []
    if step.loop is None:
        for key in LOOP_OPTIONS:
            if getattr(step, key) is not None:
                found.append(Problem(f"`{key}` is set but the step has no `loop`", locate(key),
                                     f"add `loop:` with the items to run the step for, or remove `{key}`", code="loop-misuse"))
        return found
    if isinstance(step.loop, (list, dict)) and len(step.loop) > MAX_LOOP_ITEMS:
        found.append(Problem(f"the loop has {len(step.loop):,} items; at most {MAX_LOOP_ITEMS:,} are run per step and host",
                             locate("loop"), "split the list over several steps, or loop over a filtered expression",
                             code="loop-misuse"))
    for key in ("loop_var", "index_var"):
        name = getattr(step, key)
        if name in RESERVED_LOOP_NAMES:
            found.append(Problem(f"`{key}: {name}` shadows the reserved name `{name}`", locate(key),
                                 f"choose another name, e.g. `{name}_item`", code="loop-misuse"))
    if step.index_var is not None and step.index_var == step.loop_name:
        found.append(Problem(f"`index_var` and the loop variable are both `{step.index_var}`", locate("index_var"),
                             "give the position its own name, e.g. `index_var: i`", code="loop-misuse"))
    return found


def _parse(text: str, kind: FieldKind) -> nodes.Template:
    source = "{{ " + strip_braces(text) + " }}" if kind == FieldKind.EXPRESSION else text
    return environment().parse(source)


@functools.lru_cache(maxsize=4096)   # load and the pre-run check of `run` read the same templates: once
def _free_names(text: str, kind: FieldKind) -> frozenset[str]:
    """The names a template reads that it does not define itself, except those it only reads guarded."""
    tree = _parse(text, kind)
    return frozenset(meta.find_undeclared_variables(tree) - guarded_names(tree))


class _TemplateChecker:
    """Checks one playbook's templated strings, collecting located problems."""

    def __init__(self, playbook: Playbook, known_vars: set[str] | None, *, names_only: bool = False):
        self.names_only = names_only   # only undefined names: no shell lint, no action checks
        self.playbook = playbook
        self.source = playbook._source
        self.known_vars = known_vars
        self.defined = set(playbook.vars) | set(playbook.secrets) | BUILTINS | {"facts"}
        self.defined |= {s.register_as for s in playbook.all_steps() if s.register_as}
        if known_vars:
            self.defined |= known_vars
        self.problems: list[Problem] = []
        self._groups_checked: set[str] = set()

    def locate(self, path: tuple[str | int, ...]) -> Location:
        """Where a path of the playbook is in its file."""
        if self.source is None:
            return Location("<playbook>")
        if path not in self.source.values and "that" in path:
            # `assert: [expr, ...]` is shorthand for `assert: {that: [...]}`: the text has no `that` level
            short = tuple(p for p in path if p != "that")
            if short in self.source.values:
                return self.source.locate(short)
        return self.source.locate(path)

    def _locator(self, prefix: tuple[str | int, ...]) -> Callable[[tuple[str | int, ...]], Location]:
        """A `locate` for paths below `prefix` (an action's own paths)."""
        return lambda path: self.locate((*prefix, *path))

    def check(self, path: tuple[str | int, ...], text: str, kind: FieldKind) -> None:
        """Syntax, undefined names and (for shell fields) the quoting lint of one templated string."""
        try:
            names = _free_names(text, kind)
        except jinja2.TemplateSyntaxError as exc:
            self.problems.append(Problem(f"template syntax error: {exc.message}", self.locate(path),
                                         "check the {{ }} and {% %} pairs and the expression", code="template-syntax"))
            return
        # `changed_when`, `failed_when` and `until` also see the step's own result as `result`.
        local = self.defined | {"result"} if path and path[-1] in ("changed_when", "failed_when", "until") else self.defined
        for name in sorted(names - local):
            self._undefined(path, name)
        if kind == FieldKind.SHELL and not self.names_only:
            self._lint_shell(path, text)

    def _lint_shell(self, path: tuple[str | int, ...], text: str) -> None:
        """The shell-quoting lint of a string that reaches a shell, located at the offending expression."""
        for finding in shell_findings(text):
            loc = self.locate(path)
            mark = self.source.values.get(path) if self.source is not None else None
            pos = locate_in_file(self.source.text, mark.index, finding) if self.source is not None and mark else None
            if pos is not None:
                loc = Location(loc.file, *pos)
            self.problems.append(Problem(finding.message, loc, finding.hint, severity="warning", code=finding.code))

    def _undefined(self, path: tuple[str | int, ...], name: str) -> None:
        expression = bool(path) and path[-1] in EXPRESSION_FIELDS
        if self.known_vars is not None:
            self.problems.append(Problem(f"undefined variable `{name}`", self.locate(path),
                                         _undefined_hint(name, self.defined, expression), code="undefined-variable"))
            return
        # The inventory or -e may still define it, so a warning; but a near miss of a defined name is
        # almost always a typo that fails the run part-way, so the hint says which name was meant.
        hint = _undefined_hint(name, self.defined, expression,
                               fallback="define a default under `vars:`, or make sure the inventory or -e provides it")
        self.problems.append(Problem(f"`{name}` is not defined by the playbook's vars, secrets or registers",
                                     self.locate(path), hint, severity="warning", code="undefined-variable"))

    def run(self) -> list[Problem]:
        """Check every templated string of the playbook, and each action's own static checks."""
        for name, value in self.playbook.vars.items():
            if isinstance(value, str) and "{" in value:
                self.check(("vars", name), value, FieldKind.TEMPLATE)
        for section in ("steps", "on_failure", "handlers"):
            for i, step in enumerate(getattr(self.playbook, section)):
                if step.flush_handlers and not step.actions_present():
                    continue   # a flush point: no templates (graph.py reports misuse)
                self._check_step(step, (section, i))
        # Reported in file order, whichever part of the step (or its action) a string belongs to.
        return sorted(self.problems, key=lambda p: (p.location.line or 0, p.location.column or 0) if p.location else (0, 0))


    def _check_step(self, step: Step, path: tuple[str | int, ...]) -> None:
        """One step's templates and action checks, located in the file the step is written in."""
        from runbook.compose import origin, own_when, role_defaults

        found = origin(step)
        source, defined = self.source, self.defined
        if found is not None:   # a composed step: its own file and place (a block, an include, a role)
            self.source, path = found.source, found.path
        own = set(step.vars) | set(role_defaults(step)) | loop_locals(step)
        if own:
            self.defined = defined | own
        try:
            inherited, when = own_when(step)
            for field in step_templates(step):
                if inherited and field.path == ("when",):
                    continue   # its own `when` and each enclosing group's, each where it is written (below)
                self.check((*path, *field.path), field.text, field.kind)
            if inherited:
                if when is not None:
                    self.check((*path, "when"), when, FieldKind.EXPRESSION)
                self._group_whens(step)
            if not self.names_only:
                self.problems.extend(loop_problems(step, lambda key: self.locate((*path, key))))
                self.problems.extend(action_for(step).check(self.playbook, self._locator((*path, step.action))))
        finally:
            self.source, self.defined = source, defined

    def _group_whens(self, step: Step) -> None:
        """The `when` of each block, include or role around a step, checked once, at the group."""
        from runbook.compose import enclosing_groups

        source = self.source
        for gid, _, _ in enclosing_groups(step):
            grp = self.playbook._groups.get(gid)
            if grp is None or grp.when is None or gid in self._groups_checked:
                continue
            self._groups_checked.add(gid)
            self.source = grp.origin.source
            try:
                self.check((*grp.origin.path, "when"), grp.when, FieldKind.EXPRESSION)
            finally:
                self.source = source


def step_reads(step: Step, name: str) -> bool:
    """Whether a templated field of the step reads the variable `name` (other than behind `is defined`/`default`)."""
    for field in step_templates(step):
        try:
            if name in _free_names(field.text, field.kind):
                return True
        except jinja2.TemplateSyntaxError:
            continue   # reported by validate; rendering it fails the task
    return False


def delegate_problems(playbook: Playbook, hosts: Collection[str]) -> list[Problem]:
    """Literal `delegate_to` names that are not inventory hosts (nor `controller`), located, with a did-you-mean."""
    from runbook.compose import origin

    found: list[Problem] = []
    for section in ("steps", "on_failure", "handlers"):
        for i, step in enumerate(getattr(playbook, section, None) or []):
            name = step.delegate_to
            if name is None or "{" in name or name == CONTROLLER or name in hosts:
                continue
            where = origin(step)
            source, path = (where.source, where.path) if where is not None else (playbook._source, (section, i))
            loc = source.locate((*path, "delegate_to")) if source is not None else Location("<playbook>")
            match = close_match(name, list(hosts))
            hint = (f"did you mean `{match}`?" if match else
                    "a delegate must be a host of the inventory (it need not be selected), or `controller`")
            found.append(Problem(f"`delegate_to: {name}`: no such host in the inventory", loc, hint,
                                 code="unknown-delegate"))
    return found


def undefined_variables(playbook: Playbook, known_vars: set[str]) -> list[Problem]:
    """Names no vars, secrets, register, built-in or `known_vars` define, located, with a did-you-mean (errors)."""
    return [p for p in _TemplateChecker(playbook, known_vars, names_only=True).run() if p.code == "undefined-variable"]


def guarded_names(tree: nodes.Template) -> set[str]:
    """Names a template only reads behind `is defined`/`is undefined` or `| default(...)`: optional, not typos."""
    found: set[str] = set()
    for node in tree.find_all((nodes.Test, nodes.Filter)):
        if node.name in ("defined", "undefined", "default", "d") and isinstance(node.node, nodes.Name):
            found.add(node.node.name)
    return found


def check_playbook_templates(playbook: Playbook, *, known_vars: set[str] | None = None) -> list[Problem]:
    """Template syntax, provably undefined names, and the shell-safety lint, all located."""
    return _TemplateChecker(playbook, known_vars).run()


def _undefined_hint(name: str, defined: set[str], expression: bool = False,
                    fallback: str = "define it under `vars:`, in the inventory, with `register:` on an earlier step, "
                                    "or with -e") -> str:
    if expression and name.lower() in YAML11_BOOLEANS:   # `changed_when: yes`
        meant = str(YAML11_BOOLEANS[name.lower()]).lower()
        return f"write `{meant}`: in an expression `{name}` is a variable name, only true and false are booleans"
    match = close_match(name, defined - BUILTINS)
    if match:
        return f"did you mean `{match}`?"
    if name == "item":
        return "`item` is the current item of a step with `loop:`; add the `loop:` this step runs over, or define `item`"
    return fallback
