"""bastion.match: labels from queries and matchbox's group selection rules."""

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.match import (
    GroupIndex,
    Malformed,
    labels_from_query,
    matches,
    parse_mac,
    query_pairs,
    select_group,
    selector_string,
    specificity_order,
)


@dataclass
class G:
    id: str
    selector: dict = field(default_factory=dict)


@pytest.mark.parametrize(
    "text",
    ["52:54:00:a1:9c:ae", "52-54-00-A1-9C-AE", "5254.00a1.9cae", "52:54:00:A1:9c:Ae"],
)
def test_mac_notations_normalise_to_lowercase_colons(text):
    assert parse_mac(text) == "52:54:00:a1:9c:ae"


def test_eui64_and_infiniband_lengths_are_macs_too():
    assert parse_mac("02-00-00-00-00-00-00-01") == "02:00:00:00:00:00:00:01"
    ib = ":".join(["00"] * 20)
    assert parse_mac(ib) == ib


@pytest.mark.parametrize(
    "text",
    ["", "zz:54:00:a1:9c:ae", "52:54:00:a1:9c", "52:54:00:a1:9c:ae:", "52:54-00:a1:9c:ae",
     "525400a19cae", "52:54:00:a1:9c:ae:01", "5254.00a1.9ca", " 52:54:00:a1:9c:ae", "52:5:00:a1:9c:ae0",
     # a line break after an octet is not part of a MAC: kept, it went into the Ignition URL of
     # a boot script (a line of its own) and into the history as a MAC of no machine
     "52:54:00:a1:9c:ae\n", "52-54-00-a1-9c-ae\n", "52:54:00\n:a1:9c:ae", "5254.00a1.9cae\n",
     # a separator where a digit belongs, the length still right
     "52::4:00:a1:9c:ae", "52:54:00:a1:9c::e", "52-54--0-a1-9c-ae", "5254..0a1.9cae", "5254.00a1.9c.e"],
)  # fmt: skip
def test_non_macs_are_malformed(text):
    with pytest.raises(Malformed):
        parse_mac(text)


def _parse_mac_octet_by_octet(text: str) -> str:
    """parse_mac as it was written first, one match per octet: the reference for the one that
    matches the whole text at once."""
    octets: list[str] = []
    if len(text) >= 14 and text[2:3] in (":", "-"):
        parts = text.split(text[2])
        if all(re.fullmatch(r"[0-9A-Fa-f]{2}", p) for p in parts):
            octets = parts
    elif len(text) >= 14 and text[4:5] == ".":
        parts = text.split(".")
        if all(re.fullmatch(r"[0-9A-Fa-f]{4}", p) for p in parts):
            octets = [q[i : i + 2] for q in parts for i in (0, 2)]
    if len(octets) not in (6, 8, 20):
        raise Malformed(text)
    return ":".join(o.lower() for o in octets)


# MAC-like texts: hex digits and the three separators, in runs long enough to be MACs
_MACISH = st.text(st.sampled_from("0aF9g:-.\n "), min_size=10, max_size=62)


_HEX_CHARS = "0123456789abcdefABCDEF"
# runs of hex digits of one length (2 and 4 most), as many as MACs have and one more or less,
# joined by one separator (or, in one case of four, a mix): valid MACs and near misses
_NEAR_MACS = st.tuples(
    st.sampled_from([2, 2, 2, 4, 4, 1, 3]), st.sampled_from([3, 4, 5, 6, 7, 8, 9, 10, 19, 20, 21]),
    st.sampled_from([":", "-", ".", ":", "-", ".", ":-"]),
).flatmap(lambda t: st.lists(st.text(_HEX_CHARS, min_size=t[0], max_size=t[0]), min_size=t[1],
                             max_size=t[1]).map(lambda parts: t[2][0].join(parts[:3]) + t[2][-1] + t[2][-1].join(parts[3:])))  # fmt: skip


