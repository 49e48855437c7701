"""`bastion machines`, `bastion plan`, `bastion apply`: the operator (bastion.operator) of a
running controller, through its management API (`--url`; the token from --token-file or
$BASTION_API_TOKEN[_FILE], needed by apply)."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path

import click

from bastion.client import ApiClient, ApiError
from bastion.clitypes import FiniteRange

DEFAULT_URL = "http://127.0.0.1:8080"
COLUMNS = ("NAME", "DESIRED", "RELAY", "STATUS", "RETRIES", "AGE")
WIDE = ("MAC", "STEP", "REASON")


def _where(f):
    f = click.option("--url", envvar="BASTION_URL", default=DEFAULT_URL, show_default=True, metavar="URL",
                     help="The running controller [$BASTION_URL].")(f)  # fmt: skip
    f = click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
                     help="The management API token (else $BASTION_API_TOKEN[_FILE]).")(f)  # fmt: skip
    return f


def _age(since: float | None, now: float) -> str:
    """kubectl's way: 45s, 3m, 2h, 5d."""
    if not since:
        return "-"
    s = max(0, int(now - since))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit}"
    return f"{s}s"


def _desired(m: dict) -> str:
    d = m.get("desired") or {}
    if d.get("maintenance"):
        return "maintenance"
    return d.get("power") or "-"


def row(m: dict, now: float, wide: bool = False) -> tuple[str, ...]:
    st = m["status"]
    retries = f"{st['attempt']}/{st['of']}" if st.get("attempt") else "0"
    out = (m["name"], _desired(m), m.get("relay_state") or ("-" if m.get("relay") is None else "?"),
           st["text"], retries, _age(st.get("since"), now))  # fmt: skip
    if wide:
        out += (m.get("mac") or "-", st.get("step") or "-", st.get("reason") or st.get("error") or "")
    return out


def widths_of(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> list[int]:
    return [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]


def line(r: tuple[str, ...], widths: list[int]) -> str:
    return "   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()


@click.command("machines")
@_where
@click.option("-w", "--watch", is_flag=True, help="After the table, print a machine's line again "
              "each time its status changes (like kubectl get -w).")  # fmt: skip
@click.option("-o", "--output", type=click.Choice(["table", "wide", "json"]), default="table",
              show_default=True, help="wide: also MAC, step and reason; json: the API's answer.")
@click.option("--interval", default=2.0, show_default=True, type=FiniteRange(0.1, 3600),
              help="Seconds between looks with -w (0.1 to 3600).")
def machines(url, token_file, watch, output, interval) -> None:
    """Where every machine stands: its declaration (DESIRED), its relay, and its status (Off,
    Powering, Booting (step), Provisioned, Ready, Stuck (n of m), Failed, Held, Maintenance, On,
    Unknown)."""
    api = ApiClient.connect(url, token_file)
    view = api.call("GET", "/api/v1/operator")
    if output == "json":
        click.echo(json.dumps(view, indent=2))
        return
    wide = output == "wide"
    header = COLUMNS + (WIDE if wide else ())
    now = time.time()
    rows = [row(m, now, wide) for m in view["machines"]]
    widths = widths_of(rows, header)
    for r in [header, *rows]:
        click.echo(line(r, widths))
    last = {m["name"]: m["status"]["text"] for m in view["machines"]}
    while watch:
        time.sleep(interval)
        try:
            view = api.call("GET", "/api/v1/operator")
        except ApiError as e:
            click.echo(f"# {e.message}", err=True)
            continue
        now = time.time()
        for m in view["machines"]:
            if last.get(m["name"]) != m["status"]["text"]:
                last[m["name"]] = m["status"]["text"]
                click.echo(line(row(m, now, wide), widths))  # under the table's columns


def _change(ch: dict) -> str:
    """One of a plan's changes as a line: a machine's field, or a site file by its digest."""
    if ch.get("secret"):
        return f"{ch['machine']}: {ch['field']} changed (a secret: not shown)"
    if ch.get("machine") is None and ch.get("field") == "sha256":
        short = {k: (ch[k][:12] if ch[k] else "absent") for k in ("from", "to")}
        return f"{ch.get('file')}: sha256 {short['from']} -> {short['to']}"
    if ch.get("machine") is None:
        return f"{ch.get('file')}: {ch['field']} {ch['from']} -> {ch['to']}"
    return f"{ch['machine']}: {ch['field']} {ch['from']} -> {ch['to']}"


def _show_plan(plan: dict) -> None:
    when = plan.get("applied_generation")
    click.echo(f"site {plan['site']!r}, sync {plan['sync']}: the files on disk against the "
               f"declaration applied at generation {when if when is not None else '-'}")  # fmt: skip
    if plan["changes"]:
        click.echo("changes:")
        for ch in plan["changes"]:
            click.echo(f"  {_change(ch)}")
    else:
        click.echo("changes: none")
    if not plan["actions"]:
        click.echo("actions: none")
        return
    click.echo("actions:")
    for a in plan["actions"]:
        click.echo(f"  {a['machine']}: {a['action']} ({a['reason']})")


@click.command("plan")
@_where
@click.option("--json", "as_json", is_flag=True, help="The API's answer as JSON.")
def plan(url, token_file, as_json) -> None:
    """What `bastion apply` would do with the site files as they are on disk now: the changes of
    the declaration and every action (power on, off, cycle, reprovision) with its reason."""
    p = ApiClient.connect(url, token_file).call("GET", "/api/v1/plan")
    if as_json:
        click.echo(json.dumps(p, indent=2))
        return
    _show_plan(p)
    click.echo(f"plan {p['id']}: `bastion apply --plan {p['id']}` does exactly this")


@click.command("apply")
@_where
@click.option("--plan", "plan_id", metavar="ID", help="Do this plan (from `bastion plan`) or "
              "nothing: refused when the plan is no longer what would be done.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="The API's answer as JSON.")
def apply(url, token_file, plan_id, as_json) -> None:
    """Reload the site files and act on their declaration now (what `sync: manual` waits for).
    Without --plan, shows the plan first and does exactly that one. Needs the token."""
    api = ApiClient.connect(url, token_file)
    if plan_id is None:
        p = api.call("GET", "/api/v1/plan")
        if not as_json:
            _show_plan(p)
        plan_id = p["id"]
    try:
        done = api.call("POST", "/api/v1/apply", json={"plan": plan_id})
    except ApiError as e:
        if e.status == 409:
            raise click.ClickException(f"plan {plan_id} is not what would be done now: nothing "
                                       "was done; run `bastion plan` again") from None  # fmt: skip
        raise
    if as_json:
        click.echo(json.dumps(done, indent=2))
        return
    refused = done.get("refused") or []
    click.echo(f"applied plan {done['id']} at {datetime.now().strftime('%H:%M:%S')}: "
               f"{len(done['done'])} action(s) done"
               + (f", {len(refused)} refused" if refused else ""))  # fmt: skip
    for a in done["done"]:
        click.echo(f"  {a['machine']}: {a['action']}")
    for a in refused:  # tried again after settle_s, as by the operator's own passes
        click.echo(f"  {a['machine']}: refused, {a['reason']}")
    if refused:
        sys.exit(1)


COMMANDS = (machines, plan, apply)
