"""YAML to validated models, with file:line:column and a hint in every error."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
import typing
from collections.abc import Callable
from typing import Any

import pydantic
import yaml

from runbook.errors import Location, PlaybookError, Problem, Problems, did_you_mean
from runbook.model import (ACTIONLESS_KEYS, ACTIONS, STRUCTURAL_KEYS, Blackout, Playbook, Step, Window,
                           action_count_problem, structure_problem)

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
        at = raw.index(b"\x00")
        line = raw.count(b"\n", 0, at) + 1
        column = at - (raw.rfind(b"\n", 0, at) + 1) + 1  # in bytes: the text before it may not decode
        raise PlaybookError([Problem(f"{what} looks binary (it contains NUL bytes), expected YAML text",
                                     Location(str(path), line, column), "name a YAML text file")])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise PlaybookError([Problem(f"{what} is not valid UTF-8 (byte 0x{raw[exc.start]:02x})",
                                     Location(str(path), line, column), "save the file as UTF-8")]) from None


# Bounds that keep hostile documents from exhausting the machine (an alias bomb expands exponentially).
MAX_NODES = 200_000
MAX_DEPTH = 200
_MERGE_TAG = "tag:yaml.org,2002:merge"
_Loader.add_implicit_resolver(_MERGE_TAG, re.compile(r"^(?:<<)$"), ["<"])

_FAST_LOADER: Any = None
if getattr(yaml, "__with_libyaml__", False):
    class _LibyamlLoader(yaml.CSafeLoader):
        """libyaml's parser and composer with `_Loader`'s resolvers: the same nodes and marks, about 3.5x sooner."""

    _LibyamlLoader.yaml_implicit_resolvers = _Loader.yaml_implicit_resolvers
    _FAST_LOADER = _LibyamlLoader


def compose_all(text: str, fast: bool = True) -> list[yaml.Node]:
    """The document's nodes: composed by libyaml; what it does not accept, PyYAML's own parser reads again.

    So a document libyaml rejects gets PyYAML's verdict and its words (explain_yaml_error knows them),
    and libyaml's limits (its nesting depth) never refuse what PyYAML reads. A 5,000-host inventory:
    0.8 s of composing instead of 2.7. What the two read differently always goes to PyYAML's parser:
    tabs (libyaml takes `k:<TAB>v`, PyYAML refuses it), a byte-order mark (libyaml's marks do not count
    it) and a last line without its newline (libyaml marks an empty value there on the next line).
    The nodes' start marks are then the same; their end marks, which runbook does not read, may not be.
    """
    if fast and _FAST_LOADER is not None and _libyaml_reads_it_alike(text):
        try:
            return list(yaml.compose_all(text, Loader=_FAST_LOADER))
        except Exception:   # unreadable to libyaml, for whatever reason: the pure parser decides
            pass
    return list(yaml.compose_all(text, Loader=_Loader))


def _libyaml_reads_it_alike(text: str) -> bool:
    return text.endswith("\n") and "\t" not in text and "\ufeff" not in text


class _TooBig(Exception):
    """Raised inside the converter when a document exceeds MAX_NODES or MAX_DEPTH."""

    def __init__(self, message: str, mark: yaml.Mark | None):
        super().__init__(message)
        self.message = message
        self.mark = mark


def _mark_location(filename: str, mark: yaml.Mark | None) -> Location:
    return Location(filename, mark.line + 1, mark.column + 1) if mark is not None else Location(filename, 1, 1)


def _offset_location(filename: str, text: str, offset: int) -> Location:
    """Line and column of a character offset into `text`."""
    offset = max(0, min(offset, len(text)))
    line = text.count("\n", 0, offset) + 1
    return Location(filename, line, offset - (text.rfind("\n", 0, offset) + 1) + 1)


def parse_yaml(text: str, filename: str, error_cls: type[PlaybookError] = PlaybookError) -> LocatedDocument:
    """Parse one YAML document into data plus a SourceMap; duplicate keys are errors."""
    source = SourceMap(filename, text=text)
    try:
        nodes = compose_all(text)
    except yaml.MarkedYAMLError as exc:
        message, mark, hint = explain_yaml_error(exc, text)
        raise error_cls([Problem(f"malformed YAML: {message}", _mark_location(filename, mark), hint)]) from None
    except yaml.reader.ReaderError as exc:
        # Raised for control characters; it carries an offset instead of a mark.
        raise error_cls([Problem(f"malformed YAML: unacceptable character #x{exc.character:04x} ({exc.reason})"
                                 if isinstance(exc.character, int) else f"malformed YAML: {exc.reason}",
                                 _offset_location(filename, text, exc.position),
                                 "remove the control character, or write it as an escape inside double quotes")]) from None
    except yaml.YAMLError as exc:
        raise error_cls([Problem(f"malformed YAML: {exc}", Location(filename, 1, 1))]) from None
    except RecursionError:
        raise error_cls([Problem("malformed YAML: the document is nested too deeply", Location(filename, 1, 1),
                                 f"a playbook needs far fewer than {MAX_DEPTH} levels of nesting")]) from None
    if not nodes or nodes[0] is None:
        raise error_cls([Problem("the file is empty, expected a YAML mapping", Location(filename, 1, 1),
                                 "start with `runbook: NAME` and a list of `steps:`")])
    if len(nodes) > 1:
        raise error_cls([Problem("the file holds several YAML documents, expected one",
                                 _mark_location(filename, nodes[1].start_mark), "remove the `---` separator")])
    problems = Problems()
    converter = _Converter(source, problems)
    try:
        data = converter.convert(nodes[0], ())
    except _TooBig as exc:
        raise error_cls([Problem(exc.message, _mark_location(filename, exc.mark),
                                 "simplify the document; anchors and aliases may not expand without bound")]) from None
    except RecursionError:
        raise error_cls([Problem("the document is nested too deeply", Location(filename, 1, 1))]) from None
    problems.raise_if_errors(error_cls)
    return LocatedDocument(data, source)


_INDENT_HINT = "give it the same indentation (in spaces) as the keys or `-` items it belongs with"


def explain_yaml_error(exc: yaml.MarkedYAMLError, text: str) -> tuple[str, yaml.Mark | None, str]:
    """PyYAML's complaint in plain words, where the mistake is (an unclosed quote: where it opens), and a hint.

    The parser's own words follow in parentheses, for searching; the explanation says what to do.
    """
    problem, context = str(exc.problem or ""), str(exc.context or "")
    at, opened = exc.problem_mark or exc.context_mark, exc.context_mark or exc.problem_mark
    jargon = f" (YAML parser: {problem or context or 'cannot parse'})"
    lines = text.splitlines()

    def line_of(mark: yaml.Mark | None) -> str:
        return lines[mark.line] if mark is not None and mark.line < len(lines) else ""

    if "quoted scalar" in context and "end of stream" in problem:
        quote = line_of(opened)[opened.column] if opened is not None and opened.column < len(line_of(opened)) else "quote"
        return (f"the {quote} opened here is never closed{jargon}", opened,
                "close the value with the same quote on this line; inside '...' write a ' as '', inside \"...\" write \\\"")
    if "cannot start any token" in problem:
        char = problem.split("'")[1] if problem.count("'") >= 2 else "?"
        if char in ("\t", "\\t"):
            return f"a tab indents this line; YAML allows only spaces{jargon}", at, "YAML does not allow tabs for indentation; use spaces"
        return (f"a plain value cannot start with '{char}', which YAML reserves{jargon}", at,
                f"quote the whole value: '{_clip(line_of(at)[at.column:].strip()) if at else char}'")
    if "while scanning an alias" in context:
        return (f"`*` at the start of a value refers to an anchor (`&name`){jargon}", opened,
                f"quote the whole value: '{_clip(line_of(opened)[opened.column:].strip()) if opened else '*'}'")
    if problem.startswith("found undefined alias"):
        name = problem.split("'")[1] if problem.count("'") >= 2 else "?"
        return (f"`*{name}` refers to an anchor `&{name}` that is not defined above it{jargon}", at,
                f"define `&{name}` earlier in the file, or quote the value if `*` is meant literally")
    if "flow mapping" in context or "flow sequence" in context:
        pair = "{}" if "mapping" in context else "[]"
        return (f"the `{pair[0]}` opened here is not closed with `{pair[1]}` (or lacks a comma between items){jargon}",
                opened, "close it on the same line, separate items with `, `, or write it as indented lines")
    if "could not find expected ':'" in problem:
        return (f"this line is not `key: value`: there is no `: ` after the key{jargon}", opened,
                "add the colon, or quote a long value / continue it with `>-` on the line of its key")
    if "block scalar" in context:
        return (f"text follows `|` or `>` on the same line; a block value starts on the next line{jargon}", at,
                "move the text to the next line, indented deeper than the key")
    if problem == "mapping values are not allowed here":
        return _explain_colon(at, lines, jargon)
    if "expected <block end>" in problem or "expected <block mapping start>" in problem:
        before = line_of(at)[:at.column].rstrip() if at else ""
        if before.endswith(("'", '"')) and "<scalar>" in problem:
            start = _quoted_start(text, at)
            if start is not None and at is not None and start.line < at.line:
                # A quote left open on an earlier line was closed by a quote meant as text here.
                return (f"the {before[-1]} opened here is closed only on line {at.line + 1}, by a {before[-1]} that "
                        f"seems meant as text{jargon}", start,
                        "close the value on its own line; inside '...' write a ' as '', inside \"...\" write \\\"")
            return (f"text follows the closing quote of a quoted value{jargon}", at,
                    "quote the whole value, or leave the quotes out")
        if problem.endswith("found '-'"):
            return (f"a `-` list item where the lines before it are `key: value` pairs{jargon}", at,
                    "indent the list under the key it belongs to, or write the item as `key: value`")
        return (f"this line is indented differently from the lines before it, so YAML cannot tell "
                f"which mapping or list it belongs to{jargon}", at, _INDENT_HINT)
    if "did not find expected" in problem:
        return f"the indentation does not match the lines before it{jargon}", at, _INDENT_HINT
    return (problem or context or "cannot parse"), at, "check the indentation and quoting around this line"


def _clip(text: str, limit: int = 60) -> str:
    """A piece of the author's line for a hint: short, and one line."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _quoted_start(text: str, at: yaml.Mark | None) -> yaml.Mark | None:
    """Where the last quoted value before `at` opens (from the scanner's tokens, which stop at the error)."""
    start = None
    try:
        for token in yaml.scan(text, Loader=_Loader):
            if at is not None and token.start_mark.index >= at.index:
                break
            if isinstance(token, yaml.ScalarToken) and token.style in ("'", '"'):
                start = token.start_mark
    except yaml.YAMLError:
        pass   # the scanner met the same mistake: the tokens before it are what we need
    return start


