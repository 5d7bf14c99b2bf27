"""Audit export ([export], agent/export.py) through the real agent, and `whois --logs` (agent/logscan.py).

Real parts: the agent as a subprocess, real cgroups and users, the JSON-lines file sink on a real file
system (a full disk is a small tmpfs this test mounts), `kill -9` of the agent.  The ground truth of "every
record" is the store's own events table, read with sqlite3.  The rsyslog collector tests are in
test_export_syslog.py.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from jctest import (
    JOBCAGE,
    AgentProc,
    JcEnv,
    User,
    exported,
    free_port,
    freeze_directly,
    metric,
    proc,
    read_int,
    read_records,
    require,
    store_ids,
    wait_for,
)

RECORD_KEYS = ["ts", "node", "event_id", "jid", "job_id", "kind", "pid", "ppid", "uid", "euid", "comm",
               "filename", "detail"]


def wait_all_exported(env: JcEnv, paths: list[Path] | Callable[[], list[Path]], node: str,
                      timeout: float = 60.0) -> dict[int, dict]:
    """`paths` may be a callable: rotation makes files while we wait, so the listing is taken each time."""
    def done() -> dict[int, dict] | None:
        want = store_ids(env)
        got = exported(paths() if callable(paths) else paths, node)
        return got if want and set(want) <= set(got) else None

    got = wait_for(done, timeout, f"every store record of {node} in {paths}")
    want = store_ids(env)
    assert {i: got[i]["kind"] for i in want} == want
    return got


def job_run(env: JcEnv, job: str, user: User, scratch: Path) -> int:
    """prologue + a sleeping payload started by `jobcage run`; returns the payload's pid."""
    env.jobcage("prologue", job, "--uid", str(user.uid)).ok()
    pidf = scratch / f"{job}.pid"
    env.start_job(job, f"echo $$ > {pidf}; exec sleep 300", user=user)
    return wait_for(lambda: read_int(pidf), 30, f"{job}'s payload")


