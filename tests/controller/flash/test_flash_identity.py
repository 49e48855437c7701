"""`bastion flash` and which board the device is: the running firmware's hello names its board
(with no firmware answering, the board.json on the flash does), and the board's MicroPython
names its board and chip in sys.implementation._machine. Another chip, another board file's
build, or a running firmware or board.json of another board is refused unless
--board-mismatch-ok.

machine_check is tested on probe dicts as the probe (bastion.flash.onboard.impl) returns them;
the dressed sim board's stand-in sys says the board file's own _machine, or another with
--dress-machine (bastion.flash.simboard.Dress), for the warning end to end. The running
firmware's board and the board.json's are tested end to end on dressed boards."""

from __future__ import annotations

import json

from bastion.flash import image as flashing
from dresskit import BOARD, bastion, channel_on, dressed, micropython_alone, resets
from simkit import RelayWatch
from test_flash import SITE_YAML, make_site, small_tftp

# every channel's default on: a first flash of a board with MicroPython alone (its NC relays
# undriven, so on) switches none (test_flash_safety_board.py)
SITE_ON = SITE_YAML.replace("      default: off", "      default: on")

W5500 = flashing.board_definition("w5500-evb-pico")
W5100S = flashing.board_definition("w5100s-evb-pico")
ESP32_POE = flashing.board_definition("olimex-esp32-poe")
SIM = flashing.board_definition("sim")


def probe_impl(machine: str | None, platform: str = "rp2") -> dict:
    """onboard.impl()'s answer on a board running MicroPython 1.28.0."""
    mpy = 4870 if platform == "rp2" else 11014
    return {"name": "micropython", "version": [1, 28, 0], "mpy": mpy, "machine": machine,
            "build": None, "platform": platform, "maxsize": 2**31 - 1}  # fmt: skip


def test_each_board_files_own_micropython_build_passes():
    assert flashing.machine_check(probe_impl("W5500-EVB-Pico with RP2040"), W5500) == ([], [])
    assert flashing.machine_check(probe_impl("W5100S-EVB-Pico with RP2040"), W5100S) == ([], [])
    # the ESP32-POE's board file knows only its chip: any original-ESP32 build passes
    assert flashing.machine_check(probe_impl("Olimex ESP32 POE with ESP32", "esp32"),
                                  ESP32_POE) == ([], [])  # fmt: skip


def test_another_chip_on_the_same_port_is_refused():
    # An RP2350 (a Pico 2) is MicroPython's rp2 port as well: abi_check's port check lets it
    # through, and its pins are not the board file's.
    problems, warnings = flashing.machine_check(
        probe_impl("Raspberry Pi Pico 2 with RP2350"), W5500)
    assert warnings == []
    assert problems[0] == (
        "the device's MicroPython is built for 'Raspberry Pi Pico 2 with RP2350' "
        "(sys.implementation._machine): an RP2350, and board w5500-evb-pico is an RP2040 board, "
        "whose relay and Ethernet pins are not that chip's")  # fmt: skip
    assert problems[1].startswith("refusing to flash: nothing was written. Flash it with its own "
                                  "--board (")  # fmt: skip
    assert problems[1].endswith("if it is a w5500-evb-pico all the same, flash with "
                                "--board-mismatch-ok")  # fmt: skip
    # "ESP32" as the whole chip: an ESP32-S3 build does not pass for an original ESP32
    problems, _ = flashing.machine_check(
        probe_impl("Generic ESP32S3 module with ESP32S3", "esp32"), ESP32_POE)
    assert "an ESP32S3, and board olimex-esp32-poe is an ESP32 board" in problems[0], problems


def test_another_board_files_build_of_the_same_chip_is_refused():
    # W5100S_EVB_PICO's MicroPython drives a W5100S: on a W5500-EVB-Pico the firmware would
    # not come up on the network.
    problems, warnings = flashing.machine_check(probe_impl("W5100S-EVB-Pico with RP2040"), W5500)
    assert warnings == []
    assert problems[0] == (
        "the device's MicroPython is built for 'W5100S-EVB-Pico with RP2040' (sys.implementation."
        "_machine), board w5100s-evb-pico's, not board w5500-evb-pico's (W5500-EVB-Pico with "
        "RP2040): the firmware would drive another board's Ethernet chip and would not come up "
        "on the network")  # fmt: skip
    problems, _ = flashing.machine_check(probe_impl("W5500-EVB-Pico with RP2040"), W5100S)
    assert "board w5500-evb-pico's, not board w5100s-evb-pico's" in problems[0], problems


