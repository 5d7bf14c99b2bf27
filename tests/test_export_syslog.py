"""Export to a real rsyslog collector, two agents as two nodes, and `whois --logs` over what it collected.

The collector is Debian's rsyslogd, started by the test on 127.0.0.1 (free port) with a private config and
work dir (never the system's config), writing one file per host (%HOSTNAME%, which the RFC 5424 header
carries: the agent's [agent] node).  Two agents on this machine are two nodes: own node name, cgroup
subtree, state dir, socket.  The tracer is the default one (auto).
"""

from __future__ import annotations

import contextlib
import gzip
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jctest import (
    JOBCAGE,
    AgentProc,
    JcEnv,
    User,
    exported,
    free_port,
    metric,
    read_int,
    read_records,
    require,
    store_ids,
    wait_for,
)

RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"

CONF = """\
global(workDirectory="{work}" maxMessageSize="64k")
module(load="imtcp")
module(load="imudp")
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="{unix}")
input(type="imtcp" address="127.0.0.1" port="{port}")
input(type="imudp" address="127.0.0.1" port="{port}")
template(name="perhost" type="string" string="{out}/%HOSTNAME%.log")
template(name="line" type="string"
         string="%TIMESTAMP:::date-rfc3339% %HOSTNAME% %syslogtag%%msg:::sp-if-no-1st-sp%%msg:::drop-last-lf%\\n")
*.* action(type="omfile" dynaFile="perhost" template="line" dirCreateMode="0755" fileCreateMode="0644")
"""


def free_tcp_udp_port() -> int:
    """A port free for both TCP and UDP (rsyslog listens on both) on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as t, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            t.bind(("127.0.0.1", 0))
            port = int(t.getsockname()[1])
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port")


class Rsyslog:
    """A private rsyslogd: `-n` (foreground, our child), its own config, work dir and output dir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.work, self.out = root / "work", root / "collected"
        self.work.mkdir(parents=True)
        self.out.mkdir(mode=0o755)
        self.out.chmod(0o755)
        self.port = free_tcp_udp_port()
        self.conf = root / "rsyslog.conf"
        self.unix = root / "log.sock"   # a private "/dev/log"
        self.conf.write_text(CONF.format(work=self.work, port=self.port, out=self.out, unix=self.unix))
        self.proc: subprocess.Popen | None = None
        self.log = root / "rsyslogd.log"

    def start(self) -> Rsyslog:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.work / "pid")],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=str(self.root),
                                         start_new_session=True)

        def listening() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(listening, 30, "rsyslogd listening")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.proc = None

    def file(self, node: str) -> Path:
        return self.out / f"{node}.log"


@pytest.fixture
def rsyslog(tmp_path: Path) -> Iterator[Rsyslog]:
    require(Path(RSYSLOGD).exists(), "rsyslogd is not installed (Debian package rsyslog)")
    root = Path(tempfile.mkdtemp(prefix="jct-rs-", dir="/tmp"))
    root.chmod(0o755)   # the collected files are read by an unprivileged analyst
    r = Rsyslog(root)
    r.start()
    try:
        yield r
    finally:
        r.stop()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def second_node(tmp_path: Path, overrides: dict) -> Iterator[JcEnv]:
    env = JcEnv(tmp_path / "state-b", "auto", overrides)
    try:
        yield env
    finally:
        problems = env.cleanup()
        assert not problems, problems


def node_config(node: str, syslog: str, metrics_port: int = 0) -> dict:
    return {"agent": {"node": node, "metrics_port": metrics_port}, "tracer": {"backend": "auto"},
            "export": {"syslog": syslog}}


def wait_collected(env: JcEnv, rs: Rsyslog, node: str, timeout: float = 90.0) -> dict[int, dict]:
    path = [rs.file(node)]

    def done() -> dict[int, dict] | None:
        want, got = store_ids(env), exported(path, node)
        return got if want and set(want) <= set(got) else None

    got = wait_for(done, timeout, f"every record of {node} in the collector's {path[0].name}")
    for r in read_records(*path):   # at least once; a duplicate is the same record
        assert r == got[r["event_id"]], r
    return got


