"""The DAG, through a real Airflow 3 (SQLite metadata DB, `airflow dags test`), in its own venv."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helical_workflow.params import ANNOTATE_TRIGGER_FIELDS, TRIGGER_FIELDS

from .conftest import AIRFLOW_BIN, ROOT, airflow_home, demo_params, run


@pytest.fixture
def airflow_env(tmp_path, model_cache, workflow_env):
    params = demo_params(tmp_path, model_cache=model_cache, fine_tune__epochs=2)
    broken = yaml.safe_load(params.read_text())
    broken["experiment"] = "broken"
    broken["fine_tune"]["epochs"] = "three"
    (params.parent / "broken.yaml").write_text(yaml.safe_dump(broken))
    return airflow_home(tmp_path, workflow_env, params.parent)


PARSE = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(sys.argv[1])
out = {"errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": {}}
for dag_id, dag in bag.dags.items():
    out["dags"][dag_id] = {
        "tasks": [t.task_id for t in dag.topological_sort()],
        "ops": sorted({type(t).__name__ for t in dag.tasks}),
        "retries": {t.task_id: t.retries for t in dag.tasks},
        "tags": sorted(dag.tags), "schedule": str(dag.schedule), "doc": dag.doc_md,
        "paused_at_creation": dag.is_paused_upon_creation,
        "form": {k: dag.params.get_param(k).schema | {"default": dag.params[k],
                 "description": dag.params.get_param(k).description} for k in dag.params},
    }
out["heavy_imported"] = sorted(m for m in ("torch", "helical", "scanpy", "anndata", "mlflow") if m in sys.modules)
print(json.dumps(out))
"""


def test_dag_file_parses_light_and_builds_one_dag_per_params_file(airflow_env):
    r = run([AIRFLOW_BIN / "python", "-c", PARSE, ROOT / "dags"], env=airflow_env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["errors"] == {}
    assert out["heavy_imported"] == []
    demo = out["dags"]["helical_demo"]
    # the watcher's DAG starts unpaused (watching is its purpose); the others follow Airflow's setting
    assert out["dags"]["helical_annotate"]["paused_at_creation"] is False
    assert demo["paused_at_creation"] is None
    assert demo["tasks"] == ["load", "tokenize", "fine_tune", "evaluate", "compare"]
    assert demo["ops"] == ["StageOperator"]
    assert demo["retries"] == {s: 1 for s in demo["tasks"]}  # from the cpu profile
    broken = out["dags"]["helical_broken"]
    assert "invalid-params" in broken["tags"] and "fine_tune.epochs" in broken["doc"]
    # the Trigger form: typed, bounded, described fields with the file's values as defaults
    form = demo["form"]
    assert set(form) == set(TRIGGER_FIELDS)  # the fields a researcher changes, and only those
    assert form["fine_tune.epochs"]["type"] == "integer" and form["fine_tune.epochs"]["minimum"] == 1
    assert form["fine_tune.epochs"]["default"] == 2 and form["fine_tune.epochs"]["description"]
    assert form["fine_tune.learning_rate"]["exclusiveMinimum"] == 0
    assert form["fine_tune.batch_size"]["type"] == ["integer", "null"]
    assert form["profile"]["enum"] == ["cpu", "cpu-docker", "gpu", "gpu-k8s"]


def test_the_real_params_folder_gives_demo_and_yolksac_dags(airflow_env):
    env = {**airflow_env, "HELICAL_WORKFLOW_PARAMS_DIR": str(ROOT / "params")}
    r = run([AIRFLOW_BIN / "python", "-c", PARSE, ROOT / "dags"], env=env)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out["dags"]) == {"helical_demo", "helical_demo_sweep", "helical_yolksac_geneformer", "helical_annotate"}
    assert out["dags"]["helical_yolksac_geneformer"]["retries"]["fine_tune"] == 2  # gpu profile
    # the sweep's form leaves out what its grid sets per trial, and its docs say so
    sweep = out["dags"]["helical_demo_sweep"]
    assert set(sweep["form"]) == set(TRIGGER_FIELDS) - {"fine_tune.learning_rate", "fine_tune.freeze_layers"}
    assert "not in the Trigger form" in sweep["doc"]
    annotate = out["dags"]["helical_annotate"]  # scheduled on the watched folder's asset
    assert "helical_incoming" in annotate["schedule"] and (ROOT / "data" / "incoming").as_uri() in annotate["schedule"]
    # built by the one factory from the annotation stages, with the same operator and a form from the schema
    assert annotate["tasks"] == ["annotate_prepare", "annotate", "annotate_finish"]
    assert annotate["ops"] == ["StageOperator"]
    assert set(annotate["form"]) == set(ANNOTATE_TRIGGER_FIELDS)
    assert (
        annotate["form"]["annotate.inputs"]["type"] == "array" and annotate["form"]["annotate.inputs"]["default"] == []
    )
    assert "champion" in annotate["form"]["annotate.model"]["description"]


