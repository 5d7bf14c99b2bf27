"""The one reader of /proc: a process's stat, status, comm, exe, cmdline, cgroups, user namespace,
CPU time per thread; the node's live pids, boot time and cgroup mounts.

Every reader returns None (or an empty value) for a process that is gone or unreadable: a process
may exit between any two reads, and that is never an error here.  A pid can be reused, so where a
caller holds on to a process across reads it holds a :class:`Pinned` -- the pid *and* its start time
in clock ticks since boot (tetragon's process cache keys the same way) -- and :meth:`Pinned.alive`
says whether that pid is still the same process.

At the bottom of jobcage (the cgroup layer names survivors and finds a process's cgroups with it, the
agent reads everything else): imports nothing but ``os``, so the hook path can use it.
"""

from __future__ import annotations

import os

CLK_TCK = os.sysconf("SC_CLK_TCK")


def read(path: str, size: int = 65536) -> bytes | None:
    """One read of a /proc file (its first ``size`` bytes), None when it is gone or unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, size)
    except OSError:
        return None
    finally:
        os.close(fd)


def read_all(path: str) -> bytes | None:
    """A /proc file of any length (cmdline, a big cgroup.procs)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def read_text(path: str) -> str | None:
    data = read_all(path)
    return None if data is None else data.decode("utf-8", "replace")


def pids() -> list[int]:
    """Every process (thread group) the node has now."""
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def pid_set() -> set[int]:
    """The same as a set: one readdir, for membership tests."""
    return {int(n) for n in os.listdir("/proc") if n.isdigit()}


# -- /proc/PID/stat -------------------------------------------------------------------------------------------

class Stat:
    """The fields of /proc/PID/stat jobcage uses (``ticks``: user + system CPU, clock ticks;
    ``start_ticks``: start time, clock ticks since boot)."""

    __slots__ = ("comm", "flags", "pgid", "ppid", "sid", "start_ticks", "state", "threads", "ticks")

    def __init__(self, data: bytes) -> None:
        # comm may hold spaces and parentheses: the fields start after the *last* ')'
        close = data.rindex(b")")
        self.comm = data[data.index(b"(") + 1:close].decode("utf-8", "replace")
        f = data[close + 2:].split()
        self.state = f[0].decode()
        self.ppid, self.pgid, self.sid = int(f[1]), int(f[2]), int(f[3])
        self.flags = int(f[6])
        self.ticks = int(f[11]) + int(f[12])
        self.threads = int(f[17])
        self.start_ticks = int(f[19])


def stat(pid: int | str) -> Stat | None:
    data = read(f"/proc/{pid}/stat", 2048)
    if not data:
        return None
    try:
        return Stat(data)
    except (ValueError, IndexError):
        return None


def ppid(pid: int) -> int:
    """The current parent (0 when gone)."""
    st = stat(pid)
    return st.ppid if st is not None else 0


# -- /proc/PID/status, comm, exe, cmdline -----------------------------------------------------------------------

STATUS_KEYS = ("Uid", "Gid", "PPid", "Tgid", "NoNewPrivs")


def status(pid: int | str, keys: tuple[str, ...] = STATUS_KEYS) -> dict[str, list[int]] | None:
    """Numeric lines of /proc/PID/status as ints (Uid/Gid: real, effective, saved, fs)."""
    data = read(f"/proc/{pid}/status", 8192)
    if data is None:
        return None
    out: dict[str, list[int]] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        key, _, val = line.partition(":")
        if key in keys:
            try:
                out[key] = [int(x) for x in val.split()]
            except ValueError:
                pass
    return out


def uids(pid: int | str) -> tuple[int, int] | None:
    """(real, effective) uid."""
    data = read(f"/proc/{pid}/status", 8192)
    if data is None:
        return None
    at = data.find(b"\nUid:")
    if at < 0:
        return None
    try:
        f = data[at + 5:data.index(b"\n", at + 1)].split()
        return int(f[0]), int(f[1])
    except (ValueError, IndexError):
        return None


def comm(pid: int | str) -> str:
    return (read(f"/proc/{pid}/comm", 64) or b"").decode("utf-8", "replace").strip()


