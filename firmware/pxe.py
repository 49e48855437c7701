"""proxyDHCP policy: which PXE clients get which boot answer. Pure: no sockets, no clock.

Theory of operation
-------------------
The site's router hands out addresses; this device only tells PXE clients what to boot
(a "proxyDHCP" server, PXE 2.1 spec). Every request goes through `Policy.answer(pkt, port)`,
where `port` is the role of the socket it arrived on: DHCP_PORT (67, broadcast DHCP) or
PXE_PORT (4011, the PXE boot-server port). The answer is a `Reply` (what to send and where)
or None, with the name of the counter to bump left in `policy.why`.

Who is answered, in order (the first failing rule names the counter):
1. A BOOTREQUEST from an Ethernet client (htype 1, hlen 6)        else dhcp.not_ethernet
2. whose vendor class (option 60) starts with "PXEClient"          else dhcp.not_pxe
   (ordinary DHCP clients belong to the router alone).
3. Port 67: DISCOVER gets an OFFER; a REQUEST gets an ACK only when its server id (54) is ours
   (RFC 2131 4.3.2: a REQUEST naming another server, or none, is the router's business; an ACK
   from us with no address could confuse a client in INIT-REBOOT or RENEWING).
   Port 4011: a REQUEST gets an ACK, unicast back to the sender's address and port: this is
   where edk2 (for an offer without PXE options), iPXE and other PXE clients ask the boot server
   directly, see `boot_server_ack`.                                else dhcp.other_type,
                                                                        dhcp.not_for_us
4. When cfg.allowed_macs is set, only those MACs.                  else dhcp.mac_not_allowed
5. What to boot:
   - iPXE (user class "iPXE" or option 175 present) gets cfg.script_url as its boot file: the
     controller's script over HTTP. Handing iPXE a binary again would loop forever.
   - A Raspberry Pi bootloader (EEPROM network boot: arch 0 like a BIOS PC, recognised by its
     option 97 GUID starting with the fourcc "RPi4"/"RPi5", or by a Raspberry Pi MAC prefix)
     gets the PXE menu its bootloader looks for in option 43 (cfg.rpi_menu, "Raspberry Pi
     Boot") and next-server = cfg.rpi_next_server or cfg.next_server, never an x86 binary.
     With cfg.rpi_boot off it gets nothing.                        else dhcp.rpi_disabled
   - Anything else gets cfg.boot_files[arch] (option 93; missing 93 reads the arch from a
     "PXEClient:Arch:NNNNN" vendor class, else 0); no file for the arch, no answer.
                                                                   else dhcp.no_boot_file
What an answer carries: yiaddr 0.0.0.0 (never an address), siaddr = next-server, option 54 =
cfg.server_ip, option 60 "PXEClient", option 97 echoed when the client sent one, the boot file
in the header's file field (option 67 when over 127 bytes), and option 43 with PXE discovery
control 8 ("take the boot file from this offer": no menu, prompt or boot-server discovery;
edk2 honours this since 2013, PxeBcSelectBootPrompt) plus a zero-timeout prompt, as dnsmasq
sends it. The Pi answer's option 43 is byte for byte what dnsmasq sends for
`pxe-service=0,"Raspberry Pi Boot"`, plus option 66 (TFTP server) as a dotted quad.

Where replies go (RFC 2131 4.1): port 67 requests relayed by an agent (giaddr set) go to
giaddr:67; otherwise to ciaddr:68 when the client has an address (ciaddr), whatever its
broadcast flag; else to 255.255.255.255:68 (a proxy has no yiaddr to unicast to, so a client
without the flag is answered by broadcast too). Port 4011 replies go back to the requester's
address and port.

All byte strings of an answer except the GUID echo are computed once, when the Policy is made
from the config, so answering a packet builds no strings.
"""

from firmware import dhcp
from firmware.compat import const

DHCP_PORT = const(67)
CLIENT_PORT = const(68)
PXE_PORT = const(4011)

