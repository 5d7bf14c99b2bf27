"""From a kernel record to an audit event: lineage, effective uid, the exec'd file, the helper (`via`)."""

from __future__ import annotations

import collections
import os
import stat
import time

from jobcage.agent.events import TraceEvent
from jobcage.cgroups import proc

from .procfs import proc_exe, proc_ppid, proc_status
from .records import _errname, _Job, _Raw
from .userns import INIT_USERNS, MAP_WAIT_S, UNKNOWN_NS, host_mapped, to_host

# Container runtimes marked at exec: a basename, or a path suffix when it holds a '/'.
DEFAULT_RUNTIMES = ("apptainer", "singularity", "apptainer/bin/starter", "apptainer/bin/starter-suid",
                    "singularity/bin/starter", "singularity/bin/starter-suid")
IMAGE_SUFFIXES = (".sif", ".simg", ".img", ".sqsh", ".squashfs", ".ext3")
IMAGE_SCHEMES = ("docker://", "docker-archive:", "library://", "oras://", "shub://", "instance://")
# what the exec program read from the running file's inode: stat's names, so the set-id logic reads either
_FileFacts = collections.namedtuple("_FileFacts", "st_mode st_uid st_gid")
LINEAGE_CAP = 50_000        # records kept per job before dead uninteresting ones are dropped
PLAIN_PATHS_KEEP = 4096     # decoded exec paths and comms remembered (by their raw bytes) for the common exec


def _remember(cache: dict, key: bytes, value: object) -> None:
    """Keep a decoded exec field by its raw bytes, at most PLAIN_PATHS_KEEP of them (then start afresh)."""
    if len(cache) >= PLAIN_PATHS_KEEP:
        cache.clear()
    cache[key] = value


