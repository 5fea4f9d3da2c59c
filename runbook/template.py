"""Sandboxed jinja2: rendering, expressions and variable precedence."""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any
from collections.abc import Iterator

import jinja2
from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from runbook.errors import Problem, TemplateError

if TYPE_CHECKING:
    from runbook.model import Playbook

# Names every template can use without defining them.
BUILTINS = frozenset({"host", "inventory_hostname", "groups", "hostvars", "run", "playbook_dir", "secrets",
                      "range", "lipsum", "dict", "cycler", "joiner", "namespace", "true", "false", "none",
                      "True", "False", "None"})


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
        # Identity: the author says this value *is* shell code (e.g. an operator's restart command line),
        # so the shell-quoting lint accepts it unquoted. Greppable, and reviewed like any other code.
        "shell_code": lambda v: str(v),
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
        value = _compile_expr(strip_braces(expr))(context)
        if isinstance(value, jinja2.Undefined):
            # A bare undefined name evaluates to an Undefined that fails only when used: fail here, located.
            value._fail_with_undefined_error()
        return value
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


def resolve_local(playbook: Playbook, path: str) -> Path:
    """A control-machine path from a playbook: absolute, or relative to the playbook's directory."""
    p = Path(os.path.expanduser(path))
    if p.is_absolute() or playbook._source is None:
        return p
    return Path(playbook._source.file).resolve().parent / p
