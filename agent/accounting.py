"""Per-identity CPU accounting of jobs: how many CPU seconds each uid used inside a job.

Two sources, no overlap:

* **exited tasks** -- taskstats exit records (netlink, one per task, threads included), with
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
job (most exits on a node are not jobs').

A task is charged entirely to the uid it had at exit (or has now): the CPU a pilot's child
used before it switched to the pool uid goes to the pool uid.  Helpers switch uid right
after fork, so this is a few milliseconds per switch.  CPU a task burns after its exit
record (address-space teardown) is in the cgroup's usage but not here.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any

from .errors import Unsupported

log = logging.getLogger("jobcage.accounting")

SO_RCVBUFFORCE = 33          # asm-generic/socket.h; not exported by Python's socket module
_NLMSG = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")
_GENL_HDR = 4
TASKSTATS_TYPE_PID, TASKSTATS_TYPE_STATS, TASKSTATS_TYPE_AGGR_PID = 1, 3, 4
NLMSG_MIN_TYPE = 0x10   # below: NLMSG_NOOP, _ERROR, _DONE, _OVERRUN
MAX_TRIES = 3   # polls a record waits for the tracer to learn its task's exit


class TaskExit:
    """The fields of one taskstats exit record we use (struct taskstats, linux/taskstats.h)."""

    __slots__ = ("pid", "uid", "cpu_ns", "comm", "version")

    def __init__(self, pid: int, uid: int, cpu_ns: int, comm: str, version: int) -> None:
        self.pid, self.uid, self.cpu_ns, self.comm, self.version = pid, uid, cpu_ns, comm, version

    def __repr__(self) -> str:
        return f"TaskExit(pid={self.pid}, uid={self.uid}, cpu_ns={self.cpu_ns}, comm={self.comm!r})"


def parse_taskstats(buf: bytes) -> TaskExit | None:
    """Decode a struct taskstats.  Its layout is append-only ABI except version 15, which
    inserted six delay max/min fields after cpu_delay_total etc. (moved to the end again in
    16); everything after them sits 48 bytes later."""
    if len(buf) < 168:
        return None
    version = struct.unpack_from("=H", buf, 0)[0]
    shift = 48 if version == 15 else 0
    if len(buf) < 168 + shift:
        return None
    _real, virt = struct.unpack_from("=QQ", buf, 64 + shift)
    comm = buf[80 + shift:112 + shift].split(b"\0", 1)[0].decode(errors="replace")
    uid, _gid, pid = struct.unpack_from("=III", buf, 120 + shift)
    utime_us, stime_us = struct.unpack_from("=QQ", buf, 152 + shift)
    cpu_ns = virt if virt else (utime_us + stime_us) * 1000
    return TaskExit(pid, uid, cpu_ns, comm, version)


def _nlas(buf: bytes, off: int, end: int) -> Iterable[tuple[int, int, int]]:
    """(type, payload offset, payload end) of the netlink attributes in buf[off:end]."""
    while off + _NLA.size <= end:
        length, typ = _NLA.unpack_from(buf, off)
        if length < _NLA.size or off + length > end:
            return
        yield typ & 0x3FFF, off + _NLA.size, off + length
        off += (length + 3) & ~3


def parse_messages(data: bytes) -> list[TaskExit]:
    """Per-task exit records of one datagram.  AGGR_TGID records (whole thread groups) are
    skipped: their threads already came one by one as AGGR_PID."""
    out = []
    off = 0
    while off + _NLMSG.size <= len(data):
        length, typ = _NLMSG.unpack_from(data, off)[:2]
        if length < _NLMSG.size or off + length > len(data):
            break
        if typ >= NLMSG_MIN_TYPE:
            for t, a, b in _nlas(data, off + _NLMSG.size + _GENL_HDR, off + length):
                if t != TASKSTATS_TYPE_AGGR_PID:
                    continue
                for t2, a2, b2 in _nlas(data, a, b):
                    if t2 == TASKSTATS_TYPE_STATS:
                        rec = parse_taskstats(data[a2:b2])
                        if rec is not None:
                            out.append(rec)
        off += (length + 3) & ~3
    return out


def possible_cpus() -> str:
    """The cpumask string for TASKSTATS_CMD_ATTR_REGISTER_CPUMASK: every CPU that can exist,
    so a CPU brought online later is covered too."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            return f.read().strip()
    except OSError:
        return f"0-{(os.cpu_count() or 1) - 1}"


