"""`jobtrace`: a batch job's process tree, a live view of it, and its audit trail.

Where the data comes from:
- the job (header), its member pids and the tracer's lineage: the control-socket method ``trace``
  (agent/api.py), through ``client.Invoker`` -- the agent when it runs, else as root the same method
  table in-process; the permission rules are the agent's;
- per-process details: ``snapshot`` (through jobcage.cgroups.proc, the one /proc reader); --live also
  asks the job's cgroup (jobcage.cgroups.path) for its members and frozen state.

Holds: ``snapshot`` (the /proc snapshot of a job's processes), ``tree`` (the placement rules and marks),
``table`` (the text view), ``json_out`` (the JSON forms), ``live`` (--live) and ``cli`` (the command).
Must never import: the views (snapshot, tree, table, json_out) import no click, rich, sqlite3, store or
lifecycle -- only ``cli`` reaches the method table; this ``__init__`` imports nothing until ``main`` runs.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    """The `jobtrace` command (entry point)."""
    from .cli import main as run

    run(argv)
