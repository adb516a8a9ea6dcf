"""Where a result came from: the package version, the git revision of a checkout, a creation
time that ``SOURCE_DATE_EPOCH`` can fix (reproducible files)."""

from __future__ import annotations

import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path

__version__ = "0.1.0"


def git_revision() -> str | None:
    """The commit (``git rev-parse HEAD``) of the checkout the package runs from; None when it
    is installed from a wheel or git is missing."""
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return revision or None


def code_version() -> str:
    """``ekd-lightning <version>``, with the git revision when run from a checkout."""
    revision = git_revision()
    return f"ekd-lightning {__version__}" + (f" (git {revision})" if revision else "")


def creation_time() -> str:
    """A file's ``created`` attribute: now (UTC, ISO 8601, seconds), or the time that
    ``SOURCE_DATE_EPOCH`` (the reproducible-builds convention) names, so that two runs with the
    same inputs write byte-identical files."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return moment.isoformat(timespec="seconds")
