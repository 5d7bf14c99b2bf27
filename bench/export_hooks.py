#!/usr/bin/env python3
"""Hook latency with the audit export healthy, failing or stalled: `jobcage prologue` / `adopt` / `epilogue`
(agent path) against the same agent with no [export], in the same run.

Five agents run side by side (own subtree, state dir, socket; tracer off), one per case:
  none        no [export]
  file        [export] file on a healthy disk
  full-disk   [export] file on a 256 KiB tmpfs of this script's own, filled up
  refused     [export] syslog = tcp:// to a loopback port nobody listens on
  stalled     [export] syslog = tcp:// to a loopback listener that never accepts nor reads (its queue fills)
Trials interleave the cases (each trial: one job per case), so load on the node hits them alike; medians of
--trials.  Target: every case within noise of `none`.  Also printed: records each agent still has pending.

    sudo .venv/bin/python bench/export_hooks.py [--trials 30]
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
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
JOBCAGE = str(BIN / "jobcage")   # this checkout's jobcage (the venv's), not whatever /usr/local/bin points at
CASES = ("none", "file", "full-disk", "refused", "stalled")


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


def rpc(sock: str, method: str, **params: object) -> float:
    """One request on the control socket from this process: the agent's side of a hook, without the
    hook's interpreter start-up (which dominates the whole-process figure on a loaded node)."""
    t0 = time.perf_counter()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(60)
        s.connect(sock)
        d = json.dumps({"method": method, "params": params}).encode()
        s.sendall(struct.pack("!I", len(d)) + d)
        (n,) = struct.unpack("!I", s.recv(4, socket.MSG_WAITALL))
        resp = json.loads(s.recv(n, socket.MSG_WAITALL))
    if not resp.get("ok"):
        raise RuntimeError(f"{method}: {resp}")
    return (time.perf_counter() - t0) * 1000


def timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    dt = (time.perf_counter() - t0) * 1000
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=30)
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("export_hooks: run as root", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))   # run the cleanup below
    base = Path(tempfile.mkdtemp(prefix="jcx-", dir="/tmp"))
    full = base / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "jcx-tmpfs", str(full)], check=True)
    holes: list[socket.socket] = []

    def port(listen: bool) -> int:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        p = int(s.getsockname()[1])
        if listen:
            s.listen(1)      # never accepted, never read: the relay's queue fills and sends block
            holes.append(s)
        else:
            s.close()        # nobody listens: connection refused
        return p

    exports = {"none": "", "file": f'file = "{base / "ok.jsonl"}"\n',
               "full-disk": f'file = "{full / "trail.jsonl"}"\n',
               "refused": f'syslog = "tcp://127.0.0.1:{port(False)}"\n',
               "stalled": f'syslog = "tcp://127.0.0.1:{port(True)}"\n'}
    agents: dict[str, subprocess.Popen] = {}
    envs: dict[str, dict[str, str]] = {}
    subtrees: list[str] = []
    sleepers: list[subprocess.Popen] = []
    results: dict[str, dict[str, list[float]]] = {c: {"prologue": [], "adopt": [], "epilogue": []} for c in CASES}
    rpcs: dict[str, dict[str, list[float]]] = {c: {"prologue": [], "adopt": [], "epilogue": []} for c in CASES}
    try:
        with open(full / "filler", "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError:
        pass
    try:
        for case in CASES:
            d = base / case
            d.mkdir()
            subtree = f"jobcage-bench{secrets.token_hex(3)}"
            subtrees.append(subtree)
            cfg = d / "jobcage.toml"
            cfg.write_text(f'[cgroups]\nsubtree = "{subtree}"\n[agent]\nstate_dir = "{d / "state"}"\n'
                           f'socket = "{d / "agent.sock"}"\nnode = "bench-{case}"\n[tracer]\nbackend = "off"\n'
                           f'[cleanup]\nenabled = false\n' + (f"[export]\n{exports[case]}" if exports[case] else ""))
            envs[case] = dict(os.environ, JOBCAGE_CONFIG=str(cfg))
            agents[case] = subprocess.Popen([JOBCAGE, "agent", "--config", str(cfg)], env=envs[case],
                                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=open(d / "agent.log", "w"))  # noqa: SIM115
            deadline = time.monotonic() + 60
            while not ping(str(d / "agent.sock")):
                if agents[case].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"agent {case} did not start: {(d / 'agent.log').read_text()}")
                time.sleep(0.05)
        for i in range(a.trials + 2):   # the first two warm up: not counted
            for case in CASES:
                job = f"{case}{i}"
                sleeper = subprocess.Popen(["sleep", "300"])
                sleepers.append(sleeper)
                for hook, argv in (("prologue", [JOBCAGE, "prologue", job, "--uid", "0"]),
                                   ("adopt", [JOBCAGE, "adopt", job, "--pid", str(sleeper.pid)]),
                                   ("epilogue", [JOBCAGE, "epilogue", job])):
                    dt = timed(argv, envs[case])
                    if i >= 2:
                        results[case][hook].append(dt)
                sleeper.wait(timeout=30)
                sock = str(base / case / "agent.sock")
                job = f"r{case}{i}"
                sleeper = subprocess.Popen(["sleep", "300"])
                sleepers.append(sleeper)
                for hook, params in (("prologue", {"job_id": job, "uid": 0}),
                                     ("adopt", {"job_id": job, "pid": sleeper.pid}),
                                     ("epilogue", {"job_id": job})):
                    dt = rpc(sock, hook, **params)
                    if i >= 2:
                        rpcs[case][hook].append(dt)
                sleeper.wait(timeout=30)
        pending = {}
        for case in CASES:
            db = sqlite3.connect(str(base / case / "state" / "jobcage.db"), timeout=30)
            head = db.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
            cur = db.execute("SELECT coalesce(max(last_id), 0) FROM export_cursors").fetchone()[0] \
                if case != "none" else head
            pending[case] = head - cur
            db.close()
    finally:
        for s in sleepers:
            with contextlib.suppress(ProcessLookupError):
                s.kill()
        for p in agents.values():
            p.terminate()
        for p in agents.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=15)
            if p.poll() is None:
                p.kill()
        for h in holes:
            h.close()
        subprocess.run(["umount", "-l", str(full)], check=False)
        from hook_latency import cleanup  # kills and removes what a run left in a private subtree

        for st in subtrees:
            cleanup(st)
        shutil.rmtree(base, ignore_errors=True)
    print(f"{a.trials} trials per case, interleaved; load {os.getloadavg()[0]:.1f} (median ms; ratio to 'none')")
    for title, table in (("whole hook process (jobcage prologue/adopt/epilogue)", results),
                         ("agent round trip (the same requests on the socket)", rpcs)):
        print(f"\n{title}")
        print(f"{'case':10} {'prologue':>9} {'adopt':>9} {'epilogue':>9} {'ratio p/a/e':>16} {'pending':>8}")
        ref = {h: statistics.median(v) for h, v in table["none"].items()}
        for case in CASES:
            med = {h: statistics.median(v) for h, v in table[case].items()}
            ratio = "/".join(f"{med[h] / ref[h]:.2f}" for h in ("prologue", "adopt", "epilogue"))
            print(f"{case:10} {med['prologue']:9.1f} {med['adopt']:9.1f} {med['epilogue']:9.1f} {ratio:>16} "
                  f"{pending[case]:8d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
