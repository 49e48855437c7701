"""Running the site's registry cache: each mirror's Distribution registry (Debian's
`docker-registry`) with its config.yml, kept alive and kept within its storage bound.

    state_dir(site, override)    where the configs and the cached images live
    render(cache, state, store)  write every instance's config.yml (atomically, mode 0600)
    prune(inst, ...)             bring a stopped instance's storage under its bound
    Runner                       start them all, restart one that ends, prune one over its
                                 bound, follow the site as it changes, stop them all on request
    handed_over(old, new)        the endpoints an edit gives to another registry
    SiteWatch                    the site again when its files changed, as `bastion serve` sees it

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

Following the site. A mirror's port is the one `mirrors` gives it, or in the list form the
url's plus its place there (bastion.regcache.plan), and `bastion serve` reloads the site when
its files change and tells every node booted after that the new ports. A cache that kept the
plan it started with served quay.io's port as docker.io's proxy once quay.io was put first in
the list, and a node booted after the edit pulled docker.io's names from another registry. So
the Runner watches the site the way serve does (its files changed, then the same at two looks
running; an edit that does not load changes nothing) and, when the plan changes, stops every
instance whose port, upstream or config changed and starts them again with the new plan. The
others keep serving. A node booted before the edit keeps the endpoints it was told until it
boots again: an edit that gives one registry's endpoint to another (the list form, a registry
put first or removed from the middle) is said in the output, since nothing here can refuse
such a node's pulls (Distribution ignores containerd's `ns` parameter). With fixed ports
(`mirrors: {registry: port}`) only an edit that gives a registry another's port does that.
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
from bastion.site.holder import Settle, fingerprint
from bastion.site.load import SiteError, load_site

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


def served(site: Any) -> Any | None:
    """The site's cluster.registry_cache when the controller host serves it (`serve:`), else
    None."""
    section = site.settings.cluster
    cache = section.registry_cache if section is not None else None
    return cache if cache is not None and cache.serve is not None else None


def render(cache: Any, state: Path, store: Any) -> list[tuple[Instance, Path]]:
    """Write each instance's config.yml under `state`. Upstream credentials come from the secret
    store (`registry-cache/<name>/username` and `.../password`, both or neither), never from the
    site files; the HTTP secret that ties uploads together is made there on first use. All or
    nothing: a CacheError leaves every config.yml as it was (the Runner may be serving them)."""
    http_secret = store.get_or_create(HTTP_SECRET)
    todo = []
    for inst in instances(cache):
        user, password = store.get(inst.username_secret()), store.get(inst.password_secret())
        if (user is None) != (password is None):
            raise CacheError(f"the secret store has only one of {inst.username_secret()} and "
                             f"{inst.password_secret()}: set both, or neither")  # fmt: skip
        todo.append((inst, user, password))
    out = []
    for inst, user, password in todo:
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


class SiteWatch:
    """Called: the site again when its files changed, else None. By `bastion serve`'s rule
    (bastion.site.holder.Settle: a change, then the same files at two looks running), so that
    the plan the nodes are told and the one that runs change together; an edit that does not
    load is said (`echo`) and gives None, as serve keeps its last good site. Not a SiteHolder:
    one finishes an edit a crash cut short when it starts, writing the site directory, and this
    runs in its own process beside `bastion serve`'s."""

    def __init__(self, root: Path, echo: Callable[[str], None] = print,
                 secrets: Path | None = None):  # fmt: skip
        """`secrets`: the secret store each load reads the cluster's records from (`--secrets`;
        None: load_site's default), as the first load did."""
        self.root, self.echo, self.secrets = Path(root), echo, secrets
        self._settle = Settle(fingerprint(self.root))

    def __call__(self) -> Any | None:
        if not self._settle.changed(fingerprint(self.root)):
            return None
        try:
            return load_site(self.root, secrets=self.secrets)
        except SiteError as e:
            self.echo(f"{self.root}: the site changed but does not load; the mirrors are served "
                      "as before:\n" + "\n".join(e.problems))  # fmt: skip
            return None


