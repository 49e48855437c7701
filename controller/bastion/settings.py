"""How `bastion serve` is configured: one place for each setting's option, environment variable,
default and check (pydantic-settings).

Each field of `Settings` names its environment variable (its alias, `BASTION_...`) and its
command-line option (`option` in its metadata); `serve_options` turns the fields into the click
options of `bastion serve`, so the two cannot drift apart. Precedence: a value given on the
command line (or to the constructor), then the environment, then the default.

    --site DIR                 BASTION_SITE              the site directory (required)
    --listen HOST:PORT         BASTION_LISTEN            where to serve HTTP (127.0.0.1:8080): all
                                                         of it, or the boot endpoints only when
    --management-listen H:P    BASTION_MANAGEMENT_LISTEN the management API, dashboard, metrics
                                                         and docs listen here (bastion.api.listeners)
    --management-interface IF  BASTION_MANAGEMENT_INTERFACE  and take connections arriving on
                                                         this interface only (SO_BINDTODEVICE)
    --db FILE                  BASTION_DB                the event history (default: per site,
                                                         default_db_path(<site>, <site dir>))
    --history-days D           BASTION_HISTORY_DAYS      events older than this are deleted (30)
    --history-events N         BASTION_HISTORY_EVENTS    at most this many events (100000)
    --history-size BYTES       BASTION_HISTORY_SIZE      at most this size of events (128MiB)
    (none)                     BASTION_API_TOKEN         the management API token, or
    --token-file FILE          BASTION_API_TOKEN_FILE    a file holding it (first line); wins
    --poll SECONDS             BASTION_POLL_SECONDS      site file polling (0: never; default 1)
    --device PORT              BASTION_DEVICE            the device's serial line
    --tftp ADDR:PORT           BASTION_TFTP              the controller's TFTP (the site's tftp/)
    --secrets DIR              BASTION_SECRETS_DIR       the secret store (default: per site)
    --console-dir DIR          BASTION_CONSOLE_DIR       the nodes' console logs (default: per
                                                         site, under the var dir)
    --ignition-token-ttl S     BASTION_IGNITION_TOKEN_TTL  one-time Ignition URL life (900 s)
    --max-body BYTES           BASTION_MAX_BODY          request body limit (1MiB; bastion.api.limits)
    --max-connections N        BASTION_MAX_CONNECTIONS   HTTP connections at once (1000; fit to the
                                                         descriptor limit: bastion.api.httpserver)
    --header-timeout S         BASTION_HEADER_TIMEOUT    time to send a request's head (10 s)
    --body-timeout S           BASTION_BODY_TIMEOUT      time to send a request's body (60 s)

A bad value is a SettingsError naming the option: `--tftp 'nope': expected HOST:PORT`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import stat
from pathlib import Path
from typing import Annotated, Any

import click
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# HOST:PORT, parsed by Settings' own check, never as JSON from the environment
Address = Annotated[tuple[str, int], NoDecode]

DEFAULT_IGNITION_TOKEN_TTL = 15 * 60.0
DEFAULT_MAX_BODY = 1024 * 1024
DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_HISTORY_DAYS = 30.0
DEFAULT_HISTORY_EVENTS = 100_000
# 100,000 ordinary events take about 30 MB; this bounds a LAN host's large ones (8 KiB queries:
# 8,263 bytes an event in the file, 830 MB for 100,000) to about this file size
# (bastion.state.events.ROW_BYTES)
DEFAULT_HISTORY_SIZE = 128 * 1024 * 1024
DB_SHOWN = "$XDG_STATE_HOME/edge-bastion/history/<site>-<id>/events.db"

# a host name (RFC 1123 labels, a final dot allowed): --allowed-hosts, and the site files'
HOST_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")

#: The settings given as sizes (parse_size: 1048576, 64KiB, 1MiB): the bytes each takes, as
#: (least, most, what the error says is expected).
SIZES = {"max_body": (1024, 1024**3, "1KiB to 1GiB"),
         "history_size": (1024**2, float("inf"), "1MiB or more")}  # fmt: skip

_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
               "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}  # fmt: skip


class SettingsError(ValueError):
    pass


def default_db_path(site_name: str, site_dir: Path | str) -> Path:
    """The site's own history: $XDG_STATE_HOME/edge-bastion/history/<site>-<id>/events.db
    (~/.local/state/... when unset). <id> is 8 hex digits of the SHA-256 of the site directory's
    absolute path: two site directories of one name (a copy of an example) keep two histories,
    and a site served again finds its own."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", site_name).lstrip(".") or "site"
    ident = hashlib.sha256(str(Path(site_dir).resolve()).encode()).hexdigest()[:8]
    return Path(state) / "edge-bastion" / "history" / f"{name}-{ident}" / "events.db"


