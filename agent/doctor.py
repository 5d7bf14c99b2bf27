"""`jobcage doctor`: probe what this node offers (features, never versions) and
say which mode jobcage will use."""

from __future__ import annotations

import os
import platform

from jobcage.cgroups import get_driver
from jobcage.cgroups.detect import detect

from .config import load
from .errors import JobcageError

TRACEFS = "/sys/kernel/tracing"
TRACEPOINTS = ["sched/sched_process_fork", "sched/sched_process_exec", "sched/sched_process_exit",
               "syscalls/sys_enter_setuid", "syscalls/sys_enter_setresuid", "syscalls/sys_enter_setsid"]
# user namespaces (BPF): optional, the tracer runs without them and says what it misses
USERNS_TRACEPOINTS = ["syscalls/sys_enter_unshare", "syscalls/sys_enter_setns", "syscalls/sys_enter_clone",
                      "syscalls/sys_enter_clone3", "syscalls/sys_enter_openat"]
PROC_USERNS_BLIND = ("the proc connector does not report user-namespace entry (unshare/clone/setns) nor "
                     "uid_map/gid_map writes: a namespace is noticed at the next exec or identity change of a "
                     "process in it (read from /proc), short-lived ones not at all; namespaced set*id "
                     "arguments are not seen (host ids are); the map helper (newuidmap) is inferred from "
                     "/etc/subuid")


def _bpf() -> dict:
    out: dict = {"tracefs": os.path.isdir(os.path.join(TRACEFS, "events")),
                 "btf": os.path.exists("/sys/kernel/btf/vmlinux"),
                 "kernel_headers": os.path.exists(f"/lib/modules/{platform.release()}/build/include")}
    try:
        import bcc  # noqa: F401

        out["bcc"] = True
    except ImportError as e:
        out["bcc"] = f"missing ({e})"
    out["tracepoints"] = {tp: os.path.isdir(os.path.join(TRACEFS, "events", tp)) for tp in TRACEPOINTS}
    out["userns tracepoints"] = {tp: os.path.isdir(os.path.join(TRACEFS, "events", tp)) for tp in USERNS_TRACEPOINTS}
    return out


def _kernel_facts() -> str:
    """What the BPF programs will read at the running kernel's BTF offsets (agent/tracer/btf.py)."""
    from .tracer.btf import exec_offsets, task_runtime_offset

    got = [what for what, ok in (("CPU time of exited tasks (no taskstats)", task_runtime_offset() is not None),
                                 ("exec: euid and the file's mode/owner (no stat)", exec_offsets() is not None))
           if ok]
    return "; ".join(got) if got else "none (no usable BTF): CPU of exited tasks from taskstats, exec'd files stat'ed"


def _syscall_hooks(configured: str) -> str:
    """How the agent's tracer will hook the set*id/setsid/fork/userns syscalls (agent/tracer/bpf_backend.py)."""
    if configured == "tracepoint":
        return "tracepoint (configured): every syscall of the node takes the kernel's slow path"
    try:
        from bcc import BPF

        from .tracer.bpf_backend import kprobes_unusable
        why = kprobes_unusable(BPF)
    except ImportError:
        return "-"
    if why is None:
        return "kprobe: only the hooked syscalls pay"
    return (f"{'unusable' if configured == 'kprobe' else 'tracepoint'}: {why}"
            + ("" if configured == "kprobe" else "; every syscall of the node takes the kernel's slow path"))


def report() -> dict:
    cfg = load()
    layout = detect()
    r: dict = {"node": {"kernel": platform.release(), "config": cfg.path}}
    cg: dict = {"layout": layout.mode, "cgroup2": layout.v2_root or "-",
                "cgroup2 controllers": " ".join(sorted(layout.v2_controllers)) or "-",
                "v1 hierarchies": " ".join(f"{k}={v}" for k, v in sorted(layout.v1.items())) or "-"}
    try:
        placement, subtree, why = cfg.placement(layout)
        cg.update({"placement": placement, "placement reason": why})
        d = get_driver(cfg.cgroup_mode, subtree, layout)
        if os.geteuid() == 0:
            d.ensure_subtree()  # probes cgroup.kill/freeze in our own subtree
        f = d.features()
        cg.update({"driver": f["mode"], "cgroup.kill": f["cgroup_kill"], "freezer": f["freeze"],
                   "pids limit": f["pids"], "subtree": " ".join(f["subtree"]),
                   "kill path": "cgroup.kill" if f["cgroup_kill"] else "freeze + SIGKILL loop"})
    except JobcageError as e:
        cg["driver"] = f"unusable: {e}"
    r["cgroups"] = cg
    held = "cgroup2" if layout.v2_root else ""
    if "freezer" in layout.v1:
        held += (" or " if held else "") + "v1 freezer"
    r["jobs"] = {"mode": "own",   # the default; attach per job with prologue --cgroup / --from-pid
                 "attach": f"prologue --cgroup PATH | --from-pid PID: a {held} cgroup the batch system made"
                 if held else "unavailable: no cgroup2 or v1 freezer hierarchy",
                 "attach job patterns": " ".join(cfg.attach_job_patterns) or "-",
                 "attach pids limit": "set by jobcage (site opt-in)" if cfg.attach_pids_limit
                 else "off: jobcage writes no limit in a batch system's cgroup"}
    bpf = _bpf()
    ok = bpf["bcc"] is True and bpf["tracefs"] and all(bpf["tracepoints"].values())
    backend = cfg.tracer_backend
    if backend == "auto":
        backend = "bpf" if ok else "proc"
    r["tracing"] = {"configured": cfg.tracer_backend, "will use": backend,
                    "bcc": bpf["bcc"], "tracefs": bpf["tracefs"], "btf": bpf["btf"],
                    "kernel facts": _kernel_facts() if backend == "bpf" else "none (proc connector): CPU of "
                    "exited tasks from taskstats, exec'd files stat'ed",
                    "kernel headers": bpf["kernel_headers"],
                    "syscall hooks": _syscall_hooks(cfg.tracer_syscall_hooks) if backend == "bpf" else "-",
                    **{f"tp {k}": v for k, v in bpf["tracepoints"].items()},
                    **{f"tp {k}": v for k, v in bpf["userns tracepoints"].items()},
                    "user namespaces": ("traced: entry, setns" + (", uid/gid map write-opens" if cfg.tracer_map_opens
                                                                  else "; maps read from /proc")
                                        if backend == "bpf"
                                        and all(bpf["userns tracepoints"].values()) else
                                        PROC_USERNS_BLIND if backend == "proc" else
                                        "partly: tracepoints missing (see tp lines)"),
                    "proc connector": "available" if os.geteuid() == 0 else "needs root"}
    try:
        from .client import call, socket_for

        info = call(socket_for(cfg), "ping", timeout=2)
        agent = {"running": True, **(info if isinstance(info, dict) else {})}
    except JobcageError as e:
        agent = {"running": False, "detail": str(e)}
    r["agent"] = {"socket": cfg.socket_path, **agent}
    r["state"] = {"database": cfg.db_path}
    return r
