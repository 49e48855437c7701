"""A lab node powered on from the dashboard (marker `lab`; issue 15, point 2): headless Chromium
inside the lab's LAN namespace logs in with the lab's API token, opens the node's console page
in a second tab (xterm.js, connected through the device before the power-on), presses "Power
on" on a UEFI node's page, and watches the node's boot timeline fill in from the device's relay
to its callback: the device's proxy offer and TFTP, the controller's boot script, kernel and
initrd, Ignition, the callback. The console tab then holds the boot as the node printed it on
its serial port (iPXE, the kernel, the lab initrd), and a command typed into it runs in the
node's shell. A screenshot of each step is kept (the directory is printed)."""

from __future__ import annotations

import dataclasses
import os
import re
import secrets

import pytest
from bastion.lab.lab import Lab, default_nodes
from browserkit import (
    Steps,
    artefact_dir,
    chrome,
    confirm,
    in_namespace,
    log_in,
    press,
    stages,
    until,
    wait_text,
)
from selenium.webdriver.common.by import By

pytestmark = [pytest.mark.lab, pytest.mark.timeout(900)]

NAME, PREFIX = "ebdash", "10.92.0"
NODE = "uefi-1"
# What the timeline shows, in the order a UEFI node gets there (bastion.state.boottrace).
WANT = ["power on", "proxy offer", "tftp end", "GET /boot.ipxe", "GET /ipxe", "GET asset",
        "GET /ignition", "callback"]  # fmt: skip


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (network namespaces, taps)")
    lab = Lab(NAME, PREFIX, tmp_path_factory.mktemp("lab"))
    try:
        # shell: after its callback the node keeps a shell on its serial console
        node = next(n for n in default_nodes() if n.name == NODE)
        lab.up([dataclasses.replace(node, shell=True)], progress=lambda msg: None)
        yield lab
    finally:
        lab.down()


def terminal(driver) -> str:
    """Everything the console tab's terminal holds, scrollback included, line by line."""
    return driver.execute_script(
        "const b = window.bastionTerminal.buffer.active, out = [];"
        "for (let i = 0; i < b.length; i++) out.push(b.getLine(i).translateToString(true));"
        "return out.join('\\n');")


def test_a_node_powered_on_from_the_dashboard_boots_to_its_callback(lab, tmp_path):
    steps_dir = artefact_dir("lab-" + NODE)
    token = lab.token_file.read_text().strip()
    # The browser runs where a person at the site would be: on the lab LAN, beside the nodes.
    with in_namespace(lab.net.lan), chrome(tmp_path / "chromium") as d:
        steps = Steps(d, steps_dir)
        d.get(f"{lab.controller_url}/dashboard/machines/{NODE}")
        wait_text(d, "#since", "No boot recorded yet")
        press(d, NODE, "on")  # before the log-in: refused, and the page says so
        wait_text(d, "#notice.bad", "a bearer token is required")
        assert lab.vm_state(NODE) == "off"
        steps.shot("refused-without-token")
        log_in(d, token)
        dashboard = d.current_window_handle
        # the console, from the machine page's link, in a tab of its own: attached before the
        # power-on, so it shows the boot from the firmware on
        link = d.find_element(By.CSS_SELECTOR, f'a[href$="/dashboard/machines/{NODE}/console"]')
        url = link.get_attribute("href")
        d.switch_to.new_window("tab")
        console = d.current_window_handle
        d.get(url)
        box = d.find_element(By.ID, "token")
        box.clear()
        box.send_keys(token)
        d.find_element(By.ID, "connect").click()
        wait_text(d, "#state", "connected")
        steps.shot("console-attached")
        d.switch_to.window(dashboard)
        press(d, NODE, "on")
        confirm(d, steps, "confirm-power-on")
        wait_text(d, "#notice.ok", f"Power on {NODE}: done")
        seen: list[str] = []

        def grown(d):
            # A screenshot each time a step the test waits for first shows.
            now = stages(d)
            for w in WANT:
                if w in now and w not in seen:
                    seen.append(w)
                    steps.shot(w.replace(" ", "-").replace("/", ""))
            return all(w in now for w in WANT) and now

        got = until(d, grown, f"{NODE}'s timeline to its callback", timeout=600)
        assert got[0] == "power on"
        order = [got.index(w) for w in WANT]
        assert order == sorted(order), got
        rows = d.find_elements(By.CSS_SELECTOR, '#timeline tr[data-stage="callback"] td')
        assert rows[-1].text.startswith("ok, "), rows[-1].text
        assert lab.vm_boots(NODE) == 1

        # The console tab printed the boot: iPXE, the kernel's messages, the lab initrd's shell.
        d.switch_to.window(console)
        until(d, lambda d: "lab-init: shell on the serial console" in terminal(d),
              f"{NODE}'s shell on its console", timeout=120)
        shown = terminal(d)
        assert "iPXE" in shown, shown[-3000:]
        assert re.search(r"\[ *\d+\.\d+\] ", shown), shown[-3000:]  # the kernel's
        steps.shot("console-boot")
        word = secrets.token_hex(4)
        d.find_element(By.CSS_SELECTOR, ".xterm-helper-textarea").send_keys(
            f"echo hello-$((6*7))-{word}\n")
        # the shell's answer, not the echo of what was typed: $((6*7)) became 42
        until(d, lambda d: f"hello-42-{word}" in terminal(d), "the command's output", timeout=120)
        steps.shot("console-typed")
        d.set_window_size(390, 844)  # a phone
        steps.shot("console-phone")
        assert f"hello-42-{word}" in terminal(d)
