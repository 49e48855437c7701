"""Files only the controller's user may read, whatever umask it was started with: the nodes'
console logs (consoles show secrets), the event history with its one-time token and state tables,
and the log-shipping queues (the nodes' journals).

The unit `bastion install-service` writes sets UMask=0077, but `bastion serve` run from a shell or
another service manager inherits the usual 022, under which open(2) and SQLite make files every
local user can read. So these are made 0700 (directories) and 0600 (files) here, explicitly:

    mkdir(path)        path and its missing parents, each made mode 0700; existing ones untouched
    create(path)       an empty file of mode 0600 unless one exists (then untouched): made before
                       sqlite3.connect, whose -wal and -shm files take the database's mode
    open_append(path)  append-only binary file object, made mode 0600 if missing

An existing file or directory keeps its mode: an operator's deliberate 0640 stays.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

DIR_MODE = 0o700
FILE_MODE = 0o600


def mkdir(path: Path | str) -> None:
    path = Path(path)
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=DIR_MODE)
        except FileExistsError:  # made meanwhile by another thread or process
            pass


def create(path: Path | str) -> None:
    # O_EXCL: an existing file is not even opened for writing (a reader that may only read it,
    # `bastion events` say, gets as far as SQLite lets it)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE))
    except FileExistsError:
        pass


def open_append(path: Path | str) -> BinaryIO:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    return os.fdopen(fd, "ab")
