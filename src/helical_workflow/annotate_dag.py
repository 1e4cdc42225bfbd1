"""The ``helical_annotate`` DAG: annotate new ``.h5ad`` files with the experiment's model.

Scheduled on the watched folder's asset (:mod:`helical_workflow.watch`): a complete new file in
``watch.incoming`` starts a run for it. It can also be triggered by hand with ``input`` (and optionally
``model``, ``min_confidence``, ``shards``) in the Trigger form or ``conf``.

Tasks, each running ``helical-workflow annotate-step`` in the kernel environment:

* ``prepare``: for each input, check the file and the model (gene coverage), open its annotation
  folder, or find that this content was already annotated by this model version;
* ``annotate``: mapped over every (input, row shard): tokenize + batched inference;
* ``finish``: mapped over the inputs: merge the shards, write the outputs and the report, and emit an
  event on the asset :data:`ANNOTATED` (``extra``: the folder, input, model) for downstream DAGs;
* ``check``: fails the run, naming each file and its error, when an input could not be annotated
  (the other inputs of the run are annotated all the same).

Built from the params file ``$HELICAL_ANNOTATE_PARAMS`` (default: ``demo.yaml`` in the params folder):
its ``annotate:`` and ``watch:`` sections, profiles, tracking and outputs.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Asset, AssetWatcher, Param, task

from . import launchers
from .params import Params, ParamsError, load_params

ANNOTATE_PARAMS_ENV = "HELICAL_ANNOTATE_PARAMS"
DAG_ID = "helical_annotate"
ANNOTATED = Asset(name="helical_annotated", uri="helical://annotated")


def _step(args: list[str], params_path: str, options: dict[str, Any]) -> dict[str, Any]:
    """``helical-workflow annotate-step ...`` in the kernel environment; its last stdout line is JSON."""
    cmd = ["annotate-step", *args, "--params", params_path]
    for k, v in options.items():
        if v not in (None, ""):
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    p = launchers.kernel_cli(cmd, cwd=launchers.project_root())
    print(p.stdout[-20000:], end="")
    print(p.stderr[-20000:], end="")
    if p.returncode != 0:
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("annotate failed:")]
        raise RuntimeError(lines[-1] if lines else f"annotate-step {args[0]} exited {p.returncode}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def build(params_path: Path) -> DAG | None:
    try:
        params: Params = load_params(params_path, check_files=False)
    except ParamsError:
        return None  # the training DAG of the same file shows the problem
    incoming = params.resolve(params.watch.incoming)
    watched = Asset(
        name="helical_incoming",
        uri=incoming.as_uri(),
        watchers=[
            AssetWatcher(
                name="incoming_h5ad",
                trigger=_trigger(str(incoming), params.watch.stable_seconds, params.watch.poll_seconds),
            )
        ],
    )
    a = params.annotate
    model = a.model or f"models:/{params.registered_model}@champion"
    pp = str(Path(params_path).resolve())
    with DAG(
        dag_id=DAG_ID,
        description=f"Annotate new .h5ad files in {params.watch.incoming} with {model}",
        schedule=[watched],
        start_date=datetime(2026, 1, 1),
        catchup=False,
        max_active_runs=4,
        # watching is what this DAG is for: it starts unpaused, so a file dropped in the folder is annotated
        is_paused_upon_creation=False,
        tags=["annotate", params.experiment],
        params={
            "input": Param("", type="string", description="an .h5ad to annotate (a hand-triggered run)"),
            "model": Param(model, type="string", description="models:/<name>@<alias>, models:/<name>/<v> or a run"),
            "min_confidence": Param(a.min_confidence, type="number", minimum=0, maximum=1),
            "shards": Param(a.shards, type="integer", minimum=1, maximum=512),
        },
        doc_md=(__doc__ or "") + f"\n\nWatched folder: `{incoming}` (stable for {params.watch.stable_seconds:g} s). "
        f"Model: `{model}`. Outputs: `{params.outputs_path / 'annotate'}/`.",
        default_args={"owner": "helical-workflow", "retries": 0},
    ) as dag:

        @task
        def prepare(**context: Any) -> dict[str, Any]:
            inputs = _inputs(context)
            if not inputs:
                raise ValueError(
                    "no input: this run was neither started by a file in the watched folder nor given one. "
                    'Fix: trigger with conf {"input": "/path/to/file.h5ad"} or drop the file into ' + str(incoming)
                )
            p = context["params"]
            opts = {
                "model": p.get("model") or model,
                "min_confidence": p.get("min_confidence"),
                "shards": p.get("shards"),
            }
            jobs, runs_, errors, done = [], [], [], []
            for path in inputs:
                try:
                    r = _step(["prepare", path], pp, opts)
                except Exception as e:  # a broken file fails the run at `check`; the other files go on
                    print(f"ERROR {path}: {e}")
                    errors.append({"input": path, "error": str(e)})
                    continue
                if r["done"]:
                    print(f"{path}: already annotated by this model version: {r['run_dir']}")
                    done.append(r["run_dir"])
                    continue
                runs_.append(r["run_dir"])
                jobs += [{"run_dir": r["run_dir"], "shard": s} for s in r["shards"]]
            return {"jobs": jobs, "runs": runs_, "errors": errors, "done": done, "options": opts}

        @task
        def jobs_of(prepared: dict[str, Any]) -> list[dict[str, Any]]:
            return prepared["jobs"]

        @task
        def runs_of(prepared: dict[str, Any]) -> list[str]:
            return prepared["runs"]

        @task
        def annotate(job: dict[str, Any]) -> dict[str, Any]:
            return _step(["shard", job["run_dir"], "--shard", job["shard"]], pp, {})

        @task(outlets=[ANNOTATED])
        def finish(run_dir: str, **context: Any) -> dict[str, Any]:
            out = _step(["finish", run_dir], pp, {})
            context["outlet_events"][ANNOTATED].extra = {
                "run_dir": run_dir,
                "annotated": out["outputs"]["annotated.h5ad"],
                "predictions": out["outputs"]["predictions.parquet"],
                "report": out.get("report"),
            }
            return out

        @task(trigger_rule="all_done")
        def check(prepared: dict[str, Any]) -> None:
            if prepared["errors"]:
                raise RuntimeError(
                    "could not annotate: "
                    + "; ".join(
                        f"{e['input']}: {e['error'].removeprefix('annotate failed: ')}" for e in prepared["errors"]
                    )
                )

        prepared = prepare()
        shards = annotate.expand(job=jobs_of(prepared))
        finished = finish.expand(run_dir=runs_of(prepared))
        shards >> finished >> check(prepared)
    return dag


def _trigger(directory: str, stable: float, poll: float):
    from .watch import IncomingH5adTrigger

    return IncomingH5adTrigger(directory=directory, stable_seconds=stable, poll_seconds=poll)


def _inputs(context: dict[str, Any]) -> list[str]:
    """The files of this run: from the watcher's events, else the ``input`` param (a hand-triggered run)."""
    files: list[str] = []
    for events in (context.get("triggering_asset_events") or {}).values():
        for ev in events:
            payload = (ev.extra or {}).get("payload") or {}
            if payload.get("path") and payload["path"] not in files:
                files.append(payload["path"])
    given = (context.get("params") or {}).get("input")
    if not files and given:
        files.append(str(Path(given).expanduser()))
    return files


def build_annotate_dags(params_dir: Path | None = None) -> dict[str, DAG]:
    from .dag_factory import params_dir_default

    env = os.environ.get(ANNOTATE_PARAMS_ENV)
    path = Path(env) if env else Path(params_dir or params_dir_default()) / "demo.yaml"
    if not path.is_file():
        return {}
    dag = build(path)
    return {DAG_ID: dag} if dag is not None else {}
