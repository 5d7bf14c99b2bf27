#!/usr/bin/env python3
"""Kill latency: time from the kill request to an empty job, per job size and kill path.

Paths: ``hybrid`` = the cgroup.kill path (one write, the kernel kills atomically); ``v1`` = the freeze path
(freeze, SIGKILL every pid, clamp pids.max, thaw, repeat until empty).  Sizes: jobs of 100 / 1,000 / 2,000
sleeping processes and a live fork bomb held at pids.max 256.  Median of --trials (default 20) per size
and path; the clock runs around ``Driver.kill()``, which returns only once cgroup.procs is empty.

Root only.  Everything lives in a private subtree ``jobcage-bench<hex>`` that is removed at the end; this
process is a child subreaper, so the orphans of each trial are reaped here (pid 1 on these VMs reaps lazily,
and 100,000 zombies would exhaust pid_max).

    .venv/bin/python bench/kill_latency.py [--trials N] [--sizes 100,1000,2000] [--modes hybrid,v1] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobcage.cgroups import get_driver  # noqa: E402
from jobcage.cgroups.driver import Driver  # noqa: E402

PR_SET_CHILD_SUBREAPER = 36
BOMB_LIMIT = 256  # a fork bomb only ever runs in a cgroup with pids.max <= 256

# Forks n-1 children; says "ready" once every fork has returned.  kind "exec": each child execs
# `sleep infinity` (small processes, like most of a job's); kind "fork": children stay forked copies of this
# python (tens of MB of shared mappings each, whose teardown dominates the kill).
SPAWNER = """
import os, signal, sys
n, kind = int(sys.argv[1]), sys.argv[2]
sys.stdin.buffer.read(1)          # wait until the bench has moved us into the job
for _ in range(n - 1):
    if os.fork() == 0:
        if kind == "exec":
            os.execv("/bin/sleep", ["sleep", "infinity"])
        while True:
            signal.pause()
sys.stdout.write("ready\\n"); sys.stdout.flush()
while True:
    signal.pause()
"""


class Reaper:
    """Reaps our adopted orphans (we are a subreaper) while enabled; paused around the clock."""

    def __init__(self) -> None:
        self.on = threading.Event()
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            if not self.on.wait(0.05):
                continue
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if pid == 0:
                time.sleep(0.002)

    def drain(self, timeout: float = 30.0) -> None:
        """Reap until no child is left (everything of the trial is dead by then)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                time.sleep(0.005)


def spawn_sleepers(d: Driver, name: str, n: int, kind: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-I", "-c", SPAWNER, str(n), kind], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    d.attach(name, p.pid)
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write("g")
    p.stdin.flush()
    if p.stdout.readline().strip() != "ready":
        raise RuntimeError("spawner failed")
    deadline = time.monotonic() + 60
    while len(d.pids(name)) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(d.pids(name))} of {n} processes in {name}")
        time.sleep(0.01)
    if kind == "exec":  # settled: every child has become `sleep`
        while sum(comm(pid) == "sleep" for pid in d.pids(name)) < n - 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"children of {name} did not exec")
            time.sleep(0.02)
    return p


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def spawn_bomb(d: Driver, name: str, reaper: Reaper) -> subprocess.Popen:
    """bash's fork bomb, attached before it starts (it waits on stdin), held at pids.max BOMB_LIMIT."""
    d.set_pids_max(name, BOMB_LIMIT)
    p = subprocess.Popen(["bash", "-c", "read -r _; :(){ :|:& };:"], stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    d.attach(name, p.pid)
    assert p.stdin is not None
    reaper.on.set()  # keep the storm live: its exited members are reaped, their slots refilled
    p.stdin.write("go\n")
    p.stdin.close()
    deadline = time.monotonic() + 60
    while True:
        st = d.pids_stats(name)
        if st["limit_hits"] and st["current"] >= BOMB_LIMIT * 0.9:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"bomb did not reach its limit: {st}")
        time.sleep(0.01)
    time.sleep(0.2)  # a moment at the limit, forks being refused
    reaper.on.clear()
    return p


def trial(d: Driver, name: str, size: int | str, kind: str, reaper: Reaper) -> tuple[float, int]:
    d.create(name)
    try:
        if size == "bomb":
            p = spawn_bomb(d, name, reaper)
        else:
            d.set_pids_max(name, int(size) + 64)
            p = spawn_sleepers(d, name, int(size), kind)
        n = len(d.pids(name))
        t0 = time.perf_counter()
        d.kill(name, timeout=30)
        dt = time.perf_counter() - t0
        p.wait(timeout=30)
        return dt, n
    finally:
        with contextlib.suppress(Exception):
            d.kill(name, timeout=30)
        reaper.drain()
        d.remove(name, timeout=30)


def cleanup_subtree(drivers: list[Driver]) -> None:
    for d in drivers:
        for name in d.list():
            with contextlib.suppress(Exception):
                d.kill(name, timeout=30)
            with contextlib.suppress(Exception):
                d.remove(name, timeout=30)
    seen = set()
    for d in drivers:
        for top in d.features()["subtree"]:
            if top not in seen and os.path.isdir(top):
                seen.add(top)
                with contextlib.suppress(OSError):
                    os.rmdir(top)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--sizes", default="100,1000,2000,bomb")
    ap.add_argument("--modes", default="hybrid,v1")
    ap.add_argument("--kind", choices=("exec", "fork"), default="exec",
                    help="members: exec'd `sleep` (default) or forked copies of a python process")
    ap.add_argument("--json", action="store_true", help="also print the raw numbers as JSON")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("kill_latency: run as root", file=sys.stderr)
        return 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print("kill_latency: cannot become a child subreaper", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the cleanup on SIGTERM too
    subtree = f"jobcage-bench{secrets.token_hex(3)}"
    sizes: list[int | str] = [s if s == "bomb" else int(s) for s in args.sizes.split(",")]
    modes = args.modes.split(",")
    drivers = {m: get_driver(m, subtree) for m in modes}
    for d in drivers.values():
        d.ensure_subtree()
    reaper = Reaper()
    results: dict[str, dict[str, dict]] = {}
    try:
        for mode, d in drivers.items():
            results[mode] = {}
            for size in sizes:
                times, counts = [], []
                for i in range(args.trials):
                    dt, n = trial(d, f"{mode}-{size}-{i}", size, args.kind, reaper)
                    times.append(dt * 1000)
                    counts.append(n)
                results[mode][str(size)] = {"ms": times, "processes": counts}
                print(f"  {mode:7} {size!s:>5}: median {statistics.median(times):7.1f} ms", file=sys.stderr)
    finally:
        reaper.stop.set()
        cleanup_subtree(list(drivers.values()))
    path = {"hybrid": "cgroup.kill", "v1": "freeze", "v2": "cgroup.kill"}
    print(f"kill latency, {args.trials} trials each, members: {args.kind} "
          "(ms from kill request to empty cgroup.procs)")
    print(f"{'mode':8} {'path':12} {'job':>16} {'median':>8} {'p90':>8} {'min':>8} {'max':>8}")
    for mode, by_size in results.items():
        for size, r in by_size.items():
            t = sorted(r["ms"])
            label = f"bomb@{BOMB_LIMIT} (~{int(statistics.median(r['processes']))})" if size == "bomb" else size
            p90 = t[min(len(t) - 1, int(round(0.9 * (len(t) - 1))))]
            print(f"{mode:8} {path.get(mode, '?'):12} {label:>16} {statistics.median(t):8.1f} {p90:8.1f} "
                  f"{t[0]:8.1f} {t[-1]:8.1f}")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
