"""The `jobtrace` command: the one-shot tree(s), the audit trail (--events [--follow]), --live; its
arguments and exit codes."""

from __future__ import annotations

import os
import sys
import time

import click

from ..api import EVENTS_PAGE
from ..client import Invoker
from ..errors import JobcageError
from .json_out import event_json, job_json
from .live import live
from .snapshot import snapshot
from .table import ansi, event_text, glyphs, out_width, render_job, use_colour
from .tree import build_tree, parse_lineage

DEFAULT_INTERVAL = 0.2   # one-shot: %CPU sampling window (s); 0 = lifetime average like ps


def one_shot(source: Invoker, job_id: str | None, as_json: bool, wide: bool, interval: float) -> None:
    if job_id is None:
        ids = [j["job_id"] for j in source("list") if j.get("state") != "ended"]
    else:
        ids = [job_id]
    traces = []
    for jid in ids:
        try:
            traces.append(source("trace", job_id=jid))
        except JobcageError:
            if job_id is not None:
                raise  # asked for by name: say why; listed jobs may end in between
    all_pids = [pid for t in traces for pid in t.get("pids") or []]
    procs = snapshot(all_pids, interval, full_cmd=wide or as_json)
    g, width = glyphs(), out_width()
    colour = use_colour() and not as_json
    chunks = []
    for t in traces:
        job = t["job"]
        mine = {pid: procs[pid] for pid in t.get("pids") or [] if pid in procs}
        lineage = parse_lineage(t.get("lineage"))
        roots = build_tree(mine, lineage, int(job.get("owner_uid", -1)), job.get("identities") or [])
        if as_json:
            chunks.append(job_json(job, roots, bool(lineage)))
        else:
            chunks.append("\n".join(ansi(s, colour) for s in
                                    render_job(job, mine, roots, bool(lineage), width, wide, g)))
    if as_json:
        out = chunks[0] if job_id is not None else "[" + ",\n".join(chunks) + "]"
    elif not chunks:
        out = "no jobs"
    else:
        out = "\n\n".join(chunks)
    sys.stdout.write(out + "\n")
    sys.stdout.flush()



def events(source: Invoker, job_id: str, follow: bool, as_json: bool, poll: float = 0.5) -> None:
    """The trail, one event per line; --follow polls after the last id until the job has ended (its last
    events printed) or the user interrupts."""
    fmt = event_json if as_json else event_text
    after = 0
    ended_seen = False
    next_state = 0.0
    while True:
        batch = source("events", job_id=job_id, after_id=after)
        for ev in batch:
            sys.stdout.write(fmt(ev) + "\n")
            after = max(after, int(ev.get("id") or 0))
        sys.stdout.flush()
        if len(batch) >= EVENTS_PAGE:
            continue  # a full page: the agent answers in pages, read on before deciding anything
        if not follow or ended_seen:
            return
        if time.monotonic() >= next_state:  # the job's state, every few polls
            ended_seen = source("show", job_id=job_id).get("state") == "ended"
            next_state = time.monotonic() + 2.0
            if ended_seen:
                continue  # one more read for what came in with the end
        time.sleep(poll)




@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("job_id", required=False)
@click.option("--json", "as_json", is_flag=True,
              help="The tree as JSON: {job_id, job, lineage_known, tree: [{pid, ppid, orig_ppid, uid, euid, "
                   "user, sid, cmd, cpu_seconds, ..., children}]}; a list of those without JOB_ID.  "
                   "With --events: one JSON object per line.")
@click.option("--events", "show_events", is_flag=True, help="The job's audit trail, one event per line.")
@click.option("--follow", "-f", is_flag=True, help="With --events: keep printing new events until the job ends.")
@click.option("--live", "is_live", is_flag=True, help="Full-screen view refreshing every second (q quits).")
@click.option("--wide", "-w", is_flag=True, help="Full command lines (default: fit the width, 80 off a terminal).")
@click.option("--interval", type=click.FloatRange(min=0), default=None,
              help=f"Seconds: %CPU sampling window of a one-shot tree (default {DEFAULT_INTERVAL}; 0 = lifetime "
                   "average like ps), or the --live refresh period (default 1).")
def cli(job_id: str | None, as_json: bool, show_events: bool, follow: bool, is_live: bool, wide: bool,
        interval: float | None) -> None:
    """Process tree(s) of batch jobs: all jobs you may see, or JOB_ID.

    Marks: an identity switch (uid or euid differs from the parent's, from the job owner's for a root), with
    the helper it came through when known; a reparented (daemonized) process, shown under its original
    parent when the tracer knows it, with its current ppid in PPID.
    """
    if follow and not show_events:
        raise click.UsageError("--follow goes with --events")
    if (show_events or is_live) and job_id is None:
        raise click.UsageError("--events and --live need a JOB_ID")
    if is_live and (as_json or show_events):
        raise click.UsageError("--live cannot be combined with --json or --events")
    if show_events and wide:
        raise click.UsageError("--wide applies to the tree, not to --events")
    source = Invoker()
    if show_events:
        assert job_id is not None
        try:
            events(source, job_id, follow, as_json)
        except KeyboardInterrupt:
            pass  # the way to stop --follow
        return
    if is_live:
        assert job_id is not None
        live(source, job_id, wide, interval or 1.0)
        return
    one_shot(source, job_id, as_json, wide, DEFAULT_INTERVAL if interval is None else interval)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="jobtrace", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except JobcageError as e:
        _stderr_line(str(e))
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # `jobtrace | head`: the reader is gone; leave quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)


def _stderr_line(msg: str) -> None:
    sys.stderr.write("jobtrace: " + " ".join(msg.split()) + "\n")
    sys.stderr.flush()

