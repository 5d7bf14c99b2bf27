#!/usr/bin/env python3
"""ssh login cost of `jobcage pam`: wall time of `ssh USER@127.0.0.1 true` against a real OpenSSH server
whose PAM stack is Debian's own (baseline) or Debian's plus jobcage's account and session lines, in the
same run, trials interleaved so that load on the node hits all alike; medians of --trials (default 20).

Cases: ``baseline`` (no jobcage lines), ``agent`` (the agent answers), ``direct`` (agent stopped: the hook
decides as root itself), ``hung`` (agent frozen with SIGSTOP: the hook waits [pam] agent_timeout, then
decides directly).  The user has a running job, so every jobcage login is an adoption.  Also prints the
hook's own decision time (``elapsed`` of its log records: process start to decision, both PAM phases).

Root only.  Uses the test suite's fixtures (tests/sshdfixtures.py, tests/jctest.py): a private sshd on a
free loopback port, a private jobcage subtree, config and agent, a real user; all removed at the end.

    .venv/bin/python bench/ssh_login.py [--trials N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from jctest import JOBCAGE, AgentProc, JcEnv, create_user, delete_user  # noqa: E402
from sshdfixtures import make_sshd, remove_sshd  # noqa: E402


def login(server: object, user: object) -> float:
    t0 = time.perf_counter()
    r = server.ssh(user, "true")  # type: ignore[attr-defined]
    dt = (time.perf_counter() - t0) * 1000
    if r.returncode != 0:
        raise RuntimeError(f"ssh failed ({r.returncode}): {r.stderr.strip()}")
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("ssh_login.py: needs root", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="jcbench-ssh-"))
    env = JcEnv(tmp / "state")
    user = create_user("jcb")
    servers, agent = [], None
    try:
        base = make_sshd(env, with_jobcage=False)
        servers.append(base)
        jc = make_sshd(env)
        servers.append(jc)
        for s in servers:
            s.authorize(user)
        subprocess.run([JOBCAGE, "prologue", "bench", "--uid", str(user.uid)], env=env.env, check=True,
                       stdout=subprocess.DEVNULL)
        agent = AgentProc(env, tmp).start()
        times: dict[str, list[float]] = {"baseline": [], "agent": [], "direct": [], "hung": []}
        hook: dict[str, list[float]] = {"agent": [], "direct": [], "hung": []}
        for _ in range(args.trials):
            for case in times:
                if case == "direct":
                    agent.stop()
                elif case == "hung":
                    agent.start()
                    os.kill(agent.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
                seen = len(jc.decisions())
                times[case].append(login(base if case == "baseline" else jc, user))
                if case != "baseline":
                    hook[case] += [r["elapsed"] * 1000 for r in jc.decisions()[seen:]]
                if case == "hung":
                    os.kill(agent.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
                    agent.restart()
                # the logins' sessions end with ssh; nothing of them stays in the job
        med = {k: statistics.median(v) for k, v in times.items()}
        out = {"trials": args.trials, "login_ms": {k: round(v, 1) for k, v in med.items()},
               "ratio_to_baseline": {k: round(med[k] / med["baseline"], 2) for k in med},
               "hook_decision_ms_median": {k: round(statistics.median(v), 1) for k, v in hook.items() if v},
               "hook_decision_ms_max": {k: round(max(v), 1) for k, v in hook.items() if v}}
        if args.json:
            print(json.dumps(out, indent=2))
        else:
            print(f"ssh login wall time, median of {args.trials} (ms; ratio to Debian's stack alone):")
            for k, v in med.items():
                print(f"  {k:<9} {v:7.1f}  x{out['ratio_to_baseline'][k]:.2f}")
            print("jobcage pam decision, per PAM phase (ms, median / max):")
            for k in hook:
                if hook[k]:
                    print(f"  {k:<9} {out['hook_decision_ms_median'][k]:7.1f} / {out['hook_decision_ms_max'][k]:.1f}")
        return 0
    finally:
        if agent is not None:
            if agent.proc is not None and agent.proc.poll() is None:
                os.kill(agent.proc.pid, signal.SIGCONT)
            agent.stop()
        for s in servers:
            remove_sshd(s)
        subprocess.run([JOBCAGE, "epilogue", "bench", "--missing-ok"], env=env.env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        env.cleanup()
        delete_user(user)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
