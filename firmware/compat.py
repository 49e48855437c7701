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
