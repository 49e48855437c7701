"""Boot files for lab nodes, made from Debian packages on this machine.

The kernel comes from Debian's linux-image package (downloaded with `apt-get download` and
unpacked, never installed on the host). The initrd is built here: busybox-static for the
userland, the kernel's virtio network modules, and Debian's real Ignition binary with the
libraries it links. Its init brings up the network, runs Ignition's fetch and files stages into
a tmpfs root, reports a digest of what Ignition wrote to the controller, and powers off.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

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
# Edge Bastion lab node init: network, Ignition, callback, power off.
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
url= ; cb= ; mac=$(cat /sys/class/net/$iface/address)
for x in $(cat /proc/cmdline); do
    case "$x" in
        ignition.config.url=*) url="${x#ignition.config.url=}" ;;
        bastion.callback=*) cb="${x#bastion.callback=}" ;;
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
        r = subprocess.run(["apt-get", "download", real], cwd=td, capture_output=True, text=True)
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


def build_initrd(tree: Path, out: Path) -> Path:
    """Build the lab node initrd from the kernel tree and this machine's busybox + Ignition."""
    for need in (BUSYBOX, IGNITION):
        if not need.exists():
            raise LabAssetError(f"{need} is missing: run tools/setup (busybox-static, ignition)")
    moddir = _module_dir(tree)
    c = _Cpio()
    dirs = ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "run",
            "tmp", "sysroot", "lib", "lib/modules", "lib64", "lib/x86_64-linux-gnu"]
    for d in dirs:
        c.dir(d)
    c.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    c.symlink("bin/sh", "busybox")
    names = []
    for rel in NET_MODULES:
        name = Path(rel).name
        c.file(f"lib/modules/{name}", _read_module(moddir / rel))
        names.append(name)
    c.file("init", INIT.replace("MODULES", " ".join(names)).encode(), 0o755)
    c.file("udhcpc.sh", UDHCPC.encode(), 0o755)
    c.file("usr/bin/ignition", IGNITION.read_bytes(), 0o755)
    seen_dirs = set(dirs)
    for lib in _libs_of(IGNITION):
        real = lib.resolve()
        rel = str(lib).lstrip("/")
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
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
