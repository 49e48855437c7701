"""`bastion assets fetch flatcar` against a local mirror with a key the test makes.

The mirror (mirrorkit) is CPython's http.server on 127.0.0.1 laid out as Flatcar's release server
is (<arch>-usr/<version>/, current/, version.txt, detached .sig files) and with the signing key
where www.flatcar.org keeps it, signed by a GPG key made here (a primary key and a signing
subkey, as Flatcar's is), whose fingerprint the tests pass in. Nothing is fetched from the
internet.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from bastion.assets import flatcar as af
from bastion.cli import main
from click.testing import CliRunner
from mirrorkit import (
    INITRD,
    KERNEL,
    KEY_PATH,
    Mirror,
    SignerKey,
    drop_key,
    flatcar_args,
    make_key,
    publish_flatcar,
    publish_key,
    serving,
    version_txt,
)

VERSION = "4081.2.0"


@pytest.fixture(scope="module")
def test_key():
    key = make_key("Test Buildbot")
    yield key
    drop_key(key)


@pytest.fixture(scope="module")
def stranger_key():
    key = make_key("Someone Else")
    yield key
    drop_key(key)


@pytest.fixture
def fresh_key():
    """A key of the test's own, for tests that change it (rotate, extend, revoke)."""
    key = make_key("Rotating Buildbot", faked_time="20200101T000000")
    key.set_subkey_expiry("2021-01-01", faked_time="20200101T000000")  # a year, as Flatcar's
    yield key
    drop_key(key)


@pytest.fixture
def mirror():
    with serving() as m:
        yield m


def publish(mirror: Mirror, key: SignerKey, **kw):
    """The release, and the key at its URL unless the test put one there already."""
    if KEY_PATH not in mirror.files:
        publish_key(mirror, key)
    return publish_flatcar(mirror, key, **kw)


def run_fetch(
    site: Path, mirror: Mirror, key: SignerKey | None, *extra: str, key_file: Path | None = None
):
    argv = [
        "assets",
        "fetch",
        "flatcar",
        "--site",
        str(site),
        "--mirror",
        mirror.url + "/{channel}",
    ]
    if key is not None:
        argv = ["assets", "fetch", "flatcar", "--site", str(site), *flatcar_args(mirror, key)]
        if key_file is not None:
            argv += ["--key", str(key_file)]
    return CliRunner().invoke(main, [*argv, *extra], catch_exceptions=False)


def key_requests(mirror: Mirror) -> int:
    return len([p for p, _ in mirror.requests if p == KEY_PATH])


def asset_files(site: Path) -> list[str]:
    assets = site / "assets"
    if not assets.exists():
        return []
    return sorted(str(p.relative_to(assets)) for p in assets.rglob("*") if not p.is_dir())


def image_files(site: Path) -> list[str]:
    """What the site has of Flatcar's releases (the kept, verified key aside)."""
    return [p for p in asset_files(site) if not p.startswith("flatcar/keys/")]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    d = tmp_path / "site"
    d.mkdir()
    return d


# -- good signatures ---------------------------------------------------------------------------------


def test_current_release_lands_verified_with_manifest(site, mirror, test_key):
    rel = publish(mirror, test_key)
    result = run_fetch(site, mirror, test_key)
    assert result.exit_code == 0, result.output

    arch_dir = site / "assets/flatcar/stable/amd64"
    assert os.readlink(arch_dir / "current") == VERSION
    for name, data in ((KERNEL, rel.kernel), (INITRD, rel.initrd)):
        served = arch_dir / "current" / name
        assert served.read_bytes() == data
        # Content-addressed: the named file links to the object its SHA-256 names.
        digest = hashlib.sha256(data).hexdigest()
        assert served.resolve() == (site / "assets/flatcar/sha256" / digest).resolve()
        assert (arch_dir / VERSION / f"{name}.sig").is_file()

    manifest = json.loads((arch_dir / VERSION / "manifest.json").read_text())
    assert manifest["version"] == VERSION
    assert manifest["channel"] == "stable" and manifest["arch"] == "amd64"
    assert manifest["trusted_key"] == test_key.fingerprint
    assert datetime.fromisoformat(manifest["fetched_at"]) <= datetime.now(UTC)
    by_name = {f["name"]: f for f in manifest["files"]}
    assert set(by_name) == {KERNEL, INITRD}
    for name, data in ((KERNEL, rel.kernel), (INITRD, rel.initrd)):
        f = by_name[name]
        assert f["sha256"] == hashlib.sha256(data).hexdigest()
        assert f["size"] == len(data)
        assert f["version"] == VERSION
        assert f["signature_key"] == test_key.subkey  # made by the subkey...
        assert f["signature_primary_key"] == test_key.fingerprint  # ...of the pinned key
        assert f["path"] == f"flatcar/stable/amd64/{VERSION}/{name}"
    assert by_name[KERNEL]["signature_url"].endswith("/flatcar_production_image.vmlinuz.sig")

    # version.txt came from current/, every file from the numbered directory.
    assert [p for p, _ in mirror.requests if "/current/" in p] == [
        "/stable/amd64-usr/current/version.txt"
    ]
    # Nothing half-done anywhere, and the staging area is empty again.
    assert not [p for p in asset_files(site) if p.endswith((".part", ".tmp"))]
    assert not list((site / "var/assets-fetch/flatcar").rglob("*.part"))
    assert "sha256" in result.output and f"current -> {VERSION}" in result.output


