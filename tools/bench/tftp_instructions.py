#!/usr/bin/env python3
"""The firmware's instructions per TFTP block, counted: a measure that a busy machine does not move.

Times on a shared machine move by more than a change to the firmware's per-block path is worth
(docs/benchmarks.md). This runs the firmware on the MicroPython unix port under valgrind's
callgrind, which counts the instructions the process runs in user space (the kernel's work, the
system calls themselves, is not counted), and asks it for one file over TFTP with curl:

1. lays out the firmware's flash as `bastion sim` does, from the repository's firmware/ or
   from --firmware DIR (another tree's firmware/, to compare two versions in one sitting);
   with --every-block-waits, in a copy whose tftpd.py reads no datagram before it waits
   (`_BURST` 0): under valgrind the firmware is slow enough that the client's ACK is nearly
   always there before it asks, which natively it seldom is, so this is the path a block
   takes on a real machine;
2. starts it under callgrind inside a network namespace of its own (`eb-instr-<pid>`, loopback
   only), its TFTP on 127.0.0.1:2069, and waits until a transfer comes back whole;
3. zeroes the counts (`callgrind_control -z`), runs --transfers curl transfers of the file at
   --blksize one after the other (each checked against the file's SHA-256), and dumps the
   counts (`callgrind_control -d`);
4. prints the instructions counted, per transfer and per block, and the --top functions of
   the interpreter by their own instructions (`callgrind_annotate`).

Which path a block takes still depends a little on timing, so runs of one tree differ by a few
percent: compare trees with a few runs each, in turns. Exit status: 0 when every transfer came
back whole, 1 when one did not, 2 when it could not run here (not root, valgrind or curl
missing). Every process it starts is stopped by its PID, and the namespace removed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bastion.flash import sim
from bastion.lab.netns import LabError, Namespace, run_with_cleanup

HOST = "127.0.0.1"  # inside the namespace only
TFTP_PORT = 2069
DHCP_PORT = 2067  # the firmware's other listeners, out of the way
PXE_PORT = 2011
DEFAULT_FILE = Path("/usr/lib/ipxe/ipxe.efi")
TOOLS = ("valgrind", "callgrind_control", "callgrind_annotate", "curl")
BURST = re.compile(r"^_BURST = const\(\d+\)", re.MULTILINE)


class SetupError(Exception):
    """It cannot run here: said, exit status 2."""


def blocks(size: int, blksize: int) -> int:
    """DATA packets of a transfer of `size` bytes: a file that is a whole number of blocks ends
    with an empty one (RFC 1350)."""
    return size // blksize + 1 if size % blksize == 0 else math.ceil(size / blksize)


def firmware_copy(src: Path, dest: Path, every_block_waits: bool) -> Path:
    """src's *.py in dest; with every_block_waits, tftpd.py's _BURST set to 0."""
    dest.mkdir(parents=True)
    for p in src.glob("*.py"):
        shutil.copyfile(p, dest / p.name)
    if every_block_waits:
        tftpd = dest / "tftpd.py"
        text, n = BURST.subn("_BURST = const(0)", tftpd.read_text())
        if n != 1:
            raise SetupError(f"{src}/tftpd.py has no `_BURST = const(N)` line to set to 0")
        tftpd.write_text(text)
    return dest


def lay_out(work: Path, src: Path, source: Path) -> Path:
    """The flash directory: the firmware compiled from src, board.json, the boot stub,
    device.json and tftp/<file>."""
    flash = work / "flash"
    saved = sim.FIRMWARE_SRC
    sim.FIRMWARE_SRC = src  # what compile_firmware reads
    try:
        sim.install_firmware(flash)
    finally:
        sim.FIRMWARE_SRC = saved
    # the firmware's own TFTP defaults; script_url is required, and unused here
    config = {"server_ip": HOST, "script_url": f"http://{HOST}/boot.ipxe"}
    (flash / "device.json").write_text(json.dumps(config))
    (flash / "tftp").mkdir()
    shutil.copyfile(source, flash / "tftp" / source.name)
    return flash


def totals(path: Path) -> int:
    """The instruction count of a callgrind output file (its `summary:` or `totals:` line)."""
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise SetupError(f"{path}: no summary line (callgrind wrote no counts)")


def top_functions(path: Path, n: int, counted: int) -> list[tuple[int, str]]:
    """The n functions with the most instructions of their own (not their callees'), as
    callgrind_annotate lists them, with the build's directories left out of their names. The
    functions still running when the counts were dumped (main, the interpreter's loops, the
    task that asked for the dump) have all their callees' instructions put to them, 100% and
    more: they are left out."""
    out = subprocess.run(["callgrind_annotate", "--auto=no", "--inclusive=no", "--threshold=100",
                          str(path)], capture_output=True, text=True, check=True).stdout  # fmt: skip
    rows = []
    for line in out.splitlines():
        m = re.match(r"^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(\S.*)$", line)
        if not m or "PROGRAM TOTALS" in line:
            continue
        name = re.sub(r" \[.*\]$", "", m.group(2))
        name = re.sub(r"^.*/(py|extmod|ports/unix|shared|nptl|csu|elf)/", r"\1/", name)
        count = int(m.group(1).replace(",", ""))
        if count < 0.99 * counted:
            rows.append((count, name))
    rows.sort(reverse=True)
    return rows[:n]


def fetch(ns: Namespace, source: Path, blksize: int, timeout: float) -> bytes | None:
    """The file over TFTP with curl inside the namespace; None when curl failed."""
    r = ns.run("curl", "-s", "--max-time", str(timeout), "--tftp-blksize", str(blksize),
               f"tftp://{HOST}:{TFTP_PORT}/{source.name}", capture_output=True)  # fmt: skip
    return r.stdout if r.returncode == 0 else None


def callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], capture_output=True, check=True, timeout=60)


def run(args: argparse.Namespace, ns: Namespace, work: Path) -> int:
    source = args.file
    want = hashlib.sha256(source.read_bytes()).hexdigest()
    src = args.firmware or sim.FIRMWARE_SRC
    copy = firmware_copy(src, work / "src" / "firmware", args.every_block_waits)
    flash = lay_out(work, copy, source)
    ns.create()
    print(f"instructions: namespace {ns.name} (loopback only), work directory {work}", flush=True)
    out = work / "callgrind.out"
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
           *sim.firmware_command(flash, HOST, DHCP_PORT, PXE_PORT, TFTP_PORT, args.heap)]  # fmt: skip
    # stdin is the sim board's console, left open
    proc = ns.start(cmd, name="firmware", log=work / "firmware.log", cwd=flash,
                    stdin=subprocess.PIPE)  # fmt: skip
    print(f"  firmware: pid {proc.pid}, {HOST}:{TFTP_PORT}, under callgrind", flush=True)
    deadline = time.monotonic() + args.boot_timeout
    while True:  # booting under valgrind takes a while; the first whole transfer says it is up
        got = fetch(ns, source, args.blksize, 30)
        if got is not None and hashlib.sha256(got).hexdigest() == want:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            print(f"the firmware did not serve {source.name} (its output: {work}/firmware.log)")
            return 1
        time.sleep(1)
    callgrind_control("-z", str(proc.pid))
    bad = 0
    for _ in range(args.transfers):
        got = fetch(ns, source, args.blksize, 60)
        if got is None or hashlib.sha256(got).hexdigest() != want:
            bad += 1
    callgrind_control("-d", str(proc.pid))
    ns.procs.stop("firmware")
    dumps = sorted(work.glob("callgrind.out.*"), key=lambda p: int(p.suffix[1:]))
    if not dumps:
        raise SetupError("callgrind wrote no dump for callgrind_control -d")
    counted = totals(dumps[0])
    n_blocks = blocks(source.stat().st_size, args.blksize)
    per = counted / args.transfers
    print(f"firmware: {src}{' (every block waits: _BURST 0)' if args.every_block_waits else ''}, "
          f"heap {args.heap}")  # fmt: skip
    print(f"transfers: {args.transfers} of {source.name} ({source.stat().st_size} B, blksize "
          f"{args.blksize}, {n_blocks} blocks each), {bad} failed")  # fmt: skip
    print(f"instructions: {counted:,} in all, {per:,.0f} per transfer, "
          f"{per / n_blocks:,.0f} per block")  # fmt: skip
    if args.top:
        print(
            f"the {args.top} functions with the most instructions of their own (those still "
            "running at the dump, the interpreter's loop among them, left out):"
        )
        for count, name in top_functions(dumps[0], args.top, counted):
            print(f"  {count:>14,}  {100 * count / counted:5.1f}%  {name}")
    return 1 if bad else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="docs/benchmarks.md tells what the counts have shown.")  # fmt: skip
    p.add_argument("--transfers", type=int, default=6, help="transfers counted (default 6)")
    p.add_argument("--blksize", type=int, default=1468, help="TFTP blksize asked (default 1468)")
    p.add_argument("--heap", default="128k", help="the firmware's -X heapsize (default 128k)")
    p.add_argument(
        "--file", type=Path, default=DEFAULT_FILE, help=f"the file served (default {DEFAULT_FILE})"
    )
    p.add_argument(
        "--firmware",
        type=Path,
        default=None,
        help="a firmware/ directory to count (default this repository's)",
    )
    p.add_argument(
        "--every-block-waits",
        action="store_true",
        help="no datagram read before a wait (_BURST 0): the path most blocks take natively",
    )
    p.add_argument(
        "--top",
        type=int,
        default=12,
        help="functions listed by their own instructions (default 12; 0: none)",
    )
    p.add_argument(
        "--boot-timeout",
        type=float,
        default=180,
        help="seconds to wait for the first whole transfer (default 180)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    if args.transfers < 1:
        p.error("--transfers must be at least 1")
    return args


def check_tools(args: argparse.Namespace) -> None:
    if os.geteuid() != 0:
        raise SetupError("run as root: the firmware runs in a network namespace of its own")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise SetupError(f"missing: {', '.join(missing)} (tools/setup installs them)")
    if not args.file.is_file():
        raise SetupError(f"{args.file}: no such file")
    if args.firmware is not None and not (args.firmware / "tftpd.py").is_file():
        raise SetupError(f"--firmware {args.firmware}: not a firmware/ directory (no tftpd.py)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    ns = Namespace(f"eb-instr-{os.getpid()}")
    work = Path(tempfile.mkdtemp(prefix="eb-tftp-instr-"))

    def count() -> int:
        check_tools(args)
        return run(args, ns, work)

    def cleanup() -> None:
        ns.destroy()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    return run_with_cleanup(count, cleanup, errors=(SetupError, LabError))


if __name__ == "__main__":
    sys.exit(main())
