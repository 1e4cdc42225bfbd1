"""Airflow plugin: the API server serves each stage task's HTML report (what the task's "Report" link opens).

``GET /helical-workflow/reports/{dag_id}/{run_id}/{task_id}[?map_index=N]`` sends
``<run folder>/reports/NN_<stage>[.<shard>].html``, the file computed from the DAG's params file, the
run id and the stage (:func:`helical_workflow.links.served_report`), never a path from the request.
It takes the UI's login (its cookie) or a bearer token and the same permission as the task's logs
(read task instances of that DAG). The page is sandboxed (``Content-Security-Policy: sandbox``):
a notebook's output runs in an origin of its own, not with the Airflow session.

Airflow loads it from its plugins folder: the Makefile, the tests and the compose stack set
``AIRFLOW__CORE__PLUGINS_FOLDER`` to this folder. The links themselves need no plugin.
"""

from __future__ import annotations

from airflow.api_fastapi.core_api.security import DagAccessEntity, requires_access_dag
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import FileResponse

from helical_workflow.links import REPORTS_PREFIX

app = FastAPI(title="helical-workflow reports", docs_url=None, redoc_url=None, openapi_url=None)


@app.get(
    "/{dag_id}/{run_id}/{task_id}",
    dependencies=[Depends(requires_access_dag("GET", DagAccessEntity.TASK_INSTANCE))],
)
def report(dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> FileResponse:
    from helical_workflow.dag_factory import params_file
    from helical_workflow.links import served_report

    params = params_file(dag_id)
    path = served_report(params, run_id, task_id, map_index) if params else None
    if path is None:
        raise HTTPException(404, f"no report for {dag_id} / {run_id} / {task_id} (map index {map_index})")
    return FileResponse(
        path,
        media_type="text/html",
        headers={"Content-Security-Policy": "sandbox allow-scripts allow-popups", "Cache-Control": "no-cache"},
    )


class HelicalWorkflowReports(AirflowPlugin):
    name = "helical_workflow_reports"
    fastapi_apps = [{"app": app, "url_prefix": REPORTS_PREFIX, "name": "helical-workflow reports"}]
