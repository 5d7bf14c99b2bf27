"""jobcage.agent — the root agent: job lifecycle, tracer, store, control API and the command lines.

Holds, by layer (calls go downwards only; docs/architecture.md has the picture):
  front     cli.py, jobtrace.py (click/rich commands), hook.py (the fast hook path), main.py
  transport client.py, protocol.py (length-prefixed JSON), server.py (the daemon), metrics.py
  methods   api.py (one method table for the socket and the direct root path)
  core      lifecycle.py (the one door that changes a job), store.py (SQLite WAL), tracer/ +
            accounting.py (identity tracing and per-identity CPU), prune.py, cleanup.py, tmpdir.py
  bottom    errors.py, events.py, config.py, netlink.py (the one reader of the netlink sockets pyroute2
            sets up: proc connector, taskstats)

Must never import: lifecycle, store and tracer import no CLI module, click or rich; the hook path
(hook.py, client.py, protocol.py, config.py, errors.py) imports no click, rich or sqlite3.
tests/test_architecture.py enforces these.
"""
