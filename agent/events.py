"""The audit-trail event: one shape for the BPF tracer, the proc-connector
fallback, the store and ``jobtrace --events``.

Kinds follow the command-line contract in docs/architecture.md.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

KINDS = ("fork", "exec", "exit", "setuid", "setgid", "setsid", "fork_failed", "declare", "gap",
         "state", "prune", "adopt",
         # lifecycle records (agent/lifecycle.py): in the trail, so the export carries them too
         "prologue", "suspend", "resume", "kill", "epilogue",
         "userns")   # entering a user namespace, its uid/gid maps (agent/tracer/)


@dataclass
class TraceEvent:
    kind: str
    pid: int = 0
    ppid: int = 0
    uid: int = -1          # real uid after the event (for setuid: the new one)
    euid: int = -1         # effective uid after the event, -1 when unknown
    comm: str = ""
    filename: str = ""     # exec: the file; setuid: the helper binary it ran in
    detail: dict = field(default_factory=dict)  # e.g. {"old_uid":..,"ret":..,"syscall":..}
    job_id: str | None = None
    ts: float = field(default_factory=time.time)  # epoch seconds
    cgroup_id: int = 0     # cgroup2 id at the time, 0 when unknown

    def to_dict(self) -> dict:
        return asdict(self)