def test_a_build_no_board_file_knows_is_a_warning():
    problems, warnings = flashing.machine_check(probe_impl("Raspberry Pi Pico with RP2040"), W5500)
    assert problems == []
    assert warnings == [(
        "the device's MicroPython names 'Raspberry Pi Pico with RP2040' "
        "(sys.implementation._machine), not what board w5500-evb-pico's board file expects "
        "(W5500-EVB-Pico with RP2040): not MicroPython's W5500_EVB_PICO firmware, or a build no "
        "board file knows; not refused, but check that the board is a w5500-evb-pico")]  # fmt: skip
    stand_in = probe_impl("sim board dressed as w5500-evb-pico (a stand-in)")
    assert flashing.machine_check(stand_in, W5500)[0] == []
    _, warnings = flashing.machine_check(probe_impl(None), W5500)
    assert warnings == [("the device's MicroPython does not name its board (no "
                         "sys.implementation._machine): not checked against board "
                         "w5500-evb-pico")]  # fmt: skip


def test_what_is_not_machine_checks_to_say():
    # another port: abi_check refuses it, naming both ports
    assert flashing.machine_check(probe_impl("Olimex ESP32 POE with ESP32", "esp32"),
                                  W5500) == ([], [])  # fmt: skip
    # the sim board's file names no chip and no build
    assert flashing.machine_check(probe_impl("linux [GCC 12.2.0] version", "linux"),
                                  SIM) == ([], [])  # fmt: skip


def test_a_running_firmware_of_another_board_is_refused_before_it_is_stopped(tmp_path):
    # It warned "the device runs board w5500-evb-pico; flashing board w5100s-evb-pico" and
    # flashed the W5100S's board file onto a W5500-EVB-Pico: its Ethernet would not come up.
    flash = tmp_path / "flash"
    site = make_site(tmp_path / "site")
    tftp = small_tftp(tmp_path / "tftp")
    args = ["flash", "--port", "", "--board", "w5100s-evb-pico", "--site", str(site),
            "--tftp-dir", str(tftp)]  # fmt: skip
    with dressed(flash, tmp_path / "ttyACM0") as board:
        args[2] = str(board.link)
        state = channel_on(board, flash, 2)
        before = (flash / "board.json").read_bytes()
        mark, reset_mark = len(board.seen), len(resets(board))
        watch = RelayWatch(flash)
        try:
            r = bastion(*args)
        finally:
            seen = watch.stop()
        assert r.returncode == 1, r.stdout + r.stderr
        assert (f"the firmware running on {board.link} says it is board {BOARD} (its hello), and "
                "this flash is for board w5100s-evb-pico: the same chip (RP2040) with another "
                "Ethernet chip or pins: the firmware would not come up on the network"
                ) in r.stderr, r.stderr  # fmt: skip
        assert (f"refusing to flash: nothing was written. If it is a {BOARD}, flash it with "
                f"--board {BOARD}; if the board file flashed onto it before was the wrong one "
                "and it is a w5100s-evb-pico, flash with --board-mismatch-ok") in r.stderr
        # refused while the firmware ran: it was never stopped, reset or put into maintenance
        assert resets(board)[reset_mark:] == [] and not any(
            e.get("ev") == "boot" for e in board.seen[mark:]), board.seen[mark:]  # fmt: skip
        assert seen == [state], seen
        assert (flash / "board.json").read_bytes() == before

        r = bastion(*args, "--board-mismatch-ok")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "flashing as asked (--board-mismatch-ok)" in r.stderr, r.stderr
    assert json.loads((flash / "board.json").read_text())["name"] == "w5100s-evb-pico"


