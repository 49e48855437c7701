"""Fixtures for the controller: example sites with fake assets, an app on a real SQLite file,
a real uvicorn on 127.0.0.1. Helpers live in bastion_testkit.py."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
from bastion_testkit import EXAMPLES, TOKEN, Server, make_app, write_assets

# Starlette's TestClient warns that it will move away from httpx; nothing to act on here.
warnings.filterwarnings("ignore", message=".*httpx.*")


@pytest.fixture
def matchbox_dir(tmp_path: Path) -> Path:
    site = tmp_path / "matchbox"
    shutil.copytree(EXAMPLES / "matchbox", site)
    write_assets(site, ("flatcar/current",))
    return site


@pytest.fixture
def site_dir(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    shutil.copytree(EXAMPLES / "site", site)
    write_assets(site, ("flatcar/amd64", "flatcar/arm64"))
    return site


@pytest.fixture
def client_for(tmp_path: Path):
    """client_for(site_dir, token=TOKEN, poll=0, client=None) -> a TestClient on a real SQLite
    file in tmp_path; `client`: the (address, port) its requests come from."""
    from fastapi.testclient import TestClient

    clients = []

    def make(site: Path, token: str | None = TOKEN, poll: float = 0,
             client: tuple[str, int] | None = None) -> TestClient:  # fmt: skip
        app = make_app(site, tmp_path / f"events{len(clients)}.db", token, poll)
        client = TestClient(app, **({"client": client} if client else {}))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def serve(tmp_path: Path):
    """serve(site_dir, token=TOKEN, poll=0.2, args=(), nofile=None, access_log=False) -> a
    running `bastion serve` (bastion_testkit.Server); stopped by PID."""
    servers: list[Server] = []

    def start(site: Path, token: str | None = TOKEN, poll: float = 0.2, **kw) -> Server:
        server = Server(site, tmp_path / f"serve{len(servers)}.db", token, poll, **kw)
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def umask_022():
    """The process's umask 022, as `bastion serve` started from a shell has it (the unit's is
    0077): what the controller makes must be private all the same."""
    import os

    old = os.umask(0o022)
    yield
    os.umask(old)