def task_runtimes(pid: int) -> dict[int, int]:
    """tid -> sum_exec_runtime (ns) of the tasks of a process now."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return out


def live_cpu_by_uid(pids: Iterable[int], base: dict[int, tuple[str, int]] | None = None) -> dict[int, int]:
    """uid -> ns of sum_exec_runtime of the live (non-zombie) tasks of these processes, less
    each task's ``base`` (its runtime when it was adopted: CPU spent before is not the job's)."""
    base = base or {}
    out: dict[int, int] = collections.defaultdict(int)
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            tdir = f"/proc/{pid}/task/{tid}"
            try:
                with open(f"{tdir}/status") as f:
                    status = f.read()
                with open(f"{tdir}/schedstat") as f:
                    ns = int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue   # exited meanwhile: its exit record counts it
            uid = state = None
            for line in status.splitlines():
                if line.startswith("State:"):
                    state = line.split()[1]
                elif line.startswith("Uid:"):
                    uid = int(line.split()[1])
                    break
            if uid is None or state in ("Z", "X"):
                continue
            b = base.get(int(tid)) if tid.isdigit() else None
            out[uid] += max(0, ns - b[1]) if b else ns
    return dict(out)


class Accounting:
    """CPU seconds per job and uid.  ``membership`` is the tracer (anything with
    ``job_of_exited(tid) -> job_id | None``, see :meth:`jobcage.agent.tracer.Tracer.job_of_exited`) or
    that function itself.  Call :meth:`poll` from the agent's loop (it keeps the netlink socket
    drained), on the tracer's thread; not thread safe."""

    def __init__(self, membership: Callable[[int], str | None] | Any, *, pending_s: float = 2.0) -> None:
        self._job_of_exited: Callable[[int], str | None] = getattr(membership, "job_of_exited", membership)
        if not callable(self._job_of_exited):
            raise TypeError("Accounting needs the tracer or a job_of_exited(tid) function")
        self._pending_s = pending_s
        self._exited: dict[str, dict[int, int]] = collections.defaultdict(lambda: collections.defaultdict(int))
        self._pending: collections.deque[tuple[float, int, TaskExit]] = collections.deque(maxlen=200_000)
        # tid -> (job, runtime ns when adopted): a task that ran before it joined the job (the
        # `jobcage run` starter, an adopted shell) brings CPU the job's cgroup never counted
        self._base: dict[int, tuple[str, int]] = {}
        self._nl: Any = None
        self._sock: socket.socket | None = None
        self.records = 0          # exit records read
        self.records_lost = 0     # socket overruns (ENOBUFS): records the kernel dropped
        self.unattributed = 0     # records of tasks that belonged to no job

    def start(self) -> None:
        """Open the taskstats family and listen for exit records on every CPU."""
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
        self._sock = socket.socket(fileno=os.dup(nl.fileno()))
        self._sock.setblocking(False)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        except OSError:
            pass

    def fileno(self) -> int:
        if self._sock is None:
            raise Unsupported("accounting not started")
        return self._sock.fileno()

    def poll(self, timeout_ms: int = 0) -> int:
        """Read the exit records that arrived, attribute them; return how many were read."""
        if self._sock is None:
            raise Unsupported("accounting not started")
        n = 0
        r, _, _ = select.select([self._sock], [], [], max(timeout_ms, 0) / 1000)
        now = time.monotonic()
        retry = list(self._pending)
        self._pending.clear()
        for t0, tries, rec in retry:
            self._attribute(rec, t0, now, tries)
        while r:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                self.records_lost += 1
                log.warning("taskstats socket overrun: exit records lost")
                continue
            for rec in parse_messages(data):
                n += 1
                self._attribute(rec, now, now, 0)
        self.records += n
        return n

    def _attribute(self, rec: TaskExit, first_seen: float, now: float, tries: int) -> None:
        job = self._job_of_exited(rec.pid)
        if job is not None:
            b = self._base.pop(rec.pid, None)
            self._exited[job][rec.uid] += max(0, rec.cpu_ns - b[1]) if b and b[0] == job else rec.cpu_ns
        elif tries < MAX_TRIES and now - first_seen < self._pending_s:
            # Bounded retries: on a busy node most exits are nobody's job, and each try may be
            # a map lookup in the kernel.
            self._pending.append((first_seen, tries + 1, rec))
        else:
            self.unattributed += 1

    def job_cpu_by_uid(self, job_id: str, live_pids: Iterable[int]) -> dict[int, float]:
        """uid -> CPU seconds of the job: exited tasks plus the live ``live_pids`` (the job's
        processes now, e.g. its cgroup.procs)."""
        self.poll(0)
        total: dict[int, int] = collections.defaultdict(int)
        for uid, ns in self._exited.get(job_id, {}).items():
            total[uid] += ns
        for uid, ns in live_cpu_by_uid(live_pids, self._base).items():
            total[uid] += ns
        return {uid: ns / 1e9 for uid, ns in sorted(total.items())}

    def job_cpu(self, job_id: str, live_pids: Iterable[int]) -> float:
        return sum(self.job_cpu_by_uid(job_id, live_pids).values())

    def mark_adopted(self, job_id: str, pid: int) -> None:
        """pid was just moved into the job: what its tasks ran before is not the job's CPU."""
        if len(self._base) > 100_000:   # bounded: entries of tasks whose exit we never attributed
            self._base.clear()
        for tid, ns in task_runtimes(pid).items():
            self._base[tid] = (job_id, ns)

    def forget(self, job_id: str) -> None:
        """Drop a job's totals (after its final accounting was stored)."""
        self._exited.pop(job_id, None)
        for tid in [t for t, (j, _) in self._base.items() if j == job_id]:
            del self._base[tid]

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
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
