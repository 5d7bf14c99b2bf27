#!/usr/bin/env python3
"""`jobcage whois --logs` on a collected data set against `zgrep -c UID` on the same files.

Generates the set in a temp dir: NODES hosts' files as an rsyslog collector writes them (one file per host,
syslog header + the export record's JSON), three quarters of the volume rotated and gzipped (as logrotate
leaves them), the rest plain.  The records are trail events of many jobs and uids plus each job's
prologue/epilogue; one pool uid is used by jobs on several nodes.  Then, interleaved, best of --runs:
`zgrep -c UID FILES...` and `jobcage whois --uid UID --at T --logs DIR --json`, for the plain files, the gzip
files and all of them; prints both times and the ratio.  Target: ratio <= 2.

    sudo .venv/bin/python bench/whois_logs.py [--size-mb 1024] [--runs 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
JOBCAGE = str(Path(sys.executable).parent / "jobcage")
POOL = 20417
T0 = 1796000000.0


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1e6):06d}Z"


def line(node: str, eid: int, jid: int, job: str, kind: str, ts: float, uid: int, pid: int, detail: dict,
         comm: str = "", filename: str = "") -> str:
    rec = {"ts": iso(ts), "node": node, "event_id": eid, "jid": jid, "job_id": job, "kind": kind, "pid": pid,
           "ppid": pid - 1, "uid": uid, "euid": uid, "comm": comm, "filename": filename, "detail": detail}
    return f"{iso(ts)[:-1]}+00:00 {node} jobcage[4242] " + json.dumps(rec, separators=(",", ":")) + "\n"


def node_lines(node: str, target: int, rnd: random.Random, pool_jobs: set[int], spans: list) -> list[str]:
    """About `target` bytes of one host's records; the pool uid's jobs' (start, end) go to spans."""
    out: list[str] = []
    size, eid, jid, ts = 0, 0, 0, T0
    while size < target:
        jid += 1
        job = f"{rnd.randint(1, 10**7)}"
        pilot = rnd.randint(30000, 30050)
        payload = POOL if jid in pool_jobs else rnd.randint(21000, 29999)
        start = ts
        eid += 1
        chunk = [line(node, eid, jid, job, "prologue", ts, pilot, 0, {"mode": "own", "cgroup": f"/jobcage/{job}"})]
        for _ in range(rnd.randint(200, 2000)):
            ts += rnd.random() * 0.5
            eid += 1
            kind = rnd.choice(("exec", "exec", "exit", "setuid"))
            uid = payload if rnd.random() < 0.8 else pilot
            pid = rnd.randint(1000, 4000000)
            det = {"ok": True, "via": "/usr/bin/sudo", "old_uid": pilot} if kind == "setuid" else {"via": None}
            chunk.append(line(node, eid, jid, job, kind, ts, uid, pid, det, "python3", "/usr/bin/python3"))
        eid += 1
        idents = [{"uid": pilot, "first_seen": iso(start), "last_seen": iso(ts), "via": "batch system",
                   "cpu_seconds": 1.5},
                  {"uid": payload, "first_seen": iso(start + 0.1), "last_seen": iso(ts), "via": "/usr/bin/sudo",
                   "cpu_seconds": 99.0}]
        chunk.append(line(node, eid, jid, job, "epilogue", ts, pilot, 0,
                          {"owner_uid": pilot, "created": iso(start), "ended": iso(ts), "identities": idents,
                           "declared": []}))
        if payload == POOL:
            spans.append((node, job, start, ts))
        ts += 1.0
        out.extend(chunk)
        size += sum(len(c) for c in chunk)
    return out


