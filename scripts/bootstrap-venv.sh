#!/usr/bin/env bash
# The project's venv: built from Debian's /usr/bin/python3 with system site
# packages so that bcc (python3-bpfcc, in /usr/lib/python3/dist-packages) imports.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
venv=$top/.venv
py=/usr/bin/python3
# EL9's /usr/bin/python3 is 3.9 and jobcage needs 3.11: use python3.11 there (Debian 12's python3 is 3.11).
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && command -v python3.11 >/dev/null; then
  py=$(command -v python3.11)
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "bootstrap: creating $venv from $py"
  "$py" -m venv --system-site-packages "$venv"
fi
stamp=$venv/.installed
if [ ! -e "$stamp" ] || [ "$top/pyproject.toml" -nt "$stamp" ]; then
  echo "bootstrap: pip install -e $top[test]"
  "$venv/bin/pip" install -q --disable-pip-version-check -e "$top[test]"
  touch "$stamp"
fi
# The import name is jobcage (jobcage.agent -> agent/, ...): the editable install maps it with an import
# hook, which costs ~10 ms per start.  The hook launcher below skips site, so it gets a plain path entry
# instead: a tree of symlinks, $venv/src/jobcage/{agent,cgroups,bpf} -> the checkout's folders.
mkdir -p "$venv/src/jobcage"
for d in agent cgroups bpf; do ln -sfn "$top/$d" "$venv/src/jobcage/$d"; done
# bcc's Python module is pure Python over libbcc.so: when the distribution built it for another Python
# (EL9: python3-bcc for 3.9), expose that one package -- not its whole site-packages -- to the venv.
if ! "$venv/bin/python" -c 'import bcc' 2>/dev/null; then
  bccdir=$(/usr/bin/python3 -c 'import bcc, os; print(os.path.dirname(bcc.__file__))' 2>/dev/null || true)
  if [ -n "$bccdir" ]; then
    mkdir -p "$venv/bcc-shim"
    ln -sfn "$bccdir" "$venv/bcc-shim/bcc"
    sp=$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')
    echo "$venv/bcc-shim" > "$sp/bcc-shim.pth"
    echo "bootstrap: bcc from $bccdir made importable in $venv"
  fi
fi
"$venv/bin/python" -c 'import bcc' 2>/dev/null || { echo "bootstrap: ERROR: bcc not importable from $venv" >&2; exit 1; }
# The hook commands run once per job (pam and ssh-hint once per ssh login), so /usr/local/bin/jobcage is a launcher that
# skips `site` (.pth processing) and pip's wrapper (which imports re) for them; every
# other command gets the full environment.
site_dir=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
launcher=$venv/bin/jobcage-launcher
cat > "$launcher.new" <<LAUNCHER
#!$venv/bin/python -IS
import sys
sys.path[:0] = ["$venv/src"]
sys.path.append("$site_dir")
if len(sys.argv) > 1 and sys.argv[1] in ("prologue", "adopt", "run", "epilogue"):
    from jobcage.agent.hook import exit_now, main as hook_main
    exit_now(hook_main(sys.argv[1:]))   # no interpreter teardown: ~3 ms per hook
if len(sys.argv) > 1 and sys.argv[1] in ("pam", "ssh-hint"):  # sshd: once per login
    from jobcage.agent.main import main
    main()
import site
site.main()
from jobcage.agent.main import main
main()
LAUNCHER
chmod 755 "$launcher.new"
mv "$launcher.new" "$launcher"
# JOBCAGE_VENV_ONLY=1: a second checkout (a developer's worktree) builds its venv without taking over
# the node's /usr/local/bin links.
[ "${JOBCAGE_VENV_ONLY:-0}" = 1 ] && exit 0
# Job users execute /usr/local/bin/jobcage: refuse to link it to a checkout they cannot reach.
bash "$top/scripts/check-reachable.sh" "$launcher" "$venv/bin/jobtrace" || exit 1
for pair in "jobcage:$launcher" "jobtrace:$venv/bin/jobtrace"; do
  s=${pair%%:*} target=${pair#*:}
  if [ "$(readlink -f /usr/local/bin/$s 2>/dev/null)" != "$target" ]; then
    ln -sfn "$target" /usr/local/bin/$s
    echo "bootstrap: linked /usr/local/bin/$s -> $target"
  fi
done
