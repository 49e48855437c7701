"""examples/home-lab/apps/: the apps docs/tutorial.md deploys on the home lab's k3s cluster.

No cluster runs here, so the manifests are checked offline: every object against the Kubernetes
API schemas of the site's own k3s version (kubernetes-validate, strict: an unknown field fails),
and the storage against what the site really gives the nodes: each `local` volume lies on the
filesystem the k3s Butane mounts from that node's USB SSD (read from the node's rendered
Ignition, not written down twice), on nodes that are servers of the site.
"""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from bastion import boot
from bastion.model import BootRequest
from bastion.render.config import render_ignition
from bastion.site.load import load_site
from bastion.state.secrets import SecretStore, machine_secrets
from bastion_testkit import EXAMPLES
from mirrorkit import home_lab_copy

HOME_LAB = EXAMPLES / "home-lab"
APPS = HOME_LAB / "apps"
MANIFESTS = sorted(APPS.rglob("*.yaml"))


def k3s_version() -> str:
    """site.yaml cluster.k3s.version, e.g. v1.31.4+k3s1."""
    return yaml.safe_load((HOME_LAB / "site.yaml").read_text())["cluster"]["k3s"]["version"]


def kubernetes_version() -> str:
    """The Kubernetes release a k3s version packages: v1.31.4+k3s1 -> 1.31.4."""
    return k3s_version().removeprefix("v").split("+", 1)[0]


def objects(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_objects() -> list[tuple[Path, dict]]:
    return [(p, o) for p in MANIFESTS for o in objects(p)]


def _id(x):
    return str(x.relative_to(APPS)) if isinstance(x, Path) else None


def test_there_are_apps_to_check():
    kinds = {o["kind"] for _, o in all_objects()}
    assert {
        "Namespace",
        "PersistentVolume",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "Ingress",
    } <= kinds


@pytest.mark.parametrize("path", MANIFESTS, ids=_id)
def test_every_manifest_is_valid_for_the_sites_kubernetes(path):
    version = kubernetes_version()
    for obj in objects(path):
        try:
            used = kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(
                f"{path.relative_to(HOME_LAB)}: {obj['kind']} {obj['metadata'].get('name')}: {e.message}"
            )
        # the schemas of that very minor release, not an older one standing in for it
        assert used == ".".join(version.split(".")[:2]), (path, used)


def test_the_validation_catches_an_unknown_field():
    """The check above can fail: strict mode refuses a field the API does not have."""
    deployment = next(o for _, o in all_objects() if o["kind"] == "Deployment")
    bad = yaml.safe_load(yaml.safe_dump(deployment))
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, kubernetes_version(), strict=True)


def test_every_image_is_pinned_to_a_release_tag():
    for path, obj in all_objects():
        if obj["kind"] != "Deployment":
            continue
        for c in obj["spec"]["template"]["spec"]["containers"]:
            name, _, tag = c["image"].rpartition(":")
            assert name and tag and tag not in ("latest", "stable"), (path, c["image"])
            assert "@sha256:" not in c["image"], "no digest that no one here has pulled"
            assert c["resources"]["requests"], (path, c["name"])


@pytest.fixture(scope="module")
def data_mounts(tmp_path_factory) -> dict[str, dict]:
    """Each machine's rendered filesystems (Ignition storage.filesystems) and role, by name."""
    root = tmp_path_factory.mktemp("home-lab")
    site_dir = root / "home-lab"
    home_lab_copy(site_dir, k3s_version())
    site = load_site(site_dir)
    store = SecretStore(root / "secrets")
    out = {}
    for m in site.machines:
        group, profile = boot.select(site, {"mac": m.mac})
        req = BootRequest({"mac": m.mac}, f"mac={m.mac}", "http://192.168.1.10:8080")
        config = render_ignition(site, group, profile, req, machine_secrets(store, site, m))
        out[m.name] = {"role": m.role, "filesystems": config["storage"].get("filesystems", [])}
    return out


def local_volumes() -> list[tuple[Path, dict]]:
    return [
        (p, o) for p, o in all_objects() if o["kind"] == "PersistentVolume" and "local" in o["spec"]
    ]


def pinned_hosts(pv: dict) -> list[str]:
    terms = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
    hosts = []
    for term in terms:
        for e in term["matchExpressions"]:
            assert e["key"] == "kubernetes.io/hostname" and e["operator"] == "In", e
            hosts += e["values"]
    return hosts


def test_local_volumes_lie_on_the_servers_usb_ssd(data_mounts):
    assert local_volumes(), "the apps keep their data on a local volume"
    for path, pv in local_volumes():
        hosts = pinned_hosts(pv)
        assert hosts, f"{path.relative_to(HOME_LAB)}: a local volume needs the node that holds it"
        for host in hosts:
            assert host in data_mounts, (
                f"{path.relative_to(HOME_LAB)}: {host!r} is no machine of the site"
            )
            node = data_mounts[host]
            assert node["role"] == "server", (
                f"{host} is a {node['role']}, the SSDs are on the servers"
            )
            mounts = [fs["path"] for fs in node["filesystems"]]
            assert mounts, f"{host}'s Ignition mounts no disk"
            # a directory of its own on the SSD's filesystem, not the k3s datastore's root
            assert any(
                pv["spec"]["local"]["path"].startswith(m.rstrip("/") + "/") for m in mounts
            ), (
                f"{path.relative_to(HOME_LAB)}: {pv['spec']['local']['path']} is not on {host}'s SSD ({mounts})"
            )


def test_each_claim_binds_its_volume_and_the_app_uses_it():
    by_kind: dict[str, list[dict]] = {}
    for _, o in all_objects():
        by_kind.setdefault(o["kind"], []).append(o)
    pvs = {o["metadata"]["name"]: o for o in by_kind["PersistentVolume"]}
    claims = {
        (o["metadata"]["namespace"], o["metadata"]["name"]): o
        for o in by_kind["PersistentVolumeClaim"]
    }
    for (ns, name), claim in claims.items():
        pv = pvs[claim["spec"]["volumeName"]]
        assert pv["spec"]["claimRef"] == {"namespace": ns, "name": name}
        assert pv["spec"]["storageClassName"] == claim["spec"]["storageClassName"]
        assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    for d in by_kind["Deployment"]:
        ns = d["metadata"]["namespace"]
        used = {(ns, v["persistentVolumeClaim"]["claimName"]) for v in d["spec"]["template"]["spec"]["volumes"]
                if "persistentVolumeClaim" in v}  # fmt: skip
        assert used and used <= set(claims), d["metadata"]["name"]
    namespaces = {o["metadata"]["name"] for o in by_kind["Namespace"]}
    assert {
        o["metadata"]["namespace"] for _, o in all_objects() if "namespace" in o["metadata"]
    } <= namespaces
