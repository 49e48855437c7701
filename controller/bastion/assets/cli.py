"""`bastion assets fetch flatcar|k3s|rpi4-uefi`: boot files into the site, verified.

Runnable on its own too: `python -m bastion.assets.cli fetch flatcar --site DIR`.
The work is in bastion.assets.flatcar (Flatcar), bastion.assets.k3s (k3s) and bastion.assets.rpi4
(the Raspberry Pi 4 UEFI firmware); this module turns options into their requests and shows progress with rich.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from bastion.assets import flatcar as af
from bastion.assets import k3s as ak
from bastion.assets import rpi4 as rpi
from bastion.settings import secrets_option


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
        from bastion.progress import byte_progress

        self._progress = byte_progress(self.console)
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
        # soft_wrap: a note is one line however wide the terminal, so logs can be searched.
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)


@click.group("assets")
def assets_group() -> None:
    """OS images in the site's assets/ directory (served at /assets/...)."""


@assets_group.group("fetch")
def fetch_group() -> None:
    """Download boot files into the site, verifying them (signatures, pinned checksums)."""


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
@click.option("--key", "key_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Take the signing key from this file (offline) instead of fetching it; it is "
                   "checked against the fingerprint and kept in the site's assets/flatcar/keys/.")  # fmt: skip
@click.option("--key-url", metavar="URL",
              help=f"Where the signing key is fetched from when the site has none kept "
                   f"[default: {af.FLATCAR_KEY_URL}].")  # fmt: skip
@click.option("--key-fingerprint", metavar="FPR",
              help="Primary key the signatures must come from, for images you sign yourself "
                   f"[default: Flatcar's, {af.FLATCAR_PRIMARY_FINGERPRINT}].")  # fmt: skip
@click.option("--refresh-key", is_flag=True,
              help="Fetch the signing key again even though the site keeps one (it is fetched "
                   "again anyway when a signature needs a subkey the kept key does not vouch for).")  # fmt: skip
def fetch_flatcar(
    channel, arch, version, mirror, site_dir, set_current, key_file, key_url, key_fingerprint,
    refresh_key,
) -> None:
    """Flatcar's PXE kernel and initrd, checked against Flatcar's image signing key.

    The key is fetched from Flatcar's site the first time (or taken from --key FILE), refused
    unless its primary key is the pinned one, and kept in the site's assets/flatcar/keys/.
    Files whose signature does not verify are deleted, never stored. An interrupted download
    resumes when the same command runs again.
    """
    key = af.flatcar_key(file=key_file, url=key_url, fingerprint=key_fingerprint,
                         refresh=refresh_key)  # fmt: skip
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


@fetch_group.command("k3s")
@click.option(
    "--site", "site_dir", envvar="BASTION_SITE", required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The site directory; files land in its assets/k3s/.",
)  # fmt: skip
@click.option("--version", "version", metavar="V",
              help="A k3s release such as v1.31.4+k3s1 [default: site.yaml cluster.k3s.version].")  # fmt: skip
@click.option("--arch", "arches", multiple=True, type=click.Choice(ak.ARCHES),
              help="Repeatable [default: the architectures of the site's k3s nodes].")  # fmt: skip
@click.option("--mirror", metavar="URL",
              help=f"Where <version>/k3s, k3s-arm64 and sha256sum-<arch>.txt live "
                   f"[default: {ak.DEFAULT_MIRROR}].")  # fmt: skip