def test_releases_before_2024_sign_the_pxe_kernel_under_its_own_name(site, mirror, test_key):
    rel = publish(mirror, test_key, layout="legacy", version="3510.2.8")
    result = run_fetch(site, mirror, test_key, "--version", "3510.2.8")
    assert result.exit_code == 0, result.output
    release = site / "assets/flatcar/stable/amd64/3510.2.8"
    assert (release / KERNEL).read_bytes() == rel.kernel
    manifest = json.loads((release / "manifest.json").read_text())
    kernel = next(f for f in manifest["files"] if f["name"] == KERNEL)
    assert kernel["signature_url"].endswith("/3510.2.8/flatcar_production_pxe.vmlinuz.sig")
    # A pinned version does not move current/ unless asked.
    assert not (site / "assets/flatcar/stable/amd64/current").exists()


def test_a_signature_by_the_primary_key_itself_passes(site, mirror, test_key):
    rel = publish(mirror, test_key)
    d = rel.base
    mirror.files[d + "flatcar_production_image.vmlinuz.sig"] = test_key.sign(
        rel.kernel, primary=True
    )
    result = run_fetch(site, mirror, test_key)
    assert result.exit_code == 0, result.output
    manifest = json.loads(
        (site / f"assets/flatcar/stable/amd64/{VERSION}/manifest.json").read_text()
    )
    kernel = next(f for f in manifest["files"] if f["name"] == KERNEL)
    assert kernel["signature_key"] == test_key.fingerprint


def test_an_old_release_signed_by_a_since_expired_subkey_passes(site, mirror):
    # Flatcar's signing subkeys expire; a release signed while its subkey was valid still verifies.
    old = make_key("Old Buildbot", expire="1y", faked_time="20200101T000000")
    try:
        rel = publish(
            mirror, old, version="2605.7.0", layout="legacy", faked_time="20200601T000000"
        )
        result = run_fetch(site, mirror, old, "--version", "2605.7.0")
        assert result.exit_code == 0, result.output
        assert "expired since" in result.output
        assert (site / "assets/flatcar/stable/amd64/2605.7.0" / KERNEL).read_bytes() == rel.kernel
    finally:
        drop_key(old)


# -- refusals: each leaves no asset behind ------------------------------------------------------------


