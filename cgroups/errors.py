"""The base of jobcage's one exception hierarchy, and the cgroup layer's errors.

It lives at the bottom of the layering (like psutil's ``_exceptions``), so that
``cgroups`` (which knows nothing of jobs) and ``agent`` raise the same family;
the agent's job and transport errors subclass it in ``jobcage.agent.errors``.
Every error carries the object it is about (pid, job id, path) and a one-line
message fit for a terminal.
"""

from __future__ import annotations


class JobcageError(Exception):
    """Base of every error jobcage raises on purpose."""

    def __init__(self, msg: str, *, job_id: str | None = None, pid: int | None = None,
                 path: str | None = None) -> None:
        super().__init__(msg)
        self.msg = msg
        self.job_id = job_id
        self.pid = pid
        self.path = path

    def __str__(self) -> str:
        return self.msg

    def to_dict(self) -> dict:
        return {"type": type(self).__name__, "message": self.msg, "job_id": self.job_id,
                "pid": self.pid, "path": self.path}


class InvalidArgument(JobcageError):
    """Malformed input: a bad job id, name, signal, uid..."""


class AccessDenied(JobcageError):
    """The caller may not do this (not root, not the job's owner, not its process)."""


class NoSuchProcess(JobcageError):
    """The pid is gone (or never existed)."""


class CgroupError(JobcageError):
    """The kernel refused a cgroup operation, or a hierarchy is missing."""


class NoSuchCgroup(CgroupError):
    """The cgroup does not exist (any more)."""


class Unsupported(CgroupError):
    """This node lacks the kernel feature needed (no freezer, no pids controller...)."""


class Timeout(JobcageError):
    """The kernel did not confirm in time; the message names what is left."""
