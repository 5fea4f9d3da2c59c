"""The rules file (`rules.yml`): which alerts run which playbook on which hosts, loaded with located errors."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import jinja2
import pydantic
from jinja2 import meta
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from runbook.errors import Location, Problem, Problems, ValidationError, did_you_mean
from runbook.model import Duration
from runbook.loader import LocatedDocument, SourceMap, ValidationReport, parse_yaml, pydantic_problems, read_text
from runbook.serve.models import Alert

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
LabelName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
SecretRef = Annotated[str, StringConstraints(pattern=r"^(env|file):.+$")]
HeaderName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9-]{1,64}$")]
MatchValue = str | list[str]

DEFAULT_COOLDOWN = 600.0
TEMPLATE_NAMES = frozenset({"alert", "rule"})
MAX_TARGETS = 100          # hosts one alert may name
# A host name or address from a payload: DNS-ish names only; anything else is refused, never made a pattern.
_HOST_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,252})$")


class RulesError(ValidationError):
    """A rules file that cannot be loaded."""


class Strict(BaseModel):
    """Unknown keys are errors: a typo in a safety setting must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid")


class Breaker(Strict):
    """At most `max_runs` remediations per `per` for one (rule, host); then suppress and escalate once."""

    max_runs: int = Field(3, ge=1, le=1000)
    per: Duration = 3600.0
    escalate: str | None = Field(None, description="Playbook run once when the breaker opens.")


class Defaults(Strict):
    """Settings every rule gets unless it sets its own."""

    cooldown: Duration = DEFAULT_COOLDOWN
    breaker: Breaker = Field(default_factory=lambda: Breaker.model_validate({}))
    outside_window: Literal["defer", "suppress"] = "defer"


class HookConfig(Strict):
    """How a generic hook authenticates: an HMAC-SHA256 signature of the body (and timestamp)."""

    secret: SecretRef | None = Field(None, description="env:NAME or file:PATH; without it the server token is required.")
    header: HeaderName = "X-Runbook-Signature"
    encoding: Literal["hex", "base64"] = "hex"
    prefix: Annotated[str, StringConstraints(max_length=32)] = ""
    timestamp_header: HeaderName | None = "X-Runbook-Timestamp"
    tolerance: Duration = 300.0


class Rule(Strict):
    """One rule: a match on an alert, a playbook, its targets, vars and safety settings."""

    name: Name
    description: str | None = None
    hook: Name | None = Field(None, description="Match deliveries to /hooks/NAME instead of Alertmanager alerts.")
    match: dict[LabelName, MatchValue] = Field(default_factory=dict)
    match_annotations: dict[LabelName, MatchValue] = Field(default_factory=dict)
    status: Literal["firing", "resolved", "any"] = "firing"
    playbook: str
    hosts: str | None = Field(None, description="Template naming the target hosts; default: the host label without its port.")
    host_label: LabelName = "instance"
    vars: dict[str, Any] = Field(default_factory=dict)
    mode: Literal["apply", "plan"] = "apply"
    cooldown: Duration | None = None
    breaker: Breaker | None = None
    on_resolved: str | None = None
    outside_window: Literal["defer", "suppress"] | None = None


class RulesFile(Strict):
    """The whole file."""

    rules: list[Rule] = Field(min_length=1)
    defaults: Defaults = Field(default_factory=Defaults)
    hooks: dict[Name, HookConfig] = Field(default_factory=dict)
    concurrency: int = Field(4, ge=1, le=64, description="Remediations running at once, over all hosts.")


_MODELS: dict[str, type[pydantic.BaseModel]] = {"": RulesFile, "rules": Rule, "breaker": Breaker, "defaults": Defaults,
                                                "hooks": HookConfig}


# --- matching ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Matcher:
    """One key's accepted values: exact strings and `~regex` patterns (full match); a missing key is ``""``."""

    key: str
    exact: frozenset[str]
    patterns: tuple[re.Pattern[str], ...]

    def matches(self, values: dict[str, str]) -> bool:
        """True when the key's value is one of the accepted ones."""
        value = values.get(self.key, "")
        return value in self.exact or any(p.fullmatch(value) for p in self.patterns)


