"""The dashboard in a real headless Chromium against a real `bastion serve` holding the sim
board's serial line: the server-rendered machines and events, and what only the page's own
JavaScript can show (the device's relays and its live status, fetched from the JSON API)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from bastion_testkit import TOKEN, Server, auth

from simkit import SimProcess, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
POWER = {"channels": [{"name": "node1"}, {"name": "node2"}, {"name": "pi1"}]}


def chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (tools/setup installs it)")
    # The flags keep a headless Chromium off the network it has no business with here.
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-default-apps", f"--user-data-dir={tmp / 'chromium'}",
             "--virtual-time-budget=8000"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def served(tmp_path, site_dir):
    with SimProcess(tmp_path / "flash", tmp_path / "ttyACM0", {"power": POWER}) as board:
        srv = Server(site_dir, tmp_path / "events.db", TOKEN, device=str(board.link))
        try:
            wait_for(lambda: srv.get("/api/v1/device").json().get("connected"),
                     what="device link")
            yield srv, board
        finally:
            srv.stop()


def test_the_dashboard_shows_machines_events_and_the_live_device(served, tmp_path):
    srv, board = served
    r = httpx.post(srv.url + "/api/v1/machines/node2/power", json={"state": "on"},
                   headers=auth(), timeout=30)
    assert r.status_code == 200
    httpx.post(srv.url + "/callback", json={"mac": "52:54:00:12:34:01", "status": "ok"},
               timeout=30)
    wait_for(lambda: srv.get("/api/v1/device").json()["status"]["power"][1]["output"] == "on",
             what="relay 1 on")
    out = chromium("--dump-dom", srv.url + "/dashboard", tmp=tmp_path)
    dom = out.stdout
    assert "<title>Edge Bastion · home-lab</title>" in dom, out.stderr[-2000:]
    # Server-rendered: the site's machines, and node1's callback as its last step.
    for name in ("node1", "node2", "pi1"):
        assert f'data-machine="{name}"' in dom
    assert "callback /callback" in dom
    # Only the page's JavaScript puts these in: the device panel and its relay table, from
    # GET /api/v1/device, and the live marker after a successful poll of the events.
    assert 'class="pill on">connected</span>' in dom
    assert "firmware 0.2.0 on sim" in dom
    assert '<tr data-channel="1"><td>ch 1</td><td>node2</td><td><span class="pill on">on</span>' in dom
    assert '<tr data-channel="0"><td>ch 0</td><td>node1</td><td><span class="pill">off</span>' in dom
    assert '<span class="meta" id="updated">live · ' in dom
    # The machines' status, from the operator: node2 was switched by a person, so it is held;
    # the page's script fetched it (GET /api/v1/operator) and says how the operator runs.
    assert ('<td class="status"><span class="pill Held" title="power on by api">'
            'Held (power on by api)</span></td>') in dom
    assert '<span class="meta" id="operator">operator · sync auto · ' in dom


def test_a_screenshot_renders(served, tmp_path):
    srv, _ = served
    png = tmp_path / "dashboard.png"
    chromium(f"--screenshot={png}", "--window-size=1280,900", srv.url + "/dashboard", tmp=tmp_path)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000  # a page, not a blank


def test_the_pages_talk_to_this_controller_only(site_dir, client_for):
    # The pages hold the API token after a log-in: no other origin for their requests, no
    # framing by another site, nothing cached.
    c = client_for(site_dir)
    for path in ("/dashboard", "/dashboard/machines/node1"):
        r = c.get(path)
        assert r.status_code == 200, path
        csp = dict(d.strip().split(" ", 1) for d in r.headers["content-security-policy"].split(";"))
        assert csp["default-src"] == "'none'" and csp["connect-src"] == "'self'"
        assert csp["frame-ancestors"] == "'none'"
        assert r.headers["cache-control"] == "no-store"
    page = c.get("/dashboard/machines/node1").text
    assert 'href="/dashboard/machines/node1/console"' in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere
    r = c.get("/dashboard/machines/nope")
    assert r.status_code == 404 and r.json() == {"detail": "no machine 'nope' in machines.yaml"}


def policy(r) -> dict[str, str]:
    return dict(d.strip().split(" ", 1) for d in r.headers["content-security-policy"].split(";"))


def nonced_tags(page: str, nonce: str) -> tuple[list[str], list[str]]:
    """The page's <script> and <style> start tags: all of them, and those carrying `nonce`."""
    tags = re.findall(r"<(?:script|style)\b[^>]*>", page)
    return tags, [t for t in tags if f'nonce="{nonce}"' in t]


def test_the_pages_run_only_the_scripts_and_styles_they_were_served_with(site_dir, client_for):
    # No 'unsafe-inline': markup that slips into a page cannot run script. The policy names a
    # nonce, new for each response, and every <script> and <style> the template wrote carries
    # it; no inline event handler (onclick=...) is left for the policy to refuse.
    c = client_for(site_dir)
    for path in ("/dashboard", "/dashboard/machines/node1"):
        first, again = c.get(path), c.get(path)
        nonces = []
        for r in (first, again):
            assert "unsafe-inline" not in r.headers["content-security-policy"], path
            csp = policy(r)
            nonce = re.fullmatch(r"'nonce-([A-Za-z0-9_-]{22,})'", csp["script-src"]).group(1)
            assert csp["style-src"] == csp["script-src"], path
            tags, nonced = nonced_tags(r.text, nonce)
            assert len(tags) >= 3 and nonced == tags, (path, tags)
            assert not re.search(r"<[a-z][^>]*\son[a-z]+=", r.text), path
            nonces.append(nonce)
        assert nonces[0] != nonces[1], path


def test_the_events_filter_in_the_address_is_rendered_chosen(site_dir, client_for):
    # /dashboard?machine=&kind= (the page writes its filters there): the newest events that
    # match, and the two menus showing them chosen; a machine no longer declared keeps its own.
    import re

    c = client_for(site_dir)
    store = c.app.state.runtime.store
    for i in range(3):
        store.record("dhcp", machine="node1", source="test", payload={"n": i})
        store.record("power", machine="node1", source="test", payload={"n": i})
        store.record("dhcp", machine="node2", source="test", payload={"n": i})
    store.record("dhcp", machine="gone", source="test")

    def shown(path):
        page = c.get(path).text
        table = page.split('<table id="events"', 1)[1].split("</table>", 1)[0]
        rows = re.findall(r"<tr data-id=\"\d+\"><td>\d+</td><td[^>]*></td><td>([^<]*)</td>"
                          r"<td class=\"wide-only\">[^<]*</td><td>([^<]*)</td>", table)  # fmt: skip
        chosen = re.findall(r'<select id="(f-\w+)">.*?<option selected>([^<]*)</option>', page)
        return rows, dict(chosen)

    rows, chosen = shown("/dashboard?machine=node1&kind=dhcp")
    assert rows == [("dhcp", "node1")] * 3 and chosen == {"f-machine": "node1", "f-kind": "dhcp"}
    rows, chosen = shown("/dashboard?machine=node2")
    assert rows == [("dhcp", "node2")] * 3 and chosen == {"f-machine": "node2"}
    rows, chosen = shown("/dashboard?machine=gone")
    assert rows == [("dhcp", "gone")] and chosen == {"f-machine": "gone"}
    rows, chosen = shown("/dashboard?machine=&kind=")  # "all": every event, nothing chosen
    assert len(rows) >= 10 and chosen == {}
