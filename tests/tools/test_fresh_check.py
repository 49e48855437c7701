"""tools/fresh-check: its --help tells every option it takes, and it refuses what it does not.

The whole check (a debootstrapped Debian root, the README's two commands in it) takes tens of
minutes and needs Debian's mirror and PyPI: it is run by hand (README), not here.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "fresh-check"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(TOOL), *args], check=False, capture_output=True, text=True, timeout=30
    )


def test_help_names_every_option_the_parser_takes():
    parsed = set(re.findall(r"^\s+(--[a-z]+)\)", TOOL.read_text(), re.MULTILINE))
    assert parsed >= {"--rebuild", "--reuse", "--only", "--mirror"}
    out = run("--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Runs the README's two commands")
    for option in parsed:
        assert re.search(rf"^  {option}\b", out.stdout, re.MULTILINE), option
    assert "set -euo" not in out.stdout  # the comment block only


def test_unknown_arguments_are_refused_before_anything_is_built():
    for args in (["--bogus"], ["--only", "lab"], ["--rebuild", "--reuse"]):
        out = run(*args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert out.stderr.startswith("fresh-check: "), out.stderr
        assert out.stdout == ""
