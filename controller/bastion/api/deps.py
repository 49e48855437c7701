"""Shared state and FastAPI dependencies (`Annotated` aliases used by every router)."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from bastion import match
from bastion.boot import Provisioning
from bastion.device.consoles import ConsoleLogs
from bastion.device.hub import DeviceHub
from bastion.logship.shipper import Shipper
from bastion.metrics import Metrics
from bastion.model import BootRequest, Site
from bastion.operator.runner import Operator
from bastion.settings import Settings, covering_network
from bastion.site.holder import SiteHolder
from bastion.state.addresses import AddressBook, plain_address
from bastion.state.events import ATTRIBUTABLE_IDS, EventStore
from bastion.state.heartbeats import Heartbeats
from bastion.state.secrets import SecretStore
from bastion.tftpd import TftpService
from bastion.ups.runner import UpsWatch

log = logging.getLogger(__name__)

# How far back a newly learned address names the steps recorded by address alone (and at most
# ATTRIBUTABLE_IDS events back).
ATTRIBUTE_BACK_S = 300.0
# How long a small batch of the boot endpoints' events may stay open after the previous group
# commit, and what is small (GroupCommit): in a storm of 1,000 new connections (two requests a
# turn) this took the controller from about 6,700 to about 9,300 requests/s, and wrk's 50 kept
# connections (about 24 requests a turn) lost nothing (docs/benchmarks-http.md). 1 ms was set on
# a machine whose storm filled a batch of 16 in about that time; where a storm runs at 4,000
# requests/s, 1 ms held 4 to 5 events, and each commit (one WAL write: about 130 us of a batch's
# cost, 30 us an event) cost three times as much an event as in a batch of 16. 4 ms lets the
# slower machine fill its batches too (storm +5 to +19%), and on a fast one a batch reaches 16
# before then, as before. Only requests that overlap wait (GroupCommit).
COMMIT_INTERVAL_S = 0.004
COMMIT_SMALL_BATCH = 16
#: Wrong tokens one client address may send within TOKEN_FAILURE_WINDOW_S seconds: past them
#: its token checks are answered 429 for the rest of that window, the right token's too
#: (TokenFailures). A person who mistypes the token does not come near it; a program that
#: guesses is held to TOKEN_FAILURES_LIMIT guesses a minute.
TOKEN_FAILURES_LIMIT = 10
TOKEN_FAILURE_WINDOW_S = 60.0
#: Addresses whose failures are remembered at once: the table's bound (about 100 bytes each).
TOKEN_FAILURE_ADDRESSES = 4096
#: An IPv6 client's wrong tokens count for its whole /64 (token_failure_key): one host is
#: usually given a /64, and with privacy addresses (RFC 8981) it takes a new address at will.
TOKEN_FAILURE_IPV6_PREFIX = 64


@dataclass
class Runtime:
    """Everything a request handler may need; one per application."""

    settings: Settings
    holder: SiteHolder
    store: EventStore
    metrics: Metrics
    device: DeviceHub | None = None  # `serve --device PORT`
    consoles: ConsoleLogs | None = None  # the nodes' console logs, kept with or without a device
    tftp: TftpService | None = None  # `serve --tftp ADDR:PORT`
    secrets: SecretStore | None = None  # `serve --secrets DIR`
    # one-time Ignition URLs and install-once marks (bastion.boot.Provisioning)
    provisioning: Provisioning | None = None
    # what each node's latest heartbeat said (POST /heartbeat)
    heartbeats: Heartbeats = field(default_factory=Heartbeats)
    # which machine each LAN address is (bastion.state.addresses): names address-only steps
    addresses: AddressBook = field(default_factory=AddressBook)
    operator: Operator | None = None  # bastion.operator: the site converges on its declaration
    logship: Shipper | None = None  # bastion.logship: every event also goes to site.yaml's logs targets
    # the history's inserts are serialized anyway (one SQLite connection, one lock); holding this
    # around the insert and the hand-off ships events in the order of their ids, whatever thread
    # (a request, the device link, the operator, TFTP) records them
    _ordered: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    ups: UpsWatch | None = None  # bastion.ups: the UPS watch and the power-cut policy

    # set by create_app: the boot endpoints' events, committed a batch at a time (GroupCommit)
    group_commit: GroupCommit | None = field(default=None, repr=False, compare=False)
    # bastion.api.device: the device's thread limiter and shared status, made at first use
    device_calls: Any = field(default=None, repr=False, compare=False)
    # wrong tokens per client address: the management API's limit on guessing (token_refusal)
    token_failures: TokenFailures = field(default_factory=lambda: TokenFailures(), repr=False,
                                          compare=False)  # fmt: skip
    # forwarded addresses node_client has logged as not believed (a few at most)
    not_believed: set[str] = field(default_factory=set, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.addresses.declared is None:  # a machine with `address:` is bound there only
            self.addresses.declared = self._declared_address

    def _declared_address(self, name: str) -> str | None:
        machine = self.holder.site.machine(name)  # the site of the moment: a reload may change it
        return machine.address if machine is not None else None

    def record(self, kind: str, **fields: Any) -> int:
        """Record an event: a step that came by address alone gets its machine, and one that
        ties an address to a machine names that address's recent steps too."""
        now = time.time()
        fields = self._prepared(kind, fields, now)
        new: list[bool] = []
        (event_id,) = self.commit_events([(kind, fields)], new)
        if new[0]:  # not a device event the history had (one fetched again after a restart)
            self._recorded(kind, fields, event_id, now)
        return event_id

    async def record_batched(self, events: list[tuple[str, dict[str, Any]]]) -> list[int]:
        """record() for each (kind, fields), from a request on the event loop: the events join
        the batch that the loop commits next, with every other request's of the same turn, and
        this returns once that batch is committed (so an answer sent afterwards is for an event
        that is in the history, whatever happens to the process next)."""
        if self.group_commit is None:
            return [self.record(kind, **fields) for kind, fields in events]
        now = time.time()
        prepared = [(kind, self._prepared(kind, fields, now)) for kind, fields in events]
        ids = await self.group_commit.commit(prepared)
        for (kind, fields), event_id in zip(prepared, ids):
            self._recorded(kind, fields, event_id, now)
        return ids

    def _prepared(self, kind: str, fields: dict[str, Any], now: float) -> dict[str, Any]:
        fields = self.addresses.attribute(kind, fields, now)
        fields.setdefault("ts", now)
        return fields

    def commit_events(self, events: list[tuple[str, dict[str, Any]]],
                      new: list[bool] | None = None) -> list[int]:  # fmt: skip
        """One transaction for all of `events`; each shipped in the order of its id, but a
        device event the history had already (EventStore.record_many's `new`, filled here too)."""
        new = [] if new is None else new
        with self._ordered:
            ids = self.store.record_many(events, new)
            if self.logship is not None:  # an append to each target's inbox: never waits
                for event_id, (kind, fields), fresh in zip(ids, events, new):
                    if fresh:
                        self.logship.offer(_shipped(event_id, kind, fields))
        return ids

    def _recorded(self, kind: str, fields: dict[str, Any], event_id: int, now: float) -> None:
        self.metrics.event_recorded(kind)
        news = self.addresses.learn(kind, fields, now)
        if news is not None:
            b = news[0]
            self.store.attribute(b.address, b.mac, b.machine, now - ATTRIBUTE_BACK_S,
                                 after_id=max(0, event_id - ATTRIBUTABLE_IDS))  # fmt: skip
        if self.operator is not None:
            self.operator.saw(kind)


