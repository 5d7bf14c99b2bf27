"""Configuration: TOML at /etc/jobcage/jobcage.toml, JOBCAGE_CONFIG overrides.

Every key, its section and default is in DEFAULTS (docs/operations.md lists
them for administrators).  Unknown keys are an error: a typo must not silently
leave a node unprotected.
"""

from __future__ import annotations

import os

from .errors import InvalidArgument

DEFAULT_PATH = "/etc/jobcage/jobcage.toml"


class Config:
    """Every setting with its default; ``load`` fills it from TOML.

    A plain class, not a dataclass: importing dataclasses costs ~7 ms and every hook
    call loads the config.  Annotations (strings, PEP 563) give load() the types."""

    # [cgroups]
    cgroup_mode: str = "auto"          # auto | v1 | hybrid | v2
    cgroup_subtree: str = "jobcage"    # relative path under each hierarchy root (placement "top")
    cgroup_placement: str = "auto"     # auto | unit | top (cgroups/placement.py)
    cgroup_delegated: str = "system.slice/jobcage-jobs.service"  # systemd's delegated cgroup (placement "unit")
    # [jobs]
    default_pids_max: int = 4096
    max_pids_max: int = 0              # cap of a limit the job asks for (--pids-request); 0 = default_pids_max
    kill_timeout: float = 10.0         # seconds before kill reports survivors
    freeze_timeout: float = 10.0
    # [agent]
    state_dir: str = "/var/lib/jobcage"
    socket_path: str = "/run/jobcage/agent.sock"
    root_socket_path: str = ""         # root's own listener (mode 0600); "" = socket_path's "-root" sibling
    reconcile_interval: float = 5.0    # seconds between cgroupfs rescans
    metrics_port: int = 0              # prometheus exporter on 127.0.0.1; 0 = off
    # [agent] control socket limits (agent/control.py); uid 0 is never capped nor queued
    uid_connections: int = 8           # connections of one non-root uid read/answered at once
    uid_queue: int = 128               # more of that uid's connections held unread, served in turn
    max_connections: int = 1024        # non-root connections held in all (served + waiting)
    max_request_bytes: int = 65536     # largest non-root request (root: the protocol's 1 MiB)
    request_timeout: float = 10.0      # seconds for a whole request to arrive, and for its answer to be read
    workers: int = 4                   # threads answering non-root requests
    root_workers: int = 16             # threads answering root's requests (the hooks), started on demand
    node_name: str = ""                # this node's name in exported records; "" = the hostname
    # [tracer]
    tracer_backend: str = "auto"       # auto | bpf | proc | off
    # BPF: auto | kprobe | tracepoint: how the set*id/setsid/fork/userns syscalls are hooked (docs/operations.md)
    tracer_syscall_hooks: str = "auto"
    tracer_map_opens: bool = False     # BPF: report uid_map/gid_map write-opens (costs every open of the node)
    tracer_ringbuf_pages: int = 1024   # BPF: the event ring buffer in pages (power of two; 1024 = 4 MiB, ~11,000 events)
    # exec of these is marked in the trail (basename, or a path suffix when it holds a '/')
    tracer_container_runtimes: list[str] = ["apptainer", "singularity", "apptainer/bin/starter",
                                            "apptainer/bin/starter-suid", "singularity/bin/starter",
                                            "singularity/bin/starter-suid"]
    # [prune]
    prune_min_uid: int = 1000
    prune_exempt_uids: list[int] = []
    prune_exempt_users: list[str] = []
    prune_exempt_commands: list[str] = []
    prune_exempt_sshd: bool = True
    prune_interval: float = 0.0        # minutes between agent prunes; 0 = off
    # [cleanup]
    cleanup_enabled: bool = True
    cleanup_dirs: list[str] = ["/tmp", "/var/tmp", "/dev/shm"]
    cleanup_owner_files: bool = False  # also remove the job owner's own files (its output may be there)
    tmpdir_base: str = ""              # per-job TMPDIR parent; "" = off
    # [pam] (sshd sessions adopted into the user's job: `jobcage pam`, docs/ssh-adoption.md)
    pam_mode: str = "deny"             # deny | allow-unadopted | log-only
    pam_pick: str = "newest"           # several jobs, no hint: newest | oldest
    pam_hint_env: list[str] = ["SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID", "JOBCAGE_JOB_ID"]
    pam_exempt_users: list[str] = []
    pam_exempt_groups: list[str] = []
    pam_message: str = "Access denied by jobcage: you have no running job on this node"
    pam_timeout: float = 1.5           # seconds for the whole decision, agent or not
    pam_agent_timeout: float = 0.5     # seconds to wait for the agent before the direct root path
    pam_on_failure: str = "allow"      # allow | deny: when no decision could be made in time
    pam_log_file: str = ""             # one JSON line per decision ("" = syslog only)
    # an attached job (the batch system owns its cgroup): "batch" = the batch system's own PAM module
    # (pam_slurm_adopt) puts the session in; "leaf" = jobcage makes its own leaf cgroup in the job's cgroup
    pam_attached: str = "batch"
    pam_leaf: str = "jobcage-sshd"     # the leaf's name ("leaf" mode)
    # [export] (agent/export.py): the trail and lifecycle records to the site's log pipeline
    export_file: str = ""              # JSON-lines file; "" = off
    export_file_max_bytes: int = 104857600   # rotate at this size (PATH.1 .. PATH.<keep>)
    export_file_keep: int = 5
    export_syslog: str = ""            # "unix:/dev/log", "udp://HOST:PORT", "tcp://HOST:PORT"; "" = off
    export_syslog_facility: str = "authpriv"
    export_journal: bool = False       # systemd journal, native protocol
    export_journal_socket: str = "/run/systemd/journal/socket"
    export_queue_size: int = 10000     # records held in memory per sink; the store holds the rest
    export_max_record: int = 16384     # bytes; a larger record's detail is cut (syslog relays cap messages)
    # [attach]  (prologue --cgroup / --from-pid: the batch system owns the cgroup)
    # Slurm cgroup/v2 (Debian builds with --enable-multiple-slurmd: NODENAME_slurmstepd.scope), cgroup/v1
    attach_job_patterns: list[str] = [r".*/([^/]*_)?slurmstepd\.scope/job_[0-9]+",
                                      r".*/slurm[^/]*/uid_[0-9]+/job_[0-9]+"]
    attach_pids_limit: bool = False    # opt-in: write pids.max in the batch system's cgroup
    # root processes of the batch system inside its job cgroup that jobcage's freeze, kill and signals pass
    # by (Slurm's slurmstepd lives in job_N/step_M/slurm: frozen, slurmd hangs; killed, the step fails)
    attach_batch_daemons: list[str] = ["slurmstepd"]
    path: str = ""                     # where this config came from

    def __init__(self, path: str = "") -> None:
        for name in Config.__annotations__:
            value = getattr(Config, name)
            setattr(self, name, list(value) if isinstance(value, list) else value)  # no shared lists
        self.path = path

    def placement(self, layout: object = None) -> tuple[str, str, str]:
        """(placement, subtree, why): where the job cgroups go on this node (cgroups/placement.py)."""
        from jobcage.cgroups.detect import detect
        from jobcage.cgroups.placement import resolve

        return resolve(self.cgroup_placement, self.cgroup_subtree, self.cgroup_delegated,
                       layout or detect())  # type: ignore[arg-type]

    @property
    def root_socket(self) -> str:
        if self.root_socket_path:
            return self.root_socket_path
        base = self.socket_path[:-5] if self.socket_path.endswith(".sock") else self.socket_path
        return base + "-root.sock"

    @property
    def db_path(self) -> str:
        return os.path.join(self.state_dir, "jobcage.db")

    @property
    def node(self) -> str:
        """Two agents on one machine are two nodes: each names itself ([agent] node)."""
        return self.node_name or os.uname().nodename


