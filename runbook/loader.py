"""YAML to validated models, with file:line:column and a hint in every error."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import yaml

from runbook.errors import Location, PlaybookError, Problem, Problems, did_you_mean
from runbook.model import (ACTIONS, ApproveSpec, AssertSpec, Blackout, FetchSpec, Playbook, Step, TemplateSpec,
                           UploadSpec, WaitForSpec, Window)

Path_ = tuple  # a path into the document: keys and list indexes


class _Loader(yaml.SafeLoader):
    """YAML 1.2-style scalars: only true/false are booleans (so `on:` stays a key, `no` stays a string)."""


# Replace PyYAML's YAML 1.1 implicit resolvers (yes/no/on/off booleans, 0644 octal, 1_000, sexagesimal).
_Loader.yaml_implicit_resolvers = {}
for _tag, _regexp, _first in [
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", list("-+0123456789")),
    ("tag:yaml.org,2002:float",
     r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
     list("-+0123456789.")),
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
]:
    _Loader.add_implicit_resolver(_tag, re.compile(_regexp), _first)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text, 10)  # 0644 is the number 644, as in YAML 1.2


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


@dataclass
class SourceMap:
    """Positions of every key and value of a loaded YAML document."""

    file: str
    values: dict[Path_, yaml.Mark] = field(default_factory=dict)
    keys: dict[Path_, yaml.Mark] = field(default_factory=dict)
    text: str = ""

    def locate(self, path: Path_, *, key: bool = False) -> Location:
        """Location of the value (or the key) at `path`, or of its nearest located ancestor."""
        path = tuple(path)
        while True:
            mark = (self.keys.get(path) if key else None) or self.values.get(path)
            if mark is not None:
                return Location(self.file, mark.line + 1, mark.column + 1)
            if not path:
                return Location(self.file, 1, 1)
            path = path[:-1]

    def content_hash(self) -> str:
        """sha256 of the file's text."""
        return hashlib.sha256(self.text.encode()).hexdigest()


@dataclass
class LocatedDocument:
    """A YAML document as plain Python data plus the positions of its nodes."""

    data: Any
    source: SourceMap


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """Read a UTF-8 text file, turning every I/O failure into a located error."""
    p = Path(path)
    loc = Location(str(path))
    if not p.exists():
        raise PlaybookError([Problem(f"{what} not found", loc, "check the path; relative paths start from the current directory")])
    if p.is_dir():
        raise PlaybookError([Problem(f"{what} is a directory, expected a YAML file", loc, "name a .yml file inside it")])
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise PlaybookError([Problem(f"cannot read {what}: {exc.strerror}", loc, "check the file's permissions")]) from None
    if b"\x00" in raw:
        raise PlaybookError([Problem(f"{what} looks binary (it contains NUL bytes), expected YAML text", loc)])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise PlaybookError([Problem(f"{what} is not valid UTF-8 (byte 0x{raw[exc.start]:02x})",
                                     Location(str(path), line, column), "save the file as UTF-8")]) from None


def parse_yaml(text: str, filename: str, error_cls: type[PlaybookError] = PlaybookError) -> LocatedDocument:
    """Parse one YAML document into data plus a SourceMap; duplicate keys are errors."""
    source = SourceMap(filename, text=text)
    try:
        nodes = list(yaml.compose_all(text, Loader=_Loader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        loc = Location(filename, mark.line + 1, mark.column + 1) if mark else Location(filename)
        hint = "check the indentation and quoting around this line"
        if "\t" in text and "tab" in str(exc.problem or ""):
            hint = "YAML does not allow tabs for indentation; use spaces"
        raise error_cls([Problem(f"malformed YAML: {exc.problem or exc}", loc, hint)]) from None
    except yaml.YAMLError as exc:
        raise error_cls([Problem(f"malformed YAML: {exc}", Location(filename))]) from None
    if not nodes or nodes[0] is None:
        raise error_cls([Problem("the file is empty, expected a YAML mapping", Location(filename, 1, 1),
                                 "start with `runbook: NAME` and a list of `steps:`")])
    if len(nodes) > 1:
        mark = nodes[1].start_mark
        raise error_cls([Problem("the file holds several YAML documents, expected one",
                                 Location(filename, mark.line + 1, mark.column + 1), "remove the `---` separator")])
    problems = Problems()
    loader = _Loader("")
    data = _to_python(nodes[0], (), source, problems, loader)
    problems.raise_if_errors(error_cls)
    return LocatedDocument(data, source)


def _to_python(node: yaml.Node, path: Path_, source: SourceMap, problems: Problems, loader: _Loader) -> Any:
    source.values[path] = node.start_mark
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        loader.flatten_mapping(node)  # resolve `<<` merge keys
        for key_node, value_node in node.value:
            key = _to_python(key_node, path + ("<key>",), source, problems, loader)
            if isinstance(key, (dict, list)):
                problems.add("a mapping key must be a plain value", source.locate(path + ("<key>",)))
                continue
            if key in out:
                first = source.keys.get(path + (key,))
                where = f" (first defined at line {first.line + 1})" if first else ""
                problems.add(f"duplicate key `{key}`{where}",
                             Location(source.file, key_node.start_mark.line + 1, key_node.start_mark.column + 1),
                             "remove one of them; YAML keeps only the last, which hides mistakes", code="duplicate-key")
                continue
            source.keys[path + (key,)] = key_node.start_mark
            out[key] = _to_python(value_node, path + (key,), source, problems, loader)
        source.values.pop(path + ("<key>",), None)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(item, path + (i,), source, problems, loader) for i, item in enumerate(node.value)]
    try:
        return loader.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError) as exc:
        problems.add(f"invalid value: {exc}", source.locate(path))
        return None


