# The device configuration: `device.json` on the board's flash (docs/device.md has the layout).
#
# Loaded once at boot and checked field by field; a bad file is refused with a message that
# names the field, and the firmware keeps running with nothing served rather than guessing.
# Everything the packet paths need per request is computed here, once. Also the relay channels'
# checker (channels(), for firmware.power.Power), so that it too is boot-only code.
import json

from firmware.compat import const

_MAC_LEN = const(17)


class ConfigError(ValueError):
    pass


def _r(v):
    # A value quoted in an error, cut short: the error goes out in one frame with the boot event
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _mac_bytes(s, where):
    if not isinstance(s, str) or len(s) != _MAC_LEN:
        raise ConfigError("%s: %s is not a MAC address (aa:bb:cc:dd:ee:ff)" % (where, _r(s)))
    out = bytearray(6)
    for i in range(6):
        part = s[i * 3 : i * 3 + 2]
        if i < 5 and s[i * 3 + 2] not in ":-":
            raise ConfigError("%s: %s is not a MAC address (aa:bb:cc:dd:ee:ff)" % (where, _r(s)))
        try:
            out[i] = int(part, 16)
        except ValueError:
            raise ConfigError("%s: %s is not a MAC address (aa:bb:cc:dd:ee:ff)" % (where, _r(s)))
    return bytes(out)


def _ip_bytes(s, where):
    parts = s.split(".") if isinstance(s, str) else ()
    if len(parts) != 4:
        raise ConfigError("%s: %s is not an IPv4 address" % (where, _r(s)))
    for p in parts:
        if not 0 < len(p) <= 3 or not p.isdigit() or int(p) > 255:
            raise ConfigError("%s: %s is not an IPv4 address" % (where, _r(s)))
    return bytes(int(p) for p in parts)


def _int(d, key, lo, hi, default, where):
    v = d.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ConfigError("%s.%s: %s must be an integer from %d to %d" % (where, key, _r(v), lo, hi))
    return v


def unknown(d, keys, where):
    """ConfigError for a key of d that is not one of keys: a typo ("alowed_macs", "max_windw")
    must not pass for the default it leaves in place. (Named after a word the boot interns
    anyway: a new name would cost the table of interned names, docs/device.md "Heap".) The error names the key in its section (where: "" for the top
    level), and the known key it is a letter or two from (else every known key)."""
    for k in d:
        if k not in keys:
            k = str(k)[:40]
            best = 3
            for n in keys:
                if abs(len(n) - len(k)) < best:  # only then can n be nearer than best
                    # Levenshtein, one row at a time: keys are short, and this runs only for
                    # a key already refused
                    row = list(range(len(n) + 1))
                    for i in range(len(k)):
                        prev = row[:]
                        row[0] = i + 1
                        for j in range(len(n)):
                            row[j + 1] = min(prev[j + 1] + 1, row[j] + 1,
                                             prev[j] + (k[i].lower() != n[j]))  # fmt: skip
                    if row[-1] < best:
                        best, near = row[-1], n
            if best < 3 and 2 * best < len(k):
                raise ConfigError(("%s.%s: unknown key (did you mean %s?)" if where else
                                   "%s%s: unknown key (did you mean %s?)") % (where, k, near))  # fmt: skip
            raise ConfigError(("%s.%s: unknown key (known: %s)" if where else
                               "%s%s: unknown key (known: %s)") % (where, k, ", ".join(keys)))  # fmt: skip


def _str(d, key, default, where, required=False, max_len=255):
    # Bytes, not characters: the texts go into DHCP options and fields as UTF-8, whose limits
    # are bytes (200 characters of "é" passed here, and building the options at the services'
    # start failed: nothing served, and no config error said which field).
    v = d.get(key, default)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v or len(v.encode()) > max_len:
        raise ConfigError("%s: must be a string of 1..%d bytes (UTF-8)" % (where + key, max_len))
    return v


