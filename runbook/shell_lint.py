"""Shell-quoting lint: where each `{{ ... }}` of a shell template lands in the shell's grammar, and whether it is safe there.

`quote` makes a value one shell word by wrapping it in single quotes. That protects the value only
where the shell reads those quotes as quotes: in a plain word, outside any quoting. Inside `"..."`
they are plain characters (so `$(...)` in the value runs), inside `'...'` they end the surrounding
quotes, inside backticks a backtick in the value ends the substitution, and in a comment a newline
in the value ends the comment. `shell_findings` walks a template with a small lexer of POSIX sh
(plus the bash forms `$'...'`, `$"..."` and `((...))`) and reports every interpolation that is not
safe where it stands. The rule, and its limits, are in docs/security.md ("Shell quoting").

Pure functions only: no I/O, no rendering, nothing from the rest of the engine, so `template.py`
(the validator) and tests can call them freely.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import jinja2
from jinja2 import nodes

# Codes of a finding. `unquoted` is fixed by adding `| quote`; every other code is a place where no
# string filter makes an interpolation safe, so the expression has to move.
UNQUOTED = "unquoted"
INSIDE_QUOTES = "inside-quotes"        # '...', "...", $'...', $((...)), ${...}, here-document bodies
INSIDE_BACKTICKS = "inside-backticks"
INSIDE_COMMENT = "inside-comment"
UNSAFE_PREFIX = "unsafe-prefix"        # directly after `$` or `\`
CODES = (UNQUOTED, INSIDE_QUOTES, INSIDE_BACKTICKS, INSIDE_COMMENT, UNSAFE_PREFIX)

# The last filter of an expression decides what its output can hold.
QUOTING_FILTERS = frozenset({"quote", "quote_path"})                                  # one (or more) quoted words
NUMERIC_FILTERS = frozenset({"int", "float", "length", "count", "abs", "round"})       # a number: safe anywhere
# The author's explicit "this value is shell code on purpose" (an operator's own command line): accepted anywhere.
CODE_FILTERS = frozenset({"shell_code"})

# Shells whose `-c` operand is a script (matched on the basename, so `/bin/sh` counts too).
SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "ksh93", "mksh", "lksh", "pdksh", "ash", "yash", "posh"})
# Commands whose `-c`/`--command` argument is run through the target user's shell.
SU_COMMANDS = frozenset({"su", "runuser"})
# Shell options that take the next argument as their value.
_SHELL_ARG_OPTIONS = frozenset({"-o", "+o", "-O", "+O", "--rcfile", "--init-file"})

# Parsing only: filters are looked up when a template is compiled, not when it is parsed, so a plain
# environment reads every expression the sandboxed one accepts.
_PARSER = jinja2.Environment()


@dataclass(frozen=True)
class ShellFinding:
    """One interpolation that is not safe where it stands in a shell template."""

    code: str              # one of CODES
    expression: str        # the expression between the braces, as written: `host.name | quote`
    source: str            # the whole placeholder as written: `{{ host.name | quote }}`
    offset: int            # 0-based index of its `{{` in the template
    line: int              # 1-based line of the `{{` within the template
    column: int            # 1-based column of the `{{` within its line
    context: str           # where it stands, for people: "double quotes", "a plain word", ...
    message: str
    hint: str
    occurrence: int = 0    # how many identical placeholders come before it in the template (for locate_in_file)


# --------------------------------------------------------------------------------------------
# The template: literal text, interpolations, and what jinja removes
# --------------------------------------------------------------------------------------------

@dataclass
class _Piece:
    kind: Literal["text", "expr"]
    text: str              # literal text (kind text) or the placeholder as written (kind expr)
    offset: int
    inner: str = ""        # the expression, without braces and whitespace control


_OPEN = re.compile(r"\{([{%#])([-+]?)")
_RAW_BEGIN = re.compile(r"\{%[-+]?\s*raw\s*(-?)%\}")
_RAW_END = re.compile(r"\{%(-?)\s*endraw\s*(-?)%\}")
_STRING = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", re.DOTALL)


def _close_of(text: str, start: int, end_token: str) -> int:
    """Index of the token that ends a `{{`/`{%` tag, skipping strings and balanced brackets (as jinja's lexer does)."""
    depth = 0
    i = start
    while i < len(text):
        c = text[i]
        if c in "'\"":
            m = _STRING.match(text, i)
            i = m.end() if m else len(text)
            continue
        if depth == 0 and text.startswith(end_token, i):
            return i
        if c in "([{":
            depth += 1
        elif c in ")]}" and depth > 0:
            depth -= 1
        i += 1
    return len(text)


def _pieces(text: str) -> list[_Piece]:
    """Split a template into literal text and interpolations; statements and comments produce no text."""
    out: list[_Piece] = []
    pos, strip_next = 0, False
    while pos <= len(text):
        m = _OPEN.search(text, pos)
        data = text[pos:m.start() if m else len(text)]
        data = data.lstrip() if strip_next else data
        data = data.rstrip() if m and m.group(2) == "-" else data
        if data:
            out.append(_Piece("text", data, pos))
        if m is None:
            break
        if m.group(1) == "#":
            end = text.find("#}", m.end())
            end = len(text) if end < 0 else end
            strip_next, pos = text[end - 1:end] == "-", end + 2
            continue
        raw = _RAW_BEGIN.match(text, m.start()) if m.group(1) == "%" else None
        if raw is not None:
            pos, strip_next = _raw_block(text, raw, out)
            continue
        close = _close_of(text, m.end(), "}}" if m.group(1) == "{" else "%}")
        inner = text[m.end():close]
        strip_next = inner.endswith("-")
        if m.group(1) == "{":
            out.append(_Piece("expr", text[m.start():close + 2], m.start(), inner.removesuffix("-").strip()))
        pos = close + 2
    return out


def _raw_block(text: str, begin: re.Match[str], out: list[_Piece]) -> tuple[int, bool]:
    """Add the body of `{% raw %}...{% endraw %}` as literal text; return where to go on."""
    end = _RAW_END.search(text, begin.end())
    body = text[begin.end():end.start() if end else len(text)]
    body = body.lstrip() if begin.group(1) else body
    body = body.rstrip() if end and end.group(1) else body
    if body:
        out.append(_Piece("text", body, begin.end()))
    return (end.end(), bool(end.group(2))) if end else (len(text) + 1, False)


# --------------------------------------------------------------------------------------------
# What an expression can output
# --------------------------------------------------------------------------------------------

# Output classes, from safest to least safe: safe anywhere (a number, a boolean, `shell_code`), a constant
# string (read as part of the script), one of two constant strings, quoted words, anything at all.
_SAFE, _LITERAL, _OPAQUE, _QUOTED, _RAW = range(5)


def _classify(inner: str) -> tuple[int, str]:
    """(output class, literal text) of one expression; the literal text only for a constant string."""
    try:
        tree = _PARSER.parse("{{ " + inner + " }}")
    except jinja2.TemplateSyntaxError:
        return _RAW, ""
    outputs = list(tree.find_all(nodes.Output))
    if len(outputs) != 1 or len(outputs[0].nodes) != 1:
        return _RAW, ""
    return _class_of(outputs[0].nodes[0])


def _class_of(node: nodes.Node) -> tuple[int, str]:
    if isinstance(node, nodes.Const):
        if isinstance(node.value, str):
            return _LITERAL, node.value
        if node.value is None or isinstance(node.value, (bool, int, float)):
            return _SAFE, ""
        return _RAW, ""
    if isinstance(node, nodes.Filter):
        if node.name in NUMERIC_FILTERS or node.name in CODE_FILTERS:
            return _SAFE, ""
        return (_QUOTED if node.name in QUOTING_FILTERS else _RAW), ""
    if isinstance(node, (nodes.Compare, nodes.Not, nodes.Test)):
        return _SAFE, ""                       # True / False
    if isinstance(node, nodes.CondExpr):
        a = _class_of(node.expr1)
        b = _class_of(node.expr2) if node.expr2 is not None else (_LITERAL, "")
        if a == b:
            return a
        worst = max(a[0], b[0])
        # Two different constant strings: one of them is output, which one is not known here.
        return (_OPAQUE if worst == _LITERAL else worst), ""
    if isinstance(node, (nodes.Add, nodes.Sub, nodes.Mul, nodes.Div, nodes.FloorDiv, nodes.Mod, nodes.Pow)):
        # `+`, `*` and `%` also join and format strings: a number only when both sides are numbers.
        both = _class_of(node.left)[0] == _SAFE and _class_of(node.right)[0] == _SAFE
        return (_SAFE if both else _RAW), ""
    if isinstance(node, (nodes.Neg, nodes.Pos)):
        return (_SAFE if _class_of(node.node)[0] == _SAFE else _RAW), ""
    if isinstance(node, nodes.Concat):
        parts = [_class_of(n) for n in node.nodes]
        if all(kind == _LITERAL for kind, _ in parts):
            return _LITERAL, "".join(text for _, text in parts)
    return _RAW, ""


# --------------------------------------------------------------------------------------------
# The shell: a small lexer that knows, at every point, which quoting context it is in
# --------------------------------------------------------------------------------------------

_COMMAND_FRAMES = ("top", "cmdsub", "backtick")
_WORD_BREAK = frozenset(" \t\n;&|()<>")
_CONTEXT_NAMES = {
    "sq": "single quotes", "dq": "double quotes", "dsq": "a `$'...'` string", "arith": "arithmetic",
    "param": "a parameter expansion `${...}` inside double quotes", "heredoc": "a here-document", "comment": "a shell comment",
}
_HEREDOC_WORD = re.compile(r"(-?)[ \t]*((?:'[^'\n]*'|\"[^\"\n]*\"|\\.|[^\s;&|()<>'\"\\])+)")


@dataclass
class _Frame:
    kind: str              # top | cmdsub | backtick | sq | dq | dsq | arith | param | comment | heredoc
    prev: str = ""         # the last character read in this frame ("" at its start, "w" after a word or quote)
    depth: int = 0         # open ( in cmdsub and arith, open [ in $[...], open { in param
    closer: str = ""       # arith: `))` for $((...)) and ((...)), `]` for bash's old $[...]
    delimiter: str = ""    # heredoc
    strip_tabs: bool = False
    line: list[str] = field(default_factory=list)


class ShellLexer:
    """Reads shell text piece by piece and says which quoting context the next character would be in."""

    def __init__(self) -> None:
        self.stack: list[_Frame] = [_Frame("top")]
        self.escape_pending = False          # a backslash ended the last piece: it escapes what comes next
        self.heredocs: list[tuple[str, bool]] = []

    @property
    def frame(self) -> _Frame:
        """The innermost open context."""
        return self.stack[-1]

    def feed(self, text: str) -> None:
        """Read literal shell text."""
        i = 0
        while i < len(text):
            i = self._step(text, i)

    def word(self) -> None:
        """Read an interpolated value as an opaque run of word characters."""
        self.escape_pending = False
        if self.frame.kind == "heredoc":
            self.frame.line.append("\0")     # the line can no longer be the delimiter line
        else:
            self.frame.prev = "w"

    def where(self) -> tuple[str, str] | None:
        """(code, context) when the next character is somewhere no string filter can make safe; None in a plain word."""
        kind = self.frame.kind
        if kind == "comment":
            return INSIDE_COMMENT, _CONTEXT_NAMES[kind]
        if kind not in _COMMAND_FRAMES and not (kind == "param" and self._unquoted_parameter()):
            return INSIDE_QUOTES, _CONTEXT_NAMES[kind]
        if any(f.kind == "arith" for f in self.stack):
            # the output of a `$(...)` inside arithmetic is evaluated as arithmetic too
            return INSIDE_QUOTES, _CONTEXT_NAMES["arith"]
        if any(f.kind == "backtick" for f in self.stack):
            return INSIDE_BACKTICKS, "a backtick command substitution"
        if self.escape_pending:
            return UNSAFE_PREFIX, "directly after a backslash"
        if self.frame.prev == "$":
            return UNSAFE_PREFIX, "directly after `$`"
        return None

    def _unquoted_parameter(self) -> bool:
        """True inside `${x:-word}` that is itself unquoted: there the shell reads quotes in `word` as quotes."""
        outer = next(f for f in reversed(self.stack) if f.kind != "param")
        return outer.kind in _COMMAND_FRAMES

    # -- stepping ------------------------------------------------------------------------------

    def _push(self, kind: str, **kw: Any) -> None:
        self.stack.append(_Frame(kind, **kw))

    def _pop(self, prev: str = "w") -> None:
        if len(self.stack) > 1:
            self.stack.pop()
        self.frame.prev = prev

    def _step(self, text: str, i: int) -> int:
        if self.escape_pending:
            self.escape_pending = False
            if self.frame.kind == "heredoc":
                self.frame.line.append(text[i])
            elif text[i] != "\n":            # backslash-newline joins lines and is not a character
                self.frame.prev = "w"
            return i + 1
        kind = self.frame.kind
        if kind in _COMMAND_FRAMES:
            return self._command(text, i)
        if kind == "sq":
            end = text.find("'", i)
            if end < 0:
                return len(text)
            self._pop()
            return end + 1
        if kind == "comment":
            if text[i] == "\n":
                self._pop("\n")
                return i                     # the enclosing command frame reads the newline itself
            return i + 1
        if kind == "heredoc":
            return self._heredoc_body(text, i)
        return self._quoted(text, i)

    def _escape(self, i: int) -> int:
        """A backslash at `i`: the next character, in this piece or the next one, is escaped."""
        self.escape_pending = True
        return i + 1

    def _expansion(self, text: str, i: int) -> int | None:
        """`$(`, `$((`, `$[`, `${`, `$'`, `$"` or a backtick at `i`: open its frame and return where to go on."""
        c = text[i]
        if c == "`":
            self._push("backtick")
            return i + 1
        if c != "$":
            return None
        nxt = text[i + 1:i + 3]
        if nxt.startswith("(("):
            self._push("arith", closer="))")
            return i + 3
        if nxt.startswith("["):
            self._push("arith", closer="]")
            return i + 2
        opening = {"(": "cmdsub", "{": "param", "'": "dsq", '"': "dq"}.get(nxt[:1])
        if opening is None:
            return None
        self._push(opening)
        return i + 2

    def _command(self, text: str, i: int) -> int:
        """One step in a command context: the script itself, `$(...)` or backticks."""
        f, c = self.frame, text[i]
        if c == "\\":
            return self._escape(i)
        if f.kind == "backtick" and c == "`":
            self._pop()
            return i + 1
        if c in "'\"":
            self._push("sq" if c == "'" else "dq")
            return i + 1
        opened = self._expansion(text, i)
        if opened is not None:
            return opened
        at_word_start = f.prev == "" or f.prev in _WORD_BREAK
        if c == "#" and at_word_start:
            self._push("comment")
            return i + 1
        if c == "(" and at_word_start and text[i + 1:i + 2] == "(":
            self._push("arith", closer="))")  # `(( ... ))`: an arithmetic command
            return i + 2
        if c == "(" and f.kind == "cmdsub":
            f.depth += 1
        elif c == ")" and f.kind == "cmdsub":
            if f.depth == 0:
                self._pop()
                return i + 1
            f.depth -= 1
        elif c == "<" and text.startswith("<<", i):
            return self._heredoc_start(text, i)
        elif c == "\n" and self.heredocs:
            delimiter, strip_tabs = self.heredocs.pop(0)
            f.prev = "\n"
            self._push("heredoc", delimiter=delimiter, strip_tabs=strip_tabs)
            return i + 1
        f.prev = c
        return i + 1

    def _quoted(self, text: str, i: int) -> int:
        """One step inside "...", $'...', $((...)) or ${...}."""
        f, c = self.frame, text[i]
        if c == "\\":
            return self._escape(i)
        if f.kind == "dsq":
            if c == "'":
                self._pop()
            return i + 1
        if f.kind == "dq" and c == '"':
            self._pop()
            return i + 1
        opened = self._expansion(text, i)
        if opened is not None:
            return opened
        if f.kind != "dq" and c in "'\"":
            self._push("sq" if c == "'" else "dq")
        elif f.kind == "arith":
            return self._arith(text, i)
        elif f.kind == "param" and c == "{":
            f.depth += 1
        elif f.kind == "param" and c == "}":
            if f.depth > 0:
                f.depth -= 1
            else:
                self._pop()
        return i + 1

    def _arith(self, text: str, i: int) -> int:
        """Brackets inside arithmetic; only the closer at depth 0 ends it (a lone `)` does not: shells differ there)."""
        f, c = self.frame, text[i]
        opening, closing = ("[", "]") if f.closer == "]" else ("(", ")")
        if c == opening:
            f.depth += 1
        elif c == closing and f.depth > 0:
            f.depth -= 1
        elif text.startswith(f.closer, i):
            self._pop()
            return i + len(f.closer)
        return i + 1

    def _heredoc_start(self, text: str, i: int) -> int:
        """`<<WORD` or `<<-WORD` at `i`: queue a here-document whose body starts after this line."""
        if text.startswith("<<<", i):        # a here-string is a word, not a document
            self.frame.prev = "<"
            return i + 3
        m = _HEREDOC_WORD.match(text, i + 2)
        self.frame.prev = "<"
        if m is None:
            return i + 2
        delimiter = re.sub(r"\\(.)|['\"]", r"\1", m.group(2))
        self.heredocs.append((delimiter, m.group(1) == "-"))
        self.frame.prev = "w"
        return m.end()

    def _heredoc_body(self, text: str, i: int) -> int:
        f, c = self.frame, text[i]
        if c != "\n":
            f.line.append(c)
            return i + 1
        line = "".join(f.line)
        f.line.clear()
        if (line.lstrip("\t") if f.strip_tabs else line) == f.delimiter:
            self._pop("\n")
            if self.heredocs:
                delimiter, strip_tabs = self.heredocs.pop(0)
                self._push("heredoc", delimiter=delimiter, strip_tabs=strip_tabs)
        return i + 1


# --------------------------------------------------------------------------------------------
# Findings
# --------------------------------------------------------------------------------------------

_WHY = {
    "double quotes": "`quote` wraps the value in single quotes, and single quotes are plain characters inside "
                     "double quotes, so `$(...)`, backticks and `$VAR` in the value still run",
    "single quotes": "a `'` in the value ends the quoting and the rest of the value runs as shell code "
                     "(and `quote`'s own quotes would end the surrounding ones)",
    "a `$'...'` string": "a `'` or a backslash escape in the value ends the string and the rest runs as shell code",
    "arithmetic": "the shell expands `$(...)` in it and bash evaluates `a[$(...)]` in the value (or in the output "
                  "of a `$(...)` inside it) as code; quotes do not protect there",
    "a parameter expansion `${...}` inside double quotes": "the shell expands `$(...)` and backticks in it, whatever quotes the value brings",
    "a here-document": "its body expands `$(...)` and backticks, and a line of the value equal to the delimiter "
                       "ends the document early and runs what follows",
    "a shell comment": "a newline in the value ends the comment and the rest of the value runs as shell code",
    "a backtick command substitution": "a backtick in the value ends the substitution early, even through `| quote`",
    "directly after a backslash": "the backslash escapes the opening quote that `| quote` adds, so the value is no "
                                  "longer quoted",
    "directly after `$`": "bash reads `$'...'` as an ANSI-C string, where backslash escapes in the value can end "
                          "the quotes",
}


def _base(expression: str) -> str:
    """The expression without a trailing quoting filter: `host.name | quote` -> `host.name`."""
    return re.sub(r"\s*\|\s*(?:quote|quote_path)\s*$", "", expression)


def _hint(code: str, context: str, expression: str) -> str:
    quoted = "{{ " + _base(expression) + " | quote }}"
    number = "{{ " + _base(expression) + " | int }}"
    if code == UNQUOTED:
        return (f"write `{quoted}` (a list becomes several quoted words; `{number}` for a number) so that spaces "
                "and shell characters in the value cannot change the command")
    if context in ("double quotes", "single quotes", "a `$'...'` string"):
        return (f"move it outside the quotes and keep `| quote`: close them before it and reopen them after, "
                f"e.g. `echo \"failed on \"{quoted}` instead of `echo \"failed on {{{{ ... }}}}\"`")
    if context == "arithmetic":
        return f"use `{number}`: a number is safe anywhere"
    if context.startswith("a parameter expansion"):
        return f"assign it to a shell variable first (`v={quoted};`) and use \"$v\" inside the expansion"
    if context == "a here-document":
        return f"pass it as an argument or through `env:` instead, e.g. `printf '%s\\n' {quoted} | command`"
    if code == INSIDE_BACKTICKS:
        return f"use `$(...)` instead of backticks: `$(echo {quoted})` is safe"
    if code == INSIDE_COMMENT:
        return "take it out of the comment (a jinja comment `{# ... #}` never reaches the shell)"
    return f"separate it from the character before it, e.g. with a space or `\"\"`: `\"\"{quoted}`"


def _finding(code: str, context: str, piece: _Piece, text: str, occurrence: int) -> ShellFinding:
    shown = "{{ " + piece.inner + " }}"
    if code == UNQUOTED:
        message = (f"`{shown}` is interpolated into a shell command without `| quote`: spaces, `;`, `$(...)` "
                   "and other shell characters in the value become shell syntax")
    else:
        message = (f"`{shown}` is inside {context} in a shell command, where no filter makes it safe: "
                   f"{_WHY[context]}")
    line = text.count("\n", 0, piece.offset) + 1
    column = piece.offset - (text.rfind("\n", 0, piece.offset) + 1) + 1
    return ShellFinding(code, piece.inner, piece.text, piece.offset, line, column,
                        context, message, _hint(code, context, piece.inner), occurrence)


def shell_findings(text: str) -> list[ShellFinding]:
    """Every interpolation of a shell template that is not safe where it stands, in order.

    A template that does not parse has no findings (the template check reports its syntax error).
    """
    if "{" not in text:
        return []
    try:
        _PARSER.parse(text)
    except jinja2.TemplateSyntaxError:
        return []
    pieces = _pieces(text)
    lexer = ShellLexer()
    found: list[ShellFinding] = []
    seen: dict[str, int] = {}
    for piece in pieces:
        if piece.kind == "text":
            lexer.feed(piece.text)
            continue
        occurrence = seen.get(piece.text, 0)
        seen[piece.text] = occurrence + 1
        kind, literal = _classify(piece.inner)
        if kind == _LITERAL:
            lexer.feed(literal)              # the playbook's own text: part of the script
            continue
        where = lexer.where()
        lexer.word()
        if kind in (_SAFE, _OPAQUE) or (kind == _QUOTED and where is None):
            continue
        code, context = where if where is not None else (UNQUOTED, "a plain word")
        found.append(_finding(code, context, piece, text, occurrence))
    return found


# --------------------------------------------------------------------------------------------
# `command:` argv lists that reach a shell anyway
# --------------------------------------------------------------------------------------------

def _basename(arg: str) -> str:
    return arg.rstrip("/").rsplit("/", 1)[-1]


def _shell_script_after(argv: Sequence[Any], j: int) -> int | None:
    """Index of the script operand after a shell's options (`-c`, `-lc`, `-euo pipefail -c`, `--norc -c`)."""
    saw_c = False
    while j < len(argv):
        arg = argv[j]
        if not isinstance(arg, str) or arg in ("--", "-"):
            j += isinstance(arg, str)
            break
        if arg in _SHELL_ARG_OPTIONS:
            j += 2
            continue
        if arg.startswith("--"):
            j += 1
            continue
        if len(arg) > 1 and arg[0] in "-+":
            saw_c = saw_c or (arg[0] == "-" and "c" in arg[1:])
            j += 2 if any(o in arg[1:] for o in "oO") else 1
            continue
        break
    return j if saw_c and j < len(argv) else None


def shell_script_positions(argv: Sequence[Any]) -> list[int]:
    """Indexes of the `command:` items that a shell runs as code: SCRIPT in `[..., sh, -c, SCRIPT, ...]`.

    The shell may come after wrappers (`env`, `sudo -u x`, `timeout 5`, `find -exec`) and be a path
    (`/bin/sh`); options may be combined (`-lc`, `-ec`). `su`/`runuser ... -c CMD` count too. Items
    after SCRIPT are its `$0`, `$1`... and stay plain arguments, so they are never listed.
    """
    for i, arg in enumerate(argv):
        if not isinstance(arg, str):
            continue
        name = _basename(arg)
        if name in SHELLS:
            script = _shell_script_after(argv, i + 1)
            if script is not None:
                return [script]
        elif name in SU_COMMANDS:
            for j in range(i + 1, len(argv) - 1):
                if argv[j] in ("-c", "--command"):
                    return [j + 1]
    return []


def argv_findings(argv: Sequence[Any]) -> list[tuple[int, ShellFinding]]:
    """(item index, finding) for every unsafe interpolation in the items of an argv list that reach a shell."""
    return [(i, f) for i in shell_script_positions(argv) if isinstance(argv[i], str)
            for f in shell_findings(argv[i])]


# --------------------------------------------------------------------------------------------
# From a position in a template to a position in the YAML file
# --------------------------------------------------------------------------------------------

def locate_in_file(file_text: str, value_start: int, finding: ShellFinding,
                   value_end: int | None = None) -> tuple[int, int] | None:
    """1-based (line, column) of a finding's `{{` in the file that holds the template, or None.

    `value_start` is the character index where the YAML scalar starts (its node's start mark). The
    placeholder is searched for as written, so this works for plain, quoted and block scalars as long
    as the placeholder itself sits on one line and has no YAML escapes in it; otherwise None, and the
    caller reports the scalar's own position.
    """
    at = value_start - 1
    for _ in range(finding.occurrence + 1):
        at = file_text.find(finding.source, at + 1)
        if at < 0 or (value_end is not None and at >= value_end):
            return None
    line = file_text.count("\n", 0, at) + 1
    return line, at - (file_text.rfind("\n", 0, at) + 1) + 1
