"""YAML loading that remembers where things are, so errors can name the line.

`load(text, name)` returns plain-looking Python data in which every mapping is a `LineDict` and
every sequence a `LineList`: they behave as dict and list and also know the line of themselves,
of each key and of each item. Any YAML problem, and a key given twice in one mapping (which
PyYAML would silently accept), raises YamlError naming the file and the line.

Aliases are bounded. PyYAML shares an anchored node between its aliases, so a "billion laughs"
file (nine levels of nine aliases each: 387 million strings from 1 KB) loads at once, and then
whoever walks the data (validation, rendering, JSON) expands it to gigabytes; so does a file of
a few thousand aliases of one long string. So the composed document is measured as it would be
expanded (each alias counted as the whole of its anchor's node: its nodes, and the characters
of its scalars) before anything is constructed, a few microseconds a node, with memory for the
composed nodes only, and refused when it expands to more than MAX_EXPANDED_NODES nodes or
MAX_EXPANDED_CHARS characters, or ALIAS_GROWTH times its own if that is more (a document
without aliases is never refused for its size: what it holds, it holds).
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml


class YamlError(ValueError):
    def __init__(self, name: str, line: int | None, problem: str):
        where = f"{name}:{line}" if line else name
        super().__init__(f"{where}: {problem}")
        self.name = name
        self.line = line
        self.problem = problem


class LineDict(dict):
    line: int = 0
    key_lines: dict[Any, int]
    value_lines: dict[Any, int]

    def line_of(self, key: Any) -> int:
        """The line of `key`'s value, or of the mapping itself when the key is absent."""
        return self.value_lines.get(key, self.key_lines.get(key, self.line))


class LineList(list):
    line: int = 0
    item_lines: list[int]

    def line_of(self, index: int) -> int:
        try:
            return self.item_lines[index]
        except IndexError:
            return self.line


#: What a document may expand to through its aliases, in nodes and in characters of its
#: scalars (a large site is thousands of nodes and a few hundred KB; the alias bomb above is 387
#: million nodes), unless ALIAS_GROWTH times its own nodes or characters is more.
MAX_EXPANDED_NODES = 100_000
MAX_EXPANDED_CHARS = 16 * 1024 * 1024
ALIAS_GROWTH = 10


def expansion(root: yaml.Node) -> tuple[float, float, int, int]:
    """(nodes, characters of scalars) that `root` stands for with every alias expanded, and
    (nodes, characters) of the document itself, each node once. A node reached again through an
    alias counts again (from a memo: exact, however large); a node that contains an alias of
    itself expands for ever (infinity)."""
    sizes: dict[int, tuple[int, int]] = {}
    own_nodes = own_chars = 0
    open_: set[int] = set()  # the nodes on the path being walked
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        children = _children(node)
        if children_done:
            open_.discard(key)
            chars = len(node.value) if isinstance(node, yaml.ScalarNode) else 0
            own_nodes += 1
            own_chars += chars
            sizes[key] = (1 + sum(sizes[id(c)][0] for c in children),
                          chars + sum(sizes[id(c)][1] for c in children))  # fmt: skip
            continue
        if key in sizes:
            continue
        if any(id(c) in open_ or c is node for c in children):
            return math.inf, math.inf, own_nodes, own_chars
        open_.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return (*sizes[id(root)], own_nodes, own_chars)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _may_alias(stream: Any) -> bool:
    """Whether a document could hold an alias at all: not without a `*` (most files, and every
    rendered config; the walk below was a third of loading a site of 1,000 machines)."""
    if isinstance(stream, str):
        return "*" in stream
    if isinstance(stream, bytes):
        return b"*" in stream
    return True


def _bounded(node: yaml.Node | None) -> yaml.Node | None:
    """`node`, a composed document, unless its aliases expand past the bounds above."""
    if node is None:
        return node
    nodes, chars, own_nodes, own_chars = expansion(node)
    max_nodes = max(MAX_EXPANDED_NODES, ALIAS_GROWTH * own_nodes)
    max_chars = max(MAX_EXPANDED_CHARS, ALIAS_GROWTH * own_chars)
    if nodes > max_nodes or chars > max_chars:
        what = (f"more than {max_nodes:,} values" if nodes > max_nodes
                else f"more than {max_chars:,} characters")  # fmt: skip
        raise yaml.composer.ComposerError(
            None, None,
            f"its aliases expand to {what} (an alias bomb, or an alias inside its own "
            "anchor); refused",
            node.start_mark,
        )  # fmt: skip
    return node


class _Loader(yaml.SafeLoader):
    def __init__(self, stream: Any):
        super().__init__(stream)
        self.may_alias = _may_alias(stream)

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        return _bounded(node) if self.may_alias else node


