"""Where the job cgroups go ([cgroups] placement, docs/operations.md "Placement under systemd"), as `jobcage
doctor` reports it and as the hooks act on it, on this node.  The systemd side (placement "unit" inside
jobcage-jobs.service's delegated cgroup) runs in the pure-v2 guest: tests/test_systemd.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from jctest import JcEnv, User


def node_mode() -> str:
    from jobcage.cgroups.detect import detect

    return detect().mode


def test_doctor_names_the_placement_and_why(jc_env: JcEnv) -> None:
    """auto on a node that is not pure v2 under systemd with jobcage-jobs.service running: top, and why."""
    jc_env.write_config({"cgroups": {"placement": "auto"}})
    cg = jc_env.jobcage("doctor", "--json").json()["cgroups"]
    systemd_unit = node_mode() == "v2" and Path("/run/systemd/system").is_dir() and \
        Path("/sys/fs/cgroup/system.slice/jobcage-jobs.service").is_dir()
    if systemd_unit:   # the guest while jobcage-jobs.service runs
        assert cg["placement"] == "unit", cg
    else:
        assert cg["placement"] == "top", cg
        assert cg["placement reason"], cg
        assert jc_env.subtree in cg["subtree"], cg
    jc_env.write_config({"cgroups": {"placement": "top"}})
    cg = jc_env.jobcage("doctor", "--json").json()["cgroups"]
    assert (cg["placement"], cg["placement reason"]) == ("top", 'configured ([cgroups] placement = "top")')


def test_unit_placement_refused_where_systemd_cannot_delegate(jc_env: JcEnv,
                                                              make_user: Callable[..., User]) -> None:
    """placement = "unit" on a hybrid/v1 node: one clear line, exit 1, no cgroup made anywhere."""
    if node_mode() == "v2":
        pytest.skip("a pure-v2 node can delegate: tests/test_systemd.py covers placement unit there")
    jc_env.write_config({"cgroups": {"placement": "unit"}})
    user = make_user()
    r = jc_env.jobcage("prologue", "p1", "--uid", str(user.uid))
    r.clean_error(1, contains="needs pure cgroup v2")
    assert not jc_env.listing()
    cg = jc_env.jobcage("doctor", "--json").json()["cgroups"]
    assert cg["driver"].startswith("unusable:") and "pure cgroup v2" in cg["driver"], cg


def test_bad_placement_values(jc_env: JcEnv) -> None:
    for over, msg in (({"placement": "inside"}, "unknown cgroup placement"),
                      ({"placement": "unit", "delegated_cgroup": "../x"}, "delegated_cgroup"),
                      ({"placement": 3}, "placement must be str")):
        jc_env.write_config({"cgroups": over})
        jc_env.jobcage("list").clean_error(1, contains=msg)
