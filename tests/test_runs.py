"""Run folders: safe names, atomic stage outputs, a manifest that concurrent writers don't corrupt."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from helical_workflow import runs


def test_airflow_run_ids_become_folder_names():
    assert runs.safe_run_id("manual__2026-11-25T20:28:00.794283+00:00") == "manual__2026-11-25T20_28_00.794283_00_00"
    assert runs.safe_run_id("scheduled__2026-01-01T00:00:00+00:00") != runs.safe_run_id("scheduled__2026-01-02T00:00:00+00:00")
    with pytest.raises(ValueError):
        runs.safe_run_id(":::")


def test_failed_stage_leaves_previous_output_and_no_partial_folder(tmp_path):
    with runs.stage_output(tmp_path, "tokenized") as d:
        (d / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with runs.stage_output(tmp_path, "tokenized") as d:
            (d / "a.txt").write_text("half")
            raise RuntimeError("killed")
    assert (tmp_path / "tokenized" / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["tokenized"]


def test_missing_upstream_output_names_the_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="'load' stage has not completed"):
        runs.require_stage_output(tmp_path, "load", "load")


def _bump(run_dir: str, stage: str, n: int) -> None:
    for i in range(n):
        runs.set_stage(Path(run_dir), stage, count=i + 1)


def test_concurrent_manifest_updates_are_all_kept(tmp_path):
    runs.init_run(tmp_path, experiment="e", run_id="r", params_snapshot={})
    procs = [mp.get_context("fork").Process(target=_bump, args=(str(tmp_path), f"s{i}", 30)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    stages = runs.read_manifest(tmp_path)["stages"]
    assert {k: v["count"] for k, v in stages.items()} == {f"s{i}": 30 for i in range(4)}
