"""firmware.proxydhcp: the asyncio service on loopback, under CPython and under the MicroPython
unix port (from .py source and as .mpy in a 128 KB heap). Bad packets are counted and dropped
and the listeners keep answering.

Everything here stays on 127.0.0.1: the device's server_ip is loopback, so its "broadcast"
replies go to 127.255.255.255 and it refuses unicast replies off loopback. The real broadcast
path (255.255.255.255:68 from port 67) is exercised inside a network namespace by
test_proxydhcp_dnsmasq.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from bastion.flash.sim import compile_firmware, micropython_bin
from dhcpread import file_name, siaddr, xid, yiaddr

from firmware import dhcp
from firmware.config import Config
from firmware.log import Log
from firmware.proxydhcp import MacLimit, ProxyDhcp

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data" / "dhcp"
URL = "http://127.0.0.1:8080/boot.ipxe"
CONFIG = {
    "server_ip": "127.0.0.1",
    "script_url": URL,
    "boot_files": {"0": "undionly.kpxe", "7": "ipxe.efi", "11": "snp-arm64.efi"},
}
EDK2 = (DATA / "edk2-x64-discover.bin").read_bytes()
IPXE = (DATA / "ipxe-bios-discover.bin").read_bytes()
RPI = (DATA / "rpi4-eeprom-discover.bin").read_bytes()

# Runs ProxyDhcp under either interpreter; argv: config-file listen dhcp-port pxe-port
# client-port (a file: this MicroPython build dies on an argv item of 256+ bytes, "uncaught
# NLR"). Prints JSON lines: {"ready": ...} once listening, every counter bump
# {"count": name, "n": total}, and every event.
SERVICE_SCRIPT = """
import sys
import json
import asyncio
from firmware.config import Config
from firmware.log import Log
from firmware.proxydhcp import MacLimit, ProxyDhcp


class PrintLog(Log):
    def count(self, name, n=1):
        Log.count(self, name, n)
        print(json.dumps({"count": name, "n": self.counters[name]}))


with open(sys.argv[1]) as f:
    cfg = Config(json.load(f))
log = PrintLog(capacity=8)
log.sink = print
svc = ProxyDhcp(cfg, log, sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))


async def main():
    task = asyncio.create_task(svc.run())
    await asyncio.sleep(0)
    try:
        import gc
        gc.collect()
        heap = gc.mem_alloc()
    except (ImportError, AttributeError):
        heap = 0
    print(json.dumps({"ready": len(svc.sockets) == 2, "heap": heap}))
    await task


asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def opt(code: int, value: bytes) -> bytes:
    return bytes((code, len(value))) + value


def request(
    msg=dhcp.DISCOVER, mac=b"\x52\x54\x00\x00\x00\x07", extra=b"", flags=0x8000, ciaddr=bytes(4)
):
    hdr = bytearray(240)
    hdr[0:3] = b"\x01\x01\x06"
    hdr[4:8] = os.urandom(4)
    hdr[10:12] = flags.to_bytes(2, "big")
    hdr[12:16] = ciaddr
    hdr[28:34] = mac
    hdr[236:240] = b"\x63\x82\x53\x63"
    opts = (
        opt(53, bytes((msg,))) + opt(93, b"\x00\x07") + opt(60, b"PXEClient:Arch:00007:UNDI:003000")
    )
    return bytes(hdr) + opts + extra + b"\xff"


def garbage() -> list[bytes]:
    """Datagrams that must each be counted as dhcp.malformed."""
    out = [b"", b"\x01", os.urandom(100), EDK2[:240], EDK2[:-1], b"\0" * 2000, EDK2 + bytes(1200)]
    out += [EDK2[:n] for n in range(0, len(EDK2), 37)]
    no_cookie = bytearray(EDK2)
    no_cookie[236] ^= 0xFF
    out.append(bytes(no_cookie))
    return out


