"""The registry cache with real registries: an "upstream" Distribution registry in a namespace of
its own (the internet, here), an image the test builds pushed into it with skopeo, and
`bastion registry-cache run` in a second namespace in front of it. An image pulled through the
cache is served again by the cache, digest and bytes identical, after the upstream is stopped;
an image never pulled through it is then gone.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml
from bastion.regcache import plan
from bastion.regcache.run import disk_usage, prune, registry_program, storage_path
from bastion.site.load import load_site
from netkit import VethLan, need_root, need_tool
from regcache_kit import home_lab

UPSTREAM_IP, CACHE_IP = "10.93.0.1", "10.93.0.2"
UPSTREAM = f"{UPSTREAM_IP}:5000"  # the mirrored registry, as the nodes name it
CACHE = f"{CACHE_IP}:5100"


def _blob(layout: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def build_oci_image(layout: Path, tag: str, text: str) -> str:
    """An OCI image layout with one tiny layer (a file holding `text`); its manifest digest."""
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w", format=tarfile.PAX_FORMAT) as t:
        body = text.encode()
        info = tarfile.TarInfo("hello.txt")
        info.size, info.mtime, info.mode = len(body), 0, 0o644
        t.addfile(info, io.BytesIO(body))
    raw = tar.getvalue()
    layer = _blob(layout, gzip.compress(raw, mtime=0))
    config = _blob(layout, json.dumps({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(raw).hexdigest()}"]},
    }).encode())  # fmt: skip
    manifest = _blob(layout, json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer}],
    }).encode())  # fmt: skip
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"schemaVersion": 2, "manifests": []}
    index["manifests"].append({"mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest,
                               "annotations": {"org.opencontainers.image.ref.name": tag}})  # fmt: skip
    index_path.write_text(json.dumps(index))
    return manifest["digest"]


def wait_http(ns, url: str, proc: subprocess.Popen, log: Path) -> None:
    """Until `url` answers inside ns; fails when the process serving it ends."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if ns.run("curl", "-sf", "-o", "/dev/null", url).returncode == 0:
            return
        assert proc.poll() is None, f"it ended ({proc.returncode}):\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"{url} never answered:\n{log.read_text()[-3000:]}")


def skopeo(ns, *args: str) -> subprocess.CompletedProcess:
    return ns.run("skopeo", "--insecure-policy", *args, capture_output=True, text=True)


def layer_text(layout: Path, tag: str) -> str:
    index = json.loads((layout / "index.json").read_text())
    [entry] = [m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag]
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / entry["digest"].split(":")[1]).read_bytes())
    layer = gzip.decompress((blobs / manifest["layers"][0]["digest"].split(":")[1]).read_bytes())
    with tarfile.open(fileobj=io.BytesIO(layer)) as t:
        return t.extractfile("hello.txt").read().decode()


@pytest.fixture
def site_dir(tmp_path):
    return home_lab(tmp_path / "site", (
        "  registry_cache:\n"
        f"    url: http://{CACHE}\n"
        f"    mirrors: ['{UPSTREAM}']\n"
        f"    serve:\n      max_size: 64MiB\n      upstreams: {{'{UPSTREAM}': 'http://{UPSTREAM}'}}\n"
    ))  # fmt: skip


