"""Two listeners (bastion.api.listeners): the boot endpoints on --listen, the management API,
dashboard, metrics and docs on --management-listen; through the application by the address a
request arrives on, and on the wire against one real `bastion serve` holding both sockets."""

from __future__ import annotations

import contextlib
import socket

import httpx
import pytest
from bastion.api.listeners import refusal
from bastion.settings import Settings, SettingsError
from bastion_testkit import TOKEN, auth, free_tcp_port, metric

BOOT = "http://127.0.0.1:8080"
MANAGEMENT = "http://127.0.0.1:9090"
MANAGEMENT_PATHS = ["/api/v1/machines", "/api/v1/site", "/api/v1/events", "/dashboard", "/",
                    "/metrics", "/docs", "/docs/vendor/swagger-ui-bundle.js", "/openapi.json",
                    "/api/v1/operator"]
BOOT_PATHS = ["/boot.ipxe", "/healthz", "/ipxe?mac=52:54:00:12:34:01",
              "/assets/flatcar/amd64/flatcar_production_pxe.vmlinuz"]


@pytest.fixture
def split_app(site_dir, tmp_path):
    """The application with a management listener, and a TestClient per listener."""
    from bastion.api.main import create_app
    from fastapi.testclient import TestClient

    settings = Settings(site_dir=site_dir, db_path=tmp_path / "events.db", api_token=TOKEN,
                        poll_seconds=0, listen="127.0.0.1:8080",
                        management_listen="127.0.0.1:9090")  # fmt: skip
    app = create_app(settings)
    with TestClient(app, base_url=BOOT) as boot, TestClient(app, base_url=MANAGEMENT) as mgmt:
        yield boot, mgmt


@pytest.mark.parametrize("path", MANAGEMENT_PATHS)
def test_a_management_path_on_the_boot_listener_is_refused_saying_where_it_is(split_app, path):
    boot, mgmt = split_app
    r = boot.get(path)
    assert r.status_code == 403
    assert r.json()["detail"] == refusal(path)
    assert "management listener (--management-listen)" in r.json()["detail"]
    assert mgmt.get(path).status_code == 200


def test_a_management_write_on_the_boot_listener_is_refused_before_its_token_and_body(split_app):
    boot, mgmt = split_app
    machine = {"mac": "52:54:00:12:34:09", "role": "worker"}
    r = boot.put("/api/v1/machines/intruder", json=machine, headers=auth())
    assert r.status_code == 403 and "management listener" in r.json()["detail"]
    assert r.headers["connection"] == "close"
    assert mgmt.get("/api/v1/machines/intruder").status_code == 404  # nothing was written
    assert boot.post("/api/v1/reload", headers=auth()).status_code == 403


def test_a_console_stream_on_the_boot_listener_is_refused_at_the_handshake(split_app):
    from starlette.websockets import WebSocketDisconnect

    boot, mgmt = split_app
    with pytest.raises(WebSocketDisconnect) as e:
        with boot.websocket_connect("ws://127.0.0.1:8080/api/v1/machines/node1/console/stream"):
            pass
    assert e.value.code == 1008 and "boot listener" in e.value.reason
    with mgmt.websocket_connect("ws://127.0.0.1:9090/api/v1/machines/node1/console/stream") as ws:
        ws.send_text('{"token": "wrong"}')
        with pytest.raises(WebSocketDisconnect) as e:
            ws.receive_bytes()
        assert e.value.code == 1008 and e.value.reason == "wrong token"


@pytest.mark.parametrize("path", BOOT_PATHS)
def test_boot_paths_are_served_on_both_listeners(split_app, path):
    boot, mgmt = split_app
    assert boot.get(path).status_code == 200
    assert mgmt.get(path).status_code == 200


def test_a_nodes_reports_reach_the_boot_listener(split_app):
    boot, mgmt = split_app
    r = boot.post("/callback", json={"mac": "52:54:00:12:34:01", "stage": "booted"})
    assert r.status_code == 200 and r.json()["ok"]
    r = boot.post("/heartbeat", data={"mac": "52:54:00:12:34:01"})
    assert r.status_code in (200, 202)
    kinds = [e["kind"] for e in mgmt.get("/api/v1/events").json()]
    assert "callback" in kinds


def test_refusals_are_counted(split_app):
    boot, mgmt = split_app
    boot.get("/api/v1/machines")
    boot.get("/dashboard")
    assert metric(mgmt, "bastion_listener_refusals_total") == 2


def test_without_a_management_listener_one_listener_serves_everything(client_for, site_dir):
    c = client_for(site_dir)
    for path in MANAGEMENT_PATHS + BOOT_PATHS:
        assert c.get(path).status_code == 200, path


