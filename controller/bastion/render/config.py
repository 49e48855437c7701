"""Per-machine configs: Ignition, generic templates and metadata. Pure functions of the loaded site
and the request's facts (no I/O except reading `local:` files under the site's files/).

Variables follow matchbox (`collectVariables`): the group's metadata, its selectors (keys in lower
case) and `request` = {`query`: the request's labels, `raw_query`: the raw query string}; a
`request` key in the metadata is overwritten. Edge Bastion's own (Jinja2) templates also get
`machine` (name, mac, mac_hexhyp, uuid, arch, role, hostname, labels, profile; for a machine
not in machines.yaml, its request's uuid, arch and hostname when each is valid: request_fact),
`site` (name, controller_url), `metadata` (the merged metadata as one mapping), `cluster` (a k3s node's plan,
bastion.cluster.plan; none for other machines) and `secrets` (the machine's
secrets from the controller's secret store, bastion.state.secrets). `secrets` is only filled when the
config is rendered for a one-time URL; rendered any other way, a template that touches it fails
with SecretsRequired, so a secret can never leave through a public endpoint.
"""

from __future__ import annotations

import copy
import functools
import logging
import re
import threading
import time
import types
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import jinja2
import jinja2.meta
import jinja2.sandbox

from bastion.cluster import plan as cluster
from bastion.model import BootRequest, Group, Profile, Site, TemplateFile, arch_name, uuid_text
from bastion.render import butane, gotemplate
from bastion.render.gotemplate import go_str
from bastion.settings import HOST_NAME

log = logging.getLogger("bastion.render")


class RenderError(ValueError):
    """A config that cannot be rendered for this request; the message names file and line."""


class SecretsRequired(RenderError):
    """The config reads `secrets` but was rendered without them (not for a one-time URL)."""


class _NoSecrets:
    """`secrets` in a template rendered without secrets: every use raises SecretsRequired."""

    __slots__ = ("_name",)

    def __init__(self, name: str):
        self._name = name

    def _refuse(self, *args: Any) -> Any:
        raise SecretsRequired(
            f"{self._name} reads `secrets`: it is served only on the one-time URL in the machine's boot script"
        )

    __getattr__ = __getitem__ = __iter__ = __len__ = __bool__ = __str__ = __contains__ = _refuse


class _Placeholder(str):
    """A stand-in secret for checking templates at load time: any key or attribute of it is
    another stand-in, named by its path (`secrets.wireguard.private_key`)."""

    def __getattr__(self, name: str) -> _Placeholder:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{self}.{name}")

    def __getitem__(self, key: Any) -> _Placeholder:  # type: ignore[override]
        return _Placeholder(f"{self}.{key}")


#: What the site loader renders templates with: every secret is a stand-in named by its path.
PLACEHOLDER_SECRETS = _Placeholder("secrets")


def uses_secrets(tf: TemplateFile) -> bool:
    """Whether a Jinja2 template file reads the `secrets` variable (found in its syntax tree)."""
    if tf.jinja is None or tf.raw_ignition is not None:
        return False
    return _reads_secrets(tf.text)


def takes_onetime_url(site: Site, profile: Profile) -> bool:
    """Whether the profile's boot scripts carry a one-time Ignition URL (bastion.state.onetime):
    a Flatcar profile whose Ignition template reads `secrets`."""
    if profile.os != "flatcar" or profile.engine != "jinja" or not profile.ignition:
        return False
    tf = site.ignition.get(profile.ignition)
    return tf is not None and uses_secrets(tf)


@functools.lru_cache(maxsize=512)
def _reads_secrets(text: str) -> bool:
    # asked on every boot script of a Flatcar profile: parse each template text once
    return "secrets" in jinja2.meta.find_undeclared_variables(jinja_env.parse(text))


jinja_env = jinja2.sandbox.SandboxedEnvironment(
    undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
)
# Lorem ipsum has no place in a config, and lipsum(100000, ...) made gigabytes of it
del jinja_env.globals["lipsum"]


def compile_jinja(text: str, name: str) -> jinja2.Template:
    """Compile a site template or raise RenderError naming the file and line."""
    try:
        return jinja_env.from_string(text)
    except jinja2.TemplateSyntaxError as e:
        raise RenderError(f"{name}:{e.lineno}: {e.message}") from None


def _jinja_render(tf: TemplateFile, variables: dict[str, Any]) -> str:
    try:
        return tf.jinja.render(variables)
    except SecretsRequired:
        raise
    except jinja2.TemplateError as e:
        raise RenderError(f"{tf.relpath}{_jinja_line(e)}: {e}") from None
    except (TypeError, ValueError, ArithmeticError, LookupError, RecursionError, MemoryError) as e:
        raise RenderError(f"{tf.relpath}{_jinja_line(e)}: {type(e).__name__}: {e}") from None