def test_a_pull_through_the_cache_is_served_again_when_the_upstream_is_gone(tmp_path, site_dir):
    need_root("skopeo", "curl")
    need_tool("docker-registry")
    bastion = str(Path(sys.executable).parent / "bastion")
    layout = tmp_path / "image"
    digest = build_oci_image(layout, "v1", "hello from upstream\n")
    build_oci_image(layout, "v2", "never pulled through the cache\n")

    upstream_dir = tmp_path / "upstream"
    (upstream_dir / "data").mkdir(parents=True)
    (upstream_dir / "config.yml").write_text(yaml.safe_dump({
        "version": 0.1, "storage": {"filesystem": {"rootdirectory": str(upstream_dir / "data")}},
        "http": {"addr": UPSTREAM},
    }))  # fmt: skip

    with VethLan("rc", UPSTREAM_IP, CACHE_IP) as lan:
        up_log = tmp_path / "upstream.log"
        upstream = lan.srv.start(["docker-registry", "serve", str(upstream_dir / "config.yml")],
                                 name="upstream", log=up_log)  # fmt: skip
        wait_http(lan.cli, f"http://{UPSTREAM}/v2/", upstream, up_log)
        for tag in ("v1", "v2"):
            r = skopeo(lan.cli, "copy", "--dest-tls-verify=false", f"oci:{layout}:{tag}",
                       f"docker://{UPSTREAM}/demo/hello:{tag}")  # fmt: skip
            assert r.returncode == 0, r.stderr

        state = tmp_path / "cache-state"
        cache_log = tmp_path / "cache.log"
        cache = lan.cli.start([bastion, "registry-cache", "run", "--site", str(site_dir),
                               "--state", str(state), "--secrets-dir", str(tmp_path / "secrets"),
                               "--restart-after", "1"], name="cache", log=cache_log)  # fmt: skip
        wait_http(lan.cli, f"http://{CACHE}/v2/", cache, cache_log)

        # the instance's config is what site.yaml says: the upstream, the cache's own address
        conf = yaml.safe_load((state / f"{UPSTREAM_IP}_5000" / "config.yml").read_text())
        assert conf["proxy"] == {"remoteurl": f"http://{UPSTREAM}"}
        assert conf["http"]["addr"] == CACHE

        r = skopeo(lan.cli, "inspect", "--tls-verify=false", f"docker://{CACHE}/demo/hello:v1")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["Digest"] == digest
        first = tmp_path / "pulled-1"
        r = skopeo(lan.cli, "copy", "--src-tls-verify=false", f"docker://{CACHE}/demo/hello:v1",
                   f"oci:{first}:v1")  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert layer_text(first, "v1") == "hello from upstream\n"

        lan.srv.procs.stop("upstream")
        assert upstream.poll() is not None
        assert lan.cli.run("curl", "-sf", "-m", "5", f"http://{UPSTREAM}/v2/").returncode != 0

        r = skopeo(lan.cli, "inspect", "--tls-verify=false", f"docker://{CACHE}/demo/hello:v1")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["Digest"] == digest
        second = tmp_path / "pulled-2"
        r = skopeo(lan.cli, "copy", "--src-tls-verify=false", f"docker://{CACHE}/demo/hello:v1",
                   f"oci:{second}:v1")  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert layer_text(second, "v1") == "hello from upstream\n"
        assert json.loads((second / "index.json").read_text())["manifests"][0]["digest"] == digest

        # what was never pulled through the cache is not there: the upstream is really gone
        r = skopeo(lan.cli, "inspect", "--tls-verify=false", f"docker://{CACHE}/demo/hello:v2")
        assert r.returncode != 0
        assert cache.poll() is None, cache_log.read_text()[-3000:]

        # stopped, `run` takes its registries with it
        lan.cli.procs.stop("cache")
        assert cache.poll() is not None
        assert subprocess.run(["pgrep", "-f", str(state)], capture_output=True, check=False).returncode == 1

    # the storage bound: garbage-collected for real, then emptied when that is not enough
    inst = plan.instances(load_site(site_dir).settings.cluster.registry_cache)[0]
    program = registry_program()
    said: list[str] = []
    assert prune(inst, state, 1 << 30, program, said.append) == "within"
    assert disk_usage(storage_path(state, inst)) > 0 and not said
    assert prune(inst, state, 1, program, said.append) == "emptied"
    assert disk_usage(storage_path(state, inst)) == 0
    assert "garbage-collecting" in said[0] and "garbage-collect failed" not in "".join(said)