def exe(pid: int | str) -> str:
    """The binary's path ('' when gone, or for a kernel thread)."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def cmdline(pid: int | str, size: int | None = 4096) -> list[str] | None:
    """argv (the first ``size`` bytes; None: all of it), None when gone; [] for a kernel thread."""
    data = read_all(f"/proc/{pid}/cmdline") if size is None else read(f"/proc/{pid}/cmdline", size)
    if data is None:
        return None
    return data.rstrip(b"\0").decode("utf-8", "replace").split("\0") if data else []


def exe_mode(pid: int | str) -> int | None:
    """st_mode of the binary a process runs (the file, through /proc/PID/exe), None when gone."""
    try:
        return os.stat(f"/proc/{pid}/exe").st_mode
    except OSError:
        return None


def cwd(pid: int | str) -> str | None:
    """The process's working directory, None when gone."""
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def fd_path(pid: int | str, fd: int) -> str | None:
    """What the process's descriptor ``fd`` names (/proc/PID/fd/N), None when it or the fd is gone."""
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None


def fdinfo(fd: int) -> dict[str, str] | None:
    """This process's /proc/self/fdinfo/FD as key -> value (a BPF map's ``map_type``, ``max_entries``...),
    None when the fd is not open."""
    data = read(f"/proc/self/fdinfo/{fd}")
    if data is None:
        return None
    out = {}
    for line in data.decode("ascii", "replace").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def userns_inode(pid: int | str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/user").st_ino
    except OSError:
        return None


def userns_fd(pid: int | str) -> int | None:
    """An open fd of the process's user namespace (for nsfs ioctls; the caller closes it), None when gone."""
    try:
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def idmap_text(pid: int | str, which: str) -> str | None:
    """/proc/PID/uid_map or gid_map (``which``) as text, None when gone."""
    return read_text(f"/proc/{pid}/{which}")


# -- CPU time ---------------------------------------------------------------------------------------------------

def thread_runtimes(pid: int) -> dict[int, int]:
    """tid -> sum_exec_runtime (ns, schedstat's first field) of the threads of a process now."""
    out: dict[int, int] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        data = read(f"/proc/{pid}/task/{tid}/schedstat", 256)
        if not data:
            continue   # exited meanwhile
        try:
            out[int(tid)] = int(data.split()[0])
        except (ValueError, IndexError):
            continue
    return out


def task_cpu(pid: int) -> list[tuple[int, int, str, int]]:
    """(tid, real uid, state letter, sum_exec_runtime ns) of each thread of a process now; a thread
    that exits between the reads is left out."""
    out: list[tuple[int, int, str, int]] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        tdir = f"/proc/{pid}/task/{tid}"
        raw, sched = read(f"{tdir}/status", 8192), read(f"{tdir}/schedstat", 256)
        if not raw or not sched:
            continue
        try:
            ns = int(sched.split()[0])
            uid = state = None
            for line in raw.decode().splitlines():
                if line.startswith("State:"):
                    state = line.split()[1]
                elif line.startswith("Uid:"):
                    uid = int(line.split()[1])
                    break
            if uid is not None and state is not None:
                out.append((int(tid), uid, state, ns))
        except (ValueError, IndexError, UnicodeDecodeError):
            continue
    return out


# -- time -------------------------------------------------------------------------------------------------------

_boot: list[float] = []


def boot_time() -> float:
    """The node's boot time (epoch seconds, /proc/stat btime), read once."""
    if not _boot:
        data = read_all("/proc/stat") or b""
        bt = next((ln.split()[1] for ln in data.splitlines() if ln.startswith(b"btime ")), b"0")
        _boot.append(float(int(bt)))
    return _boot[0]


def uptime() -> float:
    """Seconds since boot."""
    data = read("/proc/uptime", 128)
    return float(data.split()[0]) if data else 0.0


def start_time(st: Stat) -> float:
    """When the process started, epoch seconds."""
    return boot_time() + st.start_ticks / CLK_TCK


def read_pinned(pid: int, names: tuple[str, ...]) -> dict[str, bytes] | None:
    """Several files of one process read through one /proc/PID directory fd: if the process exits and
    its pid is reused meanwhile, the reads fail (ESRCH) instead of mixing two processes' data."""
    try:
        dfd = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    out = {}
    try:
        for name in names:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dfd)
            try:
                out[name] = os.read(fd, 16384)
            finally:
                os.close(fd)
    except OSError:
        return None
    finally:
        os.close(dfd)
    return out


