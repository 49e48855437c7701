"""The device link end to end: the controller's DeviceLink against the real firmware on the sim
board (`bastion sim`, the MicroPython unix port behind a PTY), switching relays, with the relay
outputs watched continuously through kill -9, watchdog resets and reboots."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from bastion.device.link import DeviceError, DeviceLink
from simkit import RelayWatch, SimProcess, wait_for

CHANNELS = 8
POWER = {
    "stagger_ms": 300,
    "channels": [{"name": f"node{i}", "min_off_ms": 2000, "max_cycles": 3, "window_ms": 60000}
                 for i in range(CHANNELS)],
}


@pytest.fixture
def board(tmp_path):
    with SimProcess(tmp_path / "flash", tmp_path / "ttyACM0", {"power": POWER}) as s:
        yield s


@pytest.fixture
def link(board):
    with DeviceLink(str(board.link), timeout_s=10) as ln:
        assert ln.wait_ready(15), ln.last_error
        yield ln


def relays(board) -> str:
    return (board.link.parent / "flash" / "relays.state").read_text().strip()


def test_hello_names_the_firmware_and_board(link):
    assert link.info["board"] == "sim"
    assert link.info["channels"] == CHANNELS
    st = link.request("status")
    assert [c["name"] for c in st["power"]] == [f"node{i}" for i in range(CHANNELS)]
    assert set(st["tasks"]) >= {"console", "power", "dhcp", "tftp"}


def test_power_on_and_off_drive_the_relay_output_and_persist(board, link):
    flash = board.link.parent / "flash"
    r = link.request("power", channel=2, state="on")
    assert r["channel"]["desired"] == "on"
    wait_for(lambda: relays(board)[2] == "1", what="relay 2 on")
    assert (flash / "power.state").read_text().strip() == "00100000"
    link.request("power", channel="node2", state="off")
    wait_for(lambda: relays(board)[2] == "0", what="relay 2 off")
    assert (flash / "power.state").read_text().strip() == "00000000"


def test_interlocks_refuse_with_a_clear_error(link):
    link.request("power", channel=0, state="on")
    with pytest.raises(DeviceError) as e:
        link.request("power", channel=0, state="cycle", off_ms=500)
    assert e.value.code == "refused"
    assert "shorter than its minimum off time of 2000 ms" in str(e.value)
    link.request("power", channel=0, state="off")
    with pytest.raises(DeviceError) as e:
        link.request("power", channel=0, state="on")  # within min_off_ms of going off
    assert "minimum off time is 2000 ms" in str(e.value)
    with pytest.raises(DeviceError) as e:
        link.request("power", channel=99, state="on")
    assert "no relay channel 99" in str(e.value)


def test_a_cycle_too_long_to_schedule_is_refused_and_leaves_the_relay_on(board, link):
    # It used to switch the relay off and then fail on the tick arithmetic, with no cycle
    # scheduled: the channel stayed off, and an "on" found nothing to change.
    link.request("power", channel=1, state="on")
    wait_for(lambda: relays(board)[1] == "1", what="relay 1 on")
    for off_ms in (3600001, 2**62, 10**30):
        with pytest.raises(DeviceError) as e:
            link.request("power", channel=1, state="cycle", off_ms=off_ms)
        assert e.value.code == "refused" and "longer than a cycle may be (3600000 ms)" in str(e.value)
    ch = link.request("status")["power"][1]
    assert ch["desired"] == ch["output"] == "on" and not ch["cycling"]
    assert relays(board)[1] == "1"


def test_powering_on_eight_nodes_staggers_them(board, link):
    events: list[dict] = []
    link.on_event(lambda e: events.append(e) if e.get("ev") == "power" else None)
    for ch in range(CHANNELS):
        link.request("power", channel=ch, state="on")
    wait_for(lambda: relays(board) == "1" * CHANNELS, what="all relays on")

    def ons():
        return [e for e in events if e.get("state") == "on" and e.get("why") == "on"]

    wait_for(lambda: len(ons()) == CHANNELS, what="eight power-on events")
    ons = ons()
    assert sorted(e["ch"] for e in ons) == list(range(CHANNELS))
    # The device's own clock: no two power-on edges closer than stagger_ms.
    gaps = [b["t"] - a["t"] for a, b in zip(ons, ons[1:])]
    assert min(gaps) >= POWER["stagger_ms"], gaps


def test_kill_9_never_glitches_a_relay(board, link):
    link.request("power", channel=1, state="on")
    link.request("power", channel=5, state="on")
    wait_for(lambda: relays(board) == "01000100", what="relays 1 and 5 on")
    watch = RelayWatch(board.link.parent / "flash")
    for _ in range(2):
        os.kill(board.firmware_pid(), signal.SIGKILL)
        board.wait(lambda e: e.get("ev") == "reset" and e.get("reason") == "killed")
        board.wait(lambda e: e.get("ev") == "boot")
    assert link.request("status")["power"][5]["output"] == "on"
    assert watch.stop() == ["01000100"]


def test_a_hung_task_starves_the_watchdog_and_the_reset_keeps_nodes_on(board, link):
    link.request("power", channel=3, state="on")
    wait_for(lambda: relays(board)[3] == "1", what="relay 3 on")
    before = link.boot
    watch = RelayWatch(board.link.parent / "flash")
    link.request("fault", task="power")  # the power task stops checking in
    ev = board.wait(lambda e: e.get("ev") == "watchdog" and e.get("task"), timeout=20)
    assert ev["task"] == "power"
    board.wait(lambda e: e.get("ev") == "reset" and e.get("reason") == "watchdog", timeout=30)
    board.wait(lambda e: e.get("ev") == "boot", timeout=30)
    wait_for(lambda: link.ready and link.boot != before, what="link resynced to the new boot")
    assert link.request("status")["power"][3]["output"] == "on"
    assert watch.stop() == ["00010000"]


def test_reboot_request_resets_the_board_and_keeps_relays(board, link):
    link.request("power", channel=7, state="on")
    wait_for(lambda: relays(board)[7] == "1", what="relay 7 on")
    watch = RelayWatch(board.link.parent / "flash")
    before = link.boot
    assert link.request("reboot")["rebooting"] is True
    board.wait(lambda e: e.get("ev") == "reset" and e.get("reason") == "reset")
    wait_for(lambda: link.ready and link.boot != before, what="link resynced to the new boot")
    assert watch.stop() == ["00000001"]


def test_a_broken_device_config_keeps_the_console_and_the_relays(tmp_path):
    flash = tmp_path / "flash"
    s = SimProcess(flash, tmp_path / "tty", {"power": POWER, "allowed_macs": ["zz"]})
    try:
        ev = s.wait(lambda e: e.get("ev") == "boot" and "version" in e)
        assert "allowed_macs[0]" in ev["error"]
        with DeviceLink(str(s.link), timeout_s=10) as ln:
            assert ln.wait_ready(15), ln.last_error
            ln.request("power", channel=0, state="on")
            wait_for(lambda: (flash / "relays.state").read_text()[0] == "1", what="relay on")
            # Nothing is served, so the listeners are not judged (or a bad file would reset-loop).
            assert set(ln.request("status")["tasks"]) == {"console", "power", "tripped"}
    finally:
        s.stop()


def test_a_listener_whose_port_is_taken_is_reported_and_not_reset_for(tmp_path):
    # Another server on the sim board's host holding the DHCP port: the listener's task died
    # at its bind, the watchdog found it "late" 3 s later and reset the board, and the next
    # boot met the same port: a reset loop whose only event was "watchdog".
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("0.0.0.0", 0))  # sends nothing; the sim binds its DHCP port on 0.0.0.0 too
    port = taken.getsockname()[1]
    s = SimProcess(tmp_path / "flash", tmp_path / "tty", {"power": POWER},
                   args=("--dhcp-port", str(port)))  # after SimProcess's own: click takes the last
    try:
        ev = s.wait(lambda e: e.get("ev") == "listen")
        assert ev["service"] == "dhcp" and "EADDRINUSE" in ev["error"]
        boot = s.wait(lambda e: e.get("ev") == "boot" and "version" in e)
        assert boot["services"] == ["tftp"] and "error" not in boot
        with DeviceLink(str(s.link), timeout_s=10) as ln:
            assert ln.wait_ready(15), ln.last_error
            assert "dhcp" not in ln.request("status")["tasks"]
            ln.request("power", channel=0, state="on")
            wait_for(lambda: relays(s)[0] == "1", what="relay on")
        # Past the listeners' 3 s deadline and the sim's 8 s watchdog, from the boot event.
        time.sleep(max(0.0, 9.0 - (time.monotonic() - s.seen_at[s.seen.index(boot)])))
        assert not [e for e in s.seen if e.get("ev") in ("reset", "watchdog")], s.seen
        assert s.proc.poll() is None
    finally:
        s.stop()
        taken.close()


def test_a_device_config_too_big_to_read_keeps_the_console_and_the_relays(tmp_path):
    # json.load of it ran the 128k heap out (MemoryError) before the relays were restored, and
    # the firmware stopped at the REPL: no console, no watchdog.
    flash = tmp_path / "flash"
    (flash).mkdir()
    (flash / "power.state").write_text("10000001\n")
    s = SimProcess(flash, tmp_path / "tty", {"power": POWER, "note": "x" * 200000})
    try:
        ev = s.wait(lambda e: e.get("ev") == "boot" and "version" in e)
        assert "device.json: " in ev["error"] and "more than the 16384 the device reads" in ev["error"]
        assert (flash / "relays.state").read_text().strip() == "10000001"
        with DeviceLink(str(s.link), timeout_s=10) as ln:
            assert ln.wait_ready(15), ln.last_error
            assert [c["output"] for c in ln.request("status")["power"]][:2] == ["on", "off"]
    finally:
        s.stop()


def test_a_status_too_long_for_one_frame_comes_in_parts(tmp_path):
    # Eight watched nodes with long names and four consoles (160k: the consoles' heap) made
    # every status reply longer than the device's 1536-byte frame: an error, every time.
    flash = tmp_path / "flash"
    power = {"channels": [{"name": f"k3s-worker-{i:02d}"} for i in range(CHANNELS)]}
    s = SimProcess(flash, tmp_path / "tty", {"power": power}, args=("--heap", "160k"))
    try:
        with DeviceLink(str(s.link), timeout_s=10) as ln:
            assert ln.wait_ready(15), ln.last_error
            for ch in range(CHANNELS):
                ln.request("watch", channel=ch, timeout_ms=60000, boot_ms=60000)
            first = ln.request("status")
            assert first["partial"] == ["nodes", "consoles"] and "power" in first and "tasks" in first
            assert not set(first["partial"]) & set(first)
            from bastion.device.hub import read_status

            whole = read_status(ln)
            assert "partial" not in whole and len(whole["nodes"]) == CHANNELS
            assert len(whole["consoles"]) == 4
            assert [c["name"] for c in whole["power"]] == power_names(power)
            assert ln.request("status", only="nothing")["nothing"] is None
    finally:
        s.stop()


def power_names(power):
    return [c["name"] for c in power["channels"]]


def test_maintenance_holds_the_relays_starts_no_watchdog_and_lasts_one_boot(board, link):
    """What `bastion flash` is to do on a board whose watchdog runs (docs/device.md,
    "Maintenance mode"): restart into maintenance, stop the firmware with Ctrl-C for the copy
    (as mpremote does) for longer than the watchdog's timeout, restart normally, and never
    switch a relay. The sim board's watchdog stands in for an RP2040's: 8 s, and a reset when
    one that was started is not fed, Ctrl-C or not."""
    link.request("power", channel=2, state="on")
    wait_for(lambda: relays(board)[2] == "1", what="relay 2 on")
    watch = RelayWatch(board.link.parent / "flash")
    before = link.boot
    reply = link.request("maintenance")
    assert (reply["maintenance"], reply["rebooting"]) == (True, True)
    board.wait(lambda e: e.get("ev") == "reset" and e.get("reason") == "reset")
    assert board.wait(lambda e: e.get("ev") == "boot" and "version" in e)["maintenance"] is True
    wait_for(lambda: link.ready and link.boot != before, what="the maintenance boot")
    assert link.info["maintenance"] is True
    with pytest.raises(DeviceError, match="maintenance mode"):
        link.request("power", channel=2, state="off")
    line = os.open(board.link, os.O_RDWR | os.O_NOCTTY)
    try:
        os.write(line, b"\x03")  # the firmware stops: the REPL is the flasher's now
        time.sleep(9)  # past the 8 s: a watchdog that had been started would reset the board
        assert [e["reason"] for e in board.seen if e.get("ev") == "reset"] == ["reset"]
        os.write(line, b"\x04")  # soft reset at the REPL: main.py again, a normal boot
    finally:
        os.close(line)
    board.wait(lambda e: e.get("ev") == "boot" and "services" in e)
    wait_for(lambda: link.ready and link.info["maintenance"] is False, what="the normal boot")
    assert link.request("status")["power"][2]["output"] == "on"
    assert watch.stop() == ["00100000"]


def test_enter_maintenance_waits_for_the_maintenance_boot_and_keeps_the_relays(board, link):
    """DeviceLink.enter_maintenance, what `bastion flash` calls on a board whose watchdog runs:
    one reset, the link ready again on the maintenance boot, a second call a no-op."""
    link.request("power", channel=4, state="on")
    wait_for(lambda: relays(board)[4] == "1", what="relay 4 on")
    watch = RelayWatch(board.link.parent / "flash")
    before = link.boot
    info = link.enter_maintenance(wait_s=30)
    assert info["maintenance"] is True and link.boot != before
    assert link.ready and link.info["maintenance"] is True
    maintenance_boot = link.boot
    assert link.enter_maintenance(wait_s=5)["maintenance"] is True
    assert link.boot == maintenance_boot  # no second restart
    assert [e["reason"] for e in board.seen if e.get("ev") == "reset"] == ["reset"]
    assert link.request("reboot")["rebooting"] is True  # the next restart is a normal boot
    wait_for(lambda: link.ready and link.boot != maintenance_boot, what="the normal boot")
    assert link.info["maintenance"] is False
    assert link.request("status")["power"][4]["output"] == "on"
    assert watch.stop() == ["00001000"]
