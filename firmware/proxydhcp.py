# The proxyDHCP service: two UDP listeners, DHCP (67) and the PXE boot-server port (4011),
# around the pure policy in pxe.py and the codec in dhcp.py. Sockets only through net.py.
#
# Bounds: each datagram is read with recvfrom(max_packet + 1), so a longer one is seen as
# over-long and counted as dhcp.malformed; one reply buffer, sized for the longest reply the
# config can produce, serves both listeners (a reply is built and sent with no await between).
# Every per-packet outcome is a counter (log.count) and the loop goes on; answers, and
# declared clients we cannot boot, are also events (log.event "dhcp"). A listener ends only
# when its socket fails: the error is counted and run() ends, for the supervisor to see.
#
# Under a flood (docs/device.md, "Hostile hosts"): dhcp events pass a Budget (a few a second,
# the rest counted), so the serial line never sets the pace of the answers; and a MacLimit
# drops a MAC's datagrams beyond its own small rate before they are parsed, so one flooding
# MAC costs little and leaves the other clients answered.
#
# An event's `client` is the node's address when the packet tells it (None otherwise): the
# source of a port-4011 request, a ciaddr, or the address a declared PXE client asks the
# router for (option 50 of its DHCPREQUEST, which is not ours to answer: kind "request").
# Later requests by address alone (TFTP, assets) are tied to the MAC through it; the address
# is made into text only for these few packets per boot, never for the others.
import gc

import asyncio

try:
    from binascii import hexlify
except ImportError:  # MicroPython ports without binascii under that name
    from ubinascii import hexlify

from firmware import dhcp, net, pxe
from firmware.compat import const, sleep_ms, ticks_diff, ticks_ms
from firmware.log import Budget

_SMALL_READ = const(577)  # RFC 2131 minimum message size, +1 to see a longer one
_SMALL_MS = const(2000)  # how long reads stay small after a MemoryError


class MacLimit:
    """A token bucket per client MAC, in a table allocated once.

    size         MACs remembered; a MAC not in the table takes the place of the one heard
                 from longest ago (a flood of made-up MACs only churns the table, and each
                 of them is answered).
    interval_ms  one request per interval_ms on average per MAC, `capacity` at once (a PXE
                 client sends a handful per boot). A MAC beyond that has its datagrams
                 dropped unparsed, counted as dhcp.mac_limited. Only requests that parse
                 use up credit (take()), so garbage carrying a MAC cannot use up that MAC's.
    """

    size = 16
    interval_ms = 250
    capacity = 8

    def __init__(self):
        n = self.size
        self.hi = [-1] * n  # each MAC as two 24-bit halves: small ints on every port
        self.lo = [-1] * n
        self._free = [0] * n  # credit, in ms of interval
        self.since = [0] * n  # ticks of its last datagram
        self.last = -1  # the entry check() looked at, -1: none

    def check(self, data, now):
        """May this datagram be parsed? False: its MAC is over its rate."""
        i = self.last
        self.last = -1
        if len(data) < 34 or data[0] != 1:  # not a request: the parser says what it is
            return True
        hi = data[28] << 16 | data[29] << 8 | data[30]  # chaddr (RFC 2131)
        lo = data[31] << 16 | data[32] << 8 | data[33]
        full = self.capacity * self.interval_ms
        if i < 0 or self.hi[i] != hi or self.lo[i] != lo:  # a flood finds itself at once
            old = 0
            since = self.since
            for i in range(self.size):
                if self.hi[i] == hi and self.lo[i] == lo:
                    break
                if ticks_diff(since[old], since[i]) > 0:
                    old = i
            else:
                i = old
                self.hi[i] = hi
                self.lo[i] = lo
                self._free[i] = full
                since[i] = now
        dt = min(max(ticks_diff(now, self.since[i]), 0), full)
        self.since[i] = now
        self._free[i] = min(full, self._free[i] + dt)
        self.last = i
        return self._free[i] >= self.interval_ms

    def take(self):
        """One request (it parsed) of the MAC check() looked at last."""
        i = self.last
        if i >= 0 and self._free[i] >= self.interval_ms:
            self._free[i] -= self.interval_ms


