# The real boards' layer (firmware/board.py, board_hw.py, board_net.py, netconfig.py and the
# boot steps that use them) against STAND-IN `machine`/`network` modules that record calls
# (tests/firmware/standin/), under CPython and the MicroPython unix port. The board definitions
# are the real ones from boards/. None of this has run on a real board: it checks what the
# firmware asks of the hardware, which is all a test without the hardware can check.
import json
import os
import sys

_HERE = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
_REPO = _HERE + "/../../.."
sys.path.insert(0, _HERE + "/../standin")

import asyncio

import machine  # the stand-in: the path above comes first
import network
from mpytest import raises

from firmware import board as board_mod
from firmware import board_net, boot
from firmware.board_hw import PinRelays
from firmware.compat import sleep_ms
from firmware.config import ConfigError, settings
from firmware.log import Log
from firmware.netconfig import net_settings

assert hasattr(machine, "standin_reset") and hasattr(network, "standin_reset"), "not the stand-ins"

W5500 = "w5500-evb-pico"
ESP32 = "olimex-esp32-poe"
BASE = {"script_url": "http://192.168.1.10:8080/boot.ipxe", "boot_files": {"7": "ipxe.efi"}}
STATIC = {"ip": "192.168.1.5/24", "gateway": "192.168.1.1"}
LEASE = ("192.168.1.77", "255.255.255.0", "192.168.1.1", "192.168.1.1")


def _board_json(name):
    with open(_REPO + "/boards/" + name + ".json") as f:
        return json.load(f)


def _fresh(max_wdt_ms=None):
    machine.standin_reset(max_wdt_ms)
    network.standin_reset()


def _events(log, kind):
    return [e for e in log.recent() if e["ev"] == kind]


class _Flash:
    """A temporary directory as the board's flash, and the working directory meanwhile."""

    def __init__(self, files):
        self.files = files

    def __enter__(self):
        self.old = os.getcwd()
        n = 0
        while True:
            pid = os.getpid() if hasattr(os, "getpid") else 0
            self.path = "/tmp/eb-board-test-%d-%d" % (pid, n)
            try:
                os.mkdir(self.path)
                break
            except OSError:
                n += 1
        for name in self.files:
            with open(self.path + "/" + name, "w") as f:
                f.write(self.files[name])
        os.chdir(self.path)
        return self

    def __exit__(self, *exc):
        os.chdir(self.old)
        for name in os.listdir(self.path):
            os.remove(self.path + "/" + name)
        os.rmdir(self.path)
        return False

    def exists(self, name):
        try:
            os.stat(self.path + "/" + name)
            return True
        except OSError:
            return False


def _flash(board, device=None, power=None, extra=None):
    files = {"board.json": json.dumps(_board_json(board))}
    if device is not None:
        files["device.json"] = json.dumps(device)
    if power is not None:
        files["power.state"] = power
    files.update(extra or {})
    return _Flash(files)


# --- relays ---------------------------------------------------------------------------------
def test_polarity_maps_the_logical_state_to_the_pin_level():
    _fresh()
    section = {"channels": [
        {"pin": 1, "active_low": True, "contact": "nc"},
        {"pin": 2, "active_low": True, "contact": "no"},
        {"pin": 3, "active_low": False, "contact": "nc"},
        {"pin": 4, "active_low": False, "contact": "no"},
    ]}
    r = PinRelays(section)
    # (on level, off level): NC energises the coil to cut the node; active-low energises on 0
    levels = [(r.level(i, True), r.level(i, False)) for i in range(4)]
    assert levels == [(1, 0), (0, 1), (0, 1), (1, 0)]
    with raises(ValueError):
        PinRelays({"channels": [{"pin": 1, "contact": "maybe"}]})


