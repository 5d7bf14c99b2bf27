#!/usr/bin/env python3
"""Hook latency: whole-process wall time of `jobcage prologue` / `adopt` / `epilogue`, the commands a
batch system runs for every job, against `python -I -c pass` (the venv's interpreter) in the same run.

What a batch system's job looks like, with the node's defaults ([cleanup] on, the tracer `auto`, no
[cgroups]/[jobs] settings but a private subtree, state dir and socket):

* `prologue JOB --uid OWNER` (a non-root owner);
* `adopt JOB --pid P`, P a shell running as a second identity (a pool account, as gLExec/sudo payloads
  run), which then forks two `sleep`s inside the job -- three processes for the epilogue to kill;
  the identity is declared (untimed), and it leaves a file in /tmp during the job, so the epilogue's
  cleanup has a uid to clean and walks /tmp, /var/tmp and /dev/shm;
* `epilogue JOB`: kills them, cleans up; the bench checks afterwards that the processes are gone and the
  file removed (a hook that skipped its work would not count).

Cases: ``agent`` (through a running `jobcage agent`), ``agent+tree`` (the same with --tree-files files of
another user in /tmp, built before the trials: the epilogue's cleanup walks them), with --quiet-tmp
``agent,quiet-tmp`` (the one setting changed: [cleanup] dirs is a private empty directory, so the walk
costs nothing -- what the rest of the epilogue costs) and with --direct ``direct`` (agent down: the hook
drives cgroups and the store itself, as root).  Trials interleave the
baseline and the hooks so that load on the node hits them alike; medians of --trials (default 30).
--profile prints, per hook, the imports that dominate start-up (`python -X importtime`).

The hooks run through --jobcage (default: the site-less launcher of the venv this script runs from,
i.e. this checkout's code; /usr/local/bin/jobcage is the node's install).  Root only; the config,
state, socket, cgroup subtree (``jobcage-bench<hex>``) and tree are private and removed at the end.

    .venv/bin/python bench/hook_latency.py [--trials N] [--tree-files N] [--tracer auto|off|...]
                                           [--quiet-tmp] [--direct] [--nice N] [--jobcage PATH] [--profile] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PYTHON = str(BIN / "python") if (BIN / "python").exists() else sys.executable
OWNER_UID, POOL_UID, TREE_UID = 64990, 64991, 64992   # no passwd entries needed: jobcage works by uid


def timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    dt = (time.perf_counter() - t0) * 1000
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return dt


def rpc(sock: str, method: str, **params: object) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(sock)
        d = json.dumps({"method": method, "params": params}).encode()
        s.sendall(struct.pack("!I", len(d)) + d)
        buf = b""
        while len(buf) < 4 or len(buf) < 4 + struct.unpack("!I", buf[:4])[0]:
            chunk = s.recv(65536)
            if not chunk:
                raise OSError("agent closed the connection")
            buf += chunk
        return json.loads(buf[4:])


def ping(sock: str) -> dict | None:
    try:
        return rpc(sock, "ping").get("result")
    except OSError:
        return None


def importtime(argv: list[str], env: dict[str, str], top: int = 12) -> list[tuple[int, str]]:
    """(cumulative us, module) of the top-level imports of one hook run (with the launcher's -IS), biggest first."""
    r = subprocess.run([PYTHON, "-IS", "-X", "importtime", *argv], env=env, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    rows = []
    for line in r.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _self, cum, name = line[len("import time:"):].split("|")
        if not name[1:].startswith(" "):  # top level only (nesting indents by 2): cumulative includes children
            rows.append((int(cum), name.strip()))
    return sorted(rows, reverse=True)[:top]


def build_tree(top: Path, files: int, per_dir: int = 1000) -> None:
    """`files` empty files of another user in directories of `per_dir`: the rest of the node's /tmp."""
    for d in range((files + per_dir - 1) // per_dir):
        sub = top / f"d{d:04d}"
        sub.mkdir()
        for f in range(min(per_dir, files - d * per_dir)):
            fd = os.open(sub / f"f{f:05d}", os.O_CREAT | os.O_WRONLY, 0o644)
            os.fchown(fd, TREE_UID, TREE_UID)
            os.close(fd)
        os.chown(sub, TREE_UID, TREE_UID)


def count_dirs(top: str) -> int:
    """Directories the cleanup walk faces below top: its filesystem only, as the walk."""
    dev, n = os.lstat(top).st_dev, 0
    for dp, dn, _ in os.walk(top):
        n += 1
        keep = []
        for d in dn:
            with contextlib.suppress(OSError):
                if os.lstat(os.path.join(dp, d)).st_dev == dev:
                    keep.append(d)
        dn[:] = keep
    return n


def start_payload() -> subprocess.Popen:
    """The job's processes: a shell of the pool identity that forks two sleeps once it is in the job."""
    return subprocess.Popen(["sh", "-c", "read go; sleep 300 & sleep 300 & wait"], stdin=subprocess.PIPE,
                            user=POOL_UID, group=POOL_UID, extra_groups=[], text=True)


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def gone(pid: int) -> bool:
    """Dead or a zombie (PID 1 here reaps orphans lazily)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except OSError:
        return True


def run_case(case: str, args: argparse.Namespace, jobcage: str, env: dict[str, str], sock: str,
             api: object, results: dict[str, list[float]], profiles: dict, leftover_dir: Path) -> None:
    baseline = [PYTHON, "-I", "-c", "pass"]
    for hook in ("prologue", "adopt", "epilogue"):
        results[f"{hook} ({case})"] = []
    n = args.trials + 2   # the first two warm the page cache: not counted
    for i in range(n + (1 if args.profile else 0)):
        profiling = i == n
        job = f"{case.replace('+', '-').replace(',', '-')}{i}"
        payload = start_payload()
        try:
            hooks = [("prologue", ["prologue", job, "--uid", str(OWNER_UID)]),
                     ("adopt", ["adopt", job, "--pid", str(payload.pid)]),
                     ("epilogue", ["epilogue", job])]
            if not profiling:
                dt = timed(baseline, env)
                if i >= 2:
                    results["python -I -c pass"].append(dt)
            for hook, argv in hooks:
                if hook == "epilogue":
                    # the job at work: its processes, its identity, its leftover in /tmp
                    payload.stdin.write("go\n")    # type: ignore[union-attr]
                    payload.stdin.flush()          # type: ignore[union-attr]
                    deadline = time.monotonic() + 10
                    while len(children(payload.pid)) < 2:
                        if time.monotonic() > deadline:
                            raise RuntimeError("the payload did not fork")
                        time.sleep(0.005)
                    pids = [payload.pid, *children(payload.pid)]
                    if sock:
                        r = rpc(sock, "declare", job_id=job, uid=POOL_UID, label="bench payload")
                        if not r.get("ok"):
                            raise RuntimeError(f"declare: {r}")
                    else:
                        api.dispatch(api.caller, "declare",   # type: ignore[attr-defined]
                                     {"job_id": job, "uid": POOL_UID, "label": "bench payload"})
                    leftover = leftover_dir / f"{job}.out"
                    leftover.write_text("job output\n")
                    os.chown(leftover, POOL_UID, POOL_UID)
                if profiling:
                    profiles[f"{hook} ({case})"] = importtime([jobcage, *argv], env)
                else:
                    dt = timed([jobcage, *argv], env)
                    if i >= 2:
                        results[f"{hook} ({case})"].append(dt)
            # The epilogue's contract, checked: the job's processes are dead, its file is gone.
            payload.wait(timeout=30)
            alive = [p for p in pids if not gone(p)]
            if alive or leftover.exists():
                raise RuntimeError(f"epilogue of {job} left processes {alive} or {leftover}")
        finally:
            with contextlib.suppress(ProcessLookupError):
                payload.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--tree-files", type=int, default=50_000,
                    help="files of another user in /tmp for the agent+tree case (0: no such case)")
    ap.add_argument("--tracer", default="auto", help="[tracer] backend of the agent (default: the node's, auto)")
    ap.add_argument("--direct", action="store_true", help="also the direct path (agent down)")
    ap.add_argument("--quiet-tmp", action="store_true",
                    help="also a case whose [cleanup] dirs is one private, empty directory (what the walk costs)")
    ap.add_argument("--jobcage", default=str(BIN / "jobcage-launcher"),
                    help="the jobcage to time (default: this venv's site-less launcher)")
    ap.add_argument("--profile", action="store_true", help="show what dominates start-up (-X importtime)")
    ap.add_argument("--nice", type=int, default=0,
                    help="run the bench, the agent and every timed process at this nice value (-20: a node "
                         "shared with other load measures jobcage rather than the contention)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("hook_latency: run as root", file=sys.stderr)
        return 1
    if args.nice:
        os.nice(args.nice)   # inherited by the agent, the baseline and the hooks alike
        with contextlib.suppress(OSError), open("/proc/self/autogroup", "w") as f:
            f.write(str(args.nice))   # with autogroups a nice value only ranks within its session
    jobcage = args.jobcage
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    subtree = f"jobcage-bench{secrets.token_hex(3)}"
    base = Path(tempfile.mkdtemp(prefix="jcb-", dir="/tmp"))
    base.chmod(0o755)
    leftover_dir = Path(tempfile.mkdtemp(prefix="jcb-out-", dir="/tmp"))
    leftover_dir.chmod(0o1777)
    tree = Path(tempfile.mkdtemp(prefix="jcb-tree-", dir="/tmp"))
    sock = str(base / "agent.sock")
    cfg = base / "jobcage.toml"
    private_tmp = base / "tmp"   # the "quiet" case: a cleanup directory holding nothing but the job's file
    private_tmp.mkdir(mode=0o1777)
    private_tmp.chmod(0o1777)
    common = (f'[cgroups]\nsubtree = "{subtree}"\n[agent]\nstate_dir = "{base / "state"}"\n'
              f'socket = "{sock}"\n[tracer]\nbackend = "{args.tracer}"\n')
    env = dict(os.environ, JOBCAGE_CONFIG=str(cfg))
    results: dict[str, list[float]] = {"python -I -c pass": []}
    profiles: dict[str, list[tuple[int, str]]] = {}
    tracer = "-"
    agent: subprocess.Popen | None = None
    t_tree = 0.0
    ndirs = sum(count_dirs(d) for d in ("/tmp", "/var/tmp", "/dev/shm"))
    try:
        # (case, [cleanup] dirs or None for the default, the jobs' leftovers go to)
        cases = [("agent", None, leftover_dir)]
        if args.tree_files:
            cases.append(("agent+tree", None, leftover_dir))
        if args.quiet_tmp:
            cases.insert(0, ("agent,quiet-tmp", str(private_tmp), private_tmp))
        current = None
        for case, dirs, out_dir in cases:
            if case == "agent+tree":
                t0 = time.monotonic()
                build_tree(tree, args.tree_files)
                t_tree = time.monotonic() - t0
            if dirs != current or agent is None:
                stop(agent)
                cfg.write_text(common + (f'[cleanup]\ndirs = ["{dirs}"]\n' if dirs else ""))  # else: defaults
                current = dirs
                agent = subprocess.Popen([jobcage, "agent", "--config", str(cfg)], env=env,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
                deadline = time.monotonic() + 120
                while (p := ping(sock)) is None:
                    if agent.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("the agent did not start")
                    time.sleep(0.05)
                tracer = str(p.get("tracer"))
            run_case(case, args, jobcage, env, sock, None, results, profiles, out_dir)
        if args.direct:
            stop(agent)
            agent = None
            cfg.write_text(common)
            sys.path.insert(0, str(ROOT))
            os.environ["JOBCAGE_CONFIG"] = str(cfg)
            from jobcage.agent.api import Api, Caller
            from jobcage.agent.config import load
            from jobcage.agent.lifecycle import JobManager

            api = Api(JobManager(load()))
            api.caller = Caller(os.getpid(), 0, 0)   # type: ignore[attr-defined]
            run_case("direct", args, jobcage, env, "", api, results, profiles, leftover_dir)
    finally:
        stop(agent)
        cleanup(subtree)
        for d in (base, leftover_dir, tree):
            shutil.rmtree(d, ignore_errors=True)
    base_ms = statistics.median(results["python -I -c pass"])
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"hook latency, whole process, median of {args.trials} trials each; {jobcage}; tracer {tracer}; "
          f"cleanup on; nice {os.nice(0)}; load average now {load}; {ndirs} directories in /tmp, /var/tmp, /dev/shm"
          + (f" (+{args.tree_files} files in {args.tree_files // 1000} more for agent+tree, built in {t_tree:.1f} s)"
             if args.tree_files else ""))
    print(f"{'command':24} {'median':>8} {'p90':>8} {'min':>8} {'x python':>9} {'- python':>9}")
    for key, ms in results.items():
        t = sorted(ms)
        med = statistics.median(t)
        p90 = t[min(len(t) - 1, round(0.9 * (len(t) - 1)))]
        print(f"{key:24} {med:8.1f} {p90:8.1f} {t[0]:8.1f} {med / base_ms:9.2f} {med - base_ms:9.1f}")
    for key, rows in profiles.items():
        print(f"\nimports of {key} (top level, cumulative ms):")
        for us, name in rows:
            print(f"  {us / 1000:7.1f}  {name}")
    if args.json:
        print(json.dumps({"results": results, "profiles": profiles, "load": load, "tracer": tracer}))
    return 0


def stop(agent: subprocess.Popen | None) -> None:
    if agent is None:
        return
    agent.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        agent.wait(timeout=15)
    if agent.poll() is None:
        agent.kill()
        agent.wait()


def cleanup(subtree: str) -> None:
    """Remove whatever the runs left in the private subtree (normally nothing but the subtree itself)."""
    sys.path.insert(0, str(ROOT))
    from jobcage.cgroups import get_driver

    for mode in ("auto", "v1"):
        with contextlib.suppress(Exception):
            d = get_driver(mode, subtree)
            for name in d.list():
                with contextlib.suppress(Exception):
                    d.kill(name)
                with contextlib.suppress(Exception):
                    d.remove(name)
            for top in d.features()["subtree"]:
                with contextlib.suppress(OSError):
                    os.rmdir(top)


if __name__ == "__main__":
    sys.exit(main())
