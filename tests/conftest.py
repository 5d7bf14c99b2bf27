"""Shared fixtures: real kernel, real cgroups, real users; nothing mocked, everything cleaned up.

Fixtures (helpers and their classes live in tests/jctest.py):

- ``require(cond, why)``       skip when a prerequisite is missing, FAIL instead when CI=true.
- ``cgroup_mode``              parametrized "hybrid" / "v1": request it (next to ``jc_env``) to run a test with
                               both drivers this node can run; jc_env picks it up.
- ``jc_env`` -> JcEnv           a private jobcage: unique subtree ``jobcage-t<hex>``, state dir in tmp_path,
                               socket/config/scratch in a short 0755 dir, tracer "off", [cleanup] off,
                               JOBCAGE_CONFIG in ``.env``.  Mode/overrides: ``cgroup_mode``, or indirect
                               parametrization (a mode string or {section: {key: value}}), or the marker
                               ``@pytest.mark.jc_config({...})``.  Teardown kills every process in the subtree's
                               cgroups (through the cgroups) and removes them in every hierarchy.
- ``make_user(prefix="jct")`` -> User   real users (useradd, uid >= 1000, home); teardown kills their
                               processes (by uid) and runs userdel -r.  ``User.argv(cmd)`` / ``User.env()`` run
                               a command as the user (setpriv); ``jc_env.run/jobcage/popen(..., user=u)`` too.
- ``sudoers(line)``            a validated /etc/sudoers.d drop-in for the test, removed at teardown.
- ``agent_proc`` -> AgentProc   `jobcage agent --config ...` running, answering ping; ``.stop() .start()
                               .restart() .call(method, **params) .result(...) .log()``; stopped at teardown.
- ``pool_users`` / ``user_procs``  two home-less users ``jccl<hex>`` per module (user_procs: their processes
                               killed after each test); ``private_tree``: a /tmp/jctest-* dir (mode 1777),
                               mounts inside unmounted after; ``job_cgroup``: a raw cgroup2 dir standing in
                               for a job, emptied (through the cgroup) and removed after.
- ``make_cgroup(pids_max=None)`` -> TestCgroup, ``trace_users``, ``helpers`` (sutest setuid root, forkbomb,
                               daemonize/burn/idloop), ``make_tracer(backend)`` -> (Tracer, Collector): the
                               tracer scenarios' real kernel objects, all removed at teardown.

- Slurm: ``plugin_so`` (task_jobcage.so built once per module), ``users`` (pilot, pool; the pilot may sudo to
  the pool), ``slurm`` / ``bare_slurm`` (the site set-up with / without TaskProlog and agent), ``workdir`` (a
  1777 dir in that cluster's job dir).  ``sshd``: a private sshd whose PAM stack uses jc_env's jobcage.
  ``ids`` (pilot, pool, other per module), ``execloop`` (a fork+exec loop in C), ``batch`` (a fake batch
  system's cgroup tree).

Helpers live in tests/jctest.py (slurmcluster.py and sshdfixtures.py hold their peers' set-up), fixtures here,
each once: no test module imports another (tests/test_architecture.py::test_one_test_library).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jctest import (
    SETPRIV,
    SUDO,
    TRACE_CGROUP_PREFIX,
    AgentProc,
    Collector,
    FakeBatch,
    Helpers,
    Ids,
    JcEnv,
    TestCgroup,
    TraceUsers,
    User,
    build_execloop,
    build_helpers,
    cgroup2_root,
    create_user,
    delete_user,
    kill_uid,
    mode_unavailable,
    remove_cgroups,
    require,
    unmount_all_under,
)
from slurmcluster import PLUGIN_BUILD, SlurmCluster, require_slurm, site_cluster
from sshdfixtures import Sshd, make_sshd, remove_sshd


def _node_modes() -> tuple[str, ...]:
    """The drivers this node can run: a hybrid node (our Debian 12 VMs) both hybrid and v1,
    a pure v2 node (the EL9 box) v2 only, a v1 node v1."""
    from jobcage.cgroups.detect import detect

    return {"hybrid": ("hybrid", "v1"), "v2": ("v2",), "v1": ("v1",)}.get(detect().mode, ("hybrid", "v1"))


MODES = _node_modes()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "jc_config(overrides): {section: {key: value}} merged into jc_env's config")


# Tests marked v2guest install system units and need systemd as PID 1 on pure v2: they run in the guest
# (vagrant/v2guest sets JOBCAGE_V2_GUEST=1), and are deselected -- not skipped -- everywhere else.
V2_GUEST = os.environ.get("JOBCAGE_V2_GUEST") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if V2_GUEST:
        return
    guest = [it for it in items if it.get_closest_marker("v2guest") is not None]
    if guest:
        config.hook.pytest_deselected(items=guest)
        items[:] = [it for it in items if it.get_closest_marker("v2guest") is None]


@pytest.fixture(scope="session", autouse=True)
def _root() -> None:
    """The suite drives real cgroups, users and sockets: root only."""
    require(os.geteuid() == 0, "the jobcage test suite must run as root (real cgroups, users, BPF)")


@pytest.fixture(params=MODES)
def cgroup_mode(request: pytest.FixtureRequest) -> str:
    mode = str(request.param)
    why = mode_unavailable(mode)
    require(why is None, f"cgroup mode {mode}: {why}")
    return mode


@pytest.fixture
def jc_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JcEnv]:
    mode = "auto"
    overrides: dict = {}
    param = getattr(request, "param", None)
    if isinstance(param, str):
        mode = param
    elif isinstance(param, dict):
        overrides = param
    if "cgroup_mode" in request.fixturenames:
        mode = request.getfixturevalue("cgroup_mode")
    marker = request.node.get_closest_marker("jc_config")
    if marker is not None and marker.args:
        overrides = {**overrides, **marker.args[0]}
    mode = overrides.get("cgroups", {}).get("mode", mode)
    why = mode_unavailable(mode)
    require(why is None, f"cgroup mode {mode}: {why}")
    state = tmp_path / "state"
    env = JcEnv(state, mode, overrides)
    try:
        yield env
    finally:
        problems = env.cleanup()
        # loud: a process surviving in a job cgroup is a containment bug, not a cleanup nuisance
        assert not problems, f"jc_env teardown: {'; '.join(problems)}"


@pytest.fixture
def make_user() -> Iterator[Callable[..., User]]:
    made: list[User] = []

    def make(prefix: str = "jct") -> User:
        user = create_user(prefix)
        made.append(user)
        return user

    yield make
    problems = [p for u in reversed(made) for p in delete_user(u)]
    if problems:
        warnings.warn(f"make_user teardown: {'; '.join(problems)}", stacklevel=1)


@pytest.fixture
def sudoers() -> Iterator[Callable[[str], Path]]:
    """sudoers("alice ALL=(bob) NOPASSWD: ALL"): a drop-in checked by visudo, removed at teardown."""
    files: list[Path] = []

    def add(*lines: str) -> Path:
        require(Path("/usr/bin/sudo").exists() and Path("/etc/sudoers.d").is_dir(), "sudo is not installed")
        path = Path("/etc/sudoers.d") / f"jct_{secrets.token_hex(4)}"  # no '.' or '~': sudo would skip it
        tmp = path.with_name(path.name + "_new")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.chmod(0o440)
        check = subprocess.run(["visudo", "-cf", str(tmp)], capture_output=True, text=True)
        if check.returncode != 0:
            tmp.unlink()
            raise AssertionError(f"bad sudoers lines {lines}: {check.stdout}{check.stderr}")
        tmp.rename(path)
        files.append(path)
        return path

    yield add
    for f in files:
        with contextlib.suppress(FileNotFoundError):
            f.unlink()


@pytest.fixture
def agent_proc(jc_env: JcEnv, tmp_path: Path) -> Iterator[AgentProc]:
    agent = AgentProc(jc_env, tmp_path)
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()


# --- real users, trees and cgroups for the cleanup / tmpdir / prune tests --------------------------------------

@pytest.fixture(scope="module")
def pool_users() -> Iterator[tuple[User, User]]:
    """Two fresh users (uids >= 1000, no home: ``jccl<hex>``) for the whole module."""
    made: list[User] = []
    try:
        made.append(create_user("jccl", make_home=False))
        made.append(create_user("jccl", make_home=False))
        yield made[0], made[1]
    finally:
        problems = [p for u in made for p in delete_user(u)]
        assert not problems, f"pool_users teardown: {'; '.join(problems)}"


@pytest.fixture
def user_procs(pool_users: tuple[User, User]) -> Iterator[tuple[User, User]]:
    """The pool users, with every process of theirs killed after each test."""
    yield pool_users
    left = [p for u in pool_users for p in kill_uid(u.uid)]
    assert not left, f"processes of the pool users survive SIGKILL: {left}"


@pytest.fixture
def private_tree() -> Iterator[str]:
    """A fresh ``/tmp/jctest-*`` directory, root-owned and mode 1777 like /tmp; mounts inside unmounted after."""
    for tool in ("setsid", "mount", "umount"):
        require(shutil.which(tool) is not None, f"needs {tool}")
    path = tempfile.mkdtemp(prefix="jctest-", dir="/tmp")
    os.chmod(path, 0o1777)
    try:
        yield path
    finally:
        unmount_all_under(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def job_cgroup() -> Iterator[str]:
    """A real cgroup2 directory ``<cgroup2>/jobcage-prtest-<hex>`` standing in for a job; emptied and removed after."""
    path = cgroup2_root() / f"jobcage-prtest-{secrets.token_hex(4)}"
    try:
        path.mkdir()
    except OSError as e:
        require(False, f"cannot create a cgroup under {path.parent}: {e}")
    try:
        yield str(path)
    finally:
        problems = remove_cgroups([path])
        assert not problems, f"job_cgroup teardown: {'; '.join(problems)}"


# --- tracer scenarios: raw cgroup2 directories, users, helper programs, tracers --------------------------------

@pytest.fixture
def make_cgroup() -> Iterator[Callable[..., TestCgroup]]:
    """make(pids_max=None) -> a raw cgroup2 directory ``jobcage-trtest-<hex>`` (plus a v1 pids twin holding
    pids.max when the node has one); emptied and removed at teardown."""
    made: list[TestCgroup] = []

    def make(pids_max: int | None = None) -> TestCgroup:
        name = TRACE_CGROUP_PREFIX + secrets.token_hex(4)
        path = cgroup2_root() / name
        pids_path = None
        v1 = Path("/sys/fs/cgroup/pids")
        if pids_max is not None and (v1 / "cgroup.procs").exists():   # v1 / hybrid: a v1 pids twin
            pids_path = v1 / name
            pids_path.mkdir()
            (pids_path / "pids.max").write_text(str(pids_max))   # the limit is in place BEFORE any task
        path.mkdir()
        if pids_max is not None and pids_path is None:   # pure v2: the limit in the cgroup itself
            ctrl = (path.parent / "cgroup.subtree_control").read_text().split()
            require("pids" in ctrl, f"neither a v1 pids hierarchy nor +pids in {path.parent}/cgroup.subtree_control")
            (path / "pids.max").write_text(str(pids_max))
        cg = TestCgroup(path, pids_path)
        made.append(cg)
        return cg

    yield make
    for cg in made:
        cg.destroy()


@pytest.fixture(scope="session")
def trace_users() -> Iterator[TraceUsers]:
    pilot, pool = create_user("jctr"), create_user("jctr")
    try:
        yield TraceUsers(pilot, pool)
    finally:
        for u in (pool, pilot):
            delete_user(u)


@pytest.fixture(scope="session")
def helpers() -> Iterator[Helpers]:
    """The setuid-root sutest, a fork bomb, daemonize/burn/idloop scripts, built once per session."""
    d = Path(tempfile.mkdtemp(prefix="jobcage-trtest-"))
    try:
        yield build_helpers(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def make_tracer() -> Iterator[Callable[..., tuple[Any, Collector]]]:
    """make(backend="bpf", **kw) -> (jobcage.agent.tracer.Tracer, Collector of its events); closed at teardown."""
    from jobcage.agent.tracer import Tracer

    made: list[Any] = []

    def make(backend: str = "bpf", **kw: object) -> tuple[Any, Collector]:
        if backend == "bpf":
            try:
                import bcc  # noqa: F401
            except ImportError:
                require(False, "bcc is not importable")
        col = Collector()
        t = Tracer(col, backend=backend, **kw)  # type: ignore[arg-type]
        made.append(t)
        return t, col

    yield make
    for t in made:
        t.close()


# -- Slurm (the helpers: tests/slurmcluster.py) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def plugin_so() -> Iterator[Path]:
    """task_jobcage.so built from this checkout by the same script `make bootstrap` runs."""
    require_slurm()
    out = Path(tempfile.mkdtemp(prefix="jcplugin-"))
    try:
        r = subprocess.run(["bash", str(PLUGIN_BUILD), "--out", str(out)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"plugin build failed:\n{r.stdout}{r.stderr}"
        yield out / "task_jobcage.so"
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture
def users(make_user: Callable[..., User], sudoers: Callable[..., Path]) -> tuple[User, User]:
    """(pilot, pool) of a Slurm test: the pilot submits the job and may sudo to the pool account, like a
    pilot factory."""
    require_slurm()
    pilot, pool = make_user("jcp"), make_user("jcq")
    sudoers(f"{pilot.name} ALL=({pool.name}) NOPASSWD: ALL")
    return pilot, pool


@pytest.fixture
def slurm(jc_env: JcEnv, agent_proc: AgentProc, users: tuple[User, User], plugin_so: Path) -> Iterator[SlurmCluster]:
    """The full site setup: Prolog + TaskProlog + Epilog + task/jobcage, agent running."""
    with site_cluster(jc_env, plugin_so) as cluster:
        yield cluster


@pytest.fixture
def bare_slurm(jc_env: JcEnv, users: tuple[User, User], plugin_so: Path) -> Iterator[SlurmCluster]:
    """Prolog + Epilog + task/jobcage only: no TaskProlog, no agent (jobcage works directly as root)."""
    with site_cluster(jc_env, plugin_so, task_prolog=False) as cluster:
        yield cluster


@pytest.fixture
def workdir(request: pytest.FixtureRequest) -> Path:
    """A dir both Slurm test users write pid files and counters to (the cluster's job dir is 1777), in the
    cluster the test uses (``slurm`` or ``bare_slurm``)."""
    cluster: SlurmCluster = request.getfixturevalue("slurm") if "slurm" in request.fixturenames \
        else request.getfixturevalue("bare_slurm")
    path = cluster.jobs_dir / "w"
    path.mkdir()
    path.chmod(0o777)
    return path


# -- sshd (the helpers: tests/sshdfixtures.py) ----------------------------------------------------------------

@pytest.fixture
def sshd(request: pytest.FixtureRequest, jc_env: JcEnv) -> Iterator[Sshd]:
    """A private sshd whose PAM stack points at jc_env's jobcage; ``@pytest.mark.pam({...})`` sets [pam] keys,
    ``@pytest.mark.sshd_options({...})`` sshd_config keywords (``{config}`` and ``{jobcage}`` are filled in)."""
    marker = request.node.get_closest_marker("pam")
    opts = request.node.get_closest_marker("sshd_options")
    server = None
    try:
        server = make_sshd(jc_env, sshd_options=opts.args[0] if opts else None,
                           pam_overrides=marker.args[0] if marker else None)
        yield server
    finally:
        if server is not None:
            remove_sshd(server)


# -- identity tests (test_identity, test_userns, test_trail_agreement, test_tracer_load) ------------------------

@pytest.fixture(scope="module")
def ids() -> Iterator[Ids]:
    """(pilot, pool, other): three real users per module."""
    require(os.access(SUDO, os.X_OK) and os.access(SETPRIV, os.X_OK), "sudo and setpriv are needed")
    made: list[User] = []
    try:
        for _ in range(3):
            made.append(create_user("jcid"))
        yield Ids(*made)
    finally:
        for u in reversed(made):
            delete_user(u)


@pytest.fixture(scope="module")
def execloop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A C program: after one byte on stdin, fork + execve(/bin/true) + waitpid N times."""
    return build_execloop(tmp_path_factory.mktemp("execloop"))


# -- a batch system's own cgroups (test_attach, test_sshd_attach) ---------------------------------------------

@pytest.fixture
def batch() -> Iterator[FakeBatch]:
    """A fake batch system's cgroup tree (FakeBatch) in a test subtree of its own, removed at teardown."""
    b = FakeBatch()
    require(bool(b.roots.get("unified")), "attach tests need a cgroup2 hierarchy")
    try:
        yield b
    finally:
        problems = b.cleanup()
        assert not problems, f"fake batch system teardown: {problems}"
