"""A browser's request through a name the controller does not know is refused
(bastion.api.hostcheck): a web page that makes its own name resolve to the controller's address
(DNS rebinding) would read the open API as its own origin. Through the application, and on the
wire against a real `bastion serve`, whose boot GETs are otherwise answered before the
middleware."""

from __future__ import annotations

import re
import socket

import httpx
import pytest
import yaml
from bastion.api.hostcheck import host_name, refusal
from bastion.settings import Settings, SettingsError
from bastion_testkit import TOKEN

# what Chromium sends with a same-origin fetch() and a navigation
FETCH = {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}
NAVIGATE = {"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate"}
PATHS = ["/api/v1/machines", "/api/v1/events", "/dashboard", "/metrics", "/boot.ipxe",
         "/ipxe?mac=52:54:00:12:34:01"]  # fmt: skip


@pytest.fixture
def app(site_dir, tmp_path):
    from bastion.api.main import create_app

    settings = Settings(site_dir=site_dir, db_path=tmp_path / "events.db", api_token=TOKEN,
                        poll_seconds=0, allowed_hosts="bastion.lan")  # fmt: skip
    return create_app(settings)


def client(app, host):
    from fastapi.testclient import TestClient

    return TestClient(app, base_url=f"http://{host}")


@pytest.mark.parametrize("path", PATHS)
def test_a_browser_through_a_name_of_its_own_is_refused_saying_what_to_do(app, path):
    with client(app, "evil.example:8080") as c:
        for headers in (FETCH, NAVIGATE, {"Origin": "http://evil.example:8080"}):
            r = c.get(path, headers=headers)
            assert r.status_code == 403, (path, headers, r.text)
            assert r.json()["detail"] == refusal("evil.example")
            assert "--allowed-hosts evil.example (BASTION_ALLOWED_HOSTS)" in r.json()["detail"]
        # the same request without a browser's headers: iPXE, curl, bastion's commands
        assert c.get(path).status_code == 200


@pytest.mark.parametrize("host", ["127.0.0.1:8080", "[::1]:8080", "10.77.0.1", "localhost:8080",
                                  "LOCALHOST.", "bastion.lan:8080", socket.gethostname()])
def test_a_browser_through_an_address_or_a_known_name_is_answered(app, host):
    with client(app, host) as c:
        for path in PATHS:
            assert c.get(path, headers=FETCH).status_code == 200, (host, path)


def test_site_yaml_controller_url_names_the_controller_and_a_reload_follows_it(app, site_dir):
    with client(app, "bastion.lan") as c:
        headers = {"Authorization": f"Bearer {TOKEN}", **FETCH}
        doc = yaml.safe_load((site_dir / "site.yaml").read_text())
        for name in ("pxe.home.arpa", "other.home.arpa"):
            doc["controller_url"] = f"http://{name}:8080"
            (site_dir / "site.yaml").write_text(yaml.safe_dump(doc))
            assert c.post("/api/v1/reload", headers=headers).status_code == 200
            with client(app, f"{name}:8080") as named:
                assert named.get("/api/v1/machines", headers=FETCH).status_code == 200
        with client(app, "pxe.home.arpa:8080") as old:  # no longer the controller's name
            assert old.get("/api/v1/machines", headers=FETCH).status_code == 403


def test_a_console_stream_through_an_unknown_name_is_refused_at_the_handshake(app):
    from starlette.websockets import WebSocketDisconnect

    with client(app, "evil.example") as c, pytest.raises(WebSocketDisconnect) as e, \
            c.websocket_connect("/api/v1/machines/node1/console/stream",
                                headers={"Origin": "http://evil.example"}):  # fmt: skip
        pass
    assert e.value.code == 1008


def test_allowed_hosts_are_host_names(site_dir):
    s = Settings.build(site_dir=site_dir, allowed_hosts=" Bastion.LAN., pxe ")
    assert s.allowed_hosts == "bastion.lan,pxe"
    for bad in ("http://bastion.lan", "bastion.lan:8080", "-x", "a b", "*.lan"):
        with pytest.raises(SettingsError, match=re.escape(f"--allowed-hosts '{bad.lower()}': not a host name")):
            Settings.build(site_dir=site_dir, allowed_hosts=bad)


def test_host_names_from_host_headers():
    assert host_name(b"Evil.Example.:8080") == "evil.example"
    assert host_name(b"[fe80::1]:80") == "fe80::1"
    assert host_name(b"10.0.0.1") == "10.0.0.1"
    assert host_name(b"") == ""


def test_on_the_wire_the_boot_gets_answered_before_the_middleware_are_checked_too(serve, site_dir):
    # `bastion serve` answers /boot.ipxe and /ipxe past the application's middleware
    # (bastion.api.httpserver); a browser's must not be.
    server = serve(site_dir)
    with httpx.Client(base_url=server.url, timeout=10) as c:
        for path in ("/boot.ipxe", "/ipxe?mac=52:54:00:12:34:01", "/api/v1/machines"):
            r = c.get(path, headers={"Host": "evil.example", **FETCH})
            assert r.status_code == 403 and "DNS rebinding" in r.json()["detail"], (path, r.text)
            assert c.get(path, headers={"Host": "evil.example"}).status_code == 200
            assert c.get(path, headers=FETCH).status_code == 200  # Host 127.0.0.1:PORT
