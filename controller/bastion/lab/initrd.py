"""Boot files for lab nodes, made from Debian packages on this machine.

The kernel comes from Debian's linux-image package (downloaded with `apt-get download` and
unpacked, never installed on the host). The initrd is built here: busybox-static for the
userland, the kernel's virtio network modules, and Debian's real Ignition binary with the
libraries it links. Its init brings up the network, runs Ignition's fetch and files stages into
a tmpfs root, reports a digest of what Ignition wrote to the controller, and powers off; or,
given `bastion.heartbeat=<controller>/heartbeat` on its command line, beats a few times (the
stand-in for the k3s nodes' heartbeat timer) and then hangs, or with
`bastion.heartbeat.beats=0` beats until its heartbeat's answer asks it to shut down.
"""

from __future__ import annotations

import gzip
import io
import shutil
import subprocess
import tempfile
from pathlib import Path

from bastion import atomic

IGNITION = Path("/usr/lib/dracut/modules.d/30ignition/ignition")
BUSYBOX = Path("/bin/busybox")
# The virtio network driver and what it needs; init loads them in passes until all are in,
# since the dependency order differs between kernel versions.
NET_MODULES = [
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/net/core/failover.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/drivers/net/virtio_net.ko",
]

INIT = r"""#!/bin/busybox sh
# Edge Bastion lab node init: network, Ignition, callback, power off (or a shell on the serial
# console with bastion.shell=1).
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mkdir -p /proc /sys /dev /run /tmp /sysroot /etc
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "lab-init: $*" > /dev/console; }
# Insert the network modules; a pass that loads none of the rest means a real failure.
left="MODULES"
while [ -n "$left" ]; do
    next=
    for m in $left; do insmod /lib/modules/$m 2>/dev/null || next="$next $m"; done
    [ "$next" = "$left" ] && { say "cannot load:$left"; break; }
    left=$next
done
ip link set lo up
iface=eth0
ip link set $iface up
say "dhcp on $iface"
udhcpc -i $iface -s /udhcpc.sh -q -f -n -t 20 -T 2 || { say "no DHCP lease"; poweroff -f; }
url= ; cb= ; hb= ; shell= ; beats=3 ; every=2 ; mac=$(cat /sys/class/net/$iface/address)
for x in $(cat /proc/cmdline); do
    case "$x" in
        ignition.config.url=*) url="${x#ignition.config.url=}" ;;
        bastion.callback=*) cb="${x#bastion.callback=}" ;;
        bastion.heartbeat=*) hb="${x#bastion.heartbeat=}" ;;
        bastion.heartbeat.beats=*) beats="${x#bastion.heartbeat.beats=}" ;;
        bastion.heartbeat.every=*) every="${x#bastion.heartbeat.every=}" ;;
        bastion.shell=1) shell=1 ;;
    esac
done
say "ignition config url: $url"
mount -t tmpfs tmpfs /sysroot
# Debian's Ignition relabels for SELinux when the root does not say it is disabled.
mkdir -p /sysroot/etc/selinux
printf "SELINUX=disabled\nSELINUXTYPE=targeted\n" > /sysroot/etc/selinux/config
status=ok
/usr/bin/ignition -platform metal -stage fetch -root /sysroot -log-to-stdout > /tmp/ign-fetch.log 2>&1 || status=fetch-failed
if [ "$status" = ok ]; then
    /usr/bin/ignition -platform metal -stage files -root /sysroot -log-to-stdout > /tmp/ign-files.log 2>&1 || status=files-failed
fi
if [ "$status" = ok ]; then tail -n 5 /tmp/ign-*.log > /dev/console; else tail -n 30 /tmp/ign-*.log > /dev/console; fi
# What Ignition wrote: one "sha256  /path" line per regular file, sorted by path (init's own
# SELinux stub above is not Ignition's).
(cd /sysroot && find . -type f ! -path ./etc/selinux/config | sort | while read -r f; do sha256sum "$f"; done) \
    | sed 's#  \./#  /#' > /tmp/files
# The digest: sha256 of those lines, leaving out Ignition's own result file, which holds this
# boot's date and id, so that the same config gives the same digest on every boot.
digest=$(grep -v '  /etc/\.ignition-result\.json$' /tmp/files | sha256sum | cut -d' ' -f1)
msg=
case "$status" in
    fetch-failed) msg=$(tail -n 1 /tmp/ign-fetch.log | tr -d '\000-\037') ;;
    files-failed) msg=$(tail -n 1 /tmp/ign-files.log | tr -d '\000-\037') ;;
esac
# The report, as the JSON object /callback reads: mac, stage, status, digest, files, message.
MAC="$mac" STATUS="$status" DIGEST="sha256:$digest" MSG="$msg" awk '
function q(s) { gsub(/\\/, "&&", s); gsub(/"/, "\\\"", s); return "\"" s "\"" }
BEGIN {
    printf "{\"mac\": %s, \"stage\": \"ignition\", \"status\": %s, \"digest\": %s, \"files\": {",
        q(ENVIRON["MAC"]), q(ENVIRON["STATUS"]), q(ENVIRON["DIGEST"])
    n = 0
}
{ printf "%s%s: %s", (n++ ? ", " : ""), q(substr($0, length($1) + 3)), q($1) }
END {
    printf "}"
    if (ENVIRON["MSG"] != "") printf ", \"message\": %s", q(ENVIRON["MSG"])
    print "}"
}' /tmp/files > /tmp/callback.json
say "reporting $(wc -l < /tmp/files) files, digest sha256:$digest, status $status, to $cb"
if [ -n "$cb" ]; then
    tries=0
    # busybox 1.35's wget -T segfaults (Debian's busybox-static): bound it with timeout instead.
    until timeout 20 wget -q -O /dev/null --header "Content-Type: application/json" \
            --post-file /tmp/callback.json "$cb"; do
        tries=$((tries + 1))
        [ $tries -ge 5 ] && { say "callback failed"; break; }
        sleep 2
    done
fi
if [ -n "$shell" ]; then
    # bastion.shell=1: a shell on the serial console (the device carries it to the controller:
    # docs/consoles.md), for ever; init must not end.
    say "shell on the serial console"
    while :; do sh -i < /dev/console > /dev/console 2>&1; done
fi
if [ -n "$hb" ]; then
    # The lab's stand-in for the k3s Butane's bastion-heartbeat.timer, which needs systemd:
    # this busybox initrd posts the same form to POST /heartbeat with wget, $beats times every
    # $every s (0: until it is asked to stop), then goes silent as a hung node would, for the
    # device's node watchdog to see. An answer that carries "shutdown" (a power cut: the
    # controller's UPS policy) powers it off cleanly, as the k3s Butane's script does.
    node=$(tr -d '\n' < /sysroot/etc/hostname 2>/dev/null)
    boot_id=$(cat /proc/sys/kernel/random/boot_id)
    i=0
    while [ "$beats" -eq 0 ] || [ $i -lt "$beats" ]; do
        i=$((i + 1))
        : > /tmp/beat
        timeout 10 wget -q -O /tmp/beat --post-data "mac=$mac&node=$node&boot_id=$boot_id" "$hb" \
            && say "heartbeat $i (boot $boot_id)"
        case "$(cat /tmp/beat)" in
            *'"shutdown":'*)
                say "asked to shut down: $(cat /tmp/beat); powering off"
                sync
                umount /sysroot 2>/dev/null
                poweroff -f ;;
        esac
        sleep "$every"
    done
    say "heartbeats stopped: hanging, as a hung node would"
    while :; do sleep 3600; done
fi
say "done; powering off"
sync
poweroff -f
"""

