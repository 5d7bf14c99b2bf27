"""The BPF backend: bcc loads bpf/tracer.bpf.c, jobs filtered in the kernel, records decoded per batch."""

from __future__ import annotations

import collections
import ctypes as ct
import errno
import logging
import mmap
import operator
import os
import select
from collections.abc import Iterable
from typing import Any

from jobcage import bpf as bpf_files

from ..errors import Unsupported
from . import abi, ringbuf
from .abi import (
    _EXITED,
    JOB_SUBTREE,
    KIND_NAMES,
    MARK_CHANGED,
    MARK_SEEN,
    MARK_USERNS,
    NOARG,
    SYS_NAMES,
    EventLayout,
)
from .btf import exec_offsets, task_runtime_offset
from .procfs import _read, tracefs
from .records import _Job, _Raw, _sid
from .ringbuf import RingReader

log = logging.getLogger("jobcage.tracer")

SET_SYSCALLS = ("setuid", "setreuid", "setresuid", "setgid", "setregid", "setresgid", "setgroups", "setsid")
FORK_SYSCALLS = ("clone", "clone3", "fork", "vfork")
NS_SYSCALLS = ("unshare", "setns")       # user namespaces: enter + exit
OPEN_SYSCALLS = ("openat", "open")       # uid_map/gid_map opens: enter only
SYSCALL_HOOKS = ("auto", "kprobe", "tracepoint")
KPROBE_PREFIX = "__x64_sys_"
COMPAT_PROBE = "__ia32_sys_setuid"   # present when the kernel runs 32-bit syscalls (CONFIG_IA32_EMULATION)
_KP_RETURN = {"setsid": "kr_setsid", "clone": "kr_clone", "clone3": "kr_clone", "fork": "kr_fork",
              "vfork": "kr_fork", "openat": None, "open": None}   # the others: kr_id
_UID16 = ("setuid", "setreuid", "setresuid", "setgid", "setregid", "setresgid", "setgroups")


def kprobe_points(sc: str) -> list[tuple[str, str | None, str | None]]:
    """JC_KPROBES: (kernel function, program on entry, program on return) in tracer.bpf.c for one syscall: its
    x86-64 function, then its 32-bit ones (int 0x80: __ia32_sys_*, and the *16 calls with 16-bit ids), which
    the syscall tracepoints never see."""
    ret = _KP_RETURN.get(sc, "kr_id")
    entry = None if sc in ("setsid", "fork", "vfork") else sc
    compat = "__ia32_compat_sys_" if sc in ("openat", "open") else "__ia32_sys_"
    out = [(f"{KPROBE_PREFIX}{sc}", entry and f"kp_{entry}", ret), (f"{compat}{sc}", entry and f"kp32_{entry}", ret)]
    if sc in _UID16:   # setgroups16's one argument is an int like setgroups'
        out.append((f"__ia32_sys_{sc}16", "kp32_setgroups" if sc == "setgroups" else f"kp16_{sc}", ret))
    return out


EXITED_BATCH = 4096         # entries per batch read of the kernel's exited map
RECORD_BYTES = 384          # a ring record (struct jc_event and its 8-byte header), rounded up


