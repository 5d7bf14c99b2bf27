"""`jobcage pam`: sshd sessions adopted into the user's running job (docs/ssh-adoption.md).

Called by pam_exec (as root, in sshd's account and/or session phase: PAM_TYPE, PAM_USER, PAM_RHOST and
SSH_CONNECTION in the environment).  It finds the session's sshd process (the root ``[priv]`` monitor,
whose later children are the user's session), asks the agent (or, when the agent does not answer within
``[pam] agent_timeout``, the direct root path) to move it into the user's job, and exits 0 to let the
login in or prints the site's one-line message and exits 1 to refuse it.  The whole decision has a
deadline (``[pam] timeout``, counted from this process's start): a hung agent or database never hangs a
login.  Hook-path rules: no click, rich, sqlite or typing imports unless the direct path needs them.
"""

from __future__ import annotations

import os
import sys

from jobcage.cgroups import proc

USAGE = "jobcage pam [--config PATH]   (from pam_exec: account or session phase of sshd)"
SSHD_NAMES = ("sshd", "sshd-session", "sshd-auth")


class _Deadline(Exception):
    pass


def _ppid_exe(pid: int) -> tuple[int, str] | None:
    st, exe = proc.stat(pid), proc.exe(pid)
    return (st.ppid, exe) if st is not None and exe else None


def _sshd_like(exe: str, caller_exe: str) -> bool:
    name = os.path.basename(exe)
    return exe == caller_exe or name in SSHD_NAMES or name.startswith("sshd-")


def session_pid(caller: int) -> int:
    """The process to adopt, from the process that called PAM (pam_exec's parent).

    sshd calls PAM in its root ``[priv]`` monitor (account and session phase; with PAM keyboard-interactive
    auth also in a forked auth "thread" below it).  Walking up through sshd processes, the chain ends at
    the listener; the process right below it is the connection's monitor: everything the session starts
    later (the unprivileged ``user@notty`` child, the shell, MPI ranks) forks from it.  The listener itself
    is never chosen (that would put every later connection into the job); a lone sshd (``sshd -i`` from
    inetd) is the connection itself."""
    first = _ppid_exe(caller)
    if first is None:
        raise LookupError(f"PAM caller {caller} is gone")
    caller_exe = first[1]
    if not _sshd_like(caller_exe, ""):
        raise LookupError(f"PAM caller {caller} is not sshd ({caller_exe})")
    chain = [caller]
    ppid = first[0]
    while ppid > 1:
        up = _ppid_exe(ppid)
        if up is None or not _sshd_like(up[1], caller_exe):
            break
        chain.append(ppid)
        ppid = up[0]
    return chain[-2] if len(chain) > 1 else chain[0]


def _exempt(cfg: object, name: str, uid: int, gid: int) -> str | None:
    if uid == 0:
        return "root"
    if name in cfg.pam_exempt_users:  # type: ignore[attr-defined]
        return "exempt user"
    groups = set(cfg.pam_exempt_groups)  # type: ignore[attr-defined]
    if groups:
        import grp

        for g in os.getgrouplist(name, gid):
            try:
                gname = grp.getgrgid(g).gr_name
            except KeyError:
                continue
            if gname in groups:
                return f"exempt group {gname}"
    return None


def _age() -> float:
    """Seconds since this process started (interpreter start-up included: sshd waits for all of it)."""
    import time

    st = proc.stat("self")
    if st is None:
        return 0.0
    return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - st.start_ticks / proc.CLK_TCK)


def _log(cfg: object | None, rec: dict) -> None:
    """syslog (authpriv, like every PAM module) and, when configured, one JSON line in [pam] log_file."""
    line = " ".join(f"{k}={v}" for k, v in rec.items() if v not in (None, "", []))
    try:
        import syslog

        syslog.openlog("jobcage-pam", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
        syslog.syslog(syslog.LOG_NOTICE if not rec.get("allow") else syslog.LOG_INFO, line)
    except OSError:
        pass
    path = getattr(cfg, "pam_log_file", "") if cfg is not None else ""
    if path:
        import json

        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, (json.dumps(rec) + "\n").encode())  # one write: lines of parallel logins stay whole
            finally:
                os.close(fd)
        except OSError:
            pass


