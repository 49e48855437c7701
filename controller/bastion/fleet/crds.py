"""The Site and Machine custom resources of a management cluster, made from the same pydantic
models that check the site files (bastion.site.schema), so that a site's declaration means one
thing in git, in a controller and in Kubernetes (docs/fleet.md).

- `crds()`: the two CustomResourceDefinitions (apiextensions.k8s.io/v1). Their specs' schemas
  are the models' JSON schemas turned into Kubernetes *structural* schemas (`structural`):
  every $ref inlined, `Optional` as `nullable`, `Literal` as `enum`, free-form mappings as
  `x-kubernetes-preserve-unknown-fields`, `str | int` as `x-kubernetes-int-or-string`, and
  only the keywords the API server accepts. The Machine status is the operator's own status
  (bastion.operator.core.Status). Field names stay the site files' (snake_case): the same YAML
  moves between a site's files and its resources.
- `resources(site_dir, ...)`: a site directory as those resources (what a management cluster's
  git holds for it); `site_files(site, machines)`: the resources back as the site.yaml and
  machines.yaml the site's controller loads (what the fleet operator writes through the
  controller's API). Pure functions: no cluster, no network.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from bastion import yamlfile
from bastion.operator.core import PHASES, Status
from bastion.site import schema

GROUP = "fleet.edge-bastion.dev"
VERSION = "v1alpha1"
ORDER = f"{GROUP}/order"  # a Machine's place in machines.yaml (an annotation)

# What Kubernetes' JSONSchemaProps holds (apiextensions.k8s.io/v1); anything else is dropped.
_KEPT = {"description", "type", "format", "default", "maximum", "exclusiveMaximum", "minimum",
         "exclusiveMinimum", "maxLength", "minLength", "pattern", "maxItems", "minItems",
         "uniqueItems", "maxProperties", "minProperties", "required", "enum", "items",
         "properties", "additionalProperties", "nullable"}  # fmt: skip


class SiteController(BaseModel):
    """How the management side reaches the site's controller: its API through the tunnel."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field(description="the controller's URL over WireGuard, e.g. http://10.200.0.1:8080")
    token_secret: str = Field(
        description="the Secret (in the Site's namespace) whose `token` is its API token"
    )


class SiteGit(BaseModel):
    """Where the site's files live; the fleet operator reads them at `revision`."""

    model_config = ConfigDict(extra="forbid")
    repo: str = Field(description="the repository, e.g. https://git.example.com/sites.git")
    path: str = Field(default=".", description="the site's directory in it")
    revision: str = Field(default="main", description="a branch, tag or commit")


class SiteSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    controller: SiteController
    git: SiteGit | None = Field(default=None, description="the site's files, when they are in git")
    site: schema.SiteFile = Field(description="site.yaml, as the site files have it")


class SiteStatus(BaseModel):
    """What the fleet operator last read from the site's controller (GET /api/v1/operator)."""

    reachable: bool = Field(description="the controller answered the last look")
    last_seen: float | None = Field(default=None, description="when it last answered (Unix time)")
    generation: int | None = Field(default=None, description="the site generation it serves")
    applied_generation: int | None = Field(default=None, description="the one its operator applied")
    phases: dict[str, int] = Field(default_factory=dict, description="machines by status phase")


class MachineSpec(schema.MachineEntry):
    """A machines.yaml entry (its name is the resource's name), and its site."""

    site: str = Field(description="the Site this machine belongs to")


class MachineStatus(BaseModel):
    """The site operator's view of the machine (bastion.operator.core.Status), and its relay."""

    relay_state: str | None = Field(default=None, description="on, off, queued, cycling")
    status: Status | None = None


def structural(model: Any, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """The Kubernetes structural schema of a pydantic model (or dataclass), without `drop`."""
    raw = TypeAdapter(model).json_schema(ref_template="#/$defs/{model}")
    defs = raw.pop("$defs", {})
    out = _convert(raw, defs)
    for name in drop:
        out.get("properties", {}).pop(name, None)
        if name in out.get("required", []):
            out["required"].remove(name)
    return out


def _convert(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    node = copy.deepcopy(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[1]]
        return _convert({**target, **node}, defs)
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf")]
        nullable = any(o.get("type") == "null" for o in options)
        options = [_convert(o, defs) for o in options if o.get("type") != "null"]
        types = {o.get("type") for o in options}
        if len(options) == 1:
            merged = {**options[0], **{k: v for k, v in node.items() if k in _KEPT}}
        elif types == {"string", "integer"}:
            merged = {"x-kubernetes-int-or-string": True,
                      **{k: v for k, v in node.items() if k in _KEPT}}  # fmt: skip
        else:
            merged = {"x-kubernetes-preserve-unknown-fields": True,
                      **{k: v for k, v in node.items() if k in ("description",)}}  # fmt: skip
        if nullable:
            merged["nullable"] = True
        if merged.get("default", 0) is None:
            merged.pop("default")  # null is what an absent field means already
        return merged
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "exclusiveMinimum" in node and not isinstance(node["exclusiveMinimum"], bool):
        node["minimum"], node["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if "exclusiveMaximum" in node and not isinstance(node["exclusiveMaximum"], bool):
        node["maximum"], node["exclusiveMaximum"] = node["exclusiveMaximum"], True
    out = {k: v for k, v in node.items() if k in _KEPT}
    if "properties" in out:
        out["properties"] = {k: _convert(v, defs) for k, v in out["properties"].items()}
        out["type"] = "object"
        out.pop("additionalProperties", None)  # pruning drops unknown fields; false is refused
    elif out.get("type") == "object" or "additionalProperties" in out:
        extra = out.pop("additionalProperties", None)
        out["type"] = "object"
        values = _convert(extra, defs) if isinstance(extra, dict) and extra else {}
        if values.get("type") is not None:
            out["additionalProperties"] = values  # a mapping of typed values (dict[str, int])
        else:  # a free-form mapping (dict[str, Any])
            out["x-kubernetes-preserve-unknown-fields"] = True
    if "items" in out:
        out["items"] = _convert(out["items"], defs)
    if "type" not in out and not any(k.startswith("x-kubernetes") for k in out):
        out["x-kubernetes-preserve-unknown-fields"] = True  # Any
    return out


def _crd(kind: str, plural: str, short: list[str], spec: dict, status: dict,
         columns: list[dict]) -> dict[str, Any]:  # fmt: skip
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural,
                      "singular": kind.lower(), "shortNames": short},
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": f"Edge Bastion {kind} (docs/fleet.md)",
                    "properties": {"spec": spec, "status": status},
                    "required": ["spec"],
                }},
            }],
        },
    }  # fmt: skip


