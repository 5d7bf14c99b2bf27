#!/usr/bin/env bash
# The project's venv: built from Debian's /usr/bin/python3 with system site
# packages so that bcc (python3-bpfcc, in /usr/lib/python3/dist-packages) imports.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
venv=$top/.venv
py=/usr/bin/python3
if [ ! -x "$venv/bin/python" ]; then
  echo "bootstrap: creating $venv from $py"
  "$py" -m venv --system-site-packages "$venv"
fi
stamp=$venv/.installed
if [ ! -e "$stamp" ] || [ "$top/pyproject.toml" -nt "$stamp" ]; then
  echo "bootstrap: pip install -e $top[test]"
  # compat mode: a plain .pth path entry; the default import-hook finder costs ~10 ms per hook call
  "$venv/bin/pip" install -q --disable-pip-version-check --config-settings editable_mode=compat -e "$top[test]"
  touch "$stamp"
fi
"$venv/bin/python" -c 'import bcc' 2>/dev/null || { echo "bootstrap: ERROR: bcc not importable from $venv" >&2; exit 1; }
for s in jobcage jobtrace; do
  if [ "$(readlink -f /usr/local/bin/$s 2>/dev/null)" != "$venv/bin/$s" ]; then
    ln -sfn "$venv/bin/$s" /usr/local/bin/$s
    echo "bootstrap: linked /usr/local/bin/$s -> $venv/bin/$s"
  fi
done
