"""STAND-IN for MicroPython's `network` module (WIZNET5K, LAN), for tests only: never flash it.

It records every call (`calls`) and plays the cable and the router, which tests set through
module attributes: `cable` (the link is up), `lease` (the (ip, mask, gateway, dns) a DHCP server
would hand out, or None when none answers) and `fail` (the chip does not answer: active(True)
raises OSError). It behaves as the ports' drivers do, as far as the firmware relies on it:

- isconnected(): the link is up, the interface active and it has an address (W5500 on lwIP:
  extmod/network_wiznet5k.c; the ESP32's LAN: ports/esp32/network_lan.c, "got IP").
- ifconfig((ip, mask, gw, dns)) sets a static address and stops DHCP; ifconfig() reads back.
- DHCP runs once the interface is active and no static address is set (lwIP starts its client
  at netif init; esp-netif's Ethernet default), and ipconfig(dhcp4=True) (re)starts it: with a
  `lease` and the cable in, the address is the lease's.
"""

calls = []
cable = True
lease = None
fail = False
nics = []  # every interface constructed

PHY_LAN8710 = 1
PHY_LAN8720 = 2
PHY_IP101 = 3
PHY_RTL8201 = 4


def standin_reset():
    global cable, lease, fail
    del calls[:]
    del nics[:]
    cable = True
    lease = None
    fail = False


class _Nic:
    def __init__(self, kind, args):
        calls.append((kind,) + args)
        self._active = False
        self._static = None
        self._dhcp = True
        nics.append(self)

    def active(self, on=None):
        if on is None:
            return self._active
        calls.append(("active", bool(on)))
        if on and fail:
            raise OSError(19)  # ENODEV: nothing answers on the bus
        self._active = bool(on)
        return None

    def ifconfig(self, cfg=None):
        if cfg is None:
            if self._static is not None:
                return self._static
            if self._active and self._dhcp and cable and lease is not None:
                return tuple(lease)
            return ("0.0.0.0", "0.0.0.0", "0.0.0.0", "0.0.0.0")
        calls.append(("ifconfig", tuple(cfg)))
        self._static = tuple(cfg)
        self._dhcp = False
        return None

    def ipconfig(self, *args, **kw):
        calls.append(("ipconfig", args, tuple(sorted(kw.items()))))
        if kw.get("dhcp4"):
            self._static = None
            self._dhcp = True

    def isconnected(self):
        return self._active and cable and self.ifconfig()[0] != "0.0.0.0"


class WIZNET5K(_Nic):
    def __init__(self, spi, pin_cs, pin_rst, pin_intn=None):
        args = (spi.id, pin_cs.id, pin_rst.id) + (() if pin_intn is None else (pin_intn.id,))
        _Nic.__init__(self, "WIZNET5K", args)


class LAN(_Nic):
    def __init__(self, id=0, *, mdc, mdio, phy_type, phy_addr, power=None, ref_clk=None,
                 ref_clk_mode=None):
        _Nic.__init__(self, "LAN", (
            ("mdc", mdc.id), ("mdio", mdio.id), ("power", None if power is None else power.id),
            ("phy_type", phy_type), ("phy_addr", phy_addr),
            ("ref_clk", None if ref_clk is None else ref_clk.id), ("ref_clk_mode", ref_clk_mode),
        ))