@pytest.mark.parametrize("target", [KERNEL, INITRD])
def test_a_tampered_file_is_refused_and_nothing_of_the_release_is_kept(
    site, mirror, test_key, target
):
    rel = publish(mirror, test_key)
    served = rel.base + ("flatcar_production_image.vmlinuz" if target == KERNEL else INITRD)
    tampered = bytearray(mirror.files[served])
    tampered[len(tampered) // 2] ^= 0x01
    mirror.files[served] = bytes(tampered)
    result = run_fetch(site, mirror, test_key)
    assert result.exit_code == 1
    assert f"{target}: refused: the signature by key" in result.output
    assert "does not match the file (corrupted or tampered with)" in result.output
    # Not the tampered file, and not the other one either (the kernel verified before the initrd).
    assert image_files(site) == []
    staged = [p for p in (site / "var/assets-fetch").rglob("*") if p.is_file()]
    assert [p.name for p in staged] == [".lock"]


def test_a_signature_by_another_key_is_refused(site, mirror, test_key, stranger_key):
    publish_key(mirror, test_key)
    publish(mirror, stranger_key)  # a release signed by someone else entirely
    result = run_fetch(site, mirror, test_key)
    assert result.exit_code == 1
    assert "which is neither the trusted key" in result.output
    assert stranger_key.subkey[-16:] in result.output
    assert image_files(site) == []


def test_another_key_inside_the_key_file_is_not_trusted(
    site, mirror, test_key, stranger_key, tmp_path
):
    # The pin is on the primary fingerprint, not on whatever the key file holds.
    both = tmp_path / "both.asc"
    both.write_bytes(test_key.armored.read_bytes() + stranger_key.armored.read_bytes())
    rel = publish(mirror, test_key)
    mirror.files[rel.base + INITRD + ".sig"] = stranger_key.sign(rel.initrd)
    result = run_fetch(site, mirror, test_key, key_file=both)
    assert result.exit_code == 1
    assert f"{INITRD}: refused: it was signed by key {stranger_key.subkey[-16:]}" in result.output
    assert image_files(site) == []


def test_a_missing_signature_is_refused(site, mirror, test_key):
    rel = publish(mirror, test_key)
    del mirror.files[rel.base + "flatcar_production_image.vmlinuz.sig"]
    result = run_fetch(site, mirror, test_key)
    assert result.exit_code == 1
    assert f"{KERNEL}: refused: the release publishes no signature for it" in result.output
    assert (
        "flatcar_production_image.vmlinuz.sig, flatcar_production_pxe.vmlinuz.sig" in result.output
    )
    assert image_files(site) == []
    assert not mirror.gets("flatcar_production_image.vmlinuz")  # not even downloaded


def test_a_key_file_that_holds_no_key_stops_before_any_download(site, mirror, test_key, tmp_path):
    not_a_key = tmp_path / "flatcar-image-signing.asc"
    not_a_key.write_text("Replace this file with Flatcar's image signing key.\n")
    publish(mirror, test_key)
    result = run_fetch(site, mirror, test_key, key_file=not_a_key)
    assert result.exit_code == 1
    assert f"file {not_a_key} holds no OpenPGP public key" in result.output
    assert mirror.requests == []  # neither the key's URL nor the release
    assert asset_files(site) == []


def test_a_key_file_without_the_pinned_key_is_refused(site, mirror, test_key, stranger_key):
    publish(mirror, test_key)
    result = run_fetch(site, mirror, test_key, key_file=stranger_key.armored)
    assert result.exit_code == 1
    assert f"does not hold the key {test_key.fingerprint}" in result.output
    assert asset_files(site) == [] and mirror.requests == []


# -- the key: fetched on first use, pinned, kept, following the rotation ---------------------------


def test_the_key_is_fetched_once_checked_and_kept_in_the_asset_store(site, mirror, test_key):
    publish(mirror, test_key)
    first = run_fetch(site, mirror, test_key)
    assert first.exit_code == 0, first.output
    assert key_requests(mirror) == 1
    keys = site / "assets/flatcar/keys"
    kept = keys / f"{test_key.fingerprint}.asc"
    meta = json.loads((keys / f"{test_key.fingerprint}.json").read_text())
    assert meta["source"] == mirror.url + KEY_PATH
    assert meta["published_sha256"] == hashlib.sha256(mirror.files[KEY_PATH]).hexdigest()
    assert [k["fingerprint"] for k in meta["keys"]] == [test_key.fingerprint, test_key.subkey]
    assert meta["keys"][1]["can_sign"] and not meta["keys"][1]["revoked"]
    listing = subprocess.run(["gpg", "--with-colons", "--show-keys", str(kept)],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert [x.split(":")[9] for x in listing.splitlines() if x.startswith("fpr:")] == [
        test_key.fingerprint, test_key.subkey]  # fmt: skip
    manifest = json.loads(
        (site / f"assets/flatcar/stable/amd64/{VERSION}/manifest.json").read_text()
    )
    assert manifest["key"]["path"] == f"flatcar/keys/{test_key.fingerprint}.asc"
    assert manifest["key"]["source"] == mirror.url + KEY_PATH

    # The next fetch (another arch) uses the kept key: the key's URL is not asked again.
    publish_flatcar(mirror, test_key, arch="arm64")
    second = run_fetch(site, mirror, test_key, "--arch", "arm64")
    assert second.exit_code == 0, second.output
    assert key_requests(mirror) == 1
    # --refresh-key asks anyway.
    third = run_fetch(site, mirror, test_key, "--arch", "arm64", "--refresh-key")
    assert third.exit_code == 0, third.output
    assert key_requests(mirror) == 2


def test_a_published_key_with_another_fingerprint_is_refused_and_nothing_kept(
    site, mirror, test_key, stranger_key
):
    publish_key(mirror, stranger_key)  # the key's URL serves someone else's key
    publish(mirror, test_key)
    result = run_fetch(site, mirror, test_key)
    assert result.exit_code == 1
    assert f"{mirror.url + KEY_PATH} does not hold the key {test_key.fingerprint}" in result.output
    assert asset_files(site) == []  # no key kept, no image
    assert [p for p, _ in mirror.requests] == [KEY_PATH]  # stopped before the release


def test_a_key_the_url_cannot_give_stops_before_any_download(site, mirror, test_key):
    publish_flatcar(mirror, test_key)  # no key at the URL: 404
    result = run_fetch(site, mirror, test_key)
    assert result.exit_code == 1
    assert (
        f"the signing key could not be fetched: {mirror.url + KEY_PATH}: HTTP 404" in result.output
    )
    assert asset_files(site) == []


def test_key_file_offline_is_kept_and_the_url_never_asked(site, mirror, test_key):
    publish_flatcar(mirror, test_key)
    result = run_fetch(site, mirror, test_key, key_file=test_key.armored)
    assert result.exit_code == 0, result.output
    assert key_requests(mirror) == 0
    meta = json.loads((site / f"assets/flatcar/keys/{test_key.fingerprint}.json").read_text())
    assert meta["source"] == f"file {test_key.armored}"
    # Kept: the next run needs neither the file nor the URL.
    publish_flatcar(mirror, test_key, arch="arm64")
    again = run_fetch(site, mirror, test_key, "--arch", "arm64")
    assert again.exit_code == 0, again.output
    assert key_requests(mirror) == 0


def test_a_new_signing_subkey_makes_the_kept_key_follow_the_rotation(site, mirror, fresh_key):
    publish(mirror, fresh_key, version="4000.0.0", faked_time="20200601T000000")
    assert run_fetch(site, mirror, fresh_key, "--version", "4000.0.0").exit_code == 0
    old_subkey = fresh_key.subkey
    new_subkey = fresh_key.add_subkey()  # the publisher's next signing subkey
    publish_key(mirror, fresh_key)  # ... published with the key
    publish_flatcar(mirror, fresh_key)
    result = run_fetch(site, mirror, fresh_key)
    assert result.exit_code == 0, result.output
    assert (
        "which the kept key does not vouch for (unknown-key); fetching the key again"
        in result.output
    )
    assert key_requests(mirror) == 2
    manifest = json.loads(
        (site / f"assets/flatcar/stable/amd64/{VERSION}/manifest.json").read_text()
    )
    assert {f["signature_key"] for f in manifest["files"]} == {new_subkey}
    meta = json.loads((site / f"assets/flatcar/keys/{fresh_key.fingerprint}.json").read_text())
    assert [k["fingerprint"] for k in meta["keys"]] == [
        fresh_key.fingerprint,
        old_subkey,
        new_subkey,
    ]


def test_a_subkey_the_published_key_does_not_hold_either_is_refused(site, mirror, fresh_key):
    publish(mirror, fresh_key, version="4000.0.0", faked_time="20200601T000000")
    assert run_fetch(site, mirror, fresh_key, "--version", "4000.0.0").exit_code == 0
    stale = mirror.files[KEY_PATH]
    new_subkey = fresh_key.add_subkey()
    mirror.files[KEY_PATH] = stale  # the site still publishes the key without it
    publish_flatcar(mirror, fresh_key)
    result = run_fetch(site, mirror, fresh_key)
    assert result.exit_code == 1
    assert (
        f"it was signed by key {new_subkey[-16:]}, which is neither the trusted key"
        in result.output
    )
    assert (
        "fetched just now); nothing was kept. Flatcar's key as published does not vouch"
        in result.output
    )
    assert not (site / f"assets/flatcar/stable/amd64/{VERSION}").exists()
    assert key_requests(mirror) == 2


def test_a_key_url_that_answers_with_another_key_is_not_called_unreachable(
    site, mirror, fresh_key, stranger_key
):
    # It said "Run the command again when <url> is reachable": the URL had answered, with a key
    # that is not the pinned one.
    publish(mirror, fresh_key, version="4000.0.0", faked_time="20200601T000000")
    assert run_fetch(site, mirror, fresh_key, "--version", "4000.0.0").exit_code == 0
    fresh_key.add_subkey()
    publish_key(mirror, stranger_key)  # the key's URL now serves someone else's key
    publish_flatcar(mirror, fresh_key)
    result = run_fetch(site, mirror, fresh_key)
    assert result.exit_code == 1
    assert "reachable" not in result.output
    assert (f"fetching the key again gave none to check it with ({mirror.url + KEY_PATH} does "
            f"not hold the key {fresh_key.fingerprint}") in result.output  # fmt: skip
    assert (f"Run the command again once {mirror.url + KEY_PATH} serves Flatcar's current key, "
            "or give that key with --key FILE") in result.output  # fmt: skip
    assert not (site / f"assets/flatcar/stable/amd64/{VERSION}").exists()


def test_a_subkey_extended_after_it_expired_is_followed(site, mirror, fresh_key):
    # Made on 2020-01-01, the subkey expires 2021-01-01 as the kept key knows it.
    publish(mirror, fresh_key, version="2605.1.0", layout="legacy", faked_time="20200601T000000")
    assert run_fetch(site, mirror, fresh_key, "--version", "2605.1.0").exit_code == 0
    # The publisher extends the subkey and signs a release after its first expiry date.
    fresh_key.set_subkey_expiry("2040-01-01", faked_time="20200901T000000")
    publish_flatcar(mirror, fresh_key, version="2605.2.0", layout="legacy",
                    faked_time="20210601T000000")  # fmt: skip
    # ...but the published key is still the old one: refused, saying what to do.
    refused = run_fetch(site, mirror, fresh_key, "--version", "2605.2.0")
    assert refused.exit_code == 1
    assert "which expired on 2021-01-01" in refused.output
    assert "a signature made after its key expired is not trusted" in refused.output
    assert "If Flatcar extends that subkey, the next run fetches the key again" in refused.output
    assert not (site / "assets/flatcar/stable/amd64/2605.2.0").exists()
    # Published with its new expiry: the next run takes it.
    publish_key(mirror, fresh_key)
    result = run_fetch(site, mirror, fresh_key, "--version", "2605.2.0")
    assert result.exit_code == 0, result.output
    assert "(expired); fetching the key again" in result.output
    meta = json.loads((site / f"assets/flatcar/keys/{fresh_key.fingerprint}.json").read_text())
    assert meta["keys"][1]["expires"].startswith("2040-01-01")


def test_a_revoked_subkey_is_refused_with_what_to_do(site, mirror, fresh_key):
    fresh_key.set_subkey_expiry("2040-01-01")
    rel = publish_flatcar(mirror, fresh_key)
    fresh_key.revoke_subkey()
    publish_key(mirror, fresh_key)  # the key as published now carries the revocation
    result = run_fetch(site, mirror, fresh_key)
    assert result.exit_code == 1
    assert f"it was signed by key {fresh_key.subkey[-16:]}, which has been revoked" in result.output
    assert "Take another release, signed by a current subkey" in result.output
    assert not (site / "assets/flatcar/stable/amd64").exists()
    assert rel.kernel


def test_a_rotation_with_key_file_says_to_refresh_the_file(site, mirror, fresh_key, tmp_path):
    old = tmp_path / "old.asc"
    old.write_bytes(fresh_key.export())
    fresh_key.add_subkey()
    publish(mirror, fresh_key)
    result = run_fetch(site, mirror, fresh_key, key_file=old)
    assert result.exit_code == 1
    assert "The key file was given with --key" in result.output
    assert key_requests(mirror) == 0


def test_an_unknown_version_is_reported(site, mirror, test_key):
    publish(mirror, test_key)
    result = run_fetch(site, mirror, test_key, "--version", "9999.0.0")
    assert result.exit_code == 1
    assert "no Flatcar release 9999.0.0 at" in result.output
    assert image_files(site) == []


# -- resuming -------------------------------------------------------------------------------------------


def test_an_interrupted_download_resumes_with_a_range_request(site, mirror, test_key):
    rel = publish(mirror, test_key)
    image = rel.base + "flatcar_production_image.vmlinuz"
    mirror.cut_once.add(image)

    first = run_fetch(site, mirror, test_key)
    assert first.exit_code == 1
    assert f"{KERNEL}: download interrupted after" in first.output
    assert "run the same command again to resume" in first.output
    assert image_files(site) == []  # nothing under its final name
    part = site / f"var/assets-fetch/flatcar/stable/amd64/{VERSION}/{KERNEL}.part"
    have = part.stat().st_size
    assert 0 < have < len(rel.kernel)

    second = run_fetch(site, mirror, test_key)
    assert second.exit_code == 0, second.output
    assert f"resuming at byte {have:,}" in second.output
    resumed = mirror.gets("flatcar_production_image.vmlinuz")[-1]
    assert resumed["range"] == f"bytes={have}-"
    assert resumed["if-range"].startswith('"')  # the ETag the first response carried
    assert (site / "assets/flatcar/stable/amd64/current" / KERNEL).read_bytes() == rel.kernel
    assert not part.exists()


def test_a_file_that_changed_on_the_mirror_is_fetched_whole_again(site, mirror, test_key):
    rel = publish(mirror, test_key)
    image = rel.base + "flatcar_production_image.vmlinuz"
    mirror.cut_once.add(image)
    assert run_fetch(site, mirror, test_key).exit_code == 1
    # The mirror now holds a different (properly signed) kernel: If-Range no longer matches.
    new_kernel = os.urandom(2_000_000)
    mirror.files[image] = new_kernel
    mirror.files[rel.base + "flatcar_production_image.vmlinuz.sig"] = test_key.sign(new_kernel)
    result = run_fetch(site, mirror, test_key)
    assert result.exit_code == 0, result.output
    assert "sent the whole file again" in result.output
    assert (site / "assets/flatcar/stable/amd64/current" / KERNEL).read_bytes() == new_kernel


def test_a_tail_of_another_version_from_a_mirror_ignoring_if_range_restarts_in_the_same_run(
    site, mirror, test_key
):
    # A mirror (or a cache before it) that serves a Range whatever If-Range says sent the rest
    # of the changed kernel under its new ETag: the part was discarded and the fetch stopped,
    # asking the user to run it again, though the whole file could be fetched there and then.
    rel = publish(mirror, test_key)
    image = rel.base + "flatcar_production_image.vmlinuz"
    mirror.cut_once.add(image)
    assert run_fetch(site, mirror, test_key).exit_code == 1
    new_kernel = os.urandom(len(rel.kernel))  # same length: only the ETag shows the change
    mirror.files[image] = new_kernel
    mirror.files[rel.base + "flatcar_production_image.vmlinuz.sig"] = test_key.sign(new_kernel)
    serve = mirror.serve

    def ignoring_if_range(h, head):
        del h.headers["If-Range"]
        serve(h, head)

    mirror.serve = ignoring_if_range
    result = run_fetch(site, mirror, test_key)
    assert result.exit_code == 0, result.output
    assert "another version of the file; the partial file was discarded: starting over" in (
        result.output
    )
    resumed, whole = mirror.gets("flatcar_production_image.vmlinuz")[-2:]
    assert resumed["range"].startswith("bytes=") and "range" not in whole
    assert (site / "assets/flatcar/stable/amd64/current" / KERNEL).read_bytes() == new_kernel


def test_a_part_begun_without_a_validator_is_fetched_whole_again_not_resumed(site, mirror, test_key):
    # It was resumed with a bare Range: the tail of the changed file was appended to the old
    # head, and the spliced kernel refused as "corrupted or tampered with".
    rel = publish(mirror, test_key)
    image = rel.base + "flatcar_production_image.vmlinuz"
    mirror.cut_once.add(image)
    assert run_fetch(site, mirror, test_key).exit_code == 1
    # As from a mirror that sent neither ETag nor Last-Modified: nothing for If-Range.
    part = site / f"var/assets-fetch/flatcar/stable/amd64/{VERSION}/{KERNEL}.part"
    meta_file = part.with_name(part.name + ".json")
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "etag": None, "last_modified": None}))
    new_kernel = os.urandom(len(rel.kernel))  # changed on the mirror, and of the same size
    mirror.files[image] = new_kernel
    mirror.files[rel.base + "flatcar_production_image.vmlinuz.sig"] = test_key.sign(new_kernel)
    result = run_fetch(site, mirror, test_key)
    assert result.exit_code == 0, result.output
    assert f"{KERNEL}: the partial file cannot be resumed" in result.output
    asked = mirror.gets("flatcar_production_image.vmlinuz")[-1]
    assert "range" not in asked and "if-range" not in asked
    assert (site / "assets/flatcar/stable/amd64/current" / KERNEL).read_bytes() == new_kernel


