"""The W5500-EVB-Pico board file on an emulated RP2040: MicroPython's official rp2 image for the
board (built from source, tests/firmware/rp2/data/SOURCES.md) in rp2040js, the real mpremote and
`bastion flash` on its USB serial line, and what the firmware does to the chip's pins and
watchdog. A W5500 is modelled at its register interface (tests/firmware/rp2/emulator.mjs): the
driver brings the interface up, frames it sends are reported, and a test can hand it frames one
by one (a PXE client's DHCPDISCOVER here) or make a tap device in a network namespace its wire
(TapWire: a real TFTP client fetches the boot file); tests/lab/test_lab_rp2.py boots a node
through it.
Not a real board: docs/boards.md says what has not run on one.

The chip's ROM is the emulator's stand-in for the RP2040 bootrom (tests/firmware/rp2/rom.mjs,
tested function by function in test_rp2_rom.py); RP2040_BOOTROM=PATH runs them on a real one
(not in this repository: tools/rp2040-bootrom)."""

from __future__ import annotations

import json
import math
import os
import pty
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from rp2kit import BOOTROM, Rp2Board, TapWire, missing
from simkit import bastion, mpremote

pytestmark = [pytest.mark.rp2, pytest.mark.skipif(missing() is not None, reason=missing() or "")]
EMULATED_S = 120  # seconds an mpremote call may take on the emulated chip


def test_the_official_image_boots_and_mpremote_drives_its_repl(tmp_path):
    with Rp2Board(tmp_path / "ttyACM0") as board:
        board.wait(lambda e: e.get("ev") == "usb", what="the USB serial line")
        out = mpremote(board.link, "exec", "import sys, os; print(sys.implementation._machine); "
                       "print(os.uname().release); print(sys.implementation._mpy)", timeout=EMULATED_S)  # fmt: skip
    machine, release, mpy = out.split("\n")[:3]
    assert machine == "W5500-EVB-Pico with RP2040", out
    # what boards/w5500-evb-pico.json says bastion flash will find (its .mpy format)
    assert int(mpy) == 4870, out
    assert release.startswith("1."), out


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


# Single-precision arithmetic through the SDK's wrappers and the ROM's float table: the bits of
# each result, and the math module's functions (the ROM's scientific ones) as printed floats.
FLOAT_CODE = """import math, struct
b = lambda x: struct.unpack('<I', struct.pack('<f', x))[0]
a, c = 1.1, -3.3
print(b(a + c), b(a - c), b(a * c), b(a / c), b(math.sqrt(2.0)), int(-2.5), int(7.9), float(2**40 + 1) == 2.0**40)
print(repr(math.sin(1.0)), repr(math.cos(2.0)), repr(math.tan(0.7)), repr(math.exp(1.5)), repr(math.log(10.0)),
      repr(math.atan2(1.0, -2.0)))"""


def test_floating_point_on_the_chip_goes_through_the_rom_and_is_right(tmp_path):
    with Rp2Board(tmp_path / "ttyACM0") as board:
        board.wait(lambda e: e.get("ev") == "usb", what="the USB serial line")
        out = mpremote(board.link, "exec", FLOAT_CODE, timeout=EMULATED_S)
    exact, sci = out.split("\n")[:2]
    bits = lambda x: struct.unpack("<I", struct.pack("<f", x))[0]
    a, c = f32(1.1), f32(-3.3)
    assert exact.split() == [str(bits(f32(v))) for v in (a + c, a - c, a * c, a / c, math.sqrt(2.0))] \
        + ["-2", "7", "True"], out  # C's conversion, towards zero; 2**40 + 1 rounded to a float
    want = [math.sin(1.0), math.cos(2.0), math.tan(f32(0.7)), math.exp(1.5), math.log(10.0), math.atan2(1.0, -2.0)]
    got = [float(v) for v in sci.split()]
    assert all(math.isclose(g, w, rel_tol=2e-6) for g, w in zip(got, want)) and len(got) == 6, (got, want)


