"""Sandboxed jinja2: rendering, expressions, variable precedence, and the checks `validate` runs."""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import jinja2
from jinja2 import meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from runbook.errors import Location, Problem, TemplateError
from runbook.model import Playbook, Step

# Names every template can use without defining them.
BUILTINS = frozenset({"host", "inventory_hostname", "groups", "hostvars", "run", "playbook_dir", "secrets",
                      "range", "lipsum", "dict", "cycler", "joiner", "namespace", "true", "false", "none",
                      "True", "False", "None"})

# Filters whose output is safe to put into a shell command unquoted (numbers or quoted strings).
SHELL_SAFE_FILTERS = frozenset({"quote", "quote_path", "int", "float", "length", "count", "abs", "round"})


def _quote(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(shlex.quote(str(v)) for v in value)
    return shlex.quote(str(value))


def _quote_path(value: Any) -> str:
    """Shell-quote a path, keeping a leading `~` or `~/` as the host's $HOME (quoting alone would stop the shell expanding it)."""
    if isinstance(value, (list, tuple)):
        return " ".join(_quote_path(v) for v in value)
    text = str(value)
    if text == "~":
        return '"$HOME"'
    if text.startswith("~/"):
        rest = text[2:]
        return '"$HOME"/' + shlex.quote(rest) if rest else '"$HOME"/'
    return shlex.quote(text)


def _regex_search(value: Any, pattern: str, group: int = 0) -> str | None:
    m = re.search(pattern, str(value), re.MULTILINE)
    return m.group(group) if m else None


def _human_bytes(value: Any) -> str:
    n = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(value)


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on", "y")
    return bool(value)


@functools.lru_cache(maxsize=1)
def environment() -> ImmutableSandboxedEnvironment:
    """The one template environment: sandboxed, strict about undefined names, no HTML escaping."""
    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                                       autoescape=False)
    env.filters.update({
        "quote": _quote,
        "quote_path": _quote_path,
        "to_json": lambda v, **kw: json.dumps(v, sort_keys=True, **kw),
        "from_json": json.loads,
        "b64encode": lambda v: base64.b64encode(str(v).encode()).decode(),
        "b64decode": lambda v: base64.b64decode(str(v)).decode(),
        "basename": lambda v: os.path.basename(str(v)),
        "dirname": lambda v: os.path.dirname(str(v)),
        "regex_search": _regex_search,
        "regex_replace": lambda v, p, r="": re.sub(p, r, str(v)),
        "bool": _bool,
        "human_bytes": _human_bytes,
        "lines": lambda v: str(v).splitlines(),
    })
    return env


@functools.lru_cache(maxsize=4096)
def _compile(text: str) -> jinja2.Template:
    return environment().from_string(text)


@functools.lru_cache(maxsize=4096)
def _compile_expr(expr: str):
    return environment().compile_expression(expr, undefined_to_none=False)


def strip_braces(expr: str) -> str:
    """Accept `{{ x > 1 }}` where a bare expression is expected."""
    text = expr.strip()
    if text.startswith("{{") and text.endswith("}}") and text.count("{{") == 1:
        return text[2:-2].strip()
    return text


def _explain(exc: Exception, text: str) -> TemplateError:
    if isinstance(exc, jinja2.UndefinedError):
        name = re.search(r"'([^']+)' is undefined", str(exc))
        hint = (f"define `{name.group(1)}` under `vars:`, in the inventory, register it in an earlier step, or pass -e"
                if name else "check the variable and attribute names")
        return TemplateError([Problem(f"undefined variable in `{_short(text)}`: {exc}", None, hint)])
    if isinstance(exc, jinja2.TemplateSyntaxError):
        return TemplateError([Problem(f"template syntax error in `{_short(text)}`: {exc.message}", None,
                                      "check the {{ }} and {% %} pairs")])
    if isinstance(exc, jinja2.exceptions.SecurityError):
        return TemplateError([Problem(f"unsafe template `{_short(text)}`: {exc}", None,
                                      "templates run in a sandbox: no access to Python internals")])
    return TemplateError([Problem(f"cannot render `{_short(text)}`: {type(exc).__name__}: {exc}", None)])


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render(text: str, context: dict[str, Any]) -> str:
    """Render a template string; plain strings without jinja markers come back unchanged."""
    if "{" not in text:
        return text
    try:
        return _compile(text).render(context)
    except Exception as exc:  # jinja raises many kinds; all become our TemplateError
        raise _explain(exc, text) from None


def render_value(value: Any, context: dict[str, Any]) -> Any:
    """Render every string inside a value (lists and mappings too)."""
    if isinstance(value, str):
        return render(value, context)
    if isinstance(value, list):
        return [render_value(v, context) for v in value]
    if isinstance(value, dict):
        return {k: render_value(v, context) for k, v in value.items()}
    return value