class GroupCommit:
    """Group commit for the requests of one event loop: the events that requests hand over
    during one turn of the loop go into the history in one transaction, at the end of that turn
    (one WAL write instead of one per event: docs/benchmarks-http.md). A request waits for its
    batch and answers after it, so what "acknowledged" means does not change: an answered boot
    request's event is committed. A batch that fails fails every request in it (a 500), as one
    failed insert did. Only for the loop's own thread; other threads call Runtime.record.

    A small batch waits a little. In a storm of new connections the loop's turns are short
    (libuv accepts one connection a turn), and a commit per turn was a transaction for every
    one or two events: the transactions took most of the loop's time. So a turn that hands over
    fewer than `small` requests, less than `interval` seconds (by the loop's clock) after the
    previous commit, leaves its batch open until the interval ends or the batch is no longer
    small, and the turns until then add theirs, as long as requests overlap: the previous batch
    held more than one. A bigger batch, one after a quiet interval (a lone machine booting), or
    one after a batch of a single request is committed at the end of its turn, as before: kept
    connections, whose turns bring a few dozen requests each when they are busy, hardly ever
    wait; a client that sends its next request only once it has the last answer (a machine's
    /boot.ipxe, then its /ipxe) has nothing to wait for, and does not; and no request waits more
    than `interval` longer than it would have."""

    def __init__(self, commit: Callable[[list[tuple[str, dict[str, Any]]]], list[int]],
                 interval: float = COMMIT_INTERVAL_S, small: int = COMMIT_SMALL_BATCH):  # fmt: skip
        self._commit = commit
        self.interval = interval
        self.small = small
        # the loop of the last commit, when (loop.time()) it ended and how many requests it held;
        # another loop (tests run the app in more than one) finds no previous commit
        self._committed: tuple[asyncio.AbstractEventLoop | None, float, int] = (None, -math.inf, 0)
        # per event loop: the timer that ends its open small batch, while there is one
        self._open: dict[asyncio.AbstractEventLoop, asyncio.TimerHandle] = {}
        # per event loop (tests may run the app in more than one): what waits for its next batch
        self._waiting: dict[asyncio.AbstractEventLoop, list[tuple[list[tuple[str, dict[str, Any]]],
                                                             asyncio.Future[list[int]]]]] = {}  # fmt: skip
        self.batches = 0  # transactions so far
        self.events = 0  # events in them

    async def commit(self, events: list[tuple[str, dict[str, Any]]]) -> list[int]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[int]] = loop.create_future()
        waiting = self._waiting.setdefault(loop, [])
        if not waiting:
            # after the callbacks already due this turn: the other requests read in it
            loop.call_soon(self._turn_ended, loop)
        elif len(waiting) + 1 == self.small and (timer := self._open.pop(loop, None)) is not None:
            timer.cancel()  # an open batch no longer small: at the end of this turn after all
            loop.call_soon(self._flush, loop)
        waiting.append((events, done))
        return await done

    def _turn_ended(self, loop: asyncio.AbstractEventLoop) -> None:
        last_loop, last, overlapped = self._committed
        if len(self._waiting.get(loop, ())) < self.small and last_loop is loop and overlapped > 1:
            wait = last + self.interval - loop.time()
            if wait > 0:  # a small batch moments after a commit: it stays open until then
                self._open[loop] = loop.call_later(wait, self._flush, loop)
                return
        self._flush(loop)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self._open.pop(loop, None)
        waiting = self._waiting.pop(loop, [])
        batch = [event for events, _ in waiting for event in events]
        try:
            ids = self._commit(batch)
        except Exception as e:  # noqa: BLE001 - every waiter gets the error
            for _, done in waiting:
                if not done.done():
                    done.set_exception(e)
            return
        finally:
            self._committed = (loop, loop.time(), len(waiting))
        self.batches += 1
        self.events += len(batch)
        at = 0
        for events, done in waiting:
            if not done.done():  # a request cancelled meanwhile (its client left): still stored
                done.set_result(ids[at : at + len(events)])
            at += len(events)


