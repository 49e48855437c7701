"""bastion.yamlfile: line-aware YAML, and aliases bounded (the "billion laughs" file)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import yaml
from bastion import yamlfile
from bastion.site.load import SiteError, load_site


def alias_bomb(levels: int = 9, fanout: int = 9) -> str:
    """`levels` anchors, each a list of `fanout` aliases of the one before: fanout**levels
    strings from about a kilobyte."""
    lines = ["site: bomb", "metadata:", "  l0: &l0 [" + ", ".join(['"lol"'] * fanout) + "]"]
    for i in range(1, levels + 1):
        lines.append(f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * fanout) + "]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_naming_the_file(tmp_path):
    (tmp_path / "site.yaml").write_text(alias_bomb())
    with pytest.raises(yamlfile.YamlError) as e:
        yamlfile.load((tmp_path / "site.yaml").read_text(), "site.yaml")
    assert e.value.name == "site.yaml"
    assert "aliases expand to more than 100,000 values" in str(e.value)
    with pytest.raises(SiteError) as e:
        load_site(tmp_path)
    assert e.value.problems == [
        (
            "site.yaml:1: bad YAML: its aliases expand to more than 100,000 values (an alias "
            "bomb, or an alias inside its own anchor); refused"
        )
    ]


def test_site_check_refuses_the_bomb_and_says_where(tmp_path):
    """The command as a user runs it, in a process whose memory is capped at 1 GB: it used to
    grow to 3.1 GB and end in a MemoryError traceback naming no file."""
    (tmp_path / "site.yaml").write_text(alias_bomb())
    capped = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
        "from bastion.cli import main; sys.argv[0] = 'bastion'; main()"
    )
    r = subprocess.run([sys.executable, "-c", capped, "site", "check", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("site.yaml:1: bad YAML: its aliases expand to more than"), r.stderr
    assert "Traceback" not in r.stderr


def test_an_alias_inside_its_own_anchor_is_refused():
    for text in ("a: &a [*a]", "a: &a {b: *a}", "a: &a [1, [2, *a]]"):
        with pytest.raises(yamlfile.YamlError, match="alias inside its own anchor"):
            yamlfile.load(text, "x.yaml")


def test_aliases_used_as_people_use_them_still_load():
    # a shared block of labels for 500 machines: 500 aliases of a 20-entry mapping
    labels = "\n".join(f"    k{i}: v{i}" for i in range(20))
    machines = "\n".join(f"  - name: m{i}\n    labels: *common" for i in range(500))
    doc = yamlfile.load(f"common: &common\n{labels}\nmachines:\n{machines}\n", "machines.yaml")
    assert len(doc["machines"]) == 500
    assert doc["machines"][499]["labels"]["k19"] == "v19"


def test_the_bound_counts_expansion_not_file_size():
    nested = yaml.compose("a: &a [1, 2, 3]\nb: [*a, *a, *a]")
    # mapping 1 + 2 keys + a (4) + b (1 + 3 * 4); its own: the mapping, 2 keys, a, b
    assert yamlfile.expansion(nested) == (1 + 2 + 4 + 13, 2 + 3 + 9, 1 + 2 + 4 + 1, 2 + 3)
    assert yamlfile.expansion(yaml.compose("a: &a [*a]"))[:2] == (math.inf, math.inf)
    # exactly at the bound loads; one past it does not
    limit = yamlfile.MAX_EXPANDED_NODES
    for n, loads in ((limit - 5, True), (limit - 4, False)):
        text = "a: &a x\nb: [" + ", ".join(["*a"] * n) + "]"  # mapping, 2 keys, x, b: 5 + n
        if loads:
            assert len(yamlfile.load(text, "x.yaml")["b"]) == n
        else:
            with pytest.raises(yamlfile.YamlError, match="more than 100,000 values"):
                yamlfile.load(text, "x.yaml")


def test_aliases_of_a_long_string_are_bounded_by_characters(tmp_path):
    # 5,000 aliases of a 1 MB string: few nodes, 5 GB of text once walked (it ran out of memory)
    def doc(n):
        return "big: &big " + "x" * 1_000_000 + "\nmany: [" + ", ".join(["*big"] * n) + "]\n"

    with pytest.raises(yamlfile.YamlError) as e:
        yamlfile.load(doc(5000), "site.yaml")
    assert "aliases expand to more than 16,777,216 characters" in str(e.value)
    assert len(yamlfile.load(doc(9), "site.yaml")["many"]) == 9  # ten times its own: still fine


def test_a_large_document_without_aliases_is_never_refused_for_its_size():
    # 17,000 machines of six values: 120,000 nodes, refused as an "alias bomb" before
    machines = "".join(f"- {{name: m{i}, mac: '02:00:00:00:{i // 256:02x}:{i % 256:02x}', role: worker}}\n"
                       for i in range(17_000))  # fmt: skip
    assert len(yamlfile.load(machines, "machines.yaml")) == 17_000


def test_a_large_document_with_merge_keys_loads():
    # 20,000 machines sharing a block of defaults through `<<: *d`: it expands to a few times
    # what it holds, as shared blocks do
    text = "defaults: &d {role: worker, arch: x86_64, profile: p, labels: {rack: a}}\nmachines:\n" + "".join(
        f"  - {{<<: *d, name: m{i}}}\n" for i in range(20_000))  # fmt: skip
    doc = yamlfile.load(text, "machines.yaml")
    assert len(doc["machines"]) == 20_000 and doc["machines"][-1]["labels"]["rack"] == "a"


def test_a_merge_key_brings_defaults_that_the_mapping_overrides():
    text = ("defaults: &d {role: worker, arch: x86_64, labels: {rack: a}}\n"
            "gpu: &g {labels: {gpu: yes}, arch: arm64}\n"
            "machines:\n"
            "  - <<: *d\n    name: m1\n    role: control-plane\n"
            "  - <<: [*g, *d]\n    name: m2\n")  # fmt: skip
    m1, m2 = yamlfile.load(text, "machines.yaml")["machines"]
    assert (m1["role"], m1["arch"], m1.line_of("role")) == ("control-plane", "x86_64", 6)
    # of two merged mappings that share keys, the earlier wins (YAML's merge key), with either
    # parser (the libyaml path, then PyYAML's own on a file libyaml refuses)
    assert m2["name"] == "m2" and m2["role"] == "worker" and m2["arch"] == "arm64"
    assert m2["labels"] == {"gpu": True}
    # a key the mapping gives twice itself is still refused, merge or not
    with pytest.raises(yamlfile.YamlError, match="given twice"):
        yamlfile.load("m:\n  <<: {x: 1}\n  x: 2\n  x: 3\n", "machines.yaml")


def test_merged_keys_take_the_earlier_mappings_value_whatever_the_keys_spelling(monkeypatch):
    # PyYAML 6.0.4 kept the first of two merged keys only when both were one string object:
    # "k" (a cached one-letter string) from the first mapping, "arch" from the last
    text = ("a: &a {k: 1, arch: from-a}\nb: &b {k: 2, arch: from-b, only: b}\n"
            "c: &c {<<: *b, k: 3}\n"
            "m: {<<: [*a, *b]}\nn: {<<: [*c, *a]}\no: {<<: *a, arch: own}\n")  # fmt: skip
    fast = yamlfile.load(text, "t.yaml")  # libyaml's parser, when PyYAML has it
    monkeypatch.setattr(yamlfile, "_FastLoader", None)
    for loaded in (fast, yamlfile.load(text, "t.yaml")):  # and PyYAML's own
        assert dict(loaded["m"]) == {"k": 1, "arch": "from-a", "only": "b"}
        assert dict(loaded["n"]) == {"k": 3, "arch": "from-b", "only": "b"}  # c's own k, then b's
        assert dict(loaded["o"]) == {"k": 1, "arch": "own"}
    assert loaded["m"].line_of("only") == 2 and loaded["o"].line_of("arch") == 6
    with pytest.raises(yamlfile.YamlError, match="'<<' merges mappings, and this is a scalar"):
        yamlfile.load("m: {<<: [1, 2]}\n", "t.yaml")


def test_a_merge_key_given_twice_is_refused_with_the_list_to_use_instead():
    text = "a: &a {k: 1}\nb: &b {k: 2}\nm:\n  <<: *a\n  name: m\n  <<: *b\n"
    with pytest.raises(yamlfile.YamlError) as e:
        yamlfile.load(text, "machines.yaml")
    assert str(e.value) == ("machines.yaml:6: '<<' is given twice: merge several "
                            "mappings with one list, <<: [*a, *b] (the first one's keys win)")  # fmt: skip


# --- libyaml's parser (the fast path) against PyYAML's own -------------------------------------


def _with_lines(data):
    """`data` with every LineDict's and LineList's lines beside it, to compare two loads."""
    if isinstance(data, yamlfile.LineDict):
        return ("map", data.line, data.key_lines, data.value_lines,
                {k: _with_lines(v) for k, v in data.items()})  # fmt: skip
    if isinstance(data, yamlfile.LineList):
        return ("seq", data.line, data.item_lines, [_with_lines(v) for v in data])
    return (type(data).__name__, data)


def _both(text: str):
    fast = yaml.load(text, Loader=yamlfile._FastLoader)  # noqa: S506 - a CSafeLoader subclass
    pure = yaml.load(text, Loader=yamlfile._Loader)  # noqa: S506 - a SafeLoader subclass
    return _with_lines(fast), _with_lines(pure)


needs_libyaml = pytest.mark.skipif(yamlfile._FastLoader is None, reason="PyYAML without libyaml")


@needs_libyaml
def test_the_fast_path_reads_every_example_file_as_pyyaml_does():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "examples"
    files = sorted([*root.rglob("*.yaml"), *root.rglob("*.yml"), *root.rglob("*.bu")])
    loaded = 0
    for f in files:
        try:
            fast, pure = _both(f.read_text())
        except yaml.YAMLError:  # a manifest of several documents, a template: not for load()
            with pytest.raises(yaml.YAMLError):  # and PyYAML's own parser refuses it too
                yaml.load(f.read_text(), Loader=yamlfile._Loader)  # noqa: S506
            continue
        assert fast == pure, f
        loaded += 1
    assert loaded > 10


@needs_libyaml
@pytest.mark.parametrize("text", [
    "mac: 52:54:00:12:34:01\nsexagesimal: 1:30\noctal: 0o17\nint: 0x1f\nfloat: 1.5e+3\n",
    "a: &a {x: 1, y: [1, 2]}\nb: *a\nc:\n  <<: *a\n  y: 3\n",
    "text: |\n  line one\n  line two\nfolded: >-\n  one\n  two\n\nnext: 'quoted: ''x'''\n",
    "- {a: 1}\n-\n  - nested\n  - [flow, list]\n- ~\n- yes\n- 2026-12-06\n",
    "key with spaces: value\n? complex\n: value\n\"quoted key\": 1\n",
    "",
    "# only a comment\n",
])  # fmt: skip
def test_the_fast_path_reads_yaml_features_as_pyyaml_does(text):
    fast, pure = _both(text)
    assert fast == pure


@needs_libyaml
@pytest.mark.parametrize("text", [
    "a: 1\na: 2\n",  # a key twice
    "a:\n\tb: 1\n",  # a tab
    "a: [1, 2\n",  # unclosed
    alias_bomb(),
])  # fmt: skip
def test_a_file_the_fast_path_refuses_is_said_in_pyyamls_words(text):
    with pytest.raises(yaml.YAMLError):
        yaml.load(text, Loader=yamlfile._FastLoader)  # noqa: S506
    with pytest.raises(yaml.YAMLError) as pure:
        yaml.load(text, Loader=yamlfile._Loader)  # noqa: S506
    with pytest.raises(yamlfile.YamlError) as said:
        yamlfile.load(text, "f.yaml")
    mark = pure.value.problem_mark or pure.value.context_mark
    assert said.value.line == mark.line + 1
    assert pure.value.problem in said.value.problem
