"""The proc-connector backend: the netlink FORK/EXEC/UID/GID/SID/EXIT events of the whole node, read raw."""

from __future__ import annotations

import collections
import logging
import os
import select
import stat
import struct
import time
from collections.abc import Container, Iterable

from jobcage.cgroups import proc

from ..errors import Unsupported
from ..netlink import DatagramReader
from .procfs import cgroup2_mount, proc_comm, proc_exe, proc_status
from .records import EXITED_KEEP, _Job, _Raw

log = logging.getLogger("jobcage.tracer")

# linux/cn_proc.h: the struct proc_event ABI, read directly (pyroute2's per-message decoding
# costs ~60 us and loses messages under load; this costs ~4 us).  Offsets from the start of
# the netlink message: nlmsghdr 16 + cn_msg 20, then what, cpu, timestamp_ns, event data.
_NLMSG_HDR = struct.Struct("=IHHII")
_PE_HEAD = struct.Struct("=IIQ")     # what, cpu, timestamp_ns at offset 36
_PE_DATA_OFF = 52
_PE_FORK, _PE_EXEC, _PE_UID, _PE_GID, _PE_SID, _PE_EXIT = 0x1, 0x2, 0x4, 0x40, 0x80, 0x80000000
_U32x4 = struct.Struct("=IIII")
_U32x2 = struct.Struct("=II")


