"""Annotating new data with a fine-tuned model: the command line, the shards, the outputs, bad inputs,
and the watched folder under a real Airflow scheduler and triggerer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helical_workflow import annotate as an
from helical_workflow import data, registry, runs

from .conftest import (
    AIRFLOW_BIN,
    DEMO_DATA,
    JUPYTER_PATH,
    ROOT,
    cli,
    standalone_settings,
    start_group,
    stop_group,
    trained_demo,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A demo run trained for one epoch and evaluated in-process (conftest.trained_demo)."""
    with trained_demo(tmp_path_factory.mktemp("annotate")) as t:
        yield t


def settings(trained, out: Path, **kw) -> an.Settings:
    return an.Settings.from_params(trained.params, model=str(trained.run_dir), outputs=str(out), **kw)


def env_for(trained, tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "JUPYTER_PATH": JUPYTER_PATH, "HELICAL_WORKFLOW_HOME": str(ROOT)}
    env["HELICAL_WORKFLOW_OUTPUTS"] = str(tmp_path / "outputs")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def test_the_registered_champion_annotates_the_demo_data_as_the_evaluate_stage_predicted(trained, tmp_path):
    """The command line, with models:/demo@champion: same labels (and probabilities) as the run's own
    evaluate stage on its test cells, the three outputs, a clean report, and the input untouched."""
    import mlflow

    client = mlflow.MlflowClient(trained.uri)
    run_id = runs.read_manifest(trained.run_dir)["mlflow"]["run_id"]
    uri = registry.log_model(
        trained.params, trained.run_dir / "model", mlflow_run_id=run_id, tracking_uri=trained.uri, validation={}
    )
    registry.register(
        trained.params, model_uri=uri, metric="val_macro_f1", value=0.5, promote="always", tracking_uri=trained.uri
    )
    assert str(client.get_model_version_by_alias("demo", "champion").version) == "1"
    before = data.file_sha256(DEMO_DATA)
    r = cli(
        "annotate",
        DEMO_DATA,
        "--params",
        trained.params_file,
        "--min-confidence",
        "0.2",
        env=env_for(trained, tmp_path),
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": /" in line)
    assert set(out) >= {"predictions.parquet", "embeddings.npy", "annotated.h5ad", "report"}
    assert "700 cells annotated with demo-v1" in r.stdout
    folder = Path(out["predictions.parquet"]).parent
    assert folder.parent.name.startswith(before[:12]) and folder.name == "demo-v1"
    assert data.file_sha256(DEMO_DATA) == before  # the input is never modified

    preds = an.load_predictions(folder)
    ev = pd.read_csv(trained.run_dir / "evaluate" / "predictions.csv")
    joined = ev.merge(preds, on="cell_id", suffixes=("_evaluate", ""))
    assert len(joined) == len(ev) > 50
    assert (joined["predicted_label_evaluate"] == joined["top1_label"]).all()
    np.testing.assert_allclose(joined["confidence_evaluate"], joined["confidence"], atol=1e-5)
    assert (joined["true_label_evaluate"] == joined["true_label"]).all()  # the input's own labels, carried
    low = preds["confidence"] < 0.2
    assert (preds.loc[low, "predicted_label"] == "unassigned").all()
    assert (preds.loc[~low, "predicted_label"] == preds.loc[~low, "top1_label"]).all()
    assert np.allclose(preds[["top1_probability", "top2_probability", "top3_probability"]].sum(1) <= 1 + 1e-6, True)

    html = Path(out["report"]).read_text()
    for heading in ("Predicted labels", "Confidence", "Embeddings", "least confident", "own labels"):
        assert heading in html
    assert "accuracy" in html and "output_stderr" not in html and "Traceback" not in html

    again = cli("annotate", DEMO_DATA, "--params", trained.params_file, env=env_for(trained, tmp_path), timeout=300)
    assert again.returncode == 0 and "already annotated by demo-v1" in again.stdout


