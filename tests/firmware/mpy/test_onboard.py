# bastion/flash/onboard.py, the programs `bastion flash` runs on the device, under both
# interpreters: probe reads the flash, install swaps the staged files in, clean forgets a
# half-done flash. Each test works in a fresh directory under /tmp, as the board's flash.
import json
import os
import time

try:
    from bastion.flash import onboard  # CPython (pytest)
except ImportError:
    import onboard  # MicroPython: controller/bastion/flash is on MICROPYPATH

_n = [0]


class _Flash:
    """A fresh directory as the working directory, the way a board's flash is."""

    def __enter__(self):
        _n[0] += 1
        self.path = "/tmp/bastion-onboard-%d-%d" % (int(time.time() * 1000) % 10000000, _n[0])
        self.old = os.getcwd()
        os.mkdir(self.path)
        os.chdir(self.path)
        return self

    def __exit__(self, *exc):
        os.chdir(self.old)
        onboard.rm(self.path)
        return False


def _write(p, data):
    with open(p, "wb") as f:
        f.write(data)


def _read(p):
    with open(p, "rb") as f:
        return f.read()


def test_probe_reports_hashes_sizes_state_and_free_space():
    with _Flash():
        os.mkdir("firmware")
        _write("firmware/main.mpy", b"code")
        _write("device.json", b'{"server_ip": "10.0.0.2"}')
        _write("power.state", b"1010")
        got = json.loads(onboard.probe(["firmware/main.mpy", "missing.bin"]))
        # sha256(b"code")
        assert got["hashes"]["firmware/main.mpy"] == (
            "5694d08a2e53ffcae0c3103e5ad6f6076abd960eb1f8a56577040bc1028f702b")
        assert got["hashes"]["missing.bin"] is None
        assert got["sizes"] == {"firmware/main.mpy": 4, "missing.bin": None}
        assert got["firmware"] == {"main.mpy": 4}
        assert got["power_state"] == "1010"
        assert got["device"] == '{"server_ip": "10.0.0.2"}'
        assert got["relays_state"] is None and got["board"] is None
        block, blocks, free = got["space"]
        assert block > 0 and 0 < free <= blocks


def test_probe_reports_what_it_cannot_read_as_none():
    # each case the probe's reads catch by name: a state file that is not UTF-8 text
    # (UnicodeError) and a path that is a directory (OSError)
    with _Flash():
        _write("board.json", b"\xff\xfe{}")
        os.mkdir("dir.bin")
        got = json.loads(onboard.probe(["dir.bin"]))
        assert got["board"] is None
        assert got["hashes"] == {"dir.bin": None}


def test_probe_forgets_a_half_done_flash_first():
    with _Flash():
        os.mkdir(onboard.STAGE)
        _write(onboard.STAGE + "/device.json", b"{}")
        json.loads(onboard.probe(["device.json"]))
        assert not onboard.isdir(onboard.STAGE)


def test_probe_reads_the_implementation_as_sys_implementation_has_it():
    import sys

    impl = json.loads(onboard.probe([]))["impl"]
    i = sys.implementation
    assert impl["name"] == i.name
    assert impl["version"] == list(i.version[:3])
    assert impl["platform"] == sys.platform and impl["maxsize"] == sys.maxsize
    # _mpy only where .mpy files can be imported: MicroPython (pytest runs this under CPython
    # too, which has none)
    assert impl["mpy"] == getattr(i, "_mpy", None)
    if i.name == "micropython":
        assert impl["mpy"] & 0xFF == 6  # the unix port from PyPI: .mpy version 6


def test_install_swaps_the_firmware_and_moves_files_into_place():
    with _Flash():
        os.mkdir("firmware")
        _write("firmware/old.mpy", b"old")
        for d in (onboard.STAGE, onboard.STAGE + "/firmware", onboard.STAGE + "/tftp",
                  onboard.STAGE + "/tftp/arm64"):
            os.mkdir(d)
        _write(onboard.STAGE + "/firmware/new.mpy", b"new")
        _write(onboard.STAGE + "/tftp/arm64/snp.efi", b"MZ")
        _write(onboard.STAGE + "/device.json", b"{}")
        assert onboard.install(["tftp/arm64/snp.efi", "device.json"], True) == 2
        assert sorted(os.listdir("firmware")) == ["new.mpy"]
        assert _read("tftp/arm64/snp.efi") == b"MZ"
        assert _read("device.json") == b"{}"
        assert not onboard.isdir(onboard.STAGE) and not onboard.isdir(onboard.OLD)


def test_install_without_swap_leaves_the_firmware_alone():
    with _Flash():
        os.mkdir("firmware")
        _write("firmware/keep.mpy", b"k")
        os.mkdir(onboard.STAGE)
        _write(onboard.STAGE + "/device.json", b"{}")
        assert onboard.install(["device.json"], False) == 1
        assert os.listdir("firmware") == ["keep.mpy"]
        assert _read("device.json") == b"{}"


def test_clean_forgets_a_half_done_flash():
    with _Flash():
        for d in (onboard.STAGE, onboard.STAGE + "/firmware", onboard.OLD):
            os.mkdir(d)
        _write(onboard.STAGE + "/firmware/x.mpy", b"x")
        onboard.clean()
        assert not onboard.isdir(onboard.STAGE) and not onboard.isdir(onboard.OLD)
        onboard.clean()  # nothing there: still fine


def test_stage_makes_the_directories_the_staged_files_need():
    with _Flash():
        os.mkdir(onboard.STAGE)
        _write(onboard.STAGE + "/old.bin", b"x")  # a half-done flash: forgotten
        onboard.stage(["tftp/pi/config.txt", "firmware/main.mpy", "device.json"])
        assert sorted(os.listdir(onboard.STAGE)) == ["firmware", "tftp"]
        assert os.listdir(onboard.STAGE + "/tftp") == ["pi"]
        assert os.listdir(onboard.STAGE + "/tftp/pi") == []
