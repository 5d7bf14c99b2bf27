"""User namespaces: readers of /proc and nsfs (the agent runs in the initial user namespace, so the kernel
shows host ids), and the tracer's part that completes events of processes in a namespace."""

from __future__ import annotations

import os
import re
import time

from jobcage.agent.events import TraceEvent
from jobcage.cgroups import proc

from .procfs import _read, proc_comm, proc_ppid
from .records import _errname, _Job, _Raw

MAP_HELPERS = ("newuidmap", "newgidmap")
NS_KEEP = 4096              # user namespaces remembered (facts and maps)
MAP_WAIT_S = 2.0            # how long a map event waits for the map to appear
UNKNOWN_NS = -1             # record's userns: entered one, but it was gone before we could read it
CLONE_NEWUSER = 0x10000000

NS_GET_PARENT = 0xB702      # linux/nsfs.h _IO(0xb7, 0x2)
NS_GET_OWNER_UID = 0xB704   # _IO(0xb7, 0x4)
MAP_FILES = ("uid_map", "gid_map")
_MAP_PATH = re.compile(r"^/proc/(self|thread-self|\d+)(?:/task/\d+)?/([ug]id_map)$")
_MAP_REL = re.compile(r"^(?:(\d+)/)?([ug]id_map)$")

IdMap = list[list[int]]     # [[first id inside, first host id, count], ...]


userns_inode = proc.userns_inode


INIT_USERNS = userns_inode("self") or 0   # the agent's own: the initial user namespace


def userns_facts(pid: int) -> dict | None:
    """{inode, owner_uid, parent, level} of pid's user namespace, from nsfs ioctls (host ids: the
    agent is in the initial namespace), or None when pid is gone or in the initial namespace."""
    import fcntl

    fd = proc.userns_fd(pid)
    if fd is None:
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
    text = proc.idmap_text(pid, which)
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



class UsernsMixin:
    """Tracer methods for user namespaces (mixed into :class:`Tracer`)."""

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
        if ino is not None and self.backend == "proc":
            # the connector reports no namespace entry: look again at each event while it lives
            ino = userns_inode(pid) or ino
            rec["userns"] = ino
        if ino is None and raw is not None and raw.ns_entered is False:
            # BPF: neither it nor an ancestor entered a namespace since its job's processes were seeded
            # (in the initial one: seed_from_proc marks those in another): no /proc read per event
            ino = INIT_USERNS
        if ino is None:
            if pid in self._ns_changing:   # it unshares/setns-es later in this batch: not there yet
                ino = self._parent_ns(job, rec)
            else:
                ino = userns_inode(pid)   # None when gone (no namespace link without the process)
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
            self._be.set_marked(pid, userns=True)   # its exit completes the story, whatever its host uid;
            # and its children's events say they are in a namespace (JC_MARK_USERNS)
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
        if self.backend == "proc":
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
        base = proc.fd_path(raw.pid, dfd) if dfd >= 0 else proc.cwd(raw.pid)
        full = _MAP_PATH.match(os.path.join(base, path)) if base is not None else None
        if full:
            return raw.pid if full.group(1) in ("self", "thread-self") else int(full.group(1))
        argv = proc.cmdline(raw.pid, None) or []
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
