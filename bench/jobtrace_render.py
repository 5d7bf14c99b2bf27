"""jobtrace render cost: one-shot `jobtrace JOB_ID` on jobs of 500 and 5,000 processes against `ps -e --forest`
in the same run (interleaved, medians), and the CPU of `jobtrace JOB_ID --live` at 1 Hz on the 5,000-process job.

Everything lives in a private jobcage (own cgroup subtree ``jobcage-bjt<hex>``, state dir, socket, config, tracer
off); the jobs are `sleep` processes started through `jobcage run` and removed through their cgroups (epilogue),
then the subtree is removed.  Root only.  Numbers, not pass/fail: targets are printed next to them.

    .venv/bin/python bench/jobtrace_render.py [--sizes 500,5000] [--runs 9] [--live-seconds 10]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import secrets
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

BIN = Path(sys.executable).parent
JOBCAGE = str(BIN / "jobcage")
JOBTRACE = str(BIN / "jobtrace")
HZ = os.sysconf("SC_CLK_TCK")

SPAWNER = """
import os, sys, time
n = int(sys.argv[1])
for _ in range(n):
    os.posix_spawn("/bin/sleep", ["sleep", "86400"], os.environ)
print("ready", flush=True)
time.sleep(86400)
"""


class Bench:
    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="jcbench-"))
        self.subtree = f"jobcage-bjt{secrets.token_hex(4)}"
        self.config = self.base / "jobcage.toml"
        self.config.write_text(f'[cgroups]\nsubtree = "{self.subtree}"\n'
                               f'[agent]\nstate_dir = "{self.base / "state"}"\nsocket = "{self.base / "agent.sock"}"\n'
                               '[tracer]\nbackend = "off"\n[cleanup]\nenabled = false\n')
        self.env = dict(os.environ, JOBCAGE_CONFIG=str(self.config))
        self.jobs: list[str] = []
        self.starters: list[subprocess.Popen] = []
        self.agent: subprocess.Popen | None = None

    def jobcage(self, *args: str) -> None:
        subprocess.run([JOBCAGE, *args], env=self.env, check=True, stdout=subprocess.DEVNULL)

    def member_dir(self, job: str) -> Path:
        from jobcage.agent.config import load
        from jobcage.cgroups import get_driver

        cfg = load(str(self.config))
        return Path(get_driver(cfg.cgroup_mode, cfg.cgroup_subtree).path(job))

    def make_job(self, n: int) -> str:
        """A job of n sleeps plus their parent."""
        job = f"b{n}"
        self.jobcage("prologue", job, "--uid", "0", "--pids-max", str(n + 100))
        self.jobs.append(job)
        p = subprocess.Popen([JOBCAGE, "run", job, "--", sys.executable, "-c", SPAWNER, str(n)], env=self.env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        self.starters.append(p)
        assert p.stdout is not None
        if p.stdout.readline().strip() != b"ready":
            raise SystemExit(f"could not start {n} processes in {job}")
        procs = self.member_dir(job) / "cgroup.procs"
        deadline = time.monotonic() + 60
        while len(procs.read_text().split()) < n + 1:
            if time.monotonic() > deadline:
                raise SystemExit(f"{job}: only {len(procs.read_text().split())} of {n + 1} processes")
            time.sleep(0.1)
        return job

    def start_agent(self) -> None:
        self.agent = subprocess.Popen([JOBCAGE, "agent", "--config", str(self.config)], env=self.env,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
        sock = self.base / "agent.sock"
        deadline = time.monotonic() + 30
        while not sock.exists():
            if time.monotonic() > deadline or self.agent.poll() is not None:
                raise SystemExit("the agent did not start")
            time.sleep(0.05)
        time.sleep(0.3)

    def stop_agent(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            self.agent.send_signal(signal.SIGTERM)
            self.agent.wait(timeout=30)
        self.agent = None

    def cleanup(self) -> None:
        self.stop_agent()
        for job in self.jobs:  # kills every process of the job through its cgroup, removes the cgroup
            subprocess.run([JOBCAGE, "epilogue", job], env=self.env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        for p in self.starters:
            p.wait(timeout=30)
        for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup/pids", "/sys/fs/cgroup/freezer",
                     "/sys/fs/cgroup/cpuacct", "/sys/fs/cgroup"):
            d = Path(root) / self.subtree
            if d.is_dir():
                try:
                    d.rmdir()
                except OSError as e:
                    print(f"warning: cannot remove {d}: {e.strerror}", file=sys.stderr)
        shutil.rmtree(self.base, ignore_errors=True)


def wall(argv: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    r = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {r.stderr.decode().strip()}")
    return dt


def one_shot(b: Bench, job: str, runs: int) -> dict[str, float]:
    """Medians of interleaved runs (the VMs are noisy)."""
    cmds = {"jobtrace": [JOBTRACE, job], "ps -e --forest": ["ps", "-e", "--forest"],
            "jobtrace --json": [JOBTRACE, job, "--json"]}
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for argv in cmds.values():  # warm-up
        wall(argv, b.env)
    for _ in range(runs):
        for name, argv in cmds.items():
            times[name].append(wall(argv, b.env))
    return {k: statistics.median(v) for k, v in times.items()}


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def live_cpu(b: Bench, job: str, seconds: float) -> tuple[float, float | None]:
    """(jobtrace --live %, agent % or None) of one core over `seconds`, after a 3 s warm-up, in a real pty."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    p = subprocess.Popen([JOBTRACE, job, "--live"], stdin=slave, stdout=slave, stderr=slave,
                         env=dict(b.env, TERM="xterm-256color"), start_new_session=True)
    stop = time.monotonic() + 3 + seconds + 5

    def drain(until: float) -> None:
        import select

        while (left := until - time.monotonic()) > 0:
            if select.select([master], [], [], left)[0]:
                try:
                    os.read(master, 1 << 16)
                except OSError:
                    return

    try:
        drain(time.monotonic() + 3)
        agent = b.agent.pid if b.agent is not None else None
        t0, c0 = time.monotonic(), cpu_ticks(p.pid)
        a0 = cpu_ticks(agent) if agent else 0
        drain(time.monotonic() + seconds)
        t1, c1 = time.monotonic(), cpu_ticks(p.pid)
        a1 = cpu_ticks(agent) if agent else 0
        os.write(master, b"q")
        drain(min(stop, time.monotonic() + 2))
        if p.wait(timeout=5) != 0:
            raise SystemExit(f"jobtrace --live exited with {p.returncode}")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
        os.close(slave)
    pct = (c1 - c0) / HZ / (t1 - t0) * 100
    return pct, ((a1 - a0) / HZ / (t1 - t0) * 100 if agent else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="500,5000")
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--live-seconds", type=float, default=10.0)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/jobtrace_render.py: run as root (it creates cgroups)")
    sizes = [int(x) for x in args.sizes.split(",")]
    b = Bench()
    try:
        jobs = {n: b.make_job(n) for n in sizes}
        total = len([d for d in os.listdir("/proc") if d.isdigit()])
        print(f"jobtrace one-shot vs ps -e --forest: {total} processes on the node, medians of {args.runs} "
              "interleaved runs, output to /dev/null")
        print(f"{'job size':>9} {'mode':>7} {'jobtrace':>9} {'--json':>8} {'ps':>8} {'ratio':>6}")
        for mode in ("direct", "agent"):
            if mode == "agent":
                b.start_agent()
            for n in sizes:
                m = one_shot(b, jobs[n], args.runs)
                ratio = m["jobtrace"] / m["ps -e --forest"]
                print(f"{n:>9} {mode:>7} {m['jobtrace']:>8.3f}s {m['jobtrace --json']:>7.3f}s "
                      f"{m['ps -e --forest']:>7.3f}s {ratio:>5.2f}x")
            b.stop_agent()
        print("targets at 5,000: <= 0.5 s and <= 1.5x ps")
        big = jobs[max(sizes)]
        print(f"\njobtrace --live at 1 Hz on the {max(sizes)}-process job, CPU over {args.live_seconds:g} s "
              "(120x40 pty):")
        pct, _ = live_cpu(b, big, args.live_seconds)
        print(f"  direct (no agent):  jobtrace {pct:.1f}% of a core")
        b.start_agent()
        pct, agent_pct = live_cpu(b, big, args.live_seconds)
        print(f"  through the agent:  jobtrace {pct:.1f}% of a core, agent {agent_pct:.1f}%")
        print("target: <= 5% of a core")
    finally:
        b.cleanup()


if __name__ == "__main__":
    main()
