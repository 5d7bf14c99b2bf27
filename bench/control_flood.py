#!/usr/bin/env python3
"""Control socket under a flood: root's hook latency, the agent's RSS and threads, quiet vs flooded.

The flood is issue 17's: non-root users (created for the run, removed at the end) hold 8 processes x
1,000 idle connections and reopen what the agent closes, one user trickles requests one byte per second
on 300 connections, one sends 10,000 malformed frames (random bytes, 4 GiB length prefix, 5,000-deep
nesting, bad parameters, not JSON).  Root's prologue / adopt / epilogue are timed twice per round:
answered by the agent (connect to answer, through the client the hooks use, on root's listener) and
as whole `jobcage` hook processes.  The baseline is the same measurement with no flood, in the same run;
the table prints medians, p90 and the flooded/quiet ratio.

Root only.  A private config, state dir, sockets and cgroup subtree (``jobcage-bench<hex>``), users
``jcb<hex>``; all removed at the end.

    .venv/bin/python bench/control_flood.py [--rounds N] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
JOBCAGE = str(BIN / "jobcage") if (BIN / "jobcage").exists() else (shutil.which("jobcage") or "jobcage")
# the hook processes: what batch systems call, the installed launcher (/usr/local/bin/jobcage), else the venv's
HOOK = shutil.which("jobcage") or JOBCAGE
FLOODER = ROOT / "tests" / "flooder.py"
sys.path.insert(0, str(ROOT / "bench"))
from hook_latency import cleanup, ping  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status(pid: int) -> tuple[int, int]:
    st = dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in ln)
    return int(st["VmRSS"].split()[0]), int(st["Threads"])


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    return {ln.rpartition(" ")[0]: float(ln.rpartition(" ")[2]) for ln in text.splitlines()
            if ln.startswith("jobcage_control")}


def make_user() -> tuple[str, int, int]:
    name = f"jcb{secrets.token_hex(4)}"
    for _ in range(30):
        r = subprocess.run(["useradd", "--no-create-home", "--user-group", "--shell", "/bin/sh", "-K",
                            "UID_MIN=1000", name], capture_output=True, text=True)
        if r.returncode == 0:
            e = pwd.getpwnam(name)
            return name, e.pw_uid, e.pw_gid
        time.sleep(0.2)  # another session holds the passwd lock
    raise RuntimeError(f"useradd {name}: {r.stderr.strip()}")


def round_trip(sock: str, job: str, env: dict[str, str], hooks: bool) -> dict[str, float]:
    """One job's prologue / adopt / epilogue: agent answer times, and whole hook processes if `hooks`."""
    from jobcage.agent.client import call

    out: dict[str, float] = {}
    sleeper = subprocess.Popen(["sleep", "300"])
    for method, params in (("prologue", {"job_id": job, "uid": 0}), ("adopt", {"job_id": job, "pid": sleeper.pid}),
                           ("epilogue", {"job_id": job})):
        t0 = time.perf_counter()
        call(sock, method, timeout=60, **params)
        out[f"{method} answered"] = (time.perf_counter() - t0) * 1000
    sleeper.wait(timeout=30)
    if hooks:
        sleeper = subprocess.Popen(["sleep", "300"])
        for hook, argv in (("prologue", ["prologue", job + "h", "--uid", "0"]),
                           ("adopt", ["adopt", job + "h", "--pid", str(sleeper.pid)]),
                           ("epilogue", ["epilogue", job + "h"])):
            t0 = time.perf_counter()
            r = subprocess.run([HOOK, *argv], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
            out[f"jobcage {hook}"] = (time.perf_counter() - t0) * 1000
            if r.returncode:
                raise RuntimeError(f"jobcage {hook}: {r.stderr.strip()}")
        sleeper.wait(timeout=30)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("control_flood: run as root", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    subtree = f"jobcage-bench{secrets.token_hex(3)}"
    base = Path(tempfile.mkdtemp(prefix="jcb-", dir="/tmp"))
    base.chmod(0o755)
    scratch = base / "scratch"
    scratch.mkdir()
    scratch.chmod(0o1777)
    shutil.copy(FLOODER, base / "flooder.py")
    sock, port = str(base / "agent.sock"), free_port()
    cfg = base / "jobcage.toml"
    cfg.write_text(f'[cgroups]\nsubtree = "{subtree}"\n[agent]\nstate_dir = "{base / "state"}"\n'
                   f'socket = "{sock}"\nmetrics_port = {port}\n[tracer]\nbackend = "off"\n'
                   f'[cleanup]\nenabled = false\n')
    cfg.chmod(0o644)
    env = dict(os.environ, JOBCAGE_CONFIG=str(cfg))
    os.environ["JOBCAGE_CONFIG"] = str(cfg)
    from jobcage.agent.config import load

    rsock = load(str(cfg)).root_socket
    users: list[tuple[str, int, int]] = []
    procs: list[subprocess.Popen] = []
    agent: subprocess.Popen | None = None
    res: dict[str, dict[str, list[float]]] = {"quiet": {}, "flood": {}}
    mem: dict[str, object] = {}
    try:
        agent = subprocess.Popen([JOBCAGE, "agent", "--config", str(cfg)], env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not ping(sock):
            if agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the agent did not start")
            time.sleep(0.05)
        users = [make_user() for _ in range(6)]
        for i in range(3):
            round_trip(rsock, f"warm{i}", env, hooks=True)
        for i in range(args.rounds):
            for k, v in round_trip(rsock, f"q{i}", env, hooks=True).items():
                res["quiet"].setdefault(k, []).append(v)
        time.sleep(0.5)
        idle_rss, idle_threads = status(agent.pid)
        rss, threads = [idle_rss], [idle_threads]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                r, t = status(agent.pid)  # type: ignore[union-attr]
                rss.append(r)
                threads.append(t)
                stop.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        def flood(user: tuple[str, int, int], mode: str, n: int, tag: str) -> Path:
            st = scratch / f"{tag}.json"
            procs.append(subprocess.Popen(
                ["setpriv", f"--reuid={user[1]}", f"--regid={user[2]}", "--init-groups", "--", "/usr/bin/python3",
                 "-I", str(base / "flooder.py"), sock, str(st), mode, str(n)], cwd="/", stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
            return st

        for k in range(8):
            flood(users[k % 4], "idle", 1000, f"idle{k}")
        flood(users[4], "slow", 300, "slow")
        t0 = time.monotonic()
        while scrape(port).get('jobcage_control_connections{lane="user",state="waiting"}', 0) < 5 * 128:
            if time.monotonic() - t0 > 120:
                raise RuntimeError("the flood did not build up")
            time.sleep(0.2)
        junk = flood(users[5], "garbage", 10_000, "junk")
        garbage_rounds = 0
        for i in range(args.rounds):
            with contextlib.suppress(FileNotFoundError, ValueError):
                garbage_rounds += not json.loads(junk.read_text()).get("done")
            for k, v in round_trip(rsock, f"f{i}", env, hooks=True).items():
                res["flood"].setdefault(k, []).append(v)
            if i % 3 == 0:
                from jobcage.agent.client import call

                t1 = time.perf_counter()
                call(sock, "ping", timeout=60)
                res["flood"].setdefault("root ping, shared listener", []).append((time.perf_counter() - t1) * 1000)
        m = scrape(port)
        stop.set()
        sampler.join()
        mem = {"rss_idle_kb": idle_rss, "rss_max_kb": max(rss), "threads_idle": idle_threads,
               "threads_max": max(threads), "rounds_during_garbage": garbage_rounds,
               "fds": len(os.listdir(f"/proc/{agent.pid}/fd")),
               "refused": {k.split('"')[1]: v for k, v in m.items() if "refused_total" in k},
               "held": {k.split("{")[1].rstrip("}"): v for k, v in m.items() if "connections{" in k}}
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=30)
        if agent is not None:
            agent.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                agent.wait(timeout=15)
            if agent.poll() is None:
                agent.kill()
        cleanup(subtree)
        for name, _uid, _gid in users:
            subprocess.run(["userdel", "--force", name], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)

    print(f"control socket, {args.rounds} rounds (ms): quiet vs flooded (8 x 1,000 idle connections, "
          f"300 slow senders, 10,000 malformed frames); agent {JOBCAGE}, hooks {HOOK}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'measure':30} {'quiet':>8} {'p90':>8} {'flood':>8} {'p90':>8} {'ratio':>7}")

    def p90(v: list[float]) -> float:
        t = sorted(v)
        return t[min(len(t) - 1, round(0.9 * (len(t) - 1)))]

    for key, fl in res["flood"].items():
        q = res["quiet"].get(key)
        qm = statistics.median(q) if q else float("nan")
        fm = statistics.median(fl)
        print(f"{key:30} {qm:8.1f} {p90(q) if q else float('nan'):8.1f} {fm:8.1f} {p90(fl):8.1f} {fm / qm:7.2f}")
    print(f"agent RSS {mem['rss_idle_kb']} kB idle, {mem['rss_max_kb']} kB max under the flood "
          f"(+{(int(mem['rss_max_kb']) - int(mem['rss_idle_kb'])) / 1024:.1f} MB); threads {mem['threads_idle']} "
          f"idle, {mem['threads_max']} max; {mem['fds']} fds; {mem['rounds_during_garbage']}/{args.rounds} "
          f"rounds while the garbage ran")
    print(f"held at the end: {mem['held']}")
    print(f"refused: {mem['refused']}")
    if args.json:
        print(json.dumps({"results": res, "agent": mem}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