def test_a_rom_function_the_stand_in_lacks_stops_the_emulator_and_is_named(tmp_path):
    if BOOTROM is not None:
        pytest.skip("a real bootrom has reset_usb_boot")
    with Rp2Board(tmp_path / "ttyACM0") as board:
        board.wait(lambda e: e.get("ev") == "usb", what="the USB serial line")
        # machine.bootloader() calls the ROM's reset_usb_boot ('UB'), the USB mass-storage boot
        mpremote(board.link, "exec", "--no-follow", "import machine; machine.bootloader()", timeout=EMULATED_S)
        stop = board.wait(lambda e: e.get("ev") == "break", what="the emulator stopping")
        assert stop["rom"] == "reset_usb_boot", stop
        board.proc.wait(timeout=30)  # it ends there (killing itself: emulator.mjs's stop())
        said = board.proc.stderr.read().decode(errors="replace")
        assert "stopped at a breakpoint" in said and '"rom":"reset_usb_boot"' in said, said


def test_files_put_by_mpremote_are_in_flash_after_a_watchdog_reset(tmp_path):
    payload = tmp_path / "kept.txt"
    payload.write_text("written through littlefs to the emulated flash\n" * 40)
    with Rp2Board(tmp_path / "ttyACM0") as board:
        board.wait(lambda e: e.get("ev") == "usb", what="the USB serial line")
        mpremote(board.link, "fs", "cp", str(payload), ":kept.txt", timeout=EMULATED_S)
        # machine.reset() triggers the RP2040's watchdog: the chip starts over from its bootrom
        mpremote(board.link, "exec", "--no-follow", "import machine; machine.reset()", timeout=EMULATED_S)
        board.wait(lambda e: e.get("ev") == "boot" and e.get("reason") == "watchdog", what="a reset")
        board.wait(lambda e: e.get("ev") == "usb" and len(board.boots()) == 2, what="USB after the reset")
        assert mpremote(board.link, "fs", "cat", ":kept.txt", timeout=EMULATED_S) == payload.read_text()


REPO = Path(__file__).resolve().parents[2]


def small_site(tmp_path: Path) -> tuple[Path, Path]:
    """The example site, kept to what the emulated line carries in a minute: no arm64 machine
    (no arm64 chainloader to copy), one boot file (BIOS, 74 KB), a static address."""
    site = tmp_path / "site"
    shutil.copytree(REPO / "examples" / "site", site)
    for sub in ("flatcar/amd64", "flatcar/arm64"):
        d = site / "assets" / sub
        d.mkdir(parents=True)
        for name in ("flatcar_production_pxe.vmlinuz", "flatcar_production_pxe_image.cpio.gz"):
            (d / name).write_bytes(b"not a kernel")
    y = site / "site.yaml"
    text = y.read_text()
    for line in ("    7: ipxe.efi          # EFI x86-64 (BC)\n", "    9: ipxe.efi          # EFI x86-64\n"):
        assert line in text
        text = text.replace(line, "")
    y.write_text(text.replace("  boot_files:", "  net: {ip: 10.77.0.2/24, gateway: 10.77.0.1}\n  boot_files:", 1))
    m = site / "machines.yaml"
    text = m.read_text()
    start = text.index("  - name: pi1\n")
    end = text.find("  - name:", start + 1)
    m.write_text(text[:start] + (text[end:] if end > 0 else ""))
    tftp = tmp_path / "tftp"
    tftp.mkdir()
    shutil.copy("/usr/lib/ipxe/undionly.kpxe", tftp)
    return site, tftp