def test_file_export_lifecycle_restart_and_direct_path(jc_env: JcEnv, tmp_path: Path, make_user) -> None:
    """Every lifecycle record reaches the JSON-lines file with the contract's keys; records written while the
    agent was killed with -9 (the direct CLI path as root) are sent when it is back; none is missing."""
    out = tmp_path / "export" / "jobcage.jsonl"
    jc_env.write_config({"agent": {"node": "node-file"}, "export": {"file": str(out)}})
    user = make_user()
    agent = AgentProc(jc_env, tmp_path).start()
    try:
        job_run(jc_env, "e1", user, jc_env.scratch)
        jc_env.jobcage("suspend", "e1").ok()
        jc_env.jobcage("resume", "e1").ok()
        jc_env.jobcage("declare", "e1", "--uid", str(user.uid), "--label", "/DC=org/CN=Export Test").ok()
        # a batch system freezing the job with its own hands: show says what the kernel says, and the
        # agent's reconcile (a writer; show is a read and writes nothing) records it when it sees it
        def kernel_seen(kind: str) -> int:
            return sum(1 for k in store_ids(jc_env).values() if k == kind)

        suspends, resumes = kernel_seen("suspend"), kernel_seen("resume")
        freeze_directly(jc_env, "e1", True)
        assert jc_env.jobcage("show", "e1", "--json").json()["state"] == "suspended"
        wait_for(lambda: kernel_seen("suspend") > suspends, 30, "the agent to record the kernel's suspend")
        freeze_directly(jc_env, "e1", False)
        assert jc_env.jobcage("show", "e1", "--json").json()["state"] == "running"
        wait_for(lambda: kernel_seen("resume") > resumes, 30, "the agent to record the kernel's resume")
        jc_env.jobcage("kill", "e1", "--signal", "TERM").ok()
        summary = jc_env.jobcage("epilogue", "e1", "--json").json()
        got = wait_all_exported(jc_env, [out], "node-file")
        recs = sorted(got.values(), key=lambda r: r["event_id"])
        for r in recs:
            assert list(r) == RECORD_KEYS, r
            assert r["node"] == "node-file" and r["job_id"] == "e1" and isinstance(r["jid"], int)
        kinds = [r["kind"] for r in recs]
        assert [k for k in kinds if k in ("prologue", "adopt", "suspend", "resume", "declare", "kill",
                                          "epilogue")] == \
            ["prologue", "adopt", "suspend", "resume", "declare", "suspend", "resume", "kill", "epilogue"], kinds
        seen = [r["detail"].get("seen_in_kernel") for r in recs if r["kind"] in ("suspend", "resume")]
        assert seen == [None, None, True, True], seen
        pro, epi = recs[0], recs[-1]
        assert pro["kind"] == "prologue" and pro["uid"] == user.uid
        assert epi["kind"] == "epilogue" and epi["detail"]["owner_uid"] == user.uid
        assert [i["uid"] for i in epi["detail"]["identities"]] == [i["uid"] for i in summary["identities"]]
        assert epi["detail"]["cpu_seconds"] == summary["cpu_seconds"]
        assert epi["detail"]["declared"][0]["label"] == "/DC=org/CN=Export Test"
        kill = next(r for r in recs if r["kind"] == "kill")
        assert kill["detail"]["signal"] == "SIGTERM"

        # kill -9: the cursor is in the store; the direct path (agent down) writes only the store
        job_run(jc_env, "e2", user, jc_env.scratch)
        assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
        jc_env.jobcage("suspend", "e2").ok()
        jc_env.jobcage("resume", "e2").ok()
        jc_env.jobcage("epilogue", "e2").ok()
        jc_env.jobcage("prologue", "e3", "--uid", str(user.uid)).ok()
        before = exported([out], "node-file")
        assert not any(r["job_id"] == "e3" for r in before.values())
        agent.start()
        got = wait_all_exported(jc_env, [out], "node-file")
        e2 = [r["kind"] for r in sorted(got.values(), key=lambda r: r["event_id"]) if r["job_id"] == "e2"]
        assert e2[:2] == ["prologue", "adopt"] and e2[-3:] == ["suspend", "resume", "epilogue"], e2
        # at least once, and a duplicate is the same record (node + event_id say so)
        lines = read_records(out)
        for r in lines:
            assert r == got[r["event_id"]]
        gap = [r for r in got.values() if r["job_id"] == "e3" and r["kind"] == "gap"]
        assert gap and gap[0]["detail"]["reason"] == "agent not running", gap   # e3 ran while the agent was down

        # prune kills are records too (whoever asks for the prune): a process of the user in no job
        stray = jc_env.popen(["sleep", "300"], user=user)
        wait_for(lambda: (p := proc(stray.pid)) is not None and p.uid == user.uid and p.comm == "sleep", 10,
                 "the stray running as the user")
        jc_env.jobcage("prune", "--kill", "--uid", str(user.uid)).ok()
        jc_env.jobcage("epilogue", "e3").ok()
        got = wait_all_exported(jc_env, [out], "node-file")
        pruned = [r for r in got.values() if r["kind"] == "prune"]
        assert [(r["pid"], r["uid"], r["jid"], r["detail"]["result"]) for r in pruned] == \
            [(stray.pid, user.uid, None, "killed")], pruned
    finally:
        agent.stop()


