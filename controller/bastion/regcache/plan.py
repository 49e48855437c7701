"""The site's registry cache as the controller host serves it: pure functions from site.yaml's
`cluster.registry_cache` to the Distribution instances and their config.yml.

One CNCF Distribution registry in proxy mode per mirrored registry (a proxy mirrors exactly one
`remoteurl`), on the url's host when that is an IP address (else on every address). Its port:

- `mirrors: {docker.io: 5000, ghcr.io: 5001}`: the port given, wherever the registry stands;
- `mirrors: [docker.io, ghcr.io]`: mirror i on the port of `url` plus i.

The list form moves every registry after one that is put before it or removed. A node keeps
the endpoints it was told at boot, so such an edit sends its pulls of one registry to
another's proxy, which answers for the same repository path from its own registry (docker.io's
foo/bar:1.0 from ghcr.io's foo/bar:1.0). Containerd says which registry it means (the `ns`
query parameter), but Distribution ignores it and nothing of ours sits in front of it: only
fixed ports prevent that (docs/registry-cache.md).

The nodes' /etc/rancher/k3s/registries.yaml (bastion.cluster.plan.registries_yaml) takes its
endpoints from `endpoints` here, so what the nodes are told and what runs are one computation.

    ports(cache)                 mirror -> the port its instance listens on
    instances(cache)             each mirror's Instance: name, port, upstream, endpoint
    endpoints(cache)             mirror -> the URL the nodes pull it through
    config_yml(inst, ...)        one instance's Distribution config.yml (text)

The section is passed duck-typed (bastion.site.schema.RegistryCache sits a layer above).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

# docker.io's registry API is not at docker.io itself
_KNOWN_UPSTREAMS = {"docker.io": "https://registry-1.docker.io"}


@dataclass(frozen=True)
class Instance:
    mirror: str  # the registry as the nodes name it: docker.io, ghcr.io, 10.0.0.2:5000
    name: str  # a file and secret name component: docker.io, 10.0.0.2_5000
    host: str  # the address it listens on ("" = every address)
    port: int
    upstream: str  # the registry's own URL, the proxy's remoteurl
    endpoint: str  # the URL the nodes pull through

    @property
    def listen(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def username_secret(self) -> str:
        return f"registry-cache/{self.name}/username"

    def password_secret(self) -> str:
        return f"registry-cache/{self.name}/password"


HTTP_SECRET = "registry-cache/http-secret"


def instance_name(mirror: str) -> str:
    return mirror.replace(":", "_")


def upstream_url(cache: Any, mirror: str) -> str:
    upstreams = cache.serve.upstreams if cache.serve is not None else {}
    return upstreams.get(mirror) or _KNOWN_UPSTREAMS.get(mirror) or f"https://{mirror}"


def ports(cache: Any) -> dict[str, int]:
    """Mirror -> the port its instance listens on, in the order of `mirrors`: the one it is
    given (the mapping form), else the port of `url` plus its place in the list."""
    if isinstance(cache.mirrors, dict):
        return dict(cache.mirrors)
    first = urlsplit(cache.url).port
    assert first is not None
    return {mirror: first + i for i, mirror in enumerate(cache.mirrors)}


def instances(cache: Any) -> list[Instance]:
    """The Distribution instances that serve `cache` (a validated section with `serve:`)."""
    parts = urlsplit(cache.url)
    assert parts.hostname is not None
    try:
        listen_host = str(ipaddress.ip_address(parts.hostname))
    except ValueError:
        listen_host = ""  # a DNS name: every address
    out = []
    for mirror, port in ports(cache).items():
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        out.append(Instance(mirror=mirror, name=instance_name(mirror), host=listen_host, port=port,
                            upstream=upstream_url(cache, mirror),
                            endpoint=f"{parts.scheme}://{host}:{port}"))  # fmt: skip
    return out


def endpoints(cache: Any) -> dict[str, str]:
    """Mirror -> the URL the nodes pull it through: each its own instance when the controller
    host serves the cache, else the one `url` for all (a cache run elsewhere)."""
    if cache.serve is None:
        return {mirror: cache.url for mirror in cache.mirrors}
    return {i.mirror: i.endpoint for i in instances(cache)}


def config_yml(inst: Instance, storage: Path, http_secret: str,
               username: str | None = None, password: str | None = None) -> str:
    """The instance's config.yml. `storage` is its own directory; the credentials, from the
    secret store, only when the upstream needs them (the file is then written mode 0600)."""
    proxy: dict[str, str] = {"remoteurl": inst.upstream}
    if username is not None and password is not None:
        proxy |= {"username": username, "password": password}
    doc = {
        "version": 0.1,
        "log": {"level": "info", "fields": {"service": "registry-cache", "mirror": inst.mirror}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            # the proxy's expiry scheduler deletes what it cached after its TTL
            "delete": {"enabled": True},
        },
        "http": {
            "addr": inst.listen,
            "secret": http_secret,
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
        "proxy": proxy,
    }
    head = (f"# Written by `bastion registry-cache` from site.yaml cluster.registry_cache: the "
            f"pull-through cache of {inst.mirror}.\n")  # fmt: skip
    return head + yaml.safe_dump(doc, sort_keys=False)
