"""The console page (/dashboard/machines/{name}/console) in a real headless Chromium (Debian's,
through chromium-driver and selenium; tests/browserkit.py) against a real `bastion serve`
holding the sim board's serial line, with a test process as node2's serial console on the sim
board's console socket: a wrong token is refused and the page says so; with the token, xterm.js
(served by the controller from web/node_modules) shows the node's output, and keys typed into
the terminal reach the node. Every step leaves a screenshot under the directory the test
prints."""

from __future__ import annotations

import socket
import threading

import pytest
from bastion.api.console_page import xterm_missing
from bastion_testkit import TOKEN, Server
from browserkit import (
    INJECT_MARKUP,
    Steps,
    artefact_dir,
    browser_errors,
    chrome,
    csp_violations,
    record_csp_violations,
    until,
    wait_text,
)
from selenium.webdriver.common.by import By
from simkit import SimProcess, wait_for

POWER = {"channels": [{"name": "node1"}, {"name": "node2"}, {"name": "pi1"}]}


@pytest.fixture
def served(tmp_path, site_dir):
    if xterm_missing():
        pytest.skip("xterm.js is not installed: run tools/setup (npm ci in web/)")
    # node consoles need 160k on the 64-bit port (firmware/main.py NODECONS_MIN_FREE)
    with SimProcess(tmp_path / "flash", tmp_path / "ttyACM0", {"power": POWER},
                    args=("--heap", "160k")) as board:
        srv = Server(site_dir, tmp_path / "events.db", TOKEN, device=str(board.link),
                     args=("--console-dir", str(tmp_path / "consoles")))
        try:
            wait_for(lambda: srv.get("/api/v1/device").json().get("connected"), what="device link")
            yield srv, board
        finally:
            srv.stop()


