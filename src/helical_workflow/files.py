"""Generic file helpers: atomic writes, JSON, content hashes, locks between processes, a full disk explained.

The bottom layer: standard library only, nothing of the project. Everything a run folder, a model
cache or an annotation folder writes goes through :func:`atomic`, so a crashed or killed writer
never leaves a file or folder that looks finished.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def file_sha256(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """A file's content hash, read in blocks (datasets of any size; the triggerer's watchers use it too)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(block), b""):
            h.update(b)
    return h.hexdigest()


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (fcntl), held for the ``with`` block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic(final: Path, *, directory: bool = False) -> Iterator[Path]:
    """Write-then-rename: the one way anything in a run folder is written.

    Yields a fresh temporary path next to ``final`` (a created folder with ``directory``,
    else a file path to write). On success it replaces ``final`` atomically; on any
    exception the temporary is removed and the previous ``final`` (if any) is untouched,
    so nothing half-written ever appears where a reader looks.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    stamp = f"{os.getpid()}-{time.monotonic_ns()}"
    tmp = final.with_name(f".{final.name}.tmp-{stamp}")
    if directory:
        tmp.mkdir()
    try:
        yield tmp
    except BaseException as e:
        full = out_of_space(e, final.parent)  # measured before the temporary gives its space back
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        if full:
            raise OutOfSpace(f"{full} Nothing of {final.name} was kept.") from e
        raise
    if directory and final.exists():
        old = final.with_name(f".{final.name}.old-{stamp}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


class OutOfSpace(OSError):
    """A write failed because the disk (or quota) holding the run folder is full."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def out_of_space(e: BaseException, where: Path) -> str | None:
    """What to tell the user if ``e`` (from writing under ``where``) means its disk is full, else None.

    ENOSPC/EDQUOT anywhere in the chain, or a failed write (torch's "file write failed", Arrow's, HDF5's)
    with almost nothing left on that filesystem."""
    if isinstance(e, OutOfSpace):
        return str(e)
    seen: BaseException | None = e
    hit = False
    while seen is not None and not hit:
        hit = isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT)
        seen = seen.__cause__ or seen.__context__
    try:
        usage = shutil.disk_usage(where)
    except OSError:
        usage = None
    if not hit:
        text = str(e).lower()
        if usage is None or usage.free > 16 * 2**20 or not ("write" in text or "space" in text):
            return None
    mib = (f" ({usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.0f} MiB)") if usage else ""
    return (
        f"No space left on the disk holding {where}{mib}. Fix: free space there, or point outputs_dir "
        "(or $HELICAL_WORKFLOW_OUTPUTS) at a larger disk, then run the stage again (in Airflow: clear the task)."
    )


def write_text(path: Path, text: str) -> Path:
    with atomic(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file's content; ``{}`` when the file is not there (a stage that did not write it)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


def write_json(path: Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n")