if yaml.__with_libyaml__:

    class _FastLoader(yaml.CSafeLoader):
        """_Loader with libyaml's scanner and parser (C), four times as fast on a site's
        files and every machine's Butane; the same resolvers, constructors and bounds.
        libyaml bounds nesting at 1,000 levels itself."""

        def __init__(self, stream: Any):
            super().__init__(stream)
            self.may_alias = _may_alias(stream)

        def get_single_node(self) -> yaml.Node | None:
            node = super().get_single_node()
            return _bounded(node) if self.may_alias else node

else:  # a PyYAML built without libyaml
    _FastLoader = None  # type: ignore[assignment,misc]


_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"


_MERGE = "tag:yaml.org,2002:merge"


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> LineDict:
    # The merge key (`<<: *defaults`, `<<: [*gpu, *defaults]`) is done here, not by PyYAML's
    # flatten_mapping: 6.0.4's (constraints.txt; its guard against merge-key blowups, PyYAML
    # pull request 937) keeps a merged key once only when the two keys are the same string
    # object, so which mapping's value won hung on CPython's string caching ("k" from the first
    # mapping, "arch" from the last). As YAML's merge key says: the mappings merged come first,
    # of those in one list the earlier win, and the mapping's own keys win over all of them. A
    # key the mapping gives twice itself is refused, and `<<` given twice. Each mapping merged
    # is built once (construct_object keeps what it built per node) and its keys copied, so a
    # chain of merges costs what its keys are; _bounded refuses alias bombs before this.
    merges = [(k, v) for k, v in node.value if k.tag == _MERGE]
    if len(merges) > 1:
        raise yaml.constructor.ConstructorError(
            None, None, "'<<' is given twice: merge several mappings with one list, "
            "<<: [*a, *b] (the first one's keys win)", merges[1][0].start_mark)  # fmt: skip
    out = LineDict()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    out.value_lines = {}
    for _, value_node in merges:
        sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
        for sub in reversed(sources):  # the earlier ones last: their values stay
            if not isinstance(sub, yaml.MappingNode):
                raise yaml.constructor.ConstructorError(
                    None, None, f"'<<' merges mappings, and this is a {sub.id}", sub.start_mark)
            merged = loader.construct_object(sub, deep=True)
            out.update(merged)
            out.key_lines.update(getattr(merged, "key_lines", {}))
            out.value_lines.update(getattr(merged, "value_lines", {}))
    given: set[Any] = set()
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE:
            continue
        if key_node.tag == "tag:yaml.org,2002:value":  # `=`, a plain key as PyYAML has it
            key_node.tag = "tag:yaml.org,2002:str"
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark
            ) from None
        if key in given:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice", key_node.start_mark
            )
        given.add(key)
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
        out.value_lines[key] = value_node.start_mark.line + 1
    return out


def _construct_seq(loader: _Loader, node: yaml.SequenceNode) -> LineList:
    out = LineList(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [child.start_mark.line + 1 for child in node.value]
    return out


# YAML 1.1 reads 52:54:00:12:34:56 as a base-60 number; YAML 1.2 (and Butane) do not. Resolve
# ints and floats without the base-60 forms so that unquoted MAC addresses stay strings.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _INT,
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9_]+(?:[eE][-+][0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)
_Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)
if _FastLoader is not None:
    _FastLoader.yaml_implicit_resolvers = _Loader.yaml_implicit_resolvers
    _FastLoader.yaml_constructors = _Loader.yaml_constructors


def dump(data: Any) -> bytes:
    """`data` (plain dicts, lists and scalars) as a site file's YAML, in UTF-8: keys in their
    order, and text as it is (PyYAML's default wrote `café` as "caf\\xE9"). What the file had
    besides its data is not kept: comments, and anchors and aliases (each alias is written out
    in full where it stood)."""
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode()


def load(text: str | bytes, name: str) -> Any:
    """Parse one YAML document or raise YamlError(name, line, problem)."""
    if _FastLoader is not None:
        try:
            return yaml.load(text, Loader=_FastLoader)  # noqa: S506 - a CSafeLoader subclass
        except (yaml.YAMLError, RecursionError, UnicodeDecodeError):
            pass  # said below, in PyYAML's own words and lines, which the tests and docs quote
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = " ".join(p for p in (e.context, e.problem) if p) or "invalid YAML"
        if "'\\t'" in problem:
            problem += " (YAML does not allow tabs for indentation)"
        raise YamlError(name, line, problem) from None
    except yaml.YAMLError as e:
        raise YamlError(name, None, str(e)) from None
    except (RecursionError, UnicodeDecodeError) as e:
        raise YamlError(name, None, f"cannot parse: {e}") from None
