"""Network boot scripts: iPXE and GRUB, rendered from Jinja2 templates. Pure functions.

`/boot.ipxe` makes iPXE report what it knows about the machine (MAC, UUID, build architecture,
platform, hostname, serial) as query parameters of a request to `/ipxe`, which is matched to a
profile and answered with `ipxe_script`. `/grub/grub.cfg` does the same for GRUB network boot
images whose prefix points at the controller, chaining to `/grub`.

Flatcar profiles get the kernel arguments a PXE-booted Flatcar needs (`flatcar_boot`):
`initrd=<name>` for each initrd (the EFI stub finds initrds by the names iPXE gave them; without
it the kernel cannot mount its root), `flatcar.first_boot=1` so that Ignition runs, and
`ignition.config.url=<controller>/ignition?mac=<the machine's MAC>`.
"""

from __future__ import annotations

import posixpath
import re
from urllib.parse import urlsplit

import jinja2

from bastion.model import Boot

_TEMPLATES = {
    # ${...:uristring} makes iPXE percent-encode values that may hold spaces or '&'.
    "boot.ipxe": (
        "#!ipxe\n"
        "chain ipxe?mac=${mac:hexhyp}&uuid=${uuid}&arch=${buildarch:uristring}"
        "&platform=${platform:uristring}&hostname=${hostname:uristring}"
        "&serial=${serial:uristring}&domain=${domain:uristring}\n"
    ),
    # GRUB fetches $prefix/grub.cfg with no query; this chains to /grub with the machine's facts.
    "grub.cfg": (
        "# Edge Bastion: identify this machine and load its boot entry\n"
        'configfile "{{ base }}/grub?mac=${net_default_mac}&arch=${grub_cpu}'
        '&platform=${grub_platform}"\n'
    ),
    # linuxefi/initrdefi exist in x86 EFI GRUB builds (with shim); the fallback entry uses the
    # generic commands that BIOS and arm64 GRUB have.
    "grub": (
        "default=0\n"
        "fallback=1\n"
        "timeout=1\n"
        "{% for cmd in [('linuxefi', 'initrdefi', 'EFI'), ('linux', 'initrd', 'generic')] %}"
        'menuentry "{{ title }} ({{ cmd[2] }})" {\n'
        'echo "Loading kernel"\n'
        "{{ cmd[0] }} {{ boot.kernel | grub_quote }}"
        "{% for arg in boot.args %} {{ arg | grub_quote }}{% endfor %}\n"
        # no initrd, no initrd command: GRUB's without a file is an error ("filename expected")
        "{% if boot.initrd %}"
        'echo "Loading initrd"\n'
        # an entry is iPXE's `initrd` arguments (`--name main /x.img`); GRUB's takes files only
        "{{ cmd[1] }}{% for initrd in boot.initrd %} {{ initrd | initrd_file | grub_quote }}{% endfor %}\n"
        "{% endif %}"
        "}\n"
        "{% endfor %}"
    ),
}


def grub_quote(word: str) -> str:
    """A GRUB script word in double quotes: `$var` still expands, `"` and `\\` are escaped."""
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


# iPXE's `initrd` options (ipxe.org/cmd/initrd), those that take a value first
_IPXE_INITRD_OPTION = re.compile(
    r"\s*(?:(?:--name|--timeout|-n|-t)(?:=|\s+)\S+|--autofree|--replace|-a|-r)(?=\s|$)"
)


def initrd_file(entry: str) -> str:
    """The file of a profile's initrd entry, for GRUB: an entry is what iPXE's script puts after
    `initrd`, its options first (`--name main /x.img`), and GRUB's initrd takes files alone."""
    rest = entry
    while (option := _IPXE_INITRD_OPTION.match(rest)) is not None:
        rest = rest[option.end() :]
    return rest.strip()


_env = jinja2.Environment(
    loader=jinja2.DictLoader(_TEMPLATES),
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    keep_trailing_newline=True,
)
_env.filters["grub_quote"] = grub_quote
_env.filters["initrd_file"] = initrd_file


_BOOT_SCRIPT = _env.get_template("boot.ipxe").render()


def boot_script() -> str:
    """The `/boot.ipxe` script."""
    return _BOOT_SCRIPT


def grub_bootstrap(base_url: str) -> str:
    """The `/grub/grub.cfg` script."""
    return _env.get_template("grub.cfg").render(base=_grub_device(base_url))


def _grub_device(base_url: str) -> str:
    # GRUB names an HTTP server as a device: (http,host:port)/path
    parts = urlsplit(base_url)
    return f"(http,{parts.netloc}){parts.path.rstrip('/')}"


def ipxe_script(boot: Boot) -> str:
    """The machine's iPXE script: its kernel with its arguments, its initrds, boot. Joined
    rather than a template: it is every boot's answer, and Jinja's render was two thirds of
    rendering it (docs/benchmarks-http.md)."""
    kernel = " ".join(("kernel", boot.kernel, *boot.args))
    initrds = "".join(f"initrd {initrd}\n" for initrd in boot.initrd)
    return f"#!ipxe\n{kernel}\n{initrds}boot\n"


def grub_config(boot: Boot, title: str) -> str:
    return _env.get_template("grub").render(boot=boot, title=title.replace('"', "'"))


def initrd_name(entry: str) -> str:
    """The name iPXE gives an initrd: `--name main /x.img` is `main`, else the URL's basename."""
    words = entry.split()
    for i, word in enumerate(words):
        if word.startswith("--name="):
            return word.split("=", 1)[1]
        if word in ("--name", "-n") and i + 1 < len(words):
            return words[i + 1]
    url = words[-1] if words else entry
    return posixpath.basename(urlsplit(url).path)


def flatcar_boot(boot: Boot, ignition_url: str | None) -> Boot:
    """`boot` with the kernel arguments a PXE-booted Flatcar needs, before the profile's own
    (no ignition.config.url when the profile has no Ignition config)."""
    replaced = ("flatcar.first_boot", "ignition.config.url", "flatcar.config.url")
    own = [a for a in boot.args if a.split("=", 1)[0] not in replaced]
    added = [f"initrd={initrd_name(i)}" for i in boot.initrd]
    added = [a for a in added if a not in own]
    added.append("flatcar.first_boot=1")
    if ignition_url:
        added.append(f"ignition.config.url={ignition_url}")
    return Boot(boot.kernel, boot.initrd, tuple(added + own))