def test_the_unfinished_download_of_a_superseded_release_is_discarded(site, mirror, test_key):
    # The .part of a release the channel has moved on from stayed in var/ for ever (up to
    # 500 MB for an initrd): no later run resumed it, nothing removed it.
    rel = publish(mirror, test_key)
    mirror.cut_once.add(rel.base + "flatcar_production_image.vmlinuz")
    assert run_fetch(site, mirror, test_key).exit_code == 1
    abandoned = site / f"var/assets-fetch/flatcar/stable/amd64/{VERSION}"
    assert (abandoned / f"{KERNEL}.part").is_file()
    # Another arch's unfinished download is not this fetch's to discard: it is resumed later.
    other_arch = site / f"var/assets-fetch/flatcar/stable/arm64/{VERSION}/{KERNEL}.part"
    other_arch.parent.mkdir(parents=True)
    other_arch.write_bytes(rel.kernel[:1000])
    publish_flatcar(mirror, test_key, version="4100.0.0")  # the channel's next release
    result = run_fetch(site, mirror, test_key)
    assert result.exit_code == 0, result.output
    assert not abandoned.exists()
    assert (f"discarded {abandoned}, what an unfinished fetch of Flatcar stable amd64 {VERSION} "
            "left: this fetch is of 4100.0.0") in result.output  # fmt: skip
    assert other_arch.read_bytes() == rel.kernel[:1000]
    assert not [p for p in asset_files(site) if p.endswith((".part", ".json")) and VERSION in p]


