"""The sim board as a device on a serial line: the real mpremote against the PTY, soft reboots
like a board's, and restarts after the firmware process dies."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import tty
from pathlib import Path

import pytest
from bastion.device.link import DeviceLink
from firmware import frame
from simkit import SimProcess, mpremote, wait_for

BIN = Path(sys.executable).parent


@pytest.fixture
def sim(tmp_path):
    with SimProcess(tmp_path / "flash", tmp_path / "ttyACM0") as s:
        yield s


def test_serial_link_is_a_pty_symlink(sim):
    target = os.readlink(sim.link)
    assert target.startswith("/dev/pts/")
    assert any(e.get("serial") == target for e in sim.seen)


def test_mpremote_resume_exec_on_the_running_board(sim):
    out = mpremote(sim.link, "resume", "exec", "import os; print(sorted(os.listdir()))")
    assert "'device.json'" in out and "'firmware'" in out and "'board.json'" in out


def test_plain_mpremote_soft_reboots_like_a_board_and_keeps_the_line(sim):
    out = mpremote(sim.link, "fs", "ls", ":")
    assert "device.json" in out and "main.py" in out
    ev = sim.wait(lambda e: e.get("ev") == "reset" and e.get("reason") == "soft-reboot-raw")
    assert ev["resets"] == 1
    # The same line still works, for a second client.
    out = mpremote(sim.link, "fs", "cat", ":device.json")
    assert "script_url" in out


def test_soft_reboot_at_the_friendly_repl_runs_main_again(sim):
    mpremote(sim.link, "resume", "exec", "print('stopped')")  # Ctrl-C: firmware -> REPL
    fd = os.open(sim.link, os.O_RDWR | os.O_NOCTTY)
    try:
        os.write(fd, b"\x02\x04")  # leave raw REPL, then Ctrl-D at the normal REPL
    finally:
        os.close(fd)
    sim.wait(lambda e: e.get("ev") == "reset" and e.get("reason") == "soft-reboot")
    sim.wait(lambda e: e.get("ev") == "boot" and "version" in e)


def test_killed_firmware_is_restarted(sim):
    pids = subprocess.run(["pgrep", "-f", "heapsize=.*-i main.py"], capture_output=True,
                          text=True).stdout.split()
    mine = [int(p) for p in pids if _parent_is(int(p), sim.proc.pid)]
    assert len(mine) == 1, pids
    os.kill(mine[0], signal.SIGKILL)
    sim.wait(lambda e: e.get("ev") == "reset" and e.get("reason") == "killed")
    sim.wait(lambda e: e.get("ev") == "boot" and "version" in e)


def _parent_is(pid: int, parent: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return int(stat.rsplit(")", 1)[1].split()[1]) == parent


def test_an_interrupted_firmware_gives_its_heap_to_the_repl(sim):
    """Ctrl-C (as mpremote and bastion flash do) leaves the REPL with the firmware's memory
    returned: its tasks, services and code, not just a stopped loop holding them all."""
    is_boot = lambda e: e.get("ev") == "boot"  # noqa: E731
    boot = next((e for e in sim.seen if is_boot(e)), None) or sim.wait(is_boot)
    out = mpremote(sim.link, "resume", "exec", "import gc; gc.collect(); print('alloc', gc.mem_alloc())")
    alloc = int(out.split("alloc", 1)[1].split()[0])
    assert alloc < boot["heap_code"] // 2, (alloc, boot["heap_code"])


@pytest.fixture
def dressed(tmp_path):
    with SimProcess(tmp_path / "flash", tmp_path / "ttyACM0", None,
                    ("--dress-as", "w5500-evb-pico", "--dress-micropython", "1.24.1")) as s:  # fmt: skip
        yield s


def test_a_dressed_board_answers_like_its_micropython_in_the_repl(dressed):
    out = mpremote(dressed.link, "exec",
                   "import sys; i = sys.implementation; "
                   "print(i.name, i.version, i._mpy, i._build, sys.platform); "
                   "import os; print(sorted(os.listdir()))")  # fmt: skip
    lines = out.splitlines()
    assert lines[0] == "micropython (1, 24, 1, '') 4870 W5500_EVB_PICO rp2", out
    assert "'board.json'" in lines[1] and "'firmware'" in lines[1]  # the real sys underneath
    boot = next(e for e in dressed.seen if e.get("ev") == "boot")
    assert boot["board"] == "w5500-evb-pico"


@pytest.mark.parametrize("board", ["sim", "w5500-evb-pico", "w5100s-evb-pico", "olimex-esp32-poe"])
def test_every_listener_is_alive_after_a_boot_at_the_default_heap(tmp_path, board):
    """At the default 128k each board, plain or dressed, boots with its proxyDHCP listeners
    running: a datagram to the DHCP port and one to the PXE port are both counted. (A name
    interned after boot, when the heap was spent, once killed the DHCP listener of the
    dressed boards: the boot event still listed it; firmware/main.py, "Interned names".)"""
    args = () if board == "sim" else ("--dress-as", board)
    with SimProcess(tmp_path / "flash", tmp_path / "ttyACM0", None, args) as s:
        with DeviceLink(str(s.link), timeout_s=10) as link:
            assert link.wait_ready(15), link.last_error
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                for port in (s.dhcp_port, s.pxe_port):
                    udp.sendto(b"not a DHCP message", ("127.0.0.1", port))
            wait_for(lambda: link.request("counters")["counters"].get("dhcp.malformed") == 2,
                     timeout=10, what="both listeners counting the datagrams")  # fmt: skip
        assert not [e for e in s.seen if e.get("ev") in ("watchdog", "reset")], s.seen


# The unix port's table of interned names: blocks of 20, 40, 80, 160 and 320 (firmware/main.py,
# "Interned names"); the 621st name allocates the next block, 7.1 KB at once.
NAMES_BEFORE_THE_NEXT_BLOCK = 620
NAMES_HEADROOM = 4  # what a change may add without a look at the table


@pytest.mark.parametrize("board", ["sim", "w5500-evb-pico"])
def test_a_boot_leaves_room_in_the_table_of_interned_names(tmp_path, board):
    """After boot and a request on the REPL (mpremote interrupts the firmware; names are never
    freed, so this counts every name the boot interned), the table has room for a few more
    names before its next 7 KB block: a slow creep towards it fails here, not in the field."""
    args = () if board == "sim" else ("--dress-as", board)
    with SimProcess(tmp_path / "flash", tmp_path / "ttyACM0", None, args) as s:
        next((e for e in s.seen if e.get("ev") == "boot"), None) or s.wait(lambda e: e.get("ev") == "boot")
        out = mpremote(s.link, "resume", "exec", "import micropython; micropython.qstr_info()")
    n_pool, n_qstr = (int(v) for v in re.search(r"n_pool=(\d+), n_qstr=(\d+)", out).groups())
    assert n_pool == 5, out  # the fifth block (320) holds the last of the boot's names
    assert n_qstr <= NAMES_BEFORE_THE_NEXT_BLOCK - NAMES_HEADROOM, (
        f"{board}: {n_qstr} interned names, within {NAMES_HEADROOM} of the 7 KB step at "
        f"{NAMES_BEFORE_THE_NEXT_BLOCK}: cut names before adding more (firmware/main.py)")


def test_a_dressed_boards_watchdog_survives_a_soft_reboot_like_an_rp2040s(dressed):
    """mpremote soft-reboots into the raw REPL and runs its program there; on an RP2040 whose
    firmware started the watchdog, the watchdog goes on and resets the board within its 8 s.
    That is why `bastion flash` puts such a board into maintenance mode first."""
    mp = subprocess.Popen([str(BIN / "mpremote"), "connect", str(dressed.link), "exec",
                           "import time; time.sleep(20); print('never cut')"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        dressed.wait(lambda e: e.get("ev") == "reset" and e.get("reason") == "watchdog",
                     timeout=30)  # fmt: skip
    finally:
        mp.kill()  # it waits for an answer from a program the reset ended
        out = mp.communicate()[0]
    assert "never cut" not in out
    assert [e["reason"] for e in dressed.seen if e.get("ev") == "reset"][:2] == [
        "soft-reboot-raw", "watchdog"]  # fmt: skip
    dressed.wait(lambda e: e.get("ev") == "boot" and "services" in e)  # and the firmware runs


def test_a_plain_sim_boards_watchdog_restarts_with_the_process(sim):
    """The undressed sim board's emulated watchdog starts with each firmware process, so a
    program at the raw REPL runs as long as it likes (`bastion flash --board sim` needs no
    maintenance mode)."""
    out = mpremote(sim.link, "exec", "import time; time.sleep(10); print('not cut')")
    assert "not cut" in out
    assert "watchdog" not in [e["reason"] for e in sim.seen if e.get("ev") == "reset"]


def test_a_controller_holds_the_line_and_mpremote_gets_it_back_after_release(sim):
    """With a controller's link open, Ctrl-C, Ctrl-A and Ctrl-D in line noise do not stop the
    firmware; `release` (what `bastion flash` sends before mpremote) gives Ctrl-C back."""
    pid = sim.firmware_pid()
    with DeviceLink(str(sim.link), timeout_s=10) as link:
        assert link.wait_ready(15), link.last_error
        fd = os.open(sim.link, os.O_RDWR | os.O_NOCTTY)
        try:
            os.write(fd, b"\x03\x03 noise \x01\x04\x03\r\n\x1a\x1c\x03")
        finally:
            os.close(fd)
        time.sleep(1)
        assert link.request("status")["boot"] == link.boot
        assert sim.firmware_pid() == pid
        assert not [e for e in sim.seen if e.get("ev") == "reset"]
        assert link.request("release")["held"] is False
    out = mpremote(sim.link, "resume", "exec", "print('at the REPL')")
    assert "at the REPL" in out


def test_requests_sent_faster_than_the_firmware_reads_are_all_answered(sim):
    """A burst bigger than the firmware's tty takes at once (1,500 pipelined requests, 56 KB)
    waits in the line, as on a board's USB CDC, instead of being cut: every one is answered.
    The supervisor used to drop what the tty would not take (431 of 1,501 answered)."""
    fd = os.open(sim.link, os.O_RDWR | os.O_NOCTTY)
    try:
        tty.setraw(fd)
        os.set_blocking(fd, False)
        out = frame.encode({"id": 1, "op": "hello", "session": "burst"}, frame.TO_DEVICE)
        out += b"".join(frame.encode({"id": 2 + i, "op": "hold"}, frame.TO_DEVICE)
                        for i in range(1500))
        deframer, ids = frame.Deframer(frame.TO_HOST, 65536), set()
        last = time.monotonic()
        while len(ids) < 1501 and time.monotonic() - last < 20:  # 20 s without a byte: over
            readable, writable, _ = select.select([fd], [fd] if out else [], [], 0.5)
            if writable:
                out = out[os.write(fd, out[:4096]):]
                last = time.monotonic()
            if readable:
                ids.update(m["id"] for m in deframer.feed(os.read(fd, 65536)) if "id" in m)
                last = time.monotonic()
    finally:
        os.close(fd)
    assert not out, f"{len(out)} bytes the line never took"
    assert ids == set(range(1, 1502)), f"{1501 - len(ids)} requests unanswered"


def test_a_ctrl_a_in_line_noise_does_not_leave_the_board_at_the_raw_repl(sim):
    """Which REPL the board is at is what the firmware says, not what a client sent: a Ctrl-A
    in noise while the firmware runs, then Ctrl-C and Ctrl-D at the friendly REPL, is a soft
    reboot that runs main.py again, as on a board (it used to come back at the raw REPL)."""
    fd = os.open(sim.link, os.O_RDWR | os.O_NOCTTY)
    try:
        os.write(fd, b"noise \x01 noise\r\n")  # a byte for the running firmware
        time.sleep(0.5)
        os.write(fd, b"\x03")  # the firmware stops: the friendly REPL
        time.sleep(1)
        os.write(fd, b"\x04")
    finally:
        os.close(fd)
    ev = sim.wait(lambda e: e.get("ev") == "reset")
    assert ev["reason"] == "soft-reboot"
    sim.wait(lambda e: e.get("ev") == "boot" and "version" in e)  # main.py ran again


def test_a_heap_too_small_for_the_firmware_is_said(tmp_path):
    # The firmware stopped at the REPL with a MemoryError before its first event, the watchdog
    # not started yet: `bastion sim --heap 100k` sat there without a word.
    s = SimProcess(tmp_path / "flash", tmp_path / "tty", args=("--heap", "64k"))
    try:  # not `with`: that waits for a boot
        ev = s.wait(lambda e: e.get("ev") == "traceback")
        assert ev["error"].startswith("MemoryError: memory allocation failed"), ev
        assert not [e for e in s.seen if e.get("ev") == "boot"]
    finally:
        s.stop()
