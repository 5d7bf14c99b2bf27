"""The agent's method table: one entry per control-socket method, with who may
call it.  Transport (agent/server.py) authenticates the caller by SO_PEERCRED and
hands the uid here; the checks that depend on the job (owner, identity holder)
live in JobManager so the direct CLI path enforces the same rules.
"""

from __future__ import annotations

import inspect
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import AccessDenied, InvalidArgument, ProtocolError
from .fmt import iso
from .lifecycle import JobManager, validate_job_id

ROOT, ANY = "root", "any"
FUTURE_SLACK_S = 1.0  # whois --at: clocks of the caller and the agent may differ a little
EVENTS_PAGE = 1000  # events per answer: ~250 bytes each, well under protocol.MAX_MESSAGE


@dataclass(frozen=True)
class Caller:
    pid: int
    uid: int
    gid: int


def _int(name: str, v: object, *, minimum: int = 0) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise InvalidArgument(f"invalid {name}: {v!r}")
    return v


class Api:
    def __init__(self, manager: JobManager, agent: object | None = None) -> None:
        self.m = manager
        self.agent = agent  # the running Agent, for tracer-backed methods
        self.methods: dict[str, tuple[str, Callable[..., object]]] = {
            "ping": (ANY, self.ping),
            "prologue": (ROOT, self.prologue),
            "adopt": (ANY, self.adopt),
            "sshd_adopt": (ROOT, self.sshd_adopt),
            "sshd_hint": (ANY, self.sshd_hint),
            "suspend": (ROOT, self.suspend),
            "resume": (ROOT, self.resume),
            "kill": (ROOT, self.kill),
            "epilogue": (ROOT, self.epilogue),
            "show": (ANY, self.show),
            "list": (ANY, self.list),
            "events": (ANY, self.events),
            "declare": (ANY, self.declare),
            "whois": (ANY, self.whois),
            "trace": (ANY, self.trace),
            "prune": (ROOT, self.prune),
            "cleanup": (ROOT, self.cleanup),
        }

    def dispatch(self, caller: Caller, method: object, params: object) -> object:
        if not isinstance(method, str) or method not in self.methods:
            raise ProtocolError(f"unknown method {str(method)[:40]!r}")
        if not isinstance(params, dict):
            raise ProtocolError("params must be a JSON object")
        who, fn = self.methods[method]
        if who == ROOT and caller.uid != 0:
            raise AccessDenied(f"{method} requires root")
        try:
            bound = inspect.signature(fn).bind(caller, **params)
        except TypeError as e:
            raise InvalidArgument(f"{method}: {e}") from None
        return fn(*bound.args, **bound.kwargs)

    # -- methods ------------------------------------------------------------
    def ping(self, caller: Caller) -> dict:
        return {"pid": __import__("os").getpid(), "uid": caller.uid,
                "tracer": getattr(self.agent, "tracer_backend", "off"),
                "syscall_hooks": getattr(getattr(self.agent, "tracer", None), "syscall_hooks", None)}

    def prologue(self, caller: Caller, job_id: str, uid: int, gid: int | None = None,
                 pids_max: int | None = None, pid: int | None = None, pids_request: int | None = None,
                 cgroup: str | None = None, from_pid: int | None = None) -> dict:
        if cgroup is not None and not isinstance(cgroup, str):
            raise InvalidArgument(f"invalid cgroup path: {cgroup!r}")
        return self.m.prologue(validate_job_id(job_id), _int("uid", uid), None if gid is None else _int("gid", gid),
                               None if pids_max is None else _int("pids limit", pids_max, minimum=1),
                               None if pid is None else _int("pid", pid, minimum=1),
                               None if pids_request is None else _int("pids request", pids_request, minimum=1),
                               cgroup=cgroup, from_pid=None if from_pid is None else _int("pid", from_pid, minimum=1))

    def adopt(self, caller: Caller, job_id: str, pid: int) -> dict:
        # cgroup: the caller checks with the kernel that pid really is there before it reports success
        return self.m.adopt(validate_job_id(job_id), _int("pid", pid, minimum=1), caller.uid)

    def sshd_adopt(self, caller: Caller, uid: int, pid: int, info: dict | None = None, hint: str | None = None,
                   dry_run: bool = False) -> dict:
        """The PAM hook (`jobcage pam`, root): an sshd session into the user's job."""
        if info is not None and not isinstance(info, dict):
            raise InvalidArgument(f"invalid info: {info!r}")
        if hint is not None:
            validate_job_id(hint)
        return self.m.sshd_adopt(_int("uid", uid), _int("pid", pid, minimum=1), info, hint, bool(dry_run))

    def sshd_hint(self, caller: Caller, job_id: str, source: str | None = None) -> dict:
        """`jobcage ssh-hint` inside an adopted session: move it into the hinted job of the caller's.
        The session is found from the caller's own pid (SO_PEERCRED), never from a parameter."""
        if source is not None and (not isinstance(source, str) or len(source) > 64):
            raise InvalidArgument(f"invalid hint source: {str(source)[:40]!r}")
        return self.m.sshd_rehome(validate_job_id(job_id), caller.pid, caller.uid, source)

    def suspend(self, caller: Caller, job_id: str) -> dict:
        return self.m.suspend(validate_job_id(job_id))

    def resume(self, caller: Caller, job_id: str) -> dict:
        return self.m.resume(validate_job_id(job_id))

    def kill(self, caller: Caller, job_id: str, signal_name: str = "SIGKILL") -> dict:
        return self.m.kill(validate_job_id(job_id), parse_signal(signal_name))

    def epilogue(self, caller: Caller, job_id: str, keep: list[str] | None = None) -> dict:
        if keep is not None and (not isinstance(keep, list) or len(keep) > 64
                                 or not all(isinstance(k, str) and k.startswith("/") for k in keep)):
            raise InvalidArgument("keep: a list of absolute paths")
        return self.m.epilogue(validate_job_id(job_id), keep)

    def show(self, caller: Caller, job_id: str) -> dict:
        self.m.check_read(validate_job_id(job_id), caller.uid)
        return self.m.show(job_id)

    def list(self, caller: Caller, all: bool = False) -> list:
        return self.m.list(bool(all), caller.uid)

    def events(self, caller: Caller, job_id: str, after_id: int = 0, limit: int = EVENTS_PAGE) -> list:
        """One page of the trail after `after_id`: an answer must fit in a socket message."""
        return self.m.events(validate_job_id(job_id), caller.uid, _int("after_id", after_id),
                             min(_int("limit", limit, minimum=1), EVENTS_PAGE))

    def declare(self, caller: Caller, job_id: str, uid: int, label: str) -> dict:
        return self.m.declare(validate_job_id(job_id), _int("uid", uid), label, caller.uid)

    def whois(self, caller: Caller, uid: int, at: float | None = None) -> list:
        uid = _int("uid", uid)
        if caller.uid not in (0, uid):
            raise AccessDenied("whois of another uid requires root")
        if at is not None and (not isinstance(at, int | float) or isinstance(at, bool) or not math.isfinite(at)
                               or at < 0):
            raise InvalidArgument(f"invalid time: {at!r}")
        now = time.time()
        if at is not None and at > now + FUTURE_SLACK_S:
            raise InvalidArgument(f"time {iso(float(at))} is in the future (now {iso(now)})")
        return self.m.whois(uid, now if at is None else float(at))

    def trace(self, caller: Caller, job_id: str) -> dict:
        self.m.check_read(validate_job_id(job_id), caller.uid)
        return self.m.trace_data(job_id)


    def prune(self, caller: Caller, kill: bool = False, min_uid: int | None = None,
              uids: list[int] | None = None) -> dict:
        if uids is not None and (not isinstance(uids, list) or not all(isinstance(u, int) for u in uids)):
            raise InvalidArgument(f"invalid uids: {uids!r}")
        return self.m.prune(bool(kill), None if min_uid is None else _int("min uid", min_uid), uids)

    def cleanup(self, caller: Caller, uid: int, dry_run: bool = False, since: float | None = None) -> dict:
        if since is not None and (not isinstance(since, int | float) or isinstance(since, bool)
                                  or not math.isfinite(since)):
            raise InvalidArgument(f"invalid time: {since!r}")
        return self.m.cleanup_uid(_int("uid", uid), bool(dry_run), since)


def parse_signal(name: object) -> int:
    """'KILL', 'SIGTERM', '15' -> signal number; anything else is a usage error."""
    if isinstance(name, int) and not isinstance(name, bool):
        s = str(name)
    elif isinstance(name, str):
        s = name.strip().upper()
    else:
        raise InvalidArgument(f"invalid signal: {name!r}")
    try:
        if s.isdigit():
            return int(signal.Signals(int(s)))
        return int(signal.Signals[s if s.startswith("SIG") else "SIG" + s])
    except (KeyError, ValueError):
        raise InvalidArgument(f"invalid signal: {name!r}") from None
