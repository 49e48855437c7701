"""One lab: its site LAN, the home router, the sim board, the controller and QEMU nodes.

    bastion lab up      namespaces, dnsmasq (addresses and IPv6 RAs), the sim board, the controller,
                        and the relay wiring (a sim relay channel powers each node's VM)
    bastion lab boot    power a node on through the device (its relay channel)
    bastion lab status  what runs, node states, the latest events
    bastion lab down    remove everything, also what a killed run left behind
    bastion lab demo    up, boot the UEFI node, wait for its callback, print the timeline, down
"""

from __future__ import annotations

import json
import secrets
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from bastion import atomic, paths
from bastion.lab import initrd as initrd_mod
from bastion.lab.netns import LabError, LabNet, Namespace, Supervisor, teardown

CACHE = paths.cache_dir()
IPXE_DIR = Path("/usr/lib/ipxe")
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
AAVMF_CODE = Path("/usr/share/AAVMF/AAVMF_CODE.fd")
AAVMF_VARS = Path("/usr/share/AAVMF/AAVMF_VARS.fd")
AAVMF_SIZE = 64 << 20  # QEMU's virt machine wants both pflash images at 64 MiB
GRUB_ARM64 = "grubnetaa64.efi"
CONTROLLER_PORT = 8080
RELAY_CHANNELS = 8  # the sim board's (boards/sim.json)
BEATS, BEAT_EVERY_S = 3, 2  # a beating node's heartbeats after its callback, then silence
BEATING_BOOT_S = 900  # its boot grace: a boot under QEMU without KVM takes minutes


# The nodes' Ignition config, as Butane with matchbox-style per-machine variables.
LAB_BUTANE = """\
variant: flatcar
version: 1.0.0
storage:
  files:
    - path: /etc/hostname
      mode: 0644
      overwrite: true
      contents:
        inline: |
          {{.hostname}}
    - path: /etc/edge-bastion/booted-by
      mode: 0644
      contents:
        inline: |
          Edge Bastion lab, {{.firmware}} firmware, machine {{.mac}}
systemd:
  units:
    - name: lab-hello.service
      enabled: true
      contents: |
        [Unit]
        Description=Lab hello
        [Service]
        Type=oneshot
        ExecStart=/bin/true
        [Install]
        WantedBy=multi-user.target
"""


# The lab's device heap on the 64-bit unix port. The firmware's code holds about 117 KB of it
# after boot since the hostile-LAN hardening (December 2026), and with the lab's site config
# 128k leaves too little for a second transfer while one runs (a node's RRQ is then refused
# "busy", which edk2 takes as final). 160k on 64-bit objects is still less than the first
# supported board, the W5500-EVB-Pico, has free on its 32-bit port (about 190 KB; docs/boards.md).
LAB_DEVICE_HEAP = "160k"


@dataclass
class Node:
    """A QEMU machine on the lab LAN, powered through a relay channel of the device."""

    name: str
    mac: str
    firmware: str = "uefi"  # "uefi": OVMF, edk2's own PXE (arch 7); "bios": SeaBIOS + iPXE ROM
    channel: int = 0
    memory_mb: int = 512
    arch: str = "amd64"  # "arm64": qemu-system-aarch64 -M virt, AAVMF (edk2 PXE, arch 11), GRUB
    # the device's node watchdog: its machines.yaml heartbeat timeout_s (0: not watched). Such
    # a node beats a few times after its callback (the lab initrd's stand-in for the k3s
    # nodes' heartbeat timer), then hangs: the device power-cycles it.
    heartbeat_s: int = 0
    # the lab initrd gives a shell on the serial console after its callback instead of
    # powering off (profile lab-node-shell, which also leaves out `quiet`: the kernel's
    # messages go through the device's console channel too; docs/consoles.md)
    shell: bool = False
    # beats from its callback on until a heartbeat's answer asks it to shut down (a power cut:
    # the controller's UPS policy), then powers itself off; not watched by the device.
    steady: bool = False
    role: str | None = None  # machines.yaml role: "server" is shut down last (bastion.ups)

    @property
    def tap(self) -> str:
        return f"tap{self.channel}"


def default_nodes() -> list[Node]:
    return [
        Node("uefi-1", "52:54:00:77:00:01", "uefi", 0),
        Node("bios-1", "52:54:00:77:00:02", "bios", 1),
    ]


def arm64_node() -> Node:
    """The arm64 UEFI node (like a Raspberry Pi 4 with its UEFI firmware): edk2 PXE as arch 11,
    the GRUB arm64 netboot image from the device, then the controller's /grub."""
    return Node("arm-1", "52:54:00:77:00:03", "uefi", 2, memory_mb=1024, arch="arm64")


def beating_node() -> Node:
    """A BIOS node (iPXE at once: the quickest boot) whose beats the device watches."""
    return Node("beat-1", "52:54:00:77:00:04", "bios", 3, heartbeat_s=6)


