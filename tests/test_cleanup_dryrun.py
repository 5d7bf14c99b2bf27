"""`jobcage cleanup --uid U --since T --dry-run` says what would go and why, and removes nothing; the real run
then removes exactly that (issue 9, defect 5: only what was created during the job)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from jctest import JcEnv, User

pytestmark = [pytest.mark.root]


def test_dry_run_says_what_and_why(jc_env: JcEnv, make_user: Callable[..., User]) -> None:
    u = make_user()
    top = jc_env.scratch / "clean"
    top.mkdir()
    top.chmod(0o1777)
    jc_env.write_config({"cleanup": {"enabled": True, "dirs": [str(top)]}})
    assert jc_env.run(["/bin/sh", "-c", f"mkdir {top}/old && echo x > {top}/old/f"], user=u).rc == 0
    time.sleep(0.05)
    since = time.time()
    time.sleep(0.05)
    assert jc_env.run(["/bin/sh", "-c", f"echo y > {top}/new; mkdir {top}/nd; echo z > {top}/nd/g"], user=u).rc == 0
    r = jc_env.jobcage("cleanup", "--uid", str(u.uid), "--since", f"{since:.3f}", "--dry-run").ok()
    lines = r.out.splitlines()
    assert lines[0].startswith("rule: ") and f"uid {u.uid}" in lines[0] and "created or changed since" in lines[0]
    would = {x.removeprefix("would remove: ") for x in lines if x.startswith("would remove: ")}
    assert would == {str(top / "new"), str(top / "nd"), str(top / "nd" / "g")}, lines
    assert (top / "new").exists() and (top / "nd" / "g").exists()       # a dry run removes nothing
    jc_env.jobcage("cleanup", "--uid", str(u.uid), "--since", "yesterday").clean_error(2, "--since")
    jc_env.jobcage("cleanup", "--uid", str(u.uid), "--since", f"{since:.3f}").ok()
    assert not (top / "new").exists() and not (top / "nd").exists()
    assert (top / "old" / "f").exists(), "what was there before goes nowhere"
