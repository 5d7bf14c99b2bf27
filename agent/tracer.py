"""Identity tracer: which process of which job ran what, under which uid, through which helper.

One front end (:class:`Tracer`), two backends chosen once at start:

* ``bpf``  -- bcc loads ``bpf/tracer.bpf.c``.  Jobs are filtered in the kernel by cgroup2 id
  (and, on nodes without cgroup2, by a tgid map that forks inherit); forks and failed forks
  are only counted there, so a fork bomb costs map updates, not events.
* ``proc`` -- the netlink proc connector (FORK/EXEC/UID/GID/SID/EXIT), for nodes where bcc or
  BPF is missing.  Every event of the node reaches user space; membership is decided here by
  pid inheritance plus /proc/PID/cgroup.  Failed set*id calls and failed forks are invisible
  to it (the connector reports committed credential changes only).

Both feed the same :class:`jobcage.agent.events.TraceEvent` to ``on_event`` and keep the same lineage:
pid -> original parent, uid/euid, image, and ``via`` = the helper binary (e.g. /usr/bin/sudo)
the process was running when its uid changed.

Lineage without fork events (BPF): the kernel keeps child -> parent in an LRU hash that lives
as long as the task; every event carries the original parent from it.  So a daemon that
double-forks and setsids is still linked to the process that started it: its setsid/exec/exit
events carry that parent, and :meth:`Tracer.lineage` reads the kernel map for processes that
produced no event.  One event per fork would let a fork bomb flood user space.

Not thread safe: call every method from the agent's one event loop.
"""

from __future__ import annotations

import collections
import ctypes as ct
import errno
import logging
import os
import re
import select
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from jobcage import bpf as bpf_files
from jobcage.agent.events import TraceEvent

from .errors import InvalidArgument, JobcageError, NoSuchJob, Unsupported

log = logging.getLogger("jobcage.tracer")

BACKENDS = ("auto", "bpf", "proc")
TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
SET_SYSCALLS = ("setuid", "setreuid", "setresuid", "setgid", "setregid", "setresgid", "setgroups", "setsid")
FORK_SYSCALLS = ("clone", "clone3", "fork", "vfork")
NS_SYSCALLS = ("unshare", "setns")       # user namespaces: enter + exit
OPEN_SYSCALLS = ("openat", "open")       # uid_map/gid_map opens: enter only
KIND_NAMES = {1: "exec", 2: "exit", 3: "setuid", 4: "setgid", 5: "setsid", 6: "fork_failed", 7: "userns"}
SYS_NAMES = {1: "setuid", 2: "setreuid", 3: "setresuid", 4: "setgid", 5: "setregid", 6: "setresgid",
             7: "setgroups", 8: "setsid", 9: "unshare", 10: "clone", 11: "clone3", 12: "setns", 13: "map"}
CLONE_NEWUSER = 0x10000000
# Container runtimes marked at exec: a basename, or a path suffix when it holds a '/'.
DEFAULT_RUNTIMES = ("apptainer", "singularity", "apptainer/bin/starter", "apptainer/bin/starter-suid",
                    "singularity/bin/starter", "singularity/bin/starter-suid")
IMAGE_SUFFIXES = (".sif", ".simg", ".img", ".sqsh", ".squashfs", ".ext3")
IMAGE_SCHEMES = ("docker://", "docker-archive:", "library://", "oras://", "shub://", "instance://")
MAP_HELPERS = ("newuidmap", "newgidmap")
NS_KEEP = 4096              # user namespaces remembered (facts and maps)
MAP_WAIT_S = 2.0            # how long a map event waits for the map to appear
UNKNOWN_NS = -1             # record's userns: entered one, but it was gone before we could read it
NOARG = 0xFFFFFFFF          # (uid_t)-1: "leave unchanged" in set*id arguments
LINEAGE_CAP = 50_000        # records kept per job before dead uninteresting ones are dropped
REMOVED_KEEP = 64           # removed jobs whose lineage/counters stay queryable
EXITED_KEEP = 65_536        # exited task -> job, for the accounting
EXITED_BATCH = 4096         # entries per batch read of the kernel's exited map
EXITED_MAX_AGE_NS = 30 * 1_000_000_000   # an exit whose taskstats record never came (lost) is dropped
_EXITED = struct.Struct("=QII")          # struct jc_exited: ts_ns, cookie, uid


def _header_define(name: str) -> int:
    """A number from bpf/jobcage.h, so the limits exist once."""
    m = re.search(rf"^#define\s+{name}\s+(\d+)", bpf_files.HEADER.read_text(), re.M)
    if not m:
        raise JobcageError(f"{bpf_files.HEADER}: no #define {name}", path=str(bpf_files.HEADER))
    return int(m.group(1))


MAX_JOBS = _header_define("JC_MAX_JOBS")
MAX_LEVEL = _header_define("JC_MAX_LEVEL")
JOB_SUBTREE = _header_define("JC_JOB_SUBTREE")
MARK_CHANGED = _header_define("JC_MARK_CHANGED")
MARK_SEEN = _header_define("JC_MARK_SEEN")


# ---- small /proc and cgroupfs readers (None when the process is gone) -----------------------

def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None


def proc_status(pid: int) -> dict[str, list[int]] | None:
    """Uid/Gid/PPid/Tgid/NoNewPrivs lines of /proc/PID/status as ints (Uid: real, effective,
    saved, fs)."""
    text = _read(f"/proc/{pid}/status")
    if text is None:
        return None
    out: dict[str, list[int]] = {}
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key in ("Uid", "Gid", "PPid", "Tgid", "NoNewPrivs"):
            try:
                out[key] = [int(x) for x in val.split()]
            except ValueError:
                pass
    return out


def proc_ppid(pid: int) -> int:
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return 0
    try:  # the comm field may contain spaces and parens: split after the last ')'
        return int(text[text.rindex(")") + 2:].split()[1])
    except (ValueError, IndexError):
        return 0


def proc_comm(pid: int) -> str:
    return (_read(f"/proc/{pid}/comm") or "").strip()


def proc_exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


# ---- user namespaces (read from /proc by the agent, which runs in the initial user namespace) -----

NS_GET_PARENT = 0xB702      # linux/nsfs.h _IO(0xb7, 0x2)
NS_GET_OWNER_UID = 0xB704   # _IO(0xb7, 0x4)
MAP_FILES = ("uid_map", "gid_map")
_MAP_PATH = re.compile(r"^/proc/(self|thread-self|\d+)(?:/task/\d+)?/([ug]id_map)$")
_MAP_REL = re.compile(r"^(?:(\d+)/)?([ug]id_map)$")

IdMap = list[list[int]]     # [[first id inside, first host id, count], ...]