def generate(d: Path, size_mb: int, nodes: int) -> dict:
    """A few distinct host templates, each copied under several host names (the names have one width, so
    the copy is a byte replace): generating 1 GiB record by record would take minutes."""
    rnd = random.Random(15)
    per_node = size_mb * 1024 * 1024 // nodes
    plain, gz = d / "plain", d / "gz"
    plain.mkdir()
    gz.mkdir()
    raw = on_disk = 0
    spans: list = []
    templates = []
    for t in range(min(4, nodes)):
        tmpl = f"wn-{t:03d}"
        templates.append((tmpl, "".join(node_lines(tmpl, per_node, random.Random(rnd.random()),
                                                   {5, 40} if t == 0 else set(), spans)).encode()))
    for n in range(nodes):
        node = f"wn-{n:03d}"
        tmpl, data = templates[n % len(templates)]
        data = data.replace(f" {tmpl} ".encode(), f" {node} ".encode()).replace(
            f'"node":"{tmpl}"'.encode(), f'"node":"{node}"'.encode())
        raw += len(data)
        cut = data.rfind(b"\n", 0, len(data) * 3 // 4) + 1
        part, start = cut // 4, 0
        for i in range(4):   # rotated part: gzip -6 (logrotate's default) in 4 files; the current part plain
            end = cut if i == 3 else data.rfind(b"\n", 0, start + part) + 1
            p = gz / f"{node}.log.{4 - i}.gz"
            p.write_bytes(gzip.compress(data[start:end], 6))
            on_disk += p.stat().st_size
            start = end
        (plain / f"{node}.log").write_bytes(data[cut:])
        on_disk += len(data) - cut
    node, job, s0, s1 = spans[0]
    return {"raw_mb": raw / 2**20, "disk_mb": on_disk / 2**20, "at": (s0 + s1) / 2, "job": job}


def timed(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and its children: on a shared node the fairer figure)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run(argv, capture_output=True)
    dt = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode not in (0, 1):
        raise SystemExit(f"{argv[:3]}: rc {r.returncode}: {r.stderr.decode()[:300]}")
    return dt, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=1024, help="uncompressed volume of the collected set")
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", help="generate into (or reuse) this dir and keep it")
    a = ap.parse_args()
    d = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="jc-whois-bench-"))
    try:
        meta = d / "meta.json"
        if not meta.exists():
            d.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            meta.write_text(json.dumps(generate(d, a.size_mb, a.nodes)))
            print(f"generated in {time.perf_counter() - t:.0f} s under {d}")
        info = json.loads(meta.read_text())
        print(f"set: {info['raw_mb']:.0f} MiB of records, {info['disk_mb']:.0f} MiB on disk (3/4 gzip -6), "
              f"{a.nodes} hosts; uid {POOL} held by job {info['job']} on every 4th host")
        at = iso(info["at"])
        sets = {"plain": [d / "plain"], "gzip": [d / "gz"], "all": [d / "plain", d / "gz"]}
        print(f"best of {a.runs}, wall seconds (CPU seconds incl. children); load {os.getloadavg()[0]:.1f}")
        print(f"{'set':<6} {'zgrep -c':>14} {'whois --logs':>14} {'ratio wall':>11} {'ratio cpu':>10}")
        for name, dirs in sets.items():
            files = sorted(str(f) for x in dirs for f in x.iterdir())
            zg, wh = [], []
            for _ in range(a.runs):
                zg.append(timed(["zgrep", "-c", str(POOL), *files]))
                wh.append(timed([JOBCAGE, "whois", "--uid", str(POOL), "--at", at, "--json", "--logs",
                                 *map(str, dirs)]))
            zw, zc = min(x[0] for x in zg), min(x[1] for x in zg)
            ww, wc = min(x[0] for x in wh), min(x[1] for x in wh)
            print(f"{name:<6} {zw:>6.2f} ({zc:>5.2f}) {ww:>6.2f} ({wc:>5.2f}) {ww / zw:>11.2f} {wc / zc:>10.2f}")
        out = subprocess.run([JOBCAGE, "whois", "--uid", str(POOL), "--at", at, "--logs", *map(str, sets["all"])],
                             capture_output=True, text=True)
        print("answer:", out.stdout.strip() or out.stderr.strip())
    finally:
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("LC_ALL", "C")
    main()