def test_a_board_json_of_another_board_is_refused_when_no_firmware_answers(tmp_path):
    # only the hello was compared: a board with MicroPython alone whose board.json said
    # w5100s-evb-pico was flashed as a w5500-evb-pico without a word
    flash = tmp_path / "pico"
    site = make_site(tmp_path / "site", SITE_ON)
    args = ["flash", "--port", "", "--board", BOARD, "--site", str(site), "--tftp-dir",
            str(small_tftp(tmp_path / "tftp"))]  # fmt: skip
    board = micropython_alone(flash, tmp_path / "ttyACM0", board_json="w5100s-evb-pico")
    try:
        args[2] = str(board.link)
        r = bastion(*args)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "  no answer (firmware not running?)" in r.stdout, r.stdout
        assert (f"the board.json on the device on {board.link} says it is board w5100s-evb-pico "
                "(no firmware answered to say which board it is), and this flash is for board "
                f"{BOARD}: the same chip (RP2040) with another Ethernet chip or pins: the "
                "firmware would not come up on the network") in r.stderr, r.stderr  # fmt: skip
        assert ("refusing to flash: nothing was written. If it is a w5100s-evb-pico, flash it "
                "with --board w5100s-evb-pico; if the board file flashed onto it before was the "
                f"wrong one and it is a {BOARD}, flash with --board-mismatch-ok") in r.stderr
        assert sorted(p.name for p in flash.iterdir()) == ["board.json"]  # nothing written

        r = bastion(*args, "--board-mismatch-ok")
        assert r.returncode == 0, r.stdout + r.stderr
        assert ("says it is board w5100s-evb-pico (no firmware answered to say which board it "
                "is), and this flash is for board w5500-evb-pico: the same chip (RP2040) with "
                "another Ethernet chip or pins: the firmware would not come up on the network; "
                "flashing as asked (--board-mismatch-ok)") in r.stderr, r.stderr  # fmt: skip
    finally:
        board.stop()
    assert json.loads((flash / "board.json").read_text())["name"] == BOARD


def test_a_board_json_of_the_board_itself_passes_and_so_does_an_unreadable_one(tmp_path):
    # the board.json check must not refuse what it cannot read (a broken file: the firmware
    # itself runs the `unknown` board then) nor the board's own file
    flash = tmp_path / "pico"
    site = make_site(tmp_path / "site", SITE_ON)
    board = micropython_alone(flash, tmp_path / "ttyACM0")
    (flash / "board.json").write_text("{not json")
    try:
        r = bastion("flash", "--port", str(board.link), "--board", BOARD, "--site", str(site),
                    "--tftp-dir", str(small_tftp(tmp_path / "tftp")))  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        assert "board.json on the device" not in r.stderr, r.stderr
    finally:
        board.stop()
    assert flashing.device_board_name(b"{not json") is None
    assert flashing.device_board_name(b'{"name": 7}') is None
    assert flashing.device_board_name(b'{"name": "sim"}') == "sim"


def test_every_board_a_sim_can_be_dressed_as_passes_the_machine_check_as_itself():
    from bastion.flash.simboard import Dress

    for b in (W5500, W5100S, ESP32_POE):
        dress = Dress(b.defn)
        impl = probe_impl(dress.machine, dress.platform)
        assert flashing.machine_check(impl, b) == ([], []), (b.name, dress.machine)
    assert Dress(W5500.defn, machine="Raspberry Pi Pico with RP2040").machine == (
        "Raspberry Pi Pico with RP2040")


MACHINE_WARNING = "(sys.implementation._machine), not what board w5500-evb-pico's board file expects"


def test_a_dressed_board_says_its_board_files_machine_and_only_another_build_is_warned_of(tmp_path):
    # every flash of a dressed board warned that its MicroPython names 'sim board dressed as
    # w5500-evb-pico (a stand-in)', a build no board file knows: a warning that was never true
    # of the board it stood in for
    site = make_site(tmp_path / "site", SITE_ON)
    tftp = small_tftp(tmp_path / "tftp")

    def flash_dressed(name: str, *dress: str):
        board = micropython_alone(tmp_path / name, tmp_path / f"tty-{name}", *dress)
        try:
            r = bastion("flash", "--port", str(board.link), "--board", BOARD, "--site", str(site),
                        "--tftp-dir", str(tftp))  # fmt: skip
        finally:
            board.stop()
        assert r.returncode == 0, r.stdout + r.stderr
        return r

    own = flash_dressed("own")
    assert "_machine" not in own.stderr, own.stderr
    assert ("the device runs micropython 1.28.0 on rp2 (W5500-EVB-Pico with RP2040), .mpy 6.3 "
            "armv6m") in own.stdout, own.stdout  # fmt: skip
    pico = flash_dressed("pico", "--dress-machine", "Raspberry Pi Pico with RP2040")
    assert ("the device's MicroPython names 'Raspberry Pi Pico with RP2040' "
            + MACHINE_WARNING) in pico.stderr, pico.stderr  # fmt: skip