def load_document(path: str | os.PathLike, error_cls: type[PlaybookError] = PlaybookError, what: str = "file") -> LocatedDocument:
    """Read and parse a YAML file with positions."""
    return parse_yaml(read_text(path, what), str(path), error_cls)


# --- pydantic errors -> located problems -------------------------------------------------

_EXPECTED = {
    "string_type": "a string", "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "bool_type": "true or false", "bool_parsing": "true or false", "float_type": "a number", "float_parsing": "a number",
    "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
}

_SECTION_MODELS: dict[str, type[pydantic.BaseModel]] = {
    "upload": UploadSpec, "template": TemplateSpec, "fetch": FetchSpec, "wait_for": WaitForSpec,
    "assert": AssertSpec, "approve": ApproveSpec, "window": Window, "blackout": Blackout,
}


def _model_at(path: Path_) -> type[pydantic.BaseModel] | None:
    """The model class that validates the mapping at `path` of a playbook."""
    if not path:
        return Playbook
    if len(path) == 2 and path[0] in ("steps", "on_failure") and isinstance(path[1], int):
        return Step
    for part in reversed(path):
        if isinstance(part, str):
            return _SECTION_MODELS.get(part)
    return None


def _field_names(model: type[pydantic.BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _describe(value: Any) -> str:
    kinds = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list", dict: "a mapping",
             type(None): "nothing (null)"}
    shown = repr(value) if isinstance(value, (str, int, float, bool)) and len(repr(value)) < 40 else ""
    return f"{kinds.get(type(value), type(value).__name__)}{' ' + shown if shown else ''}"


def _walk(data: Any, loc: tuple) -> tuple[Path_, Any, list[str]]:
    """Split a pydantic loc into the real document path, the value there, and union tags met on the way."""
    path: list[Any] = []
    tags: list[str] = []
    current = data
    for part in loc:
        if isinstance(current, dict) and part in current:
            path.append(part)
            current = current[part]
        elif isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current):
            path.append(part)
            current = current[part]
        else:
            tags.append(str(part))
    return tuple(path), current, tags


def pydantic_problems(exc: pydantic.ValidationError, data: Any, source: SourceMap) -> list[Problem]:
    """Turn pydantic errors into located problems with hints, merging alternatives of unions."""
    grouped: dict[Path_, list[tuple[dict, Any, list[str]]]] = {}
    for err in exc.errors():
        loc = tuple(err["loc"])
        path, value, tags = _walk(data, loc)
        if err["type"] in ("missing", "extra_forbidden") or not tags:
            grouped.setdefault(path + (("<%s>" % err["type"], *tags) if err["type"] == "missing" else ()), []).append((err, value, tags))
        else:
            grouped.setdefault(path, []).append((err, value, tags))
    problems: list[Problem] = []
    for key, errs in grouped.items():
        path = tuple(p for p in key if not (isinstance(p, str) and p.startswith("<")))
        # A union: when one alternative got past the type check, its errors are the relevant ones.
        typed = [e for e in errs if e[0]["type"] not in _EXPECTED]
        if len(errs) > 1 and typed and len(typed) < len(errs):
            errs = typed
        if len(errs) > 1 and all(e[0]["type"] in _EXPECTED for e in errs):
            expected = " or ".join(dict.fromkeys(_EXPECTED[e[0]["type"]] for e in errs))
            problems.append(_problem(path, f"expected {expected}, got {_describe(errs[0][1])}", None, source))
            continue
        for err, value, tags in errs:
            problems.append(_one_problem(err, path, value, source))
    return problems


def _name(path: Path_) -> str:
    for part in reversed(path):
        if isinstance(part, str):
            return part
    return "value"


def _problem(path: Path_, message: str, hint: str | None, source: SourceMap, *, key: bool = False, code: str = "invalid") -> Problem:
    label = _name(path) if path else "document"
    return Problem(f"`{label}`: {message}" if path else message, source.locate(path, key=key), hint, code=code)


