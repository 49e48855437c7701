# device.json's `net` section: how a real board gets its address. Pure (no `network`), so the
# controller can check a config with it; on a board only board_net imports it. The sim board
# never reads it: its network is the host's, as it is.
#
#     "net": {"ip": "192.168.1.5/24", "gateway": "192.168.1.1", "dns": "192.168.1.1"}
#     "net": {"dhcp_wait_ms": 15000}          (or no section at all: a DHCP lease)
from firmware.config import ConfigError, _int, _ip_bytes, unknown


def net_settings(d):
    """The checked `net` section (raises ConfigError naming the field) as a compat.Settings:
    `how` "static" with `ip`, `prefix`, `mask`, `gateway` and `dns` as text, or "dhcp" (a lease
    from the router); `wait_ms`, how long a boot waits for a lease, either way."""
    from firmware.compat import Settings

    n = d.get("net") if isinstance(d, dict) else None
    n = {} if n is None else n
    if not isinstance(n, dict):
        raise ConfigError("net: must be an object")
    unknown(n, ("ip", "gateway", "dns", "dhcp_wait_ms"), "net")
    s = Settings()
    s.wait_ms = _int(n, "dhcp_wait_ms", 1000, 120000, 15000, "net")
    ip = n.get("ip")
    if ip is None:
        s.how = "dhcp"
        return s
    parts = ip.split("/") if isinstance(ip, str) else ()
    if len(parts) != 2:
        raise ConfigError("net.ip: %r must be an address and its prefix length, e.g. 192.168.1.5/24"
                          % (ip,))  # fmt: skip
    addr = _ip_bytes(parts[0], "net.ip")
    prefix = int(parts[1]) if parts[1].isdigit() else 0
    if not 8 <= prefix <= 30:
        raise ConfigError("net.ip: the prefix length /%s must be 8..30" % parts[1])
    mask = (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF
    gateway = n.get("gateway")
    if gateway is None:  # proxy offers are broadcasts; the router is the way to everything else
        raise ConfigError("net.gateway: missing (the router's address)")
    gw = _ip_bytes(gateway, "net.gateway")
    if int.from_bytes(gw, "big") & mask != int.from_bytes(addr, "big") & mask:
        raise ConfigError("net.gateway: %s is not in %s" % (gateway, ip))
    dns = n.get("dns", gateway)
    _ip_bytes(dns, "net.dns")
    s.how = "static"
    s.ip = parts[0]
    s.prefix = prefix
    s.mask = "%d.%d.%d.%d" % (mask >> 24, mask >> 16 & 255, mask >> 8 & 255, mask & 255)
    s.gateway = gateway
    s.dns = dns
    return s
