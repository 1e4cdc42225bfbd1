"""A stage task's "Report" and "MLflow run" links (Airflow operator extra links).

The URL rules, on run folders made here; then the real thing: a stage runs through `airflow dags test`
against a real MLflow server, and the real Airflow REST API (`airflow api-server`, simple auth manager)
serves the links the worker stored, pointing at the MLflow run and at the report, which the API server
itself serves (plugins/helical_workflow_reports.py) to a logged-in user.
"""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.error
import urllib.request

import pytest
import yaml

from helical_workflow import links
from helical_workflow.params import load_params
from helical_workflow.runs import write_json

from .conftest import (
    AIRFLOW_BIN,
    KERNEL_PY,
    ROOT,
    airflow_home,
    demo_params,
    free_port,
    run,
    start_group,
    stop_group,
    wait_healthy,
)

RUN_ID = "manual__2026-01-01T00:00:00+00:00"
RUN_DIR = "manual__2026-01-01T00_00_00_00_00"


@pytest.fixture
def link_env(monkeypatch):
    for k in (links.REPORT_BASE_ENV, links.MLFLOW_UI_ENV, "MLFLOW_TRACKING_URI", "AIRFLOW__API__BASE_URL"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def _reports(run_dir, *names: str):
    """A run folder's ``reports/`` with these (empty) HTML reports."""
    reports = run_dir / "reports"
    reports.mkdir(parents=True)
    for name in names:
        (reports / name).write_text("<html></html>")
    return reports


def test_an_annotation_tasks_links_point_into_its_annotation_run(tmp_path, model_cache, workflow_env, link_env):
    """helical_annotate's tasks get their Report and MLflow links the same way, from the annotation run's folder."""
    params_file = demo_params(tmp_path, model_cache=model_cache, annotate__shards=2)
    params = load_params(params_file, check_files=False)
    run_dir = tmp_path / "outputs" / "annotate" / "runs" / "demo" / RUN_DIR
    reports = _reports(run_dir, "06_annotate_prepare.html", "07_annotate.shard-00001-of-00002.html")
    served = "/helical-workflow/reports/helical_annotate/manual__2026-01-01T00%3A00%3A00%2B00%3A00/annotate_prepare"
    assert links.report_url(params, "annotate_prepare", RUN_ID, -1, "helical_annotate") == served
    assert links.served_report(params_file, RUN_ID, "annotate_prepare") == reports / "06_annotate_prepare.html"
    assert links.served_report(params_file, RUN_ID, "annotate", 1) == reports / "07_annotate.shard-00001-of-00002.html"
    write_json(run_dir / "run.json", {"mlflow": {"run_id": "abc", "experiment_id": "7", "tracking_uri": "sqlite:///x"}})
    link_env.setenv(links.MLFLOW_UI_ENV, "http://mlflow.example")
    assert links.mlflow_url(params, "annotate_finish", RUN_ID) == "http://mlflow.example/#/experiments/7/runs/abc"


def test_report_link_is_the_stage_tasks_own_html_report(tmp_path, model_cache, workflow_env, link_env):
    params_file = demo_params(tmp_path, model_cache=model_cache, tokenize__shards=2)
    params = load_params(params_file, check_files=False)
    run_dir = tmp_path / "outputs" / "demo" / RUN_DIR
    assert links.report_url(params, "load", RUN_ID, -1, "helical_demo") == ""  # no run folder: nothing to point at
    reports = _reports(run_dir, "01_load.html", "02_tokenize.shard-00001-of-00002.html")
    # in Airflow: the API server's copy (plugins/), on the UI's own origin
    served = "/helical-workflow/reports/helical_demo/manual__2026-01-01T00%3A00%3A00%2B00%3A00/load"
    assert links.report_url(params, "load", RUN_ID, -1, "helical_demo") == served
    assert links.served_report(params_file, RUN_ID, "load") == reports / "01_load.html"
    # a mapped task's map index is its shard
    assert links.report_url(params, "tokenize", RUN_ID, 1, "helical_demo").endswith("/tokenize?map_index=1")
    assert links.served_report(params_file, RUN_ID, "tokenize", 1) == reports / "02_tokenize.shard-00001-of-00002.html"
    assert links.report_url(params, "tokenize", RUN_ID, 0, "helical_demo") == ""  # the run folder is here, not it
    for stage, index in (("tokenize", 0), ("tokenize", 2), ("evaluate", -1), ("../reports", -1)):
        assert links.served_report(params_file, RUN_ID, stage, index) is None
    link_env.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example/af/")
    assert links.report_url(params, "load", RUN_ID, -1, "helical_demo") == "https://airflow.example/af" + served
    assert links.report_url(params, "load", RUN_ID) == (reports / "01_load.html").as_uri()  # outside Airflow
    link_env.setenv(links.REPORT_BASE_ENV, "http://reports.example/outputs/")
    expected = f"http://reports.example/outputs/demo/{RUN_DIR}/reports/01_load.html"
    assert links.report_url(params, "load", RUN_ID, -1, "helical_demo") == expected
    # a run folder out of reach (a pod on a volume the worker does not mount): the base URL and the known path
    link_env.setenv("HELICAL_WORKFLOW_OUTPUTS", str(tmp_path / "elsewhere"))
    far = load_params(params_file, check_files=False)
    assert links.report_url(far, "fine_tune", RUN_ID, -1, "helical_demo").endswith(
        f"/demo/{RUN_DIR}/reports/03_fine_tune.html"
    )
    link_env.delenv(links.REPORT_BASE_ENV)
    assert links.report_url(far, "fine_tune", RUN_ID, -1, "helical_demo") == ""


def test_mlflow_link_needs_a_ui(tmp_path, model_cache, workflow_env, link_env):
    params = load_params(demo_params(tmp_path, model_cache=model_cache), check_files=False)
    run_dir = tmp_path / "outputs" / "demo" / RUN_DIR
    db = f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    write_json(run_dir / "run.json", {"mlflow": {"run_id": "abc", "experiment_id": "3", "tracking_uri": db}})
    assert links.mlflow_url(params, "load", RUN_ID) == ""  # a local store has no UI of its own
    link_env.setenv(links.MLFLOW_UI_ENV, "http://127.0.0.1:5000/")
    assert links.mlflow_url(params, "load", RUN_ID) == "http://127.0.0.1:5000/#/experiments/3/runs/abc"
    link_env.delenv(links.MLFLOW_UI_ENV)
    server = {"run_id": "def", "experiment_id": "7", "tracking_uri": "http://mlflow:5000"}
    write_json(run_dir / "run.json", {"mlflow": server})
    assert links.mlflow_url(params, "evaluate", RUN_ID) == "http://mlflow:5000/#/experiments/7/runs/def"
    link_env.setenv(links.MLFLOW_UI_ENV, "https://mlflow.example.org")  # what a browser reaches
    assert links.mlflow_url(params, "evaluate", RUN_ID) == "https://mlflow.example.org/#/experiments/7/runs/def"


def test_a_sweep_trials_mlflow_link_is_its_child_run(tmp_path, model_cache, workflow_env, link_env):
    sweep = {"method": "grid", "grid": {"fine_tune.learning_rate": [1e-3, 2e-3]}}
    params = load_params(demo_params(tmp_path, model_cache=model_cache, sweep=sweep), check_files=False)
    run_dir = tmp_path / "outputs" / "demo" / RUN_DIR
    ui = "http://mlflow:5000"
    write_json(run_dir / "run.json", {"mlflow": {"run_id": "parent", "experiment_id": "1", "tracking_uri": ui}})
    write_json(
        run_dir / "trials" / "1" / "run.json",
        {"mlflow": {"run_id": "child1", "experiment_id": "1", "tracking_uri": ui}},
    )
    assert links.mlflow_url(params, "fine_tune", RUN_ID, 1) == f"{ui}/#/experiments/1/runs/child1"
    assert links.mlflow_url(params, "fine_tune", RUN_ID, 0) == f"{ui}/#/experiments/1/runs/parent"  # not yet its own
    assert links.mlflow_url(params, "compare", RUN_ID) == f"{ui}/#/experiments/1/runs/parent"


# ------------------------------------------------------------------ the real thing ---------------------------


def _http(url: str, *, body: dict | None = None, token: str | None = None) -> tuple[int, dict | str]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=15) as r:
            text = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        text, status = e.read().decode(), e.code
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


