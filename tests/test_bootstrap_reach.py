"""Issue 9, defect 8: `make bootstrap` must not link /usr/local/bin/jobcage into a checkout job users cannot
reach (a clone in /root, mode 0700 on Debian): scripts/bootstrap-venv.sh runs scripts/check-reachable.sh on what
it is about to link, which runs each program as a real unprivileged user (nobody) on the real kernel.  Here it
is run on this checkout's own launcher (reachable: what the suite's job users run) and on the same launcher
placed in a private 0700 directory, the layout of the issue (refused, one line saying which directory and why).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from jctest import require

REPO = Path(__file__).resolve().parent.parent
CHECK = REPO / "scripts" / "check-reachable.sh"
LAUNCHER = Path(sys.executable).parent / "jobcage-launcher"

pytestmark = [pytest.mark.root]


def check(*progs: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CHECK), *map(str, progs)], capture_output=True, text=True, timeout=60)


def test_reachable_checkout_passes() -> None:
    require(LAUNCHER.exists(), "no jobcage-launcher in the venv (run scripts/bootstrap-venv.sh)")
    r = check(LAUNCHER, Path(sys.executable).parent / "jobtrace")
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_private_checkout_is_refused_with_one_line() -> None:
    require(LAUNCHER.exists(), "no jobcage-launcher in the venv (run scripts/bootstrap-venv.sh)")
    private = Path(tempfile.mkdtemp(prefix="jct-private-"))   # like /root: 0700
    try:
        private.chmod(0o700)
        (private / "jobcage" / ".venv" / "bin").mkdir(parents=True)
        prog = private / "jobcage" / ".venv" / "bin" / "jobcage-launcher"
        shutil.copy(LAUNCHER, prog)
        os.chmod(prog, 0o755)
        # the failure the issue saw, for real: a job user cannot execute it
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", str(prog), "--help"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
        r = check(prog)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, r.stderr
        assert f"{private} is not searchable by other users (mode 700)" in lines[0], lines
    finally:
        shutil.rmtree(private, ignore_errors=True)
