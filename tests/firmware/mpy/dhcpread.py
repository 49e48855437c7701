# Reading the parts of a DHCP reply that only tests look at, under CPython and MicroPython alike.
# The firmware's codec (firmware/dhcp.py) parses requests; it leaves these out so that the device
# does not hold their code on its heap.
from firmware import dhcp


def xid(p):
    return bytes(p.raw[4:8])


def yiaddr(p):
    return bytes(p.raw[16:20])


def siaddr(p):
    return bytes(p.raw[20:24])


def chaddr(p):
    return bytes(p.raw[28:44])


def _cstr(b):
    i = b.find(b"\0")
    return b if i < 0 else b[:i]


def file_name(p):
    """The boot file: option 67, else the header's file field (unless option 52 overloads it)."""
    if p.bootfile is not None:
        return _cstr(p.bootfile)
    if p.overload and p.overload & 1:
        return b""
    return _cstr(bytes(p.raw[108:236]))


def find_suboption(value, code):
    """The data of encapsulated sub-option `code` in option bytes `value` (43 PXE, 175 iPXE), or
    None; raises dhcp.Malformed when the sub-options are not framed."""
    i = 0
    n = len(value)
    while i < n:
        c = value[i]
        if c == 0:
            i += 1
            continue
        if c == 255:
            return None
        if i + 1 >= n or i + 2 + value[i + 1] > n:
            raise dhcp.Malformed("sub-option overruns its option")
        if c == code:
            return bytes(value[i + 2 : i + 2 + value[i + 1]])
        i += 2 + value[i + 1]
    return None