GET_LINKS = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
from airflow.models.taskinstancekey import TaskInstanceKey
from airflow.serialization.serialized_objects import DagSerialization
dag_id, run_id = sys.argv[2], sys.argv[3]
dag = DagBag(sys.argv[1]).dags[dag_id]
served = DagSerialization.from_dict(DagSerialization.to_dict(dag))  # what the API server loads from the DB
out = {}
for t in dag.tasks:  # what the worker does when a task ends (task_runner.finalize)
    key = TaskInstanceKey(dag_id, t.task_id, run_id)
    out[t.task_id] = {"kind": type(t).__name__, "served": sorted(served.get_task(t.task_id).extra_links),
                      **{l.name: l.get_link(t, ti_key=key) for l in t.operator_extra_links}}
print(json.dumps(out))
"""


def _worker_links(dag_id: str, run_id: str, env: dict[str, str]) -> dict:
    r = run([AIRFLOW_BIN / "python", "-c", GET_LINKS, ROOT / "dags", dag_id, run_id], env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_airflow_api_serves_a_stage_tasks_report_and_mlflow_links(tmp_path, model_cache, workflow_env, link_env):
    procs: list[subprocess.Popen] = []
    try:
        # a real MLflow tracking server (the kernel environment's MLflow), SQLite store, artifacts served
        ml_port = free_port()
        ml_log = tmp_path / "mlflow.log"
        ml_env = {k: v for k, v in workflow_env.items() if not k.startswith("MLFLOW_")}
        procs.append(
            start_group(
                [
                    KERNEL_PY.parent / "mlflow",
                    "server",
                    "--host=127.0.0.1",
                    f"--port={ml_port}",
                    f"--backend-store-uri=sqlite:///{tmp_path / 'mlflow-server.db'}",
                    f"--artifacts-destination={tmp_path / 'mlartifacts'}",
                    "--serve-artifacts",
                    "--workers=1",
                ],
                ml_env,
                ml_log,
                tmp_path,
            )
        )
        ml_url = f"http://127.0.0.1:{ml_port}"
        params = demo_params(tmp_path, model_cache=model_cache, tracking__mlflow_tracking_uri=ml_url)
        # the same experiment through the other launchers (not run: their links are computed the same way)
        other = yaml.safe_load(params.read_text())
        other["stage_profiles"] = {"load": "gpu-k8s", "tokenize": "cpu-docker"}
        (params.parent / "elsewhere.yaml").write_text(yaml.safe_dump(other, sort_keys=False))
        api_port = free_port()
        env = airflow_home(tmp_path, workflow_env, params.parent, AIRFLOW__API__PORT=str(api_port))
        wait_healthy(f"{ml_url}/health", procs[0], ml_log, 180)

        # the smallest real run: the load stage (the other tasks are marked successful without running)
        r = run(
            [AIRFLOW_BIN / "airflow", "dags", "test", "helical_demo", "2026-01-01"]
            + ["--mark-success-pattern", "tokenize|fine_tune|evaluate|compare"],
            env=env,
            timeout=600,
        )
        assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
        (run_dir,) = (tmp_path / "outputs" / "demo").iterdir()
        manifest = json.loads((run_dir / "run.json").read_text())
        assert manifest["stages"]["load"]["status"] == "success"
        report = run_dir / "reports" / "01_load.html"
        assert report.is_file()
        known = manifest["mlflow"]
        assert known["tracking_uri"] == ml_url
        status, got = _http(f"{ml_url}/api/2.0/mlflow/runs/get?run_id={known['run_id']}")
        assert status == 200 and got["run"]["info"]["experiment_id"] == known["experiment_id"]

        # the real API server on the same metadata DB, simple auth manager: log in, ask for the links
        api_log = tmp_path / "api.log"
        procs.append(
            start_group(
                [AIRFLOW_BIN / "airflow", "api-server", "--host", "127.0.0.1", "--port", api_port],
                env,
                api_log,
                tmp_path,
            )
        )
        api = f"http://127.0.0.1:{api_port}"
        wait_healthy(f"{api}/api/v2/monitor/health", procs[1], api_log, 240)
        passwords = json.loads((tmp_path / "airflow" / "simple_auth_manager_passwords.json.generated").read_text())
        status, login = _http(f"{api}/auth/token", body={"username": "admin", "password": passwords["admin"]})
        assert status == 201, login
        token = login["access_token"]
        status, runs = _http(f"{api}/api/v2/dags/helical_demo/dagRuns", token=token)
        assert status == 200, runs
        (dag_run,) = runs["dag_runs"]
        assert dag_run["dag_run_id"] == manifest["run_id"]
        quoted = urllib.request.quote(dag_run["dag_run_id"], safe="")
        status, got = _http(f"{api}/api/v2/dags/helical_demo/dagRuns/{quoted}/taskInstances/load/links", token=token)
        assert status == 200, got
        mlflow_link = f"{ml_url}/#/experiments/{known['experiment_id']}/runs/{known['run_id']}"
        report_link = f"/helical-workflow/reports/helical_demo/{quoted}/load"  # on the UI's own origin
        assert got["extra_links"] == {"MLflow run": mlflow_link, "Report": report_link}
        # the API server serves that report (plugins/), to a logged-in user with access to the DAG, sandboxed
        with urllib.request.urlopen(
            urllib.request.Request(api + report_link, headers={"Authorization": f"Bearer {token}"}), timeout=15
        ) as resp:
            assert resp.headers["Content-Type"].startswith("text/html")
            assert resp.headers["Content-Security-Policy"].startswith("sandbox")
            assert resp.read() == report.read_bytes()
        assert _http(api + report_link)[0] == 401
        assert _http(api + report_link.replace("/load", "/evaluate"), token=token)[0] == 404
        # a task marked successful without running has no links, and says so rather than pointing anywhere
        status, got = _http(f"{api}/api/v2/dags/helical_demo/dagRuns/{quoted}/taskInstances/compare/links", token=token)
        assert status == 200 and got["extra_links"] == {"MLflow run": None, "Report": None}
        # kubernetes and docker stages (not run here): the worker computes the same links from the run id (the run
        # folder is deterministic) and, when the run folder is out of its reach, finds the run on the tracking
        # server; the serialized DAG names both links for every task (Airflow 3.3's GET .../tasks lists no
        # extra_links for any operator: its TaskResponse reads a field it does not have)
        other_links = _worker_links("helical_elsewhere", manifest["run_id"], env)
        assert other_links["load"] == {
            "kind": "KubernetesStageOperator",
            "served": ["MLflow run", "Report"],
            "Report": f"/helical-workflow/reports/helical_elsewhere/{quoted}/load",
            "MLflow run": mlflow_link,
        }
        assert other_links["tokenize"]["kind"] == "DockerStageOperator"
        assert all(t["served"] == ["MLflow run", "Report"] for t in other_links.values())
        far = {
            **env,
            "HELICAL_WORKFLOW_OUTPUTS": str(tmp_path / "not-mounted"),
            links.REPORT_BASE_ENV: "http://r.example",
        }
        assert _worker_links("helical_elsewhere", manifest["run_id"], far)["load"] == {
            "kind": "KubernetesStageOperator",
            "served": ["MLflow run", "Report"],
            "Report": f"http://r.example/demo/{run_dir.name}/reports/01_load.html",
            "MLflow run": mlflow_link,
        }
    finally:
        for p in procs:
            stop_group(p, signals=(signal.SIGTERM, signal.SIGKILL))
