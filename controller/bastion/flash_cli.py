"""`bastion flash`: put the firmware, the board definition, the site's device config and the TFTP
files onto the device, with the real mpremote, without ever switching a relay.

On a board (`--port`) it goes like this; each step says what it does as it runs:

1. render device.json from the site and check it with the firmware's own checkers; add the arm64
   chainloader for a site with arm64 machines and check every boot file against its client
   architecture (bastion.flashing, bastion.chainload); compile the firmware to .mpy. Nothing has touched the device yet (`--dry-run` stops here).
2. ask the running firmware, over the serial protocol, for its relay channels: a channel that
   is mid-cycle or waiting its staggered power-on would switch when the firmware restarts, so
   flashing waits for a quiet device. Closing that link releases the line, so mpremote's
   Ctrl-C stops the firmware again.
3. `mpremote exec`: read the flash (hashes of the files to write, power.state, device.json,
   board.json, relays.state on the sim board, free space). This stops the firmware: from here
   on every exit restarts it.
4. refuse if the new configuration would restore any relay differently (bastion.flashing).
5. `mpremote fs cp`: copy what differs into .bastion-new/; `mpremote exec`: rename each file
   into place (firmware/ swapped as a directory). A failed copy leaves the old files as they
   were. power.state and relays.state are never written.
6. soft reset at the friendly REPL, so the board runs main.py; wait for the firmware's `boot`
   event and show it.

`--sim DIR` lays the same files into a sim board's flash directory instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from bastion import flashing
from bastion.flashing import BoardDef, DeviceConfig, FlashError, Image

STAGE = ".bastion-new"  # on the device: new files land here first
OLD = ".bastion-old"  # ... and the replaced firmware/ waits here until the swap is done
PROBE_TAG = "BASTION-PROBE "
INSTALLED_TAG = "BASTION-INSTALLED"

# MicroPython code run on the device by `mpremote exec`. Small and allocation-light: it runs on
# the board's heap with the firmware stopped.
_DEVICE_HELPERS = """
import os
def _isdir(p):
    try:
        return os.stat(p)[0] & 0x4000 != 0
    except OSError:
        return False
def _rm(p):
    if _isdir(p):
        for n in os.listdir(p):
            _rm(p + '/' + n)
        os.rmdir(p)
    else:
        try:
            os.remove(p)
        except OSError:
            pass
"""

_PROBE = """
import json
def _hash(p):
    try:
        import hashlib, binascii
        d = hashlib.sha256()
        b = bytearray(512)
        m = memoryview(b)
        with open(p, 'rb') as f:
            while True:
                n = f.readinto(b)
                if not n:
                    break
                d.update(m[:n])
        return binascii.hexlify(d.digest()).decode()
    except Exception:
        return None
def _text(p):
    try:
        with open(p) as f:
            return f.read()
    except Exception:
        return None
def _free():
    for p in ('.', '/'):
        try:
            s = os.statvfs(p)
            return s[0] * s[4]
        except Exception:
            pass
try:
    _fw = os.listdir('firmware')
except OSError:
    _fw = None
print(TAG + json.dumps({
    'hashes': dict((p, _hash(p)) for p in PATHS),
    'firmware': _fw,
    'power_state': _text('power.state'),
    'relays_state': _text('relays.state'),
    'device': _text('device.json'),
    'board': _text('board.json'),
    'free': _free(),
}))
"""

_CLEAN = "_rm(STAGE)\n_rm(OLD)\n"

_INSTALL = """
def _parents(p):
    parts = p.split('/')[:-1]
    for i in range(1, len(parts) + 1):
        d = '/'.join(parts[:i])
        if not _isdir(d):
            os.mkdir(d)
_rm(OLD)
if SWAP:
    os.mkdir(OLD)
    if _isdir('firmware'):
        os.rename('firmware', OLD + '/firmware')
    os.rename(STAGE + '/firmware', 'firmware')
for _p in FILES:
    _parents(_p)
    os.rename(STAGE + '/' + _p, _p)
