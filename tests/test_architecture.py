"""The layering rules of docs/architecture.md, checked on what really gets imported.

Each case imports modules in a fresh interpreter (the installed `jobcage` namespace, as users get it)
and lists which forbidden modules ended up in sys.modules: a static grep would miss an import that
arrives through another module.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

CGROUPS = ["jobcage.cgroups", "jobcage.cgroups.errors", "jobcage.cgroups.detect", "jobcage.cgroups.driver",
           "jobcage.cgroups.drivers", "jobcage.cgroups.path", "jobcage.cgroups.proc"]
CORE = ["jobcage.agent.lifecycle", "jobcage.agent.store", "jobcage.agent.tracer", "jobcage.agent.accounting",
        "jobcage.agent.api"]
HOOK = ["jobcage.agent.hook", "jobcage.agent.pam", "jobcage.agent.client", "jobcage.agent.protocol", "jobcage.agent.config",
        "jobcage.agent.errors"]
FRONT = ["jobcage.agent.cli", "jobcage.agent.jobtrace", "jobcage.agent.jobtrace.cli", "jobcage.agent.jobtrace.live",
         "jobcage.agent.jobtrace.table", "jobcage.agent.main", "jobcage.agent.hook"]

CASES = {
    # the cgroup layer knows nothing of jobs, the agent, or any front end
    "cgroups": (CGROUPS, ["jobcage.agent", "click", "rich", "sqlite3", "bcc"]),
    # the core never reaches up into a command line
    "core": (CORE, ["click", "rich", *FRONT]),
    # the hook path runs once per job: no click, no rich, no sqlite3 (the agent answers)
    "hook": (HOOK, ["click", "rich", "sqlite3", "_sqlite3", "jobcage.agent.lifecycle", "jobcage.agent.store"]),
    # jobtrace's views read /proc and render; only its cli reaches the method table (and click)
    "jobtrace views": ([f"jobcage.agent.jobtrace.{m}" for m in ("snapshot", "tree", "table", "json_out")],
                       ["click", "rich", "sqlite3", "_sqlite3", "jobcage.agent.store", "jobcage.agent.lifecycle"]),
    # BPF sources are data
    "bpf": (["jobcage.bpf"], ["bcc", "jobcage.agent", "jobcage.cgroups"]),
}

PROBE = """
import json, sys
before = set(sys.modules)
for m in {mods!r}:
    __import__(m)
bad = sorted(n for n in sys.modules if n not in before and any(n == f or n.startswith(f + ".") for f in {forbidden!r}))
print(json.dumps(bad))
"""


@pytest.mark.parametrize("case", sorted(CASES))
def test_never_imports(case: str) -> None:
    mods, forbidden = CASES[case]
    out = subprocess.run([sys.executable, "-c", PROBE.format(mods=mods, forbidden=forbidden)],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [], f"{case}: {mods} pulled in forbidden modules"


def test_one_top_level_package(tmp_path) -> None:
    """`pip install .` puts exactly one top-level package, jobcage, where it installs, and the installed
    commands run from there (not from this checkout)."""
    root = Path(__file__).resolve().parent.parent
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(target), str(root)],
                   check=True, capture_output=True, cwd=tmp_path)
    tops = {p.name for p in target.iterdir()} - {"bin", "__pycache__"}
    tops = {t for t in tops if not t.endswith(".dist-info")}
    assert tops == {"jobcage"}, tops
    assert (target / "jobcage" / "bpf" / "tracer.bpf.c").is_file() and (target / "jobcage" / "bpf" / "jobcage.h").is_file()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target)}
    for cmd in (["jobcage", "--help"], ["jobtrace", "--help"]):
        r = subprocess.run([sys.executable, "-s", str(target / "bin" / cmd[0]), *cmd[1:]],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
        assert r.returncode == 0, (cmd, r.stderr)
    where = subprocess.run([sys.executable, "-s", "-c", "import jobcage.agent; print(jobcage.agent.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, check=True).stdout
    assert where.startswith(str(target)), where


def test_package_docstrings_say_what_they_must_never_import() -> None:
    import jobcage.agent
    import jobcage.bpf
    import jobcage.cgroups

    for mod in (jobcage.agent, jobcage.cgroups, jobcage.bpf):
        assert mod.__doc__ and "Must never import" in mod.__doc__, mod.__name__


ROOT = Path(__file__).resolve().parent.parent
PROC_READER = Path("cgroups/proc.py")
# /proc names outside the reader that are not reads of /proc: none today.  A regex that matches paths a
# traced process opened (tracer/userns.py's _MAP_PATH) starts with '^', so it is not one.
PROC_EXCEPTIONS: set[tuple[str, str]] = set()


def _proc_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """String literals (and f-strings) that start with "/proc", docstrings left out."""
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    parts = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    out = []
    for n in ast.walk(tree):
        head = n.values[0] if isinstance(n, ast.JoinedStr) and n.values else n
        if id(n) in docs or id(n) in parts or not isinstance(head, ast.Constant) or not isinstance(head.value, str):
            continue
        if head.value.startswith("/proc"):
            out.append((n.lineno, head.value))
    return out


def test_one_proc_reader() -> None:
    """Every /proc path in agent/ and cgroups/ is cgroups/proc.py's: one module knows how /proc is read
    (pid reuse, a process gone mid-read), the rest call it."""
    found = []
    for sub in ("agent", "cgroups"):
        for f in sorted((ROOT / sub).rglob("*.py")):
            rel = f.relative_to(ROOT)
            if rel == PROC_READER:
                continue
            for line, text in _proc_literals(ast.parse(f.read_text(), str(f))):
                if (str(rel), text) not in PROC_EXCEPTIONS:
                    found.append(f"{rel}:{line}: {text!r}")
    assert not found, "read /proc through jobcage.cgroups.proc:\n" + "\n".join(found)


def test_one_proc_reader_sees_a_read() -> None:
    """The check above finds what it looks for (plain and f-string paths, not docstrings)."""
    src = 'def f(pid):\n    """/proc/PID/stat"""\n    os.listdir("/proc")\n    return open(f"/proc/{pid}/cwd")\n'
    assert [t for _l, t in _proc_literals(ast.parse(src))] == ["/proc", "/proc/"]


def test_one_test_library() -> None:
    """No test module imports another: fixtures live in conftest.py, helpers in jctest.py (and the peers'
    set-up in slurmcluster.py / sshdfixtures.py), so each is defined once and wired one way."""
    found = []
    for f in sorted((ROOT / "tests").glob("*.py")):
        for n in ast.walk(ast.parse(f.read_text(), str(f))):
            names = [a.name for a in n.names] if isinstance(n, ast.Import) else \
                [n.module or ""] if isinstance(n, ast.ImportFrom) else []
            found += [f"{f.name}:{n.lineno}: {m}" for m in names if m.split(".")[-1].startswith("test_")]
            # pytest puts tests/ on sys.path for conftest.py: a module's own sys.path edit is a second wiring
            if isinstance(n, ast.Attribute) and n.attr == "path" and isinstance(n.value, ast.Name) \
                    and n.value.id == "sys":
                found.append(f"{f.name}:{n.lineno}: sys.path")
    assert not found, "import from conftest.py / jctest.py instead:\n" + "\n".join(found)
