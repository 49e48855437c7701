"""`bastion assets fetch k3s` against a loopback mirror laid out as GitHub's release downloads
(mirrorkit), for a made-up release whose sums file the test writes; and `bastion site check`
of examples/home-lab before and after. Nothing is fetched from the internet."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from bastion.cli import main
from bastion_testkit import EXAMPLES, write_assets
from click.testing import CliRunner
from mirrorkit import K3S_BINARY, encoded, k3s_url, publish_k3s, serving

VERSION = "v1.31.4+k3s1"  # examples/home-lab's


@pytest.fixture
def mirror():
    with serving() as m:
        yield m


@pytest.fixture
def home_lab(tmp_path):
    """A copy of examples/home-lab with stand-in Flatcar images: only k3s is missing."""
    site = tmp_path / "home-lab"
    shutil.copytree(EXAMPLES / "home-lab", site)
    write_assets(site, ("flatcar/stable/amd64/current", "flatcar/stable/arm64/current"))
    return site


def run(*argv: str):
    return CliRunner().invoke(main, list(argv), catch_exceptions=False)


def fetch(site, mirror, *extra: str):
    return run("assets", "fetch", "k3s", "--site", str(site), "--mirror", k3s_url(mirror), *extra)


def assets_of(site) -> list[str]:
    root = site / "assets" / "k3s"
    return (
        sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())
        if root.exists()
        else []
    )


def test_the_release_lands_where_nodes_fetch_it_with_its_checksums_recorded(home_lab, mirror):
    rel = publish_k3s(mirror, VERSION)
    result = fetch(home_lab, mirror)  # version and arches from site.yaml and machines.yaml
    assert result.exit_code == 0, result.output
    for arch in ("amd64", "arm64"):
        served = home_lab / "assets/k3s" / VERSION / arch / "k3s"
        assert served.read_bytes() == rel.binaries[arch]
        assert served.resolve() == (home_lab / "assets/k3s/sha256" / rel.sha256(arch)).resolve()
        assert (home_lab / "assets/k3s" / VERSION / f"sha256sum-{arch}.txt").read_bytes() == \
            mirror.files[rel.base + f"sha256sum-{arch}.txt"]  # fmt: skip
    manifest = json.loads((home_lab / "assets/k3s" / VERSION / "manifest.json").read_text())
    assert manifest["version"] == VERSION
    by_arch = {f["arch"]: f for f in manifest["files"]}
    assert set(by_arch) == {"amd64", "arm64"}
    for arch, f in by_arch.items():
        assert f["role"] == "binary" and f["name"] == K3S_BINARY[arch]
        assert f["sha256"] == rel.sha256(arch) and f["size"] == len(rel.binaries[arch])
        assert f["path"] == f"k3s/{VERSION}/{arch}/k3s"
        assert f["url"].endswith(f"/{encoded(VERSION)}/{K3S_BINARY[arch]}")
    # GitHub's URLs carry the version's + encoded.
    assert any(f"/{encoded(VERSION)}/k3s-arm64" in p for p in mirror.raw_paths), mirror.raw_paths
    assert "%2B" in encoded(VERSION)
    assert not list((home_lab / "var/assets-fetch").rglob("*.part"))
    assert f"assets/k3s/{VERSION}/arm64/k3s  sha256 {rel.sha256('arm64')}" in result.output


def test_site_check_fails_until_k3s_is_fetched_then_passes(home_lab, mirror):
    before = run("site", "check", str(home_lab))
    assert before.exit_code == 1
    for arch in ("amd64", "arm64"):
        assert f"k3s {VERSION} for {arch}" in before.output
        assert (
            "has not been fetched: run `bastion assets fetch k3s --site <this site>`"
            in before.output
        )
    publish_k3s(mirror, VERSION)
    assert fetch(home_lab, mirror).exit_code == 0
    after = run("site", "check", str(home_lab))
    assert after.exit_code == 0, after.output
    assert "site 'home-lab' OK" in after.output
    # A binary that is no longer the release's is named.
    obj = (home_lab / "assets/k3s" / VERSION / "amd64/k3s").resolve()
    obj.chmod(0o644)
    obj.write_bytes(b"not k3s")
    broken = run("site", "check", str(home_lab))
    assert broken.exit_code == 1
    assert f"assets/k3s/{VERSION}/amd64/k3s has SHA-256 {hashlib.sha256(b'not k3s').hexdigest()}" \
        in broken.output  # fmt: skip


def test_a_wrong_checksum_is_refused_and_nothing_is_kept(home_lab, mirror):
    rel = publish_k3s(mirror, VERSION)
    mirror.files[rel.base + "k3s-arm64"] = os.urandom(len(rel.binaries["arm64"]))
    result = fetch(home_lab, mirror)
    assert result.exit_code == 1
    assert "k3s-arm64: refused: its SHA-256 is" in result.output
    assert f"but the release's sha256sum-arm64.txt says {rel.sha256('arm64')}" in result.output
    assert assets_of(home_lab) == []  # not even the amd64 binary, which was good
    assert not list((home_lab / "var/assets-fetch").rglob("k3s-arm64.part*"))


def test_a_sums_file_without_the_binary_is_refused_before_downloading(home_lab, mirror):
    rel = publish_k3s(mirror, VERSION, arches=("amd64",))
    sums = rel.base + "sha256sum-amd64.txt"
    mirror.files[sums] = b"".join(line + b"\n" for line in mirror.files[sums].splitlines()
                                  if not line.endswith(b"  k3s"))  # fmt: skip
    result = fetch(home_lab, mirror, "--arch", "amd64")
    assert result.exit_code == 1
    assert "sha256sum-amd64.txt of k3s v1.31.4+k3s1 names no k3s" in result.output
    assert not mirror.gets("k3s")
    assert assets_of(home_lab) == []


@pytest.mark.parametrize("good_first", [True, False], ids=["good-then-other", "other-then-good"])
def test_a_sums_file_with_two_different_sums_for_the_binary_is_refused(
    home_lab, mirror, good_first
):
    # sha256sum -c fails such a file whichever line the binary matches; it was taken as its
    # last line said, so the binary passed or failed depending on the order of the lines.
    rel = publish_k3s(mirror, VERSION, arches=("amd64",))
    sums = rel.base + "sha256sum-amd64.txt"
    other = hashlib.sha256(b"another k3s").hexdigest()
    lines = [f"{rel.sha256('amd64')}  k3s\n", f"{other}  k3s\n"]
    mirror.files[sums] += "".join(lines if good_first else lines[::-1]).encode()
    result = fetch(home_lab, mirror, "--arch", "amd64")
    assert result.exit_code == 1
    assert (
        "sha256sum-amd64.txt of k3s v1.31.4+k3s1 gives two different SHA-256s for k3s"
        in result.output
    )
    assert other in result.output and rel.sha256("amd64") in result.output
    assert not mirror.gets("k3s")
    assert assets_of(home_lab) == []


def test_a_binary_listed_twice_with_the_same_sum_is_taken(home_lab, mirror):
    rel = publish_k3s(mirror, VERSION, arches=("amd64",))
    sums = rel.base + "sha256sum-amd64.txt"
    mirror.files[sums] += f"{rel.sha256('amd64').upper()} *k3s\n".encode()
    result = fetch(home_lab, mirror, "--arch", "amd64")
    assert result.exit_code == 0, result.output
    assert (home_lab / "assets/k3s" / VERSION / "amd64/k3s").read_bytes() == rel.binaries["amd64"]


def test_a_release_over_https_is_not_taken_over_plain_http(home_lab, mirror, tmp_path):
    # The sums file is trusted because it comes over HTTPS; an https mirror's redirect to
    # http:// was followed, and the sums and the binary were taken from a plain connection.
    import ssl

    import httpx
    from bastion.assets import k3s as ak
    from certkit import make_pki

    pki = make_pki(tmp_path / "pki", dns=(), ips=("127.0.0.1",))
    rel = publish_k3s(mirror, VERSION, arches=("amd64",))
    trust = ssl.create_default_context(cafile=str(pki["ca"]))
    with serving(tls=pki) as secure, httpx.Client(verify=trust, follow_redirects=True) as client:
        for path in mirror.files:  # every file of the release: to the same path, on http://
            secure.redirects[path] = mirror.url + path
        request = ak.K3sRequest(home_lab, VERSION, ("amd64",), k3s_url(secure))
        with pytest.raises(ak.FetchError) as refused:
            ak.fetch_k3s(request, client=client)
        assert f"redirected to {mirror.url}{rel.base}sha256sum-amd64.txt" in str(refused.value)
        assert "not over HTTPS" in str(refused.value)
        assert not mirror.gets("k3s") and assets_of(home_lab) == []

        # Redirects that stay on HTTPS (GitHub's to its download host) are followed.
        for path in list(secure.redirects):
            secure.files["/elsewhere" + path] = mirror.files[path]
            secure.redirects[path] = secure.url + "/elsewhere" + path
        ak.fetch_k3s(request, client=client)
    assert (home_lab / "assets/k3s" / VERSION / "amd64/k3s").read_bytes() == rel.binaries["amd64"]


def test_an_interrupted_download_resumes(home_lab, mirror):
    rel = publish_k3s(mirror, VERSION, arches=("arm64",), size=3_000_000)
    mirror.cut_once.add(rel.base + "k3s-arm64")
    first = fetch(home_lab, mirror, "--arch", "arm64")
    assert first.exit_code == 1
    assert "k3s-arm64: download interrupted after" in first.output
    assert assets_of(home_lab) == []
    part = home_lab / f"var/assets-fetch/k3s/{VERSION}/k3s-arm64.part"
    have = part.stat().st_size
    assert 0 < have < len(rel.binaries["arm64"])
    second = fetch(home_lab, mirror, "--arch", "arm64")
    assert second.exit_code == 0, second.output
    assert f"resuming at byte {have:,}" in second.output
    assert mirror.gets("k3s-arm64")[-1]["range"] == f"bytes={have}-"
    assert (home_lab / "assets/k3s" / VERSION / "arm64/k3s").read_bytes() == rel.binaries["arm64"]


def test_the_unfinished_download_of_another_version_is_discarded(home_lab, mirror):
    # It stayed in var/assets-fetch/k3s/<old version>/ for ever once site.yaml moved on.
    rel = publish_k3s(mirror, VERSION, arches=("arm64",), size=3_000_000)
    mirror.cut_once.add(rel.base + "k3s-arm64")
    assert fetch(home_lab, mirror, "--arch", "arm64").exit_code == 1
    abandoned = home_lab / f"var/assets-fetch/k3s/{VERSION}"
    assert (abandoned / "k3s-arm64.part").is_file()
    publish_k3s(mirror, "v1.31.5+k3s1", arches=("arm64",))
    result = fetch(home_lab, mirror, "--version", "v1.31.5+k3s1", "--arch", "arm64")
    assert result.exit_code == 0, result.output
    assert not abandoned.exists()
    assert (f"discarded {abandoned}, what an unfinished fetch of k3s {VERSION} left: this fetch "
            "is of v1.31.5+k3s1") in result.output  # fmt: skip


@pytest.fixture
def small_disk(tmp_path):
    """A directory that holds 1 MB: a tmpfs of that size, mounted for the test (root only)."""
    import subprocess
    import uuid

    disk = tmp_path / f"disk-{uuid.uuid4().hex[:8]}"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                       capture_output=True, text=True, check=False)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (root only): {r.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_full_disk_keeps_the_partial_download_and_says_so(small_disk, mirror):
    # It was "Error: [Errno 28] No space left on device": no file named, nothing said of what
    # was kept or what to do.
    import subprocess

    site = small_disk / "site"
    site.mkdir()
    rel = publish_k3s(mirror, VERSION, arches=("amd64",), size=3_000_000)
    first = fetch(site, mirror, "--version", VERSION, "--arch", "amd64")
    assert first.exit_code == 1
    part = site / f"var/assets-fetch/k3s/{VERSION}/k3s.part"
    assert f"k3s: cannot write {part} after " in first.output
    assert "No space left on device" in first.output
    assert "the partial file is kept: make room and run the same command again" in first.output
    have = part.stat().st_size
    assert 0 < have < len(rel.binaries["amd64"])
    assert assets_of(site) == []

    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    second = fetch(site, mirror, "--version", VERSION, "--arch", "amd64")
    assert second.exit_code == 0, second.output
    assert mirror.gets("k3s")[-1]["range"] == f"bytes={have}-"
    assert (site / "assets/k3s" / VERSION / "amd64/k3s").read_bytes() == rel.binaries["amd64"]


def test_architectures_fetched_apart_share_one_manifest_and_a_refetch_downloads_nothing(
    home_lab, mirror
):
    publish_k3s(mirror, VERSION)
    assert fetch(home_lab, mirror, "--arch", "amd64").exit_code == 0
    assert fetch(home_lab, mirror, "--arch", "arm64").exit_code == 0
    manifest = json.loads((home_lab / "assets/k3s" / VERSION / "manifest.json").read_text())
    assert [f["arch"] for f in manifest["files"]] == ["amd64", "arm64"]
    mirror.requests.clear()
    again = fetch(home_lab, mirror)
    assert again.exit_code == 0, again.output
    assert "nothing downloaded" in again.output
    assert not mirror.gets("k3s") and not mirror.gets("k3s-arm64")


def test_an_unknown_release_is_reported(home_lab, mirror):
    result = fetch(home_lab, mirror, "--version", "v9.9.9+k3s1")
    assert result.exit_code == 1
    assert "no k3s release v9.9.9+k3s1 at" in result.output
    bad = fetch(home_lab, mirror, "--version", "../../etc")
    assert bad.exit_code == 1 and "not a k3s release such as v1.31.4+k3s1" in bad.output
    assert assets_of(home_lab) == []


def test_a_fetched_sum_and_a_different_one_in_site_yaml_disagree_loudly(home_lab, mirror):
    rel = publish_k3s(mirror, VERSION)
    assert fetch(home_lab, mirror).exit_code == 0
    text = (home_lab / "site.yaml").read_text()
    other = hashlib.sha256(b"another k3s").hexdigest()
    (home_lab / "site.yaml").write_text(
        text.replace("    server_args:", f"    sha256:\n      arm64: {other}\n    server_args:", 1)
    )
    r = run("site", "check", str(home_lab))
    assert r.exit_code == 1
    assert f"cluster.k3s.sha256.arm64: {other} is not the SHA-256 that k3s {VERSION}'s own " \
        f"sha256sum-arm64.txt gives, {rel.sha256('arm64')}" in r.output  # fmt: skip


def test_the_example_has_no_checksum_of_its_own():
    """The home lab's k3s checksums come from the fetch, not from a hand-copied value."""
    text = (EXAMPLES / "home-lab" / "site.yaml").read_text()
    assert "sha256" not in text.split("cluster:", 1)[1].split("flatcar:", 1)[0].replace(
        "sha256sum", "")  # fmt: skip