_rm(STAGE)
_rm(OLD)
print(TAG)
"""


def device_code(code: str, **values) -> str:
    """`code` for `mpremote exec`, after the helpers and its inputs as Python literals."""
    values = {"STAGE": STAGE, "OLD": OLD, **values}
    return "".join(f"{k} = {v!r}\n" for k, v in values.items()) + _DEVICE_HELPERS + code


def mpremote_bin() -> str:
    here = Path(sys.executable).parent / "mpremote"
    if here.exists():
        return str(here)
    found = shutil.which("mpremote")
    if not found:
        raise FlashError("mpremote not found: run tools/setup (it installs it into .venv)")
    return found


def _kb(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n / 1024**2:.2f} MB" if n < 1024**3 else f"{n / 1024**3:.1f} GB"


class PortUnavailable(FlashError):
    """mpremote could not open the port: nothing reached the device."""


class Mpremote:
    """The real mpremote on one port: `run(what, *args)` or FlashError showing its output."""

    def __init__(self, port: str):
        self.port = port
        self.bin = mpremote_bin()

    def run(self, what: str, *args: str, timeout: float = 120, show: bool = False) -> str:
        cmd = [self.bin, "connect", self.port, *args]
        try:
            r = subprocess.run(
                cmd,
                check=False,
                stdout=None if show else subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise FlashError(f"mpremote timed out after {timeout:g} s while {what}") from None
        if r.returncode != 0:
            out = "\n".join(x.strip() for x in (r.stdout or "", r.stderr or "") if x.strip())
            error = PortUnavailable if "failed to access" in out else FlashError
            raise error(f"mpremote failed while {what} (exit {r.returncode}):\n{out}")
        return r.stdout or ""

    def exec(self, what: str, code: str, **kw) -> str:
        return self.run(what, "exec", code, **kw)


# --- talking to the running firmware ---------------------------------------------------------


def live_power(port: str, wait_s: float = 4.0) -> list[dict] | None:
    """The running firmware's relay channels (its `status`), or None when it does not answer."""
    from bastion.device import DeviceError, DeviceLink

    try:
        link = DeviceLink.connect(port, wait_s=wait_s, timeout_s=wait_s)
    except DeviceError:
        return None
    try:
        status = link.status or link.request("status")
        power = status.get("power")
        return power if isinstance(power, list) else None
    except DeviceError:
        return None
    finally:
        link.close()


def restart_firmware(port: str, timeout: float = 30.0) -> dict:
    """Soft-reset the board at its friendly REPL (so it runs main.py, as at power-on) and
    return the firmware's `boot` event. On a board, and on the sim board whose supervisor
    restarts the unix port the same way; the relay outputs are left to the firmware."""
    import serial

    from bastion.sim import decode_event_line

    try:
        ser = serial.serial_for_url(port, baudrate=115200, timeout=0.1)
    except (serial.SerialException, OSError, ValueError) as e:
        raise FlashError(f"cannot open {port} to restart the firmware: {e}") from None
    try:
        ser.reset_input_buffer()
        ser.write(b"\r\x03\x02")  # stop whatever runs, leave the raw REPL
        buf = b""
        deadline = time.monotonic() + 10
        while b">>> " not in buf:
            if time.monotonic() > deadline:
                raise FlashError(
                    f"{port}: no REPL prompt after Ctrl-C, Ctrl-B; reset the board by hand "
                    f"(last output: {buf[-200:]!r})"
                )
            buf += ser.read(256)
        ser.write(b"\x04")  # Ctrl-D at the friendly REPL: soft reset, then main.py runs
        buf = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            buf += ser.read(4096)
            *lines, buf = buf.split(b"\n")
            for line in lines:
                ev = decode_event_line(line)
                if ev is not None and ev.get("ev") == "boot":
                    return ev
            buf = buf[-65536:]
        raise FlashError(f"{port}: the firmware sent no boot event within {timeout:g} s")
    finally:
        ser.close()


# --- the steps ---------------------------------------------------------------------------------


def _say(msg: str) -> None:
    click.echo(msg)


def _warn(msg: str) -> None:
    click.echo(f"warning: {msg}", err=True)