def steady_nodes() -> list[Node]:
    """Two BIOS nodes that beat until they are asked to shut down: a k3s-style server and an
    agent (machines.yaml roles, no cluster), for the UPS lab."""
    return [Node("srv-1", "52:54:00:77:00:05", "bios", 4, steady=True, role="server"),
            Node("agt-1", "52:54:00:77:00:06", "bios", 5, steady=True, role="agent")]


def all_nodes() -> list[Node]:
    return [*default_nodes(), arm64_node()]


def arm64_missing() -> str | None:
    """Why the arm64 node cannot run here (None: it can)."""
    root = CACHE / initrd_mod.ARM64_ROOT_NAME
    for what, ok in (
        ("qemu-system-aarch64 (Debian qemu-system-arm)", shutil.which("qemu-system-aarch64")),
        (f"{AAVMF_CODE} (Debian qemu-efi-aarch64)", AAVMF_CODE.exists()),
        ("grub-mkimage (Debian grub-common)", shutil.which("grub-mkimage")),
        (f"{root} (tools/build-grub-arm64)", (root / ".done").exists()),
        (f"{CACHE / 'linux-image-arm64'} (tools/build-grub-arm64)",
         (CACHE / "linux-image-arm64" / ".done").exists()),
    ):
        if not ok:
            return f"the arm64 lab node needs {what}"
    return None



def router_command(net: LabNet, leases: Path) -> list[str]:
    """dnsmasq as the site's home router, in net.router: IPv4 addresses (no PXE options: PXE
    is the device's job) with itself as the gateway, and IPv6 router advertisements of the
    LAN's ULA /64 with neither DHCPv6 flag (SLAAC only), as a home router sends them. Without
    an advertisement iPXE waits about 16 s for one before it goes on with IPv4 (before this
    router sent them, a lab boot spent that long between iPXE's DHCP and its GET /boot.ipxe)."""
    lo, hi = net.pool
    return [
        "dnsmasq", "-k", "--conf-file=/dev/null", "--port=0", "--interface=rt0",
        # its built-in user, dnsmasq, exists only where a package made it
        "--user=nobody", "--bind-interfaces", f"--dhcp-range={lo},{hi},255.255.255.0,1h",
        f"--dhcp-option=option:router,{net.router_ip}",
        "--enable-ra", f"--dhcp-range={net.ula_prefix},ra-only,64",
        f"--dhcp-leasefile={leases}", "--log-dhcp", "--log-facility=-",
    ]  # fmt: skip

