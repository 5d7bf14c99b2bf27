#!/usr/bin/env python3
"""Hook latency: whole-process wall time of `jobcage prologue` / `adopt` / `epilogue`, the commands a
batch system runs for every job, against `python -I -c pass` (the venv's interpreter) in the same run.

Both paths: ``direct`` (agent down: the hook drives the cgroups itself, as root) and ``agent`` (the hook
only talks to `jobcage agent` over its socket).  Trials interleave baseline and hooks so that load on the
node hits them alike; medians of --trials (default 30).  --profile prints, per hook and path, the imports
that dominate start-up (`python -X importtime`).

Root only.  A private config, state dir, socket and cgroup subtree (``jobcage-bench<hex>``), all removed at
the end.

    .venv/bin/python bench/hook_latency.py [--trials N] [--profile] [--json]
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
# what batch systems call: the installed launcher (/usr/local/bin/jobcage), else the venv script
JOBCAGE = shutil.which("jobcage") or str(BIN / "jobcage")
PYTHON = str(BIN / "python") if (BIN / "python").exists() else sys.executable
TARGET_MS = 25.0


def timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    dt = (time.perf_counter() - t0) * 1000
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return dt


def ping(sock: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(sock)
            d = json.dumps({"method": "ping", "params": {}}).encode()
            s.sendall(struct.pack("!I", len(d)) + d)
            return len(s.recv(4)) == 4
    except OSError:
        return False


def importtime(argv: list[str], env: dict[str, str], top: int = 12) -> list[tuple[int, str]]:
    """(cumulative us, module) of the top-level imports of one hook run, biggest first."""
    r = subprocess.run([PYTHON, "-X", "importtime", *argv], env=env, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    rows = []
    for line in r.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _self, cum, name = line[len("import time:"):].split("|")
        if not name[1:].startswith(" "):  # top level only (nesting indents by 2): cumulative includes children
            rows.append((int(cum), name.strip()))
    return sorted(rows, reverse=True)[:top]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--profile", action="store_true", help="show what dominates start-up (-X importtime)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("hook_latency: run as root", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    subtree = f"jobcage-bench{secrets.token_hex(3)}"
    base = Path(tempfile.mkdtemp(prefix="jcb-", dir="/tmp"))
    sock = str(base / "agent.sock")
    cfg = base / "jobcage.toml"
    cfg.write_text(f'[cgroups]\nsubtree = "{subtree}"\n[agent]\nstate_dir = "{base / "state"}"\n'
                   f'socket = "{sock}"\n[tracer]\nbackend = "off"\n[cleanup]\nenabled = false\n')
    env = dict(os.environ, JOBCAGE_CONFIG=str(cfg))
    baseline = [PYTHON, "-I", "-c", "pass"]
    results: dict[str, list[float]] = {"python -I -c pass": []}
    profiles: dict[str, list[tuple[int, str]]] = {}
    agent: subprocess.Popen | None = None
    sleepers: list[subprocess.Popen] = []
    try:
        for path in ("direct", "agent"):
            if path == "agent":
                agent = subprocess.Popen([JOBCAGE, "agent", "--config", str(cfg)], env=env,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
                deadline = time.monotonic() + 60
                while not ping(sock):
                    if agent.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("the agent did not start")
                    time.sleep(0.05)
            for hook in ("prologue", "adopt", "epilogue"):
                results[f"{hook} ({path})"] = []
            for i in range(args.trials + 2):  # the first two warm the page cache: not counted
                job = f"{path}{i}"
                sleeper = subprocess.Popen(["sleep", "300"])
                sleepers.append(sleeper)
                runs = {"python -I -c pass": baseline,
                        f"prologue ({path})": [JOBCAGE, "prologue", job, "--uid", "0"],
                        f"adopt ({path})": [JOBCAGE, "adopt", job, "--pid", str(sleeper.pid)],
                        f"epilogue ({path})": [JOBCAGE, "epilogue", job]}
                for key, argv in runs.items():
                    dt = timed(argv, env)
                    if i >= 2:
                        results[key].append(dt)
                sleeper.wait(timeout=30)  # the epilogue killed it
            if args.profile:
                sleeper = subprocess.Popen(["sleep", "300"])
                sleepers.append(sleeper)
                for hook, argv in (("prologue", ["prologue", "prof", "--uid", "0"]),
                                   ("adopt", ["adopt", "prof", "--pid", str(sleeper.pid)]),
                                   ("epilogue", ["epilogue", "prof"])):
                    profiles[f"{hook} ({path})"] = importtime([JOBCAGE, *argv], env)
    finally:
        for s in sleepers:
            with contextlib.suppress(ProcessLookupError):
                s.kill()
        if agent is not None:
            agent.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                agent.wait(timeout=15)
            if agent.poll() is None:
                agent.kill()
        cleanup(subtree)
        shutil.rmtree(base, ignore_errors=True)
    base_ms = statistics.median(results["python -I -c pass"])
    print(f"hook latency, whole process, {args.trials} trials each (ms; target <= {TARGET_MS:g} ms median)")
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
        print(json.dumps({"results": results, "profiles": profiles}))
    return 0


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