# -- identity across reads --------------------------------------------------------------------------------------

class Pinned:
    """A process named by pid *and* start time: a reused pid is another process."""

    __slots__ = ("pid", "start_ticks")

    def __init__(self, pid: int, start_ticks: int) -> None:
        self.pid, self.start_ticks = pid, start_ticks

    @classmethod
    def of(cls, pid: int) -> Pinned | None:
        st = stat(pid)
        return cls(pid, st.start_ticks) if st is not None else None

    def stat(self) -> Stat | None:
        """The process's stat, None when it is gone or its pid now names another process."""
        st = stat(self.pid)
        return st if st is not None and st.start_ticks == self.start_ticks else None

    def alive(self) -> bool:
        st = self.stat()
        return st is not None and st.state not in ("Z", "X")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pinned) and (self.pid, self.start_ticks) == (other.pid, other.start_ticks)

    def __hash__(self) -> int:
        return hash((self.pid, self.start_ticks))

    def __repr__(self) -> str:
        return f"Pinned({self.pid}, {self.start_ticks})"


# -- the process tree -------------------------------------------------------------------------------------------

def children() -> dict[int, list[int]]:
    """ppid -> its children, from one scan of /proc."""
    out: dict[int, list[int]] = {}
    for pid in pids():
        st = stat(pid)
        if st is not None:
            out.setdefault(st.ppid, []).append(pid)
    return out


def subtree(root: int) -> list[int]:
    """root and its live descendants, parents before children."""
    kids = children()
    out, todo = [], [root]
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


# -- cgroups ----------------------------------------------------------------------------------------------------

def cgroups(pid: int | str) -> dict[str, str] | None:
    """/proc/PID/cgroup as {'' (cgroup2) | v1 controller: path relative to its mount}; None when gone."""
    data = read_all(f"/proc/{pid}/cgroup")
    if data is None:
        return None
    out: dict[str, str] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _hid, ctrls, rel = parts
        if ctrls == "":
            out[""] = rel
        for c in ctrls.split(","):
            if c:
                out.setdefault(c, rel)
    return out


def parse_mounts(text: str) -> list[tuple[str, str, list[str]]]:
    """(fstype, mount point, options) of every cgroup / cgroup2 mount in /proc/mounts text."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
            out.append((parts[2], parts[1].replace("\\040", " "), parts[3].split(",")))
    return out


def mountinfo() -> list[tuple[str, str]]:
    """(mount point, fstype) of every mount of this mount namespace, in /proc/self/mountinfo's order (of
    equal mount points the last is the visible one); octal escapes (space, tab, newline, backslash) decoded."""
    out = []
    for line in (read_all("/proc/self/mountinfo") or b"").decode("utf-8", "surrogateescape").splitlines():
        fields, _, tail = line.partition(" - ")
        f = fields.split(" ")
        if len(f) > 4 and tail:
            out.append((_unescape_octal(f[4]), tail.split(" ", 1)[0]))
    return out


def _unescape_octal(s: str) -> str:
    if "\\" not in s:
        return s
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) and all(c in "01234567" for c in s[i + 1:i + 4]):
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mounts_text() -> str:
    """This process's /proc/self/mounts ('' when unreadable)."""
    return read_text("/proc/self/mounts") or ""


def cgroup_mounts() -> list[tuple[str, str, list[str]]]:
    """This process's cgroup mounts (see parse_mounts)."""
    return parse_mounts(mounts_text())


def cgroup2_mount() -> str | None:
    """Mount point of the cgroup2 hierarchy (``/sys/fs/cgroup`` or ``.../unified``), or None."""
    return next((mnt for fstype, mnt, _o in cgroup_mounts() if fstype == "cgroup2"), None)
