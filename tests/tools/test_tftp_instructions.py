"""tools/bench/tftp_instructions.py: it counts the firmware's instructions over whole transfers,
its copy of the firmware can wait at every block, and it leaves no process or namespace behind.

Behaviour only: no assertion looks at how many instructions were counted, only that some were.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from bastion.flash import sim
from bastion.lab.netns import namespaces
from benchkit import REPO, load, wait_gone
from netkit import need_root

TOOL = REPO / "tools" / "bench" / "tftp_instructions.py"
tftp_instructions = load("tftp_instructions")


@pytest.mark.parametrize(("size", "blksize", "n"), [
    (850528, 1468, 580),  # ipxe.efi: 579 full blocks and a short one
    (2 * 1468, 1468, 3),  # a whole number of blocks ends with an empty one (RFC 1350)
    (0, 512, 1),
    (511, 512, 1),
])  # fmt: skip
def test_blocks_counts_the_data_packets_of_a_transfer(size, blksize, n):
    assert tftp_instructions.blocks(size, blksize) == n


def test_every_block_waits_sets_the_firmwares_burst_to_0_in_a_copy_only(tmp_path):
    copy = tftp_instructions.firmware_copy(sim.FIRMWARE_SRC, tmp_path / "fw", True)
    text = (copy / "tftpd.py").read_text()
    assert re.search(r"^_BURST = const\(0\)", text, re.MULTILINE), "the copy still reads ahead"
    # the repository's own firmware keeps its burst
    assert re.search(r"^_BURST = const\([1-9]\d*\)", (sim.FIRMWARE_SRC / "tftpd.py").read_text(),
                     re.MULTILINE)  # fmt: skip
    plain = tftp_instructions.firmware_copy(sim.FIRMWARE_SRC, tmp_path / "plain", False)
    assert (plain / "tftpd.py").read_text() == (sim.FIRMWARE_SRC / "tftpd.py").read_text()


def test_a_firmware_without_the_burst_line_is_refused_not_counted_as_is(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tftpd.py").write_text("_BURST = 8\n")
    with pytest.raises(tftp_instructions.SetupError, match="_BURST"):
        tftp_instructions.firmware_copy(src, tmp_path / "fw", True)


def test_a_run_counts_whole_transfers_and_leaves_nothing_behind():
    need_root("valgrind", "callgrind_control", "callgrind_annotate", "curl")
    if not tftp_instructions.DEFAULT_FILE.is_file():
        pytest.skip(f"needs {tftp_instructions.DEFAULT_FILE} (the ipxe package)")
    cmd = [sys.executable, str(TOOL), "--transfers", "1", "--top", "5", "--every-block-waits"]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    m = re.search(r"^instructions: namespace (\S+) \(loopback only\), work directory (\S+)$", out,
                  re.MULTILINE)  # fmt: skip
    assert m, out
    pid = re.search(r"^  firmware: pid (\d+),", out, re.MULTILINE)
    assert pid, out
    assert "1 of ipxe.efi (850528 B, blksize 1468, 580 blocks each), 0 failed" in out, out
    assert "(every block waits: _BURST 0)" in out, out
    counted = re.search(r"^instructions: ([\d,]+) in all, ([\d,]+) per transfer, ([\d,]+) per "
                        r"block$", out, re.MULTILINE)  # fmt: skip
    assert counted and int(counted.group(3).replace(",", "")) > 0, out
    # five functions by their own instructions, none of those still running at the dump (which
    # have all their callees' put to them: 100% and more)
    shares = [float(p) for p in re.findall(r"^ +[\d,]+ +([\d.]+)% +\S", out, re.MULTILINE)]
    assert len(shares) == 5 and all(0 < p < 99 for p in shares), out
    assert wait_gone([int(pid.group(1))]) == []
    assert m.group(1) not in namespaces()
    assert not tftp_instructions.Path(m.group(2)).exists()