_ETHERNET = const(1)
_PXE_CLIENT = b"PXEClient"
_ANY = b"\0\0\0\0"
_RPI_FOURCC = (b"RPi4", b"RPi5")  # bootloader DHCP_OPTION97 default: 0x34695052 little endian
# The IEEE's MA-L blocks (OUIs) of the Raspberry Pi Foundation and Raspberry Pi (Trading)
# Ltd, three bytes each, in one bytes object: a tuple of six costs the heap 240 B more
_RPI_OUIS = b"\xb8\x27\xeb\xdc\xa6\x32\xe4\x5f\x01\x28\xcd\xc1\xd8\x3a\xdd\x2c\xcf\x67"

# PXE 2.1 vendor sub-options (option 43).
_PXE_DISCOVERY_CONTROL = const(6)
_PXE_BOOT_MENU = const(9)
_PXE_MENU_PROMPT = const(10)
_PXE_END = b"\xff"
# Bits of discovery control: 1 no broadcast discovery, 2 no multicast discovery,
# 8 boot from the file in this offer without prompt, menu or discovery.
_PXE_PROMPT = b"\x00PXE"  # timeout 0: no wait; the text dnsmasq sends


class Boot:
    """A precomputed answer for one kind of client: what goes in the reply but the GUID."""

    def __init__(self, label, siaddr, file, opts):
        self.label = label  # str for events: the boot file, or "rpi"
        self.siaddr = siaddr  # 4 bytes
        self.file = file  # bytes for the header's file field
        self.opts = opts  # pre-encoded options


class Reply:
    """What to send: build it with dhcp.build_into(buf, pkt, msg_type, boot.siaddr, boot.file,
    boot.opts, pkt.guid) and send it to (to_ip, to_port); to_ip None means back to the
    sender's address and port."""

    def __init__(self, msg_type, boot, to_ip, to_port, ipxe, rpi):
        self.msg_type = msg_type
        self.boot = boot
        self.to_ip = to_ip
        self.to_port = to_port
        self.ipxe = ipxe
        self.rpi = rpi
        self.kind = "offer" if msg_type == dhcp.OFFER else "ack"


def _pc_vendor_opts():
    return dhcp.option(
        43,
        dhcp.option(_PXE_DISCOVERY_CONTROL, b"\x08")
        + dhcp.option(_PXE_MENU_PROMPT, _PXE_PROMPT)
        + _PXE_END,
    )


def rpi_vendor_opts(menu):
    """Option 43 for a Raspberry Pi bootloader: discovery control 3 (no broadcast or multicast
    discovery), prompt, and a one-entry boot menu (type 0) whose text the bootloader matches."""
    if isinstance(menu, str):
        menu = menu.encode()
    return dhcp.option(
        43,
        dhcp.option(_PXE_DISCOVERY_CONTROL, b"\x03")
        + dhcp.option(_PXE_MENU_PROMPT, _PXE_PROMPT)
        + dhcp.option(_PXE_BOOT_MENU, b"\0\0" + bytes((len(menu),)) + menu)
        + _PXE_END,
    )


def _dotted(ip):
    return ("%d.%d.%d.%d" % (ip[0], ip[1], ip[2], ip[3])).encode()


def _pc_boot(label, siaddr, name, common):
    """A boot file in the header's file field when it fits, else in option 67."""
    name = name.encode()
    if len(name) <= 127:
        return Boot(label, siaddr, name, common)
    return Boot(label, siaddr, b"", common + dhcp.option(67, name))


def is_ipxe(pkt):
    return pkt.ipxe_opts is not None or dhcp.has_user_class(pkt.user_class, b"iPXE")


def client_arch(pkt):
    """Option 93, else the arch digits of a "PXEClient:Arch:NNNNN" vendor class, else 0."""
    if pkt.arch is not None:
        return pkt.arch
    vc = pkt.vendor_class
    if vc is not None and len(vc) >= 20 and vc[:15] == b"PXEClient:Arch:":
        try:
            return int(vc[15:20])
        except ValueError:
            pass
    return 0


def is_rpi_bootloader(pkt, arch):
    """A Raspberry Pi's own network bootloader: arch 0 plus its GUID fourcc or MAC prefix.
    A Pi running UEFI firmware reports arch 11 and is an ordinary arm64 UEFI client."""
    if arch != 0:
        return False
    g = pkt.guid
    if g is not None and g[1:5] in _RPI_FOURCC:
        return True
    m = pkt.mac
    for i in range(0, len(_RPI_OUIS), 3):
        if m[0] == _RPI_OUIS[i] and m[1] == _RPI_OUIS[i + 1] and m[2] == _RPI_OUIS[i + 2]:
            return True
    return False