def test_resume_against_starlette_static_files(site, test_key, tmp_path):
    """The same resume against a real Range implementation (Starlette), with the release laid out
    on disk as Flatcar's server has it: the PXE kernel a symlink to the image kernel."""
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.staticfiles import StaticFiles
    from starlette.testclient import TestClient

    root = tmp_path / "mirror"
    release = root / "stable/amd64-usr" / VERSION
    release.mkdir(parents=True)
    kernel, initrd = os.urandom(1_000_000), os.urandom(500_000)
    (release / "version.txt").write_bytes(version_txt(VERSION))
    (release / "flatcar_production_image.vmlinuz").write_bytes(kernel)
    (release / KERNEL).symlink_to("flatcar_production_image.vmlinuz")
    (release / "flatcar_production_image.vmlinuz.sig").write_bytes(test_key.sign(kernel))
    (release / INITRD).write_bytes(initrd)
    (release / f"{INITRD}.sig").write_bytes(test_key.sign(initrd))

    staging = site / f"var/assets-fetch/flatcar/stable/amd64/{VERSION}"
    staging.mkdir(parents=True)
    url = f"http://testserver/stable/amd64-usr/{VERSION}/{KERNEL}"
    (staging / f"{KERNEL}.part").write_bytes(kernel[:400_000])

    seen = []
    app = Starlette(routes=[Mount("/", StaticFiles(directory=root))])
    with TestClient(app) as client:
        # The sidecar an interrupted first GET would have left: its URL, ETag and size, and
        # the part's length it synced to disk.
        etag = client.head(url).headers["etag"]
        (staging / f"{KERNEL}.part.json").write_text(
            json.dumps({"url": url, "etag": etag, "total": len(kernel), "durable": 400_000})
        )
        client.event_hooks = {"request": [seen.append], "response": []}
        result = af.fetch_flatcar(
            af.FetchRequest(site=site, version=VERSION, mirror="http://testserver/{channel}",
                            key=af.flatcar_key(file=test_key.armored,
                                               fingerprint=test_key.fingerprint)),
            client=client,
        )  # fmt: skip
    assert [(r.headers.get("range"), r.headers.get("if-range")) for r in seen
            if r.url.path.endswith(KERNEL)] == [("bytes=400000-", etag)]  # fmt: skip
    assert (result.release_dir / KERNEL).read_bytes() == kernel
    assert (result.release_dir / INITRD).read_bytes() == initrd


