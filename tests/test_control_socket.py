"""The control socket under hostile local users (issue 17): bounded threads and memory whatever they send,
root's hooks answered promptly during the flood, refusals answered with one line, counted and logged
rate-limited, and a legitimate busy job not broken by the per-uid cap.

Real agent, real users (the flooders run as test users, tests/flooder.py), real sockets."""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from jctest import JOBCAGE, AgentProc, JcEnv, User, free_port, pids_of_uid, wait_for

from jobcage.agent.client import call

pytestmark = pytest.mark.root

FLOODER = Path(__file__).with_name("flooder.py")
PY = "/usr/bin/python3"


def with_metrics(jc_env: JcEnv, agent_proc: AgentProc) -> int:
    """Turn the agent's metrics port on, on a port picked now (one free when the module was collected may be
    someone's client port by the time a long suite gets here)."""
    port = free_port()
    jc_env.write_config({"agent": {"metrics_port": port}})
    agent_proc.restart()
    return port


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=20).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("jobcage_control"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def refused(m: dict[str, float], reason: str) -> float:
    return m.get(f'jobcage_control_refused_total{{reason="{reason}"}}', 0.0)


def proc_status(pid: int) -> tuple[int, int]:
    """(RSS in kB, threads) of a process, from /proc."""
    st = dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in ln)
    return int(st["VmRSS"].split()[0]), int(st["Threads"])