@dataclass
class Flashed:
    """A board as `bastion flash` left it: the small site, its TFTP directory, the flash's
    contents (the emulator writes them when it is stopped) and what `bastion flash` printed."""

    site: Path
    tftp: Path
    flash: Path
    output: str

    def board(self, tmp_path: Path, **kwargs) -> Rp2Board:
        """A board powered on from a copy of that flash: what a flashed board does at the site."""
        flash = tmp_path / "flash.bin"
        shutil.copy(self.flash, flash)
        return Rp2Board(tmp_path / "ttyACM0", w5500=True, flash_file=flash, **kwargs)


def serving(board: Rp2Board) -> dict:
    """The firmware's status (`bastion status`), once it runs from the flash and serves DHCP and
    TFTP: the watchdog's enabling is its first act, its console's answer comes after its tasks
    have started."""
    board.wait(lambda e: e.get("ev") == "watchdog-enabled", timeout=120, what="the firmware starting")
    status = status_of(board)
    assert {"dhcp", "tftp"} <= set(status["status"]["tasks"]), status
    return status


def status_of(board: Rp2Board) -> dict:
    """`bastion status --json` of the board. The emulated chip runs at a fraction of a board's
    speed, slower still right after it served a transfer: its hello or a status request can
    time out (`last_error`), and is asked again rather than read as a firmware that does not
    answer."""
    for _ in range(3):
        r = bastion("status", "--port", str(board.link), "--json")
        status = json.loads(r.stdout) if r.returncode == 0 else {}
        if "status" in status:
            return status
    assert r.returncode == 0, r.stdout + r.stderr
    raise AssertionError(f"no status in three tries: {status.get('last_error')}")


@pytest.fixture(scope="module")
def flashed(tmp_path_factory) -> Flashed:
    """`bastion flash` of the small site onto a blank board (MicroPython's image only), once
    for the tests below: each byte goes through the emulated USB line at a few KB/s."""
    tmp = tmp_path_factory.mktemp("flashed")
    site, tftp = small_site(tmp)
    flash = tmp / "flash.bin"
    with Rp2Board(tmp / "ttyACM0", w5500=True, flash_file=flash) as board:
        board.wait(lambda e: e.get("ev") == "usb", what="the USB serial line")
        r = bastion("flash", "--port", str(board.link), "--site", str(site), "--board", "w5500-evb-pico",
                    "--tftp-dir", str(tftp), "--controller-url", "http://10.77.0.1:8080",
                    # a blank NC-wired board: its undriven pins power every node; default: off
                    "--switch-relays", timeout=600)  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
    assert flash.is_file(), "the emulator wrote no flash file"
    assert not board.killed, "the emulator did not end on SIGTERM (rp2kit had to kill it)"
    return Flashed(site, tftp, flash, r.stdout + r.stderr)