# -- the controller serves what was fetched ------------------------------------------------------------


def test_bastion_serves_the_fetched_files_by_their_current_path(
    site_dir, client_for, mirror, test_key
):
    rel = publish(mirror, test_key)
    assert run_fetch(site_dir, mirror, test_key).exit_code == 0
    client = client_for(site_dir)
    base = "/assets/flatcar/stable/amd64/current"
    r = client.get(f"{base}/{KERNEL}")
    assert r.status_code == 200 and r.content == rel.kernel
    r = client.get(f"{base}/{INITRD}", headers={"Range": "bytes=100-199"})
    assert r.status_code == 206 and r.content == rel.initrd[100:200]
    assert client.get(f"{base}/manifest.json").json()["version"] == VERSION


# -- the shipped key and small pieces -------------------------------------------------------------------


def test_no_openpgp_key_is_in_the_tree():
    """Flatcar's key is fetched and pinned, never a copy (or a stand-in) in the repository."""
    repo = Path(__file__).resolve().parents[3]
    tracked = subprocess.run(["git", "-C", str(repo), "ls-files", "-z"], capture_output=True,
                             check=True).stdout.split(b"\0")  # fmt: skip
    # an armored key: its BEGIN line, base64 lines, its END line (built so as not to be one here)
    begin, end = (f"-----{w} PGP PUBLIC KEY BLOCK-----" for w in ("BEGIN", "END"))
    block = re.compile(f"{begin}\n(.*\n)*?[A-Za-z0-9+/=]{{20,}}\n(.*\n)*?{end}".encode())
    with_keys = []
    for name in filter(None, tracked):
        path = repo / name.decode()
        if not path.is_file():
            continue
        if path.suffix in (".asc", ".gpg", ".pgp", ".key") or block.search(path.read_bytes()):
            with_keys.append(name.decode())
    assert with_keys == []
    assert af.flatcar_key().fingerprint == af.FLATCAR_PRIMARY_FINGERPRINT
    assert af.flatcar_key().url == af.FLATCAR_KEY_URL
    assert af.FLATCAR_KEY_URL.startswith("https://www.flatcar.org/")