def evaluate(expr: str | bool, context: dict[str, Any]) -> Any:
    """Evaluate a jinja2 expression (`when`, `until`, `assert`) and return its value."""
    if isinstance(expr, bool):
        return expr
    try:
        return _compile_expr(strip_braces(expr))(context)
    except Exception as exc:
        raise _explain(exc, expr) from None


def truth(expr: str | bool, context: dict[str, Any]) -> bool:
    """Evaluate an expression as a condition; the strings 'false', 'no', '0' and '' are false."""
    value = evaluate(expr, context)
    if isinstance(value, str):
        # a non-empty string is true (as in jinja2), except the words that spell false
        return value.strip().lower() not in ("", "false", "no", "0", "off", "n")
    return bool(value)


def build_context(*, playbook_vars: dict[str, Any], inventory_vars: dict[str, Any], registers: dict[str, Any],
                  extra_vars: dict[str, Any], secrets: dict[str, str], builtins: dict[str, Any]) -> dict[str, Any]:
    """Merge variables, lowest precedence first: playbook vars (defaults) < inventory < secrets < registers < extra vars.

    Playbook `vars:` are defaults a team overrides per group or host in its inventory; `-e` always wins.
    String playbook vars may refer to other variables and are rendered once against the merged context.
    """
    ctx: dict[str, Any] = {}
    ctx.update(playbook_vars)
    ctx.update(inventory_vars)
    ctx.update(secrets)
    ctx.update(registers)
    ctx.update(extra_vars)
    ctx.update(builtins)
    ctx["secrets"] = dict(secrets)
    _resolve_playbook_vars(ctx, playbook_vars)
    return ctx


