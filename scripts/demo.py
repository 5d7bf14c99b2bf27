"""`sudo make demo`: one pilot job that tries every escape, contained and killed.

A pilot user runs a job that double-forks a setsid daemon, starts a payload under
a pool uid through real sudo, and launches a fork bomb.  The demo shows all of it
inside the job's cgroup, the bomb held at its pids limit, suspend / resume, kill,
and that nothing survives.  Everything it creates (users, sudoers rule, agent,
cgroups, state) is private to the demo and removed at the end.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

from rich.console import Console

con = Console(highlight=False)
TAG = uuid.uuid4().hex[:5]
PILOT, POOL = f"jcdp{TAG}", f"jcdq{TAG}"
JOB = f"demo-{TAG}"
SUBTREE = f"jobcage-demo-{TAG}"
BIN = os.path.dirname(sys.executable)
JOBCAGE = os.path.join(BIN, "jobcage")
JOBTRACE = os.path.join(BIN, "jobtrace")

JOB_SCRIPT = r"""#!/bin/bash
# The pilot's job: everything a hostile payload would try.
( setsid sh -c 'sleep 600 & exit' & )                     # double fork + setsid daemon
nohup sleep 600 >/dev/null 2>&1 &                          # nohup'd straggler
sudo -n -u {pool} /bin/sleep 600 &                         # payload under a pool uid
( i=0; while :; do i=$((i+1)); echo $i > {counter}; sleep 0.05; done ) &
sleep 0.5
bomb() {{ bomb | bomb & }}; bomb 2>/dev/null               # fork bomb, held by pids.max
wait
"""


def step(title: str) -> None:
    con.print(f"\n[bold cyan]==> {title}[/bold cyan]")


def run(*args: str, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess:
    con.print(f"[dim]$ {' '.join(args)}[/dim]")
    r = subprocess.run(args, capture_output=True, text=True)
    if not quiet and (r.stdout.strip() or r.stderr.strip()):
        con.print((r.stdout + r.stderr).rstrip(), markup=False)
    if check and r.returncode != 0:
        raise SystemExit(f"demo: {' '.join(args)} failed ({r.returncode})")
    return r


def show() -> dict:
    return json.loads(subprocess.run([JOBCAGE, "show", JOB, "--json"], capture_output=True, text=True,
                                     check=True).stdout)


def uid_procs(uids: set[int]) -> list[str]:
    """Live processes of these uids; zombies are dead (only waiting for their parent
    to reap them) and are not counted."""
    out = subprocess.run(["ps", "-eo", "pid=,uid=,stat=,comm="], capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines()
            if line.split() and int(line.split()[1]) in uids and not line.split()[2].startswith("Z")]


def main() -> int:
    if os.geteuid() != 0:
        raise SystemExit("demo: run as root (sudo make demo)")
    tmp = tempfile.mkdtemp(prefix="jobcage-demo-")
    os.chmod(tmp, 0o755)
    cfg = os.path.join(tmp, "jobcage.toml")
    with open(cfg, "w") as f:
        f.write(f'[cgroups]\nsubtree = "{SUBTREE}"\n[agent]\nstate_dir = "{tmp}/state"\n'
                f'socket = "{tmp}/agent.sock"\n[tracer]\nbackend = "auto"\n')
    os.environ["JOBCAGE_CONFIG"] = cfg
    sudoers = f"/etc/sudoers.d/jobcage-demo-{TAG}"
    agent = None
    try:
        step("Two users: a pilot and a pool account (created for the demo)")
        for u in (PILOT, POOL):
            subprocess.run(["useradd", "-m", "-s", "/bin/bash", u], check=True)
        pilot, pool = pwd.getpwnam(PILOT).pw_uid, pwd.getpwnam(POOL).pw_uid
        with open(sudoers, "w") as f:  # the pilot's identity-switch helper: real sudo
            f.write(f"{PILOT} ALL=({POOL}) NOPASSWD: /bin/sleep\n")
        os.chmod(sudoers, 0o440)
        con.print(f"pilot {PILOT} uid {pilot}, pool {POOL} uid {pool}")

        step("Start the agent (foreground daemon; here in the background)")
        agent = subprocess.Popen([JOBCAGE, "agent", "--config", cfg], stdout=subprocess.DEVNULL,
                                 stderr=open(os.path.join(tmp, "agent.log"), "w"))
        from jobcage.agent.client import call

        # The agent answers once its tracer is loaded: compiling the BPF programs takes seconds, many more on
        # a loaded node.  Wait for it (the job's `jobcage run` as the pilot needs the agent), never go on without.
        deadline = time.monotonic() + 180
        while True:
            try:
                call(f"{tmp}/agent.sock", "ping", timeout=2)
                break
            except Exception:
                if agent.poll() is not None:
                    raise SystemExit("demo: the agent did not start:\n" + open(f"{tmp}/agent.log").read()) from None
                if time.monotonic() > deadline:
                    raise SystemExit("demo: the agent did not answer within 180 s:\n"
                                     + open(f"{tmp}/agent.log").read()) from None
                time.sleep(0.1)
        doc = json.loads(run(JOBCAGE, "doctor", "--json", quiet=True).stdout)
        con.print(f"cgroups: {doc['cgroups']['driver']} (kill via {doc['cgroups']['kill path']}), "
                  f"tracing: {doc['agent'].get('tracer', 'off')}")

        step("Batch system prologue: register the job, pids.max 64")
        run(JOBCAGE, "prologue", JOB, "--uid", str(pilot), "--pids-max", "64")

        step("The job starts (as the pilot, through `jobcage run`): daemon, sudo payload, fork bomb")
        counter = os.path.join(tmp, "counter")
        script = os.path.join(tmp, "job.sh")
        with open(script, "w") as f:
            f.write(JOB_SCRIPT.format(pool=POOL, counter=counter))
        os.chmod(script, 0o755)
        open(counter, "w").close()
        os.chown(counter, pilot, -1)
        job_err = os.path.join(tmp, "job.err")
        with open(job_err, "w") as err:
            job = subprocess.Popen(["runuser", "-u", PILOT, "--", JOBCAGE, "run", JOB, "--", "/bin/bash", script],
                                   stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        deadline = time.time() + 30
        while time.time() < deadline:
            s = show()
            if s["pids_limit_hits"] and s["pids_current"] >= 60:
                break
            if job.poll() is not None:   # `jobcage run` failed: say why, do not go on as if contained
                raise SystemExit(f"demo: the job exited at once ({job.returncode}): {open(job_err).read().strip()}")
            time.sleep(0.2)
        s = show()
        con.print(f"processes in the job: {s['processes']}   pids {s['pids_current']}/{s['pids_max']}   "
                  f"refused forks: [bold]{s['pids_limit_hits']}[/bold]")
        outside = [p for p in uid_procs({pilot, pool})
                   if (cg := _cgroup_of(int(p.split()[0]))) is not None and f"/{SUBTREE}/{JOB}" not in cg]
        con.print(f"processes of the pilot or pool uid outside the job: {len(outside)}")
        daemons = subprocess.run(["ps", "-o", "pid,ppid,sess,user,uid,euid,cmd", "--no-headers", "-p",
                                  ",".join(map(str, _pids()))], capture_output=True, text=True).stdout
        sleepers = [line for line in daemons.splitlines() if "sleep 600" in line]
        con.print("the escapees, all in the job's cgroup (ps: pid ppid sess user uid euid cmd):")
        for line in sleepers:
            con.print("   " + line.strip(), markup=False)
        if os.path.exists(JOBTRACE):
            r = subprocess.run([JOBTRACE, JOB], capture_output=True, text=True)
            if r.returncode == 0:
                lines = r.stdout.splitlines()
                con.print("\n".join(lines[:14] + ([f"   ... ({len(lines) - 14} more lines)"] if len(lines) > 14 else [])),
                          markup=False)

        step("Suspend: the kernel confirms every process frozen; the counter stops")
        run(JOBCAGE, "suspend", JOB)
        a = open(counter).read().strip()
        time.sleep(0.6)
        b = open(counter).read().strip()
        con.print(f"state {show()['state']}; counter {a} -> {b} over 0.6 s")
        step("Resume: the counter moves again")
        run(JOBCAGE, "resume", JOB)
        time.sleep(0.6)
        con.print(f"state {show()['state']}; counter {b} -> {open(counter).read().strip()}")

        step("Kill: every process of the job, returns when the job is empty")
        t = time.monotonic()
        run(JOBCAGE, "kill", JOB)
        con.print(f"kill took {1000 * (time.monotonic() - t):.0f} ms (whole command); "
                  f"processes left in the job: {show()['processes']}")
        job.wait(timeout=10)

        step("Epilogue: final accounting, cgroup removed")
        run(JOBCAGE, "epilogue", JOB)
        left = uid_procs({pilot, pool})
        verdict = "[bold green]nothing survived[/bold green]" if not left else f"[bold red]SURVIVORS: {left}[/bold red]"
        con.print(f"processes of {PILOT}/{POOL} on the node: {len(left)} -> {verdict}")
        step("The audit trail kept after the job (identity switches and escapes; `jobtrace JOB --events`)")
        r = subprocess.run([JOBTRACE, JOB, "--events", "--json"], capture_output=True, text=True)
        shown = 0
        switch_ts = None
        for line in r.stdout.splitlines():
            e = json.loads(line)
            d = e["detail"]
            if e["kind"] == "setuid" and d.get("old_uid") == e["uid"]:
                continue  # sudo's own juggling of its effective uid: in the trail, not shown here
            if e["kind"] == "setuid" and e["uid"] == pool:
                switch_ts = e["ts"]
            if e["kind"] in ("setuid", "setsid") or (e["kind"] == "exec" and "sleep" not in e["comm"]) \
                    or (e["kind"] == "fork_failed" and shown < 12):
                shown += 1
                extra = (f"{d.get('syscall')} {d.get('old_uid')}->{e['uid']} ret={d.get('ret')}"
                         if e["kind"] == "setuid" else e["filename"] or "")
                con.print(f"  {e['ts'][11:23]} {e['kind']:<11} pid {e['pid']:<6} ppid {e['ppid']:<6} "
                          f"uid {e['uid']:<5} euid {e['euid']:<5} {extra}", markup=False)
        step(f"Back-mapping, after the job ended: who held uid {pool} at {switch_ts}?")
        run(JOBCAGE, "whois", "--uid", str(pool), "--at", switch_ts or "")
        return 0 if not left else 1
    finally:
        if agent is not None and agent.poll() is not None:   # it died: its log says why
            con.print(f"[bold red]the agent exited ({agent.returncode}):[/bold red]")
            con.print("\n".join(open(os.path.join(tmp, "agent.log")).read().splitlines()[-15:]), markup=False)
        step("Cleaning up the demo")
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(timeout=10)
            except subprocess.TimeoutExpired:
                agent.kill()
        subprocess.run([JOBCAGE, "epilogue", JOB], capture_output=True)
        for d in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup/pids", "/sys/fs/cgroup/freezer",
                  "/sys/fs/cgroup/cpuacct", "/sys/fs/cgroup"):
            p = os.path.join(d, SUBTREE)
            if os.path.isdir(p):
                try:
                    os.rmdir(p)
                except OSError:
                    pass
        for u in (PILOT, POOL):
            subprocess.run(["userdel", "-r", u], capture_output=True)
        if os.path.exists(sudoers):
            os.unlink(sudoers)
        shutil.rmtree(tmp, ignore_errors=True)
        con.print("done.")


def _cgroup_of(pid: int) -> str | None:
    """/proc/PID/cgroup, None if the process is gone (the fork bomb's processes come and go)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _pids() -> list[int]:
    from jobcage.agent.client import invoke

    return invoke("trace", job_id=JOB)["pids"]  # type: ignore[index]


if __name__ == "__main__":
    sys.exit(main())
