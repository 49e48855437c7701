# The proxyDHCP service: two UDP listeners, DHCP (67) and the PXE boot-server port (4011),
# around the pure policy in pxe.py and the codec in dhcp.py. Sockets only through net.py.
#
# Bounds: each datagram is read with recvfrom(max_packet + 1), so a longer one is seen as
# over-long and counted as dhcp.malformed; one reply buffer, sized for the longest reply the
# config can produce, serves both listeners (a reply is built and sent with no await between).
# Every per-packet outcome is a counter (log.count) and the loop goes on; answers, and
# declared clients we cannot boot, are also events (log.event "dhcp"). A listener ends only
# when its socket fails: the error is counted and raised out of run() for the supervisor.
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
from firmware.compat import const, sleep_ms, ticks_ms

_EV_KEYS = ("mac", "arch", "kind", "file", "ipxe", "rpi", "port", "client")
_ZERO = b"\0\0\0\0"
_SMALL_READ = const(577)  # RFC 2131 minimum message size, +1 to see a longer one


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
        self.listen_ip = listen_ip  # 0.0.0.0 on a board: broadcast DISCOVERs must arrive
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
        self._buf = bytearray(max(self.policy.max_reply, dhcp.MIN_REPLY))
        self._bcast = None
        self.sockets = ()  # (dhcp socket, pxe socket) while run() is serving
        self.stalled_since = None  # ticks of the first of a run of MemoryErrors, or None

    async def run(self):
        """Serve both listeners until a socket fails (raised) or the task is cancelled."""
        s_dhcp = net.udp_socket(self.listen_ip, self.dhcp_port, broadcast=True)
        try:
            s_pxe = net.udp_socket(self.listen_ip, self.pxe_port)
        except OSError:
            s_dhcp.close()
            raise
        self._bcast = net.addr(self.broadcast_ip, self.client_port)
        self.sockets = (s_dhcp, s_pxe)
        try:
            await asyncio.gather(
                self._serve(s_dhcp, pxe.DHCP_PORT), self._serve(s_pxe, pxe.PXE_PORT)
            )
        finally:
            self.sockets = ()
            s_dhcp.close()
            s_pxe.close()

    async def _serve(self, sock, port):
        full = self.max_packet + 1
        n = full
        while True:
            try:
                data, src = await net.recvfrom(sock, n)
            except OSError:
                self.log.count("dhcp.socket_error")
                raise
            except MemoryError:
                # A full or fragmented heap loses this datagram, not the listener. The next
                # read asks for less: RFC 2131's 576 bytes hold every PXE request seen so far
                # (a longer one is then dropped as malformed) and need no 1.5 KB run of heap.
                self.log.count("dhcp.no_memory")
                if self.stalled_since is None:
                    self.stalled_since = ticks_ms()
                n = _SMALL_READ
                gc.collect()
                await sleep_ms(20)
                continue
            self.stalled_since = None
            if n != full and len(data) >= n:  # cut short by the small read: not trustworthy
                self.log.count("dhcp.truncated")
                data = src = None
                n = full
                continue
            n = full
            try:
                self.handle(sock, port, data, src)
            except Exception:  # a bug must not take the listener down; count it instead
                self.log.count("dhcp.error")
            data = src = None

    def handle(self, sock, port, data, src):
        """One datagram from src on the listener for `port` (pxe.DHCP_PORT or pxe.PXE_PORT)."""
        log = self.log
        log.count("dhcp.rx")
        try:
            pkt = dhcp.parse(data)
        except dhcp.Malformed:
            log.count("dhcp.malformed")
            return
        policy = self.policy
        r = policy.answer(pkt, port)
        if r is None:
            why = policy.why
            log.count(why)
            if why == "dhcp.no_boot_file" or why == "dhcp.rpi_disabled":
                # A PXE client we were told to serve but cannot boot: worth telling the user.
                log.event(
                    "dhcp",
                    _EV_KEYS,
                    (_mac(pkt.mac), pxe.client_arch(pkt), why[5:], None, False, False, port,
                     None),
                )
            elif why == "dhcp.not_for_us" and pkt.requested_ip is not None and (
                policy.allowed_macs is None or pkt.mac in policy.allowed_macs
            ):
                # A declared PXE client asking the router for its address: the one packet that
                # ties its MAC to the address its TFTP and HTTP requests will come from.
                log.event(
                    "dhcp",
                    _EV_KEYS,
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
            to = net.addr(
                net.ip_str(r.to_ip),
                self.client_port if r.to_port == pxe.CLIENT_PORT else self.dhcp_port,
            )
        if not net.send(sock, self._buf, n, to):
            log.count("dhcp.send_failed")
            return
        log.count("dhcp.offer" if r.msg_type == dhcp.OFFER else "dhcp.ack")
        if port == pxe.PXE_PORT:
            client = net.ip_str(net.addr_ip4(src))
        elif pkt.ciaddr != _ZERO:
            client = net.ip_str(pkt.ciaddr)
        else:
            client = None
        log.event(
            "dhcp",
            _EV_KEYS,
            (_mac(pkt.mac), pxe.client_arch(pkt), r.kind, boot.label, r.ipxe, r.rpi, port,
             client),
        )


def _mac(b):
    return hexlify(b, ":").decode()
