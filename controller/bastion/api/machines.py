"""Management API: machines (machines.yaml)."""

from __future__ import annotations

import typing
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    create_model,
)

from bastion.api.deps import AdminDep, RuntimeDep, SiteDep, base_url
from bastion.api.edits import (
    NOT_MODIFIED,
    PRECONDITION_FAILED,
    PUT_PRECONDITION_FAILED,
    IfMatch,
    IfMatchHeader,
    IfNoneMatchHeader,
    IfNoneMatchRead,
    answer_etag,
    edit_yaml_or_422,
    machine_etag,
    not_modified,
    served_machine_etag,
)
from bastion.api.jsonbody import StrictJsonRoute
from bastion.model import BootRequest, Machine, Site
from bastion.render.config import RenderError, SecretsRequired, render_ignition
from bastion.site.schema import MachineEntry
from bastion.state import boottrace
from bastion.state.install import Installed

router = APIRouter(prefix="/machines", tags=["machines"], route_class=StrictJsonRoute)


# The API's two machine types are made from the model and the schema, not written a third time.
_VIEW = ("name", "mac", "uuid", "arch", "role", "profile", "hostname", "labels", "relay", "source",
         "power", "maintenance", "reprovision")  # fmt: skip
_MODEL_TYPES = typing.get_type_hints(Machine)
_OPTIONAL = {"relay": None, "power": None, "maintenance": False, "reprovision": None}

MachineOut = create_model(
    "MachineOut",
    __doc__="A machine as the site model has it (model.Machine; heartbeat as an object), with "
    "the group it makes and its install-once state.",
    **{name: (_MODEL_TYPES[name], _OPTIONAL.get(name, ...)) for name in _VIEW},
    heartbeat=(dict[str, int] | None, None),
    group=(str, ...),
    # install-once (profile `install:`; bastion.state.install): what its next network boot gets
    install=(str, "always"),
    installed_at=(float | None, None),  # when it reported its first boot, if marked installed
    boots_from=(str, "network"),  # "local-disk" once an `install: once` machine is installed
    # where it stands (bastion.operator.core.status): its phase and the text shown for it
    phase=(str | None, None),
    status=(str | None, None),
)


class ReprovisionOut(BaseModel):
    machine: str
    changed: bool  # False: it was not marked installed
    was_installed_at: float | None
    event: int | None  # the `install` event recorded, when it changed
    boots_from: str


def _holds_a_model(annotation: Any) -> bool:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return any(_holds_a_model(a) for a in typing.get_args(annotation))


def _as_sent(value: Any, check: ValidatorFunctionWrapHandler) -> Any:
    """Check the value's shape and keep it as the client sent it: the site loader, not this
    check, decides what a value means (a strict field refuses `true` for 1, where a lax check
    would have converted it and written the 1), as it does for PATCH and a hand edit."""
    check(value)
    return value


def _shape_only(model: type[BaseModel], leave_out: tuple[str, ...]) -> dict[str, Any]:
    """model's fields for a body that checks shapes only: scalars and mappings typed as the
    model has them, with no bounds, each kept as sent (_as_sent); a nested section (a model of
    its own) as Any."""
    fields: dict[str, Any] = {}
    for name, f in model.model_fields.items():
        if name in leave_out:
            continue
        if _holds_a_model(f.annotation):
            annotation = Any
        else:
            annotation = Annotated[f.annotation, WrapValidator(_as_sent)]
        default = Field(default_factory=f.default_factory) if f.default_factory else f.default
        fields[name] = (annotation, default)
    return fields


MachineIn = create_model(
    "MachineIn",
    __doc__="A machines.yaml entry (the name comes from the URL), checked for shape only: the "
    "site loader checks the values, as sent, against site.schema.MachineEntry with the whole "
    "site, so a bad edit is refused naming machines.yaml's line and field like any other site "
    "problem (and like PATCH).",
    __config__=ConfigDict(extra="forbid"),
    **_shape_only(MachineEntry, leave_out=("name",)),
)


