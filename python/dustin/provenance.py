# SPDX-License-Identifier: Apache-2.0
"""Which source produced a result: the commit written into every benchmark and quality file."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]


def _git(*args: str, check: bool = True) -> str:
    """Output of a git command in the source tree (with ``check``, raises when it fails)."""
    return subprocess.run(
        ["git", *args], capture_output=True, text=True, check=check, cwd=_REPO
    ).stdout.strip()


def source_commit() -> str:
    """The commit of the source tree, e.g. ``61f0e7530dda`` or ``61f0e7530dda-dirty``.

    ``$DUSTIN_COMMIT`` wins: scripts/gpu_check.sh sets it from ``.dustin-commit`` (written before
    a copy of the tree is sent to the GPU machine, whose ``.git``, if any, is stale). Then ``git``;
    then ``.dustin-commit`` itself; ``unknown`` when nothing answers.
    """
    if os.environ.get("DUSTIN_COMMIT"):
        return os.environ["DUSTIN_COMMIT"]
    try:
        head = _git("rev-parse", "--short=12", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no", check=False)
    except (OSError, subprocess.CalledProcessError):
        recorded = _REPO / ".dustin-commit"
        if recorded.is_file():
            return recorded.read_text().strip() + " (recorded in .dustin-commit)"
        return "unknown"
    return head + ("-dirty" if dirty else "")