class Lab:
    def __init__(self, name: str = "eb", prefix: str = "10.77.0", workdir: Path | None = None,
                 accel: str = "tcg", management_prefix: str | None = None):
        self.workdir = (workdir or paths.var_dir() / "lab" / name).resolve()
        # a management network of its own (LabNet): given, or the one this lab was made with
        # (`bastion lab status` and `lab wire` name the lab by its name and prefix only)
        remembered = self.workdir / "management-prefix"
        if management_prefix is None and remembered.is_file():
            management_prefix = remembered.read_text().strip() or None
        self.net = LabNet(name, prefix, management_prefix)
        self.accel = accel
        self.flash = self.workdir / "flash"
        self.site = self.workdir / "site"
        self.logs = self.workdir / "logs"
        self.serial = self.workdir / "device.tty"
        self.token_file = self.workdir / "api-token"
        self.db_path = self.workdir / "events.db"
        self.procs = Supervisor.load(self.workdir / "state.json")

    # -- paths and URLs ---------------------------------------------------------------------
    @property
    def controller_url(self) -> str:
        """The controller's boot endpoints, on the PXE LAN."""
        return f"http://{self.net.controller_ip}:{CONTROLLER_PORT}"

    @property
    def management_url(self) -> str:
        """The controller's management API and dashboard: on the management network when the
        lab has one (its management listener), else the one listener."""
        if self.net.management_prefix is None:
            return self.controller_url
        return f"http://{self.net.controller_mgmt_ip}:{CONTROLLER_PORT}"

    def nodes(self) -> list[Node]:
        f = self.workdir / "nodes.json"
        if not f.exists():
            return []
        return [Node(**d) for d in json.loads(f.read_text())]

    def node(self, name: str) -> Node:
        for n in self.nodes():
            if n.name == name:
                return n
        raise LabError(f"no node {name!r} in lab {self.net.name} (have: "
                       f"{', '.join(n.name for n in self.nodes()) or 'none'})")

    # -- files ------------------------------------------------------------------------------
    def prepare_boot_files(self, arch: str = "amd64") -> tuple[Path, Path]:
        if arch != "amd64":
            why = arm64_missing() if arch == "arm64" else f"no lab support for {arch}"
            if why:
                raise LabError(why)
        tree = initrd_mod.fetch_kernel_package(CACHE, arch)
        kernel = initrd_mod.kernel_image(tree)
        initrd = CACHE / f"lab-initrd-{arch}.img"
        root = None if arch == "amd64" else CACHE / initrd_mod.ARM64_ROOT_NAME
        if root is None:
            sources = [initrd_mod.IGNITION, initrd_mod.BUSYBOX, Path(initrd_mod.__file__)]
        else:
            sources = [root / ".done", tree / ".done", Path(initrd_mod.__file__)]
        if not initrd.exists() or any(s.stat().st_mtime > initrd.stat().st_mtime for s in sources):
            initrd_mod.build_initrd(tree, initrd, arch, root)
        return kernel, initrd

    def write_device_flash(self, nodes: list[Node]) -> None:
        from bastion.flash.sim import install_firmware

        by_channel = {n.channel: n for n in nodes}
        install_firmware(self.flash)
        tftp = self.flash / "tftp"
        tftp.mkdir(parents=True, exist_ok=True)
        for name in ("ipxe.efi", "snponly.efi", "undionly.kpxe"):
            shutil.copyfile(IPXE_DIR / name, tftp / name)
        boot_files = {"0": "undionly.kpxe", "6": "ipxe.efi", "7": "ipxe.efi", "9": "ipxe.efi"}
        (tftp / GRUB_ARM64).unlink(missing_ok=True)
        if any(n.arch == "arm64" for n in nodes):
            # arm64 UEFI clients (arch 11) get the GRUB netboot image, built for this lab's
            # controller (its prefix is the controller's /grub); x86 clients never see it.
            initrd_mod.build_grub_image(CACHE / initrd_mod.ARM64_ROOT_NAME,
                                        f"{self.net.controller_ip}:{CONTROLLER_PORT}",
                                        tftp / GRUB_ARM64)
            boot_files["11"] = GRUB_ARM64
        device = {
            "server_ip": self.net.device_ip,
            "script_url": f"{self.controller_url}/boot.ipxe",
            "boot_files": boot_files,
            "allowed_macs": [n.mac for n in nodes],
            "tftp": {"max_transfers": 4},
            # Relay channels named after the nodes they power; a short minimum off time so a
            # demo can cut and restore power quickly (real nodes want seconds, not one).
            "power": {
                "stagger_ms": 1000,
                "channels": [
                    {"name": by_channel[i].name if i in by_channel else f"ch{i}",
                     "min_off_ms": 1000, "max_cycles": 10}
                    for i in range(RELAY_CHANNELS)
                ],
            },
        }
        atomic.write_json(self.flash / "device.json", device)
        # Every node starts powered off: a new lab forgets the relays' persisted state, and
        # the relay wiring powers VMs from the outputs file.
        (self.flash / "power.state").unlink(missing_ok=True)
        (self.flash / "relays.state").write_text("0" * RELAY_CHANNELS + "\n")

    def write_site(self, nodes: list[Node], kernel: Path, initrd: Path,
                   arm64: tuple[Path, Path] | None = None,
                   site_extra: dict | None = None) -> None:  # fmt: skip
        """The lab's site directory: a matchbox-format profile and Ignition template, and
        machines.yaml naming each node, its MAC and its relay channel. `site_extra`: more
        site.yaml sections (a test's `ups:`, `logs:`)."""
        site = self.site
        if (site / "groups").exists():
            shutil.rmtree(site / "groups")  # an older lab's layout: machines.yaml now
        for d in ("profiles", "ignition", "assets/lab"):
            (site / d).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(kernel, site / "assets/lab/vmlinuz")
        shutil.copyfile(initrd, site / "assets/lab/initrd.img")
        url = self.controller_url
        profile = {
            "id": "lab-node",
            "name": "Lab node: Debian kernel, busybox initrd with Ignition",
            "boot": {
                "kernel": "/assets/lab/vmlinuz",
                "initrd": ["/assets/lab/initrd.img"],
                "args": [
                    "initrd=initrd.img",
                    "console=ttyS0",
                    "quiet",
                    f"ignition.config.url={url}/ignition?mac=${{mac:hexhyp}}",
                    f"bastion.callback={url}/callback",
                ],
            },
            "ignition_id": "lab-node.yaml",
        }
        atomic.write_json(site / "profiles/lab-node.json", profile)
        # Nodes the device watches: the same boot, then a few heartbeats and silence.
        beating = {**profile, "id": "lab-node-beating",
                   "name": "Lab node that beats, then hangs (the node watchdog)"}
        beating["boot"] = {**profile["boot"], "args": [
            *profile["boot"]["args"], f"bastion.heartbeat={url}/heartbeat",
            f"bastion.heartbeat.beats={BEATS}", f"bastion.heartbeat.every={BEAT_EVERY_S}"]}
        atomic.write_json(site / "profiles/lab-node-beating.json", beating)
        shell = {**profile, "id": "lab-node-shell",
                 "name": "Lab node that keeps a shell on its serial console"}
        shell["boot"] = {**profile["boot"], "args": [
            *(a for a in profile["boot"]["args"] if a != "quiet"), "bastion.shell=1"]}
        atomic.write_json(site / "profiles/lab-node-shell.json", shell)
        # Nodes that beat until the controller asks them to shut down (a power cut).
        steady = {**profile, "id": "lab-node-steady",
                  "name": "Lab node that beats until it is asked to shut down (the UPS policy)"}
        steady["boot"] = {**profile["boot"], "args": [
            *profile["boot"]["args"], f"bastion.heartbeat={url}/heartbeat",
            "bastion.heartbeat.beats=0", f"bastion.heartbeat.every={BEAT_EVERY_S}"]}
        atomic.write_json(site / "profiles/lab-node-steady.json", steady)
        (site / "profiles/lab-node-arm64.json").unlink(missing_ok=True)
        if arm64 is not None:
            # The arm64 node boots through GRUB (/grub): its own kernel and initrd, the
            # serial console of QEMU's virt machine, and GRUB's name for the MAC it booted with.
            (site / "assets/lab/arm64").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(arm64[0], site / "assets/lab/arm64/vmlinuz")
            shutil.copyfile(arm64[1], site / "assets/lab/arm64/initrd.img")
            atomic.write_json(site / "profiles/lab-node-arm64.json", {
                "id": "lab-node-arm64",
                "name": "Lab arm64 node: Debian arm64 kernel, busybox initrd with Ignition",
                "boot": {
                    "kernel": "/assets/lab/arm64/vmlinuz",
                    "initrd": ["/assets/lab/arm64/initrd.img"],
                    "args": [
                        "console=ttyAMA0",
                        "quiet",
                        f"ignition.config.url={url}/ignition?mac=${{net_default_mac}}",
                        f"bastion.callback={url}/callback",
                    ],
                },
                "ignition_id": "lab-node.yaml",
            })
        # The machines, each with the relay channel that powers it: the matchbox profile
        # above, Edge Bastion's machines.yaml for identity and power.
        machines = {"machines": [
            {"name": n.name, "mac": n.mac, "relay": n.channel,
             "profile": "lab-node" if n.arch == "amd64" else f"lab-node-{n.arch}",
             "metadata": {"firmware": n.firmware}}
            | ({"profile": "lab-node-beating",
                "heartbeat": {"timeout_s": n.heartbeat_s, "boot_s": BEATING_BOOT_S}}
               if n.heartbeat_s else {})
            | ({"profile": "lab-node-shell"} if n.shell else {})
            | ({"profile": "lab-node-steady"} if n.steady else {})
            | ({"role": n.role} if n.role else {})
            for n in nodes
        ]}
        (site / "machines.yaml").write_text(yaml.safe_dump(machines, sort_keys=False))
        site_yaml = f"site: lab-{self.net.name}\ncontroller_url: {url}\n"
        if self.net.management_prefix:
            site_yaml += (f"networks:\n  pxe:\n    subnet: {self.net.prefix}.0/24\n"
                          f"  management:\n    subnet: {self.net.management_prefix}.0/24\n")  # fmt: skip
        (site / "site.yaml").write_text(site_yaml + (yaml.safe_dump(site_extra, sort_keys=False)
                                                     if site_extra else ""))  # fmt: skip
        (site / "ignition/lab-node.yaml").write_text(LAB_BUTANE)

    # -- QEMU ------------------------------------------------------------------------------
    def qemu_command(self, node: Node) -> list[str]:
        if node.arch == "arm64":
            return self._qemu_arm64(node)
        cmd = [
            "qemu-system-x86_64", "-accel", self.accel, "-M", "q35", "-m", str(node.memory_mb),
            "-smp", "1", "-display", "none", "-monitor", "none", "-no-reboot",
            *self.serial_args(node),
            "-netdev", f"tap,id=n0,ifname={node.tap},script=no,downscript=no",
        ]
        if node.firmware == "uefi":
            vars_copy = self.workdir / f"{node.name}.OVMF_VARS.fd"
            if not vars_copy.exists():
                shutil.copyfile(OVMF_VARS, vars_copy)
            cmd += [
                "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                "-drive", f"if=pflash,format=raw,file={vars_copy}",
                # romfile= drops QEMU's iPXE option ROM so edk2's own PXE client runs (arch 7).
                "-device", f"virtio-net-pci,netdev=n0,mac={node.mac},romfile=",
            ]
        else:
            # SeaBIOS with the NIC's iPXE ROM: iPXE straight away (arch 0, user class iPXE).
            # sgabios copies the BIOS text screen (SeaBIOS, iPXE) to the serial console, which
            # otherwise shows nothing before the kernel.
            cmd += ["-device", "sga", "-device", f"virtio-net-pci,netdev=n0,mac={node.mac}"]
        return cmd

    def console_socket(self, node: Node) -> Path | None:
        """The sim device's console channel wired to this node's relay channel (a unix socket
        in its flash, boards/sim.json `node_consoles`), or None when none is."""
        try:
            nc = json.loads((self.flash / "board.json").read_text()).get("node_consoles") or {}
        except (OSError, ValueError):
            return None
        if isinstance(nc, dict) and node.channel in nc.get("relays", ()):
            return self.flash / nc.get("dir", "consoles") / f"{node.channel}.sock"
        return None

    def serial_args(self, node: Node) -> list[str]:
        """The node's serial port: wired to the device's console channel for its relay
        channel, as a UART would be (node -> device -> controller), with QEMU's own copy in
        logs/<node>.console, where the lab's messages point; a file alone when the device
        has no channel for it. reconnect=1: the device's firmware may restart under it."""
        copy = self.logs / f"{node.name}.console"
        sock = self.console_socket(node)
        if sock is None:
            return ["-serial", f"file:{copy}"]
        return ["-chardev", f"socket,id=con0,path={sock},reconnect=1,logfile={copy},logappend=on",
                "-serial", "chardev:con0"]

    def _qemu_arm64(self, node: Node) -> list[str]:
        vars_copy = self.workdir / f"{node.name}.AAVMF_VARS.fd"
        if not vars_copy.exists():
            shutil.copyfile(AAVMF_VARS, vars_copy)
        code = AAVMF_CODE
        if code.stat().st_size < AAVMF_SIZE:
            code = self.workdir / "AAVMF_CODE.fd"
            if not code.exists():
                shutil.copyfile(AAVMF_CODE, code)
        for f in {vars_copy, code}:
            if f.stat().st_size < AAVMF_SIZE:
                with open(f, "r+b") as fh:
                    fh.truncate(AAVMF_SIZE)
        return [
            "qemu-system-aarch64", "-accel", self.accel, "-M", "virt", "-cpu", "cortex-a57",
            "-m", str(node.memory_mb), "-smp", "1", "-display", "none", "-monitor", "none",
            "-no-reboot", *self.serial_args(node),
            "-drive", f"if=pflash,format=raw,readonly=on,file={code}",
            "-drive", f"if=pflash,format=raw,file={vars_copy}",
            "-netdev", f"tap,id=n0,ifname={node.tap},script=no,downscript=no",
            # romfile= : no option ROM, so AAVMF's own edk2 PXE client runs (arch 11).
            "-device", f"virtio-net-pci,netdev=n0,mac={node.mac},romfile=",
        ]

    # -- lifecycle --------------------------------------------------------------------------
    def _bastion(self) -> str:
        exe = Path(sys.executable).parent / "bastion"
        return str(exe) if exe.exists() else "bastion"

    def up(self, nodes: list[Node] | None = None, progress=print,
           site_extra: dict | None = None) -> None:  # fmt: skip
        nodes = nodes or default_nodes()
        removed = self.down()
        if removed:
            progress(f"removed a stale lab: {', '.join(removed)}")
        try:
            self._up(nodes, progress, site_extra)
        except BaseException:
            # A half-built lab holds namespaces and processes: remove them (the logs stay).
            self.down()
            raise

    def _up(self, nodes: list[Node], progress, site_extra: dict | None = None) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        progress("preparing boot files (Debian kernel, lab initrd)")
        kernel, initrd = self.prepare_boot_files()
        arm64 = None
        if any(n.arch == "arm64" for n in nodes):
            progress("preparing arm64 boot files (Debian arm64 kernel, lab initrd, GRUB)")
            arm64 = self.prepare_boot_files("arm64")
        self.write_device_flash(nodes)
        self.write_site(nodes, kernel, initrd, arm64, site_extra)
        if not self.token_file.exists():
            self.token_file.write_text(secrets.token_urlsafe(24) + "\n")
            self.token_file.chmod(0o600)
        atomic.write_json(self.workdir / "nodes.json", [asdict(n) for n in nodes])  # type: ignore[arg-type]
        atomic.write_text(self.workdir / "management-prefix", (self.net.management_prefix or "") + "\n")
        progress(f"creating namespaces {', '.join(self.net.namespaces)}")
        self.net.create()
        for n in nodes:
            self.net.add_tap(n.tap)
        self.procs.start("router", router_command(self.net, self.workdir / "leases"), netns=self.net.router,
                         log=self.logs / "router.log")  # fmt: skip
        self.procs.start("device", [
            self._bastion(), "sim", "--flash", str(self.flash), "--listen", self.net.device_ip,
            "--serial-link", str(self.serial), "--heap", LAB_DEVICE_HEAP,
        ], netns=self.net.lan, log=self.logs / "device.log")
        self.procs.start("controller", self.controller_command(), netns=self.net.lan,
                         log=self.logs / "controller.log")
        self.procs.start("wiring", [
            self._bastion(), "lab", "wire", "--name", self.net.name, "--prefix",
            self.net.prefix, "--workdir", str(self.workdir), "--accel", self.accel,
        ], netns=self.net.lan, log=self.logs / "wiring.log")
        self.wait_ready()
        management = (f", management {self.management_url}"
                      if self.net.management_prefix else "")  # fmt: skip
        progress(f"lab {self.net.name} is up: device {self.net.device_ip}, "
                 f"controller {self.controller_url}{management}, router {self.net.router_ip}")

    def controller_command(self) -> list[str]:
        return [
            self._bastion(), "serve", "--site", str(self.site),
            "--listen", f"{self.net.controller_ip}:{CONTROLLER_PORT}",
            # The lab's own history, not the host's default database (~/.local/state/...).
            "--db", str(self.db_path), "--token-file", str(self.token_file),
            # The device's serial line: power by machine, device events in the history.
            "--device", str(self.serial),
            # The nodes' serial consoles, through the device (docs/consoles.md).
            "--console-dir", str(self.workdir / "consoles"),
        ] + (["--management-listen", f"{self.net.controller_mgmt_ip}:{CONTROLLER_PORT}",
              # br1: the management bridge (LabNet); connections to that address arriving on
              # br0, from the PXE LAN, are refused
              "--management-interface", "br1"] if self.net.management_prefix else [])

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for key in ("router", "device", "controller", "wiring"):
                if not self.procs.alive(key):
                    raise LabError(f"lab {key} exited at start; see {self.logs / (key + '.log')}")
            if self.serial.exists() and self.device_ready():
                return
            time.sleep(0.3)
        raise LabError(f"lab did not come up within {timeout:.0f}s; logs in {self.logs}")

    def http(self, path: str, check: bool = True, method: str = "GET",
             data: str | None = None, token: bool = False) -> str | None:
        """An HTTP request to the controller from inside the LAN namespace (curl), to its
        management URL (which serves the boot endpoints too): the body of a 2xx answer;
        otherwise None, or with check a LabError with the controller's words."""
        cmd = ["curl", "-sS", "--max-time", "20", "-X", method, "-w", "\n%{http_code}"]
        if token and self.token_file.exists():
            cmd += ["-H", f"Authorization: Bearer {self.token_file.read_text().strip()}"]
        if data is not None:
            cmd += ["-H", "Content-Type: application/json", "--data", data]
        r = Namespace(self.net.lan).run(*cmd, self.management_url + path, capture_output=True,
                                        text=True)  # fmt: skip
        body, _, code = r.stdout.rpartition("\n")
        if r.returncode == 0 and code.startswith("2"):
            return body
        if not check:
            return None
        if r.returncode != 0:
            raise LabError(f"{method} {path}: {r.stderr.strip() or f'curl exit {r.returncode}'}")
        try:
            detail = json.loads(body).get("detail", body)
        except (ValueError, AttributeError):
            detail = body
        raise LabError(f"{method} {path}: {detail} (HTTP {code})")

    def down(self) -> list[str]:
        removed = teardown(self.net, self.procs)
        for f in (self.serial,):
            if f.is_symlink():
                f.unlink()
        return removed

    # -- operating a running lab -------------------------------------------------------------
    def api(self, method: str, path: str, body: dict | None = None) -> Any:
        """The controller's management API (from inside the LAN), as JSON."""
        out = self.http(path, method=method, token=True,
                        data=json.dumps(body) if body is not None else None)
        return json.loads(out) if out else None

    def device_ready(self) -> bool:
        """The controller answers and holds the device link, and the device serves (its
        watchdog judges the dhcp and tftp listeners only when they run)."""
        out = self.http("/api/v1/device", check=False)
        if out is None:
            return False
        view = json.loads(out)
        tasks = (view.get("status") or {}).get("tasks") or {}
        return bool(view.get("connected")) and "dhcp" in tasks and "tftp" in tasks

    def events(self, after: int = 0, kind: str | None = None, source: str | None = None,
               limit: int | None = None, page: int = 1000) -> list[dict]:
        """Every event after an id (or the first `limit` of them, counted before the `source`
        filter), oldest first, read `page` at a time. An answer of the events API holds at most
        `page` events and about 4 MiB (bastion.api.events), so the rest is asked for after the
        last one answered until an answer is empty. No answer to the first question is no
        events (the controller not up yet, as before); no answer to a later one is a LabError,
        not a history cut short."""
        evs: list[dict] = []
        while limit is None or len(evs) < limit:
            n = page if limit is None else min(page, limit - len(evs))
            q = f"/api/v1/events?after={after}&limit={n}" + (f"&kind={kind}" if kind else "")
            out = self.http(q, check=bool(evs))
            got = json.loads(out) if out else []
            if not got:
                break
            evs += got
            after = got[-1]["id"]
        return [e for e in evs if source is None or e.get("source") == source]

    def last_event_id(self) -> int:
        out = self.http("/api/v1/events?limit=1", check=False)
        evs = json.loads(out) if out else []
        return evs[0]["id"] if evs else 0

    def power(self, node: str, state: str) -> dict:
        """Switch a node's relay through the controller and the device, as a user would."""
        self.node(node)
        return self.api("POST", f"/api/v1/machines/{node}/power", {"state": state})

    def _wiring(self, node: str) -> dict:
        try:
            return json.loads((self.workdir / "wiring.json").read_text())[node]
        except (OSError, ValueError, KeyError):
            return {}

    def vm_state(self, node: str) -> str:
        """What the relay wiring reports for the node's VM: running, halted or off."""
        return self._wiring(node).get("state", "unknown")

    def vm_pid(self, node: str) -> int | None:
        return self._wiring(node).get("pid")

    def vm_boots(self, node: str) -> int:
        """How many times the node's VM was started (relay on edges)."""
        return self._wiring(node).get("boots", 0)

    def wait_callback(self, node: str, after: int, timeout: float = 300.0) -> dict:
        """The node's first callback after event id `after`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events(after, kind="callback"):
                if e.get("machine") == node:
                    return e
            for key in ("device", "controller", "wiring"):
                if not self.procs.alive(key):
                    raise LabError(f"lab {key} died; see {self.logs / (key + '.log')}")
            time.sleep(1)
        raise LabError(f"{node} did not call back within {timeout:.0f}s; its console: "
                       f"{self.logs / (node + '.console')}")

    def power_on(self, node: str) -> int:
        """A fresh power-on edge for the node (off first if its relay is on, as after a
        boot that ended in the node powering itself off). Returns the last event id before
        the relay went on: everything after it belongs to this boot."""
        if self.vm_state(node) in ("running", "halted"):
            self.power(node, "off")
            self._wait_vm(node, "off", 10, f"{node} powered off")
        after = self.last_event_id()
        try:
            self.power(node, "on")
        except LabError as e:
            if "minimum off time" not in str(e):
                raise
            time.sleep(1.2)  # it went off a moment ago: the device wants its off time first
            self.power(node, "on")
        return after

    def boot(self, node: str, timeout: float = 300.0, progress=print) -> BootResult:
        """Power a node on through the device and follow its boot to the callback."""
        return self.boot_many([node], timeout, progress)[0]

    def boot_many(self, nodes: list[str], timeout: float = 300.0, progress=print) -> list[BootResult]:
        """Power the nodes on one after the other (the device staggers the relays) and follow
        every boot, running at the same time, to its callback."""
        from bastion.lab import trace

        started = time.monotonic()
        after = {}
        for node in nodes:
            after[node] = self.power_on(node)
            progress(f"{node}: relay on; waiting for its callback (up to {timeout:.0f}s)")
        results = []
        for node in nodes:
            n = self.node(node)
            left = max(1.0, timeout - (time.monotonic() - started))
            cb = self.wait_callback(node, after[node], left)
            elapsed = cb["ts"] - self._event_ts(after[node] + 1)
            self._wait_vm(node, "halted", 30, f"{node} powered itself off")
            events = self.events(after[node])
            ignition = json.loads(self.http(f"/ignition?mac={n.mac.replace(':', '-')}") or "{}")
            results.append(BootResult(node=n, after=after[node], callback=cb, events=events,
                                      steps=trace.timeline(events, n.mac, n.name),
                                      problems=trace.check_callback(cb, ignition), seconds=elapsed))
        return results

    def watchdog_cycle(self, node: str, timeout: float = 900.0, progress=print) -> WatchdogRun:
        """A beating node (beating_node()) end to end: power on through the device, its
        callback and first heartbeat, the silence after its last beat, the device's power
        cycle, and its second boot to a callback and a heartbeat with a new boot id; then its
        relay off (else the watchdog cycles it again). Everything comes from the history."""
        from bastion.lab import trace

        n = self.node(node)
        if not n.heartbeat_s:
            raise LabError(f"{node} does not beat (no heartbeat_s): see beating_node()")
        deadline = time.monotonic() + timeout
        after = self.power_on(node)
        progress(f"{node}: relay on; following it to its callback and heartbeats")

        def first(kind: str, since: int, what: str, pred=lambda e: True) -> dict:
            while True:
                for e in self.events(since, kind=kind):
                    if e.get("machine") == node and pred(e):
                        return e
                for key in ("device", "controller", "wiring"):
                    if not self.procs.alive(key):
                        raise LabError(f"lab {key} died; see {self.logs / (key + '.log')}")
                if time.monotonic() > deadline:
                    raise LabError(f"{node}: no {what} within {timeout:.0f}s; its console: "
                                   f"{self.logs / (node + '.console')}")
                time.sleep(1)

        try:
            cb1 = first("callback", after, "first callback")
            beat1 = first("heartbeat", cb1["id"], "first heartbeat")
            progress(f"{node}: beating (boot {beat1['payload'].get('boot_id')}); then silence")
            cycle = first("watchdog", beat1["id"], "watchdog power cycle",
                          lambda e: e["payload"].get("action") == "cycle")
            progress(f"{node}: the device power-cycled it; following its second boot")
            cb2 = first("callback", cycle["id"], "second callback")
            beat2 = first("heartbeat", cb2["id"], "heartbeat of the second boot")
        finally:
            self.power(node, "off")
        events = self.events(after)
        return WatchdogRun(node=n, events=events, steps=trace.timeline(events, n.mac, n.name),
                           boot_ids=[beat1["payload"].get("boot_id"),
                                     beat2["payload"].get("boot_id")],
                           callbacks=[cb1, cb2], cycle=cycle)

    def _event_ts(self, event_id: int) -> float:
        """The time of the first event with an id of at least `event_id`."""
        evs = self.events(event_id - 1, limit=1)
        return evs[0]["ts"] if evs else time.time()

    def _wait(self, pred, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise LabError(f"timed out waiting for {what}")
            time.sleep(0.2)

    def _wait_vm(self, node: str, state: str, timeout: float, what: str) -> None:
        """Wait for the node's VM to be in `state` (vm_state). The node is this call's own
        argument, so a caller's loop cannot change it under the wait."""
        self._wait(lambda: self.vm_state(node) == state, timeout, what)

    def status(self) -> dict:
        procs = {k: self.procs.alive(k) for k in ("router", "device", "controller", "wiring")}
        device = None
        out = self.http("/api/v1/device", check=False) if procs["controller"] else None
        if out:
            device = json.loads(out)
        return {
            "lab": self.net.name, "namespaces_exist": self.net.exists(), "processes": procs,
            "nodes": {n.name: {"mac": n.mac, "firmware": n.firmware, "arch": n.arch,
                               "relay": n.channel,
                               "vm": self.vm_state(n.name)} for n in self.nodes()},
            "device": device,
        }