SECTIONS = {
    "cgroups": {"mode": "cgroup_mode", "subtree": "cgroup_subtree", "placement": "cgroup_placement",
                "delegated_cgroup": "cgroup_delegated"},
    "jobs": {"default_pids_max": "default_pids_max", "max_pids_max": "max_pids_max", "kill_timeout": "kill_timeout",
             "freeze_timeout": "freeze_timeout"},
    "agent": {"state_dir": "state_dir", "socket": "socket_path", "root_socket": "root_socket_path",
              "reconcile_interval": "reconcile_interval",
              "metrics_port": "metrics_port", "uid_connections": "uid_connections", "uid_queue": "uid_queue",
              "max_connections": "max_connections", "max_request_bytes": "max_request_bytes",
              "request_timeout": "request_timeout", "workers": "workers", "root_workers": "root_workers",
              "node": "node_name"},
    "tracer": {"backend": "tracer_backend", "container_runtimes": "tracer_container_runtimes",
               "map_opens": "tracer_map_opens", "ringbuf_pages": "tracer_ringbuf_pages",
               "syscall_hooks": "tracer_syscall_hooks"},
    "prune": {"min_uid": "prune_min_uid", "exempt_uids": "prune_exempt_uids",
              "exempt_users": "prune_exempt_users", "exempt_commands": "prune_exempt_commands",
              "exempt_sshd": "prune_exempt_sshd", "interval_minutes": "prune_interval"},
    "cleanup": {"enabled": "cleanup_enabled", "dirs": "cleanup_dirs", "tmpdir_base": "tmpdir_base",
                "owner_files": "cleanup_owner_files"},
    "pam": {"mode": "pam_mode", "pick": "pam_pick", "hint_env": "pam_hint_env", "exempt_users": "pam_exempt_users",
            "exempt_groups": "pam_exempt_groups", "message": "pam_message", "timeout": "pam_timeout",
            "agent_timeout": "pam_agent_timeout", "on_failure": "pam_on_failure", "log_file": "pam_log_file",
            "attached": "pam_attached", "leaf": "pam_leaf"},
    "export": {"file": "export_file", "file_max_bytes": "export_file_max_bytes", "file_keep": "export_file_keep",
               "syslog": "export_syslog", "syslog_facility": "export_syslog_facility",
               "journal": "export_journal", "journal_socket": "export_journal_socket",
               "queue_size": "export_queue_size", "max_record": "export_max_record"},
    "attach": {"job_patterns": "attach_job_patterns", "pids_limit": "attach_pids_limit",
               "batch_daemons": "attach_batch_daemons"},
}
CHOICES = {"pam_mode": ("deny", "allow-unadopted", "log-only"), "pam_pick": ("newest", "oldest"),
           "pam_on_failure": ("allow", "deny"), "pam_attached": ("batch", "leaf"),
           "tracer_syscall_hooks": ("auto", "kprobe", "tracepoint")}


