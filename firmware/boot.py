# Steps 1 to 3 of the firmware's boot order (firmware/main.py says why the order matters):
# the board and its relays, restored to their persisted desired state before anything can
# fail, then the maintenance flag, the network and the device config. Boot-only code: main
# unloads this module, and the config checker, once they are done, so their heap goes to the
# services.
import json
import os

from firmware import board as board_mod
from firmware.compat import const, ticks_ms, unload

CONFIG_FILE = "device.json"
BOARD_FILE = "board.json"
POWER_STATE_FILE = "power.state"  # desired relay states, written only when one changes
# device.json and board.json are read whole: a bigger one is refused before it is parsed (the
# parsed file is several times its size on the heap). The sim's is under 1 KB, a site's with
# allowed_macs for 200 machines about 4 KB.
_MAX_JSON = const(16384)
# A boot error is sent in one frame with the boot event (the console's 1536-byte replies): a
# longer text, quoting a long bad value, would be dropped and the error never seen.
_MAX_ERROR = const(300)


def power_settings(d):
    """The `power` section of device.json (channel names and interlocks), or {} if absent or
    unusable: the relays must be restorable even when the rest of the config is broken."""
    p = d.get("power") if isinstance(d, dict) else None
    return p if isinstance(p, dict) else {}


def said(e):
    """A text, or an exception (ValueError: its words; any other: its type too), as the text
    of an error event, bounded (_MAX_ERROR)."""
    if isinstance(e, str):
        text = e
    else:
        text = str(e) if isinstance(e, ValueError) else "%s %s" % (type(e).__name__, e)
    return text if len(text) <= _MAX_ERROR else text[: _MAX_ERROR - 3] + "..."


def power(outputs, settings, n, store=None, log=None):
    """firmware.power.Power for device.json's power section (settings, from power_settings) on
    a board of n relay channels; ValueError naming the field when the section is bad. One
    checker for the boot (make_power) and for `bastion flash` (bastion/flash/image.py)."""
    from firmware.config import unknown
    from firmware.power import Power

    unknown(settings, ("stagger_ms", "channels"), "power")
    stagger = settings.get("stagger_ms", 2000)
    if not isinstance(stagger, int) or isinstance(stagger, bool) or not 0 <= stagger <= 600000:
        raise ValueError("power.stagger_ms: %s must be an integer from 0 to 600000" % repr(stagger)[:40])
    channels = settings.get("channels") or n
    if isinstance(channels, list) and len(channels) > n:
        raise ValueError("power.channels: %d channels, the board has %d" % (len(channels), n))
    return Power(outputs, channels, store, log, stagger)


def make_power(board, settings, log):
    """The relay channels, with their outputs already driven to the persisted desired state.
    Nothing here may stop the boot: a bad power section restores with every default, and
    relays that cannot be made leave a device with none (and the console, to fix it)."""
    from firmware.power import FileStore, Power

    store = FileStore(POWER_STATE_FILE)
    try:
        outputs = board.relays()
    except Exception as e:  # a pin the port refuses, a relay count no heap holds
        log.count("power.bad_board")
        log.event("power", ("error",), (said("relays: board.json: %s" % said(e)),))
        return Power(None, 0, store, log)
    try:
        p = power(outputs, settings, board.channels, store, log)
    except Exception as e:  # restore with every default rather than not at all
        log.count("power.bad_config")
        log.event("power", ("error",), (said("config: %s" % said(e)),))
        p = Power(outputs, board.channels, store, log)
    p.restore(ticks_ms())
    return p


def read_json(path, what):
    """A flash file's JSON, or (None, text of the problem). Never raises: a file too big or too
    deep for the heap is a problem like any other."""
    try:
        st = os.stat(path)
        if st[0] & 0x4000:  # S_IFDIR
            return None, "%s: a directory, not a file (flash %s)" % (path, what)
        if st[6] > _MAX_JSON:
            return None, "%s: %d bytes, more than the %d the device reads" % (path, st[6], _MAX_JSON)
        with open(path) as f:
            return json.load(f), None
    except OSError:
        return None, "%s: missing (flash %s)" % (path, what)
    except ValueError as e:
        return None, "%s: not valid JSON (%s)" % (path, said(e) or "cut short?")
    except Exception as e:  # MemoryError, RuntimeError (nested too deep for the parser)
        return None, "%s: cannot be read here: %s" % (path, said(e))


def read_config(path):
    """The device config as a dict, or (None, text of the problem)."""
    return read_json(path, "the device config")


def load_board(path):
    """board.json (its path on the flash, or its parsed JSON: what `bastion flash` checks the
    board file it flashes with) as a board_mod.Board, checked as far as boot-only code can:
    BoardError when it is missing or not a board, or for a field of the wrong type its
    AttributeError or TypeError."""
    if not isinstance(path, str):
        d = path
    else:
        d, error = read_json(path, "the board definition")
        if error is not None:
            raise board_mod.BoardError(error)
    board = board_mod.Board(d)
    n = board.channels
    if not 0 < len(board.name) <= 64 or not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= 32:
        raise board_mod.BoardError("board.json: a name of 1..64 characters, 0..32 channels")
    if board.relay_kind == "gpio":
        # Two channels on one GPIO: each switch would drive the other's node too. A pin is a
        # number or a name; "GP6" and "GPIO6" are pin 6 (rp2; esp32 takes numbers). Other names
        # ("D5", "LED") are the port's own, mapped in its firmware: only the same name, spelt
        # the same, is seen as the same pin.
        pins = [c["pin"] for c in d["relays"]["channels"]]
        seen = {}
        for i, pin in enumerate(pins):
            if isinstance(pin, str):
                key = pin
                for prefix in ("GPIO", "GP"):
                    if pin.upper().startswith(prefix) and pin[len(prefix):].isdigit():
                        key = int(pin[len(prefix):])
                        break
            elif isinstance(pin, int) and not isinstance(pin, bool):
                key = pin
            else:
                raise board_mod.BoardError("board.json: relays.channels[%d].pin: %s is not a pin "
                                           "number or name" % (i, repr(pin)[:40]))  # fmt: skip
            if key in seen:
                j = seen[key]
                if pins[j] == pin:
                    raise board_mod.BoardError("board.json: relays.channels[%d] and [%d] are "
                                               "both on pin %r" % (j, i, pin))  # fmt: skip
                raise board_mod.BoardError("board.json: relays.channels[%d] and [%d] are both on "
                                           "pin %r (%r)" % (j, i, pins[j], pin))  # fmt: skip
            seen[key] = i
    return board


def boot(opts, log):
    """Steps 1 to 3 of the boot order: (board, power, cfg or None, error text or None,
    net (board_net.Netif) or None, maintenance boot?)."""
    try:
        board = load_board(opts.get("board", BOARD_FILE))
    except Exception as e:  # BoardError, or a definition of the wrong shape
        log.count("boot.no_board")
        log.event("boot", ("error",), ("board: %s" % said(e),))
        board = board_mod.Board({"name": "unknown", "channels": 0})
    d, error = read_config(opts.get("config", CONFIG_FILE))
    if error is None and not isinstance(d, dict):  # null, a list, a number
        error = "%s: needs an object" % opts.get("config", CONFIG_FILE)
        d = None
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
        except Exception as e:  # ConfigError; any other is a config this code did not foresee
            error = "config: %s" % said(e)
        del config
    unload("firmware.config")  # the config checker, Power's channel checker too
    if error is not None:
        error = said(error)
    return board, power, cfg, error, net, False  # the parsed JSON is garbage from here on