def read_token_file(path: Path) -> str:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise SettingsError(f"cannot read the API token file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"the API token file {path} is not text (UTF-8)") from None
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    return check_token(token, f"in {path}")


def check_token(token: str, where: str, shortest: int = 16) -> str:
    """token, if it can be an API token: what is wrong with it (`where`: "in FILE") otherwise.
    A client's own token is not held to the length (the controller answers "wrong token")."""
    if not token.isprintable():
        raise SettingsError(f"the API token {where} has a control character")
    if not token.isascii() or any(c.isspace() for c in token):
        # it travels in an HTTP header (Authorization: Bearer ...), which carries ASCII: a
        # token with an 'o-umlaut' was taken, and then no client could ever send it
        raise SettingsError(f"the API token {where} has a space or a character outside ASCII: "
                            "use letters, digits and punctuation (openssl rand -hex 32)")  # fmt: skip
    if len(token) < shortest:
        raise SettingsError(f"the API token {where} is too short (16 characters at least)")
    return token


def token_file_exposure(path: Path) -> str | None:
    """What is wrong with who may use the API token file, for `serve` to warn about: every user
    of the host may read it (and so manage the site) or write it (and so choose the token).
    Group access is fine: install-service's file is 0640, group of the service's user."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    what = [w for bit, w in ((0o004, "read"), (0o002, "written")) if mode & bit]
    if not what:
        return None
    return (f"the API token file {path} can be {' and '.join(what)} by every user on this host "
            f"(mode {mode:04o}): chmod o-rw {path}")  # fmt: skip


def resolve_token(token: str | None = None, token_file: Path | None = None) -> str | None:
    """The API token for a client: explicit token, token file, $BASTION_API_TOKEN,
    $BASTION_API_TOKEN_FILE."""
    if token:
        return check_token(token, "given", shortest=1)
    if token_file:
        return read_token_file(token_file)
    if os.environ.get("BASTION_API_TOKEN"):
        return check_token(os.environ["BASTION_API_TOKEN"], "in $BASTION_API_TOKEN", shortest=1)
    if os.environ.get("BASTION_API_TOKEN_FILE"):
        return read_token_file(Path(os.environ["BASTION_API_TOKEN_FILE"]))
    return None


def parse_listen(text: str, option: str = "--listen") -> tuple[str, int]:
    """'HOST:PORT' or '[v6]:PORT' -> (host, port); ':PORT' is every IPv4 address."""
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise SettingsError(f"{option} {text!r}: expected HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def same_listener(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Whether two HOST:PORT listeners would take the same socket: one port, and one host or a
    wildcard (0.0.0.0, ::) on either side."""
    wildcard = ("0.0.0.0", "::", "")
    return a[1] == b[1] and (a[0] == b[0] or a[0] in wildcard or b[0] in wildcard)


def parse_size(text: str, option: str) -> int:
    """'1048576', '64KiB', '1MiB', '1M' (10**6) -> bytes."""
    number = text.strip().rstrip("BbIiKkMmGg ")
    unit = text.strip()[len(number):].strip().lower()
    if not (number.isascii() and number.isdigit()) or unit not in _SIZE_UNITS:
        raise SettingsError(f"{option} {text!r}: expected a size in bytes, e.g. 1048576, 64KiB, 1MiB")
    return int(number) * _SIZE_UNITS[unit]


def _setting(env: str, option: str | None, help: str, default: Any = None,
             default_factory: Any = None, **extra: Any) -> Any:  # fmt: skip
    meta = {"option": option, "help": help, **extra}
    if default_factory is not None:
        return Field(default_factory=default_factory, alias=env, json_schema_extra=meta)
    return Field(default=default, alias=env, json_schema_extra=meta)


class Settings(BaseSettings):
    """The controller's settings; see the module docstring. Frozen once made."""

    model_config = SettingsConfigDict(frozen=True, validate_by_name=True, validate_by_alias=True,
                                      extra="forbid", case_sensitive=True)  # fmt: skip

    site_dir: Path = _setting(
        "BASTION_SITE", "--site", "The site directory (Edge Bastion YAML and/or a matchbox data "
        "directory).", default=..., metavar="DIR", path="dir")  # fmt: skip
    listen: Address = _setting(
        "BASTION_LISTEN", "--listen", "HOST:PORT to serve HTTP on.",
        default=("127.0.0.1", 8080), metavar="HOST:PORT", shown="127.0.0.1:8080")  # fmt: skip
    # None: one listener serves everything, as before the split
    management_listen: Address | None = _setting(
        "BASTION_MANAGEMENT_LISTEN", "--management-listen", "Serve the management API, the "
        "dashboard, /metrics and the API docs on this HOST:PORT (an address on the management "
        "network) and only the boot endpoints on --listen (docs/network.md). Unset: --listen "
        "serves everything.", metavar="HOST:PORT")  # fmt: skip
    management_interface: str | None = _setting(
        "BASTION_MANAGEMENT_INTERFACE", "--management-interface", "The interface the management "
        "listener's address is on: it then takes connections arriving there only. Without it "
        "Linux accepts a connection to that address on any interface, so a machine on the PXE "
        "LAN that routes the management subnet through this host reaches it.",
        metavar="IFACE")  # fmt: skip
    # None: the site's own, default_db_path(<site name>, <site dir>), once the site is loaded
    db_path: Path | None = _setting(
        "BASTION_DB", "--db", "Event history database.", metavar="FILE", path="file",
        shown=DB_SHOWN)  # fmt: skip
    history_days: float = _setting(
        "BASTION_HISTORY_DAYS", "--history-days", "Events older than this many days are "
        "deleted (one-time URLs and install marks are not events).",
        default=DEFAULT_HISTORY_DAYS, metavar="DAYS", shown="30")  # fmt: skip
    history_events: int = _setting(
        "BASTION_HISTORY_EVENTS", "--history-events", "At most this many events are kept; the "
        "oldest go first.", default=DEFAULT_HISTORY_EVENTS, metavar="N", shown="100000")  # fmt: skip
    history_size: int = _setting(
        "BASTION_HISTORY_SIZE", "--history-size", "At most about this many bytes of events "
        "(64MiB, 1GiB, ...: their payloads, and 160 bytes an event for the rest of its row and "
        "indexes); the oldest go first.", default=DEFAULT_HISTORY_SIZE, metavar="BYTES",
        shown="128MiB")  # fmt: skip
    api_token: str | None = _setting("BASTION_API_TOKEN", None, "The management API token.")
    api_token_file: Path | None = _setting(
        "BASTION_API_TOKEN_FILE", "--token-file",
        "File holding the management API token (else $BASTION_API_TOKEN).", metavar="FILE",
        path="file")  # fmt: skip
    poll_seconds: float = _setting(
        "BASTION_POLL_SECONDS", "--poll", "Seconds between checks for changed site files "
        "(0: never).", default=1.0, metavar="SECONDS", shown="1")  # fmt: skip
    device_port: str | None = _setting(
        "BASTION_DEVICE", "--device", "The device's serial line (/dev/ttyACM0, the sim board's "
        "PTY): power control and device events in the history.", metavar="PORT")  # fmt: skip
    tftp_listen: Address | None = _setting(
        "BASTION_TFTP", "--tftp", "Also serve the site's tftp/ directory over TFTP (read-only) "
        "on ADDR:PORT, e.g. 10.77.0.3:69: big files such as a Raspberry Pi's boot files "
        "(docs/controller.md). Off by default.", metavar="ADDR:PORT")  # fmt: skip
    # None: no proxy is believed (uvicorn believed 127.0.0.1's X-Forwarded-For by default)
    trusted_proxies: str | None = _setting(
        "BASTION_TRUSTED_PROXIES", "--trusted-proxies", "Addresses or networks (comma-separated) "
        "of reverse proxies in front of the controller, a TLS proxy say, whose X-Forwarded-For "
        "and X-Forwarded-Proto are believed; the proxy must set them itself, not pass on a "
        "client's. Unset: none, a request comes from its connection's address.",
        metavar="ADDRS")  # fmt: skip
    # None: only the names bastion.api.hostcheck always knows
    allowed_hosts: str | None = _setting(
        "BASTION_ALLOWED_HOSTS", "--allowed-hosts", "Host names (comma-separated) by which "
        "browsers open the controller, besides its addresses, localhost, this machine's host "
        "name and site.yaml's controller_url: a browser's request through any other name is "
        "refused (a web page could read the API through a name of its own: DNS rebinding).",
        metavar="NAMES")  # fmt: skip
    # the secret store's directory; None: bastion.state.secrets.secrets_dir(<site name>) picks it
    secrets_dir: Path | None = _setting(
        "BASTION_SECRETS_DIR", "--secrets", "The secret store (k3s tokens, WireGuard keys; UPS, log collector and registry cache credentials).",
        metavar="DIR", path="dir-any", also=("--secrets-dir",),
        shown="$XDG_STATE_HOME/edge-bastion/secrets/<site>")  # fmt: skip
    # the nodes' console logs (bastion.device.consoles); None: var_dir()/consoles/<site>-<id>
    console_dir: Path | None = _setting(
        "BASTION_CONSOLE_DIR", "--console-dir", "Where the nodes' serial console logs are kept "
        "(one file per machine, rotated; docs/consoles.md).", metavar="DIR", path="dir-any",
        shown="<var dir>/consoles/<site>-<id>")  # fmt: skip
    ignition_token_ttl: float = _setting(
        "BASTION_IGNITION_TOKEN_TTL", "--ignition-token-ttl", "How long a one-time Ignition URL "
        "stays good.", default=DEFAULT_IGNITION_TOKEN_TTL, metavar="SECONDS", shown="900")  # fmt: skip
    max_body: int = _setting(
        "BASTION_MAX_BODY", "--max-body", "The largest request body, in bytes (64KiB, 1MiB, ...); "
        "larger ones get 413 before they are read. /callback and /heartbeat have their own "
        "(64 KiB, 4 KiB).", default=DEFAULT_MAX_BODY, metavar="BYTES", shown="1MiB")  # fmt: skip
    max_connections: int = _setting(
        "BASTION_MAX_CONNECTIONS", "--max-connections", "HTTP connections open at once; beyond "
        "it a new one closes the longest-idle one. Lowered to fit the descriptor limit.",
        default=DEFAULT_MAX_CONNECTIONS, metavar="N", shown="1000")  # fmt: skip
    header_timeout: float = _setting(
        "BASTION_HEADER_TIMEOUT", "--header-timeout", "Seconds a client has to send a request's "
        "head, from connecting or from its previous answer; then the connection is closed.",
        default=10.0, metavar="SECONDS", shown="10")  # fmt: skip
    body_timeout: float = _setting(
        "BASTION_BODY_TIMEOUT", "--body-timeout", "Seconds a client has to send a request's "
        "body once its head is in; then the connection is closed.", default=60.0,
        metavar="SECONDS", shown="60")  # fmt: skip
    send_timeout: float = _setting(
        "BASTION_SEND_TIMEOUT", "--send-timeout", "Seconds an answer may wait for a client that "
        "reads none of it; then the connection is closed.", default=60.0, metavar="SECONDS",
        shown="60")  # fmt: skip

    # -- checks, each naming its option ---------------------------------------------------

    @field_validator("site_dir")
    @classmethod
    def _site(cls, v: Path) -> Path:
        if not v.is_dir():
            raise SettingsError(f"--site {str(v)!r}: not a directory")
        return v

    @field_validator("listen", mode="before")
    @classmethod
    def _listen(cls, v: Any) -> Any:
        return parse_listen(v, "--listen") if isinstance(v, str) else v

    @field_validator("tftp_listen", mode="before")
    @classmethod
    def _tftp(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = parse_listen(v, "--tftp") if v else None
        if v is not None and ":" in str(v[0]):  # (it failed at start, with a traceback)
            raise SettingsError(f"--tftp [{v[0]}]:{v[1]}: TFTP is served on IPv4 only (the PXE "
                                "clients it serves are); give an IPv4 address, e.g. 0.0.0.0:69")  # fmt: skip
        return v

    @field_validator("management_listen", mode="before")
    @classmethod
    def _management(cls, v: Any) -> Any:
        if isinstance(v, str):
            return parse_listen(v, "--management-listen") if v else None
        return v

    @field_validator("management_interface", mode="before")
    @classmethod
    def _interface(cls, v: Any) -> Any:
        if isinstance(v, str) and v and not re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$", v):
            raise SettingsError(f"--management-interface {v!r}: not an interface name")
        return v or None

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _proxies(cls, v: Any) -> Any:
        if not isinstance(v, str) or not v.strip():
            return None if v in ("", None) else v
        items = [x.strip() for x in v.split(",") if x.strip()]
        for item in items:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise SettingsError(f"--trusted-proxies {item!r}: not an IP address or network "
                                    "(a proxy's own address, e.g. 127.0.0.1 or 10.77.0.2)") from None  # fmt: skip
        return ",".join(items)

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _hosts(cls, v: Any) -> Any:
        if not isinstance(v, str) or not v.strip():
            return None if v in ("", None) else v
        items = [x.strip().lower().rstrip(".") for x in v.split(",") if x.strip()]
        for item in items:
            if not HOST_NAME.fullmatch(item):
                raise SettingsError(f"--allowed-hosts {item!r}: not a host name (letters, digits, "
                                    "'-' and dots; no port, no scheme), e.g. bastion.lan")  # fmt: skip
        return ",".join(items)

    @field_validator("poll_seconds")
    @classmethod
    def _poll(cls, v: float) -> float:
        if not 0 <= v <= 86400:  # NaN fails this too
            raise SettingsError(f"--poll {v:g}: expected seconds, 0 (never) to 86400")
        return v

    @field_validator("ignition_token_ttl")
    @classmethod
    def _ttl(cls, v: float) -> float:
        if not 0 < v <= 86400:
            raise SettingsError(
                f"--ignition-token-ttl {v:g}: expected seconds, more than 0 and at most 86400"
            )
        return v

    @field_validator(*SIZES, mode="before")
    @classmethod
    def _size(cls, v: Any, info: Any) -> Any:
        option = "--" + info.field_name.replace("_", "-")
        low, high, expected = SIZES[info.field_name]
        v = parse_size(v, option) if isinstance(v, str) else v
        if isinstance(v, int) and not low <= v <= high:
            raise SettingsError(f"{option} {v}: expected {expected}")
        return v

    @field_validator("history_days")
    @classmethod
    def _history_days(cls, v: float) -> float:
        if not 0 < v <= 36500:
            raise SettingsError(f"--history-days {v:g}: expected days, more than 0 and at most 36500")
        return v

    @field_validator("history_events")
    @classmethod
    def _history_events(cls, v: int) -> int:
        if v < 100:
            raise SettingsError(f"--history-events {v}: expected 100 or more")
        return v

    @field_validator("max_connections")
    @classmethod
    def _connections(cls, v: int) -> int:
        if v < 1:
            raise SettingsError(f"--max-connections {v}: expected 1 or more")
        return v

    @field_validator("header_timeout", "body_timeout", "send_timeout")
    @classmethod
    def _timeout(cls, v: float, info: Any) -> float:
        if not 0 < v <= 3600:
            option = "--" + info.field_name.replace("_", "-")
            raise SettingsError(f"{option} {v:g}: expected seconds, more than 0 and at most 3600")
        return v

    @field_validator("device_port", mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return v or None

    @model_validator(mode="after")
    def _resolve(self) -> Settings:
        if self.api_token_file is not None:  # the file wins over $BASTION_API_TOKEN
            object.__setattr__(self, "api_token", read_token_file(self.api_token_file))
        elif self.api_token is not None:
            check_token(self.api_token, "in $BASTION_API_TOKEN")
        if self.management_listen is not None and same_listener(self.management_listen, self.listen):
            where = "{}:{}".format(*self.management_listen)
            raise SettingsError(
                f"--management-listen {where}: the boot listener (--listen) has that address; "
                "the management listener needs its own"
            )
        if self.management_interface is not None and self.management_listen is None:
            raise SettingsError(f"--management-interface {self.management_interface}: give "
                                "--management-listen too (the address on that interface)")  # fmt: skip
        if self.tftp_listen is not None and not (self.site_dir / "tftp").is_dir():
            where = "{}:{}".format(*self.tftp_listen)
            raise SettingsError(
                f"--tftp {where}: the site has no tftp/ directory ({self.site_dir / 'tftp'}) "
                "to serve"
            )
        return self

    @classmethod
    def build(cls, site_dir: Path | str | None = None, db_path: Path | str | None = None,
              **given: Any) -> Settings:  # fmt: skip
        """Settings from what the command line gave (None: not given), the environment and the
        defaults; a bad value raises SettingsError naming its option."""
        values = {"site_dir": site_dir, "db_path": db_path, **given}
        if "token_file" in values:
            values["api_token_file"] = values.pop("token_file")
        if "tftp" in values:
            values["tftp_listen"] = values.pop("tftp")
        try:
            return cls(**{k: v for k, v in values.items() if v is not None})
        except ValidationError as e:
            raise SettingsError(_problem(e)) from None


def _problem(e: ValidationError) -> str:
    """The first problem of a ValidationError, as the option's own words."""
    err = e.errors(include_url=False)[0]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, SettingsError):
        return str(cause)
    name = err["loc"][0] if err["loc"] else ""
    field = Settings.model_fields.get(str(name))
    if field is None:  # loc is the alias when the value came from the environment
        field = next((f for f in Settings.model_fields.values() if f.alias == name), None)
    if field is not None:
        extra = field.json_schema_extra or {}
        label = extra.get("option") or f"${field.alias}"
        if err["type"] == "missing":
            return f"{label} is required (or ${field.alias})"
        return f"{label} {err.get('input')!r}: {err['msg']}"
    return err["msg"]


def serve_options(f: Any) -> Any:
    """Decorate a click command with one option per Settings field that has one. Every option
    defaults to None ("not given"), so Settings.build applies the environment and defaults."""
    for name, field in reversed(list(Settings.model_fields.items())):
        if (field.json_schema_extra or {}).get("option"):
            f = _setting_option(name)(f)
    return f


def _setting_option(name: str, envvar: bool = False) -> Any:
    """The click option of the Settings field `name`, as `bastion serve` has it. `envvar`: click
    reads the field's environment variable itself (for a command that builds no Settings)."""
    field = Settings.model_fields[name]
    extra = field.json_schema_extra or {}
    kind = extra.get("path")
    if kind == "dir":
        ptype: Any = click.Path(exists=True, file_okay=False, path_type=Path)
    elif kind == "dir-any":
        ptype = click.Path(file_okay=False, path_type=Path)
    elif kind == "file":
        ptype = click.Path(dir_okay=False, path_type=Path)
    elif field.annotation in (float, "float"):
        ptype = float
    elif field.annotation in (int, "int") and name not in SIZES:  # sizes: "64KiB" too
        ptype = int
    else:
        ptype = str
    shown = extra.get("shown")
    env = f"${field.alias}"
    help_text = f"{extra['help']} [{env}" + (f"; default: {shown}]" if shown else "]")
    return click.option(extra["option"], *extra.get("also", ()), name, type=ptype, default=None,
                        envvar=field.alias if envvar else None, metavar=extra.get("metavar"),
                        help=help_text)  # fmt: skip


#: `--secrets DIR` (also --secrets-dir, $BASTION_SECRETS_DIR) for every command that loads a site
#: or reads its secret store: serve's option, so that each reads the store serve would. Its value,
#: `secrets_dir`, is None when not given: load_site's and secrets_dir()'s default, the same as
#: serve's.
secrets_option = _setting_option("secrets_dir", envvar=True)


# -- trusted proxies and the machines' declared addresses ----------------------------------------
# A host a trusted entry covers may name any client in X-Forwarded-For, and a machine's one-time
# Ignition URL, its config and its reports are bound to its declared `address:`: a network in
# --trusted-proxies that holds a node (the PXE LAN, say) lets every host on it pass as that node.


def trusted_networks(trusted: str | None) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """--trusted-proxies as networks (a single address is a /32 or /128)."""
    return [ipaddress.ip_network(x, strict=False) for x in (trusted or "").split(",") if x.strip()]


def _inside(address: str, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    try:
        return ipaddress.ip_address(address) in net
    except ValueError:
        return False


def proxy_problems(trusted: str | None, machines: Any) -> tuple[list[str], list[str]]:
    """(errors, warnings) of --trusted-proxies against the site's machines: an entry that holds
    a machine's declared `address:` is an error (any host it covers could take that machine's
    one-time Ignition URL); an entry wider than one address is a warning."""
    errors: list[str] = []
    warnings: list[str] = []
    for net in trusted_networks(trusted):
        for m in machines:
            if m.address and _inside(m.address, net):
                errors.append(f"--trusted-proxies {net} holds machine {m.name}'s address "
                              f"{m.address} (machines.yaml): any host there could send "
                              f"X-Forwarded-For: {m.address} and take {m.name}'s one-time Ignition "
                              "URL and config; name the proxy's own address instead")  # fmt: skip
        if net.num_addresses > 1:
            warnings.append(f"--trusted-proxies {net} is a network of {net.num_addresses} "
                            "addresses: every host in it may name any client in X-Forwarded-For; "
                            "name the proxy's own address")  # fmt: skip
    return errors, warnings


def covering_network(trusted: str | None, address: str | None) -> str | None:
    """The --trusted-proxies network wider than one address that holds `address`, or None."""
    if not address:
        return None
    for net in trusted_networks(trusted):
        if net.num_addresses > 1 and _inside(address, net):
            return str(net)
    return None
