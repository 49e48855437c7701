"""tools/import-graph: the tree's imports run downward through its layers, with no cycle; the
commands docs/architecture.md shows work; and the tool does catch what it claims to."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "import-graph"
DOC = REPO / "docs" / "architecture.md"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_the_tree_has_no_upward_import_and_no_cycle():
    r = run()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no upward import, no cycle" in r.stdout
    assert "in no layer" not in r.stdout


DOC_COMMANDS = [line.split("#")[0].strip() for line in DOC.read_text().splitlines()
                if line.startswith("tools/import-graph")]  # fmt: skip


@pytest.mark.parametrize("line", DOC_COMMANDS)
def test_the_commands_in_the_architecture_doc_run(line):
    words = shlex.split(line)
    r = run(*words[1:])
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip()


def test_every_package_of_the_tree_is_on_the_architecture_map():
    doc = DOC.read_text()
    for init in sorted((REPO / "controller" / "bastion").glob("*/__init__.py")):
        assert f"`bastion/{init.parent.name}/`" in doc, init.parent.name


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_an_upward_import_and_a_cycle_are_caught(tmp_path):
    root = _tree(tmp_path, {
        "controller/bastion/__init__.py": "",
        "controller/bastion/model.py": "from bastion.api import main\n",  # layer 2 -> 6
        "controller/bastion/api/__init__.py": "",
        "controller/bastion/api/main.py": "from bastion import model\n",
        "controller/bastion/match.py": "def f():\n    import bastion.paths\n",
        "controller/bastion/paths.py": "from bastion import match\n",  # a cycle inside layer 1
        "firmware/__init__.py": "",
        "firmware/dhcp.py": "from bastion import match\n",  # firmware importing the controller
    })  # fmt: skip
    r = run("--root", str(root))
    assert r.returncode == 1, r.stdout
    assert "bastion.model (layer 2) imports bastion.api.main (layer 6): upward" in r.stdout
    assert re.search(r"import cycle: .*bastion\.match <-> bastion\.paths", r.stdout)
    assert "firmware.dhcp imports bastion.match: firmware/ must not import the controller" in r.stdout


def test_a_module_in_no_layer_is_named(tmp_path):
    root = _tree(tmp_path, {"controller/bastion/__init__.py": "", "controller/bastion/misc.py": ""})
    r = run("--root", str(root))
    assert r.returncode == 1 and "bastion.misc: in no layer" in r.stdout