def _plan(site, board: BoardDef, device: DeviceConfig, image: Image) -> None:
    cfg = device.config
    on_relays = sum(1 for m in site.machines if m.relay is not None)
    _say(f"site {site.root}: {len(site.machines)} machines, {on_relays} on relays")
    _say(f"board {board.name}: {board.channels} relay channels")
    macs = cfg.get("allowed_macs")
    _say(
        f"device.json: server_ip {cfg['server_ip']}, script_url {cfg['script_url']}, answers "
        + (f"{len(macs)} MACs from machines.yaml" if macs else "every PXE client")
    )
    _say("  relay channels: " + ", ".join(f"{i} {n}" for i, n in enumerate(device.channel_names)))
    fw = image.under("firmware/")
    parts = [f"firmware/ ({len(fw)} modules, {_kb(sum(map(len, fw.values())))})"]
    parts += [
        f"{p} ({_kb(len(b))})" for p, b in image.files.items() if not p.startswith("firmware/")
    ]
    _say(f"files ({_kb(image.size)}): " + ", ".join(parts))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_relays(now: list[bool], device: DeviceConfig, image: Image, power_state) -> None:
    after = flashing.restored_outputs(
        power_state, image.files["device.json"], image.files["board.json"]
    )
    changes = flashing.relay_changes(now, after, device.channel_names)
    if changes:
        raise flashing.relay_refusal(changes)
    on = [device.channel_names[i] for i, v in enumerate(after) if v]
    _say("relays: unchanged by the restart (on: " + (", ".join(on) or "none") + ")")


def _check_port(port: str) -> None:
    if "://" not in port and os.sep in port and not os.path.exists(port):
        raise FlashError(
            f"no such port {port} (is the board plugged in? `mpremote connect list` lists "
            "serial ports)"
        )


def flash_port(port: str, board: BoardDef, device: DeviceConfig, image: Image) -> dict:
    """Steps 2-6 of the module docstring; returns the new firmware's boot event."""
    mp = Mpremote(port)

    _say(f"asking the running firmware on {port} for its relays (serial protocol) ...")
    live = live_power(port) if "://" in port or os.sep in port else None
    if live is None:
        _say("  no answer (firmware not running?): judging the relays from the flash files")
    else:
        busy = [c for c in live if c.get("queued") or c.get("cycling")]
        if busy:
            raise FlashError(
                [
                    f"relay channel {c.get('ch')} ({c.get('name')}) is "
                    + ("cycling" if c.get("cycling") else "waiting for its staggered power-on")
                    for c in busy
                ]
                + ["refusing to flash: the restart would switch it; try again once it has settled"]
            )
        _say("  " + ", ".join(f"{c.get('ch')} {c.get('name')} {c.get('output')}" for c in live))

    _say("reading the device's flash (mpremote exec; this stops the firmware) ...")
    stopped = True  # from the first byte mpremote sends (Ctrl-C), the firmware is not running
    try:
        try:
            out = mp.exec("reading the device's flash",
                          device_code(_PROBE, TAG=PROBE_TAG, PATHS=sorted(image.files)))  # fmt: skip
        except PortUnavailable:
            stopped = False
            raise
        probe = None
        for line in out.splitlines():
            if line.startswith(PROBE_TAG):
                probe = json.loads(line[len(PROBE_TAG) :])
        if probe is None:
            raise FlashError(f"the device's answer to the probe makes no sense:\n{out[-500:]}")

        now = None
        if board.defn.get("relays", {}).get("kind", "file") == "file":
            now = flashing.outputs_from_relay_file(probe["relays_state"], board.channels)
        if now is None and live is not None:
            now = [c.get("output") == "on" for c in live]
        if now is None:
            now = flashing.restored_outputs(probe["power_state"], probe["device"], probe["board"])
        _check_relays(now, device, image, probe["power_state"])

        hashes = probe["hashes"]
        changed = {p: b for p, b in image.files.items() if hashes.get(p) != _sha(b)}
        fw_new = image.under("firmware/")
        stale = sorted(set(probe["firmware"] or ()) - {p.split("/", 1)[1] for p in fw_new})
        swap = bool(stale) or any(p in changed for p in fw_new) or probe["firmware"] is None
        files = [p for p in changed if not p.startswith("firmware/")]
        # device.json last: a board that loses power mid-way has the old config with it
        files.sort(key=lambda p: (p == "device.json", p))
        todo = {**(fw_new if swap else {}), **{p: image.files[p] for p in files}}
        _say(
            f"  {len(todo)} of {len(image.files)} files differ ({_kb(sum(map(len, todo.values())))})"
            + (f"; firmware/ is replaced whole (stale: {', '.join(stale)})" if stale else "")
            + (f"; {_kb(probe['free'])} free" if probe.get("free") is not None else "")
        )
        need = sum(map(len, todo.values()))
        if probe.get("free") is not None and need > probe["free"]:
            raise FlashError(
                f"the device has {_kb(probe['free'])} free and the new files need {_kb(need)}: "
                "flash fewer TFTP files (--tftp-dir)"
            )

        if todo:
            with tempfile.TemporaryDirectory(prefix="bastion-flash-") as tmp:
                stage = Path(tmp) / STAGE
                for p, data in todo.items():
                    (stage / p).parent.mkdir(parents=True, exist_ok=True)
                    (stage / p).write_bytes(data)
                _say(f"copying {len(todo)} files to :{STAGE}/ (mpremote fs cp) ...")
                mp.run("copying files", "exec", device_code(_CLEAN), "+",
                       "fs", "cp", "-r", "-f", str(stage), ":" + STAGE,
                       timeout=300 + need / 1000, show=True)  # fmt: skip
            _say("installing: renaming each file into place (mpremote exec) ...")
            out = mp.exec("installing the files", device_code(
                _INSTALL, SWAP=swap, FILES=files, TAG=INSTALLED_TAG))  # fmt: skip
            if INSTALLED_TAG not in out:
                raise FlashError(f"the device did not confirm the install:\n{out[-500:]}")
            for p in (["firmware/"] if swap else []) + files:
                _say(f"  :{p}")
        else:
            _say("  the device has every file already")

        _say("restarting the firmware (soft reset) ...")
        stopped = False
        return restart_firmware(port)
    finally:
        if stopped:
            _say("restarting the firmware after the failure ...")
            try:
                restart_firmware(port)
            except FlashError as e:
                _warn(str(e))


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _write_atomic(path: Path, data: bytes) -> bool:
    """Replace path with data (temp file, fsync, rename); False if it held data already."""
    if _read(path) == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return True


