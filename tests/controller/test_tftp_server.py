"""bastion.tftpd: the controller's read-only TFTP server (firmware.tftp's engine in a CPython
shell) against real clients (tftp-hpa's tftp, atftp, curl, tftpy's client) on 127.0.0.1 high
ports; the device's refusals, RFC 2347-2349 options, windows (RFC 7440) with atftp 0.8, the one
real client here that asks for them, and with a raw client in this file that speaks them packet
by packet; bad datagrams counted and dropped, counters, a clean stop, and events shaped like the
device's. Then `bastion serve --tftp` as a user runs it.

No assertion looks at a time: the timeouts below only make a vanished client's end come sooner.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import sys
import threading
from pathlib import Path

import pytest
from bastion.state.events import EventStore
from bastion.tftpd import TftpService
from bastion_testkit import Server
from netkit import (
    atftp_get,
    atftp_put,
    curl_get,
    curl_put,
    fetch,
    tftp_hpa,
    tftp_hpa_get,
    tftp_hpa_put,
    tftpy_get,
    tftpy_put,
)
from simkit import free_udp_port, wait_for

from firmware import tftpd

SIZES = [0, 1, 511, 512, 513, 1023, 1024, 1025, 1467, 1468, 1469, 70_001]


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def files() -> dict[str, bytes]:
    rng = random.Random(2349)
    out = {f"s{n}.bin": rng.randbytes(n) for n in SIZES}
    out["9ffefdef/start4.elf"] = rng.randbytes(300_000)
    return out


class Recorder:
    """record(kind, **fields) as Runtime.record takes it; thread-safe enough for a list."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.lock = threading.Lock()

    def __call__(self, kind: str, **fields) -> int:
        with self.lock:
            self.events.append({"kind": kind, **fields})
            return len(self.events)

    def stage(self, stage: str) -> list[dict]:
        with self.lock:
            return [e["payload"] for e in self.events if e["payload"]["stage"] == stage]


@pytest.fixture
def tftp_root(tmp_path: Path, files: dict[str, bytes]) -> Path:
    site = tmp_path / "site"
    root = site / "tftp"
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (site / "secret").write_bytes(b"outside the TFTP root")
    (root / "escape").symlink_to(site / "secret")
    (root / "inside").symlink_to(root / "s512.bin")  # a link that stays inside is served
    (root / "emptydir").mkdir()
    return root


@pytest.fixture
def service(tftp_root: Path):
    rec = Recorder()
    svc = TftpService(tftp_root, "127.0.0.1", 0, record=rec, timeout=5.0).start()
    svc.rec = rec
    yield svc
    svc.stop()


@pytest.mark.parametrize("client,blksize", [
    ("tftp-hpa", 512), ("atftp", 1024), ("atftp", 1468), ("curl", 512), ("curl", 1024),
    ("tftpy", 1024), ("tftpy", 1468),
])
def test_real_clients_fetch_every_file_byte_identical(service, files, tmp_path, client, blksize):
    port = service.address[1]
    fetched = 0
    for name, data in files.items():
        if client == "curl" and not data:
            continue  # curl 7.88 fails on empty files against every server (test_tftp_clients)
        out = tmp_path / (name.replace("/", "_") + f".{client}")
        fetch(client, port, name, out, blksize)
        assert sha(out.read_bytes()) == sha(data), f"{client} {name}"
        fetched += 1
    # The client may be done before the server has taken its last ACK.
    ends = wait_for(lambda: len(service.rec.stage("end")) >= fetched and service.rec.stage("end"),
                    what=lambda: f"{fetched} end events: {service.rec.events}")
    assert [e["result"] for e in ends] == ["ok"] * fetched
    assert {e["file"]: e["bytes"] for e in ends} == {
        n: len(d) for n, d in files.items() if d or client != "curl"}
    starts = service.rec.stage("start")
    want_blksize = 512 if client == "tftp-hpa" else blksize  # tftp-hpa asks for no options
    assert {e["blksize"] for e in starts} == {want_blksize}
    assert all(e["window"] == 1 for e in starts)
    assert {e["kind"] for e in service.rec.events} == {"tftp"}
    assert {e["source"] for e in service.rec.events} == {"controller"}
    assert service.counters.get("tftp.error") is None


@pytest.mark.parametrize("blksize,window", [(1468, 4), (1468, 64), (512, 16), (1024, 1000)])
def test_atftp_fetches_every_file_byte_identical_in_windows(service, files, tmp_path, blksize,
                                                             window):
    port = service.address[1]
    for name, data in files.items():
        out = tmp_path / name.replace("/", "_")
        r = atftp_get(port, name, out, blksize, window)
        assert r.returncode == 0, r.stdout + r.stderr
        assert sha(out.read_bytes()) == sha(data), name
    ends = wait_for(lambda: len(ends := service.rec.stage("end")) >= len(files) and ends,
                    what=lambda: f"{len(files)} end events: {service.rec.events}")
    assert {e["file"]: (e["result"], e["bytes"]) for e in ends} == {
        n: ("ok", len(d)) for n, d in files.items()}
    granted = min(window, service.max_window)  # RFC 7440: the server may answer smaller
    assert {(e["blksize"], e["window"]) for e in service.rec.stage("start")} == {
        (blksize, granted)}
    assert service.counters.get("tftp.error") is None


