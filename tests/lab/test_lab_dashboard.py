"""A lab node powered on from the dashboard (marker `lab`): headless Chromium inside the lab's
LAN namespace logs in with the lab's API token, presses "Power on" on a UEFI node's page, and
watches the node's boot timeline fill in from the device's relay to its callback: the device's
proxy offer and TFTP, the controller's boot script, kernel and initrd, Ignition, the callback.
A screenshot of each step is kept (the directory is printed)."""

from __future__ import annotations

import os

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
        lab.up([n for n in default_nodes() if n.name == NODE], progress=lambda msg: None)
        yield lab
    finally:
        lab.down()


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