class Policy:
    """The proxyDHCP policy for one config; see the module docstring."""

    def __init__(self, cfg):
        self.server_ip = cfg.server_ip
        self.allowed_macs = cfg.allowed_macs
        self.why = None  # counter name for the last None answer
        common = dhcp.option(54, cfg.server_ip) + dhcp.option(60, _PXE_CLIENT)
        pc = common + _pc_vendor_opts()
        self._by_arch = {}
        for arch, name in cfg.boot_files.items():
            self._by_arch[arch] = _pc_boot(name, cfg.next_server, name, pc)
        self._ipxe = _pc_boot(cfg.script_url, cfg.next_server, cfg.script_url, pc)
        self._rpi = None
        if cfg.rpi_boot:
            ns = cfg.rpi_next_server or cfg.next_server
            opts = common + rpi_vendor_opts(cfg.rpi_menu) + dhcp.option(66, _dotted(ns))
            self._rpi = Boot("rpi", ns, b"", opts)
        # Longest reply this config can produce, for the caller's buffer.
        longest = max(len(b.opts) for b in self.boots())
        self.max_reply = 240 + 3 + longest + 19 + 1

    def boots(self):
        """Every precomputed answer (for sizing buffers and tests)."""
        out = list(self._by_arch.values())
        out.append(self._ipxe)
        if self._rpi is not None:
            out.append(self._rpi)
        return out

    def answer(self, pkt, port):
        """The Reply for pkt, which arrived on the socket for `port` (DHCP_PORT or PXE_PORT),
        or None with self.why set."""
        if pkt.op != dhcp.BOOTREQUEST or pkt.htype != _ETHERNET or pkt.hlen != 6:
            self.why = "dhcp.not_ethernet"
            return None
        vc = pkt.vendor_class
        if vc is None or vc[:9] != _PXE_CLIENT:
            self.why = "dhcp.not_pxe"
            return None
        if port == PXE_PORT:
            return self.boot_server_ack(pkt)
        t = pkt.msg_type
        if t == dhcp.DISCOVER:
            msg = dhcp.OFFER
        elif t == dhcp.REQUEST:
            if pkt.server_id != self.server_ip:
                self.why = "dhcp.not_for_us"
                return None
            msg = dhcp.ACK
        else:
            self.why = "dhcp.other_type"
            return None
        if pkt.giaddr != _ANY:
            to, to_port = pkt.giaddr, DHCP_PORT
        elif pkt.ciaddr != _ANY:  # whatever the broadcast flag says (RFC 2131 4.1)
            to, to_port = pkt.ciaddr, CLIENT_PORT
        else:
            to, to_port = b"\xff\xff\xff\xff", CLIENT_PORT
        return self._reply(pkt, msg, to, to_port)

    def boot_server_ack(self, pkt):
        """PXE boot-server request on port 4011: a REQUEST gets an ACK with the same boot
        answer as the offer, sent back to where it came from (PXE 2.1: the client listens on
        its own address, port 4011 for edk2)."""
        if pkt.msg_type != dhcp.REQUEST:
            self.why = "dhcp.other_type"
            return None
        return self._reply(pkt, dhcp.ACK, None, 0)

    def _reply(self, pkt, msg, to, to_port):
        if self.allowed_macs is not None and pkt.mac not in self.allowed_macs:
            self.why = "dhcp.mac_not_allowed"
            return None
        if is_ipxe(pkt):
            return Reply(msg, self._ipxe, to, to_port, True, False)
        arch = client_arch(pkt)
        if is_rpi_bootloader(pkt, arch):
            if self._rpi is None:
                self.why = "dhcp.rpi_disabled"
                return None
            return Reply(msg, self._rpi, to, to_port, False, True)
        boot = self._by_arch.get(arch)
        if boot is None:
            self.why = "dhcp.no_boot_file"
            return None
        return Reply(msg, boot, to, to_port, False, False)
