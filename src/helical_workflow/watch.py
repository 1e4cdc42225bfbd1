"""Runs that start when data arrives: an Airflow event trigger that watches a folder for new ``.h5ad`` files.

:class:`IncomingH5adTrigger` runs in Airflow's triggerer, behind an ``AssetWatcher`` on the asset
:func:`incoming_asset`. It fires one event per *complete* new file:

* only ``*.h5ad`` names count: a file being copied in as ``x.h5ad.part`` / ``x.h5ad.tmp`` (or any hidden
  ``.x.h5ad``) is ignored until it is renamed;
* a file's size and modification time must hold for ``stable_seconds`` (a slow writer that writes in
  place is waited for);
* a file whose content (sha256) has fired before does not fire again, whatever its name: the seen
  hashes live in the asset's state store, which survives triggerer restarts.

The run it starts annotates the file (:mod:`helical_workflow.annotate_dag`); the annotation itself is
also keyed by content hash and model version, so no file is annotated twice by the same model.

Light on purpose: the triggerer imports it (standard library and Airflow only).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

from .files import file_sha256

SUFFIX = ".h5ad"


def incoming_uri(folder: str | os.PathLike) -> str:
    return Path(folder).resolve().as_uri()


def candidates(folder: Path) -> list[Path]:
    """Complete-looking names only: ``*.h5ad``, not hidden (temporary names end otherwise)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.endswith(SUFFIX) and not p.name.startswith(".") and p.is_file())


class IncomingH5adTrigger(BaseEventTrigger):
    """Fire ``{"path", "sha256", "size"}`` for each complete new ``.h5ad`` in ``directory`` (see the module)."""

    def __init__(self, directory: str, stable_seconds: float = 5.0, poll_seconds: float = 2.0) -> None:
        super().__init__()
        self.directory = str(directory)
        self.stable_seconds = float(stable_seconds)
        self.poll_seconds = float(poll_seconds)
        self._seen: set[str] = set()  # when there is no state store (a trigger run outside the triggerer)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"directory": self.directory, "stable_seconds": self.stable_seconds, "poll_seconds": self.poll_seconds},
        )

    async def _was_seen(self, sha: str) -> bool:
        if self.asset_state_store is not None:
            return await self.asset_state_store.aget(f"sha256:{sha}") is not None
        return sha in self._seen

    async def _mark_seen(self, sha: str, path: Path) -> None:
        if self.asset_state_store is not None:
            await self.asset_state_store.aset(f"sha256:{sha}", {"path": str(path), "at": time.time()})
        self._seen.add(sha)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        folder = Path(self.directory)
        watching: dict[Path, tuple[tuple[int, int], float]] = {}  # path -> ((size, mtime_ns), since)
        fired: dict[Path, tuple[int, int]] = {}  # what this instance fired or skipped (no re-hashing)
        while True:
            now = time.monotonic()
            present = await asyncio.to_thread(candidates, folder)
            for p in present:
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                sig = (st.st_size, st.st_mtime_ns)
                if fired.get(p) == sig:
                    continue
                seen = watching.get(p)
                if seen is None or seen[0] != sig:
                    watching[p] = (sig, now)  # new or still changing: wait until it holds still
                    continue
                if now - seen[1] < self.stable_seconds:
                    continue
                sha = await asyncio.to_thread(file_sha256, p)
                fired[p] = sig
                watching.pop(p, None)
                if await self._was_seen(sha):
                    self.log.info("%s: content seen before (sha256 %s); not starting a run", p, sha[:12])
                    continue
                await self._mark_seen(sha, p)
                self.log.info("%s is complete (%d bytes, sha256 %s): starting a run", p, st.st_size, sha[:12])
                yield TriggerEvent({"path": str(p), "sha256": sha, "size": st.st_size})
            for gone in set(watching) - set(present):
                watching.pop(gone, None)
            await asyncio.sleep(self.poll_seconds)


class FileChangedTrigger(BaseEventTrigger):
    """Fire ``{"path", "sha256", "previous"}`` when the content of ``path`` changes (``dag.schedule: on_new_data``).

    The file's hash when the watcher first runs is its baseline (no event); a change fires once it has been
    stable for ``stable_seconds``. The last hash lives in the asset's state store (survives restarts).
    """

    def __init__(self, path: str, stable_seconds: float = 5.0, poll_seconds: float = 10.0) -> None:
        super().__init__()
        self.path = str(path)
        self.stable_seconds = float(stable_seconds)
        self.poll_seconds = float(poll_seconds)
        self._last: str | None = None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"path": self.path, "stable_seconds": self.stable_seconds, "poll_seconds": self.poll_seconds},
        )

    async def _get(self) -> str | None:
        if self.asset_state_store is not None:
            return await self.asset_state_store.aget("sha256")
        return self._last

    async def _set(self, sha: str) -> None:
        if self.asset_state_store is not None:
            await self.asset_state_store.aset("sha256", sha)
        self._last = sha

    async def run(self) -> AsyncIterator[TriggerEvent]:
        p = Path(self.path)
        seen: tuple[int, int] | None = None  # the signature last hashed
        pending: tuple[tuple[int, int], float] | None = None
        while True:
            try:
                st = p.stat()
                sig = (st.st_size, st.st_mtime_ns)
            except FileNotFoundError:
                sig = None
            now = time.monotonic()
            if sig is not None and sig != seen:
                if pending is None or pending[0] != sig:
                    pending = (sig, now)
                elif now - pending[1] >= self.stable_seconds:
                    sha = await asyncio.to_thread(file_sha256, p)
                    seen, pending = sig, None
                    last = await self._get()
                    await self._set(sha)
                    if last is not None and last != sha:
                        self.log.info("%s changed (sha256 %s -> %s): starting a run", p, last[:12], sha[:12])
                        yield TriggerEvent({"path": str(p), "sha256": sha, "previous": last})
            await asyncio.sleep(self.poll_seconds)