def fetch_k3s(site_dir, version, arches, mirror) -> None:
    """The k3s release's binaries, checked against the release's own sha256sum-<arch>.txt.

    They land where the nodes fetch them, assets/k3s/<version>/<arch>/k3s, and the checksums
    in assets/k3s/<version>/manifest.json, which `bastion site check` and the controller read
    (so site.yaml needs no cluster.k3s.sha256). A file whose checksum does not match is deleted,
    never stored. An interrupted download resumes when the same command runs again.
    """
    from bastion.site.load import SiteError, k3s_wanted

    if version is None or not arches:
        try:
            wanted_version, wanted_arches = k3s_wanted(site_dir)
        except SiteError as e:
            click.echo("error: give --version and --arch, or fix the site:", err=True)
            for problem in e.problems:
                click.echo(f"  {problem}", err=True)
            sys.exit(1)
        version = version or wanted_version
        arches = arches or tuple(wanted_arches)
    try:
        result = ak.fetch_k3s(ak.K3sRequest(site_dir, version, tuple(arches), mirror),
                              reporter=RichReporter())  # fmt: skip
    except ak.FetchError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    for f in result.files:
        click.echo(f"assets/{f.path}  sha256 {f.sha256}  {f.size:,} bytes  "
                   f"(matches {ak.sums_name(f.arch)})")  # fmt: skip
    click.echo(f"manifest: {result.manifest_path.relative_to(site_dir)}")


@fetch_group.command("rpi4-uefi")
@click.option("--version", "version", metavar="V",
              help=f"A pftf/RPi4 release such as v1.41 [default: {rpi.DEFAULT_VERSION}; pinned: "
                   f"{', '.join(rpi.PINNED)}].")  # fmt: skip
@click.option("--mirror", metavar="URL",
              help=f"Where <tag>/RPi4_UEFI_Firmware_<tag>.zip live [default: {rpi.DEFAULT_MIRROR}].")  # fmt: skip
@click.option("--sha256", "sha256", metavar="HEX",
              help="The archive's SHA-256, required for a version that is not pinned.")  # fmt: skip
@click.option(
    "--site", "site_dir", envvar="BASTION_SITE", required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The site directory; files land in its tftp/ (and the archive in assets/rpi4-uefi/).",
)  # fmt: skip
@click.option("--serial", "serials", multiple=True, metavar="S",
              help="A Pi's serial number (8 hex digits): tftp/<serial>/, for EEPROM "
                   "TFTP_PREFIX=0 (the default). Repeatable.")  # fmt: skip
@click.option("--mac", "macs", multiple=True, metavar="M",
              help="A Pi's MAC: tftp/dc-a6-32-xx-xx-xx/, for TFTP_PREFIX=2. Repeatable.")  # fmt: skip
@click.option("--prefix-str", "prefixes", multiple=True, metavar="STR",
              help="A TFTP_PREFIX_STR ending in '/': tftp/<STR>, for TFTP_PREFIX=1. Repeatable.")  # fmt: skip
@secrets_option
def fetch_rpi4_uefi(version, mirror, sha256, site_dir, serials, macs, prefixes, secrets_dir) -> None:
    """The Raspberry Pi 4 UEFI firmware (pftf/RPi4), laid out where each Pi's bootloader asks.

    The archive must match the checksum pinned for its version (or --sha256), be a well-formed
    zip without links or names leaving it, and hold RPI_EFI.fd and start4.elf; otherwise nothing
    is installed. Without --serial, --mac and --prefix-str, every machine in machines.yaml
    labelled `board: rpi4` gets tftp/<serial>/ (from its `serial` label) and its MAC directory;
    the site loads as `bastion serve` loads it, its cluster checked against --secrets' store.
    """
    try:
        dirs = tuple(
            [rpi.serial_dir(s) for s in serials]
            + [rpi.mac_dir(m) for m in macs]
            + [rpi.prefix_dir(p) for p in prefixes]
        )
        request = rpi.Rpi4Request(site=site_dir, version=version, mirror=mirror,
                                  sha256=sha256, dirs=dirs, secrets=secrets_dir)  # fmt: skip
        result = rpi.fetch_rpi4_uefi(request, reporter=RichReporter())
    except af.FetchError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(
        f"{result.archive_path.relative_to(site_dir)}  sha256 {result.sha256}  "
        f"({'matches the pinned value' if result.sha256_source == 'pinned' else 'as --sha256 gave'})"
    )
    for d in result.dirs:
        click.echo(f"tftp/{d.path}/  {len(result.files)} files  ({d.why})")
    click.echo(f"config.txt: {result.config_txt}")
    click.echo(f"manifest: {result.manifest_path.relative_to(site_dir)}")


COMMANDS = (assets_group,)

if __name__ == "__main__":
    assets_group()
