"""`bastion assets fetch flatcar`: Flatcar's PXE kernel and initrd into the site, verified.

Runnable on its own too: `python -m bastion.assets_cli fetch flatcar --site DIR`.
The work is in bastion.assets_fetch; this module turns options into a FetchRequest and shows
progress with rich.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from bastion import assets_fetch as af


class RichReporter:
    """A rich progress bar per file on a terminal; one line per file elsewhere (logs, CI)."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self._progress = None
        self._task = None
        self._name = ""
        self._done = 0

    def begin(self, name: str, total: int | None, done: int) -> None:
        self._name, self._done = name, done
        if done:
            self.console.print(f"{name}: resuming at byte {done:,}")
        if not self.console.is_terminal:
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        self._progress.start()
        self._task = self._progress.add_task(name, total=total, completed=done)

    def advance(self, n: int) -> None:
        self._done += n
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def end(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        else:
            self.console.print(f"{self._name}: {self._done:,} bytes")

    def note(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False)


@click.group("assets")
def assets_group() -> None:
    """OS images in the site's assets/ directory (served at /assets/...)."""


@assets_group.group("fetch")
def fetch_group() -> None:
    """Download an OS's boot files into the site, verifying their signatures."""


@fetch_group.command("flatcar")
@click.option("--channel", type=click.Choice(af.CHANNELS), default="stable", show_default=True)
@click.option("--arch", type=click.Choice(af.ARCHES), default="amd64", show_default=True)
@click.option("--version", "version", metavar="V",
              help="A release such as 3815.2.2 [default: the channel's current release].")  # fmt: skip
@click.option("--mirror", metavar="URL",
              help=f"Where <arch>-usr/<version>/ live; '{{channel}}' is filled in "
                   f"[default: {af.DEFAULT_MIRROR}].")  # fmt: skip
@click.option(
    "--site", "site_dir", envvar="BASTION_SITE", required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The site directory; files land in its assets/flatcar/.",
)  # fmt: skip
@click.option("--current/--no-current", "set_current", default=None,
              help="Point <channel>/<arch>/current at this release "
                   "[default: only when no --version is given].")  # fmt: skip
@click.option("--key", "key_file", type=click.Path(dir_okay=False, path_type=Path),
              help=f"The signing key file [default: the shipped {af.FLATCAR_KEY_FILE.name}].")  # fmt: skip
@click.option("--key-fingerprint", metavar="FPR",
              help="Primary key the signatures must come from, for images you sign yourself "
                   f"[default: Flatcar's, {af.FLATCAR_PRIMARY_FINGERPRINT}].")  # fmt: skip
def fetch_flatcar(
    channel, arch, version, mirror, site_dir, set_current, key_file, key_fingerprint
) -> None:
    """Flatcar's PXE kernel and initrd, checked against Flatcar's image signing key.

    Files whose signature does not verify are deleted, never stored. An interrupted download
    resumes when the same command runs again.
    """
    key = af.SigningKey(
        key_file or af.FLATCAR_KEY_FILE, key_fingerprint or af.FLATCAR_PRIMARY_FINGERPRINT
    )
    request = af.FetchRequest(site=site_dir, channel=channel, arch=arch, version=version,
                              mirror=mirror, key=key, set_current=set_current)  # fmt: skip
    reporter = RichReporter()
    try:
        result = af.fetch_flatcar(request, reporter=reporter)
    except af.FetchError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    arch_dir = f"assets/flatcar/{result.channel}/{result.arch}"
    for f in result.files:
        click.echo(
            f"{f.path}  sha256 {f.sha256}  {f.size:,} bytes  signed by {f.signature.signing_key}"
        )
    click.echo(f"manifest: {result.manifest_path.relative_to(site_dir)}")
    if result.current_moved:
        click.echo(f"{arch_dir}/current -> {result.version}")
    first = "current" if result.current_moved else result.version
    click.echo(
        f"profiles boot it as /{arch_dir}/{first}/flatcar_production_pxe.vmlinuz with initrd "
        f"/{arch_dir}/{first}/flatcar_production_pxe_image.cpio.gz"
    )


COMMANDS = (assets_group,)

if __name__ == "__main__":
    assets_group()