class Sampler:
    """RSS and thread count of the agent every 50 ms, in a thread of the test."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rss: list[int] = []
        self.threads: list[int] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, th = proc_status(self.pid)
            self.rss.append(rss)
            self.threads.append(th)
            self._stop.wait(0.05)

    def __enter__(self) -> Sampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def root_round(sock: str, job_id: str, sleeper: subprocess.Popen) -> dict[str, float]:
    """prologue / adopt / epilogue of one job through the real client, each timed from connect to answer."""
    out = {}
    for method, params in (("prologue", {"job_id": job_id, "uid": 0, "pids_max": 64}),
                           ("adopt", {"job_id": job_id, "pid": sleeper.pid}),
                           ("epilogue", {"job_id": job_id})):
        t0 = time.perf_counter()
        call(sock, method, timeout=60, **params)
        out[method] = time.perf_counter() - t0
    sleeper.wait(timeout=30)  # the epilogue killed it
    return out


def flooder(env: JcEnv, user: User, mode: str, n: int, tag: str) -> tuple[subprocess.Popen, Path]:
    status = env.scratch / f"flood-{tag}.json"
    p = env.popen([PY, "-I", str(env.scratch / "flooder.py"), env.socket_path, str(status), mode, str(n)],
                  user=user)
    return p, status


def status(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


@pytest.fixture
def flood_users(make_user: Callable[..., User]) -> Iterator[list[User]]:
    yield [make_user() for _ in range(6)]


def test_flood_root_served_agent_bounded(jc_env: JcEnv, agent_proc: AgentProc, flood_users: list[User]) -> None:
    port = with_metrics(jc_env, agent_proc)
    assert agent_proc.proc is not None
    apid = agent_proc.proc.pid
    cfg = jc_env.config()
    sock = jc_env.socket_path
    shutil.copy(FLOODER, jc_env.scratch / "flooder.py")
    idle_users, slow_user, junk_user = flood_users[:4], flood_users[4], flood_users[5]

    # the hooks' path (client.invoke as root): root's own listener, which no other uid can reach
    rsock = cfg.root_socket
    assert Path(rsock).stat().st_mode & 0o777 == 0o600
    probe = jc_env.run([PY, "-I", "-c", "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])",
                        rsock], user=idle_users[0])
    assert probe.rc != 0 and "PermissionError" in probe.err, probe
    # idle: after the lanes' threads exist (warm-up rounds) and a user request was answered
    quiet: dict[str, list[float]] = {"prologue": [], "adopt": [], "epilogue": []}
    for i in range(10):
        for k, v in root_round(rsock, f"warm{i}", jc_env.popen(["sleep", "300"])).items():
            quiet[k].append(v)
    assert jc_env.jobcage("list", "--json", user=idle_users[0]).json() == []
    time.sleep(0.5)
    idle_rss, idle_threads = proc_status(apid)
    # main, control loop, metrics server, and the lanes at most (root lane started on demand)
    max_threads = 3 + cfg.root_workers + cfg.workers + 2

    procs: list[subprocess.Popen] = []
    with Sampler(apid) as sampler:
        # 8 processes x 1,000 idle connections (two per user), slow senders, then 10,000 malformed frames
        for k in range(8):
            procs.append(flooder(jc_env, idle_users[k % 4], "idle", 1000, f"idle{k}")[0])
        procs.append(flooder(jc_env, slow_user, "slow", 300, "slow")[0])
        per_uid = cfg.uid_connections + cfg.uid_queue
        wait_for(lambda: scrape(port).get('jobcage_control_connections{lane="user",state="waiting"}', 0)
                 >= 5 * cfg.uid_queue, 120, "the flooders to fill their uids' queues")
        wait_for(lambda: refused(scrape(port), "uid_limit") > 1000, 60, "refusals of the idle flood")
        # a flooding user's own extra call is refused with one line
        busy = jc_env.jobcage("list", user=idle_users[0])
        busy.clean_error(1, "agent busy")
        junk, junk_status = flooder(jc_env, junk_user, "garbage", 10_000, "junk")
        procs.append(junk)
        wait_for(lambda: status(junk_status).get("sent", 0) > 200, 60, "the garbage flood to start")

        times: dict[str, list[float]] = {"prologue": [], "adopt": [], "epilogue": []}
        during_garbage = 0
        shared: list[float] = []   # root through the users' listener too (not the hooks' path; reported)
        for i in range(40):
            garbage_running = not status(junk_status).get("done")
            for k, v in root_round(rsock, f"flood{i}", jc_env.popen(["sleep", "300"])).items():
                times[k].append(v)
            if i % 4 == 0:
                shared.append(root_round(sock, f"shared{i}", jc_env.popen(["sleep", "300"]))["prologue"])
            during_garbage += garbage_running
        held = scrape(port)
        wait_for(lambda: status(junk_status).get("done"), 600, "10,000 malformed frames to be answered")
        # the slow senders' requests expire at the whole-request deadline, however fast the rest went
        wait_for(lambda: refused(scrape(port), "timeout") > 0, cfg.request_timeout + 60,
                 "a slow sender's request to reach its deadline")
        flood_rss, flood_threads = max(sampler.rss), max(sampler.threads)
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(timeout=30)

    medians = {k: statistics.median(v) for k, v in times.items()}
    report = (f"medians {', '.join(f'{k} {v * 1000:.1f} ms' for k, v in medians.items())} "
              f"(quiet: {', '.join(f'{k} {statistics.median(v) * 1000:.1f} ms' for k, v in quiet.items())}; "
              f"prologue via the shared listener {statistics.median(shared) * 1000:.1f} ms); "
              f"RSS idle {idle_rss} kB, max {flood_rss} kB; threads idle {idle_threads}, max {flood_threads}; "
              f"{during_garbage}/40 rounds during the garbage flood")
    print(report)
    for k, v in medians.items():
        assert v < 0.100, f"root {k} median {v * 1000:.1f} ms during the flood: {report}"
    assert during_garbage >= 5, report
    assert flood_threads <= max_threads, report
    assert flood_rss - idle_rss <= 20 * 1024, report
    # the caps held: per uid at most uid_connections served + uid_queue waiting, refusals counted
    assert held['jobcage_control_connections{lane="user",state="active"}'] <= 6 * cfg.uid_connections
    assert held['jobcage_control_connections{lane="user",state="waiting"}'] <= 6 * cfg.uid_queue
    assert len(list(Path(f"/proc/{apid}/fd").iterdir())) < 6 * per_uid + 200
    js = status(junk_status)
    assert js["sent"] == 10_000, js
    m = scrape(port)
    for reason in ("uid_limit", "too_large", "malformed", "timeout"):
        assert refused(m, reason) > 0, (reason, m)
    assert refused(m, "malformed") >= 4000, m    # nested, not-JSON and unknown-method frames

    # afterwards: everything answered normally, nothing held
    for u in flood_users:
        wait_for(lambda u=u: not pids_of_uid(u.uid), 30, f"flooders of {u.name} to exit")
    wait_for(lambda: scrape(port)['jobcage_control_connections{lane="user",state="active"}'] == 0
             and scrape(port)['jobcage_control_connections{lane="user",state="waiting"}'] == 0, 30,
             "the agent to let go of the flood's connections")
    root_round(rsock, "after", jc_env.popen(["sleep", "300"]))
    root_round(sock, "after2", jc_env.popen(["sleep", "300"]))
    assert jc_env.jobcage("list", "--json", user=idle_users[0]).json() == []
    assert jc_env.jobcage("show", "after", "--json").json()["state"] == "ended"
    rss, threads = proc_status(apid)
    assert threads <= max_threads and rss - idle_rss <= 20 * 1024, (rss, threads, report)
    assert agent_proc.alive
    # logged rate-limited: a handful of lines per reason, not one per refused connection
    log = agent_proc.log(tail=1_000_000)
    lines = [ln for ln in log.splitlines() if "control socket: refused" in ln]
    assert "Traceback" not in log and "internal error" not in log
    assert 0 < len(lines) <= 200, f"{len(lines)} refusal log lines for {int(sum(refused(m, r) for r in ('uid_limit', 'too_large', 'malformed', 'timeout', 'incomplete')))} refusals"


def test_busy_job_not_refused(jc_env: JcEnv, agent_proc: AgentProc, make_user: Callable[..., User]) -> None:
    """64 concurrent `jobcage adopt` of the job's own processes by its user: all succeed, none refused.
    Then 64 requests on 64 connections opened at once by one process of that user (certainly over the
    per-uid cap): all answered, the excess queued."""
    user = make_user()
    jc_env.jobcage("prologue", "busy", "--uid", str(user.uid), "--pids-max", "256").ok()
    sleepers = [jc_env.popen(["sleep", "300"], user=user) for _ in range(64)]
    adopts = [jc_env.popen([JOBCAGE, "adopt", "busy", "--pid", str(s.pid)], user=user,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in sleepers]
    for a in adopts:
        out, err = a.communicate(timeout=120)
        assert a.returncode == 0 and not err, (a.returncode, out, err)
    for s in sleepers:
        assert jc_env.in_job(s.pid, "busy")

    script = jc_env.scratch / "burst.py"
    script.write_text(
        "import json, socket, struct, sys\n"
        "conns = []\n"
        "for i in range(64):\n"
        "    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        "    d = json.dumps({'method': 'show', 'params': {'job_id': 'busy'}}).encode()\n"
        "    s.sendall(struct.pack('!I', len(d)) + d); conns.append(s)\n"
        "out = []\n"
        "for s in conns:\n"
        "    n = struct.unpack('!I', s.recv(4, socket.MSG_WAITALL))[0]\n"
        "    out.append(json.loads(s.recv(n, socket.MSG_WAITALL))['ok'])\n"
        "print(json.dumps(out))\n")
    r = jc_env.run([PY, "-I", str(script), jc_env.socket_path], user=user).ok()
    assert json.loads(r.out) == [True] * 64
    log = agent_proc.log(tail=100_000)
    assert "refused" not in log, log


def hold_connections(env: JcEnv, user: User, n: int) -> subprocess.Popen:
    """A process of `user` holding n connections to the agent's socket open; returns once they are made."""
    script = env.scratch / f"hold{n}.py"
    script.write_text(
        "import socket, sys, time\n"
        "conns = []\n"
        f"for i in range({n}):\n"
        "    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); conns.append(s)\n"
        "print('held', flush=True)\n"
        "time.sleep(300)\n")
    holder = env.popen([PY, "-I", str(script), env.socket_path], user=user, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.jc_config({"agent": {"request_timeout": 120.0}})   # the held connections do not expire meanwhile
def test_refusals_are_one_line(jc_env: JcEnv, agent_proc: AgentProc, make_user: Callable[..., User]) -> None:
    """A uid over its cap and queue (the defaults) gets one clear line from the CLI; other uids and root
    are served meanwhile; once its connections are gone, it is served again."""
    user, other = make_user(), make_user()
    cfg = jc_env.config()
    holder = hold_connections(jc_env, user, cfg.uid_connections + cfg.uid_queue)
    # the agent accepted them all: wait until it has seen them (its queue is full)
    r = wait_for(lambda: (x := jc_env.jobcage("list", user=user)).rc == 1 and x, 30, "the uid to be at its cap")
    line = r.clean_error(1, "agent busy")
    assert re.search(rf"uid {user.uid}", line), line
    assert jc_env.jobcage("list", "--json", user=other).json() == []
    jc_env.jobcage("prologue", "rootjob", "--uid", "0").ok()
    holder.kill()
    holder.wait()
    wait_for(lambda: jc_env.jobcage("list", user=user).rc == 0, 30, "the uid to be served again")


@pytest.mark.jc_config({"agent": {"uid_connections": 2, "uid_queue": 2, "request_timeout": 1.5,
                                  "max_request_bytes": 1000}})
def test_caps_deadline_and_size_limit(jc_env: JcEnv, agent_proc: AgentProc, make_user: Callable[..., User]) -> None:
    """The configured bounds, exactly: 2 served + 2 waiting per uid, the next refused at once; a whole-request
    deadline that trickling does not extend; a length prefix over the limit answered before any body."""
    user = make_user()
    script = jc_env.scratch / "caps.py"
    script.write_text(
        "import json, socket, struct, sys, time\n"
        "def conn():\n"
        "    s = socket.socket(socket.AF_UNIX); s.settimeout(30); s.connect(sys.argv[1]); return s\n"
        "def answer(s):\n"
        "    hdr = s.recv(4, socket.MSG_WAITALL)\n"
        "    if len(hdr) < 4: return None\n"
        "    return json.loads(s.recv(struct.unpack('!I', hdr)[0], socket.MSG_WAITALL))\n"
        "out = {}\n"
        "held = [conn() for _ in range(4)]\n"         # 2 served (idle), 2 waiting
        "time.sleep(0.3)\n"
        "t0 = time.monotonic(); extra = conn(); out['refused'] = answer(extra)\n"
        "out['refused_in'] = time.monotonic() - t0\n"
        "req = json.dumps({'method': 'ping', 'params': {}}).encode(); req = struct.pack('!I', len(req)) + req\n"
        "t0 = time.monotonic()\n"
        "for i in range(len(req)):\n"                  # trickle into a served one: the deadline still holds
        "    try: held[0].send(req[i:i + 1])\n"
        "    except OSError: break\n"
        "    time.sleep(0.25)\n"
        "out['slow'] = answer(held[0]); out['slow_after'] = time.monotonic() - t0\n"
        "out['idle'] = answer(held[1])\n"
        "s = held[2]; s.sendall(req); r = answer(s); out['promoted'] = r\n"   # promoted once slots freed
        "big = conn(); big.sendall(struct.pack('!I', 5000)); out['big'] = answer(big)\n"
        "print(json.dumps(out))\n")
    r = jc_env.run([PY, "-I", str(script), jc_env.socket_path], user=user, timeout=60).ok()
    out = json.loads(r.out)
    err = {k: (v or {}).get("error") for k, v in out.items() if isinstance(v, dict | None)}
    assert err["refused"]["type"] == "Busy" and f"uid {user.uid}" in err["refused"]["message"], out
    assert out["refused_in"] < 5, out
    assert err["slow"]["type"] == "ProtocolError" and "within 1.5 s" in err["slow"]["message"], out
    assert out["slow_after"] < 5, out             # ~1.5 s, not len(req) x 0.25 s = 10 s
    assert err["idle"]["type"] == "ProtocolError" and "within 1.5 s" in err["idle"]["message"], out
    assert out["promoted"]["ok"] is True, out      # a waiting connection, served once slots freed
    assert err["big"]["type"] == "ProtocolError" and "limit 1000" in err["big"]["message"], out
    # root is neither capped nor held to max_request_bytes: a 3,000-byte request gets a real answer
    resp = agent_proc.call("show", job_id="x" * 3000)
    assert resp["error"]["type"] == "InvalidArgument", resp


def test_metrics_port_bounded(jc_env: JcEnv, agent_proc: AgentProc, make_user: Callable[..., User]) -> None:
    """The metrics port is on 127.0.0.1, which every local user reaches: 200 idle connections of a user
    cost the agent no thread each; once they are gone, scrapes are answered."""
    port = with_metrics(jc_env, agent_proc)
    assert agent_proc.proc is not None
    apid = agent_proc.proc.pid
    user = make_user()
    def scraped() -> bool:
        try:
            return b"jobcage_control_refused_total" in urllib.request.urlopen(
                f"http://127.0.0.1:{port}/metrics", timeout=20).read()
        except OSError:
            return False

    wait_for(scraped, 30, "the metrics server to answer")   # it starts just after the socket
    _rss, idle_threads = proc_status(apid)
    script = jc_env.scratch / "tcp.py"
    script.write_text(
        "import socket, sys, time\n"
        "conns = []\n"
        "for i in range(200):\n"
        "    s = socket.create_connection(('127.0.0.1', int(sys.argv[1]))); conns.append(s)\n"
        "print('held', flush=True)\n"
        "time.sleep(300)\n")
    holder = jc_env.popen([PY, "-I", str(script), str(port)], user=user, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    time.sleep(1.0)   # let the agent accept what it will
    _rss, threads = proc_status(apid)
    assert threads <= idle_threads + 4, (idle_threads, threads)
    holder.kill()
    holder.wait()
    wait_for(scraped, 30, "a scrape to be answered")


@pytest.mark.jc_config({"agent": {"max_connections": 3, "request_timeout": 120.0}})
def test_connection_limit_spares_root(jc_env: JcEnv, agent_proc: AgentProc, make_user: Callable[..., User]) -> None:
    """Users holding max_connections in all: another user is refused with one line, root is still served
    (on both listeners), and the count is in the log once, not per refusal."""
    holder_user, other = make_user(), make_user()
    holder = hold_connections(jc_env, holder_user, 3)
    results = [jc_env.jobcage("list", user=other) for _ in range(5)]
    for r in results:
        r.clean_error(1, "agent busy")
    assert agent_proc.result("list") == []                     # root on the shared listener
    jc_env.jobcage("prologue", "r1", "--uid", "0").ok()         # root's hooks on root's listener
    jc_env.jobcage("epilogue", "r1").ok()
    holder.kill()
    holder.wait()
    wait_for(lambda: jc_env.jobcage("list", user=other).rc == 0, 30, "users to be served again")
    lines = [ln for ln in agent_proc.log(tail=10_000).splitlines() if "(connection_limit)" in ln]
    assert len(lines) == 1, lines
