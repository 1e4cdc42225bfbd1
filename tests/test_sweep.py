"""The research loop for real: a 2x2 sweep through `airflow dags test` (trials mapped after one shared load
+ tokenize, MLflow child runs, 05_compare, the registry's champion), then a worse sweep from the CLI with one
trial forced to fail: the alias stays, the other trial and the report are intact."""

from __future__ import annotations

import json
import urllib.parse

import numpy as np
import pandas as pd
import pytest
import yaml

from .conftest import AIRFLOW_BIN, ROOT, airflow_home, cli, demo_params, run

pytestmark = pytest.mark.slow


def summary2_test_f1(run_dir):
    return json.loads((run_dir / "compare" / "summary.json").read_text())["test"]["macro_f1"]


def _sweep_params(tmp_path, model_cache, grid, epochs):
    p = demo_params(tmp_path, model_cache=model_cache, experiment="demo_sweep")
    raw = yaml.safe_load(p.read_text())
    raw["fine_tune"]["epochs"] = epochs
    raw["evaluate"] = {"umap": False}
    raw["sweep"] = {"method": "grid", "grid": grid, "metric": "macro_f1"}
    raw["dag"] = {"schedule": None}
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def test_a_sweep_ranks_trials_registers_the_winner_and_keeps_the_champion(tmp_path, model_cache, workflow_env):
    import mlflow
    from mlflow.tracking import MlflowClient

    from helical_workflow import registry

    grid = {"fine_tune.learning_rate": [0.001, 0.003], "fine_tune.freeze_layers": [0, 1]}
    params = _sweep_params(tmp_path, model_cache, grid, epochs=1)
    env = airflow_home(tmp_path, workflow_env, params.parent)
    r = run([AIRFLOW_BIN / "airflow", "dags", "test", "helical_demo_sweep"], env=env, timeout=1500)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]

    (run_dir,) = (tmp_path / "outputs" / "demo_sweep").glob("manual__*")
    m = json.loads((run_dir / "run.json").read_text())
    trial_keys = [k for k in m["stages"] if ".trial-" in k]
    assert len(trial_keys) == 8 and all(m["stages"][k]["status"] == "success" for k in trial_keys)
    assert m["stages"]["load"]["attempt"] == 1 and m["stages"]["tokenize"]["attempt"] == 1  # once for all trials
    for k in range(4):
        t = run_dir / "trials" / str(k)
        assert (t / "model" / "fine_tuned.pt").exists() and (t / "evaluate" / "metrics.json").exists()
        assert (
            json.loads((t / "run.json").read_text())["overrides"]
            == [{"fine_tune.learning_rate": lr, "fine_tune.freeze_layers": f} for lr in (0.001, 0.003) for f in (0, 1)][
                k
            ]
        )
    # in Airflow each mapped trial is named by its settings, not only by its map index
    import sqlite3

    with sqlite3.connect(tmp_path / "airflow" / "airflow.db") as db:
        q = "select task_id, map_index, rendered_map_index from task_instance where map_index >= 0"
        names = {(t, i): name for t, i, name in db.execute(q)}
    combos = [(lr, f) for lr in (0.001, 0.003) for f in (0, 1)]
    for task in ("fine_tune", "evaluate"):
        assert [names[(task, k)] for k in range(4)] == [
            f"trial {k}: learning_rate={lr}, freeze_layers={f}" for k, (lr, f) in enumerate(combos)
        ]
    table = pd.read_csv(run_dir / "compare" / "trials.csv")
    assert list(table["rank"]) == [1, 2, 3, 4] and table.validation_macro_f1.is_monotonic_decreasing
    assert {"fine_tune.learning_rate", "fine_tune.freeze_layers"} <= set(table.columns)
    summary = json.loads((run_dir / "compare" / "summary.json").read_text())
    assert summary["winner"] == int(table.trial[0])
    html = (run_dir / "reports" / "05_compare.html").read_text()
    assert f"Trial {summary['winner']} wins with validation_macro_f1" in html
    assert "logistic-regression baseline" in html

    # MLflow: the run with four child runs; one registered version, alias champion
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    client = MlflowClient()
    parent = m["mlflow"]["run_id"]
    exp = client.get_experiment_by_name("demo_sweep")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    assert client.get_run(parent).info.status == "FINISHED"
    tags = client.get_run(parent).data.tags  # the link back to the Airflow run names its real run id
    assert tags["airflow_run_id"] == m["run_id"] and tags["airflow_run_id"].startswith("manual__")
    assert tags["airflow_url"].endswith("/dags/helical_demo_sweep/runs/" + urllib.parse.quote(m["run_id"], safe=""))
    for child in children:  # each trial's child run links to the same Airflow run (not the folder form of its id)
        assert child.data.tags["airflow_run_id"] == m["run_id"]
        assert child.data.tags["airflow_url"] == tags["airflow_url"]
    champion = client.get_model_version_by_alias("demo_sweep", "champion")
    assert str(champion.version) == "1" and m["registry"]["promoted"] is True

    # the registered model gives the winner's own test logits
    folder = registry.load("models:/demo_sweep@champion", f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    winner = run_dir / "trials" / str(summary["winner"])
    preds = pd.read_csv(winner / "evaluate" / "predictions.csv")
    from helical_workflow import tokenize as tok

    ds = tok.load_tokenized(run_dir)
    by_id = {c: i for i, c in enumerate(ds["cell_id"])}
    ids = [ds[by_id[c]]["input_ids"] for c in preds.cell_id]
    np.testing.assert_array_equal(registry.predict_logits(folder, ids), np.load(winner / "evaluate" / "logits.npy"))

    # a second, worse sweep from the CLI; one trial forced to fail (its checkpoint folder is a file)
    worse = _sweep_params(tmp_path / "second", model_cache, {"fine_tune.learning_rate": [1e-7, 2e-7]}, epochs=1)
    second = tmp_path / "outputs" / "demo_sweep" / "worse"
    (second / "trials" / "1").mkdir(parents=True)
    (second / "trials" / "1" / "checkpoints").write_text("not a folder")
    r = cli("run", worse, "--run-id", "worse", "--quiet", env=env, timeout=1500)
    assert r.returncode == 1 and "1 trial(s) failed (the others ran)" in r.stderr, r.stderr[-3000:]
    m2 = json.loads((second / "run.json").read_text())
    assert m2["stages"]["fine_tune.trial-00001-of-00002"]["status"] == "failed"
    assert m2["stages"]["evaluate.trial-00000-of-00002"]["status"] == "success"
    assert m2["stages"]["compare"]["status"] == "success"
    table2 = pd.read_csv(second / "compare" / "trials.csv")
    assert list(table2.status) == ["success", "failed"] and "checkpoints" in table2.error[1]
    assert m2["registry"]["promoted"] is False and "champion" in m2["registry"]["reason"]
    assert str(client.get_model_version_by_alias("demo_sweep", "champion").version) == "1"
    assert "trial 1 failed" in (second / "reports" / "05_compare.html").read_text()
    # the experiment's runs: the first sweep with its best trial's test score, this one as "this run" with its own
    hist = pd.read_csv(second / "compare" / "history.csv")
    first = hist[hist.run == run_dir.name].iloc[0]
    best = max(
        json.loads((run_dir / "trials" / str(k) / "evaluate" / "metrics.json").read_text())["macro_f1"]
        for k in range(4)
    )
    assert first.status == "FINISHED" and np.isclose(first.test_macro_f1, best)
    this = hist[hist["this run"]].iloc[0]
    assert this.status == "this run" and np.isclose(this.test_macro_f1, summary2_test_f1(second))
    assert ROOT.exists()