def check_sim_dir(flash: Path, board: BoardDef, device: DeviceConfig, image: Image) -> None:
    """The relay check for a sim board's flash directory (read-only)."""
    power_state = _read(flash / "power.state")
    power_text = power_state.decode(errors="replace") if power_state is not None else None
    relays = _read(flash / "relays.state")
    now = flashing.outputs_from_relay_file(
        relays.decode(errors="replace") if relays is not None else None, board.channels
    )
    if now is None:
        now = flashing.restored_outputs(
            power_text, _read(flash / "device.json"), _read(flash / "board.json")
        )
    _check_relays(now, device, image, power_text)


def flash_sim_dir(flash: Path, board: BoardDef, device: DeviceConfig, image: Image) -> None:
    """The same files into a sim board's flash directory (firmware, board.json and main.py by
    bastion.sim.install_firmware), after the same relay check."""
    from bastion.sim import SimError, install_firmware

    check_sim_dir(flash, board, device, image)
    try:
        install_firmware(flash, board.name)
    except SimError as e:
        raise FlashError(str(e)) from None
    _say(f"  {flash}/firmware/, board.json, main.py")
    for p, data in image.files.items():
        if (p.startswith("tftp/") or p == "device.json") and _write_atomic(flash / p, data):
            _say(f"  {flash}/{p}")


# --- the command -------------------------------------------------------------------------------


@click.command("flash")
@click.option("--port", metavar="PORT",
              help="The board's serial line (/dev/ttyACM0, or the sim board's PTY).")  # fmt: skip
@click.option("--sim", "sim_dir", metavar="DIR", type=click.Path(file_okay=False, path_type=Path),
              help="Lay the files into a sim board's flash directory instead (for "
                   "`bastion sim --flash DIR --no-install`).")  # fmt: skip
@click.option("--site", "site_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The site directory; device.json is rendered from its site.yaml `device:` "
                   "section and machines.yaml.")  # fmt: skip
@click.option("--board", metavar="NAME",
              help="Board definition boards/NAME.json (needed with --port; default with --sim: "
                   "sim).")  # fmt: skip
@click.option("--tftp-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Files for the device's tftp/, subdirectories included [default: ipxe.efi, "
                   "snponly.efi and undionly.kpxe from /usr/lib/ipxe].")  # fmt: skip
