# The board layer's network side: the Ethernet chip named in board.json's `ethernet` section,
# configured from device.json's `net` section (config.net_settings: a static address, or a DHCP
# lease from the router), and watched for its link going down and up. Only firmware/board.py
# imports this module, and never on the sim board, whose network is the host's.
#
# NOT RUN ON HARDWARE YET: tests/firmware/mpy/test_board_vectors.py runs it under the unix port
# (and CPython) against stand-in `machine`/`network` modules that record calls
# (tests/firmware/standin/). The calls follow MicroPython's docs and sources:
#   W5500 (rp2): network.WIZNET5K(spi, pin_cs, pin_rst[, pin_intn]) on lwIP; isconnected() is
#     "PHY link up, active and an address" (extmod/network_wiznet5k.c).
#   LAN8720 (esp32): network.LAN(mdc=, mdio=, power=, phy_type=, phy_addr=, ref_clk=,
#     ref_clk_mode=) (docs/esp32/quickref.rst); isconnected() is "active and got an IP"
#     (ports/esp32/network_lan.c), which a link-down event clears.
#   ifconfig((ip, mask, gateway, dns)) sets a static address and stops DHCP on both;
#   ipconfig(dhcp4=True) (MicroPython >= 1.23) starts or renews DHCP without blocking.
import time

import network
from machine import Pin

from firmware.compat import sleep_ms, ticks_diff, ticks_ms, unload

_UP_KEYS = ("state", "ip", "prefix", "gw", "how")
_DOWN_KEYS = ("state", "ip", "how")
PERIOD_MS = 1000  # how often watch() looks at the link


def make_nic(eth):
    """The network interface for board.json's `ethernet` section, not yet active."""
    kind = eth.get("kind")
    if kind == "wiznet5k":
        from machine import SPI

        s = eth["spi"]
        spi = SPI(s["id"], baudrate=s.get("baudrate", 2000000),
                  sck=Pin(s["sck"]), mosi=Pin(s["mosi"]), miso=Pin(s["miso"]))  # fmt: skip
        if eth.get("int") is None:
            return network.WIZNET5K(spi, Pin(eth["cs"]), Pin(eth["rst"]))
        return network.WIZNET5K(spi, Pin(eth["cs"]), Pin(eth["rst"]), Pin(eth["int"]))
    if kind == "lan":
        power = eth.get("power")
        return network.LAN(
            mdc=Pin(eth["mdc"]),
            mdio=Pin(eth["mdio"]),
            power=None if power is None else Pin(power),
            phy_type=getattr(network, "PHY_" + eth["phy"]),
            phy_addr=eth["phy_addr"],
            ref_clk=Pin(eth["ref_clk"]),
            ref_clk_mode=Pin.OUT if eth.get("ref_clk_mode") == "out" else Pin.IN,
        )
    raise ValueError("ethernet.kind %r: this firmware knows wiznet5k and lan" % (kind,))


def _prefix(mask):
    n = 0
    for part in mask.split("."):
        n += bin(int(part)).count("1")
    return n


class Netif:
    """One Ethernet interface, brought up by up(). `up`: it carries traffic now (what the
    port's isconnected() says: link and an address); `address`: the device's IPv4 address as
    text, None until it has one; `device_ip`: the address it had at boot, which the services
    are built with (None: none yet); `error`: why the services cannot run yet, or None."""

    def __init__(self, nic, how, log):
        self.nic = nic
        self.how = how
        self.log = log
        self.up = False
        self.address = None
        self.device_ip = None
        self.error = None
        self._seen_up = False

    def start(self, settings):
        self.nic.active(True)
        if settings.how == "static":
            self.nic.ifconfig((settings.ip, settings.mask, settings.gateway, settings.dns))
            self.address = self.device_ip = settings.ip  # whether the cable is in or not
        elif hasattr(self.nic, "ipconfig"):
            self.nic.ipconfig(dhcp4=True)
        # else (MicroPython < 1.23): the ports' DHCP clients start by themselves once active

    def wait(self, ms):
        """Block (at boot, before any service runs) up to ms for a DHCP address; it or None."""
        t0 = ticks_ms()
        while True:
            if self.nic.isconnected():
                ip = self.nic.ifconfig()[0]
                if ip != "0.0.0.0":
                    self.address = self.device_ip = ip
                    return ip
            if ticks_diff(ticks_ms(), t0) >= ms:
                return None
            time.sleep(0.05)

    def poll(self):
        """Look at the link once. A change is a `link` event (up: with the address, prefix and
        gateway; down: with the address it had) and the services keep running either way:
        their sockets stay bound. Returns True when the board should restart because it now has
        an address its services were not built with (a boot without a lease, a new lease)."""
        up = bool(self.nic.isconnected())
        if up == self.up:
            return False
        self.up = up
        if not up:
            self.log.count("net.link_down")
            self.log.event("link", _DOWN_KEYS, ("down", self.address, self.how))
            return False
        if self._seen_up and self.how == "dhcp" and hasattr(self.nic, "ipconfig"):
            self.nic.ipconfig(dhcp4=True)  # back from a cable pull: renew (lwIP) or restart
        self._seen_up = True
        ip, mask, gw, _ = self.nic.ifconfig()
        self.address = ip
        self.log.event("link", _UP_KEYS, ("up", ip, _prefix(mask), gw, self.how))
        return ip != self.device_ip

    async def watch(self, board, led=None):
        """The link, looked at every PERIOD_MS: poll()'s events, the LED following the link,
        and a restart when the board has an address its services were not built with (a
        restart leaves the relays as they are)."""
        while True:
            if self.poll():
                board.reset()
            if led is not None:
                led.set(self.up)
            await sleep_ms(PERIOD_MS)

    def status(self):
        return {"link": "up" if self.up else "down", "ip": self.address, "how": self.how}


def up(eth, d, log):
    """The board's interface from its `ethernet` section and device.json (d), active and
    configured; with DHCP, after up to `net.dhcp_wait_ms` for a lease (without one, `error`
    says so and device_ip stays None). Raises ValueError for a bad `net` section (naming the
    field), OSError when the chip does not answer."""
    from firmware.netconfig import net_settings

    settings = net_settings(d)
    unload("firmware.netconfig")
    n = Netif(make_nic(eth), settings.how, log)
    n.start(settings)
    if settings.how == "dhcp" and n.wait(settings.wait_ms) is None:
        n.error = ("net: no DHCP lease within %d ms (the cable? the router?): nothing is served "
                   "until one comes, then the board restarts to serve with it" % settings.wait_ms)
    return n
