"""bastion.progress: the byte progress bar the download and the flash copy show on a terminal."""

from __future__ import annotations

import io

from bastion.progress import byte_progress
from rich.console import Console


def test_a_task_shows_its_name_and_the_bytes_done_of_the_total():
    out = io.StringIO()
    progress = byte_progress(Console(file=out, force_terminal=True, width=120))
    task = progress.add_task("RPi4_UEFI_Firmware.zip", total=4_000_000, completed=1_000_000)
    progress.advance(task, 1_000_000)
    progress.start()
    progress.stop()
    text = out.getvalue()
    assert "RPi4_UEFI_Firmware.zip" in text
    assert "2.0/4.0 MB" in text