def _already_adopted(cfg: object, pid: int, uid: int) -> str | None:
    """Session phase after the account phase adopted the monitor (and nothing moved it out since): the
    kernel says so — its cgroup in jobcage's subtree, owned by uid per the cgroup's trusted xattr — and
    no agent round trip (nor a hung agent's timeout) is needed."""
    import json

    from jobcage.cgroups import get_driver
    from jobcage.cgroups.errors import JobcageError

    try:
        d = get_driver(cfg.cgroup_mode, cfg.cgroup_subtree)  # type: ignore[attr-defined]
        name = d.cgroup_of(pid)
        meta = d.get_meta(name) if name else None
        return name if meta and json.loads(meta).get("owner_uid") == uid else None
    except (JobcageError, ValueError, AttributeError):
        return None  # let the full decision find out


def _decide(cfg: object, params: dict) -> tuple[dict, str]:
    """(answer, path): the agent when it answers in time, else the same method directly as root."""
    from .client import call, socket_for
    from .errors import AgentUnavailable

    try:
        # root's own listener: a user flooding the shared socket must not slow a login decision
        return call(socket_for(cfg), "sshd_adopt", timeout=cfg.pam_agent_timeout, **params), "agent"  # type: ignore
    except AgentUnavailable:
        pass
    from .api import Api, Caller
    from .lifecycle import JobManager
    from .store import Store

    # A stopped agent may hold the database's write lock: wait for it only briefly.
    m = JobManager(cfg, store=Store(cfg.db_path, timeout=0.3))  # type: ignore[attr-defined]
    return Api(m).dispatch(Caller(os.getpid(), 0, 0), "sshd_adopt", params), "direct"  # type: ignore


def main(argv: list[str]) -> int:
    args = argv[1:]
    config_path = None
    while args:
        a = args.pop(0)
        if a in ("-h", "--help"):
            print("usage: " + USAGE)
            return 0
        if a == "--config" and args:
            config_path = args.pop(0)
        elif a.startswith("--config="):
            config_path = a.partition("=")[2]
        else:
            print(f"jobcage pam: unexpected argument {a!r}\nusage: {USAGE}", file=sys.stderr)
            return 2
    env = os.environ
    if "PAM_TYPE" not in env:
        print(f"jobcage pam: not called by pam_exec (no PAM_TYPE)\nusage: {USAGE}", file=sys.stderr)
        return 2
    phase = env["PAM_TYPE"]
    if phase not in ("account", "open_session"):
        return 0  # auth, password, close_session: nothing to decide
    user = env.get("PAM_USER", "")
    conn = env.get("SSH_CONNECTION", "").split()
    rec: dict = {"user": user, "uid": None, "rhost": conn[0] if conn else env.get("PAM_RHOST", ""),
                 "rport": int(conn[1]) if len(conn) > 1 and conn[1].isdigit() else None,
                 "service": env.get("PAM_SERVICE", ""), "phase": phase}
    cfg = None
    import _signal

    def _expired(signum: int, frame: object) -> None:
        raise _Deadline()

    try:
        from .config import load

        cfg = load(config_path)
        rec["mode"] = cfg.pam_mode
        # One deadline for everything below: the agent call, the direct path, the database.
        _signal.signal(_signal.SIGALRM, _expired)
        _signal.setitimer(_signal.ITIMER_REAL, max(0.05, cfg.pam_timeout - _age()))
        if os.geteuid() != 0:
            raise PermissionError("must run as root (pam_exec without seteuid)")
        import pwd

        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise LookupError(f"unknown user {user!r}") from None
        rec["uid"] = pw.pw_uid
        why = _exempt(cfg, pw.pw_name, pw.pw_uid, pw.pw_gid)
        if why is not None:
            rec.update(decision="exempt", allow=True, reason=why)
            return _finish(cfg, rec, 0)
        pid = session_pid(os.getppid())
        rec["pid"] = pid
        hint = next((env[k] for k in cfg.pam_hint_env if env.get(k)), None)  # PAM env only (see docs)
        info = {k: rec[k] for k in ("user", "rhost", "rport", "service", "phase") if rec[k] is not None}
        params: dict = {"uid": pw.pw_uid, "pid": pid, "info": info, "dry_run": cfg.pam_mode == "log-only"}
        if hint:
            params["hint"] = hint
        done = _already_adopted(cfg, pid, pw.pw_uid) if phase == "open_session" else None
        if done:
            ans, rec["path"] = {"job_id": done, "adopted": True}, "kernel"
        else:
            ans, rec["path"] = _decide(cfg, params)
        _signal.setitimer(_signal.ITIMER_REAL, 0)
        rec["job_id"] = ans.get("job_id")
        if cfg.pam_mode == "log-only":
            rec.update(decision="would-adopt" if ans.get("job_id") else "would-deny", allow=True)
        elif ans.get("adopted"):
            rec.update(decision="adopted", allow=True, pick=ans.get("pick") or "already")
        elif cfg.pam_mode == "allow-unadopted":
            rec.update(decision="unadopted", allow=True, reason="no running job")
        else:
            rec.update(decision="denied", allow=False, reason="no running job")
        if ans.get("attached") and not ans.get("adopted"):
            # the user's jobs here are the batch system's and its own module did not put the session in
            rec.update(reason="only attached jobs, session not in one ([pam] attached = batch)",
                       attached=ans["attached"])
        if ans.get("suspended"):
            rec["suspended"] = ans["suspended"]
        return _finish(cfg, rec, 0 if rec["allow"] else 1)
    except BaseException as e:  # a login decision must always be made, whatever went wrong
        if isinstance(e, SystemExit | KeyboardInterrupt) and not isinstance(e, _Deadline):
            raise
        _signal.setitimer(_signal.ITIMER_REAL, 0)
        if cfg is None:
            # No readable config: nothing says what the site wants, and a typo must not open the node.
            # Fail closed, except for root (the admin who has to fix it).
            allow = _is_root(user)
        else:
            allow = cfg.pam_on_failure == "allow"
        rec.update(decision="error", allow=allow,
                   reason="deadline" if isinstance(e, _Deadline) else f"{type(e).__name__}: {e}")
        return _finish(cfg, rec, 0 if rec["allow"] else 1)


