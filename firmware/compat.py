# The few names MicroPython has and CPython lacks, feature-detected (never by sys.implementation).
try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


try:
    from time import ticks_add, ticks_diff, ticks_ms
except ImportError:  # CPython
    from time import monotonic_ns as _monotonic_ns

    def ticks_ms():
        return _monotonic_ns() // 1_000_000

    def ticks_diff(a, b):
        return a - b

    def ticks_add(a, b):
        return a + b


try:
    from gc import mem_alloc as heap_used
except ImportError:  # CPython has no heap of its own to report

    def heap_used():
        return 0


import asyncio

if hasattr(asyncio, "sleep_ms"):
    sleep_ms = asyncio.sleep_ms
else:  # CPython

    async def sleep_ms(ms):
        await asyncio.sleep(ms / 1000)


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