def machine_out(m: Machine, site: Site | None = None, mark: Installed | None = None,
                status: dict | None = None) -> MachineOut:  # fmt: skip
    profile = site.profiles.get(m.profile) if site is not None else None
    install = profile.install if profile is not None else "always"
    return MachineOut(
        name=m.name, mac=m.mac, uuid=m.uuid, arch=m.arch, role=m.role, profile=m.profile,
        hostname=m.hostname, labels=m.labels, relay=m.relay,
        power=m.power, maintenance=m.maintenance, reprovision=m.reprovision,
        phase=status.get("phase") if status else None, status=status.get("text") if status else None,
        heartbeat={"timeout_s": m.heartbeat[0], "boot_s": m.heartbeat[1]} if m.heartbeat else None,
        group=f"machine:{m.name}",
        source=m.source,
        install=install,
        installed_at=mark.installed_at if mark else None,
        # a mark made for another board or profile is not this machine's install (boot.py)
        boots_from="local-disk" if mark and install == "once"
        and mark.holds_for(mac=m.mac, uuid=m.uuid, profile=m.profile) else "network",
    )  # fmt: skip


def _marks(runtime) -> dict[str, Installed]:
    return runtime.provisioning.installs.all() if runtime.provisioning is not None else {}


def _machine(site: Site, name: str) -> Machine:
    m = site.machine(name)
    if m is None:
        raise HTTPException(404, f"no machine {name!r} in machines.yaml")
    return m


def _statuses(runtime) -> dict[str, dict]:
    if runtime.operator is None:
        return {}
    return {v["name"]: v["status"] for v in runtime.operator.view()["machines"]}


@router.get("", summary="Machines declared in machines.yaml")
def list_machines(site: SiteDep, runtime: RuntimeDep) -> list[MachineOut]:
    marks, statuses = _marks(runtime), _statuses(runtime)
    return [machine_out(m, site, marks.get(m.name), statuses.get(m.name)) for m in site.machines]


@router.get("/{name}", summary="One machine",
            description="`ETag`: its definition's; send it back as `If-Match` to edit it only while "
            "nobody else has, or as `If-None-Match` to get 304 while it is unchanged.",
            responses=NOT_MODIFIED)  # fmt: skip
def get_machine(name: str, site: SiteDep, runtime: RuntimeDep, response: Response,
                if_none_match: IfNoneMatchRead = None) -> MachineOut:  # fmt: skip
    m = _machine(site, name)
    tag = served_machine_etag(runtime, m)
    if (unchanged := not_modified(if_none_match, tag)) is not None:
        return unchanged
    answer_etag(response, tag)
    return machine_out(m, site, _marks(runtime).get(m.name), _statuses(runtime).get(m.name))


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


def _if_match(header: str | None, name: str, creates: bool = False,
              none_match: str | None = None) -> IfMatch:  # fmt: skip
    return IfMatch(header, f"machine {name!r}", lambda site: site.machine(name), ("machines.yaml",),
                   creates, none_match, tag=lambda m, read: machine_etag(m, read("machines.yaml")))  # fmt: skip


@router.put("/{name}", summary="Add or replace a machine (needs the token)",
            responses=PUT_PRECONDITION_FAILED)  # fmt: skip
def put_machine(name: str, body: MachineIn, runtime: RuntimeDep, response: Response, _: AdminDep,
                if_match: IfMatchHeader = None,
                if_none_match: IfNoneMatchHeader = None) -> MachineOut:  # fmt: skip
    # the values as sent (model_dump would serialise them as the field types say); null and a
    # field's default (labels: {}) leave the field out
    entry: dict[str, Any] = {"name": name}
    for key in body.model_fields_set:
        value = getattr(body, key)
        if value is not None and value != MachineIn.model_fields[key].get_default(call_default_factory=True):
            entry[key] = value

    def change(doc: dict[str, Any]) -> None:
        machines = _listed(doc)
        for i, existing in enumerate(machines):
            if isinstance(existing, dict) and existing.get("name") == name:
                machines[i] = entry
                break
        else:
            machines.append(entry)

    site = edit_yaml_or_422(runtime, "machines.yaml", change,
                            _if_match(if_match, name, creates=True, none_match=if_none_match))  # fmt: skip
    m = _machine(site, name)
    answer_etag(response, served_machine_etag(runtime, m))
    return machine_out(m, site, _marks(runtime).get(m.name))


MachinePatch = create_model(
    "MachinePatch",
    __doc__="Fields of a machines.yaml entry to change; null removes the field (its site.yaml "
    "default applies again). Checked like PUT, with the whole site.",
    __config__=ConfigDict(extra="forbid"),
    **{k: (Any, None) for k in MachineEntry.model_fields if k != "name"},
)