def _shipped(event_id: int, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The event as bastion.state.events.Event.as_dict() has it (the history's columns)."""
    return {"id": event_id, "ts": fields["ts"], "kind": kind, "source": fields.get("source", "controller"),
            "mac": fields.get("mac"), "machine": fields.get("machine"), "endpoint": fields.get("endpoint"),
            "profile": fields.get("profile"), "group": fields.get("group"), "status": fields.get("status"),
            "payload": fields.get("payload") or {}}  # fmt: skip


# Dependencies are `async def` although they never await: FastAPI runs a plain `def` one in
# its thread pool, a thread hop per dependency per request (docs/benchmarks-http.md).
async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_site(runtime: RuntimeDep) -> Site:
    # One read of the holder per request: a reload in the middle does not mix two sites.
    return runtime.holder.site


SiteDep = Annotated[Site, Depends(get_site)]


async def get_store(runtime: RuntimeDep) -> EventStore:
    return runtime.store


StoreDep = Annotated[EventStore, Depends(get_store)]

_bearer = HTTPBearer(auto_error=False, description="The management API token")


def admin_refusal(
    configured: str | None, given: str | None
) -> tuple[int, str, dict[str, str]] | None:
    """Why a request carrying bearer token `given` (None: none) may not use the management API
    of a controller whose token is `configured`, as (status, detail, headers); None if it may.
    Shared by require_admin and the body limits, which ask before a body is read."""
    if configured is None:
        return 403, ("the management API is disabled: no token configured "
                     "(set BASTION_API_TOKEN or use --token-file)"), {}  # fmt: skip
    if not given:
        return 401, "a bearer token is required", {"WWW-Authenticate": "Bearer"}
    if not hmac.compare_digest(given.encode(), configured.encode()):
        return 401, "wrong token", {"WWW-Authenticate": 'Bearer error="invalid_token"'}
    return None


def token_failure_key(address: str | None) -> str | None:
    """Whose wrong tokens a client address's are (TokenFailures): an IPv4 address its own; an
    IPv6 address its /64 (TOKEN_FAILURE_IPV6_PREFIX), written as the network; an IPv4-mapped
    one (`::ffff:10.77.0.21`) its IPv4 address. Counted per IPv6 address, a host that holds a
    /64, as hosts on most IPv6 networks do, had 2**64 addresses to guess from, each with a
    window of its own. Anything that is no address (a test client's name) is its own key."""
    if address is None or ":" not in address:  # IPv4, or none: the common case, not parsed
        return address
    try:
        ip = ipaddress.IPv6Address(address.partition("%")[0])  # a zone (fe80::1%eth0) aside
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, TOKEN_FAILURE_IPV6_PREFIX), strict=False))


