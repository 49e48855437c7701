"""bastion.private: what the controller makes is 0700/0600 whatever the umask (the tests of the
console logs, the history and the log queues check that), and an existing file is left alone:
never opened for writing, so that a user who may only read it still reads it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from bastion import private

CONTROLLER = Path(private.__file__).resolve().parents[1]


def test_an_existing_file_a_reader_may_only_read_is_not_opened_for_writing(tmp_path):
    """`bastion events` by a user who may read the service's history but not write it: making
    the database private (EventStore, before SQLite opens it) opened it O_WRONLY first, a
    PermissionError before SQLite was even asked."""
    probe = "import sys; from bastion.private import create; create(sys.argv[1])"
    if os.geteuid() != 0:
        f = tmp_path / "events.db"
        f.write_bytes(b"")
        f.chmod(0o444)
        run = [sys.executable, "-c", probe, str(f)]
        kw = {"env": {**os.environ, "PYTHONPATH": str(CONTROLLER)}}
    else:  # root may write any file: the reader is `nobody`, with the system's Python
        python = shutil.which("python3", path="/usr/bin:/bin")
        if python is None:
            pytest.skip("needs /usr/bin/python3 to run as nobody")
        d = Path(tempfile.mkdtemp())  # not under tmp_path, which nobody cannot enter
        d.chmod(0o755)
        f = d / "events.db"
        f.write_bytes(b"")
        f.chmod(0o644)
        run = [python, "-c", probe, str(f)]
        kw = {"env": {"PYTHONPATH": str(CONTROLLER)}, "user": 65534, "group": 65534,
              "extra_groups": [], "cwd": "/"}  # fmt: skip
    try:
        r = subprocess.run(run, capture_output=True, text=True, timeout=60, check=False, **kw)
        assert r.returncode == 0, r.stderr
    finally:
        if os.geteuid() == 0:
            shutil.rmtree(f.parent)
