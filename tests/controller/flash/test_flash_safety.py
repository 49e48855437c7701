"""`bastion flash` against what a review found it let through, without a board: a controller
URL that leaks into device.json, an image too big for the board's filesystem, a relay wiring
that changed under the same on/off states, the restart's wait for a DHCP lease, and a power cut
between the two renames of the firmware swap (bastion/flash/onboard.py under both
interpreters). The same review's findings on a board are in test_flash_safety_board.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from bastion.flash import cli
from bastion.flash import image as flashing
from bastion.flash.sim import micropython_bin
from simkit import bastion
from test_flash import SITE_YAML, make_site, small_tftp

BOARD = "w5500-evb-pico"
W5500 = flashing.board_definition(BOARD)


@pytest.mark.parametrize("url, says", [
    ("http://admin:secret@10.77.0.1:8080", "has a user name or password"),
    ("http://10.77.0.1:8080/?token=1", "has a query string"),
    ("http://10.77.0.1:8080/#top", "has a fragment"),
])  # fmt: skip
def test_a_controller_url_with_credentials_a_query_or_a_fragment_is_refused(tmp_path, url, says):
    # each was taken as it was: script_url became URL/boot.ipxe (a broken URL after ? or #),
    # and credentials went into device.json, which the device hands to every PXE client
    site = make_site(tmp_path / "site")
    r = bastion("flash", "--sim", str(tmp_path / "flash"), "--site", str(site),
                "--controller-url", url, "--dry-run")  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"--controller-url: {url!r} {says}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "flash").exists()
    # site.yaml's controller_url is held to the same
    site2 = make_site(tmp_path / "site2", SITE_YAML.replace("http://127.0.0.1:8080/", url))
    r = bastion("flash", "--sim", str(tmp_path / "flash"), "--site", str(site2), "--dry-run")
    assert r.returncode == 1 and f"site.yaml: controller_url: {url!r} {says}" in r.stderr, r.stderr


def test_an_image_bigger_than_the_boards_filesystem_is_refused_before_the_device_is_contacted(
    tmp_path,
):
    # the check came after the probe, that is after the board was reset into maintenance
    site = make_site(tmp_path / "site")
    tftp = small_tftp(tmp_path / "tftp")
    (tftp / "big.bin").write_bytes(b"b" * 1_500_000)  # the W5500-EVB-Pico's filesystem: 1408 KB
    port = tmp_path / "ttyACM0"
    port.write_bytes(b"")
    args = ["flash", "--port", str(port), "--board", BOARD, "--site", str(site), "--tftp-dir",
            str(tftp)]  # fmt: skip
    fits = f"board {BOARD}'s filesystem holds 1.38 MB (flash.filesystem_bytes in its board file)"
    r = bastion(*args)
    assert r.returncode == 1, r.stdout + r.stderr
    assert fits in r.stderr and "the largest: tftp/big.bin (1.43 MB), " in r.stderr, r.stderr
    assert "nothing was written and the device was not contacted" in r.stderr
    assert "asking the running firmware" not in r.stdout
    # a dry run says so too, and lists what it would write all the same
    r = bastion(*args, "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning: flashing these files would be refused:" in r.stderr, r.stderr
    assert fits in r.stderr and "the largest: tftp/big.bin (1.43 MB), " in r.stderr
    assert "dry run: nothing written, the device was not contacted" in r.stdout
    assert port.read_bytes() == b""
    (tftp / "big.bin").unlink()  # what fits is not refused
    r = bastion(*args, "--dry-run")
    assert r.returncode == 0 and "would be refused" not in r.stderr, r.stderr


def _board(**relays) -> flashing.BoardDef:
    d = W5500.defn
    for key, value in relays.items():
        if key == "pins":
            for ch, pin in value.items():
                d["relays"]["channels"][ch]["pin"] = pin
        else:
            d["relays"][key] = value
    d["name"] = "my-pico"
    return flashing.checked_board("my-pico", "boards/my-pico.json", json.dumps(d).encode())


def test_a_relay_wiring_that_changed_under_the_same_states_is_named_channel_by_channel():
    # what the review's polarity.py showed: NC -> NO keeps every logical state and flips
    # every pin; the check compared the logical states only
    names = [f"n{i}" for i in range(8)]
    device = W5500.data
    assert flashing.wiring_changes(device, W5500, names) == []
    assert flashing.wiring_changes(None, W5500, names) == []  # nothing on the device to compare
    no = flashing.wiring_changes(device, _board(contact="no"), names)
    assert no[0] == "relay channel 0 (n0): contact nc -> no (its pin level for on and off is " \
                    "inverted)" and len(no) == 8  # fmt: skip
    moved = flashing.wiring_changes(device, _board(pins={2: "GP20", 5: "GP11"}), names)
    assert moved == ["relay channel 2 (n2): pin 8 -> 20"], moved  # GP11 is pin 11: the same
    high = flashing.wiring_changes(device, _board(active_low=False, contact="no"), names)
    # both flipped: the same level powers the node, but the module is another one
    assert high[0] == "relay channel 0 (n0): contact nc -> no, active_low true -> false"
    sim = flashing.wiring_changes(flashing.board_definition("sim").data, W5500, names)
    assert sim == [(f"the device's board.json (sim) drives its relays on no GPIO pins, board "
                    f"{BOARD} on GPIO pins")]  # fmt: skip


def test_pins_left_undriven_are_what_the_boards_wiring_makes_them():
    assert flashing.undriven_outputs(W5500) == [True] * 8  # NC: the node is powered
    assert flashing.undriven_outputs(_board(contact="no")) == [False] * 8
    assert flashing.undriven_outputs(flashing.board_definition("sim")) == [False] * 8


def test_the_restart_waits_as_long_as_the_boot_may_wait_for_a_dhcp_lease():
    # a fixed 30 s: a board whose boot waits up to net.dhcp_wait_ms (120 s at most) for a
    # lease failed a flash that had worked
    margin = flashing.BOOT_EVENT_MARGIN_S
    assert flashing.boot_wait_s({"net": {"dhcp_wait_ms": 120000}}, W5500) == margin + 120
    assert flashing.boot_wait_s({}, W5500) == margin + 15  # the firmware's default wait
    static = {"net": {"ip": "10.77.0.2/24", "gateway": "10.77.0.1"}}
    assert flashing.boot_wait_s(static, W5500) == margin
    assert flashing.boot_wait_s(None, W5500) == margin + 120  # a config not known: the longest
    sim = flashing.board_definition("sim")
    assert flashing.boot_wait_s({"net": {"dhcp_wait_ms": 120000}}, sim) == margin  # host network


@pytest.mark.parametrize("interpreter", ["micropython", "cpython"])
def test_a_power_cut_between_the_firmware_renames_keeps_the_old_firmware(tmp_path, interpreter):
    # install() renames firmware/ into .bastion-old/, then the staged one into place: cut in
    # between, the next probe's clean() deleted .bastion-old/firmware, the only complete copy
    from bastion.flash.onboard import OLD, STAGE

    (tmp_path / OLD / "firmware").mkdir(parents=True)
    (tmp_path / OLD / "firmware" / "main.mpy").write_bytes(b"old firmware")
    (tmp_path / STAGE / "tftp").mkdir(parents=True)
    (tmp_path / STAGE / "tftp" / "x.bin").write_bytes(b"staged")
    program = cli.onboard(f"print({cli.PROBE_TAG!r} + probe(['firmware/main.mpy']))")
    exe = micropython_bin() if interpreter == "micropython" else sys.executable
    r = subprocess.run([exe, "-c", program], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60, check=False)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    probe = json.loads(r.stdout.split(cli.PROBE_TAG, 1)[1])
    assert probe["firmware"] == {"main.mpy": 12}, probe
    assert (tmp_path / "firmware" / "main.mpy").read_bytes() == b"old firmware"
    assert sorted(os.listdir(tmp_path)) == ["firmware"]  # nothing staged, nothing old


def test_the_watchdog_feed_of_the_comparison_reaches_the_sim_boards_supervisor(tmp_path):
    # on a board the comparison before maintenance feeds the running watchdog (machine.WDT);
    # the sim board's REPL has no machine.WDT and feeds its supervisor's pipe, as the firmware
    r_fd, w_fd = os.pipe()
    (tmp_path / "device.json").write_text("{}")
    program = cli.onboard("print(differs([['device.json', 'x']], [], 8000))")
    env = dict(os.environ, EDGE_BASTION_WDT_FD=str(w_fd))
    r = subprocess.run([micropython_bin(), "-c", program], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60, check=False, pass_fds=(w_fd,), env=env)  # fmt: skip
    os.close(w_fd)
    fed = os.read(r_fd, 64)
    os.close(r_fd)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == ["firmware/"]  # no firmware/ here: the first difference
    assert fed == b"."