@pytest.mark.timeout(300)
def test_windows_carry_a_file_past_the_block_number_rollover(tftp_root, tmp_path):
    data = random.Random(7440).randbytes(512 * 65536 + 100)  # block 65536 goes out as 0
    (tftp_root / "big.bin").write_bytes(data)
    rec = Recorder()
    with TftpService(tftp_root, "127.0.0.1", 0, record=rec, timeout=5.0) as svc:
        r = atftp_get(svc.address[1], "big.bin", tmp_path / "big", 512, 64)
        assert r.returncode == 0, r.stdout + r.stderr
        assert sha((tmp_path / "big").read_bytes()) == sha(data)
        (end,) = wait_for(lambda: rec.stage("end"), what="the end event")
    assert (end["result"], end["bytes"]) == ("ok", len(data))


def test_blocks_up_to_65464_bytes_when_max_blksize_allows(tftp_root, files, tmp_path):
    rec = Recorder()
    with TftpService(tftp_root, "127.0.0.1", 0, record=rec, max_blksize=65464) as svc:
        port = svc.address[1]
        name = "9ffefdef/start4.elf"
        r = curl_get(port, name, tmp_path / "c", 65464)
        assert r.returncode == 0, r.stderr
        # Two blocks of 64 KB per window: a default receive buffer holds three such datagrams.
        r = atftp_get(port, name, tmp_path / "a", 65464, 2)
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: len(rec.stage("end")) == 2, what="two end events")
    assert (tmp_path / "c").read_bytes() == (tmp_path / "a").read_bytes() == files[name]
    assert [(e["blksize"], e["window"]) for e in rec.stage("start")] == [(65464, 1), (65464, 2)]
    assert [e["result"] for e in rec.stage("end")] == ["ok", "ok"]
    with pytest.raises(ValueError, match="RFC 2348"):
        TftpService(tftp_root, max_blksize=65465)
    with pytest.raises(ValueError, match="RFC 7440"):
        TftpService(tftp_root, max_window=0)


def test_events_have_the_device_events_shape(service, tmp_path):
    port = service.address[1]
    assert curl_get(port, "s1024.bin", tmp_path / "o", 1024).returncode == 0
    assert curl_get(port, "missing.bin", tmp_path / "o", 1024).returncode == 68
    # The server records a refusal after sending it: curl may have exited before.
    wait_for(lambda: service.rec.stage("end") and service.rec.stage("refused"),
             what="the end and refused events")
    # The very field names firmware/tftpd.py gives its start, end and refused events.
    (start,) = service.rec.stage("start")
    assert tuple(start) == tftpd._START
    assert start == {"stage": "start", "file": "s1024.bin", "client": "127.0.0.1",
                     "blksize": 1024, "tsize": 1024, "window": 1}
    (end,) = service.rec.stage("end")
    assert tuple(end) == tftpd._END
    assert (end["bytes"], end["result"], end["resends"], end["dup_acks"]) == (1024, "ok", 0, 0)
    (refused,) = service.rec.stage("refused")
    assert tuple(refused) == tftpd._REFUSED
    assert refused == {"stage": "refused", "file": "missing.bin", "client": "127.0.0.1",
                       "code": 1, "reason": "file not found", "name_bytes": 11}


def test_real_clients_get_the_devices_refusals(service, tftp_root, tmp_path):
    port = service.address[1]
    up = tmp_path / "up.bin"
    up.write_bytes(b"an upload")
    out = tmp_path / "out"
    before = sorted(p.relative_to(tftp_root) for p in tftp_root.rglob("*"))

    r = tftp_hpa_put(port, up, "up.bin")
    assert "read-only server" in r.stdout + r.stderr
    for name in ("../secret", "sub/../../secret", "escape", "/etc/passwd"):
        r = tftp_hpa_get(port, name, out)
        assert "bad file name" in r.stdout + r.stderr, name
    for name in ("missing.bin", "emptydir"):
        r = tftp_hpa_get(port, name, out)
        assert "file not found" in r.stdout + r.stderr, name
    r = tftp_hpa(port, "get", "s1.bin", str(out), mode="ascii", timeout=60)
    assert "only octet mode" in r.stdout + r.stderr

    r = atftp_put(port, up, "up.bin")
    assert r.returncode != 0 and "read-only server" in r.stdout + r.stderr
    r = atftp_get(port, "escape", out, 1024)
    assert r.returncode != 0 and "bad file name" in r.stdout + r.stderr

    r = curl_put(port, up, "up.bin")
    assert r.returncode != 0
    assert curl_get(port, "../secret", out, 1024).returncode == 69  # CURLE_TFTP_PERM
    assert curl_get(port, "missing.bin", out, 1024).returncode == 68  # CURLE_TFTP_NOTFOUND

    import tftpy

    with pytest.raises(tftpy.TftpException, match="errorcode = 2"):
        tftpy_put(port, up, "up.bin")
    with pytest.raises(tftpy.TftpException, match="File not found"):
        tftpy_get(port, "missing.bin", out, 512)

    # A link that stays inside the root is served like its target.
    assert curl_get(port, "inside", out, 1024).returncode == 0
    assert out.read_bytes() == (tftp_root / "s512.bin").read_bytes()

    assert sorted(p.relative_to(tftp_root) for p in tftp_root.rglob("*")) == before
    refused = service.rec.stage("refused")
    assert [e["code"] for e in refused].count(2) >= 9
    assert not [e for e in service.rec.stage("start") if e["file"] != "inside"]
    assert service.counters.get("tftp.error") is None