def test_three_shards_equal_one_and_the_annotated_file_keeps_the_input(trained, tmp_path):
    import anndata

    one, _ = an.annotate(DEMO_DATA, settings(trained, tmp_path / "one"))
    three, _ = an.annotate(DEMO_DATA, settings(trained, tmp_path / "three", shards=3))
    p1, p3 = an.load_predictions(one), an.load_predictions(three)
    for col in ("cell_id", "predicted_label", "top1_label", "top2_label", "top3_label", "unassigned"):
        assert p1[col].tolist() == p3[col].tolist()
    np.testing.assert_allclose(p1["confidence"], p3["confidence"], atol=1e-5)
    np.testing.assert_allclose(np.load(one / an.EMBEDDINGS), np.load(three / an.EMBEDDINGS), atol=1e-4)
    m = an.read_manifest(three)
    assert m["status"] == "success" and m["shards"] == ["0/3", "1/3", "2/3"]
    assert not (three / "shards").exists() and not (three / "tokenized").exists()  # scratch removed

    a = anndata.read_h5ad(three / an.ANNOTATED, backed="r")
    b = anndata.read_h5ad(DEMO_DATA, backed="r")
    assert a.shape == b.shape and list(a.obs_names) == list(b.obs_names)
    xa, xb = a.X[:], b.X[:]
    xa, xb = (x.toarray() if hasattr(x, "toarray") else x for x in (xa, xb))
    assert np.array_equal(xa, xb)
    assert a.obsm["X_geneformer"].shape == (700, np.load(three / an.EMBEDDINGS).shape[1])
    assert a.obs["predicted_label"].astype(str).tolist() == p3["predicted_label"].tolist()
    np.testing.assert_allclose(a.obs["predicted_confidence"].to_numpy(), p3["confidence"].to_numpy(), atol=1e-6)
    assert list(b.obs.columns) == [c for c in a.obs.columns if not c.startswith("predicted_")]


def test_a_model_whose_vocabulary_matches_no_gene_fails_before_inference(trained, tmp_path):
    import anndata

    ad = anndata.read_h5ad(DEMO_DATA)
    ad.var_names = [f"NOTAGENE{i}" for i in range(ad.n_vars)]
    path = tmp_path / "alien.h5ad"
    ad.write_h5ad(path)
    r = cli(
        "annotate", path, "--model", trained.run_dir, "--params", trained.params_file, env=env_for(trained, tmp_path)
    )
    assert r.returncode == 2
    assert f"only 0 of the {ad.n_vars} genes of alien.h5ad (0.0%)" in r.stderr and "Fix:" in r.stderr
    assert "Traceback" not in r.stderr
    assert not list((tmp_path / "outputs").glob("annotate/*/*/" + an.MANIFEST))  # nothing opened, nothing done


def test_a_broken_file_fails_with_the_data_error_and_leaves_nothing_that_looks_done(trained, tmp_path):
    path = tmp_path / "truncated.h5ad"
    path.write_bytes(DEMO_DATA.read_bytes()[:5000])
    r = cli(
        "annotate", path, "--model", trained.run_dir, "--params", trained.params_file, env=env_for(trained, tmp_path)
    )
    assert r.returncode == 2
    assert "is not a readable .h5ad file" in r.stderr and "Fix:" in r.stderr and "Traceback" not in r.stderr
    assert not list((tmp_path / "outputs").glob(f"annotate/*/*/{an.PREDICTIONS}"))


def test_the_same_content_under_another_name_is_not_annotated_twice(trained, tmp_path):
    s = settings(trained, tmp_path / "out")
    first, done = an.annotate(DEMO_DATA, s)
    assert not done
    copy = tmp_path / "renamed copy.h5ad"
    shutil.copy(DEMO_DATA, copy)
    second, done = an.annotate(copy, s)
    assert done and second == first


# ------------------------------------------------------------------ the watched folder ---


