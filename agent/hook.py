"""The hook path: `jobcage prologue|adopt|run|epilogue`, called once per job by
the batch system.  Hand-parsed and importing only what it needs (no click, no
rich): it must start in a few milliseconds.  Other commands live in agent/cli.py.
"""

from __future__ import annotations

import os
import sys

USAGE = {
    "prologue": "jobcage prologue JOB_ID --uid UID [--gid GID] [--pids-max N | --pids-request N] [--pid PID] "
                "[--cgroup PATH | --from-pid PID] [--json]",
    "adopt": "jobcage adopt JOB_ID [--pid PID] [--export-tmpdir]   (default pid: the caller's parent)",
    "run": "jobcage run JOB_ID -- CMD [ARG...]",
    "epilogue": "jobcage epilogue JOB_ID [--json] [--missing-ok] [--keep PATH]...",
}
VALUED = {"prologue": {"--uid", "--gid", "--pids-max", "--pids-request", "--pid", "--cgroup", "--from-pid"},
          "adopt": {"--pid"}, "run": set(), "epilogue": {"--keep"}}
MULTI = {"--keep"}   # repeatable
FLAGS = {"prologue": {"--json"}, "adopt": {"--export-tmpdir"}, "run": set(), "epilogue": {"--json", "--missing-ok"}}


class UsageError(Exception):
    pass


def parse(cmd: str, args: list[str]) -> tuple[str, dict[str, str | bool | list[str]], list[str]]:
    opts: dict[str, str | bool | list[str]] = {}
    pos: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            rest = args[i + 1:]
            break
        name, eq, val = a.partition("=")
        if name in VALUED[cmd]:
            if not eq:
                i += 1
                if i >= len(args):
                    raise UsageError(f"option {name} needs a value")
                val = args[i]
            if name in MULTI:
                opts.setdefault(name, []).append(val)  # type: ignore[union-attr]
            else:
                opts[name] = val
        elif a in FLAGS[cmd]:
            opts[a] = True
        elif a.startswith("--"):
            raise UsageError(f"no such option: {a}")
        else:
            pos.append(a)
        i += 1
    if len(pos) != 1:
        raise UsageError("expected exactly one JOB_ID")
    if cmd == "run" and not rest:
        raise UsageError("missing command after --")
    return pos[0], opts, rest


def _int(opts: dict, name: str) -> int | None:
    v = opts.get(name)
    if v is None:
        return None
    try:
        return int(str(v))
    except ValueError:
        raise UsageError(f"{name} takes a number, not {v!r}") from None


def _print_summary(s: dict) -> None:
    idents = ", ".join(f"{i['user']}({i['uid']}) {i['cpu_seconds']}s" for i in s.get("identities", []))
    print(f"job {s['job_id']}: ended; cpu {s.get('cpu_seconds')}s; fork limit hits {s.get('pids_limit_hits')}; "
          f"identities: {idents or '-'}")


def in_cgroup(pid: int, *cgroups: str) -> bool:
    """Whether the kernel (/proc/PID/cgroup) has pid in one of the cgroupfs directories `cgroups` or below."""
    from jobcage.cgroups import proc

    lines = proc.cgroups(pid)
    if lines is None:
        return False
    paths = set(lines.values())
    mounts = [m.rstrip("/") for _t, m, _o in proc.cgroup_mounts()]
    rels = [c[len(m):] for c in cgroups for m in mounts if c.startswith(m + "/")]
    return any(r and (p == r or p.startswith(r + "/")) for r in rels for p in paths)


def _verify_joined(job_id: str, pid: int, result: object) -> str | None:
    """After adopt/run said ok: the kernel must agree.  A reply alone proves nothing (whoever answered
    may lie); the job's cgroup comes from the reply, else from the (root-owned) config's subtree."""
    cgroup = result.get("cgroup") if isinstance(result, dict) else None
    if not isinstance(cgroup, str) or not cgroup.startswith("/"):
        from .config import load

        cfg = load()
        from jobcage.cgroups import proc

        cgroup = None
        if in_cgroup(pid, *(f"{mnt.rstrip('/')}/{cfg.cgroup_subtree.strip('/')}/{job_id}"
                            for _t, mnt, _o in proc.cgroup_mounts())):
            return None
    elif in_cgroup(pid, cgroup):
        return None
    return f"the kernel does not show process {pid} in job {job_id}'s cgroup ({cgroup or 'unknown'}): not contained"