def _one_problem(err: dict, path: Path_, value: Any, source: SourceMap) -> Problem:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        parent = path[:-1]
        model = _model_at(parent)
        allowed = _field_names(model) if model else []
        word = str(path[-1])
        hint = did_you_mean(word, allowed) or (f"allowed keys: {', '.join(allowed)}" if allowed else None)
        return Problem(f"unknown key `{word}`", source.locate(path, key=True), hint, code="unknown-key")
    if kind == "missing":
        missing = str(err["loc"][-1])
        model = _model_at(path)
        hint = None
        if model is Step and missing == "name":
            hint = "every step needs a `name:` saying what it does"
        elif model is Playbook and missing == "runbook":
            hint = "add `runbook: NAME` at the top"
        elif model is Playbook and missing == "steps":
            hint = "add a `steps:` list"
        where = f" in `{_name(path)}`" if path else ""
        return Problem(f"missing required key `{missing}`{where}", source.locate(path), hint, code="missing-key")
    if kind in _EXPECTED:
        return _problem(path, f"expected {_EXPECTED[kind]}, got {_describe(value)}", None, source)
    if kind == "literal_error":
        return _problem(path, f"expected {ctx.get('expected', 'one of the allowed values')}, got {_describe(value)}", None, source)
    if kind == "string_pattern_mismatch":
        hints = {"id": "ids are letters, digits, `-`, `_` and `.`, starting with a letter or digit",
                 "register": "a register name is an identifier: letters, digits and `_`",
                 }
        name = _name(path)
        hint = hints.get(name)
        if len(path) >= 2 and path[0] == "secrets":
            hint = "a secret is `env:VARIABLE` or `file:PATH`"
        return _problem(path, f"invalid value {value!r}", hint, source)
    if kind in ("too_short", "list_too_short"):
        return _problem(path, "must not be empty", None, source)
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        return _problem(path, err["msg"].replace("Input should be", "must be"), None, source)
    if kind == "value_error":
        msg = str(err["msg"]).removeprefix("Value error, ")
        hint = None
        if "no action" in msg or "actions (" in msg:
            hint = f"use one of: {', '.join(ACTIONS)}"
        return Problem(f"{msg}" if path and _model_at(path) is Step else (f"`{_name(path)}`: {msg}" if path else msg),
                       source.locate(path), hint)
    return _problem(path, str(err["msg"]), None, source)


# --- playbooks -----------------------------------------------------------------------------

@dataclass
class ValidationReport:
    """The result of validating one playbook: the model (when valid) and every problem found."""

    path: str
    playbook: Playbook | None
    problems: list[Problem]

    @property
    def errors(self) -> list[Problem]:
        """Only the errors."""
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        """Only the warnings."""
        return [p for p in self.problems if p.severity == "warning"]


def parse_playbook(text: str, filename: str = "<playbook>") -> Playbook:
    """Validate playbook text into the model (structure only; see `validate_playbook` for the rest)."""
    doc = parse_yaml(text, filename)
    if not isinstance(doc.data, dict):
        raise PlaybookError([Problem(f"expected a mapping at the top of the playbook, got {_describe(doc.data)}",
                                     Location(filename, 1, 1), "a playbook starts with `runbook: NAME`, then `steps:`")])
    try:
        playbook = Playbook.model_validate(doc.data)
    except pydantic.ValidationError as exc:
        raise PlaybookError(sorted(pydantic_problems(exc, doc.data, doc.source),
                                   key=lambda p: (p.location.line or 0, p.location.column or 0))) from None
    playbook._source = doc.source
    return playbook


def validate_playbook(path: str | os.PathLike, *, known_vars: set[str] | None = None) -> ValidationReport:
    """Validate a playbook file completely: structure, step graph, templates and shell-safety lint."""
    from runbook.graph import StepGraph
    from runbook.template import check_playbook_templates

    try:
        playbook = parse_playbook(read_text(path, "playbook"), str(path))
    except PlaybookError as exc:
        return ValidationReport(str(path), None, exc.problems)
    problems: list[Problem] = []
    try:
        StepGraph.build(playbook)
    except PlaybookError as exc:
        problems.extend(exc.problems)
    problems.extend(check_playbook_templates(playbook, known_vars=known_vars))
    problems.sort(key=lambda p: (p.location.line or 0 if p.location else 0, p.location.column or 0 if p.location else 0))
    return ValidationReport(str(path), playbook if not any(p.severity == "error" for p in problems) else None, problems)


def load_playbook(path: str | os.PathLike) -> Playbook:
    """Load and fully validate a playbook file; raise PlaybookError with every error found."""
    report = validate_playbook(path, known_vars=None)
    if report.errors:
        raise PlaybookError(report.problems)
    assert report.playbook is not None
    return report.playbook


def locate_step(playbook: Playbook, step: Step, key: str | None = None) -> Location:
    """Location of a step (or one of its keys) in the playbook file."""
    source: SourceMap | None = playbook._source
    for section in ("steps", "on_failure"):
        for i, s in enumerate(getattr(playbook, section)):
            if s is step:
                path = (section, i) + ((key,) if key else ())
                return source.locate(path) if source else Location("<playbook>")
    return Location(source.file if source else "<playbook>")
