"""BPF programs of jobcage: C sources shipped as package data, located by absolute path.

Loaded by ``agent/tracer.py`` with bcc; nothing here imports bcc.
"""

from pathlib import Path

DIR = Path(__file__).resolve().parent
HEADER = DIR / "jobcage.h"
TRACER_SOURCE = DIR / "tracer.bpf.c"
SOURCE = TRACER_SOURCE  # the one program today

__all__ = ["DIR", "HEADER", "SOURCE", "TRACER_SOURCE"]