def test_relay_pins_are_constructed_at_the_restored_level_and_never_glitch():
    _fresh()
    restored = (1, 0, 1, 0, 0, 0, 0, 1)
    with _flash(W5500, power="10100001\n"):
        log = Log(32)
        board = board_mod.load("board.json")
        power = boot.make_power(board, {}, log)
        # Active-low module, node on through NC: on = coil off = pin high.
        made = [c for c in machine.calls if c[0] == "Pin"]
        assert made == [("Pin", 6 + i, machine.Pin.OUT, v) for i, v in enumerate(restored)]
        assert not [c for c in machine.calls if c[0] == "Pin.value"]  # nothing written before
        for i, v in enumerate(restored):
            assert machine.levels[6 + i] == [v], (6 + i, machine.levels[6 + i])  # one level
        assert [c["output"] for c in power.status()][:3] == ["on", "off", "on"]
        power.off(0, 0)
    assert machine.levels[6] == [1, 0]  # switched once, by the request
    assert machine.levels[8] == [1]


def test_without_a_state_file_each_channel_takes_its_default():
    _fresh()
    device = dict(BASE, power={"channels": [{"default": "on"}] * 8})
    with _flash(W5500, device=device):
        boot.make_power(board_mod.load("board.json"), boot.power_settings(device), Log(32))
    assert [machine.levels[6 + i] for i in range(8)] == [[1]] * 8  # all nodes left on


def test_esp32_relays_are_held_through_resets():
    _fresh()
    with _flash(ESP32, power="0100\n"):
        power = boot.make_power(board_mod.load("board.json"), {}, Log(32))
        made = [c for c in machine.calls if c[0] == "Pin"]
        assert made == [("Pin", p, machine.Pin.OUT, v, ("hold", True))
                        for p, v in ((4, 0), (13, 1), (32, 0), (33, 0))]  # fmt: skip
        power.on(0, 0)
        power.tick(0)
    assert ("Pin.init", 4, None, 1, True) in machine.calls  # the new level, held again
    assert machine.levels[4] == [0, 1]


def test_a_gpio_board_without_pins_is_refused_at_load():
    d = _board_json(W5500)
    d["relays"]["channels"][3] = {"active_low": True}
    with raises(board_mod.BoardError):
        board_mod.Board(d)
    d = _board_json(W5500)
    d["channels"] = 9
    with raises(board_mod.BoardError):
        board_mod.Board(d)


# --- watchdog and LED -----------------------------------------------------------------------
def test_the_watchdog_is_clamped_to_the_chips_maximum_with_an_event():
    _fresh(max_wdt_ms=8388)  # an RP2040
    log = Log(8)
    d = _board_json(W5500)
    board_mod.Board(d).watchdog(log)
    assert [c for c in machine.calls if c[0] == "WDT"] == [("WDT", 8000)]
    assert not _events(log, "watchdog")
    d["watchdog"]["timeout_ms"] = 20000
    board_mod.Board(d).watchdog(log)
    assert [c for c in machine.calls if c[0] == "WDT"][-1] == ("WDT", 8388)
    (ev,) = _events(log, "watchdog")
    assert "20000" in ev["error"] and "8388" in ev["error"]
    assert log.counters["watchdog.clamped"] == 1
    # what the clamp saves the board from: the port refuses the timeout outright
    del d["watchdog"]["max_timeout_ms"]
    with raises(ValueError):
        board_mod.Board(d).watchdog(log)


def test_the_led_starts_off_and_follows_set():
    _fresh()
    led = board_mod.Board(_board_json(W5500)).led()
    led.set(True)
    led.set(False)
    assert machine.levels[25] == [0, 1, 0]
    assert board_mod.Board(_board_json(ESP32)).led() is None
    assert board_mod.Board(_board_json("sim")).led() is None


