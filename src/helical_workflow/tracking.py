"""Run tracking: Prometheus metrics (text file + Pushgateway) and MLflow.

Prometheus parts are light (prometheus-client) so that the Airflow-side launcher can
write stage status metrics; MLflow is imported only inside the functions that use it
(kernel environment).

Metric names follow Prometheus conventions: ``helical_`` prefix, ``_total`` for
counters, ``_seconds``/``_bytes`` units, labels ``experiment`` and ``stage``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, pushadd_to_gateway, write_to_textfile

from . import runs

if TYPE_CHECKING:
    from .params import Params

log = logging.getLogger(__name__)

disable_created_metrics()  # no *_created series: they clutter the text files and dashboards

PUSH_JOB_STAGE = "helical_workflow_stage"
PUSH_JOB_LAUNCHER = "helical_workflow_launcher"


class StageMetrics:
    """The metrics one stage reports, labelled with experiment and stage."""

    def __init__(self, experiment: str, stage: str, shard: str | None = None):
        self.experiment = experiment
        self.stage = stage
        self.shard = shard
        self.registry = CollectorRegistry()
        self._metrics: dict[str, Any] = {}
        self.values: dict[str, float] = {}

    def _get(self, kind: type, name: str, doc: str, extra: tuple[str, ...]) -> Any:
        key = name
        if key not in self._metrics:
            self._metrics[key] = kind(name, doc, ("experiment", "stage", *extra), registry=self.registry)
        return self._metrics[key]

    def gauge(self, name: str, value: float, doc: str = "", **labels: str) -> None:
        g = self._get(Gauge, name, doc or name, tuple(sorted(labels)))
        g.labels(experiment=self.experiment, stage=self.stage, **labels).set(float(value))
        self.values[name + "".join(f".{v}" for _, v in sorted(labels.items()))] = float(value)

    def count(self, name: str, value: float, doc: str = "", **labels: str) -> None:
        """A counter; prometheus-client appends ``_total`` to ``name``."""
        c = self._get(Counter, name, doc or name, tuple(sorted(labels)))
        c.labels(experiment=self.experiment, stage=self.stage, **labels).inc(float(value))
        self.values[name + "_total" + "".join(f".{v}" for _, v in sorted(labels.items()))] = float(value)

    @property
    def file_key(self) -> str:
        """``stage`` or ``stage.shard-0000i-of-0000n``: names the metrics file."""
        return runs.stage_key(self.stage, self.shard)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(path), self.registry)

    def push(self, gateway: str | None, job: str) -> bool:
        """Push to the Pushgateway when one is configured; never fail the stage for it."""
        if not gateway:
            return False
        try:
            pushadd_to_gateway(
                gateway, job=job, registry=self.registry,
                grouping_key={"experiment": self.experiment, "stage": self.stage, "shard": self.file_key},
                timeout=10,
            )
            return True
        except Exception as e:  # the metrics file in the run folder is still written
            log.warning("could not push metrics to the Pushgateway at %s: %s", gateway, e)
            return False


def write_status_metrics(
    run_dir: Path, experiment: str, stage: str, *, status: str, duration_s: float, pushgateway: str | None,
    shard: str | None = None, workflow_s: float | None = None,
) -> StageMetrics:
    """Written by the launcher after every stage attempt, whatever its outcome.

    ``workflow_s`` (after the last stage): wall time of the whole workflow run so far.
    """
    m = StageMetrics(experiment, stage, shard)
    if workflow_s is not None:
        m.gauge("helical_workflow_duration_seconds", workflow_s, "Wall time of the workflow run, first stage to last")
    m.gauge("helical_stage_duration_seconds", duration_s, "Wall time of the last stage attempt")
    m.gauge("helical_stage_success", 1.0 if status == "success" else 0.0, "1 if the last stage attempt succeeded")
    m.gauge("helical_stage_last_run_timestamp_seconds", time.time(), "When the last stage attempt ended")
    m.count("helical_stage_runs", 1, "Stage attempts by outcome", status=status)
    m.write(Path(run_dir) / "metrics" / f"{m.file_key}_status.prom")
    m.push(pushgateway, PUSH_JOB_LAUNCHER)
    return m


# ---------------------------------------------------------------- MLflow ----------

def tracking_uri(params: "Params") -> str:
    if params.tracking.mlflow_tracking_uri:
        return params.tracking.mlflow_tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{params.outputs_path / 'mlflow.db'}"


def _client(params: "Params"):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(params)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


def ensure_mlflow_run(params: "Params", run_dir: Path) -> str:
    """The MLflow run of this workflow run: created by the first stage, reused by the rest."""
    run_dir = Path(run_dir)
    uri = tracking_uri(params)
    known = runs.read_manifest(run_dir).get("mlflow", {})
    if known.get("run_id") and known.get("tracking_uri") == uri:
        return known["run_id"]
    with runs._locked(run_dir):
        manifest = runs.read_manifest(run_dir)
        known = manifest.get("mlflow", {})
        if known.get("run_id") and known.get("tracking_uri") == uri:  # another store: a new MLflow run there
            return known["run_id"]
        from mlflow.entities import Param

        client = _client(params)
        exp = client.get_experiment_by_name(params.experiment)
        if exp is None:
            artifact_location = None
            if tracking_uri(params).startswith("sqlite:///"):
                artifact_location = (params.outputs_path / "mlartifacts" / params.experiment).as_uri()
            exp_id = client.create_experiment(params.experiment, artifact_location=artifact_location)
        else:
            exp_id = exp.experiment_id
        run = client.create_run(
            exp_id, run_name=run_dir.name,
            tags={"run_dir": str(run_dir), "airflow_run_id": manifest.get("run_id", run_dir.name)},
        )
        flat = _flatten(params.snapshot())
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            client.log_batch(run.info.run_id, params=items[i : i + 100])
        manifest.setdefault("mlflow", {}).update(
            {"run_id": run.info.run_id, "experiment_id": exp_id, "tracking_uri": tracking_uri(params)}
        )
        runs._write_json_atomic(run_dir / runs.MANIFEST, manifest)
        return run.info.run_id


def _log_points(params: "Params", run_dir: Path, points: list[tuple[str, float, int]]) -> None:
    """(key, value, step) triples to the run's MLflow run, in batches."""
    from mlflow.entities import Metric

    run_id = ensure_mlflow_run(params, run_dir)
    ts = int(time.time() * 1000)
    items = [Metric(k.replace("/", "."), float(v), ts, int(step)) for k, v, step in points]
    client = _client(params)
    for i in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[i : i + 500])


