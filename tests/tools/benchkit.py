"""What the tests of tools/bench share: the bench scripts loaded as modules, and a run that is
interrupted by a signal and must leave nothing behind."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def load(name: str) -> ModuleType:
    """tools/bench/<name>.py as the module `name` (a script, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """The PIDs still there after up to `timeout` seconds (a stopped process takes a moment)."""
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def interrupted(cmd: list[str], running: Callable[[str], bool], sig: int,
                check: Callable[[str], None] = lambda out: None) -> str:  # fmt: skip
    """Run a bench until a line of its output makes `running(line)` true, call check(its output
    so far), send it `sig`; returns its whole output once it has ended as an interrupted bench
    must: status 130, "interrupted" said, no traceback. It is killed if it does not end."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO)  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if running(line):
                break
        check("".join(lines))
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, "".join(lines) + rest
    assert "interrupted" in rest and "Traceback" not in rest, rest
    return "".join(lines) + rest
