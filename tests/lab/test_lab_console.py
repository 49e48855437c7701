"""A node's serial console through the device, in the lab (marker `lab`; issue 15, point 1).

A real QEMU node (SeaBIOS + iPXE, whose BIOS text sgabios copies to the serial port) has its
serial port wired to the sim device's console channel for its relay channel (a unix socket in
the device's flash), so its console travels node -> device -> controller over the framed serial
protocol, as on hardware. `bastion console NAME` is attached before the power-on: it shows the
firmware's and the kernel's messages, the lab initrd gives a shell on the serial console, a
command typed in shows its output, and the controller's log keeps it all after the stream is
closed.

Real QEMU under TCG, so a minute or more: the waits are generous guards, not timings."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from bastion.lab.lab import Lab, Node

pytestmark = [pytest.mark.lab, pytest.mark.timeout(1200)]

NAME, PREFIX = "ebcon", "10.91.0"
BASTION = str(Path(sys.executable).parent / "bastion")
NODE = Node("con-1", "52:54:00:91:00:01", "bios", 0, shell=True)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (network namespaces, taps)")
    lab = Lab(NAME, PREFIX, tmp_path_factory.mktemp("labcon"))
    try:
        lab.up([NODE], progress=lambda msg: None)
        yield lab
    finally:
        lab.down()


_ESC = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def text(out: bytes) -> bytes:
    """The console's bytes without terminal escape sequences: sgabios paints the BIOS screen
    one character at a time, each after a cursor move."""
    return _ESC.sub(b"", out)


def console_cmd(lab: Lab, *args: str) -> list[str]:
    return ["ip", "netns", "exec", lab.net.lan, BASTION, "console", NODE.name, "--url",
            lab.controller_url, *args]  # fmt: skip


def env_for(lab: Lab) -> dict:
    return {**os.environ, "BASTION_API_TOKEN": lab.token_file.read_text().strip()}


class Attached:
    """`bastion console con-1` running, its stdin a pipe the test types into, its stdout
    collected."""

    def __init__(self, lab: Lab):
        self.proc = subprocess.Popen(console_cmd(lab, "--after-eof", "5"), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env_for(lab))  # fmt: skip
        self.out = b""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while True:
            data = self.proc.stdout.read1(4096)
            if not data:
                return
            self.out += data

    def type(self, data: bytes):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def wait_for(self, pred, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred(self.out):
                return
            assert self.proc.poll() is None, (what, self.proc.stderr.read(), self.out[-2000:])
            time.sleep(0.5)
        raise AssertionError(f"no {what} within {timeout:.0f} s; the console so far:\n"
                             f"{self.out[-3000:].decode(errors='replace')}")  # fmt: skip

    def close(self):
        self.proc.stdin.close()
        return self.proc.wait(60)


def test_a_node_console_through_the_device_from_power_on(lab):
    att = Attached(lab)
    try:
        time.sleep(2)  # attached before the power-on
        after = lab.power_on(NODE.name)
        # the firmware's messages (SeaBIOS and iPXE, through sgabios), then the kernel's
        att.wait_for(lambda o: b"SeaBIOS (version" in text(o), 240, "SeaBIOS banner")
        att.wait_for(lambda o: b"iPXE (http://ipxe.org)" in text(o), 240, "iPXE banner")
        att.wait_for(lambda o: re.search(rb"\[ *\d+\.\d+\] ", o), 300, "kernel message")
        lab.wait_callback(NODE.name, after, timeout=300)
        att.wait_for(lambda o: b"lab-init: shell on the serial console" in o, 120, "the shell")
        word = secrets.token_hex(4)
        att.type(f"echo hello-$((6*7))-{word}\n".encode())
        # the shell's answer, not the echo of what was typed: $((6*7)) became 42
        att.wait_for(lambda o: f"hello-42-{word}".encode() in o, 120, "the command's output")
        assert att.close() == 0
    finally:
        if att.proc.poll() is None:
            att.proc.kill()
    shown = att.out
    # the log keeps what was shown, after the stream closed
    r = subprocess.run(console_cmd(lab, "--log"), capture_output=True, env=env_for(lab),
                       timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    kept = r.stdout
    for piece in (b"SeaBIOS (version", b"iPXE (http://ipxe.org)",
                  b"lab-init: shell on the serial console", f"hello-42-{word}".encode()):
        assert piece in text(kept)
    assert re.search(rb"\[ *\d+\.\d+\] ", kept)
    # what the terminal showed live is in the log (the log may hold more: it started earlier)
    tail = shown[-200:]
    assert tail in kept
    # and the device counted what it carried: nothing lost on the link
    st = lab.api("GET", "/api/v1/device")["status"]
    con = next(c for c in st["consoles"] if c["cons"] == NODE.channel)
    assert con["rx"] == con["sent"] + con["dropped"] + con["held"]
    # QEMU's own copy, where the lab's messages point, has the same boot
    assert b"lab-init: shell on the serial console" in (
        lab.logs / f"{NODE.name}.console").read_bytes()