# a valid MAC in each notation with one character changed to a separator, a digit or a letter
_MUTATED = st.tuples(
    st.lists(st.text(_HEX_CHARS, min_size=2, max_size=2), min_size=6, max_size=6).flatmap(
        lambda o: st.sampled_from([":".join(o), "-".join(o), ".".join(["".join(o[i:i + 2]) for i in (0, 2, 4)])])),
    st.integers(0, 16), st.sampled_from(":-.0aGx"),
).map(lambda t: t[0][:t[1]] + t[2] + t[0][t[1] + 1:])  # fmt: skip


@settings(max_examples=500)
@given(st.one_of(_MACISH, st.text(max_size=62), _NEAR_MACS, _MUTATED))
def test_parse_mac_agrees_with_the_octet_by_octet_reference(text):
    try:
        want = _parse_mac_octet_by_octet(text)
    except Malformed:
        with pytest.raises(Malformed):
            parse_mac(text)
        return
    assert parse_mac(text) == want


@given(st.text(max_size=40))
def test_parse_mac_only_ever_raises_malformed(text):
    try:
        out = parse_mac(text)
    except Malformed:
        return
    octets = out.split(":")
    assert len(octets) in (6, 8, 20) and all(re.fullmatch("[0-9a-f]{2}", o) for o in octets)


@given(st.text(max_size=80))
def test_labels_from_any_query_never_crash(raw):
    labels = labels_from_query(raw)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())


def test_labels_normalise_mac_keep_first_value_and_drop_bad_macs():
    assert labels_from_query("mac=52-54-00-A1-9C-AE&uuid=u1&foo=a&foo=b&empty=") == {
        "mac": "52:54:00:a1:9c:ae",
        "uuid": "u1",
        "foo": "a",
        "empty": "",
    }
    # a MAC that does not parse is dropped so it cannot match anything (matchbox does the same)
    assert labels_from_query("mac=not-a-mac&os=installed") == {"os": "installed"}
    # the key is compared case-insensitively but keeps its spelling, as in matchbox
    assert labels_from_query("MAC=52-54-00-a1-9c-ae") == {"MAC": "52:54:00:a1:9c:ae"}
    # its first value counts even when it is dropped: a second one is not taken instead
    assert labels_from_query("mac=bad&mac=52-54-00-12-34-01&os=x") == {"os": "x"}


def test_a_group_matches_when_all_its_selectors_equal_the_labels():
    assert matches({}, {})
    assert matches({}, {"mac": "x"})
    assert matches({"os": "installed"}, {"os": "installed", "mac": "x"})
    assert not matches({"os": "installed"}, {"os": "other"})
    assert not matches({"os": "installed", "mac": "x"}, {"os": "installed"})
    assert not matches({"Os": "installed"}, {"os": "installed"})  # keys are case-sensitive
    # a label the request lacks is "" (matchbox: Go's map lookup gives the zero value)
    assert matches({"os": ""}, {}) and matches({"os": ""}, {"os": ""}) and not matches({"os": ""}, {"os": "x"})


def test_most_selectors_win_and_ties_go_to_the_greatest_selector_string():
    default = G("default")
    by_mac = G("mac", {"mac": "52:54:00:a1:9c:ae"})
    mac_and_os = G("mac+os", {"mac": "52:54:00:a1:9c:ae", "os": "installed"})
    rack = G("rack", {"rack": "a"})
    zone = G("zone", {"zone": "b"})
    ordered = specificity_order([default, rack, by_mac, zone, mac_and_os])
    assert [g.id for g in ordered] == ["mac+os", "zone", "rack", "mac", "default"]

    def pick(**labels):
        g = select_group(ordered, labels)
        return g.id if g else None

    assert pick() == "default"
    assert pick(mac="52:54:00:a1:9c:ae") == "mac"
    assert pick(mac="52:54:00:a1:9c:ae", os="installed") == "mac+os"
    assert pick(rack="a", zone="b") == "zone"  # 'zone=b' > 'rack=a'
    assert pick(rack="a") == "rack"
    assert pick(mac="52:54:00:a1:9c:ae", zone="b") == "zone"  # 'zone=b' > 'mac=52:...'


