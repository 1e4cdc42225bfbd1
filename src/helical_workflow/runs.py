"""The run folder and its ``run.json`` manifest.

``outputs/<experiment>/<run_id>/`` holds everything one workflow run produced. Stages
hand over files in it. Each stage writes into a hidden temporary folder and renames it
into place only when it is complete (:func:`stage_output`), so a crashed or killed stage
never leaves output that looks finished. ``run.json`` is updated under a file lock,
because mapped tasks of one run may write it at the same time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import re
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

MANIFEST = "run.json"
SUBDIRS = ("notebooks", "reports", "metrics")


def safe_run_id(run_id: str) -> str:
    """Airflow run ids contain ':' and '+': make a folder name from one."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("._")
    if not safe:
        raise ValueError(f"run id {run_id!r} has no usable characters")
    return safe


def run_dir_for(outputs: Path, experiment: str, run_id: str) -> Path:
    return Path(outputs) / experiment / safe_run_id(run_id)


def parse_shard(text: str | None) -> tuple[int, int]:
    """'I/N' (0-based I) -> (I, N); None -> (0, 1)."""
    if not text:
        return 0, 1
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ValueError(f"shard {text!r} is not of the form I/N (e.g. 0/4)") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {text!r}: need 0 <= I < N")
    return i, n


def shard_name(i: int, n: int) -> str:
    """The name of shard i of n: output folders, run.json keys, notebook and metrics files."""
    return f"shard-{i:05d}-of-{n:05d}"


def stage_key(stage: str, shard: str | None) -> str:
    """``stage``, or ``stage.shard-0000i-of-0000n`` for one shard of a sharded stage."""
    return stage if shard is None else f"{stage}.{shard_name(*parse_shard(shard))}"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


def _locked(run_dir: Path):
    return file_lock(Path(run_dir) / ".run.lock")


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        return {}
    with open(path) as f:
        return json.load(f)


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)


def update_manifest(run_dir: Path, change: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """Apply ``change`` to run.json under the run folder's lock and write it atomically."""
    run_dir = Path(run_dir)
    with _locked(run_dir):
        data = read_manifest(run_dir)
        change(data)
        _write_json_atomic(run_dir / MANIFEST, data)
        return data


def package_versions(names: tuple[str, ...]) -> dict[str, str]:
    from importlib import metadata

    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


def init_run(run_dir: Path, *, experiment: str, run_id: str, params_snapshot: dict[str, Any]) -> dict[str, Any]:
    """Create the run folder and its manifest (idempotent: a retry keeps what is there)."""
    run_dir = Path(run_dir)
    for sub in SUBDIRS:
        (run_dir / sub).mkdir(parents=True, exist_ok=True)

    def change(m: dict[str, Any]) -> None:
        m.setdefault("experiment", experiment)
        m.setdefault("run_id", run_id)
        m.setdefault("created", now_iso())
        m["params"] = params_snapshot
        m.setdefault("stages", {})
        m.setdefault("host", platform.node())

    return update_manifest(run_dir, change)


def set_stage(run_dir: Path, stage: str, **fields: Any) -> dict[str, Any]:
    def change(m: dict[str, Any]) -> None:
        st = m.setdefault("stages", {}).setdefault(stage, {})
        st.update(fields)

    return update_manifest(run_dir, change)


def stage_status(run_dir: Path, stage: str) -> str | None:
    return read_manifest(run_dir).get("stages", {}).get(stage, {}).get("status")


@contextlib.contextmanager
def stage_output(run_dir: Path, name: str) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces ``run_dir/name`` atomically.

    On any exception the temporary folder is removed and the previous output (if any)
    is left untouched, so nothing half-written appears where the next stage reads.
    """
    run_dir = Path(run_dir)
    final = run_dir / name
    tmp = run_dir / f".{name}.tmp-{os.getpid()}-{int(time.time() * 1000)}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = run_dir / f".{name}.old-{os.getpid()}-{int(time.time() * 1000)}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def require_stage_output(run_dir: Path, name: str, produced_by: str) -> Path:
    """The folder a previous stage wrote, or a clear error saying which stage to run first."""
    path = Path(run_dir) / name
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} does not exist: the '{produced_by}' stage has not completed for this run. "
            f"Fix: run the '{produced_by}' stage (notebook or Airflow task) for run folder {run_dir} first."
        )
    return path
