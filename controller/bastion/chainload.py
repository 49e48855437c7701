"""Network boot programs by client architecture: which binary may go to which DHCP arch (option
93), and the GRUB arm64 netboot image for arm64 UEFI clients (a Raspberry Pi 4 with its UEFI
firmware, QEMU's AAVMF).

Debian packages no arm64 iPXE, so arm64 clients get a GRUB arm64-efi image built with
grub-mkimage from Debian's grub-efi-arm64-bin modules (unpacked by tools/build-grub-arm64 into
var/cache/arm64-root). Its prefix is the controller's /grub: GRUB learns only the router and the
device from DHCP, never the controller. A site's own arm64 iPXE build (tftp/snp.efi) is
preferred when there is one.

An x86 binary handed to an arm64 client, or the other way round, fails on the node with no
useful message; `check_boot_files` refuses that before anything is flashed, from the PE
header's machine field.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[2]
DEFAULT_GRUB_MODULES = REPO / "var" / "cache" / "arm64-root" / "usr" / "lib" / "grub" / "arm64-efi"
GRUB_ARM64 = "grubnetaa64.efi"
IPXE_ARM64 = "snp.efi"
# What GRUB needs to fetch and start a kernel over the network from UEFI.
GRUB_MODULES = ("efinet", "net", "tftp", "http", "linux", "normal", "configfile", "echo",
                "efi_gop", "gzio", "test")  # fmt: skip
# The embedded config: straight to the controller's /grub/grub.cfg, skipping the module lists
# normal mode would first fetch from the prefix (each GRUB HTTP request is slow on a small board).
GRUB_EARLY_CFG = 'configfile "$prefix/grub.cfg"\n'

# PE/COFF machine types (the `Machine` field of the COFF header)
PE_I386, PE_AMD64, PE_ARM, PE_ARMNT, PE_ARM64 = 0x14C, 0x8664, 0x1C0, 0x1C4, 0xAA64
PE_NAMES = {PE_I386: "x86 (IA32)", PE_AMD64: "x86-64", PE_ARM: "ARM", PE_ARMNT: "ARM (Thumb-2)",
            PE_ARM64: "arm64"}  # fmt: skip
# DHCP option 93 (RFC 4578, IANA) -> the PE machine types that can run there. Arch 6 (EFI IA32)
# also takes x86-64: Debian ships no IA32 iPXE and the seed setup offers ipxe.efi there.
EFI_ARCHES = {6: {PE_I386, PE_AMD64}, 7: {PE_AMD64}, 9: {PE_AMD64}, 10: {PE_ARM, PE_ARMNT}, 11: {PE_ARM64}}
X86_ARCHES = {0, 6, 7, 9}
ARM_ARCHES = {10, 11}


class ChainloadError(ValueError):
    pass


def pe_machine(data: bytes) -> int | None:
    """The PE machine type of an EFI binary, or None when `data` is not a PE image."""
    if len(data) < 0x40 or data[:2] != b"MZ":
        return None
    (offset,) = struct.unpack_from("<I", data, 0x3C)
    if offset + 6 > len(data) or data[offset:offset + 4] != b"PE\0\0":
        return None
    return struct.unpack_from("<H", data, offset + 4)[0]


def check_boot_file(arch: int, name: str, data: bytes) -> str | None:
    """Why `name` must not be offered to DHCP arch `arch` (None: it may)."""
    machine = pe_machine(data)
    kind = PE_NAMES.get(machine, f"machine type {machine:#x}") if machine is not None else None
    if arch == 0:
        if machine is not None:
            return f"{name} is an EFI binary ({kind}); arch 0 is BIOS PXE (undionly.kpxe and the like)"
        return None
    if arch in EFI_ARCHES:
        if machine is None:
            return None  # not a PE at all (a stand-in, a script): nothing to say about its ISA
        if machine not in EFI_ARCHES[arch]:
            return f"{name} is an EFI binary for {kind}; arch {arch} runs {' or '.join(PE_NAMES[m] for m in sorted(EFI_ARCHES[arch]))}"
        return None
    return None  # other architectures: no rule known here


def check_boot_files(boot_files: dict[str, str], files: dict[str, bytes]) -> list[str]:
    """Problems with a device's boot_files (arch -> name) against the files being flashed."""
    out = []
    for arch, name in sorted(boot_files.items(), key=lambda kv: int(kv[0])):
        data = files.get(name)
        if data is None:
            continue  # missing files are warned about elsewhere
        why = check_boot_file(int(arch), name, data)
        if why:
            out.append(f"site.yaml: device.boot_files.{arch}: {why}")
    return out


def grub_prefix(controller_url: str) -> str:
    """GRUB's name for the controller's /grub: `(http,host:port)/path/grub`."""
    parts = urlsplit(controller_url)
    if parts.scheme == "https":
        raise ChainloadError(
            f"controller_url {controller_url!r} is https: GRUB's network stack has no TLS, so the "
            "arm64 chainloader needs a plain http URL to the controller"
        )
    if parts.scheme != "http" or not parts.netloc:
        raise ChainloadError(f"controller_url {controller_url!r} is not an http:// URL")
    return f"(http,{parts.netloc}){parts.path.rstrip('/')}/grub"


def build_grub_arm64(controller_url: str, out: Path, modules: Path | None = None) -> Path:
    """Write the GRUB arm64-efi netboot image for the controller at `controller_url` to `out`."""
    moddir = Path(modules) if modules else DEFAULT_GRUB_MODULES
    if not (moddir / "linux.mod").is_file():
        raise ChainloadError(
            f"no GRUB arm64-efi modules in {moddir}: run tools/build-grub-arm64 (tools/setup does), "
            f"or put an arm64 iPXE build in the site's tftp/{IPXE_ARM64}"
        )
    if shutil.which("grub-mkimage") is None:
        raise ChainloadError("grub-mkimage is missing: install grub-common (tools/setup does)")
    prefix = grub_prefix(controller_url)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    early = out.with_name(f".{out.name}.{os.getpid()}.cfg")
    early.write_text(GRUB_EARLY_CFG)
    try:
        r = subprocess.run(["grub-mkimage", "-O", "arm64-efi", "-d", str(moddir), "-o", str(tmp),
                            "-c", str(early), "-p", prefix, *GRUB_MODULES],
                           capture_output=True, text=True, check=False)  # fmt: skip
        if r.returncode != 0:
            raise ChainloadError(f"grub-mkimage failed: {r.stderr.strip()}")
        os.replace(tmp, out)
    finally:
        early.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return out