def _jinja_line(exc: BaseException) -> str:
    tb: types.TracebackType | None = exc.__traceback__
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return f":{line}" if line else ""


def variables(site: Site, group: Group, req: BootRequest) -> dict[str, Any]:
    """matchbox's template data for `group` and this request."""
    data: dict[str, Any] = copy.deepcopy(group.metadata)
    for key, value in group.selector.items():
        data[key.lower()] = value
    data["request"] = {"query": dict(req.labels), "raw_query": req.raw_query}
    return data


def _host_name(value: str) -> str | None:
    return value if HOST_NAME.fullmatch(value) else None


# What an undeclared machine's request may tell its templates as `machine.*`, each checked as
# machines.yaml checks a declared machine's: a request is anyone's text, and a template writes
# these values into YAML, unit files and KEY=value lines, where a line break or a `: ` in a
# host name added a file of the requester's choosing or broke the site's template.
_REQUEST_FACTS = {"uuid": uuid_text, "hostname": _host_name, "arch": arch_name}


class LogThrottle:
    """Which of many alike warnings to log: the first for a key, then none for that key until
    `window_s` seconds have passed, when the next one is logged with how many were held back
    in between. At most `capacity` keys are kept, the one logged longest ago forgotten first (its
    next warning is logged as a first one, its held-back count lost), so a host that changes
    its address for every request costs no more memory than that."""

    def __init__(self, window_s: float = 60.0, capacity: int = 1024,
                 clock: Callable[[], float] = time.monotonic):  # fmt: skip
        self.window_s = window_s
        self.capacity = capacity
        self._clock = clock
        self._keys: OrderedDict[Hashable, list] = OrderedDict()  # key -> [logged at, held back]
        self._lock = threading.Lock()  # /ignition and /generic render in the thread pool

    def admit(self, key: Hashable) -> int | None:
        """None: hold this warning back (counted); else log it, saying the returned number
        were held back since the last one logged for `key`."""
        now = self._clock()
        with self._lock:
            entry = self._keys.get(key)
            if entry is not None and now - entry[0] < self.window_s:
                entry[1] += 1
                return None
            held = entry[1] if entry is not None else 0
            self._keys[key] = [now, 0]
            self._keys.move_to_end(key)
            while len(self._keys) > self.capacity:
                self._keys.popitem(last=False)
            return held


# A request's facts are anyone's text: a LAN host that asks /ignition with a bad hostname in a
# loop would otherwise write a warning line per request into the controller's log.
INVALID_FACT_WARNINGS = LogThrottle()


def request_fact(req: BootRequest, key: str) -> str | None:
    """The request's `key` label if it is a valid one (a UUID, a host name, a known arch, as
    machines.yaml would take it); otherwise None, as if it had not been sent, and a warning:
    once a minute for a client address and a fact (INVALID_FACT_WARNINGS), with how many more
    that client sent since."""
    value = req.labels.get(key)
    if not value:
        return None
    checked = _REQUEST_FACTS[key](value)
    if checked is None:
        client = req.client or "an unknown address"
        held = INVALID_FACT_WARNINGS.admit((client, key))
        if held is not None:
            log.warning("boot request from %s: %s=%s is not valid; rendered as if not given%s",
                        client, key, ascii(value[:80]),
                        f" ({held} more such {key} values from {client} since the last warning)"
                        if held else "")  # fmt: skip
    return checked


def jinja_variables(
    site: Site, group: Group, profile: Profile, req: BootRequest, secrets: Mapping[str, Any] | str | None = None,
    name: str = "this config",
) -> dict[str, Any]:
    data = variables(site, group, req)
    if group.machine is not None:
        machine = group.machine.as_variables()
    else:
        mac = req.labels.get("mac")  # already a MAC (match.labels_from_pairs drops any other)
        machine = {
            "name": None,
            "mac": mac,
            "mac_hexhyp": mac.replace(":", "-") if mac else None,
            "uuid": request_fact(req, "uuid"),
            "arch": request_fact(req, "arch"),
            "role": None,
            "hostname": request_fact(req, "hostname"),
            "labels": {},
            "profile": profile.id,
        }
    data["machine"] = machine
    logs = site.settings.logs
    data["site"] = {"name": site.name, "controller_url": req.base_url,
                    "journal": bool(logs is not None and logs.journal)}  # bastion.logship
    data["metadata"] = copy.deepcopy(group.metadata)
    node = group.machine.node if group.machine is not None else None
    data["cluster"] = cluster.node_variables(node, req.base_url) if node is not None else None
    if secrets is None:
        data["secrets"] = _NoSecrets(name)
    elif isinstance(secrets, _Placeholder):
        data["secrets"] = secrets
    else:
        data["secrets"] = copy.deepcopy(dict(secrets))
    return data


