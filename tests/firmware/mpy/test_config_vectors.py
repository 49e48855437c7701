# firmware.config: the device config is checked field by field, under CPython and MicroPython.
from mpytest import raises

from firmware.config import Config, ConfigError

_BASE = {"server_ip": "10.77.0.2", "script_url": "http://10.77.0.1:8080/boot.ipxe"}


def _cfg(**over):
    d = dict(_BASE)
    d.update(over)
    return Config(d)


def _error(**over):
    try:
        _cfg(**over)
    except ConfigError as e:
        return str(e)
    raise AssertionError("accepted %r" % (over,))


def test_defaults():
    c = _cfg()
    assert c.server_ip == bytes([10, 77, 0, 2])
    assert c.next_server == c.server_ip
    assert c.allowed_macs is None
    assert c.tftp_max_transfers == 4 and c.tftp_max_blksize == 1468
    assert c.rpi_menu == "Raspberry Pi Boot"


def test_fields_are_converted():
    c = _cfg(
        boot_files={"0": "undionly.kpxe", "7": "ipxe.efi"},
        allowed_macs=["52:54:00:AA:bb:01"],
        next_server="10.77.0.1",
        tftp={"max_transfers": 2},
    )
    assert c.boot_files == {0: "undionly.kpxe", 7: "ipxe.efi"}
    assert c.allowed_macs == {b"\x52\x54\x00\xaa\xbb\x01"}
    assert c.next_server == bytes([10, 77, 0, 1])
    assert c.tftp_max_transfers == 2


def test_errors_name_the_field():
    assert "server_ip" in _error(server_ip="10.77.0")
    assert "server_ip" in _error(server_ip="10.77.0.300")
    assert "allowed_macs[1]" in _error(allowed_macs=["52:54:00:aa:bb:01", "zz:54:00:aa:bb:01"])
    assert "boot_files" in _error(boot_files={"x86": "ipxe.efi"})
    assert "boot_files.7" in _error(boot_files={"7": ""})
    assert "tftp.max_blksize" in _error(tftp={"max_blksize": 9000})
    assert "tftp.max_transfers" in _error(tftp={"max_transfers": "4"})
    assert "script_url" in _error(script_url="")


def test_server_ip_override_and_not_an_object():
    assert Config(_BASE, "10.0.0.9").server_ip == bytes([10, 0, 0, 9])
    with raises(ConfigError):
        Config([1, 2])


def test_strings_that_must_fit_a_dhcp_option_are_bounded():
    assert "script_url" in _error(script_url="http://x/" + "a" * 250)
    assert "rpi.menu" in _error(rpi={"menu": "m" * 201})


def test_the_bounds_are_bytes_and_what_passes_them_builds_its_options():
    # The options' limits are bytes of UTF-8. Counted in characters, 121 "e-acute" passed as a
    # menu, and building option 43 at the services' start raised: nothing was served, and no
    # config error named the field.
    from firmware.pxe import Policy

    wide = "\u00e9"  # two bytes of UTF-8
    assert _error(rpi={"menu": wide * 121}) == "rpi.menu: must be a string of 1..200 bytes (UTF-8)"
    assert "script_url" in _error(script_url="http://x/" + wide * 125)
    assert "boot_files.7: must be a file name of 1..127 bytes" in _error(boot_files={"7": wide * 64})
    Policy(_cfg(rpi={"menu": wide * 100}, script_url="http://x/" + wide * 123,
                boot_files={"7": wide * 63 + "e"}))  # the most that passes: its options fit


