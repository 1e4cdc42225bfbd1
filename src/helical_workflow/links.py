"""Where a stage task's "Report" and "MLflow run" links (Airflow operator extra links) point.

The link classes are in :mod:`helical_workflow.dag_factory`; Airflow 3 calls them in the worker,
right after the task ends (success or failure), and stores each URL as an XCom
(``_link_ReportLink``, ``_link_MlflowRunLink``). The serialized DAG records only each link's name
and XCom key, so the API server and the UI read the URLs back from XCom without importing this
project (Airflow 3.3's ``XComOperatorLink``): the links need no plugin. A plugin serves the reports.

Where the URLs come from (the run folder is deterministic: ``outputs/<experiment>/<run id>/``,
whatever the launcher):

* **Report**: the stage's HTML report ``reports/NN_<stage>[.<shard>].html``, served by the Airflow API
  server itself (``plugins/helical_workflow_reports.py``: ``/helical-workflow/reports/<dag>/<run>/<task>``,
  same login and DAG permissions as the UI; the UI shows only http(s) or same-origin links, never
  ``file://``). With ``$HELICAL_REPORT_BASE_URL`` (another server of the outputs folder, e.g.
  ``make lab``'s ``http://127.0.0.1:8888/files/outputs``) the URL is that base plus the report's path
  under the outputs folder. No link when the stage left no report (it failed before its notebook
  ran), or when the worker cannot see the run folder and no base URL is set.
* **MLflow run**: ``<ui>/#/experiments/<experiment id>/runs/<run id>``, ids from the run's
  ``run.json`` (a sweep trial's own child run from ``trials/<k>/run.json``). ``<ui>`` is
  ``$HELICAL_MLFLOW_UI_URL`` if set, else the tracking URI when it is an MLflow server
  (``http(s)://``). A local store (``sqlite:///``, a folder) has no UI of its own: no link unless
  ``$HELICAL_MLFLOW_UI_URL`` says where ``mlflow ui`` serves it. When the worker cannot read the
  run folder (a Kubernetes pod writing to a volume the worker does not mount), the run is looked
  up on the tracking server by its name (the run folder's).

Light (the stage table, urllib; no Airflow, no MLflow client). A link that cannot be computed is
empty (the API answers null, the UI leaves the button out); computing it never fails the task
(Airflow logs the error).
"""

from __future__ import annotations

import json
import logging
import os
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import stages
from .runs import MANIFEST, mlflow_experiment, run_dir_for, safe_run_id

if TYPE_CHECKING:
    from .params import Params
    from .stages import Shard, Stage

log = logging.getLogger(__name__)

REPORT_BASE_ENV = "HELICAL_REPORT_BASE_URL"
MLFLOW_UI_ENV = "HELICAL_MLFLOW_UI_URL"
LOOKUP_TIMEOUT_S = 5.0
REPORTS_PREFIX = "/helical-workflow/reports"  # the API server's route to the reports (plugins/)


def _shard(stage: "Stage", params: "Params", map_index: int) -> "Shard | None":
    """The shard (or trial) of a task instance: mapped tasks follow the stage's shards in order."""
    shards = stage.shards(params)
    return shards[map_index] if 0 <= map_index < len(shards) else shards[0]


def report_path(params: "Params", stage: str, run_id: str, map_index: int = -1) -> Path:
    """The HTML report of one stage task: ``<run folder>/reports/NN_<stage>[.<shard>].html``."""
    st = stages.get(stage)
    nb = st.notebook_name(_shard(st, params, map_index))
    return _run_dir(params, stage, run_id) / "reports" / Path(nb).with_suffix(".html")


def _run_dir(params: "Params", stage: str, run_id: str) -> Path:
    """The folder of the run a stage task belongs to (training, or annotation)."""
    return run_dir_for(params.outputs_path, params.experiment, run_id, stages.get(stage).workflow)


def report_url(params: "Params", stage: str, run_id: str, map_index: int = -1, dag_id: str | None = None) -> str:
    """The Report link: ``$HELICAL_REPORT_BASE_URL`` + the report's path under the outputs folder; else, for a
    DAG's task, the Airflow API server's own copy (:func:`served_report_url`); else the report's ``file://`` URL."""
    path = report_path(params, stage, run_id, map_index)
    run_dir = path.parent.parent
    if run_dir.is_dir() and not path.is_file():
        return ""  # the run folder is here and the stage left no report
    base = os.environ.get(REPORT_BASE_ENV, "").strip()
    if base:
        rel = path.relative_to(params.outputs_path)
        return f"{base.rstrip('/')}/" + "/".join(urllib.parse.quote(p) for p in rel.parts)
    if not path.is_file():
        return ""  # out of reach here, and no server of the outputs folder to point at
    return served_report_url(dag_id, run_id, stage, map_index) if dag_id else path.as_uri()