UDHCPC = r"""#!/bin/busybox sh
case "$1" in
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        [ -n "$router" ] && ip route add default via "${router%% *}" dev "$interface"
        : > /etc/resolv.conf
        for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
        echo "lab-init: lease $ip from ${serverid}" > /dev/console
        ;;
esac
exit 0
"""


class LabAssetError(Exception):
    pass


def fetch_kernel_package(cache: Path, arch: str = "amd64") -> Path:
    """Download and unpack Debian's current linux-image for arch into cache; returns the tree."""
    tree = cache / f"linux-image-{arch}"
    if (tree / ".done").exists():
        return tree
    cache.mkdir(parents=True, exist_ok=True)
    meta = f"linux-image-{arch}" if arch == "amd64" else f"linux-image-{arch}:{arch}"
    dep = subprocess.run(
        ["apt-cache", "depends", meta], capture_output=True, text=True, check=False
    ).stdout
    real = next(
        (line.split()[1] for line in dep.splitlines() if line.strip().startswith("Depends:")),
        None,
    )
    if not real:
        raise LabAssetError(f"apt-cache found no kernel package behind {meta}: run apt-get update")
    with tempfile.TemporaryDirectory(dir=cache) as td:
        # checked below, with apt-get's own words in the error
        r = subprocess.run(["apt-get", "download", real], cwd=td, capture_output=True, text=True,
                           check=False)  # fmt: skip
        debs = list(Path(td).glob("*.deb"))
        if r.returncode != 0 or not debs:
            raise LabAssetError(f"apt-get download {real} failed: {r.stderr.strip()}")
        if tree.exists():
            shutil.rmtree(tree)
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tree)], check=True)
    (tree / ".done").write_text(real + "\n")
    return tree


