"""Launch a stage: papermill executes its notebook in the ``helical-workflow`` kernel.

This is the one code path used by the Airflow DAG and by ``helical-workflow run``.
It is light (papermill, pydantic, prometheus-client): the Airflow worker imports it;
the heavy work happens in the kernel that papermill starts.

Per stage attempt it:
1. validates the params file (an invalid file fails here, before any compute);
2. creates the run folder and ``run.json`` (idempotent) and checks the upstream stage;
3. marks the stage ``running`` in ``run.json``;
4. runs papermill: the executed notebook goes to ``notebooks/`` in the run folder,
   with the error in it if a cell failed;
5. records status and duration in ``run.json`` and in ``metrics/<stage>_status.prom``
   (pushed to the Pushgateway when configured);
6. finalises in the kernel environment: HTML report in ``reports/``, notebook, report
   and stage metrics logged to the run's MLflow run.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import runs, tracking
from .params import STAGES, Params, load_params

log = logging.getLogger(__name__)

KERNEL_NAME = "helical-workflow"
NOTEBOOKS = {
    "load": "01_load.ipynb",
    "tokenize": "02_tokenize.ipynb",
    "fine_tune": "03_fine_tune.ipynb",
    "evaluate": "04_evaluate.ipynb",
}
UPSTREAM = {"tokenize": "load", "fine_tune": "tokenize", "evaluate": "fine_tune"}


class StageFailed(RuntimeError):
    """A stage's notebook failed. The executed notebook (with the error) is in the run folder."""


def project_root() -> Path:
    env = os.environ.get("HELICAL_WORKFLOW_HOME")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "notebooks").is_dir() and (parent / "params").is_dir():
            return parent
    return Path.cwd()


def notebook_path(stage: str) -> Path:
    return project_root() / "notebooks" / NOTEBOOKS[stage]