# --- network --------------------------------------------------------------------------------
def test_w5500_is_built_from_the_board_files_pins_and_takes_the_static_address():
    _fresh()
    log = Log(16)
    net = board_mod.Board(_board_json(W5500)).network(dict(BASE, net=STATIC), log)
    assert ("SPI", 0, 20000000, 18, 19, 16) in machine.calls
    assert network.calls == [
        ("WIZNET5K", 0, 17, 20, 21),
        ("active", True),
        ("ifconfig", ("192.168.1.5", "255.255.255.0", "192.168.1.1", "192.168.1.1")),
    ]
    assert net.device_ip == "192.168.1.5" and net.error is None
    cfg = settings(dict(BASE, net=STATIC), None, net.device_ip)  # server_ip: the board's own
    assert cfg.server_ip == bytes([192, 168, 1, 5])


def test_the_esp32_lan8720_is_built_from_the_board_file():
    _fresh()
    board_mod.Board(_board_json(ESP32)).network(dict(BASE, net=STATIC), Log(16))
    assert network.calls[0] == ("LAN", ("mdc", 23), ("mdio", 18), ("power", 12),
                                ("phy_type", network.PHY_LAN8720), ("phy_addr", 0),
                                ("ref_clk", 17), ("ref_clk_mode", machine.Pin.OUT))  # fmt: skip


def test_the_sim_board_keeps_the_hosts_network():
    _fresh()
    assert board_mod.Board(_board_json("sim")).network(dict(BASE, net=STATIC), Log(4)) is None
    assert network.calls == [] and machine.calls == []


def test_dhcp_takes_the_routers_lease():
    _fresh()
    network.lease = LEASE
    net = board_mod.Board(_board_json(W5500)).network(BASE, Log(16))
    assert ("ipconfig", (), (("dhcp4", True),)) in network.calls
    assert not [c for c in network.calls if c[0] == "ifconfig"]
    assert net.device_ip == "192.168.1.77" and net.error is None
    assert settings(BASE, None, net.device_ip).server_ip == bytes([192, 168, 1, 77])
    # a device.json that names another address is refused rather than served wrongly
    try:
        settings(dict(BASE, server_ip="192.168.1.5"), None, net.device_ip)
    except ConfigError as e:
        assert "192.168.1.5" in str(e) and "192.168.1.77" in str(e)
    else:
        raise AssertionError("a server_ip that is not the board's address was accepted")


def test_no_lease_serves_nothing_and_an_address_later_restarts_the_board():
    _fresh()
    log = Log(16)
    net = board_mod.Board(_board_json(W5500)).network(dict(BASE, net={"dhcp_wait_ms": 1000}), log)
    assert net.device_ip is None and "no DHCP lease" in net.error
    assert net.poll() is False  # still nothing
    network.lease = LEASE
    assert net.poll() is True  # an address the services were not built with: restart
    (ev,) = _events(log, "link")
    got = (ev["state"], ev["ip"], ev["prefix"], ev["gw"], ev["how"])
    assert got == ("up", "192.168.1.77", 24, "192.168.1.1", "dhcp")


def test_link_down_and_up_are_events_and_the_services_stay():
    _fresh()
    log = Log(16)
    net = board_mod.Board(_board_json(W5500)).network(dict(BASE, net=STATIC), log)
    assert net.poll() is False  # up, with the address the services were built with
    assert net.status() == {"link": "up", "ip": "192.168.1.5", "how": "static"}
    network.cable = False
    assert net.poll() is False
    assert net.status()["link"] == "down"
    network.cable = True
    assert net.poll() is False
    states = [(e["state"], e["ip"]) for e in _events(log, "link")]
    assert states == [("up", "192.168.1.5"), ("down", "192.168.1.5"), ("up", "192.168.1.5")]
    assert log.counters["net.link_down"] == 1
    assert network.nics[0].active() is True  # nothing was torn down


def test_dhcp_is_renewed_when_the_cable_comes_back():
    _fresh()
    network.lease = LEASE
    net = board_mod.Board(_board_json(W5500)).network(BASE, Log(16))
    net.poll()
    network.cable = False
    net.poll()
    network.cable = True
    before = len([c for c in network.calls if c[0] == "ipconfig"])
    assert net.poll() is False
    assert len([c for c in network.calls if c[0] == "ipconfig"]) == before + 1


