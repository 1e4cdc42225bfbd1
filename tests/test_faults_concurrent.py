"""Faults under a real scheduler (`airflow standalone`), part 2: runs at once on a one-slot pool through an
MLflow outage, an unreachable Pushgateway and a full disk (a file of its own, so that the suite's two workers
run it beside tests/test_faults.py)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import yaml

from helical_workflow.runs import safe_run_id

from .conftest import (
    AIRFLOW_BIN,
    airflow_home,
    demo_params,
    free_port,
    run,
    standalone_settings,
    start_group,
    stop_group,
    wait_for,
)

pytestmark = pytest.mark.slow


def _ti_rows(airflow_db: Path, dag_id: str) -> list[dict]:
    """Task instances of a DAG as the scheduler recorded them (Airflow's own database)."""
    import sqlite3

    with sqlite3.connect(airflow_db) as db:
        db.row_factory = sqlite3.Row
        q = "select run_id, task_id, map_index, state, pool, try_number, start_date, end_date from task_instance"
        return [dict(r) for r in db.execute(q + " where dag_id = ?", (dag_id,))]


def test_three_runs_at_once_through_an_mlflow_outage_and_a_full_disk(tmp_path, model_cache, workflow_env):
    """Under the scheduler: three runs of the demo at once, with different overrides, fine_tune on a pool of one
    slot. The MLflow server is stopped while the first fine_tune trains and started again: every stage still
    succeeds, what could not be logged is kept and sent when a later stage finishes, so MLflow holds the three
    runs whole. One run also pushes to a Pushgateway nobody serves: warnings, not failures. Then a run whose
    outputs disk (a small tmpfs) fills up in fine_tune fails there, saying so, with nothing that looks finished."""
    from mlflow import MlflowClient

    from .conftest import mlflow_server_at

    server_root, server_port = tmp_path / "mlflow-server", free_port()
    url = f"http://127.0.0.1:{server_port}"
    outputs, disk = tmp_path / "outputs", tmp_path / "small-disk"
    common = dict(model_cache=model_cache, evaluate__umap=False, tracking__mlflow_tracking_uri=url)
    demo_params(
        tmp_path,
        **common,
        outputs_dir=str(outputs),
        fine_tune__epochs=1,
        fine_tune__checkpoint_every_steps=4,
        dag__max_active_runs=3,
        stage_profiles={"fine_tune": "cpu-pool"},
    )
    pp = demo_params(tmp_path, **common, experiment="full", outputs_dir=str(disk), profile="cpu-once")
    profiles = yaml.safe_load((pp.parent / "profiles.yaml").read_text())
    cpu = profiles["profiles"]["cpu"]
    profiles["profiles"]["cpu-pool"] = {**cpu, "pool": "gpu"}  # a GPU profile's pool, on this CPU machine
    profiles["profiles"]["cpu-once"] = {**cpu, "retries": 0}
    (pp.parent / "profiles.yaml").write_text(yaml.safe_dump(profiles))
    disk.mkdir()
    mounted = run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", disk])
    assert mounted.returncode == 0, f"cannot mount a tmpfs ({mounted.stderr.strip()}): the suite runs as root"

    port = free_port()
    env = airflow_home(
        tmp_path,
        {k: v for k, v in workflow_env.items() if k != "HELICAL_WORKFLOW_OUTPUTS"},  # each file's outputs_dir
        pp.parent,
        **standalone_settings(port),
    )
    airflow = AIRFLOW_BIN / "airflow"
    assert run([airflow, "pools", "set", "gpu", "1", "GPU stages queue here"], env=env).returncode == 0
    log = tmp_path / "standalone.log"
    server = None
    proc = start_group([airflow, "standalone"], env, log)
    try:
        with mlflow_server_at(server_root, server_port) as first:
            server = first.proc
            lrs = {"manual__lr_2e-3": 0.002, "manual__lr_3e-3": 0.003, "manual__lr_5e-4": 0.0005}  # the file says 1e-3
            for run_id, lr in lrs.items():
                conf = {"fine_tune.learning_rate": lr}
                if lr == 0.0005:
                    conf["tracking.pushgateway"] = "127.0.0.1:9"  # nothing listens on the discard port
                trigger = [airflow, "dags", "trigger", "helical_demo", "--run-id", run_id, "--conf", json.dumps(conf)]
                wait_for(f"trigger of {run_id}", lambda t=trigger: run(t, env=env).returncode == 0, 240, proc, log, 5)
            dirs = {r: outputs / "demo" / safe_run_id(r) for r in lrs}

            # the first fine_tune has checkpointed: stop the server until an MLflow call fails and is kept
            wait_for(
                "checkpoint",
                lambda: any((d / "checkpoints" / "last.pt").exists() for d in dirs.values()),
                600,
                proc,
                log,
            )
            stop_group(server, signals=(signal.SIGTERM, signal.SIGKILL))
        kept = lambda: [d for d in dirs.values() if (d / "mlflow_pending.jsonl").exists()]
        wait_for("MLflow call kept while the server is down", kept, 300, proc, log)
        with mlflow_server_at(server_root, server_port):

            def states():
                r = run([airflow, "dags", "list-runs", "helical_demo", "-o", "json"], env=env)
                line = next((ln for ln in r.stdout.splitlines() if ln.startswith("[")), "[]")
                got = {x["run_id"]: x["state"] for x in json.loads(line)}
                return got if all(got.get(r) in ("success", "failed") for r in lrs) else None

            final = wait_for("end of the three runs", states, 1200, proc, log, 10)
            assert final == {r: "success" for r in lrs}, (final, log.read_text()[-4000:])

            # the pool admitted one fine_tune at a time; other stages of the three runs did overlap
            tis = _ti_rows(tmp_path / "airflow" / "airflow.db", "helical_demo")
            ft = sorted((t["start_date"], t["end_date"]) for t in tis if t["task_id"] == "fine_tune")
            assert len(ft) == 3 and all(t["pool"] == "gpu" for t in tis if t["task_id"] == "fine_tune")
            assert all(a[1] <= b[0] for a, b in zip(ft, ft[1:])), f"fine_tune ran concurrently on a 1-slot pool: {ft}"
            early = sorted((t["start_date"], t["end_date"]) for t in tis if t["task_id"] in ("load", "tokenize"))
            assert any(a[1] > b[0] for a, b in zip(early, early[1:])), "the three runs never ran at once"

            client = MlflowClient(url)
            exp = client.get_experiment_by_name("demo")
            mlruns = {m.data.tags["airflow_run_id"]: m for m in client.search_runs([exp.experiment_id])}
            assert sorted(mlruns) == sorted(lrs)
            outage = 0
            for run_id, d in dirs.items():
                m = json.loads((d / "run.json").read_text())
                assert {s: v["status"] for s, v in m["stages"].items()} == dict.fromkeys(
                    ("load", "tokenize", "fine_tune", "evaluate", "compare"), "success"
                )
                assert m["overrides"]["fine_tune.learning_rate"] == lrs[run_id]
                for f in ("model/fine_tuned.pt", "evaluate/metrics.json", "reports/04_evaluate.html"):
                    assert (d / f).is_file(), f"{d / f} missing"
                assert not (d / "mlflow_pending.jsonl").exists(), f"{run_id}: MLflow calls never sent"
                warnings = "\n".join(m.get("warnings", []))
                if "unreachable" in warnings:
                    outage += 1
                    assert "reachable again" in warnings, warnings
                assert ("Pushgateway" in warnings) == (lrs[run_id] == 0.0005), warnings
                mr = mlruns[run_id]
                assert mr.info.status == "FINISHED"
                assert float(mr.data.params["override.fine_tune.learning_rate"]) == lrs[run_id]
                steps = client.get_metric_history(mr.info.run_id, "fine_tune.val_macro_f1")
                assert sorted(s.step for s in steps) == [1], f"{run_id}: epoch metrics lost in the outage"
                assert any(k.startswith("evaluate.") for k in mr.data.metrics), sorted(mr.data.metrics)
            assert outage >= 1, "no run saw the MLflow outage"

            # a full outputs disk: fine_tune's first checkpoint does not fit in 12 MiB
            full_id = "manual__full_disk"
            run([airflow, "dags", "trigger", "helical_full", "--run-id", full_id], env=env)
            full_dir = disk / "full" / safe_run_id(full_id)

            def full_state():
                r = run([airflow, "dags", "state", "helical_full", full_id], env=env)
                s = (r.stdout.strip().splitlines() or [""])[-1]
                return s if s in ("success", "failed") else None

            assert wait_for("end of the full-disk run", full_state, 600, proc, log, 5) == "failed"
            m = json.loads((full_dir / "run.json").read_text())
            assert m["stages"]["tokenize"]["status"] == "success"
            ft = m["stages"]["fine_tune"]
            assert ft["status"] == "failed" and f"No space left on the disk holding {full_dir}" in ft["error"], ft
            assert "Fix:" in ft["error"]
            print(f"full disk: {ft['error']}")
            assert not (full_dir / "model").exists() and "evaluate" not in m["stages"]
            leftovers = [p.name for p in full_dir.rglob(".*tmp-*")]
            assert not leftovers, leftovers
    finally:
        stop_group(proc)
        run(["umount", "-l", disk])