def test_on_new_data_schedules_the_training_dag_on_its_dataset(airflow_env, tmp_path):
    pdir = Path(airflow_env["HELICAL_WORKFLOW_PARAMS_DIR"])
    raw = yaml.safe_load((pdir / "demo.yaml").read_text())
    raw["experiment"], raw["dag"] = "retrain", {"schedule": "on_new_data"}
    (pdir / "retrain.yaml").write_text(yaml.safe_dump(raw))
    r = run([AIRFLOW_BIN / "python", "-c", PARSE, ROOT / "dags"], env=airflow_env)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    schedule = out["dags"]["helical_retrain"]["schedule"]
    assert "helical_data_retrain" in schedule and Path(raw["data"]["path"]).resolve().as_uri() in schedule


@pytest.mark.slow
def test_an_unknown_or_invalid_override_fails_before_compute(airflow_env, tmp_path):
    for conf, named in (
        ({"fine_tune": {"epoch": 1}}, "Did you mean 'fine_tune.epochs'"),
        ({"fine_tune": {"epochs": 0}}, "fine_tune.epochs: Input should be greater than or equal to 1"),
    ):
        r = run([AIRFLOW_BIN / "airflow", "dags", "test", "helical_demo", "-c", json.dumps(conf)], env=airflow_env)
        assert r.returncode != 0
        out = r.stdout + r.stderr
        assert named in out
        # the run's overrides are blamed, not the valid file; a retry could not fix them: the task fails once
        assert "this run's overrides (Trigger form, conf or --set) over demo.yaml is invalid" in out
        assert "AirflowFailException" in out and "up_for_retry" not in out.lower()
    assert not (tmp_path / "outputs" / "demo").exists()


def test_invalid_params_dag_fails_at_validation_before_compute(airflow_env, tmp_path):
    r = run([AIRFLOW_BIN / "airflow", "dags", "test", "helical_broken", "2026-01-01"], env=airflow_env)
    assert r.returncode != 0
    assert "fine_tune.epochs" in r.stdout + r.stderr
    assert not (tmp_path / "outputs" / "broken").exists()


@pytest.mark.slow
def test_two_dag_runs_end_to_end_in_separate_run_folders(airflow_env, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    outputs = tmp_path / "outputs"
    # the second run changes two settings at trigger time, nested and dotted
    conf = {"fine_tune": {"epochs": 1}, "fine_tune.learning_rate": 0.002}
    for day, extra in (("2026-01-01", []), ("2026-01-02", ["-c", json.dumps(conf)])):
        r = run([AIRFLOW_BIN / "airflow", "dags", "test", "helical_demo", day, *extra], env=airflow_env)
        assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    run_dirs = sorted((outputs / "demo").iterdir())
    assert len(run_dirs) == 2 and all(d.name.startswith("manual__") for d in run_dirs)
    mlflow_ids = set()
    for rd in run_dirs:
        m = json.loads((rd / "run.json").read_text())
        assert m["run_id"].startswith("manual__") and ":" in m["run_id"]  # Airflow's id, kept verbatim
        assert all(
            m["stages"][s]["status"] == "success" for s in ("load", "tokenize", "fine_tune", "evaluate", "compare")
        )
        for nb in ("01_load", "02_tokenize", "03_fine_tune", "04_evaluate"):
            assert (rd / "notebooks" / f"{nb}.ipynb").exists() and (rd / "reports" / f"{nb}.html").exists()
        metrics = json.loads((rd / "evaluate" / "metrics.json").read_text())
        assert metrics["accuracy"] > metrics["chance_accuracy"]
        mlflow_ids.add(m["mlflow"]["run_id"])
        # every notebook that ran knows only its own run folder
        for nb in (rd / "notebooks").iterdir():
            other = [d for d in run_dirs if d != rd][0]
            assert str(other) not in nb.read_text()
    assert len(mlflow_ids) == 2
    plain, changed = (json.loads((rd / "run.json").read_text()) for rd in run_dirs)
    assert "overrides" not in plain and plain["params"]["fine_tune"]["epochs"] == 2
    assert changed["overrides"] == {"fine_tune.epochs": 1, "fine_tune.learning_rate": 0.002}
    assert changed["params"]["fine_tune"]["epochs"] == 1 and changed["params"]["fine_tune"]["learning_rate"] == 0.002
    assert len(json.loads((run_dirs[1] / "model" / "history.json").read_text())["epochs"]) == 1

    mlflow.set_tracking_uri(f"sqlite:///{outputs / 'mlflow.db'}")
    client = MlflowClient()
    for rid in mlflow_ids:
        r = client.get_run(rid)
        assert r.info.status == "FINISHED"
        if rid == changed["mlflow"]["run_id"]:
            assert r.data.params["override.fine_tune.epochs"] == "1" and r.data.params["fine_tune.epochs"] == "1"
        assert r.data.params["model.name"] == "gf-6L-10M-i2048"
        assert "evaluate.helical_model_accuracy" in r.data.metrics and "fine_tune.duration_seconds" in r.data.metrics
        arts = {a.path for a in client.list_artifacts(rid)}
        assert {"notebooks", "reports", "model", "metrics", "run.json"} <= arts
        assert {a.path for a in client.list_artifacts(rid, "reports")} >= {"reports/04_evaluate.html"}
        assert "model/fine_tuned.pt" in {a.path for a in client.list_artifacts(rid, "model")}