def test_watch_follows_the_link_with_the_led_and_resets_for_a_new_address():
    _fresh()

    class Board:
        resets = 0

        def reset(self):
            Board.resets += 1
            network.cable = False  # (a real reset would not return)

    led = board_mod.Board(_board_json(W5500)).led()
    device = dict(BASE, net={"dhcp_wait_ms": 1000})
    net = board_mod.Board(_board_json(W5500)).network(device, Log(16))
    board_net.PERIOD_MS = 5
    try:
        async def run():
            t = asyncio.create_task(net.watch(Board(), led))
            await sleep_ms(20)
            network.lease = LEASE
            for _ in range(200):  # a guard against a hang, not a deadline
                if Board.resets:
                    break
                await sleep_ms(5)
            await sleep_ms(20)
            t.cancel()

        asyncio.run(run())
    finally:
        board_net.PERIOD_MS = 1000
    assert Board.resets == 1
    assert machine.levels[25] == [0, 1, 0]  # off, on with the link, off as it went down


def test_a_bad_net_section_names_the_field():
    for net, field in (
        ({"ip": "192.168.1.5"}, "net.ip"),
        ({"ip": "192.168.1.5/33"}, "net.ip"),
        ({"ip": "192.168.1.5/24"}, "net.gateway"),
        ({"ip": "192.168.1.5/24", "gateway": "10.0.0.1"}, "net.gateway"),
        ({"ip": "192.168.1.5/24", "gateway": "192.168.1.1", "dns": "x"}, "net.dns"),
        ({"dhcp_wait_ms": 5}, "net.dhcp_wait_ms"),
        ("dhcp", "net"),
    ):
        try:
            net_settings({"net": net})
        except ConfigError as e:
            assert str(e).startswith(field), (net, str(e))
        else:
            raise AssertionError("accepted %r" % (net,))
    s = net_settings({"net": {"ip": "10.1.2.3/16", "gateway": "10.1.0.1", "dns": "9.9.9.9"}})
    got = (s.how, s.ip, s.prefix, s.mask, s.gateway, s.dns)
    assert got == ("static", "10.1.2.3", 16, "255.255.0.0", "10.1.0.1", "9.9.9.9")
    assert net_settings({}).how == "dhcp"


def test_a_chip_that_does_not_answer_is_a_boot_error_and_the_relays_still_run():
    _fresh()
    network.fail = True
    with _flash(W5500, device=dict(BASE, net=STATIC), power="1\n"):
        log = Log(32)
        _, _, cfg, error, net, maintenance = boot.boot({}, log)
    assert cfg is None and net is None and not maintenance
    assert error.startswith("net: ") and log.counters["net.no_interface"] == 1
    assert machine.levels[6] == [1]


# --- maintenance mode -----------------------------------------------------------------------
def test_a_maintenance_boot_holds_the_relays_and_brings_up_nothing_once():
    _fresh(max_wdt_ms=8388)
    device = dict(BASE, net=STATIC)
    with _flash(W5500, device=device, power="01000000\n", extra={"maintenance": "1\n"}) as flash:
        _, _, cfg, error, net, maintenance = boot.boot({}, Log(32))
        assert maintenance is True and cfg is None and net is None and error is None
        assert not flash.exists("maintenance")  # one-shot: consumed by this boot
        assert network.calls == []  # no Ethernet, so no services
        assert not [c for c in machine.calls if c[0] == "WDT"]  # boot never starts it
        assert machine.levels[7] == [1] and machine.levels[6] == [0]  # restored, not switched
        # the next boot (the flasher's machine.reset()) is a normal one
        _fresh(max_wdt_ms=8388)
        _, _, cfg, error, net, maintenance = boot.boot({}, Log(32))
        assert maintenance is False and error is None
        assert cfg.server_ip == bytes([192, 168, 1, 5]) and net.device_ip == "192.168.1.5"
        assert network.calls[0][0] == "WIZNET5K"


