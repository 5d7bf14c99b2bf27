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
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from jctest import AgentProc, JcEnv, User, create_user, delete_user, mode_unavailable, require


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