def test_file_rotation_and_a_full_queue_keep_every_record(jc_env: JcEnv, tmp_path: Path, make_user) -> None:
    """Size-based rotation (PATH -> PATH.1 ..): every record in exactly one of the files, none above the
    limit.  A memory queue of one record overflows at once: the records it dropped come from the store."""
    out = tmp_path / "rot" / "trail.jsonl"
    port = free_port()
    jc_env.write_config({"agent": {"node": "node-rot", "metrics_port": port},
                         "export": {"file": str(out), "file_max_bytes": 4096, "file_keep": 100, "queue_size": 1}})
    user = make_user()
    agent = AgentProc(jc_env, tmp_path).start()
    try:
        jc_env.jobcage("prologue", "r1", "--uid", str(user.uid)).ok()
        for i in range(60):
            agent.result("declare", job_id="r1", uid=user.uid, label=f"CN=rotation {i:03d} " + "x" * 60)
        jc_env.jobcage("epilogue", "r1").ok()
        files = lambda: [out] + sorted(out.parent.glob("trail.jsonl.*"))  # noqa: E731
        wait_all_exported(jc_env, files, "node-rot")
        fs = files()
        assert len(fs) >= 4, fs
        ids = [r["event_id"] for r in read_records(*fs)]
        assert sorted(ids) == sorted(set(ids)), "a record was written twice without a failure"
        # (a line longer than the limit, the epilogue's with its 60 declarations, has a file of its own)
        assert all(f.stat().st_size <= 4096 or f.read_bytes().count(b"\n") == 1 for f in fs), \
            [f.stat().st_size for f in fs]
        sink = f"file:{out}"
        assert metric(port, "jobcage_export_dropped_total", sink) > 0
        assert metric(port, "jobcage_export_resent_total", sink) > 0
        assert metric(port, "jobcage_export_failures_total", sink) == 0
    finally:
        agent.stop()


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 256 KiB tmpfs of the test's own: fill it and the disk is full."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "jct-tmpfs", str(mnt)],
                       capture_output=True, text=True)
    require(r.returncode == 0, f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(d: Path) -> Path:
    f = d / "filler"
    fd = os.open(f, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    return f


def test_full_disk_never_stalls_hooks_and_loses_nothing(jc_env: JcEnv, tmp_path: Path, make_user,
                                                        small_tmpfs: Path) -> None:
    """The export file's disk is full: hooks work as usual, the records wait in the store (pending and lag on
    the metrics endpoint), and once space is back every one of them arrives, whole lines only."""
    out = small_tmpfs / "trail.jsonl"
    port = free_port()
    jc_env.write_config({"agent": {"node": "node-full", "metrics_port": port}, "export": {"file": str(out)}})
    user = make_user()
    agent = AgentProc(jc_env, tmp_path).start()
    sink = f"file:{out}"
    try:
        jc_env.jobcage("prologue", "f0", "--uid", str(user.uid)).ok()
        wait_all_exported(jc_env, [out], "node-full")
        filler = fill(small_tmpfs)
        for i in range(5):
            job = f"f{i + 1}"
            job_run(jc_env, job, user, jc_env.scratch)
            jc_env.jobcage("epilogue", job).ok()
        wait_for(lambda: metric(port, "jobcage_export_pending", sink) > 0, 30, "pending records")
        assert metric(port, "jobcage_export_failures_total", sink) > 0
        time.sleep(1.1)
        assert metric(port, "jobcage_export_lag_seconds", sink) > 1.0
        filler.unlink()
        got = wait_all_exported(jc_env, [out], "node-full")
        assert {r["job_id"] for r in got.values()} == {f"f{i}" for i in range(6)}
        wait_for(lambda: metric(port, "jobcage_export_pending", sink) == 0, 30, "no pending record")
        assert metric(port, "jobcage_export_lag_seconds", sink) == 0
        assert metric(port, "jobcage_export_resent_total", sink) > 0
        assert metric(port, "jobcage_export_sent_total", sink) >= len(got)
        assert metric(port, "jobcage_export_dropped_total", sink) == 0
    finally:
        agent.stop()


def write_log(path: Path, recs: list[dict], gz: bool = False, prefix: str = "") -> None:
    data = "".join(prefix + json.dumps(r, separators=(",", ":")) + "\n" for r in recs).encode()
    path.write_bytes(gzip.compress(data) if gz else data)


def test_whois_logs_rejects_bad_input(jc_env: JcEnv, tmp_path: Path) -> None:
    missing = jc_env.jobcage("whois", "--uid", "1234", "--logs", str(tmp_path / "nope"))
    missing.clean_error(1, "no such file or directory")
    assert jc_env.jobcage("whois", "--logs", str(tmp_path)).rc == 2   # neither --uid nor --label
    bad = tmp_path / "bad.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    jc_env.jobcage("whois", "--uid", "1", "--logs", str(bad)).clean_error(1, "gzip")
    assert os.path.exists(bad)


JOURNALD = "/lib/systemd/systemd-journald"


@pytest.fixture
def journald(tmp_path: Path):
    """A real systemd-journald of the test's own: in a private mount namespace whose /run/systemd/journal
    (its sockets) and /run/log/journal (its files) are directories of this test, so nothing of the node's
    is used (this node has no systemd as PID 1 and no journald of its own)."""
    require(Path(JOURNALD).exists(), "systemd-journald is not installed")
    sock, logs = tmp_path / "journal-sock", tmp_path / "journal-log"
    sock.mkdir()
    logs.mkdir()
    script = (f"set -e; mkdir -p /run/systemd/journal /run/log/journal; mount --bind {sock} /run/systemd/journal; "
              f"mount --bind {logs} /run/log/journal; "
              f"if [ -d /var/log/journal ]; then mount -t tmpfs jct-journal /var/log/journal; fi; "
              f"exec {JOURNALD}")
    p = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "journald.log", "w"),
                         start_new_session=True)
    try:
        wait_for(lambda: (sock / "socket").exists() or p.poll() is not None, 30, "journald's socket")
        require(p.poll() is None, f"journald did not start: {(tmp_path / 'journald.log').read_text()[-500:]}")
        yield sock / "socket", logs
    finally:
        p.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=15)
        if p.poll() is None:
            p.kill()
            p.wait(timeout=15)


