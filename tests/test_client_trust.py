"""Issue 9, defect 6: the TaskProlog-only setup must not be bypassable by the job.

The TaskProlog runs as the job user with the job's environment.  The attack: the job exports JOBCAGE_CONFIG
pointing at a config of its own whose socket is a 15-line fake agent that answers every request "ok".  Before,
`jobcage adopt` reported success and the job ran in no job cgroup, with no pids limit.  Now a non-root client
takes nothing from a config the caller can write, never talks to a socket served by anyone but root, and
checks with the kernel (/proc/PID/cgroup) that the process really joined the job's cgroup.  Real agent, real
users, real cgroups, BPF tracer on.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from jctest import JOBCAGE, PYTHON, AgentProc, JcEnv, User, proc_cgroups, wait_for

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.jc_config({"tracer": {"backend": "bpf"}})]

# The attacker's agent: 15 lines, answers every request with success.
FAKE_AGENT = r"""
import json, os, socket, struct, sys
path = sys.argv[1]
if os.path.exists(path):
    os.unlink(path)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path); os.chmod(path, 0o666); s.listen(8)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    try:
        req = json.loads(c.recv(struct.unpack("!I", c.recv(4))[0]))
        body = json.dumps({"ok": True, "result": {"job_id": req["params"].get("job_id"),
                                                  "pid": req["params"].get("pid"), "tmpdir": None}}).encode()
        c.sendall(struct.pack("!I", len(body)) + body)
    except Exception:
        pass   # a client that hung up at once
    c.close()
"""


def start_fake(env: JcEnv, sock: Path, user: User | None) -> subprocess.Popen:
    script = env.scratch / f"fake-{sock.stem}.py"
    script.write_text(FAKE_AGENT)
    script.chmod(0o644)
    p = env.popen([PYTHON, str(script), str(sock)], user=user, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def uncontained_run(env: JcEnv, job: str, user: User, extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    """`jobcage run JOB -- sh -c 'cat /proc/self/cgroup'` as the job user with the attacker's environment."""
    return subprocess.run(user.argv([JOBCAGE, "run", job, "--", "/bin/sh", "-c", "cat /proc/self/cgroup"]),
                          env=user.env({**env.env, **extra_env}), cwd=str(user.home), capture_output=True,
                          text=True, timeout=60)


def adopt_shell(env: JcEnv, job: str, user: User, extra_env: dict[str, str]) -> tuple[subprocess.CompletedProcess, int]:
    """A job-user shell runs `jobcage adopt JOB` (adopt its parent: the shell, like a TaskProlog) and prints
    its own pid; returns the adopt's result (rc, stderr) and the shell's pid."""
    r = subprocess.run(user.argv(["/bin/sh", "-c", f"echo $$; {JOBCAGE} adopt {job}; echo rc=$?"]),
                       env=user.env({**env.env, **extra_env}), cwd=str(user.home), capture_output=True, text=True,
                       timeout=60)
    return r, int(r.stdout.split()[0])


def one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_fake_agent_from_user_config_is_refused(jc_env: JcEnv, agent_proc: AgentProc,
                                                make_user: Callable[..., User]) -> None:
    """The attack of the issue: the job user's own config (in its home) names a socket served by its own fake
    agent.  `jobcage run` and `jobcage adopt` fail with one line, exit 1, and run nothing outside the job."""
    u = make_user()
    job = "trust1"
    jc_env.jobcage("prologue", job, "--uid", str(u.uid), "--pids-max", "50").ok()
    sock = u.home / "fake.sock"
    evil = u.home / "evil.toml"
    subprocess.run(u.argv(["/bin/sh", "-c", f"printf '[agent]\\nsocket = \"{sock}\"\\n' > {evil}"]), check=True)
    assert evil.stat().st_uid == u.uid
    start_fake(jc_env, sock, u)
    r = uncontained_run(jc_env, job, u, {"JOBCAGE_CONFIG": str(evil)})
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert f"/{jc_env.subtree}/" not in r.stdout and "0::" not in r.stdout, "the command ran"
    assert "only root can write" in one_line(r.stderr), r.stderr
    a, shell = adopt_shell(jc_env, job, u, {"JOBCAGE_CONFIG": str(evil)})
    assert "rc=1" in a.stdout and "only root can write" in one_line(a.stderr), (a.stdout, a.stderr)
    # the same config made group-writable by a root-owned file is refused too
    loose = jc_env.base / "loose.toml"
    loose.write_text(f'[agent]\nsocket = "{sock}"\n')
    loose.chmod(0o666)
    r = uncontained_run(jc_env, job, u, {"JOBCAGE_CONFIG": str(loose)})
    assert r.returncode == 1 and "writable by group or others" in one_line(r.stderr), r.stderr
    # and with the site's config the user joins the real job
    r = uncontained_run(jc_env, job, u, {})
    assert r.returncode == 0 and f"/{jc_env.subtree}/{job}" in r.stdout, (r.stdout, r.stderr)


