# Steps 1 to 3 of the firmware's boot order (firmware/main.py says why the order matters):
# the board and its relays, restored to their persisted desired state before anything can
# fail, then the maintenance flag, the network and the device config. Boot-only code: main
# unloads this module, and the config checker, once they are done, so their heap goes to the
# services.
import json
import os

from firmware import board as board_mod
from firmware.compat import ticks_ms, unload

CONFIG_FILE = "device.json"
BOARD_FILE = "board.json"
POWER_STATE_FILE = "power.state"  # desired relay states, written only when one changes


def power_settings(d):
    """The `power` section of device.json (channel names and interlocks), or {} if absent or
    unusable: the relays must be restorable even when the rest of the config is broken."""
    p = d.get("power") if isinstance(d, dict) else None
    return p if isinstance(p, dict) else {}


def make_power(board, settings, log):
    """The relay channels, with their outputs already driven to the persisted desired state."""
    from firmware.power import FileStore, Power

    outputs = board.relays()
    store = FileStore(POWER_STATE_FILE)
    channels = settings.get("channels") or board.channels
    stagger = settings.get("stagger_ms", 2000)
    try:
        if isinstance(channels, list) and len(channels) > board.channels:
            raise ValueError(
                "power.channels: %d channels, the board has %d" % (len(channels), board.channels)
            )
        power = Power(outputs, channels, store, log, stagger)
    except ValueError as e:  # restore with every default rather than not at all
        log.count("power.bad_config")
        log.event("power", ("error",), ("config: %s" % e,))
        power = Power(outputs, board.channels, store, log)
    power.restore(ticks_ms())
    return power


def read_config(path):
    """The device config as a dict, or (None, text of the problem)."""
    try:
        with open(path) as f:
            return json.load(f), None
    except OSError:
        return None, "%s: missing (flash the device config)" % path
    except ValueError as e:
        return None, "%s: not valid JSON (%s)" % (path, e)


def boot(opts, log):
    """Steps 1 to 3 of the boot order: (board, power, cfg or None, error text or None,
    net (board_net.Netif) or None, maintenance boot?)."""
    try:
        board = board_mod.load(opts.get("board", BOARD_FILE))
    except board_mod.BoardError as e:
        log.count("boot.no_board")
        log.event("boot", ("error",), ("board: %s" % e,))
        board = board_mod.Board({"name": "unknown", "channels": 0})
    d, error = read_config(opts.get("config", CONFIG_FILE))
    power = make_power(board, power_settings(d), log)  # first: relays as they should be
    try:
        # The console's "maintenance" op leaves this one-shot flag: removed here, so the next
        # restart (the flasher's machine.reset(), a reboot, a power cut) is a normal boot.
        os.remove("maintenance")
    except OSError:
        pass
    else:  # no network, no services, no watchdog: the flasher's turn (docs/device.md)
        unload("firmware.config")  # Power's channel checker
        return board, power, None, None, None, True
    cfg = net = None
    if d is not None:
        from firmware import config

        try:
            net = board.network(d, log)  # None on the sim board: the host's, as it is
            if net is not None and net.error:
                error = net.error  # the board restarts when an address comes (Netif.watch)
            else:
                cfg = config.settings(d, opts.get("listen"), net and net.device_ip)
        except OSError as e:  # the Ethernet chip did not answer
            log.count("net.no_interface")
            error = "net: the Ethernet chip did not come up: %s" % e
        except ValueError as e:
            error = "config: %s" % e
        del config
    unload("firmware.config")  # the config checker, Power's channel checker too
    return board, power, cfg, error, net, False  # the parsed JSON is garbage from here on