def _check_trusted(path: str, st: os.stat_result) -> None:
    """A non-root caller (a job's TaskProlog, `jobcage run` as the job user) takes the socket path and
    everything else that decides containment from the config: only from one that only root can write,
    wherever JOBCAGE_CONFIG points.  Checked on the open file (no swap between check and read)."""
    if os.geteuid() == 0:
        return
    if st.st_uid != 0 or st.st_mode & 0o022:
        why = f"owned by uid {st.st_uid}" if st.st_uid != 0 else "writable by group or others"
        raise InvalidArgument(f"config {path} is {why}: a non-root caller only uses a config only root can write",
                              path=path)


_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_DIGITS = frozenset("0123456789")


def _scalar(s: str) -> tuple[object, str] | None:
    """The plain TOML value at the start of s (a string without escapes, a decimal int or float, a
    boolean) and the rest of s; None for anything else."""
    if s[:1] in ('"', "'"):
        q = s[0]
        end = s.find(q, 1)
        if end < 0 or (q == '"' and "\\" in s[1:end]) or s[end + 1:end + 2] == q:
            return None   # escapes and multi-line strings: tomllib's
        return s[1:end], s[end + 1:]
    n = 0
    while n < len(s) and s[n] not in " \t,]#":
        n += 1
    word, rest = s[:n], s[n:]
    if word in ("true", "false"):
        return word == "true", rest
    num = word[1:] if word[:1] == "-" else word
    whole, dot, frac = num.partition(".")
    if not whole or not set(whole) <= _DIGITS or (len(whole) > 1 and whole[0] == "0"):
        return None
    if not dot:
        return int(word), rest
    if not frac or not set(frac) <= _DIGITS:
        return None
    return float(word), rest


def _end(rest: str) -> bool:
    rest = rest.lstrip(" \t")
    return not rest or rest[0] == "#"