class ProxyDhcp:
    def __init__(
        self,
        cfg,
        log,
        listen_ip="0.0.0.0",
        dhcp_port=67,
        pxe_port=4011,
        client_port=68,
        broadcast_ip=None,
    ):
        self.policy = pxe.Policy(cfg)
        self.log = log
        # 0.0.0.0 on a board: broadcast DISCOVERs must arrive. The sim board's may be
        # ADDR/INTERFACE (no interface's name holds a '/'; '%', ss's notation, would cost
        # an interned name, firmware/main.py): DHCP on the wildcard address of that
        # interface alone (broadcasts reach no other socket), PXE on ADDR (run()).
        self.listen_ip = listen_ip
        self.dhcp_port = dhcp_port
        self.pxe_port = pxe_port
        self.client_port = client_port  # where broadcast and ciaddr replies go (68)
        # Where "broadcast" replies go: 255.255.255.255, except for a device whose own address
        # is on loopback (the sim board in tests), whose LAN is loopback: its broadcasts must
        # never leave the host, and neither may its unicast replies (dhcp.not_loopback).
        self._loopback = cfg.server_ip[0] == 127 or listen_ip.startswith("127.")
        if broadcast_ip is None:
            broadcast_ip = "127.255.255.255" if self._loopback else "255.255.255.255"
        self.broadcast_ip = broadcast_ip
        self.max_packet = dhcp.MAX_LEN  # longest datagram read; longer: dhcp.malformed
        self.macs = MacLimit()
        self.events = Budget(log, "dhcp")  # dhcp events: a few a second, the rest counted
        self._buf = bytearray(max(self.policy.max_reply, dhcp.MIN_REPLY))
        # A run of heap kept free for the small read (see _serve): a heap in pieces may have
        # no other one, and then DISCOVERs could not even be read.
        self._free = bytearray(_SMALL_READ)
        self._bcast = None
        # (ip, port, socket address) of the last reply sent to one address: a relay's (giaddr)
        # is the same for every request it relays, and making it again (a dotted string and
        # getaddrinfo) cost 576 B of heap a reply on the unix port
        self._unicast = None
        self.sockets = ()  # (dhcp socket, pxe socket) while run() is serving
        self.stalled_since = None  # ticks: a listener stalled by the heap since then (net.waitless)

    async def run(self):
        """Serve both listeners until a socket fails (raised) or the task is cancelled."""
        ip = self.listen_ip
        i = ip.find("/")
        if i < 0:
            s_dhcp = net.udp_socket(ip, self.dhcp_port, True)
        else:
            s_dhcp = net.udp_socket("0.0.0.0", self.dhcp_port, ip[i + 1 :].encode())
            ip = ip[:i]
        try:
            s_pxe = net.udp_socket(ip, self.pxe_port)
        except OSError:
            s_dhcp.close()
            raise
        self._bcast = net.addr(self.broadcast_ip, self.client_port)
        self.sockets = (s_dhcp, s_pxe)
        # The PXE listener in a task of its own that cancels this one if it fails, so run()
        # ends when either listener does. Not asyncio.gather: on MicroPython its first call
        # loads asyncio.funcs (1.1 KB), here in the running listener, after boot measured the
        # heap, and interns one more name (firmware/main.py, "Interned names"): on a tight heap
        # that failed and this listener died at boot.
        other = asyncio.create_task(self._serve_then_cancel(s_pxe, asyncio.current_task()))
        try:
            await self._serve(s_dhcp, pxe.DHCP_PORT)
        finally:
            other.cancel()
            self.sockets = ()
            s_dhcp.close()
            s_pxe.close()

    async def _serve_then_cancel(self, sock, task):
        try:
            await self._serve(sock, pxe.PXE_PORT)
        finally:
            task.cancel()

    async def _serve(self, sock, port):
        full = self.max_packet + 1
        unwaited = None  # the first wait that could not start since the last wake-up
        small = None  # ticks of the last MemoryError: reads stay small for _SMALL_MS after it
        while True:
            n = full
            if small is not None:
                if ticks_diff(ticks_ms(), small) < _SMALL_MS:
                    n = _SMALL_READ
                else:
                    small = None
            try:
                got = await net.recvfrom(sock, n)
            except OSError:
                self.log.count("dhcp.socket_error")
                raise
            except MemoryError:  # before the wait: nothing is known to be waiting
                got = None
                unwaited = net.waitless(self, unwaited, ticks_ms())
            else:
                unwaited = None
                if got is None and self.stalled_since is None:  # woken; no heap to take it
                    self.stalled_since = ticks_ms()
            if got is None:
                # A full or fragmented heap costs this read, not the listener (the datagram
                # waits in the socket). The reads ask for less for a while: RFC 2131's 576
                # bytes hold every PXE request seen so far (a longer one is then dropped as
                # truncated) and need no 1.5 KB run of heap, so a heap in pieces does not
                # cost a collection per datagram. Already reported events are shed.
                self.log.count("dhcp.no_memory")
                self.log.shed()
                if n == _SMALL_READ:
                    self._free = None  # freed by the collection: the next read fits there
                small = ticks_ms()
                gc.collect()
                await sleep_ms(1)
                continue
            self.stalled_since = None
            data, src = got
            got = None
            if self._free is None:  # take the run back, for the next time
                try:
                    self._free = bytearray(_SMALL_READ)
                except MemoryError:
                    pass
            if n != full and len(data) >= n:  # cut short by the small read: not trustworthy
                self.log.count("dhcp.truncated")
                data = src = None
                continue
            try:
                self.handle(sock, port, data, src)
            except MemoryError:  # this datagram is lost, not the listener
                self.log.count("dhcp.no_memory")
                self.log.shed()
            except Exception:  # a bug must not take the listener down; count it instead
                self.log.count("dhcp.error")
            data = src = None

    def handle(self, sock, port, data, src):
        """One datagram from src on the listener for `port` (pxe.DHCP_PORT or pxe.PXE_PORT)."""
        log = self.log
        log.count("dhcp.rx")
        macs = self.macs
        if not macs.check(data, ticks_ms()):
            log.count("dhcp.mac_limited")
            return
        try:
            pkt = dhcp.parse(data)
        except dhcp.Malformed:
            log.count("dhcp.malformed")
            return
        macs.take()
        policy = self.policy
        r = policy.answer(pkt, port)
        if r is None:
            why = policy.why
            log.count(why)
            if (why == "dhcp.no_boot_file" or why == "dhcp.rpi_disabled") and self.events.take():
                # A PXE client we were told to serve but cannot boot: worth telling the user.
                self.events.event(
                    "dhcp",
                    ("mac", "arch", "kind", "file", "ipxe", "rpi", "port", "client"),
                    (_mac(pkt.mac), pxe.client_arch(pkt), why[5:], None, False, False, port,
                     None),
                )
            elif why == "dhcp.not_for_us" and pkt.requested_ip is not None and (
                policy.allowed_macs is None or pkt.mac in policy.allowed_macs
            ) and self.events.take():
                # A declared PXE client asking the router for its address: the one packet that
                # ties its MAC to the address its TFTP and HTTP requests will come from.
                self.events.event(
                    "dhcp",
                    ("mac", "arch", "kind", "file", "ipxe", "rpi", "port", "client"),
                    (_mac(pkt.mac), pxe.client_arch(pkt), "request", None, False, False, port,
                     net.ip_str(pkt.requested_ip)),
                )
            return
        boot = r.boot
        n = dhcp.build_into(self._buf, pkt, r.msg_type, boot.siaddr, boot.file, boot.opts, pkt.guid)
        if r.to_ip is None:
            to = src
        elif r.to_port == pxe.CLIENT_PORT and r.to_ip == b"\xff\xff\xff\xff":
            to = self._bcast
        elif self._loopback and r.to_ip[0] != 127:
            log.count("dhcp.not_loopback")
            return
        else:
            to_port = self.client_port if r.to_port == pxe.CLIENT_PORT else self.dhcp_port
            last = self._unicast
            if last is not None and last[1] == to_port and last[0] == r.to_ip:
                to = last[2]
            else:
                to = net.addr(net.ip_str(r.to_ip), to_port)
                self._unicast = (r.to_ip, to_port, to)
        if not net.send(sock, self._buf, n, to, log, "dhcp"):
            return
        log.count("dhcp.offer" if r.msg_type == dhcp.OFFER else "dhcp.ack")
        if self.events.take():
            if port == pxe.PXE_PORT:
                client = net.ip_str(net.addr_ip4(src))
            elif pkt.ciaddr != b"\0\0\0\0":
                client = net.ip_str(pkt.ciaddr)
            else:
                client = None
            self.events.event(
                "dhcp",
                ("mac", "arch", "kind", "file", "ipxe", "rpi", "port", "client"),
                (_mac(pkt.mac), pxe.client_arch(pkt), r.kind, boot.label, r.ipxe, r.rpi, port,
                 client),
            )


def _mac(b):
    return hexlify(b, ":").decode()