def screen(driver) -> str:
    """What the terminal shows, row by row (xterm.js's DOM renderer)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('.xterm-rows > div')].map(r => r.textContent)"
        ".join('\\n')")


def scrollback(driver) -> str:
    """Everything the terminal holds, the lines scrolled away too (xterm.js's own buffer)."""
    return driver.execute_script(
        "const b = window.bastionTerminal.buffer.active, lines = [];"
        "for (let i = 0; i < b.length; i++) lines.push(b.getLine(i).translateToString(true));"
        "return lines.join('\\n')")


# What markup slipped into the page would try (browserkit.INJECT_MARKUP), and a script from this
# controller too: it serves text/plain boot scripts and assets.
INJECT = INJECT_MARKUP + """
const t = document.createElement("script");
t.src = "/boot.ipxe";
document.body.append(t);
"""


def test_the_console_page_shows_the_node_and_types_into_it(served, tmp_path, request):
    srv, board = served
    path = board.link.parent / "flash" / "consoles" / "1.sock"  # node2: relay channel 1
    wait_for(path.exists, what=str(path))
    node = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    node.connect(str(path))
    typed = bytearray()

    def read():
        while data := node.recv(4096):
            typed.extend(data)

    threading.Thread(target=read, daemon=True).start()
    node.sendall(b"Debian GNU/Linux 12 node2 ttyS0\r\n\r\nnode2 login: ")
    wait_for(lambda: b"node2 login" in srv.get("/api/v1/machines/node2/console",
                                                 headers={"Authorization": f"Bearer {TOKEN}"}).content,
             what="the log")  # fmt: skip
    steps = Steps(None, artefact_dir(request.node.name))
    try:
        with chrome(tmp_path / "chromium") as driver:
            steps.driver = driver
            record_csp_violations(driver)
            driver.get(srv.url + "/dashboard/machines/node2/console")
            driver.find_element(By.ID, "token").send_keys("not-the-token")
            driver.find_element(By.ID, "connect").click()
            wait_text(driver, "#state", "refused")
            assert driver.find_element(By.ID, "state").text == (
                "Connect refused by the controller: wrong token")
            # Asked of the controller before it is kept: a wrong token is never stored.
            assert driver.execute_script("return sessionStorage.getItem('bastion.token')") is None
            assert "node2 login" not in screen(driver)
            steps.shot("wrong-token-refused")
            box = driver.find_element(By.ID, "token")
            box.clear()
            box.send_keys(TOKEN)
            driver.find_element(By.ID, "connect").click()
            wait_text(driver, "#state", "connected")
            assert driver.execute_script("return sessionStorage.getItem('bastion.token')") == TOKEN
            until(driver, lambda d: "node2 login:" in screen(d), "the backlog in the terminal")
            steps.shot("backlog")
            driver.find_element(By.CSS_SELECTOR, ".xterm-helper-textarea").send_keys("root\n")
            wait_for(lambda: bytes(typed) == b"root\r", what="the keys at the node")
            node.sendall(b"root\r\nPassword: ")
            until(driver, lambda d: "Password:" in screen(d), "live output in the terminal")
            steps.shot("typed-and-answered")
            # xterm.js and the page's script ran under the page's policy, which refused nothing
            # (the wrong token's 401 is the one error the console logged)
            assert csp_violations(driver) == []
            assert [e for e in browser_errors(driver) if "status of 401 (Unauthorized)" not in e] == []
            driver.set_window_size(390, 844)  # a phone
            # xterm.js reflows its rows after the resize, in the page's own time: read the
            # screen once it has (a read in between found "Pa" and the rest not yet drawn). A
            # fit made while the page was still being laid out can leave the terminal narrower
            # than the window, the line wrapped over rows: read the rows as one text then.
            def flowed(d):
                return "Password:" in screen(d).replace("\n", "")

            until(driver, flowed, "the output after the resize")
            steps.shot("phone")
            assert flowed(driver)

            # Script put in by markup is refused, each refusal a violation of its own.
            driver.execute_script(INJECT)
            # (the page loads no images: the <img> is refused too, and its error event then tries
            # the handler)
            until(driver, lambda d: d.execute_script("return window.injected") or len(csp_violations(d)) >= 4,
                  "the injected scripts refused")  # fmt: skip
            assert driver.execute_script("return window.injected") is None
            assert sorted(v.split(" ")[:2] for v in csp_violations(driver)) == [
                ["img-src", f"{srv.url}/no-such-image.png"], ["script-src-attr", "inline"],
                ["script-src-elem", f"{srv.url}/boot.ipxe"], ["script-src-elem", "inline"]]  # fmt: skip
    finally:
        node.close()


def test_a_reconnect_after_a_dropped_socket_shows_each_byte_once(served, tmp_path, site_dir, request):
    # The controller restarts under the page (its socket drops); Connect again shows the node's
    # console as it is now: what the terminal held, not again on top of it, and what the node
    # printed meanwhile.
    srv, board = served
    path = board.link.parent / "flash" / "consoles" / "1.sock"
    wait_for(path.exists, what=str(path))
    node = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    node.connect(str(path))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    node.sendall(b"node2 login: ")
    wait_for(lambda: b"node2 login" in srv.get("/api/v1/machines/node2/console", headers=auth).content,
             what="the log")  # fmt: skip
    steps = Steps(None, artefact_dir(request.node.name))
    again = None
    try:
        with chrome(tmp_path / "chromium") as driver:
            steps.driver = driver
            driver.get(srv.url + "/dashboard/machines/node2/console")
            driver.find_element(By.ID, "token").send_keys(TOKEN)
            driver.find_element(By.ID, "connect").click()
            until(driver, lambda d: "node2 login:" in scrollback(d), "the backlog")
            steps.shot("connected")

            srv.stop()
            wait_text(driver, "#state", "closed")
            again = Server(site_dir, srv.db, TOKEN, device=str(board.link), port=srv.port,
                           args=("--console-dir", str(tmp_path / "consoles")))  # fmt: skip
            wait_for(lambda: again.get("/api/v1/device").json().get("connected"), what="device link")
            node.sendall(b"printed while the page was away\r\n")
            wait_for(lambda: b"while the page" in again.get("/api/v1/machines/node2/console",
                                                             headers=auth).content, what="the log")  # fmt: skip
            steps.shot("dropped")
            driver.find_element(By.ID, "connect").click()
            wait_text(driver, "#state", "connected")
            until(driver, lambda d: "printed while the page was away" in scrollback(d), "the new output")
            steps.shot("reconnected")
            text = scrollback(driver)
            assert text.count("node2 login:") == 1, text
            assert text.count("printed while the page was away") == 1, text
    finally:
        node.close()
        if again is not None:
            again.stop()
