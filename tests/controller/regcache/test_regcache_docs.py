"""docs/registry-cache.md kept true: its command lines exist (run with --help), its site.yaml
example loads and makes the instances it describes."""

from __future__ import annotations

import re
import shlex

import yaml
from bastion.cli import main
from bastion.regcache import plan
from bastion.site.load import load_site
from click.testing import CliRunner
from regcache_kit import REPO, home_lab

DOC = REPO / "docs" / "registry-cache.md"


def _blocks(lang: str) -> list[tuple[str, str]]:
    """(the line before, the body) of each fenced block in `lang`."""
    text = DOC.read_text()
    return [(m.group(1), m.group(2)) for m in re.finditer(
        rf"([^\n]*)\n```{lang}\n(.*?)```", text, re.DOTALL)]  # fmt: skip


def test_every_bastion_line_of_a_runnable_block_is_a_command():
    runnable = [body for before, body in _blocks("sh") if before.strip() == "<!-- runnable -->"]
    assert runnable
    lines = [ln.split("#")[0].strip() for body in runnable for ln in body.splitlines()]
    commands = [shlex.split(ln)[1:] for ln in lines if ln.startswith("bastion ")]
    assert len(commands) == 4
    for argv in commands:
        r = CliRunner().invoke(main, [*argv, "--help"])
        assert r.exit_code == 0, (argv, r.output)


def test_the_example_loads_and_serves_what_the_page_says(tmp_path):
    [(_, body)] = _blocks("yaml")
    section = yaml.safe_load(body)["cluster"]["registry_cache"]
    text = "  registry_cache:\n" + "".join(
        f"    {line}\n" for line in yaml.safe_dump(section, sort_keys=False).splitlines())  # fmt: skip
    cache = load_site(home_lab(tmp_path / "site", text)).settings.cluster.registry_cache
    assert {i.mirror: (i.port, i.upstream) for i in plan.instances(cache)} == {
        "docker.io": (5000, "https://registry-1.docker.io"), "ghcr.io": (5001, "https://ghcr.io"),
        "quay.io": (5002, "https://quay.io"), "registry.k8s.io": (5003, "https://registry.k8s.io"),
    }  # fmt: skip