@dataclass
class BootResult:
    node: Node
    after: int
    callback: dict
    events: list[dict]
    steps: list  # trace.Step
    problems: list[str]
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class WatchdogRun:
    node: Node
    events: list[dict]
    steps: list  # trace.Step, both boots
    boot_ids: list  # of the first heartbeat of each boot
    callbacks: list[dict]
    cycle: dict  # the device's watchdog event


class Wiring:
    """The lab's mains wiring: each node's VM runs while its relay channel is on.

    Watches the sim board's relay outputs (relays.state in its flash). Relay on starts the VM;
    relay off kills it at once, like pulling power. A VM that powers itself off stays off until
    its relay goes off and on again, as a real machine would."""

    poll_s = 0.1

    def __init__(self, lab: Lab):
        import subprocess

        self._subprocess = subprocess
        self.lab = lab
        self.nodes = lab.nodes()
        self.running: dict[str, object] = {}
        self.halted: set[str] = set()
        self.status_file = lab.workdir / "wiring.json"
        self.boots: dict[str, int] = {n.name: 0 for n in self.nodes}

    def _relays(self) -> bytes:
        try:
            return (self.lab.flash / "relays.state").read_bytes()
        except OSError:
            return b""

    def _log(self, **ev) -> None:
        print(json.dumps({"t": round(time.time(), 3), **ev}), flush=True)

    def step(self) -> bool:
        state = self._relays()
        changed = False
        for n in self.nodes:
            on = len(state) > n.channel and state[n.channel] == ord("1")
            proc = self.running.get(n.name)
            if proc is not None and proc.poll() is not None:  # type: ignore[attr-defined]
                self.running.pop(n.name)
                self.halted.add(n.name)
                self._log(ev="vm", node=n.name, state="halted", rc=proc.returncode)  # type: ignore[attr-defined]
                changed = True
                proc = None
            if on and proc is None and n.name not in self.halted:
                # the VM holds its own copy of the log's descriptor: ours is closed at once,
                # also when QEMU cannot be started
                with open(self.lab.logs / f"{n.name}.qemu.log", "ab") as log:
                    self.running[n.name] = self._subprocess.Popen(
                        self.lab.qemu_command(n), stdout=log, stderr=self._subprocess.STDOUT,
                        stdin=self._subprocess.DEVNULL)
                self.boots[n.name] += 1
                self._log(ev="vm", node=n.name, state="started", channel=n.channel,
                          pid=self.running[n.name].pid)  # type: ignore[attr-defined]
                changed = True
            elif not on:
                if proc is not None:
                    proc.kill()  # type: ignore[attr-defined]
                    proc.wait()  # type: ignore[attr-defined]
                    self.running.pop(n.name)
                    self._log(ev="vm", node=n.name, state="power-cut", channel=n.channel)
                    changed = True
                if n.name in self.halted:
                    self.halted.discard(n.name)
                    changed = True
        if changed:
            self.write_status()
        return changed

    def write_status(self) -> None:
        st = {}
        for n in self.nodes:
            p = self.running.get(n.name)
            st[n.name] = {
                "state": "running" if p is not None else
                         ("halted" if n.name in self.halted else "off"),
                "pid": p.pid if p is not None else None,  # type: ignore[attr-defined]
                "boots": self.boots[n.name],
            }
        atomic.write_json(self.status_file, st)

    def run(self) -> None:
        import signal

        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        self.write_status()
        try:
            while not stop:
                self.step()
                time.sleep(self.poll_s)
        finally:
            for p in self.running.values():
                p.kill()  # type: ignore[attr-defined]
                p.wait()  # type: ignore[attr-defined]


def render_timeline(result: BootResult) -> None:
    """Print a boot's timeline and verdict as a table (rich)."""
    from rich.console import Console
    from rich.table import Table

    out = Console()
    t = Table("+s", "step", "detail", title=f"{result.node.name} ({result.node.firmware} "
              f"{result.node.arch}, "
              f"{result.node.mac}): boot timeline")
    for s in result.steps:
        t.add_row(f"{s.t:6.2f}", s.stage, s.detail)
    out.print(t)
    if result.ok:
        out.print(f"[green]{result.node.name}: booted to its callback in {result.seconds:.1f} s; "
                  f"every file Ignition wrote matches its config "
                  f"({result.callback['payload'].get('digest')})[/green]")
    else:
        out.print(f"[red]{result.node.name}: the boot did not check out:[/red]")
        for p in result.problems:
            out.print(f"  [red]- {p}[/red]")
