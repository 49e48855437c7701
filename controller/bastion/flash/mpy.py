"""The .mpy format's facts: which MicroPython loads which compiled module. Pure: used by
`bastion flash` (bastion.flash.image.abi_check) and by the sim board dressed as a real board
(bastion.flash.simboard), which must agree on them.

MicroPython loads an .mpy file when (docs/reference/mpyfiles.rst, py/persistentcode.h):
  - its version (header byte 1) is the system's (sys.implementation._mpy & 0xff);
  - for a file with native code, its sub-version and architecture match the system's (bytecode
    ignores both: what mpy-cross writes without -march, and what bastion flash copies);
  - its small-int bits (header byte 3) are at most the system's.
The feature byte (header byte 2, _mpy >> 8) holds the sub-version in bits 0-1 and the native
architecture in bits 2-7 (MP_NATIVE_ARCH_*, masked with 0x2f: 0x40 says arch flags follow).
"""

from __future__ import annotations

from dataclasses import dataclass

MPY_ARCHES = (None, "x86", "x64", "armv6", "armv6m", "armv7m", "armv7em", "armv7emsp",
              "armv7emdp", "xtensa", "xtensawin", "rv32imc", "rv64imc")  # fmt: skip
_THUMB = ("armv6m", "armv7m", "armv7em", "armv7emsp", "armv7emdp")
# docs/reference/mpyfiles.rst: which MicroPython releases load which .mpy version
MPY_RELEASES = {6: "1.19 and later", 5: "1.12 to 1.18", 4: "1.11", 3: "1.9.3 to 1.10",
                2: "1.9 to 1.9.2", 0: "1.5.1 to 1.8.7"}  # fmt: skip


@dataclass(frozen=True)
class MpyAbi:
    """An .mpy ABI: a file's header, or what a system loads (sys.implementation._mpy)."""

    version: int
    sub_version: int
    arch: str | None  # native code's architecture (a file), the native emitter's (a system)
    small_int_bits: int | None = None  # a file's; a system's is not in _mpy

    @classmethod
    def from_sys(cls, n: int) -> MpyAbi:
        feature = n >> 8
        return cls(n & 0xFF, feature & 3, _arch_name((feature >> 2) & 0x2F))

    @classmethod
    def from_header(cls, data: bytes) -> MpyAbi | None:
        """The header of an .mpy file, None when it is not a MicroPython .mpy ('M')."""
        if len(data) < 4 or data[0:1] != b"M":
            return None
        return cls(data[1], data[2] & 3, _arch_name((data[2] >> 2) & 0x2F), data[3])

    def __str__(self) -> str:
        # mpy-cross leaves the sub-version 0 in bytecode-only files: "6", not "6.0"
        if self.sub_version == 0 and self.arch is None:
            return str(self.version)
        return f"{self.version}.{self.sub_version}" + (f" {self.arch}" if self.arch else "")


def _arch_name(i: int) -> str | None:
    return MPY_ARCHES[i] if i < len(MPY_ARCHES) else f"arch {i}"


def why_not_loaded(system: MpyAbi, f: MpyAbi, maxsize: int | None) -> str | None:
    """Why a system with ABI `system` cannot load a file with ABI `f`, or None."""
    if f.version != system.version:
        return (f".mpy version {f.version}, and it loads version {system.version} only "
                f"(MicroPython {MPY_RELEASES.get(system.version, '?')})")  # fmt: skip
    if f.version < 6 and f.sub_version != system.sub_version:  # before 6: bytecode features
        return (f"bytecode features {f.sub_version} (map-lookup caching, unicode), and it "
                f"loads {system.sub_version} only")  # fmt: skip
    if f.arch is not None:
        if f.sub_version != system.sub_version:
            return (f"native code of .mpy {f}, and it loads native code of .mpy "
                    f"{system.version}.{system.sub_version} only")  # fmt: skip
        same = f.arch == system.arch or (
            f.arch in _THUMB and system.arch in _THUMB
            and _THUMB.index(f.arch) <= _THUMB.index(system.arch)
        )  # fmt: skip
        if not same:
            return f"native code for {f.arch}, and it runs {system.arch or 'no native code'}"
    if f.small_int_bits is not None and maxsize and f.small_int_bits > maxsize.bit_length():
        return (f"small ints of {f.small_int_bits} bits, more than its {maxsize.bit_length()}-bit "
                "integers hold")  # fmt: skip
    return None


def mpy_for_release(version: tuple[int, ...], arch: int) -> int | None:
    """sys.implementation._mpy of a MicroPython release on a port whose native emitter is
    `arch` (MP_NATIVE_ARCH_*): .mpy version 6 and its sub-version by release (1.19: 6.0,
    1.20: 6.1, 1.22: 6.2, 1.23 and later: 6.3; docs/reference/mpyfiles.rst and the sub-version
    bumps of py/persistentcode.h), None before 1.19 (.mpy 5 and older carry feature flags
    that depend on the port's configuration: give those by hand)."""
    v = tuple(version[:2])
    if v < (1, 19):
        return None
    sub = 3 if v >= (1, 23) else 2 if v >= (1, 22) else 1 if v >= (1, 20) else 0
    return 6 | (sub | arch << 2) << 8