def kernel_python(kernel_name: str = KERNEL_NAME) -> str:
    """The interpreter of the kernel environment, from its kernelspec."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(kernel_name)
    except NoSuchKernel:
        raise RuntimeError(
            f"Jupyter kernel {kernel_name!r} is not installed where this process looks "
            f"(JUPYTER_PATH={os.environ.get('JUPYTER_PATH', '')!r}). Fix: run `make env` and set "
            "JUPYTER_PATH=.venv/jupyter/share/jupyter (the Makefile targets do this)."
        ) from None
    return spec.argv[0]


@dataclass
class StageResult:
    stage: str
    run_dir: Path
    status: str
    seconds: float
    notebook: Path


def stage_keys(params: Params, stage: str) -> list[str]:
    """The run.json keys of a stage: one, or one per tokenize shard."""
    n = params.tokenize.shards
    if stage == "tokenize" and n > 1:
        return [runs.stage_key(stage, f"{i}/{n}") for i in range(n)]
    return [stage]


def _upstream_ok(params: Params, run_dir: Path, stage: str) -> None:
    up = UPSTREAM.get(stage)
    if not up:
        return
    statuses = {k: runs.stage_status(run_dir, k) for k in stage_keys(params, up)}
    bad = {k: v for k, v in statuses.items() if v != "success"}
    if bad:
        detail = ", ".join(f"{k}: {v or 'not run'}" for k, v in bad.items())
        raise StageFailed(
            f"stage '{stage}' needs stage '{up}' to have succeeded in {run_dir} ({detail}). Fix: run '{up}' first."
        )


def run_stage(params_path: str | os.PathLike, stage: str, run_id: str, *, shard: str | None = None,
              kernel_name: str = KERNEL_NAME, log_output: bool = True, finalize: bool = True) -> StageResult:
    """Run one stage (or one tokenize shard, ``shard='I/N'``) of a workflow run."""
    if stage not in NOTEBOOKS:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    params = load_params(params_path)
    run_dir = runs.run_dir_for(params.outputs_path, params.experiment, run_id)
    runs.init_run(run_dir, experiment=params.experiment, run_id=run_id, params_snapshot=params.snapshot())
    _upstream_ok(params, run_dir, stage)
    key = runs.stage_key(stage, shard)
    nb_name = NOTEBOOKS[stage] if shard is None else NOTEBOOKS[stage].replace(".ipynb", key[len(stage):] + ".ipynb")
    profile = params.profile_for(stage)
    out_nb = run_dir / "notebooks" / nb_name
    prev = runs.read_manifest(run_dir).get("stages", {}).get(key, {})
    runs.set_stage(run_dir, key, status="running", started=runs.now_iso(), ended=None, error=None,
                   attempt=int(prev.get("attempt", 0)) + 1, notebook=str(out_nb.relative_to(run_dir)))
    t0 = time.perf_counter()
    status, error = "failed", None
    try:
        extra = {"shard": shard} if shard is not None else {}
        _execute(params, stage, run_dir, out_nb, kernel_name=kernel_name, log_output=log_output,
                 cell_timeout=profile.cell_timeout_s, extra=extra)
        status = "success"
    except BaseException as e:  # noqa: BLE001 - recorded, then re-raised
        error = f"{type(e).__name__}: {str(e)[-2000:]}"
        raise
    finally:
        seconds = time.perf_counter() - t0
        runs.set_stage(run_dir, key, status=status, ended=runs.now_iso(), seconds=round(seconds, 3), error=error)
        workflow_s = None
        if stage == STAGES[-1] and status == "success":
            created = runs.read_manifest(run_dir).get("created")
            if created:
                from datetime import datetime, timezone

                workflow_s = (datetime.now(timezone.utc) - datetime.fromisoformat(created)).total_seconds()
        tracking.write_status_metrics(run_dir, params.experiment, stage, status=status, duration_s=seconds,
                                      pushgateway=params.pushgateway, shard=shard, workflow_s=workflow_s)
        if finalize:
            _finalize(params, stage, run_dir, status, kernel_name, key=key, notebook=out_nb)
    return StageResult(stage, run_dir, status, seconds, out_nb)


def _execute(params: Params, stage: str, run_dir: Path, out_nb: Path, *, kernel_name: str, log_output: bool,
             cell_timeout: int | None, extra: dict | None = None) -> None:
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    try:
        pm.execute_notebook(
            str(notebook_path(stage)),
            str(out_nb),
            parameters={"params_path": str(Path(params.source_path)), "run_dir": str(run_dir), **(extra or {})},
            kernel_name=kernel_name,
            log_output=log_output,
            progress_bar=False,
            report_mode=False,
            cwd=str(notebook_path(stage).parent),
            execution_timeout=cell_timeout,
        )
    except PapermillExecutionError as e:
        raise StageFailed(
            f"stage '{stage}' failed in cell {e.exec_count}: {e.ename}: {e.evalue}\n"
            f"The executed notebook with the full error is {out_nb}"
        ) from None


def _finalize(params: Params, stage: str, run_dir: Path, status: str, kernel_name: str, *, key: str,
              notebook: Path) -> None:
    """Render the HTML report and log to MLflow, in the kernel environment. Never masks the stage's result."""
    try:
        py = kernel_python(kernel_name)
    except RuntimeError as e:
        log.warning("%s", e)
        return
    cmd = [py, "-m", "helical_workflow.cli", "finalize-stage", str(params.source_path), str(run_dir), stage,
           "--status", status, "--key", key, "--notebook", str(notebook)]
    env = dict(os.environ)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(project_root()))
    if proc.returncode != 0:
        log.warning("finalising stage %s failed (report/MLflow): %s", stage, proc.stderr[-3000:])
    else:
        sys.stdout.write(proc.stdout)


def run_all(params_path: str | os.PathLike, run_id: str, stages: tuple[str, ...] = STAGES, **kw) -> Path:
    """All stages in order (tokenize shards one after another), as the DAG would run them."""
    params = load_params(params_path)
    run_dir = None
    for stage in stages:
        n = params.tokenize.shards
        shards = [f"{i}/{n}" for i in range(n)] if stage == "tokenize" and n > 1 else [None]
        for shard in shards:
            res = run_stage(params_path, stage, run_id, shard=shard, **kw)
            run_dir = res.run_dir
    assert run_dir is not None
    return run_dir