def simple_toml(text: str) -> dict | None:
    """Parse the plain subset of TOML a jobcage config is written in -- [section] headers and
    `key = value` lines whose value is a string without escapes, a decimal number, a boolean or a
    one-line array of those -- without importing tomllib (~10 ms with its re, datetime and typing,
    on every hook call).  None when the text holds anything else (or a duplicate): then tomllib
    parses it, so a config means what TOML says whichever parser read it."""
    for c in text:
        if c < " " and c not in "\t\n" or c == "\x7f":
            return None   # control characters, CR: tomllib's to accept or refuse
    doc: dict = {}
    table = doc
    for line in text.split("\n"):
        line = line.lstrip(" \t")
        if not line or line[0] == "#":
            continue
        if line[0] == "[":
            close = line.find("]")
            name = line[1:close].strip(" \t")
            if close < 0 or not name or not set(name) <= _BARE or not _end(line[close + 1:]) or name in doc:
                return None
            table = doc[name] = {}
            continue
        key, eq, value = line.partition("=")
        key = key.rstrip(" \t")
        if not eq or not key or not set(key) <= _BARE or key in table:
            return None
        value = value.lstrip(" \t")
        if value[:1] == "[":
            items: list = []
            rest = value[1:].lstrip(" \t")
            while rest[:1] != "]":
                got = _scalar(rest)
                if got is None:
                    return None
                items.append(got[0])
                rest = got[1].lstrip(" \t")
                if rest[:1] == ",":
                    rest = rest[1:].lstrip(" \t")
                elif rest[:1] != "]":
                    return None
            if not _end(rest[1:]):
                return None
            table[key] = items
            continue
        got = _scalar(value)
        if got is None or not _end(got[1]):
            return None
        table[key] = got[0]
    return doc


def load(path: str | None = None) -> Config:
    path = path or os.environ.get("JOBCAGE_CONFIG") or DEFAULT_PATH
    cfg = Config(path=path)
    try:
        with open(path, "rb") as f:
            _check_trusted(path, os.fstat(f.fileno()))
            data = f.read()
    except FileNotFoundError:
        if path != DEFAULT_PATH:
            raise InvalidArgument(f"config file not found: {path}", path=path) from None
        return cfg
    except OSError as e:
        raise InvalidArgument(f"cannot read config {path}: {e.strerror}", path=path) from None
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{path}: {e}", path=path) from None
    doc = simple_toml(text)
    if doc is None:   # anything beyond the plain subset: the real parser decides, and words its errors
        import tomllib

        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise InvalidArgument(f"{path}: {e}", path=path) from None
    types = Config.__annotations__
    for section, values in doc.items():
        keys = SECTIONS.get(section)
        if keys is None or not isinstance(values, dict):
            raise InvalidArgument(f"{path}: unknown section [{section}]", path=path)
        for key, value in values.items():
            attr = keys.get(key)
            if attr is None:
                raise InvalidArgument(f"{path}: unknown key {section}.{key}", path=path)
            want = types[attr]
            ok = {"str": isinstance(value, str), "int": isinstance(value, int) and not isinstance(value, bool),
                  "float": isinstance(value, int | float) and not isinstance(value, bool),
                  "bool": isinstance(value, bool)}.get(want, isinstance(value, list))
            if not ok:
                raise InvalidArgument(f"{path}: {section}.{key} must be {want}", path=path)
            if attr in CHOICES and value not in CHOICES[attr]:
                raise InvalidArgument(f"{path}: {section}.{key} must be one of {', '.join(CHOICES[attr])}",
                                      path=path)
            setattr(cfg, attr, float(value) if want == "float" else value)
    pages = cfg.tracer_ringbuf_pages
    if not (0 < pages <= 65536 and pages & (pages - 1) == 0):
        raise InvalidArgument(f"{path}: tracer.ringbuf_pages must be a power of two from 1 to 65536", path=path)
    leaf = cfg.pam_leaf  # a directory name in a batch system's cgroup (cgroups/path.py LEAF_NAME)
    if not (0 < len(leaf) <= 64 and leaf[0].isascii() and leaf[0].isalnum()
            and all(c.isascii() and (c.isalnum() or c in "_.-") for c in leaf)):
        raise InvalidArgument(f"{path}: pam.leaf must be a plain cgroup name ([A-Za-z0-9][A-Za-z0-9_.-]*)",
                              path=path)
    return cfg