class Client:
    """The test's side: a broadcast listener on the client port and a socket for port 4011."""

    def __init__(self, client_port: int = 0):
        self.bcast = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.bcast.bind(("0.0.0.0", client_port))  # receives 127.255.255.255 and 127.0.0.1
        # the port, bound before the service is told it (a port looked up free and bound later
        # was once taken in between by another socket on the machine: EADDRINUSE)
        self.port = self.bcast.getsockname()[1]
        self.bcast.settimeout(5)
        self.tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.tx.bind(("127.0.0.1", 0))
        self.tx.settimeout(5)

    def reply_to(self, raw: bytes, sock=None) -> dhcp.Packet:
        """The reply whose xid matches raw's, from the socket that waits for it."""
        sock = sock or self.bcast
        while True:
            data, _ = sock.recvfrom(2048)
            p = dhcp.parse(data)
            if xid(p) == raw[4:8]:
                return p

    def nothing_for(self, raw: bytes, wait: float = 0.3) -> bool:
        self.bcast.settimeout(wait)
        try:
            while True:
                data, _ = self.bcast.recvfrom(2048)
                if data[4:8] == raw[4:8]:
                    return False
        except TimeoutError:
            return True
        finally:
            self.bcast.settimeout(5)

    def close(self) -> None:
        self.bcast.close()
        self.tx.close()


def exchange(client: Client, dhcp_port: int, pxe_port: int) -> dict[str, dhcp.Packet]:
    """The scenario both interpreters run: garbage, then real clients on both ports."""
    for g in garbage():
        client.tx.sendto(g, ("127.0.0.1", dhcp_port))
    client.tx.sendto(b"\xff" * 300, ("127.0.0.1", pxe_port))
    got = {}
    client.tx.sendto(EDK2, ("127.0.0.1", dhcp_port))
    got["edk2"] = client.reply_to(EDK2)
    client.tx.sendto(IPXE, ("127.0.0.1", dhcp_port))
    got["ipxe"] = client.reply_to(IPXE)
    client.tx.sendto(RPI, ("127.0.0.1", dhcp_port))
    got["rpi"] = client.reply_to(RPI)
    # Unicast: an ACK to a REQUEST naming us, to ciaddr:68 (here 127.0.0.1:client port).
    ack = request(
        dhcp.REQUEST, extra=opt(54, b"\x7f\x00\x00\x01"), flags=0, ciaddr=b"\x7f\x00\x00\x01"
    )
    client.tx.sendto(ack, ("127.0.0.1", dhcp_port))
    got["ack"] = client.reply_to(ack)
    # Port 4011: back to the sender's own address and port.
    bs = request(dhcp.REQUEST, flags=0, ciaddr=b"\x7f\x00\x00\x01")
    client.tx.sendto(bs, ("127.0.0.1", pxe_port))
    got["4011"] = client.reply_to(bs, client.tx)
    # Ignored: non-PXE DHCP, and a unicast reply that would leave loopback.
    plain = bytearray(request())
    plain[plain.index(b"PXEClient")] ^= 0x20
    client.tx.sendto(bytes(plain), ("127.0.0.1", dhcp_port))
    # The REQUEST for the router's offer is the router's to answer, but its option 50 is the
    # address the node will use: an event (kind "request") ties it to the MAC.
    lease = request(dhcp.REQUEST, extra=opt(54, b"\x0a\x4d\x00\x01") + opt(50, b"\x0a\x4d\x00\x32"))
    client.tx.sendto(lease, ("127.0.0.1", dhcp_port))
    assert client.nothing_for(lease)
    off = request(
        dhcp.REQUEST, extra=opt(54, b"\x7f\x00\x00\x01"), flags=0, ciaddr=b"\x0a\x4d\x00\x32"
    )
    client.tx.sendto(off, ("127.0.0.1", dhcp_port))
    assert client.nothing_for(bytes(plain)) and client.nothing_for(off)
    # Still serving after all that.
    again = request()
    client.tx.sendto(again, ("127.0.0.1", dhcp_port))
    got["again"] = client.reply_to(again)
    return got


