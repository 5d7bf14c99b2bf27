"""A real, private, single-node Slurm for tests: munged + slurmctld + slurmd.

Nothing is mocked and nothing system-wide is touched: the munge key, socket, slurm.conf, state and spool dirs,
logs and ports are all private to one `SlurmCluster`, so several clusters (other sessions, other test modules)
can run on the same host at once.  Only processes this module started are ever signalled: the daemons through
their Popen handles, and whatever slurmd spawned (slurmstepd, job processes, escaped daemons) through a private
cgroup2 node that slurmd is started in.

    with SlurmCluster(prolog=..., task_prolog=..., epilog=...) as cluster:
        job = cluster.sbatch("#!/bin/sh\\nsleep 60\\n", user="jcsl1234")
        cluster.wait_state(job, "RUNNING")

Verified on Debian 12, Slurm 22.05.8: start to node idle takes about one second.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pytest
from jctest import JOBCAGE, JcEnv, free_port, require, wait_for

SBIN = "/usr/sbin"
CLIENT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Binaries a cluster needs; bootstrap installs them (munge, slurmctld, slurmd, slurm-client, util-linux, passwd).
REQUIRED_BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo", "scancel",
                     "runuser", "useradd", "userdel")
# sinfo %t states of a node with no job activity left (a trailing '*' means not responding).
SETTLED_NODE_STATES = frozenset({"idle", "drain", "down", "idle*", "drain*", "down*"})
# States after which a job never runs again (scontrol's names).
TERMINAL_STATES = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
                             "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT"})


class SlurmClusterError(RuntimeError):
    """The private cluster failed to start, or a Slurm command failed; the message carries the logs."""


def missing_prerequisites() -> list[str]:
    """What this host lacks to run a SlurmCluster (empty list: all there)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("must run as root")
    for name in REQUIRED_BINARIES:
        if shutil.which(name, path=CLIENT_PATH) is None:
            missing.append(f"binary {name!r} not found")
    try:
        pwd.getpwnam("munge")
    except KeyError:
        missing.append("user 'munge' does not exist (install the munge package)")
    return missing


# --- a private cgroup2 node: lets teardown kill everything slurmd spawned, and nothing else --------------------