def userns_inode(pid: int | str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/user").st_ino
    except OSError:
        return None


INIT_USERNS = userns_inode("self") or 0   # the agent's own: the initial user namespace


def userns_facts(pid: int) -> dict | None:
    """{inode, owner_uid, parent, level} of pid's user namespace, from nsfs ioctls (host ids: the
    agent is in the initial namespace), or None when pid is gone or in the initial namespace."""
    import fcntl

    try:
        fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    fds = [fd]
    try:
        ino = os.fstat(fd).st_ino
        if ino == INIT_USERNS:
            return None
        buf = bytearray(4)
        try:
            fcntl.ioctl(fd, NS_GET_OWNER_UID, buf)
            owner = int.from_bytes(buf, "little")
        except OSError:
            owner = -1
        parent, level, cur = None, 1, fd
        while level < 40:   # the kernel allows 32 levels
            try:
                cur = fcntl.ioctl(cur, NS_GET_PARENT)
            except OSError:   # EPERM: the parent is (above) our own, the initial namespace
                break
            fds.append(cur)
            pino = os.fstat(cur).st_ino
            if parent is None:
                parent = pino
            if pino == INIT_USERNS:
                break
            level += 1
        return {"inode": ino, "owner_uid": owner, "parent": parent or INIT_USERNS, "level": level}
    finally:
        for f in fds:
            os.close(f)


def read_idmap(pid: int, which: str) -> IdMap | None:
    """pid's uid_map or gid_map with host ids outside ([] = not written yet), None when gone."""
    text = _read(f"/proc/{pid}/{which}")
    if text is None:
        return None
    out = []
    for line in text.splitlines():
        try:
            inside, outside, count = (int(x) for x in line.split())
        except ValueError:
            continue
        out.append([inside, outside, count])
    return out


def to_host(ns_id: int, idmap: IdMap | None) -> int | None:
    """A namespaced id as the host sees it; -1 (unchanged) stays -1; None when not mapped (or
    the map is unknown): never a guess."""
    if ns_id == -1:
        return -1
    for inside, outside, count in idmap or ():
        if inside <= ns_id < inside + count:
            return outside + ns_id - inside
    return None


def host_mapped(host_id: int, idmap: IdMap | None) -> bool:
    return any(outside <= host_id < outside + count for _inside, outside, count in idmap or ())


def subid_ranges(path: str, user: str, uid: int) -> list[tuple[int, int]]:
    """/etc/subuid or /etc/subgid ranges (start, count) of a user (by name or uid)."""
    out = []
    for line in (_read(path) or "").splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in (user, str(uid)):
            try:
                out.append((int(parts[1]), int(parts[2])))
            except ValueError:
                pass
    return out


def cgroup2_mount() -> str | None:
    """Mount point of the cgroup2 hierarchy (``/sys/fs/cgroup`` or ``.../unified``), or None."""
    text = _read("/proc/self/mounts") or ""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2":
            return parts[1]
    return None


def cgroup2_path(cgroup_id: int, mount: str | None = None) -> str | None:
    """Directory of the cgroup2 whose id (= inode number) is ``cgroup_id``.  A walk of the
    hierarchy: readdir gives kernfs inode numbers without a stat per directory."""
    mount = mount or cgroup2_mount()
    if not mount:
        return None
    try:
        if os.stat(mount).st_ino == cgroup_id:
            return mount
    except OSError:
        return None
    stack = [mount]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        if e.inode() == cgroup_id:
                            return e.path
                        stack.append(e.path)
        except OSError:
            continue
    return None


def cgroup_procs(cgroup_id: int) -> list[int]:
    path = cgroup2_path(cgroup_id)
    text = _read(f"{path}/cgroup.procs") if path else None
    return [int(x) for x in text.split()] if text else []


def tracefs() -> str | None:
    for d in TRACEFS_DIRS:
        if os.path.isdir(f"{d}/events/sched"):
            return d
    return None


# ---- the backends' common record -----------------------------------------------------------

@dataclass(slots=True)
class _Raw:
    """What a backend saw, before enrichment; mirrors struct jc_event."""
    kind: str
    ts_ns: int               # CLOCK_MONOTONIC
    cookie: int              # job
    pid: int
    tid: int = 0
    ppid: int = 0
    uid: int = -1
    gid: int = -1
    old_uid: int = -1
    old_gid: int = -1
    euid: int = -1           # proc backend only: the connector reports it
    egid: int = -1
    ret: int = 0
    sys: str = ""
    args: tuple[int, ...] = ()
    comm: str = ""
    filename: str = ""
    marked: bool = False
    cgroup_id: int = 0


@dataclass
class _Job:
    job_id: str
    owner_uid: int
    cookie: int
    slot: int
    cgroup_ids: set[int] = field(default_factory=set)
    level: int | None = None                                # set: the cgroups' descendants are the job's too
    procs: dict[int, dict] = field(default_factory=dict)   # lineage records by pid
    final_counters: dict | None = None                      # frozen at remove_job
    userns: dict[int, int] = field(default_factory=dict)    # user namespaces in its trail: inode -> a member pid


def _sid(v: int) -> int:
    """u32 syscall argument -> int, with (uid_t)-1 as -1."""
    return -1 if v == NOARG else v


def _errname(ret: int) -> str | None:
    return errno.errorcode.get(-ret) if ret < 0 else None


# ---- BPF backend ------------------------------------------------------------------------------

class _EventLayout:
    """struct jc_event as one struct.Struct, built from the ctypes class bcc derives from
    jobcage.h (so a field added to the header needs no second definition here); attributes are
    the field names' indexes in the unpacked tuple."""

    def __init__(self, cls: type[ct.Structure]) -> None:
        fmt, pos = "=", 0
        for i, (name, typ) in enumerate(cls._fields_):
            off, size = getattr(cls, name).offset, ct.sizeof(typ)
            if off > pos:
                fmt += f"{off - pos}x"
            if issubclass(typ, ct.Array):
                fmt += f"{size}s"
            else:
                fmt += {1: "b", 2: "h", 4: "i", 8: "q"}[size]
                if typ._type_ in "BHILQ?":   # type: ignore[attr-defined]
                    fmt = fmt[:-1] + fmt[-1].upper()
            pos = off + size
            setattr(self, name, i)
        if ct.sizeof(cls) > pos:
            fmt += f"{ct.sizeof(cls) - pos}x"
        self.struct = struct.Struct(fmt)
        self.unpack = self.struct.unpack_from


class _BpfBackend:
    name = "bpf"

    def __init__(self, pid_filter: bool, ringbuf_pages: int, perf_buffer: bool, map_opens: bool = False) -> None:
        try:
            from bcc import BPF  # Debian python3-bpfcc, visible through system site packages
        except ImportError as e:
            raise Unsupported(f"bcc is not importable: {e}") from e
        if not tracefs():
            raise Unsupported("tracefs is not mounted (/sys/kernel/tracing)")
        for ev in ("sched_process_fork", "sched_process_exec", "sched_process_exit"):
            if not BPF.tracepoint_exists("sched", ev):
                raise Unsupported(f"tracepoint sched:{ev} is missing")
        self.pid_filter = pid_filter
        flags = [f"-I{bpf_files.DIR}", f"-DJC_RINGBUF_PAGES={ringbuf_pages}"]
        self.missing: list[str] = []
        for sc in SET_SYSCALLS + FORK_SYSCALLS:
            # setsid and the fork family only need the exit side
            need = ("exit",) if sc in FORK_SYSCALLS or sc == "setsid" else ("enter", "exit")
            if all(BPF.tracepoint_exists("syscalls", f"sys_{w}_{sc}") for w in need):
                flags.append(f"-DJC_TP_{sc.upper()}")
            else:
                self.missing.append(sc)
        for sc in NS_SYSCALLS:
            if all(BPF.tracepoint_exists("syscalls", f"sys_{w}_{sc}") for w in ("enter", "exit")):
                flags.append(f"-DJC_TP_{sc.upper()}")
            else:
                self.missing.append(sc)
        if all(BPF.tracepoint_exists("syscalls", f"sys_enter_{sc}") for sc in ("clone", "clone3")):
            flags.append("-DJC_TP_CLONE_ENTER")
        else:
            self.missing.append("clone entry")
        # every open of the node would pay for it (see bench/userns_overhead.py): off unless asked for;
        # without it the map is read from /proc and its writer is the job's exec of newuidmap
        for sc in OPEN_SYSCALLS if map_opens else ():
            if BPF.tracepoint_exists("syscalls", f"sys_enter_{sc}"):
                flags.append(f"-DJC_TP_{sc.upper()}")
            elif sc == "openat":
                self.missing.append(sc)
        fmt = _read(f"{tracefs()}/events/sched/sched_process_exit/format") or ""
        if "group_dead" in fmt:
            flags.append("-DJC_HAVE_GROUP_DEAD")
        if pid_filter:
            flags.append("-DJC_PID_FILTER")
        flags.append("-DJC_SUBTREE")
        self._levels: collections.Counter[int] = collections.Counter()   # depth -> subtree jobs there
        self.perfbuf = perf_buffer
        src = str(bpf_files.SOURCE).encode()
        try:
            self.b = BPF(src_file=src, cflags=flags + (["-DJC_PERFBUF"] if perf_buffer else []))
        except Exception as first:  # bcc raises bare Exception
            if perf_buffer:
                raise Unsupported(f"cannot load {bpf_files.SOURCE}: {first}") from first
            # kernels before 5.8 have no ring buffer: the same program with a perf buffer
            log.info("ring buffer program failed (%s), trying a perf buffer", first)
            try:
                self.b = BPF(src_file=src, cflags=flags + ["-DJC_PERFBUF"])
                self.perfbuf = True
            except Exception as e:
                raise Unsupported(f"cannot load {bpf_files.SOURCE}: {e}") from e
        self.jobs = self.b[b"jobs"]
        self.counters_map = self.b[b"counters"]
        self.lineage_map = self.b[b"lineage"]
        self.exited_map = self.b[b"exited"]
        self.marked_map = self.b[b"marked"]
        self.job_pids = self.b[b"job_pids"] if pid_filter else None
        self.subtree_levels = self.b[b"subtree_levels"]
        self.events = self.b[b"events"]
        self._raw: list[bytes] = []
        self._ev: _EventLayout | None = None
        self.perf_lost = 0
        self._xkeys: ct.Array | None = None   # drain_exited's buffers, allocated on first use
        self._xvals: ct.Array | None = None
        if self.perfbuf:
            self.events.open_perf_buffer(self._on_data, page_cnt=64, lost_cb=self._on_lost)
        else:
            self.events.open_ring_buffer(self._on_ring)

    # bcc callbacks: copy the bytes out at once (the buffer is reused after return); decoded in
    # one pass per poll with a struct.Struct, not field by field through ctypes.
    def _on_ring(self, ctx: object, data: int, size: int) -> int:
        self._raw.append(ct.string_at(data, size))
        return 0

    def _on_data(self, cpu: int, data: int, size: int) -> None:
        self._raw.append(ct.string_at(data, size))

    def _on_lost(self, count: int) -> None:
        self.perf_lost += count   # kernel side already counted them per job

    def _decode_all(self, raws: list[bytes]) -> list[_Raw]:
        if self._ev is None:
            from bcc.table import _get_event_class

            self._ev = _EventLayout(_get_event_class(self.events))
        ev = self._ev
        out = []
        for data in raws:
            e = ev.unpack(data)
            out.append(_Raw(KIND_NAMES.get(e[ev.kind], f"unknown{e[ev.kind]}"), e[ev.ts_ns], e[ev.cookie], e[ev.pid],
                            e[ev.tid], e[ev.ppid], e[ev.uid], e[ev.gid], e[ev.old_uid], e[ev.old_gid],
                            ret=e[ev.ret], sys=SYS_NAMES.get(e[ev.sys], ""),
                            args=(_sid(e[ev.arg0]), _sid(e[ev.arg1]), _sid(e[ev.arg2])),
                            comm=e[ev.comm].split(b"\0", 1)[0].decode(errors="replace"),
                            filename=e[ev.filename].split(b"\0", 1)[0].decode(errors="surrogateescape"),
                            marked=bool(e[ev.marked] & MARK_CHANGED), cgroup_id=e[ev.cgroup_id]))
        return out

    def _leaf(self, job: _Job) -> ct.Structure:
        return self.jobs.Leaf(job.slot, job.cookie, job.owner_uid, JOB_SUBTREE if job.level else 0)

    def _set_levels(self) -> None:
        mask = 0
        for lvl, n in self._levels.items():
            if n > 0:
                mask |= 1 << lvl
        self.subtree_levels[self.subtree_levels.Key(0)] = self.subtree_levels.Leaf(mask)

    def add_job(self, job: _Job) -> None:
        self.counters_map.clearitem(job.slot)
        for cg in job.cgroup_ids:
            self.add_cgroup(job, cg)
        if job.level:
            self._levels[job.level] += 1
            self._set_levels()

    def add_cgroup(self, job: _Job, cgroup_id: int) -> None:
        self.jobs[self.jobs.Key(cgroup_id)] = self._leaf(job)

    def add_pids(self, job: _Job, pids: Iterable[int]) -> None:
        if self.job_pids is None or job.cgroup_ids:
            return   # a job with a cgroup2 is that cgroup: a pid that leaves it leaves the job
        for pid in pids:
            self.job_pids[self.job_pids.Key(pid)] = self._leaf(job)

    def remove_job(self, job: _Job) -> None:
        for cg in job.cgroup_ids:
            self.jobs.pop(self.jobs.Key(cg), None)
        if job.level:
            self._levels[job.level] -= 1
            self._set_levels()
        if self.job_pids is not None:
            for k in [k for k, v in self.job_pids.items() if v.cookie == job.cookie]:
                self.job_pids.pop(k, None)

    def set_marked(self, pid: int) -> None:
        self.marked_map[self.marked_map.Key(pid)] = self.marked_map.Leaf(MARK_CHANGED | MARK_SEEN)

    def poll(self, timeout_ms: int) -> list[_Raw]:
        if self.perfbuf:
            self.b.perf_buffer_poll(timeout_ms)
        else:
            self.b.ring_buffer_poll(timeout_ms)
            self.b.ring_buffer_consume()   # records submitted without a wakeup (exec, exit)
        raws, self._raw = self._raw, []
        return self._decode_all(raws) if raws else []

    def counters(self, job: _Job) -> dict[str, int | None]:
        per_cpu = self.counters_map[job.slot]
        return {"forks": sum(c.forks for c in per_cpu),
                "fork_failed": sum(c.fork_failed for c in per_cpu),
                "events_lost": sum(c.events_lost for c in per_cpu)}

    def kernel_lineage(self, job: _Job) -> dict[int, tuple[int, int]]:
        return {k.value: (v.ppid, v.ts_ns) for k, v in self.lineage_map.items() if v.cookie == job.cookie}

    def drain_exited(self) -> list[tuple[int, int, int, int]]:
        """(tid, ts_ns, cookie, uid) of every job task exit the kernel remembered, removed from the
        map in BPF_MAP_LOOKUP_AND_DELETE_BATCH calls of EXITED_BATCH entries: one syscall per poll
        instead of a map lookup per taskstats record (most records on a node are nobody's job).
        Own buffers: bcc's items_lookup_and_delete_batch allocates the whole map each call."""
        from bcc import lib

        if self._xkeys is None:
            self._xkeys = (ct.c_uint32 * EXITED_BATCH)()
            self._xvals = ct.create_string_buffer(_EXITED.size * EXITED_BATCH)
        fd = self.exited_map.map_fd
        out: list[tuple[int, int, int, int]] = []
        in_b, out_b, cnt = ct.c_uint32(0), ct.c_uint32(0), ct.c_uint32(0)
        first = True
        while True:
            cnt.value = EXITED_BATCH
            res = lib.bpf_lookup_and_delete_batch(fd, None if first else ct.byref(in_b), ct.byref(out_b),
                                                  self._xkeys, self._xvals, ct.byref(cnt))
            err = ct.get_errno()
            n = cnt.value
            keys = self._xkeys
            for i, (ts, cookie, uid) in enumerate(_EXITED.iter_unpack(memoryview(self._xvals)[:n * _EXITED.size])):
                out.append((keys[i], ts, cookie, uid))
            if res != 0:
                if err == errno.ENOENT:   # the whole map was walked
                    break
                raise OSError(err, f"BPF_MAP_LOOKUP_AND_DELETE_BATCH on exited: {os.strerror(err)}")
            in_b.value = out_b.value
            first = False
        return out

    def close(self) -> None:
        if self.perfbuf:   # free the per-CPU readers while the map is open (bcc's __del__ would fail later)
            for key in list(getattr(self.events, "_open_key_fds", {})):
                del self.events[key]
        self.b.cleanup()


# ---- proc connector backend -----------------------------------------------------------------

# linux/cn_proc.h: the struct proc_event ABI, read directly (pyroute2's per-message decoding
# costs ~60 us and loses messages under load; this costs ~4 us).  Offsets from the start of
# the netlink message: nlmsghdr 16 + cn_msg 20, then what, cpu, timestamp_ns, event data.
_NLMSG_HDR = struct.Struct("=IHHII")
_PE_HEAD = struct.Struct("=IIQ")     # what, cpu, timestamp_ns at offset 36
_PE_DATA_OFF = 52
_PE_FORK, _PE_EXEC, _PE_UID, _PE_GID, _PE_SID, _PE_EXIT = 0x1, 0x2, 0x4, 0x40, 0x80, 0x80000000
_U32x4 = struct.Struct("=IIII")
_U32x2 = struct.Struct("=II")
SO_RCVBUFFORCE = 33   # asm-generic/socket.h; Python's socket module does not export it


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
        self.sock = socket.socket(fileno=os.dup(self._nl.fileno()))
        self.sock.setblocking(False)
        try:  # root may exceed rmem_max: survive bursts of the whole node's events
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        except OSError:
            pass
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
        text = _read(f"/proc/{pid}/cgroup")
        if not text or not self.cg2:
            return None
        for line in text.splitlines():
            if line.startswith("0::"):
                return line[3:].strip()
        return None

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

    def set_marked(self, pid: int) -> None:
        self.marked.add(pid)
        self.seen.add(pid)

    # events ------------------------------------------------------------------------------
    def poll(self, timeout_ms: int) -> list[_Raw]:
        r, _, _ = select.select([self.sock], [], [], max(timeout_ms, 0) / 1000)
        budget = 20_000   # bounded, so a storm of node-wide events cannot starve the caller
        while r and budget:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                # The socket overflowed: events (maybe forks of jobs) are gone.  Count it.
                self.overruns += 1
                log.warning("proc connector overrun: events lost")
                continue
            budget -= 1
            self._parse(data)
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

    def exited(self, tid: int) -> tuple[int, int] | None:
        return self._exited.pop(tid, None)

    def close(self) -> None:
        # PROC_CN_MCAST_IGNORE, sent raw: pyroute2's control() would wait for a reply that
        # our raw reads may already have consumed.
        cn = struct.pack("=IIIIHHI", 1, 1, 0, 0, 4, 0, 2)   # idx, val, seq, ack, len, flags, op
        try:
            self.sock.send(_NLMSG_HDR.pack(_NLMSG_HDR.size + len(cn), 3, 0, 0, 0) + cn)
        except OSError:
            pass
        self.sock.close()
        self._nl.close()


# ---- the front end ---------------------------------------------------------------------------

class Tracer:
    """Trace the jobs' processes; deliver :class:`TraceEvent` to ``on_event`` from :meth:`poll`.

    ``backend``: ``auto`` (BPF, else the proc connector), ``bpf`` or ``proc``.
    ``pid_filter`` (BPF): compile in the pid map that follows jobs without a cgroup2 id (nodes
    without cgroup2, or a driver that gives none).  On by default: it costs one more hash lookup
    per traced syscall of tasks outside any job's cgroup; ``False`` drops it.
    ``ringbuf_pages``: ring buffer size (power of two; 1024 pages = 4 MiB, ~11,000 events of burst).
    ``perf_buffer``: use a perf buffer even where a ring buffer works (what kernels < 5.8 get).
    """

    def __init__(self, on_event: Callable[[TraceEvent], None], backend: str = "auto", *,
                 pid_filter: bool = True, ringbuf_pages: int = 1024, perf_buffer: bool = False,
                 runtimes: Iterable[str] = DEFAULT_RUNTIMES, map_opens: bool = False) -> None:
        if backend not in BACKENDS:
            raise InvalidArgument(f"unknown tracer backend {backend!r} (use one of {', '.join(BACKENDS)})")
        if ringbuf_pages <= 0 or ringbuf_pages & (ringbuf_pages - 1):
            raise InvalidArgument(f"ringbuf_pages must be a power of two, not {ringbuf_pages}")
        self._on_event = on_event
        self.pid_filter = pid_filter
        self.fallback_reason: str | None = None
        self._be: _BpfBackend | _ProcBackend
        if backend in ("auto", "bpf"):
            try:
                self._be = _BpfBackend(self.pid_filter, ringbuf_pages, perf_buffer, map_opens)
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
        self._closed = False
        self._jobs: dict[str, _Job] = {}
        self._by_cookie: dict[int, _Job] = {}
        self._removed: collections.OrderedDict[str, _Job] = collections.OrderedDict()
        self._next_cookie = 1
        self._free_slots = list(range(MAX_JOBS - 1, -1, -1))
        self._mono_to_epoch = time.time() - time.monotonic()
        self.runtimes = tuple(runtimes)
        self._ns: collections.OrderedDict[int, dict] = collections.OrderedDict()   # inode -> facts, maps
        self._deferred: list[tuple[float, _Job, TraceEvent, int | None, str]] = []  # map events awaiting the map
        self._extra: list[TraceEvent] = []   # events an enrichment adds before its own
        self._ns_changing: set[int] = set()  # pids with an unshare/setns in the batch being enriched
        self._exited: dict[int, tuple[int, int, int]] = {}   # BPF: tid -> (ts_ns, cookie, uid), oldest first

    # -- jobs ----------------------------------------------------------------------------------
    def add_job(self, job_id: str, owner_uid: int, cgroup_id: int | None, pids: Iterable[int] = (),
                subtree_level: int | None = None) -> None:
        """Start tracing a job: its cgroup2 id and/or the pids it has now (their future
        children follow).  Processes already running are seeded from /proc.

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
            seed = set(pids) | (set(cgroup_procs(cgroup_id)) if cgroup_id is not None else set())
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
            seed.update(cgroup_procs(cgroup_id))
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
            if st["Uid"][0] != job.owner_uid or st["Uid"][1] != job.owner_uid:
                self._be.set_marked(pid)   # so its exit is reported
            if rec["uid"] != job.owner_uid and not rec["via"]:
                rec["via"] = self._inherited_via(job, pid)

    # -- events --------------------------------------------------------------------------------
    def poll(self, timeout_ms: int) -> int:
        """Wait up to ``timeout_ms`` for events, deliver all that are buffered; return how many.

        BPF: exec and exit records are queued without waking us (a wakeup per exec would cost more
        than the exec); they are delivered at the latest when ``timeout_ms`` expires, or at once
        with the next identity event.  So keep ``timeout_ms`` modest (100-1000 ms)."""
        raws = self._be.poll(timeout_ms)
        self._mono_to_epoch = time.time() - time.monotonic()
        raws.sort(key=lambda r: r.ts_ns)   # perf buffers are per CPU: restore one order
        n = 0
        self._ns_changing = {r.pid for r in raws if r.kind == "userns" and r.sys in ("unshare", "setns")}
        for raw in raws:
            ev = self._enrich(raw)
            extra, self._extra = self._extra, []
            for e in extra + ([ev] if ev is not None else []):
                n += 1
                self._deliver(e)
        for e in self._retry_maps():
            n += 1
            self._deliver(e)
        return n

    def _deliver(self, ev: TraceEvent) -> None:
        try:
            self._on_event(ev)
        except Exception:  # one bad consumer call must not lose the rest of the batch
            log.exception("on_event failed for %s", ev)

    def _rec(self, job: _Job, pid: int, ts: float) -> dict:
        rec = job.procs.get(pid)
        if rec is None:
            if len(job.procs) >= LINEAGE_CAP:
                self._prune(job)
            rec = job.procs[pid] = {"pid": pid, "ppid": 0, "uid": -1, "euid": -1, "gid": -1, "comm": "",
                                    "exe": "", "via": None, "first_seen": ts, "last_seen": ts,
                                    "exited": None, "seeded": False, "userns": None}
        return rec

    def _prune(self, job: _Job) -> None:
        """Drop records of exited (or vanished) processes that say nothing about identity."""
        for pid in [p for p, r in job.procs.items()
                    if r["uid"] == job.owner_uid and not r["via"]
                    and (r["exited"] or not os.path.exists(f"/proc/{p}"))]:
            del job.procs[pid]

    def _image(self, job: _Job, pid: int) -> str:
        """The binary a process runs: its last exec, else its creator's (fork keeps the image)."""
        seen = set()
        p = pid
        while p and p not in seen and len(seen) < 64:
            seen.add(p)
            rec = job.procs.get(p)
            if rec is None:
                break
            if rec["exe"]:
                return rec["exe"]
            p = rec["ppid"]
        return proc_exe(pid)

    def _inherited_via(self, job: _Job, pid: int) -> str | None:
        seen = set()
        rec = job.procs.get(pid)
        while rec and rec["pid"] not in seen and len(seen) < 64:
            seen.add(rec["pid"])
            if rec["via"]:
                return rec["via"]
            rec = job.procs.get(rec["ppid"])
        return None

    def _enrich(self, raw: _Raw) -> TraceEvent | None:
        job = self._by_cookie.get(raw.cookie)
        if job is None:
            return None
        ts = raw.ts_ns / 1e9 + self._mono_to_epoch
        rec = self._rec(job, raw.pid, ts)
        if raw.ppid:
            rec["ppid"] = rec["ppid"] or raw.ppid   # the original parent wins
        elif not rec["ppid"]:
            rec["ppid"] = proc_ppid(raw.pid)         # predates tracing: current parent
        prev_euid = self._prev_euid(job, rec, raw)
        ev = TraceEvent(kind=raw.kind, pid=raw.pid, ppid=rec["ppid"], uid=raw.uid, euid=raw.euid,
                        comm=raw.comm or rec["comm"], job_id=job.job_id, ts=ts, cgroup_id=raw.cgroup_id)
        detail = ev.detail
        if raw.tid and raw.tid != raw.pid:
            detail["tid"] = raw.tid
        ns = None
        if raw.kind == "userns":
            ok_ev = self._userns_event(job, rec, raw, ev, prev_euid)
            if raw.sys in ("unshare", "setns"):
                self._ns_changing.discard(raw.pid)   # later events of this batch: it is there now
            if not ok_ev:
                return None
        elif raw.kind != "fork_failed":
            ns = self._userns_of(job, rec, raw.pid, ts, raw)
            if ns is not None:
                detail["userns"] = self._ns_brief(ns)
        if raw.kind == "userns":
            pass
        elif raw.kind == "exec":
            self._exec(job, rec, raw, ev, ns)
        elif raw.kind in ("setuid", "setgid"):
            ev.filename = raw.filename or self._image(job, raw.pid)
            ok = raw.ret == 0
            detail.update(syscall=raw.sys or None, ret=raw.ret, ok=ok)
            if raw.kind == "setuid":
                detail.update(old_uid=raw.old_uid, old_euid=prev_euid)
                args: list[int | None] = []
                if raw.sys:
                    args = list(raw.args[: {"setuid": 1, "setreuid": 2}.get(raw.sys, 3)])
                    if ns is None and ok and args and raw.sys != "setuid" and args[0] not in (-1, raw.uid):
                        # the kernel made another real uid of it than asked: a user namespace
                        # we could not see (gone before we looked); its ids are not host ids
                        rec["userns"] = UNKNOWN_NS
                        ns = self._userns_of(job, rec, raw.pid, ts, raw)
                        detail["userns"] = self._ns_brief(ns)
                    if ns is not None:   # namespaced ids: the host ids are what the map makes of them
                        detail["ns_args"] = list(args)
                        args = [to_host(a, self._ns_map(ns, "uid_map")) for a in args]
                    detail["args"] = args
                if ev.euid < 0:
                    ev.euid = self._euid_after(raw.sys, args, prev_euid) if ok else prev_euid
                    if ev.euid is None:   # unmapped or map unknown: what the kernel says now, else unknown
                        ev.euid = self._euid_now(raw.pid, raw.uid)
                if ns is not None:
                    detail["ns_ids"] = {"uid": self._inside(ns, "uid_map", ev.uid),
                                        "euid": self._inside(ns, "uid_map", ev.euid)}
                if ok and (ev.uid != raw.old_uid or ev.euid != prev_euid) \
                        and (ev.uid != job.owner_uid or ev.euid not in (-1, job.owner_uid)):
                    # in a user namespace whose map a helper (newuidmap) wrote, that helper made the
                    # other host uid possible: it is the `via`, as sudo is for a sudo switch
                    rec["via"] = (ns or {}).get("helper") or ev.filename
            else:
                detail.update(old_gid=raw.old_gid, gid=raw.gid)
                if raw.sys == "setgroups":
                    detail["ngroups"] = raw.args[0]
                elif raw.sys:
                    gargs: list[int | None] = list(raw.args[: {"setgid": 1, "setregid": 2}.get(raw.sys, 3)])
                    if ns is not None:
                        detail["ns_args"] = list(gargs)
                        gargs = [to_host(a, self._ns_map(ns, "gid_map")) for a in gargs]
                    detail["args"] = gargs
                if raw.egid >= 0:
                    detail["egid"] = raw.egid
                if ev.euid < 0:
                    ev.euid = prev_euid
            if not ok:
                detail["errno"] = _errname(raw.ret)
            if raw.sys in ("", "execve"):
                detail["source"] = "proc_connector"
        elif raw.kind == "setsid":
            ev.euid = prev_euid if ev.euid < 0 else ev.euid
            ev.filename = self._image(job, raw.pid)
            detail.update(ret=raw.ret, ok=raw.ret >= 0)
            if raw.ret < 0:
                detail["errno"] = _errname(raw.ret)
        elif raw.kind == "exit":
            ev.euid = prev_euid if ev.euid < 0 else ev.euid
            ev.filename = self._image(job, raw.pid)
            detail["marked"] = raw.marked
            rec["exited"] = ts
        elif raw.kind == "fork_failed":
            ev.euid = prev_euid if ev.euid < 0 else ev.euid
            detail.update(ret=raw.ret, errno=_errname(raw.ret),
                          fork_failed_total=self._be.counters(job)["fork_failed"])
        if raw.kind != "fork_failed":
            rec.update(uid=ev.uid, euid=ev.euid, comm=ev.comm or rec["comm"], last_seen=ts)
            if raw.gid >= 0:
                rec["gid"] = raw.gid
            if not rec["via"] and ev.uid != job.owner_uid:
                # in a namespace whose map a helper wrote, a host uid other than the owner's came
                # through that helper (the proc connector may not have seen the switch as one)
                rec["via"] = self._inherited_via(job, raw.pid) or (ns or {}).get("helper")
            # lineage rides along, for consumers that keep only the event stream (the store)
            detail["orig_ppid"] = rec["ppid"]
            if rec["via"]:
                detail["via"] = rec["via"]
        if raw.kind == "userns" and raw.sys == "map":
            target, which = detail["target_pid"], detail["map"]
            if not self._complete_map(job, ev, target, which, final=False):
                self._deferred.append((time.monotonic() + MAP_WAIT_S, job, ev, target, which))
                return None   # delivered by a later poll, once the map is written
        if raw.kind == "userns" and detail.get("userns") and detail["userns"].get("inode") \
                and not self._complete_entry(job, ev, final=False):
            self._deferred.append((time.monotonic() + MAP_WAIT_S, job, ev, None, "entry"))
            return None   # the creator writes the map just after: wait for it (or for the process's end)
        return ev

    @staticmethod
    def _prev_euid(job: _Job, rec: dict, raw: _Raw) -> int:
        """Effective uid before this event: ours, else the creator's (fork keeps it, e.g. the
        child of a setuid-root sudo), else assume it equals the real uid."""
        if rec["euid"] >= 0:
            return rec["euid"]
        parent = job.procs.get(rec["ppid"])
        if parent and parent["euid"] >= 0 and parent["uid"] == raw.old_uid:
            return parent["euid"]
        return raw.euid if raw.euid >= 0 else raw.old_uid

    @staticmethod
    def _euid_after(sys: str, a: list[int | None], prev_euid: int) -> int | None:
        """Effective uid after a successful set*uid, from its (host) arguments; None = unknown."""
        if sys == "setuid":
            return a[0]
        if sys in ("setreuid", "setresuid") and a[1] != -1:
            return a[1]
        return prev_euid

    @staticmethod
    def _euid_now(pid: int, ruid: int) -> int:
        """The effective uid the kernel shows now (host id), -1 when the process is gone."""
        st = proc_status(pid)
        if st and "Uid" in st and st["Uid"][0] == ruid:
            return st["Uid"][1]
        return -1

    # -- user namespaces -------------------------------------------------------------------------
    def _ns_info(self, ino: int, pid: int) -> dict:
        """Facts and maps of a user namespace, cached by inode (maps are written once)."""
        info = self._ns.get(ino)
        if info is None:
            facts = userns_facts(pid) if userns_inode(pid) == ino else None
            info = facts or {"inode": ino, "owner_uid": -1, "parent": None, "level": None}
            info.update(uid_map=None, gid_map=None, helper=None, pid=pid)
            self._ns[ino] = info
            while len(self._ns) > NS_KEEP:
                self._ns.popitem(last=False)
        elif info["owner_uid"] == -1 and userns_inode(pid) == ino:
            info.update(userns_facts(pid) or {})
        if userns_inode(pid) == ino:
            info["pid"] = pid
        return info

    def _ns_map(self, info: dict, which: str) -> IdMap | None:
        """The namespace's uid_map/gid_map (host ids), read from a live member while unwritten."""
        m = info.get(which)
        if not m:
            pid = info.get("pid")
            if pid and userns_inode(pid) == info["inode"]:
                m = read_idmap(pid, which)
                if m:
                    info[which] = m
        return m or None

    def _inside(self, info: dict, which: str, host_id: int) -> int | None:
        """The namespace's view of a host id (None: not mapped there)."""
        if host_id < 0:
            return None
        for inside, outside, count in self._ns_map(info, which) or ():
            if outside <= host_id < outside + count:
                return inside + host_id - outside
        return None

    @staticmethod
    def _ns_brief(info: dict) -> dict:
        return {"inode": info["inode"], "owner_uid": info["owner_uid"], "level": info["level"],
                "parent": info["parent"]}

    def _userns_of(self, job: _Job, rec: dict, pid: int, ts: float, raw: _Raw | None = None) -> dict | None:
        """The user namespace pid runs in: None for the initial one, {"inode": None, ...} for one
        it entered that could not be read (gone); remembered in its record as the inode, or
        UNKNOWN_NS.  The first event of a namespace not yet in the job's trail is preceded by a
        `userns` event saying so (the proc connector sees no namespace entry; BPF: one created
        before tracing started)."""
        ino = rec.get("userns")
        if ino is not None and isinstance(self._be, _ProcBackend):
            # the connector reports no namespace entry: look again at each event while it lives
            ino = userns_inode(pid) or ino
            rec["userns"] = ino
        if ino is None:
            if pid in self._ns_changing:   # it unshares/setns-es later in this batch: not there yet
                ino = self._parent_ns(job, rec)
            else:
                ino = userns_inode(pid) if os.path.exists(f"/proc/{pid}") else None
                if ino is None:   # gone: it ran where its creator ran (had it unshared, we would know)
                    ino = self._parent_ns(job, rec)
            if ino is None:
                return None
            rec["userns"] = ino
        if ino == INIT_USERNS:
            return None
        if ino == UNKNOWN_NS:
            return {"inode": None, "owner_uid": -1, "level": None, "parent": None, "uid_map": None,
                    "gid_map": None, "helper": None, "pid": None}
        info = self._ns_info(ino, pid)
        if not info.get("helper"):
            self._map_helper(job, info, None)
        if not rec.get("ns_marked"):
            rec["ns_marked"] = True
            self._be.set_marked(pid)   # its exit completes the story, whatever its host uid
        if ino not in job.userns:
            job.userns[ino] = pid
            self._extra.append(self._observed(job, rec, pid, ts, info, raw))
        return info

    def _parent_ns(self, job: _Job, rec: dict) -> int | None:
        parent = job.procs.get(rec["ppid"])
        if parent is not None and parent.get("userns") is not None:
            # a parent that changed namespace may have forked us before or after: unknown
            return UNKNOWN_NS if "userns_from" in parent else parent["userns"]
        return userns_inode(rec["ppid"]) if rec["ppid"] else None

    def _observed(self, job: _Job, rec: dict, pid: int, ts: float, info: dict, raw: _Raw | None) -> TraceEvent:
        """The `userns` event for a namespace first seen through a process's event (`raw`: the ids
        before that event, which is the one that follows)."""
        uid = raw.old_uid if raw is not None and raw.old_uid >= 0 else rec["uid"]
        if uid < 0 and raw is not None:
            uid = raw.uid
        euid = rec["euid"] if rec["euid"] >= 0 else (raw.euid if raw is not None and raw.euid >= 0 else uid)
        ev = TraceEvent(kind="userns", pid=pid, ppid=rec["ppid"], uid=uid, euid=euid,
                        comm=rec["comm"] or proc_comm(pid), filename=self._image(job, pid), job_id=job.job_id,
                        ts=ts)
        ev.detail.update(syscall=None, observed=True, userns=self._ns_brief(info),
                         uid_map=self._ns_map(info, "uid_map"), gid_map=self._ns_map(info, "gid_map"),
                         orig_ppid=rec["ppid"])
        if isinstance(self._be, _ProcBackend):
            ev.detail["source"] = "proc_connector"
        self._map_helper(job, info, None)
        return ev

    def _map_helper(self, job: _Job, info: dict, writer: str | None) -> None:
        """Who made the namespace's map give host uids other than its owner's: the writer of the
        map (BPF saw the open), else -- proc connector -- newuidmap when the map lies within the
        owner's /etc/subuid ranges (the only way an unprivileged owner gets them)."""
        if info.get("helper"):
            return
        m = self._ns_map(info, "uid_map")
        if not m or all(outside == info["owner_uid"] and count == 1 for _i, outside, count in m):
            return
        if writer:
            info["helper"] = writer
            return
        # a map helper the job ran (its exec is in the trail), else -- proc connector, exec unseen --
        # newuidmap when the map lies within the owner's /etc/subuid ranges
        seen = [r for r in job.procs.values() if os.path.basename(r["exe"]) in MAP_HELPERS]
        uidmap = [r for r in seen if os.path.basename(r["exe"]) == "newuidmap"] or seen
        if uidmap:
            info["helper"] = max(uidmap, key=lambda r: r["first_seen"])["exe"]
            return
        owner = info["owner_uid"]
        try:
            import pwd

            name = pwd.getpwuid(owner).pw_name
        except (KeyError, OverflowError):
            name = str(owner)
        ranges = subid_ranges("/etc/subuid", name, owner)
        if all(outside == owner or any(s <= outside and outside + count <= s + c for s, c in ranges)
               for _i, outside, count in m):
            for d in os.environ.get("PATH", "/usr/bin:/bin").split(":") + ["/usr/bin", "/usr/sbin"]:
                if os.path.exists(os.path.join(d, "newuidmap")):
                    info["helper"] = os.path.join(d, "newuidmap")
                    info["helper_inferred"] = True
                    return

    def _userns_event(self, job: _Job, rec: dict, raw: _Raw, ev: TraceEvent, prev_euid: int) -> bool:
        """Fill a `userns` event (BPF); False when it is not one after all (setns into another
        kind of namespace) or must wait for its map (see _retry_maps)."""
        detail = ev.detail
        ev.euid = prev_euid if ev.euid < 0 else ev.euid
        ev.filename = self._image(job, raw.pid)
        ts = ev.ts
        if raw.sys == "map":
            return self._map_event(job, rec, raw, ev)
        ok = raw.ret > 0 if raw.sys in ("clone", "clone3") else raw.ret == 0
        detail.update(syscall=raw.sys, ret=raw.ret, ok=ok)
        if raw.sys == "setns":
            detail.update(fd=raw.args[0], nstype=raw.args[1] & 0xFFFFFFFF)
        else:
            detail["flags"] = hex(raw.args[0] & 0xFFFFFFFF)
        if not ok:
            detail["errno"] = _errname(raw.ret)
            return True
        target = raw.ret if raw.sys in ("clone", "clone3") else raw.pid
        ino = userns_inode(target)
        if raw.sys in ("clone", "clone3"):
            detail["child_pid"] = target
            if ino is None or proc_ppid(target) != raw.pid:
                detail["userns"] = None   # gone already (or a pid of a child pid namespace)
                return True
            crec = self._rec(job, target, ts)
            crec["ppid"] = crec["ppid"] or raw.pid
            crec["userns"] = ino
            detail["from_userns"] = rec.get("userns") or userns_inode(raw.pid)
        else:
            prev = rec.get("userns")
            if prev is None:
                prev = self._parent_ns(job, rec) if raw.sys == "unshare" else None
            if raw.sys == "setns" and ino is not None and ino == prev:
                return False   # joined some other kind of namespace
            detail["from_userns"] = prev
            if raw.sys == "unshare" or ino is not None:
                rec["userns"] = ino if ino is not None else UNKNOWN_NS
                rec["userns_from"] = prev
        if ino is None or ino == INIT_USERNS:
            detail["userns"] = None if ino is None else {"inode": ino, "initial": True}
            return True
        info = self._ns_info(ino, target)
        job.userns[ino] = target
        detail.update(userns=self._ns_brief(info), uid_map=self._ns_map(info, "uid_map"),
                      gid_map=self._ns_map(info, "gid_map"))
        return True

    def _map_target(self, raw: _Raw) -> int | None:
        """The process whose map is opened: from the path, its dirfd, or newuidmap's argv."""
        path = raw.filename
        m = _MAP_PATH.match(path)
        if m:
            return raw.pid if m.group(1) in ("self", "thread-self") else int(m.group(1))
        m = _MAP_REL.match(path)
        if not m:
            return None
        dfd = raw.args[0] - (1 << 32) if raw.args[0] >= 1 << 31 else raw.args[0]
        try:
            base = os.readlink(f"/proc/{raw.pid}/fd/{dfd}" if dfd >= 0 else f"/proc/{raw.pid}/cwd")
            full = _MAP_PATH.match(os.path.join(base, path))
            if full:
                return raw.pid if full.group(1) in ("self", "thread-self") else int(full.group(1))
        except OSError:
            pass
        argv = (_read(f"/proc/{raw.pid}/cmdline") or "").split("\0")
        if len(argv) > 1 and os.path.basename(argv[0]) in MAP_HELPERS and argv[1].isdigit():
            return int(argv[1])
        return None

    def _map_event(self, job: _Job, rec: dict, raw: _Raw, ev: TraceEvent) -> bool:
        which = os.path.basename(raw.filename)
        target = self._map_target(raw)
        ev.detail.update(syscall="map", map=which, path=raw.filename, target_pid=target)
        return True   # the map itself: _complete_map, at the end of _enrich

    def _complete_map(self, job: _Job, ev: TraceEvent, target: int | None, which: str, final: bool) -> bool:
        """Read the map being written; True when done (or given up: `final`)."""
        ino = userns_inode(target) if target else None
        if ino is None and target is None:
            # unresolved (newuidmap's dirfd, the writer gone): the job's latest namespace whose map
            # is written and has no writer on record
            for cand, pid in reversed(list(job.userns.items())):
                info = self._ns.get(cand)
                if info is not None and not info.get(f"{which}_writer") and self._ns_map(info, which):
                    ino, target = cand, info.get("pid") or pid
                    ev.detail["target_pid"] = target
                    break
        if ino is None or ino == INIT_USERNS:
            if final:
                ev.detail.update(userns=None, unread="target gone or not found")
            return final
        info = self._ns.get(ino) or self._ns_info(ino, target or 0)
        m = self._ns_map(info, which)
        if not m and not final:
            return False
        info[f"{which}_writer"] = ev.pid
        ev.detail.update(userns=self._ns_brief(info), idmap=m)
        if m is None:
            ev.detail["unread"] = "map not written"
        job.userns.setdefault(ino, target or 0)
        if which == "uid_map":
            writer = job.procs.get(ev.pid, {})
            self._map_helper(job, info, writer.get("exe") or ev.filename or None)
            if info.get("helper"):
                ev.detail["helper"] = info["helper"]
        return True

    def _complete_entry(self, job: _Job, ev: TraceEvent, final: bool) -> bool:
        """Fill a namespace entry's uid/gid maps; False while one is still unwritten and a member
        lives (True when `final`: what there is then)."""
        info = self._ns.get(ev.detail["userns"]["inode"])
        if info is None:
            return True
        m, g = self._ns_map(info, "uid_map"), self._ns_map(info, "gid_map")
        pid = info.get("pid")
        alive = bool(pid) and userns_inode(pid) == info["inode"]
        if not (m and g) and alive and not final:   # newuidmap and newgidmap write one each
            return False
        ev.detail.update(uid_map=m, gid_map=g)
        if m:
            self._map_helper(job, info, None)
            if info.get("helper"):
                ev.detail["helper"] = info["helper"]
        return True

    def _retry_maps(self) -> list[TraceEvent]:
        if not self._deferred:
            return []
        now = time.monotonic()
        done, keep = [], []
        for item in self._deferred:
            deadline, job, ev, target, which = item
            final = now >= deadline
            if self._complete_entry(job, ev, final) if which == "entry" else \
                    self._complete_map(job, ev, target, which, final):
                done.append(ev)
            else:
                keep.append(item)
        self._deferred = keep
        return done

    def _exec(self, job: _Job, rec: dict, raw: _Raw, ev: TraceEvent, ns: dict | None = None) -> None:
        path = raw.filename
        if path and not path.startswith("/"):
            try:
                path = os.path.normpath(os.path.join(os.readlink(f"/proc/{raw.pid}/cwd"), path))
            except OSError:
                pass
        ev.filename = path
        detail = ev.detail
        detail["gid"] = raw.gid
        if raw.ret and raw.ret != raw.pid:
            detail["tid"] = raw.ret            # a non-leader thread exec'd
        # exec keeps the effective uid unless the file is setuid
        euid = raw.euid if raw.euid >= 0 else (rec["euid"] if rec["euid"] >= 0 and rec["uid"] == raw.uid
                                               else raw.uid)
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is not None and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
            try:
                nosuid = bool(os.statvfs(path).f_flag & os.ST_NOSUID)
            except OSError:
                nosuid = False
            # in a user namespace the kernel ignores the bit when the file's owner is not mapped there
            unknown = ns is not None and ns["inode"] is None
            unmapped = ns is not None and not unknown and not host_mapped(st.st_uid, self._ns_map(ns, "uid_map"))
            if st.st_mode & stat.S_ISUID:
                detail.update(setuid_file=True, file_uid=st.st_uid)
                if unknown:   # maybe ignored by the kernel, maybe not: claim nothing
                    euid = -1
                elif unmapped:
                    detail["setuid_ignored"] = "file owner not mapped in the user namespace"
                elif not nosuid:
                    euid = st.st_uid
            if st.st_mode & stat.S_ISGID:
                detail.update(setgid_file=True, file_gid=st.st_gid)
            if nosuid:
                detail["nosuid_mount"] = True
            # Not the Uid line of /proc/PID/status: by the time we read it a helper like sudo
            # has often moved its euid on (seteuid juggling).  NoNewPrivs is sticky, so it
            # tells race-free whether the kernel ignored the setuid bit.
            status = proc_status(raw.pid)
            if status and status.get("NoNewPrivs", [0])[0] == 1:
                euid = rec["euid"] if rec["euid"] >= 0 else raw.uid
                detail["no_new_privs"] = True
            if euid != raw.uid:
                self._be.set_marked(raw.pid)   # report its exit although its real uid is the owner's
                if euid != rec["euid"]:
                    rec["via"] = path
        ev.euid = euid
        rec["exe"] = path
        runtime = self._runtime(path)
        if runtime:
            detail["container_runtime"] = runtime
            image = self._runtime_image(raw.pid)
            if image:
                detail["image"] = image

    def _runtime(self, path: str) -> str | None:
        """The configured container-runtime entry the exec'd file matches, if any."""
        base = os.path.basename(path)
        for r in self.runtimes:
            if ("/" in r and path.endswith("/" + r.lstrip("/"))) or r == base:
                return r
        return None

    @staticmethod
    def _runtime_image(pid: int) -> str | None:
        """The image an apptainer/singularity command line names (`exec|run|shell|test|instance
        start [options] IMAGE ...`), when its arguments are still readable."""
        argv = (_read(f"/proc/{pid}/cmdline") or "").split("\0")[1:]
        while argv and argv[-1] == "":
            argv.pop()
        for a in argv:
            if a.endswith(IMAGE_SUFFIXES) or a.startswith(IMAGE_SCHEMES):
                return a
        verbs = ("exec", "run", "shell", "test", "start", "inspect")
        for i, a in enumerate(argv):
            if a in verbs:
                rest = argv[i + 1:]
                if a == "start" or (rest and rest[0] == "start"):
                    rest = rest[1:] if rest and rest[0] == "start" else rest
                for b in rest:
                    if not b.startswith("-") and os.path.isdir(b):   # a sandbox directory
                        return b
                break
        return None

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
        for tid, ts, cookie, uid in self._be.drain_exited():
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
