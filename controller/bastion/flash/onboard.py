# Programs `bastion flash` runs ON THE DEVICE with `mpremote exec`, with the firmware stopped:
# MicroPython code, sent as this file's text followed by one call whose result is printed
# (bastion.flash.cli.onboard).
# Small and allocation-light (it runs on the board's own heap), no imports a board lacks, and
# it runs under CPython too: tests/firmware/mpy/test_onboard.py runs it under both.
#
# The flash is laid out as the board sees it, relative to the working directory (a board's
# filesystem root; the sim board's flash directory). New files are copied into STAGE first;
# install() then moves them into place, the firmware package as one directory swap (the old
# one waits in OLD until the new one is in), so an interrupted flash leaves either firmware,
# never a mix of the two.
import json
import os

STAGE = ".bastion-new"
OLD = ".bastion-old"


def isdir(p):
    try:
        return os.stat(p)[0] & 0x4000 != 0
    except OSError:
        return False


def rm(p):
    """Remove a file or a whole directory; nothing if it is not there."""
    if isdir(p):
        for n in os.listdir(p):
            rm(p + "/" + n)
        os.rmdir(p)
    else:
        try:
            os.remove(p)
        except OSError:
            pass


def sha256_hex(p):
    """The file's SHA-256 as hex, None when it cannot be read (or hashlib is missing)."""
    try:
        import binascii
        import hashlib

        d = hashlib.sha256()
        b = bytearray(512)
        m = memoryview(b)
        with open(p, "rb") as f:
            while True:
                n = f.readinto(b)
                if not n:
                    break
                d.update(m[:n])
        return binascii.hexlify(d.digest()).decode()
    # ImportError: no hashlib or binascii on this port; AttributeError: a hashlib without
    # sha256; OSError: no such file, a directory, a read error
    except (ImportError, AttributeError, OSError):
        return None


def text(p):
    try:
        with open(p) as f:
            return f.read()
    except (OSError, UnicodeError):  # not there, or bytes that are not UTF-8
        return None


def size(p):
    try:
        return os.stat(p)[6]
    except OSError:
        return None


def space():
    """The filesystem holding the working directory, from statvfs: [block size, blocks, free
    blocks], or None if the port has no statvfs."""
    if not hasattr(os, "statvfs"):
        return None
    for p in (".", "/"):
        try:
            s = os.statvfs(p)
        except OSError:
            continue
        return [s[1] or s[0], s[2], s[4]]  # f_frsize (the allocation unit), f_blocks, f_bavail
    return None


def impl():
    """The MicroPython that runs here, as sys.implementation says: name, version, and _mpy, the
    .mpy files it loads (docs/reference/mpyfiles.rst); absent fields are None."""
    import sys

    i = sys.implementation
    return {
        "name": i.name,
        "version": list(i.version[:3]),
        "mpy": getattr(i, "_mpy", None),
        "machine": getattr(i, "_machine", None),
        "build": getattr(i, "_build", None),
        "platform": sys.platform,
        "maxsize": sys.maxsize,
    }


def probe(paths):
    """A JSON object: what flashing compares against before writing anything. A flash that
    did not finish is forgotten first (clean), so its staged files count as free space."""
    clean()
    try:
        fw = {n: size("firmware/" + n) for n in os.listdir("firmware")}
    except OSError:
        fw = None
    return json.dumps({
        "hashes": {p: sha256_hex(p) for p in paths},
        "sizes": {p: size(p) for p in paths},
        "firmware": fw,
        "power_state": text("power.state"),
        "relays_state": text("relays.state"),
        "device": text("device.json"),
        "board": text("board.json"),
        "boot_py": size("boot.py"),
        "space": space(),
        "impl": impl(),
    })  # fmt: skip


def clean():
    """Forget a flash that did not finish: nothing staged, nothing old. A power cut between
    install()'s two firmware renames left no firmware/ and the old one in OLD, its only
    complete copy: that one is put back first."""
    if not isdir("firmware") and isdir(OLD + "/firmware"):
        os.rename(OLD + "/firmware", "firmware")
    rm(STAGE)
    rm(OLD)


def feed(timeout_ms):
    """Feed the board's running hardware watchdog (timeout_ms: the board file's; 0: do
    nothing). Only for a board whose firmware said it runs one: on an RP2040 machine.WDT()
    restarts the running watchdog's count, and on a board without one it would start it. The
    sim board's watchdog is its supervisor's pipe (firmware.board.PipeWatchdog)."""
    if not timeout_ms:
        return
    # Whatever stops machine.WDT (none on the unix port, a port that refuses a second one, a
    # full heap), the sim board's pipe is fed instead: there is no one here to tell.
    try:
        import machine

        machine.WDT(timeout=timeout_ms).feed()
    except Exception:  # noqa: BLE001 - any failure falls back to the pipe, as said above
        _feed_pipe()


def _feed_pipe():
    """Feed the sim board's watchdog: one byte down its supervisor's pipe, when there is one."""
    fd = os.getenv("EDGE_BASTION_WDT_FD") if hasattr(os, "getenv") else None
    if fd:
        try:
            with open("/proc/self/fd/" + fd, "wb") as f:
                f.write(b".")
        except OSError:
            pass


def differs(expected, firmware, feed_ms=0):
    """The first path whose file is not the one expected ([path, SHA-256 hex] pairs, in the
    order to check), "firmware/" when that directory's names are not `firmware`; None when
    every file is as expected. Nothing is written. Feeds the watchdog (feed) between files."""
    feed(feed_ms)
    try:
        names = os.listdir("firmware")
    except OSError:
        return "firmware/"
    if sorted(names) != sorted(firmware):
        return "firmware/"
    for p, h in expected:
        if sha256_hex(p) != h:
            return p
        feed(feed_ms)
    return None


def _parents(p):
    parts = p.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        d = "/".join(parts[:i])
        if not isdir(d):
            os.mkdir(d)


def stage(paths):
    """An empty staging directory with every directory the staged files need (mpremote's
    `fs cp` makes none)."""
    clean()
    os.mkdir(STAGE)
    for p in paths:
        _parents(STAGE + "/" + p)


def install(files, swap):
    """Move the staged files into place (swap: the staged firmware/ replaces the old one as a
    whole); returns how many files moved."""
    rm(OLD)
    if swap:
        os.mkdir(OLD)
        if isdir("firmware"):
            os.rename("firmware", OLD + "/firmware")
        os.rename(STAGE + "/firmware", "firmware")
    for p in files:
        _parents(p)
        os.rename(STAGE + "/" + p, p)
    rm(STAGE)
    rm(OLD)
    return len(files)
