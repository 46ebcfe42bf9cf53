"""Provenance every benchmark record carries: code revision, command line, time, environment."""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path
from typing import Any

from tokenreduce import __version__


def git_revision(where: Path | None = None) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the checkout the package runs from, or ``None`` outside one."""
    cwd = where or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def provenance(started: datetime.datetime | None = None) -> dict[str, Any]:
    """What a record needs to be reproduced: revision, command line, start time, package version
    (versions and device are the caller's ``env``)."""
    return {
        "revision": git_revision(),
        "version": __version__,
        "command": list(sys.argv),
        "started": (started or datetime.datetime.now(datetime.timezone.utc)).isoformat(timespec="seconds"),
    }
