"""jobcage.bpf — the BPF C programs and their one header of event structs, shipped as package data.

Holds: ``tracer.bpf.c`` (fork/exec/exit, the set*id family, setsid, filtered in the kernel by job)
and ``jobcage.h`` (the structs and kinds user space decodes).  This module only locates them by
absolute path; ``jobcage.agent.tracer`` compiles them with bcc.

Must never import: bcc, ``jobcage.agent``, ``jobcage.cgroups`` (it is data, not code).
"""

from pathlib import Path

DIR = Path(__file__).resolve().parent
HEADER = DIR / "jobcage.h"
SOURCE = DIR / "tracer.bpf.c"  # the one program

__all__ = ["DIR", "HEADER", "SOURCE"]