def pool_job(env: JcEnv, job: str, pilot: User, pool: User) -> float:
    """A pilot's job whose payload runs as the pool uid (root's job starter drops to it with setpriv, as a
    setuid helper would); returns a time at which the pool uid runs in the job."""
    env.jobcage("prologue", job, "--uid", str(pilot.uid)).ok()
    pidf = env.scratch / f"{job}.pid"
    env.start_job(job, f"echo $$ > {pidf}; exec sleep 300", user=pool)
    pid = wait_for(lambda: read_int(pidf), 30, f"{job}'s payload")
    assert env.in_job(pid, job)
    time.sleep(0.2)
    return time.time()


def whois_logs(env: JcEnv, user: User, *args: str) -> list[dict]:
    r = env.run([JOBCAGE, "whois", *args, "--json"], user=user)
    return r.json()


def test_two_nodes_same_pool_uid_whois_logs(jc_env: JcEnv, tmp_path: Path, make_user, rsyslog: Rsyslog) -> None:
    pilot_a, pilot_b, pool, analyst = make_user(), make_user(), make_user(), make_user()
    jc_env.write_config(node_config("wn-a", f"tcp://127.0.0.1:{rsyslog.port}"))
    with second_node(tmp_path, node_config("wn-b", f"udp://127.0.0.1:{rsyslog.port}")) as env_b:
        a = AgentProc(jc_env, tmp_path).start()
        (tmp_path / "b").mkdir()
        b = AgentProc(env_b, tmp_path / "b").start()
        try:
            t_a = pool_job(jc_env, "job-7", pilot_a, pool)
            jc_env.jobcage("epilogue", "job-7").ok()
            t_between = time.time() + 0.3
            time.sleep(0.6)
            t_b = pool_job(env_b, "job-7", pilot_b, pool)   # same batch id, other node: the node tells them apart
            env_b.jobcage("declare", "job-7", "--uid", str(pool.uid), "--label", "/DC=ch/CN=Payload B").ok()
            env_b.jobcage("epilogue", "job-7").ok()
            got_a = wait_collected(jc_env, rsyslog, "wn-a")
            got_b = wait_collected(env_b, rsyslog, "wn-b")
        finally:
            a.stop()
            b.stop()
        assert {r["node"] for r in got_a.values()} == {"wn-a"} and {r["node"] for r in got_b.values()} == {"wn-b"}
        assert any(r["kind"] == "exec" and r["uid"] == pool.uid for r in got_a.values()), "payload exec traced"

        # whois over the collector's files, as a user with no privilege and no agent to ask
        rows = whois_logs(jc_env, analyst, "--uid", str(pool.uid), "--at", f"{t_a:.6f}", "--logs", str(rsyslog.out))
        assert [(r["node"], r["job_id"], r["pilot_uid"], r["state"]) for r in rows] == \
            [("wn-a", "job-7", pilot_a.uid, "ended")], rows
        assert rows[0]["via"] and "setpriv" in rows[0]["via"], rows
        rows = whois_logs(jc_env, analyst, "--uid", str(pool.uid), "--at", f"{t_b:.6f}", "--logs", str(rsyslog.out))
        assert [(r["node"], r["job_id"], r["pilot_uid"], r["declared"]) for r in rows] == \
            [("wn-b", "job-7", pilot_b.uid, ["/DC=ch/CN=Payload B"])], rows
        none = jc_env.run([JOBCAGE, "whois", "--uid", str(pool.uid), "--at", f"{t_between:.6f}", "--logs",
                           str(rsyslog.out)], user=analyst)
        none.clean_error(1, "no job held")
        # the reverse question, and rotated gzip files next to plain ones
        arch = rsyslog.root / "archive"
        arch.mkdir()
        (arch / "wn-a.log.1.gz").write_bytes(gzip.compress(rsyslog.file("wn-a").read_bytes()))
        shutil.copy(rsyslog.file("wn-b"), arch / "wn-b.log")
        arch.chmod(0o755)
        for f in arch.iterdir():
            f.chmod(0o644)
        rows = whois_logs(jc_env, analyst, "--label", "/DC=ch/CN=Payload B", "--logs", str(arch))
        assert [(r["node"], r["job_id"], r["uid"], r["pilot_uid"]) for r in rows] == \
            [("wn-b", "job-7", pool.uid, pilot_b.uid)], rows
        rows = whois_logs(jc_env, analyst, "--uid", str(pool.uid), "--at", f"{t_a:.6f}", "--logs",
                          str(arch / "wn-a.log.1.gz"), str(arch / "wn-b.log"))
        assert [(r["node"], r["job_id"]) for r in rows] == [("wn-a", "job-7")], rows


