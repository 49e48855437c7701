"""The firmware's TFTP server over a link that drops, duplicates and reorders (lossy.py),
running as .mpy on the MicroPython unix port with a 128 KB heap. Judged with the tolerant
client in lossy.py: atftp and tftpy abort on a repeated OACK, which a correct server sends."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from lossy import LossyRelay, tolerant_fetch

TRANSFERS = 240
CLIENTS = 4  # as many as the default max_transfers: what 128 KB holds with every service


@pytest.mark.timeout(300)
def test_lossy_link_transfers_arrive_intact(sim_board):
    rng = random.Random(2349)
    files = {f"f{i}.bin": rng.randbytes(rng.randrange(0, 3 * 1024)) for i in range(24)}
    files["empty"] = b""
    files["exact"] = rng.randbytes(2048)  # a multiple of both block sizes used
    board = sim_board(
        {
            "script_url": "http://127.0.0.1:8080/boot.ipxe",
            "tftp": {"timeout_ms": 50, "retries": 10, "max_transfers": 4, "max_window": 4},
        },
        files,
        heap="128k",
    )
    port = board.ports["tftp"]
    names = sorted(files)
    jobs = [
        (names[i % len(names)], (512, 1024)[i % 2], (1, 4, 2)[i % 3]) for i in range(TRANSFERS)
    ]
    with LossyRelay(("127.0.0.1", port), drop=0.2, dup=0.05, reorder=0.2, seed=7) as relay:
        front = ("127.0.0.1", relay.port)
        with ThreadPoolExecutor(CLIENTS) as pool:
            got = list(
                pool.map(lambda j: tolerant_fetch(front, j[0], blksize=j[1], window=j[2]), jobs)
            )
    corrupt = [j for j, data in zip(jobs, got) if data != files[j[0]]]
    assert corrupt == []
    assert relay.stats["dropped"] > 0 and relay.stats["duplicated"] > 0
    assert relay.stats["delayed"] > 0

    # Every transfer the firmware started has ended (duplicated requests start extra ones,
    # which the client stops with ERROR 5 or which time out), and the server still serves.
    def ends():
        return [e for e in board.events if e.get("ev") == "tftp" and e.get("stage") == "end"]

    starts = [e for e in board.events if e.get("ev") == "tftp" and e.get("stage") == "start"]
    assert len(starts) >= TRANSFERS
    board.wait_event(lambda e: len(ends()) >= len(starts), timeout=30)
    done = ends()
    assert sum(e["result"] == "ok" for e in done) >= TRANSFERS * 0.9
    assert sum(e["resends"] for e in done) > 0 and sum(e["dup_acks"] for e in done) > 0
    assert tolerant_fetch(("127.0.0.1", port), "exact") == files["exact"]