@router.patch(
    "/{name}",
    summary="Change fields of a machine's entry, e.g. its desired power (needs the token)",
    description="`{\"power\": \"off\"}` declares the machine off in machines.yaml; the operator "
    "acts on it at its next pass (`sync: auto`) or at `POST /api/v1/apply` (`sync: manual`).",
    responses=PRECONDITION_FAILED,
)
def patch_machine(name: str, body: MachinePatch, runtime: RuntimeDep, response: Response, _: AdminDep,
                  if_match: IfMatchHeader = None) -> MachineOut:  # fmt: skip
    fields = body.model_dump(exclude_unset=True)

    def change(doc: dict[str, Any]) -> None:
        machines = _listed(doc)
        for i, existing in enumerate(machines):
            if isinstance(existing, dict) and existing.get("name") == name:
                entry = dict(existing)
                for key, value in fields.items():
                    if value is None:
                        entry.pop(key, None)
                    else:
                        entry[key] = value
                machines[i] = entry
                return
        raise HTTPException(404, f"no machine {name!r} in machines.yaml")

    site = edit_yaml_or_422(runtime, "machines.yaml", change, _if_match(if_match, name))
    m = _machine(site, name)
    answer_etag(response, served_machine_etag(runtime, m))
    return machine_out(m, site, _marks(runtime).get(m.name), _statuses(runtime).get(m.name))


@router.delete("/{name}", status_code=204, summary="Remove a machine (needs the token)",
               responses=PRECONDITION_FAILED)  # fmt: skip
def delete_machine(name: str, runtime: RuntimeDep, _: AdminDep,
                   if_match: IfMatchHeader = None) -> None:  # fmt: skip
    def change(doc: dict[str, Any]) -> None:
        machines = _listed(doc)
        kept = [m for m in machines if not (isinstance(m, dict) and m.get("name") == name)]
        if len(kept) == len(machines):
            raise HTTPException(404, f"no machine {name!r} in machines.yaml")
        machines[:] = kept

    edit_yaml_or_422(runtime, "machines.yaml", change, _if_match(if_match, name))


def _listed(doc: dict[str, Any]) -> list[Any]:
    """machines.yaml's list of machines, which the edit changes in place (made if absent)."""
    machines = doc.get("machines")
    if machines is None:
        machines = doc["machines"] = []
    if not isinstance(machines, list):
        raise HTTPException(409, "machines.yaml: 'machines' is not a list now (a "
                            f"{type(machines).__name__}); fix it by hand first")  # fmt: skip
    return machines


class StepOut(BaseModel):
    t: float  # seconds since the boot's first step
    ts: float
    stage: str
    detail: str
    event: int  # the event it was read from (GET /api/v1/events)


class TimelineOut(BaseModel):
    machine: str
    since: str  # "power-on": from the device's last power-on; "events": no power-on recorded
    started_at: float | None
    steps: list[StepOut]


TIMELINE_EVENTS = 5000  # at most this many events read after the power-on (steps past it are left out)


def boot_timeline(store, machine: Machine) -> TimelineOut:
    """The machine's latest boot (bastion.state.boottrace): every event from the device's last
    power-on of it; without one (no relay, or none recorded yet), from its own recent events."""
    since, events = "events", [e.as_dict() for e in reversed(store.query(machine=machine.name, limit=200))]
    for e in store.query(kind="power", machine=machine.name, limit=50):  # newest first
        if e.source == "device" and e.payload.get("state") == "on":
            since, events = "power-on", [x.as_dict() for x in store.query(after=e.id - 1, limit=TIMELINE_EVENTS)]
            break
    steps = boottrace.timeline(events, machine.mac or "", machine.name, from_power=since == "power-on",
                               declared=machine.address)  # fmt: skip
    return TimelineOut(
        machine=machine.name, since=since, started_at=steps[0].event["ts"] if steps else None,
        steps=[StepOut(t=s.t, ts=s.event["ts"], stage=s.stage, detail=s.detail, event=s.event["id"])
               for s in steps],
    )  # fmt: skip


@router.get("/{name}/timeline", summary="The machine's latest boot, step by step (from the events)")
def machine_timeline(name: str, site: SiteDep, runtime: RuntimeDep) -> TimelineOut:
    return boot_timeline(runtime.store, _machine(site, name))
