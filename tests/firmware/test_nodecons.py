"""firmware/nodecons.py under the real MicroPython unix port in a small heap: what the node
consoles cost (code as .mpy, as flashed; and the buffers of four channels), and that a flood
through them allocates nothing that stays. The behaviour itself is tested on both interpreters
in tests/firmware/mpy/test_nodecons_vectors.py; the link-level flood in
tests/controller/device/test_console_flood.py."""

import subprocess
from pathlib import Path

from bastion.flash.sim import MPY_CROSS_ARGS, _tool, micropython_bin

REPO = Path(__file__).resolve().parent.parent.parent

HEAP_SCRIPT = r"""
import gc
from firmware import frame  # the console's codec: loaded by the firmware anyway
gc.collect()
base = gc.mem_alloc()
from firmware import nodecons
gc.collect()
code = gc.mem_alloc() - base

class Wire:
    def __init__(self):
        self.n = 0
    def readinto(self, buf):
        for i in range(len(buf)):
            buf[i] = 0x41 + (self.n + i) % 26
        self.n += len(buf)
        return len(buf)
    def write(self, mv):
        return len(mv)

out = [0]
def write(mv):
    out[0] += len(mv)

buf = bytearray(1536)
gc.collect()
before = gc.mem_alloc()
cons = nodecons.NodeConsoles([(i, Wire()) for i in range(4)], write, buf)
gc.collect()
data = gc.mem_alloc() - before
cons.pump()
gc.collect()
held1 = gc.mem_alloc()
for _ in range(300):
    cons.pump()
gc.collect()
growth = gc.mem_alloc() - held1
st = cons.status()
assert st[0]["rx"] == st[0]["sent"] + st[0]["dropped"] + st[0]["held"], st
print("code", code, "data", data, "growth", growth, "frames", cons.frames, "out", out[0])
"""


def test_four_console_channels_fit_a_small_heap_and_a_flood_holds_nothing(tmp_path):
    pkg = tmp_path / "firmware"
    pkg.mkdir()
    for name in ("__init__", "compat", "frame", "nodecons"):
        subprocess.run(
            [_tool("mpy-cross"), *MPY_CROSS_ARGS, "-o", str(pkg / f"{name}.mpy"),
             "-s", f"firmware/{name}.py", str(REPO / "firmware" / f"{name}.py")],
            check=True,
        )
    r = subprocess.run(
        [micropython_bin(), "-X", "heapsize=64k", "-c", HEAP_SCRIPT],
        env={"MICROPYPATH": f"{tmp_path}:.frozen"},
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    w = r.stdout.split()
    code, data, growth, frames = int(w[1]), int(w[3]), int(w[5]), int(w[7])
    assert frames > 300  # every pass sent (a flood on four channels)
    # the rings and tx buffers (4 x (1024 + 128)) plus the scratch buffer and the objects:
    # what docs/consoles.md states, with room for the 64-bit port's object sizes
    assert data < 8 * 1024, r.stdout
    assert code < 8 * 1024, r.stdout
    assert growth <= 0, r.stdout  # 300 passes of flood: nothing held
