"""Per-identity CPU accounting of jobs: how many CPU seconds each uid used inside a job.

Two sources, no overlap:

* **exited tasks** -- with the BPF tracer on a kernel with BTF (``Tracer.exit_cpu``), the
  tracer's exit program records each job task's real uid and ``sum_exec_runtime`` at exit, and
  the accounting takes them in one batch per poll (``Tracer.take_exits``): nothing is read for
  the exits of the rest of the node, and no taskstats record is even built.  Otherwise
  taskstats exit records (netlink, one per task, threads included), with
  the task's real uid at exit (``ac_uid``) and its CPU time.  ``cpu_run_virtual_total`` is
  the scheduler's ``sum_exec_runtime`` in ns -- the very quantity the cgroup's
  ``cpu.stat usage_usec`` adds up -- and is filled whenever the kernel has
  CONFIG_TASK_DELAY_ACCT, even with the ``kernel.task_delayacct`` sysctl off.  Where it is 0
  we fall back to ``ac_utime + ac_stime`` (tick-sampled, coarser).
* **live tasks** -- ``/proc/PID/task/TID/schedstat`` (first field = ``sum_exec_runtime`` ns),
  uid from the same task's status; zombies are skipped, their exit record already counted.

Membership of an exit record: the record names only a pid, and by the time it is read the
task is gone (no /proc/PID/cgroup to look at).  The tracer decided membership when the task
exited -- in the kernel, by the cgroup2 id of the exiting task (BPF), or from its pid set (proc
connector) -- and remembers exited task -> job; ``job_of_exited`` asks it.  The taskstats
record is sent a little before the exit tracepoint runs, so a record not yet known to the
tracer waits (``pending_s``) and is retried on the next polls; after that it belongs to no
job (most exits on a node are not jobs').  Every exit on the node sends a record, so the cost
per record is kept small: one batch fetch of the kernel's remembered exits per poll
(``sync_exited``), the pid peeked at its fixed place, and only a job's records decoded.

A task is charged entirely to the uid it had at exit (or has now): the CPU a pilot's child
used before it switched to the pool uid goes to the pool uid.  Helpers switch uid right
after fork, so this is a few milliseconds per switch.  CPU a task burns after its exit
record (address-space teardown) is in the cgroup's usage but not here.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any

from jobcage.cgroups import proc

from .errors import Unsupported
from .netlink import DatagramReader

log = logging.getLogger("jobcage.accounting")

_NLMSG = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")
_GENL_HDR = 4
TASKSTATS_TYPE_PID, TASKSTATS_TYPE_STATS, TASKSTATS_TYPE_AGGR_PID = 1, 3, 4
NLMSG_MIN_TYPE = 0x10   # below: NLMSG_NOOP, _ERROR, _DONE, _OVERRUN
PENDING_MAX = 200_000   # records waiting for their exit to be known (2 s of a very busy node)


class TaskExit:
    """The fields of one taskstats exit record we use (struct taskstats, linux/taskstats.h)."""

    __slots__ = ("pid", "uid", "cpu_ns", "comm", "version")

    def __init__(self, pid: int, uid: int, cpu_ns: int, comm: str, version: int) -> None:
        self.pid, self.uid, self.cpu_ns, self.comm, self.version = pid, uid, cpu_ns, comm, version

    def __repr__(self) -> str:
        return f"TaskExit(pid={self.pid}, uid={self.uid}, cpu_ns={self.cpu_ns}, comm={self.comm!r})"


# struct taskstats fields we read: version; cpu_run_real/virtual_total; ac_comm; ac_uid, ac_gid,
# ac_pid; ac_utime, ac_stime.  Version 15 has them 48 bytes later (see parse_taskstats).
_TS = struct.Struct("=H62xQQ32s8xIII20xQQ")
_TS15 = struct.Struct("=H110xQQ32s8xIII20xQQ")
_VERSION = struct.Struct("=H")
_CPU = struct.Struct("=72xQ40xI28xQQ")     # cpu_run_virtual_total, ac_uid, ac_utime, ac_stime
_CPU15 = struct.Struct("=120xQ40xI28xQQ")


def parse_taskstats(buf: bytes) -> TaskExit | None:
    """Decode a struct taskstats.  Its layout is append-only ABI except version 15, which
    inserted six delay max/min fields after cpu_delay_total etc. (moved to the end again in
    16); everything after them sits 48 bytes later."""
    if len(buf) < _TS.size:
        return None
    st = _TS15 if _VERSION.unpack_from(buf)[0] == 15 else _TS
    if len(buf) < st.size:
        return None
    version, _real, virt, comm, uid, _gid, pid, utime_us, stime_us = st.unpack_from(buf)
    cpu_ns = virt if virt else (utime_us + stime_us) * 1000
    return TaskExit(pid, uid, cpu_ns, comm.split(b"\0", 1)[0].decode(errors="replace"), version)


def _nlas(buf: bytes, off: int, end: int) -> Iterable[tuple[int, int, int]]:
    """(type, payload offset, payload end) of the netlink attributes in buf[off:end]."""
    while off + _NLA.size <= end:
        length, typ = _NLA.unpack_from(buf, off)
        if length < _NLA.size or off + length > end:
            return
        yield typ & 0x3FFF, off + _NLA.size, off + length
        off += (length + 3) & ~3


# The kernel's layout (taskstats_exit): nlmsghdr, genlmsghdr, AGGR_PID{PID, STATS}, read in one go:
# nlmsg length and type, then AGGR_PID nla type, PID nla length/type, pid, STATS nla length/type.
_FAST = struct.Struct("=IH10x4xHHHHIHH")
_FAST_HEAD = (TASKSTATS_TYPE_AGGR_PID, 8, TASKSTATS_TYPE_PID)
_FAST_STATS = _FAST.size


def split_messages(data: bytes) -> list[tuple[int, int, int]]:
    """(pid, offset, end) of the struct taskstats of each per-task exit record in one datagram,
    without decoding it: the pid decides whether a record is worth parsing (most exits on a node
    are nobody's job).  AGGR_TGID records (whole thread groups) are skipped: their threads already
    came one by one as AGGR_PID."""
    out = []
    off = 0
    end = len(data)
    while off + _NLMSG.size <= end:
        if off + _FAST.size <= end:
            length, typ, _alen, atyp, plen, ptyp, pid, slen, styp = _FAST.unpack_from(data, off)
            b = off + _FAST_STATS - 4 + slen
            if (atyp & 0x3FFF, plen, ptyp & 0x3FFF) == _FAST_HEAD and styp & 0x3FFF == TASKSTATS_TYPE_STATS \
                    and typ >= NLMSG_MIN_TYPE and _NLMSG.size <= length and off + length <= end \
                    and slen >= _NLA.size and b <= off + length:
                out.append((pid, off + _FAST_STATS, b))
                off += (length + 3) & ~3
                continue
        length, typ = _NLMSG.unpack_from(data, off)[:2]
        if length < _NLMSG.size or off + length > end:
            break
        if typ >= NLMSG_MIN_TYPE:
            for t, a, b in _nlas(data, off + _NLMSG.size + _GENL_HDR, off + length):
                if t != TASKSTATS_TYPE_AGGR_PID:
                    continue
                pid, stats = -1, None
                for t2, a2, b2 in _nlas(data, a, b):
                    if t2 == TASKSTATS_TYPE_PID and b2 - a2 >= 4:
                        pid = struct.unpack_from("=I", data, a2)[0]
                    elif t2 == TASKSTATS_TYPE_STATS:
                        stats = (a2, b2)
                if stats is not None:
                    out.append((pid, *stats))
        off += (length + 3) & ~3
    return out


def parse_messages(data: bytes) -> list[TaskExit]:
    """Per-task exit records of one datagram, decoded (see :func:`split_messages`)."""
    out = []
    for _pid, a, b in split_messages(data):
        rec = parse_taskstats(data[a:b])
        if rec is not None:
            out.append(rec)
    return out


def possible_cpus() -> str:
    """The cpumask string for TASKSTATS_CMD_ATTR_REGISTER_CPUMASK: every CPU that can exist,
    so a CPU brought online later is covered too."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            return f.read().strip()
    except OSError:
        return f"0-{(os.cpu_count() or 1) - 1}"


def live_cpu_by_uid(pids: Iterable[int], base: dict[int, tuple[str, int]] | None = None) -> dict[int, int]:
    """uid -> ns of sum_exec_runtime of the live (non-zombie) tasks of these processes, less
    each task's ``base`` (its runtime when it was adopted: CPU spent before is not the job's)."""
    base = base or {}
    out: dict[int, int] = collections.defaultdict(int)
    for pid in pids:
        for tid, uid, state, ns in proc.task_cpu(pid):
            if state in ("Z", "X"):
                continue   # exited: its exit record counts it
            b = base.get(tid)
            out[uid] += max(0, ns - b[1]) if b else ns
    return dict(out)


class Accounting:
    """CPU seconds per job and uid.  ``membership`` is the tracer (anything with
    ``job_of_exited(tid) -> job_id | None``, see :meth:`jobcage.agent.tracer.Tracer.job_of_exited`) or
    that function itself.  Call :meth:`poll` from the agent's loop (it keeps the netlink socket
    drained), on the tracer's thread; not thread safe."""

    def __init__(self, membership: Callable[[int], str | None] | Any, *, pending_s: float = 2.0,
                 source: str = "auto") -> None:
        self._job_of_exited: Callable[[int], str | None] = getattr(membership, "job_of_exited", membership)
        if not callable(self._job_of_exited):
            raise TypeError("Accounting needs the tracer or a job_of_exited(tid) function")
        if source not in ("auto", "kernel", "taskstats"):
            raise ValueError(f"unknown accounting source {source!r}")
        kernel = bool(getattr(membership, "exit_cpu", False))
        if source == "kernel" and not kernel:
            raise Unsupported("the tracer does not record CPU times at exit (no BPF, or no kernel BTF)")
        # "kernel": exits come with their CPU time from the tracer; "taskstats": from exit records
        self.source = "kernel" if kernel and source != "taskstats" else "taskstats"
        self._take: Callable[[], list[tuple[int, str | None, int, int]]] | None = \
            membership.take_exits if self.source == "kernel" else None
        # "kernel": tasks born in their job are summed per (job, uid) in the kernel; only the others
        # (adopted or seeded, with CPU from before the job to subtract) come one by one
        self._sums: Callable[[str], dict[int, int]] | None = None
        if self.source == "kernel" and getattr(membership, "sum_exits", lambda: False)():
            self._sums = membership.exit_sums
        self._pending_s = pending_s
        self._exited: dict[str, dict[int, int]] = collections.defaultdict(lambda: collections.defaultdict(int))
        # Records no job was known for yet (the record comes a little before the exit tracepoint), one
        # chunk per poll, oldest first: (arrival, {pid: (datagram, stats offset, end)}).  Per poll, not
        # per record: nearly every record of a node is nobody's and waits only to be dropped whole.
        self._waiting: collections.deque[tuple[float, dict[int, tuple[bytes, int, int]]]] = collections.deque()
        self._n_waiting = 0
        # The tracer's batch fetch of remembered exits (BPF), called once per poll before lookups, and
        # the tids it knows now (a dict lookup per record instead of a call).
        self._sync: Callable[[], list[int]] | None = getattr(membership, "sync_exited", None)
        known = getattr(membership, "known_exits", None)
        self._known: Callable[[], Any] | None = known if callable(known) else None
        # tid -> (job, runtime ns when adopted): a task that ran before it joined the job (the
        # `jobcage run` starter, an adopted shell) brings CPU the job's cgroup never counted
        self._base: dict[int, tuple[str, int]] = {}
        self._nl: Any = None
        self._reader: DatagramReader | None = None
        self._started = False
        self.records = 0          # exit records read
        self.records_lost = 0     # socket overruns (ENOBUFS): records the kernel dropped
        self.unattributed = 0     # records of tasks that belonged to no job

    def start(self) -> None:
        """Open the taskstats family and listen for exit records on every CPU (not needed, and not
        done, when the tracer records CPU times at exit)."""
        if self._take is not None:
            self._started = True
            return
        try:
            from pyroute2 import TaskStats
        except ImportError as e:
            raise Unsupported(f"pyroute2 is not importable: {e}") from e
        try:
            nl = TaskStats()
            nl.bind()
            nl.register_mask(possible_cpus())
        except Exception as e:  # pyroute2 raises NetlinkError, OSError...: all mean "no taskstats"
            raise Unsupported(f"taskstats unavailable: {e}") from e
        self._nl = nl
        # Read raw (parse_messages): pyroute2's per-message decoding costs ~60 us, too slow for
        # every exit of a busy node (the proc connector lost messages that way in our tests).
        self._reader = DatagramReader(nl.fileno(), "taskstats", batch=256, size=4096)

    def poll(self, timeout_ms: int = 0) -> int:
        """Read the exit records that arrived, attribute them; return how many were read."""
        if self._take is not None:
            if not self._started:
                raise Unsupported("accounting not started")
            return self._poll_kernel()
        if self._reader is None:
            raise Unsupported("accounting not started")
        r, _, _ = select.select([self._reader], [], [], max(timeout_ms, 0) / 1000)
        now = time.monotonic()
        got = self._reader.read() if r else []
        self.records_lost = self._reader.overruns
        waiting = self._waiting
        # After the reads: the exits of what we just read are known now (BPF: one batch fetch).
        new = self._sync() if self._sync is not None and (got or waiting) else None
        known = self._known() if self._known is not None else None
        n = 0
        misses: dict[int, tuple[bytes, int, int]] = {}
        attribute = self._attribute
        fast, stats_at = _FAST.unpack_from, _FAST_STATS
        for data in got:
            size = len(data)
            if size >= stats_at:
                # the common datagram, one per-task exit record in the kernel's layout: split_messages' fast
                # case inline (a call and a list per record are a third of what a record costs)
                length, typ, _alen, atyp, plen, ptyp, pid, slen, styp = fast(data, 0)
                b = stats_at - 4 + slen
                if (length + 3) & ~3 >= size and length <= size and b <= length and slen >= _NLA.size \
                        and typ >= NLMSG_MIN_TYPE and (atyp & 0x3FFF, plen, ptyp & 0x3FFF) == _FAST_HEAD \
                        and styp & 0x3FFF == TASKSTATS_TYPE_STATS:
                    n += 1
                    # the common case, a task of no job: one dict lookup, no call
                    if (known is not None and pid not in known) or not attribute(pid, data, stats_at, b):
                        misses[pid] = (data, stats_at, b)
                    continue
            for pid, a, b in split_messages(data):
                n += 1
                if (known is not None and pid not in known) or not attribute(pid, data, a, b):
                    misses[pid] = (data, a, b)
        if waiting:
            if new is not None:
                # Records that came before their exit was known are found by the tids the tracer just
                # learned and no record of this poll claimed: a waiting record of a non-job task costs
                # nothing per poll.
                for tid in new:
                    if known is not None and tid not in known:
                        continue
                    for _t, chunk in waiting:
                        hit = chunk.pop(tid, None)
                        if hit is not None:
                            self._n_waiting -= 1
                            attribute(tid, *hit)
                            break
            elif self._sync is None:   # a plain job_of_exited function: ask again for each waiting record
                for _t, chunk in waiting:
                    for tid in [t for t, hit in chunk.items() if attribute(t, *hit)]:
                        del chunk[tid]
                        self._n_waiting -= 1
            # give up on records older than pending_s (and on the oldest beyond PENDING_MAX), a poll's at a time
            while waiting and (now - waiting[0][0] >= self._pending_s or self._n_waiting > PENDING_MAX):
                dropped = len(waiting.popleft()[1])
                self._n_waiting -= dropped
                self.unattributed += dropped
        if misses:
            waiting.append((now, misses))
            self._n_waiting += len(misses)
        self.records += n
        return n

    def _poll_kernel(self) -> int:
        """The exits the tracer's exit program recorded since the last poll, each with its CPU time."""
        assert self._take is not None
        exits = self._take()
        exited, base_of = self._exited, self._base
        for tid, job, uid, ns in exits:
            base = base_of.pop(tid, None) if base_of else None
            if job is None:
                self.unattributed += 1
                continue
            exited[job][uid] += max(0, ns - base[1]) if base and base[0] == job else ns
        self.records += len(exits)
        return len(exits)

    def _attribute(self, pid: int, data: bytes, a: int, b: int) -> bool:
        """Add the record's CPU to its job; False when no job is known for it (yet)."""
        job = self._job_of_exited(pid)
        if job is None:
            return False
        if b - a >= _TS.size:   # decoded only for a job's task, and only what is added up
            st = _CPU15 if _VERSION.unpack_from(data, a)[0] == 15 else _CPU
            if b - a >= st.size:
                virt, uid, utime_us, stime_us = st.unpack_from(data, a)
                ns = virt if virt else (utime_us + stime_us) * 1000
                base = self._base.pop(pid, None)
                self._exited[job][uid] += max(0, ns - base[1]) if base and base[0] == job else ns
        return True

    def job_cpu_by_uid(self, job_id: str, live_pids: Iterable[int]) -> dict[int, float]:
        """uid -> CPU seconds of the job: exited tasks plus the live ``live_pids`` (the job's
        processes now, e.g. its cgroup.procs)."""
        self.poll(0)
        total: dict[int, int] = collections.defaultdict(int)
        for uid, ns in self._exited.get(job_id, {}).items():
            total[uid] += ns
        if self._sums is not None:
            for uid, ns in self._sums(job_id).items():
                total[uid] += ns
        for uid, ns in live_cpu_by_uid(live_pids, self._base).items():
            total[uid] += ns
        return {uid: ns / 1e9 for uid, ns in sorted(total.items())}

    def mark_adopted(self, job_id: str, pid: int) -> None:
        """pid was just moved into the job: what its tasks ran before is not the job's CPU."""
        if len(self._base) > 100_000:   # bounded: entries of tasks whose exit we never attributed
            self._base.clear()
        for tid, ns in proc.thread_runtimes(pid).items():
            self._base[tid] = (job_id, ns)

    def forget(self, job_id: str) -> None:
        """Drop a job's totals (after its final accounting was stored)."""
        self._exited.pop(job_id, None)
        for tid in [t for t, (j, _) in self._base.items() if j == job_id]:
            del self._base[tid]

    def close(self) -> None:
        self._started = False
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._nl is not None:
            try:
                self._nl.deregister_mask(possible_cpus())
            except Exception:
                pass   # closing the socket unregisters it as well
            self._nl.close()
            self._nl = None

    def __enter__(self) -> Accounting:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
