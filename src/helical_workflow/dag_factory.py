"""Build one Airflow DAG per params file that has a ``dag:`` section.

Parse time stays cheap: read YAML, validate the schema (pydantic), create four tasks.
No torch, no helical, no dataset access. Each task is a :class:`StageOperator`, a thin
:class:`PapermillOperator` subclass that goes through :func:`helical_workflow.launch.run_stage`
(papermill in the ``helical-workflow`` kernel, executed notebook into the run folder).

An invalid params file still gets its DAG, so the problem is visible in the UI (in the
DAG's docs); a run of it fails in the first task, at validation, before any compute.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from airflow.providers.papermill.operators.papermill import PapermillOperator
from airflow.sdk import DAG

from . import launch
from .params import STAGES, Params, ParamsError, load_params

PARAMS_DIR_ENV = "HELICAL_WORKFLOW_PARAMS_DIR"


class StageOperator(PapermillOperator):
    """Run one workflow stage's notebook with papermill (through the launch module)."""

    template_fields = (*PapermillOperator.template_fields, "params_path")
    ui_color = "#d7ecff"

    def __init__(self, *, params_path: str, stage: str, shard: str | None = None, **kwargs: Any) -> None:
        super().__init__(
            input_nb=str(launch.notebook_path(stage)),
            output_nb=None,
            kernel_name=launch.KERNEL_NAME,
            log_output=True,
            **kwargs,
        )
        self.params_path = params_path
        self.stage = stage
        self.shard = shard

    def execute(self, context: Any) -> str:
        result = launch.run_stage(
            self.params_path, self.stage, context["run_id"], shard=self.shard,
            kernel_name=self.kernel_name or launch.KERNEL_NAME, log_output=self.log_output,
        )
        return str(result.run_dir)  # only a path goes to XCom: stages hand over files


def _dag_section(path: Path) -> tuple[dict[str, Any] | None, bool]:
    """(raw dag section, looks like a workflow params file)."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None, True
    if not isinstance(raw, dict) or "dag" not in raw:
        return None, False
    return (raw.get("dag") or {}), True


def build_dag(path: Path) -> DAG | None:
    dag_raw, is_params = _dag_section(path)
    if not is_params:
        return None
    dag_id = f"helical_{path.stem}"
    params: Params | None = None
    problems: list[str] = []
    try:
        params = load_params(path, check_files=False)
    except ParamsError as e:
        problems = e.problems
    doc = f"Workflow for `{path.name}`: load → tokenize → fine_tune → evaluate, each a papermill notebook."
    if problems:
        doc += "\n\n**This params file is invalid; runs fail at validation:**\n\n" + "\n".join(f"- {p}" for p in problems)
    d = params.dag if params and params.dag else None
    start = d.start_date if d else datetime(2026, 1, 1).date()
    dag = DAG(
        dag_id=dag_id,
        description=(params.description if params else "invalid params file")[:200] or None,
        schedule=(d.schedule if d else None),
        start_date=datetime(start.year, start.month, start.day),
        catchup=d.catchup if d else False,
        max_active_runs=d.max_active_runs if d else 1,
        tags=(list(d.tags) if d else []) + (["invalid-params"] if problems else []),
        doc_md=doc,
        render_template_as_native_obj=True,
        default_args={"owner": "helical-workflow"},
    )
    previous = None
    for stage in STAGES:
        profile = params.profile_for(stage) if params else None
        kw: dict[str, Any] = {}
        if profile and profile.pool:
            kw["pool"] = profile.pool
        common = dict(task_id=stage, params_path=str(path), stage=stage, dag=dag,
                      retries=profile.retries if profile else 0, retry_delay=timedelta(seconds=30), **kw)
        n = params.tokenize.shards if params else 1
        if stage == "tokenize" and n > 1:
            # dynamic task mapping: one task instance per row shard
            task = StageOperator.partial(**common).expand(shard=[f"{i}/{n}" for i in range(n)])
        else:
            task = StageOperator(**common)
        if previous is not None:
            previous >> task
        previous = task
    return dag


def params_dir_default() -> Path:
    env = os.environ.get(PARAMS_DIR_ENV)
    return Path(env) if env else launch.project_root() / "params"


def build_dags(params_dir: Path | None = None) -> dict[str, DAG]:
    params_dir = Path(params_dir) if params_dir else params_dir_default()
    dags = {}
    for path in sorted(params_dir.glob("*.yaml")):
        if path.name == "profiles.yaml":
            continue
        dag = build_dag(path)
        if dag is not None:
            dags[dag.dag_id] = dag
    return dags