def handed_over(old: list[Instance], new: list[Instance]) -> list[tuple[str, str, str]]:
    """(endpoint, the mirror it served, the mirror it serves now) for each endpoint `new`
    gives to another registry than `old` did: a node told it before pulls the first's image
    references from the second's proxy."""
    before = {inst.endpoint: inst.mirror for inst in old}
    return [(inst.endpoint, before[inst.endpoint], inst.mirror) for inst in new
            if before.get(inst.endpoint, inst.mirror) != inst.mirror]  # fmt: skip


class Runner:
    """Each instance as a child process, supervised from one thread (`run`, until `stop`).
    `follow`, called every `follow_every` seconds, gives the site again when it changed (a
    SiteWatch); the Runner then serves that site's plan."""

    def __init__(self, cache: Any, state: Path, store: Any, echo: Callable[[str], None] = print,
                 check_every: float = 3600.0, restart_after: float = 5.0,
                 program: str | None = None, follow: Callable[[], Any | None] | None = None,
                 follow_every: float = 1.0):
        self.cache, self.state, self.store, self.echo = cache, state, store, echo
        self.max_bytes = parse_size(cache.serve.max_size, "max_size")
        self.check_every, self.restart_after = check_every, restart_after
        self.program = program or registry_program()
        self.follow, self.follow_every = follow, follow_every
        self.procs: dict[str, subprocess.Popen] = {}
        # what runs: name -> (the instance, its config.yml as it was started)
        self.plan: dict[str, tuple[Instance, str]] = {}
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

    def _render(self, cache: Any) -> dict[str, tuple[Instance, str]]:
        written = render(cache, self.state, self.store)
        return {inst.name: (inst, path.read_text()) for inst, path in written}

    def adopt(self, site: Any) -> None:
        """Serve `site`'s plan: stop the instances it changes or drops, start the ones it
        changes or adds; the rest serve on. A site that no longer serves a cache here stops
        them all (its nodes are told to pull elsewhere, maybe from these very ports)."""
        cache = served(site)
        try:
            plan = self._render(cache) if cache is not None else {}
        except CacheError as e:
            self.echo(f"the site changed, but {e}: the mirrors are served as before")
            return
        changed = [name for name in self.plan if plan.get(name) != self.plan[name]]
        added = [name for name in plan if name not in self.plan]
        for endpoint, was, now in handed_over([i for i, _ in self.plan.values()],
                                              [i for i, _ in plan.values()]):  # fmt: skip
            self.echo(f"warning: {endpoint} served {was} and now serves {now}: a node booted "
                      f"before this edit pulls {was}'s images through {now}'s proxy (the same "
                      f"repository path from {now}) until it boots again: reboot the k3s nodes "
                      "one at a time (with mirrors: {registry: port} only a port given to "
                      "another registry does this)")  # fmt: skip
        if cache is None:
            self.echo("the site no longer has cluster.registry_cache.serve: stopping every mirror")
        elif changed:
            self.echo("the site changed: stopping "
                      f"{', '.join(self.plan[name][0].mirror for name in changed)}")  # fmt: skip
        elif not added:
            self.echo("the site changed: the mirrors are served as before")
        # every one stopped before any starts: a mirror's new port may be another's old one
        for name in changed:
            self._stop_one(name)
        if cache is not None:
            self.cache, self.max_bytes = cache, parse_size(cache.serve.max_size, "max_size")
        self.plan = plan
        for name in [*changed, *added]:
            if name in plan:
                self._start(plan[name][0])

    def run(self) -> None:
        """Render the configs, start every instance, and supervise them until `stop`."""
        self.plan = self._render(self.cache)
        for inst, _ in self.plan.values():
            self._start(inst)
        next_check = time.monotonic() + self.check_every
        next_follow = time.monotonic() + self.follow_every
        ended: dict[str, float] = {}
        try:
            while not self._stopping.wait(0.5):
                now = time.monotonic()
                if self.follow is not None and now >= next_follow:
                    next_follow = now + self.follow_every
                    site = self.follow()
                    if site is not None:
                        self.adopt(site)
                for inst, _ in self.plan.values():
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
                    for inst, _ in self.plan.values():
                        if disk_usage(storage_path(self.state, inst)) > self.max_bytes:
                            self._stop_one(inst.name)
                            self._start(inst)  # prunes first
        finally:
            for name in list(self.procs):
                self._stop_one(name)

    def stop(self) -> None:
        self._stopping.set()