def _matchers(spec: dict[str, MatchValue], where: tuple, source: SourceMap, problems: Problems) -> list[Matcher]:
    out = []
    for key, raw in spec.items():
        exact, patterns = set(), []
        for i, value in enumerate([raw] if isinstance(raw, str) else raw):
            if value.startswith("~"):
                try:
                    patterns.append(re.compile(value[1:]))
                except re.error as exc:
                    loc = source.locate(where + (key,) + (() if isinstance(raw, str) else (i,)))
                    problems.add(f"`{key}`: invalid regular expression {value[1:]!r}: {exc}", loc,
                                 "a value starting with `~` is a Python regular expression that must match the whole value")
            else:
                exact.add(value)
        out.append(Matcher(key, frozenset(exact), tuple(patterns)))
    return out


# --- the loaded rules ------------------------------------------------------------------------------

@dataclass
class CompiledRule:
    """A validated rule with its matchers, absolute playbook paths and effective safety settings."""

    spec: Rule
    index: int
    playbook: Path
    on_resolved: Path | None
    escalate: Path | None
    labels: list[Matcher]
    annotations: list[Matcher]
    cooldown: float
    breaker: Breaker
    outside_window: str

    @property
    def name(self) -> str:
        """The rule's name."""
        return self.spec.name

    def matches(self, alert: Alert) -> bool:
        """True when the alert's source, labels and annotations match (status is decided by `playbook_for`)."""
        wanted = f"hook:{self.spec.hook}" if self.spec.hook else "alertmanager"
        if alert.source != wanted:
            return False
        return all(m.matches(alert.labels) for m in self.labels) and all(m.matches(alert.annotations) for m in self.annotations)

    def playbook_for(self, alert: Alert) -> tuple[str, Path] | None:
        """(kind, playbook) this rule runs for the alert: `remediate` or `resolved`; None when its status is not wanted."""
        if alert.status == "resolved" and self.on_resolved is not None:
            return "resolved", self.on_resolved
        if self.spec.status == "any" or self.spec.status == alert.status:
            return "remediate", self.playbook
        return None


@dataclass
class RuleSet:
    """Every rule of a rules file, in order, plus the hooks' settings."""

    path: Path
    rules: list[CompiledRule]
    hooks: dict[str, HookConfig]
    concurrency: int
    warnings: list[Problem] = field(default_factory=list)

    def get(self, name: str) -> CompiledRule | None:
        """A rule by name."""
        return next((r for r in self.rules if r.name == name), None)

    def matching(self, alert: Alert) -> list[CompiledRule]:
        """Every rule that matches the alert, in file order."""
        return [r for r in self.rules if r.matches(alert)]

    @property
    def hook_names(self) -> set[str]:
        """Names that /hooks/NAME accepts: configured hooks and hooks named by a rule."""
        return set(self.hooks) | {r.spec.hook for r in self.rules if r.spec.hook}


# --- targets and vars --------------------------------------------------------------------------------

class TargetError(Exception):
    """An alert's host text that cannot name a host safely."""


def strip_port(text: str) -> str:
    """`web01:9100` -> `web01`, `[::1]:9100` -> `::1`, `10.0.0.1:9100` -> `10.0.0.1`; a bare IPv6 address stays."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        return text[1:end] if end > 0 else text
    try:
        ipaddress.IPv6Address(text)
        return text
    except ValueError:
        pass
    host, sep, port = text.rpartition(":")
    return host if sep and port.isdigit() else text


def check_host_text(name: str) -> str:
    """A host name or IP address from an alert, or TargetError: nothing else may reach host selection."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not _HOST_RE.fullmatch(name):
        raise TargetError(f"{name[:80]!r} is not a host name or IP address")
    return name


def render_template(text: str, context: dict[str, Any]) -> str:
    """Render a rule template in the sandbox; the alert's values are data, never template source."""
    from runbook.template import render

    return render(text, context)