def exit_now(rc: int) -> None:
    """Exit without the interpreter's teardown (freeing every module and object: ~3 ms of a hook that
    takes ~20).  Nothing on the hook path needs it: the socket is closed, files are closed by their
    with-blocks, no atexit handler.  What was printed is flushed first."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        rc = rc or 120   # the interpreter's own status when stdout cannot be flushed at exit
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(rc)


def main(argv: list[str]) -> int:
    cmd, args = argv[0], argv[1:]
    if "-h" in args or "--help" in args[: args.index("--") if "--" in args else len(args)]:
        print("usage: " + USAGE[cmd])
        return 0
    try:
        job_id, opts, rest = parse(cmd, args)
        params: dict[str, object] = {"job_id": job_id}
        if cmd == "prologue":
            uid = _int(opts, "--uid")
            if uid is None:
                raise UsageError("--uid is required")
            params.update(uid=uid, gid=_int(opts, "--gid"), pids_max=_int(opts, "--pids-max"),
                          pid=_int(opts, "--pid"), pids_request=_int(opts, "--pids-request"),
                          cgroup=opts.get("--cgroup"), from_pid=_int(opts, "--from-pid"))
            if "--cgroup" in opts and "--from-pid" in opts:
                raise UsageError("--cgroup and --from-pid exclude each other")
        elif cmd == "adopt":
            pid = _int(opts, "--pid")
            params["pid"] = os.getppid() if pid is None else pid
        elif cmd == "run":
            params["pid"] = os.getpid()
        elif cmd == "epilogue" and opts.get("--keep"):
            # the batch system's stdout/stderr files of the job: never cleaned up
            params["keep"] = [os.path.abspath(str(k)) for k in opts["--keep"]]  # type: ignore[union-attr]
    except UsageError as e:
        print(f"jobcage {cmd}: {e}\nusage: {USAGE[cmd]}", file=sys.stderr)
        return 2

    from .client import invoke
    from .errors import JobcageError, NoSuchJob

    method = "adopt" if cmd == "run" else cmd
    try:
        result = invoke(method, **{k: v for k, v in params.items() if v is not None})
    except NoSuchJob as e:
        # Batch epilogs run for every job, also ones started before jobcage was
        # installed or whose prologue failed: --missing-ok keeps the node in service.
        print(f"jobcage {cmd}: {e}", file=sys.stderr)
        return 0 if opts.get("--missing-ok") else 1
    except JobcageError as e:
        print(f"jobcage {cmd}: {e}", file=sys.stderr)
        return 1
    if method == "adopt":
        bad = _verify_joined(job_id, int(params["pid"]), result)  # type: ignore[call-overload]
        if bad:
            print(f"jobcage {cmd}: {bad}", file=sys.stderr)
            return 1
    tmpdir = result.get("tmpdir") if isinstance(result, dict) else None
    if cmd == "run":
        if tmpdir:
            os.environ["TMPDIR"] = tmpdir  # the job's private TMPDIR, for the command we exec
        try:
            os.execvp(rest[0], rest)
        except OSError as e:
            print(f"jobcage run: cannot execute {rest[0]}: {e.strerror}", file=sys.stderr)
            return 127
    if opts.get("--export-tmpdir") and tmpdir:
        print(f"export TMPDIR={tmpdir}")  # the form Slurm's TaskProlog output understands
    if opts.get("--json"):
        import json

        print(json.dumps(result, indent=2))
    elif cmd == "epilogue" and isinstance(result, dict):
        _print_summary(result)
    return 0