class EnrichMixin:
    """Tracer methods that turn a :class:`_Raw` into a :class:`TraceEvent` (mixed into :class:`Tracer`)."""
    # (runtimes, basenames, path suffixes, suffix -> entry, raw filename -> path or None for a runtime's): built for
    # the runtimes configured now, so a new list drops the remembered paths with the rest (_runtime_state)
    _runtime_match: tuple | None = None
    _plain_comms: dict[bytes, str]   # raw comm -> comm (set by Tracer)

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
        live = proc.pid_set()   # one readdir, not a stat per record
        for pid in [p for p, r in job.procs.items()
                    if r["uid"] == job.owner_uid and not r["via"] and (r["exited"] or p not in live)]:
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

    def _plain_exec(self, f: tuple) -> TraceEvent | None:
        """The common exec, read from the record's fields (``PLAIN_EXEC_FIELDS``) without a :class:`_Raw`: the
        kernel said the file has no set-id bit, gave the euid, the path is absolute and no user namespace was
        entered.  Makes the event :meth:`_enrich` would make, or returns None for it to do the work (a record
        naming a user namespace, a container runtime, a job no longer traced)."""
        ts_ns, cookie, pid, tid, ppid, uid, gid, euid, old_pid, comm_b, fn_b, cgroup_id = f
        job = self._by_cookie.get(cookie)
        if job is None:
            return None
        rec = job.procs.get(pid)
        if rec is not None and rec["userns"] not in (None, INIT_USERNS):
            return None
        # the same few programs run over and over: their decoded path, or None for a container runtime's
        paths = self._runtime_state()[4]
        path = paths.get(fn_b, False)
        if path is False:
            path = fn_b.partition(b"\0")[0].decode(errors="surrogateescape")
            if self._runtime(path):
                path = None
            _remember(paths, fn_b, path)
        if path is None:
            return None
        ts = ts_ns / 1e9 + self._mono_to_epoch
        if rec is None:
            rec = self._rec(job, pid, ts)
        if ppid:
            if not rec["ppid"]:
                rec["ppid"] = ppid   # the original parent wins
        elif not rec["ppid"]:
            rec["ppid"] = proc_ppid(pid)
        comm = self._plain_comms.get(comm_b)
        if comm is None:
            comm = comm_b.partition(b"\0")[0].decode(errors="replace")
            _remember(self._plain_comms, comm_b, comm)
        comm = comm or rec["comm"]
        detail: dict = {"tid": tid} if tid and tid != pid else {}
        detail["gid"] = gid
        if old_pid and old_pid != pid:
            detail["tid"] = old_pid   # a non-leader thread exec'd
        rec["exe"] = path
        rec["uid"], rec["euid"], rec["gid"], rec["comm"], rec["last_seen"] = uid, euid, gid, comm, ts
        if not rec["via"] and uid != job.owner_uid:
            rec["via"] = self._inherited_via(job, pid)
        detail["orig_ppid"] = rec["ppid"]
        if rec["via"]:
            detail["via"] = rec["via"]
        return TraceEvent("exec", pid, rec["ppid"], uid, euid, comm, path, detail, job.job_id, ts, cgroup_id)

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

    def _exec(self, job: _Job, rec: dict, raw: _Raw, ev: TraceEvent, ns: dict | None = None) -> None:
        path = raw.filename
        if path and not path.startswith("/"):
            cwd = proc.cwd(raw.pid)
            if cwd is not None:
                path = os.path.normpath(os.path.join(cwd, path))
        ev.filename = path
        detail = ev.detail
        detail["gid"] = raw.gid
        if raw.ret and raw.ret != raw.pid:
            detail["tid"] = raw.ret            # a non-leader thread exec'd
        # exec keeps the effective uid unless the file is setuid
        euid = raw.euid if raw.euid >= 0 else (rec["euid"] if rec["euid"] >= 0 and rec["uid"] == raw.uid
                                               else raw.uid)
        if raw.exe_mode:
            # the kernel's facts of the file now running (BPF, JC_EXEC_CREDS): no stat of a path that may
            # name another file by now, and none at all for the common file without a set-id bit
            st = _FileFacts(raw.exe_mode, raw.exe_uid, raw.exe_gid) \
                if raw.exe_mode & (stat.S_ISUID | stat.S_ISGID) else None
        else:
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
            if raw.euid_exact:   # what the kernel gave, nosuid, no_new_privs and user namespaces decided
                euid = raw.euid
            if euid != raw.uid:
                self._be.set_marked(raw.pid)   # report its exit although its real uid is the owner's
                if euid != rec["euid"]:
                    rec["via"] = path
        ev.euid = raw.euid if raw.euid_exact else euid
        rec["exe"] = path
        runtime = self._runtime(path)
        if runtime:
            detail["container_runtime"] = runtime
            image = self._runtime_image(raw.pid)
            if image:
                detail["image"] = image

    def _runtime_state(self) -> tuple:
        """_runtime_match for the runtimes configured now."""
        rt = self._runtime_match
        if rt is None or rt[0] is not self.runtimes:
            names = {r: r for r in self.runtimes if "/" not in r}
            suffixes = tuple("/" + r.lstrip("/") for r in self.runtimes if "/" in r)
            rt = self._runtime_match = (self.runtimes, names, suffixes,
                                        {"/" + r.lstrip("/"): r for r in self.runtimes if "/" in r}, {})
        return rt

    def _runtime(self, path: str) -> str | None:
        """The configured container-runtime entry the exec'd file matches, if any (once per exec: a set
        lookup for the basenames, one endswith for the path suffixes)."""
        rt = self._runtime_state()
        hit = rt[1].get(path.rpartition("/")[2])
        if hit is None and rt[2] and path.endswith(rt[2]):
            hit = next(r for s, r in rt[3].items() if path.endswith(s))
        return hit

    @staticmethod
    def _runtime_image(pid: int) -> str | None:
        """The image an apptainer/singularity command line names (`exec|run|shell|test|instance
        start [options] IMAGE ...`), when its arguments are still readable."""
        argv = (proc.cmdline(pid, None) or [])[1:]
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
