"""Member offsets of the running kernel's structs, from its BTF (``/sys/kernel/btf/vmlinux``).

The BPF programs are compiled by bcc against Debian's headers, which need not match the running
kernel, so they read no struct through a header.  The few values worth reading from kernel structs
-- a task's CPU time at exit, which spares the agent a taskstats record for every exit of the node;
at exec the effective uid the kernel gave the process and the mode and owner of the file it runs,
which spare a stat of a path that may name another file by then -- are read at the offsets this
module finds in the kernel's own type information: what libbpf's CO-RE relocation would do, done
once at load.  libbpf (``libbpf.so.1``, which bcc itself depends on) parses
the BTF; only the walk over the members is here.
"""

from __future__ import annotations

import ctypes as ct
import functools
import logging

log = logging.getLogger("jobcage.tracer")

_STRUCT, _UNION = 4, 5
_MODIFIERS = (8, 9, 10, 11, 18)   # typedef, volatile, const, restrict, type_tag: see through them
_U32x3 = ct.c_uint32 * 3          # struct btf_type: name_off, info, size|type


class _Btf:
    def __init__(self) -> None:
        lib = ct.CDLL("libbpf.so.1")
        lib.btf__load_vmlinux_btf.restype = ct.c_void_p
        lib.btf__find_by_name_kind.argtypes = [ct.c_void_p, ct.c_char_p, ct.c_uint32]
        lib.btf__find_by_name_kind.restype = ct.c_int32
        lib.btf__type_by_id.argtypes = [ct.c_void_p, ct.c_uint32]
        lib.btf__type_by_id.restype = ct.c_void_p
        lib.btf__name_by_offset.argtypes = [ct.c_void_p, ct.c_uint32]
        lib.btf__name_by_offset.restype = ct.c_char_p
        lib.btf__free.argtypes = [ct.c_void_p]
        self.lib = lib
        self.btf = lib.btf__load_vmlinux_btf()
        if not self.btf:
            raise OSError("the kernel has no BTF (/sys/kernel/btf/vmlinux)")

    def _type(self, tid: int) -> tuple[int, int, int, int]:
        """(kind, vlen, kind_flag, size|type) of a type id."""
        t = self.lib.btf__type_by_id(self.btf, tid)
        if not t:
            raise LookupError(f"BTF type {tid} does not exist")
        _name, info, x = _U32x3.from_address(t)
        return (info >> 24) & 0x1F, info & 0xFFFF, info >> 31, x

    def _resolve(self, tid: int) -> int:
        kind, _v, _f, x = self._type(tid)
        while kind in _MODIFIERS:
            tid = x
            kind, _v, _f, x = self._type(tid)
        return tid

    def _member(self, tid: int, name: str) -> tuple[int, int] | None:
        """(bit offset, type id) of member `name` of struct/union tid, looking into anonymous members."""
        kind, vlen, kflag, _size = self._type(tid)
        if kind not in (_STRUCT, _UNION):
            return None
        members = (ct.c_uint32 * (3 * vlen)).from_address(self.lib.btf__type_by_id(self.btf, tid) + 12)
        for i in range(vlen):
            name_off, mtype, off = members[3 * i], members[3 * i + 1], members[3 * i + 2]
            bits = off & 0xFFFFFF if kflag else off   # kind_flag: the high byte is a bitfield size
            mname = self.lib.btf__name_by_offset(self.btf, name_off) or b""
            if mname.decode() == name:
                return bits, mtype
            if not mname:   # an anonymous struct/union (struct_group, randomized layout)
                inner = self._member(self._resolve(mtype), name)
                if inner is not None:
                    return bits + inner[0], inner[1]
        return None

    def offset(self, struct_name: str, path: str) -> int:
        """Byte offset of ``path`` (dotted members, e.g. "se.sum_exec_runtime") in ``struct struct_name``."""
        tid = self.lib.btf__find_by_name_kind(self.btf, struct_name.encode(), _STRUCT)
        if tid <= 0:
            raise LookupError(f"no struct {struct_name} in the kernel's BTF")
        bits = 0
        for part in path.split("."):
            hit = self._member(self._resolve(tid), part)
            if hit is None:
                raise LookupError(f"struct {struct_name} has no member {path}")
            bits += hit[0]
            tid = hit[1]
        if bits % 8:
            raise LookupError(f"{struct_name}.{path} is a bitfield")
        return bits // 8

    def close(self) -> None:
        if self.btf:
            self.lib.btf__free(self.btf)
            self.btf = None


# -D macro -> (struct, member path): what the exit and exec programs read (bpf/tracer.bpf.c)
EXEC_FIELDS = {
    "JC_OFF_CRED": ("task_struct", "cred"),           # the task's effective credentials (pointer)
    "JC_OFF_CRED_EUID": ("cred", "euid"),             # kuid_t: the global (initial-namespace) uid
    "JC_OFF_MM": ("task_struct", "mm"),
    "JC_OFF_MM_EXE": ("mm_struct", "exe_file"),       # the file the process runs now (set at exec)
    "JC_OFF_FILE_INODE": ("file", "f_inode"),
    "JC_OFF_INODE_MODE": ("inode", "i_mode"),
    "JC_OFF_INODE_UID": ("inode", "i_uid"),
    "JC_OFF_INODE_GID": ("inode", "i_gid"),
}


RUNTIME_FIELD = {"JC_OFF_RUNTIME": ("task_struct", "se.sum_exec_runtime")}   # what the exit program reads


@functools.lru_cache(maxsize=1)
def _kernel_offsets() -> tuple[dict[str, int] | None, dict[str, int] | None]:
    """(RUNTIME_FIELD's, EXEC_FIELDS') offsets from one load of the kernel's BTF; each None when there is no BTF
    (or libbpf) or one of its members is missing.  Kept: they cannot change while the kernel runs."""
    try:
        btf = _Btf()
    except (OSError, AttributeError) as e:
        log.info("no kernel BTF (%s): the accounting uses taskstats, exec'd files are looked at from user space", e)
        return None, None
    try:
        out: list[dict[str, int] | None] = []
        for fields, without in ((RUNTIME_FIELD, "the accounting uses taskstats"),
                                (EXEC_FIELDS, "exec'd files are looked at from user space")):
            try:
                out.append({name: btf.offset(struct, path) for name, (struct, path) in fields.items()})
            except LookupError as e:
                log.info("%s: %s", e, without)
                out.append(None)
        return out[0], out[1]
    finally:
        btf.close()


def exec_offsets() -> dict[str, int] | None:
    """The offsets of :data:`EXEC_FIELDS`, or None (the exec program then sends no credentials and user space
    stats the file, as before)."""
    return _kernel_offsets()[1]


def task_runtime_offset() -> int | None:
    """Byte offset of ``task_struct.se.sum_exec_runtime`` in the running kernel, or None (the accounting then
    listens to taskstats)."""
    got = _kernel_offsets()[0]
    return None if got is None else got["JC_OFF_RUNTIME"]
