"""The agent's errors: jobs, the control socket, the store.

They extend the one hierarchy rooted in ``jobcage.cgroups.errors`` (where the
cgroup layer's own errors live).  ``error_class`` finds the class of an error
that crossed the control socket by walking the hierarchy, so no hand-kept list
can go stale.
"""

from __future__ import annotations

from jobcage.cgroups.errors import (
    AccessDenied,
    CgroupError,
    InvalidArgument,
    JobcageError,
    NoSuchCgroup,
    NoSuchProcess,
    Timeout,
    Unsupported,
)

__all__ = ["AccessDenied", "AgentUnavailable", "Busy", "CgroupError", "InvalidArgument", "JobExists", "JobcageError",
           "NoSuchCgroup", "NoSuchJob", "NoSuchProcess", "ProtocolError", "StoreError", "Timeout",
           "Unsupported", "error_class"]


class NoSuchJob(JobcageError):
    """Unknown job id."""


class JobExists(JobcageError):
    """A job with this id is already registered and running."""


class AgentUnavailable(JobcageError):
    """The agent's control socket is not reachable."""


class ProtocolError(JobcageError):
    """Garbage on the control socket."""


class Busy(JobcageError):
    """The agent refused a connection: too many from this uid, or from users in all."""


class StoreError(JobcageError):
    """The state database is unusable."""


def error_class(name: str) -> type[JobcageError]:
    """The JobcageError subclass called `name` (the agent's side of the socket), else the base."""
    todo: list[type[JobcageError]] = [JobcageError]
    while todo:
        cls = todo.pop()
        if cls.__name__ == name:
            return cls
        todo.extend(cls.__subclasses__())
    return JobcageError