def _is_root(user: str) -> bool:
    import pwd

    try:
        return pwd.getpwnam(user).pw_uid == 0
    except KeyError:
        return False


def _finish(cfg: object | None, rec: dict, rc: int) -> int:
    import _signal

    _signal.setitimer(_signal.ITIMER_REAL, 0)
    rec["elapsed"] = round(_age(), 3)
    _log(cfg, rec)
    if rc:
        msg = getattr(cfg, "pam_message", "") or "Access denied by jobcage (configuration error on this node)"
        print(" ".join(msg.split()), flush=True)  # pam_exec `stdout`: the user's one line
    return rc


HINT_USAGE = "jobcage ssh-hint [--config PATH] [--exec]   (inside an ssh session: /etc/ssh/sshrc or ForceCommand)"


def hint_main(argv: list[str]) -> int:
    """`jobcage ssh-hint`: apply the batch system's hint (SLURM_JOB_ID & co., sent with ssh SendEnv) that
    PAM could not see.  Runs as the session's user; the agent moves the session only between that user's
    own jobs.  ``--exec`` (for sshd's ForceCommand) then runs the session's real command or login shell.
    Never blocks a session: any failure is one line on stderr and the session goes on where it is."""
    args = argv[1:]
    config_path, do_exec = None, False
    while args:
        a = args.pop(0)
        if a in ("-h", "--help"):
            print("usage: " + HINT_USAGE)
            return 0
        if a == "--exec":
            do_exec = True
        elif a == "--config" and args:
            config_path = args.pop(0)
        elif a.startswith("--config="):
            config_path = a.partition("=")[2]
        else:
            print(f"jobcage ssh-hint: unexpected argument {a!r}\nusage: {HINT_USAGE}", file=sys.stderr)
            return 2
    try:
        _apply_hint(config_path)
    except Exception as e:  # the session must go on whatever happened here
        print(f"jobcage ssh-hint: {e}", file=sys.stderr)
    if not do_exec:
        return 0
    import pwd

    shell = pwd.getpwuid(os.getuid()).pw_shell or "/bin/sh"
    cmd = os.environ.get("SSH_ORIGINAL_COMMAND")
    argv_ = [shell, "-c", cmd] if cmd else ["-" + os.path.basename(shell)]  # no command: a login shell
    try:
        os.execv(shell, argv_)
    except OSError as e:
        print(f"jobcage ssh-hint: cannot execute {shell}: {e.strerror}", file=sys.stderr)
        return 127
    return 0


def _apply_hint(config_path: str | None) -> None:
    from .config import load

    cfg = load(config_path)
    source = next((k for k in cfg.pam_hint_env if os.environ.get(k)), None)
    if source is None:
        return
    from .client import call
    from .errors import JobcageError

    job_id = os.environ[source]
    try:
        call(cfg.socket_path, "sshd_hint", timeout=max(cfg.pam_timeout, 1.0), job_id=job_id, source=source)
    except JobcageError as e:
        raise RuntimeError(f"{source}={job_id}: {e}; the session stays in the job it was given at login") from None
