"""`jobcage agent`: the root daemon, in the foreground (systemd Type=notify).

Threads: the control socket's loop and its two small worker lanes (agent/control.py),
and the main loop that polls the tracer, writes the audit trail and reconciles with
cgroupfs.  Jobs
never depend on this process: it can die and restart, and re-adopts what the
kernel still holds.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

from .api import Api
from .config import Config
from .control import ControlServer
from .errors import JobcageError
from .events import TraceEvent
from .export import Exporter
from .lifecycle import JobManager

log = logging.getLogger("jobcage.agent")


def sd_notify(msg: str) -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect(addr)
            s.sendall(msg.encode())
        except OSError:
            pass


POLL_WAIT_S = 0.05   # the longest a trail event waits in the kernel's buffer (it holds ~11,000)
POLL_BATCH = 1024    # a poll that returns this many events is followed by another at once


class Agent:
    """Owns the manager, the tracer and the socket; glues tracer events to jobs."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.manager = JobManager(config, observer=self)
        self.store = self.manager.store
        self.api = Api(self.manager, self)
        self.tracer = None
        self.control: ControlServer | None = None
        self.accounting = None
        self.tracer_backend = "off"
        self.exporter: Exporter | None = None
        self._jids: dict[str, int] = {}
        self._owner: dict[str, int] = {}
        self._lost_base: dict[str, int] = {}   # events_lost stored by earlier agents: the tracer counts from 0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._pending: list[TraceEvent] = []
        self._next_prune = time.monotonic() + 60 * config.prune_interval

    # -- Observer protocol (called by JobManager, from any thread) ------------------
    def job_started(self, job: dict, cgroup_id: int | None, pids: list[int], level: int | None = None) -> None:
        if not job:
            return
        with self._lock:
            if self.accounting is not None and self._jids.get(job["job_id"]) not in (None, job["jid"]):
                self.accounting.forget(job["job_id"])   # a new run of a reused batch id starts from zero
            self._jids[job["job_id"]] = job["jid"]
            self._owner[job["job_id"]] = job["owner_uid"]
            self._lost_base[job["job_id"]] = int(job.get("events_lost") or 0)
            if self.tracer is not None:
                self.tracer.add_job(job["job_id"], job["owner_uid"], cgroup_id, pids, subtree_level=level)

    def job_adopted(self, job_id: str, pid: int) -> None:
        with self._lock:
            if self.accounting is not None:
                self.accounting.mark_adopted(job_id, pid)
            if self.tracer is not None and hasattr(self.tracer, "add_pid"):
                self.tracer.add_pid(job_id, pid)

    def flush_events(self) -> None:
        """Deliver and write every trace event buffered so far (identities included): readers
        that follow (accounting, summary, cleanup) then see what the kernel already reported."""
        with self._lock:
            if self.tracer is not None:
                self.tracer.poll(0)
            self._flush()

    def job_cpu_by_uid(self, job_id: str, pids: list[int]) -> dict[int, float] | None:
        with self._lock:
            # exits first: accounting attributes exit records through them; and the identities
            # the events show are written before the accounting touches any uid
            self.flush_events()
            if self.accounting is None:
                return None
            self.accounting.poll()
            return self.accounting.job_cpu_by_uid(job_id, pids)

    def job_ended(self, job_id: str) -> None:
        with self._lock:
            if self.tracer is not None and job_id in self.tracer.jobs():
                self.tracer.remove_job(job_id)   # delivers what is still buffered
            self._flush()                        # ... and writes it while the job's jid is known
            if self.accounting is not None:
                self.accounting.forget(job_id)   # a reused batch id starts from zero
            self._jids.pop(job_id, None)
            self._owner.pop(job_id, None)
            self._lost_base.pop(job_id, None)

    # -- tracer events -----------------------------------------------------------------
    def on_event(self, ev: TraceEvent) -> None:
        self._pending.append(ev)

    def _flush(self) -> None:
        """Write queued events, identities and lineage; one transaction per batch."""
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        with self.store.transaction():
            self._write(batch)

    def _write(self, batch: list[TraceEvent]) -> None:
        by_job: dict[int, list[TraceEvent]] = {}
        # (jid, uid) -> [first ts, last ts, via]: one identity write per uid and batch
        seen: dict[tuple[int, int], list] = {}
        # one row per process and batch too (an exec-heavy job names thousands): executemany
        lineage: dict[tuple[int, int], tuple[int, int, int, str | None, float]] = {}
        for ev in batch:
            jid = self._jids.get(ev.job_id or "")
            if jid is None:
                continue
            by_job.setdefault(jid, []).append(ev)
            owner = self._owner.get(ev.job_id or "", -1)
            # An identity is a uid the job's processes *run as*: the real uid of every event
            # (exec, set*uid, fork, exit...), so that whois names the job at the time of any
            # event the trail shows -- sudo's real uid 0 included.  Helpers' transient euids
            # (sudo passes through root and daemon) are in the trail, not identities.
            if ev.uid >= 0:
                via = ev.detail.get("via") if ev.uid != owner else None
                cur = seen.get((jid, ev.uid))
                if cur is None:
                    seen[(jid, ev.uid)] = [ev.ts, ev.ts, via]
                else:
                    cur[0], cur[1], cur[2] = min(cur[0], ev.ts), max(cur[1], ev.ts), cur[2] or via
            if ev.detail.get("orig_ppid") is not None:
                lineage[(jid, ev.pid)] = (jid, ev.pid, int(ev.detail["orig_ppid"]), ev.detail.get("via"), ev.ts)
        for (jid, uid), (t0, t1, via) in seen.items():
            self.store.touch_identity(jid, uid, t0, via, last=t1)
        self.store.set_lineages(lineage.values())
        for jid, evs in by_job.items():
            self.store.add_events(jid, evs)

    def _start_tracer(self) -> None:
        backend = self.config.tracer_backend
        if backend == "off":
            return
        try:
            from .tracer import Tracer

            self.tracer = Tracer(self.on_event, backend=backend, runtimes=self.config.tracer_container_runtimes,
                                 map_opens=self.config.tracer_map_opens)
            self.tracer_backend = self.tracer.backend
        except Exception as e:  # containment must not depend on tracing
            log.warning("tracing disabled: %s", e)
            return
        try:
            from .accounting import Accounting

            self.accounting = Accounting(self.tracer)
            self.accounting.start()
        except Exception as e:
            log.warning("per-identity accounting disabled: %s", e)
            self.accounting = None

    def _poll_accounting(self) -> None:
        acc = self.accounting
        try:
            if acc is not None:
                acc.poll(0)
        except OSError as e:
            log.warning("taskstats read failed: %s", e)

    def _record_gap(self, jobs: list[str]) -> None:
        """The agent was down: say so in every running job's trail."""
        last = self.store.get_meta("heartbeat")
        now = time.time()
        for job_id in jobs:
            jid = self._jids.get(job_id)
            if jid is None:
                continue
            since = float(last) if last else None
            self.store.add_events(jid, [TraceEvent("gap", job_id=job_id, ts=now,
                                                   detail={"from": since, "to": now, "reason": "agent not running"})])

    def _periodic(self) -> None:
        live = self.manager.reconcile()
        for job_id in live:
            try:
                if self.manager.driver.exists(job_id):   # own mode (an attached job's anchor is empty)
                    self.manager.driver.sync(job_id)
            except JobcageError:
                pass
            jid = self._jids.get(job_id)
            if jid is not None and self.tracer is not None:
                lost = self.tracer.counters(job_id).get("events_lost", 0)
                if lost:
                    self.store.add_events_lost(jid, self._lost_base.get(job_id, 0) + lost)
        self.store.set_meta("heartbeat", str(time.time()))
        if self.config.prune_interval > 0 and time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + 60 * self.config.prune_interval
            self._prune()

    def _prune(self) -> None:
        """Agent-mode prune: kill strays and write what was killed to the audit trail."""
        try:
            r = self.manager.prune(kill=True)
        except JobcageError as e:
            log.warning("prune failed: %s", e)
            return
        if r.get("killed") or r.get("survivors"):   # the manager wrote them to the trail
            log.info("prune: killed %d stray process(es), %d survivor(s)", len(r.get("killed", [])),
                     len(r.get("survivors", [])))

    # -- run ---------------------------------------------------------------------------
    def serve(self) -> None:
        cfg = self.config
        self.exporter = Exporter(cfg)   # first: a bad [export] setting stops the agent before it serves
        if self.exporter.workers:
            self.store.listener = self.exporter.offer
            self.exporter.start()
        self.manager.driver.ensure_subtree()
        self._start_tracer()
        # Never die on reconcile: the jobs run in their cgroups whatever the store says, and an
        # agent that does not start protects none of them.
        try:
            live = self.manager.reconcile()
        except Exception:
            log.exception("reconcile at start failed; continuing with the jobs the store knows")
            live = []
        for job in self.store.jobs("active"):
            if job["job_id"] in self._jids:   # reconcile() may have just registered it
                continue
            try:
                self.job_started(job, *self.manager.trace_target(job))
            except Exception:
                log.exception("job %s: cannot follow it (tracing, accounting)", job["job_id"])
        self._record_gap(live)
        if cfg.metrics_port:   # before the socket: an agent that answers serves its metrics too
            from .metrics import serve as serve_metrics

            serve_metrics(self, cfg.metrics_port)
        sockdir = os.path.dirname(cfg.socket_path)
        os.makedirs(sockdir, mode=0o755, exist_ok=True)
        server = self.control = ControlServer(cfg, self.api)
        os.chmod(cfg.socket_path, 0o666)  # anyone may connect; SO_PEERCRED decides what they may do
        t = threading.Thread(target=server.serve_forever, name="control", daemon=True)
        t.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        log.info("agent ready: cgroups %s, tracer %s, %d job(s), socket %s",
                 self.manager.driver.mode, self.tracer_backend, len(live), cfg.socket_path)
        sd_notify("READY=1")
        next_reconcile = next_accounting = 0.0
        try:
            while not self._stop.is_set():
                # The tracer is not thread-safe and control threads add/remove jobs:
                # poll without blocking under the lock, wait outside it.
                with self._lock:
                    n = self.tracer.poll(0) if self.tracer is not None else 0
                    if self.accounting is not None and time.monotonic() >= next_accounting:
                        # Every exit on the node sends a taskstats record: read them as they come, or the
                        # socket overruns and jobs lose the CPU of their exited tasks.  Not every turn: a
                        # record waits a few polls for its task's exit tracepoint (see Accounting).
                        next_accounting = time.monotonic() + 0.2
                        self._poll_accounting()
                    self._flush()
                    if time.monotonic() >= next_reconcile:
                        next_reconcile = time.monotonic() + cfg.reconcile_interval
                        try:
                            self._periodic()
                        except Exception:   # a bad cgroup or store row must not stop the agent
                            log.exception("periodic reconcile failed")
                # Batch: between small polls wait as after an empty one, so one transaction, one ring-buffer
                # poll and one accounting read cover ~50 ms of events instead of one or two (a job paced at
                # 1,000 exec/s otherwise costs a commit per exec).  A full burst is worked off at once.
                if n < POLL_BATCH:
                    self._stop.wait(POLL_WAIT_S)
        finally:
            sd_notify("STOPPING=1")
            server.shutdown()
            server.server_close()   # and removes the socket files
            with self._lock:
                self._flush()
                self.store.set_meta("heartbeat", str(time.time()))
            self.exporter.close()
            if self.tracer is not None:
                self.tracer.close()
            log.info("agent stopped; jobs keep running in their cgroups")
