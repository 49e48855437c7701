"""A subset of Go's text/template, for the templates of matchbox data directories.

matchbox renders Butane and generic templates with Go's text/template and the option
`missingkey=error`, over a map built from the group's metadata, its selectors and the request
(`.request.query.*`, `.request.raw_query`). Existing matchbox directories use a small part of the
language; this module implements that part with the same meaning:

- actions `{{ pipeline }}` with trim markers `{{- ` and ` -}}`, comments `{{/* ... */}}`;
- `if` / `else if` / `else`, `range` (with `$v :=` or `$k, $v :=`, and `else`), `with`, `end`;
- variables (`$`, `$x := ...`, `$x = ...`), field chains (`.a.b`, `$x.a`, `(pipeline).a`);
- pipelines with `|`, string/raw-string/number/bool/nil literals;
- functions `and or not len index eq ne lt le gt ge print printf println urlquery html js`.

Anything else (`template`, `define`, `block`, methods) is a TemplateError at parse time. Like Go
with `missingkey=error`, a field that a map lacks is an error at render time, while `index` of a
missing key yields nothing (so `{{ if index . "key" }}` is the way to test for a key).

Invariant: `parse(text)` returns a Template or raises TemplateError; `Template.render(data)`
returns text or raises TemplateError. Errors carry the 1-based line of the action.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote_plus


class TemplateError(ValueError):
    def __init__(self, message: str, line: int | None = None):
        super().__init__(f"line {line}: {message}" if line else message)
        self.message = message
        self.line = line


# ---------------------------------------------------------------------------------------------
# Lexing: text and actions
# ---------------------------------------------------------------------------------------------

_TRIM_CHARS = " \t\r\n"


@dataclass
class _Chunk:
    kind: str  # "text" or "action"
    text: str
    line: int


def _split(src: str) -> list[_Chunk]:
    """Text and action chunks, with trim markers applied and comments dropped."""
    chunks: list[_Chunk] = []
    pos = 0
    line = 1
    trim_next = False
    while True:
        start = src.find("{{", pos)
        text = src[pos:] if start < 0 else src[pos:start]
        if trim_next:
            text = text.lstrip(_TRIM_CHARS)
        if start < 0:
            if text:
                chunks.append(_Chunk("text", text, line))
            return chunks
        inner_start = start + 2
        trim_before = src.startswith("-", inner_start) and src[inner_start + 1 : inner_start + 2] in (
            " ",
            "\t",
            "\r",
            "\n",
        )
        if trim_before:
            text = text.rstrip(_TRIM_CHARS)
            inner_start += 2
        if text:
            chunks.append(_Chunk("text", text, line))
        line += src.count("\n", pos, start)
        end = _find_action_end(src, inner_start, line)
        inner = src[inner_start:end]
        trim_next = False
        if inner.endswith(" -") or inner.endswith("\t-") or inner.endswith("\n-") or inner.endswith("\r-"):
            inner = inner[:-2]
            trim_next = True
        stripped = inner.strip()
        if stripped.startswith("/*"):
            if not stripped.endswith("*/"):
                raise TemplateError("unclosed comment", line)
        else:
            chunks.append(_Chunk("action", inner, line))
        line += src.count("\n", start, end + 2)
        pos = end + 2


def _find_action_end(src: str, i: int, line: int) -> int:
    """Index of the `}}` closing the action starting at i, skipping quoted strings."""
    n = len(src)
    while i < n:
        c = src[i]
        if c == '"':
            i += 1
            while i < n and src[i] != '"':
                if src[i] == "\\":
                    i += 1
                elif src[i] == "\n":
                    raise TemplateError("unterminated quoted string", line)
                i += 1
        elif c == "`":
            j = src.find("`", i + 1)
            if j < 0:
                raise TemplateError("unterminated raw string", line)
            i = j
        elif c == "}" and src.startswith("}}", i):
            return i
        i += 1
    raise TemplateError("unclosed action (missing '}}')", line)


_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<raw>`[^`]*`)
  | (?P<declare>:=)
  | (?P<assign>=)
  | (?P<pipe>\|)
  | (?P<lparen>\()
  | (?P<rparen>\))
  | (?P<comma>,)
  | (?P<number>[-+]?(?:0[xX][0-9a-fA-F_]+|(?:\d[\d_]*)?\.?\d[\d_]*(?:[eE][-+]?\d+)?))
  | (?P<variable>\$[A-Za-z0-9_]*)
  | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  """,
    re.VERBOSE,
)
_CHAIN = re.compile(r"(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


@dataclass
class _Tok:
    kind: str
    text: str


def _tokens(action: str, line: int) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    while pos < len(action):
        m = _TOKEN.match(action, pos)
        if not m:
            raise TemplateError(f"unexpected {action[pos]!r} in action", line)
        kind = m.lastgroup or ""
        text = m.group()
        pos = m.end()
        if kind == "space":
            continue
        # a field chain glued to a variable, a paren group or another chain: `$x.a`, `(..).a`
        if kind in ("variable", "rparen"):
            c = _CHAIN.match(action, pos)
            if c:
                toks.append(_Tok(kind, text))
                toks.append(_Tok("chain", c.group()))
                pos = c.end()
                continue
        toks.append(_Tok(kind, text))
    return toks


# ---------------------------------------------------------------------------------------------
# Syntax tree
# ---------------------------------------------------------------------------------------------


@dataclass
class _Field:
    names: list[str]  # [] is the dot itself


@dataclass
class _Var:
    name: str
    names: list[str]


@dataclass
class _Lit:
    value: Any


@dataclass
class _Func:
    name: str


@dataclass
class _Sub:
    pipe: _Pipe
    names: list[str]


@dataclass
class _Cmd:
    args: list[Any]


@dataclass
class _Pipe:
    decl: list[str]
    assign: bool
    cmds: list[_Cmd]
    line: int


@dataclass
class _Action:
    pipe: _Pipe


@dataclass
class _If:
    branches: list[tuple[_Pipe, list[Any]]]
    otherwise: list[Any] | None


@dataclass
class _Range:
    pipe: _Pipe
    body: list[Any]
    otherwise: list[Any] | None


@dataclass
class _With:
    pipe: _Pipe
    body: list[Any]
    otherwise: list[Any] | None


_FUNCS = {
    "and",
    "or",
    "not",
    "len",
    "index",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "print",
    "printf",
    "println",
    "urlquery",
    "html",
    "js",
}
_UNSUPPORTED = {"template", "define", "block", "break", "continue", "call", "slice"}


class _Parser:
    def __init__(self, chunks: list[_Chunk]):
        self.chunks = chunks
        self.i = 0

    def parse(self) -> list[Any]:
        body, stop = self._list(("end", "else"))
        if stop is not None:
            raise TemplateError(f"unexpected {{{{{stop[0]}}}}}", stop[1])
        return body

    def _list(self, stops: tuple[str, ...]) -> tuple[list[Any], tuple[str, int, list[_Tok]] | None]:
        out: list[Any] = []
        while self.i < len(self.chunks):
            ch = self.chunks[self.i]
            self.i += 1
            if ch.kind == "text":
                out.append(ch.text)
                continue
            toks = _tokens(ch.text, ch.line)
            if not toks:
                raise TemplateError("missing value for command", ch.line)
            head = toks[0]
            word = head.text if head.kind == "ident" else None
            if word in stops:
                return out, (word, ch.line, toks[1:])
            if word == "if":
                out.append(self._if(toks[1:], ch.line))
            elif word == "range":
                pipe = self._pipe(toks[1:], ch.line, allow_two=True)
                body, otherwise = self._body_else("range", ch.line)
                out.append(_Range(pipe, body, otherwise))
            elif word == "with":
                pipe = self._pipe(toks[1:], ch.line)
                body, otherwise = self._body_else("with", ch.line)
                out.append(_With(pipe, body, otherwise))
            elif word in ("end", "else"):
                raise TemplateError(f"unexpected {{{{{word}}}}}", ch.line)
            elif word in _UNSUPPORTED:
                raise TemplateError(f"{{{{{word}}}}} is not supported by Edge Bastion", ch.line)
            else:
                out.append(_Action(self._pipe(toks, ch.line)))
        return out, None

    def _body_else(self, what: str, line: int) -> tuple[list[Any], list[Any] | None]:
        body, stop = self._list(("end", "else"))
        if stop is None:
            raise TemplateError(f"unexpected EOF: {{{{{what}}}}} has no {{{{end}}}}", line)
        if stop[0] == "end":
            return body, None
        if stop[2]:
            raise TemplateError("{{else ...}} is only allowed after {{if}}", stop[1])
        otherwise, stop2 = self._list(("end",))
        if stop2 is None:
            raise TemplateError(f"unexpected EOF: {{{{{what}}}}} has no {{{{end}}}}", line)
        return body, otherwise

    def _if(self, toks: list[_Tok], line: int) -> _If:
        branches = [(self._pipe(toks, line), [])]
        otherwise = None
        while True:
            body, stop = self._list(("end", "else"))
            if stop is None:
                raise TemplateError("unexpected EOF: {{if}} has no {{end}}", line)
            if otherwise is not None:
                otherwise = body
            else:
                branches[-1] = (branches[-1][0], body)
            if stop[0] == "end":
                return _If(branches, otherwise)
            rest = stop[2]
            if otherwise is not None:
                raise TemplateError("{{else}} after {{else}}", stop[1])
            if rest and rest[0].kind == "ident" and rest[0].text == "if":
                branches.append((self._pipe(rest[1:], stop[1]), []))
            elif rest:
                raise TemplateError("unexpected words after {{else}}", stop[1])
            else:
                otherwise = []

    def _pipe(self, toks: list[_Tok], line: int, allow_two: bool = False) -> _Pipe:
        decl: list[str] = []
        assign = False
        # `$x :=`, `$k, $v :=` or `$x =`
        if len(toks) >= 2 and toks[0].kind == "variable":
            if toks[1].kind in ("declare", "assign"):
                decl = [toks[0].text]
                assign = toks[1].kind == "assign"
                toks = toks[2:]
            elif (
                allow_two
                and len(toks) >= 4
                and toks[1].kind == "comma"
                and toks[2].kind == "variable"
                and toks[3].kind in ("declare", "assign")
            ):
                decl = [toks[0].text, toks[2].text]
                assign = toks[3].kind == "assign"
                toks = toks[4:]
        cmds: list[_Cmd] = []
        current: list[Any] = []
        i = 0
        while i < len(toks):
            t = toks[i]
            if t.kind == "pipe":
                if not current:
                    raise TemplateError("missing command before '|'", line)
                cmds.append(_Cmd(current))
                current = []
                i += 1
                continue
            if t.kind == "lparen":
                depth, j = 1, i + 1
                while j < len(toks) and depth:
                    depth += {"lparen": 1, "rparen": -1}.get(toks[j].kind, 0)
                    j += 1
                if depth:
                    raise TemplateError("unclosed '('", line)
                sub = self._pipe(toks[i + 1 : j - 1], line)
                names: list[str] = []
                if j < len(toks) and toks[j].kind == "chain":
                    names = toks[j].text[1:].split(".")
                    j += 1
                current.append(_Sub(sub, names))
                i = j
                continue
            current.append(self._operand(t, toks, i, line))
            i += 1
            if t.kind == "variable" and i < len(toks) and toks[i].kind == "chain":
                current[-1] = _Var(t.text, toks[i].text[1:].split("."))
                i += 1
        if not current:
            raise TemplateError("missing value for command", line)
        cmds.append(_Cmd(current))
        return _Pipe(decl, assign, cmds, line)

    def _operand(self, t: _Tok, toks: list[_Tok], i: int, line: int) -> Any:
        if t.kind == "field":
            return _Field([] if t.text == "." else t.text[1:].split("."))
        if t.kind == "variable":
            return _Var(t.text, [])
        if t.kind == "string":
            try:
                return _Lit(json.loads(t.text))
            except ValueError as e:
                raise TemplateError(f"bad string literal {t.text}", line) from e
        if t.kind == "raw":
            return _Lit(t.text[1:-1])
        if t.kind == "number":
            text = t.text.replace("_", "")
            try:
                if re.fullmatch(r"[-+]?\d+", text):
                    return _Lit(int(text))
                if text.lower().lstrip("+-").startswith("0x"):
                    return _Lit(int(text, 16))
                return _Lit(float(text))
            except ValueError as e:
                raise TemplateError(f"bad number {t.text}", line) from e
        if t.kind == "ident":
            if t.text in ("true", "false"):
                return _Lit(t.text == "true")
            if t.text == "nil":
                return _Lit(None)
            if t.text in _FUNCS:
                return _Func(t.text)
            if t.text in _UNSUPPORTED:
                raise TemplateError(f"{t.text!r} is not supported by Edge Bastion", line)
            raise TemplateError(f'function "{t.text}" not defined', line)
        raise TemplateError(f"unexpected {t.text!r} in command", line)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def go_str(value: Any) -> str:
    """How fmt.Sprint prints a JSON-decoded value."""
    if value is None:
        return "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return go_float(value)
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return "map[" + " ".join(f"{k}:{_go_inner(value[k])}" for k in sorted(value)) + "]"
    if isinstance(value, (list, tuple)):
        return "[" + " ".join(_go_inner(v) for v in value) + "]"
    return str(value)


def _go_inner(value: Any) -> str:
    return "<nil>" if value is None else go_str(value)


def go_float(value: float) -> str:
    """A float64 as Go's %v prints it (JSON numbers decode to float64 in matchbox).

    %v is strconv's shortest 'g': the shortest digits that read back as the same float (Python's
    repr finds the same digits), in exponent form when the exponent is below -4 or at least 6
    (strconv formatDigits: "if precision was the shortest possible, use precision 6"), so
    1000000 prints as 1e+06 and 123456 as 123456. (The 1e21 cut-off is encoding/json's, not
    fmt's.)
    """
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    sign = "-" if math.copysign(1.0, value) < 0 else ""
    if value == 0:
        return sign + "0"
    mantissa, _, exponent = f"{abs(value)!r}".partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    point = len(whole) + int(exponent or 0) - (len(whole + fraction) - len(digits))
    digits = digits.rstrip("0")
    exp = point - 1
    if exp < -4 or exp >= 6:
        rest = f".{digits[1:]}" if len(digits) > 1 else ""
        return f"{sign}{digits[0]}{rest}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return sign + digits + "0" * (point - len(digits))
    return f"{sign}{digits[:point]}.{digits[point:]}"


def truth(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value != 0
    if isinstance(value, (str, list, tuple, dict)):
        return len(value) > 0
    return True


class _Scope:
    def __init__(self, root: Any):
        self.frames: list[dict[str, Any]] = [{"$": root}]

    def push(self) -> None:
        self.frames.append({})

    def pop(self) -> None:
        self.frames.pop()

    def declare(self, name: str, value: Any) -> None:
        self.frames[-1][name] = value

    def assign(self, name: str, value: Any, line: int) -> None:
        for frame in reversed(self.frames):
            if name in frame:
                frame[name] = value
                return
        raise TemplateError(f"undefined variable: {name}", line)

    def get(self, name: str, line: int) -> Any:
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise TemplateError(f"undefined variable: {name}", line)


def _field(value: Any, names: list[str], line: int) -> Any:
    for name in names:
        if isinstance(value, dict):
            if name not in value:
                raise TemplateError(f'map has no entry for key "{name}"', line)
            value = value[name]
        elif value is None:
            raise TemplateError(f"nil pointer evaluating .{name}", line)
        else:
            raise TemplateError(f"can't evaluate field {name} in {type(value).__name__}", line)
    return value


def _num(v: Any, line: int) -> float | str:
    if isinstance(v, bool) or v is None:
        raise TemplateError("incompatible types for comparison", line)
    if isinstance(v, (int, float, str)):
        return v
    raise TemplateError(f"invalid type for comparison: {type(v).__name__}", line)


def _basic_eq(a: Any, b: Any, line: int) -> bool:
    if isinstance(a, (dict, list)) or isinstance(b, (dict, list)):
        raise TemplateError("non-comparable type in eq", line)
    if isinstance(a, bool) != isinstance(b, bool):
        if a is None or b is None:
            return a is b
        raise TemplateError("incompatible types for comparison", line)
    return a == b


#: The widest printf field and the longest int range a template may ask for (as Jinja's sandbox
#: bounds range()): a site's template is not to make gigabytes at a request
MAX_WIDTH = 4096
MAX_RANGE = 100_000

# Go's text/template escapers, to the byte (matchbox's templates run on them): `html` as
# HTMLEscapeString, `js` as JSEscapeString, whose < > & = keep a value from closing a script
# element or starting an attribute where a template puts it in a page.
_GO_HTML = {"\0": "\ufffd", '"': "&#34;", "'": "&#39;", "&": "&amp;", "<": "&lt;", ">": "&gt;"}
_GO_JS = {"\\": "\\\\", "'": "\\'", '"': '\\"', "<": "\\u003C", ">": "\\u003E", "&": "\\u0026",
          "=": "\\u003D"}  # fmt: skip


def _go_js(c: str) -> str:
    if c in _GO_JS:
        return _GO_JS[c]
    if c < " " or c >= "\x80" and not c.isprintable():  # controls, and unprintable runes
        return f"\\u{ord(c):04X}"
    return c


_PRINTF = re.compile(r"%([-+# 0]*\d*(?:\.\d+)?)([vdsqtfgexX%])")


def _printf(fmt: str, args: list[Any], line: int) -> str:
    it = iter(args)

    def one(m: re.Match[str]) -> str:
        flags, verb = m.group(1), m.group(2)
        if verb == "%":
            return "%"
        if any(int(n) > MAX_WIDTH for n in re.findall(r"\d+", flags)):
            raise TemplateError(f"printf %{flags}{verb}: a width or precision over {MAX_WIDTH}", line)
        try:
            v = next(it)
        except StopIteration:
            return f"%!{verb}(MISSING)"
        if verb in ("v", "s"):
            return go_str(v)
        if verb == "q":
            return json.dumps(go_str(v))
        if verb == "t":
            return go_str(v)
        try:
            if verb in "dxX":
                return ("%" + flags + verb) % int(v)
            return ("%" + flags + verb) % float(v)
        except (TypeError, ValueError):
            return f"%!{verb}({go_str(v)})"

    return _PRINTF.sub(one, fmt)


def _call(name: str, args: list[Any], line: int) -> Any:
    if name == "not":
        if len(args) != 1:
            raise TemplateError("wrong number of args for not: want 1", line)
        return not truth(args[0])
    if name in ("and", "or"):
        if not args:
            raise TemplateError(f"wrong number of args for {name}", line)
        for a in args:
            if truth(a) != (name == "and"):
                return a
        return args[-1]
    if name == "len":
        if len(args) != 1:
            raise TemplateError("wrong number of args for len: want 1", line)
        if not isinstance(args[0], (str, list, tuple, dict)):
            raise TemplateError(f"len of {go_str(args[0])}", line)
        return len(args[0])
    if name == "index":
        if not args:
            raise TemplateError("wrong number of args for index", line)
        value = args[0]
        for key in args[1:]:
            if isinstance(value, dict):
                value = value.get(key) if isinstance(key, str) else None
            elif isinstance(value, (list, tuple, str)):
                if not isinstance(key, int) or isinstance(key, bool):
                    raise TemplateError("cannot index slice with non-integer", line)
                if not 0 <= key < len(value):
                    raise TemplateError(f"index out of range: {key}", line)
                value = value[key]
            elif value is None:
                raise TemplateError("index of untyped nil", line)
            else:
                raise TemplateError(f"can't index item of type {type(value).__name__}", line)
        return value
    if name in ("eq", "ne"):
        if len(args) < 2:
            raise TemplateError(f"missing argument for {name}", line)
        if name == "ne":
            if len(args) != 2:
                raise TemplateError("wrong number of args for ne: want 2", line)
            return not _basic_eq(args[0], args[1], line)
        return any(_basic_eq(args[0], b, line) for b in args[1:])
    if name in ("lt", "le", "gt", "ge"):
        if len(args) != 2:
            raise TemplateError(f"wrong number of args for {name}: want 2", line)
        a, b = _num(args[0], line), _num(args[1], line)
        if isinstance(a, str) != isinstance(b, str):
            raise TemplateError("incompatible types for comparison", line)
        return {"lt": a < b, "le": a <= b, "gt": a > b, "ge": a >= b}[name]  # type: ignore[operator]
    if name == "print":
        out = []
        for i, a in enumerate(args):
            if i and not isinstance(a, str) and not isinstance(args[i - 1], str):
                out.append(" ")
            out.append(go_str(a))
        return "".join(out)
    if name == "println":
        return " ".join(go_str(a) for a in args) + "\n"
    if name == "printf":
        if not args or not isinstance(args[0], str):
            raise TemplateError("printf needs a format string", line)
        return _printf(args[0], args[1:], line)
    if name == "urlquery":
        return quote_plus("".join(go_str(a) for a in args))
    if name == "html":
        return "".join(_GO_HTML.get(c, c) for c in "".join(go_str(a) for a in args))
    if name == "js":
        return "".join(map(_go_js, "".join(go_str(a) for a in args)))
    raise TemplateError(f'function "{name}" not defined', line)


@dataclass
class Template:
    nodes: list[Any] = field(default_factory=list)

    def render(self, data: Any) -> str:
        out: list[str] = []
        scope = _Scope(data)
        _exec(self.nodes, data, scope, out)
        return "".join(out)


def _exec(nodes: list[Any], dot: Any, scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Action):
            value = _eval_pipe(node.pipe, dot, scope)
            if not node.pipe.decl:
                out.append(go_str(value))
        elif isinstance(node, _If):
            scope.push()
            try:
                for pipe, body in node.branches:
                    if truth(_eval_pipe(pipe, dot, scope)):
                        _exec(body, dot, scope, out)
                        break
                else:
                    if node.otherwise is not None:
                        _exec(node.otherwise, dot, scope, out)
            finally:
                scope.pop()
        elif isinstance(node, _With):
            scope.push()
            try:
                value = _eval_pipe(node.pipe, dot, scope)
                if truth(value):
                    _exec(node.body, value, scope, out)
                elif node.otherwise is not None:
                    _exec(node.otherwise, dot, scope, out)
            finally:
                scope.pop()
        elif isinstance(node, _Range):
            _range(node, dot, scope, out)


def _range(node: _Range, dot: Any, scope: _Scope, out: list[str]) -> None:
    pipe = node.pipe
    value = _eval_pipe(_Pipe([], False, pipe.cmds, pipe.line), dot, scope)
    if isinstance(value, dict):
        items = [(k, value[k]) for k in sorted(value)]
    elif isinstance(value, (list, tuple)):
        items = list(enumerate(value))
    elif isinstance(value, int) and not isinstance(value, bool):
        if value > MAX_RANGE:
            raise TemplateError(f"range over {value}: more than {MAX_RANGE}", pipe.line)
        items = [(i, i) for i in range(value)]
    elif value is None:
        raise TemplateError("range can't iterate over <nil>", pipe.line)
    else:
        raise TemplateError(f"range can't iterate over {go_str(value)}", pipe.line)
    if not items:
        if node.otherwise is not None:
            _exec(node.otherwise, dot, scope, out)
        return
    for key, elem in items:
        scope.push()
        try:
            if len(pipe.decl) == 1:
                scope.declare(pipe.decl[0], elem)
            elif len(pipe.decl) == 2:
                scope.declare(pipe.decl[0], key)
                scope.declare(pipe.decl[1], elem)
            _exec(node.body, elem, scope, out)
        finally:
            scope.pop()


def _eval_pipe(pipe: _Pipe, dot: Any, scope: _Scope) -> Any:
    value: Any = None
    first = True
    for cmd in pipe.cmds:
        value = _eval_cmd(cmd, dot, scope, pipe.line, None if first else (value,))
        first = False
    if pipe.decl:
        if pipe.assign:
            scope.assign(pipe.decl[0], value, pipe.line)
        else:
            scope.declare(pipe.decl[0], value)
    return value


def _eval_cmd(cmd: _Cmd, dot: Any, scope: _Scope, line: int, piped: tuple[Any] | None) -> Any:
    head = cmd.args[0]
    if isinstance(head, _Func):
        if head.name in ("and", "or") and piped is None:
            # short-circuit: evaluate operands one at a time
            last: Any = None
            for a in cmd.args[1:]:
                last = _eval_arg(a, dot, scope, line)
                if truth(last) != (head.name == "and"):
                    return last
            if not cmd.args[1:]:
                raise TemplateError(f"wrong number of args for {head.name}", line)
            return last
        args = [_eval_arg(a, dot, scope, line) for a in cmd.args[1:]]
        if piped is not None:
            args.append(piped[0])
        return _call(head.name, args, line)
    if len(cmd.args) > 1 or piped is not None:
        raise TemplateError("can't give argument to non-function", line)
    return _eval_arg(head, dot, scope, line)


def _eval_arg(arg: Any, dot: Any, scope: _Scope, line: int) -> Any:
    if isinstance(arg, _Lit):
        return arg.value
    if isinstance(arg, _Field):
        return _field(dot, arg.names, line)
    if isinstance(arg, _Var):
        return _field(scope.get(arg.name, line), arg.names, line)
    if isinstance(arg, _Sub):
        return _field(_eval_pipe(arg.pipe, dot, scope), arg.names, line)
    if isinstance(arg, _Func):
        return _call(arg.name, [], line)
    raise TemplateError("bad argument", line)


def parse(text: str) -> Template:
    """Parse Go-template `text` or raise TemplateError."""
    if not isinstance(text, str):
        raise TemplateError("template is not text")
    return Template(_Parser(_split(text)).parse())
