"""`bastion registry-cache run` serving what the nodes are told, as the site changes: each
endpoint that registries.yaml names proxies the registry it is named for.

The registries here are a stand-in (FAKE_REGISTRY): Distribution 2.8 in proxy mode exits at
start when it cannot reach its upstream, and these tests have no internet; the stand-in reads
the config.yml it is given as `docker-registry serve` does and answers every request with the
remoteurl it proxies. test_registry_cache_pull.py runs the real registry."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from bastion.regcache import plan
from bastion.site.load import SiteError, load_site
from regcache_kit import home_lab

FAKE_REGISTRY = """\
import json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
import yaml

assert sys.argv[1] == "serve", sys.argv
config = yaml.safe_load(open(sys.argv[2]))
host, _, port = config["http"]["addr"].rpartition(":")
answer = json.dumps({"remoteurl": config["proxy"]["remoteurl"], "pid": os.getpid()}).encode()

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass

HTTPServer((host.strip("[]"), int(port)), Handler).serve_forever()
"""


UPSTREAMS = {"docker.io": "https://registry-1.docker.io", "ghcr.io": "https://ghcr.io",
             "quay.io": "https://quay.io"}  # fmt: skip


def _free_ports(n: int) -> int:
    """The first of n consecutive free TCP ports on 127.0.0.1."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + n > 65535:
            continue
        held = []
        try:
            for port in range(first, first + n):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


class CacheRun:
    """The site, and `bastion registry-cache run` on it with the stand-in registry. `mirrors`:
    the list form, or mirror -> port given as an offset from `base` (len(UPSTREAMS) + 1 free
    consecutive ports from there)."""

    def __init__(self, tmp: Path, mirrors: list[str] | dict[str, int]):
        self.base = _free_ports(len(UPSTREAMS) + 1)
        self._told: dict[str, str] = {}
        self.site = home_lab(tmp / "site", self.section(mirrors))
        bindir = tmp / "bin"
        bindir.mkdir()
        fake = bindir / "docker-registry"
        fake.write_text(f"#!{sys.executable}\n{FAKE_REGISTRY}")
        fake.chmod(0o755)
        self.log = tmp / "run.log"
        env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).with_name("bastion")), "registry-cache", "run",
                 "--site", str(self.site), "--state", str(tmp / "state"),
                 "--secrets-dir", str(tmp / "secrets"), "--restart-after", "0.5"],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip

    def section(self, mirrors: list[str] | dict[str, int]) -> str:
        if isinstance(mirrors, dict):
            mirrors = {mirror: self.base + offset for mirror, offset in mirrors.items()}
        return (f"  registry_cache:\n    url: http://127.0.0.1:{self.base}\n"
                f"    mirrors: {json.dumps(mirrors)}\n    serve: {{}}\n")  # fmt: skip

    def edit(self, mirrors: list[str] | dict[str, int]) -> None:
        """Change the site's mirrors, as a person editing site.yaml would."""
        path = self.site / "site.yaml"
        text = path.read_text()
        start = text.index("  registry_cache:\n")
        end = text.index("    serve: {}\n", start) + len("    serve: {}\n")
        path.write_text(text[:start] + self.section(mirrors) + text[end:])

    def told(self) -> dict[str, str]:
        """What a node booted now is told: mirror -> endpoint (its registries.yaml), from the
        last site that loaded, as `bastion serve` keeps its last good site."""
        try:
            self._told = plan.endpoints(load_site(self.site).settings.cluster.registry_cache)
        except SiteError:
            pass
        return self._told

    def proxied(self) -> dict[str, tuple[str | None, int | None]]:
        """mirror -> (the upstream its endpoint proxies, the registry's pid), for what a node
        booted now is told."""
        out: dict[str, tuple[str | None, int | None]] = {}
        for mirror, endpoint in self.told().items():
            try:
                with urllib.request.urlopen(endpoint + "/v2/", timeout=5) as r:
                    answer = json.loads(r.read())
                out[mirror] = (answer["remoteurl"], answer["pid"])
            except (urllib.error.URLError, ConnectionError):
                out[mirror] = (None, None)
        return out

    def serving(self) -> dict[str, tuple[str | None, int | None]]:
        """proxied(), once every endpoint proxies the registry it is named for (or after 30 s:
        the runner follows the site within seconds)."""
        deadline = time.monotonic() + 30
        while True:
            got = self.proxied()
            if all(up == UPSTREAMS[m] for m, (up, _) in got.items()) or time.monotonic() > deadline:
                return got
            time.sleep(0.2)

    def wait_for_output(self, text: str) -> None:
        deadline = time.monotonic() + 30
        while text not in self.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert text in self.log.read_text()

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)  # the runner stops its registries
        try:
            self.proc.wait(timeout=20)
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # whatever it left behind
            except ProcessLookupError:
                pass
            self.proc.wait()