def test_the_folder_trigger_fires_once_per_complete_new_content(tmp_path):
    code = (
        "import asyncio, json, shutil, sys, time, threading\n"
        "from pathlib import Path\n"
        "from helical_workflow.watch import IncomingH5adTrigger\n"
        "folder = Path(sys.argv[1]); demo = Path(sys.argv[2])\n"
        "t = IncomingH5adTrigger(str(folder), stable_seconds=1.0, poll_seconds=0.2)\n"
        "def writer():\n"
        "    (folder / 'a.h5ad.part').write_bytes(demo.read_bytes())\n"  # a temporary name: ignored
        "    time.sleep(1.5)\n"
        "    (folder / 'a.h5ad.part').rename(folder / 'a.h5ad')\n"
        "    time.sleep(2.5)\n"
        "    shutil.copy(demo, folder / 'same content.h5ad')\n"  # seen content: no event
        "    with open(folder / 'slow.h5ad', 'wb') as f:\n"  # written in place, slowly
        "        for k in range(4):\n"
        "            f.write(b'x' * 1000); f.flush(); time.sleep(0.6)\n"
        "threading.Thread(target=writer, daemon=True).start()\n"
        "out = []\n"
        "async def main():\n"
        "    async def consume():\n"
        "        async for ev in t.run():\n"
        "            out.append({**ev.payload, 't': time.time()})\n"
        "    task = asyncio.ensure_future(consume()); await asyncio.sleep(9); task.cancel()\n"
        "t0 = time.time(); asyncio.run(main())\n"
        "print(json.dumps([{**e, 't': e['t'] - t0} for e in out]))\n"
    )
    folder = tmp_path / "incoming"
    folder.mkdir()
    r = subprocess.run(
        [AIRFLOW_BIN / "python", "-c", code, folder, DEMO_DATA], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr[-2000:]
    events = json.loads(r.stdout.strip().splitlines()[-1])
    names = [Path(e["path"]).name for e in events]
    assert names == ["a.h5ad", "slow.h5ad"], events
    assert events[0]["t"] >= 1.5 + 1.0  # not before the rename, and stable for stable_seconds after it
    assert events[0]["sha256"] == data.file_sha256(DEMO_DATA)
    assert events[1]["size"] == 4000  # picked up complete, not half-written


@pytest.mark.slow
def test_files_dropped_into_the_watched_folder_are_annotated_under_the_scheduler_and_triggerer(trained, tmp_path):
    """`airflow standalone` (scheduler, triggerer, dag-processor, api-server): a complete new file starts one
    annotation run; a half-written file waits until complete; the same content again starts nothing; a
    broken file fails its run with the data error and the next good file still runs."""
    import anndata

    from .conftest import airflow_home, free_port

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    pdir = tmp_path / "params"
    pdir.mkdir()
    raw = json.loads(json.dumps(trained.params.model_dump(mode="json")))
    raw["annotate"].update(model=str(trained.run_dir), min_confidence=0.2)
    raw["watch"] = {"incoming": str(incoming), "stable_seconds": 2, "poll_seconds": 1}
    raw["dag"] = None
    import yaml

    (pdir / "demo.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copy(ROOT / "params" / "profiles.yaml", pdir / "profiles.yaml")
    small = tmp_path / "small.h5ad"
    anndata.read_h5ad(DEMO_DATA)[:200].copy().write_h5ad(small)

    base = {**env_for(trained, tmp_path), "HELICAL_WORKFLOW_OUTPUTS": str(tmp_path / "outputs")}
    port = free_port()
    env = airflow_home(
        tmp_path,
        base,
        pdir,
        HELICAL_ANNOTATE_PARAMS=str(pdir / "demo.yaml"),
        **standalone_settings(port),
        AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC="2",
    )
    log = tmp_path / "standalone.log"
    proc = start_group([AIRFLOW_BIN / "airflow", "standalone"], env, log)

    def dag_runs() -> list[dict]:
        r = subprocess.run(
            [AIRFLOW_BIN / "airflow", "dags", "list-runs", "helical_annotate", "-o", "json"],
            env=env,
            capture_output=True,
            text=True,
        )
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("[{") or ln == "[]"]  # not the log lines
        return json.loads(lines[-1]) if lines else []

    def wait_for(pred, seconds: float, what: str):
        deadline = time.time() + seconds
        while time.time() < deadline:
            runs_ = dag_runs()
            if pred(runs_):
                return runs_
            if proc.poll() is not None:
                break
            time.sleep(3)
        raise AssertionError(f"timed out waiting for {what}; runs: {dag_runs()}\n{log.read_text()[-4000:]}")

    try:
        # a file that lands before the DAG is parsed waits in the folder: the watcher finds it when it starts
        with open(incoming / "first.h5ad", "wb") as f:  # a slow writer, in place: not picked up half-written
            blob = DEMO_DATA.read_bytes()
            step = len(blob) // 4 + 1
            for k in range(0, len(blob), step):
                f.write(blob[k : k + step])
                f.flush()
                time.sleep(1)
        t_complete = time.time()
        done = wait_for(lambda rs: any(r["state"] in ("success", "failed") for r in rs), 300, "the first run")
        assert [r["state"] for r in done] == ["success"], done
        first = list((tmp_path / "outputs").glob(f"annotate/*-first/*/{an.MANIFEST}"))
        assert len(first) == 1 and json.loads(first[0].read_text())["status"] == "success"

        shutil.copy(DEMO_DATA, incoming / "again.h5ad")  # same content: no new run
        (incoming / "broken.h5ad").write_bytes(b"not an h5ad at all")
        wait_for(
            lambda rs: len(rs) >= 2 and all(r["state"] in ("success", "failed") for r in rs), 300, "the broken file"
        )
        shutil.copy(small, incoming / "next.h5ad")
        t_next = time.time()
        wait_for(lambda rs: len(rs) >= 3 and all(r["state"] in ("success", "failed") for r in rs), 300, "the next file")
        time.sleep(8)  # and nothing more comes
        runs_ = sorted(dag_runs(), key=lambda r: r["start_date"])
        assert [r["state"] for r in runs_] == ["success", "failed", "success"], runs_
        assert len(list((tmp_path / "outputs").glob(f"annotate/*-next/*/{an.ANNOTATED}"))) == 1
        assert not list((tmp_path / "outputs").glob("annotate/*-again/*"))
        logs = "\n".join(p.read_text() for p in (tmp_path / "airflow" / "logs").rglob("*.log"))
        assert "broken.h5ad is not a readable .h5ad file" in logs
        # each annotation is an event on the asset helical_annotated, for downstream DAGs
        import sqlite3

        with sqlite3.connect(tmp_path / "airflow" / "airflow.db") as con:
            extras = con.execute(
                "SELECT e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id WHERE a.name = 'helical_annotated'"
            ).fetchall()
        events = [json.loads(x) for (x,) in extras]  # one per annotation run: its folder and its inputs' outputs
        folders = sorted(Path(a["run_dir"]).parent.name.split("-", 1)[1] for e in events for a in e["annotations"])
        assert folders == ["first", "next"], extras
        for e in events:  # each run of the DAG is a run of the stage engine, with a report per stage
            m = runs.read_manifest(Path(e["run"]))
            assert m["workflow"] == "annotate" and {k: v["status"] for k, v in m["stages"].items()} == {
                "annotate_prepare": "success",
                "annotate": "success",
                "annotate_finish": "success",
            }
            assert (Path(e["run"]) / "reports" / "08_annotate_report.html").is_file()
            assert Path(e["annotations"][0]["annotated.h5ad"]).is_file()
        from datetime import datetime

        started = [datetime.fromisoformat(r["start_date"]).timestamp() for r in runs_]
        print(
            f"first file (dropped before the DAG was parsed): run started {started[0] - t_complete:.1f} s after "
            f"it was complete; next file (scheduler warm): {started[2] - t_next:.1f} s after it landed"
        )
    finally:
        stop_group(proc)


def test_the_data_trigger_fires_when_the_training_data_changes(tmp_path):
    """`dag.schedule: on_new_data`: the file as it is when the watcher starts is the baseline; a changed content
    fires once it is stable; touching it without changing the content does not."""
    code = (
        "import asyncio, json, os, sys, time, threading\n"
        "from pathlib import Path\n"
        "from helical_workflow.watch import FileChangedTrigger\n"
        "path = Path(sys.argv[1])\n"
        "t = FileChangedTrigger(str(path), stable_seconds=0.5, poll_seconds=0.2)\n"
        "def writer():\n"
        "    time.sleep(1.5); os.utime(path)\n"  # same content, new mtime: no event
        "    time.sleep(1.5); path.write_bytes(b'version 2')\n"
        "threading.Thread(target=writer, daemon=True).start()\n"
        "out = []\n"
        "async def main():\n"
        "    async def consume():\n"
        "        async for ev in t.run():\n"
        "            out.append(ev.payload)\n"
        "    task = asyncio.ensure_future(consume()); await asyncio.sleep(5); task.cancel()\n"
        "asyncio.run(main())\n"
        "print(json.dumps(out))\n"
    )
    path = tmp_path / "train.h5ad"
    path.write_bytes(b"version 1")
    r = subprocess.run([AIRFLOW_BIN / "python", "-c", code, path], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    events = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(events) == 1 and events[0]["previous"] != events[0]["sha256"]
    assert events[0]["sha256"] == data.file_sha256(path)
