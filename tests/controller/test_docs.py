"""docs/site-files.md, docs/controller.md and docs/network.md, kept true.

What the docs claim is checked against the code through markers: an HTML comment on the line
before a fenced block (blank lines between are allowed; rendered docs do not show it). A marker
is `<!-- word -->` or `<!-- key: value | key: value ... -->`:

<!-- file: PATH | site: NAME | base: empty | expect: problems -->
    The block is the whole of the file PATH of a site directory. The blocks of one `site:` are
    written together (a block without `site:` is a site on its own) into a copy of
    examples/site, or into an empty directory when any of them says `base: empty`, next to fake
    Flatcar assets under assets/flatcar/{amd64,arm64}/ and, for a k3s cluster that the nodes
    fetch from the controller, a made-up k3s release fetched as `bastion assets fetch k3s`
    does (from a loopback mirror). The site must load with
    bastion.site.load.load_site with no problem and no warning; with `expect: problems` it must
    fail with exactly the lines of the block marked `<!-- problems: NAME -->`.
    In docs/site-files.md every ```yaml and ```json block carries a `file:` marker, or
    `<!-- fragment -->` when it is deliberately a part of a file.
<!-- response: METHOD PATH | site: NAME -->
    The block is the body the controller answers, with 200, for that request on the site NAME:
    a `file:` site of docs/site-files.md, or `examples` (examples/site with fake assets). The
    controller is reached as http://10.77.0.1:8080.
<!-- runnable -->
    In a shell block: each `bastion ...` line (leading VAR=value words are passed as the
    environment; `#` starts a comment) runs with `--help` appended and exits 0, which holds
    its command and option names to the CLI's; each `curl` line's URL path must be an endpoint
    of the app for the method curl would use. Other lines are not run. A `bastion ...` line in
    a fenced block without this marker is an error.

Every `METHOD /path` code span (`GET /ipxe`, `POST /api/v1/machines/{name}/power`; a query is
ignored) in either doc names an endpoint: it is in the app's OpenAPI schema (the app made as
bastion_testkit.make_app makes it) or in NON_SCHEMA below. And every operation of the schema is
named in docs/controller.md, so a new endpoint without documentation fails here.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from bastion.site.load import SiteError, load_site
from bastion_testkit import EXAMPLES, REPO, make_app, write_assets
from mirrorkit import fetch_k3s_into

SITE_DOC = REPO / "docs" / "site-files.md"
CONTROLLER_DOC = REPO / "docs" / "controller.md"
NETWORK_DOC = REPO / "docs" / "network.md"
DOCS = (SITE_DOC, CONTROLLER_DOC, NETWORK_DOC)
ASSET_DIRS = (
    "flatcar/amd64", "flatcar/arm64",
    # what `bastion assets fetch flatcar` lays out, which a site's cluster: boots
    "flatcar/stable/amd64/current", "flatcar/stable/arm64/current",
)  # fmt: skip
BASE_URL = "http://10.77.0.1:8080"
# Starlette's TestClient warns that it will move away from httpx; nothing to act on here.
pytestmark = pytest.mark.filterwarnings("ignore:.*httpx.*")
# Routes served outside the OpenAPI schema: the API's documentation page (Swagger UI) and the
# schema itself, /boot.ipxe.0 (an alias of /boot.ipxe for PXE stacks that add ".0") and / (the
# dashboard, also at /dashboard).
NON_SCHEMA = {
    ("GET", "/"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/boot.ipxe.0"),
}
_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH")
_MARKER = re.compile(r"^<!--\s*(.*?)\s*-->$")
_ENDPOINT_SPAN = re.compile(r"`(" + "|".join(_METHODS) + r") (/[^`\s]*)`")
_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")
# curl options that make a request a POST when no -X says otherwise
_CURL_DATA = (
    "-d",
    "--data",
    "--data-raw",
    "--data-binary",
    "--data-urlencode",
    "-F",
    "--form",
    "--json",
)


# --- reading the docs --------------------------------------------------------------------------


@dataclass
class Block:
    doc: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    marker: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def parse_marker(text: str) -> dict[str, str]:
    """`file: a | site: b` -> {"file": "a", "site": "b"}; a bare word maps to ""."""
    out = {}
    for part in text.split("|"):
        key, sep, value = part.partition(":")
        out[key.strip()] = value.strip() if sep else ""
    return out


def blocks(doc: Path) -> list[Block]:
    lines = doc.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith("```"):
            i += 1
            continue
        lang = line[3:].strip()
        start = i
        i += 1
        body = []
        while i < len(lines) and lines[i] != "```":
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"{doc}:{start + 1}: a fence that is never closed"
        i += 1
        marker: dict[str, str] = {}
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        m = _MARKER.match(lines[j].strip()) if j >= 0 else None
        if m:
            marker = parse_marker(m.group(1))
        out.append(Block(doc, start + 1, lang, "".join(b + "\n" for b in body), marker))
    return out


def command_words(line: str) -> tuple[dict[str, str], list[str]]:
    """A shell line as (environment assignments, words); both empty for a comment."""
    words = shlex.split(line, comments=True)
    env = {}
    while words and _ASSIGNMENT.match(words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


def is_bastion(words: list[str]) -> bool:
    return bool(words) and words[0] in ("bastion", ".venv/bin/bastion")


ALL_BLOCKS = [b for doc in DOCS for b in blocks(doc)]


def _site_sets() -> dict[str, list[Block]]:
    sets: dict[str, list[Block]] = {}
    for b in ALL_BLOCKS:
        if "file" in b.marker:
            sets.setdefault(b.marker.get("site") or f"line-{b.line}", []).append(b)
    return sets


SITE_SETS = _site_sets()
PROBLEMS = {b.marker["problems"]: b for b in ALL_BLOCKS if "problems" in b.marker}
RESPONSES = [b for b in ALL_BLOCKS if "response" in b.marker]
RUNNABLE = [b for b in ALL_BLOCKS if "runnable" in b.marker]
COMMANDS = [
    (b, line)
    for b in RUNNABLE
    for line in b.text.splitlines()
    if is_bastion(command_words(line)[1])
]
CURLS = [
    (b, line)
    for b in RUNNABLE
    for line in b.text.splitlines()
    if command_words(line)[1][:1] == ["curl"]
]


def build_site(name: str, root: Path) -> Path:
    """The site directory for a `file:` set (or `examples`), with fake assets."""
    site = root / name
    if name == "examples":
        shutil.copytree(EXAMPLES / "site", site)
    else:
        members = SITE_SETS[name]
        if any(b.marker.get("base") == "empty" for b in members):
            site.mkdir(parents=True)
        else:
            shutil.copytree(EXAMPLES / "site", site)
        for b in members:
            path = site / b.marker["file"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(b.text)
    write_assets(site, ASSET_DIRS)
    k3s = re.search(r"^  k3s:\n((?:    .*\n)*)", _text(site / "site.yaml"), re.MULTILINE)
    version = re.search(r"^    version: (\S+)", k3s.group(1), re.MULTILINE) if k3s else None
    if version and not re.search(r"^    url: ", k3s.group(1), re.MULTILINE):
        fetch_k3s_into(site, version.group(1))  # made up, as `bastion assets fetch k3s` does
    return site


def _text(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


# --- the app -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_client(tmp_path_factory):
    from fastapi.testclient import TestClient

    root = tmp_path_factory.mktemp("docs-app")
    app = make_app(build_site("examples", root), root / "events.db")
    with TestClient(app, base_url=BASE_URL) as client:
        yield client


@pytest.fixture(scope="module")
def operations(app_client) -> set[tuple[str, str]]:
    schema = app_client.get("/openapi.json").json()
    return {
        (method.upper(), path)
        for path, ops in schema["paths"].items()
        for method in ops
        if method.upper() in _METHODS
    }


def _route_pattern(template: str) -> re.Pattern:
    parts = re.split(r"(\{[^}]+\})", template)
    rx = "".join(
        (".+" if p == "{path}" else "[^/]+") if p.startswith("{") else re.escape(p) for p in parts
    )
    return re.compile(f"^{rx}$")


# --- the conventions themselves ----------------------------------------------------------------


def test_the_docs_use_the_markers():
    """Enough of each kind that a broken parser cannot pass by finding nothing."""
    assert len(SITE_SETS) >= 5
    assert PROBLEMS and RESPONSES
    assert len(COMMANDS) >= 10 and CURLS


def test_every_yaml_and_json_block_of_site_files_is_marked():
    unmarked = [
        b.where
        for b in ALL_BLOCKS
        if b.doc == SITE_DOC
        and b.lang in ("yaml", "json")
        and "file" not in b.marker
        and "fragment" not in b.marker
    ]
    assert not unmarked, f"mark these as <!-- file: PATH --> or <!-- fragment -->: {unmarked}"


def test_bastion_commands_are_only_in_runnable_blocks():
    stray = [
        f"{b.where}: {line}"
        for b in ALL_BLOCKS
        if "runnable" not in b.marker and b.lang in ("sh", "bash", "shell", "console", "")
        for line in b.text.splitlines()
        if is_bastion(command_words(line)[1])
    ]
    assert not stray, "bastion commands outside a <!-- runnable --> block:\n" + "\n".join(stray)


# --- site files --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SITE_SETS))
def test_site_file_examples_load(name, tmp_path):
    members = SITE_SETS[name]
    where = ", ".join(f"{b.where} ({b.marker['file']})" for b in members)
    site = build_site(name, tmp_path)
    if any(b.marker.get("expect") == "problems" for b in members):
        assert name in PROBLEMS, f"{where}: no <!-- problems: {name} --> block"
        with pytest.raises(SiteError) as e:
            load_site(site)
        assert e.value.problems == PROBLEMS[name].text.splitlines(), where
        return
    try:
        loaded = load_site(site)
    except SiteError as e:
        pytest.fail(f"{where} do not load:\n{e}")
    assert loaded.warnings == (), where


def test_problem_blocks_belong_to_a_site():
    for name, b in PROBLEMS.items():
        assert name in SITE_SETS, f"{b.where}: no site {name!r}"


@pytest.mark.parametrize("block", RESPONSES, ids=lambda b: b.where)
def test_documented_responses(block, tmp_path):
    from fastapi.testclient import TestClient

    method, _, path = block.marker["response"].partition(" ")
    name = block.marker.get("site", "")
    assert name == "examples" or name in SITE_SETS, f"{block.where}: no site {name!r}"
    app = make_app(build_site(name, tmp_path), tmp_path / "events.db")
    with TestClient(app, base_url=BASE_URL) as client:
        r = client.request(method, path)
    assert r.status_code == 200, (block.where, r.text)
    assert r.text == block.text, block.where


# --- commands ----------------------------------------------------------------------------------


def _bastion() -> list[str]:
    script = Path(sys.executable).with_name("bastion")
    if script.exists():
        return [str(script)]
    return [
        sys.executable,
        "-c",
        "import sys; from bastion.cli import main; sys.argv[0] = 'bastion'; main()",
    ]


@pytest.mark.parametrize(
    ("block", "line"), COMMANDS, ids=[f"{b.where}: {line.strip()}" for b, line in COMMANDS]
)
def test_documented_commands_exist(block, line):
    env, words = command_words(line)
    base = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    r = subprocess.run(
        [*_bastion(), *words[1:], "--help"],
        cwd=REPO, env={**base, **env}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, f"{block.where}: {line}\n{r.stdout}{r.stderr}"


def _curl_request(words: list[str]) -> tuple[str, str]:
    method = None
    url = None
    for i, w in enumerate(words):
        if w in ("-X", "--request") and i + 1 < len(words):
            method = words[i + 1]
        elif w in _CURL_DATA:
            method = method or "POST"
        elif w in ("-I", "--head"):
            method = method or "HEAD"
        elif "://" in w:
            url = w
    assert url, f"no URL in {words}"
    return method or "GET", urlsplit(url).path


@pytest.mark.parametrize(
    ("block", "line"), CURLS, ids=[f"{b.where}: {line.strip()[:60]}" for b, line in CURLS]
)
def test_documented_curl_requests_exist(block, line, operations):
    method, path = _curl_request(command_words(line)[1])
    known = [p for m, p in operations if m == method and _route_pattern(p).match(path)]
    assert known or (method, path) in NON_SCHEMA, f"{block.where}: no endpoint {method} {path}"


# --- endpoints ---------------------------------------------------------------------------------


def named_endpoints(doc: Path) -> set[tuple[str, str]]:
    return {(m, p.split("?", 1)[0]) for m, p in _ENDPOINT_SPAN.findall(doc.read_text())}


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_named_endpoint_exists(doc, operations):
    named = named_endpoints(doc)
    assert named or doc != CONTROLLER_DOC
    unknown = sorted(named - operations - NON_SCHEMA)
    assert not unknown, f"{doc.name} names endpoints the app does not have: {unknown}"


def test_every_endpoint_is_documented(operations):
    missing = sorted(operations - named_endpoints(CONTROLLER_DOC))
    assert not missing, f"docs/controller.md does not name: {missing}"


@pytest.mark.parametrize(("method", "path"), sorted(NON_SCHEMA))
def test_the_routes_outside_the_schema_are_served(method, path, app_client, operations):
    assert (method, path) not in operations  # else it needs no place in NON_SCHEMA
    assert app_client.request(method, path).status_code == 200