def test_fake_agent_on_the_sites_socket_path_is_refused(jc_env: JcEnv, make_user: Callable[..., User]) -> None:
    """A root-owned config whose socket lies in a directory the job user can write (the agent is down): the
    user's fake agent sits on the very socket path the site configured.  The client sees (SO_PEERCRED) that it
    is not root's and refuses: one line, exit 1, nothing run."""
    u = make_user()
    job = "trust2"
    jc_env.write_config({"agent": {"socket": str(jc_env.scratch / "agent.sock")}})   # scratch: mode 1777
    jc_env.jobcage("prologue", job, "--uid", str(u.uid)).ok()
    start_fake(jc_env, jc_env.scratch / "agent.sock", u)
    r = uncontained_run(jc_env, job, u, {})
    assert r.returncode == 1 and "0::" not in r.stdout, (r.stdout, r.stderr)
    assert f"served by uid {u.uid}, not root" in one_line(r.stderr), r.stderr
    a, shell = adopt_shell(jc_env, job, u, {})
    assert "rc=1" in a.stdout and "not root" in one_line(a.stderr), (a.stdout, a.stderr)


def test_adopt_verified_with_the_kernel(jc_env: JcEnv, make_user: Callable[..., User]) -> None:
    """Even a root-run process on the configured socket that answers "ok" without moving anything (a broken
    or impostor agent) cannot make `adopt`/`run` report success: the client reads /proc/PID/cgroup."""
    u = make_user()
    job = "trust3"
    jc_env.jobcage("prologue", job, "--uid", str(u.uid)).ok()
    start_fake(jc_env, Path(jc_env.socket_path), None)   # as root: passes SO_PEERCRED, lies about adopting
    r = uncontained_run(jc_env, job, u, {})
    assert r.returncode == 1 and "0::" not in r.stdout, (r.stdout, r.stderr)
    assert "not contained" in one_line(r.stderr), r.stderr
    a, shell = adopt_shell(jc_env, job, u, {})
    assert "rc=1" in a.stdout and "not contained" in one_line(a.stderr), (a.stdout, a.stderr)
    assert f"/{jc_env.subtree}/" not in proc_cgroups(shell).get("", ""), "cannot have joined"


def test_adopt_still_works_for_the_owner(jc_env: JcEnv, agent_proc: AgentProc,
                                         make_user: Callable[..., User]) -> None:
    """The normal TaskProlog path: the owner's `jobcage adopt JOB` (its parent shell) with the site's config
    succeeds and the kernel has the shell in the job."""
    u = make_user()
    job = "trust4"
    jc_env.jobcage("prologue", job, "--uid", str(u.uid)).ok()
    p = subprocess.Popen(u.argv(["/bin/sh", "-c", f"{JOBCAGE} adopt {job} && echo ok && exec sleep 30"]),
                         env=u.env(jc_env.env), cwd=str(u.home), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    jc_env.tracked.add(p)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ok", p.stderr.read() if p.stderr else ""
    wait_for(lambda: jc_env.in_job(p.pid, job), 10, "the shell in the job")