def test_bastion_flash_puts_the_firmware_on_the_board_and_it_runs_the_relays_and_the_watchdog(
        flashed, tmp_path):  # fmt: skip
    assert "boot: firmware" in flashed.output, flashed.output
    # a new board has no firmware to put into maintenance mode, and is not warned about one
    assert "no Edge Bastion firmware on its flash yet" in flashed.output, flashed.output
    assert "warning" not in flashed.output.lower(), flashed.output
    assert "on board w5500-evb-pico, serving dhcp, tftp" in flashed.output, flashed.output
    # the blank board's undriven NC contacts powered all eight nodes; the flag switched them off,
    # named before the copy and checked after the restart
    assert flashed.output.count("switching at the restart, as asked (--switch-relays)") == 8, flashed.output
    assert "relays: as planned (on: none)" in flashed.output, flashed.output
    relays = range(6, 14)  # boards/w5500-evb-pico.json: GP6..GP13, active low, NC contacts
    # power on: the chip starts MicroPython, and MicroPython the firmware from the flash
    with flashed.board(tmp_path) as board:
        board.wait(lambda e: e.get("ev") == "usb", what="the USB serial line")
        status = serving(board)
        # The site's default is off: each relay's coil on (IN low), its NC contact open.
        assert [board.level(pin) for pin in relays] == ["low"] * 8
        # The W5500's driver brought the interface up with the static address: lwIP's first
        # frames (IGMP, MLD, mDNS) go out through the chip's socket 0 in MACRAW mode.
        board.wait(lambda e: e.get("ev") == "eth", what="a frame sent through the W5500")
        assert status["info"]["board"] == "w5500-evb-pico", status
        assert status["info"]["net"] == {"ip": "10.77.0.2", "how": "static", "link": "up"}, status
        assert [p["output"] for p in status["status"]["power"]] == ["off"] * 8, status
        r = bastion("power", "on", "0", "--port", str(board.link))
        assert r.returncode == 0, r.stdout + r.stderr
        board.wait(lambda e: e.get("ev") == "gpio" and e.get("pin") == 6 and e["value"] == "high",
                   what="relay 0's pin high (coil off, node on)")  # fmt: skip
        assert [board.level(pin) for pin in relays[1:]] == ["low"] * 7
        # The firmware enabled the RP2040's hardware watchdog (8 s, boards/w5500-evb-pico.json)
        # and feeds it: the chip's clock runs on three timeouts past that without a reset.
        enabled = board.wait(lambda e: e.get("ev") == "watchdog-enabled", what="the watchdog enabled")
        board.wait(lambda e: e.get("ev") == "clock" and e["ms"] > enabled["ms"] + 3 * 8388,
                   timeout=300, what="the chip's clock 25 s past the watchdog's start")  # fmt: skip
        assert [e["reason"] for e in board.boots()] == ["power-on"]
        assert not [e for e in board.events if e.get("ev") == "watchdog"]
        # What MicroPython's own rp2 port leaves the firmware (the heap a real board would show)
        heap = status["status"]["heap"]
        assert heap["code"] > 0 and heap["free"] > 0, heap
        print(f"rp2 (emulated) heap after boot: code {heap['code']} B, free {heap['free']} B")


