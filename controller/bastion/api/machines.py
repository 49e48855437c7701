"""Management API: machines (machines.yaml)."""

from __future__ import annotations

from typing import Any

import yaml
from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from bastion.api.deps import AdminDep, RuntimeDep, SiteDep, base_url
from bastion.api.edits import apply_or_422, current_yaml
from bastion.state.install import Installed
from bastion.render.config import RenderError, SecretsRequired, render_ignition
from bastion.model import BootRequest, Machine, Site

router = APIRouter(prefix="/machines", tags=["machines"])


class MachineOut(BaseModel):
    """The API's view of a model.Machine (its names; heartbeat as an object), with the group it
    makes and its install-once state."""

    name: str
    mac: str | None
    uuid: str | None
    arch: str | None
    role: str | None
    profile: str
    hostname: str
    labels: dict[str, str]
    relay: int | None = None
    heartbeat: dict[str, int] | None = None
    group: str
    source: str
    # install-once (profile `install:`; bastion.state.install): what its next network boot gets
    install: str = "always"
    installed_at: float | None = None  # when it reported its first boot, if it is marked installed
    boots_from: str = "network"  # "local-disk" once an `install: once` machine is installed


class ReprovisionOut(BaseModel):
    machine: str
    changed: bool  # False: it was not marked installed
    was_installed_at: float | None
    event: int | None  # the `install` event recorded, when it changed
    boots_from: str


class MachineIn(BaseModel):
    """A machines.yaml entry (the name comes from the URL): its shape only. The values are
    checked by the site loader against site.schema.MachineEntry, with the whole site, so a bad
    edit is refused naming machines.yaml's line and field like any other site problem; the
    fields here are MachineEntry's (a test holds them to it)."""

    model_config = ConfigDict(extra="forbid")
    mac: str | None = None
    uuid: str | None = None
    arch: str | None = None
    role: str | None = None
    profile: str | None = None
    hostname: str | None = None
    relay: int | None = None
    heartbeat: dict[str, int] | None = None  # checked by the site loader, like every field
    labels: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    # k3s nodes (site.yaml cluster:)
    address: str | None = None
    disk: str | dict[str, Any] | None = None
    k3s: dict[str, Any] | None = None
    wireguard: bool | dict[str, Any] | None = None


def machine_out(m: Machine, site: Site | None = None, mark: Installed | None = None) -> MachineOut:
    profile = site.profiles.get(m.profile) if site is not None else None
    install = profile.install if profile is not None else "always"
    return MachineOut(
        name=m.name, mac=m.mac, uuid=m.uuid, arch=m.arch, role=m.role, profile=m.profile,
        hostname=m.hostname, labels=m.labels, relay=m.relay,
        heartbeat={"timeout_s": m.heartbeat[0], "boot_s": m.heartbeat[1]} if m.heartbeat else None,
        group=f"machine:{m.name}",
        source=m.source,
        install=install,
        installed_at=mark.installed_at if mark else None,
        boots_from="local-disk" if mark and install == "once" else "network",
    )  # fmt: skip


def _marks(runtime) -> dict[str, Installed]:
    return runtime.provisioning.installs.all() if runtime.provisioning is not None else {}


def _machine(site: Site, name: str) -> Machine:
    m = site.machine(name)
    if m is None:
        raise HTTPException(404, f"no machine {name!r} in machines.yaml")
    return m


@router.get("", summary="Machines declared in machines.yaml")
def list_machines(site: SiteDep, runtime: RuntimeDep) -> list[MachineOut]:
    marks = _marks(runtime)
    return [machine_out(m, site, marks.get(m.name)) for m in site.machines]


@router.get("/{name}", summary="One machine")
def get_machine(name: str, site: SiteDep, runtime: RuntimeDep) -> MachineOut:
    m = _machine(site, name)
    return machine_out(m, site, _marks(runtime).get(m.name))


@router.post(
    "/{name}/reprovision",
    summary="Network-boot an installed machine again (needs the token)",
    description="Clears the machine's install-once mark (profile `install: once`): its next boot "
    "gets the network boot script again, and installs. Recorded as an `install` event when it "
    "changes anything; a machine that is not marked installed answers `changed: false`.",
)
def reprovision(name: str, site: SiteDep, runtime: RuntimeDep, _: AdminDep) -> ReprovisionOut:
    m = _machine(site, name)
    if runtime.provisioning is None:
        raise HTTPException(503, "this controller keeps no install-once state")
    was = runtime.provisioning.installs.clear(m.name)
    event = None
    if was is not None:
        event = runtime.record("install", source="api", mac=m.mac, machine=m.name, profile=m.profile,
                               payload={"state": "provisioning", "was_installed_at": was.installed_at,
                                        "callback": was.callback})  # fmt: skip
    return ReprovisionOut(machine=m.name, changed=was is not None,
                          was_installed_at=was.installed_at if was else None, event=event,
                          boots_from="network")  # fmt: skip


@router.get("/{name}/ignition", summary="The machine's rendered Ignition config (needs the token)")
def machine_ignition(name: str, site: SiteDep, runtime: RuntimeDep, request: Request, _: AdminDep) -> dict:
    m = _machine(site, name)
    group = site.group(f"machine:{m.name}")
    profile = site.profiles[m.profile]
    labels = {"mac": m.mac} if m.mac else {"uuid": m.uuid or ""}
    req = BootRequest(labels, "", base_url(runtime, site, request))
    if not profile.ignition:
        raise HTTPException(404, f"profile {profile.id!r} has no Ignition config")
    try:
        return render_ignition(site, group, profile, req)
    except SecretsRequired as e:  # not even with the token: secrets leave only on the one-time URL
        raise HTTPException(403, str(e)) from None
    except RenderError as e:
        raise HTTPException(500, str(e)) from None


@router.put("/{name}", summary="Add or replace a machine (needs the token)")
def put_machine(name: str, body: MachineIn, runtime: RuntimeDep, _: AdminDep) -> MachineOut:
    doc = current_yaml(runtime, "machines.yaml") or {}
    machines = list(doc.get("machines") or [])
    entry = {"name": name, **body.model_dump(exclude_none=True, exclude_defaults=True)}
    for i, existing in enumerate(machines):
        if isinstance(existing, dict) and existing.get("name") == name:
            machines[i] = entry
            break
    else:
        machines.append(entry)
    doc["machines"] = machines
    site = apply_or_422(runtime, {"machines.yaml": yaml.safe_dump(doc, sort_keys=False).encode()})
    m = _machine(site, name)
    return machine_out(m, site, _marks(runtime).get(m.name))


@router.delete("/{name}", status_code=204, summary="Remove a machine (needs the token)")
def delete_machine(name: str, runtime: RuntimeDep, _: AdminDep) -> None:
    doc = current_yaml(runtime, "machines.yaml") or {}
    machines = [m for m in doc.get("machines") or [] if not (isinstance(m, dict) and m.get("name") == name)]
    if len(machines) == len(doc.get("machines") or []):
        raise HTTPException(404, f"no machine {name!r} in machines.yaml")
    doc["machines"] = machines
    apply_or_422(runtime, {"machines.yaml": yaml.safe_dump(doc, sort_keys=False).encode()})