def test_parse_version_txt():
    assert af.parse_version_txt(version_txt("3815.2.2").decode()) == "3815.2.2"
    assert af.parse_version_txt('COREOS_VERSION_ID="1576.1.0"\n') == "1576.1.0"
    assert af.parse_version_txt("nothing here\n") is None


@pytest.mark.parametrize("bad", ["../../etc", "3815.2", "3815.2.2/..", "current"])
def test_versions_that_are_not_versions_are_refused(site, mirror, test_key, bad):
    result = run_fetch(site, mirror, test_key, "--version", bad)
    assert result.exit_code == 1
    assert "not a Flatcar version" in result.output
    assert mirror.requests == []


def test_a_release_already_there_is_checked_not_downloaded_again(site, mirror, test_key):
    rel = publish(mirror, test_key)
    assert run_fetch(site, mirror, test_key).exit_code == 0
    mirror.requests.clear()
    again = run_fetch(site, mirror, test_key)
    assert again.exit_code == 0, again.output
    assert "still verify; nothing downloaded" in again.output
    assert [p for p, _ in mirror.requests] == ["/stable/amd64-usr/current/version.txt"]

    # A stored file that no longer matches is fetched (and verified) again.
    obj = (site / "assets/flatcar/stable/amd64/current" / INITRD).resolve()
    obj.chmod(0o644)
    obj.write_bytes(b"rotten")
    mirror.requests.clear()
    third = run_fetch(site, mirror, test_key)
    assert third.exit_code == 0, third.output
    assert mirror.gets(INITRD)
    assert (site / "assets/flatcar/stable/amd64/current" / INITRD).read_bytes() == rel.initrd


