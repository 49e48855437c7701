"""`bastion registry-cache`: the site's pull-through registry cache on the controller host
(docs/registry-cache.md)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from bastion.clitypes import FiniteRange
from bastion.settings import secrets_option

_site_arg = click.option(
    "--site", "site_dir", required=True, envvar="BASTION_SITE",
    type=click.Path(exists=True, file_okay=False, path_type=Path), help="The site directory.",
)  # fmt: skip
_state_opt = click.option(
    "--state", "state", type=click.Path(file_okay=False, path_type=Path),
    envvar="BASTION_REGISTRY_CACHE_DIR",
    help="Where the configs and the cached images go "
         "[default: $XDG_STATE_HOME/edge-bastion/registry-cache/<site>].",
)  # fmt: skip


def _load(site_dir: Path, state: Path | None, secrets_dir: Path | None):
    """(the cache, its state directory, the secret store): the site loaded as `bastion serve
    --secrets` loads it, its cluster checked against the same store the credentials come from."""
    from bastion.regcache.run import served, state_dir
    from bastion.site.load import SiteError, load_site
    from bastion.state.secrets import SecretStore
    from bastion.state.secrets import secrets_dir as store_dir

    try:
        site = load_site(site_dir, secrets=secrets_dir)
    except SiteError as e:
        for problem in e.problems:
            click.echo(problem, err=True)
        sys.exit(1)
    cache = served(site)
    if cache is None:
        raise click.ClickException(
            f"{site_dir}/site.yaml: cluster.registry_cache.serve is not set: this site's nodes "
            "are not told to use a cache on this host"
        )
    return cache, state_dir(site.name, state), SecretStore(store_dir(site.name, secrets_dir))


@click.group("registry-cache")
def registry_cache_group() -> None:
    """The site's pull-through registry cache: one Distribution registry per mirror.

    Configured by site.yaml cluster.registry_cache (with serve:); each mirror listens on the
    port mirrors gives it ({docker.io: 5000, ghcr.io: 5001}), or in the list form mirror i on
    the port of its url plus i, which is what the nodes' registries.yaml names. Give each
    its port: in the list, one put before others moves them to other ports.
    """


@registry_cache_group.command("render")
@_site_arg
@_state_opt
@secrets_option
def render_command(site_dir: Path, state: Path | None, secrets_dir: Path | None) -> None:
    """Write each mirror's config.yml; print mirror, listen address, upstream and file."""
    from bastion.regcache.run import CacheError, render

    cache, state, store = _load(site_dir, state, secrets_dir)
    try:
        for inst, path in render(cache, state, store):
            click.echo(f"{inst.mirror}\t{inst.listen}\t{inst.upstream}\t{path}")
    except CacheError as e:
        raise click.ClickException(str(e)) from None


@registry_cache_group.command("run")
@_site_arg
@_state_opt
@secrets_option
@click.option("--check-every", default=3600.0, show_default=True, metavar="SECONDS",
              type=FiniteRange(1, 7 * 86400),
              help="How often each mirror's storage is measured against serve.max_size (1 s to a week).")  # fmt: skip
@click.option("--restart-after", default=5.0, show_default=True, metavar="SECONDS",
              type=FiniteRange(0, 3600),
              help="How long after a registry ends it is started again (0 to 3600 s).")  # fmt: skip
def run_command(site_dir: Path, state: Path | None, secrets_dir: Path | None,
                check_every: float, restart_after: float) -> None:
    """Write the configs and run every mirror's registry, supervised, until SIGTERM or Ctrl-C.

    A registry that ends is started again; one over its storage bound is stopped,
    garbage-collected (emptied if that is not enough) and started again. When the site's
    files change, as `bastion serve` reloads them, the mirrors whose config changed (a port,
    an upstream) are started again on the new plan.
    """
    from bastion.regcache.run import CacheError, Runner, SiteWatch

    def echo(message: str) -> None:
        click.echo(message, err=True)

    # watching from before the first load: an edit made while it loads is seen
    watch = SiteWatch(site_dir, echo, secrets=secrets_dir)
    cache, state, store = _load(site_dir, state, secrets_dir)
    try:
        runner = Runner(cache, state, store, echo=echo, check_every=check_every,
                        restart_after=restart_after, follow=watch)  # fmt: skip
    except CacheError as e:
        raise click.ClickException(str(e)) from None
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: runner.stop())
    try:
        runner.run()
    except CacheError as e:
        raise click.ClickException(str(e)) from None


@registry_cache_group.command("gc")
@_site_arg
@_state_opt
@secrets_option
def gc_command(site_dir: Path, state: Path | None, secrets_dir: Path | None) -> None:
    """Bring each mirror's storage under serve.max_size (garbage-collect, then empty).

    Only while the cache is not running: Distribution's garbage collector must not run beside
    a serving registry.
    """
    from bastion.regcache.run import CacheError, prune, registry_program, render
    from bastion.settings import parse_size

    cache, state, store = _load(site_dir, state, secrets_dir)
    try:
        program = registry_program()
        for inst, _path in render(cache, state, store):
            done = prune(inst, state, parse_size(cache.serve.max_size, "max_size"), program,
                         lambda m: click.echo(m, err=True))  # fmt: skip
            click.echo(f"{inst.mirror}\t{done}")
    except CacheError as e:
        raise click.ClickException(str(e)) from None


COMMANDS = (registry_cache_group,)