def _upstreams(got: dict[str, tuple[str | None, int | None]]) -> dict[str, str | None]:
    return {mirror: upstream for mirror, (upstream, _pid) in got.items()}


@pytest.fixture
def cache_run(tmp_path):
    runs: list[CacheRun] = []

    def start(mirrors: list[str] | dict[str, int]) -> CacheRun:
        runs.append(CacheRun(tmp_path, mirrors))
        return runs[-1]

    yield start
    for run in runs:
        run.stop()


def test_a_registry_inserted_in_mirrors_is_served_where_new_nodes_are_told(cache_run):
    # The runner rendered its configs once at start while `bastion serve` reloaded the site:
    # nodes booted after quay.io was put first were told docker.io on the port that proxied
    # ghcr.io, and quay.io on docker.io's.
    run = cache_run(["docker.io", "ghcr.io"])
    assert _upstreams(run.serving()) == {m: UPSTREAMS[m] for m in ("docker.io", "ghcr.io")}
    run.edit(["quay.io", "docker.io", "ghcr.io"])
    assert _upstreams(run.serving()) == UPSTREAMS, run.log.read_text()
    # a node booted before the edit still pulls docker.io through the first port: said
    run.wait_for_output(f"warning: http://127.0.0.1:{run.base} served docker.io and now serves "
                        "quay.io: a node booted before this edit pulls docker.io's images through "
                        "quay.io's proxy")  # fmt: skip


def test_a_registry_added_at_the_end_leaves_the_others_serving_undisturbed(cache_run):
    run = cache_run(["docker.io", "ghcr.io"])
    before = run.serving()
    run.edit(["docker.io", "ghcr.io", "quay.io"])
    after = run.serving()
    assert _upstreams(after) == UPSTREAMS, run.log.read_text()
    # the same ports and upstreams: the same registry processes, not restarted
    assert after["docker.io"] == before["docker.io"] and after["ghcr.io"] == before["ghcr.io"]


def test_a_site_edit_that_does_not_load_keeps_the_mirrors_serving_as_they_were(cache_run):
    run = cache_run(["docker.io", "ghcr.io"])
    before = run.serving()
    assert _upstreams(before) == {m: UPSTREAMS[m] for m in ("docker.io", "ghcr.io")}
    run.edit(["docker.io", "*"])
    run.wait_for_output("mirrors: '*' cannot be served")
    assert run.proxied() == before
    run.edit(["docker.io", "ghcr.io"])  # put back: nothing to restart
    run.wait_for_output("the site changed: the mirrors are served as before")
    assert run.proxied() == before


def test_a_reorder_with_given_ports_restarts_nothing_and_moves_no_port(cache_run):
    run = cache_run({"docker.io": 0, "ghcr.io": 1, "quay.io": 2})
    before = run.serving()
    assert _upstreams(before) == UPSTREAMS, run.log.read_text()
    run.edit({"quay.io": 2, "ghcr.io": 1, "docker.io": 0})
    run.wait_for_output("the site changed: the mirrors are served as before")
    # every registry on its port, by the same registry process
    assert run.told() == {m: f"http://127.0.0.1:{run.base + i}" for i, m in enumerate(UPSTREAMS)}
    assert run.proxied() == before
    assert "warning:" not in run.log.read_text()


def test_a_changed_port_restarts_that_mirror_only(cache_run):
    run = cache_run({"docker.io": 0, "ghcr.io": 1, "quay.io": 2})
    before = run.serving()
    assert _upstreams(before) == UPSTREAMS, run.log.read_text()
    run.edit({"docker.io": 0, "ghcr.io": 3, "quay.io": 2})
    after = run.serving()
    assert _upstreams(after) == UPSTREAMS, run.log.read_text()
    assert run.told()["ghcr.io"] == f"http://127.0.0.1:{run.base + 3}"
    assert after["docker.io"] == before["docker.io"] and after["quay.io"] == before["quay.io"]
    assert after["ghcr.io"][1] != before["ghcr.io"][1]
    assert "the site changed: stopping ghcr.io\n" in run.log.read_text()
