#!/usr/bin/env python3
"""Boot time of a lab node through Edge Bastion, against the seed user's setup in the same run.

One run boots the same QEMU node (uefi-1: OVMF, edk2's own PXE client) twice, on the same lab
network (bastion.lab: the namespaces NAME-lan and NAME-rt, dnsmasq as the home router), each
boot from a fresh copy of OVMF's variables:

1. **Edge Bastion**: `bastion lab up` with that node; the device (the sim board) powers it on
   and answers its PXE, serves ipxe.efi by TFTP; the controller serves /boot.ipxe, /ipxe, the
   kernel, the initrd and Ignition, and takes the node's callback. Timed from the relay-on event
   to the callback event (the controller's history).
2. **The baseline**, the setup the seed user had before: dnsmasq as proxyDHCP and TFTP server
   (ipxe.efi for edk2, the /boot.ipxe URL for iPXE), and nginx at the controller's address
   serving copies of what the controller answered in step 1 (/boot.ipxe, the node's /ipxe
   script, its Ignition config, the same kernel and initrd) and answering the callback. Timed
   from QEMU's start to the callback's line in nginx's access log.

Prints both times, the ratio Edge Bastion / baseline and the machine's load, for each of --runs
rounds. Needs root (namespaces, taps) and what `bastion lab` needs. Uses the lab name and
prefix given (defaults "ebbl", 10.93.0); whatever an earlier run of that name left is removed
first, and everything this run starts is stopped by its PID, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bastion.lab.lab import CONTROLLER_PORT, Lab, default_nodes, router_command
from bastion.lab.netns import Supervisor, run_with_cleanup, teardown


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def bastion_boot(lab: Lab, node_name: str, timeout: float, canned: Path) -> float:
    """Boot the node through Edge Bastion; keep copies of what the controller served it."""
    node = next(n for n in default_nodes() if n.name == node_name)
    lab.up([node], progress=lambda line: print(f"  bastion: {line}"))
    try:
        (lab.workdir / f"{node.name}.OVMF_VARS.fd").unlink(missing_ok=True)  # a fresh NVRAM
        result = lab.boot(node.name, timeout, progress=lambda line: print(f"  bastion: {line}"))
        if not result.ok:
            raise RuntimeError(f"bastion boot: {'; '.join(result.problems)}")
        hexhyp = node.mac.replace(":", "-")
        canned.mkdir(parents=True, exist_ok=True)
        (canned / "boot.ipxe").write_text(lab.http("/boot.ipxe") or "")
        (canned / "ipxe").write_text(lab.http(f"/ipxe?mac={hexhyp}") or "")
        (canned / "ignition").write_text(lab.http(f"/ignition?mac={hexhyp}") or "")
        (canned / "assets").mkdir(exist_ok=True)
        shutil.copytree(lab.site / "assets" / "lab", canned / "assets" / "lab", dirs_exist_ok=True)
        return result.seconds
    finally:
        lab.down()


def nginx_conf(tmp: Path, listen: str, canned: Path) -> str:
    return f"""\
