# The few names MicroPython has and CPython lacks, feature-detected (never by sys.implementation);
# CPython's are in firmware/cpython.py, which a board never loads.
try:
    from micropython import const
except ImportError:  # CPython
    from firmware.cpython import const  # noqa: F401

try:
    from time import ticks_add, ticks_diff, ticks_ms
except ImportError:  # CPython
    from firmware.cpython import ticks_add, ticks_diff, ticks_ms  # noqa: F401

try:
    from gc import mem_alloc as heap_used
except ImportError:  # CPython has no heap of its own to report
    from firmware.cpython import heap_used  # noqa: F401

import asyncio

if hasattr(asyncio, "sleep_ms"):
    sleep_ms = asyncio.sleep_ms
else:  # CPython
    from firmware.cpython import sleep_ms  # noqa: F401


class Settings:
    """A checked configuration as plain attributes (firmware.config.settings builds one), so
    the checker's code can be unloaded once it has run."""


def unload(name):
    """Forget a boot-only module so its code can be collected. Only where the heap is the
    device's own (MicroPython): CPython tests keep their modules."""
    import gc
    import sys

    if not hasattr(gc, "mem_alloc"):
        return
    sys.modules.pop(name, None)
    pkg, _, leaf = name.rpartition(".")
    parent = sys.modules.get(pkg)
    if parent is not None and hasattr(parent, leaf):
        delattr(parent, leaf)



def tty_raw(saved=None):
    """With no argument: the tty on stdin (the unix port's, the sim board's) passes every byte
    at once, Ctrl-C included, as a board's USB serial does: no SIGINT, no line editing. Returns
    what it took off (c_lflag's ISIG and ICANON bits, an int), for tty_raw(that) to put back;
    None, and nothing done, where there is no tty (a board, a pipe). Not tcgetattr's list: its
    32 control characters held for the firmware's life cost 2.5 KB of a 128 KB heap.

    The firmware runs so (main.run), and firmware.console.serve raises KeyboardInterrupt for a
    Ctrl-C byte between two steps: this port raises a SIGINT's KeyboardInterrupt from the
    signal handler itself, wherever the C code is, and one that lands in a garbage collection
    leaves the heap locked for good ("heap is locked", then "FATAL: uncaught NLR" at the
    REPL: a flash that failed, once in a CI run; 2% of Ctrl-Cs sent just after a console
    request)."""
    try:
        import termios

        a = termios.tcgetattr(0)
    except Exception:  # noqa: BLE001 - no termios (a board) or no tty (termios.error on CPython)
        return None
    if saved is None:
        saved = a[3] & 3  # c_lflag's ISIG and ICANON (Linux)
        a[3] &= ~3
    else:
        a[3] |= saved
    termios.tcsetattr(0, termios.TCSANOW, a)
    a = None
    return saved