@click.option("--controller-url", metavar="URL",
              help="The controller's URL for the iPXE script (URL/boot.ipxe) [default: "
                   "site.yaml controller_url].")  # fmt: skip
@click.option("--grub-modules", metavar="DIR",
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="GRUB arm64-efi modules for the arm64 chainloader [default: "
                   "var/cache/arm64-root/usr/lib/grub/arm64-efi, from tools/build-grub-arm64]."
              )  # fmt: skip
@click.option("--dry-run", is_flag=True,
              help="Render, check and list what would be written; touch nothing (with --port "
                   "the device is not contacted).")  # fmt: skip
def flash(port, sim_dir, site_dir, board, tftp_dir, controller_url, grub_modules, dry_run) -> None:
    """Flash the device: the firmware (compiled to .mpy), the board definition, device.json
    rendered from the site, the boot stub main.py and the TFTP files, then restart the
    firmware so it runs with them.

    With --port this uses mpremote on the serial line; stop anything else that uses the line
    first (a `bastion serve --device` on it). Each file is copied under a temporary name and
    renamed into place. Flashing never switches a relay: it never writes power.state or
    relays.state, and refuses when the restart would bring a relay up differently (a changed
    `default` for a channel with no persisted state, or a channel mid-cycle).

    A site with arm64 machines (or boot_files 11) gets an arm64 chainloader for arch 11: the
    site's arm64 iPXE snp.efi, else a GRUB arm64 image built for the controller. Every boot
    file that is an EFI binary must suit its client architecture (from its PE header).
    """
    from bastion.site.load import SiteError, load_site

    if bool(port) == bool(sim_dir):
        raise click.UsageError("give --port (a board's serial line) or --sim DIR (a sim flash)")
    if port and not board:
        raise click.UsageError(
            f"--port needs --board NAME (boards: {', '.join(flashing.known_boards())})"
        )
    try:
        if port:
            _check_port(port)
        bdef = flashing.board_definition(board or "sim")
        try:
            site = load_site(site_dir)
        except SiteError as e:
            raise FlashError([f"the site in {site_dir} does not load:"]
                             + [f"  {p}" for p in e.problems]) from None  # fmt: skip

        device = flashing.render_device_config(site, bdef, controller_url)
        tftp = flashing.tftp_files(tftp_dir)
        with tempfile.TemporaryDirectory(prefix="bastion-chainload-") as work:
            chosen = flashing.add_arm64_chainloader(
                site, device, tftp, Path(work), controller_url, grub_modules
            )
            if chosen:
                flashing.check_device_config(device.config, bdef)
            for line in chosen:
                _say(line)
            wrong, arch_warnings = flashing.boot_file_checks(device.config, tftp)
            if wrong:
                raise FlashError(
                    [*wrong, "refusing to flash: a client would be offered a binary it cannot run"]
                )
            for w in (device.warnings + arch_warnings
                      + flashing.missing_boot_files(device.config, set(tftp))):  # fmt: skip
                _warn(w)
            image = flashing.build_image(bdef, device, tftp)
        _plan(site, bdef, device, image)
        if dry_run:
            if sim_dir:
                check_sim_dir(sim_dir, bdef, device, image)
            _say("device.json:\n" + image.files["device.json"].decode().rstrip())
            _say("dry run: nothing written" + (", the device was not contacted" if port else ""))
            return
        if sim_dir:
            _say(f"writing the sim board's flash {sim_dir} ...")
            flash_sim_dir(sim_dir, bdef, device, image)
            _say(f"done: run it with `bastion sim --flash {sim_dir} --no-install` (a sim board "
                 "already running on it picks the new files up when it restarts)")  # fmt: skip
            return
        boot = flash_port(port, bdef, device, image)
    except FlashError as e:
        raise click.ClickException(str(e)) from None
    if boot.get("error"):
        raise click.ClickException(
            f"the firmware restarted but refused its configuration: {boot['error']}"
        )
    _say(f"  boot: firmware {boot.get('version')} on board {boot.get('board')}, serving "
         f"{', '.join(boot.get('services') or []) or 'nothing'}")  # fmt: skip
    _say(f"flashed {port}")