def cgroup2_mount() -> Path | None:
    """Where cgroup2 is mounted (/sys/fs/cgroup on pure v2, /sys/fs/cgroup/unified on hybrid), or None."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return Path(fields[1])
    return None


class _KillGroup:
    """One cgroup2 directory.  Processes moved elsewhere later (e.g. by jobcage) are not affected."""

    def __init__(self, name: str) -> None:
        mount = cgroup2_mount()
        self.path: Path | None = None
        if mount is not None and (mount / "cgroup.procs").exists():
            self.path = mount / name
            self.path.mkdir()

    def kill_all(self, timeout: float = 10.0) -> None:
        if self.path is None or not self.path.exists():
            return
        deadline = time.monotonic() + timeout
        while pids := [int(p) for p in (self.path / "cgroup.procs").read_text().split()]:
            if (self.path / "cgroup.kill").exists():
                (self.path / "cgroup.kill").write_text("1")
            else:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise TimeoutError(f"processes in {self.path} survive SIGKILL: {pids}")
            time.sleep(0.05)

    def remove(self, timeout: float = 10.0) -> None:
        if self.path is None or not self.path.exists():
            return
        self.kill_all(timeout)
        # rmdir fails with EBUSY for a short while after the last process died (exit is asynchronous).
        wait_for(lambda: _try_rmdir(self.path), timeout, f"rmdir {self.path}")


def _try_rmdir(path: Path | None) -> bool:
    try:
        if path is not None:
            path.rmdir()
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


# --- the cluster -----------------------------------------------------------------------------------------------

class SlurmCluster:
    """munged + slurmctld + slurmd with private config, state, sockets and ports.

    Paths (all under `root`, which is world-traversable because munged runs as user munge and test users
    read slurm.conf and write job output):  munge/ (key, socket), slurm.conf, state/, spool/, log/, jobs/ (1777).
    """

    def __init__(
        self,
        base_dir: str | Path | None = None,
        *,
        prolog: str | Path | None = None,
        task_prolog: str | Path | None = None,
        epilog: str | Path | None = None,
        extra_conf: Mapping[str, str] | None = None,
        startup_timeout: float = 60.0,
        command_timeout: float = 30.0,
        keep: bool = False,
        slurmd_unit: str | None = None,
        cgroup_conf: Mapping[str, str] | None = None,
        slurmd_env: Mapping[str, str] | None = None,
    ) -> None:
        """base_dir: where to create the cluster dir (default: the system temp dir).  It must be traversable
        by other users (pytest's tmp_path is not: /tmp/pytest-of-root is 0700) and short: munge's and
        slurmstepd's Unix socket paths must stay under 108 bytes.
        prolog / task_prolog / epilog: absolute paths of hook programs (Prolog runs with PrologFlags=Alloc).
        extra_conf: slurm.conf keys to add or override (e.g. {"KillWait": "10"}).
        keep: leave the cluster dir in place after stop() (for debugging; KEEP_SLURM_CLUSTER=1 does the same).
        slurmd_unit: run slurmd under systemd as this transient unit (systemd-run, Delegate=yes, KillMode=process
        like Debian's slurmd.service) instead of as a child; stop() kills what is left in the unit's cgroup.
        cgroup_conf: cgroup.conf keys (e.g. {"CgroupPlugin": "cgroup/v2"}), written next to slurm.conf (where
        Slurm reads it) when given.
        slurmd_env: extra environment for slurmd (and so its plugins), e.g. {"JOBCAGE_SLURM_TIMEOUT": "120"}.
        """
        base = Path(base_dir) if base_dir is not None else Path(tempfile.gettempdir())
        _check_traversable(base)
        self.root = Path(tempfile.mkdtemp(prefix="jcslurm-", dir=base))
        self.root.chmod(0o755)
        self.name = self.root.name.replace("-", "").replace("_", "").lower()[:20]
        self.node = socket.gethostname().split(".")[0]
        self.hooks = {"Prolog": prolog, "TaskProlog": task_prolog, "Epilog": epilog}
        self.extra_conf = dict(extra_conf or {})
        self.startup_timeout = startup_timeout
        self.command_timeout = command_timeout
        self.keep = keep or os.environ.get("KEEP_SLURM_CLUSTER") == "1"
        self.slurmd_unit = slurmd_unit
        self.cgroup_conf = dict(cgroup_conf) if cgroup_conf is not None else None
        self.slurmd_env = dict(slurmd_env or {})
        self.munge_dir = self.root / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.conf_path = self.root / "slurm.conf"
        self.log_dir = self.root / "log"
        self.jobs_dir = self.root / "jobs"
        # Job ids start at a random base so that ids of successive or concurrent private clusters do not collide
        # in anything that outlives the cluster (jobcage's store, logs, cgroup names).
        self.first_job_id = random.randrange(1_000, 60_000) * 1_000
        self.startup_seconds: float | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._killgroup: _KillGroup | None = None
        self._script_seq = 0
        self.ctld_port = 0
        self.slurmd_port = 0

    # -- lifecycle --

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm clients (sbatch, scontrol, ...) talking to this cluster."""
        return {"PATH": CLIENT_PATH, "LANG": "C.UTF-8", "SLURM_CONF": str(self.conf_path)}

    def start(self) -> None:
        t0 = time.monotonic()
        try:
            for sub in ("state", "spool", "log"):
                (self.root / sub).mkdir(mode=0o755)
            self.jobs_dir.mkdir()
            self.jobs_dir.chmod(0o1777)  # like /tmp: every test user writes its job output here
            self._killgroup = _KillGroup(f"{self.root.name}.slurmd")
            self._start_munged()
            # A free port can be taken between our probe and the daemon's bind: retry with new ports.
            for attempt in range(3):
                self.ctld_port, self.slurmd_port = free_port(), free_port()
                self._write_conf()
                try:
                    self._start_slurm()
                    break
                except SlurmClusterError:
                    if attempt == 2 or "Address already in use" not in self.logs():
                        raise
                    self._stop_slurm()
            self.startup_seconds = time.monotonic() - t0
        except BaseException:
            print(self.logs())
            with contextlib.suppress(Exception):
                self.stop()
            raise

    def stop(self) -> None:
        """Cancel jobs, stop the daemons (SIGTERM, then SIGKILL), kill what slurmd spawned, remove the dir."""
        errors: list[str] = []
        if self._running("slurmctld"):
            try:
                for job in self.squeue():
                    self.scancel(job["job_id"])
                # Let slurmd finish the kills and run the Epilog: the node leaves alloc/comp when it has
                # (a failed Epilog drains it instead; that is for the test to judge, not for teardown).
                self.wait_node_state(SETTLED_NODE_STATES, timeout=self.command_timeout)
            except (SlurmClusterError, subprocess.TimeoutExpired) as e:
                errors.append(f"job cleanup: {e}")
        self._stop_slurm()
        if self._killgroup is not None:
            try:
                self._killgroup.remove()
            except (TimeoutError, pytest.fail.Exception) as e:   # kill_all's, or wait_for's (rmdir)
                errors.append(str(e))
        self._stop_proc("munged")
        if errors:
            print(self.logs())
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)
        if errors:
            raise SlurmClusterError("; ".join(errors))

    # -- daemons --

    def _start_munged(self) -> None:
        munge = pwd.getpwnam("munge")
        self.munge_dir.mkdir(mode=0o755)  # munged insists: owned by munge, not writable by others
        os.chown(self.munge_dir, munge.pw_uid, munge.pw_gid)
        key = self.munge_dir / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        try:
            os.write(fd, secrets.token_bytes(1024))
        finally:
            os.close(fd)
        os.chown(key, munge.pw_uid, munge.pw_gid)
        # -F: foreground, so the Popen handle is munged itself; it logs to stderr then.
        self._spawn("munged", [
            f"{SBIN}/munged", "-F", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={self.munge_dir / 'munged.pid'}", f"--seed-file={self.munge_dir / 'munged.seed'}",
            f"--log-file={self.munge_dir / 'munged.log'}",
        ], user=munge.pw_uid, group=munge.pw_gid)
        wait_for(self._munge_works, self.startup_timeout, "munged to answer on its socket", interval=0.05)

    def _munge_works(self) -> bool:
        self._check_alive("munged")
        if not self.munge_socket.exists():
            return False
        proc = subprocess.run(["munge", "-n", "-S", str(self.munge_socket)], capture_output=True,
                              timeout=self.command_timeout)
        return proc.returncode == 0

    def _start_slurm(self) -> None:
        conf = str(self.conf_path)
        self._spawn("slurmctld", [f"{SBIN}/slurmctld", "-D", "-f", conf])
        # slurmd goes into the cluster's own cgroup before exec: every slurmstepd and job process it spawns
        # inherits it, so stop() can kill exactly those, escaped daemons included.
        argv = [f"{SBIN}/slurmd", "-D", "-f", conf]
        if self.slurmd_unit is not None:
            # under systemd, like a site's slurmd.service: its cgroup is the unit's (the kill group of stop())
            subprocess.run(["systemctl", "reset-failed", self.slurmd_unit], capture_output=True, timeout=60)
            r = subprocess.run(["systemd-run", f"--unit={self.slurmd_unit}", "--property=Delegate=yes",
                                "--property=KillMode=process", f"--working-directory={self.root}",
                                *(f"--setenv={k}={v}" for k, v in {**self.env, "HOME": str(self.root),
                                                                    **self.slurmd_env}.items()),
                                "--", *argv], capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                raise SlurmClusterError(f"systemd-run slurmd: {r.stderr.strip()}")
            self.wait_node_state({"idle"}, timeout=self.startup_timeout)
            return
        if self._killgroup is not None and self._killgroup.path is not None:
            argv = ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self._killgroup.path)] + argv
        self._spawn("slurmd", argv, extra_env=self.slurmd_env)
        self.wait_node_state({"idle"}, timeout=self.startup_timeout)

    def _stop_slurm(self) -> None:
        if self.slurmd_unit is not None:
            # KillMode=process stops slurmd only; then SIGKILL whatever is left in the unit's cgroup
            for argv in (["systemctl", "stop", self.slurmd_unit],
                         ["systemctl", "kill", "--signal=SIGKILL", self.slurmd_unit],
                         ["systemctl", "reset-failed", self.slurmd_unit]):
                subprocess.run(argv, capture_output=True, timeout=120)
        self._stop_proc("slurmd")
        self._stop_proc("slurmctld")

    def _spawn(self, name: str, argv: list[str], user: int | None = None, group: int | None = None,
               extra_env: Mapping[str, str] | None = None) -> None:
        with open(self.log_dir / f"{name}.out", "ab") as out:  # Popen keeps its own copy of the fd
            self._procs[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=self.root,
                env={**self.env, "HOME": str(self.root), **(extra_env or {})}, user=user, group=group,
                extra_groups=[] if user is not None else None,
                start_new_session=True,  # keep terminal signals (^C on pytest) for our own teardown
            )

    def _running(self, name: str) -> bool:
        proc = self._procs.get(name)
        return proc is not None and proc.poll() is None

    def _check_alive(self, name: str) -> None:
        if name == "slurmd" and self.slurmd_unit is not None:
            r = subprocess.run(["systemctl", "is-active", self.slurmd_unit], capture_output=True, text=True,
                               timeout=60)
            if r.stdout.strip() not in ("active", "activating", "reloading"):
                raise SlurmClusterError(f"{self.slurmd_unit} is {r.stdout.strip()}\n{self.logs()}")
            return
        proc = self._procs.get(name)
        if proc is not None and proc.poll() is not None:
            raise SlurmClusterError(f"{name} exited with status {proc.returncode}\n{self.logs()}")

    def _stop_proc(self, name: str, grace: float = 10.0) -> None:
        proc = self._procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)

    def _write_conf(self) -> None:
        cpus, memory = _node_resources()
        conf: dict[str, str] = {
            "ClusterName": self.name,
            "SlurmctldHost": f"{self.node}(127.0.0.1)",
            "SlurmctldPort": str(self.ctld_port),
            "SlurmdPort": str(self.slurmd_port),
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.munge_socket}",  # used by auth/munge and cred/munge alike
            "StateSaveLocation": str(self.root / "state"),
            "SlurmdSpoolDir": str(self.root / "spool"),
            "SlurmctldPidFile": str(self.root / "slurmctld.pid"),
            "SlurmdPidFile": str(self.root / "slurmd.pid"),
            "SlurmctldLogFile": str(self.log_dir / "slurmctld.log"),
            "SlurmdLogFile": str(self.log_dir / "slurmd.log"),
            "SlurmctldDebug": "debug",
            "SlurmdDebug": "debug",
            # Containment is left to jobcage: Slurm tracks processes by parentage only, binds nothing.
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "JobCompType": "jobcomp/none",
            "SchedulerType": "sched/builtin",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core",
            "MpiDefault": "none",
            "ReturnToService": "2",
            "MailProg": "/bin/true",
            "FirstJobId": str(self.first_job_id),
            "KillWait": "5",  # seconds between SIGTERM and SIGKILL on cancel: short keeps teardown quick
            "PrologFlags": "Alloc",
        }
        for key, path in self.hooks.items():
            if path is not None:
                conf[key] = str(path)
        conf.update(self.extra_conf)
        lines = [f"{k}={v}" for k, v in conf.items()]
        lines.append(f"NodeName={self.node} NodeHostname={self.node} NodeAddr=127.0.0.1 CPUs={cpus} "
                     f"RealMemory={memory} State=UNKNOWN")
        lines.append(f"PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP")
        self.conf_path.write_text("\n".join(lines) + "\n")
        self.conf_path.chmod(0o644)
        if self.cgroup_conf is not None:
            cg = self.conf_path.with_name("cgroup.conf")
            cg.write_text("".join(f"{k}={v}\n" for k, v in self.cgroup_conf.items()))
            cg.chmod(0o644)

    # -- diagnostics --

    def logs(self, tail: int = 60) -> str:
        """The last lines of every daemon log, for failure messages."""
        parts = []
        for path in sorted(self.log_dir.glob("*")) + sorted(self.munge_dir.glob("*.log")):
            try:
                lines = path.read_text(errors="replace").splitlines()[-tail:]
            except OSError:
                continue
            parts.append(f"---- {path} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(parts)

    # -- clients --

    def run(self, *argv: str, user: str | None = None, check: bool = True,
            timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client against this cluster, as root or (runuser) as `user`."""
        cmd = list(argv) if user is None else ["runuser", "-u", user, "--", *argv]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=self.jobs_dir,
                              timeout=timeout or self.command_timeout)
        if check and proc.returncode != 0:
            raise SlurmClusterError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def scontrol(self, *args: str) -> str:
        return self.run("scontrol", *args).stdout

    def sbatch(self, script_text: str, user: str, *args: str, env: Mapping[str, str] | None = None) -> int:
        """Submit `script_text` as `user`; returns the job id.  The script is written to jobs/ (mode 0755) and the
        job's stdout+stderr go to jobs/slurm-<jobid>.out.  `env`: extra variables in the submitting environment
        (sbatch exports the whole environment to the job by default)."""
        self._script_seq += 1
        script = self.jobs_dir / f"job{self._script_seq}.sh"
        script.write_text(script_text)
        script.chmod(0o755)
        argv = ["sbatch", "--parsable", f"--chdir={self.jobs_dir}",
                f"--output={self.jobs_dir / 'slurm-%j.out'}", *args, str(script)]
        cmd = ["runuser", "-u", user, "--", *argv]
        if env:
            cmd = ["runuser", "-u", user, "--", "env", *(f"{k}={v}" for k, v in env.items()), *argv]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=self.jobs_dir,
                              timeout=self.command_timeout)
        if proc.returncode != 0:
            raise SlurmClusterError(f"sbatch as {user} failed ({proc.returncode}): {proc.stderr.strip()}\n"
                                    f"{self.logs()}")
        return int(proc.stdout.strip().split(";")[0])

    def job_output(self, job_id: int) -> str:
        path = self.jobs_dir / f"slurm-{job_id}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def job_info(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, UserId, ...); empty if slurmctld no longer knows the job."""
        proc = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        if proc.returncode != 0:
            return {}
        info = {}
        for token in proc.stdout.split():
            key, sep, value = token.partition("=")
            if sep:
                info[key] = value
        return info

    def job_state(self, job_id: int) -> str | None:
        return self.job_info(job_id).get("JobState")

    def wait_state(self, job_id: int, states: str | Iterable[str], timeout: float = 60.0) -> str:
        """Wait until the job is in one of `states` (e.g. "RUNNING", {"CANCELLED", "COMPLETED"}); returns the
        state.  Fails early if the job reaches a terminal state that is not wanted."""
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            self._check_alive("slurmctld")
            state = self.job_state(job_id)
            if state in wanted:
                return state
            if state in TERMINAL_STATES:
                break
            time.sleep(0.1)
        raise SlurmClusterError(f"job {job_id}: state {state}, wanted {sorted(wanted)}\n"
                                f"{self.job_info(job_id)}\njob output:\n{self.job_output(job_id)}\n{self.logs()}")

    def node_state(self) -> str:
        """sinfo-style short state, from scontrol's node record: sinfo's %t lagged once under heavy
        load ('mix' for over a minute while scontrol said State=IDLE CPUAlloc=0)."""
        out = self.run("scontrol", "-o", "show", "node", self.node, check=False).stdout
        m = re.search(r"\bState=(\S+)", out)
        if not m:
            return ""
        base, *flags = m.group(1).split("+")
        star = "*" if base.endswith("*") or "NOT_RESPONDING" in flags else ""
        base = base.rstrip("*~#!%$@^-").lower()
        if "DRAIN" in flags:
            return ("drain" if base == "idle" else "drng") + star
        if "COMPLETING" in flags:
            return "comp" + star
        return {"allocated": "alloc", "mixed": "mix"}.get(base, base) + star

    def wait_node_state(self, states: Iterable[str], timeout: float = 60.0) -> str:
        """Wait for the node's short state (sinfo %t: idle, alloc, mix, comp, drain, ...).  After a job ends the
        node shows `comp` until the Epilog is done, then `idle`."""
        wanted = set(states)

        def check() -> str | None:
            self._check_alive("slurmctld")
            self._check_alive("slurmd")
            state = self.node_state()
            return state if state in wanted else None
        try:
            return str(wait_for(check, timeout, f"node {self.node} in state {sorted(wanted)}", interval=0.1))
        except pytest.fail.Exception as e:   # wait_for's timeout: say where the node is, with the logs
            raise SlurmClusterError(f"{e} (now {self.node_state()!r})\n{self.logs()}") from e

    def scancel(self, job_id: int, *args: str) -> None:
        self.run("scancel", *args, str(job_id))

    def squeue(self) -> list[dict[str, str]]:
        """Jobs slurmctld still lists (pending, running, suspended, completing)."""
        out = self.run("squeue", "-h", "-o", "%i|%T|%u|%j").stdout
        rows = []
        for line in out.splitlines():
            job_id, state, user, name = line.split("|", 3)
            rows.append({"job_id": job_id, "state": state, "user": user, "name": name})
        return rows

    def listpids(self, job_id: int) -> set[int]:
        """The pids Slurm's proctrack plugin knows for the job (`scontrol listpids`, as on the node)."""
        proc = self.run("scontrol", "listpids", str(job_id), check=False)
        pids = set()
        for line in proc.stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0].isdigit():
                pids.add(int(fields[0]))
        return pids


def _node_resources() -> tuple[int, int]:
    """CPUs and RealMemory (MiB) as slurmd itself detects them, so the node registers without mismatch."""
    out = subprocess.run([f"{SBIN}/slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
    values = dict(token.split("=", 1) for token in out.split() if "=" in token)
    return int(values.get("CPUs", os.cpu_count() or 1)), int(values.get("RealMemory", 1024))


def _check_traversable(path: Path) -> None:
    """munged (as munge) and job users must reach files under `path`: every ancestor needs o+x."""
    for p in [path.resolve(), *path.resolve().parents]:
        if not p.stat().st_mode & 0o001:
            raise ValueError(f"{p} is not traversable by other users (mode {p.stat().st_mode & 0o777:o}); "
                             "pass a base_dir like /tmp (pytest's tmp_path is under a 0700 dir)")


@contextlib.contextmanager
def slurm_cluster(base_dir: str | Path | None = None, **kwargs: object) -> Iterator[SlurmCluster]:
    """Context-manager form of SlurmCluster(...); same keyword arguments."""
    cluster = SlurmCluster(base_dir, **kwargs)  # type: ignore[arg-type]
    with cluster:
        yield cluster


# --- jobcage's Slurm site, as docs/batch-systems.md sets it up (the fixtures in conftest.py build on these) ------

REPO = Path(__file__).resolve().parent.parent
SLURM_HOOKS = REPO / "hooks" / "slurm"
FRAGMENT = SLURM_HOOKS / "slurm.conf.fragment"
PLUGIN_BUILD = REPO / "scripts" / "build-slurm-plugin.sh"


def require_slurm() -> None:
    """A private cluster, the plugin build and the sudo payloads can run here (else skip; FAIL under CI)."""
    missing = missing_prerequisites()
    for tool in ("gcc", "sudo", "visudo", "setsid"):
        if shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
            missing.append(f"{tool} not found")
    require(not missing, "Slurm e2e prerequisites missing: " + "; ".join(missing))


def slurm_plugin_dir() -> str:
    """Where the distribution's Slurm plugins live (Debian, EL)."""
    for pattern in ("/usr/lib/*/slurm-wlm/task_none.so", "/usr/lib64/slurm/task_none.so", "/usr/lib/slurm/task_none.so"):
        found = glob.glob(pattern)
        if found:
            return str(Path(found[0]).parent)
    require(False, "Slurm's own plugins (task_none.so) not found")
    raise AssertionError("unreachable")


def fragment() -> dict[str, str]:
    """slurm.conf settings from the fragment sites install (key=value lines, comments skipped)."""
    conf = {}
    for line in FRAGMENT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            conf[key.strip()] = value.strip()
    return conf


def hook_dir(jc_env: JcEnv, plugin_so: Path, names: Iterable[str] = ("prolog", "task_prolog", "epilog")) -> Path:
    """hooks/slurm/<names> (symlinked), task_jobcage.so and, next to both, a `jobcage` that uses the test's
    config -- the hooks and the plugin prefer a jobcage beside them.  Under jc_env.base: removed with it."""
    d = jc_env.base / "hooks"
    d.mkdir(mode=0o755)
    for name in names:
        (d / name).symlink_to(SLURM_HOOKS / name)
    shutil.copy(plugin_so, d / "task_jobcage.so")
    (d / "jobcage").write_text(f"#!/bin/sh\nJOBCAGE_CONFIG={jc_env.config_path}\nexport JOBCAGE_CONFIG\n"
                               f'exec {JOBCAGE} "$@"\n')
    (d / "jobcage").chmod(0o755)
    return d


def site_cluster(jc_env: JcEnv, plugin_so: Path, task_prolog: bool = True) -> SlurmCluster:
    """A private cluster configured from the fragment: Prolog (+ TaskProlog) + Epilog + task/jobcage."""
    hooks = hook_dir(jc_env, plugin_so, ("prolog", "task_prolog", "epilog") if task_prolog else ("prolog", "epilog"))
    conf = fragment()
    assert conf.get("TaskPlugin") == "task/jobcage", "the fragment must enable the plugin"
    for key in ("Prolog", "TaskProlog", "Epilog"):
        conf.pop(key, None)
    conf["PluginDir"] = f"{slurm_plugin_dir()}:{hooks}"
    if os.environ.get("JC_SLURM_DEBUG"):  # verbose daemon logs when hunting a problem (KEEP_SLURM_CLUSTER=1)
        conf.update(SlurmctldDebug="debug3", SlurmdDebug="debug3")
    conf["KillWait"] = "5"  # the fragment's 30 s would only slow the tests down
    return SlurmCluster("/tmp", prolog=hooks / "prolog", task_prolog=hooks / "task_prolog" if task_prolog else None,
                        epilog=hooks / "epilog", extra_conf=conf)


def epilog_done(cluster: SlurmCluster, jc_env: JcEnv, job: int, timeout: float = 60.0) -> None:
    """The job left Slurm's queue (no longer completing: the Epilog has run), jobcage ended it, and the
    node was not drained (a failing Epilog drains it)."""
    def done() -> bool:
        return (str(job) not in {r["job_id"] for r in cluster.squeue()}
                and jc_env.jobcage("show", str(job), "--json").json()["state"] == "ended")
    wait_for(done, timeout, f"job {job} to leave the queue with its jobcage epilogue done")
    state = cluster.wait_node_state({"idle", "drain", "drng", "down"}, timeout=30)
    assert state == "idle", f"node {state} after job {job}:\n{cluster.scontrol('show', 'node')}\n{cluster.logs()}"