def check(got: dict[str, dhcp.Packet]) -> None:
    edk2 = got["edk2"]
    assert (edk2.msg_type, file_name(edk2), yiaddr(edk2)) == (dhcp.OFFER, b"ipxe.efi", bytes(4))
    assert siaddr(edk2) == b"\x7f\x00\x00\x01" and edk2.guid == bytes(17)
    assert file_name(got["ipxe"]) == URL.encode()
    rpi = got["rpi"]
    assert file_name(rpi) == b"" and b"Raspberry Pi Boot" in rpi.vendor_opts
    assert got["ack"].msg_type == dhcp.ACK and got["ack"].ciaddr == b"\x7f\x00\x00\x01"
    assert got["4011"].msg_type == dhcp.ACK and file_name(got["4011"]) == b"ipxe.efi"
    assert file_name(got["again"]) == b"ipxe.efi"


EXPECTED_COUNTS = {
    "dhcp.malformed": len(garbage()) + 1,
    "dhcp.offer": 4,
    "dhcp.ack": 2,
    "dhcp.not_pxe": 1,
    "dhcp.not_loopback": 1,
    "dhcp.not_for_us": 1,
}


def check_events(events: list[dict]) -> None:
    """The dhcp events' `client`: the address the packet told, else None."""
    dhcp_events = [e for e in events if e["ev"] == "dhcp"]
    by_kind = {}
    for e in dhcp_events:
        by_kind.setdefault((e["kind"], e["port"]), []).append(e["client"])
    assert by_kind[("request", 67)] == ["10.77.0.50"]
    assert by_kind[("ack", 4011)] == ["127.0.0.1"]  # the sender of a port-4011 request
    assert by_kind[("ack", 67)] == ["127.0.0.1"]  # its ciaddr
    assert set(by_kind[("offer", 67)]) == {None}  # a DISCOVER tells no address


def test_service_under_cpython():
    async def scenario():
        log = Log(capacity=16)
        client = Client()
        dport, pport, cport = free_port(), free_port(), client.port
        svc = ProxyDhcp(Config(CONFIG), log, "127.0.0.1", dport, pport, cport)
        assert svc.broadcast_ip == "127.255.255.255"
        task = asyncio.create_task(svc.run())
        await asyncio.sleep(0)
        assert len(svc.sockets) == 2
        try:
            got = await asyncio.to_thread(exchange, client, dport, pport)
        finally:
            client.close()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        return got, log

    got, log = asyncio.run(scenario())
    check(got)
    for name, n in EXPECTED_COUNTS.items():
        assert log.counters.get(name) == n, (name, log.counters)
    assert "dhcp.error" not in log.counters
    offers = [e for e in log.recent() if e["ev"] == "dhcp" and e["kind"] == "offer"]
    assert offers[0] == {**offers[0], "mac": "52:54:00:12:34:07", "arch": 7, "file": "ipxe.efi"}
    assert any(e["ipxe"] and e["file"] == URL for e in offers)
    assert any(e["rpi"] and e["file"] == "rpi" for e in offers)
    assert json.dumps(log.recent())  # events are plain JSON values
    check_events(log.recent())


def test_a_bug_on_one_packet_does_not_stop_the_listener():
    async def scenario():
        log = Log()
        client = Client()
        dport, pport, cport = free_port(), free_port(), client.port
        svc = ProxyDhcp(Config(CONFIG), log, "127.0.0.1", dport, pport, cport)
        real = svc.policy.answer
        calls = []

        def flaky(pkt, port):
            calls.append(pkt)
            if len(calls) == 1:
                raise RuntimeError("boom")
            return real(pkt, port)

        svc.policy.answer = flaky
        task = asyncio.create_task(svc.run())
        await asyncio.sleep(0)
        try:

            def talk():
                client.tx.sendto(EDK2, ("127.0.0.1", dport))
                assert client.nothing_for(EDK2)
                client.tx.sendto(EDK2, ("127.0.0.1", dport))
                return client.reply_to(EDK2)

            reply = await asyncio.to_thread(talk)
        finally:
            client.close()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        return reply, log

    reply, log = asyncio.run(scenario())
    assert file_name(reply) == b"ipxe.efi"
    assert log.counters["dhcp.error"] == 1 and log.counters["dhcp.offer"] == 1


