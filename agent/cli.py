"""`jobcage` commands other than the hook path (see agent/hook.py).

Every command that acts on jobs goes through client.invoke(): the agent when it
runs, the same method table directly as root when it does not.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from functools import wraps
from typing import Any

import click

from .client import invoke
from .errors import JobcageError
from .hook import USAGE


def _fail(msg: str) -> None:
    click.echo(f"jobcage: {msg}", err=True)
    sys.exit(1)


def errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """One-line message and exit 1 for every expected failure; no tracebacks."""

    @wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        try:
            return fn(*a, **kw)
        except JobcageError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            sys.exit(130)

    return wrapper


def _console():  # rich only where it is used: colour on a terminal, plain text otherwise
    from rich.console import Console

    return Console(highlight=False)


def _json(obj: object) -> None:
    click.echo(json.dumps(obj, indent=2))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """jobcage: contain batch jobs in cgroups, trace identity switches."""


# Hook commands are parsed by agent/hook.py; listed here for --help.
for _name in ("prologue", "adopt", "run", "epilogue"):
    def _make(name: str) -> click.Command:
        @click.command(name, help=f"usage: {USAGE[name]}", add_help_option=False,
                       context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
        @click.pass_context
        def _cmd(ctx: click.Context) -> None:
            from .hook import main as hook_main

            sys.exit(hook_main([name, *ctx.args]))
        return _cmd
    cli.add_command(_make(_name))


@cli.command("pam", add_help_option=False,
             context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def _pam(ctx: click.Context) -> None:
    """sshd's PAM entry point (pam_exec): ssh sessions join the user's job (docs/ssh-adoption.md)."""
    from .pam import main as pam_main

    sys.exit(pam_main(["pam", *ctx.args]))


@cli.command("ssh-hint", add_help_option=False,
             context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def _ssh_hint(ctx: click.Context) -> None:
    """Inside an ssh session: move it into the job SLURM_JOB_ID & co. name (docs/ssh-adoption.md)."""
    from .pam import hint_main

    sys.exit(hint_main(["ssh-hint", *ctx.args]))


@cli.command()
@click.option("--config", "config_path", type=click.Path(), help="TOML config (default /etc/jobcage/jobcage.toml)")
@click.option("-v", "--verbose", is_flag=True)
@errors
def agent(config_path: str | None, verbose: bool) -> None:
    """Run the agent in the foreground."""
    import logging

    from .config import load
    from .server import Agent

    if os.geteuid() != 0:
        _fail("the agent must run as root")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s jobcage[%(process)d] %(levelname)s %(message)s")
    if config_path:
        os.environ["JOBCAGE_CONFIG"] = config_path
    Agent(load(config_path)).serve()


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@errors
def doctor(as_json: bool) -> None:
    """What this node supports and which mode jobcage will use."""
    from .doctor import report

    r = report()
    if as_json:
        _json(r)
        return
    con = _console()
    for section, values in r.items():
        con.print(f"[bold]{section}[/bold]")
        if isinstance(values, dict):
            for k, v in values.items():
                con.print(f"  {k:<22} {v}")
        else:
            con.print(f"  {values}")


@cli.command()
@click.argument("job_id")
@errors
def suspend(job_id: str) -> None:
    """Freeze every process of the job; returns once the kernel confirms."""
    invoke("suspend", job_id=job_id)


@cli.command()
@click.argument("job_id")
@errors
def resume(job_id: str) -> None:
    """Thaw the job; returns once the kernel confirms."""
    invoke("resume", job_id=job_id)


@cli.command()
@click.argument("job_id")
@click.option("--signal", "sig", default="KILL", show_default=True, help="signal name or number")
@errors
def kill(job_id: str, sig: str) -> None:
    """Signal every process of the job (KILL: returns when the job is empty)."""
    from .api import parse_signal
    from .errors import InvalidArgument

    try:
        parse_signal(sig)  # a bad signal is a usage error (exit 2), caught before any round trip
    except InvalidArgument as e:
        raise click.BadParameter(str(e), param_hint="--signal") from None
    invoke("kill", job_id=job_id, signal_name=sig)


@cli.command("list")
@click.option("--all", "include_ended", is_flag=True, help="include ended jobs")
@click.option("--json", "as_json", is_flag=True)
@errors
def list_(include_ended: bool, as_json: bool) -> None:
    """Jobs on this node."""
    jobs = invoke("list", all=include_ended)
    if as_json:
        _json(jobs)
        return
    from rich.table import Table

    t = Table(box=None)
    for col in ("JOB", "STATE", "MODE", "OWNER", "PROCS", "PIDS MAX", "CPU s", "CREATED"):
        t.add_column(col)
    for j in jobs:  # type: ignore[union-attr]
        t.add_row(j["job_id"], j["state"], j.get("mode", "own"), f"{j['owner']}({j['owner_uid']})", str(j["processes"]),
                  str(j["pids_max"] if j["pids_max"] is not None else "-"), str(j["cpu_seconds"]), j["created"] or "")
    _console().print(t)


@cli.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
@errors
def show(job_id: str, as_json: bool) -> None:
    """One job: state, limits, accounting, identities."""
    s = invoke("show", job_id=job_id)
    assert isinstance(s, dict)
    if as_json:
        _json(s)
        return
    from rich.table import Table

    con = _console()
    con.print(f"[bold]job {s['job_id']}[/bold]  {s['state']}  owner {s['owner']}({s['owner_uid']})")
    con.print(f"  cgroup      {s['cgroup']}   mode {s.get('mode', 'own')}"
              + ("  (the batch system's: jobcage moves nothing there)" if s.get("mode") == "attach" else ""))
    con.print(f"  processes   {s['processes']}   pids {s['pids_current']}/{s['pids_max'] or '-'}"
              f"   fork limit hits {s['pids_limit_hits']}")
    con.print(f"  cpu         {s['cpu_seconds']} s   events lost {s['events_lost']}")
    con.print(f"  created     {s['created']}" + (f"   ended {s['ended']}" if s.get("ended") else ""))
    t = Table(box=None, title=None)
    for col in ("UID", "USER", "VIA", "FIRST SEEN", "LAST SEEN", "CPU s"):
        t.add_column(col)
    for i in s["identities"]:
        t.add_row(str(i["uid"]), i["user"], i["via"] or "", i["first_seen"], i["last_seen"], str(i["cpu_seconds"]))
    con.print(t)
    for d in s.get("declared", []):
        con.print(f"  declared    uid {d['uid']}: {d['label']}")


def parse_time(text: str | None) -> float | None:
    """ISO 8601 (naive = UTC) or epoch seconds."""
    if text is None:
        return None
    try:
        v = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(v) or v < 0:
            raise click.BadParameter(f"not a time: {text!r}")
        return v
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"not ISO 8601 or epoch seconds: {text!r}") from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


@cli.command()
@click.option("--uid", type=int)
@click.option("--at", "at", help="ISO 8601 or epoch seconds (default: now)")
@click.option("--logs", "logs", multiple=True, type=click.Path(),
              help="collected export files or directories (plain or gzip), any node; no agent, no root")
@click.option("--label", help="with --logs: which uids, jobs and nodes this declared identity had")
@click.option("--json", "as_json", is_flag=True)
@click.argument("more_logs", nargs=-1, type=click.Path())
@errors
def whois(uid: int | None, at: str | None, logs: tuple[str, ...], label: str | None, as_json: bool,
          more_logs: tuple[str, ...]) -> None:
    """Back-mapping: which job held UID at a time, for which pilot (--logs PATH...: on any node's records)."""
    if more_logs and not logs:
        raise click.UsageError(f"unexpected argument {more_logs[0]!r} (paths go after --logs)")
    if (uid is None) == (label is None):
        raise click.UsageError("give --uid or --label")
    try:
        when = parse_time(at)
    except click.BadParameter as e:   # one line, usage exit code: not click's three-line usage block
        click.echo(f"jobcage whois: --at: {e.message}", err=True)
        sys.exit(2)
    if logs:
        _whois_logs([*logs, *more_logs], uid, label, when, as_json)
        return
    if label is not None:
        raise click.UsageError("--label needs --logs")
    rows = invoke("whois", uid=uid, at=when)
    if as_json:
        _json(rows)
        return
    if not rows:
        _fail(f"no job held uid {uid} at that time")
    for r in rows:  # type: ignore[union-attr]
        decl = f" declared {', '.join(r['declared'])}" if r["declared"] else ""
        click.echo(f"uid {uid} ({r['user']}): job {r['job_id']} pilot {r['pilot_user']}({r['pilot_uid']}) "
                   f"via {r['via'] or '-'} seen {r['first_seen']} .. {r['last_seen']} "
                   f"job {r['job_start']} .. {r['job_end'] or 'running'}{decl}")


def _whois_logs(paths: list[str], uid: int | None, label: str | None, at: float | None, as_json: bool) -> None:
    import time

    from .logscan import label_logs, whois_logs

    if label is not None:
        rows = label_logs(paths, label)
        if as_json:
            _json(rows)
            return
        if not rows:
            _fail(f"no record declares {label!r}")
        for r in rows:
            click.echo(f"{label}: node {r['node']} job {r['job_id']} uid {r['uid']} pilot uid {r['pilot_uid']} "
                       f"declared {', '.join(r['declared_at'])} job {r['job_start']} .. {r['job_end'] or 'running'}")
        return
    assert uid is not None
    rows = whois_logs(paths, uid, time.time() if at is None else at)
    if as_json:
        _json(rows)
        return
    if not rows:
        _fail(f"no job held uid {uid} at that time in these logs")
    for r in rows:
        decl = f" declared {', '.join(r['declared'])}" if r["declared"] else ""
        click.echo(f"uid {uid}: node {r['node']} job {r['job_id']} pilot uid {r['pilot_uid']} via {r['via'] or '-'} "
                   f"seen {r['first_seen']} .. {r['last_seen']} job {r['job_start']} .. {r['job_end'] or 'running'}"
                   f"{decl}")


@cli.command()
@click.argument("job_id")
@click.option("--uid", type=int, required=True, help="the uid the payload runs (or would run) as")
@click.option("--label", required=True, help="grid identity (DN) or user label of the payload")
@errors
def declare(job_id: str, uid: int, label: str) -> None:
    """Declare a payload identity (gLExec 'declare only' mode); job owner or root."""
    invoke("declare", job_id=job_id, uid=uid, label=label)


@cli.command()
@click.option("--kill", "do_kill", is_flag=True, help="kill them (default: dry run)")
@click.option("--min-uid", type=int, help="ignore processes of lower uids (default from config: 1000)")
@click.option("--uid", "uids", type=int, multiple=True, help="only these uids (repeatable)")
@click.option("--json", "as_json", is_flag=True)
@errors
def prune(do_kill: bool, min_uid: int | None, uids: tuple[int, ...], as_json: bool) -> None:
    """Processes that belong to no job (by cgroup, not by uid). Dry run unless --kill."""
    r = invoke("prune", kill=do_kill, min_uid=min_uid, uids=list(uids) or None)
    assert isinstance(r, dict)
    if as_json:
        _json(r)
        return
    verb = "would kill" if r["dry_run"] else "stray"
    for s in r["strays"]:
        click.echo(f"{verb}: pid {s['pid']} uid {s['uid']} ({s['user']}) {s['cmd'][:60]!r}: {s['reason']}")
    if not r["dry_run"]:
        click.echo(f"killed {len(r.get('killed', []))}, survivors {len(r.get('survivors', []))}, "
                   f"spared {len(r.get('skipped', []))}")
        if r.get("survivors"):
            sys.exit(1)
    elif not r["strays"]:
        click.echo("no stray processes")


@cli.command()
@click.option("--uid", type=int, required=True)
@click.option("--dry-run", is_flag=True, help="say what would go and why; remove nothing")
@click.option("--since", "since", help="only what was created or changed since (ISO 8601 or epoch seconds)")
@click.option("--json", "as_json", is_flag=True)
@errors
def cleanup(uid: int, dry_run: bool, since: str | None, as_json: bool) -> None:
    """Remove files of UID in the configured dirs (refused while a running job holds UID)."""
    try:
        when = parse_time(since)
    except click.BadParameter as e:
        click.echo(f"jobcage cleanup: --since: {e.message}", err=True)
        sys.exit(2)
    r = invoke("cleanup", uid=uid, dry_run=dry_run, **({"since": when} if when is not None else {}))
    assert isinstance(r, dict)
    if as_json:
        _json(r)
        return
    if dry_run:
        click.echo(f"rule: {r.get('rule', '')}")
        for p in r["removed"]:
            click.echo(f"would remove: {p}")
        if r.get("removed_unlisted"):
            click.echo(f"would remove: ... and {r['removed_unlisted']} more")
    click.echo(f"{'would remove' if dry_run else 'removed'} {r['removed_files']} file(s), "
               f"{r['removed_dirs']} dir(s); skipped {sum(r['skipped_counts'].values())}: {r['skipped_counts']}")
