#!/usr/bin/env python3
"""What the user-namespace hooks cost the syscalls they sit on (issue 14).

The BPF tracer now also runs on every `openat`/`open` of the node (to see uid_map/gid_map written) and on
every `clone`/`clone3` entry (CLONE_NEWUSER).  A small C loop (compiled here) measures, for 1 s per run:

    rdonly   open("/dev/null", O_RDONLY) + close      -- the program returns after one flag test
    wronly   open("/dev/null", O_WRONLY) + close      -- outside a job: + the job lookup; in a job: + reading
                                                         the path from user memory and comparing its tail
    fork     fork + _exit + waitpid                    -- sys_enter_clone flag test, the pending lookup at exit

each with no tracer (baseline), with the real tracer (`jobcage.agent.tracer.Tracer`, backend bpf, defaults:
no open hook) and with `map_opens=True` (`[tracer] map_opens`), the loop inside a traced job's cgroup and
outside any job.  Other BPF programs on the node (other agents) are in every configuration alike.  Runs are interleaved in rounds; each ratio is the
median over rounds of (run / same round's baseline), so load drift cancels.  Root only; the cgroup
``jobcage-nsbench-<hex>`` it creates is removed at the end.

    .venv/bin/python bench/userns_overhead.py [--rounds 5] [--seconds 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobcage.agent.tracer import Tracer, cgroup2_mount  # noqa: E402

LOOP_C = r"""
/* nsloop MODE SECONDS: after one byte on stdin, loop MODE for SECONDS; prints the count. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
    char c;
    if (argc < 3 || read(0, &c, 1) != 1) return 2;
    int mode = !strcmp(argv[1], "rdonly") ? 0 : !strcmp(argv[1], "wronly") ? 1 : 2;
    double end = now() + atof(argv[2]);
    long n = 0;
    while ((n & 255) || now() < end) {
        if (mode < 2) {
            int fd = open("/dev/null", mode ? O_WRONLY : O_RDONLY);
            if (fd >= 0) close(fd);
        } else {
            pid_t p = fork();
            if (p == 0) _exit(0);
            if (p > 0) waitpid(p, NULL, 0);
        }
        n++;
    }
    printf("%ld\n", n);
    return 0;
}
"""


def run_loop(binary: Path, mode: str, seconds: float, cgroup: Path | None, tracer: Tracer | None) -> float:
    p = subprocess.Popen([str(binary), mode, str(seconds)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    if cgroup is not None:
        (cgroup / "cgroup.procs").write_text(str(p.pid))
    assert p.stdin is not None
    p.stdin.write("x")
    p.stdin.close()
    while p.poll() is None:
        if tracer is not None:
            tracer.poll(50)
        else:
            try:
                p.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                pass
    out = p.stdout.read() if p.stdout else ""
    return int(out.strip()) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/userns_overhead.py: root only")
    root = cgroup2_mount()
    if root is None:
        sys.exit("bench/userns_overhead.py: no cgroup2 hierarchy")
    tmp = Path(tempfile.mkdtemp(prefix="jc-nsbench-"))
    cg = Path(root) / f"jobcage-nsbench-{secrets.token_hex(4)}"
    cg.mkdir()
    binary = tmp / "nsloop"
    (tmp / "nsloop.c").write_text(LOOP_C)
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(tmp / "nsloop.c")], check=True)
    modes = ("rdonly", "wronly", "fork")
    configs = ("no tracer", "tracer, loop in a job", "tracer, loop outside jobs",
               "tracer + map_opens, loop in a job", "tracer + map_opens, loop outside jobs")
    rates: dict[tuple[str, str], list[float]] = {(m, c): [] for m in modes for c in configs}
    try:
        for _ in range(a.rounds):
            for m in modes:
                rates[(m, "no tracer")].append(run_loop(binary, m, a.seconds, cg, None))
            for opens, tag in ((False, "tracer"), (True, "tracer + map_opens")):
                with Tracer(lambda ev: None, backend="bpf", map_opens=opens) as t:
                    t.add_job("nsbench", 0, os.stat(cg).st_ino)
                    for m in modes:
                        rates[(m, f"{tag}, loop in a job")].append(run_loop(binary, m, a.seconds, cg, t))
                        rates[(m, f"{tag}, loop outside jobs")].append(run_loop(binary, m, a.seconds, None, t))
    finally:
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    result = {}
    for m in modes:
        base = rates[(m, "no tracer")]
        for c in configs:
            paired = statistics.median(r / b for r, b in zip(rates[(m, c)], base, strict=True))
            result[f"{m}: {c}"] = {"per_s": round(statistics.median(rates[(m, c)])), "paired": round(paired, 3)}
    if a.json:
        print(json.dumps(result, indent=2))
        return
    print("| loop | configuration | calls/s | paired ratio |\n|---|---|---|---|")
    for k, v in result.items():
        m, c = k.split(": ", 1)
        print(f"| {m} | {c} | {v['per_s']} | {v['paired']:.3f} |")


if __name__ == "__main__":
    main()