def test_a_k3s_fetched_while_serving_reloads_the_site(home_lab, mirror):
    from bastion.site.holder import SiteHolder

    publish_k3s(mirror, VERSION)
    assert fetch(home_lab, mirror).exit_code == 0
    holder = SiteHolder(home_lab)
    node = {m.name: m.node for m in holder.site.cluster_nodes}["pi1"]
    assert node["k3s"]["version"] == VERSION
    # A new k3s version in site.yaml: not fetched yet, so the reload fails and the old stays.
    new = "v1.32.0+k3s1"
    text = (home_lab / "site.yaml").read_text()
    (home_lab / "site.yaml").write_text(text.replace(f"version: {VERSION}", f"version: {new}"))
    assert holder.poll() is None  # settling
    failed = holder.poll()
    assert failed is not None and not failed.ok and f"k3s {new} for arm64" in failed.error
    # Fetching it is a change the holder sees: the site reloads with the new release's sums.
    rel = publish_k3s(mirror, new)
    assert fetch(home_lab, mirror).exit_code == 0
    assert holder.poll() is None
    ok = holder.poll()
    assert ok is not None and ok.ok, ok
    node = {m.name: m.node for m in holder.site.cluster_nodes}["pi1"]
    assert node["k3s"]["version"] == new and node["k3s"]["sha256"] == rel.sha256("arm64")