def _explain_colon(at: yaml.Mark | None, lines: list[str], jargon: str) -> tuple[str, yaml.Mark | None, str]:
    """`mapping values are not allowed here`: a `: ` inside a plain value, or a key indented too deep."""
    line = lines[at.line] if at is not None and at.line < len(lines) else ""
    previous = next((ln for ln in reversed(lines[:at.line]) if ln.strip()), "") if at is not None else ""
    indent, prev_indent = len(line) - len(line.lstrip()), len(previous) - len(previous.lstrip(" -"))
    key = line.strip().split(":", 1)[0]
    if at is not None and indent > prev_indent and key.replace("_", "").isalnum() and line.strip().startswith(key + ":"):
        start = yaml.Mark(at.name, at.index - (at.column - indent), at.line, indent, at.buffer, at.pointer)
        return (f"`{key}:` is indented deeper than the key above it, so YAML reads this line as the "
                f"continuation of that key's value{jargon}", start, f"align `{key}:` with the keys above it")
    value = _clip(line.split(": ", 1)[1].strip() if ": " in line else line.strip())
    return (f"an unquoted value contains `: ` (a colon and a space), which YAML reads as a new key{jargon}", at,
            f"quote the whole value: '{value}'" if "'" not in value else f'quote the whole value: "{value}"')


