"""The dual-interpreter firmware tests (tests/firmware/mpy/test_*.py), run under the real
MicroPython unix port. pytest collects the same files under CPython too."""

import os
import re
import subprocess
from pathlib import Path

import pytest

from bastion.flash.sim import micropython_bin

HERE = Path(__file__).resolve().parent / "mpy"
REPO = HERE.parent.parent.parent
MODULES = sorted(p.stem for p in HERE.glob("test_*.py"))


@pytest.mark.parametrize("module", MODULES)
def test_under_micropython(module):
    # firmware/ from the repository root; bastion/flash/onboard.py (test_onboard) from its folder
    env = dict(os.environ, MICROPYPATH=f"{HERE}:{REPO}:{REPO}/controller/bastion/flash:.frozen")
    r = subprocess.run(
        [micropython_bin(), "-X", "heapsize=1m", "runner.py", module],
        cwd=HERE,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    closing = re.search(r"(\d+) passed, 0 failed\s*$", r.stdout)
    assert closing, r.stdout
    assert int(closing.group(1)) > 0, "no test ran"  # (10 passed also ends in "0 passed")
