"""bastion.flash.sim: how the sim board's flash is laid out and its MicroPython started, for the
unix port installed with bastion and for another MicroPython (one with the firmware frozen in)."""

from __future__ import annotations

import pytest
from bastion.flash import sim


def test_the_flash_holds_the_firmware_as_mpy_the_board_file_and_the_boot_stub(tmp_path):
    flash = tmp_path / "flash"
    sim.install_firmware(flash)
    assert sorted(p.name for p in flash.iterdir()) == ["board.json", "firmware", "main.py"]
    assert (flash / "firmware" / "main.mpy").is_file()
    assert (flash / "main.py").read_text() == sim.BOOT_STUB


def test_a_firmware_frozen_into_micropython_leaves_only_the_board_file_and_the_boot_stub(tmp_path):
    flash = tmp_path / "flash"
    sim.install_firmware(flash, frozen=True)
    assert sorted(p.name for p in flash.iterdir()) == ["board.json", "main.py"]
    # main.py imports the firmware by name: from the flash when it is there, else the frozen one
    assert (flash / "main.py").read_text() == sim.BOOT_STUB


def test_a_firmware_in_the_flash_would_shadow_the_frozen_one_and_is_refused(tmp_path):
    flash = tmp_path / "flash"
    sim.install_firmware(flash)
    with pytest.raises(sim.SimError, match="shadow the firmware frozen"):
        sim.install_firmware(flash, frozen=True)


def test_the_command_runs_the_micropython_given_or_the_one_installed(tmp_path):
    cmd = sim.firmware_command(tmp_path, "127.0.0.1", 2067, 2011, 2069, "48k", "/opt/mp32")
    assert cmd[:4] == ["/opt/mp32", "-X", "heapsize=49152", "main.py"]
    assert cmd[4:] == ["listen", "127.0.0.1", "dhcp-port", "2067", "pxe-port", "2011",
                       "tftp-port", "2069"]  # fmt: skip
    assert sim.firmware_command(tmp_path, heap="48k")[0] == sim.micropython_bin()


def test_the_interface_of_the_listen_address_is_found_for_the_dhcp_listener(tmp_path):
    # docs/device.md, "The sim board's addresses"; the namespace test is test_sim_listen.py
    assert sim.listen_interface(None) is None and sim.listen_interface("0.0.0.0") is None
    assert sim.listen_interface("127.0.0.1") is None  # bound as it is: no broadcasts there
    with pytest.raises(sim.SimError, match="no interface here has that address"):
        sim.listen_interface("192.0.2.77")  # TEST-NET-1: on no interface of a test host
    assert sim.firmware_args("10.1.2.3", interface="eth1")[:2] == ["listen", "10.1.2.3"]
    assert "dhcp-interface" not in sim.firmware_args("127.0.0.1")
    cmd = sim.firmware_command(tmp_path, "10.1.2.3", micropython="mp", interface="eth1")
    assert cmd[cmd.index("dhcp-interface") + 1] == "eth1"


def test_the_overrides_are_bare_words_and_refuse_what_would_split():
    # main.py splits its argv words at white space; bare names are names the firmware has
    # interned already, where "--listen" was one more (firmware/main.py, "Interned names")
    assert sim.firmware_args(None, 6700, 4011, 6900) == [
        "dhcp-port", "6700", "pxe-port", "4011", "tftp-port", "6900"]  # fmt: skip
    with pytest.raises(sim.SimError, match="white space"):
        sim.firmware_args("10.1.2.3", interface="eth 1")