def channels(defs):
    """The relay channels (firmware.power.Power's), checked: a number of channels with every
    default, or a list of channel objects. One tuple (name, min_off_ms, max_cycles, window_ms,
    default_on) per channel; ConfigError naming the channel and field. A relay's pin and its
    polarity are the board definition's (board.json `relays`): given here they are refused, not
    left to do nothing (a relay wired active low, said so here, would have switched a node on
    for off)."""
    if isinstance(defs, int) and not isinstance(defs, bool):
        defs = [{} for _ in range(defs)]
    if not isinstance(defs, list):
        raise ConfigError("power.channels: must be a number or a list of relay channels")
    out = []
    for index, d in enumerate(defs):
        where = "power.channels[%d]" % index
        if not isinstance(d, dict):
            raise ConfigError("%s: must be an object" % where)
        for k in ("pin", "active"):
            if k in d:
                raise ConfigError("%s.%s: a relay's pin and polarity are set in the board "
                                  "definition (board.json relays), not here" % (where, k))  # fmt: skip
        unknown(d, ("name", "default", "min_off_ms", "max_cycles", "window_ms"), where)
        name = d.get("name", "ch%d" % index)
        if not isinstance(name, str) or not 0 < len(name) <= 63:
            # a DNS label's length: eight of them and the rest of a status reply fit its frame
            raise ConfigError("%s.name: must be a string of 1..63 characters" % where)
        default = d.get("default", "off")
        if default not in ("on", "off"):
            raise ConfigError("%s.default: %r must be 'on' or 'off'" % (where, default))
        out.append((
            name,
            _int(d, "min_off_ms", 0, 3600000, 5000, where),
            _int(d, "max_cycles", 1, 1000, 4, where),
            _int(d, "window_ms", 1000, 86400000, 600000, where),
            default == "on",
        ))  # fmt: skip
    seen = set()
    for index, c in enumerate(out):
        if c[0] in seen:
            raise ConfigError("power.channels[%d].name: %r is used twice" % (index, c[0]))
        seen.add(c[0])
    return out


def restore(text, n, store, log):
    """power.state's text (stripped), when it is not one '0'/'1' for each of the n channels:
    the states still worth restoring (a short file's, for its first channels; a damaged one's,
    none), and a power error event naming the file and what was lost. The channels left out
    take their `default`, as without a file; the operator must hear that the saved relay
    states are gone. For firmware.power.Power.restore, at boot: the checking half of restore
    (named so, rather than anew, to cost the table of interned names nothing)."""
    path = getattr(store, "path", "power.state")
    if not text:
        what = "%s: empty: every channel takes its default" % path
    elif not text.strip("01"):
        what = "%s: %d states for %d channels: channels %d..%d take their default" % (
            path, len(text), n, len(text), n - 1)  # fmt: skip
    else:
        what = "%s: %s is not one 0 or 1 per channel: every channel takes its default" % (
            path, _r(text))  # fmt: skip
        text = ""
    if log is not None:
        log.count("power.bad_state_file")
        log.event("power", ("error",), (what,))
    return text


