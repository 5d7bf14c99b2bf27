"""Issue 9, defects 5 and 7: a Slurm site set up as docs/batch-systems.md says.

Per-job pids limit: `sbatch --comment=jobcage:pids=N` asks for N, the Prolog passes it on, jobcage grants at
most `[jobs] max_pids_max`; no request: `[jobs] default_pids_max`.

The default epilogue must not delete what the user is meant to keep.

A real single-node Slurm set up the way docs/batch-systems.md says (the fragment, Prolog + TaskProlog + Epilog +
task/jobcage, the agent running with the BPF tracer), jobcage's cleanup on with its default directories
(/tmp, /var/tmp, /dev/shm), and a job submitted from a directory under /tmp.  After the Epilog:

- the job's output file (Slurm's stdout/stderr, owned by the job user) and the files the job owner wrote are there;
- what the pool identity created *during* the job is gone; what it had before the job is not;
- with `[cleanup] owner_files = true` (the site opts in) the owner's new files go too, except the batch system's
  stdout/stderr files of the job, which the Epilog names (`--keep`, from `scontrol show job`: 22.05 does not put
  them into the Epilog's environment).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from jctest import JcEnv, User, wait_for
from slurmcluster import SlurmCluster, epilog_done, fragment

PIDS_MAX = 64  # the jobs' default pids limit (the Prolog takes it from jobcage's config)

DEFAULT_DIRS = ["/tmp", "/var/tmp", "/dev/shm"]
BASE = {"tracer": {"backend": "bpf"}, "jobs": {"default_pids_max": PIDS_MAX},
        "cleanup": {"enabled": True, "dirs": DEFAULT_DIRS}}

pytestmark = [pytest.mark.root, pytest.mark.slurm, pytest.mark.bpf]


def _run_job(slurm: SlurmCluster, jc_env: JcEnv, users: tuple[User, User], w: Path) -> tuple[int, dict]:
    pilot, pool = users
    old = w / "pool-old"          # the pool account's file from before the job
    r = jc_env.run(["/bin/sh", "-c", f"echo old > {old}"], user=pool)
    assert r.rc == 0, r.err
    time.sleep(0.05)              # ctime granularity: before the prologue, strictly
    script = f"""#!/bin/sh
echo result > {w}/result.txt
sudo -n -u {pool.name} /bin/sh -c 'echo new > {w}/pool-new; mkdir {w}/pool-dir; echo x > {w}/pool-dir/f'
echo job output line
"""
    job = slurm.sbatch(script, pilot.name)
    epilog_done(slurm, jc_env, job)
    summary = json.loads(jc_env.jobcage("epilogue", str(job), "--json").ok().out)  # idempotent: the first summary
    return job, summary


@pytest.mark.jc_config(BASE)
def test_epilog_keeps_the_jobs_output_and_the_owners_files(
        slurm: SlurmCluster, jc_env: JcEnv, users: tuple[User, User], workdir: Path) -> None:
    pilot, pool = users
    w = workdir
    job, summary = _run_job(slurm, jc_env, users, w)
    out = slurm.jobs_dir / f"slurm-{job}.out"
    c = summary["cleanup"]
    print(f"\ncleanup of job {job}: {json.dumps(c)[:600]}")
    assert out.exists() and "job output line" in out.read_text(), "the Epilog deleted the job's output"
    assert (w / "result.txt").read_text() == "result\n", "the owner's file is gone"
    assert (w / "pool-old").exists(), "the pool uid's file from before the job is gone"
    assert not (w / "pool-new").exists() and not (w / "pool-dir").exists(), "the job's pool files stay"
    assert pool.uid in c["uids_cleaned"] and pilot.uid in c["uids_kept"], c
    removed = c["files"]["removed"]
    assert str(w / "pool-new") in removed and str(w / "pool-dir") in removed, removed
    assert c["files"]["skipped_counts"].get("before-job", 0) >= 1, c["files"]["skipped_counts"]
    assert c["since"] and c["kept_paths"], c   # the Epilog named the job's stdout/stderr


@pytest.mark.jc_config({**BASE, "cleanup": {**BASE["cleanup"], "owner_files": True}})
def test_owner_files_opt_in_still_keeps_the_batch_output(
        slurm: SlurmCluster, jc_env: JcEnv, users: tuple[User, User], workdir: Path) -> None:
    pilot, pool = users
    w = workdir
    job, summary = _run_job(slurm, jc_env, users, w)
    out = slurm.jobs_dir / f"slurm-{job}.out"
    c = summary["cleanup"]
    assert str(out) in c["kept_paths"], c
    assert out.exists() and "job output line" in out.read_text(), "the batch system's output file went"
    assert not (w / "result.txt").exists(), "owner_files = true: the owner's new file goes"
    assert (w / "pool-old").exists() and not (w / "pool-new").exists()
    assert pilot.uid in c["uids_cleaned"], c


@pytest.mark.jc_config({**BASE, "jobs": {"default_pids_max": PIDS_MAX, "max_pids_max": 100}})
def test_per_job_pids_limit_from_the_comment(
        slurm: SlurmCluster, jc_env: JcEnv, users: tuple[User, User], workdir: Path) -> None:
    """--comment=jobcage:pids=40 -> 40; =5000 -> capped at max_pids_max 100; none -> the default; the kernel's
    pids.max says so while the job runs."""
    pilot, _pool = users
    got = {}
    for comment, want in (("jobcage:pids=40", 40), ("site note, jobcage:pids=5000", 100), (None, PIDS_MAX)):
        args = [f"--comment={comment}"] if comment else []
        job = slurm.sbatch("#!/bin/sh\nsleep 300\n", pilot.name, *args)
        slurm.wait_state(job, "RUNNING")   # with PrologFlags=Alloc: RUNNING while the Prolog may still run
        wait_for(lambda j=job: jc_env.jobcage("show", str(j), "--json").rc == 0, 60, f"the Prolog to register {job}")
        s = jc_env.jobcage("show", str(job), "--json").json()
        dirs = jc_env.cgroup_dirs(str(job))
        kernel = int(((dirs.get("pids") or dirs["unified"]) / "pids.max").read_text())
        got[comment] = (s["pids_max"], kernel)
        assert s["pids_max"] == kernel == want, (comment, s["pids_max"], kernel)
        slurm.scancel(job)
        epilog_done(slurm, jc_env, job)
    print(f"\nrequested -> granted (store, kernel): {got}")


def test_docs_slurm_conf_block_is_the_fragment() -> None:
    """Following the docs literally gives the fragment the suite runs Slurm with: every setting, KillWait too."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "batch-systems.md").read_text()
    block = doc.split("### Wiring", 1)[1].split("```", 2)[1]
    conf = {}
    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        if "=" in line:
            k, v = line.split("=", 1)
            conf[k.strip()] = v.strip()
    assert conf == fragment(), (conf, fragment())