class TokenFailures:
    """Wrong tokens counted per client (token_failure_key: an address, an IPv6 host's /64),
    in fixed windows: an address's first wrong
    token opens a window of `window` seconds, and once `limit` wrong tokens have come in it,
    every token check of that address is refused until the window ends (retry_after). Right
    tokens are never counted, and do not reset the count (a guesser that also holds the token
    has nothing to guess). A window that has ended is forgotten when the next one opens, and
    at most `capacity` are kept: a new one past that drops the oldest still open. Logged once
    per window that reaches the limit.

    Per address, so a host that guesses locks out the hosts behind the same address (a NAT, a
    proxy not named in --trusted-proxies), or in the same IPv6 /64, for the rest of its window,
    and no one else."""

    def __init__(self, limit: int = TOKEN_FAILURES_LIMIT, window: float = TOKEN_FAILURE_WINDOW_S,
                 capacity: int = TOKEN_FAILURE_ADDRESSES, clock: Callable[[], float] = time.monotonic):  # fmt: skip
        self.limit = limit
        self.window = window
        self.capacity = capacity
        self.clock = clock
        # token_failure_key -> [window start, wrong tokens in it]; in the order the windows started
        self._windows: dict[str | None, list[float]] = {}
        self._lock = threading.Lock()  # the checks run on the event loop, but cost nothing locked

    def retry_after(self, address: str | None) -> int | None:
        """Whole seconds until `address` may try a token again; None when it may now."""
        address = token_failure_key(address)
        with self._lock:
            entry = self._windows.get(address)
            if entry is None or entry[1] < self.limit:
                return None
            left = entry[0] + self.window - self.clock()
            return math.ceil(left) if left > 0 else None

    def failed(self, address: str | None) -> None:
        """`address` sent a wrong token."""
        address = token_failure_key(address)
        now = self.clock()
        with self._lock:
            entry = self._windows.get(address)
            if entry is None or now >= entry[0] + self.window:
                self._windows.pop(address, None)  # a new window goes to the end of the order
                self._make_room(now)
                self._windows[address] = entry = [now, 0]
            entry[1] += 1
            reached = entry[1] == self.limit
        if reached:
            log.warning("%s sent %d wrong API tokens within %g s: its token checks are refused "
                        "(429) for %d s", address, self.limit, self.window,
                        math.ceil(entry[0] + self.window - now))  # fmt: skip

    def __len__(self) -> int:
        return len(self._windows)

    def _make_room(self, now: float) -> None:
        # the windows are in the order they started, so those that have ended come first
        windows = self._windows
        while windows:
            address, (start, _) = next(iter(windows.items()))
            if now < start + self.window and len(windows) < self.capacity:
                return
            del windows[address]  # ended, or the oldest still open while the table is full


def token_refusal(runtime: Runtime, scope: dict[str, Any],
                  given: str | None) -> tuple[int, str, dict[str, str]] | None:  # fmt: skip
    """admin_refusal for a request (or WebSocket) from scope's client, under the limit on
    wrong tokens (TokenFailures): 429 with Retry-After while its address is over it, whatever
    the token. A wrong token is counted for the address; every refusal in
    bastion_api_auth_failures."""
    address = client_address(scope)
    wait = runtime.token_failures.retry_after(address)
    if wait is not None:
        runtime.metrics.auth_failures.inc()
        # the key, not the address: another host of the /64 is told why it is refused
        return 429, (f"too many wrong tokens from {token_failure_key(address)}: "
                     f"try again in {wait} s"), {"Retry-After": str(wait)}  # fmt: skip
    configured = runtime.settings.api_token
    refusal = admin_refusal(configured, given)
    if refusal is not None:
        runtime.metrics.auth_failures.inc()
        if configured is not None and given:  # a token, and not the one: a guess
            runtime.token_failures.failed(address)
    return refusal


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    scheme, _, given = (authorization or "").partition(" ")
    return (given.strip() or None) if scheme.lower() == "bearer" else None


