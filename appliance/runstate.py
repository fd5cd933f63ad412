"""Readiness of the appliance's processes, told through a run folder.

The supervisor makes a private folder for each ``serve`` and hands it to its
children.  Each DIMSE worker writes ``dimse-N.ready`` (its pid) once it
listens; the HTTP workers' readiness probe reads them.  This replaces probing the
DIMSE port over TCP: pynetdicom keeps a connection that never sends an
A-ASSOCIATE-RQ for the whole ACSE timeout, counted against its association
limit, so frequent probes would lock out real modalities.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

OK = "ok"


def _marker(folder: Path, role: str) -> Path:
    return folder / f"{role}.ready"


def mark_ready(folder: Path, role: str) -> None:
    """Record that this process (*role*) is ready; atomic for readers."""
    tmp = folder / f".{role}.{secrets.token_hex(4)}"
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, _marker(folder, role))


def clear(folder: Path, role: str) -> None:
    """Withdraw *role*'s readiness (on a clean stop)."""
    with contextlib.suppress(FileNotFoundError):
        _marker(folder, role).unlink()


def check_ready(folder: Path | None, role: str) -> str:
    """``"ok"`` if *role* said it is ready and its process still runs, else
    ``"failed: <why>"``."""
    if folder is None:
        return f"failed: no {role} process is run beside this one (start with 'serve')"
    try:
        pid = int(_marker(folder, role).read_text())
    except FileNotFoundError:
        return f"failed: the {role} process has not said it is ready"
    except (OSError, ValueError):
        return f"failed: the {role} readiness marker is unreadable"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"failed: the {role} process (pid {pid}) is gone"
    except PermissionError:
        pass  # it exists, under another user
    return OK
