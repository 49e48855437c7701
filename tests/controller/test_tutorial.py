"""docs/tutorial.md, run: the command blocks it marks as runnable here, in order.

Markers (an HTML comment on the line before a fenced block, blank lines between allowed):

<!-- test: runs -->
    The block runs as one bash script (`set -euo pipefail`) in the work directory and must exit
    0. `| expect: TEXT` adds: its output (stdout and stderr) contains TEXT; `| exit: N`: it
    must exit N instead.
<!-- test: runs against a loopback mirror -->
    The same, with each `bastion assets fetch flatcar|k3s` line pointed at a loopback mirror
    (mirrorkit) laid out like Flatcar's release server and GitHub's k3s releases: `--mirror`,
    and for Flatcar `--key-url` and `--key-fingerprint` of a key the test makes, are appended.
    The mirror holds a stable release per architecture signed with that key, the key at
    www.flatcar.org's path, and a made-up k3s release of the example's version.
<!-- test: runs in background -->
    The block's one command is started and left running (a server) until the last block has
    run; the test waits for http://127.0.0.1:8080/healthz first, then stops it by its PID.

The work directory is a temporary one holding a copy of examples/home-lab at the same path, with
the project's .venv/bin first on PATH, HOME and XDG_STATE_HOME (so the secret store and the
event history) inside it, no BASTION_* variables, and 127.0.0.1:8080 replaced by a free port on
the loopback address. Nothing leaves the machine.

Every `bastion ...` line of the tutorial, run or not, must also be a command the CLI has (it is
run with --help appended), so the commands it cannot run here stay true too.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from bastion_testkit import EXAMPLES, REPO, free_tcp_port
from mirrorkit import (
    drop_key,
    flatcar_args,
    k3s_url,
    make_key,
    publish_flatcar,
    publish_k3s,
    publish_key,
    serving,
)

TUTORIAL = REPO / "docs" / "tutorial.md"
_MARKER = re.compile(r"^<!--\s*test:\s*(.*?)\s*-->$")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass
class Block:
    line: int
    text: str
    marker: dict[str, str]

    @property
    def where(self) -> str:
        return f"docs/tutorial.md:{self.line}"


def blocks() -> list[Block]:
    lines = TUTORIAL.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        start = i
        i += 1
        body = []
        while i < len(lines) and lines[i] != "```":
            body.append(lines[i])
            i += 1
        i += 1
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        m = _MARKER.match(lines[j].strip()) if j >= 0 else None
        marker: dict[str, str] = {}
        if m:
            for k, part in enumerate(m.group(1).split("|")):
                key, _, value = part.partition(":")
                marker["run" if k == 0 else key.strip()] = part.strip() if k == 0 else value.strip()
        out.append(Block(start + 1, "".join(b + "\n" for b in body), marker))
    return out


BLOCKS = blocks()
RUN = [b for b in BLOCKS if b.marker]


def bastion_lines() -> list[tuple[Block, str]]:
    out = []
    for b in BLOCKS:
        for line in b.text.splitlines():
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue
            while words and _ASSIGNMENT.match(words[0]):
                words.pop(0)
            if words[:1] == ["bastion"]:
                out.append((b, line))
    return out


def test_the_tutorial_marks_what_it_runs():
    kinds = [b.marker["run"] for b in RUN]
    assert set(kinds) <= {"runs", "runs in background", "runs against a loopback mirror"}, kinds
    assert kinds.count("runs against a loopback mirror") == 1
    assert kinds.count("runs in background") == 1
    assert kinds.count("runs") >= 6
    assert len(bastion_lines()) >= 12


@pytest.mark.parametrize(("block", "line"), bastion_lines(), ids=lambda x: x.where if isinstance(x, Block) else x.strip()[:70])
def test_every_bastion_command_of_the_tutorial_exists(block, line):
    words = shlex.split(line, comments=True)
    while _ASSIGNMENT.match(words[0]):
        words.pop(0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    r = subprocess.run([str(REPO / ".venv/bin/bastion"), *words[1:], "--help"], cwd=REPO, env=env,
                       check=False, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, f"{block.where}: {line}\n{r.stdout}{r.stderr}"


@pytest.fixture
def mirror():
    """Flatcar's and k3s's download sites on loopback, with what the tutorial fetches."""
    key = make_key("Tutorial Buildbot")
    try:
        with serving() as m:
            publish_key(m, key)
            for arch in ("amd64", "arm64"):
                publish_flatcar(m, key, arch=arch, kernel_size=200_000, initrd_size=300_000)
            publish_k3s(m, "v1.31.4+k3s1")
            m.key = key
            yield m
    finally:
        drop_key(key)


def _pointed_at(script: str, mirror) -> str:
    """Each `bastion assets fetch flatcar|k3s` line with the mirror's options appended."""
    out = []
    for line in script.splitlines():
        words = line.split()
        if words[:4] == ["bastion", "assets", "fetch", "flatcar"]:
            line += " " + shlex.join(flatcar_args(mirror, mirror.key))
        elif words[:4] == ["bastion", "assets", "fetch", "k3s"]:
            line += " " + shlex.join(["--mirror", k3s_url(mirror)])
        out.append(line)
    return "\n".join(out) + "\n"