def wake_every(ringbuf_pages: int) -> int:
    """JC_WAKE_EVERY: the largest power of two at most a quarter of the records the ring holds, so the
    fill wakeup comes while three quarters are still free."""
    quarter = max(1, ringbuf_pages * mmap.PAGESIZE // RECORD_BYTES // 4)
    return 1 << (quarter.bit_length() - 1)


def kprobes_unusable(bpf: type) -> str | None:
    """Why the syscalls cannot be hooked by kprobes here (JC_KPROBES), or None: x86-64 (the register frame
    tracer.bpf.c reads), a kernel with kprobes (its perf PMU or tracefs' kprobe_events) and the __x64_sys_*
    syscall wrappers (4.17+)."""
    if os.uname().machine != "x86_64":
        return f"the syscall arguments are read for x86-64 only, this is {os.uname().machine}"
    if not (os.path.exists("/sys/bus/event_source/devices/kprobe/type") or os.path.exists(f"{tracefs()}/kprobe_events")):
        return "the kernel has no kprobes (CONFIG_KPROBES)"
    if bpf.ksymname(f"{KPROBE_PREFIX}setuid".encode()) < 0:
        return f"no {KPROBE_PREFIX}* syscall functions"
    return None


class _BpfBackend:
    name = "bpf"

    def __init__(self, pid_filter: bool, ringbuf_pages: int, perf_buffer: bool, map_opens: bool = False,
                 syscall_hooks: str = "auto") -> None:
        try:
            from bcc import BPF  # Debian python3-bpfcc, visible through system site packages
        except ImportError as e:
            raise Unsupported(f"bcc is not importable: {e}") from e
        if not tracefs():
            raise Unsupported("tracefs is not mounted (/sys/kernel/tracing)")
        for ev in ("sched_process_fork", "sched_process_exec", "sched_process_exit"):
            if not BPF.tracepoint_exists("sched", ev):
                raise Unsupported(f"tracepoint sched:{ev} is missing")
        abi.check()
        self.pid_filter = pid_filter
        # JC_ABI_EXPECTED: the compiler refuses a header of another ABI (tracer.bpf.c checks it)
        flags = [f"-I{bpf_files.DIR}", f"-DJC_RINGBUF_PAGES={ringbuf_pages}", f"-DJC_ABI_EXPECTED={abi.ABI}",
                 f"-DJC_WAKE_EVERY={wake_every(ringbuf_pages)}"]
        self.missing: list[str] = []
        want = list(SET_SYSCALLS + FORK_SYSCALLS + NS_SYSCALLS) + (list(OPEN_SYSCALLS) if map_opens else [])
        why_not = kprobes_unusable(BPF) if syscall_hooks != "tracepoint" else "tracepoints asked for"
        if why_not and syscall_hooks == "kprobe":
            raise Unsupported(f"syscall hooks by kprobe: {why_not}")
        self.syscall_hooks = "tracepoint" if why_not else "kprobe"
        # the syscalls' own flags: -DJC_TP_<SYSCALL> per tracepoint, or -DJC_KPROBES and kprobes attached after the load
        tp_flags: list[str] = []
        tp_missing: list[str] = []
        for sc in SET_SYSCALLS + FORK_SYSCALLS:
            # setsid and the fork family only need the exit side
            need = ("exit",) if sc in FORK_SYSCALLS or sc == "setsid" else ("enter", "exit")
            if all(BPF.tracepoint_exists("syscalls", f"sys_{w}_{sc}") for w in need):
                tp_flags.append(f"-DJC_TP_{sc.upper()}")
            else:
                tp_missing.append(sc)
        for sc in NS_SYSCALLS:
            if all(BPF.tracepoint_exists("syscalls", f"sys_{w}_{sc}") for w in ("enter", "exit")):
                tp_flags.append(f"-DJC_TP_{sc.upper()}")
            else:
                tp_missing.append(sc)
        if all(BPF.tracepoint_exists("syscalls", f"sys_enter_{sc}") for sc in ("clone", "clone3")):
            tp_flags.append("-DJC_TP_CLONE_ENTER")
        else:
            tp_missing.append("clone entry")
        # every open of the node would pay for it (see bench/userns_overhead.py): off unless asked for;
        # without it the map is read from /proc and its writer is the job's exec of newuidmap
        for sc in OPEN_SYSCALLS if map_opens else ():
            if BPF.tracepoint_exists("syscalls", f"sys_enter_{sc}"):
                tp_flags.append(f"-DJC_TP_{sc.upper()}")
            elif sc == "openat":
                tp_missing.append(sc)
        fmt = _read(f"{tracefs()}/events/sched/sched_process_exit/format") or ""
        if "group_dead" in fmt:
            flags.append("-DJC_HAVE_GROUP_DEAD")
        # exits carry their CPU time where the kernel's BTF says where it is (no taskstats needed)
        self.runtime_offset = task_runtime_offset()
        if self.runtime_offset is not None:
            flags.append(f"-DJC_OFF_RUNTIME={self.runtime_offset}")
        # exec events carry what the kernel decided (euid) and the running file's mode/owner: no stat
        exec_offs = exec_offsets()
        self.exec_creds = exec_offs is not None
        if exec_offs is not None:
            flags += [f"-D{k}={v}" for k, v in exec_offs.items()] + ["-DJC_EXEC_CREDS"]
        if pid_filter:
            flags.append("-DJC_PID_FILTER")
        flags.append("-DJC_SUBTREE")
        self._levels: collections.Counter[int] = collections.Counter()   # depth -> subtree jobs there
        self.perfbuf = perf_buffer
        if self.syscall_hooks == "kprobe":
            try:
                b = self._load(flags + ["-DJC_KPROBES"], perf_buffer)
                try:
                    self.missing = self._attach_kprobes(b, want)
                except Exception:  # bcc raises bare Exception
                    b.cleanup()
                    raise
                self.b = b
            except Exception as e:
                if syscall_hooks == "kprobe":
                    raise Unsupported(f"syscall hooks by kprobe: {e}") from e
                log.warning("kprobes on the syscalls failed (%s): syscall tracepoints instead", e)
                self.syscall_hooks = "tracepoint"
        if self.syscall_hooks == "tracepoint":
            self.b = self._load(flags + tp_flags, perf_buffer)
            self.missing = tp_missing
        self.jobs = self.b[b"jobs"]
        self.counters_map = self.b[b"counters"]
        self.lineage_map = self.b[b"lineage"]
        self.exited_map = self.b[b"exited"]
        self.marked_map = self.b[b"marked"]
        self.job_pids = self.b[b"job_pids"] if pid_filter else None
        self.filter = self.b[b"filter"]
        self.cpu_sums_map = self.b[b"cpu_sums"] if self.runtime_offset is not None else None
        self.cpu_sums = False   # filter.cpu_sums: see sum_exits()
        self._pid_jobs: set[int] = set()   # cookies of jobs with entries in job_pids
        self.events = self.b[b"events"]
        self._raw: list[bytes] = []
        self._ev: EventLayout | None = None
        self.perf_lost = 0
        self._xkeys: ct.Array | None = None   # drain_exited's buffers, allocated on first use
        self._xvals: ct.Array | None = None
        self._ring: RingReader | None = None
        if self.perfbuf:
            self.events.open_perf_buffer(self._on_data, page_cnt=64, lost_cb=self._on_lost)
        else:
            if ringbuf.usable():
                try:
                    self._ring = RingReader(self.events.map_fd, self.layout.struct)
                except OSError as e:   # a kernel that refuses the mapping: bcc's callback still reads the ring
                    log.info("ring buffer pages not readable (%s): records come through bcc's callback", e)
            if self._ring is None:
                self.events.open_ring_buffer(self._on_ring)

    def _load(self, flags: list[str], perf_buffer: bool) -> Any:
        from bcc import BPF

        src = str(bpf_files.SOURCE).encode()
        try:
            return BPF(src_file=src, cflags=flags + (["-DJC_PERFBUF"] if perf_buffer else []))
        except Exception as first:  # bcc raises bare Exception
            if perf_buffer:
                raise Unsupported(f"cannot load {bpf_files.SOURCE}: {first}") from first
            # kernels before 5.8 have no ring buffer: the same program with a perf buffer
            log.info("ring buffer program failed (%s), trying a perf buffer", first)
            try:
                b = BPF(src_file=src, cflags=flags + ["-DJC_PERFBUF"])
            except Exception as e:
                raise Unsupported(f"cannot load {bpf_files.SOURCE}: {e}") from e
            self.perfbuf = True
            return b

    @staticmethod
    def _attach_kprobes(b: Any, syscalls: list[str]) -> list[str]:
        """JC_KPROBES: tracer.bpf.c's kp_*/kr_* programs on the syscalls' functions (kprobe_points); returns what
        the kernel has no function for (a 32-bit one only matters where 32-bit syscalls run at all)."""
        missing = []
        compat = b.ksymname(COMPAT_PROBE.encode()) >= 0
        for sc in syscalls:
            for i, (fn, entry, ret) in enumerate(kprobe_points(sc)):
                if b.ksymname(fn.encode()) < 0:
                    if i == 0:
                        missing.append(sc)
                    elif compat:
                        missing.append(f"{sc} (32-bit {fn})")
                    continue
                if entry:
                    b.attach_kprobe(event=fn.encode(), fn_name=entry.encode())
                if ret:
                    # the kernel's own number of return instances (maxactive 0): a larger one would make bcc write
                    # a named event into tracefs' kprobe_events, which outlives an agent killed with SIGKILL
                    b.attach_kretprobe(event=fn.encode(), fn_name=ret.encode())
        return missing

    @property
    def wake_fd(self) -> int | None:
        """The ring buffer map's fd: readable (edge: EPOLLET) when the kernel forced a wakeup, i.e. the ring
        is filling faster than the agent's poll window drains it (JC_WAKE_EVERY).  None with a perf buffer."""
        return None if self.perfbuf else self.events.map_fd

    # bcc callbacks (perf buffers; ring buffers where RingReader cannot be used): copy the bytes out at once
    # (the buffer is reused after return); decoded in one pass per poll with a struct.Struct.
    def _on_ring(self, ctx: object, data: int, size: int) -> int:
        self._raw.append(ct.string_at(data, size))
        return 0

    def _on_data(self, cpu: int, data: int, size: int) -> None:
        self._raw.append(ct.string_at(data, size))

    def _on_lost(self, count: int) -> None:
        self.perf_lost += count   # kernel side already counted them per job

    @property
    def layout(self) -> EventLayout:
        """struct jc_event's layout: the field indexes of the tuples :meth:`poll` returns."""
        if self._ev is None:
            from bcc.table import _get_event_class

            self._ev = EventLayout(_get_event_class(self.events))
        return self._ev

    def raw(self, e: tuple) -> _Raw:
        """One unpacked record (from :meth:`poll`) as a :class:`_Raw`, for the general enrichment."""
        ev = self.layout
        k, mk, eu = e[ev.kind], e[ev.marked], e[ev.euid]
        return _Raw(KIND_NAMES.get(k) or f"unknown{k}", e[ev.ts_ns], e[ev.cookie], e[ev.pid], e[ev.tid], e[ev.ppid],
                    e[ev.uid], e[ev.gid], e[ev.old_uid], e[ev.old_gid], -1 if eu == NOARG else eu, -1, e[ev.ret],
                    SYS_NAMES.get(e[ev.sys], ""), (_sid(e[ev.arg0]), _sid(e[ev.arg1]), _sid(e[ev.arg2])),
                    e[ev.comm].partition(b"\0")[0].decode(errors="replace"),
                    e[ev.filename].partition(b"\0")[0].decode(errors="surrogateescape"),
                    bool(mk & MARK_CHANGED), e[ev.cgroup_id], bool(mk & MARK_USERNS),
                    eu != NOARG, e[ev.exe_mode], _sid(e[ev.exe_uid]), _sid(e[ev.exe_gid]))

    def _leaf(self, job: _Job) -> ct.Structure:
        return self.jobs.Leaf(job.slot, job.cookie, job.owner_uid, JOB_SUBTREE if job.level else 0)

    def _set_filter(self) -> None:
        """struct jc_filter: the subtree depths in use and whether any job is followed by pid."""
        mask = 0
        for lvl, n in self._levels.items():
            if n > 0:
                mask |= 1 << lvl
        self.filter[self.filter.Key(0)] = self.filter.Leaf(mask, len(self._pid_jobs), int(self.cpu_sums), 0)

    def sum_exits(self) -> None:
        """From now on the exits of tasks born in their job add to the kernel's per (job, uid) sums
        instead of an `exited` entry each (only with the exit CPU offset, which Tracer.sum_exits checks;
        see struct jc_cpu_key)."""
        self.cpu_sums = True
        self._set_filter()

    def exit_sums(self, job: _Job) -> dict[int, int]:
        """uid -> CPU ns of the job's exited tasks that were born in it (the kernel's running sums)."""
        assert self.cpu_sums_map is not None
        return {k.uid: v.value for k, v in self.cpu_sums_map.items() if k.cookie == job.cookie}

    def add_job(self, job: _Job) -> None:
        self.counters_map.clearitem(job.slot)
        for cg in job.cgroup_ids:
            self.add_cgroup(job, cg)
        if job.level:
            self._levels[job.level] += 1
            self._set_filter()

    def add_cgroup(self, job: _Job, cgroup_id: int) -> None:
        self.jobs[self.jobs.Key(cgroup_id)] = self._leaf(job)

    def add_pids(self, job: _Job, pids: Iterable[int]) -> None:
        if self.job_pids is None or job.cgroup_ids:
            return   # a job with a cgroup2 is that cgroup: a pid that leaves it leaves the job
        if job.cookie not in self._pid_jobs:
            self._pid_jobs.add(job.cookie)
            self._set_filter()
        for pid in pids:
            self.job_pids[self.job_pids.Key(pid)] = self._leaf(job)

    def remove_job(self, job: _Job) -> None:
        for cg in job.cgroup_ids:
            self.jobs.pop(self.jobs.Key(cg), None)
        if self.cpu_sums_map is not None:   # its cookie is never used again: the room is freed
            for k in [k for k in self.cpu_sums_map.keys() if k.cookie == job.cookie]:
                self.cpu_sums_map.pop(k, None)
        if job.level:
            self._levels[job.level] -= 1
            self._set_filter()
        if self.job_pids is not None and job.cookie in self._pid_jobs:
            for k in [k for k, v in self.job_pids.items() if v.cookie == job.cookie]:
                self.job_pids.pop(k, None)
            self._pid_jobs.discard(job.cookie)
            self._set_filter()

    def set_marked(self, pid: int, userns: bool = False) -> None:
        """Report pid's exit (CHANGED, SEEN); ``userns``: it runs in a user namespace (USERNS, inherited)."""
        key = self.marked_map.Key(pid)
        try:
            bits = self.marked_map[key].value
        except KeyError:
            bits = 0
        bits |= MARK_CHANGED | MARK_SEEN | (MARK_USERNS if userns else 0)
        self.marked_map[key] = self.marked_map.Leaf(bits)

    def poll(self, timeout_ms: int) -> list[tuple]:
        """The records buffered so far, each unpacked into a tuple (indexes: :attr:`layout`), in time order
        (perf buffers are per CPU; a ring buffer's order is that of the reservations).  Decoded further only
        where the front end needs it (:meth:`raw`): the common exec is read straight from the tuple."""
        lay = self.layout
        if self._ring is not None:
            out = self._ring.read()
            if not out and timeout_ms > 0 and select.select([self.events.map_fd], [], [], timeout_ms / 1000)[0]:
                out = self._ring.read()
        else:
            if self.perfbuf:
                self.b.perf_buffer_poll(timeout_ms)
            else:
                self.b.ring_buffer_poll(timeout_ms)
                self.b.ring_buffer_consume()   # records submitted without a wakeup (exec, exit)
            raws, self._raw = self._raw, []
            out = list(map(lay.unpack, raws))
        if out:
            out.sort(key=operator.itemgetter(lay.ts_ns))
        return out

    def counters(self, job: _Job) -> dict[str, int | None]:
        per_cpu = self.counters_map[job.slot]
        return {"forks": sum(c.forks for c in per_cpu),
                "fork_failed": sum(c.fork_failed for c in per_cpu),
                "events_lost": sum(c.events_lost for c in per_cpu)}

    def kernel_lineage(self, job: _Job) -> dict[int, tuple[int, int]]:
        return {k.value: (v.ppid, v.ts_ns) for k, v in self.lineage_map.items() if v.cookie == job.cookie}

    def drain_exited(self) -> list[tuple[int, int, int, int, int]]:
        """(tid, ts_ns, cookie, uid, cpu_ns) of every job task exit the kernel remembered, removed from the
        map in BPF_MAP_LOOKUP_AND_DELETE_BATCH calls of EXITED_BATCH entries: one syscall per poll
        instead of a map lookup per taskstats record (most records on a node are nobody's job).
        Own buffers: bcc's items_lookup_and_delete_batch allocates the whole map each call."""
        from bcc import lib

        if self._xkeys is None:
            self._xkeys = (ct.c_uint32 * EXITED_BATCH)()
            self._xvals = ct.create_string_buffer(_EXITED.size * EXITED_BATCH)
        fd = self.exited_map.map_fd
        out: list[tuple[int, int, int, int, int]] = []
        in_b, out_b, cnt = ct.c_uint32(0), ct.c_uint32(0), ct.c_uint32(0)
        first = True
        while True:
            cnt.value = EXITED_BATCH
            res = lib.bpf_lookup_and_delete_batch(fd, None if first else ct.byref(in_b), ct.byref(out_b),
                                                  self._xkeys, self._xvals, ct.byref(cnt))
            err = ct.get_errno()
            n = cnt.value
            keys = self._xkeys
            for i, (ts, cookie, uid, cpu) in enumerate(_EXITED.iter_unpack(memoryview(self._xvals)[:n * _EXITED.size])):
                out.append((keys[i], ts, cookie, uid, cpu))
            if res != 0:
                if err == errno.ENOENT:   # the whole map was walked
                    break
                raise OSError(err, f"BPF_MAP_LOOKUP_AND_DELETE_BATCH on exited: {os.strerror(err)}")
            in_b.value = out_b.value
            first = False
        return out

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self.perfbuf:   # free the per-CPU readers while the map is open (bcc's __del__ would fail later)
            for key in list(getattr(self.events, "_open_key_fds", {})):
                del self.events[key]
        self.b.cleanup()