def test_the_management_listener_needs_its_own_address(site_dir, monkeypatch):
    for listen, management in (("127.0.0.1:8080", "127.0.0.1:8080"),
                               ("0.0.0.0:8080", "10.89.0.1:8080"),
                               ("10.88.0.1:8080", "0.0.0.0:8080")):  # fmt: skip
        with pytest.raises(SettingsError, match=r"--management-listen .*: the boot listener"):
            Settings.build(site_dir=site_dir, listen=listen, management_listen=management)
    s = Settings.build(site_dir=site_dir, listen="10.88.0.1:8080", management_listen="10.89.0.1:8080")
    assert s.management_listen == ("10.89.0.1", 8080)
    with pytest.raises(SettingsError, match=r"--management-listen 'nope': expected HOST:PORT"):
        Settings.build(site_dir=site_dir, management_listen="nope")
    with pytest.raises(SettingsError, match=r"--management-interface br1: give --management-listen too"):
        Settings.build(site_dir=site_dir, management_interface="br1")
    with pytest.raises(SettingsError, match=r"--management-interface 'a b': not an interface name"):
        Settings.build(site_dir=site_dir, management_listen="127.0.0.1:9191", management_interface="a b")
    monkeypatch.setenv("BASTION_MANAGEMENT_INTERFACE", "lo")
    monkeypatch.setenv("BASTION_MANAGEMENT_LISTEN", "127.0.0.1:9191")
    assert Settings.build(site_dir=site_dir).management_interface == "lo"
    monkeypatch.delenv("BASTION_MANAGEMENT_INTERFACE")
    assert Settings.build(site_dir=site_dir).management_listen == ("127.0.0.1", 9191)
    monkeypatch.setenv("BASTION_MANAGEMENT_LISTEN", "")
    assert Settings.build(site_dir=site_dir).management_listen is None


# -- on the wire: one process, two sockets ------------------------------------------------------


def test_one_process_serves_both_listeners(serve, site_dir):
    mport = free_tcp_port()
    srv = serve(site_dir, args=("--management-listen", f"127.0.0.1:{mport}",
                                "--management-interface", "lo"))
    management = f"http://127.0.0.1:{mport}"
    r = srv.get("/api/v1/machines")
    assert r.status_code == 403 and r.json()["detail"] == refusal("/api/v1/machines")
    assert srv.get("/dashboard").status_code == 403
    assert srv.get("/boot.ipxe").status_code == 200
    r = httpx.get(management + "/api/v1/machines", timeout=30)
    assert r.status_code == 200 and r.json()
    assert httpx.get(management + "/dashboard", timeout=30).status_code == 200
    # one application: a machine added on the management side is served at once on the boot side
    body = {"mac": "52:54:00:12:34:09", "role": "worker"}
    r = httpx.put(management + "/api/v1/machines/node9", json=body, headers=auth(), timeout=30)
    assert r.status_code == 200, r.text
    assert srv.get("/metadata?mac=52:54:00:12:34:09").text.count("node9") >= 1
    text = httpx.get(management + "/metrics", timeout=30).text
    assert "bastion_listener_refusals_total 2.0" in text
    assert f"management 127.0.0.1:{mport} on lo only" in srv.log.read_text()
    assert "without --management-interface" not in srv.log.read_text()


def test_without_an_interface_serve_warns_that_any_interface_reaches_it(serve, site_dir):
    srv = serve(site_dir, args=("--management-listen", f"127.0.0.1:{free_tcp_port()}"))
    assert "warning: without --management-interface the management listener" in srv.log.read_text()


@contextlib.contextmanager
def taken_port():
    """A port on 127.0.0.1 that another socket listens on, meanwhile."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def test_a_management_listener_that_cannot_bind_is_named(serve, site_dir):
    with taken_port() as port:
        with pytest.raises(RuntimeError, match=rf"--management-listen 127.0.0.1:{port}: cannot listen"):
            serve(site_dir, args=("--management-listen", f"127.0.0.1:{port}"))
    with pytest.raises(RuntimeError, match=r"--management-listen 127.0.0.1:\d+ on nosuch0: cannot listen: No such device"):
        serve(site_dir, args=("--management-listen", f"127.0.0.1:{free_tcp_port()}",
                              "--management-interface", "nosuch0"))


def test_a_boot_listener_that_cannot_be_had_is_named_before_anything_starts(serve, site_dir, tmp_path):
    # one listener is bound by serve itself, as two are: the error names the option, and the
    # history (opened by create_app) is never made
    with taken_port() as port:
        with pytest.raises(RuntimeError, match=rf"Error: --listen 127.0.0.1:{port}: cannot listen: Address already in use"):
            serve(site_dir, args=("--listen", f"127.0.0.1:{port}"))
    with pytest.raises(RuntimeError, match=r"exited 1:\n.*Error: --listen nosuchhost\.invalid:8080: "):
        serve(site_dir, args=("--listen", "nosuchhost.invalid:8080"))
    assert not list(tmp_path.glob("serve*.db"))


def test_serve_warns_of_listeners_off_the_sites_networks(serve, site_dir):
    with open(site_dir / "site.yaml", "a") as f:
        f.write("networks:\n  pxe: {subnet: 10.77.0.0/24}\n  management: {subnet: 10.79.0.0/24}\n")
    srv = serve(site_dir)
    log = srv.log.read_text()
    assert f"warning: --listen 127.0.0.1:{srv.port} is not on site.yaml networks.pxe (10.77.0.0/24)" in log
    assert "warning: site.yaml declares networks.management (10.79.0.0/24): serve the management API" in log
