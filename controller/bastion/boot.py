"""What the public boot endpoints answer: plain functions (site, request facts) -> Answer.

Transport-neutral like matchbox's `server` package: the HTTP handlers only turn a request into a
BootRequest, call one of these, record the event and send the Answer.

Two pieces of controller state change the answers, and are passed in as a `Provisioning` (without
one, the answers are matchbox's: pure functions of the site and the request):
- one-time Ignition URLs (bastion.state.onetime): a profile whose Ignition reads `secrets` gets a
  token in its boot script's Ignition URL, and `onetime_ignition` serves the config once for it;
- install-once marks (bastion.state.install): an installed machine's boot script boots its local disk.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

from bastion import match

from bastion.state import install
from bastion.state.onetime import IgnitionTokens, TokenRefused
from bastion.render import boot as scripts
from bastion.render import ignition
from bastion.render.config import (
    PLACEHOLDER_SECRETS,
    RenderError,
    SecretsRequired,
    metadata_env,
    render_generic,
    render_ignition,
    takes_onetime_url,
    variables,
)
from bastion.model import ARCH_ALIASES, Boot, BootRequest, Group, Machine, Profile, Site

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
    # more for the request's `boot` event payload (e.g. {"boot": "local-disk"})
    detail: dict[str, Any] = field(default_factory=dict)
    # an `ignition-token` event to record with it: what happened to a one-time URL
    token_event: dict[str, Any] | None = None

    @property
    def machine(self) -> str | None:
        return self.group.machine.name if self.group and self.group.machine else None


@dataclass(frozen=True)
class Provisioning:
    """The controller state the boot answers read and change (see the module's docstring)."""

    tokens: IgnitionTokens
    installs: install.InstallMarks
    # the machine's `secrets` for its one-time URL: bastion.state.secrets.machine_secrets, bound to the
    # controller's secret store
    secrets_for: Callable[[Site, Machine], Mapping[str, Any]]


def reporting_machine(site: Site, mac: str | None, uuid: str | None) -> Machine | None:
    """The declared machine a node's own report names (/callback, /heartbeat), as its boot
    requests found it: by its MAC (normalised), else by the UUID (lower case) of a machine
    declared by its UUID alone, which is recognised by it whatever MAC it booted with
    (docs/site-files.md, machines.yaml). None when the site declares neither."""
    machine = site.machine_by_mac(mac)
    if machine is None and uuid:
        # a scan: reports come every few seconds a node, and sites have tens of machines
        machine = next((m for m in site.machines if m.mac is None and m.uuid == uuid), None)
    return machine


def describe(labels: dict[str, str]) -> str:
    shown = {k: v for k, v in labels.items() if v}
    return ", ".join(f"{k}={v}" for k, v in sorted(shown.items())) or "no labels"


def select(site: Site, labels: dict[str, str]) -> tuple[Group, Profile] | None:
    group = site.select_group(labels)
    if group is None:
        return None
    return group, site.profiles[group.profile]


def _lacks(group: Group, profile: Profile, what: str) -> Answer:
    """404: the machine's profile has no `what` (boot settings, Ignition config, ...)."""
    return Answer(404, f"profile {profile.id!r} ({profile.source}) has no {what}\n", group=group,
                  profile=profile, error=f"profile has no {what}")  # fmt: skip


def _no_match(req: BootRequest) -> Answer:
    text = (
        f"no group matches this machine ({describe(req.labels)}): declare it in machines.yaml, "
        "add a matchbox group that selects it, or set a default profile\n"
    )
    bad = [v for k, v in parse_qsl(req.raw_query, keep_blank_values=True)
           if k.lower() == "mac" and k not in req.labels]  # fmt: skip
    if bad:  # dropped by match.labels_from_pairs: say so, or the answer hides why
        text += f"(mac={bad[0]!r} is not a MAC address, so it selects nothing)\n"
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


def boot_for(group: Group, profile: Profile, req: BootRequest, loader: str, token: str | None = None) -> Boot | None:
    """The boot settings to hand out; Flatcar profiles get their PXE kernel arguments.

    The Ignition URL names the machine by the MAC it booted with when known, otherwise it leaves
    the boot program to fill it in (iPXE's ${mac:hexhyp}, GRUB's ${net_default_mac}); and it
    carries the group's other selectors, so that Ignition's request selects this same group (a
    machine declared by its UUID, a group that selects by labels). No other group can come
    first: one that matches this subset of the boot request's labels matched them all.
    With a one-time `token` (bastion.state.onetime), the URL starts with `token=<token>`.
    """
    boot = profile.boot_for(machine_arch(group, req.labels))
    if boot is None or profile.format != "bastion" or profile.os != "flatcar":
        return boot
    # the MAC under the group's own spelling of the key (a selector's `MAC` matches a request's
    # `MAC` only: written `mac` here, Ignition's request matched no group)
    mac_key = next((k for k in group.selector if k.lower() == "mac"), "mac")
    mac = req.labels.get(mac_key) or req.labels.get("mac") or (group.machine.mac if group.machine else None)
    mac_name = quote(mac_key, safe="")
    if mac:
        parts = [f"{mac_name}={match.mac_hexhyp(mac)}"]
    else:
        parts = [f"{mac_name}=${{mac:hexhyp}}" if loader == "ipxe" else f"{mac_name}=${{net_default_mac}}"]
    parts += [
        f"{quote(key, safe='')}={quote(value, safe='')}"
        for key, value in sorted(group.selector.items())
        if key.lower() != "mac"
    ]
    if token is not None:
        parts.insert(0, f"token={token}")
    ident = "&".join(parts)
    url = f"{req.base_url}/ignition?{ident}" if profile.ignition else None
    return scripts.flatcar_boot(boot, url)


def _boot_answer(site: Site, req: BootRequest, loader: str, prov: Provisioning | None) -> Answer:
    found = select(site, req.labels)
    if found is None:
        return _no_match(req)
    group, profile = found
    machine = group.machine
    if prov is not None and machine is not None and profile.install == "once":
        mark = prov.installs.get(machine.name)
        # a mark made for other hardware or another profile: what is on this disk is not
        # what the machine is declared to boot (a replaced board's is blank)
        if mark is not None and mark.holds_for(mac=machine.mac, uuid=machine.uuid, profile=profile.id):
            body = install.local_ipxe(machine.name) if loader == "ipxe" else install.local_grub(machine.name)
            return Answer(200, body, group=group, profile=profile,
                          detail={"boot": "local-disk", "installed_at": mark.installed_at})  # fmt: skip
    boot = boot_for(group, profile, req, loader)
    if boot is None:
        return _lacks(group, profile, "boot settings")
    token_event = None
    # boot_for put an Ignition URL in a Flatcar profile's arguments: make it a one-time one
    if prov is not None and takes_onetime_url(site, profile):
        issued = _issue_token(group, profile, req, prov.tokens)
        if isinstance(issued, Answer):
            return issued
        token, token_event = issued
        boot = boot_for(group, profile, req, loader, token)
    if loader == "ipxe":
        body = scripts.ipxe_script(boot)
    else:
        body = scripts.grub_config(boot, profile.name)
    return Answer(200, body, group=group, profile=profile, token_event=token_event)


def _issue_token(group: Group, profile: Profile, req: BootRequest, tokens: IgnitionTokens) -> tuple[str, dict] | Answer:
    """A one-time token for this boot script, or the Answer that refuses the script."""
    machine = group.machine
    if machine is None:
        return Answer(
            403,
            f"profile {profile.id!r}'s Ignition config reads secrets, which are kept per machine: "
            f"declare this machine ({describe(req.labels)}) in machines.yaml\n",
            group=group,
            profile=profile,
            error="holds secrets: machine not declared",
        )
    if not machine.address:  # the site loader refuses such a machine: never issue for one
        return Answer(
            403,
            f"{machine.name}'s boot script would hold a one-time Ignition URL, which is served "
            "only to the machine's address: give it `address:` in machines.yaml\n",
            group=group,
            profile=profile,
            error="holds secrets: no address",
        )
    if req.client != machine.address:
        return Answer(
            403,
            f"{machine.name}'s boot script holds a one-time Ignition URL and is served only to its "
            f"address {machine.address} (machines.yaml); this request came from "
            f"{req.client or 'an unknown address'}\n",
            group=group,
            profile=profile,
            error="holds secrets: wrong address",
            token_event={"action": "refused", "reason": "wrong-machine", "client": req.client,
                         "expected_client": machine.address, "at": "boot script"},
        )  # fmt: skip
    mac = req.labels.get("mac") or machine.mac
    token, grant = tokens.issue(machine=machine.name, mac=mac, group=group.id, profile=profile.id, client=req.client)
    return token, {"action": "issued", "token": grant.ref, "client": req.client, "expires_at": grant.expires_at}


def _quotes(text: str, secrets: Any) -> bool:
    """Whether `text` holds a secret's value, or a line of one (3 characters or more)."""
    if isinstance(secrets, Mapping):
        return any(_quotes(text, v) for v in secrets.values())
    if isinstance(secrets, (list, tuple)):
        return any(_quotes(text, v) for v in secrets)
    if isinstance(secrets, str):
        return any(len(part) >= 3 and part in text
                   for part in (secrets, *(line.strip() for line in secrets.splitlines())))  # fmt: skip
    return False


def _secret_free(site: Site, group: Group, profile: Profile, req: BootRequest) -> str:
    """What to say of a config that did not render with the machine's secrets, when the error
    quoted one: it quotes the line it failed at, and a secret's value of several lines (a key,
    a hand-made token) put its own line there, into the history and the answer. The same
    render with the placeholders the site's load check uses tells the two cases apart."""
    try:
        render_ignition(site, group, profile, req, secrets=PLACEHOLDER_SECRETS)
    except RenderError as plain:
        return str(plain)  # it fails without the secrets too: nothing of theirs in its words
    name = f"ignition/{profile.ignition}"
    return (f"{name}: the machine's secrets break the config (a value that is not what the "
            "template expects where it puts it: several lines, or YAML's own characters "
            "unquoted); its words are not shown, as they could quote a secret")


def ipxe(site: Site, req: BootRequest, prov: Provisioning | None = None) -> Answer:
    return _from_elsewhere(_boot_answer(site, req, "ipxe", prov), req)


def grub(site: Site, req: BootRequest, prov: Provisioning | None = None) -> Answer:
    return _from_elsewhere(_boot_answer(site, req, "grub", prov), req)


def _from_elsewhere(answer: Answer, req: BootRequest) -> Answer:
    """The answer, marked in its event when it is a machine's that declares `address:` and the
    request came from another address: any LAN host may ask with the machine's MAC, and its
    address is not the machine's. The address book does not learn it (bastion.state.addresses);
    the mark (`declared_address` in the payload) keeps that address, and the asker's own steps,
    out of the machine's boot timeline, which is read from the history alone
    (bastion.state.boottrace)."""
    machine = answer.group.machine if answer.group is not None else None
    if machine is None or not machine.address or not req.client or req.client == machine.address:
        return answer
    return replace(answer, detail={**answer.detail, "declared_address": machine.address})


def _rendered(site: Site, req: BootRequest, what: tuple[str, str],
              has: Callable[[Profile], object],
              render: Callable[[Group, Profile], tuple[str, str]]) -> Answer:  # fmt: skip
    """The matching profile's config as render(group, profile) makes it: (body, media type).
    404 without a match or when has(profile) is false, 403 when it reads secrets (a one-time
    URL only), 500 when it does not render. what: its name in a 404 and in a 500."""
    found = select(site, req.labels)
    if found is None:
        return _no_match(req)
    group, profile = found
    if not has(profile):
        return _lacks(group, profile, what[0])
    try:
        body, media_type = render(group, profile)
    except SecretsRequired as e:
        return Answer(403, f"{e}\n", group=group, profile=profile, error="holds secrets: one-time URL only")
    except RenderError as e:
        return Answer(500, f"cannot render {what[1]}: {e}\n", group=group, profile=profile, error=str(e))
    return Answer(200, body, media_type, group=group, profile=profile)


def ignition_config(site: Site, req: BootRequest) -> Answer:
    return _rendered(site, req, ("Ignition config", "Ignition"), lambda p: p.ignition,
                     lambda g, p: (ignition.dumps(render_ignition(site, g, p, req)), JSON))


def without_token(req: BootRequest) -> tuple[str, BootRequest]:
    """The request's `token` and the request as templates see it: without the token (so that a
    config that prints `request.raw_query` does not carry it)."""
    token = req.labels.get("token", "")
    labels = {k: v for k, v in req.labels.items() if k != "token"}
    raw = urlencode([(k, v) for k, v in parse_qsl(req.raw_query, keep_blank_values=True) if k.lower() != "token"])
    return token, BootRequest(labels, raw, req.base_url, req.client)


def _token_refused(e: TokenRefused, group: Group | None = None, profile: Profile | None = None,
                   client: str | None = None) -> Answer:  # fmt: skip
    event: dict[str, Any] = {"action": "refused", "reason": e.reason, "client": client}
    if e.grant is not None:
        event.update(token=e.grant.ref, expected_client=e.grant.client, machine=e.grant.machine,
                     mac=e.grant.mac, expires_at=e.grant.expires_at)  # fmt: skip
    return Answer(e.status, f"{e.message}\n", group=group, profile=profile,
                  error=f"one-time URL refused: {e.reason}", token_event=event)  # fmt: skip


def onetime_ignition(site: Site, req: BootRequest, prov: Provisioning) -> Answer:
    """`/ignition?token=...`: the machine's config, with its secrets, once (bastion.state.onetime).

    The token is checked (known, unused, not superseded, unexpired, this client, this MAC), the
    request's labels must select the group it was issued for, the config is rendered with the
    machine's secrets, and only then is the token used up: a config that cannot be rendered
    leaves it good for a retry."""
    token, req = without_token(req)
    try:
        grant = prov.tokens.check(token, client=req.client, mac=req.labels.get("mac"))
    except TokenRefused as e:
        return _token_refused(e, client=req.client)
    found = select(site, req.labels)
    group = found[0] if found else site.group(grant.group)
    if group is None or group.id != grant.group or group.machine is None:
        e = TokenRefused(
            "wrong-machine",
            f"this one-time Ignition URL belongs to {grant.machine} (group {grant.group}); this request "
            f"is for {group.id if group else 'no group'} ({describe(req.labels)})",
            grant,
        )
        return _token_refused(e, client=req.client)
    profile = site.profiles[group.profile]
    if not profile.ignition:
        return _lacks(group, profile, "Ignition config")
    try:
        secrets = prov.secrets_for(site, group.machine)
        config = render_ignition(site, group, profile, req, secrets=secrets)
    except RenderError as e:
        why = _secret_free(site, group, profile, req) if _quotes(str(e), secrets) else str(e)
        return Answer(500, f"cannot render Ignition: {why}\n", group=group, profile=profile, error=why)
    except ValueError as e:  # the secret store (SecretError) or a secret that cannot be made
        return Answer(500, f"cannot read {group.machine.name}'s secrets: {e}\n", group=group, profile=profile,
                      error=f"secrets: {e}")  # fmt: skip
    try:
        grant = prov.tokens.redeem(grant, client=req.client)
    except TokenRefused as e:
        return _token_refused(e, group, profile, req.client)
    return Answer(200, ignition.dumps(config), JSON, group=group, profile=profile,
                  token_event={"action": "fetched", "token": grant.ref, "client": req.client})  # fmt: skip


def generic(site: Site, req: BootRequest) -> Answer:
    return _rendered(site, req, ("generic config", "generic config"), lambda p: p.generic,
                     lambda g, p: (render_generic(site, g, p, req), TEXT))


def metadata(site: Site, req: BootRequest) -> Answer:
    group = site.select_group(req.labels)
    if group is None:
        return _no_match(req)
    return Answer(
        200,
        metadata_env(variables(site, group, req)),
        group=group,
        profile=site.profiles.get(group.profile),
    )
