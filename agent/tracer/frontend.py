"""The tracer's front end: jobs, the poll loop, queries."""

from __future__ import annotations

import collections
import logging
import stat
import time
from collections.abc import Callable, Container, Iterable

from jobcage.agent.events import TraceEvent

from ..errors import InvalidArgument, JobcageError, NoSuchJob, Unsupported
from .abi import KIND_NAMES, MARK_USERNS, MAX_JOBS, MAX_LEVEL, NOARG, SYS_NAMES
from .bpf_backend import SYSCALL_HOOKS, _BpfBackend
from .enrich import DEFAULT_RUNTIMES, EnrichMixin
from .proc_connector import _ProcBackend
from .procfs import cgroup_procs, proc_comm, proc_exe, proc_status
from .records import EXITED_KEEP, _Job
from .userns import INIT_USERNS, UsernsMixin, userns_inode

log = logging.getLogger("jobcage.tracer")

BACKENDS = ("auto", "bpf", "proc")
REMOVED_KEEP = 64           # removed jobs whose lineage/counters stay queryable
EXITED_MAX_AGE_NS = 30 * 1_000_000_000   # an exit whose taskstats record never came (lost) is dropped
KIND_EXEC = next(k for k, v in KIND_NAMES.items() if v == "exec")
KIND_USERNS = next(k for k, v in KIND_NAMES.items() if v == "userns")
SYS_UNSHARE = next(k for k, v in SYS_NAMES.items() if v == "unshare")
SYS_SETNS = next(k for k, v in SYS_NAMES.items() if v == "setns")
SETID_BITS = stat.S_ISUID | stat.S_ISGID


