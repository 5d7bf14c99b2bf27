"""What ``bpf/jobcage.h`` says, read from the header itself so nothing is defined twice: its limits and mark
bits, the event kinds and syscalls (``enum jc_kind``, ``enum jc_sys``), ``JC_ABI``, and the layout of
``struct jc_event`` as one :class:`struct.Struct` (from the ctypes class bcc derives from the header)."""

from __future__ import annotations

import ctypes as ct
import operator
import re
import struct

from jobcage import bpf as bpf_files
from jobcage.agent.events import KINDS

from ..errors import JobcageError, Unsupported

ABI = 4   # the struct layouts and meanings this code decodes; bpf/jobcage.h's JC_ABI must say the same
_HEADER = bpf_files.HEADER.read_text()


def define(name: str) -> int:
    """A ``#define NAME number`` of the header."""
    m = re.search(rf"^#define\s+{name}\s+(\d+)", _HEADER, re.M)
    if not m:
        raise JobcageError(f"{bpf_files.HEADER}: no #define {name}", path=str(bpf_files.HEADER))
    return int(m.group(1))


def enum(name: str, prefix: str) -> dict[int, str]:
    """value -> lower-case name (without ``prefix``) of the members of ``enum name`` in the header."""
    m = re.search(rf"^enum\s+{name}\s*\{{(.*?)\}};", _HEADER, re.M | re.S)
    if not m:
        raise JobcageError(f"{bpf_files.HEADER}: no enum {name}", path=str(bpf_files.HEADER))
    body = re.sub(r"/\*.*?\*/", "", m.group(1), flags=re.S)
    return {int(v): k[len(prefix):].lower() for k, v in re.findall(rf"\b({prefix}\w+)\s*=\s*(\d+)", body)}


HEADER_ABI = define("JC_ABI")
MAX_JOBS = define("JC_MAX_JOBS")
MAX_LEVEL = define("JC_MAX_LEVEL")
JOB_SUBTREE = define("JC_JOB_SUBTREE")
MARK_CHANGED = define("JC_MARK_CHANGED")
MARK_SEEN = define("JC_MARK_SEEN")
MARK_USERNS = define("JC_MARK_USERNS")
KIND_NAMES = enum("jc_kind", "JC_EV_")                                      # 1 -> "exec", ...
SYS_NAMES = {k: v for k, v in enum("jc_sys", "JC_SYS_").items() if k}    # 1 -> "setuid", ...; 0 = none
NOARG = 0xFFFFFFFF          # (uid_t)-1: "leave unchanged" in set*id arguments
PLAIN_EXEC_FIELDS = ("ts_ns", "cookie", "pid", "tid", "ppid", "uid", "gid", "euid", "ret", "comm", "filename",
                     "cgroup_id")
_EXITED = struct.Struct("=QIIQ")         # struct jc_exited: ts_ns, cookie, uid, cpu_ns


def check() -> None:
    """At load: the header is the one this code was written against, and every kind it sends is an
    audit-trail kind.  Unsupported otherwise (the agent then says why and falls back)."""
    if HEADER_ABI != ABI:
        raise Unsupported(f"{bpf_files.HEADER}: JC_ABI {HEADER_ABI}, but this jobcage decodes ABI {ABI}")
    unknown = sorted(set(KIND_NAMES.values()) - set(KINDS))
    if unknown:
        raise Unsupported(f"{bpf_files.HEADER}: event kinds {', '.join(unknown)} are not audit-trail kinds")


class EventLayout:
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
        # the fields of an exec the front end reads straight from the tuple (Tracer._plain_exec), in one call
        self.plain_exec = operator.itemgetter(*(getattr(self, f) for f in PLAIN_EXEC_FIELDS))
