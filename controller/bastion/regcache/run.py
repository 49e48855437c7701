"""Running the site's registry cache: each mirror's Distribution registry (Debian's
`docker-registry`) with its config.yml, kept alive and kept within its storage bound.

    state_dir(site, override)    where the configs and the cached images live
    render(cache, state, store)  write every instance's config.yml (atomically, mode 0600)
    prune(inst, ...)             bring a stopped instance's storage under its bound
    Runner                       start them all, restart one that ends, prune one over its
                                 bound, stop them all on request

What bounds the storage. Distribution's proxy expires what it cached a fixed time after caching
it: 7 days in Debian's 2.8 (`proxy.ttl` makes it configurable only from Distribution 3), and
that expiry deletes the blobs and manifests themselves. Nothing bounds the size, so `max_size`
does: an instance over it is stopped (Distribution's garbage collector must not run beside a
serving registry), `registry garbage-collect` removes the blobs no manifest references, and if
that is not enough its storage is emptied: it is a cache, and containerd pulls from the
registry itself while the instance is down or empty. The Runner looks at each instance's size
at start and every `check_every` seconds.

A 2.8 proxy asks its upstream for /v2/ when it starts and exits when it cannot reach it, so an
instance started while the upstream is down ends at once; the Runner starts it again after
`restart_after` seconds, as often as it takes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bastion import atomic
from bastion.regcache.plan import HTTP_SECRET, Instance, config_yml, instances
from bastion.settings import parse_size

REGISTRY_PROGRAMS = ("docker-registry", "registry")  # Debian's name, then upstream's
# A registry's log (its requests, and a Go trace each time it ends: 1.8 KB a restart while the
# upstream cannot be reached, every 5 s) past this is copied to registry.log.1 and emptied.
LOG_MAX = 4 * 1024 * 1024


def cap_log(log: Path, limit: int = LOG_MAX) -> bool:
    """logrotate's copytruncate: the registry keeps its descriptor (opened for appending, so
    its next write lands at the new end); True when the log was over `limit` and was cut."""
    try:
        if log.stat().st_size <= limit:
            return False
        shutil.copyfile(log, log.with_name(log.name + ".1"))
        os.truncate(log, 0)
    except OSError:
        return False
    return True


class CacheError(Exception):
    pass


def registry_program() -> str:
    for name in REGISTRY_PROGRAMS:
        found = shutil.which(name)
        if found:
            return found
    raise CacheError("no Distribution registry program (Debian: apt-get install docker-registry)")


def state_dir(site_name: str, override: Path | str | None = None) -> Path:
    """`override`, else $XDG_STATE_HOME/edge-bastion/registry-cache/<site>."""
    if override:
        return Path(override)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "edge-bastion" / "registry-cache" / site_name


def config_path(state: Path, inst: Instance) -> Path:
    return state / inst.name / "config.yml"


def storage_path(state: Path, inst: Instance) -> Path:
    return state / inst.name / "data"


def render(cache: Any, state: Path, store: Any) -> list[tuple[Instance, Path]]:
    """Write each instance's config.yml under `state`. Upstream credentials come from the secret
    store (`registry-cache/<name>/username` and `.../password`, both or neither), never from the
    site files; the HTTP secret that ties uploads together is made there on first use."""
    http_secret = store.get_or_create(HTTP_SECRET)
    out = []
    for inst in instances(cache):
        user, password = store.get(inst.username_secret()), store.get(inst.password_secret())
        if (user is None) != (password is None):
            raise CacheError(f"the secret store has only one of {inst.username_secret()} and "
                             f"{inst.password_secret()}: set both, or neither")  # fmt: skip
        storage = storage_path(state, inst)
        storage.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = config_path(state, inst)
        text = config_yml(inst, storage, http_secret, user, password)
        atomic.write_text(path, text, mode=0o600, keep_mode=False)
        out.append((inst, path))
    return out


def disk_usage(path: Path) -> int:
    """Bytes the files under `path` occupy on disk."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def prune(inst: Instance, state: Path, max_bytes: int, program: str,
          echo: Callable[[str], None]) -> str:
    """Bring a stopped instance's storage under `max_bytes`: garbage-collect, then, if still
    over, empty it. Returns what was done: "within", "collected" or "emptied"."""
    storage = storage_path(state, inst)
    used = disk_usage(storage)
    if used <= max_bytes:
        return "within"
    echo(f"{inst.mirror}: {used} bytes cached, bound {max_bytes}: garbage-collecting")
    r = subprocess.run([program, "garbage-collect", str(config_path(state, inst))],
                       capture_output=True, text=True, check=False)  # fmt: skip
    if r.returncode != 0:
        echo(f"{inst.mirror}: garbage-collect failed: {r.stderr.strip()[-500:]}")
    used = disk_usage(storage)
    if used <= max_bytes:
        return "collected"
    echo(f"{inst.mirror}: still {used} bytes: emptying its storage")
    shutil.rmtree(storage)
    storage.mkdir(mode=0o700)
    return "emptied"


class Runner:
    """Each instance as a child process, supervised from one thread (`run`, until `stop`)."""

    def __init__(self, cache: Any, state: Path, store: Any, echo: Callable[[str], None] = print,
                 check_every: float = 3600.0, restart_after: float = 5.0, program: str | None = None):
        self.cache, self.state, self.store, self.echo = cache, state, store, echo
        self.max_bytes = parse_size(cache.serve.max_size, "max_size")
        self.check_every, self.restart_after = check_every, restart_after
        self.program = program or registry_program()
        self.procs: dict[str, subprocess.Popen] = {}
        self._stopping = threading.Event()

    def _start(self, inst: Instance) -> None:
        prune(inst, self.state, self.max_bytes, self.program, self.echo)
        cap_log(self.state / inst.name / "registry.log")
        log = (self.state / inst.name / "registry.log").open("ab")
        with log:
            self.procs[inst.name] = subprocess.Popen(
                [self.program, "serve", str(config_path(self.state, inst))],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.echo(f"{inst.mirror}: serving {inst.upstream} on {inst.listen} "
                  f"(pid {self.procs[inst.name].pid})")  # fmt: skip

    def _stop_one(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def run(self) -> None:
        """Render the configs, start every instance, and supervise them until `stop`."""
        insts = [inst for inst, _ in render(self.cache, self.state, self.store)]
        for inst in insts:
            self._start(inst)
        next_check = time.monotonic() + self.check_every
        ended: dict[str, float] = {}
        try:
            while not self._stopping.wait(0.5):
                now = time.monotonic()
                for inst in insts:
                    cap_log(self.state / inst.name / "registry.log")
                    proc = self.procs.get(inst.name)
                    if proc is not None and proc.poll() is not None:
                        self.echo(f"{inst.mirror}: ended with {proc.returncode}; again in "
                                  f"{self.restart_after:g}s (its log: "
                                  f"{self.state / inst.name / 'registry.log'})")  # fmt: skip
                        del self.procs[inst.name]
                        ended[inst.name] = now
                    if inst.name not in self.procs and now - ended.get(inst.name, 0) >= self.restart_after:
                        self._start(inst)
                if now >= next_check:
                    next_check = now + self.check_every
                    for inst in insts:
                        if disk_usage(storage_path(self.state, inst)) > self.max_bytes:
                            self._stop_one(inst.name)
                            self._start(inst)  # prunes first
        finally:
            for name in list(self.procs):
                self._stop_one(name)

    def stop(self) -> None:
        self._stopping.set()
