"""The command lines' progress bar for bytes on the move (rich): a download, a copy onto a
device's flash. For a terminal only: elsewhere (logs, CI) the callers print a line per file."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress


def byte_progress(console: Console) -> Progress:
    """Progress with a line per task: its description, a bar, bytes done of the total, the
    speed and the time left. Not started: the caller starts and stops it."""
    from rich.progress import (  # rich is imported only when a bar is shown
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