# --- raw packets: options, duplicates, garbage ------------------------------------------------


def rrq(name: bytes, *opts: tuple[bytes, bytes], op: int = 1, mode: bytes = b"octet") -> bytes:
    out = bytes((0, op)) + name + b"\0" + mode + b"\0"
    for k, v in opts:
        out += k + b"\0" + v + b"\0"
    return out


def ack(n: int) -> bytes:
    return bytes((0, 4, n >> 8, n & 0xFF))


def oack_options(pkt: bytes) -> dict[bytes, bytes]:
    assert pkt[:2] == b"\0\x06", pkt
    parts = pkt[2:].split(b"\0")[:-1]
    return dict(zip(parts[::2], parts[1::2], strict=True))


class Raw:
    def __init__(self, port: int):
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(10)
        self.peer = None

    def ask(self, data: bytes) -> bytes:
        self.sock.sendto(data, ("127.0.0.1", self.port))
        pkt, self.peer = self.sock.recvfrom(70000)
        return pkt

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.peer)

    def recv(self) -> bytes:
        pkt, src = self.sock.recvfrom(70000)
        assert src == self.peer
        return pkt

    def close(self) -> None:
        self.sock.close()


def test_options_per_rfc_2347_to_2349_and_7440(service):
    port = service.address[1]
    c = Raw(port)
    try:
        got = oack_options(c.ask(rrq(b"s70001.bin", (b"blksize", b"65464"), (b"tsize", b"0"),
                                     (b"timeout", b"3"), (b"windowsize", b"8"),
                                     (b"x-unknown", b"1"))))
        # blksize lowered to the server's 1468 (RFC 2348); tsize the file's size and timeout
        # echoed (RFC 2349); windowsize granted (RFC 7440); unknown options left out.
        assert got == {b"blksize": b"1468", b"tsize": b"70001", b"timeout": b"3",
                       b"windowsize": b"8"}
        c.send(b"\0\x05\0\x08done\0")  # as edk2 after a tsize probe: "error 8"
        # until that transfer has ended, a new RRQ from the same port is its duplicate (dropped)
        wait_for(lambda: service.rec.stage("end"), what="the end event")
        # A window larger than the server's max_window is lowered to it (RFC 7440).
        got = oack_options(c.ask(rrq(b"s70001.bin", (b"windowsize", b"65535"))))
        assert got == {b"windowsize": str(service.max_window).encode()}
        c.send(b"\0\x05\0\x08done\0")
        wait_for(lambda: len(service.rec.stage("end")) == 2, what="the second end event")
        for opt, value in ((b"blksize", b"4"), (b"blksize", b"65465"), (b"blksize", b"abc"),
                           (b"timeout", b"0"), (b"windowsize", b"0"),
                           (b"windowsize", b"65536")):
            err = c.ask(rrq(b"s1.bin", (opt, value)))
            assert err[:4] == b"\0\x05\0\x08", (opt, value, err)  # RFC 2347: error 8
    finally:
        c.close()
    ends = service.rec.stage("end")
    assert [(e["result"], e["bytes"]) for e in ends] == [("client error 8", 0)] * 2
    starts = service.rec.stage("start")
    assert [(e["blksize"], e["window"]) for e in starts] == [(1468, 8), (512, 64)]


def test_duplicate_acks_never_cause_duplicate_sends(service, files):
    c = Raw(service.address[1])
    data = files["s70001.bin"]
    try:
        assert oack_options(c.ask(rrq(b"s70001.bin", (b"blksize", b"1024")))) == {
            b"blksize": b"1024"}
        got = b""
        c.send(ack(0))
        c.send(ack(0))  # a duplicate: must not bring a second DATA 1
        n = 1
        while True:
            pkt = c.recv()
            assert pkt[:4] == bytes((0, 3, n >> 8, n & 0xFF)), (n, pkt[:4])
            got += pkt[4:]
            c.send(ack(n))
            if n == 2:
                c.send(ack(n))  # and again, mid-transfer
                c.send(ack(1))  # a stale one
            if len(pkt) - 4 < 1024:
                break
            n += 1
    finally:
        c.close()
    assert got == data
    (end,) = wait_for(lambda: service.rec.stage("end"), what="the end event")
    assert (end["result"], end["dup_acks"], end["resends"]) == ("ok", 3, 0)
    assert service.counters["tftp.dup_ack"] == 3