def discover_frame(mac: bytes, xid: bytes) -> bytes:
    """A BIOS PXE client's DHCPDISCOVER, broadcast, as an Ethernet frame."""
    bootp = bytearray(240)
    bootp[0:4] = b"\x01\x01\x06\x00"
    bootp[4:8] = xid
    bootp[10:12] = b"\x80\x00"  # broadcast: the client has no address yet
    bootp[28:34] = mac
    bootp[236:240] = b"\x63\x82\x53\x63"
    options = (b"\x35\x01\x01" + b"\x5d\x02\x00\x00" + b"\x3c\x20PXEClient:Arch:00000:UNDI:002001"
               + b"\xff")  # fmt: skip
    payload = bytes(bootp) + options
    udp = (68).to_bytes(2, "big") + (67).to_bytes(2, "big") + (8 + len(payload)).to_bytes(2, "big") + b"\0\0"
    ip = bytearray(b"\x45\x00" + (20 + len(udp) + len(payload)).to_bytes(2, "big") + b"\0\0\0\0\x40\x11\0\0"
                   + bytes(4) + b"\xff\xff\xff\xff")  # fmt: skip
    total = sum(int.from_bytes(ip[i : i + 2], "big") for i in range(0, 20, 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    ip[10:12] = (~total & 0xFFFF).to_bytes(2, "big")
    return b"\xff" * 6 + mac + b"\x08\x00" + bytes(ip) + udp + payload


def dhcp_replies(frames: list[bytes]) -> list[bytes]:
    """The DHCP payloads of the UDP frames from port 67 among `frames`."""
    out = []
    for f in frames:
        if f[12:14] != b"\x08\x00" or f[23] != 17:
            continue
        ihl = (f[14] & 0x0F) * 4
        udp = f[14 + ihl :]
        if int.from_bytes(udp[0:2], "big") == 67:
            out.append(udp[8 : int.from_bytes(udp[4:6], "big")])
    return out


def test_the_firmware_answers_a_pxe_clients_discover_through_the_w5500(flashed, tmp_path):
    """The proxyDHCP service on MicroPython's rp2 image: a DHCPDISCOVER from node1 (BIOS) in
    through the W5500 model's receive path, lwIP, the firmware's socket on port 67; its offer
    back out through the chip, naming the device as the boot server and the BIOS boot file."""
    from firmware import dhcp

    with flashed.board(tmp_path) as board:
        board.wait(lambda e: e.get("ev") == "usb", what="the USB serial line")
        serving(board)
        # first a MAC the site does not declare (answer: site), then node1's: the service takes
        # them in order, so an answer to the first would go out before the second's
        stranger, xid = b"\x5a\x17\x00\x00", b"\x5a\x17\x00\x01"
        board.send_frame(discover_frame(bytes.fromhex("525400123499"), stranger))
        board.send_frame(discover_frame(bytes.fromhex("525400123401"), xid))
        taken = [board.wait(lambda e, n=n: e.get("ev") == "eth-in" and e["seq"] == n, what="a frame taken")
                 for n in (0, 1)]  # fmt: skip
        assert [e["taken"] for e in taken] == [True, True]
        offer = board.wait(lambda e: e.get("ev") == "eth" and any(
            p[4:8] == xid for p in dhcp_replies([bytes.fromhex(e["frame"])])), timeout=120,
            what="the device's DHCPOFFER")  # fmt: skip
        assert not [p for p in dhcp_replies(board.sent_frames()) if p[4:8] == stranger]
    payload = dhcp_replies([bytes.fromhex(offer["frame"])])[0]
    p = dhcp.parse(memoryview(payload))
    assert p.msg_type == dhcp.OFFER
    assert payload[20:24] == bytes([10, 77, 0, 2])  # siaddr: the device
    assert payload[16:20] == bytes(4)  # yiaddr: a proxyDHCP gives no address
    assert b"undionly.kpxe" in payload[108:236] or (p.bootfile or b"").startswith(b"undionly.kpxe")
    assert b"PXEClient" in payload


@pytest.mark.netns
def test_a_tftp_client_on_a_wire_fetches_the_boot_file_from_the_board(flashed, tmp_path):
    """The TFTP service on MicroPython's rp2 image, end to end: tftp-hpa in a network namespace
    whose tap device is the W5500's wire (TapWire) asks the board at its static address for the
    BIOS boot file; ARP, the read request, each block and each acknowledgement go through the
    W5500 model, its driver and lwIP, and the file comes out whole."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a network namespace")
    if shutil.which("tftp") is None:
        pytest.skip("no tftp (Debian package tftp-hpa; tools/setup installs it)")
    from bastion.lab.netns import Namespace

    with Namespace(f"ebrp2{os.getpid() % 100000}") as ns:
        wire = TapWire(ns, "ebrp2w", "10.77.0.1/24")
        try:
            with flashed.board(tmp_path, on_frame=wire.write) as board:
                wire.attach(board)
                board.wait(lambda e: e.get("ev") == "usb", what="the USB serial line")
                serving(board)
                out = tmp_path / "got.kpxe"
                started = time.monotonic()
                r = ns.run("tftp", "-m", "binary", "10.77.0.2", "-c", "get", "undionly.kpxe", str(out),
                           capture_output=True, text=True, timeout=600)  # fmt: skip
                took = time.monotonic() - started
                assert r.returncode == 0 and "Error" not in r.stderr, r.stdout + r.stderr
                status = status_of(board)
        finally:
            wire.close()
    assert out.read_bytes() == (flashed.tftp / "undionly.kpxe").read_bytes()
    heap = status["status"]["heap"]
    print(f"rp2 (emulated): {out.stat().st_size} B over TFTP in {took:.1f} s of wall time; heap after: {heap}")


def test_the_emulator_ends_when_nothing_reads_its_events_while_its_line_is_held(tmp_path):
    """Its events go to whoever started it; once that reader is gone (a test process killed
    outright) a write to it fails (EPIPE), and the emulator ends, even while another process
    holds its serial line (here: this one) so that its read of the line never returns. Node's
    own exit waited for that read: the emulator stayed, a core's worth of CPU, and no longer
    ended on SIGTERM (a CI run's failure of the test below, when this came before setpriv's
    signal). Started without setpriv, so nothing else ends it."""
    from rp2kit import EMULATOR, IMAGE

    master, slave = pty.openpty()
    proc = subprocess.Popen(["node", str(EMULATOR), "--image", str(IMAGE), "--serial-fd", str(master)],
                            pass_fds=(master,), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        for line in proc.stdout:  # up to the USB line: its clock events follow once a second
            if json.loads(line).get("ev") == "usb":
                break
        proc.stdout.close()
        proc.wait(timeout=60)  # a bound on a hang, not a timing claim
        assert "EPIPE" in proc.stderr.read().decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)


def test_an_idle_chip_leaves_the_machine_its_cpu(tmp_path):
    """MicroPython's REPL waiting for a byte sleeps the chip with no timer set. rp2040js's loop
    then spins, its clock still: a core of the machine (at the raised priority rp2kit gives it)
    that the tests' own processes needed. The emulator sleeps instead until the host writes."""
    with Rp2Board(tmp_path / "ttyACM0") as board:
        board.wait(lambda e: e.get("ev") == "usb", what="the USB serial line")
        time.sleep(1)  # past the banner

        def cpu() -> float:
            fields = Path(f"/proc/{board.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        used, began = cpu(), time.monotonic()
        time.sleep(3)
        used, wall = cpu() - used, time.monotonic() - began
        # CPU time against the wall's: a slow or busy machine gives the emulator less, not more
        assert used < wall / 2, f"{used:.2f} s of CPU in {wall:.2f} s of an idle chip"
        # and the chip still answers the host at once
        assert mpremote(board.link, "exec", "print(6 * 7)", timeout=EMULATED_S).strip() == "42"


def test_the_emulator_stops_when_the_process_that_started_it_is_killed(tmp_path):
    """A test process killed outright (a CI timeout, kill -9) does not leave its emulator
    running, a core's worth of CPU, even while another process holds the board's serial line
    (the lab's controller does; here a `sleep`). With nothing holding the line the emulator's
    read gets EIO and it ends on its own; this is the case where only rp2kit's setpriv ends it."""
    if shutil.which("setpriv") is None:
        pytest.skip("no setpriv (Debian package util-linux)")
    from bastion.lab.netns import kill_pids, pid_running

    code = (f"import subprocess, sys, time; sys.path.insert(0, {str(Path(__file__).parents[1])!r}); "
            "from pathlib import Path; from rp2kit import Rp2Board; "
            f"b = Rp2Board(Path({str(tmp_path / 'ttyACM0')!r})).__enter__(); "
            "b.wait(lambda e: e.get('ev') == 'usb', what='the USB line'); "
            "holder = subprocess.Popen(['sleep', '600'], pass_fds=(b._slave,)); "
            "print(b.proc.pid, holder.pid, flush=True); time.sleep(600)")  # fmt: skip
    harness = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pid = holder = None
    try:
        pid, holder = map(int, harness.stdout.readline().split())
        assert pid_running(pid) and "emulator.mjs" in Path(f"/proc/{pid}/cmdline").read_text()
        harness.kill()
        harness.wait(timeout=30)
        deadline = time.monotonic() + 30  # a bound on a hang, not a timing claim
        while pid_running(pid):
            assert time.monotonic() < deadline, "the emulator outlived the process that started it"
            time.sleep(0.2)
        assert pid_running(holder)  # the line was held all along
    finally:
        if harness.poll() is None:
            harness.kill()
            harness.wait()
        kill_pids({p: None for p in (pid, holder) if p is not None}, grace=0)