class Tracer(EnrichMixin, UsernsMixin):
    """Trace the jobs' processes; deliver :class:`TraceEvent` to ``on_event`` from :meth:`poll`.

    ``backend``: ``auto`` (BPF, else the proc connector), ``bpf`` or ``proc``.
    ``pid_filter`` (BPF): compile in the pid map that follows jobs without a cgroup2 id (nodes
    without cgroup2, or a driver that gives none).  On by default: it costs one more hash lookup
    per traced syscall of tasks outside any job's cgroup; ``False`` drops it.
    ``ringbuf_pages``: ring buffer size (power of two; 1024 pages = 4 MiB, ~11,000 events of burst).
    ``perf_buffer``: use a perf buffer even where a ring buffer works (what kernels < 5.8 get).
    ``syscall_hooks`` (BPF): how the identity, setsid, fork and user-namespace syscalls are hooked: ``kprobe``
    (only those syscalls pay), ``tracepoint`` (every syscall of the node takes the kernel's slow path) or
    ``auto`` (kprobes where the kernel has them, else tracepoints); :attr:`syscall_hooks` says which.
    """

    def __init__(self, on_event: Callable[[TraceEvent], None], backend: str = "auto", *,
                 pid_filter: bool = True, ringbuf_pages: int = 1024, perf_buffer: bool = False,
                 runtimes: Iterable[str] = DEFAULT_RUNTIMES, map_opens: bool = False,
                 syscall_hooks: str = "auto") -> None:
        if backend not in BACKENDS:
            raise InvalidArgument(f"unknown tracer backend {backend!r} (use one of {', '.join(BACKENDS)})")
        if syscall_hooks not in SYSCALL_HOOKS:
            raise InvalidArgument(f"unknown syscall hooks {syscall_hooks!r} (use one of {', '.join(SYSCALL_HOOKS)})")
        if ringbuf_pages <= 0 or ringbuf_pages & (ringbuf_pages - 1):
            raise InvalidArgument(f"ringbuf_pages must be a power of two, not {ringbuf_pages}")
        self._on_event = on_event
        self.pid_filter = pid_filter
        self.fallback_reason: str | None = None
        self._be: _BpfBackend | _ProcBackend
        if backend in ("auto", "bpf"):
            try:
                self._be = _BpfBackend(self.pid_filter, ringbuf_pages, perf_buffer, map_opens, syscall_hooks)
            except Unsupported as e:
                if backend == "bpf":
                    raise
                self.fallback_reason = str(e)
                log.warning("BPF tracer unavailable (%s); using the proc connector", e)
                self._be = _ProcBackend()
        else:
            self._be = _ProcBackend()
        self.backend: str = self._be.name
        self.buffer: str | None = ("perf" if self._be.perfbuf else "ring") if isinstance(self._be, _BpfBackend) \
            else None
        self.syscall_hooks: str | None = self._be.syscall_hooks if isinstance(self._be, _BpfBackend) else None
        self._closed = False
        self._jobs: dict[str, _Job] = {}
        self._by_cookie: dict[int, _Job] = {}
        self._removed: collections.OrderedDict[str, _Job] = collections.OrderedDict()
        self._next_cookie = 1
        self._free_slots = list(range(MAX_JOBS - 1, -1, -1))
        self._mono_to_epoch = time.time() - time.monotonic()
        self.runtimes = tuple(runtimes)
        self._plain_comms: dict[bytes, str] = {}
        self._ns: collections.OrderedDict[int, dict] = collections.OrderedDict()   # inode -> facts, maps
        self._deferred: list[tuple[float, _Job, TraceEvent, int | None, str]] = []  # map events awaiting the map
        self._extra: list[TraceEvent] = []   # events an enrichment adds before its own
        self._ns_changing: set[int] = set()  # pids with an unshare/setns in the batch being enriched
        self._exited: dict[int, tuple[int, int, int]] = {}   # BPF: tid -> (ts_ns, cookie, uid), oldest first

    # -- jobs ----------------------------------------------------------------------------------
    def add_job(self, job_id: str, owner_uid: int, cgroup_id: int | None, pids: Iterable[int] = (),
                subtree_level: int | None = None, members: Callable[[], Iterable[int]] | None = None) -> None:
        """Start tracing a job: its cgroup2 id and/or the pids it has now (their future
        children follow).  Processes already running are seeded from /proc.

        ``members``: the job's pids now, asked after the job is in the kernel's maps (the cgroup
        driver knows its cgroup's path); without it the cgroup2 tree is searched for the id.

        ``subtree_level``: the cgroup's depth below the cgroup2 root; set, every cgroup below it
        belongs to the job too (attach mode: a batch system's job cgroup and its steps)."""
        if subtree_level is not None and not 0 < subtree_level < MAX_LEVEL:
            raise Unsupported(f"job {job_id}: cgroup depth {subtree_level} is beyond the tracer's "
                              f"{MAX_LEVEL - 1}", job_id=job_id)
        if job_id in self._jobs:
            # Idempotent: the agent's start-up (reconcile, then its own pass over the running
            # jobs) may register a job twice.  What is new is added, nothing is reset.
            if cgroup_id is not None and cgroup_id not in self._jobs[job_id].cgroup_ids:
                self.add_cgroup(job_id, cgroup_id)
            seed = set(pids) | (set(members() if members else cgroup_procs(cgroup_id)) if cgroup_id is not None
                                else set())
            self.seed_from_proc(job_id, seed - set(self._jobs[job_id].procs))
            return
        if cgroup_id is None and self.backend == "bpf" and not self.pid_filter:
            raise Unsupported(f"job {job_id}: no cgroup2 id, and the tracer runs without the pid filter",
                              job_id=job_id)
        if not self._free_slots:
            raise JobcageError(f"job {job_id}: more than {MAX_JOBS} traced jobs", job_id=job_id)
        job = _Job(job_id, owner_uid, self._next_cookie, self._free_slots.pop(),
                   level=subtree_level if cgroup_id is not None else None)
        self._next_cookie += 1
        if cgroup_id is not None:
            job.cgroup_ids.add(cgroup_id)
        self._be.add_job(job)
        self._jobs[job_id] = job
        self._by_cookie[job.cookie] = job
        self._removed.pop(job_id, None)
        seed = set(pids)
        if cgroup_id is not None:
            seed.update(members() if members else cgroup_procs(cgroup_id))
        self.seed_from_proc(job_id, seed)

    def add_cgroup(self, job_id: str, cgroup_id: int) -> None:
        """Another cgroup2 (e.g. a child cgroup the job created) belongs to the job."""
        job = self._job(job_id)
        job.cgroup_ids.add(cgroup_id)
        self._be.add_cgroup(job, cgroup_id)

    def add_pids(self, job_id: str, pids: Iterable[int]) -> None:
        """Processes moved into the job after add_job (``jobcage adopt``)."""
        self.seed_from_proc(job_id, pids)

    def add_pid(self, job_id: str, pid: int) -> None:
        self.add_pids(job_id, [pid])

    def remove_job(self, job_id: str) -> None:
        """Stop tracing a job.  Events already buffered are delivered first; its counters and
        lineage stay readable (for the last REMOVED_KEEP removed jobs)."""
        job = self._job(job_id)
        self.poll(0)
        job.final_counters = self._be.counters(job)
        self._be.remove_job(job)
        del self._jobs[job_id]
        self._free_slots.append(job.slot)
        self._removed[job_id] = job
        while len(self._removed) > REMOVED_KEEP:
            old = self._removed.popitem(last=False)[1]
            self._by_cookie.pop(old.cookie, None)

    def jobs(self) -> list[str]:
        return list(self._jobs)

    def _job(self, job_id: str, removed_ok: bool = False) -> _Job:
        job = self._jobs.get(job_id) or (self._removed.get(job_id) if removed_ok else None)
        if job is None:
            raise NoSuchJob(f"job {job_id} is not traced", job_id=job_id)
        return job

    def seed_from_proc(self, job_id: str, pids: Iterable[int]) -> None:
        """Lineage records for processes that existed before tracing (current parent, ids,
        image), so jobs running before the agent started are known."""
        job = self._job(job_id)
        pids = [p for p in pids if p > 0]
        self._be.add_pids(job, pids)
        now = time.time()
        for pid in pids:
            st = proc_status(pid)
            if not st or "Uid" not in st:
                continue
            rec = self._rec(job, pid, now)
            rec.update(ppid=rec["ppid"] or st.get("PPid", [0])[0], uid=st["Uid"][0], euid=st["Uid"][1],
                       gid=st["Gid"][0] if "Gid" in st else -1, comm=proc_comm(pid), exe=proc_exe(pid),
                       seeded=True)
            ino = userns_inode(pid)
            if ino is not None and ino != INIT_USERNS:
                rec["userns"] = ino
                self._be.set_marked(pid, userns=True)   # its exit is reported, and its children are in it too
            elif st["Uid"][0] != job.owner_uid or st["Uid"][1] != job.owner_uid:
                self._be.set_marked(pid)   # so its exit is reported
            if rec["uid"] != job.owner_uid and not rec["via"]:
                rec["via"] = self._inherited_via(job, pid)

    # -- events --------------------------------------------------------------------------------
    def poll(self, timeout_ms: int) -> int:
        """Wait up to ``timeout_ms`` for events, deliver all that are buffered; return how many.

        BPF: exec and exit records are queued without waking us (a wakeup per exec would cost more
        than the exec); they are delivered at the latest when ``timeout_ms`` expires, or earlier when
        the ring buffer fills.  So keep ``timeout_ms`` modest (100-1000 ms)."""
        recs = self._be.poll(timeout_ms)
        self._mono_to_epoch = time.time() - time.monotonic()
        if isinstance(self._be, _BpfBackend):
            n = self._deliver_bpf(recs) if recs else 0
        else:
            recs.sort(key=lambda r: r.ts_ns)
            self._ns_changing = {r.pid for r in recs if r.kind == "userns" and r.sys in ("unshare", "setns")}
            n = 0
            for raw in recs:
                n += self._deliver_one(self._enrich(raw))
        for e in self._retry_maps():
            n += 1
            self._deliver(e)
        return n

    def _deliver_bpf(self, recs: list[tuple]) -> int:
        """BPF records (unpacked tuples, in time order): an exec the kernel already vouches for as plain (see
        :meth:`_plain_exec`) is read straight from its tuple; everything else goes through :meth:`_enrich`."""
        be = self._be
        assert isinstance(be, _BpfBackend)
        lay = be.layout
        i_kind, i_sys, i_pid, i_mk, i_eu, i_xm, i_fn = lay.kind, lay.sys, lay.pid, lay.marked, lay.euid, \
            lay.exe_mode, lay.filename
        self._ns_changing = {e[i_pid] for e in recs
                             if e[i_kind] == KIND_USERNS and e[i_sys] in (SYS_UNSHARE, SYS_SETNS)}
        plain = lay.plain_exec
        on_event = self._on_event
        n = 0
        for e in recs:
            ev = None
            xm = e[i_xm]
            # the kernel's facts: an exec, no user namespace in its ancestry since seeding, the euid it gave, a
            # file with no set-id bit, an absolute path (nothing to stat, no cwd to read)
            if e[i_kind] == KIND_EXEC and not e[i_mk] & MARK_USERNS and e[i_eu] != NOARG and xm \
                    and not xm & SETID_BITS and e[i_fn][:1] == b"/":
                ev = self._plain_exec(plain(e))
            if ev is None:
                n += self._deliver_one(self._enrich(be.raw(e)))
                continue
            n += 1
            try:   # _deliver, inline: once per exec
                on_event(ev)
            except Exception:
                log.exception("on_event failed for %s", ev)
        return n

    def _deliver_one(self, ev: TraceEvent | None) -> int:
        """Deliver what an enrichment added before its event (a namespace first seen), then the event."""
        n = 0
        if self._extra:
            extra, self._extra = self._extra, []
            for e in extra:
                n += 1
                self._deliver(e)
        if ev is not None:
            n += 1
            self._deliver(ev)
        return n

    @property
    def wake_fd(self) -> int | None:
        """An fd to wait on (epoll, edge-triggered) for "poll now, the kernel's buffer is filling": BPF with a
        ring buffer; None otherwise (poll on a timer)."""
        return self._be.wake_fd if isinstance(self._be, _BpfBackend) else None

    def _deliver(self, ev: TraceEvent) -> None:
        try:
            self._on_event(ev)
        except Exception:  # one bad consumer call must not lose the rest of the batch
            log.exception("on_event failed for %s", ev)

    # -- queries -------------------------------------------------------------------------------
    def counters(self, job_id: str) -> dict[str, int | None]:
        """forks, fork_failed (None: the backend cannot see them), events_lost."""
        job = self._job(job_id, removed_ok=True)
        if job.final_counters is not None:
            return dict(job.final_counters)
        return self._be.counters(job)

    def lineage(self, job_id: str) -> dict[int, dict]:
        """pid -> {pid, ppid (original parent), uid, euid, gid, comm, exe, via, first_seen,
        last_seen, exited, seeded}: every process the job's events named, plus live processes
        known only to the kernel's fork map."""
        job = self._job(job_id, removed_ok=True)
        out = {pid: dict(rec) for pid, rec in job.procs.items()}
        if job.final_counters is None:
            for pid, (ppid, ts_ns) in self._be.kernel_lineage(job).items():
                if pid in out:
                    out[pid]["ppid"] = out[pid]["ppid"] or ppid
                    continue
                st = proc_status(pid)
                if not st or st.get("Tgid", [pid])[0] != pid:
                    continue   # gone, or a thread
                ts = ts_ns / 1e9 + self._mono_to_epoch
                out[pid] = {"pid": pid, "ppid": ppid, "uid": st["Uid"][0], "euid": st["Uid"][1],
                            "gid": st["Gid"][0], "comm": proc_comm(pid), "exe": proc_exe(pid),
                            "via": None, "first_seen": ts, "last_seen": ts, "exited": None,
                            "seeded": False}
        for pid, rec in out.items():   # descendants of a switched process came through its helper
            if not rec["via"] and (rec["uid"] != job.owner_uid or rec["euid"] not in (-1, job.owner_uid)):
                p, seen = rec["ppid"], {pid}
                while p in out and p not in seen:
                    seen.add(p)
                    if out[p]["via"]:
                        rec["via"] = out[p]["via"]
                        break
                    p = out[p]["ppid"]
        return out

    def sync_exited(self) -> list[int]:
        """The tids whose exit the tracer learned since the last call, for :meth:`job_of_exited`
        (BPF: one batch read of the kernel's map).  The accounting calls it once per poll, after
        reading the taskstats records, so a record of a non-job task costs a dict miss, not a
        syscall, and a record that came before its exit was known is found by its tid."""
        if not isinstance(self._be, _BpfBackend):
            new, self._be.new_exited = self._be.new_exited, []
            return new
        cache = self._exited
        new = []
        for tid, ts, cookie, uid, _cpu in self._be.drain_exited():
            cache.pop(tid, None)   # a reused tid: the newer exit wins
            cache[tid] = (ts, cookie, uid)
            new.append(tid)
        # Exits whose record never came (socket overrun) must not catch a later task of that tid.
        oldest = time.monotonic_ns() - EXITED_MAX_AGE_NS
        while cache:
            tid = next(iter(cache))
            if len(cache) <= EXITED_KEEP and cache[tid][0] >= oldest:
                break
            del cache[tid]
        return new

    @property
    def exit_cpu(self) -> bool:
        """Whether the kernel records each job task's CPU time at its exit (BPF, with the offset from
        the kernel's BTF): then :meth:`take_exits` gives the accounting all it needs, no taskstats."""
        return isinstance(self._be, _BpfBackend) and self._be.runtime_offset is not None

    def take_exits(self) -> list[tuple[int, str | None, int, int]]:
        """(tid, job id, uid, CPU ns) of every job task that exited since the last call, with its real
        uid and ``sum_exec_runtime`` as the kernel saw them at exit (one batch read of the map; see
        :attr:`exit_cpu`).  The job id is None for a task of a run no longer traced: an ended run's
        accounting is final, and a later run of the same batch id must not get its CPU."""
        if not isinstance(self._be, _BpfBackend):
            return []
        out: list[tuple[int, str | None, int, int]] = []
        by_cookie, jobs = self._by_cookie, self._jobs
        for tid, _ts, cookie, uid, cpu in self._be.drain_exited():
            job = by_cookie.get(cookie)
            out.append((tid, job.job_id if job is not None and jobs.get(job.job_id) is job else None, uid, cpu))
        return out

    def sum_exits(self) -> bool:
        """Let the kernel add up the CPU of exited tasks born in their job, per (job, uid), instead of
        handing each exit to :meth:`take_exits` (only where :attr:`exit_cpu`; the accounting then adds
        :meth:`exit_sums`).  Returns whether it does.  A taskstats accounting must not ask: it needs
        every task's exit to attribute that task's record."""
        if not self.exit_cpu:
            return False
        assert isinstance(self._be, _BpfBackend)
        self._be.sum_exits()
        return True

    def exit_sums(self, job_id: str) -> dict[int, int]:
        """uid -> CPU ns that the job's exited tasks born in it ran, as the kernel added it up (see
        :meth:`sum_exits`); empty for a job no longer traced (its accounting is final)."""
        job = self._jobs.get(job_id)
        if job is None or not isinstance(self._be, _BpfBackend):
            return {}
        return self._be.exit_sums(job)

    def known_exits(self) -> Container[int]:
        """The tids whose exit the tracer knows and no one asked about yet: a record of a tid not in it is
        no job's (yet), found out with one ``in`` instead of a :meth:`job_of_exited` call."""
        return self._exited if isinstance(self._be, _BpfBackend) else self._be.known_exits()

    def job_of_exited(self, tid: int) -> str | None:
        """The job a task belonged to when it exited (each answer is given once).  Used by the
        accounting to attribute taskstats exit records; BPF: call :meth:`sync_exited` first."""
        if isinstance(self._be, _BpfBackend):
            hit = self._exited.pop(tid, None)
            cookie = hit[1] if hit else None
        else:
            ph = self._be.exited(tid)
            cookie = ph[0] if ph else None
        if cookie is None:
            return None
        job = self._by_cookie.get(cookie)
        # Only a run still traced: the record of a task of an ended run must not land in a later
        # run of the same batch id (Slurm ids wrap, PBS ids repeat); that run's accounting is final.
        return job.job_id if job is not None and self._jobs.get(job.job_id) is job else None

    def programs(self) -> dict[str, int]:
        """BPF: program name -> fd of each loaded program (for in-kernel cost figures from
        /proc/self/fdinfo with kernel.bpf_stats_enabled); empty for the proc backend."""
        if not isinstance(self._be, _BpfBackend):
            return {}
        return {name.decode(): fn.fd for name, fn in self._be.b.funcs.items()}

    def close(self) -> None:
        """Detach and free everything; idempotent."""
        if not self._closed:
            self._closed = True
            self._be.close()

    def __enter__(self) -> Tracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