def test_docs_assets_md_matches_the_code():
    doc = (Path(__file__).resolve().parents[3] / "docs" / "assets.md").read_text()
    assert af.FLATCAR_PRIMARY_FINGERPRINT in doc
    assert af.FLATCAR_KEY_URL in doc
    assert "assets/flatcar/keys/" in doc
    for f in af.FLATCAR_PXE_FILES:
        assert f.name in doc
        for sig in f.signature_names:
            assert sig in doc
    help_text = CliRunner().invoke(main, ["assets", "fetch", "flatcar", "--help"]).output
    for option in re.findall(r"^\| `(--[a-z-]+)", doc, re.MULTILINE):
        assert option in help_text, option
    assert af.DEFAULT_MIRROR in doc


def test_a_mirror_that_cannot_be_reached_is_not_called_a_partial_download(tmp_path):
    # It said "interrupted after 0 bytes ... the partial file is kept" with no file kept.
    import socket

    import httpx
    from bastion.assets import download

    with socket.socket() as s:  # a loopback port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    class Quiet:
        def begin(self, *a): ...
        def advance(self, n): ...
        def end(self): ...
        def note(self, text): ...

    part = tmp_path / "f.part"
    with httpx.Client(timeout=5) as client, pytest.raises(download.TransferInterrupted) as e:
        download.download_resumable(client, f"http://127.0.0.1:{port}/f", part, "f", Quiet())
    assert f"f: could not download http://127.0.0.1:{port}/f (ConnectError" in str(e.value)
    assert "partial" not in str(e.value) and not part.exists()


@pytest.mark.parametrize("announced", [False, True])
def test_a_mirror_that_sends_more_than_any_release_file_is_refused_and_nothing_kept(
        tmp_path, monkeypatch, announced):  # fmt: skip
    # A body that never ends filled the disk before its checksum could refuse it.
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import httpx
    from bastion.assets import download

    monkeypatch.setattr(download, "DOWNLOAD_LIMIT", 1 << 20)

    class Endless(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200)
            if announced:
                self.send_header("Content-Length", str(8 << 30))
            else:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"x" * 65536
            try:
                for _ in range(10_000):  # 640 MB at most, were it read to the end
                    self.wfile.write(chunk if announced else b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:
                pass  # the client went away

        def log_message(self, *args): ...

    class Quiet:
        def begin(self, *a): ...
        def advance(self, n): ...
        def end(self): ...
        def note(self, text): ...

    server = ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    part = tmp_path / "f.part"
    url = f"http://127.0.0.1:{server.server_address[1]}/f"
    try:
        with httpx.Client(timeout=10) as client, pytest.raises(download.FetchError) as e:
            download.download_resumable(client, url, part, "f", Quiet())
    finally:
        server.shutdown()
        server.server_close()
    said = "announces 8589934592 bytes" if announced else "sent more than 1048576 bytes"
    assert f"f: {url} {said}, more than any release file (1048576)" in str(e.value)
    assert not part.exists() and not download.meta_path(part).exists()