class _Converter:
    """Turns composed YAML nodes into Python data, recording positions, duplicate keys and bad values."""

    def __init__(self, source: SourceMap, problems: Problems):
        self.source = source
        self.problems = problems
        self.loader = _Loader("")
        self.count = 0
        self.active: set[int] = set()  # nodes being converted: an alias back to one of them is a cycle

    def convert(self, node: yaml.Node, path: Path_, depth: int = 0) -> Any:
        """Convert one node (and its children) at `path`."""
        self.count += 1
        if self.count > MAX_NODES:
            raise _TooBig(f"the document is too large (more than {MAX_NODES} values once aliases are expanded)",
                          node.start_mark)
        if depth > MAX_DEPTH:
            raise _TooBig(f"the document is nested more than {MAX_DEPTH} levels deep", node.start_mark)
        self.source.values[path] = node.start_mark
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            if id(node) in self.active:
                self.problems.add("an alias refers to a node that contains it (a recursive structure)",
                                  self.source.locate(path), "aliases must not refer to their own ancestors")
                return None
            self.active.add(id(node))
            try:
                if isinstance(node, yaml.MappingNode):
                    return self._mapping(node, path, depth)
                return [self.convert(item, path + (i,), depth + 1) for i, item in enumerate(node.value)]
            finally:
                self.active.discard(id(node))
        try:
            return self.loader.construct_object(node, deep=True)
        except Exception as exc:  # yaml, ValueError, KeyError, AttributeError...: all a bad scalar
            reason = exc.problem if isinstance(exc, yaml.MarkedYAMLError) and exc.problem else f"cannot read {node.value!r} as {node.tag}"
            self.problems.add(f"invalid value: {reason}", self.source.locate(path),
                              "quote the value to make it a plain string")
            return None

    def _mapping(self, node: yaml.MappingNode, path: Path_, depth: int) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        merges: list[tuple[yaml.Node, yaml.Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merges.append((key_node, value_node))
                continue
            key = self.convert(key_node, path + ("<key>",), depth + 1)
            if isinstance(key, (dict, list)):
                self.problems.add("a mapping key must be a plain value", self.source.locate(path + ("<key>",)))
                continue
            if key in out:
                first = self.source.keys.get(path + (key,))
                where = f" (first defined at line {first.line + 1})" if first else ""
                self.problems.add(f"duplicate key `{key}`{where}", _mark_location(self.source.file, key_node.start_mark),
                                  "remove one of them; YAML keeps only the last, which hides mistakes",
                                  code="duplicate-key")
                continue
            self.source.keys[path + (key,)] = key_node.start_mark
            out[key] = self.convert(value_node, path + (key,), depth + 1)
        self.source.values.pop(path + ("<key>",), None)
        # `<<: *defaults` (or a list of them): keys written in the mapping win, then earlier merges win.
        for _key_node, value_node in merges:
            sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for src in sources:
                if not isinstance(src, yaml.MappingNode):
                    self.problems.add("`<<` merges only mappings (or a list of mappings)",
                                      _mark_location(self.source.file, src.start_mark))
                    continue
                # Convert into a scratch map, then keep the positions of the keys that are actually merged.
                outer, scratch = self.source, SourceMap(self.source.file, text="")
                self.source = scratch
                try:
                    merged = self.convert(src, (), depth + 1)
                finally:
                    self.source = outer
                taken = set()
                for k, v in merged.items():
                    if k not in out:
                        out[k] = v
                        taken.add(k)
                for table, scratch_table in ((outer.values, scratch.values), (outer.keys, scratch.keys)):
                    for p_, m in scratch_table.items():
                        if p_ and p_[0] in taken:
                            table[path + p_] = m
        return out


def load_document(path: str | os.PathLike, error_cls: type[PlaybookError] = PlaybookError, what: str = "file") -> LocatedDocument:
    """Read and parse a YAML file with positions."""
    return parse_yaml(read_text(path, what), str(path), error_cls)


# --- pydantic errors -> located problems -------------------------------------------------

_EXPECTED = {
    "string_type": "a string", "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "bool_type": "true or false", "bool_parsing": "true or false", "float_type": "a number", "float_parsing": "a number",
    "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
}

# Ansible's spelling of keys runbook spells differently: the hint says what to write instead.
ANSIBLE_KEYS = {
    "become": "runbook spells it `sudo`: `sudo: true` runs as root (or the host's become_user), `sudo: USER` as USER",
    "become_user": "runbook spells `become: true` + `become_user: USER` as one key: `sudo: USER`",
    "become_method": "runbook always becomes another user with sudo: remove it and use `sudo: true` or `sudo: USER`",
}

_SECTION_MODELS: dict[str, type[pydantic.BaseModel]] = {"window": Window, "blackout": Blackout}


def _section_model(name: str) -> type[pydantic.BaseModel] | None:
    """The model of a mapping under key `name`: a playbook section, or an action's spec model."""
    if name in _SECTION_MODELS:
        return _SECTION_MODELS[name]
    if name in ACTIONS:
        return _spec_model(ACTIONS.get(name).spec_type)
    return None


def _spec_model(spec_type: Any) -> type[pydantic.BaseModel] | None:
    """The pydantic model inside an action's spec type (unwrapping Annotated), if it is one."""
    inner = typing.get_args(spec_type)[0] if typing.get_origin(spec_type) is typing.Annotated else spec_type
    return inner if isinstance(inner, type) and issubclass(inner, pydantic.BaseModel) else None


def _model_at(path: Path_) -> type[pydantic.BaseModel] | None:
    """The model class that validates the mapping at `path` of a playbook."""
    if not path:
        return Playbook
    if len(path) == 2 and path[0] in ("steps", "on_failure") and isinstance(path[1], int):
        return Step
    if isinstance(path[-1], int) and (len(path) == 1 or path[-2] in STEP_LISTS):
        return Step   # a step inside a block (or at the top of an included file)
    for part in reversed(path):
        if isinstance(part, str):
            return _section_model(part)
    return None


def _field_names(model: type[pydantic.BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _describe(value: Any) -> str:
    kinds = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list", dict: "a mapping",
             type(None): "nothing (null)"}
    shown = repr(value) if isinstance(value, (str, int, float, bool)) and len(repr(value)) < 40 else ""
    return f"{kinds.get(type(value), type(value).__name__)}{' ' + shown if shown else ''}"


@dataclass
class _Err:
    """One pydantic error mapped onto the document: path to the value, the value, and union branch tags."""

    err: dict
    path: Path_
    value: Any
    tags: list[str]  # union branch names met on the way, outermost first
    tag_paths: list[Path_]  # the document path at which each of those branches was chosen
    missing: str | None = None

    @property
    def root(self) -> Path_:
        """Where the outermost union sits (the error's own path when there is none)."""
        return self.tag_paths[0] if self.tag_paths else self.path


def _walk(data: Any, loc: tuple) -> tuple[Path_, Any, list[str], list[Path_]]:
    """Split a pydantic loc into the document path, the value there, union tags and where each tag sits."""
    path: list[Any] = []
    tags: list[str] = []
    tag_paths: list[Path_] = []
    current = data
    for part in loc:
        if isinstance(current, dict) and part not in current and isinstance(part, str):
            # pydantic names non-string keys by their str(): map back to the real key
            part = next((k for k in current if not isinstance(k, str) and str(k) == part), part)
        if isinstance(current, dict) and part in current or isinstance(current, list) and isinstance(part, int) and not isinstance(part, bool) and 0 <= part < len(current):
            path.append(part)
            current = current[part]
        elif part == "[key]":
            continue  # a bad mapping key: the error is about the key at `path`
        else:
            tags.append(str(part))
            tag_paths.append(tuple(path))
    return tuple(path), current, tags, tag_paths


def _is_type_error(e: _Err) -> bool:
    """True when a union branch failed only because the value had the wrong type for it."""
    return e.err["type"] in _EXPECTED and e.path == e.root


def pydantic_problems(exc: pydantic.ValidationError, data: Any, source: SourceMap, root: Path_ = ()) -> list[Problem]:
    """Turn pydantic errors into located problems with hints, reporting each union failure once.

    `root`: where in `data` the validated value sits (an included file's steps are validated one by one).
    """
    entries: list[_Err] = []
    for err in exc.errors():
        loc = tuple(root) + tuple(err["loc"])
        missing = None
        if err["type"] == "missing" and loc:
            missing, loc = str(loc[-1]), loc[:-1]
        path, value, tags, tag_paths = _walk(data, loc)
        entries.append(_Err(dict(err), path, value, tags, tag_paths, missing))
    problems: list[Problem] = []
    for e in _resolve_unions(entries):
        problems.append(_one_problem(e, source))
    # The same message at the same place says nothing new (e.g. one bad value seen by two union branches).
    unique: dict[tuple, Problem] = {}
    for p in problems:
        unique.setdefault((p.message, p.location), p)
    return list(unique.values())


def _resolve_unions(entries: list[_Err]) -> list[_Err]:
    """Keep, for every union, only the errors of the branch the author evidently meant."""
    plain = [e for e in entries if not e.tags]
    unions: dict[Path_, list[_Err]] = {}
    for e in entries:
        if e.tags:
            unions.setdefault(e.root, []).append(e)
    out = list(plain)
    for root, errs in unions.items():
        branches: dict[str, list[_Err]] = {}
        for e in errs:
            branches.setdefault(e.tags[0], []).append(e)
        # A branch that got past the type check (its errors are deeper or about the value) is the one meant.
        deeper = [b for b, es in branches.items() if not all(_is_type_error(e) for e in es)]
        if deeper:
            chosen = branches[deeper[0]]
            out.extend(_resolve_unions([_Err(e.err, e.path, e.value, e.tags[1:], e.tag_paths[1:], e.missing)
                                        for e in chosen]))
            continue
        first = errs[0]
        expected = " or ".join(dict.fromkeys(_EXPECTED[e.err["type"]] for e in errs))
        merged = dict(first.err, type="union_type", msg=f"expected {expected}, got {_describe(first.value)}")
        out.append(_Err(merged, root, first.value, [], []))
    return out


def _name(path: Path_) -> str:
    for part in reversed(path):
        if isinstance(part, str):
            return part
    return "value"


def _problem(path: Path_, message: str, hint: str | None, source: SourceMap, *, key: bool = False, code: str = "invalid") -> Problem:
    label = _name(path) if path else "document"
    return Problem(f"`{label}`: {message}" if path else message, source.locate(path, key=key), hint, code=code)


def _one_problem(e: _Err, source: SourceMap) -> Problem:
    err, path, value = e.err, e.path, e.value
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "union_type":
        return _problem(path, err["msg"], None, source)
    if kind == "invalid_key" or (err["loc"] and err["loc"][-1] == "[key]"):
        return Problem(f"mapping keys must be strings, got {_describe(path[-1] if path else value)}",
                       source.locate(path, key=True), "quote the key", code="invalid-key")
    if kind == "bool_word":
        return _problem(path, err["msg"], ctx.get("hint"), source)
    if kind == "sudo_word":
        return Problem(err["msg"], source.locate(path), ctx.get("hint"))
    if kind == "extra_forbidden":
        parent = path[:-1]
        model = _model_at(parent)
        allowed = _field_names(model) if model else []
        word = str(path[-1]) if path else "?"
        hint = ANSIBLE_KEYS.get(word) or did_you_mean(word, allowed) or (
            f"allowed keys: {', '.join(allowed)}" if allowed else None)
        return Problem(f"unknown key `{word}`", source.locate(path, key=True), hint, code="unknown-key")
    if kind == "missing":
        missing = e.missing or "?"
        model = _model_at(path)
        hint = None
        if model is Step and missing == "name":
            hint = "every step needs a `name:` saying what it does"
        elif model is Playbook and missing == "runbook":
            hint = "add `runbook: NAME` at the top"
        elif model is Playbook and missing == "steps":
            hint = "add a `steps:` list"
        elif model is not None:
            hint = f"add `{missing}:`"
        where = f" in `{_name(path)}`" if path and not isinstance(path[-1], int) else (
            f" in step {path[-1] + 1}" if path else "")
        return Problem(f"missing required key `{missing}`{where}", source.locate(path), hint, code="missing-key")
    if kind in _EXPECTED:
        return _problem(path, f"expected {_EXPECTED[kind]}, got {_describe(value)}", None, source)
    if kind == "literal_error":
        return _problem(path, f"expected {ctx.get('expected', 'one of the allowed values')}, got {_describe(value)}", None, source)
    if kind == "string_pattern_mismatch":
        hints = {"id": "ids are letters, digits, `-`, `_` and `.`, starting with a letter or digit",
                 "port": "a port number 1-65535, or a template that renders to one, like '{{ app_port }}'",
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
        if isinstance(value, dict):   # a misused block/rescue/include: the raw check points at the key, with a hint
            same = [p for p in raw_action_problems(value, path, source) if p.message == msg]
            if same:
                return same[0]
        hint = None
        if "no action" in msg or "actions (" in msg:
            hint = f"use one of: {', '.join(ACTIONS.names())}"
        if "actions (" in msg and isinstance(value, dict):
            # point at the second action: the first one is the step's action, the second is the surprise
            present = [k for k in value if k in ACTIONS]
            if len(present) > 1:
                return Problem(msg, source.locate(path + (present[1],), key=True), hint)
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
    summary: str | None = None     # set for files that are not playbooks (windows.yml)

    @property
    def errors(self) -> list[Problem]:
        """Only the errors."""
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        """Only the warnings."""
        return [p for p in self.problems if p.severity == "warning"]


def parse_playbook(text: str, filename: str = "<playbook>", reader: Callable[[Path, str], str] | None = None) -> Playbook:
    """Validate playbook text into the composed model (structure only; see `validate_playbook` for the rest).

    `reader` reads the files it includes (default: from disk; a plan passes the texts it kept).
    """
    doc = parse_yaml(text, filename)
    if not isinstance(doc.data, dict):
        raise PlaybookError([Problem(f"expected a mapping at the top of the playbook, got {_describe(doc.data)}",
                                     doc.source.locate(()), "a playbook starts with `runbook: NAME`, then `steps:`")])
    try:
        playbook = Playbook.model_validate(doc.data)
    except pydantic.ValidationError as exc:
        # pydantic skips the one-action check of a step whose fields are invalid: check it on the raw data.
        found = _action_problems(doc.data, doc.source) + pydantic_problems(exc, doc.data, doc.source)
        unique = list({(p.message, p.location): p for p in found}.values())
        raise PlaybookError(sorted(unique, key=lambda p: (p.location.line or 0, p.location.column or 0) if p.location else (0, 0))) from None
    playbook._source = doc.source
    from runbook.compose import compose

    return compose(playbook, doc.source, reader)


# Keys holding lists of steps (a step's `block`/`rescue`/`always`, a playbook's sections).
STEP_LISTS = ("steps", "on_failure", "handlers", "block", "rescue", "always")


def _action_problems(data: dict, source: SourceMap) -> list[Problem]:
    """No-action and several-actions problems of every step mapping, from the raw document."""
    found = []
    for section in ("steps", "on_failure", "handlers"):
        steps = data.get(section)
        if not isinstance(steps, list):
            continue
        for i, raw in enumerate(steps):
            found.extend(raw_action_problems(raw, (section, i), source))
    return found


def raw_action_problems(raw: Any, path: Path_, source: SourceMap) -> list[Problem]:
    """The action-count and structure problems of one raw step mapping (and the steps of its blocks)."""
    if not isinstance(raw, dict):
        return []
    structure = [k for k in STRUCTURAL_KEYS if isinstance(raw.get(k), list if k == "block" else str)]
    present = [a for a in ACTIONS if raw.get(a) is not None and a not in structure]
    parts = [k for k in ("rescue", "always") if raw.get(k) is not None]
    message = structure_problem(present, structure, parts)
    if message:
        at = path + ((parts[0],) if parts and structure != ["block"] else (present[0],) if present else ())
        return [Problem(message, source.locate(at, key=True), "a `block:` step holds `block:`, `rescue:`, `always:` and "
                        "keys for every step inside (when, sudo, vars, tags); actions go in the steps")]
    if structure or any(raw.get(k) for k in ACTIONLESS_KEYS):
        found = []
        for part in ("block", "rescue", "always"):
            if isinstance(raw.get(part), list) and "block" in structure:
                for i, inner in enumerate(raw[part]):
                    found.extend(raw_action_problems(inner, path + (part, i), source))
        return found
    message = action_count_problem(present)
    if message:
        at = path + ((present[1],) if len(present) > 1 else ())
        return [Problem(message, source.locate(at, key=True), f"use one of: {', '.join(ACTIONS.names())}")]
    return []


def validate_playbook(path: str | os.PathLike, *, known_vars: set[str] | None = None,
                      check_window: bool = True) -> ValidationReport:
    """Validate a playbook file completely: structure, step graph, templates, shell-safety lint and its window."""
    from runbook.graph import StepGraph
    from runbook.checks import check_playbook_templates

    try:
        playbook = parse_playbook(read_text(path, "playbook"), str(path))
    except PlaybookError as exc:
        return ValidationReport(str(path), None, exc.problems)
    problems: list[Problem] = []
    try:
        StepGraph.build(playbook)
    except PlaybookError as exc:
        problems.extend(exc.problems)
    if check_window and playbook.window is not None:
        problems.extend(_window_problems(playbook, path))
    problems.extend(check_playbook_templates(playbook, known_vars=known_vars))
    problems.sort(key=lambda p: (p.location.line or 0 if p.location else 0, p.location.column or 0 if p.location else 0))
    return ValidationReport(str(path), playbook if not any(p.severity == "error" for p in problems) else None, problems)


def _window_problems(playbook: Playbook, path: str | os.PathLike) -> list[Problem]:
    """A named window must exist in windows.yml (as `run` requires), and its definition must hold."""
    from runbook.errors import ValidationError
    from runbook.window import resolve_window

    try:
        resolve_window(playbook, path)
    except ValidationError as exc:   # WindowError, or the windows.yml itself does not load
        return exc.problems
    return []


def load_playbook(path: str | os.PathLike) -> Playbook:
    """Load and fully validate a playbook file; raise PlaybookError with every error found.

    The window is resolved where it is used (`run`/`apply` refuse an unknown one before starting),
    so loading stays free of windows.yml and croniter.
    """
    report = validate_playbook(path, known_vars=None, check_window=False)
    if report.errors:
        raise PlaybookError(report.problems)
    assert report.playbook is not None
    return report.playbook


def locate_step(playbook: Playbook, step: Step, key: str | None = None) -> Location:
    """Location of a step (or one of its keys) in the file it is written in (the playbook, an include, a role)."""
    from runbook.compose import locate

    return locate(playbook, step, *((key,) if key else ()))