def kernel_image(tree: Path) -> Path:
    found = sorted((tree / "boot").glob("vmlinuz-*"))
    if not found:
        raise LabAssetError(f"no vmlinuz in {tree}/boot")
    return found[-1]


def _module_dir(tree: Path) -> Path:
    found = sorted((tree / "lib" / "modules").iterdir())
    if not found:
        raise LabAssetError(f"no modules in {tree}/lib/modules")
    return found[-1]


def _read_module(path: Path) -> bytes:
    for suffix, opener in (("", None), (".xz", "xz"), (".zst", "zstd")):
        p = path.with_name(path.name + suffix)
        if p.exists():
            if opener is None:
                return p.read_bytes()
            return subprocess.run([opener, "-dc", str(p)], capture_output=True, check=True).stdout
    raise LabAssetError(f"kernel module {path} not found")


def _libs_of(binary: Path) -> list[Path]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        for p in parts:
            if p.startswith("/"):
                libs.append(Path(p))
    return libs


class _Cpio:
    """A newc cpio archive writer (what the kernel's initramfs unpacker reads)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08x}"
            for v in (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0)
        )
        self.ino += 1
        self.buf.write(hdr.encode() + nb)
        self.buf.write(b"\0" * (-(110 + len(nb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def _builtin_modules(moddir: Path) -> set[str]:
    f = moddir / "modules.builtin"
    return set(f.read_text().split()) if f.exists() else set()


# Where the arm64 parts are unpacked (tools/build-grub-arm64): busybox-static, ignition and
# the libraries Ignition links, from Debian's arm64 packages.
ARM64_ROOT_NAME = "arm64-root"
TRIPLETS = {"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu"}


def _needed(binary: Path) -> tuple[list[str], str | None]:
    """The shared libraries an ELF file names (DT_NEEDED) and its program interpreter."""
    out = subprocess.run(["readelf", "-d", "-l", "-W", str(binary)], capture_output=True,
                         text=True, check=True).stdout
    needed, interp = [], None
    for line in out.splitlines():
        if "(NEEDED)" in line and "[" in line:
            needed.append(line.split("[", 1)[1].rstrip("]"))
        elif "Requesting program interpreter:" in line:
            interp = line.split(":", 1)[1].strip().rstrip("]")
    return needed, interp


def _foreign_libs(binary: Path, root: Path, triplet: str) -> list[tuple[str, Path]]:
    """(path in the initrd, file on the host) for what a binary of another architecture
    links, looked up in an unpacked Debian root: libraries under lib/<triplet>, the
    interpreter where the binary asks for it."""
    out: list[tuple[str, Path]] = []
    seen: set[str] = set()
    todo = [binary]
    while todo:
        needed, interp = _needed(todo.pop())
        if interp and interp not in seen:
            seen.add(interp)
            out.append((interp.lstrip("/"), _find_lib(root, triplet, Path(interp).name)))
        for name in needed:
            if name in seen:
                continue
            seen.add(name)
            found = _find_lib(root, triplet, name)
            out.append((f"lib/{triplet}/{name}", found))
            todo.append(found)
    return out


def _find_lib(root: Path, triplet: str, name: str) -> Path:
    for d in (f"lib/{triplet}", f"usr/lib/{triplet}", "lib", "usr/lib"):
        p = root / d / name
        if p.exists():
            return p.resolve()
    raise LabAssetError(f"{name} not found in {root}: run tools/build-grub-arm64")


def build_initrd(tree: Path, out: Path, arch: str = "amd64", root: Path | None = None) -> Path:
    """Build the lab node initrd from the kernel tree and busybox + Ignition: this machine's
    for amd64, those unpacked under `root` (Debian's arm64 packages) for another arch."""
    if arch == "amd64" and root is None:
        busybox, ignition = BUSYBOX, IGNITION
    else:
        if root is None:
            raise LabAssetError(f"an {arch} initrd needs the unpacked {arch} packages")
        busybox = root / str(BUSYBOX).lstrip("/")
        ignition = root / str(IGNITION).lstrip("/")
    for need in (busybox, ignition):
        if not need.exists():
            hint = "tools/setup (busybox-static, ignition)" if root is None else \
                "tools/build-grub-arm64"
            raise LabAssetError(f"{need} is missing: run {hint}")
    triplet = TRIPLETS.get(arch, f"{arch}-linux-gnu")
    moddir = _module_dir(tree)
    builtin = _builtin_modules(moddir)
    c = _Cpio()
    dirs = ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "run",
            "tmp", "sysroot", "lib", "lib/modules", "lib64", f"lib/{triplet}"]
    for d in dirs:
        c.dir(d)
    c.file("bin/busybox", busybox.read_bytes(), 0o755)
    c.symlink("bin/sh", "busybox")
    names = []
    for rel in NET_MODULES:
        name = Path(rel).name
        if rel in builtin:
            continue  # built into this kernel (arm64: virtio, virtio_ring)
        c.file(f"lib/modules/{name}", _read_module(moddir / rel))
        names.append(name)
    c.file("init", INIT.replace("MODULES", " ".join(names)).encode(), 0o755)
    c.file("udhcpc.sh", UDHCPC.encode(), 0o755)
    c.file("usr/bin/ignition", ignition.read_bytes(), 0o755)
    seen_dirs = set(dirs)
    if root is None:
        libs = [(str(lib).lstrip("/"), lib.resolve()) for lib in _libs_of(ignition)]
    else:
        libs = _foreign_libs(ignition, root, triplet)
    for rel, real in libs:
        parent = str(Path(rel).parent)
        if parent not in seen_dirs:
            c.dir(parent)
            seen_dirs.add(parent)
        c.file(rel, real.read_bytes(), 0o755)
    # Debian's Ignition is built to relabel what it writes for SELinux and runs setfiles; the lab
    # kernel runs no SELinux policy, so relabeling is a no-op here and setfiles only drains its
    # list of paths.
    c.file("usr/sbin/setfiles", b"#!/bin/sh\ncat > /dev/null\nexit 0\n", 0o755)
    # Ignition looks for os-release to know the platform it runs on.
    c.file("etc/os-release", b'ID=edge-bastion-lab\nNAME="Edge Bastion lab initrd"\n')
    c.file("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n")
    c.file("etc/group", b"root:x:0:\n")
    data = gzip.compress(c.finish(), compresslevel=6, mtime=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(out, data)
    return out


def build_grub_image(root: Path, controller: str, out: Path) -> Path:
    """The GRUB arm64-efi netboot image with its prefix at `controller`'s /grub (host:port),
    from the arm64 GRUB modules unpacked by tools/build-grub-arm64 (bastion.flash.chainload)."""
    from bastion.flash.chainload import ChainloadError, build_grub_arm64

    try:
        return build_grub_arm64(f"http://{controller}", out, root / "usr/lib/grub/arm64-efi")
    except ChainloadError as e:
        raise LabAssetError(str(e)) from None