class _ProcBackend:
    name = "proc"

    def __init__(self) -> None:
        try:
            from pyroute2 import ProcEventSocket
        except ImportError as e:
            raise Unsupported(f"pyroute2 is not importable: {e}") from e
        try:
            self._nl = ProcEventSocket()
            self._nl.bind()
            self._nl.control(listen=True)   # PROC_CN_MCAST_LISTEN
        except OSError as e:
            raise Unsupported(f"proc connector unavailable: {e}") from e
        # pyroute2 set the socket up; we read it raw (see _PE_* above)
        self._reader = DatagramReader(self._nl.fileno(), "proc connector")
        self.cg2 = cgroup2_mount()
        self.members: dict[int, int] = {}                    # tgid -> job cookie
        self.ids: dict[int, tuple[int, int, int, int]] = {}  # tgid -> ruid, euid, rgid, egid
        self.parents: dict[int, tuple[int, int]] = {}        # tgid -> (original ppid, fork ts)
        self.marked: set[int] = set()   # changed identity (inherited by children)
        self.seen: set[int] = set()     # an event was sent about it (see JC_MARK_SEEN)
        self.cg_jobs: dict[int, int] = {}                    # cgroup id -> cookie
        self.subtree_jobs: dict[int, int] = {}               # cgroup id -> cookie, descendants included
        self.owners: dict[int, tuple[int, int]] = {}         # cookie -> (owner uid, added at ns)
        self.forks: collections.Counter[int] = collections.Counter()
        self.overruns = 0
        self._exited: collections.OrderedDict[int, tuple[int, int]] = collections.OrderedDict()
        self.new_exited: list[int] = []   # tids added to _exited since the last sync_exited
        self._not_member: dict[int, float] = {}
        self._cg_ino: dict[str, int] = {}
        self._out: list[_Raw] = []

    # membership --------------------------------------------------------------------------
    def _cgroup_rel_of(self, pid: int) -> str | None:
        lines = proc.cgroups(pid) if self.cg2 else None
        return lines.get("") if lines else None

    def _ino(self, rel: str) -> int | None:
        ino = self._cg_ino.get(rel)
        if ino is None:
            try:
                ino = os.stat(self.cg2 + rel.rstrip("/")).st_ino
            except OSError:
                return None
            if len(self._cg_ino) > 4096:
                self._cg_ino.clear()
            self._cg_ino[rel] = ino
        return ino

    def _cgroup_id_of(self, pid: int) -> int | None:
        rel = self._cgroup_rel_of(pid)
        return None if rel is None else self._ino(rel)

    def _cookie_of_cgroup(self, pid: int) -> int | None:
        """The job of the cgroup holding pid: its own, or (subtree jobs) an ancestor's."""
        rel = self._cgroup_rel_of(pid)
        if rel is None:
            return None
        c = self.cg_jobs.get(self._ino(rel) or -1)
        if c is not None or not self.subtree_jobs:
            return c
        parts = rel.strip("/").split("/")
        for i in range(1, len(parts)):
            c = self.subtree_jobs.get(self._ino("/" + "/".join(parts[:i])) or -1)
            if c is not None:
                return c
        return None

    def _learn_ids(self, tgid: int) -> tuple[int, int, int, int]:
        st = proc_status(tgid)
        if st and "Uid" in st and "Gid" in st:
            self.ids[tgid] = (st["Uid"][0], st["Uid"][1], st["Gid"][0], st["Gid"][1])
        return self.ids.get(tgid, (-1, -1, -1, -1))

    def _member(self, tgid: int) -> int | None:
        c = self.members.get(tgid)
        if c is not None or not self.cg_jobs:
            return c
        now = time.monotonic()
        if self._not_member.get(tgid, 0.0) > now:
            return None
        c = self._cookie_of_cgroup(tgid)
        if c is None:
            if len(self._not_member) > 100_000:
                self._not_member.clear()
            self._not_member[tgid] = now + 1.0   # re-check later: the agent may adopt it
            return None
        self.members[tgid] = c
        self._learn_ids(tgid)
        return c

    def add_job(self, job: _Job) -> None:
        # Events queued before the job was added are not its: the socket hears the whole node.
        self.owners[job.cookie] = (job.owner_uid, time.monotonic_ns())
        for cg in job.cgroup_ids:
            self.add_cgroup(job, cg)

    def add_cgroup(self, job: _Job, cgroup_id: int) -> None:
        self.cg_jobs[cgroup_id] = job.cookie
        if job.level:
            self.subtree_jobs[cgroup_id] = job.cookie
        self._not_member.clear()

    def add_pids(self, job: _Job, pids: Iterable[int]) -> None:
        for pid in pids:
            self.members[pid] = job.cookie
            self._learn_ids(pid)

    def remove_job(self, job: _Job) -> None:
        for cg in job.cgroup_ids:
            self.cg_jobs.pop(cg, None)
            self.subtree_jobs.pop(cg, None)
        for pid in [p for p, c in self.members.items() if c == job.cookie]:
            self._forget(pid)
        self.owners.pop(job.cookie, None)

    def _forget(self, tgid: int) -> None:
        self.members.pop(tgid, None)
        self.ids.pop(tgid, None)
        self.parents.pop(tgid, None)
        self.marked.discard(tgid)
        self.seen.discard(tgid)

    def set_marked(self, pid: int, userns: bool = False) -> None:
        self.marked.add(pid)
        self.seen.add(pid)

    # events ------------------------------------------------------------------------------
    def poll(self, timeout_ms: int) -> list[_Raw]:
        r, _, _ = select.select([self._reader], [], [], max(timeout_ms, 0) / 1000)
        if r:
            # bounded, so a storm of node-wide events cannot starve the caller; an overflow of the socket
            # (events, maybe forks of jobs, gone) is counted
            for data in self._reader.read(budget=20_000):
                self._parse(data)
            self.overruns = self._reader.overruns
        out, self._out = self._out, []
        return out

    def _parse(self, data: bytes) -> None:
        off = 0
        while off + _NLMSG_HDR.size <= len(data):
            length = _NLMSG_HDR.unpack_from(data, off)[0]
            if length < _PE_DATA_OFF or off + length > len(data):
                return
            what, _cpu, ts = _PE_HEAD.unpack_from(data, off + 36)
            self._event(what, ts, data, off + _PE_DATA_OFF)
            off += (length + 3) & ~3

    def _event(self, what: int, ts: int, d: bytes, o: int) -> None:
        if what == _PE_FORK:
            _ppid, ptgid, cpid, ctgid = _U32x4.unpack_from(d, o)
            c = self._member(ptgid)
            if c is None or ts < self.owners[c][1]:
                return
            self.forks[c] += 1            # tasks, threads included: as the BPF side counts
            if cpid != ctgid:
                return                    # a thread: same process, nothing else to learn
            self.members[ctgid] = c
            self.parents[ctgid] = (ptgid, ts)
            if ptgid in self.ids:
                self.ids[ctgid] = self.ids[ptgid]
            else:
                self._learn_ids(ctgid)
            if ptgid in self.marked:
                self.marked.add(ctgid)
        elif what in (_PE_EXEC, _PE_UID, _PE_GID, _PE_SID):
            tid, tgid = _U32x2.unpack_from(d, o)
            c = self._member(tgid)
            if c is None or ts < self.owners[c][1]:
                return
            old = self.ids.get(tgid) or self._learn_ids(tgid)
            raw = _Raw(kind="exec", ts_ns=ts, cookie=c, pid=tgid, tid=tid,
                       ppid=self.parents.get(tgid, (0, 0))[0], comm=proc_comm(tgid))
            if what == _PE_EXEC:
                ruid, euid, rgid, egid = self._learn_ids(tgid)
                raw.filename = proc_exe(tgid)   # the connector carries no file name
                raw.ret = tid
                self._merge_exec_creds(raw)
            elif what == _PE_UID:
                ruid, euid = _U32x2.unpack_from(d, o + 8)
                rgid, egid = old[2], old[3]
                raw.kind = "setuid"
                self.marked.add(tgid)
            elif what == _PE_GID:
                rgid, egid = _U32x2.unpack_from(d, o + 8)
                ruid, euid = old[0], old[1]
                raw.kind = "setgid"
                self.marked.add(tgid)
            else:
                ruid, euid, rgid, egid = old
                raw.kind, raw.ret = "setsid", tgid   # setsid() returns the new sid = pid
            self.ids[tgid] = (ruid, euid, rgid, egid)
            raw.uid, raw.euid, raw.gid, raw.egid = ruid, euid, rgid, egid
            raw.old_uid, raw.old_gid = old[0], old[2]
            self.seen.add(tgid)
            self._out.append(raw)
        elif what == _PE_EXIT:
            tid, tgid = _U32x2.unpack_from(d, o)
            c = self.members.get(tgid)    # no cgroup lookup: the process is gone
            if c is None:
                return
            ids = self.ids.get(tgid, (-1, -1, -1, -1))
            self._exited[tid] = (c, ids[0])
            self.new_exited.append(tid)
            if len(self.new_exited) > EXITED_KEEP:   # nobody syncs (no accounting): stay bounded
                del self.new_exited[:-EXITED_KEEP]
            while len(self._exited) > EXITED_KEEP:
                self._exited.popitem(last=False)
            if tid != tgid:
                return                    # a thread
            if tgid not in self.seen or (ids[0] == self.owners[c][0] and tgid not in self.marked):
                self._forget(tgid)        # like the BPF side: only exits that say something
                return
            self._out.append(_Raw(kind="exit", ts_ns=ts, cookie=c, pid=tgid, tid=tid,
                                  ppid=self.parents.get(tgid, (0, 0))[0], uid=ids[0], euid=ids[1],
                                  gid=ids[2], egid=ids[3], marked=tgid in self.marked))
            self._forget(tgid)

    def _merge_exec_creds(self, exec_raw: _Raw) -> None:
        """Exec of a setuid/setgid file commits the new credentials (UID/GID event) just
        before the EXEC event.  Label those as caused by the exec, through that file, so they
        are not taken for a set*id call of the previous image."""
        try:
            mode = os.stat(exec_raw.filename).st_mode if exec_raw.filename else 0
        except OSError:
            mode = 0
        if not mode & (stat.S_ISUID | stat.S_ISGID):
            return
        for raw in reversed(self._out[-4:]):
            if raw.pid == exec_raw.pid and raw.kind in ("setuid", "setgid") and not raw.sys \
                    and exec_raw.ts_ns - raw.ts_ns < 50_000_000:
                raw.sys, raw.filename = "execve", exec_raw.filename

    def counters(self, job: _Job) -> dict[str, int | None]:
        # Failed forks are invisible to the connector; overruns are node wide, so every job
        # is told about them.
        return {"forks": self.forks[job.cookie], "fork_failed": None, "events_lost": self.overruns}

    def kernel_lineage(self, job: _Job) -> dict[int, tuple[int, int]]:
        return {p: v for p, v in self.parents.items() if self.members.get(p) == job.cookie}

    def known_exits(self) -> Container[int]:
        return self._exited

    def exited(self, tid: int) -> tuple[int, int] | None:
        return self._exited.pop(tid, None)

    def close(self) -> None:
        # PROC_CN_MCAST_IGNORE, sent raw: pyroute2's control() would wait for a reply that
        # our raw reads may already have consumed.
        cn = struct.pack("=IIIIHHI", 1, 1, 0, 0, 4, 0, 2)   # idx, val, seq, ack, len, flags, op
        try:
            self._reader.sock.send(_NLMSG_HDR.pack(_NLMSG_HDR.size + len(cn), 3, 0, 0, 0) + cn)
        except OSError:
            pass
        self._reader.close()
        self._nl.close()
