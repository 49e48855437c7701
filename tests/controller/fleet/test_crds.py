"""bastion.fleet.crds: the Site and Machine CRDs, generated from the site files' models.

Checked with the tools at hand, no cluster: kubernetes-validate (PyPI; Kubernetes' own JSON
schemas per release) for the CRDs as API objects, the structural-schema rules the API server
applies to a CRD's openAPIV3Schema (written out below), and openapi-schema-validator (PyPI;
OpenAPI 3.0's schema dialect, `nullable` included) for the example sites' resources against the
generated schemas. kubectl (Debian's kubernetes-client) cannot validate without an API server."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from bastion.fleet import crds
from bastion.site.load import load_site
from bastion_testkit import EXAMPLES, write_assets
from mirrorkit import fetch_k3s_into
from openapi_schema_validator import OAS30Validator

KUBERNETES = "1.37.0"


def schema_of(kind: str) -> dict:
    [crd] = [c for c in crds.crds() if c["spec"]["names"]["kind"] == kind]
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("crd", crds.crds(), ids=lambda c: c["metadata"]["name"])
def test_each_crd_is_a_valid_kubernetes_object(crd):
    assert kubernetes_validate.validate(crd, KUBERNETES, strict=True)


def structural_problems(node, path="") -> list[str]:
    """The rules of a structural schema (Kubernetes, "Specifying a structural schema"): a type
    on every node (or x-kubernetes-int-or-string / -preserve-unknown-fields), no $ref, no
    `additionalProperties` beside `properties`, only the keywords JSONSchemaProps has."""
    out = []
    known = crds._KEPT | {"x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string"}
    if "type" not in node and not (node.get("x-kubernetes-int-or-string")
                                   or node.get("x-kubernetes-preserve-unknown-fields")):  # fmt: skip
        out.append(f"{path}: no type")
    if "properties" in node and "additionalProperties" in node:
        out.append(f"{path}: properties and additionalProperties")
    out += [f"{path}: keyword {k}" for k in node if k not in known]
    for name, sub in (node.get("properties") or {}).items():
        out += structural_problems(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            out += structural_problems(node[key], f"{path}[{key}]")
    return out


@pytest.mark.parametrize("kind", ["Site", "Machine"])
def test_the_schemas_are_structural(kind):
    assert structural_problems(schema_of(kind)) == []


def test_the_schemas_come_from_the_models():
    spec = schema_of("Machine")["properties"]["spec"]
    # the desired state, as machines.yaml has it
    assert spec["properties"]["power"]["enum"] == ["on", "off"]
    assert spec["properties"]["relay"] == {**spec["properties"]["relay"], "minimum": 0, "maximum": 63}
    assert "name" not in spec["properties"] and spec["required"] == ["site"]
    site = schema_of("Site")["properties"]["spec"]["properties"]["site"]["properties"]
    steps = site["operator"]["properties"]["step_timeouts"]["additionalProperties"]
    assert (steps["type"], steps["minimum"], steps["maximum"]) == ("integer", 1, 86400)
    assert site["operator"]["properties"]["sync"]["enum"] == ["auto", "manual"]
    # the status is the operator's own (bastion.operator.core.Status)
    status = schema_of("Machine")["properties"]["status"]["properties"]["status"]["properties"]
    from bastion.operator.core import PHASES, Status

    assert set(status) == set(Status.__dataclass_fields__)
    assert status["phase"]["enum"] == list(PHASES)


@pytest.fixture(params=["site", "home-lab"])
def example(request, tmp_path):
    site = tmp_path / request.param
    shutil.copytree(EXAMPLES / request.param, site)
    if request.param == "home-lab":  # its assets where its profiles name them, k3s included
        write_assets(site, ("flatcar/stable/amd64/current", "flatcar/stable/arm64/current"))
        fetch_k3s_into(site)
    else:
        write_assets(site, ("flatcar/amd64", "flatcar/arm64"))
    return site


def test_example_sites_as_resources_are_valid_and_round_trip(example, tmp_path):
    docs = crds.resources(example, "home", "edge-sites", "http://10.200.0.1:8080")
    validators = {k: OAS30Validator(schema_of(k)) for k in ("Site", "Machine")}
    for doc in docs:
        errors = [e.message for e in validators[doc["kind"]].iter_errors(doc)]
        assert errors == [], (doc["metadata"]["name"], errors)
    # back to files: the site's controller loads the same site
    files = crds.site_files(docs[0], docs[1:])
    again = tmp_path / "again"
    shutil.copytree(example, again)
    for rel, data in files.items():
        (again / rel).write_bytes(data)
    before, after = load_site(example), load_site(again)
    assert after.settings == before.settings
    assert [(m.name, m.mac, m.relay, m.profile, m.power) for m in after.machines] == [
        (m.name, m.mac, m.relay, m.profile, m.power) for m in before.machines]


def test_a_wrong_resource_is_refused_naming_the_field(example):
    docs = crds.resources(example, "home", "edge-sites", "http://10.200.0.1:8080")
    machine = copy.deepcopy(docs[1])
    machine["spec"]["power"] = "maybe"
    machine["spec"]["relay"] = 64
    errors = sorted((list(e.absolute_path), e.validator) for e in
                    OAS30Validator(schema_of("Machine")).iter_errors(machine))  # fmt: skip
    assert errors == [(["spec", "power"], "enum"), (["spec", "relay"], "maximum")]
    site = copy.deepcopy(docs[0])
    site["spec"]["site"]["operator"] = {"cycles": "3"}
    errors = [list(e.absolute_path) for e in OAS30Validator(schema_of("Site")).iter_errors(site)]
    assert errors == [["spec", "site", "operator", "cycles"]]


def test_bastion_fleet_crds_prints_and_writes_them(tmp_path):
    bastion = Path(sys.executable).parent / "bastion"
    out = subprocess.run([str(bastion), "fleet", "crds"], capture_output=True, text=True, check=True)
    assert list(yaml.safe_load_all(out.stdout)) == crds.crds()
    r = subprocess.run([str(bastion), "fleet", "crds", "-o", str(tmp_path / "crds")],
                       capture_output=True, text=True, check=True)  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "crds").iterdir()) == ["machines.yaml", "sites.yaml"]
    assert "wrote" in r.stdout
    r = subprocess.run([str(bastion), "fleet", "resources", str(EXAMPLES / "matchbox"), "--name",
                        "m", "--controller-url", "http://10.200.0.9:8080"],
                       capture_output=True, text=True, check=True)  # fmt: skip
    assert [d["kind"] for d in yaml.safe_load_all(r.stdout)] == ["Site"]


def test_the_resources_in_docs_fleet_md_are_valid():
    from bastion_testkit import REPO

    text = (REPO / "docs" / "fleet.md").read_text()
    blocks = text.split("<!-- resource -->\n```yaml\n")[1:]
    assert len(blocks) == 2
    for block in blocks:
        doc = yaml.safe_load(block.split("```", 1)[0])
        errors = [e.message for e in OAS30Validator(schema_of(doc["kind"])).iter_errors(doc)]
        assert errors == [], (doc["kind"], errors)
        if doc["kind"] == "Site":  # and the site.yaml in it is one the site files accept
            from bastion.site.schema import SiteFile

            SiteFile.model_validate(doc["spec"]["site"])


def test_the_commands_in_docs_fleet_md_exist():
    from bastion_testkit import REPO

    text = (REPO / "docs" / "fleet.md").read_text()
    block = text.split("<!-- runnable -->\n```sh\n")[1].split("```", 1)[0]
    bastion = Path(sys.executable).parent / "bastion"
    for line in block.splitlines():
        args = line.split("#")[0].split()
        assert args[0] == "bastion"
        r = subprocess.run([str(bastion), *args[1:], "--help"], capture_output=True, text=True,
                           check=False)
        assert r.returncode == 0, (line, r.stderr)
