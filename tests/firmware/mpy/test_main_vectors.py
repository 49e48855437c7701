# firmware.main's reading of the sim board's overrides from argv, under CPython and MicroPython:
# the supervisor passes bare `name value` words (bastion.flash.simboard.firmware_words).
from firmware.main import _options


def test_name_value_words_become_the_overrides():
    argv = ["main.py", "listen", "127.0.0.1", "dhcp-port", "6700", "tftp-port", "6900",
            "board", "/tmp/dress/board.json"]  # fmt: skip
    assert _options(argv) == {"listen": "127.0.0.1", "dhcp-port": "6700", "tftp-port": "6900",
                              "board": "/tmp/dress/board.json"}  # fmt: skip


def test_one_word_may_hold_several_pairs_and_a_lone_name_is_dropped():
    assert _options(["main.py", "listen 10.0.0.2  pxe-port\t4011", "log-capacity"]) == {
        "listen": "10.0.0.2", "pxe-port": "4011"}  # fmt: skip


def test_no_words_no_overrides():
    assert _options(["main.py"]) == {}
    assert _options([]) == {}