def crds() -> list[dict[str, Any]]:
    """The Site and Machine CustomResourceDefinitions."""
    machine_status = structural(MachineStatus)
    machine_status["properties"]["status"]["properties"]["phase"]["enum"] = list(PHASES)
    return [
        _crd("Site", "sites", ["bsite"], structural(SiteSpec), structural(SiteStatus), [
            {"name": "Reachable", "type": "boolean", "jsonPath": ".status.reachable"},
            {"name": "Generation", "type": "integer", "jsonPath": ".status.generation"},
            {"name": "Applied", "type": "integer", "jsonPath": ".status.applied_generation"},
        ]),
        _crd("Machine", "machines", ["bm"], structural(MachineSpec, drop=("name",)), machine_status, [
            {"name": "Site", "type": "string", "jsonPath": ".spec.site"},
            {"name": "Desired", "type": "string", "jsonPath": ".spec.power"},
            {"name": "Status", "type": "string", "jsonPath": ".status.status.text"},
            {"name": "Step", "type": "string", "jsonPath": ".status.status.step"},
        ]),
    ]  # fmt: skip


# --- a site's files and its resources -----------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, int) else k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _read(site_dir: Path, rel: str) -> Any:
    path = site_dir / rel
    return _plain(yamlfile.load(path.read_bytes(), rel)) if path.exists() else None


def _canonical(model: type[BaseModel], doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` as its model reads it, in its one written form (`disk: /dev/...` as `disk:
    {device: ...}`, MACs normalised, a bare date as text), without what is left at defaults."""
    return model.model_validate(doc).model_dump(mode="json", exclude_none=True,
                                                exclude_defaults=True)  # fmt: skip


# a Kubernetes object's name: a DNS subdomain (RFC 1123), lower case, at most 253
K8S_NAME = re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def resources(site_dir: Path, name: str, namespace: str, controller_url: str,
              token_secret: str = "bastion-api-token") -> list[dict[str, Any]]:  # fmt: skip
    """The Site and its Machines for a site directory whose files load (site.yaml and
    machines.yaml in their canonical form; the other files stay in git, where the site's
    controller reads them)."""
    site = _canonical(schema.SiteFile, _read(site_dir, "site.yaml") or {})
    api = f"{GROUP}/{VERSION}"
    out = [{"apiVersion": api, "kind": "Site", "metadata": {"name": name, "namespace": namespace},
            "spec": {"controller": {"url": controller_url, "token_secret": token_secret},
                     "site": site}}]  # fmt: skip
    for i, entry in enumerate((_read(site_dir, "machines.yaml") or {}).get("machines") or []):
        if not K8S_NAME.fullmatch(str(entry["name"])):
            # the API server refuses it (machines.yaml allows upper case and '_')
            raise ValueError(f"machines.yaml: machine {entry['name']!r} cannot be a Kubernetes "
                             "Machine's name (lower-case letters, digits, '-' and '.'): rename it "
                             "to publish the site as resources")  # fmt: skip
        spec = {k: v for k, v in _canonical(schema.MachineEntry, entry).items() if k != "name"}
        # machines.yaml's order means something (a cluster's first server starts it): kept
        out.append({"apiVersion": api, "kind": "Machine",
                    "metadata": {"name": entry["name"], "namespace": namespace,
                                 "labels": {f"{GROUP}/site": name},
                                 "annotations": {ORDER: str(i)}},
                    "spec": {"site": name, **spec}})  # fmt: skip
    return out


def site_files(site: dict[str, Any], machines: list[dict[str, Any]]) -> dict[str, bytes]:
    """site.yaml and machines.yaml for a Site and its Machines (the fleet operator's writes),
    the machines in their annotated order, then by name."""
    name = site["metadata"]["name"]
    entries = []
    def order(m: dict[str, Any]) -> tuple[int, str]:
        where = (m["metadata"].get("annotations") or {}).get(ORDER, "")
        return (int(where) if where.isdigit() else 1 << 30, m["metadata"]["name"])

    for m in sorted(machines, key=order):
        if m["spec"].get("site") != name:
            continue
        entries.append({"name": m["metadata"]["name"],
                        **{k: v for k, v in m["spec"].items() if k != "site"}})  # fmt: skip
    return {
        "site.yaml": yaml.safe_dump(site["spec"]["site"], sort_keys=False).encode(),
        "machines.yaml": yaml.safe_dump({"machines": entries}, sort_keys=False).encode(),
    }