def target_names(rule: CompiledRule, alert: Alert) -> list[str]:
    """The host names an alert names for a rule: the `hosts:` template or the host label, ports stripped."""
    if rule.spec.hosts is not None:
        text = render_template(rule.spec.hosts, {"alert": alert.context(), "rule": {"name": rule.name}})
    else:
        text = alert.labels.get(rule.spec.host_label, "")
    parts = [p for p in re.split(r"[\s,]+", text) if p]
    if len(parts) > MAX_TARGETS:
        raise TargetError(f"the alert names {len(parts)} hosts (at most {MAX_TARGETS})")
    return list(dict.fromkeys(check_host_text(strip_port(p)) for p in parts))


_INT = re.compile(r"-?(?:0|[1-9][0-9]{0,17})")
_FLOAT = re.compile(r"-?(?:0|[1-9][0-9]{0,17})\.[0-9]{1,17}")


def scalar(text: str) -> Any:
    """A rendered value that is exactly a number or true/false becomes one (as `-e key=value` does); else it stays text."""
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return {"true": True, "false": False}.get(text, text)


def render_vars(rule: CompiledRule, alert: Alert) -> dict[str, Any]:
    """The rule's `vars:` rendered against the alert: text (or a plain number), never parsed or rendered again."""
    context = {"alert": alert.context(), "rule": {"name": rule.name}}

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            return scalar(render_template(value, context)) if "{" in value else value
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        return value

    return {k: walk(v) for k, v in rule.spec.vars.items()}


# --- loading ------------------------------------------------------------------------------------------

def _unknown_keys(data: Any, model: type[pydantic.BaseModel], path: tuple, source: SourceMap, problems: Problems) -> None:
    """Unknown keys with a did-you-mean hint (pydantic alone would not know the model for the hint)."""
    if not isinstance(data, dict):
        return
    allowed = [f.alias or n for n, f in model.model_fields.items()]
    for key, value in data.items():
        if key not in allowed:
            problems.add(f"unknown key `{key}`", source.locate(path + (key,), key=True),
                         did_you_mean(str(key), allowed) or f"allowed keys: {', '.join(allowed)}", code="unknown-key")
            continue
        if model is RulesFile and key == "rules" and isinstance(value, list):
            for i, item in enumerate(value):
                _unknown_keys(item, Rule, path + (key, i), source, problems)
        elif model is RulesFile and key == "hooks" and isinstance(value, dict):
            for name, item in value.items():
                _unknown_keys(item, HookConfig, path + (key, name), source, problems)
        elif key in ("breaker", "defaults") and isinstance(value, dict):
            _unknown_keys(value, _MODELS[key], path + (key,), source, problems)


def _check_template(text: str, loc: Location, problems: Problems, what: str) -> None:
    from runbook.template import environment

    try:
        names = meta.find_undeclared_variables(environment().parse(text))
    except jinja2.TemplateSyntaxError as exc:
        problems.add(f"{what}: template syntax error: {exc.message}", loc, "check the {{ }} and {% %} pairs")
        return
    for name in sorted(names - TEMPLATE_NAMES):
        problems.add(f"{what}: unknown name `{name}` in a rule template", loc,
                     "rule templates see `alert` (labels, annotations, status, startsAt, fingerprint, payload) and `rule`")


def _strings(value: Any, path: tuple) -> list[tuple[tuple, str]]:
    if isinstance(value, str):
        return [(path, value)]
    if isinstance(value, list):
        return [s for i, v in enumerate(value) for s in _strings(v, path + (i,))]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings(v, path + (k,))]
    return []