def test_what_was_taken_silently_or_crashed_is_refused_by_field():
    # an octet too big for a machine word was an OverflowError (not a ValueError) on
    # MicroPython: it escaped the checker and stopped the boot
    assert "next_server: '99999999999999999999.1.1.1' is not an IPv4 address" in _error(
        next_server="99999999999999999999.1.1.1")
    for bad in ("10.77.0.+1", "10.77.0. 1", "10.77.0.0001", "1.2.3.-4"):
        assert "is not an IPv4 address" in _error(server_ip=bad), bad
    # an allow-list of the wrong type meant "answer every PXE client"
    assert "allowed_macs: must be a list" in _error(allowed_macs={})
    assert "allowed_macs: must be a list" in _error(allowed_macs=False)
    assert _cfg(allowed_macs=[]).allowed_macs is None  # empty: every client, as documented
    assert "next_server: False is not an IPv4 address" in _error(next_server=False)
    assert "rpi.boot: 'no' must be true or false" in _error(rpi={"boot": "no"})
    assert _cfg(rpi={"boot": False}).rpi_boot is False
    for key in (" 7 ", "+9", "0_7", "-1", "123456"):
        assert "boot_files: key" in _error(boot_files={key: "ipxe.efi"}), key


def test_a_long_bad_value_is_quoted_short():
    # the error goes out in the boot event's one frame: a long value would make it too long
    # to send, and the operator would never see why nothing is served
    text = _error(allowed_macs=["z" * 1600])
    assert len(text) < 120 and "zzz..." in text and text.startswith("allowed_macs[0]: 'zzz")
    text = _error(server_ip="1" * 5000)
    assert len(text) < 100 and "..." in text


def test_channel_names_are_at_most_a_dns_labels_length():
    from firmware.config import channels

    assert channels([{"name": "n" * 63}])[0][0] == "n" * 63
    with raises(ConfigError):
        channels([{"name": "n" * 64}])


def test_the_tftp_root_is_a_directory_of_its_own():
    # "/" served the whole flash: device.json and the state files to any TFTP client
    for root in ("/", "//", ".", "./", "..", "tftp/../..", "../x"):
        assert "must be a directory of its own" in _error(tftp={"root": root}), root
    assert _cfg(tftp={"root": "boot/tftp"}).tftp_root == "boot/tftp"
    assert _cfg(tftp={"root": "/tftp"}).tftp_root == "/tftp"  # a board's flash is its root


def test_an_unknown_key_is_refused_where_it_is_with_the_key_it_was_meant_to_be():
    # A typo was taken for "not set": "alowed_macs" answered every PXE client, "max_windw"
    # left the default window.
    assert _error(alowed_macs=["52:54:00:aa:bb:01"]) == (
        "alowed_macs: unknown key (did you mean allowed_macs?)")  # fmt: skip
    assert _error(tftp={"max_windw": 8}) == "tftp.max_windw: unknown key (did you mean max_window?)"
    assert _error(rpi={"Menu": "x"}) == "rpi.Menu: unknown key (did you mean menu?)"
    assert _error(scriptURL="x") == "scriptURL: unknown key (did you mean script_url?)"
    assert _error(url="x").startswith("url: unknown key (known: server_ip, net, script_url, ")
    assert _error(tftp={"blksize": 512}) == ("tftp.blksize: unknown key (known: root, "
                                             "max_transfers, max_blksize, timeout_ms, retries, "
                                             "max_window)")  # fmt: skip
    d = dict(_BASE)
    d["x" * 500] = 1
    try:
        Config(d)
    except ConfigError as e:
        assert len(str(e)) < 200, str(e)  # a long key is cut short: the event fits its frame
    else:
        raise AssertionError("a long unknown key was accepted")
    # what the docs name, and the sections other checkers read (net, power), are known
    _cfg(boot_files={}, allowed_macs=[], next_server=None, net={}, power={},
         rpi={"boot": True, "menu": "m", "next_server": None},
         tftp={"root": "t", "max_transfers": 4, "max_blksize": 1468, "timeout_ms": 1000,
               "retries": 5, "max_window": 4})  # fmt: skip


def test_an_unknown_key_in_the_net_section_is_refused():
    from firmware.netconfig import net_settings

    try:
        net_settings({"net": {"ip": "192.168.1.5/24", "gatway": "192.168.1.1"}})
    except ConfigError as e:
        assert str(e) == "net.gatway: unknown key (did you mean gateway?)", str(e)
    else:
        raise AssertionError("net.gatway accepted")
    assert net_settings({"net": {"dhcp_wait_ms": 2000}}).how == "dhcp"
