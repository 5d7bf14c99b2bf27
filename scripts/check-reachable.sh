#!/usr/bin/env bash
# check-reachable.sh PROGRAM...: can a job user (nobody, no groups) execute each PROGRAM (and the interpreter
# and code it needs)?  `make bootstrap` links /usr/local/bin/jobcage into the checkout's venv, and job users
# run it (`jobcage run`, the TaskProlog): a checkout in a private directory (/root is 0700 on Debian) would
# leave them with "Permission denied".  Exit 0 if all run; else one line saying which and why, exit 1.
set -u
for prog in "$@"; do
  if ! out=$(setpriv --reuid=65534 --regid=65534 --clear-groups -- "$prog" --help 2>&1 >/dev/null); then
    dir=$(dirname "$(readlink -f "$prog")")
    while [ "$dir" != / ] && [ -n "$dir" ]; do
      # the topmost directory a job user cannot search is the reason
      if ! setpriv --reuid=65534 --regid=65534 --clear-groups -- test -x "$dir"; then blocked=$dir; fi
      dir=$(dirname "$dir")
    done
    why=${blocked:+"$blocked is not searchable by other users (mode $(stat -c %a "$blocked"))"}
    echo "bootstrap: job users cannot run $prog: ${why:-${out%%$'\n'*}}; clone jobcage into a directory they can read (e.g. /opt/jobcage) and run make bootstrap there" >&2
    exit 1
  fi
done
exit 0
