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

from bastion import atomic, paths

DEFAULT_GRUB_MODULES = paths.cache_dir() / "arm64-root" / "usr" / "lib" / "grub" / "arm64-efi"
GRUB_ARM64 = "grubnetaa64.efi"
IPXE_ARM64 = "snp.efi"
# What GRUB needs to fetch and start a kernel over the network from UEFI.
GRUB_MODULES = ("efinet", "net", "tftp", "http", "linux", "normal", "configfile", "echo",
                "efi_gop", "gzio", "test")  # fmt: skip
# The embedded config: straight to the controller's /grub/grub.cfg, skipping the module lists
# normal mode would first fetch from the prefix (each GRUB HTTP request is slow on a small board).
GRUB_EARLY_CFG = 'configfile "$prefix/grub.cfg"\n'

# PE/COFF machine types (the `Machine` field of the COFF header)
PE_I386, PE_AMD64, PE_ARMTHUMB, PE_ARMNT, PE_ARM64 = 0x14C, 0x8664, 0x1C2, 0x1C4, 0xAA64
PE_NAMES = {PE_I386: "x86 (IA32)", PE_AMD64: "x86-64", PE_ARMTHUMB: "ARM", PE_ARMNT: "ARM (Thumb-2)",
            PE_ARM64: "arm64"}  # fmt: skip
# The optional header's magic: 64-bit machines (x86-64, arm64) load PE32+ images only.
PE32, PE32_PLUS = 0x10B, 0x20B
_PE32_PLUS_MACHINES = {PE_AMD64, PE_ARM64}
# DHCP option 93 (RFC 4578, IANA) -> the PE machine types that can run there (UEFI spec 2.10,
# 2.3.x: IA32 0x14c, x64 0x8664, ARM 0x1c2, AArch64 0xaa64; 0x1c4 is ARM's Thumb-2 PE name).
# Arch 6 (EFI IA32) also takes x86-64, with a warning: Debian ships no IA32 iPXE and the
# default boot_files offer ipxe.efi there; a 32-bit UEFI client fails to run it.
EFI_ARCHES = {6: {PE_I386, PE_AMD64}, 7: {PE_AMD64}, 9: {PE_AMD64}, 10: {PE_ARMTHUMB, PE_ARMNT},
              11: {PE_ARM64}}  # fmt: skip
_RUNS = {6: PE_I386, 7: PE_AMD64, 9: PE_AMD64, 10: PE_ARMTHUMB, 11: PE_ARM64}


class ChainloadError(ValueError):
    pass


def pe_header(data: bytes) -> tuple[int, int | None] | None:
    """(machine type, optional header magic) of a PE image, or None when `data` is not one
    (an MZ stub without a PE header, BIOS PXE code such as undionly.kpxe)."""
    if len(data) < 0x40 or data[:2] != b"MZ":
        return None
    (offset,) = struct.unpack_from("<I", data, 0x3C)
    if offset + 6 > len(data) or data[offset : offset + 4] != b"PE\0\0":
        return None
    (machine,) = struct.unpack_from("<H", data, offset + 4)
    # COFF header: 20 bytes after the signature; the optional header's magic comes first.
    magic = struct.unpack_from("<H", data, offset + 24)[0] if offset + 26 <= len(data) else None
    return machine, magic


def pe_machine(data: bytes) -> int | None:
    """The PE machine type of an EFI binary, or None when `data` is not a PE image."""
    header = pe_header(data)
    return header[0] if header else None


def machine_name(machine: int) -> str:
    return f"{PE_NAMES.get(machine, 'an unknown machine')} (machine type {machine:#x})"


def check_boot_file(arch: int, name: str, data: bytes) -> tuple[str | None, str | None]:
    """(why `name` must not be offered to DHCP arch `arch`, a warning): None where there is
    nothing to say. Architectures without a rule here (HTTP boot 16/19, ...) pass."""
    header = pe_header(data)
    if arch == 0:
        if header is not None:
            return (f"{name} is an EFI binary for {machine_name(header[0])}; arch 0 is BIOS PXE, "
                    "which runs a PXE image such as undionly.kpxe"), None  # fmt: skip
        return None, None
    if arch not in EFI_ARCHES:
        return None, None
    runs = machine_name(_RUNS[arch])
    if header is None:
        return None, (f"{name} is not a PE image; arch {arch} clients run EFI binaries for "
                      f"{runs} only")  # fmt: skip
    machine, magic = header
    if machine not in EFI_ARCHES[arch]:
        return f"{name} is an EFI binary for {machine_name(machine)}; arch {arch} runs {runs}", None
    if machine in _PE32_PLUS_MACHINES and magic != PE32_PLUS:
        magic_s = f"{magic:#x}" if magic is not None else "none"
        return (f"{name} is marked {machine_name(machine)} but is not a PE32+ image (optional "
                f"header magic {magic_s}, not 0x20b)"), None  # fmt: skip
    if arch == 6 and machine == PE_AMD64:
        return None, (f"{name} is an EFI binary for {machine_name(machine)}: a 32-bit (IA32) "
                      "UEFI client (arch 6) cannot run it. Debian ships no IA32 iPXE; drop 6 from "
                      "boot_files, or give an IA32 build, if no machine of the site is one")  # fmt: skip
    return None, None


def check_boot_files(
    boot_files: dict[str, str], files: dict[str, bytes]
) -> tuple[list[str], list[str]]:
    """(problems, warnings) for a device's boot_files (arch -> name) against the files being
    flashed, one line each naming the site.yaml field."""
    problems, warnings = [], []
    for arch, name in sorted(boot_files.items(), key=lambda kv: int(kv[0])):
        data = files.get(name)
        if data is None:
            continue  # missing files are warned about elsewhere
        why, warn = check_boot_file(int(arch), name, data)
        if why:
            problems.append(f"site.yaml: device.boot_files.{arch}: {why}")
        if warn:
            warnings.append(f"site.yaml: device.boot_files.{arch}: {warn}")
    return problems, warnings


def is_arm64_efi(data: bytes) -> bool:
    """An arm64 UEFI binary (PE32+, machine 0xaa64): what arch 11 clients run."""
    return pe_header(data) == (PE_ARM64, PE32_PLUS)


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
    # temporaries in bastion.atomic's shape: what a killed build leaves beside `out` (a site's
    # tftp/, say) the next build sweeps away
    atomic.sweep(out.parent)
    tmp, early = atomic.temp_name(out), atomic.temp_name(out)
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