def test_a_busy_port_is_an_error_from_run():
    async def scenario():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
            busy.bind(("127.0.0.1", 0))
            port = busy.getsockname()[1]
            svc = ProxyDhcp(Config(CONFIG), Log(), "127.0.0.1", free_port(), port, free_port())
            with pytest.raises(OSError):
                await svc.run()
            assert svc.sockets == ()

    asyncio.run(scenario())


class MpyService:
    """ProxyDhcp under the MicroPython unix port, stopped by its PID."""

    def __init__(self, tmp: Path, heap: str, mpy: bool):
        self.ports = {"dhcp": free_port(), "pxe": free_port(), "client": free_port()}
        script = tmp / "svc.py"
        script.write_text(SERVICE_SCRIPT)
        (tmp / "device.json").write_text(json.dumps(CONFIG))
        if mpy:
            compile_firmware(tmp / "lib" / "firmware")
            path = f"{tmp / 'lib'}:.frozen"
        else:
            path = f"{REPO}:.frozen"
        cmd = [micropython_bin(), "-X", f"heapsize={heap}", str(script), "device.json", "127.0.0.1"]
        cmd += [str(self.ports[k]) for k in ("dhcp", "pxe", "client")]
        self.proc = subprocess.Popen(
            cmd,
            cwd=tmp,
            env=dict(os.environ, MICROPYPATH=path),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue = queue.Queue()
        self.counts: dict[str, int] = {}
        self.out: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.ready = self._wait("ready")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.out.append(line)
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if "count" in d:
                self.counts[d["count"]] = d["n"]
            self.lines.put(d)

    def _wait(self, key: str) -> dict:
        while True:
            try:
                d = self.lines.get(timeout=20)
            except queue.Empty:
                raise AssertionError("micropython said nothing:\n" + "".join(self.out)) from None
            if key in d:
                return d

    def settle(self, name: str, n: int) -> None:
        """Wait until counter `name` reaches n (the service has handled what we sent)."""
        while self.counts.get(name, 0) < n:
            self._wait("count")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.mark.parametrize(
    "heap,mpy", [("512k", False), ("128k", True)], ids=["py-source-512k", "mpy-128k"]
)
def test_service_under_micropython(tmp_path, heap, mpy):
    svc = MpyService(tmp_path, heap, mpy)
    client = None
    try:
        assert svc.ready["ready"] is True, "".join(svc.out)
        client = Client(svc.ports["client"])
        got = exchange(client, svc.ports["dhcp"], svc.ports["pxe"])
        svc.settle("dhcp.offer", EXPECTED_COUNTS["dhcp.offer"])
        assert svc.proc.poll() is None, "".join(svc.out)
    finally:
        if client:
            client.close()
        svc.stop()
    check(got)
    for name, n in EXPECTED_COUNTS.items():
        assert svc.counts.get(name) == n, (name, svc.counts, "".join(svc.out[-20:]))
    assert "dhcp.error" not in svc.counts, "".join(svc.out)
    events = [json.loads(x) for x in svc.out if x.startswith("{") and '"ev"' in x]
    assert {e["kind"] for e in events if e["ev"] == "dhcp"} == {"offer", "ack", "request"}
    check_events(events)


def _serving(scenario_fn):
    """Run scenario_fn(client, dhcp_port) against a ProxyDhcp on loopback; (result, log)."""

    async def scenario():
        log = Log(capacity=64)
        client = Client()
        dport, pport, cport = free_port(), free_port(), client.port
        svc = ProxyDhcp(Config(CONFIG), log, "127.0.0.1", dport, pport, cport)
        task = asyncio.create_task(svc.run())
        await asyncio.sleep(0)
        try:
            return await asyncio.to_thread(scenario_fn, client, dport), log
        finally:
            client.close()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    return asyncio.run(scenario())


def test_relayed_requests_are_answered_to_their_own_relay_each_time():
    # The reply goes to giaddr:67 with the broadcast flag; the address of the last relay is
    # kept (not made again for every reply): two relays in turns each get their own replies.
    relays = {}

    def talk(client, port):
        for ip in ("127.0.0.2", "127.0.0.3"):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((ip, port))
            s.settimeout(5)  # a guard against a hang
            relays[ip] = s
        try:
            got = []
            for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.3", "127.0.0.2"):
                raw = bytearray(request(flags=0))
                raw[24:28] = socket.inet_aton(ip)
                client.tx.sendto(bytes(raw), ("127.0.0.1", port))
                reply = dhcp.parse(relays[ip].recv(2048))
                got.append((ip, xid(reply) == bytes(raw[4:8]), reply.flags, reply.giaddr))
            return got
        finally:
            for s in relays.values():
                s.close()

    got, log = _serving(talk)
    assert got == [(ip, True, 0x8000, socket.inet_aton(ip))
                   for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.3", "127.0.0.2")]  # fmt: skip
    assert log.counters.get("dhcp.offer") == 4


def test_a_flooding_mac_is_held_to_its_rate_and_the_others_are_answered():
    flooder, other = b"\x52\x54\x00\xff\x00\x01", b"\x52\x54\x00\x00\x00\x02"

    def talk(client, port):
        for _ in range(60):
            client.tx.sendto(request(mac=flooder), ("127.0.0.1", port))
        mine = request(mac=other)
        client.tx.sendto(mine, ("127.0.0.1", port))
        return client.reply_to(mine)

    reply, log = _serving(talk)
    assert reply.mac == b"\x52\x54\x00\x00\x00\x02"
    answered = log.counters["dhcp.offer"]
    # The flooder got its burst (MacLimit.capacity), and a little more as time passed.
    assert MacLimit.capacity < answered < 30 and log.counters["dhcp.mac_limited"] > 30
    assert answered + log.counters["dhcp.mac_limited"] == 61


def test_made_up_macs_are_each_answered():
    def talk(client, port):
        last = None
        for i in range(40):
            last = request(mac=b"\x52\x54\x00\x10\x00" + bytes((i,)))
            client.tx.sendto(last, ("127.0.0.1", port))
        return client.reply_to(last)

    _, log = _serving(talk)
    assert log.counters["dhcp.offer"] == 40 and "dhcp.mac_limited" not in log.counters


def test_answer_events_under_a_flood_are_few_and_say_how_many_were_held_back():
    def talk(client, port):
        for i in range(60):
            client.tx.sendto(request(mac=b"\x52\x54\x00\x20\x00" + bytes((i,))),
                             ("127.0.0.1", port))
        last = request(mac=b"\x52\x54\x00\x20\x01\x00")
        client.tx.sendto(last, ("127.0.0.1", port))
        client.reply_to(last)
        time.sleep(0.3)  # the budget has credit again
        late = request(mac=b"\x52\x54\x00\x20\x01\x01")
        client.tx.sendto(late, ("127.0.0.1", port))
        return client.reply_to(late)

    _, log = _serving(talk)
    events = [e for e in log.recent() if e["ev"] == "dhcp"]
    held = log.counters["dhcp.events_suppressed"]
    assert log.counters["dhcp.offer"] == 62  # every DISCOVER answered
    assert len(events) + held == 62 and held > 30
    assert events[-1]["mac"] == "52:54:00:20:01:01" and events[-1]["suppressed"] == held


def test_mac_limit_remembers_the_macs_heard_from_latest():
    limit = MacLimit()
    for i in range(limit.size + 5):  # more MACs than the table holds: each gets its burst
        pkt = request(mac=b"\x52\x54\x00\x30\x00" + bytes((i,)))
        for _ in range(limit.capacity):
            assert limit.check(pkt, 0)
            limit.take()
    pkt = request(mac=b"\x52\x54\x00\x30\x00" + bytes((limit.size + 4,)))
    assert not limit.check(pkt, 0)  # the newest is still remembered and out of credit
    assert limit.check(pkt, limit.interval_ms)  # one interval later: one more
    assert limit.check(b"\x02" + bytes(300), 0)  # not a request: the parser decides