class Config:
    """The checked device configuration.

    server_ip      bytes(4): the device's LAN address (DHCP server id, default next-server):
                   the caller's override (the sim board's --listen), else device.json's
                   server_ip, else the address the board has (device_ip), which a real board
                   passes and device.json's server_ip must then match
    next_server    bytes(4): where clients fetch boot files by TFTP (the device unless set)
    script_url     str: the controller's iPXE script URL handed to iPXE clients
    boot_files     {arch: file name} by DHCP option 93 client architecture
    allowed_macs   set of 6-byte MACs, or None to answer every PXE client
    rpi_boot       answer Raspberry Pi bootloaders (arch 0 + "RPi4" GUID or Pi MAC prefix)
    rpi_menu       the PXE menu text a Pi bootloader looks for
    rpi_next_server bytes(4) or None: TFTP server for Pi boot files, when not next_server
    tftp_root, tftp_max_transfers, tftp_max_blksize, tftp_timeout_ms, tftp_retries,
    tftp_max_window: the TFTP server's bounds
    """

    def __init__(self, d, server_ip=None, device_ip=None):
        if not isinstance(d, dict):
            raise ConfigError("device config must be a JSON object")
        # net is firmware.netconfig's, power firmware.boot's and Power's: each checks its own keys
        unknown(d, ("server_ip", "net", "script_url", "boot_files", "allowed_macs", "next_server",
                   "rpi", "tftp", "power"), "")  # fmt: skip
        ip = server_ip or d.get("server_ip") or device_ip
        if ip is None:
            raise ConfigError("server_ip: missing (the device's LAN address)")
        self.server_ip = _ip_bytes(ip, "server_ip")
        if server_ip is None and device_ip and self.server_ip != _ip_bytes(device_ip, "net"):
            raise ConfigError(
                "server_ip: %s is not this device's address %s (device.json's net, or the "
                "router's DHCP reservation for it): make them the same" % (ip, device_ip)
            )
        ns = d.get("next_server")
        self.next_server = _ip_bytes(ns, "next_server") if ns is not None else self.server_ip
        # A DHCP option holds at most 255 bytes: the URL goes into option 67 / the file field.
        self.script_url = _str(d, "script_url", None, "", required=True)

        files = d.get("boot_files", {})
        if not isinstance(files, dict):
            raise ConfigError("boot_files: must be an object of arch -> file name")
        self.boot_files = {}
        for k, v in files.items():
            if not k.isdigit() or len(k) > 5:  # JSON keys are strings: "7", not " 7 " or "+7"
                raise ConfigError("boot_files: key %s is not a client architecture number" % _r(k))
            arch = int(k)
            if not 0 <= arch <= 0xFFFF:
                raise ConfigError("boot_files: architecture %d is out of range" % arch)
            if not isinstance(v, str) or not v or len(v.encode()) > 127:
                raise ConfigError("boot_files.%s: must be a file name of 1..127 bytes (UTF-8)" % k)
            self.boot_files[arch] = v

        macs = d.get("allowed_macs")  # absent or []: every client; {} or false is a mistake
        if macs is not None and not isinstance(macs, list):
            raise ConfigError("allowed_macs: must be a list of MAC addresses")
        if macs:
            self.allowed_macs = set(
                _mac_bytes(m, "allowed_macs[%d]" % i) for i, m in enumerate(macs)
            )
        else:
            self.allowed_macs = None

        rpi = d.get("rpi", {})
        if not isinstance(rpi, dict):
            raise ConfigError("rpi: must be an object")
        unknown(rpi, ("boot", "menu", "next_server"), "rpi")
        self.rpi_boot = rpi.get("boot", True)
        if not isinstance(self.rpi_boot, bool):
            raise ConfigError("rpi.boot: %s must be true or false" % _r(self.rpi_boot))
        # The menu text shares option 43 with the other PXE sub-options.
        self.rpi_menu = _str(rpi, "menu", "Raspberry Pi Boot", "rpi.", max_len=200)
        rns = rpi.get("next_server")
        self.rpi_next_server = _ip_bytes(rns, "rpi.next_server") if rns is not None else None

        t = d.get("tftp", {})
        if not isinstance(t, dict):
            raise ConfigError("tftp: must be an object")
        unknown(t, ("root", "max_transfers", "max_blksize", "timeout_ms", "retries", "max_window"),
               "tftp")  # fmt: skip
        self.tftp_root = _str(t, "root", "tftp", "tftp.")
        if self.tftp_root.strip("/") in ("", ".") or ".." in self.tftp_root.split("/"):
            # "/" served the whole flash (device.json, the state files), on the sim the host's
            raise ConfigError("tftp.root: %s must be a directory of its own" % _r(self.tftp_root))
        self.tftp_max_transfers = _int(t, "max_transfers", 1, 16, 4, "tftp")
        # RFC 2348 allows 8..65464; our buffers and one Ethernet frame without IP
        # fragmentation bound it to 1468 (1500 - 20 IP - 8 UDP - 4 TFTP).
        self.tftp_max_blksize = _int(t, "max_blksize", 512, 1468, 1468, "tftp")
        self.tftp_timeout_ms = _int(t, "timeout_ms", 50, 255000, 1000, "tftp")
        self.tftp_retries = _int(t, "retries", 1, 20, 5, "tftp")
        self.tftp_max_window = _int(t, "max_window", 1, 16, 4, "tftp")


def load(path, server_ip=None):
    """Read and check the device config at path; raises ConfigError or OSError."""
    with open(path) as f:
        try:
            d = json.load(f)
        except ValueError as e:
            raise ConfigError("%s: not valid JSON (%s)" % (path, e))
    return Config(d, server_ip)


def settings(d, server_ip=None, device_ip=None):
    """The checked config (raises ConfigError) as a compat.Settings: the same attributes as a
    Config, on a class that does not keep this module alive."""
    from firmware.compat import Settings

    c = Config(d, server_ip, device_ip)
    s = Settings()
    for k, v in c.__dict__.items():
        setattr(s, k, v)
    return s
