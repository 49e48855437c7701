"""`bastion logs status`: what waits in each log target's queue (docs/logs.md)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import click

from bastion.settings import default_db_path


def queue_dir(db_path: Path) -> Path:
    """Where `bastion serve` keeps the log targets' queues: beside its history."""
    return db_path.parent / f"{db_path.stem}.logship"


@click.group("logs")
def logs_group() -> None:
    """Logs off-site: the log targets' on-disk queues."""


@logs_group.command("status")
@click.option("--site", "site_dir", envvar="BASTION_SITE",
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The site whose queues to read, where `bastion serve --site` keeps them "
                   "[$BASTION_SITE].")  # fmt: skip
@click.option("--db", "db_path", envvar="BASTION_DB", type=click.Path(dir_okay=False, path_type=Path),
              help="The history `bastion serve --db` was given; the queues are beside it [$BASTION_DB].")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per target.")
def status_command(site_dir: Path | None, db_path: Path | None, as_json: bool) -> None:
    """Per log target: records waiting on disk for the collector, the oldest one's time, and
    how many the queue's bound has dropped since the queue was made; a queue file that cannot
    be read, and one `bastion serve` moved aside as damaged. Reads the files only: works with
    the controller running or not."""
    import sqlite3

    from bastion.logship.queue import is_damaged, summary

    if db_path is None:
        if site_dir is None:
            raise click.UsageError("which site? give --site DIR (or $BASTION_SITE) or --db FILE")
        from bastion.site.load import site_name

        db_path = default_db_path(site_name(site_dir), site_dir)
    where = queue_dir(db_path)
    files = sorted(where.glob("*.db")) if where.is_dir() else []
    # queue files `bastion serve` moved aside (queue.set_aside); their -wal and -shm go with them
    aside = sorted(p for p in where.glob("*.db.damaged-*") if not p.name.endswith(("-wal", "-shm")))
    if not files and not aside:
        click.echo(f"no log target queues in {where}")
        return
    for f in files:
        try:
            s = summary(f)
        except sqlite3.Error as e:
            if as_json:
                click.echo(json.dumps({"target": f.stem, "error": str(e)}))
            else:
                then = "; `bastion serve` moves it aside and starts a new queue" if is_damaged(e) else ""
                click.echo(f"{f.stem:<16} the queue file {f} cannot be read: {e}{then}")
            continue
        oldest = None
        if s["oldest"]:
            try:
                oldest = datetime.fromtimestamp(float(json.loads(s["oldest"]).get("ts") or 0)).isoformat(" ", "seconds")
            except (ValueError, AttributeError):
                oldest = None
        if as_json:
            click.echo(json.dumps({"target": f.stem, "queued": s["queued"], "oldest": oldest, "dropped": s["dropped"]}))
        else:
            click.echo(f"{f.stem:<16} queued {s['queued']:>8}  oldest {oldest or '-':<19}  dropped {s['dropped']}")
    for p in aside:
        target = p.name.split(".db.damaged-")[0]
        if as_json:
            click.echo(json.dumps({"target": target, "moved_aside": str(p)}))
        else:
            click.echo(f"{target:<16} a damaged queue file was moved aside (its `queue-damaged` event says what "
                       f"of it was queued again): {p}")  # fmt: skip


COMMANDS = [logs_group]
