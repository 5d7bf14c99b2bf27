"""Entry point of `jobcage`: the hook commands take the fast path (agent/hook.py),
everything else goes to the click CLI (agent/cli.py)."""

from __future__ import annotations

import sys

HOOKS = ("prologue", "adopt", "run", "epilogue")


def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0] == "pam":  # sshd's PAM stack (pam_exec): as lean as the hooks
        from .pam import main as pam_main

        sys.exit(pam_main(argv))
    if argv and argv[0] == "ssh-hint":
        from .pam import hint_main

        sys.exit(hint_main(argv))
    if argv and argv[0] in HOOKS:
        from .hook import exit_now
        from .hook import main as hook_main

        exit_now(hook_main(argv))
    from .cli import cli

    cli(prog_name="jobcage")