def render_template(
    site: Site, tf: TemplateFile, group: Group, profile: Profile, req: BootRequest,
    secrets: Mapping[str, Any] | str | None = None,
) -> str:
    if profile.engine == "go":
        try:
            return tf.go.render(variables(site, group, req))
        except gotemplate.TemplateError as e:
            line = f":{e.line}" if e.line else ""
            raise RenderError(f"{tf.relpath}{line}: {e.message}") from None
        except (ArithmeticError, RecursionError, MemoryError) as e:  # OverflowError: printf 1e999
            raise RenderError(f"{tf.relpath}: {type(e).__name__}: {e}") from None
    return _jinja_render(tf, jinja_variables(site, group, profile, req, secrets, tf.relpath))


def render_ignition(
    site: Site, group: Group, profile: Profile, req: BootRequest, secrets: Mapping[str, Any] | str | None = None
) -> dict:
    """The machine's Ignition 3.3.0 config, validated, or raise RenderError.

    `secrets` is the machine's secrets (only for a one-time URL); without it a template that
    reads them raises SecretsRequired.
    """
    if not profile.ignition:
        raise RenderError(f"profile {profile.id!r} ({profile.source}) has no Ignition config")
    tf = site.ignition[profile.ignition]
    if tf.raw_ignition is not None:
        return copy.deepcopy(tf.raw_ignition)
    text = render_template(site, tf, group, profile, req, secrets)
    try:
        return butane.translate(text, tf.relpath, site.local_files)
    except butane.ButaneError as e:
        if text != tf.text:
            e = butane.ButaneError(e.name, [source_line(tf.text, text, line, msg) for line, msg in e.problems])
        raise RenderError(str(e)) from None


_TEMPLATE_TAG = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}")


def source_line(source: str, rendered: str, line: int | None, msg: str) -> tuple[int | None, str]:
    """Map a problem at `line` of a rendered template back to the template's own line.

    Template tags may remove or add lines, so the rendered line is looked up in the source:
    first as it is, then against each source line with its tags as wildcards; of several
    candidates the nearest wins. When nothing fits, the message quotes the rendered line.
    """
    rendered_lines = rendered.splitlines()
    if not line or not 1 <= line <= len(rendered_lines):
        return line, msg
    text = rendered_lines[line - 1]
    source_lines = source.splitlines()
    exact = [i + 1 for i, s in enumerate(source_lines) if s == text]
    candidates = exact or [
        i + 1
        for i, s in enumerate(source_lines)
        if _TEMPLATE_TAG.search(s) and re.fullmatch(_as_pattern(s), text)
    ]
    if candidates:
        return min(candidates, key=lambda n: abs(n - line)), msg
    return None, f"{msg} (line {line} after templating: {text.strip()!r})"


def _as_pattern(source_line: str) -> str:
    parts = _TEMPLATE_TAG.split(source_line)
    return ".*?".join(re.escape(p) for p in parts)


def render_generic(
    site: Site, group: Group, profile: Profile, req: BootRequest, secrets: Mapping[str, Any] | str | None = None
) -> str:
    if not profile.generic:
        raise RenderError(f"profile {profile.id!r} ({profile.source}) has no generic config")
    return render_template(site, site.generic[profile.generic], group, profile, req, secrets)


def _go_number(value: int) -> float | int:
    """An integer as matchbox holds a JSON number, a float64 (1000000 prints as 1e+06); one
    past float64's range stays the integer, printed as its digits."""
    try:
        return float(value)
    except OverflowError:
        return value


def metadata_env(data: dict[str, Any]) -> str:
    """matchbox's /metadata answer: KEY=value lines, nested keys joined by '_', in upper case.

    Strings, booleans and numbers are printed as Go prints them (an integer too big for
    matchbox's float64, which YAML reads all the same, as its digits); lists and nulls are left
    out, as matchbox does. Lines are sorted (matchbox's order is random). A key or a value with a
    line break (a query value a node sent, a multi-line metadata string) is left out too:
    written as it is, it would add a KEY=value line of its own choosing (matchbox writes it).
    """
    lines: list[str] = []

    def walk(prefix: str, mapping: dict[str, Any]) -> None:
        for key, value in mapping.items():
            name = prefix + str(key)
            if isinstance(value, dict):
                walk(name + "_", value)
            elif isinstance(value, (str, bool, int, float)):
                line = f"{name.upper()}={go_str(_go_number(value) if type(value) is int else value)}"
                if "\n" not in line and "\r" not in line:
                    lines.append(line)

    walk("", data)
    return "".join(line + "\n" for line in sorted(lines))