# --- flash files the firmware cannot use: a boot error, never a stop at the REPL -------------
def _boot_events(log):
    return [e for e in _events(log, "boot") if "error" in e]


def test_a_board_definition_of_the_wrong_shape_boots_as_the_unknown_board():
    # Each of these once raised out of boot (AttributeError, TypeError, MemoryError): the
    # firmware stopped at the REPL with no console and no watchdog, relays never driven.
    base = _board_json(W5500)
    cases = [("relays", []), ("relays", None), ("watchdog", []),
             ("channels", "8"), ("channels", 8.5), ("channels", True), ("channels", 100000),
             ("name", "x" * 3000), ("name", "")]  # fmt: skip
    for key, value in cases:
        _fresh()
        d = dict(base)
        d[key] = value
        with _Flash({"board.json": json.dumps(d), "device.json": json.dumps(dict(BASE, server_ip="192.168.1.5"))}):
            log = Log(32)
            board, power, cfg, error, net, maintenance = boot.boot({}, log)
        assert board.name == "unknown" and power.channels == [] and not maintenance, (key, value)
        said = _boot_events(log)
        assert said and said[0]["error"].startswith("board: "), (key, value, said)
        assert len(said[0]["error"]) <= 300, (key, value)
        assert cfg is not None and error is None, (key, value, error)  # the services still run
    # an ethernet section of the wrong type is met when the network comes up: a boot error
    _fresh()
    d = dict(base, ethernet="host")
    with _Flash({"board.json": json.dumps(d), "device.json": json.dumps(dict(BASE, net=STATIC))}):
        board, power, cfg, error, net, _ = boot.boot({}, Log(32))
    assert board.name == W5500 and len(power.channels) == 8 and cfg is None
    assert error.startswith("config: AttributeError"), error


def test_a_pin_the_port_refuses_leaves_the_other_relays_driven():
    _fresh()
    machine.bad_pins.add(9)  # channel 3
    with _flash(W5500, power="11111111\n"):
        log = Log(32)
        power = boot.make_power(board_mod.load("board.json"), {}, log)
    driven = sorted(p for p in machine.levels)
    assert driven == [6, 7, 8, 10, 11, 12, 13]
    assert log.counters["power.output_error"] == 1
    assert [e for e in _events(log, "power") if e.get("ch") == 3 and "invalid pin" in e.get("error", "")]
    assert len(power.channels) == 8


def test_a_device_config_too_big_or_too_deep_is_a_boot_error_after_the_relays():
    # json.load ran out of heap (MemoryError) or of recursion (RuntimeError) before the relays
    # were restored, and the boot stopped there.
    for text, says in [
        (json.dumps(dict(BASE, net=STATIC, note="x" * 20000)), "bytes, more than the 16384 the device reads"),
        # CPython's parser gives up (RecursionError), MicroPython's takes it: not an object
        ("[" * 3000 + "]" * 3000, "device.json: "),
    ]:
        _fresh()
        with _flash(W5500, power="10000001\n", extra={"device.json": text}):
            log = Log(32)
            board, power, cfg, error, net, _ = boot.boot({}, log)
        assert board.name == W5500 and cfg is None and net is None
        assert error.startswith("device.json: ") and says in error, error
        assert machine.levels[6] == [1] and machine.levels[13] == [1] and machine.levels[7] == [0]