def test_the_tutorial_runs(tmp_path, mirror):
    work = tmp_path / "work"
    shutil.copytree(EXAMPLES / "home-lab", work / "examples" / "home-lab")
    (work / "home").mkdir()
    port = free_tcp_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "HOME": str(work / "home"),
        "XDG_STATE_HOME": str(work / "state"),
        "PYTHONUNBUFFERED": "1",
    })  # fmt: skip
    server: subprocess.Popen | None = None
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 (the server writes it until the end)
    try:
        for b in RUN:
            script = b.text.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
            if b.marker["run"] == "runs in background":
                assert server is None and len(script.strip().splitlines()) == 1, b.where
                server = subprocess.Popen(["bash", "-c", f"exec {script.strip()}"], cwd=work, env=env,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
                _wait_healthy(server, port, tmp_path / "serve.log", b)
                continue
            if b.marker["run"] == "runs against a loopback mirror":
                script = _pointed_at(script, mirror)
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env,
                               check=False, capture_output=True, text=True, timeout=120)  # fmt: skip
            want = int(b.marker.get("exit", "0"))
            assert r.returncode == want, f"{b.where}:\n{script}\n{r.stdout}{r.stderr}"
            if "expect" in b.marker:
                out = r.stdout + r.stderr
                assert b.marker["expect"] in out, f"{b.where}: no {b.marker['expect']!r} in\n{out}"
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        log.close()
    site = work / "site"
    # what the commands made: the site copy (no secret in it), the secret store, the history
    store = work / "state" / "edge-bastion" / "secrets" / "home-lab"
    names = sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file())
    # each node's key, and the tunnel address it went out with (recorded for later plans)
    assert names == [f"wireguard/{n}.{x}" for n in ("nuc1", "pi1", "pi2", "pi3") for x in ("address", "key")]
    keys = [(store / n).read_text().strip() for n in names if n.endswith(".key")]
    for path in site.rglob("*"):
        if path.is_file():
            assert not any(k in path.read_text(errors="replace") for k in keys), path
    # the site's own history, under the name and directory it was served from
    histories = list((work / "state" / "edge-bastion" / "history").glob("*/events.db"))
    assert [p.parent.name.rsplit("-", 1)[0] for p in histories] == ["home-lab"]


def _wait_healthy(server: subprocess.Popen, port: int, log: Path, block: Block) -> None:
    deadline = time.monotonic() + 30
    while True:
        if server.poll() is not None:
            pytest.fail(f"{block.where}: the server exited {server.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{block.where}: the server did not come up:\n{log.read_text()}")
        time.sleep(0.1)