def log_metrics(params: "Params", run_dir: Path, metrics: Mapping[str, float], step: int | None = None) -> None:
    """The numeric values of ``metrics`` at one step."""
    _log_points(params, run_dir, [(k, v, step or 0) for k, v in metrics.items()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool)])


def log_metrics_series(params: "Params", run_dir: Path, key: str, points: list[tuple[int, float]]) -> None:
    """One metric at several steps (e.g. the training loss per optimizer step)."""
    _log_points(params, run_dir, [(key, v, step) for step, v in points])


def log_artifacts(params: "Params", run_dir: Path, path: Path, artifact_path: str | None = None) -> None:
    run_id = ensure_mlflow_run(params, run_dir)
    client = _client(params)
    path = Path(path)
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    elif path.exists():
        client.log_artifact(run_id, str(path), artifact_path)


def set_mlflow_status(params: "Params", run_dir: Path, status: str) -> None:
    """FINISHED / FAILED / RUNNING on the workflow's MLflow run."""
    run_id = runs.read_manifest(run_dir).get("mlflow", {}).get("run_id")
    if run_id and status != "RUNNING":
        _client(params).set_terminated(run_id, status=status)


@contextlib.contextmanager
def stage_context(params: "Params", run_dir: Path, stage: str, shard: str | None = None) -> Iterator[StageMetrics]:
    """What a notebook stage wraps its work in: metrics file, Pushgateway, MLflow metrics.

    The metrics are written whether the work succeeds or fails, so a failed stage still
    reports how far it got. Nothing here marks the stage finished: the launcher does.
    """
    run_dir = Path(run_dir)
    m = StageMetrics(params.experiment, stage, shard)
    t0 = time.perf_counter()
    ok = False
    try:
        yield m
        ok = True
    finally:
        m.gauge("helical_stage_work_seconds", time.perf_counter() - t0, "Time spent in the stage's work")
        m.write(run_dir / "metrics" / f"{m.file_key}.prom")
        m.push(params.pushgateway, PUSH_JOB_STAGE)
        if ok:
            log_metrics(params, run_dir, {f"{m.file_key}.{k}": v for k, v in m.values.items()})
