"""The dashboard operated in a real headless Chromium (Debian's, through chromium-driver and
selenium) against a real `bastion serve` holding the sim board's serial line: refused without
the token and saying so, a log-in, a machine powered on with a confirmation, its boot timeline
filling in as the test boots it the way a node would (TFTP from the sim device, the controller's
HTTP, the callback, a heartbeat), a device refusal shown in its own words, and the pages on a
phone-sized screen. Every step leaves a screenshot under the directory the test prints."""

from __future__ import annotations

import subprocess
import threading

import httpx
import pytest
from bastion.state.events import EventStore
from bastion_testkit import TOKEN, Server
from browserkit import (
    INJECT_MARKUP,
    Steps,
    artefact_dir,
    browser_errors,
    chrome,
    confirm,
    csp_violations,
    log_in,
    press,
    record_csp_violations,
    until,
    wait_stages,
    wait_text,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.support.select import Select
from simkit import SimProcess, wait_for

# node1 switches on at once; with a long stagger node2 then waits its turn (and says so).
POWER = {"channels": [{"name": "node1"}, {"name": "node2"}, {"name": "pi1"}], "stagger_ms": 600_000}
MAC = "52:54:00:12:34:01"
BOOT_FILE = b"\x4d\x5a" + bytes(range(256)) * 40  # what the sim device serves as ipxe.efi



@pytest.fixture
def artefacts(request):
    return artefact_dir(request.node.name)


@pytest.fixture
def served(tmp_path, site_dir):
    flash = tmp_path / "flash"
    (flash / "tftp").mkdir(parents=True)
    (flash / "tftp" / "ipxe.efi").write_bytes(BOOT_FILE)
    with SimProcess(flash, tmp_path / "ttyACM0", {"power": POWER}) as board:
        srv = Server(site_dir, tmp_path / "events.db", TOKEN, device=str(board.link))
        try:
            wait_for(lambda: srv.get("/api/v1/device").json().get("connected"), what="device link")
            yield srv, board
        finally:
            srv.stop()


@pytest.fixture
def browser(tmp_path):
    with chrome(tmp_path / "chromium") as driver:
        yield driver


def relay(srv, ch: int) -> dict:
    return srv.get("/api/v1/device").json()["status"]["power"][ch]


def test_operate_a_machine_from_the_dashboard(served, browser, artefacts):
    srv, board = served
    d, steps = browser, Steps(browser, artefacts)
    d.get(srv.url + "/dashboard")
    wait_text(d, "#device", r"connected firmware 0\.2\.0 on sim")
    wait_text(d, "#health", r"heap\s+[0-9.]+ KiB allocated \(garbage included\)")
    wait_text(d, '#cluster tr[data-machine="node1"]', r"node1 worker Off never network boot every time")
    assert d.execute_script("return sessionStorage.length") == 0
    steps.shot("read-only")

    # Without the token: the click is sent, the API refuses, the page says so in its words.
    press(d, "node1", "on")
    text = wait_text(d, "#notice.bad", "refused")
    assert text == ("Power on node1 refused: a bearer token is required. Switching power needs the "
                    "API token: log in (top right).")  # fmt: skip
    assert relay(srv, 0)["output"] == "off"
    steps.shot("refused-without-token")

    # A wrong token is refused by the controller and not kept.
    d.find_element(By.ID, "token").send_keys("wrong-token-0123456789abcdef")
    d.find_element(By.ID, "login-button").click()
    assert wait_text(d, "#notice.bad", "Log-in") == "Log-in refused by the controller: wrong token"
    assert d.execute_script("return sessionStorage.length") == 0
    steps.shot("wrong-token")

    log_in(d, TOKEN)
    wait_text(d, "#notice.ok", "Logged in")
    # Kept in the tab's sessionStorage only: not in a cookie, not in the URL.
    assert d.execute_script("return sessionStorage.getItem('bastion.token')") == TOKEN
    assert d.execute_script("return document.cookie") == "" and TOKEN not in d.current_url
    steps.shot("logged-in")

    # The machine's page: power it on, with a confirmation first.
    d.find_element(By.CSS_SELECTOR, '#machines a[href="/dashboard/machines/node1"]').click()
    wait_text(d, "#since", "No boot recorded yet")
    assert d.find_element(By.ID, "console").get_attribute("href") == srv.url + "/dashboard/machines/node1/console"
    press(d, "node1", "on")
    confirm(d, steps, "confirm-power-on")
    assert wait_text(d, "#notice.ok", "done") == (
        "Power on node1: done. Relay ch 0 is on. The operator holds the machine until it is released.")
    assert relay(srv, 0)["output"] == "on"
    assert wait_stages(d, "power on") == ["power on"]  # from the sim device's own power event
    wait_text(d, "#since", "Since the device's last power-on")
    steps.shot("powered-on")

    # The test boots as node1 would: its boot file from the device's TFTP, then the controller's.
    got = subprocess.run(["curl", "-sS", "--max-time", "30", "-o", "-",
                          f"tftp://127.0.0.1:{board.tftp_port}/ipxe.efi"],
                         capture_output=True, timeout=60, check=False)  # fmt: skip
    assert got.stdout == BOOT_FILE, got.stderr
    wait_stages(d, "power on", "tftp start", "tftp end")
    steps.shot("timeline-tftp")
    node = httpx.Client(base_url=srv.url, timeout=30)
    assert node.get("/boot.ipxe").status_code == 200
    assert node.get("/ipxe", params={"mac": MAC}).status_code == 200
    assert node.get("/ignition", params={"mac": MAC}).status_code == 200
    wait_stages(d, "GET /ipxe", "GET /ignition")
    steps.shot("timeline-boot-script-and-ignition")
    assert node.post("/callback", json={"mac": MAC, "status": "ok"}).status_code == 200
    assert node.post("/heartbeat", data={"mac": MAC, "boot_id": "b1", "k3s": "active"}).status_code < 300
    got = wait_stages(d, "callback", "heartbeat")
    assert got[0] == "power on" and got.index("tftp end") < got.index("GET /ipxe") < got.index("callback")
    wait_text(d, "#heartbeat", r"s ago")
    steps.shot("timeline-callback-and-heartbeat")

    # The device refuses and the page shows its words: node2's power-on waits for its staggered
    # turn (node1 went on a moment ago), and a cycle of it is refused until then.
    d.get(srv.url + "/dashboard")
    wait_text(d, "#device", "connected")
    press(d, "node2", "on")
    confirm(d, steps, "confirm-node2-on")
    assert wait_text(d, "#notice.ok", "done") == (
        "Power on node2: done. Relay ch 1 is off, queued: it waits for its staggered turn to switch "
        "on. The operator holds the machine until it is released.")  # fmt: skip
    press(d, "node2", "cycle")
    confirm(d, steps, "confirm-node2-cycle")
    assert wait_text(d, "#notice.bad", "refused") == (
        "Power-cycle node2 refused by the device: power: node2 is still waiting for its staggered "
        "power-on")  # fmt: skip
    steps.shot("refused-by-the-device")

    # Events filtered by machine and kind (GET /api/v1/events?machine=&kind=).
    Select(d.find_element(By.ID, "f-machine")).select_by_visible_text("node1")
    Select(d.find_element(By.ID, "f-kind")).select_by_visible_text("power")
    rows = "return [...document.querySelectorAll('#events tbody tr')].map(r => [...r.cells].slice(2, 5).map(c => c.textContent))"
    until(d, lambda d: d.execute_script(rows) == [["power", "device", "node1"]], "filtered events")
    steps.shot("events-node1-power")
    # The filters are in the page's address: reloaded, the page shows the same events, chosen.
    until(d, lambda d: d.execute_script("return location.search") == "?machine=node1&kind=power",
          "the filters in the address")  # fmt: skip
    d.refresh()
    wait_text(d, "#updated", "live ·")
    assert [Select(d.find_element(By.ID, f)).first_selected_option.text
            for f in ("f-machine", "f-kind")] == ["node1", "power"]  # fmt: skip
    assert d.execute_script(rows) == [["power", "device", "node1"]]
    Select(d.find_element(By.ID, "f-kind")).select_by_visible_text("all")
    until(d, lambda d: d.execute_script("return location.search") == "?machine=node1",
          "only the machine's filter left in the address")  # fmt: skip

    # Logging out leaves the page read-only again.
    d.find_element(By.ID, "logout-button").click()
    assert wait_text(d, "#who", "read-only") == "read-only"
    assert d.execute_script("return sessionStorage.length") == 0


@pytest.mark.parametrize("page", ["/dashboard", "/dashboard/machines/node1"], ids=["site", "machine"])
def test_the_pages_fit_a_phone(served, browser, artefacts, page):
    srv, _ = served
    d = browser
    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                      {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    d.get(srv.url + page)
    wait_text(d, "#updated", "live ·")
    # Nothing wider than the screen: wide tables scroll inside their own box.
    assert d.execute_script("return document.documentElement.scrollWidth") <= 390
    button = d.find_element(By.CSS_SELECTOR, 'button[data-machine="node1"][data-state="on"]')
    assert button.is_displayed() and button.rect["x"] + button.rect["width"] <= 390
    Steps(d, artefacts).shot("phone-390x844")




@pytest.mark.parametrize("page", ["/dashboard", "/dashboard/machines/node1"], ids=["site", "machine"])
def test_the_pages_scripts_run_and_injected_ones_do_not(served, browser, artefacts, page):
    # The policy admits the <script> elements the template wrote (they carry the response's
    # nonce) and nothing else: the page's own scripts run with no violation and no console
    # error, and script put in by markup is refused, each refusal a violation of its own.
    srv, _ = served
    d = browser
    record_csp_violations(d)
    d.get(srv.url + page)
    wait_text(d, "#updated", "live ·")  # the page's own script polled the API
    wait_text(d, "#operator", "operator · sync")  # and base.html's shared one
    assert d.find_element(By.ID, "who").text == "read-only"
    assert csp_violations(d) == []
    assert browser_errors(d) == []  # /favicon.ico too: base.html names an empty icon
    Steps(d, artefacts).shot("live-under-the-policy")

    d.execute_script(INJECT_MARKUP)
    until(d, lambda d: d.execute_script("return window.injected") or len(csp_violations(d)) >= 2,
          "the injected scripts refused")  # fmt: skip
    assert d.execute_script("return window.injected") is None
    assert sorted(v.split(" ")[:2] for v in csp_violations(d)) == [
        ["script-src-attr", "inline"], ["script-src-elem", "inline"]]


def shown_ids(d) -> list[int]:
    return d.execute_script("return [...document.querySelectorAll('#events tbody tr')].map(r => +r.dataset.id)")


def wait_polls(d, n: int) -> None:
    """Until the page has polled the events n more times ("live · <time>" changes each poll)."""
    for _ in range(n):
        before = d.find_element(By.ID, "updated").text
        until(d, lambda d, before=before: d.find_element(By.ID, "updated").text != before, "the next poll")


def test_a_flood_of_events_shows_each_once_and_skips_none(tmp_path, site_dir, browser, artefacts):
    # More events than one poll reads (200) at once, filtered and not: the table ends as the
    # newest 200 that match, newest first, each once.
    srv = Server(site_dir, tmp_path / "events.db", TOKEN)
    store = EventStore(srv.db)
    try:
        d, steps = browser, Steps(browser, artefacts)
        d.get(srv.url + "/dashboard")
        wait_text(d, "#updated", "live ·")
        Select(d.find_element(By.ID, "f-machine")).select_by_visible_text("node1")
        until(d, lambda d: shown_ids(d) == [], "no node1 events yet")

        # One transaction: every event lands between two polls, node1's and node2's interleaved.
        ids = store.record_many([("dhcp", {"machine": ("node1", "node2")[i % 2], "source": "test"})
                                 for i in range(600)])  # fmt: skip
        node1 = ids[::2]
        until(d, lambda d: shown_ids(d)[:1] == node1[-1:], "the newest node1 event on top")
        wait_polls(d, 3)
        assert shown_ids(d) == node1[::-1][:200]
        steps.shot("flood-node1")

        # Unfiltered, while events keep coming one by one through several polls (fewer than a
        # poll's 200 each time: the page's reads then end at different events if it is racy).
        Select(d.find_element(By.ID, "f-machine")).select_by_visible_text("all")
        flooded: list[int] = []
        stop = threading.Event()

        def flood() -> None:
            while not stop.wait(0.01):
                flooded.append(store.record("dhcp", machine="node2", source="test"))

        writer = threading.Thread(target=flood)
        writer.start()
        try:
            wait_polls(d, 6)
        finally:
            stop.set()
            writer.join()
        until(d, lambda d: shown_ids(d)[:1] == flooded[-1:], "the newest event on top")
        wait_polls(d, 2)
        assert shown_ids(d) == flooded[::-1][:200]
        steps.shot("flood-all")
    finally:
        store.close()
        srv.stop()
