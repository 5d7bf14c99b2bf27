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
import select
import signal
import socket
import threading
import time
from collections.abc import Callable

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


# The longest a trail event waits in the kernel's ring buffer (it holds ~11,000; a quarter full wakes the loop at
# once, see _watch_ring); a view forces a turn (_await_turn).  Each turn is a transaction and a few syscalls: at
# 1,000 exec/s a 1 s window costs ~9 us of agent CPU per exec, 250 ms ~11 (bench/trace_overhead.py --only cpu).
POLL_WAIT_S = 1.0
# ... but a taskstats accounting (kernels without BTF) must read every exit record of the node as it comes, or
# the netlink socket overruns: it keeps the loop at this
POLL_WAIT_TASKSTATS_S = 0.25
POLL_WAIT_PERF_S = 0.1   # a perf buffer (kernels without a ring buffer) has no fill wakeup and holds ~680 a CPU
# The proc connector learns ids from /proc when it reads an event: waiting longer lets a helper like sudo
# switch uid first (the exec would be recorded under the new uid), so that backend polls twice as often.
POLL_WAIT_PROC_S = 0.05
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
        self._poll_wait = POLL_WAIT_PROC_S   # set with the tracer
        self.exporter: Exporter | None = None
        self._jids: dict[str, int] = {}
        self._owner: dict[str, int] = {}
        self._lost_base: dict[str, int] = {}   # events_lost stored by earlier agents: the tracer counts from 0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._pending: list[TraceEvent] = []
        # main-loop turns, for views that must see what the tracer already holds (_await_turn)
        self._turn = threading.Condition()
        self._turns = 0
        self._awaiting = 0   # views waiting for turns: the loop then runs them back to back, no poll window
        self._wake = threading.Event()
        self._loop_thread: threading.Thread | None = None
        self._next_prune = time.monotonic() + 60 * config.prune_interval

    # -- Observer protocol (called by JobManager, from any thread) ------------------
    def job_started(self, job: dict, cgroup_id: int | None, pids: list[int], level: int | None = None,
                    members: Callable[[], list[int]] | None = None) -> None:
        if not job:
            return
        with self._lock:
            if self._jids.get(job["job_id"]) not in (None, job["jid"]):
                # A new run of a reused batch id starts from zero: a fresh cookie in the tracer (the kernel's
                # exit sums are by cookie) even if the old run ended without job_ended, and no old totals.
                if self.tracer is not None and job["job_id"] in self.tracer.jobs():
                    self.tracer.remove_job(job["job_id"])
                    self._flush()
                if self.accounting is not None:
                    self.accounting.forget(job["job_id"])
            self._jids[job["job_id"]] = job["jid"]
            self._owner[job["job_id"]] = job["owner_uid"]
            self._lost_base[job["job_id"]] = int(job.get("events_lost") or 0)
            if self.tracer is not None:
                self.tracer.add_job(job["job_id"], job["owner_uid"], cgroup_id, pids, subtree_level=level,
                                    members=members)

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

    def job_cpu_by_uid(self, job_id: str, pids: list[int], flushed: bool = False) -> dict[int, float] | None:
        """CPU per uid of a job, for a view (show, list, the epilogue's summary).  It writes nothing:
        unless the caller has just flushed (a writer), it waits for the main loop's next turn, which
        writes what the tracer already holds (the identities the events show come before any uid the
        accounting sees)."""
        if not flushed:
            self._await_turn()
        with self._lock:
            if self.accounting is None:
                return None
            self.accounting.poll()
            return self.accounting.job_cpu_by_uid(job_id, pids)

    def job_lineage(self, job_id: str) -> dict[int, dict] | None:
        with self._lock:
            if self.tracer is None or job_id not in self.tracer.jobs():
                return None
            return self.tracer.lineage(job_id)

    def _await_turn(self, timeout: float = 1.0) -> None:
        """Until a main-loop turn that began after this call has ended (a turn in progress may have
        polled the tracer before the caller's question); at once when the loop is not running."""
        if threading.current_thread() is self._loop_thread or self._loop_thread is None:
            return
        with self._turn:
            first = self._turns + 2
            self._awaiting += 1
            self._wake.set()
            try:
                self._turn.wait_for(lambda: self._turns >= first or self._stop.is_set(), timeout)
            finally:
                self._awaiting -= 1

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
        """Hand queued events to the lifecycle, which writes them (trail, identities, lineage)."""
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        self.manager.record_trace(batch, {j: (jid, self._owner.get(j, -1)) for j, jid in self._jids.items()})

    def _start_tracer(self) -> None:
        backend = self.config.tracer_backend
        if backend == "off":
            return
        try:
            from .tracer import Tracer

            self.tracer = Tracer(self.on_event, backend=backend, runtimes=self.config.tracer_container_runtimes,
                                 map_opens=self.config.tracer_map_opens,
                                 syscall_hooks=self.config.tracer_syscall_hooks,
                                 ringbuf_pages=self.config.tracer_ringbuf_pages)
            self.tracer_backend = self.tracer.backend
        except Exception as e:  # containment must not depend on tracing
            log.warning("tracing disabled: %s", e)
            return
        fd = self.tracer.wake_fd
        if fd is not None:
            threading.Thread(target=self._watch_ring, args=(fd,), name="ring-watch", daemon=True).start()
        self._poll_wait = POLL_WAIT_PROC_S if self.tracer_backend != "bpf" else \
            POLL_WAIT_S if fd is not None else POLL_WAIT_PERF_S
        try:
            from .accounting import Accounting

            self.accounting = Accounting(self.tracer)
            self.accounting.start()
            log.info("per-identity accounting: exited tasks' CPU from %s", self.accounting.source)
            if self.accounting.source == "taskstats":
                self._poll_wait = min(self._poll_wait, POLL_WAIT_TASKSTATS_S)
        except Exception as e:
            log.warning("per-identity accounting disabled: %s", e)
            self.accounting = None

    def _watch_ring(self, fd: int) -> None:
        """Wake the loop before its poll window ends when the kernel says the ring buffer is filling (every
        JC_WAKE_EVERY-th record forces a wakeup; edge-triggered, so records merely waiting wake nothing)."""
        ep = select.epoll()
        try:
            ep.register(fd, select.EPOLLIN | select.EPOLLET)
            while not self._stop.is_set():
                if ep.poll(1.0):
                    self._wake.set()
        except OSError as e:   # the map went away with the tracer: the loop's timer remains
            log.debug("ring watch ended: %s", e)
        finally:
            ep.close()

    def _poll_accounting(self) -> None:
        acc = self.accounting
        try:
            if acc is not None:
                acc.poll(0)
        except OSError as e:
            log.warning("taskstats read failed: %s", e)

    def _record_gap(self, jobs: list[str]) -> None:
        """The agent was down: say so in every running job's trail."""
        self.manager.record_gap({j: self._jids[j] for j in jobs if j in self._jids})

    def _periodic(self) -> None:
        live = self.manager.reconcile()
        for job_id in live:
            try:
                self.manager.sync(job_id)
            except JobcageError:
                pass
            jid = self._jids.get(job_id)
            if jid is not None and self.tracer is not None:
                lost = self.tracer.counters(job_id).get("events_lost", 0)
                if lost:
                    self.manager.record_events_lost(jid, self._lost_base.get(job_id, 0) + lost)
        self.manager.heartbeat()
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
            signal.signal(sig, lambda *_: (self._stop.set(), self._wake.set()))
        hooks = getattr(self.tracer, "syscall_hooks", None)
        log.info("agent ready: cgroups %s, tracer %s%s, %d job(s), socket %s", self.manager.driver.mode,
                 self.tracer_backend, f" (syscalls by {hooks})" if hooks else "", len(live), cfg.socket_path)
        sd_notify("READY=1")
        next_reconcile = next_accounting = 0.0
        self._loop_thread = threading.current_thread()
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
                with self._turn:
                    self._turns += 1
                    self._turn.notify_all()
                # Batch: between small polls wait as after an empty one, so one transaction, one ring-buffer
                # poll and one accounting read cover a poll window of events instead of one or two (a job paced
                # at 1,000 exec/s otherwise costs a commit per exec).  A full burst is worked off at once; a ring
                # filling faster than the window drains (_watch_ring) and a view waiting for a turn
                # (_await_turn) wake the loop.
                if n < POLL_BATCH and not self._awaiting:
                    self._wake.wait(self._poll_wait)
                self._wake.clear()
        finally:
            self._loop_thread = None
            with self._turn:
                self._turn.notify_all()
            sd_notify("STOPPING=1")
            server.shutdown()
            server.server_close()   # and removes the socket files
            with self._lock:
                self._flush()
                self.manager.heartbeat()
            self.exporter.close()
            if self.tracer is not None:
                self.tracer.close()
            log.info("agent stopped; jobs keep running in their cgroups")