def served_report_url(dag_id: str, run_id: str, stage: str, map_index: int = -1) -> str:
    """Where the Airflow API server serves a task's report (``plugins/helical_workflow_reports.py``): relative to
    the UI's origin, or under ``$AIRFLOW__API__BASE_URL`` when Airflow is served elsewhere."""
    base = os.environ.get("AIRFLOW__API__BASE_URL", "").strip().rstrip("/")
    parts = "/".join(urllib.parse.quote(p, safe="") for p in (dag_id, run_id, stage))
    return f"{base}{REPORTS_PREFIX}/{parts}" + (f"?map_index={map_index}" if map_index >= 0 else "")


def served_report(params_file: Path, run_id: str, stage: str, map_index: int = -1) -> Path | None:
    """The report file the API server sends for a task (None when there is none): computed from the run folder
    (found from the DAG's params file, the run id) and the stage, never from a path in the request. The run's
    own pinned params decide its shards and trials."""
    from .params import load_params
    from .runs import Run, pinned

    if stage not in stages.names(None):
        return None
    params = load_params(params_file, check_files=False)
    run_dir = _run_dir(params, stage, run_id)
    if pinned(run_dir):
        params = Run.load(run_dir).params
    shards = stages.get(stage).shards(params)
    if not (map_index == -1 or 0 <= map_index < len(shards)):
        return None
    path = report_path(params, stage, run_id, map_index)
    return path if path.is_file() else None


def _ui_base(tracking_uri: str | None) -> str:
    base = os.environ.get(MLFLOW_UI_ENV, "").strip()
    if not base and tracking_uri and tracking_uri.startswith(("http://", "https://")):
        base = tracking_uri
    return base.rstrip("/")


def _recorded_run(params: "Params", stage: str, run_id: str, map_index: int) -> dict[str, Any] | None:
    """``{"run_id", "experiment_id", "tracking_uri"}`` from run.json (a trial's own child run first)."""
    st = stages.get(stage)
    run_dir = _run_dir(params, stage, run_id)
    shard = _shard(st, params, map_index)
    folders = [run_dir]
    if shard is not None and shard.kind == "trial":
        folders.insert(0, run_dir / "trials" / str(shard.i))
    for d in folders:
        try:
            known = json.loads((d / MANIFEST).read_text()).get("mlflow") or {}
        except (OSError, ValueError):
            continue
        if known.get("run_id") and known.get("experiment_id") is not None:
            return known
    return None


def _rest(base: str, endpoint: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    url = f"{base.rstrip('/')}/api/2.0/mlflow/{endpoint}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=LOOKUP_TIMEOUT_S) as r:
        return json.load(r)


def find_mlflow_run(params: "Params", stage: str, run_id: str, map_index: int = -1) -> dict[str, Any] | None:
    """The workflow run's MLflow run on a tracking server, found by its name (when run.json is out of reach).

    The run is named after its run folder (a trial's child run ``<folder>/trial-<k>``), latest first.
    """
    from .tracking import tracking_uri

    uri = tracking_uri(params)
    if not uri.startswith(("http://", "https://")):
        return None
    shard = _shard(stages.get(stage), params, map_index)
    name = safe_run_id(run_id) + (f"/trial-{shard.i}" if shard is not None and shard.kind == "trial" else "")
    query = urllib.parse.urlencode(
        {"experiment_name": mlflow_experiment(params.experiment, stages.get(stage).workflow)}
    )
    try:
        exp_id = _rest(uri, f"experiments/get-by-name?{query}")["experiment"]["experiment_id"]
        found = _rest(
            uri,
            "runs/search",
            {
                "experiment_ids": [exp_id],
                "filter": f"attributes.run_name = '{name}'",  # safe_run_id: no quotes
                "order_by": ["attributes.start_time DESC"],
                "max_results": 1,
            },
        ).get("runs", [])
    except (OSError, ValueError, KeyError) as e:
        log.warning("MLflow run of %s not found at %s: %s", run_id, uri, e)
        return None
    if not found:
        return None
    return {"run_id": found[0]["info"]["run_id"], "experiment_id": exp_id, "tracking_uri": uri}


def mlflow_url(params: "Params", stage: str, run_id: str, map_index: int = -1, dag_id: str | None = None) -> str:
    known = _recorded_run(params, stage, run_id, map_index) or find_mlflow_run(params, stage, run_id, map_index)
    base = _ui_base(known.get("tracking_uri")) if known else ""
    if not base:
        return ""
    return f"{base}/#/experiments/{known['experiment_id']}/runs/{known['run_id']}"
