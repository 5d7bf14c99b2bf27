"""Run the demo N times in a row and count the runs that exit 0 (issue 9: `sudo make demo` must pass every time).

    sudo .venv/bin/python scripts/demo-repeat.py [N]      # default 20; from a worktree or a fresh clone

Uses the interpreter it runs under for the demo (so the demo uses that venv's jobcage).  Prints one line per run
and `demo: K of N runs passed`; exits 0 only if all passed.  A failing run's last output lines are shown.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")


def main() -> int:
    if os.geteuid() != 0:
        print("demo-repeat: run as root", file=sys.stderr)
        return 1
    try:
        n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    except ValueError:
        print(f"demo-repeat: N must be a number, not {sys.argv[1]!r}", file=sys.stderr)
        return 2
    ok = 0
    for i in range(1, n + 1):
        t = time.monotonic()
        r = subprocess.run([sys.executable, DEMO], capture_output=True, text=True,
                           env=dict(os.environ, COLUMNS="200"))
        dt = time.monotonic() - t
        ok += r.returncode == 0
        print(f"run {i}/{n}: exit {r.returncode} ({dt:.1f} s)", flush=True)
        if r.returncode != 0:
            print("\n".join(("   " + line) for line in (r.stdout + r.stderr).splitlines()[-12:]), flush=True)
    print(f"demo: {ok} of {n} runs passed")
    return 0 if ok == n else 1


if __name__ == "__main__":
    sys.exit(main())
