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