def test_a_bad_value_anywhere_in_the_config_is_a_boot_error_not_a_stop():
    _fresh()
    device = dict(BASE, net=STATIC, next_server="99999999999999999999.1.1.1")
    with _flash(W5500, device=device):
        _, _, cfg, error, _, _ = boot.boot({}, Log(32))
    assert cfg is None and error.startswith("config: next_server: "), error
    for text in ("null", "[1, 2]", "7"):
        _fresh()
        with _flash(W5500, extra={"device.json": text}):
            _, _, cfg, error, net, _ = boot.boot({}, Log(32))
        assert cfg is None and net is None and error == "device.json: needs an object", (text, error)


def test_a_stagger_that_is_not_a_number_restores_with_the_defaults_and_says_so():
    _fresh()
    device = dict(BASE, power={"stagger_ms": "2000", "channels": [{"name": "a"}]})
    with _flash(W5500, power="10000000\n"):
        log = Log(32)
        power = boot.make_power(board_mod.load("board.json"), boot.power_settings(device), log)
    said = [e for e in _events(log, "power") if "error" in e]
    assert said and "power.stagger_ms: '2000' must be an integer from 0 to 600000" in said[0]["error"]
    assert power.stagger_ms == 2000 and len(power.channels) == 8 and machine.levels[6] == [1]


def test_two_relays_on_one_pin_boot_as_the_unknown_board_naming_both_and_the_pin():
    # Both channels were driven on GPIO 9: switching one switched the other's node too.
    for pins, said in (
        ((9, 9), "board.json: relays.channels[3] and [5] are both on pin 9"),
        ((9, "GP9"), "board.json: relays.channels[3] and [5] are both on pin 9 ('GP9')"),
        (("GPIO9", "gp9"), "board.json: relays.channels[3] and [5] are both on pin 'GPIO9' ('gp9')"),
    ):
        _fresh()
        d = _board_json(W5500)
        d["relays"]["channels"][3]["pin"], d["relays"]["channels"][5]["pin"] = pins
        with _Flash({"board.json": json.dumps(d), "device.json": json.dumps(dict(BASE, server_ip="192.168.1.5"))}):
            log = Log(32)
            board, power, cfg, error, _, _ = boot.boot({}, log)
        assert board.name == "unknown" and power.channels == [] and machine.levels == {}, pins
        assert [e["error"] for e in _boot_events(log)] == ["board: " + said], pins
        assert cfg is not None and error is None  # the services still run
    d = _board_json(W5500)
    d["relays"]["channels"][3]["pin"] = "D9"  # a port's own name: not known to be GPIO 9
    d["relays"]["channels"][5]["pin"] = [9]
    with raises(board_mod.BoardError):
        boot.load_board(d)
    d["relays"]["channels"][5]["pin"] = 15
    assert boot.load_board(d).channels == 8


def test_an_unknown_key_in_the_power_section_restores_with_the_defaults_and_says_where():
    for section, said in (
        ({"stager_ms": 500}, "config: power.stager_ms: unknown key (did you mean stagger_ms?)"),
        ({"channels": [{"name": "a", "min_of_ms": 0}]},
         "config: power.channels[0].min_of_ms: unknown key (did you mean min_off_ms?)"),
    ):
        _fresh()
        with _flash(W5500, power="10000000\n"):
            log = Log(32)
            power = boot.make_power(board_mod.load("board.json"), section, log)
        assert [e["error"] for e in _events(log, "power") if "error" in e] == [said], section
        assert len(power.channels) == 8 and power.channels[0].name == "ch0"
        assert machine.levels[6] == [1] and machine.levels[7] == [0]


def test_an_unknown_key_in_device_json_serves_nothing_and_says_which():
    _fresh()
    device = dict(BASE, net=STATIC, alowed_macs=["52:54:00:aa:bb:01"])
    with _flash(W5500, device=device, power="1\n"):
        log = Log(32)
        board, _, cfg, error, _, _ = boot.boot({}, log)
    assert cfg is None and error == "config: alowed_macs: unknown key (did you mean allowed_macs?)"
    assert board.name == W5500 and machine.levels[6] == [1]  # the relays still restored
