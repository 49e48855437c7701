# firmware/nodecons.py (node consoles over the serial link), firmware/board_hw.UartConsole
# against the STAND-IN machine.UART (tests/firmware/standin/), and the sim board's unix-socket
# consoles (firmware/board_sim.py), under CPython and the MicroPython unix port. The frames
# are decoded by the real codec (firmware/frame.py), as the controller does.
import sys

_HERE = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
sys.path.insert(0, _HERE + "/../standin")

from binascii import a2b_base64, b2a_base64

import machine  # the stand-in: the path above comes first
from mpytest import raises

from firmware import frame
from firmware.nodecons import NodeConsoles, b64_into

assert hasattr(machine, "standin_reset"), "not the stand-in"


class NodeWire:
    """STAND-IN for a port: a node's console whose output a test decides (`say`) and whose
    input it records (`typed`); `room` bounds what write() takes per call, as a busy UART or
    socket takes part of a write."""

    def __init__(self, room=1000):
        self.pending = bytearray()
        self.typed = bytearray()
        self.room = room
        self.reads = 0

    def say(self, data):
        self.pending += data

    def readinto(self, buf):
        self.reads += 1
        n = min(len(buf), len(self.pending))
        if not n:
            return None
        buf[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def write(self, mv):
        k = min(len(mv), self.room)
        self.typed += bytes(mv[:k])
        return k


class Line:
    """The serial line to the controller: every frame written, decoded."""

    def __init__(self):
        self.frames = []
        self.deframer = frame.Deframer(frame.TO_HOST, 2048)

    def write(self, mv):
        for obj in self.deframer.feed(bytes(mv)):
            self.frames.append(obj)

    def bytes_of(self, ch):
        out = bytearray()
        for f in self.frames:
            if f.get("cons") == ch:
                out += a2b_base64(f["d"])
        return bytes(out)


def _cons(ports, **kw):
    line = Line()
    return NodeConsoles(ports, line.write, bytearray(1536), **kw), line


def test_b64_into_matches_binascii_for_every_length():
    src = bytes(range(256)) * 2
    dst = bytearray(800)
    for start in (0, 1, 7):
        for n in range(0, 40):
            end = b64_into(dst, 3, src, start, n)
            want = b2a_base64(src[start : start + n]).strip()
            assert bytes(dst[3:end]) == want, (start, n)


def test_output_reaches_the_controller_whole_and_in_order_with_offsets():
    w = NodeWire()
    cons, line = _cons([(2, w)])
    w.say(b"BdsDxe: loading Boot0001\r\n")
    cons.pump()
    w.say(b"[    0.000000] Linux version 6.1\r\n" * 20)
    cons.pump()
    cons.pump()
    assert line.bytes_of(2) == b"BdsDxe: loading Boot0001\r\n" + b"[    0.000000] Linux version 6.1\r\n" * 20
    at = 0
    for f in line.frames:  # each frame's offset is where the one before it ended
        assert f["at"] == at
        at += len(a2b_base64(f["d"]))
    st = cons.status()[0]
    assert st["cons"] == 2 and st["rx"] == at and st["sent"] == at and st["dropped"] == 0


def test_a_full_ring_drops_the_oldest_and_counts_every_byte():
    w = NodeWire()
    cons, line = _cons([(0, w)], ring_size=100, budget=30, frame_max=30, read_max=1000)
    data = bytes(i % 251 for i in range(1000))
    w.say(data)
    cons.pump()  # reads all 1000 (a UART must be drained), keeps the last 100, sends 30
    st = cons.status()[0]
    assert st["rx"] == 1000 and st["dropped"] == 900 and st["sent"] == 30 and st["held"] == 70
    for _ in range(5):
        cons.pump()
    got = line.bytes_of(0)
    assert got == data[900:]  # the newest kept, in order
    assert line.frames[0]["at"] == 900  # the gap says where the loss was
    st = cons.status()[0]
    assert st["rx"] - st["sent"] == st["dropped"]


def test_budget_bounds_each_pass_and_channels_take_turns():
    a, b = NodeWire(), NodeWire()
    cons, line = _cons([(0, a), (1, b)], ring_size=400, budget=60, frame_max=30)
    a.say(b"a" * 300)
    b.say(b"b" * 300)
    for i in range(4):
        before = len(line.frames)
        cons.pump()
        new = line.frames[before:]
        assert sum(len(a2b_base64(f["d"])) for f in new) <= 60
        # each pass both channels get their share: the one that went first moves on
        assert {f["cons"] for f in new} == {0, 1}, (i, new)


def test_cin_types_into_the_node_with_credit_flow_control():
    w = NodeWire(room=4)  # the node takes 4 bytes per write
    cons, line = _cons([(3, w)], tx_size=16)
    text = b"echo hello-from-the-controller\n"
    r = cons.op_cin({"op": "cin", "cons": 3, "d": b2a_base64(text).decode()}, 0)
    assert r["cons"] == 3 and r["n"] == 16 and r["free"] == 0  # the rest is refused, not lost
    for _ in range(4):
        cons.pump()
    r2 = cons.op_cin({"op": "cin", "cons": 3, "d": b2a_base64(text[16:]).decode()}, 0)
    assert r2["n"] == len(text) - 16
    for _ in range(8):
        cons.pump()
    assert bytes(w.typed) == text
    assert cons.status()[0]["typed"] == len(text)


def test_cin_refuses_bad_requests_with_clear_words():
    cons, _ = _cons([(0, NodeWire())])
    with raises(ValueError):
        cons.op_cin({"cons": 5, "d": "aGk="}, 0)  # no console there
    with raises(ValueError):
        cons.op_cin({"cons": "0", "d": "aGk="}, 0)
    with raises(ValueError):
        cons.op_cin({"cons": 0, "d": 7}, 0)
    with raises(ValueError):
        cons.op_cin({"cons": 0, "d": "a"}, 0)  # not base64


def test_a_port_that_raises_is_a_quiet_port():
    class Broken(NodeWire):
        def readinto(self, buf):
            raise OSError(5)

    cons, line = _cons([(0, Broken()), (1, NodeWire())])
    cons.channels[1].port.say(b"still here")
    cons.pump()
    assert line.bytes_of(1) == b"still here"


def test_uart_console_on_the_standin_machine_uart():
    machine.standin_reset()
    import json

    from firmware.nodecons import ports as board_ports

    with open(_HERE + "/../../../boards/w5500-evb-pico.json") as f:
        d = json.load(f)
    ports = board_ports(d)
    assert [ch for ch, _ in ports] == [0, 1]
    uarts = [c for c in machine.calls if c[0] == "UART"]
    assert uarts == [("UART", 0, 115200, 0, 1, 0, 512), ("UART", 1, 115200, 4, 5, 0, 512)]
    u0 = machine.UART.instances[-2]
    cons, line = _cons(ports)
    u0.arrive(b"U-Boot 2024.01\r\n")
    cons.pump()
    assert line.bytes_of(0) == b"U-Boot 2024.01\r\n"
    cons.op_cin({"cons": 0, "d": b2a_base64(b"\r").decode()}, 0)
    cons.pump()
    assert bytes(u0.sent) == b"\r"
    assert ("UART.write", 0, b"\r") in machine.calls


def test_sim_unix_socket_console():
    import os
    import socket

    from firmware.board_sim import UnixConsole, _cpython, _raw

    path = "/tmp/eb-nodecons-%d.sock" % (os.getpid() if hasattr(os, "getpid") else 1)
    port = UnixConsole(path)
    try:
        cons, line = _cons([(1, port)])
        cons.pump()  # nobody connected: nothing, no error
        node = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        node.connect(path if _cpython() else _raw(path))
        node.send(b"login: ")
        for _ in range(50):
            cons.pump()
            if line.bytes_of(1):
                break
        assert line.bytes_of(1) == b"login: "
        cons.op_cin({"cons": 1, "d": b2a_base64(b"root\n").decode()}, 0)
        cons.pump()
        assert node.recv(16) == b"root\n"
        node.close()
        for _ in range(5):
            cons.pump()
        assert not port.connected()  # the node went; the next one may come
    finally:
        port.close()
        os.remove(path)