def _strings(value: Any) -> Iterator[str]:
    """Every string inside a value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)


def _resolve_playbook_vars(ctx: dict[str, Any], playbook_vars: dict[str, Any]) -> None:
    """Render templated playbook vars in dependency order, so `a: "{{ b }}/x"` sees `b` already rendered."""
    pending = {name for name, value in playbook_vars.items()
               if ctx.get(name) is value and any("{" in t for t in _strings(value))}
    active: list[str] = []

    def resolve(name: str) -> None:
        if name not in pending:
            return
        if name in active:
            chain = " -> ".join([*active[active.index(name):], name])
            raise TemplateError([Problem(f"variables refer to each other in a loop: {chain}", None,
                                         "give one of them a plain value")])
        active.append(name)
        for text in _strings(ctx[name]):
            try:
                deps = meta.find_undeclared_variables(environment().parse(text))
            except jinja2.TemplateSyntaxError:
                deps = set()  # render() below reports the syntax error
            for dep in sorted(deps):
                resolve(dep)
        ctx[name] = render_value(ctx[name], ctx)
        active.pop()
        pending.discard(name)

    for name in list(playbook_vars):
        resolve(name)


# --- static checks for `validate` -----------------------------------------------------------

TEMPLATE_FIELDS = ("shell", "creates", "removes", "unless", "only_if", "sudo")
EXPRESSION_FIELDS = ("when", "until", "changed_when", "failed_when")
SHELL_FIELDS = ("shell", "unless", "only_if")


def step_templates(step: Step) -> Iterator[tuple[tuple, str, str]]:
    """Every templated string of a step: (path inside the step, text, kind 'template'|'expression')."""
    for f in TEMPLATE_FIELDS:
        value = getattr(step, f)
        if isinstance(value, str):
            yield (f,), value, "template"
    for f in EXPRESSION_FIELDS:
        value = getattr(step, f)
        if isinstance(value, str):
            yield (f,), value, "expression"
    if step.command:
        for i, arg in enumerate(step.command):
            yield ("command", i), arg, "template"
    for k, v in step.env.items():
        yield ("env", k), v, "template"
    spec = step.action_spec
    if step.action in ("upload", "template", "fetch"):
        yield (step.action, "src"), spec.src, "template"
        yield (step.action, "dest"), spec.dest, "template"
    elif step.action == "wait_for":
        for f in ("host", "path", "command", "port"):
            if isinstance(getattr(spec, f), str):
                yield ("wait_for", f), getattr(spec, f), "template"
    elif step.action == "assert":
        for i, cond in enumerate(spec.that):
            yield ("assert", "that", i), cond, "expression"
        for f in ("msg", "success_msg"):
            if getattr(spec, f):
                yield ("assert", f), getattr(spec, f), "template"
    elif step.action == "approve":
        yield ("approve", "prompt"), spec.prompt, "template"


def _parse(text: str, kind: str) -> nodes.Template:
    env = environment()
    source = text if kind == "template" else "{{ " + strip_braces(text) + " }}"
    return env.parse(source)


def unquoted_interpolations(text: str) -> list[str]:
    """Expressions of a shell template that are interpolated without `| quote` (or a numeric filter)."""
    try:
        tree = _parse(text, "template")
    except jinja2.TemplateSyntaxError:
        return []
    found = []
    for output in tree.find_all(nodes.Output):
        for node in output.nodes:
            if isinstance(node, (nodes.TemplateData, nodes.Const)):
                continue
            if isinstance(node, nodes.Filter) and node.name in SHELL_SAFE_FILTERS:
                continue
            found.append(_source_of(node))
    return found


def _source_of(node: nodes.Node) -> str:
    if isinstance(node, nodes.Name):
        return node.name
    if isinstance(node, nodes.Getattr):
        return f"{_source_of(node.node)}.{node.attr}"
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
        return f"{_source_of(node.node)}[{node.arg.value!r}]"
    if isinstance(node, nodes.Filter):
        return f"{_source_of(node.node)} | {node.name}"
    return "expression"


def check_playbook_templates(playbook: Playbook, *, known_vars: set[str] | None = None) -> list[Problem]:
    """Template syntax, provably undefined names, and the shell-safety lint, all located."""
    source = playbook._source
    defined = set(playbook.vars) | set(playbook.secrets) | BUILTINS
    defined |= {s.register_as for s in playbook.all_steps() if s.register_as}
    if known_vars:
        defined |= known_vars
    problems: list[Problem] = []

    def locate(path: tuple) -> Location:
        if source is None:
            return Location("<playbook>")
        if path not in source.values and "that" in path:
            # `assert: [expr, ...]` is shorthand for `assert: {that: [...]}`: the text has no `that` level
            short = tuple(p for p in path if p != "that")
            if short in source.values:
                return source.locate(short)
        return source.locate(path)

    def check(path: tuple, text: str, kind: str, shell: bool) -> None:
        try:
            tree = _parse(text, kind)
        except jinja2.TemplateSyntaxError as exc:
            problems.append(Problem(f"template syntax error: {exc.message}", locate(path),
                                    "check the {{ }} and {% %} pairs and the expression", code="template-syntax"))
            return
        # `changed_when`, `failed_when` and `until` also see the step's own result as `result`.
        local = defined | {"result"} if path and path[-1] in ("changed_when", "failed_when", "until") else defined
        for name in sorted(meta.find_undeclared_variables(tree) - local):
            if known_vars is not None:
                problems.append(Problem(f"undefined variable `{name}`", locate(path),
                                        _undefined_hint(name, defined), code="undefined-variable"))
            else:
                problems.append(Problem(f"`{name}` is not defined by the playbook's vars, secrets or registers",
                                        locate(path), "define a default under `vars:`, or make sure the inventory "
                                        "or -e provides it", severity="warning", code="undefined-variable"))
        if shell:
            for expr in unquoted_interpolations(text):
                problems.append(Problem(f"`{{{{ {expr} }}}}` is interpolated into a shell command without `| quote`",
                                        locate(path), f"write `{{{{ {expr} | quote }}}}` so that spaces and "
                                        "shell characters in the value cannot change the command",
                                        severity="warning", code="shell-quote"))

    for name, value in playbook.vars.items():
        if isinstance(value, str) and "{" in value:
            check(("vars", name), value, "template", False)
    for section in ("steps", "on_failure"):
        for i, step in enumerate(getattr(playbook, section)):
            for sub, text, kind in step_templates(step):
                check((section, i, *sub), text, kind, kind == "template" and sub[0] in SHELL_FIELDS)
            if step.action == "template" and source is not None:
                problems.extend(_check_template_file(playbook, step, locate((section, i, "template", "src"))))
    return problems


def _undefined_hint(name: str, defined: set[str]) -> str:
    from runbook.errors import close_match

    match = close_match(name, defined - BUILTINS)
    if match:
        return f"did you mean `{match}`?"
    return "define it under `vars:`, in the inventory, with `register:` on an earlier step, or with -e"


def _check_template_file(playbook: Playbook, step: Step, loc: Location) -> list[Problem]:
    src = step.template.src
    if "{" in src:
        return []
    path = resolve_local(playbook, src)
    if not path.is_file():
        return [Problem(f"template file `{src}` not found (looked at {path})", loc,
                        "paths are relative to the playbook's directory", code="missing-file")]
    try:
        environment().parse(path.read_text(encoding="utf-8"))
    except jinja2.TemplateSyntaxError as exc:
        return [Problem(f"template syntax error in {path} line {exc.lineno}: {exc.message}", loc, code="template-syntax")]
    except (OSError, UnicodeDecodeError) as exc:
        return [Problem(f"cannot read template file `{src}`: {exc}", loc)]
    return []


def resolve_local(playbook: Playbook, path: str) -> Path:
    """A control-machine path from a playbook: absolute, or relative to the playbook's directory."""
    p = Path(os.path.expanduser(path))
    if p.is_absolute() or playbook._source is None:
        return p
    return Path(playbook._source.file).resolve().parent / p