def _compile(doc: LocatedDocument, spec: RulesFile, base: Path, problems: Problems) -> list[CompiledRule]:
    source = doc.source
    seen: dict[str, int] = {}
    out = []
    d = spec.defaults
    for i, rule in enumerate(spec.rules):
        at = ("rules", i)
        if rule.name in seen:
            problems.add(f"duplicate rule name `{rule.name}` (first in rule {seen[rule.name] + 1})",
                         source.locate(at + ("name",)), "rule names are unique: the breaker and cooldown are kept per rule")
        seen.setdefault(rule.name, i)
        if rule.on_resolved and rule.status != "firing":
            problems.add("`on_resolved`: only for rules with `status: firing`", source.locate(at + ("on_resolved",)),
                         "a rule with status resolved or any runs its `playbook` on resolved alerts already")
        if rule.hosts is not None:
            _check_template(rule.hosts, source.locate(at + ("hosts",)), problems, "`hosts`")
        for sub, text in _strings(rule.vars, at + ("vars",)):
            _check_template(text, source.locate(sub), problems, f"`{sub[-1]}`")
        breaker = d.breaker
        if rule.breaker is not None:
            breaker = d.breaker.model_copy(update={k: getattr(rule.breaker, k) for k in rule.breaker.model_fields_set})
        escalate = breaker.escalate
        where_escalate = at + ("breaker", "escalate") if rule.breaker and "escalate" in rule.breaker.model_fields_set \
            else ("defaults", "breaker", "escalate")
        out.append(CompiledRule(
            spec=rule, index=i,
            playbook=_playbook_path(base, rule.playbook, source.locate(at + ("playbook",)), problems),
            on_resolved=_playbook_path(base, rule.on_resolved, source.locate(at + ("on_resolved",)), problems)
            if rule.on_resolved else None,
            escalate=_playbook_path(base, escalate, source.locate(where_escalate), problems) if escalate else None,
            labels=_matchers(rule.match, at + ("match",), source, problems),
            annotations=_matchers(rule.match_annotations, at + ("match_annotations",), source, problems),
            cooldown=rule.cooldown if rule.cooldown is not None else d.cooldown,
            breaker=breaker, outside_window=rule.outside_window or d.outside_window))
    return out


def _playbook_path(base: Path, text: str, loc: Location, problems: Problems) -> Path:
    path = Path(os.path.expanduser(text))
    path = path if path.is_absolute() else (base / path)
    if not path.is_file():
        problems.add(f"playbook {text} not found (looked at {path})", loc, "playbook paths are relative to the rules file")
    return path.resolve()


def load_rules(path: str | os.PathLike) -> RuleSet:
    """Load and check a rules file; raise RulesError with every problem, each located."""
    filename = str(path)
    top_hint = "a rules file is `rules:` followed by a list of rules with `name`, `match` and `playbook`"
    try:
        text = read_text(path, "rules file")
    except ValidationError as exc:
        raise RulesError(exc.problems) from None
    if not text.strip() or all(not ln.strip() or ln.lstrip().startswith("#") for ln in text.splitlines()):
        raise RulesError([Problem("the rules file is empty", Location(filename, 1, 1), top_hint)])
    doc = parse_yaml(text, filename, RulesError)  # type: ignore[arg-type]
    if not isinstance(doc.data, dict):
        raise RulesError([Problem("expected a mapping with a `rules:` list", Location(filename, 1, 1), top_hint)])
    problems = Problems()
    _unknown_keys(doc.data, RulesFile, (), doc.source, problems)
    try:
        spec = RulesFile.model_validate(doc.data)
    except pydantic.ValidationError as exc:
        mine = {(p.message, p.location) for p in problems.items}
        problems.items.extend(p for p in pydantic_problems(exc, doc.data, doc.source) if (p.message, p.location) not in mine)
        raise RulesError(problems.items) from None
    rules = _compile(doc, spec, Path(filename).resolve().parent, problems)
    problems.raise_if_errors(RulesError)
    return RuleSet(Path(filename).resolve(), rules, dict(spec.hooks), spec.concurrency, problems.warnings)


def validate_rules_file(path: str | os.PathLike) -> ValidationReport:
    """Validate a rules file and every playbook it names; the report `runbook validate` prints."""
    from runbook.serve.bridge import check_playbook

    try:
        rules = load_rules(path)
    except ValidationError as exc:
        return ValidationReport(str(path), None, exc.problems)
    problems = list(rules.warnings)
    checked: set[Path] = set()
    for rule in rules.rules:
        for playbook in (rule.playbook, rule.on_resolved, rule.escalate):
            if playbook is not None and playbook not in checked:
                checked.add(playbook)
                problems.extend(check_playbook(playbook))
    if any(p.severity == "error" for p in problems):
        return ValidationReport(str(path), None, problems)
    names = ", ".join(r.name for r in rules.rules)
    return ValidationReport(str(path), None, problems,
                            summary=f"{path}: ok — {len(rules.rules)} rule(s): {names}; {len(checked)} playbook(s) valid")
