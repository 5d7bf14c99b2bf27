#!/usr/bin/env python3
"""What tracing costs: fork+exec throughput under jobcage's tracer and its peers, identity events at 5,000
setuid calls/s, and the agent's CPU while a job execs 1,000 times a second.

1. Throughput.  A small C spawner (compiled with gcc here) runs 2 workers, each looping fork + execve(/bin/true)
   + waitpid.  Configurations, interleaved in rounds of short runs (default 6 x 2 s each: these VMs are noisy),
   medians compared with the no-tracer baseline:
     none                  no tracer; the spawner in a job's cgroup (like every other "in job" run)
     none, outside job     no tracer; the spawner in the bench's own cgroup
     jobcage               the real `jobcage agent` ([tracer] backend = bpf), the spawner inside a job: every
                           exec is an event the agent decodes and writes to its audit trail
     jobcage, outside job  the agent running, the spawner in no job: the cost of the in-kernel job filter alone
     auditd execve rule    `auditctl -a always,exit -F arch=b64 -S execve -k jcbench`, a private auditd
                           (log in the bench's temp dir) consuming the records, backlog limit 8192
     bpftrace              `bpftrace -o /dev/null` printing every tracepoint:sched:sched_process_exec
   The agent is started before and stopped after each round's jobcage runs (its BPF programs are detached for
   the others); auditd runs throughout, but audit is enabled and the rule loaded only for its own runs.  Audit is
   enabled once before the first round so every run sees the same kernel state: once enabled, the kernel gives
   every new task an audit context until reboot (a small cost the "none" runs then include too).  Each run also
   says where the 2 CPUs' time went per exec: the spawner (with its children), the agent, the node's idle time and
   the rest (/proc/stat), as means and as the change against the baseline's runs of the same rounds.
2. Identity events.  A C loop, root inside a job, alternates setresuid(U, U, 0) / setresuid(0, 0, 0) (a real uid
   switch and back) paced at 5,000 calls/s for 5 s; the setuid events in the job's trail are counted (read from
   the agent's store: the trail is too long for one control-socket answer) and `show` gives events_lost.
3. Agent CPU.  The spawner paced at 1,000 exec/s inside a job for 10 s; the agent's utime+stime from
   /proc/PID/stat over the run (and including the drain of what was still queued at its end), plus idle.
   The throughput runs also give the agent's CPU per exec, in a job and outside any job.
4. Agent work (`work`).  The tracer, accounting and store the agent uses, in this process: execs of a spawner
   run wait in the kernel, then one timed pass works them off; CPU time per exec per stage (robust to load).
5. In-kernel cost (`bpf`).  The tracer's own BPF programs loaded in this process, kernel.bpf_stats_enabled=1
   for the runs only: run_time_ns / run_cnt of each program from /proc/self/fdinfo, per call and per exec of
   the spawner, in a job and outside any job (other processes of the node run the programs too).
6. Real jobs (`real`).  The build of a Debian source package (zlib's ./configure + `make -j2`; its source is
   downloaded once with `apt-get source` into /var/cache/jobcage/bench-src), `make -j2` of a generated tree of C
   files and a shell loop running coreutils (6 execs an iteration), inside a job, without a tracer and under the
   agent, interleaved rounds; the ratio is untraced time / traced time (>= 0.98 means tracing costs the job under 2%).
7. Outside-job floor (`floor`, not in the default set).  The spawner in no job with nothing, with the tracer's BPF
   programs only, with a taskstats exit listener only, with both (the agent on a kernel without BTF), and with the
   BPF programs whose exits carry their CPU time (the agent's default): what each part costs the node (paired
   ratios), and the consumer's CPU per exec.  `work` runs once per accounting source.
9. CPU per exec (`cost`, not in the default set).  One worker, unpaced: the spawner's own CPU time (with every
   /bin/true it waited for, where the BPF programs and the syscall slow path run) plus the agent's CPU over the
   run, per exec; none / jobcage, in a job and outside any job, interleaved rounds, paired ratios.  What a
   CPU-bound job keeps, without the scheduling and steal noise of a saturated run on 2 vCPUs.
10. Cheap syscalls (`syscalls`).  A C loop reading 512 bytes of /dev/zero and writing them to /dev/null (what
   `dd bs=512` does) for --run-seconds; its CPU per syscall, none / jobcage in a job and outside any job, and
   "lone syscall tracepoint" (one empty program on syscalls:sys_enter_setns loaded by this process: the
   kernel's mechanism alone), interleaved rounds, paired ratios.  No syscall of the loop is one the tracer
   hooks: what it pays is the slow path every syscall of the node takes while any syscalls:* tracepoint is in
   use, i.e. with `[tracer] syscall_hooks` resolved to tracepoint (the report says which the agent used).
11. In-job floor (`jobfloor`, not in the default set).  The spawner (2 workers) inside a job with nothing; with
   the tracer's BPF programs loaded in this process, the job in their maps and the ring read every 250 ms, its
   records dropped undecoded; with them written undecoded, one row per poll (a prototype of a cheaper trail, not
   what the agent writes); with the records decoded into events; with the events also written to a store,
   one transaction per poll (what the agent's loop does with them).  Paired ratios, the spawner's CPU per exec
   (where the programs and the syscall slow path run) and the consumer's.
8. Idle (`idle`, not in the default set).  The agent with the node's default reconcile_interval and one job that
   runs nothing: its CPU over 30 s.

Root only.  Everything is private and removed at the end: a config with its own cgroup subtree
``jobcage-ovh<hex>``, state dir and socket in a temp dir; the agent, auditd, bpftrace and spawners this
script started (by pid); the audit rule; the kernel's audit enabled flag and backlog limit are restored.

    .venv/bin/python bench/trace_overhead.py [--rounds 6] [--run-seconds 2] [--only throughput,setuid,cpu,work,bpf,real,cost,floor,jobfloor,idle]
        [--real-rounds 4] [--loop-iterations 300] [--profile] [--syscall-hooks auto|kprobe|tracepoint] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import platform
import pstats
import random
import re
import secrets
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobcage.agent.client import call  # noqa: E402
from jobcage.agent.errors import JobcageError  # noqa: E402
from jobcage.agent.tracer.bpf_backend import SYSCALL_HOOKS  # noqa: E402
from jobcage.cgroups import proc  # noqa: E402

_BIN = Path(sys.executable).parent
JOBCAGE = str(_BIN / "jobcage") if (_BIN / "jobcage").exists() else (shutil.which("jobcage") or "jobcage")
CLK_TCK = os.sysconf("SC_CLK_TCK")
AUDIT_KEY = "jcbench"
AUDIT_RULE = ["always,exit", "-F", "arch=b64", "-S", "execve", "-k", AUDIT_KEY]
AUDIT_BACKLOG = 8192   # what audit.rules usually sets (-b 8192); the kernel default 64 makes writers wait
BPFTRACE_PROG = 'tracepoint:sched:sched_process_exec { printf("%d %s\\n", pid, str(args->filename)); }'

SPAWNER_C = r"""
/* spawner SECONDS WORKERS RATE: after one byte on stdin, WORKERS processes loop fork + execve(/bin/true) +
 * waitpid for SECONDS; RATE > 0 paces them to RATE exec/s in all.  Prints "EXECS ELAPSED_SECONDS CPU_SECONDS"
 * (CPU: user + system of the spawner, its workers and every /bin/true they waited for). */
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
    if (argc < 4) return 2;
    double secs = atof(argv[1]), rate = atof(argv[3]);
    int workers = atoi(argv[2]), fds[2];
    char c, *av[] = {"true", NULL}, *ev[] = {NULL};
    if (read(0, &c, 1) != 1 || pipe(fds)) return 2;
    double t0 = now(), end = t0 + secs;
    for (int w = 0; w < workers; w++) {
        if (fork() != 0) continue;
        long n = 0;
        double step = rate > 0 ? workers / rate : 0, next = t0 + step * w / workers;
        while (now() < end) {
            pid_t p = fork();
            if (p == 0) { execve("/bin/true", av, ev); _exit(127); }
            if (p < 0) continue;
            waitpid(p, NULL, 0);
            n++;
            if (step > 0) {
                next += step;
                double d = next - now();
                if (d > 0) { struct timespec ts = {(time_t)d, (long)((d - (time_t)d) * 1e9)}; nanosleep(&ts, NULL); }
            }
        }
        if (write(fds[1], &n, sizeof n) != sizeof n) _exit(1);
        _exit(0);
    }
    close(fds[1]);
    long total = 0, n;
    while (read(fds[0], &n, sizeof n) == sizeof n) total += n;
    while (wait(NULL) > 0) ;
    double el = now() - t0, cpu = 0;
    struct rusage ru;
    int who[] = {RUSAGE_SELF, RUSAGE_CHILDREN};
    for (int i = 0; i < 2; i++)
        if (getrusage(who[i], &ru) == 0)
            cpu += ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
    printf("%ld %.6f %.6f\n", total, el, cpu);
    return 0;
}
"""

SYSLOOP_C = r"""
/* sysloop SECONDS: after one byte on stdin, read 512 bytes of /dev/zero and write them to /dev/null (what
 * `dd bs=512` does) for SECONDS.  Prints "SYSCALLS ELAPSED_SECONDS CPU_SECONDS" (CPU: its user + system). */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
    if (argc < 2) return 2;
    double secs = atof(argv[1]);
    char c, buf[512];
    int in = open("/dev/zero", O_RDONLY), out = open("/dev/null", O_WRONLY);
    if (in < 0 || out < 0 || read(0, &c, 1) != 1) return 2;
    long n = 0;
    double t0 = now(), end = t0 + secs;
    while ((n & 1023) || now() < end) {
        if (read(in, buf, sizeof buf) != sizeof buf || write(out, buf, sizeof buf) != sizeof buf) return 1;
        n += 2;
    }
    double el = now() - t0;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("%ld %.6f %.6f\n", n, el, ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec
           + ru.ru_stime.tv_usec / 1e6);
    return 0;
}
"""

SETUIDLOOP_C = r"""
/* setuidloop UID RATE SECONDS: as root, after one byte on stdin, alternate setresuid(UID, UID, 0) and
 * setresuid(0, 0, 0) at RATE calls/s for SECONDS (the saved uid 0 allows the way back).
 * Prints "CALLS FAILED ELAPSED_SECONDS". */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
    if (argc < 4) return 2;
    uid_t uid = (uid_t)atol(argv[1]);
    double rate = atof(argv[2]), secs = atof(argv[3]);
    char c;
    if (read(0, &c, 1) != 1) return 2;
    long calls = 0, failed = 0;
    double t0 = now();
    for (;;) {
        double t = now() - t0;
        if (t >= secs && !(calls & 1)) break;
        long due = (long)(t * rate);
        if (calls >= due && t < secs) { struct timespec ts = {0, 100000}; nanosleep(&ts, NULL); continue; }
        if ((calls & 1) ? setresuid(0, 0, 0) : setresuid(uid, uid, 0)) failed++;
        calls++;
    }
    printf("%ld %ld %.6f\n", calls, failed, now() - t0);
    return 0;
}
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    """CPU time of a process, its threads included, to the nanosecond: the sum of its threads' run time in
    /proc/PID/task/*/schedstat (utime + stime in /proc/PID/stat count 10 ms ticks: at ~3 us per exec, a 2 s run
    could not tell 9 us from 12).  Falls back to the ticks when schedstat is missing (no CONFIG_SCHEDSTATS)."""
    total = 0
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                total += int(Path(f"/proc/{pid}/task/{t}/schedstat").read_text().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                continue   # a thread that ended meanwhile
        return total / 1e9
    except FileNotFoundError:
        text = Path(f"/proc/{pid}/stat").read_text()
        f = text[text.rindex(")") + 2:].split()
        return (int(f[11]) + int(f[12])) / CLK_TCK


def run(argv: Sequence[str], **kw: Any) -> str:
    r = subprocess.run(list(argv), capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} -> {r.returncode}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def wait_until(pred: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
    return value


def audit_status() -> dict[str, int]:
    out = {}
    for line in run(["auditctl", "-s"]).splitlines():
        k, _, v = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[k] = int(v.split()[0])
    return out


def free_uid(start: int = 61000) -> int:
    """A uid no account uses (the setuid loop's target)."""
    import pwd

    used = {p.pw_uid for p in pwd.getpwall()}
    return next(u for u in range(start, start + 10000) if u not in used)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def paired(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of the per-round ratios num[i] / den[i]: each run against the same round's other run (cancels the
    drift of the node's speed between rounds)."""
    return median([x / y for x, y in zip(num, den, strict=True)])


class Bench:
    """A private jobcage (config, subtree, state, agent) and the peers, all torn down by cleanup()."""

    def __init__(self, workers: int, syscall_hooks: str = "auto") -> None:
        self.workers = workers
        self.dir = Path(tempfile.mkdtemp(prefix="jcbench-", dir="/tmp"))
        self.dir.chmod(0o755)
        self.subtree = f"jobcage-ovh{secrets.token_hex(4)}"
        self.sock = str(self.dir / "agent.sock")
        self.cfg = self.dir / "jobcage.toml"
        self.cfg.write_text(
            f'[cgroups]\nmode = "auto"\nsubtree = "{self.subtree}"\n'
            f'[agent]\nstate_dir = "{self.dir / "state"}"\nsocket = "{self.sock}"\nreconcile_interval = 1.0\n'
            f'[tracer]\nbackend = "bpf"\nsyscall_hooks = "{syscall_hooks}"\n[cleanup]\nenabled = false\n')
        self.env = dict(os.environ, JOBCAGE_CONFIG=str(self.cfg))
        self.jobs: list[str] = []
        self.agent: subprocess.Popen | None = None
        self.auditd: subprocess.Popen | None = None
        self.audit_saved: dict[str, int] | None = None
        self.audit_on_now = False
        self.bpftrace: subprocess.Popen | None = None
        self.spawner = self.dir / "spawner"
        self.spawn_cpu = 0.0
        self.setuidloop = self.dir / "setuidloop"
        self.sysloop = self.dir / "sysloop"

    # -- setup --------------------------------------------------------------------------------------------------
    def build(self) -> None:
        for exe, src in ((self.spawner, SPAWNER_C), (self.setuidloop, SETUIDLOOP_C), (self.sysloop, SYSLOOP_C)):
            exe.with_suffix(".c").write_text(src)
            run(["gcc", "-O2", "-Wall", "-o", str(exe), str(exe.with_suffix(".c"))])

    def jobcage(self, *args: str) -> str:
        return run([JOBCAGE, *args], env=self.env, timeout=300)

    def prologue(self, job: str) -> None:
        self.jobcage("prologue", job, "--uid", "0", "--pids-max", "256")
        self.jobs.append(job)

    def show(self, job: str) -> dict:
        return json.loads(self.jobcage("show", job, "--json"))

    # -- the agent ----------------------------------------------------------------------------------------------
    def agent_start(self) -> None:
        assert self.agent is None
        logf = open(self.dir / "agent.log", "a")  # noqa: SIM115 - the child keeps it
        self.agent = subprocess.Popen([JOBCAGE, "agent", "--config", str(self.cfg)], env=self.env,
                                      stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
        logf.close()

        def ping() -> dict | None:
            assert self.agent is not None
            if self.agent.poll() is not None:
                raise RuntimeError(f"agent exited: {(self.dir / 'agent.log').read_text()[-2000:]}")
            try:
                r = call(self.sock, "ping", timeout=2)
            except JobcageError:
                return None
            return r if isinstance(r, dict) else None

        info = wait_until(ping, 180, "the agent")
        if info.get("tracer") != "bpf":
            raise RuntimeError(f"the agent runs tracer {info.get('tracer')!r}, not bpf: see {self.dir}/agent.log")
        self.settle_agent()

    def agent_stop(self) -> None:
        if self.agent is None:
            return
        if self.agent.poll() is None:
            self.agent.send_signal(signal.SIGTERM)
            try:
                self.agent.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait(timeout=30)
        self.agent = None

    def agent_cpu(self) -> float:
        assert self.agent is not None
        return cpu_seconds(self.agent.pid)

    def settle_agent(self, timeout: float = 60.0) -> None:
        """Wait until the agent has worked off what is queued (< 3% CPU over 0.3 s)."""
        deadline = time.monotonic() + timeout
        while self.agent is not None and time.monotonic() < deadline:
            c0 = self.agent_cpu()
            time.sleep(0.3)
            if self.agent_cpu() - c0 < 0.01:
                return

    # -- auditd ---------------------------------------------------------------------------------------------------
    def auditd_start(self) -> None:
        """A private auditd (config and log in our temp dir) unless one already runs; leaves audit as it was."""
        self.audit_saved = audit_status()
        if self.audit_saved.get("enabled") == 2:
            raise RuntimeError("audit configuration is locked (enabled 2)")
        if self.audit_saved.get("pid", 0):
            log(f"auditd already running (pid {self.audit_saved['pid']}): using it")
            return
        d = self.dir / "audit"
        (d / "plugins").mkdir(parents=True)
        base = Path("/etc/audit/auditd.conf")
        lines = [ln for ln in (base.read_text().splitlines() if base.exists() else [])
                 if ln.split("=")[0].strip() not in ("log_file", "plugin_dir", "max_log_file",
                                                     "max_log_file_action", "num_logs")]
        lines += [f"log_file = {d / 'audit.log'}", f"plugin_dir = {d / 'plugins'}", "max_log_file = 50",
                  "max_log_file_action = ROTATE", "num_logs = 2"]
        (d / "auditd.conf").write_text("\n".join(lines) + "\n")
        (d / "auditd.conf").chmod(0o640)
        logf = open(self.dir / "auditd.log", "a")  # noqa: SIM115
        self.auditd = subprocess.Popen(["auditd", "-n", "-s", "nochange", "-c", str(d)], stdin=subprocess.DEVNULL,
                                       stdout=logf, stderr=logf, start_new_session=True)
        logf.close()
        wait_until(lambda: audit_status().get("pid") == self.auditd.pid, 30, "auditd to register")  # type: ignore[union-attr]

    def audit_on(self) -> None:
        run(["auditctl", "-b", str(AUDIT_BACKLOG)])
        run(["auditctl", "-e", "1"])
        run(["auditctl", "-a", *AUDIT_RULE])
        self.audit_on_now = True

    def audit_off(self) -> None:
        """Remove our rule and restore the enabled flag and backlog limit."""
        if not self.audit_on_now:
            return
        with contextlib.suppress(RuntimeError):
            run(["auditctl", "-d", *AUDIT_RULE])
        saved = self.audit_saved or {}
        run(["auditctl", "-e", str(saved.get("enabled", 0))])
        run(["auditctl", "-b", str(saved.get("backlog_limit", 64))])
        self.audit_on_now = False

    def auditd_stop(self) -> None:
        if self.auditd is not None and self.auditd.poll() is None:
            self.auditd.send_signal(signal.SIGTERM)
            try:
                self.auditd.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.auditd.kill()
                self.auditd.wait(timeout=30)
        self.auditd = None

    # -- bpftrace -------------------------------------------------------------------------------------------------
    def bpftrace_start(self) -> None:
        logf = open(self.dir / "bpftrace.log", "a")  # noqa: SIM115
        self.bpftrace = subprocess.Popen(["bpftrace", "-o", "/dev/null", "-e", BPFTRACE_PROG],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logf,
                                         start_new_session=True)
        logf.close()
        bt = self.bpftrace

        def attached() -> bool:
            # its program loaded and the tracepoint's perf event open: attached (the output goes to /dev/null,
            # so its "Attaching 1 probe..." cannot be watched)
            if bt.poll() is not None:
                raise RuntimeError(f"bpftrace exited: {(self.dir / 'bpftrace.log').read_text()[-1000:]}")
            links = []
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{bt.pid}/fd"):
                    with contextlib.suppress(OSError):
                        links.append(os.readlink(f"/proc/{bt.pid}/fd/{fd}"))
            return "anon_inode:bpf-prog" in links and "anon_inode:[perf_event]" in links

        wait_until(attached, 120, "bpftrace to attach")
        time.sleep(0.5)
        c0 = cpu_seconds(bt.pid)   # settled: LLVM is done
        while True:
            time.sleep(0.3)
            c1 = cpu_seconds(bt.pid)
            if c1 - c0 < 0.01:
                break
            c0 = c1

    def bpftrace_stop(self) -> None:
        if self.bpftrace is not None and self.bpftrace.poll() is None:
            self.bpftrace.send_signal(signal.SIGINT)
            try:
                self.bpftrace.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.bpftrace.kill()
                self.bpftrace.wait(timeout=30)
        self.bpftrace = None

    # -- workloads ------------------------------------------------------------------------------------------------
    def start_gated(self, argv: list[str], job: str | None) -> subprocess.Popen:
        """argv (a C program waiting for one byte on stdin) started inside `job` through `jobcage run`, or in the
        bench's own cgroup; returns once it runs where it should."""
        exe = argv[0]
        if job is not None:
            argv = [JOBCAGE, "run", job, "--", *argv]
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=self.env)
        wait_until(lambda: os.path.realpath(f"/proc/{p.pid}/exe") == exe or p.poll() is not None, 120,
                   f"{exe} to start")
        if p.poll() is not None:
            raise RuntimeError(f"{' '.join(argv)} exited with {p.returncode}")
        placed = f"/{self.subtree}/" in Path(f"/proc/{p.pid}/cgroup").read_text()
        if placed != (job is not None):
            raise RuntimeError(f"pid {p.pid} {'is not' if job else 'is'} in a job")
        return p

    @staticmethod
    def release(p: subprocess.Popen, timeout: float) -> list[str]:
        assert p.stdin is not None
        p.stdin.write("g")
        p.stdin.close()
        p.stdin = None   # so communicate() does not flush it
        out, _ = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"{p.args} exited with {p.returncode}")
        return out.split()

    def spawn(self, secs: float, rate: float, job: str | None,
              on_start: Callable[[], None] | None = None, workers: int | None = None) -> tuple[int, float]:
        p = self.start_gated([str(self.spawner), f"{secs}", str(workers or self.workers), f"{rate}"], job)
        if on_start:
            on_start()
        n, elapsed, cpu = self.release(p, secs + 300)
        self.spawn_cpu = float(cpu)   # the spawner's own CPU seconds (with its children)
        return int(n), float(elapsed)

    def store_count(self, job: str, kind: str) -> int:
        """Events of a kind in the job's trail, read from the agent's store (read-only)."""
        db = sqlite3.connect(f"file:{self.dir / 'state' / 'jobcage.db'}?mode=ro", uri=True, timeout=30)
        try:
            return int(db.execute("SELECT count(*) FROM events WHERE job_id=? AND kind=?", (job, kind)).fetchone()[0])
        finally:
            db.close()

    # -- teardown -------------------------------------------------------------------------------------------------
    def cleanup(self) -> list[str]:
        problems: list[str] = []
        for step in (self.bpftrace_stop, self.audit_off, self.auditd_stop):
            try:
                step()
            except Exception as e:  # keep going: everything else must still be undone
                problems.append(f"{step.__name__}: {e}")
        with contextlib.suppress(Exception):
            if any(AUDIT_KEY in ln for ln in run(["auditctl", "-l"]).splitlines()):
                problems.append("the audit rule is still loaded")
        for job in self.jobs:   # direct path when the agent is down: kills what is left, removes the cgroups
            try:
                self.jobcage("epilogue", job)
            except Exception as e:
                problems.append(f"epilogue {job}: {e}")
        self.agent_stop()
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and parts[2] in ("cgroup", "cgroup2"):
                top = Path(parts[1]) / self.subtree
                for d, _dirs, _files in sorted(os.walk(top), key=lambda t: -len(t[0])):
                    try:
                        os.rmdir(d)
                    except OSError as e:
                        problems.append(f"rmdir {d}: {e}")
        shutil.rmtree(self.dir, ignore_errors=True)
        return problems


# -- the three measurements -----------------------------------------------------------------------------------------

CONFIGS = {   # name -> (tracer, inside a job)
    "none": ("none", True),
    "none, outside job": ("none", False),
    "jobcage": ("agent", True),
    "jobcage, outside job": ("agent", False),
    "auditd execve rule": ("auditd", True),
    "bpftrace exec printf": ("bpftrace", True),
}
BASELINE = {"none": "none", "none, outside job": "none, outside job", "jobcage": "none",
            "jobcage, outside job": "none, outside job", "auditd execve rule": "none", "bpftrace exec printf": "none",
            "lone syscall tracepoint": "none, outside job"}


def interleaved(b: Bench, rounds: int, rng: random.Random, with_agent: list[str], without: list[str],
                run: Callable[[int, str], None]) -> None:
    """Rounds of runs: the configurations that need the agent (started once per round, stopped after them) and
    the others, the two blocks in alternating order from round to round; run(round, name).  The agent's
    configurations are shuffled; their baselines (BASELINE) sit next to them across the block boundary, in
    mirrored order, so each pair is run as close together as the agent's start allows (the node's speed
    drifts by several % over minutes: pairs far apart share less of it)."""
    for r in range(rounds):
        agent = list(with_agent)
        rng.shuffle(agent)
        bases = [BASELINE[n] for n in agent if BASELINE.get(n) in without]
        others = [n for n in without if n not in bases]
        rng.shuffle(others)
        if r % 2 == 0:
            blocks = [("agent", agent), ("off", bases[::-1] + others)]
        else:
            blocks = [("off", others + bases[::-1]), ("agent", agent)]
        for kind, block in blocks:
            if kind == "agent":
                b.agent_start()
            try:
                for name in block:
                    run(r, name)
            finally:
                if kind == "agent":
                    b.agent_stop()


SPLIT = ("spawner", "agent", "idle", "rest")


def node_times() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole node so far, from /proc/stat's first line (idle = idle + iowait)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = v[3] + v[4]
    return (sum(v) - idle) / CLK_TCK, idle / CLK_TCK


def throughput(b: Bench, rounds: int, secs: float, rng: random.Random, peers: bool) -> dict:
    job = "tput"
    b.prologue(job)
    names = [n for n in CONFIGS if peers or CONFIGS[n][0] in ("none", "agent")]
    rates: dict[str, list[float]] = {n: [] for n in names}
    # where the 2 CPUs' time went in each run, us per exec: the spawner (with every /bin/true: the BPF programs
    # and the syscall slow path run there), the agent, the node's idle time, everything else (from /proc/stat)
    split: dict[str, list[tuple[float, ...]]] = {n: [] for n in names}
    agent_cpu_per_exec: list[float] = []
    agent_cpu_outside: list[float] = []   # the node's exits still reach the accounting
    lost_per_run: list[int] = []
    if peers:
        b.auditd_start()
        b.audit_on()    # audit "ever enabled" before the first run: the same kernel state for every run
        b.audit_off()
    def one(r: int, name: str) -> None:
        tracer, in_job = CONFIGS[name]
        if tracer == "auditd":
            b.audit_on()
        elif tracer == "bpftrace":
            b.bpftrace_start()
        try:
            lost0 = b.show(job)["events_lost"] if tracer == "agent" and in_job else 0
            b.settle_agent()
            a0 = b.agent_cpu() if b.agent else 0.0
            st0 = node_times()
            n, el = b.spawn(secs, 0, job if in_job else None)
            busy, idle = (y - x for x, y in zip(st0, node_times(), strict=True))
            agent = (b.agent_cpu() - a0) if b.agent else 0.0   # before the drain: what ran beside the spawner
            rates[name].append(n / el)
            split[name].append(tuple(1e6 * v / n for v in (b.spawn_cpu, agent, idle, busy - b.spawn_cpu - agent)))
            if tracer == "agent" and in_job:
                b.settle_agent()
                agent_cpu_per_exec.append((b.agent_cpu() - a0) / n)
                time.sleep(1.5)   # events_lost reaches the store at the agent's reconcile
                lost_per_run.append(b.show(job)["events_lost"] - lost0)
            elif tracer == "agent":
                b.settle_agent()
                agent_cpu_outside.append((b.agent_cpu() - a0) / n)
        finally:
            if tracer == "auditd":
                b.audit_off()
            elif tracer == "bpftrace":
                b.bpftrace_stop()
        log(f"round {r + 1}/{rounds} {name:<22} {n / el:8.0f} exec/s")

    interleaved(b, rounds, rng, [n for n in names if CONFIGS[n][0] == "agent"],
                [n for n in names if CONFIGS[n][0] != "agent"], one)
    if peers:
        b.auditd_stop()
    rows = []
    for name in names:
        base = median(rates[BASELINE[name]])
        sp = split[name]
        base_sp = split[BASELINE[name]]
        rows.append({"split_us": {k: sum(r[i] for r in sp) / len(sp) for i, k in enumerate(SPLIT)},
                     "split_diff_us": {k: sum(r[i] - q[i] for r, q in zip(sp, base_sp, strict=True)) / len(sp)
                                       for i, k in enumerate(SPLIT)},
                     "config": name, "median": median(rates[name]), "min": min(rates[name]),
                     "max": max(rates[name]), "runs": len(rates[name]), "ratio": median(rates[name]) / base,
                     "paired_ratio": paired(rates[name], rates[BASELINE[name]]), "baseline": BASELINE[name],
                     "rates": [round(x) for x in rates[name]]})
    return {"rows": rows, "run_seconds": secs, "rounds": rounds, "workers": b.workers,
            "agent_cpu_us_per_exec": 1e6 * median(agent_cpu_per_exec),
            "agent_cpu_us_per_exec_outside": 1e6 * median(agent_cpu_outside), "events_lost_per_run": lost_per_run}


COST_CONFIGS = ("none", "none, outside job", "jobcage", "jobcage, outside job")


def cpu_cost(b: Bench, rounds: int, secs: float, rng: random.Random) -> dict:
    """What the node pays per exec, in CPU time rather than throughput: one worker (a serial fork + exec +
    wait loop, so the other CPU is free and no run waits for a CPU) for ``secs``; the cost of a run is the
    spawner's own CPU (user + system of it and of every /bin/true it waited for: the BPF programs and the
    syscall slow path run in those tasks) plus the agent's CPU over the run and the drain after it.  The
    ratio none / traced is what the throughput of a CPU-bound job would keep, without the scheduling and
    steal noise of a saturated 2-vCPU run.  Interleaved rounds, paired ratios, as in `throughput`."""
    job = "cost"
    saved = b.cfg.read_text()
    b.cfg.write_text(saved.replace("reconcile_interval = 1.0\n", ""))   # the node's defaults, as in `cpu`
    b.prologue(job)
    per_exec: dict[str, list[float]] = {n: [] for n in COST_CONFIGS}
    agent_part: dict[str, list[float]] = {n: [] for n in COST_CONFIGS}
    def one(r: int, name: str) -> None:
        b.settle_agent()
        a0 = b.agent_cpu() if b.agent else 0.0
        n, _el = b.spawn(secs, 0, job if "outside" not in name else None, workers=1)
        b.settle_agent()
        agent = (b.agent_cpu() - a0) if b.agent else 0.0
        per_exec[name].append(1e6 * (b.spawn_cpu + agent) / n)
        agent_part[name].append(1e6 * agent / n)
        log(f"round {r + 1}/{rounds} cost {name:<22} {per_exec[name][-1]:7.1f} us CPU/exec "
            f"(agent {agent_part[name][-1]:.1f})")

    try:
        interleaved(b, rounds, rng, ["jobcage", "jobcage, outside job"], ["none", "none, outside job"], one)
    finally:
        b.cfg.write_text(saved)
    rows = []
    for name, base in (("jobcage", "none"), ("jobcage, outside job", "none, outside job")):
        rows.append({"config": name, "baseline": base, "us_per_exec": median(per_exec[name]),
                     "baseline_us_per_exec": median(per_exec[base]),
                     "agent_us_per_exec": median(agent_part[name]),
                     "paired_ratio": paired(per_exec[base], per_exec[name]),
                     "runs": [round(x, 1) for x in per_exec[name]],
                     "baseline_runs": [round(x, 1) for x in per_exec[base]]})
    return {"rows": rows, "rounds": rounds, "run_seconds": secs}


SYSCALL_CONFIGS = ("none", "none, outside job", "jobcage", "jobcage, outside job", "lone syscall tracepoint")


def syscall_cost(b: Bench, rounds: int, secs: float, rng: random.Random) -> dict:
    """What a job that makes many cheap syscalls pays: `sysloop` (read + write of 512 bytes, like `dd bs=512`)
    for ``secs``, CPU per syscall from its rusage; none / jobcage, in a job and outside any job, interleaved
    rounds, paired ratios.  None of these syscalls is one the tracer hooks: what it costs them is the kernel's
    syscall slow path, taken by every syscall of every task while any syscalls:* tracepoint is in use (the
    agent's hooks by tracepoint).  "lone syscall tracepoint" is that mechanism alone: one empty program on
    syscalls:sys_enter_setns, loaded by this process, the loop outside any job."""
    job = "syscalls"
    b.prologue(job)
    per_call: dict[str, list[float]] = {n: [] for n in SYSCALL_CONFIGS}
    hooks: set[str] = set()

    def one(r: int, name: str) -> None:
        lone = None
        if name == "lone syscall tracepoint":
            from bcc import BPF

            lone = BPF(text="TRACEPOINT_PROBE(syscalls, sys_enter_setns) { return 0; }")
        if b.agent:
            b.settle_agent()
            hooks.add(str(call(b.sock, "ping", timeout=5).get("syscall_hooks")))
        try:
            p = b.start_gated([str(b.sysloop), f"{secs}"], job if name in ("none", "jobcage") else None)
            n, _el, cpu = b.release(p, secs + 120)
        finally:
            if lone is not None:
                lone.cleanup()
        per_call[name].append(1e9 * float(cpu) / int(n))
        log(f"round {r + 1}/{rounds} syscalls {name:<24} {per_call[name][-1]:6.1f} ns CPU/syscall")

    interleaved(b, rounds, rng, ["jobcage", "jobcage, outside job"],
                ["none", "none, outside job", "lone syscall tracepoint"], one)
    rows = []
    for name in SYSCALL_CONFIGS[2:]:
        base = BASELINE[name]
        rows.append({"config": name, "baseline": base, "ns_per_syscall": median(per_call[name]),
                     "baseline_ns_per_syscall": median(per_call[base]),
                     "paired_ratio": paired(per_call[base], per_call[name]),
                     "runs": [round(x, 1) for x in per_call[name]],
                     "baseline_runs": [round(x, 1) for x in per_call[base]]})
    return {"rows": rows, "rounds": rounds, "run_seconds": secs, "syscall_hooks": sorted(hooks)}


def setuid_rate(b: Bench, rate: float, secs: float) -> dict:
    job = "suid"
    b.prologue(job)
    uid = free_uid()
    b.agent_start()
    try:
        p = b.start_gated([str(b.setuidloop), str(uid), f"{rate}", f"{secs}"], job)
        a0 = b.agent_cpu()
        calls, failed, elapsed = b.release(p, secs + 120)
        calls_i, elapsed_f = int(calls), float(elapsed)
        wait_until(lambda: b.store_count(job, "setuid") >= calls_i, 120, "the setuid events in the trail", 0.5)
        b.settle_agent()
        cpu = b.agent_cpu() - a0
        time.sleep(1.5)   # events_lost reaches the store at the agent's reconcile
        s = b.show(job)
        recorded = b.store_count(job, "setuid")
        ident = next((i for i in s["identities"] if i["uid"] == uid), None)
    finally:
        b.agent_stop()
    return {"target_rate": rate, "calls": calls_i, "failed": int(failed), "achieved_rate": calls_i / elapsed_f,
            "setuid_events_in_trail": recorded, "events_lost": s["events_lost"], "identity_recorded": ident is not None,
            "agent_cpu_seconds": cpu, "seconds": elapsed_f}


def agent_cpu(b: Bench, rate: float, secs: float) -> dict:
    """The agent's CPU while a job execs at `rate`, with the node's defaults (like `idle`: without the bench's
    1 s reconcile_interval, which alone costs ~0.3 % of a core)."""
    job = "cpu"
    saved = b.cfg.read_text()
    b.cfg.write_text(saved.replace("reconcile_interval = 1.0\n", ""))
    b.prologue(job)
    b.agent_start()
    try:
        i0 = b.agent_cpu()
        time.sleep(5)
        idle = (b.agent_cpu() - i0) / 5
        marks: dict[str, float] = {}

        def start() -> None:
            marks["cpu"], marks["t"] = b.agent_cpu(), time.monotonic()

        n, el = b.spawn(secs, rate, job, on_start=start)
        run_cpu = b.agent_cpu() - marks["cpu"]
        b.settle_agent()
        total_cpu = b.agent_cpu() - marks["cpu"]
        time.sleep(1.5)
        lost = b.show(job)["events_lost"]
        execs = b.store_count(job, "exec")
    finally:
        b.agent_stop()
        b.cfg.write_text(saved)
    return {"target_rate": rate, "execs": n, "achieved_rate": n / el, "seconds": el,
            "agent_cpu_pct_during": 100 * run_cpu / el, "agent_cpu_pct_with_drain": 100 * total_cpu / el,
            "agent_cpu_pct_idle": 100 * idle, "exec_events_in_trail": execs, "events_lost": lost}


def agent_idle(b: Bench, secs: float) -> dict:
    """The agent idle with the node's defaults (its config without the bench's 1 s reconcile_interval), one job
    that runs nothing: utime+stime over `secs` after 5 s of settling."""
    saved = b.cfg.read_text()
    b.cfg.write_text(saved.replace("reconcile_interval = 1.0\n", ""))
    try:
        b.prologue("idle")
        b.agent_start()
        time.sleep(5)
        c0, t0 = b.agent_cpu(), time.monotonic()
        time.sleep(secs)
        pct = 100 * (b.agent_cpu() - c0) / (time.monotonic() - t0)
    finally:
        b.agent_stop()
        b.cfg.write_text(saved)
    return {"seconds": secs, "agent_cpu_pct": pct}


BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")


def _prog_stats(fds: dict[str, int]) -> dict[str, tuple[int, int]]:
    """program -> (run_time_ns, run_cnt) from /proc/self/fdinfo (counted while bpf_stats_enabled is 1)."""
    out = {}
    for name, fd in fds.items():
        f = proc.fdinfo(fd) or {}
        out[name] = (int(f.get("run_time_ns", "0")), int(f.get("run_cnt", "0")))
    return out


def bpf_cost(b: Bench, secs: float) -> dict:
    """In-kernel cost of each of jobcage's BPF programs, per invocation and per exec of the spawner, in a job
    and outside any job: the very programs the agent loads, loaded here in-process (the fdinfo counters need
    the program fds) with kernel.bpf_stats_enabled=1 for the runs only (restored after)."""
    from jobcage.agent.tracer import Tracer

    job = "bpfcost"
    b.prologue(job)
    saved = BPF_STATS.read_text().strip()
    tr = Tracer(lambda ev: None, backend="bpf")
    # the accounting the agent runs beside it: drains the exits (and, where it can, lets the kernel sum them)
    from jobcage.agent.accounting import Accounting

    acc = Accounting(tr)
    acc.start()
    rows: dict[str, dict] = {}
    try:
        fds = tr.programs() if hasattr(tr, "programs") else {   # jobcage before programs() (to compare)
            n.decode(): f.fd for n, f in tr._be.b.funcs.items()}  # type: ignore[union-attr]
        for where in ("in a job", "outside any job"):
            in_job = where == "in a job"
            p = b.start_gated([str(b.spawner), f"{secs}", str(b.workers), "0"], job if in_job else None)
            if in_job and not tr.jobs():
                tr.add_job(job, 0, cgroup2_ino(p.pid), [p.pid])
            out: dict[str, list[str]] = {}
            BPF_STATS.write_text("1")
            s0 = _prog_stats(fds)
            t = threading.Thread(target=lambda p=p, out=out: out.setdefault("r", b.release(p, secs + 300)))
            t.start()
            while t.is_alive():
                tr.poll(100)   # keep the ring buffer and the exits drained, as the agent would
                acc.poll(0)
            s1 = _prog_stats(fds)
            BPF_STATS.write_text(saved)
            tr.poll(0)
            n = int(out["r"][0])
            progs = {}
            for name in fds:
                dt, dc = s1[name][0] - s0[name][0], s1[name][1] - s0[name][1]
                if dc:
                    progs[name.replace("tracepoint__", "").replace("__", ":", 1)] = {
                        "calls": dc, "ns_per_call": dt / dc, "calls_per_exec": dc / n}
            total = sum(s1[k][0] - s0[k][0] for k in fds)
            rows[where] = {"execs": n, "ns_per_exec": total / n, "programs": progs}
    finally:
        BPF_STATS.write_text(saved)
        acc.close()
        tr.close()
    return {"seconds": secs, "rows": rows}


# "bpf + exit cpu" is the agent now (exits carry their CPU time, no taskstats); "bpf + taskstats" before, and on
# kernels without BTF
FLOOR_CONFIGS = ("none", "bpf programs", "taskstats listener", "bpf + taskstats", "bpf + exit cpu")


class _NoExits:
    """A tracer that knows no job exit: what the accounting sees of a node whose exits are nobody's."""

    def sync_exited(self) -> list[int]:
        return []

    def known_exits(self) -> set[int]:
        return set()

    def job_of_exited(self, tid: int) -> str | None:
        return None


def floor_parts(b: Bench, rounds: int, secs: float, rng: random.Random) -> dict:
    """What the node pays outside any job, part by part: the spawner (in no job) with nothing, with only the
    tracer's BPF programs attached (loaded in this process, its ring buffer polled every 50 ms in a thread, as the
    agent's loop does; one job registered elsewhere so the maps are live), with only a taskstats exit listener
    (the agent's Accounting, drained every 200 ms), and with both; interleaved rounds, paired ratios.  The BPF part
    is the in-kernel filter plus the syscall tracepoints' slow path for every syscall of the node; the taskstats
    part is the kernel building and sending a record per exit plus the Python that reads and drops it."""
    from jobcage.agent.accounting import Accounting
    from jobcage.agent.tracer import Tracer

    rates: dict[str, list[float]] = {c: [] for c in FLOOR_CONFIGS}
    cpu: dict[str, list[float]] = {c: [] for c in FLOOR_CONFIGS}
    for r in range(rounds):
        order = list(FLOOR_CONFIGS)
        rng.shuffle(order)
        for conf in order:
            tr = Tracer(lambda ev: None, backend="bpf") if conf.startswith("bpf") else None
            if tr is not None:
                tr.add_job("floor-elsewhere", 0, (1 << 62) + 1)   # a cgroup id no task has (1 is the root!): one job in the maps
            # the agent's path for other tasks' records: the tracer's known exits (none here) decide
            acc = None
            if conf == "taskstats listener":
                acc = Accounting(_NoExits())
            elif conf in ("bpf + taskstats", "bpf + exit cpu"):
                acc = Accounting(tr, source="taskstats" if conf == "bpf + taskstats" else "kernel")
            if acc is not None:
                acc.start()
            stop = threading.Event()

            def loop(tr: Any = tr, acc: Any = acc, stop: threading.Event = stop) -> None:
                next_acc = 0.0
                while not stop.is_set():
                    if tr is not None:
                        tr.poll(0)
                    if acc is not None and time.monotonic() >= next_acc:
                        next_acc = time.monotonic() + 0.2
                        acc.poll(0)
                    stop.wait(0.05)

            t = threading.Thread(target=loop, daemon=True)
            c0 = time.process_time()
            t.start()
            try:
                n, el = b.spawn(secs, 0, None)
            finally:
                stop.set()
                t.join()
                c1 = time.process_time()
                if acc is not None:
                    acc.close()
                if tr is not None:
                    tr.close()
            rates[conf].append(n / el)
            cpu[conf].append(1e6 * (c1 - c0) / n)
            log(f"round {r + 1}/{rounds} floor {conf:<20} {n / el:8.0f} exec/s")
    rows = []
    for conf in FLOOR_CONFIGS:
        rows.append({"config": conf, "median": median(rates[conf]),
                     "paired_ratio": paired(rates[conf], rates["none"]),
                     "consumer_cpu_us_per_exec": median(cpu[conf]), "rates": [round(x) for x in rates[conf]]})
    return {"rounds": rounds, "run_seconds": secs, "rows": rows}


def cgroup2_ino(pid: int) -> int:
    """The inode of a process's cgroup2 directory: the id the tracer's maps know a job's cgroup by."""
    rel, mount = (proc.cgroups(pid) or {}).get(""), proc.cgroup2_mount()
    if rel is None or mount is None:
        raise RuntimeError(f"pid {pid}: no cgroup2 directory")
    return os.stat(mount + rel.rstrip("/")).st_ino


class _PackedTrail:
    """A prototype of a cheaper trail, for `jobfloor` only (the agent does not write this): each poll's records as
    the kernel wrote them (struct jc_event, re-packed from the unpacked tuples: an upper bound on copying the
    ring's bytes) in one row with the uids they show, to be expanded on read; the store's WAL settings.  What
    the write side of such a trail costs per exec, against a decoded event and a row of its own."""

    def __init__(self, path: Path, jid: int) -> None:
        self.jid = jid
        # written by the poll thread
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS packed(id INTEGER PRIMARY KEY, jid INTEGER, n INTEGER, "
                        "first_ts INTEGER, last_ts INTEGER, uids TEXT, records BLOB)")

    def write(self, lay: Any, recs: list[tuple]) -> None:
        pack, i_ts, i_uid = lay.struct.pack, lay.ts_ns, lay.uid
        uids = ",".join(map(str, sorted({r[i_uid] for r in recs})))
        self.db.execute("INSERT INTO packed(jid, n, first_ts, last_ts, uids, records) VALUES(?,?,?,?,?,?)",
                        (self.jid, len(recs), recs[0][i_ts], recs[-1][i_ts], uids,
                         b"".join(pack(*r) for r in recs)))

    def close(self) -> None:
        self.db.close()


JOB_FLOOR_CONFIGS = ("none", "programs", "+ packed store", "+ decode", "+ decode + store", "jobcage agent")


def job_floor(b: Bench, rounds: int, secs: float, rng: random.Random) -> dict:
    """What a job pays, part by part: the spawner (2 workers, saturated) inside a job with no tracer; with the
    tracer's BPF programs loaded in this process and the job in their maps, the ring buffer read every 250 ms and
    its records dropped undecoded (the kernel's part: programs, tracepoint wrappers, syscall slow path, the ring);
    with them written undecoded, one row per poll (_PackedTrail, a prototype of a cheaper trail); with the records
    decoded into events as the agent does ("+ decode"); and with each poll's events written to a
    store in one transaction as the agent does ("+ decode + store"); and the real agent, started for its run
    (its loop, accounting and control socket besides).  Interleaved rounds, paired ratios against "none"; the
    spawner's and the consumer's (this process, or the agent) CPU per exec."""
    from jobcage.agent.lifecycle import JobManager
    from jobcage.agent.store import Store
    from jobcage.agent.tracer import Tracer

    job = "jobfloor"
    b.prologue(job)
    store = Store(str(b.dir / "jobfloor.db"))
    jid = store.add_job(job, 0, 0, job, 256, time.time())
    shim = argparse.Namespace(store=store)   # record_trace needs only the store
    packed = _PackedTrail(b.dir / "jobfloor-packed.db", jid)
    rates: dict[str, list[float]] = {c: [] for c in JOB_FLOOR_CONFIGS}
    spawner: dict[str, list[float]] = {c: [] for c in JOB_FLOOR_CONFIGS}
    consumer: dict[str, list[float]] = {c: [] for c in JOB_FLOOR_CONFIGS}
    events: dict[str, list[int]] = {c: [] for c in JOB_FLOOR_CONFIGS}
    try:
        for r in range(rounds):
            order = list(JOB_FLOOR_CONFIGS)
            rng.shuffle(order)
            for conf in order:
                evs: list = []
                tr = Tracer(evs.append, backend="bpf") if conf not in ("none", "jobcage agent") else None
                if conf == "jobcage agent":
                    b.agent_start()   # it finds the job at its reconcile
                    a0 = b.agent_cpu()
                p = b.start_gated([str(b.spawner), f"{secs}", str(b.workers), "0"], job)
                if tr is not None:
                    tr.add_job(job, 0, cgroup2_ino(p.pid), [p.pid])
                seen = [0]
                stop = threading.Event()

                def loop(tr: Any = tr, conf: str = conf, evs: list = evs, stop: threading.Event = stop,
                         seen: list = seen) -> None:
                    while True:
                        last = stop.is_set()
                        if conf == "programs":
                            # the backend's poll: the ring's records as unpacked tuples, no enrichment
                            seen[0] += len(tr._be.poll(0))
                        elif conf == "+ packed store":
                            recs = tr._be.poll(0)
                            seen[0] += len(recs)
                            if recs:
                                packed.write(tr._be.layout, recs)
                        else:
                            tr.poll(0)
                            seen[0] += len(evs)
                            if conf == "+ decode + store" and evs:
                                JobManager.record_trace(shim, evs, {job: (jid, 0)})  # type: ignore[arg-type]
                            evs.clear()
                        if last:
                            return
                        stop.wait(0.25)

                t = threading.Thread(target=loop, daemon=True) if tr is not None else None
                c0 = time.process_time()
                if t is not None:
                    t.start()
                try:
                    n, el, cpu = b.release(p, secs + 300)
                finally:
                    stop.set()
                    if t is not None:
                        time.sleep(0.1)   # the last exits reach the ring; the loop's final pass reads them
                        t.join()
                    c1 = time.process_time()
                    if tr is not None:
                        tr.close()
                    if conf == "jobcage agent":
                        c0, c1 = 0.0, b.agent_cpu() - a0   # before its drain: what ran beside the spawner
                        b.settle_agent()
                        b.show(job)   # a view waits for the agent's next turn, which writes what it holds
                        seen[0] = b.store_count(job, "exec") - sum(events[conf])
                        b.agent_stop()
                n_i = int(n)
                rates[conf].append(n_i / float(el))
                spawner[conf].append(1e6 * float(cpu) / n_i)
                consumer[conf].append(1e6 * (c1 - c0) / n_i)
                events[conf].append(seen[0])
                log(f"round {r + 1}/{rounds} job floor {conf:<16} {n_i / float(el):8.0f} exec/s")
    finally:
        store.close()
        packed.close()
    rows = []
    for conf in JOB_FLOOR_CONFIGS:
        rows.append({"config": conf, "median": median(rates[conf]),
                     "paired_ratio": paired(rates[conf], rates["none"]),
                     "spawner_cpu_us_per_exec": median(spawner[conf]),
                     "spawner_cpu_paired_diff_us": median([a - z for a, z in zip(spawner[conf], spawner["none"],
                                                                                   strict=True)]),
                     "consumer_cpu_us_per_exec": median(consumer[conf]),
                     "events_per_exec": median([e / (rt * secs) for e, rt in zip(events[conf], rates[conf],
                                                                                 strict=True)]),
                     "rates": [round(x) for x in rates[conf]]})
    return {"rounds": rounds, "run_seconds": secs, "rows": rows}


def agent_work(b: Bench, secs: float, profile: bool = False, acct_source: str = "kernel") -> dict:
    """The agent's own CPU time per traced exec, in-process and load-robust: the tracer, accounting and store
    the agent uses, fed a batch of execs that waited in the kernel (ring buffer, taskstats socket) while the
    spawner ran, then worked off in one timed pass per stage, as the agent's loop does (poll the tracer, write
    the batch in one transaction, read the accounting twice: records whose exit is learned late wait one
    poll).  A busy node's other exits reach the accounting too; they are counted per record."""
    from jobcage.agent.accounting import Accounting
    from jobcage.agent.lifecycle import JobManager
    from jobcage.agent.store import Store
    from jobcage.agent.tracer import Tracer

    job = "work"
    b.prologue(job)
    evs: list = []
    tr = Tracer(evs.append, backend="bpf")
    acc = Accounting(tr, source=acct_source)
    acc.start()
    store = Store(str(b.dir / "work.db"))
    jid = store.add_job(job, 0, 0, job, 256, time.time())
    shim = argparse.Namespace(store=store)   # record_trace needs only the store
    rows: dict[str, dict] = {}
    try:
        for phase, in_job, run_s in (("warm-up", True, 0.5), ("in a job", True, secs), ("outside any job", False, secs)):
            p = b.start_gated([str(b.spawner), f"{run_s}", str(b.workers), "0"], job if in_job else None)
            if in_job and not tr.jobs():
                tr.add_job(job, 0, cgroup2_ino(p.pid), [p.pid])
            tr.poll(0)
            acc.poll(0)
            evs.clear()
            r0 = acc.records
            n = int(b.release(p, run_s + 300)[0])
            time.sleep(0.1)   # the last exits reach the kernel's maps and the socket
            # CPU time, not wall time: on a loaded node a preemption would land on whatever function ran
            prof = cProfile.Profile(time.process_time) if profile and phase != "warm-up" else None
            if prof is not None:
                prof.enable()
            c0 = time.process_time()
            tr.poll(0)
            c1 = time.process_time()
            JobManager.record_trace(shim, evs, {job: (jid, 0)})  # type: ignore[arg-type]   # one transaction
            c2 = time.process_time()
            acc.poll(0)
            acc.poll(0)
            c3 = time.process_time()
            if prof is not None:   # to stderr: where the time of this pass went, by function (--profile)
                prof.disable()
                print(f"== work, {phase}: {n} execs", file=sys.stderr)
                pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(20)
            recs = acc.records - r0
            rows[phase] = {"execs": n, "events": len(evs), "exit_records": recs,
                           "tracer_us_per_exec": 1e6 * (c1 - c0) / n, "store_us_per_exec": 1e6 * (c2 - c1) / n,
                           "accounting_us_per_exec": 1e6 * (c3 - c2) / n,
                           "accounting_us_per_record": 1e6 * (c3 - c2) / max(recs, 1),
                           "total_us_per_exec": 1e6 * (c3 - c0) / n}
    finally:
        acc.close()
        tr.close()
        store.close()
    rows.pop("warm-up")
    return {"seconds": secs, "rows": rows}


CTREE_FILES = 96
COREUTILS_LOOP = ("i=0; while [ $i -lt {n} ]; do basename /a/b/c >/dev/null; dirname /a/b/c >/dev/null; "
                  "echo x | /usr/bin/wc -c >/dev/null; /usr/bin/seq 3 | /usr/bin/sort -r >/dev/null; "
                  "/bin/true; i=$((i+1)); done")
TIMED_SH = """read _
t0=$(date +%s%N)
{body}
t1=$(date +%s%N)
echo $(( t1 - t0 ))
"""


def make_ctree(d: Path, files: int) -> None:
    """A small C project: FILES sources of a few functions each, a Makefile with one rule per object."""
    src = d / "src"
    src.mkdir(parents=True)
    for i in range(files):
        body = "\n".join(f"int f{i}_{k}(int x) {{ int s = 0; for (int j = 0; j < x; j++) s += j * {k + 1} ^ (s >> 3); "
                         f"return s; }}" for k in range(8))
        (src / f"m{i}.c").write_text(f"/* generated by bench/trace_overhead.py */\n{body}\n")
    (src / "main.c").write_text("int main(void) { return 0; }\n")
    (src / "Makefile").write_text("OBJS := $(patsubst %.c,%.o,$(wildcard *.c))\n"
                                  "prog: $(OBJS)\n\t$(CC) -o $@ $^\n"
                                  "%.o: %.c\n\t$(CC) -O1 -c -o $@ $<\n"
                                  "clean:\n\trm -f prog *.o\n")


DEBIAN_SOURCE = "zlib"    # C, ./configure (dozens of compiler probes) + make: ~5 s, ~1,000 execs on this kind
SRC_CACHE = Path("/var/cache/jobcage/bench-src")


def _debian_mirror() -> tuple[str, str]:
    """(URIs, suite) of the node's first Debian archive stanza; deb.debian.org bookworm if none is found."""
    try:
        text = Path("/etc/apt/sources.list.d/debian.sources").read_text()
        uris = re.search(r"^URIs:\s*(\S+)", text, re.M)
        suite = re.search(r"^Suites:\s*(\S+)", text, re.M)
        if uris and suite:
            return uris.group(1), suite.group(1)
    except OSError:
        pass
    return "http://deb.debian.org/debian", "bookworm"


def debian_source_tree(pkg: str, dest: Path) -> Path:
    """Debian source package `pkg` unpacked (dpkg-source -x) at dest/pkg.  Downloaded once into SRC_CACHE with
    `apt-get source --download-only` through a private apt state, so the node's sources and lists stay as they
    are (apt checks the files against the signed Sources index; the .dsc's uploader signature is not checked)."""
    cache = SRC_CACHE / pkg
    dscs = sorted(cache.glob("*.dsc"))
    if not dscs:
        state = SRC_CACHE / ".apt"
        for d in ("lists/partial", "cache/archives/partial", "parts"):
            (state / d).mkdir(parents=True, exist_ok=True)
        uris, suite = _debian_mirror()
        (state / "parts" / "src.sources").write_text(
            f"Types: deb-src\nURIs: {uris}\nSuites: {suite}\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
        opts = ["-o", "Dir::Etc::SourceList=/dev/null", "-o", f"Dir::Etc::SourceParts={state / 'parts'}",
                "-o", f"Dir::State::Lists={state / 'lists'}", "-o", f"Dir::Cache={state / 'cache'}",
                "-o", "APT::Sandbox::User=root"]
        log(f"downloading the Debian source of {pkg} into {cache} (once)")
        run(["apt-get", "-q", *opts, "update"])
        cache.mkdir(parents=True, exist_ok=True)
        run(["apt-get", "-q", *opts, "source", "--download-only", pkg], cwd=cache)
        dscs = sorted(cache.glob("*.dsc"))
        if not dscs:
            raise RuntimeError(f"apt-get source {pkg} left no .dsc in {cache}")
    out = dest / pkg
    dest.mkdir(parents=True, exist_ok=True)
    run(["dpkg-source", "-x", "--no-check", str(dscs[-1]), str(out)], cwd=dest)
    return out


def real_jobs(b: Bench, rounds: int, loop_n: int, rng: random.Random) -> dict:
    """Real exec-heavy jobs, with and without tracing, interleaved: the build of a Debian source package (its
    ./configure and `make -j2`), `make -j2` of a generated C tree, and a shell loop running coreutils.  Wall time
    measured inside the job (date +%s%N around the workload); each build starts from a fresh copy of its tree,
    made outside the timed part."""
    job = "real"
    b.prologue(job)
    tree = b.dir / "ctree"
    make_ctree(tree, CTREE_FILES)
    pristine = debian_source_tree(DEBIAN_SOURCE, b.dir / "debsrc")
    build = b.dir / "debbuild"
    sh = os.path.realpath("/bin/sh")
    deb = f"{DEBIAN_SOURCE} configure + make -j2"
    scripts = {deb: f"cd {build} && ./configure >/dev/null && make -s -j2 >/dev/null",
               "make -j2": f"make -s -j2 -C {tree / 'src'} >/dev/null",
               "coreutils loop": COREUTILS_LOOP.format(n=loop_n)}
    for name, body in scripts.items():
        (b.dir / f"{name.split()[0]}.sh").write_text(TIMED_SH.format(body=body))
    times: dict[tuple[str, str], list[float]] = {(w, c): [] for w in scripts for c in ("none", "jobcage")}
    execs: dict[str, list[int]] = {w: [] for w in scripts}
    agent_us: dict[str, list[float]] = {w: [] for w in scripts}
    for r in range(rounds):
        order = ["none", "jobcage"] if r % 2 == 0 else ["jobcage", "none"]
        for conf in order:
            if conf == "jobcage":
                b.agent_start()
            try:
                names = list(scripts)
                rng.shuffle(names)
                for name in names:
                    run(["make", "-s", "-C", str(tree / "src"), "clean"])
                    shutil.rmtree(build, ignore_errors=True)
                    shutil.copytree(pristine, build, symlinks=True)
                    if conf == "jobcage":
                        b.settle_agent()
                        e0, a0 = b.store_count(job, "exec"), b.agent_cpu()
                    p = b.start_gated([sh, str(b.dir / f"{name.split()[0]}.sh")], job)
                    ns = int(b.release(p, 600)[0])
                    times[(name, conf)].append(ns / 1e9)
                    if conf == "jobcage":
                        b.settle_agent()
                        n = b.store_count(job, "exec") - e0
                        execs[name].append(n)
                        agent_us[name].append(1e6 * (b.agent_cpu() - a0) / max(n, 1))
                    log(f"round {r + 1}/{rounds} {name:<15} {conf:<8} {ns / 1e9:7.3f} s")
            finally:
                if conf == "jobcage":
                    b.agent_stop()
    rows = []
    for name in scripts:
        base, traced = times[(name, "none")], times[(name, "jobcage")]
        # throughput ratio = untraced time / traced time; paired per round as in the throughput table
        rows.append({"workload": name, "none_s": median(base), "jobcage_s": median(traced),
                     "ratio": median(base) / median(traced),
                     "paired_ratio": paired(base, traced),
                     "execs": median(execs[name]), "agent_cpu_us_per_exec": median(agent_us[name]),
                     "none_runs": [round(x, 3) for x in base], "jobcage_runs": [round(x, 3) for x in traced]})
    return {"rounds": rounds, "rows": rows, "ctree_files": CTREE_FILES, "loop_iterations": loop_n,
            "debian_source": pristine.name, "debian_source_version": run(
                ["dpkg-parsechangelog", "-l", str(pristine / "debian" / "changelog"), "-S", "Version"]).strip()}


def report(res: dict) -> None:
    print(f"\njobcage trace overhead -- kernel {platform.release()}, {os.cpu_count()} CPUs, "
          f"load {res['load_before']} -> {res['load_after']}")
    t = res.get("throughput")
    if t:
        print(f"\nfork+exec throughput: {t['workers']} workers, {t['rounds']} interleaved runs of {t['run_seconds']:g} s "
              f"per configuration, medians")
        print(f"  {'configuration':<24}{'exec/s':>9}{'min':>9}{'max':>9}{'ratio':>8}{'paired':>8}   baseline")
        for row in t["rows"]:
            print(f"  {row['config']:<24}{row['median']:9.0f}{row['min']:9.0f}{row['max']:9.0f}"
                  f"{row['ratio']:8.3f}{row['paired_ratio']:8.3f}   {row['baseline']}")
        print("  ratio: median / baseline median; paired: median over rounds of run / same round's baseline run")
        print("  where the CPUs' time went, us per exec (means; change against the baseline's runs of the same rounds):")
        print(f"  {'configuration':<24}" + "".join(f"{k:>16}" for k in SPLIT))
        for row in t["rows"]:
            print(f"  {row['config']:<24}" + "".join(f"{row['split_us'][k]:8.1f} ({row['split_diff_us'][k]:+5.1f})"
                                                     for k in SPLIT))
        print(f"  agent CPU per traced exec: {t['agent_cpu_us_per_exec']:.1f} us in a job, "
              f"{t['agent_cpu_us_per_exec_outside']:.1f} us per exec outside any job; "
              f"events lost per jobcage run: {t['events_lost_per_run']}")
    co = res.get("cost")
    if co:
        print(f"\nCPU per exec: one worker, {co['rounds']} interleaved runs of {co['run_seconds']:g} s per configuration; "
              "the spawner's CPU (with its children) plus the agent's, medians")
        print(f"  {'configuration':<24}{'us/exec':>9}{'baseline':>10}{'agent':>8}{'paired':>8}")
        for row in co["rows"]:
            print(f"  {row['config']:<24}{row['us_per_exec']:9.1f}{row['baseline_us_per_exec']:10.1f}"
                  f"{row['agent_us_per_exec']:8.1f}{row['paired_ratio']:8.3f}")
        print("  paired: median over rounds of baseline CPU per exec / traced CPU per exec (what a CPU-bound job keeps)")
    sc = res.get("syscalls")
    if sc:
        print(f"\ncheap syscalls (read + write of 512 bytes, like dd bs=512): {sc['rounds']} interleaved runs of "
              f"{sc['run_seconds']:g} s per configuration; the agent hooked the syscalls by "
              f"{', '.join(sc['syscall_hooks'])}; CPU per syscall, medians")
        print(f"  {'configuration':<26}{'ns/call':>9}{'baseline':>10}{'paired':>8}")
        for row in sc["rows"]:
            print(f"  {row['config']:<26}{row['ns_per_syscall']:9.1f}{row['baseline_ns_per_syscall']:10.1f}"
                  f"{row['paired_ratio']:8.3f}")
        print("  paired: median over rounds of baseline CPU per syscall / traced CPU per syscall")
    s = res.get("setuid")
    if s:
        print(f"\nidentity events: {s['calls']} setresuid calls at {s['achieved_rate']:.0f}/s "
              f"(target {s['target_rate']:g}) for {s['seconds']:.1f} s, {s['failed']} failed: "
              f"{s['setuid_events_in_trail']} setuid events in the trail, events_lost {s['events_lost']}, "
              f"identity recorded: {s['identity_recorded']}, agent CPU {s['agent_cpu_seconds']:.2f} s")
    for src, w in (res.get("work") or {}).items():
        print(f"\nagent work per exec, accounting from {src}, in-process CPU time over {w['seconds']:g} s of spawner "
              "execs worked off at once:")
        print(f"  {'where':<17}{'execs':>7}{'tracer':>9}{'store':>9}{'acct':>9}{'total':>9}  exit records read, us each")
        for where, row in w["rows"].items():
            print(f"  {where:<17}{row['execs']:7d}{row['tracer_us_per_exec']:9.1f}{row['store_us_per_exec']:9.1f}"
                  f"{row['accounting_us_per_exec']:9.1f}{row['total_us_per_exec']:9.1f}  "
                  f"{row['exit_records']} x {row['accounting_us_per_record']:.1f}")
    bc = res.get("bpf")
    if bc:
        print(f"\nin-kernel cost (kernel.bpf_stats_enabled), spawner runs of {bc['seconds']:g} s:")
        for where, row in bc["rows"].items():
            print(f"  {where}: {row['ns_per_exec']:.0f} ns of BPF per exec ({row['execs']} execs)")
            for name, pr in sorted(row["programs"].items(), key=lambda kv: -kv[1]["calls"]):
                print(f"    {name:<34}{pr['ns_per_call']:8.0f} ns/call {pr['calls_per_exec']:6.2f} calls/exec")
    ai = res.get("idle")
    if ai:
        print(f"\nagent idle, default reconcile_interval, one job: {ai['agent_cpu_pct']:.2f}% of a core over "
              f"{ai['seconds']:g} s")
    fl = res.get("floor")
    if fl:
        print(f"\noutside any job, part by part: {fl['rounds']} interleaved runs of {fl['run_seconds']:g} s, medians")
        print(f"  {'configuration':<22}{'exec/s':>9}{'paired':>8}  consumer CPU us/exec")
        for row in fl["rows"]:
            print(f"  {row['config']:<22}{row['median']:9.0f}{row['paired_ratio']:8.3f}  "
                  f"{row['consumer_cpu_us_per_exec']:.1f}")
    jf = res.get("jobfloor")
    if jf:
        print(f"\nin a job, part by part: {jf['rounds']} interleaved runs of {jf['run_seconds']:g} s, medians")
        print(f"  {'configuration':<18}{'exec/s':>9}{'paired':>8}{'spawner us/exec':>17}{'(paired diff)':>15}"
              f"{'consumer us/exec':>18}{'events/exec':>13}")
        for row in jf["rows"]:
            print(f"  {row['config']:<18}{row['median']:9.0f}{row['paired_ratio']:8.3f}"
                  f"{row['spawner_cpu_us_per_exec']:17.1f}{row['spawner_cpu_paired_diff_us']:+15.1f}"
                  f"{row['consumer_cpu_us_per_exec']:18.1f}{row['events_per_exec']:13.2f}")
    rj = res.get("real")
    if rj:
        print(f"\nreal jobs, {rj['rounds']} interleaved rounds (Debian source {rj['debian_source']} "
              f"{rj['debian_source_version']}; make -j2 of {rj['ctree_files']} generated C files; "
              f"coreutils loop of {rj['loop_iterations']} iterations), medians:")
        print(f"  {'workload':<30}{'none':>9}{'jobcage':>9}{'ratio':>8}{'paired':>8}{'execs':>8}  agent us/exec")
        for row in rj["rows"]:
            print(f"  {row['workload']:<30}{row['none_s']:8.3f}s{row['jobcage_s']:8.3f}s{row['ratio']:8.3f}"
                  f"{row['paired_ratio']:8.3f}{row['execs']:8.0f}  {row['agent_cpu_us_per_exec']:.1f}")
    c = res.get("cpu")
    if c:
        print(f"\nagent CPU at {c['achieved_rate']:.0f} exec/s (target {c['target_rate']:g}) for {c['seconds']:.1f} s: "
              f"{c['agent_cpu_pct_during']:.1f}% of one core during the run, {c['agent_cpu_pct_with_drain']:.1f}% "
              f"including the drain, {c['agent_cpu_pct_idle']:.1f}% idle; {c['exec_events_in_trail']} exec events "
              f"in the trail, events_lost {c['events_lost']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6, help="interleaved runs per configuration (default 6)")
    ap.add_argument("--run-seconds", type=float, default=2.0, help="seconds per run (default 2)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--setuid-rate", type=float, default=5000.0)
    ap.add_argument("--setuid-seconds", type=float, default=5.0)
    ap.add_argument("--exec-rate", type=float, default=1000.0)
    ap.add_argument("--cpu-seconds", type=float, default=10.0)
    ap.add_argument("--only", default="throughput,setuid,cpu,work,bpf,real,syscalls",
                    help="comma list of throughput, setuid, cpu, work, bpf, real, syscalls; cost, floor, jobfloor, idle "
                         "(not in the default)")
    ap.add_argument("--real-rounds", type=int, default=4, help="interleaved rounds of the real jobs (default 4)")
    ap.add_argument("--loop-iterations", type=int, default=300, help="coreutils loop iterations (6 execs each)")
    ap.add_argument("--profile", action="store_true", help="work: a cProfile of each timed pass, to stderr")
    ap.add_argument("--no-peers", action="store_true", help="skip auditd and bpftrace")
    ap.add_argument("--syscall-hooks", default="auto", choices=SYSCALL_HOOKS,
                    help="the agent's [tracer] syscall_hooks (default auto, the agent's default)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("trace_overhead: run as root", file=sys.stderr)
        return 1
    needed = ["gcc"] + ([] if args.no_peers else ["auditctl", "auditd", "bpftrace"])
    missing = [t for t in needed if shutil.which(t) is None]
    if missing:
        print(f"trace_overhead: missing {', '.join(missing)}", file=sys.stderr)
        return 1
    only = set(args.only.split(","))
    seed = args.seed if args.seed is not None else int(time.time())
    res: dict[str, Any] = {"seed": seed, "load_before": os.getloadavg()[0]}
    b = Bench(args.workers, args.syscall_hooks)
    problems: list[str] = []
    try:
        b.build()
        if "throughput" in only:
            res["throughput"] = throughput(b, args.rounds, args.run_seconds, random.Random(seed), not args.no_peers)
        if "cost" in only:
            res["cost"] = cpu_cost(b, args.rounds, args.run_seconds, random.Random(seed + 3))
        if "syscalls" in only:
            res["syscalls"] = syscall_cost(b, args.rounds, args.run_seconds, random.Random(seed + 4))
        if "setuid" in only:
            res["setuid"] = setuid_rate(b, args.setuid_rate, args.setuid_seconds)
        if "cpu" in only:
            res["cpu"] = agent_cpu(b, args.exec_rate, args.cpu_seconds)
        if "work" in only:
            # the agent's default (exit CPU from the tracer) and the taskstats path beside it, same run
            res["work"] = {src: agent_work(b, args.run_seconds, args.profile, src) for src in ("kernel", "taskstats")}
        if "bpf" in only:
            res["bpf"] = bpf_cost(b, args.run_seconds)
        if "idle" in only:
            res["idle"] = agent_idle(b, 30.0)
        if "floor" in only:
            res["floor"] = floor_parts(b, args.rounds, args.run_seconds, random.Random(seed + 2))
        if "jobfloor" in only:
            res["jobfloor"] = job_floor(b, args.rounds, args.run_seconds, random.Random(seed + 5))
        if "real" in only:
            res["real"] = real_jobs(b, args.real_rounds, args.loop_iterations, random.Random(seed + 1))
    finally:
        problems = b.cleanup()
    res["load_after"] = os.getloadavg()[0]
    if problems:
        print("trace_overhead: cleanup problems: " + "; ".join(problems), file=sys.stderr)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        report(res)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