def take_to_the_last_block(c: Raw, size: int) -> None:
    """Lock-step at 512 from DATA 1 (already taken): ACK every block but the last, whose ACK
    the client withholds, as when the final ACK is lost."""
    n = 1
    while n <= size // 512:
        c.send(ack(n))
        n += 1
        assert c.recv()[:4] == bytes((0, 3, 0, n))


def ask_from_the_same_port(c: Raw, req: bytes) -> bytes:
    """Send req from c's port to the listener; the first packet from a new transfer ID (the old
    transfer's resends skipped). A socket timeout here is a request dropped."""
    old = c.peer
    c.sock.sendto(req, ("127.0.0.1", c.port))
    while True:
        pkt, src = c.sock.recvfrom(70000)
        if src != old:
            c.peer = src
            return pkt


@pytest.mark.parametrize("second", [b"s513.bin", b"s1024.bin"])
def test_a_client_reusing_its_port_after_its_last_ack_was_lost_gets_its_next_file(
        service, files, second):
    # edk2 and the Pi bootloader fetch file after file from one UDP port. The last block was
    # sent, its ACK lost: a new request from that port (another file, or the same one again)
    # is a new transfer, not the first one's duplicate; the first one ends, superseded.
    c = Raw(service.address[1])
    c.sock.settimeout(3)  # the old transfer resends every 5 s: a drop times out here
    try:
        assert c.ask(rrq(b"s1024.bin"))[:4] == b"\0\x03\0\x01"
        take_to_the_last_block(c, 1024)  # DATA 3 (empty), never ACKed
        pkt = ask_from_the_same_port(c, rrq(second))
        assert pkt == b"\0\x03\0\x01" + files[second.decode()][:512]
        take_to_the_last_block(c, len(files[second.decode()]))
        c.send(ack(len(files[second.decode()]) // 512 + 1))
    finally:
        c.close()
    ends = wait_for(lambda: len(service.rec.stage("end")) == 2 and service.rec.stage("end"),
                    what="2 end events")
    assert [(e["file"], e["result"]) for e in ends] == [
        ("s1024.bin", "superseded"), (second.decode(), "ok")]
    assert [e["file"] for e in service.rec.stage("start")] == ["s1024.bin", second.decode()]
    assert service.counters.get("tftp.duplicate_request") is None
    assert service.counters["tftp.superseded"] == 1


def test_a_request_sent_again_before_its_first_answer_arrived_is_a_duplicate(service, files):
    # RFC 1350: a client that has no answer yet sends its request again from the same port.
    # While no ACK has moved the transfer, the same request is a duplicate (the transfer's
    # timer resends the answer); another one from that port is a new request.
    c = Raw(service.address[1])
    try:
        assert c.ask(rrq(b"s70001.bin"))[:4] == b"\0\x03\0\x01"
        c.sock.sendto(rrq(b"s70001.bin"), ("127.0.0.1", c.port))
        wait_for(lambda: service.counters.get("tftp.duplicate_request"), what="the duplicate")
        assert service.active == 1 and len(service.rec.stage("start")) == 1
        pkt = ask_from_the_same_port(c, rrq(b"s513.bin"))  # not the same: a new transfer
        assert pkt == b"\0\x03\0\x01" + files["s513.bin"][:512]
        c.send(ack(1))
        assert c.recv() == b"\0\x03\0\x02" + files["s513.bin"][512:]
        c.send(ack(2))
    finally:
        c.close()
    ends = wait_for(lambda: len(service.rec.stage("end")) == 2 and service.rec.stage("end"),
                    what="2 end events")
    assert [(e["file"], e["result"]) for e in ends] == [
        ("s70001.bin", "superseded"), ("s513.bin", "ok")]
    assert service.counters["tftp.duplicate_request"] == 1


def block_of(pkt: bytes) -> int:
    assert pkt[:2] == b"\0\x03", pkt[:4]
    return (pkt[2] << 8) | pkt[3]


def test_windows_per_rfc_7440_and_a_partial_ack_resends_from_the_gap(service, files):
    # A raw client that speaks windowsize 4 packet by packet (s70001.bin: 137 blocks of 512).
    c = Raw(service.address[1])
    data = files["s70001.bin"]
    got: dict[int, bytes] = {}
    try:
        assert oack_options(c.ask(rrq(b"s70001.bin", (b"windowsize", b"4")))) == {
            b"windowsize": b"4"}
        c.send(ack(0))
        first = [c.recv() for _ in range(4)]
        assert [block_of(p) for p in first] == [1, 2, 3, 4]  # one ACK, a whole window
        got.update({block_of(p): p[4:] for p in first})
        c.send(ack(0))  # a duplicate of the OACK's ACK: sends nothing
        c.send(ack(2))  # as if block 3 were lost: the next window starts there, at once
        nxt = [c.recv() for _ in range(4)]
        assert [block_of(p) for p in nxt] == [3, 4, 5, 6]
        got.update({block_of(p): p[4:] for p in nxt})
        last = 6
        while len(got[last]) == 512:  # the rest, a window per ACK of its last block
            c.send(ack(last))
            for _ in range(4):
                pkt = c.recv()
                k = block_of(pkt)
                assert k == last + 1, (k, last)
                got[k] = pkt[4:]
                last = k
                if len(pkt) - 4 < 512:
                    break
        c.send(ack(last))
    finally:
        c.close()
    assert b"".join(got[k] for k in range(1, last + 1)) == data
    (start,) = service.rec.stage("start")
    assert (start["blksize"], start["window"]) == (512, 4)
    (end,) = wait_for(lambda: service.rec.stage("end"), what="the end event")
    assert (end["result"], end["bytes"], end["dup_acks"], end["resends"]) == ("ok", 70001, 1, 0)


def test_a_timeout_resends_the_whole_window(tftp_root, files):
    rec = Recorder()
    with TftpService(tftp_root, "127.0.0.1", 0, record=rec, timeout=0.05) as svc:
        c = Raw(svc.address[1])
        try:
            # s1469.bin in blocks of 512 is three blocks: one window of 4 holds them all.
            opts = oack_options(c.ask(rrq(b"s1469.bin", (b"windowsize", b"4"))))
            assert opts == {b"windowsize": b"4"}
            c.send(ack(0))
            pkts = [c.recv() for _ in range(6)]  # ...and no ACK: the timer sends them again
            c.send(ack(3))
        finally:
            c.close()
        (end,) = wait_for(lambda: rec.stage("end"), what="the end event")
    assert [block_of(p) for p in pkts] == [1, 2, 3, 1, 2, 3]
    assert b"".join(p[4:] for p in pkts[:3]) == files["s1469.bin"]
    assert (end["result"], end["bytes"]) == ("ok", 1469) and end["resends"] >= 1


def test_after_a_backed_off_resend_the_next_block_is_timed_from_the_base_timeout(tftp_root):
    # The loop sleeps until the earliest deadline it knows (_due). After two resends of block 1
    # (0.1 s, then 0.2 s) the next wait is 0.4 s; the ACK that finally comes makes block 2's
    # deadline 0.1 s away, but _due stayed at the backed-off one: every later loss cost 2-4x
    # the timeout (a Pi's 2 MB at 1% loss took 39 s, past its bootloader's 30). Read right
    # after block 2 arrives: a slow machine can only hide the fault, never invent it.
    from firmware.compat import ticks_diff

    with TftpService(tftp_root, "127.0.0.1", 0, timeout=0.1) as svc:
        c = Raw(svc.address[1])
        try:
            first = c.ask(rrq(b"s1469.bin"))  # lock-step, 512: DATA 1
            assert block_of(first) == 1
            assert block_of(c.recv()) == 1 and block_of(c.recv()) == 1  # two resends: backed off
            c.send(ack(1))
            assert block_of(c.recv()) == 2
            (s,) = svc._served.values()
            assert ticks_diff(svc._due, s.transfer.deadline) <= 0, (svc._due, s.transfer.deadline)
        finally:
            c.close()


def test_a_flood_of_bad_requests_is_answered_and_recorded_within_a_budget(tftp_root):
    # 20,000 bad requests in a second wrote 6,500 events a second: the history's bound then
    # dropped every boot's timeline within seconds.
    import time

    from bastion.tftpd import REFUSAL_EVENTS

    rec = Recorder()
    with TftpService(tftp_root, "127.0.0.1", 0, record=rec) as svc:
        c = Raw(svc.address[1])
        try:
            began = time.monotonic()
            for i in range(300):
                assert c.ask(rrq(b"missing-%d.bin" % i))[:2] == b"\0\x05"  # each one answered
            took = time.monotonic() - began
        finally:
            c.close()
        # (the loop counts a refusal just after it has sent it)
        wait_for(lambda: svc.counters.get("tftp.refused") == 300, what="300 refusals counted")
        recorded = rec.stage("refused")
        assert len(recorded) + svc.counters.get("tftp.events_suppressed", 0) == 300
        assert REFUSAL_EVENTS <= len(recorded) <= REFUSAL_EVENTS * (int(took) + 2), (len(recorded), took)


def test_a_last_ack_queued_behind_an_icmp_refusal_still_ends_the_transfer_ok(tftp_root, files):
    # Linux reports a pending ICMP error on a socket before the datagrams queued ahead of it.
    # Set that up: the server is held in its start event; the client takes DATA 1, queues ACK 1
    # and ACK 2 (ahead of DATA 2, as if DATA 2 had come), and closes its port. Released, the
    # server takes ACK 1 and sends DATA 2 into the closed port (ICMP port unreachable); ACK 2
    # is then behind that error.
    hold = threading.Event()
    rec = Recorder()

    def record(kind: str, **fields) -> int:
        if fields["payload"]["stage"] == "start":
            hold.wait(10)
        return rec(kind, **fields)

    with TftpService(tftp_root, "127.0.0.1", 0, record=record, timeout=5.0) as svc:
        c = Raw(svc.address[1])
        try:
            pkt = c.ask(rrq(b"s513.bin"))  # no options: DATA 1 first, then the start event
            assert block_of(pkt) == 1 and pkt[4:] == files["s513.bin"][:512]
            c.send(ack(1))
            c.send(ack(2))
        finally:
            c.close()
        hold.set()
        (end,) = wait_for(lambda: rec.stage("end"), what="the end event")
    assert (end["result"], end["bytes"]) == ("ok", 513)


def test_counters_and_events_of_a_known_sequence(service, tmp_path):
    port = service.address[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"\x00\x01no-mode\0", ("127.0.0.1", port))  # malformed: no reply
    assert curl_get(port, "missing.bin", tmp_path / "o", 512).returncode == 68
    assert atftp_get(port, "s70001.bin", tmp_path / "o", 1468, 8).returncode == 0
    c = Raw(port)
    try:
        assert oack_options(c.ask(rrq(b"s1.bin", (b"tsize", b"0")))) == {b"tsize": b"1"}
        c.send(b"\0\x05\0\x08probe done\0")  # edk2's tsize probe
    finally:
        c.close()
    wait_for(lambda: len(service.rec.stage("end")) == 2, what="two end events")
    assert service.counters == {"tftp.request": 4, "tftp.malformed": 1, "tftp.refused": 1,
                                "tftp.ok": 1, "tftp.failed": 1}
    assert [(e["stage"], e["file"]) for e in service.rec.stage("refused")] == [
        ("refused", "missing.bin")]
    assert [(e["file"], e["blksize"], e["tsize"], e["window"])
            for e in service.rec.stage("start")] == [
        ("s70001.bin", 1468, 70001, 8), ("s1.bin", 512, 1, 1)]
    assert [(e["file"], e["result"], e["bytes"]) for e in service.rec.stage("end")] == [
        ("s70001.bin", "ok", 70001), ("s1.bin", "client error 8", 0)]
    assert service.active == 0


def test_bad_datagrams_are_counted_and_dropped_and_the_server_goes_on(service, files, tmp_path):
    port = service.address[1]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    garbage = [b"", b"\x00", b"\x00\x01", b"\x00\x01name", b"\x00\x01name\0octet\0blksize\0",
               b"\x00\x09xx\0octet\0", b"\xff" * 600, os.urandom(200), b"\x00\x04\x00\x01",
               b"\x00\x03\x00\x01data", b"\x00\x05\x00\x01\0", b"\x00\x01\xff\xfe\0octet\0"]
    for g in garbage:
        s.sendto(g, ("127.0.0.1", port))
    s.close()
    # ...and garbage inside a transfer: a 3-byte ACK, an unknown
    # opcode, a DATA, then the transfer goes on to the end.
    c = Raw(port)
    try:
        assert c.ask(rrq(b"s1469.bin", (b"blksize", b"1024")))[:2] == b"\0\x06"
        for g in (b"\x00\x04\x00", b"\x00\x63abc", b"\x00\x03\x00\x01zz"):
            c.send(g)
        c.send(ack(0))
        got = b""
        for n in (1, 2):
            pkt = c.recv()
            assert pkt[:4] == bytes((0, 3, 0, n))
            got += pkt[4:]
            c.send(ack(n))
    finally:
        c.close()
    assert got == files["s1469.bin"]
    wait_for(lambda: service.rec.stage("end"), what="the end event")
    assert curl_get(port, "s1.bin", tmp_path / "o", 512).returncode == 0
    counts = service.counters
    # Everything on the listener that is not a whole RRQ/WRQ is malformed, as the device says
    # (an unsupported opcode, ACK/DATA/ERROR on port 69, a name that is not NUL-terminated ...)
    # except the last one, a request with a non-ASCII name: refused with "bad file name".
    assert counts["tftp.malformed"] == len(garbage) - 1, counts
    assert counts["tftp.bad_packet"] == 3, counts
    assert "tftp.error" not in counts
    assert service.rec.stage("refused")[-1]["code"] == 2


def test_a_silent_client_times_out_and_a_vanished_one_ends_its_transfer(tftp_root):
    rec = Recorder()
    with TftpService(tftp_root, "127.0.0.1", 0, record=rec, timeout=0.05, retries=2) as svc:
        c = Raw(svc.address[1])
        try:
            assert c.ask(rrq(b"s70001.bin", (b"blksize", b"1024")))[:2] == b"\0\x06"
            # says nothing more: the OACK is sent again `retries` times, then given up
            (end,) = wait_for(lambda: rec.stage("end"), what="the end event")
            assert (end["result"], end["resends"], end["bytes"]) == ("timeout", 2, 0)
            assert svc.active == 0
        finally:
            c.close()
        c = Raw(svc.address[1])
        assert c.ask(rrq(b"s70001.bin", (b"blksize", b"1024")))[:2] == b"\0\x06"
        c.close()  # its port is gone: the next resend finds ECONNREFUSED, as on the device
        ends = wait_for(lambda: len(rec.stage("end")) == 2 and rec.stage("end"), what="2 ends")
        assert ends[1]["result"] == "socket error" and svc.active == 0


def test_past_max_transfers_a_request_is_dropped_and_a_duplicate_is_not_a_second_transfer(tftp_root):
    # No ERROR for "busy": edk2 takes any TFTP ERROR as final (PXE-E23); the client asks again.
    rec = Recorder()
    with TftpService(tftp_root, "127.0.0.1", 0, record=rec, max_transfers=1) as svc:
        c, d = Raw(svc.address[1]), Raw(svc.address[1])
        try:
            req = rrq(b"s70001.bin", (b"blksize", b"1024"))
            assert c.ask(req)[:2] == b"\0\x06"
            c.sock.sendto(req, ("127.0.0.1", svc.address[1]))  # the same request again
            d.sock.settimeout(0.5)
            with pytest.raises(TimeoutError):
                d.ask(rrq(b"s1.bin"))  # nothing at all: no ERROR
            (dropped,) = wait_for(lambda: rec.stage("dropped"), what="the dropped request's event")
            assert (dropped["file"], dropped["reason"]) == ("s1.bin", "busy: every transfer slot taken")
            wait_for(lambda: svc.counters.get("tftp.duplicate_request"), what="the duplicate")
            assert svc.active == 1 and len(rec.stage("start")) == 1 and svc.counters["tftp.busy"] == 1
            assert svc.counters.get("tftp.refused", 0) == 0
        finally:
            c.close()
            d.close()


def test_a_client_silent_past_3_s_gives_its_slot_to_a_new_request(tftp_root):
    # 64 requests never answered held every slot for 20 s, and sent again, for ever; the
    # device ends the longest-silent transfer instead (its client gets ERROR 0)
    import time

    from bastion.tftpd import EVICT_AFTER_MS

    rec = Recorder()
    with TftpService(tftp_root, "127.0.0.1", 0, record=rec, max_transfers=2, timeout=5) as svc:
        hogs = [Raw(svc.address[1]) for _ in range(2)]
        late = Raw(svc.address[1])
        try:
            for h in hogs:
                assert block_of(h.ask(rrq(b"s70001.bin"))) == 1  # and never an ACK
            late.sock.settimeout(0.5)
            with pytest.raises(TimeoutError):  # both silent for less than 3 s: still theirs
                late.ask(rrq(b"s1.bin"))
            time.sleep(EVICT_AFTER_MS / 1000 + 0.2)
            late.sock.settimeout(10)
            assert block_of(late.ask(rrq(b"s1.bin"))) == 1
            first = hogs[0].recv()  # the longest silent: its first request came first
            assert first[:4] == b"\0\x05\0\0" and b"gave way" in first
            (ended,) = wait_for(lambda: rec.stage("end"), what="the evicted transfer's end")
            assert ended["result"] == "evicted" and svc.counters["tftp.evicted"] == 1
        finally:
            for c in (*hogs, late):
                c.close()


def test_stop_ends_transfers_closes_the_port_and_the_thread(tftp_root):
    rec = Recorder()
    svc = TftpService(tftp_root, "127.0.0.1", 0, record=rec).start()
    port = svc.address[1]
    c = Raw(port)
    assert c.ask(rrq(b"s70001.bin", (b"blksize", b"1024")))[:2] == b"\0\x06"
    thread = svc._thread
    svc.stop()
    c.close()
    assert not thread.is_alive()
    (end,) = rec.stage("end")
    assert end["result"] == "cancelled"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", port))  # the port is free again


def test_a_failing_event_store_does_not_stop_the_transfers(tftp_root, tmp_path):
    def broken(kind, **fields):
        raise OSError(28, "No space left on device")

    with TftpService(tftp_root, "127.0.0.1", 0, record=broken) as svc:
        r = curl_get(svc.address[1], "s70001.bin", tmp_path / "o", 1024)
        assert r.returncode == 0 and (tmp_path / "o").stat().st_size == 70001
        wait_for(lambda: svc.counters.get("tftp.ok"), what="the end of the transfer")
        assert svc.counters["tftp.record_failed"] == 2


def test_a_busy_port_is_an_error_at_start(tftp_root):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        with pytest.raises(OSError):
            TftpService(tftp_root, "127.0.0.1", s.getsockname()[1]).start()


# --- `bastion serve --tftp` -------------------------------------------------------------------


def test_serve_with_tftp_records_controller_tftp_events(site_dir, tmp_path, files):
    root = site_dir / "tftp" / "9ffefdef"
    root.mkdir(parents=True)
    (root / "start4.elf").write_bytes(files["9ffefdef/start4.elf"])
    port = free_udp_port()
    server = Server(site_dir, tmp_path / "serve.db", None, args=("--tftp", f"127.0.0.1:{port}"))
    try:
        out = tmp_path / "start4.elf"
        r = curl_get(port, "9ffefdef/start4.elf", out, 1024)
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == files["9ffefdef/start4.elf"]

        def ends():
            evs = server.get("/api/v1/events", params={"kind": "tftp"}).json()
            return [e for e in evs if e["payload"]["stage"] == "end"]

        (end,) = wait_for(ends, what="the tftp end event in the history")
        assert end["source"] == "controller"
        assert end["payload"]["file"] == "9ffefdef/start4.elf"
        assert end["payload"]["result"] == "ok" and end["payload"]["bytes"] == 300_000
    finally:
        server.stop()
    log = server.log.read_text()
    assert f"TFTP 127.0.0.1:{port}" in log and "Traceback" not in log, log
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", port))  # stopped with the controller


def test_serve_tftp_needs_the_sites_tftp_directory(site_dir, tmp_path):
    from bastion.serve_cli import serve
    from click.testing import CliRunner

    r = CliRunner().invoke(serve, ["--site", str(site_dir), "--db", str(tmp_path / "e.db"),
                                   "--tftp", "127.0.0.1:6969"])
    assert r.exit_code == 2 and "has no tftp/ directory" in r.output, r.output
    r = CliRunner().invoke(serve, ["--site", str(site_dir), "--tftp", "nope"])
    assert r.exit_code == 2 and "--tftp 'nope': expected HOST:PORT" in r.output, r.output


def test_the_app_lifespan_starts_and_stops_the_tftp_server(site_dir, tmp_path):
    from bastion.api.main import create_app
    from bastion.settings import Settings
    from fastapi.testclient import TestClient

    (site_dir / "tftp").mkdir()
    (site_dir / "tftp" / "f.bin").write_bytes(b"x" * 3000)
    port = free_udp_port()
    db = tmp_path / "events.db"
    settings = Settings.build(site_dir, db, poll_seconds=0, tftp=f"127.0.0.1:{port}")
    app = create_app(settings)
    with TestClient(app):
        assert app.state.runtime.tftp.address == ("127.0.0.1", port)
        assert curl_get(port, "f.bin", tmp_path / "o", 1024).returncode == 0
        wait_for(lambda: app.state.runtime.tftp.counters.get("tftp.ok"), what="the transfer")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", port))
    events = [e for e in EventStore(db).query(limit=10, kind="tftp")]
    assert {e.source for e in events} == {"controller"}
    assert {e.payload["stage"] for e in events} == {"start", "end"}


def test_an_ipv6_tftp_address_is_refused_in_one_line(site_dir, tmp_path):
    # it was accepted, then the IPv4-only service failed at start with a traceback
    from bastion.settings import Settings, SettingsError

    (site_dir / "tftp").mkdir(exist_ok=True)
    with pytest.raises(SettingsError, match=r"--tftp \[::1\]:16970: TFTP is served on IPv4 only"):
        Settings.build(site_dir=site_dir, tftp="[::1]:16970")


PROBE = """
import socket, sys
from pathlib import Path
from bastion.tftpd import TftpService

root, asked = Path(sys.argv[1]), sys.argv[2]
with TftpService(root, "0.0.0.0", 0) as svc:
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.bind(("10.97.0.10", 0))
    c.settimeout(10)
    c.sendto(b"\\0\\x01s1.bin\\0octet\\0", (asked, svc.address[1]))
    data, src = c.recvfrom(2048)
    print(src[0], data[:4].hex())
"""


def test_on_a_wildcard_address_replies_come_from_the_address_asked(tftp_root):
    # `--tftp :69` on a host of several addresses answered a request to 10.97.0.2 from
    # 10.97.0.1: tftpy dropped every reply ("expected host 10.97.0.2"), and edk2 filters so too
    from bastion.lab.netns import Namespace
    from netkit import need_root

    need_root("ip")
    with Namespace(f"ebtftp{os.getpid() % 100000}") as ns:
        for address in ("10.97.0.1/24", "10.97.0.2/24", "10.97.0.10/24"):
            ns.ip("addr", "add", address, "dev", "lo")
        for asked in ("10.97.0.2", "10.97.0.1"):
            r = ns.run(sys.executable, "-c", PROBE, str(tftp_root), asked, capture_output=True,
                       text=True, timeout=60)  # fmt: skip
            assert r.returncode == 0, r.stderr
            assert r.stdout.split() == [asked, "00030001"], r.stdout  # DATA block 1, from there