def journal_records(logs: Path) -> list[dict]:
    r = subprocess.run(["journalctl", "-D", str(logs), "SYSLOG_IDENTIFIER=jobcage", "-o", "json", "--no-pager"],
                       capture_output=True, text=True, timeout=60)
    return [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]


def test_journal_native_fields(jc_env: JcEnv, tmp_path: Path, make_user, journald: tuple[Path, Path]) -> None:
    """[export] journal: every record in a real journald with the record's keys as JOBCAGE_* fields;
    `journalctl -o cat` output is something whois --logs reads."""
    sock, logs = journald
    jc_env.write_config({"agent": {"node": "node-j"}, "export": {"journal": True, "journal_socket": str(sock)}})
    user = make_user()
    agent = AgentProc(jc_env, tmp_path).start()
    try:
        job_run(jc_env, "j1", user, jc_env.scratch)
        t_in = time.time()
        jc_env.jobcage("epilogue", "j1").ok()

        def all_in() -> list[dict] | None:
            got = journal_records(logs)
            ids = {int(e["JOBCAGE_EVENT_ID"]) for e in got if e.get("JOBCAGE_NODE") == "node-j"}
            return got if set(store_ids(jc_env)) <= ids else None

        got = wait_for(all_in, 60, "every record in the journal")
    finally:
        agent.stop()
    epi = next(e for e in got if e["JOBCAGE_KIND"] == "epilogue")
    assert epi["JOBCAGE_JOB_ID"] == "j1" and epi["JOBCAGE_UID"] == str(user.uid)
    assert json.loads(epi["MESSAGE"])["detail"] == json.loads(epi["JOBCAGE_DETAIL"])
    for e in got:
        rec = json.loads(e["MESSAGE"])
        assert list(rec) == RECORD_KEYS and e["JOBCAGE_NODE"] == rec["node"] == "node-j"
        assert e["JOBCAGE_EVENT_ID"] == str(rec["event_id"]) and e["PRIORITY"] == "6"
    text = subprocess.run(["journalctl", "-D", str(logs), "SYSLOG_IDENTIFIER=jobcage", "-o", "cat", "--no-pager"],
                          capture_output=True, text=True, timeout=60).stdout
    dump = tmp_path / "journal.txt"
    dump.write_text(text)
    rows = jc_env.jobcage("whois", "--uid", str(user.uid), "--at", f"{t_in:.6f}", "--logs", str(dump),
                          "--json").json()
    assert [(r["node"], r["job_id"], r["pilot_uid"]) for r in rows] == [("node-j", "j1", user.uid)], rows
    piped = jc_env.run([JOBCAGE, "whois", "--uid", str(user.uid), "--at", f"{t_in:.6f}", "--logs", "-", "--json"],
                       input=text).json()
    assert piped == rows


@pytest.mark.parametrize("bad, says", [({"syslog": "http://relay:514"}, "syslog"),
                                       ({"syslog": "tcp://relay"}, "syslog"),
                                       ({"syslog": "unix:/dev/log", "syslog_facility": "mail2"}, "facility"),
                                       ({"file": "/tmp/x.jsonl", "file_max_bytes": 10}, "file_max_bytes")])
def test_bad_export_config_stops_the_agent_with_one_line(jc_env: JcEnv, bad: dict, says: str) -> None:
    jc_env.write_config({"export": bad})
    jc_env.jobcage("agent", "--config", str(jc_env.config_path), timeout=60).clean_error(1, says)
    assert not Path(jc_env.socket_path).exists()
