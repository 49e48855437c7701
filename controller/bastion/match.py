"""Matching a boot request to a group: pure functions, matchbox's rules.

A request's labels are its query parameters (first value of each key); a `mac` label is kept only
when it parses as a MAC address, and is then normalised to lower-case colon form. A group matches
when every one of its selectors equals the request's label of the same key. Of the matching
groups, the one with the most selectors wins; ties go to the lexically greatest selector string
(`key=value` pairs sorted and joined by commas). A group without selectors matches everything: it
is the default group.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Generic, Protocol, TypeVar
from urllib.parse import unquote

# used with fullmatch: `$` would also match before a final line break ("01\n")
_HEX = re.compile(r"[0-9A-Fa-f]+")
# Go's net.ParseMAC accepts 48-bit (6), EUI-64 (8) and 20-octet InfiniBand addresses.
_MAC_LENGTHS = (6, 8, 20)


class Malformed(ValueError):
    """An input that is not what it claims to be (here: not a MAC address)."""


def parse_mac(text: str) -> str:
    """`text` as a normalised MAC address (`52:54:00:a1:9c:ae`), or raise Malformed.

    Accepts the forms Go's net.ParseMAC accepts, as matchbox does: `xx:xx:..`, `xx-xx-..`
    (iPXE's `${mac:hexhyp}`) and `xxxx.xxxx.xxxx`.
    """
    if not isinstance(text, str):
        raise Malformed(f"{text!r} is not a MAC address")
    # One regular expression over the whole text, and the separators by position: every boot
    # request's MAC comes through here (a match per octet was 3 us of the request here).
    n = len(text)
    if n >= 14 and text[2:3] in (":", "-") and (n + 1) % 3 == 0 and (n + 1) // 3 in _MAC_LENGTHS:
        sep = text[2]
        seps = (n + 1) // 3 - 1
        if text[2::3] == sep * seps and text.count(sep) == seps and _HEX.fullmatch(text.replace(sep, "")):
            return text.replace(sep, ":").lower()
    elif n >= 14 and text[4:5] == "." and (n + 1) % 5 == 0 and (n + 1) // 5 * 2 in _MAC_LENGTHS:
        digits = text.replace(".", "")
        quads = (n + 1) // 5
        if text[4::5] == "." * (quads - 1) and len(digits) == quads * 4 and _HEX.fullmatch(digits):
            return ":".join(digits[i : i + 2] for i in range(0, len(digits), 2)).lower()
    raise Malformed(f"{text!r} is not a MAC address")


def mac_hexhyp(mac: str) -> str:
    """A normalised MAC in iPXE's `${mac:hexhyp}` form (`52-54-00-a1-9c-ae`)."""
    return mac.replace(":", "-")


def labels_from_pairs(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Request labels from query pairs in order: first value per key wins, `mac` normalised,
    `uuid` lower-cased (as machines.yaml and group selectors are).

    A `mac` (any letter case in the key, as matchbox compares it) that does not parse is dropped,
    so that a garbage MAC cannot match a group by accident; the key keeps its spelling. Its
    first value is the one that counts even then (as matchbox's): `mac=bad&mac=<node1's>` is no
    MAC, not node1's.
    """
    labels: dict[str, str] = {}
    dropped: set[str] = set()
    for key, value in pairs:
        if key in labels or key in dropped:
            continue
        if key.lower() == "mac":
            try:
                labels[key] = parse_mac(value)
            except Malformed:
                dropped.add(key)
                continue
        elif key.lower() == "uuid":
            labels[key] = value.lower()  # RFC 4122: UUIDs compare without case
        else:
            labels[key] = value
    return labels


def labels_from_query(raw_query: str) -> dict[str, str]:
    """Request labels from a raw query string (`mac=52-54-00-..&uuid=..`)."""
    return labels_from_pairs(query_pairs(raw_query))


def query_pairs(raw_query: str) -> list[tuple[str, str]]:
    """parse_qsl(raw_query, keep_blank_values=True), in a quarter of its time (every boot
    request's query goes through it; tests/controller/test_match.py compares the two)."""
    pairs = []
    for piece in raw_query.split("&"):
        if not piece:
            continue
        name, _, value = piece.partition("=")
        if "+" in piece:
            name, value = name.replace("+", " "), value.replace("+", " ")
        if "%" in piece:
            name, value = unquote(name), unquote(value)
        pairs.append((name, value))
    return pairs


class Selectable(Protocol):
    @property
    def selector(self) -> Mapping[str, str]: ...


def selector_string(selector: Mapping[str, str]) -> str:
    """The tie-break key: `key=value` pairs, sorted, joined by commas."""
    return ",".join(sorted(f"{k}={v}" for k, v in selector.items()))


def matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    # a label the request does not have is "", as in matchbox (Go's map lookup): a selector
    # with an empty value matches a request without that parameter as one with it empty
    return all(labels.get(k, "") == v for k, v in selector.items())


G = TypeVar("G", bound=Selectable)


def specificity_order(groups: Iterable[G]) -> list[G]:
    """Groups in the order they are tried: most selectors first, then greatest selector string."""
    return sorted(
        groups, key=lambda g: (len(g.selector), selector_string(g.selector)), reverse=True
    )


def select_group(ordered: Sequence[G], labels: Mapping[str, str]) -> G | None:
    """The first group of `ordered` (see specificity_order) whose selectors all match, or None."""
    for group in ordered:
        if matches(group.selector, labels):
            return group
    return None


# The selector keys a GroupIndex files groups under: what machines.yaml's groups select on.
_INDEXED_KEYS = ("mac", "uuid")


class GroupIndex(Generic[G]):
    """select_group(ordered, labels) without trying every group: a site's machines each make a
    group selecting their MAC (or UUID), and a site of 1,000 machines tried a thousand groups
    for every boot request (about 12 times the CPU of a site of 8: docs/benchmarks-http.md).

    A group with a `mac` (else a `uuid`) selector can match only a request with that label
    value, so it is filed under it; the others are tried in order as before. A request tries
    the groups filed under its own MAC and UUID and the others, each list in matching order,
    and the first match in that order wins: the same group select_group picks
    (tests/controller/test_match.py compares the two on arbitrary groups and labels)."""

    def __init__(self, ordered: Sequence[G]):
        self._filed: dict[tuple[str, str], list[tuple[int, G]]] = {}
        self._rest: list[tuple[int, G]] = []
        for pos, group in enumerate(ordered):
            key = next((k for k in _INDEXED_KEYS if k in group.selector), None)
            if key is None:
                self._rest.append((pos, group))
            else:
                self._filed.setdefault((key, group.selector[key]), []).append((pos, group))
        self._end = len(ordered)

    def select(self, labels: Mapping[str, str]) -> G | None:
        best_pos, best = self._end, None
        for candidates in (self._filed.get(("mac", labels.get("mac", ""))),
                           self._filed.get(("uuid", labels.get("uuid", ""))), self._rest):  # fmt: skip
            for pos, group in candidates or ():
                if pos >= best_pos:
                    break
                if matches(group.selector, labels):
                    best_pos, best = pos, group
                    break
        return best
