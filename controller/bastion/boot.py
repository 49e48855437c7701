"""What the public boot endpoints answer: plain functions (site, request facts) -> Answer.

Transport-neutral like matchbox's `server` package: the HTTP handlers only turn a request into a
BootRequest, call one of these, record the event and send the Answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from bastion import match
from bastion.render import boot as scripts
from bastion.render import ignition
from bastion.render.config import (
    BootRequest,
    RenderError,
    SecretsRequired,
    metadata_env,
    render_generic,
    render_ignition,
    variables,
)
from bastion.site.model import ARCH_ALIASES, Boot, Group, Profile, Site

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"


@dataclass(frozen=True)
class Answer:
    status: int
    body: str
    media_type: str = TEXT
    group: Group | None = None
    profile: Profile | None = None
    error: str | None = None

    @property
    def machine(self) -> str | None:
        return self.group.machine.name if self.group and self.group.machine else None


def describe(labels: dict[str, str]) -> str:
    shown = {k: v for k, v in labels.items() if v}
    return ", ".join(f"{k}={v}" for k, v in sorted(shown.items())) or "no labels"


def select(site: Site, labels: dict[str, str]) -> tuple[Group, Profile] | None:
    group = match.select_group(site.groups, labels)
    if group is None:
        return None
    return group, site.profiles[group.profile]


def _no_match(labels: dict[str, str]) -> Answer:
    text = (
        f"no group matches this machine ({describe(labels)}): declare it in machines.yaml, "
        "add a matchbox group that selects it, or set a default profile\n"
    )
    return Answer(404, text, error="no matching group")


def boot_ipxe() -> Answer:
    return Answer(200, scripts.boot_script())


def grub_bootstrap(base_url: str) -> Answer:
    return Answer(200, scripts.grub_bootstrap(base_url))


def machine_arch(group: Group, labels: dict[str, str]) -> str | None:
    if group.machine is not None and group.machine.arch:
        return group.machine.arch
    arch = labels.get("arch") or None
    return ARCH_ALIASES.get(arch, arch) if arch else None


def boot_for(group: Group, profile: Profile, req: BootRequest, loader: str) -> Boot | None:
    """The boot settings to hand out; Flatcar profiles get their PXE kernel arguments.

    The Ignition URL names the machine by the MAC it booted with when known, otherwise it leaves
    the boot program to fill it in (iPXE's ${mac:hexhyp}, GRUB's ${net_default_mac}); and it
    carries the group's other selectors, so that Ignition's request selects this same group (a
    machine declared by its UUID, a group that selects by labels). No other group can come
    first: one that matches this subset of the boot request's labels matched them all.
    """
    boot = profile.boot_for(machine_arch(group, req.labels))
    if boot is None or profile.format != "bastion" or profile.os != "flatcar":
        return boot
    mac = req.labels.get("mac") or (group.machine.mac if group.machine else None)
    if mac:
        parts = [f"mac={match.mac_hexhyp(mac)}"]
    else:
        parts = ["mac=${mac:hexhyp}" if loader == "ipxe" else "mac=${net_default_mac}"]
    parts += [
        f"{quote(key, safe='')}={quote(value, safe='')}"
        for key, value in sorted(group.selector.items())
        if key.lower() != "mac"
    ]
    ident = "&".join(parts)
    url = f"{req.base_url}/ignition?{ident}" if profile.ignition else None
    return scripts.flatcar_boot(boot, url)


def _boot_answer(site: Site, req: BootRequest, loader: str) -> Answer:
    found = select(site, req.labels)
    if found is None:
        return _no_match(req.labels)
    group, profile = found
    boot = boot_for(group, profile, req, loader)
    if boot is None:
        return Answer(
            404,
            f"profile {profile.id!r} ({profile.source}) has no boot settings\n",
            group=group,
            profile=profile,
            error="profile has no boot settings",
        )
    if loader == "ipxe":
        body = scripts.ipxe_script(boot)
    else:
        body = scripts.grub_config(boot, profile.name)
    return Answer(200, body, group=group, profile=profile)


def ipxe(site: Site, req: BootRequest) -> Answer:
    return _boot_answer(site, req, "ipxe")


def grub(site: Site, req: BootRequest) -> Answer:
    return _boot_answer(site, req, "grub")


def ignition_config(site: Site, req: BootRequest) -> Answer:
    found = select(site, req.labels)
    if found is None:
        return _no_match(req.labels)
    group, profile = found
    if not profile.ignition:
        return Answer(
            404,
            f"profile {profile.id!r} ({profile.source}) has no Ignition config\n",
            group=group,
            profile=profile,
            error="profile has no Ignition config",
        )
    try:
        config = render_ignition(site, group, profile, req)
    except SecretsRequired as e:
        return Answer(403, f"{e}\n", group=group, profile=profile, error="holds secrets: one-time URL only")
    except RenderError as e:
        return Answer(500, f"cannot render Ignition: {e}\n", group=group, profile=profile, error=str(e))
    return Answer(200, ignition.dumps(config), JSON, group=group, profile=profile)


def generic(site: Site, req: BootRequest) -> Answer:
    found = select(site, req.labels)
    if found is None:
        return _no_match(req.labels)
    group, profile = found
    if not profile.generic:
        return Answer(
            404,
            f"profile {profile.id!r} ({profile.source}) has no generic config\n",
            group=group,
            profile=profile,
            error="profile has no generic config",
        )
    try:
        text = render_generic(site, group, profile, req)
    except SecretsRequired as e:
        return Answer(403, f"{e}\n", group=group, profile=profile, error="holds secrets: one-time URL only")
    except RenderError as e:
        return Answer(500, f"cannot render generic config: {e}\n", group=group, profile=profile, error=str(e))
    return Answer(200, text, group=group, profile=profile)


def metadata(site: Site, req: BootRequest) -> Answer:
    group = match.select_group(site.groups, req.labels)
    if group is None:
        return _no_match(req.labels)
    return Answer(
        200,
        metadata_env(variables(site, group, req)),
        group=group,
        profile=site.profiles.get(group.profile),
    )