async def require_admin(
    runtime: RuntimeDep,
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Every write, and every read of secrets, needs `Authorization: Bearer <token>` (and an
    address that has not sent too many wrong ones: token_refusal)."""
    given = credentials.credentials if credentials else None
    refusal = token_refusal(runtime, request.scope, given)
    if refusal is not None:
        raise HTTPException(*refusal)


AdminDep = Annotated[None, Depends(require_admin)]


def base_url(runtime: Runtime, site: Site, request: Request) -> str:
    """The controller URL to give machines: site.yaml's controller_url, else this request's."""
    return scope_base_url(site, request.scope)


def client_address(scope: dict[str, Any]) -> str | None:
    """The address a request came from, as machines.yaml's `address:` and the address book
    write it. The HTTP server makes a connection's own peer plain IPv4 already
    (bastion.api.httpserver.peer), but a trusted proxy's X-Forwarded-For replaces it after that
    (uvicorn's proxy-headers middleware), and a dual-stack proxy writes an IPv4 client as
    `::ffff:10.77.0.21`: the same address, which plain_address makes IPv4 here too."""
    client = scope.get("client")
    return plain_address(client[0]) if client else None



def node_client(runtime: Runtime, scope: dict[str, Any]) -> str | None:
    """client_address, but None for an address a trusted proxy network's X-Forwarded-For named
    that lies in that network itself (bastion.settings.covering_network): any host of such a
    network may name any other. No machine's `address:` is in one (the site does not load so:
    SiteHolder's check in bastion.api.main), so such a request is no node's. Logged once per
    address (at most 1,024 of them)."""
    client = client_address(scope)
    trusted = runtime.settings.trusted_proxies
    if trusted is None or not any(name == b"x-forwarded-for" for name, _ in scope.get("headers", ())):
        return client
    net = covering_network(trusted, client)
    if net is None:
        return client
    logged = runtime.not_believed
    if client not in logged and len(logged) < 1024:
        logged.add(client)
        log.error("X-Forwarded-For named %s, inside --trusted-proxies %s: any host there could "
                  "write it, so the request is taken as from an unknown address (name the "
                  "proxy's own address in --trusted-proxies)", client, net)  # fmt: skip
    return None


async def get_boot_request(runtime: RuntimeDep, site: SiteDep, request: Request) -> BootRequest:
    raw_query = request.scope.get("query_string", b"").decode("latin-1")
    return BootRequest(
        labels=match.labels_from_pairs(request.query_params.multi_items()),
        raw_query=raw_query,
        base_url=base_url(runtime, site, request),
        client=node_client(runtime, request.scope),
    )


BootRequestDep = Annotated[BootRequest, Depends(get_boot_request)]


def boot_context(runtime: Runtime, scope: dict[str, Any]) -> tuple[Site, BootRequest]:
    """What SiteDep and BootRequestDep give a handler, from the ASGI scope alone, without
    FastAPI's dependency solving or a Request: for the boot endpoints every machine asks
    (bastion.api.boot)."""
    site = runtime.holder.site  # one read per request, as get_site
    query = scope.get("query_string", b"").decode("latin-1")
    labels = match.labels_from_pairs(match.query_pairs(query))
    return site, BootRequest(labels=labels, raw_query=query, base_url=scope_base_url(site, scope),
                             client=node_client(runtime, scope))  # fmt: skip


_DEFAULT_PORTS = {"http": 80, "https": 443}


def scope_base_url(site: Site, scope: dict[str, Any]) -> str:
    """base_url() from the ASGI scope: site.yaml's controller_url, else
    str(Request(scope).base_url).rstrip("/") as Starlette builds it (the Host header, else the
    server's address; the root path), without the URL objects."""
    if site.settings.controller_url:
        return site.settings.controller_url
    scheme = scope.get("scheme", "http")
    root = scope.get("app_root_path", scope.get("root_path", ""))
    for name, value in scope["headers"]:
        if name == b"host":
            return f"{scheme}://{value.decode('latin-1')}{root}".rstrip("/")
    server = scope.get("server")
    if server is None:
        return root.rstrip("/")
    host, port = server
    if port == _DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{host}{root}".rstrip("/")
    return f"{scheme}://{host}:{port}{root}".rstrip("/")
