"""The one place that drives a job's lifecycle.

prologue -> adopt* -> (suspend/resume)* -> kill? -> epilogue.  Used by the agent
(behind the control socket) and directly by the CLI as root when the agent is
down: containment never depends on the agent.  The kernel holds the state that
matters (the job's cgroup, with its owner in a trusted xattr); the store holds
history.  ``reconcile()`` makes the two agree.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import signal
import threading
import time
from collections.abc import Callable
from typing import Protocol

from jobcage.cgroups import get_driver, proc
from jobcage.cgroups.driver import Driver
from jobcage.cgroups.path import CgroupAt, Named

from .config import Config
from .errors import (
    AccessDenied,
    CgroupError,
    InvalidArgument,
    JobExists,
    NoSuchCgroup,
    NoSuchJob,
    NoSuchProcess,
    Unsupported,
)
from .fmt import iso, user_name
from .store import Store

JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@+\-]{0,127}")


def validate_job_id(job_id: object) -> str:
    """Batch ids (Slurm 123, 123_4; PBS 33.server.example) become directory names:
    allow only what cannot escape or confuse cgroupfs."""
    if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id) or ".." in job_id \
            or job_id.startswith("cgroup."):
        shown = repr(job_id)[:60]
        raise InvalidArgument(f"invalid job id {shown}: use 1-128 of [A-Za-z0-9_.:@+-], no '..'")
    return job_id


def split_cpu(by_uid: dict[int, float], total: float, owner_uid: int) -> dict[int, float]:
    """Per-identity CPU as a split of the job's CPU (the cgroup's own counter, the truth).
    The per-task figures miss a little (teardown after a task's exit record, lost records) and
    can hold a little the cgroup never saw; scaling them to the cgroup's total keeps the
    proportions and makes the identities add up to the job."""
    measured = sum(by_uid.values())
    if total <= 0:
        return {u: 0.0 for u in by_uid}
    if measured <= 0:
        return {**{u: 0.0 for u in by_uid}, owner_uid: total}
    return {u: v * total / measured for u, v in by_uid.items()}


def proc_uids(pid: int) -> tuple[int, int]:
    """(real, effective) uid of a live process."""
    ids = proc.uids(pid)
    if ids is None:
        raise NoSuchProcess(f"no such process: {pid}", pid=pid)
    return ids


def epilogue_detail(summary: dict) -> dict:
    """What an epilogue record carries: enough to answer whois from collected logs alone (owner, start,
    end, every identity with its helper and CPU, declarations), not the cleanup's file lists."""
    cleanup = summary.get("cleanup") or {}
    files = cleanup.get("files") or {}
    return {"owner_uid": summary.get("owner_uid"), "created": summary.get("created"), "ended": summary.get("ended"),
            "cpu_seconds": summary.get("cpu_seconds"), "pids_limit_hits": summary.get("pids_limit_hits"),
            "events_lost": summary.get("events_lost"),
            "identities": [{k: i.get(k) for k in ("uid", "first_seen", "last_seen", "via", "cpu_seconds")}
                           for i in summary.get("identities", [])],
            "declared": summary.get("declared", []),
            "cleanup": {"uids_cleaned": cleanup.get("uids_cleaned", []), "uids_kept": cleanup.get("uids_kept", []),
                        "removed_files": files.get("removed_files", 0)}}


def _members_of(cg: CgroupAt | Named) -> Callable[[], list[int]]:
    """The pids of a held cgroup, read when called ([] once it is gone)."""
    def members() -> list[int]:
        try:
            return cg.pids()
        except CgroupError:
            return []
    return members


class Observer(Protocol):
    """What the agent plugs in to hear about jobs (tracer, accounting)."""

    # level: match the cgroup's descendants too; members: the cgroup's pids, read again when asked
    def job_started(self, job: dict, cgroup_id: int | None, pids: list[int], level: int | None = None,
                    members: Callable[[], list[int]] | None = None) -> None: ...
    def job_adopted(self, job_id: str, pid: int) -> None: ...
    # flushed: the caller (a writer) has just had the tracer's events written (flush_events)
    def job_cpu_by_uid(self, job_id: str, pids: list[int], flushed: bool = False) -> dict[int, float] | None: ...
    def job_lineage(self, job_id: str) -> dict[int, dict] | None: ...   # the tracer's, read only
    def job_ended(self, job_id: str) -> None: ...


class JobManager:
    def __init__(self, config: Config, driver: Driver | None = None, store: Store | None = None,
                 observer: Observer | None = None) -> None:
        self.config = config
        if driver is None:
            from jobcage.cgroups.detect import detect

            layout = detect()   # once: the placement and the driver both read the mounts
            driver = get_driver(config.cgroup_mode, config.placement(layout)[1], layout)
        self.driver = driver
        self._store = store
        self.observer = observer
        # held while a writer freezes, thaws or kills a job and records it: the reconcile's look at the
        # kernel's freeze state (_note_kernel_state) never takes a writer's change for someone else's
        self._changing = threading.RLock()

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.config.db_path)
        return self._store

    # -- lookups --------------------------------------------------------------------
    def _job(self, job_id: str) -> dict:
        validate_job_id(job_id)
        job = self.store.job(job_id)
        if job is None or (job["state"] != "ended" and not self.held(job).exists()):
            # Kernel state first: a cgroup made while the store was unavailable, or a
            # job whose cgroup vanished while nobody watched.
            self.reconcile(only=job_id)
            job = self.store.job(job_id)
        if job is None:
            raise NoSuchJob(f"unknown job {job_id}", job_id=job_id)
        return job

    def _lookup(self, job_id: str) -> dict:
        """The job for a read: the store's record, else what the kernel holds (the cgroup's xattr),
        unsaved.  Never reconciles: a read changes nothing, and the view says what the kernel says
        (a cgroup that vanished shows as ended until a writer -- the agent's reconcile, the epilogue --
        records it)."""
        validate_job_id(job_id)
        job = self.store.job(job_id) or self._unrecorded(job_id)
        if job is None:
            raise NoSuchJob(f"unknown job {job_id}", job_id=job_id)
        return job

    def _meta(self, name: str) -> dict | None:
        """The trusted xattr of a cgroup in jobcage's subtree (owner, creation, limit; attach: target)."""
        raw = self.driver.get_meta(name) if self.driver.exists(name) else None
        try:
            meta = json.loads(raw) if raw is not None else None
        except ValueError:
            return None
        return meta if isinstance(meta, dict) else None

    def _unrecorded(self, name: str) -> dict | None:
        """A job the kernel holds but the store lacks (made while the store was unavailable), as an
        unsaved job record: what reconcile() would register."""
        meta = self._meta(name)
        if meta is None:
            return None
        try:
            job = {"jid": None, "job_id": name, "owner_uid": int(meta["owner_uid"]),
                   "owner_gid": meta.get("owner_gid"), "pids_max": meta.get("pids_max"), "state": "running",
                   "created": float(meta.get("created") or time.time()), "ended": None, "cpu_seconds": None,
                   "pids_limit_hits": None, "events_lost": 0, "tmpdir": None, "summary": None}
            if meta.get("mode") == "attach":
                target = CgroupAt(self.driver.layout, str(meta["cgroup"]), int(meta["cgroup_ino"]))
                return dict(job, mode="attach", cgroup=target.path, cgroup_ino=target.ino)
        except (InvalidArgument, KeyError, TypeError, ValueError):
            return None
        return dict(job, mode="own", cgroup=self.driver.path(name), cgroup_ino=None)

    def _active(self, job_id: str) -> dict:
        job = self._job(job_id)
        if job["state"] == "ended":
            raise NoSuchJob(f"job {job_id} has ended", job_id=job_id)
        return job

    def held(self, job: dict) -> CgroupAt | Named:
        """The cgroup that holds the job: jobcage's own (mode own), or the batch system's
        (mode attach), with one interface."""
        if job.get("mode") == "attach":
            return CgroupAt(self.driver.layout, job["cgroup"], int(job["cgroup_ino"] or 0),
                            spare=self._batch_daemon if self.config.attach_batch_daemons else None)
        return Named(self.driver, job["job_id"])

    def _batch_daemon(self, pid: int) -> bool:
        """A root process named in [attach] batch_daemons: the batch system's own, passed by.  Root only:
        any user can name a process slurmstepd."""
        return proc.comm(pid) in self.config.attach_batch_daemons and proc.uids(pid) == (0, 0)

    def trace_target(self, job: dict) -> tuple[int | None, list[int], int | None, Callable[[], list[int]] | None]:
        """(cgroup2 id, current pids, level, members) for the tracer: an attached cgroup is matched with
        every cgroup below it (level = its depth), jobcage's own leaf by its id; members reads the
        cgroup's pids again (the driver knows its path: the tracer need not search for it)."""
        cg = self.held(job)
        if not cg.exists():
            return None, [], None, None
        return cg.cgroup_id(), cg.pids(), cg.level, _members_of(cg)

    def attached_holder(self, pid: int) -> dict | None:
        """The running attached job whose cgroup holds pid, if any."""
        for job in self.store.jobs("active"):
            if job.get("mode") == "attach":
                cg = self.held(job)
                try:
                    if cg.exists() and cg.contains(pid):
                        return job
                except NoSuchProcess:
                    return None
        return None

    def may_read(self, job: dict, caller_uid: int) -> bool:
        if caller_uid == 0 or caller_uid == job["owner_uid"]:
            return True
        return any(i["uid"] == caller_uid for i in self.store.identities(job["jid"]))

    def check_read(self, job_id: str, caller_uid: int) -> dict:
        job = self._lookup(job_id)
        if not self.may_read(job, caller_uid):
            raise AccessDenied(f"job {job_id} is not yours", job_id=job_id)
        return job

    def _record(self, jid: int | None, job_id: str | None, kind: str, ts: float | None = None,
                **fields: object) -> None:
        """A lifecycle record in the job's trail: written with the change it describes, so it is in the
        store (and, from there, exported) whatever happens next."""
        from .events import TraceEvent

        self.store.add_events(jid, [TraceEvent(kind, job_id=job_id, ts=ts or time.time(), **fields)])  # type: ignore[arg-type]

    # -- lifecycle --------------------------------------------------------------------
    def prologue(self, job_id: str, uid: int, gid: int | None = None, pids_max: int | None = None,
                 pid: int | None = None, pids_request: int | None = None, cgroup: str | None = None,
                 from_pid: int | None = None) -> dict:
        validate_job_id(job_id)
        if not isinstance(uid, int) or uid < 0:
            raise InvalidArgument(f"invalid uid: {uid!r}")
        attach = cgroup is not None or from_pid is not None
        if pids_max is None and pids_request is not None:
            # what the job itself asked for (e.g. Slurm --comment): the user's word, so capped by the site
            if not isinstance(pids_request, int) or pids_request < 1:
                raise InvalidArgument(f"invalid pids request: {pids_request!r}")
            # attach mode: a limit in the batch system's cgroup only where the site opted in; else the
            # request is moot (the batch system's own limits hold), not an error that fails the job
            if not attach or self.config.attach_pids_limit:
                pids_max = min(pids_request, self.config.max_pids_max or self.config.default_pids_max)
        if attach:
            return self._attach(job_id, uid, gid, pids_max, pid, cgroup, from_pid)
        if pids_max is None:
            pids_max = self.config.default_pids_max
        if not isinstance(pids_max, int) or pids_max < 1:
            raise InvalidArgument(f"invalid pids limit: {pids_max!r}")
        if pid is not None:
            proc_uids(pid)  # must exist before anything is created
        self.reconcile(only=job_id)  # a record whose cgroup vanished ends here
        old = self.store.job(job_id)
        if old is not None and old["state"] != "ended" and self.driver.exists(job_id):
            if old["owner_uid"] != uid:
                raise JobExists(f"job {job_id} already exists for uid {old['owner_uid']}", job_id=job_id)
            # A retried prologue (batch systems do retry) is a no-op.
        else:
            if self.driver.exists(job_id) and self.driver.pids(job_id):
                raise JobExists(f"job {job_id} has a cgroup with processes but no record; "
                                "run 'jobcage epilogue' first", job_id=job_id)
            if pid is not None and (holder := self.attached_holder(pid)) is not None:
                raise AccessDenied(f"process {pid} belongs to job {holder['job_id']} (attached to "
                                   f"{holder['cgroup']})", job_id=job_id, pid=pid)
            created = time.time()
            path = self.driver.create(job_id)
            try:
                if self.driver.has_pids:
                    self.driver.set_pids_max(job_id, pids_max)
                self.driver.set_meta(job_id, json.dumps(
                    {"owner_uid": uid, "owner_gid": gid, "created": created, "pids_max": pids_max}).encode())
                tmpdir = self._make_tmpdir(job_id, uid, gid)
            except Exception:
                self.driver.remove(job_id)
                raise
            with self.store.transaction():   # the record is part of the change (it survives a crash with it)
                jid = self.store.add_job(job_id, uid, gid, path, pids_max if self.driver.has_pids else None,
                                         created, tmpdir)
                self._record(jid, job_id, "prologue", ts=created, uid=uid, euid=uid, pid=pid or 0,
                             detail={"mode": "own", "cgroup": path, "gid": gid, "pids_max": pids_max})
            if self.observer:
                self.observer.job_started(self.store.job(job_id) or {"jid": jid, "job_id": job_id,
                                          "owner_uid": uid}, self.driver.cgroup_id(job_id), [],
                                          members=_members_of(Named(self.driver, job_id)))
        if pid is not None:
            self.adopt(job_id, pid, 0)
        return self._prologue_view(job_id)

    def _attach(self, job_id: str, uid: int, gid: int | None, pids_max: int | None, pid: int | None,
                cgroup: str | None, from_pid: int | None) -> dict:
        """Attach mode: the batch system made the job's cgroup; jobcage moves nothing and writes
        no limit there unless [attach] pids_limit says so.  Its own subtree gets an empty anchor
        cgroup named after the job, carrying the trusted xattr (owner, the target's path and
        inode): the batch system's cgroup is not ours to write even an xattr on, and the anchor
        lets reconcile() find the job again with the database lost."""
        if cgroup is not None and from_pid is not None:
            raise InvalidArgument("--cgroup and --from-pid exclude each other")
        layout = self.driver.layout
        if from_pid is not None:
            if not isinstance(from_pid, int) or from_pid <= 0:
                raise InvalidArgument(f"invalid pid: {from_pid!r}")
            from jobcage.cgroups.path import find_ancestor

            cgroup = find_ancestor(layout, from_pid, self.config.attach_job_patterns)
        target = CgroupAt.open(layout, cgroup)
        own_root = self.driver.membership_root()
        if target.path == own_root or target.path.startswith(own_root + "/") \
                or own_root.startswith(target.path + "/"):
            raise InvalidArgument(f"{target.path} is jobcage's own subtree (or holds it): use own mode",
                                  job_id=job_id)
        if pids_max is not None and not self.config.attach_pids_limit:
            raise InvalidArgument("attach mode writes no limit in the batch system's cgroup: --pids-max "
                                  "needs [attach] pids_limit = true", job_id=job_id)
        limit = None
        if self.config.attach_pids_limit:
            limit = self.config.default_pids_max if pids_max is None else pids_max
            if not isinstance(limit, int) or limit < 1:
                raise InvalidArgument(f"invalid pids limit: {limit!r}")
            if not target.can_enable_pids():
                raise Unsupported(f"[attach] pids_limit is set but {target.path} has no pids controller "
                                  "and its parent cannot give it one", job_id=job_id)
        if pid is not None and not target.contains(pid):
            raise AccessDenied(f"process {pid} is not inside {target.path}: attach mode moves nothing",
                               job_id=job_id, pid=pid)
        self.reconcile(only=job_id)
        old = self.store.job(job_id)
        if old is not None and old["state"] != "ended":
            if old.get("mode") == "attach" and old["cgroup_ino"] == target.ino and old["owner_uid"] == uid:
                return self._prologue_view(job_id)   # a retried prologue
            raise JobExists(f"job {job_id} already exists ({old.get('mode') or 'own'} mode, uid "
                            f"{old['owner_uid']}, {old['cgroup']})", job_id=job_id)
        for other in self.store.jobs("active"):
            if other.get("mode") == "attach" and other["job_id"] != job_id:
                o = self.held(other)
                if o.exists() and o.overlaps(target):
                    how = "already attached to" if o.ino == target.ino else "overlaps the cgroup of"
                    raise JobExists(f"cgroup {target.path} is {how} job {other['job_id']} ({o.path})",
                                    job_id=job_id)
        if self.driver.exists(job_id):
            raise JobExists(f"job {job_id} has a cgroup in jobcage's subtree but no record; "
                            "run 'jobcage epilogue' first", job_id=job_id)
        created = time.time()
        self.driver.create(job_id)   # the anchor
        orig_max = None
        try:
            if limit is not None:
                target.enable_pids()   # where the batch system did not (Slurm 22.05): the site opted in
                orig_max = target.pids_max_raw()
            self.driver.set_meta(job_id, json.dumps(
                {"owner_uid": uid, "owner_gid": gid, "created": created, "pids_max": limit, "mode": "attach",
                 "cgroup": target.path, "cgroup_ino": target.ino, "pids_max_orig": orig_max}).encode())
            if limit is not None:
                target.set_pids_max(limit)
            if not target.exists():   # removed by the batch system while we looked at it
                raise NoSuchCgroup(f"cgroup {target.path} vanished while attaching", path=target.path)
            tmpdir = self._make_tmpdir(job_id, uid, gid)
        except Exception:
            if orig_max is not None and target.exists():
                target.set_pids_max(orig_max)
            self.driver.remove(job_id)
            raise
        with self.store.transaction():   # the record is part of the change (it survives a crash with it)
            jid = self.store.add_job(job_id, uid, gid, target.path, limit, created, tmpdir, mode="attach",
                                     cgroup_ino=target.ino)
            self._record(jid, job_id, "prologue", ts=created, uid=uid, euid=uid, pid=pid or 0,
                         detail={"mode": "attach", "cgroup": target.path, "gid": gid, "pids_max": limit})
        if self.observer:
            self.observer.job_started(self.store.job(job_id) or {}, target.cgroup_id(), target.pids(),
                                      target.level, members=_members_of(target))
        return self._prologue_view(job_id)

    def _make_tmpdir(self, job_id: str, uid: int, gid: int | None) -> str | None:
        if not self.config.tmpdir_base:
            return None
        from .tmpdir import create_job_tmpdir

        return create_job_tmpdir(self.config.tmpdir_base, job_id, uid,
                                 gid if gid is not None else pwd.getpwuid(uid).pw_gid)

    def adopt(self, job_id: str, pid: int, caller_uid: int, record: bool = True) -> dict:
        """Move pid into the job (see _adopt); the answer names the job's cgroup and TMPDIR."""
        job = self._adopt(job_id, pid, caller_uid, record)
        return {"job_id": job_id, "pid": pid, "tmpdir": job.get("tmpdir"), "cgroup": job.get("cgroup")}

    def _adopt(self, job_id: str, pid: int, caller_uid: int, record: bool = True) -> dict:
        """Move pid into the job.  Root may adopt anything; the job's owner only
        its own processes; nobody adopts into someone else's job.  record=False: the
        caller writes the adopt record itself (sshd_adopt, with the session's details)."""
        if not isinstance(pid, int) or pid <= 0:
            raise InvalidArgument(f"invalid pid: {pid!r}")
        job = self._active(job_id)
        ruid, euid = proc_uids(pid)
        if caller_uid != 0:
            if caller_uid != job["owner_uid"]:
                raise AccessDenied(f"job {job_id} is not yours", job_id=job_id, pid=pid)
            if ruid != caller_uid or euid != caller_uid:
                raise AccessDenied(f"process {pid} is not yours", job_id=job_id, pid=pid)
        if job.get("mode") == "attach":
            if self.held(job).contains(pid):
                if self.observer:
                    self.observer.job_adopted(job_id, pid)
                return job
            raise AccessDenied(f"job {job_id} is attached to {job['cgroup']}: jobcage moves nothing, and "
                               f"process {pid} is not inside it", job_id=job_id, pid=pid)
        holder = self.attached_holder(pid)
        if holder is not None:
            raise AccessDenied(f"process {pid} belongs to job {holder['job_id']} (attached to {holder['cgroup']})",
                               job_id=job_id, pid=pid)
        current = self.driver.cgroup_of(pid)
        if current == job_id:
            return job
        if current is not None:
            raise AccessDenied(f"process {pid} already belongs to job {current}", job_id=job_id, pid=pid)
        self.driver.attach(job_id, pid)
        if record:
            self._record(job["jid"], job_id, "adopt", pid=pid, uid=ruid, euid=euid, detail={"by_uid": caller_uid})
        if self.observer:
            self.observer.job_adopted(job_id, pid)
        return job

    # The two kernel questions sshd adoption asks, in one place per mode (own mode: jobcage's subtree).
    def holder_of(self, pid: int) -> str | None:
        """The job whose cgroup holds pid, if any (jobcage's own, or an attached batch system's)."""
        own = self.driver.cgroup_of(pid)
        if own is not None:
            return own
        holder = self.attached_holder(pid)
        return holder["job_id"] if holder is not None else None

    def is_suspended(self, job: dict) -> bool:
        cg = self.held(job)
        return bool(cg.has_freeze and cg.exists() and cg.frozen())

    def sshd_adopt(self, uid: int, pid: int, info: dict | None = None, hint: str | None = None,
                   dry_run: bool = False) -> dict:
        """An incoming sshd session of ``uid`` (pid: its root ``[priv]`` monitor, whose later children are
        the session) into uid's running job on this node: the hinted job when it is one of them, else the
        site's pick (``[pam] pick``).  A suspended job is no candidate (its freezer would hang the login).
        Records an ``adopt`` event (``via: sshd`` plus the remote address in ``info``) in the job's trail.
        ``dry_run`` (the ``log-only`` mode) only says what would be chosen."""
        if uid == 0:
            raise InvalidArgument("root's sessions are never adopted")
        self.reconcile()  # the kernel's jobs, also ones the store missed while it was unavailable
        jobs = [j for j in self.store.jobs("active") if j["owner_uid"] == uid]
        # An attached job (the batch system owns the cgroup) takes sessions only where the site said how:
        # "batch" -- the batch system's own module (pam_slurm_adopt) moves them in before us; "leaf" --
        # jobcage moves them into a leaf cgroup of its own inside the job's cgroup.
        leaf = self.config.pam_attached == "leaf"
        mine = [j for j in jobs if j.get("mode") != "attach" or leaf]
        current = self.holder_of(pid)
        out: dict = {"uid": uid, "pid": pid, "candidates": [j["job_id"] for j in mine], "job_id": None,
                     "adopted": False, "attached": [j["job_id"] for j in jobs if j not in mine]}
        if current is not None:
            job = next((j for j in jobs if j["job_id"] == current), None)
            if job is None:
                raise AccessDenied(f"process {pid} already belongs to job {current}", pid=pid)
            if job.get("mode") == "attach" and not dry_run and not self._sshd_adopted(job, pid):
                # put there by the batch system's module: the trail still says who came in, from where
                self._record_adopt(job, pid, uid, dict(info or {}, via="sshd", by="batch system",
                                                       candidates=out["candidates"]))
            return dict(out, job_id=current, adopted=True, already=True)  # e.g. account, then session phase
        running = [j for j in mine if not self.is_suspended(j)]
        out["suspended"] = sorted(set(out["candidates"]) - {j["job_id"] for j in running})
        if not running:
            return out
        pick = next((j for j in running if hint and j["job_id"] == hint), None)
        how = "hint" if pick is not None else self.config.pam_pick
        if pick is None:
            order = sorted(running, key=lambda j: (j["created"], j["jid"]))
            pick = order[-1] if self.config.pam_pick == "newest" else order[0]
        out.update(job_id=pick["job_id"], pick=how)
        if dry_run:
            return out
        detail = dict(info or {}, via="sshd", pick=how, candidates=out["candidates"])
        if pick.get("mode") == "attach":
            detail["leaf"] = self._into_leaf(pick, pid)
        else:
            self.adopt(pick["job_id"], pid, 0, record=False)
        self._record_adopt(pick, pid, uid, detail)
        out["adopted"] = True
        return out

    def _sshd_adopted(self, job: dict, pid: int) -> bool:
        return any(e["pid"] == pid and e["detail"].get("via") == "sshd"
                   for e in self.store.events_of_kind(job["jid"], "adopt"))

    def _into_leaf(self, job: dict, pid: int) -> str:
        """Move pid into jobcage's leaf cgroup inside an attached job's cgroup ([pam] attached = "leaf"),
        made on first use: the batch system's limits, freezer and kill still hold it; the epilogue removes
        the leaf.  Returns the leaf's path."""
        cg = self.held(job)   # the caller (sshd_adopt) found pid in no job
        assert isinstance(cg, CgroupAt)
        target = cg.make_leaf(self.config.pam_leaf)
        target.move(pid)
        if self.observer:
            self.observer.job_adopted(job["job_id"], pid)
        return target.path

    def sshd_rehome(self, job_id: str, pid: int, caller_uid: int, source: str | None = None) -> dict:
        """The batch system's hint, applied after login (`jobcage ssh-hint`, run inside the session as its
        user): sshd delivers the client's SendEnv variables only after PAM is done, so the session was
        adopted into the site's pick; this moves it into the hinted job.  Only a session jobcage adopted
        from sshd (an ancestor of ``pid`` with an ``adopt`` event via sshd for this uid in the job it is in)
        moves, only between two running jobs of the caller: the monitor and everything below it that is
        still in the old job."""
        target = self._active(job_id)
        if caller_uid != 0 and target["owner_uid"] != caller_uid:
            raise AccessDenied(f"job {job_id} is not yours", job_id=job_id)
        current = self.holder_of(pid)
        out: dict = {"job_id": current, "moved": 0}
        if current is None:
            return dict(out, reason="not adopted")  # exempt or unadopted login: nothing to move
        if current == job_id:
            return dict(out, reason="already there")
        src = self._active(current)
        owner = target["owner_uid"]
        if src["owner_uid"] != owner:
            raise AccessDenied(f"process {pid} belongs to job {current} of another user", pid=pid)
        adopted = {e["pid"]: e for e in self.store.events_of_kind(src["jid"], "adopt")
                   if e["detail"].get("via") == "sshd" and e["uid"] == owner}
        monitor, p = None, pid
        while p > 1 and monitor is None:
            st = proc.stat(p)
            if st is None:
                break
            ev = adopted.get(p)
            if ev is not None and proc.start_time(st) <= ev["ts"] + 1:  # started before its adoption: not a reused pid
                monitor = p
            p = st.ppid
        if monitor is None:
            raise AccessDenied(f"process {pid} is not in an sshd session adopted into job {current}", pid=pid)
        if src.get("mode") == "attach" and "leaf" not in adopted[monitor]["detail"]:
            raise AccessDenied(f"the batch system put this session into job {current}: jobcage moves it nowhere",
                               pid=pid)
        if self.is_suspended(target):
            raise AccessDenied(f"job {job_id} is suspended", job_id=job_id)
        move, extra = (lambda q: self.driver.attach(job_id, q)), {}  # noqa: E731
        if target.get("mode") == "attach":
            if self.config.pam_attached != "leaf":
                raise AccessDenied(f"job {job_id} is attached: its sessions come through the batch system "
                                   f"([pam] attached = \"batch\")", job_id=job_id)
            cg = self.held(target)
            assert isinstance(cg, CgroupAt)
            leaf = cg.make_leaf(self.config.pam_leaf)
            move, extra = leaf.move, {"leaf": leaf.path}
        moved: list[int] = []
        for _ in range(20):  # until no process of the session is left in the old job (forks meanwhile)
            left = [q for q in proc.subtree(monitor) if self.holder_of(q) == current]
            if not left:
                break
            for q in left:
                try:
                    move(q)
                except NoSuchProcess:
                    continue
                moved.append(q)
                if self.observer:
                    self.observer.job_adopted(job_id, q)
        info = {k: v for k, v in adopted[monitor]["detail"].items() if k in ("user", "rhost", "rport", "service")}
        self._record_adopt(target, monitor, owner, dict(info, via="sshd", phase="hint", hint=source or "",
                                                        from_job=current, moved=len(moved), **extra))
        return {"job_id": job_id, "from_job": current, "moved": len(moved)}

    def _record_adopt(self, job: dict, pid: int, uid: int, detail: dict) -> None:
        from .events import TraceEvent

        # gone already: the event still says who came in from where
        st, ids = proc.stat(pid), proc.uids(pid)
        ppid, comm = (st.ppid, st.comm) if st is not None else (0, "")
        exe, euid = proc.exe(pid), ids[1] if ids else -1
        ev = TraceEvent("adopt", pid=pid, ppid=ppid, uid=uid, euid=euid, comm=comm,
                        filename=exe, job_id=job["job_id"], detail=detail)
        self.store.add_events(job["jid"], [ev])
        self.store.touch_identity(job["jid"], uid, ev.ts, "sshd")

    def suspend(self, job_id: str) -> dict:
        return self._freeze(job_id, True)

    def resume(self, job_id: str) -> dict:
        return self._freeze(job_id, False)

    def _freeze(self, job_id: str, frozen: bool) -> dict:
        job = self._active(job_id)
        cg = self.held(job)
        verb, state = ("suspend", "suspended") if frozen else ("resume", "running")
        if not cg.has_freeze:
            raise Unsupported(f"no freezer for {cg.path}: cannot {verb}", job_id=job_id)
        with self._changing:
            cg.freeze(self.config.freeze_timeout) if frozen else cg.thaw(self.config.freeze_timeout)
            with self.store.transaction():
                if job["state"] != state:
                    self.store.set_state(job["jid"], state)
                self._record(job["jid"], job_id, verb)
        return self.show(job_id)

    def kill(self, job_id: str, sig: int = signal.SIGKILL) -> dict:
        """SIGKILL: return when the job is empty.  Other signals: delivered to every
        process at one frozen instant, then return (the job may handle them)."""
        with self._changing:
            return self._kill(job_id, sig)

    def _kill(self, job_id: str, sig: int) -> dict:
        job = self._active(job_id)
        cg = self.held(job)
        if sig == signal.SIGKILL:
            cg.kill(self.config.kill_timeout)
            if job["state"] == "suspended" and cg.exists():
                cg.thaw(self.config.freeze_timeout)
        else:
            cg.signal(sig)
        left = len(cg.pids()) if cg.exists() else 0
        with self.store.transaction():
            self.store.set_state(job["jid"], job["state"], f"signal {signal.Signals(sig).name}")
            self._record(job["jid"], job_id, "kill", detail={"signal": signal.Signals(sig).name, "processes": left})
        return {"job_id": job_id, "signal": signal.Signals(sig).name, "processes": left}

    def epilogue(self, job_id: str, keep: list[str] | None = None) -> dict:
        """Kill what is left, final accounting, cleanup, remove the cgroup, summary.
        Idempotent: a second epilogue returns the first one's summary."""
        with self._changing:
            return self._epilogue(job_id, keep)

    def _epilogue(self, job_id: str, keep: list[str] | None) -> dict:
        job = self._job(job_id)
        if job["state"] == "ended":
            summary = json.loads(job["summary"]) if job["summary"] else self.show(job_id)
            if summary.get("mode") == "attach" and summary.get("cleanup", {}) is None:
                # the batch system removed the cgroup first and reconcile ended the job: the
                # epilogue still owes the file cleanup
                summary["cleanup"] = self._cleanup(job, keep or [])
                self.store.set_summary(job["jid"], summary)
            return summary
        cg = self.held(job)
        present = cg.exists()
        if present:
            cg.kill(self.config.kill_timeout)
            if cg.exists() and cg.has_freeze and cg.frozen():
                cg.thaw(self.config.freeze_timeout)
        flush = getattr(self.observer, "flush_events", None)
        if flush is not None:
            flush()  # the last poll window's trace events (identities) before accounting, summary, cleanup
        summary = self._view(job, write=True)  # final accounting: the cgroup (and per-identity cpu) is still there
        summary["state"] = "ended"
        summary["cleanup"] = self._cleanup(job, keep or [])
        if job.get("mode") == "attach":
            self._detach(job, cg)
        elif present:
            self.driver.remove(job_id)
        ended = time.time()
        summary["ended"] = iso(ended)
        with self.store.transaction():
            self.store.end_job(job["jid"], ended, summary["cpu_seconds"], summary["pids_limit_hits"], summary)
            self._record(job["jid"], job_id, "epilogue", ts=ended, uid=job["owner_uid"], euid=job["owner_uid"],
                         detail=epilogue_detail(summary))
        if self.observer:
            self.observer.job_ended(job_id)
        return summary

    def _detach(self, job: dict, cg: CgroupAt | Named) -> None:
        """End of an attached job: give back the pids.max we set (if the site let us), drop
        the anchor.  The batch system's cgroup stays: removing it is the batch system's job."""
        raw = self.driver.get_meta(job["job_id"]) if self.driver.exists(job["job_id"]) else None
        try:
            orig = json.loads(raw).get("pids_max_orig") if raw else None
        except ValueError:
            orig = None
        if orig is not None and isinstance(cg, CgroupAt) and cg.exists():
            try:
                cg.set_pids_max(orig)
            except CgroupError:
                pass
        if isinstance(cg, CgroupAt) and cg.exists():
            # sessions' leaves ([pam] attached = "leaf"): the batch system may rmdir its own cgroup only
            # once they are gone.  rmdir removes nothing but an empty cgroup.
            leaves = {self.config.pam_leaf} | {os.path.basename(e["detail"]["leaf"])
                                               for e in self.store.events_of_kind(job["jid"], "adopt")
                                               if isinstance(e["detail"].get("leaf"), str)}
            for name in sorted(leaves):
                with contextlib.suppress(CgroupError):
                    cg.remove_leaf(name)
        if self.driver.exists(job["job_id"]):
            self.driver.remove(job["job_id"], timeout=1.0)

    def _cleanup(self, job: dict, keep: list[str]) -> dict:
        """Per-job TMPDIR, then files of the job's identities that no other running
        job holds (a shared pool uid stays until its last job ends), and only what they
        created during the job.  Never the owner's files unless the site opts in
        ([cleanup] owner_files): the job's results may be there (a Slurm job submitted from
        /tmp writes its output there), nor `keep` (the batch system's stdout/stderr files)."""
        out: dict = {}
        if job.get("tmpdir"):
            from .tmpdir import remove_job_tmpdir

            out["tmpdir"] = remove_job_tmpdir(self.config.tmpdir_base, job["job_id"]).to_dict()
        if self.config.cleanup_enabled and self.config.cleanup_dirs:
            uids = {i["uid"] for i in self.store.identities(job["jid"])}
            held = self.uids_held(exclude_jid=job["jid"])
            owner = set() if self.config.cleanup_owner_files else {job["owner_uid"]}
            out["uids_kept"] = sorted(uids & (held | owner))
            uids = {u for u in uids - held - owner if u >= self.config.prune_min_uid}
            out["since"] = iso(job["created"])
            out["kept_paths"] = list(keep)
            out["uids_cleaned"] = sorted(uids)
            if uids:
                from .cleanup import cleanup

                files = cleanup(self.config.cleanup_dirs, uids, min_uid=self.config.prune_min_uid,
                                since=job["created"], keep=keep).to_dict()
                # Other users' files are the normal case, counted but not listed in a summary.
                files["skipped"] = [s for s in files["skipped"] if s["reason"] != "other-uid"]
                out["files"] = files
        return out

    def uids_held(self, exclude_jid: int | None = None) -> set[int]:
        """Uids that some running job holds right now (owner or traced identity)."""
        return {i["uid"] for j in self.store.jobs("active") if j["jid"] != exclude_jid
                for i in self.store.identities(j["jid"])}

    def cleanup_uid(self, uid: int, dry_run: bool = False, since: float | None = None) -> dict:
        """`jobcage cleanup --uid`: the epilogue's file cleanup for one uid, refused
        while a running job holds it."""
        if uid < self.config.prune_min_uid:
            raise InvalidArgument(f"uid {uid} is below min_uid {self.config.prune_min_uid}")
        self.reconcile()
        holders = [j["job_id"] for j in self.store.jobs("active")
                   if any(i["uid"] == uid for i in self.store.identities(j["jid"]))]
        if holders:
            raise AccessDenied(f"uid {uid} is held by running job(s) {', '.join(holders)}")
        from .cleanup import cleanup

        out = cleanup(self.config.cleanup_dirs, {uid}, min_uid=self.config.prune_min_uid,
                      dry_run=dry_run, since=since).to_dict()
        # why these go: the rule, in words (the dry run's answer to "what would go and why")
        out["rule"] = (f"files and empty directories of uid {uid} in {', '.join(self.config.cleanup_dirs)}"
                       + (f" created or changed since {iso(since)}" if since is not None else "")
                       + f"; no running job holds uid {uid}; never homes, other filesystems or symlink targets")
        return out

    def prune(self, kill: bool = False, min_uid: int | None = None, uids: list[int] | None = None) -> dict:
        """Processes in no job's cgroup (uid >= min_uid, not exempt); killed with kill."""
        from jobcage.cgroups.path import pids_in_cgroup_tree

        from .prune import find_strays, kill_strays

        cfg = self.config
        self.driver.ensure_subtree()
        roots = [self.driver.membership_root()] + [
            j["cgroup"] for j in self.store.jobs("active") if j.get("mode") == "attach"]

        def in_jobs() -> set[int]:   # attached jobs' processes live in the batch system's cgroups
            out = pids_in_cgroup_tree(roots[0])
            for r in roots[1:]:
                try:
                    out |= pids_in_cgroup_tree(r)
                except NoSuchCgroup:
                    pass
            return out
        strays = find_strays(in_jobs, min_uid=cfg.prune_min_uid if min_uid is None else min_uid,
                             only_uids=set(uids) if uids else None, exempt_uids=cfg.prune_exempt_uids,
                             exempt_users=cfg.prune_exempt_users, exempt_commands=cfg.prune_exempt_commands,
                             exempt_sshd=cfg.prune_exempt_sshd)
        out: dict = {"dry_run": not kill, "strays": [s.to_dict() for s in strays]}
        if kill and strays:
            out.update(kill_strays(strays, cfg.kill_timeout).to_dict())
            from .events import TraceEvent

            # what was killed goes to the trail (and the export), whoever asked for the prune
            self.store.add_events(None, [
                TraceEvent("prune", pid=s["pid"], ppid=s["ppid"], uid=s["uid"], comm=s["cmd"][:64],
                           detail={"reason": s["reason"], "result": outcome})
                for outcome in ("killed", "survivors") for s in out.get(outcome, [])])
        return out

    # -- views (reads: they change nothing, neither the store nor cgroupfs) ----------------
    def show(self, job_id: str) -> dict:
        return self._view(self._lookup(job_id))

    def _kernel_state(self, job: dict) -> str:
        """What the kernel says of a job: ended (its cgroup is gone), suspended (frozen) or running."""
        cg = self.held(job)
        if job["state"] == "ended" or not cg.exists():
            return "ended"
        return "suspended" if cg.has_freeze and cg.frozen() else "running"

    def _prologue_view(self, job_id: str) -> dict:
        """The prologue's answer: a job that has just begun has no CPU worth asking the accounting for
        (the hook returns without waiting for the agent's loop)."""
        return self._view(self._lookup(job_id), account=False)

    def _view(self, job: dict, write: bool = False, account: bool = True) -> dict:
        """The job as the kernel and the store show it now.  write=True (the epilogue's final
        accounting, a vanished attached job's end): the per-identity CPU is stored too."""
        job_id = job["job_id"]
        cg = self.held(job)
        live = job["state"] != "ended" and cg.exists()
        if live:
            pids = cg.pids()
            stats = cg.pids_stats()
            state = "suspended" if cg.has_freeze and cg.frozen() else "running"
            ns = cg.cpu_usage_ns()
            cpu = ns / 1e9 if ns is not None else None
        else:
            pids = []
            stats = {"current": 0, "max": job["pids_max"], "limit_hits": job["pids_limit_hits"]}
            state = "ended"
            cpu = job["cpu_seconds"]
        stored = self.store.identities(job["jid"])
        # an attached cgroup the batch system removed first: its exited tasks' CPU is still known
        if account and self.observer and (live or (job["state"] != "ended" and job.get("mode") == "attach")):
            live_cpu = self.observer.job_cpu_by_uid(job_id, pids, flushed=write)
            if live_cpu is not None and cpu is not None:
                if live:
                    live_cpu = split_cpu(live_cpu, cpu, job["owner_uid"])
                else:
                    # the cgroup is gone: its last cpu.stat read (reconcile's) may predate the last exits,
                    # which the exit records still have -- never scale them down to a stale total
                    cpu = max(cpu, sum(live_cpu.values()))
            if live_cpu:
                now = time.time()
                if write and job["jid"] is not None:
                    self.store.set_identity_cpu(job["jid"], live_cpu, now)
                    stored = self.store.identities(job["jid"])
                else:   # the same figures, in the answer only (a uid the trail has not shown yet: seen now)
                    have = {i["uid"] for i in stored}
                    stored = [dict(i, cpu_seconds=live_cpu.get(i["uid"], i["cpu_seconds"])) for i in stored] + [
                        {"uid": u, "first_seen": now, "last_seen": now, "via": None, "cpu_seconds": c}
                        for u, c in live_cpu.items() if u not in have]
                if cpu is None:
                    cpu = sum(live_cpu.values())
        idents = [{"uid": i["uid"], "user": user_name(i["uid"]), "first_seen": iso(i["first_seen"]),
                   "last_seen": iso(i["last_seen"]), "via": i["via"], "cpu_seconds": round(i["cpu_seconds"] or 0, 3)}
                  for i in stored]
        return {
            "job_id": job_id, "state": state, "mode": job.get("mode") or "own",
            "owner_uid": job["owner_uid"], "owner": user_name(job["owner_uid"]),
            "cgroup": job["cgroup"], "pids_current": stats["current"], "pids_max": stats["max"],
            "pids_limit_hits": stats["limit_hits"], "processes": len(pids),
            "cpu_seconds": round(cpu, 3) if cpu is not None else None, "identities": idents,
            "declared": self.store.declarations(job["jid"]),
            "events_lost": job["events_lost"] or 0, "created": iso(job["created"]), "ended": iso(job["ended"]),
            "tmpdir": job["tmpdir"],
        }

    def list(self, include_ended: bool = False, caller_uid: int = 0) -> list[dict]:
        jobs = self.store.jobs(None if include_ended else "active")
        known = {j["job_id"] for j in self.store.jobs("active")}
        # cgroups the store lacks (made while it was unavailable): listed as the kernel holds them
        jobs += [j for n in self.driver.list() if n not in known and JOB_ID_RE.fullmatch(n)
                 and (j := self._unrecorded(n)) is not None]
        out = []
        for job in jobs:
            if not self.may_read(job, caller_uid):
                continue
            if job["state"] == "ended":
                if not include_ended:
                    continue
                out.append({"job_id": job["job_id"], "state": "ended", "mode": job.get("mode") or "own",
                            "owner_uid": job["owner_uid"],
                            "owner": user_name(job["owner_uid"]), "processes": 0, "pids_max": job["pids_max"],
                            "cpu_seconds": job["cpu_seconds"], "created": iso(job["created"]),
                            "ended": iso(job["ended"])})
                continue
            try:
                s = self._view(job)
            except (NoSuchJob, NoSuchCgroup):
                continue
            if s["state"] == "ended" and not include_ended:
                continue   # its cgroup vanished: the next writer ends the record
            out.append({k: s[k] for k in ("job_id", "state", "mode", "owner_uid", "owner", "processes", "pids_max",
                                          "cpu_seconds", "created", "ended")})
        return out

    def events(self, job_id: str, caller_uid: int, after_id: int = 0, limit: int = 1000) -> list[dict]:
        """One page of a job's trail (root, its owner, or a uid that held an identity in it)."""
        job = self.check_read(job_id, caller_uid)
        return self.store.events(job["jid"], after_id, limit) if job["jid"] is not None else []

    def declare(self, job_id: str, uid: int, label: str, caller_uid: int) -> dict:
        """A pilot declares who its payload is (gLExec's non-privileged mode): the
        label (grid DN, user name) is attached to uid within this job."""
        job = self._active(job_id)
        if caller_uid not in (0, job["owner_uid"]):
            raise AccessDenied(f"job {job_id} is not yours", job_id=job_id)
        if not isinstance(label, str) or not 0 < len(label) <= 512 or not label.isprintable():
            raise InvalidArgument("invalid label: 1-512 printable characters")
        ts = time.time()
        self.store.declare(job["jid"], uid, label, ts, caller_uid)
        self.store.touch_identity(job["jid"], uid, ts, "declared")
        from .events import TraceEvent

        self.store.add_events(job["jid"], [TraceEvent("declare", uid=uid, euid=uid, job_id=job_id, ts=ts,
                                                      detail={"label": label, "by_uid": caller_uid})])
        return {"job_id": job_id, "uid": uid, "label": label, "ts": iso(ts)}

    def whois(self, uid: int, at: float) -> list[dict]:
        if not self.store.uid_seen(uid):
            raise InvalidArgument(f"uid {uid} was never seen in any job on this node")
        out = []
        for r in self.store.whois(uid, at):
            r = dict(r, uid=uid, user=user_name(uid), pilot_user=user_name(r["pilot_uid"]))
            for k in ("job_start", "job_end", "first_seen", "last_seen"):
                r[k] = iso(r[k])
            out.append(r)
        return out

    def trace_data(self, job_id: str) -> dict:
        """Everything jobtrace needs in one answer: the job, its pids, lineage (the store's rows, plus what
        the running tracer knows of live processes no event named: forks are counted, not sent)."""
        job = self._lookup(job_id)
        cg = self.held(job)
        live = job["state"] != "ended" and cg.exists()
        lineage = {str(k): v for k, v in self.store.lineage(job["jid"]).items()}
        traced = self.observer.job_lineage(job_id) if self.observer and live else None
        for pid, rec in (traced or {}).items():
            if rec.get("ppid") and str(pid) not in lineage:
                lineage[str(pid)] = {"orig_ppid": rec["ppid"], "via": rec.get("via"), "ts": rec.get("first_seen")}
        return {"job": self._view(job), "pids": cg.pids() if live else [], "lineage": lineage}

    # -- what the agent saw (the tracer's events, its own downtime) ----------------------
    def record_trace(self, batch: list, runs: dict[str, tuple[int, int]]) -> None:
        """Write a batch of trace events of the job runs the tracer follows (job id -> (jid, owner uid)):
        the trail (whose events carry the lineage: Store.lineage reads it from there) and the identities they
        show; one transaction."""
        by_job: dict[int, list] = {}
        # (jid, uid) -> [first ts, last ts, via]: one identity write per uid and batch
        seen: dict[tuple[int, int], list] = {}
        for ev in batch:   # once per event of an exec-heavy job: plain locals and dict reads
            run = runs.get(ev.job_id)
            if run is None:
                continue
            jid, owner = run
            evs = by_job.get(jid)
            if evs is None:
                evs = by_job[jid] = []
            evs.append(ev)
            uid, ts = ev.uid, ev.ts
            # An identity is a uid the job's processes *run as*: the real uid of every event
            # (exec, set*uid, fork, exit...), so that whois names the job at the time of any
            # event the trail shows -- sudo's real uid 0 included.  Helpers' transient euids
            # (sudo passes through root and daemon) are in the trail, not identities.
            if uid >= 0:
                cur = seen.get((jid, uid))
                if cur is None:
                    seen[(jid, uid)] = [ts, ts, ev.detail.get("via") if uid != owner else None]
                else:
                    if ts < cur[0]:
                        cur[0] = ts
                    elif ts > cur[1]:
                        cur[1] = ts
                    if cur[2] is None and uid != owner:
                        cur[2] = ev.detail.get("via")
        if not by_job:
            return
        with self.store.transaction():
            for (jid, uid), (t0, t1, via) in seen.items():
                self.store.touch_identity(jid, uid, t0, via, last=t1)
            for jid, evs in by_job.items():
                self.store.add_events(jid, evs)

    def record_gap(self, runs: dict[str, int], now: float | None = None) -> None:
        """The agent was not running since its last heartbeat: say so in every running job's trail."""
        from .events import TraceEvent

        last = self.store.get_meta("heartbeat")
        now = now or time.time()
        since = float(last) if last else None
        for job_id, jid in runs.items():
            self.store.add_events(jid, [TraceEvent("gap", job_id=job_id, ts=now,
                                                   detail={"from": since, "to": now, "reason": "agent not running"})])

    def record_events_lost(self, jid: int, total: int) -> None:
        self.store.add_events_lost(jid, total)

    def sync(self, job_id: str) -> None:
        """Repair membership of jobcage's own cgroup (a child forked between the hierarchies' attach);
        an attached job's anchor holds no process, and the batch system's cgroup is not ours to move."""
        if self.driver.exists(job_id):
            self.driver.sync(job_id)

    def heartbeat(self) -> None:
        """The agent is alive now (the next start measures its downtime from here)."""
        self.store.set_meta("heartbeat", str(time.time()))

    # -- reconciliation ----------------------------------------------------------------
    def reconcile(self, only: str | None = None) -> list[str]:
        """Make the store agree with cgroupfs: register cgroups it lacks (owner from
        the kernel-held xattr), end jobs whose cgroup is gone -- for an attached job, the
        batch system's cgroup (the anchor in our subtree only helps find it).  Returns live
        job ids."""
        names = self.driver.list() if only is None else ([only] if self.driver.exists(only) else [])
        active = {j["job_id"]: j for j in self.store.jobs("active") if only is None or j["job_id"] == only}
        live = []
        for name in names:
            try:
                validate_job_id(name)
            except InvalidArgument:
                continue  # not ours to manage (never touch what we did not create)
            job = active.get(name)
            if job is not None:
                if job.get("mode") != "attach":
                    live.append(name)
                continue   # attached: decided below, by the batch system's cgroup
            raw = self.driver.get_meta(name)
            meta = None
            try:
                meta = json.loads(raw) if raw is not None else None
            except ValueError:
                pass
            if not isinstance(meta, dict) or meta.get("mode") != "attach":
                live.append(name)
                if meta is None:
                    continue
                owner, created = int(meta["owner_uid"]), float(meta.get("created") or time.time())
                with self.store.transaction():
                    jid = self.store.add_job(name, owner, meta.get("owner_gid"), self.driver.path(name),
                                             meta.get("pids_max"), created)
                    self._record(jid, name, "prologue", ts=created, uid=owner, euid=owner,
                                 detail={"mode": "own", "cgroup": self.driver.path(name), "reconciled": True})
                if self.observer:
                    self.observer.job_started(self.store.job(name) or {}, self.driver.cgroup_id(name),
                                              self.driver.pids(name), members=_members_of(Named(self.driver, name)))
                continue
            try:   # an anchor without a record (database lost): the job is live if its cgroup is
                target = CgroupAt(self.driver.layout, str(meta["cgroup"]), int(meta["cgroup_ino"]))
            except (InvalidArgument, KeyError, TypeError, ValueError):
                continue
            if not target.exists():
                self._drop_anchor(name)
                continue
            owner, created = int(meta["owner_uid"]), float(meta.get("created") or time.time())
            with self.store.transaction():
                jid = self.store.add_job(name, owner, meta.get("owner_gid"), target.path, meta.get("pids_max"),
                                         created, mode="attach", cgroup_ino=target.ino)
                self._record(jid, name, "prologue", ts=created, uid=owner, euid=owner,
                             detail={"mode": "attach", "cgroup": target.path, "reconciled": True})
            active[name] = self.store.job(name) or {}
            if self.observer:
                self.observer.job_started(active[name], target.cgroup_id(), target.pids(), target.level,
                                          members=_members_of(target))
        for job_id, job in active.items():
            if job.get("mode") == "attach":
                cg = self.held(job)
                if cg.exists():
                    live.append(job_id)
                    self._note_kernel_state(job)
                    try:   # kept current: what is left of the cpu figure when the cgroup goes first
                        ns = cg.cpu_usage_ns()
                        if ns is not None:
                            self.store.set_cpu(job["jid"], ns / 1e9)
                    except CgroupError:
                        pass
                    continue
                self._end_vanished(job)
            elif job_id in live:
                self._note_kernel_state(job)
            else:
                ended = time.time()
                with self.store.transaction():
                    self.store.end_job(job["jid"], ended, job["cpu_seconds"], job["pids_limit_hits"],
                                       {"job_id": job["job_id"], "state": "ended"}, "cgroup vanished")
                    self._record(job["jid"], job["job_id"], "epilogue", ts=ended, uid=job["owner_uid"],
                                 euid=job["owner_uid"], detail={"reason": "cgroup vanished",
                                                                "owner_uid": job["owner_uid"]})
                if self.observer:   # the tracer and accounting let go of it, as at any other end
                    self.observer.job_ended(job["job_id"])
        return live

    def _note_kernel_state(self, job: dict) -> None:
        """A job frozen or thawed by someone else (a batch system's own freezer): recorded as such.
        Not while one of our writers is at it (the next reconcile looks again); the record is read anew,
        after the kernel: a writer that just finished has recorded its own change."""
        if not self._changing.acquire(blocking=False):
            return
        try:
            try:
                state = self._kernel_state(job)
            except CgroupError:
                return
            now = self.store.job(job["job_id"])
            if now is None or now["jid"] != job["jid"] or now["state"] == "ended":
                return
            job = now
            if state != "ended" and state != job["state"]:
                self._record_kernel_state(job, state)
        finally:
            self._changing.release()

    def _record_kernel_state(self, job: dict, state: str) -> None:
        with self.store.transaction():
            self.store.set_state(job["jid"], state, "seen in the kernel")
            self._record(job["jid"], job["job_id"], "suspend" if state == "suspended" else "resume",
                         detail={"seen_in_kernel": True})

    def _end_vanished(self, job: dict) -> None:
        """The batch system removed an attached job's cgroup (so every process is gone): end the
        job with its final accounting; the epilogue, if it comes, still does the file cleanup."""
        flush = getattr(self.observer, "flush_events", None)
        if flush is not None:
            flush()   # what the tracer holds of the job's last exits, before the final accounting
        summary = self._view(job, write=True)
        ended = time.time()
        summary.update(state="ended", ended=iso(ended), cleanup=None, ended_by="batch system removed the cgroup")
        self._drop_anchor(job["job_id"])
        with self.store.transaction():
            self.store.end_job(job["jid"], ended, summary["cpu_seconds"], summary["pids_limit_hits"], summary,
                               "cgroup vanished")
            self._record(job["jid"], job["job_id"], "epilogue", ts=ended, uid=job["owner_uid"],
                         euid=job["owner_uid"], detail={**epilogue_detail(summary), "reason": "cgroup vanished"})
        if self.observer:
            self.observer.job_ended(job["job_id"])

    def _drop_anchor(self, name: str) -> None:
        try:
            self.driver.remove(name, timeout=1.0)
        except CgroupError:
            pass   # a process was moved into it: leave it to the administrator (prune sees it)
