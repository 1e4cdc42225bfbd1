"""Faults under a real scheduler (`airflow standalone`: scheduler, dag-processor, triggerer, api-server,
LocalExecutor), not `airflow dags test`."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from helical_workflow import data, train
from helical_workflow import tokenize as tok
from helical_workflow.runs import Run, safe_run_id

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
from .test_monitoring import MAPPING, StatsdCapture, statsd_map

pytestmark = pytest.mark.slow


def _kernels_in(run_dir: Path) -> list[int]:
    """ipykernel processes whose working directory is the run folder (papermill runs them there)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ")
            if b"ipykernel" in cmd and Path(os.readlink(d / "cwd")) == run_dir:
                out.append(int(d.name))
        except OSError:
            continue
    return out


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_a_killed_fine_tune_is_retried_and_resumes_from_its_checkpoint(tmp_path, model_cache, workflow_env):
    """SIGKILL the task process running fine_tune (and so its kernel) after its first checkpoint: Airflow
    retries it, the retry resumes from checkpoints/last.pt, and the model equals an uninterrupted run's.
    StatsD carries the failed attempt and the final success."""
    pp = demo_params(
        tmp_path,
        model_cache=model_cache,
        fine_tune__epochs=2,
        fine_tune__checkpoint_every_steps=4,
        evaluate__umap=False,
    )
    statsd = StatsdCapture()
    port = free_port()
    env = airflow_home(
        tmp_path,
        workflow_env,
        pp.parent,
        **standalone_settings(port),
        AIRFLOW__METRICS__STATSD_ON="True",
        AIRFLOW__METRICS__STATSD_HOST="127.0.0.1",
        AIRFLOW__METRICS__STATSD_PORT=str(statsd.port),
        AIRFLOW__METRICS__STATSD_PREFIX="airflow",
    )
    log = tmp_path / "standalone.log"
    proc = start_group([AIRFLOW_BIN / "airflow", "standalone"], env, log)
    run_id = "manual__fault_kill"
    run_dir = tmp_path / "outputs" / "demo" / safe_run_id(run_id)
    try:
        deadline = time.time() + 240
        while True:  # the DAG exists once the dag-processor has parsed it
            r = run([AIRFLOW_BIN / "airflow", "dags", "trigger", "helical_demo", "--run-id", run_id], env=env)
            if r.returncode == 0:
                break
            assert time.time() < deadline, (r.stdout + r.stderr)[-2000:] + log.read_text()[-3000:]
            time.sleep(5)

        deadline = time.time() + 600
        while not (run_dir / "checkpoints" / "last.pt").exists():
            assert time.time() < deadline and proc.poll() is None, log.read_text()[-4000:]
            time.sleep(0.5)
        kernels = _kernels_in(run_dir)
        assert len(kernels) == 1, kernels  # fine_tune's kernel, the only stage running
        # the experiment file is edited while the run is under way: nothing of this run changes (its retry
        # included), since the run pinned its params when its first task created it
        edited = yaml.safe_load(pp.read_text())
        lr = edited["fine_tune"]["learning_rate"]
        edited["fine_tune"].update(epochs=5, learning_rate=0.5)
        pp.write_text(yaml.safe_dump(edited, sort_keys=False))
        task_proc = _ppid(kernels[0])  # papermill, inside the Airflow task process
        os.kill(task_proc, signal.SIGKILL)
        killed_at = time.time()

        deadline = time.time() + 900
        state = ""
        while state not in ("success", "failed"):
            assert time.time() < deadline and proc.poll() is None, log.read_text()[-4000:]
            time.sleep(5)
            r = run([AIRFLOW_BIN / "airflow", "dags", "state", "helical_demo", run_id], env=env)
            state = (r.stdout.strip().splitlines() or [""])[-1]
        assert state == "success", log.read_text()[-4000:]

        nb = (run_dir / "notebooks" / "03_fine_tune.ipynb").read_text()
        assert "resuming from" in nb and "checkpoints/last.pt" in nb
        resumed = json.loads((run_dir / "run.json").read_text())["stages"]["fine_tune"]
        assert resumed["status"] == "success"

        pinned = Run.load(run_dir).params
        assert (pinned.fine_tune.epochs, pinned.fine_tune.learning_rate) == (2, lr)
        manifest = json.loads((run_dir / "run.json").read_text())
        assert (manifest["params"]["fine_tune"]["epochs"], manifest["params"]["fine_tune"]["learning_rate"]) == (2, lr)
        assert yaml.safe_load((run_dir / "params" / "demo.yaml").read_text())["fine_tune"]["epochs"] == 2
        assert len(json.loads((run_dir / "model" / "history.json").read_text())["epochs"]) == 2

        # the same training, uninterrupted, in-process, with the settings the run was created with
        ref_dir = tmp_path / "reference"
        params = pinned
        data.load_stage(params, ref_dir)
        tok.tokenize_stage(params, ref_dir)
        train.fine_tune_stage(params, ref_dir)
        got = json.loads((run_dir / "model" / "history.json").read_text())["epochs"]
        want = json.loads((ref_dir / "model" / "history.json").read_text())["epochs"]
        assert [e["train_loss"] for e in got] == pytest.approx([e["train_loss"] for e in want], rel=1e-5)
        assert [e["val_macro_f1"] for e in got] == pytest.approx([e["val_macro_f1"] for e in want], abs=1e-9)
        import torch

        a = torch.load(run_dir / "model" / "fine_tuned.pt", weights_only=True)
        b = torch.load(ref_dir / "model" / "fine_tuned.pt", weights_only=True)
        assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-5

        time.sleep(3)  # the last StatsD packets
        # what statsd_exporter would export (compose/statsd/mapping.yml): one failure, and fine_tune's success
        mapping = yaml.safe_load(MAPPING.read_text())
        exported: dict[tuple, int] = {}
        for name in statsd.names:
            m = statsd_map(name, mapping)
            if m:
                key = (m[0], tuple(sorted(m[1].items())))
                exported[key] = exported.get(key, 0) + statsd.count(name)
        seen = {k: v for k, v in exported.items() if "ti_" in k[0]}
        assert exported.get(("airflow_ti_failures", ())) == 1, seen
        ok = ("dag_id", "helical_demo"), ("state", "success"), ("task_id", "fine_tune")
        assert [v for (n, labels), v in exported.items() if set(ok) <= set(labels)] == [1], seen
        started = [ln for ln in log.read_text().splitlines() if "resuming from" in ln]
        print(f"killed at {killed_at:.0f}; resumed: {started[:1]}")
    finally:
        stop_group(proc)
        statsd.stop()


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
