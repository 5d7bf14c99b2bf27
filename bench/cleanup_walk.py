#!/usr/bin/env python3
"""Epilogue file-cleanup walk over a large /tmp-like tree: the cost of `cleanup()` as the epilogue calls it
(``since`` = the job's start) against the same walk without ``since`` (an lstat of every entry: what the
epilogue did before issue 9), in the same run.

The tree (private, under --dir, default /tmp, removed at the end): --entries files (default 50,000) spread
over directories of --per-dir files, all made *before* the "job" starts, plus a few files the job's identity
makes during the job (they must go in both walks).  Nothing outside the tree is touched: the cleanup's
directories are the tree alone.  Medians of --trials (default 5), baseline and new interleaved.

    sudo .venv/bin/python bench/cleanup_walk.py [--entries N] [--per-dir N] [--trials N] [--dir D] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time


def build(top: str, entries: int, per_dir: int) -> None:
    for d in range((entries + per_dir - 1) // per_dir):
        sub = os.path.join(top, f"d{d:04d}")
        os.mkdir(sub)
        for f in range(min(per_dir, entries - d * per_dir)):
            with open(os.path.join(sub, f"f{f:05d}"), "w"):
                pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=50_000)
    ap.add_argument("--per-dir", type=int, default=1000)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("cleanup_walk: run as root (the walk removes a test uid's files)", file=sys.stderr)
        return 1
    from jobcage.agent.cleanup import cleanup

    uid = 64999   # the "job identity": owns only the few files made during the job
    top = tempfile.mkdtemp(prefix="jc-cleanbench-", dir=a.dir)
    try:
        t = time.monotonic()
        build(top, a.entries, a.per_dir)
        built = time.monotonic() - t
        time.sleep(0.05)
        base_t, new_t = [], []
        removed = {}
        for _ in range(a.trials):
            since = time.time()
            time.sleep(0.01)
            for name in ("job-a", "job-b"):   # made during the job, by the job's identity
                p = os.path.join(top, "d0000", name)
                with open(p, "w"):
                    pass
                os.chown(p, uid, uid)
            for label, kw, out in (("baseline", {}, base_t), ("since", {"since": since}, new_t)):
                if label == "since":   # recreate what the baseline removed
                    for name in ("job-a", "job-b"):
                        p = os.path.join(top, "d0000", name)
                        if not os.path.exists(p):
                            with open(p, "w"):
                                pass
                            os.chown(p, uid, uid)
                t0 = time.perf_counter()
                r = cleanup([top], {uid}, min_uid=1000, **kw)
                out.append(time.perf_counter() - t0)
                removed[label] = r.removed_files
        b, n = statistics.median(base_t), statistics.median(new_t)
        res = {"entries": a.entries, "per_dir": a.per_dir, "trials": a.trials, "build_s": round(built, 2),
               "baseline_walk_s": round(b, 4), "since_walk_s": round(n, 4), "ratio": round(n / b, 4),
               "removed": removed}
        if a.json:
            print(json.dumps(res))
        else:
            print(f"{a.entries} entries in {a.entries // a.per_dir} dirs (built in {built:.1f} s); "
                  f"median of {a.trials}:")
            print(f"  lstat every entry (before):        {b * 1000:8.1f} ms   removed {removed['baseline']}")
            print(f"  since the job's start (epilogue):  {n * 1000:8.1f} ms   removed {removed['since']}")
            print(f"  ratio new/baseline: {n / b:.3f}")
        return 0 if removed.get("baseline") == removed.get("since") == 2 else 1
    finally:
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