def test_no_default_group_means_no_match():
    ordered = specificity_order([G("mac", {"mac": "52:54:00:a1:9c:ae"})])
    assert select_group(ordered, {"mac": "52:54:00:00:00:01"}) is None


# selectors and labels over a few keys and values, so that groups overlap, tie and shadow
_KEYS = st.sampled_from(["mac", "uuid", "os", "MAC"])
_VALUES = st.sampled_from(["", "a", "b", "52:54:00:a1:9c:ae"])


@given(st.lists(st.dictionaries(_KEYS, _VALUES, max_size=3), max_size=12),
       st.lists(st.dictionaries(_KEYS, _VALUES, max_size=4), min_size=1, max_size=8))  # fmt: skip
def test_the_group_index_picks_what_trying_every_group_picks(selectors, requests):
    ordered = specificity_order([G(f"g{n}", sel) for n, sel in enumerate(selectors)])
    index = GroupIndex(ordered)
    for labels in requests:
        assert index.select(labels) is select_group(ordered, labels)


def test_the_group_index_of_a_site_of_machines():
    machines = [G(f"m{n}", {"mac": f"52:54:00:00:{n // 256:02x}:{n % 256:02x}"}) for n in range(1000)]
    by_uuid = G("by-uuid", {"uuid": "u1"})
    os_mac = G("installed", {"mac": "52:54:00:00:00:07", "os": "installed"})
    index = GroupIndex(specificity_order([*machines, by_uuid, os_mac, G("default")]))
    assert index.select({"mac": "52:54:00:00:03:e7"}).id == "m999"
    assert index.select({"mac": "52:54:00:00:00:07", "os": "installed"}).id == "installed"
    assert index.select({"mac": "52:54:00:00:00:07"}).id == "m7"
    # one selector each: the tie goes to the greater selector string, 'uuid=u1' over 'mac=...'
    assert index.select({"uuid": "u1", "mac": "52:54:00:00:00:08"}).id == "by-uuid"
    assert index.select({"uuid": "u1"}).id == "by-uuid"
    assert index.select({"mac": "52:54:00:99:99:99"}).id == "default"


def test_selector_string_is_sorted_key_value_pairs():
    assert selector_string({"zone": "b", "mac": "m", "a": "1"}) == "a=1,mac=m,zone=b"
    assert selector_string({}) == ""


def test_uuids_compare_without_case():
    from bastion.match import labels_from_query

    labels = labels_from_query("uuid=4C4C4544-0035-4A10-8031-B3C04F4A3232")
    assert labels["uuid"] == "4c4c4544-0035-4a10-8031-b3c04f4a3232"


# what a query may hold: the separators, percent escapes (valid, invalid, multi-byte), '+'
_QUERY_ALPHABET = st.sampled_from(["&", "=", "+", "%", "%2", "%20", "%zz", "%E2%82%AC", "%ff", ";",
                                   "a", "mac", "52-54", "é", " ", "x"])  # fmt: skip


@given(st.lists(_QUERY_ALPHABET, max_size=20).map("".join))
def test_query_pairs_is_parse_qsl(raw):
    assert query_pairs(raw) == parse_qsl(raw, keep_blank_values=True)


def test_query_pairs_of_an_ipxe_query():
    raw = "mac=52-54-00-be-00-01&uuid=&arch=x86_64&hostname=my%20node&serial=a+b"
    assert query_pairs(raw) == [("mac", "52-54-00-be-00-01"), ("uuid", ""), ("arch", "x86_64"),
                                ("hostname", "my node"), ("serial", "a b")]  # fmt: skip
