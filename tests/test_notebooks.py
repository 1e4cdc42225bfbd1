"""Each notebook runs with papermill in the helical-workflow kernel on the demo data, through
the same launcher the DAG uses; a failing stage is recorded as failed and leaves no output."""

from __future__ import annotations

import json

import nbformat
import numpy as np
import pandas as pd
import pytest

from helical_workflow import launchers, model, runs, stages
from helical_workflow.params import load_params

from .conftest import ROOT, demo_params

pytestmark = pytest.mark.slow


def test_four_notebooks_run_in_order_and_leave_reports(tmp_path, model_cache, workflow_env):
    params_path = demo_params(tmp_path, model_cache=model_cache, fine_tune__epochs=2, evaluate__umap=True)
    params = load_params(params_path)
    run_dir = None
    notebooks_before = sorted(p.name for p in (ROOT / "notebooks").iterdir())
    root = params.outputs_path / "demo"
    for stage in stages.names():
        res = launchers.run_task(params_path, stage, "nb-test", run_root=root, log_output=False)
        assert res.status == "success"
        run_dir = res.run_dir
        nb = nbformat.read(res.notebook, as_version=4)
        assert nb.metadata.kernelspec.name == "helical-workflow"
        errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors
        # a clean report: nothing on stderr (warnings, "Loading weights" lines) in a successful run
        stderr = [o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stderr"]
        assert not stderr, f"{stage}: {stderr}"
        # nor library notes (MLflow's cloudpickle and pip-version warnings when the model is logged)
        stdout = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stdout")
        notes = [ln for ln in stdout.splitlines() if ln.startswith("note:")]
        assert not notes, f"{stage}: {notes}"
        html = (run_dir / "reports" / res.notebook.with_suffix(".html").name).read_text()
        assert (
            len(html) > 10_000
            and "jp-RenderedText" in html
            and 'data-mime-type="application/vnd.jupyter.stderr"' not in html
        )
        # the injected parameters point at this run's own params
        assert any(
            "injected-parameters" in c.metadata.get("tags", []) and str(run_dir / "params") in c.source
            for c in nb.cells
        )
        assert (run_dir / "metrics" / f"{stage}.prom").exists()
    manifest = runs.read_manifest(run_dir)
    assert [manifest["stages"][s]["status"] for s in stages.names()] == ["success"] * len(stages.STAGES)
    assert manifest["versions"]["helical"] == "2.2.0" and "warnings" not in manifest
    # nothing lands in the committed notebooks folder (MLflow's ./mlruns, checkpoints, ...)
    assert sorted(p.name for p in (ROOT / "notebooks").iterdir()) == notebooks_before
    assert manifest["input"]["sha256"] and manifest["mlflow"]["run_id"]
    assert run_dir.parent == params.outputs_path / "demo"

    # the tokenized shards: every kept cell, memory-mapped Arrow with the cell ids
    from helical_workflow.tokenize import load_tokenized

    ds = load_tokenized(run_dir)
    split = pd.read_csv(run_dir / "load" / "split.csv")
    assert sorted(ds["cell_id"]) == sorted(split.loc[split.split != "excluded", "cell_id"])
    assert all(0 < n <= 2048 for n in ds["length"])

    ev = run_dir / "evaluate"
    metrics = json.loads((ev / "metrics.json").read_text())
    preds = pd.read_csv(ev / "predictions.csv")
    logits, emb = np.load(ev / "logits.npy"), np.load(ev / "embeddings.npy")
    assert len(preds) == logits.shape[0] == emb.shape[0] == metrics["n_cells"] == (split.split == "test").sum()
    assert logits.shape[1] == metrics["n_classes"] == 10 and emb.shape[1] == 256
    names = metrics["confusion_matrix"]["labels"]
    assert (preds.predicted_label == [names[i] for i in logits.argmax(1)]).all()
    assert np.isclose(metrics["accuracy"], (preds.true_label == preds.predicted_label).mean())
    assert metrics["accuracy"] > metrics["chance_accuracy"] + 0.15  # clearly better than the majority class
    majority = metrics["baseline_majority"]  # both metrics of the majority-class baseline (no "NaN" macro-F1)
    assert majority["accuracy"] == metrics["chance_accuracy"] and 0 < majority["macro_f1"] < majority["accuracy"]
    assert np.array(metrics["confusion_matrix"]["matrix"]).sum() == len(preds)
    for png in ("confusion_matrix.png", "umap.png", "scores.png"):  # scores.png: the 95 % intervals
        assert (ev / png).stat().st_size > 10_000
    assert metrics["macro_f1_ci"][0] <= metrics["macro_f1"] <= metrics["macro_f1_ci"][1]
    # a stage can be re-run alone against the run folder (what a user does in JupyterLab)
    again = launchers.run_task(params_path, "evaluate", "nb-test", run_root=root, log_output=False)
    assert again.status == "success"
    assert runs.read_manifest(run_dir)["stages"]["evaluate"]["attempt"] == 2
    # model files were loaded from the cache and are still there (helical's downloader never ran)
    assert model.missing_files(params) == []


def test_failing_stage_keeps_its_notebook_marks_failure_and_blocks_the_next(tmp_path, model_cache, workflow_env):
    params_path = demo_params(tmp_path, model_cache=model_cache, data__label_key="cell_type")
    with pytest.raises(runs.StageFailed, match="DatasetError.*'cell_type' is not in adata.obs"):
        launchers.run_task(params_path, "load", "fail-test", log_output=False)
    run_dir = load_params(params_path).outputs_path / "demo" / "fail-test"
    st = runs.read_manifest(run_dir)["stages"]["load"]
    assert st["status"] == "failed" and "cell_type" in st["error"]
    nb = nbformat.read(run_dir / "notebooks" / "01_load.ipynb", as_version=4)
    assert any(o.get("ename") == "DatasetError" for c in nb.cells for o in c.get("outputs", []))
    assert (run_dir / "reports" / "01_load.html").exists()
    assert not (run_dir / "load").exists()
    assert "helical_stage_success" in (run_dir / "metrics" / "load_status.prom").read_text()
    assert (
        'helical_stage_success{experiment="demo",stage="load"} 0.0'
        in (run_dir / "metrics" / "load_status.prom").read_text()
    )
    with pytest.raises(runs.StageNotReady, match="needs 'load' to have succeeded"):
        launchers.run_task(params_path, "tokenize", "fail-test", run_root=run_dir.parent, log_output=False)


def test_invalid_params_fail_before_any_compute(tmp_path, model_cache, workflow_env):
    from helical_workflow.params import ParamsError

    params_path = demo_params(tmp_path, model_cache=model_cache, fine_tune__epochs=-1)
    with pytest.raises(ParamsError, match="fine_tune.epochs"):
        launchers.run_task(params_path, "load", "bad-params", log_output=False)
    assert not (tmp_path / "outputs").exists()
