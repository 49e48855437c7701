"""bastion.lab.lab.Wiring, the lab's mains wiring: a relay that goes on starts its node's VM with
the VM's output appended to logs/<node>.qemu.log. Run against a real lab directory and the real
subprocess module, with no QEMU on PATH; needs no root and starts no VM."""

from __future__ import annotations

import json
import os

import pytest
from bastion.lab.lab import Lab, Wiring


def _open_paths() -> set[str]:
    """Every file this process holds open, as /proc names it."""
    held = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            held.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return held


def test_a_vm_that_cannot_start_leaves_its_log_closed(tmp_path, monkeypatch):
    lab = Lab(name="ebw", workdir=tmp_path / "lab")
    lab.workdir.mkdir()
    lab.logs.mkdir()
    lab.flash.mkdir()
    (lab.workdir / "nodes.json").write_text(json.dumps(
        [{"name": "bios-1", "mac": "52:54:00:77:00:02", "firmware": "bios", "channel": 0}]))  # fmt: skip
    (lab.flash / "relays.state").write_text("1")  # channel 0 on
    empty = tmp_path / "no-qemu-here"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    wiring = Wiring(lab)

    with pytest.raises(FileNotFoundError) as excinfo:
        wiring.step()
    # The failed step's frame is still alive (the traceback holds it): a log file it opened
    # and left to the garbage collector would still be open here.
    assert excinfo.value.filename == "qemu-system-x86_64"
    log = lab.logs / "bios-1.qemu.log"
    assert log.exists()
    assert str(log) not in _open_paths()
    assert wiring.running == {}
