"""The agent's Prometheus endpoint reports live job numbers read from the kernel."""

from __future__ import annotations

import urllib.request

from jctest import AgentProc, JcEnv, free_port


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("jobcage_"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_metrics_follow_the_job(jc_env: JcEnv, agent_proc: AgentProc) -> None:
    # the port is picked now, not when the module is collected: by the time a long suite gets here, a port
    # free at collection may long be someone's client port
    port = free_port()
    jc_env.write_config({"agent": {"metrics_port": port}})
    agent_proc.restart()
    jc_env.jobcage("prologue", "m1", "--uid", "0", "--pids-max", "77").ok()
    before = _scrape(port)
    labels = '{job_id="m1",owner="0"}'
    assert before["jobcage_jobs"] == 1
    assert before[f"jobcage_job_pids_max{labels}"] == 77
    assert before[f"jobcage_job_processes{labels}"] == 0
    jc_env.jobcage("suspend", "m1").ok()
    assert _scrape(port)[f"jobcage_job_suspended{labels}"] == 1
    jc_env.jobcage("epilogue", "m1").ok()
    assert _scrape(port)["jobcage_jobs"] == 0