def test_collector_outage_then_agent_kill9_none_missing(jc_env: JcEnv, tmp_path: Path, make_user,
                                                         rsyslog: Rsyslog) -> None:
    """The collector stops while jobs run and starts again: every record arrives.  Then the agent is killed
    with -9, the batch system goes on through the direct path, the agent starts again: none missing."""
    pilot, pool = make_user(), make_user()
    mport = free_port()
    jc_env.write_config(node_config("wn-c", f"tcp://127.0.0.1:{rsyslog.port}", mport))
    sink = f"syslog:tcp://127.0.0.1:{rsyslog.port}"
    agent = AgentProc(jc_env, tmp_path).start()
    try:
        busy = jc_env.scratch / "busy.pid"
        jc_env.jobcage("prologue", "busy", "--uid", str(pilot.uid)).ok()
        jc_env.start_job("busy", f"echo $$ > {busy}; while :; do /bin/true; sleep 0.2; done", user=pool)
        wait_for(lambda: read_int(busy), 30, "the busy job")
        wait_collected(jc_env, rsyslog, "wn-c")

        rsyslog.stop()
        pool_job(jc_env, "during-outage", pilot, pool)
        jc_env.jobcage("suspend", "busy").ok()
        jc_env.jobcage("resume", "busy").ok()
        jc_env.jobcage("epilogue", "during-outage").ok()
        wait_for(lambda: metric(mport, "jobcage_export_failures_total", sink) > 0, 30, "the agent to notice")
        assert metric(mport, "jobcage_export_pending", sink) > 0
        rsyslog.start()
        got = wait_collected(jc_env, rsyslog, "wn-c")
        assert {"during-outage", "busy"} <= {r["job_id"] for r in got.values()}
        # counted once the relay acknowledged, which may be just after rsyslog wrote the file
        wait_for(lambda: metric(mport, "jobcage_export_resent_total", sink) > 0, 30, "re-sent records counted")

        assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
        jc_env.jobcage("suspend", "busy").ok()      # the direct path, as root: the store only
        jc_env.jobcage("resume", "busy").ok()
        jc_env.jobcage("epilogue", "busy").ok()
        agent.start()
        got = wait_collected(jc_env, rsyslog, "wn-c")
        kinds = [r["kind"] for r in sorted(got.values(), key=lambda r: r["event_id"]) if r["job_id"] == "busy"]
        assert kinds[-3:] == ["suspend", "resume", "epilogue"], kinds
    finally:
        agent.stop()


def test_local_syslog_socket(jc_env: JcEnv, tmp_path: Path, make_user, rsyslog: Rsyslog) -> None:
    """[export] syslog = unix:PATH (what /dev/log is on a node): rsyslog's imuxsock takes syslog(3)'s format;
    the file is the local host's (imuxsock names the messages after it), the records name the node."""
    user = make_user()
    jc_env.write_config({"agent": {"node": "wn-local"}, "export": {"syslog": f"unix:{rsyslog.unix}"}})
    agent = AgentProc(jc_env, tmp_path).start()
    try:
        jc_env.jobcage("prologue", "l1", "--uid", str(user.uid)).ok()
        jc_env.jobcage("epilogue", "l1").ok()
        host = socket.gethostname()

        def done() -> dict[int, dict] | None:
            got = exported(list(rsyslog.out.glob("*.log")), "wn-local")
            return got if set(store_ids(jc_env)) <= set(got) else None

        got = wait_for(done, 60, "every record through the local socket")
    finally:
        agent.stop()
    assert [r["kind"] for r in sorted(got.values(), key=lambda r: r["event_id"])] == ["prologue", "epilogue"]
    lines = [ln for f in rsyslog.out.glob("*.log") for ln in f.read_text().splitlines() if "wn-local" in ln]
    assert lines and all(" jobcage[" in ln for ln in lines), lines
    assert any(f.name.startswith(host.split(".")[0]) for f in rsyslog.out.glob("*.log")), list(rsyslog.out.iterdir())
