"""`bastion fleet crds|resources`: the management cluster's side of a site (docs/fleet.md)."""

from __future__ import annotations

from pathlib import Path

import click
import yaml

from bastion.settings import secrets_option


@click.group("fleet")
def fleet_group() -> None:
    """Many sites from a management cluster: the Site and Machine custom resources."""


@fleet_group.command("crds")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path),
              help="Write sites.yaml and machines.yaml into this directory instead of printing.")
def crds_command(out: Path | None) -> None:
    """The Site and Machine CustomResourceDefinitions (apiextensions.k8s.io/v1), generated from
    the models that check the site files; `kubectl apply -f` them on the management cluster."""
    from bastion.fleet.crds import crds

    docs = crds()
    if out is None:
        click.echo(yaml.safe_dump_all(docs, sort_keys=False), nl=False)
        return
    out.mkdir(parents=True, exist_ok=True)
    from bastion import atomic

    for doc in docs:
        path = out / f"{doc['spec']['names']['plural']}.yaml"
        atomic.write_text(path, yaml.safe_dump(doc, sort_keys=False))
        click.echo(f"wrote {path}")


@fleet_group.command("resources")
@click.argument("site_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", required=True, help="The Site's name in the management cluster.")
@click.option("--namespace", default="edge-sites", show_default=True)
@click.option("--controller-url", required=True, metavar="URL",
              help="The site controller's API through the tunnel, e.g. http://10.200.0.1:8080.")
@secrets_option
def resources_command(site_dir: Path, name: str, namespace: str, controller_url: str,
                      secrets_dir: Path | None) -> None:  # fmt: skip
    """SITE_DIR's site.yaml and machines.yaml as a Site and its Machines (checked by loading
    SITE_DIR first, as `bastion site check` does, its cluster against the secret store)."""
    import re
    from urllib.parse import urlsplit

    from bastion.fleet.crds import K8S_NAME, resources
    from bastion.site.load import SiteError, load_site

    # what the API server takes: a DNS subdomain (RFC 1123) for a name, a DNS label for a
    # namespace; the name is the Machines' label value too, which is at most 63 characters
    if not K8S_NAME.fullmatch(name) or len(name) > 63:
        raise click.BadParameter(f"{name!r}: a site's name is lower-case letters, digits, '-' "
                                 "and '.', each dot between two of the others, starting and ending "
                                 "with a letter or digit, at most 63 (it labels its Machines)",
                                 param_hint="--name")  # fmt: skip
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", namespace):
        raise click.BadParameter(f"{namespace!r}: a namespace is lower-case letters, digits and '-', "
                                 "at most 63", param_hint="--namespace")  # fmt: skip
    try:  # urlsplit refuses 'http://[::1' (an unclosed bracket), .port a port out of range
        parts = urlsplit(controller_url)
        parts.port  # noqa: B018 - read for its ValueError
    except ValueError as e:
        raise click.BadParameter(f"{controller_url!r}: {e}", param_hint="--controller-url") from None
    if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", controller_url) or not parts.hostname:
        raise click.BadParameter(f"{controller_url!r} is not an http(s) URL", param_hint="--controller-url")
    try:
        load_site(site_dir, secrets=secrets_dir)
    except SiteError as e:
        raise click.ClickException("the site does not load:\n" + "\n".join(e.problems)) from None
    try:
        docs = resources(site_dir, name, namespace, controller_url)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(yaml.safe_dump_all(docs, sort_keys=False), nl=False)


COMMANDS = (fleet_group,)