user root root;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
    log_format timed '$msec "$request" $status $body_bytes_sent';
    access_log {tmp}/nginx-access.log timed;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    default_type application/octet-stream;
    sendfile on;
    server {{
        listen {listen};
        root {canned};
        location /assets/ {{ }}
        location = /boot.ipxe {{ default_type text/plain; alias {canned}/boot.ipxe; }}
        location = /ipxe {{ default_type text/plain; alias {canned}/ipxe; }}
        location = /ignition {{ default_type application/json; alias {canned}/ignition; }}
        location = /callback {{ return 200 "ok\\n"; }}
    }}
}}
"""


def proxy_dhcp_command(prefix: str, tftp_root: Path, script_url: str) -> list[str]:
    """dnsmasq as the seed user ran it beside their home router: proxyDHCP and TFTP, in
    matchbox's recipe. edk2 (arch 7, BC_EFI; or 9) gets ipxe.efi by TFTP, iPXE (user class
    iPXE) the script URL; one service per client, so no menu and no prompt."""
    return [
        "dnsmasq", "-k", "--conf-file=/dev/null", "--port=0", "--user=nobody",
        "--interface=br0", "--bind-interfaces",
        f"--dhcp-range={prefix}.0,proxy,255.255.255.0",
        "--dhcp-userclass=set:ipxe,iPXE",
        "--pxe-service=tag:!ipxe,BC_EFI,PXE,ipxe.efi",
        "--pxe-service=tag:!ipxe,x86-64_EFI,PXE,ipxe.efi",
        f"--pxe-service=tag:ipxe,BC_EFI,iPXE,{script_url}",
        f"--pxe-service=tag:ipxe,x86-64_EFI,iPXE,{script_url}",
        "--enable-tftp", f"--tftp-root={tftp_root}", "--log-dhcp", "--log-facility=-",
    ]  # fmt: skip


def baseline_boot(lab: Lab, node_name: str, timeout: float, canned: Path, tmp: Path) -> float:
    """Boot the node through dnsmasq (proxyDHCP + TFTP) and nginx, on the same lab network."""
    node = next(n for n in default_nodes() if n.name == node_name)
    net = lab.net
    procs = Supervisor(tmp / "baseline-state.json", grace=5.0)
    teardown(net)
    try:
        lab.workdir.mkdir(parents=True, exist_ok=True)
        lab.logs.mkdir(parents=True, exist_ok=True)
        net.create()
        net.add_tap(node.tap)
        procs.start("router", router_command(net, tmp / "leases"), netns=net.router,
                    log=tmp / "router.log")  # fmt: skip
        tftp = tmp / "tftp"
        tftp.mkdir(exist_ok=True)
        shutil.copyfile(lab.flash / "tftp" / "ipxe.efi", tftp / "ipxe.efi")
        script_url = f"http://{net.controller_ip}:{CONTROLLER_PORT}/boot.ipxe"
        procs.start("proxydhcp", proxy_dhcp_command(net.prefix, tftp, script_url), netns=net.lan,
                    log=tmp / "proxydhcp.log")  # fmt: skip
        (tmp / "nginx.conf").write_text(
            nginx_conf(tmp, f"{net.controller_ip}:{CONTROLLER_PORT}", canned)
        )
        procs.start("nginx", ["nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf"),
                              "-g", "daemon off;"], netns=net.lan, log=tmp / "nginx.log")  # fmt: skip
        time.sleep(1.0)  # dnsmasq and nginx bind
        for name in ("router", "proxydhcp", "nginx"):
            if not procs.alive(name):
                raise RuntimeError(f"baseline {name} exited; see {tmp / (name + '.log')}")
        (lab.workdir / f"{node.name}.OVMF_VARS.fd").unlink(missing_ok=True)  # a fresh NVRAM
        access = tmp / "nginx-access.log"
        started = time.time()
        qemu = procs.start("node", lab.qemu_command(node), netns=net.lan, log=tmp / "qemu.log")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = access.read_text() if access.exists() else ""
            m = re.search(r"^(\d+\.\d+) \"POST /callback[^\"]*\" 200", text, re.MULTILINE)
            if m:
                return float(m.group(1)) - started
            if qemu.poll() is not None:
                raise RuntimeError(f"baseline node stopped before its callback; see {tmp}")
            time.sleep(0.2)
        raise RuntimeError(f"baseline node: no callback within {timeout:.0f} s; see {tmp}")
    finally:
        procs.stop_all()
        teardown(net)


def run(args: argparse.Namespace, tmp: Path) -> int:
    lab = Lab(args.name, args.prefix, Path(args.workdir) if args.workdir else None, args.accel)
    rows = []
    for r in range(args.runs):
        print(f"round {r + 1}: load {load_average()}")
        canned = tmp / f"canned-{r}"
        bastion_s = bastion_boot(lab, args.node, args.timeout, canned)
        print(f"  bastion: {args.node} to its callback in {bastion_s:.1f} s; load {load_average()}")
        base_tmp = tmp / f"baseline-{r}"
        base_tmp.mkdir(mode=0o755)
        base_s = baseline_boot(lab, args.node, args.timeout, canned, base_tmp)
        print(f"  baseline (dnsmasq proxyDHCP + TFTP, nginx): {base_s:.1f} s; load {load_average()}")
        rows.append({"bastion_s": round(bastion_s, 2), "baseline_s": round(base_s, 2),
                     "ratio": round(bastion_s / base_s, 3), "load": load_average()})  # fmt: skip
        print(f"  boot time ratio bastion/baseline: {bastion_s / base_s:.3f}")
    if len(rows) > 1:
        print(f"median ratio: {statistics.median(r['ratio'] for r in rows):.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"node": args.node, "runs": rows}, indent=2) + "\n")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Boot time of a lab node through Edge Bastion "
                                "against dnsmasq (proxyDHCP + TFTP) and nginx, same run.")  # fmt: skip
    p.add_argument("--node", default="uefi-1", choices=["uefi-1"], help="the lab node to boot")
    p.add_argument("--runs", type=int, default=1, help="rounds of both boots (default 1)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per boot (default 300)")
    p.add_argument("--name", default="ebbl", help="lab name (default ebbl)")
    p.add_argument("--prefix", default="10.93.0", help="the lab LAN's /24 (default 10.93.0)")
    p.add_argument("--workdir", help="the lab's directory (default var/lab/NAME)")
    p.add_argument("--accel", default="tcg", help="QEMU accelerator (default tcg)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    tmp = Path(tempfile.mkdtemp(prefix="bastion-boot-bench-"))
    tmp.chmod(0o755)  # dnsmasq drops to nobody, and reads its TFTP root below this

    def cleanup() -> None:
        lab = Lab(args.name, args.prefix, Path(args.workdir) if args.workdir else None, args.accel)
        lab.down()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    return run_with_cleanup(lambda: run(args, tmp), cleanup, errors=(RuntimeError,))


if __name__ == "__main__":
    sys.exit(main())
