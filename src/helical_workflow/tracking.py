"""Run tracking: Prometheus metrics (text file + Pushgateway) and MLflow.

Prometheus parts are light (prometheus-client) so that the Airflow-side launcher can
write stage status metrics; MLflow is imported only where it is used (kernel environment).

Metric names, types and help come from the stage table (:mod:`helical_workflow.stages`);
a metric that is not declared there cannot be written. They follow Prometheus
conventions: ``helical_`` prefix, ``_total`` for counters, ``_seconds``/``_bytes`` units,
labels ``experiment`` and ``stage``.

Neither an unreachable Pushgateway nor an unreachable MLflow server fails a stage: the
metrics files in the run folder are always written, and what could not be sent is noted
in ``run.json`` (``warnings``). MLflow calls that fail for a reason that passes (server
down, timeout, 5xx, a locked SQLite store) are kept in the run folder
(``mlflow_pending.jsonl``) and sent again when a stage finishes, or by
``helical-workflow mlflow-sync RUN_DIR``; once a call has failed, the process stops
waiting on the server and keeps the rest for later.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    pushadd_to_gateway,
    write_to_textfile,
)

from .files import write_json
from .stages import Shard, Stage

if TYPE_CHECKING:
    from .params import Params
    from .runs import Attempt, Run

log = logging.getLogger(__name__)

disable_created_metrics()  # no *_created series: they clutter the text files and dashboards

PUSH_JOB_STAGE = "helical_workflow_stage"
PUSH_JOB_LAUNCHER = "helical_workflow_launcher"


class StageMetrics:
    """The metrics one stage (or shard) reports, labelled with experiment and stage."""

    def __init__(self, experiment: str, stage: Stage, shard: Shard | None = None):
        self.experiment = experiment
        self.stage = stage
        self.shard = shard
        self.registry = CollectorRegistry()
        self._metrics: dict[str, Any] = {}
        self.values: dict[str, float] = {}

    @property
    def key(self) -> str:
        """``stage`` or ``stage.shard-0000i-of-0000n``: names the metrics file and the MLflow keys."""
        return self.stage.key(self.shard)

    def set(self, name: str, value: float, **labels: str) -> None:
        """Set a gauge, or add to a counter: the stage table says which, and gives its help text."""
        decl = self.stage.metric(name)
        if set(labels) != set(decl.labels):
            raise ValueError(f"metric {decl.name} takes labels {decl.labels}, got {tuple(labels)}")
        if decl.name not in self._metrics:
            kind = Gauge if decl.kind == "gauge" else Counter
            self._metrics[decl.name] = kind(
                decl.name, decl.help, ("experiment", "stage", *decl.labels), registry=self.registry
            )
        series = self._metrics[decl.name].labels(experiment=self.experiment, stage=self.stage.name, **labels)
        series.set(float(value)) if decl.kind == "gauge" else series.inc(float(value))
        self.values[decl.series + "".join(f".{labels[k]}" for k in decl.labels)] = float(value)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(path), self.registry)  # writes a temporary file and renames it

    def push(self, gateway: str | None, job: str) -> bool | None:
        """Push to the Pushgateway when one is configured (None when not); never raises."""
        if not gateway:
            return None
        try:
            pushadd_to_gateway(
                gateway,
                job=job,
                registry=self.registry,
                timeout=10,
                grouping_key={"experiment": self.experiment, "stage": self.stage.name, "shard": self.key},
            )
            return True
        except Exception as e:  # the metrics file in the run folder is still written
            log.warning("could not push metrics to the Pushgateway at %s: %s", gateway, e)
            return False


def write_status_metrics(run: "Run", a: "Attempt", *, workflow_s: float | None = None) -> bool:
    """Written after every stage attempt, whatever its outcome. False if a configured push failed.

    ``workflow_s`` (after the last stage): wall time of the whole workflow run so far.
    """
    m = StageMetrics(run.params.experiment, a.stage, a.shard)
    if workflow_s is not None:
        m.set("helical_workflow_duration_seconds", workflow_s)
    m.set("helical_stage_duration_seconds", a.seconds)
    m.set("helical_stage_success", 1.0 if a.status == "success" else 0.0)
    m.set("helical_stage_last_run_timestamp_seconds", time.time())
    m.set("helical_stage_runs", 1, status=a.status)
    m.write(run.dir / "metrics" / f"{m.key}_status.prom")
    return m.push(run.params.pushgateway, PUSH_JOB_LAUNCHER) is not False


# ---------------------------------------------------------------- MLflow ----------


def tracking_uri(params: "Params") -> str:
    if params.tracking.mlflow_tracking_uri:
        return params.tracking.mlflow_tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{params.outputs_path / 'mlflow.db'}"


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


def airflow_link(run_id: str) -> dict[str, str]:
    """Tags that lead from an MLflow run back to its Airflow DAG run (inside an Airflow task)."""
    from urllib.parse import quote

    dag_id = os.environ.get("AIRFLOW_CTX_DAG_ID")
    if not dag_id:
        return {}
    base = os.environ.get("AIRFLOW__API__BASE_URL", "http://localhost:8080").rstrip("/")
    return {"airflow_dag_id": dag_id, "airflow_url": f"{base}/dags/{dag_id}/runs/{quote(run_id, safe='')}"}


PENDING = "mlflow_pending.jsonl"  # MLflow calls that failed for a passing reason, in order, in the run folder
# An MLflow client retries a refused connection for ~4 minutes (7 retries, backoff 2) per call: a stage makes
# dozens. Here one bounded try (~10 s), then the process defers to the pending file. The user's settings win.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
_PASSING = (
    "max retries exceeded",
    "connection",
    "timed out",
    "timeout",
    "temporarily unavailable",
    "database is locked",
    "503",
    "502",
    "504",
    "429",
    "bad gateway",
    "service unavailable",
)


def passing_failure(e: BaseException) -> bool:
    """A failure worth sending again later (server down or overloaded), not a bad request."""
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(e).__name__}: {e}".lower()
    return any(p in text for p in _PASSING)


class MlflowRun:
    """The MLflow run of one workflow run: one client per process, created by the first stage.

    Every method logs and returns; a failure (server down, store locked) becomes a warning in
    ``run.json`` instead of failing the stage, and a call that can be sent again later is kept in
    the run folder's ``mlflow_pending.jsonl`` (:meth:`flush` sends it).
    """

    _cache: ClassVar[dict[tuple[str, str], "MlflowRun"]] = {}
    _down: ClassVar[dict[str, str]] = {}  # tracking URI -> why, in this process: calls go to the pending file

    def __init__(self, run: "Run"):
        self.run = run
        self.uri = tracking_uri(run.params)
        self._client = None
        self._id: str | None = None

    @classmethod
    def of(cls, run: "Run") -> "MlflowRun":
        key = (tracking_uri(run.params), str(run.dir))
        if key not in cls._cache:
            cls._cache[key] = cls(run)
        return cls._cache[key]

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            if self.uri.startswith("sqlite:///"):
                Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            if self.uri.startswith(("http://", "https://")):
                for k, v in HTTP_DEFAULTS.items():
                    os.environ.setdefault(k, v)
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    @property
    def id(self) -> str:
        """The MLflow run id, created (with the params) by the first stage that logs, then reused."""
        if self._id is None:
            known = self.run.manifest.get("mlflow", {})
            if not (known.get("run_id") and known.get("tracking_uri") == self.uri):
                with self.run.locked():  # mapped shards may get here at the same time
                    known = self.run.manifest.get("mlflow", {})
                    if not (known.get("run_id") and known.get("tracking_uri") == self.uri):
                        known = self._create()
            self._id = known["run_id"]
        return self._id

    def _create(self) -> dict[str, str]:
        from mlflow.entities import Param

        params, client = self.run.params, self.client
        experiment = self.run.mlflow_experiment
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            artifact_location = None
            if self.uri.startswith("sqlite:///"):
                artifact_location = (params.outputs_path / "mlartifacts" / experiment).as_uri()
            exp_id = client.create_experiment(
                experiment,
                artifact_location=artifact_location,
                tags={"mlflow.experimentKind": "custom_model_development"},
            )
        else:
            exp_id = exp.experiment_id
        # the Airflow run id as the launcher recorded it (a notebook only knows the folder-safe form)
        run_id = self.run.manifest.get("run_id") or self.run.run_id
        tags = {"run_dir": str(self.run.dir), "airflow_run_id": run_id, **airflow_link(run_id)}
        name = self.run.dir.name
        parent = self.run.manifest.get("parent")
        if parent:  # a sweep trial: a child run under the run's own MLflow run
            root = self.run.root if self.run.root is not self.run else type(self.run)(params, Path(parent))
            tags["mlflow.parentRunId"] = MlflowRun.of(root).id
            name = f"{Path(parent).name}/trial-{self.run.manifest.get('trial')}"
        mrun = client.create_run(exp_id, run_name=name, tags=tags)
        overrides = {**self.run.manifest.get("overrides", {}), **params.overrides}  # run.json keeps them all
        logged = {**_flatten(params.snapshot()), **{f"override.{k}": str(v) for k, v in overrides.items()}}
        items = [Param(k, v) for k, v in logged.items()]
        for i in range(0, len(items), 100):
            client.log_batch(mrun.info.run_id, params=items[i : i + 100])
        known = {"run_id": mrun.info.run_id, "experiment_id": exp_id, "tracking_uri": self.uri}
        # the caller holds the run lock: write run.json directly rather than through Run.update
        manifest = self.run.manifest
        manifest["mlflow"] = known
        write_json(self.run.manifest_file, manifest)
        return known

    # --- sending, or keeping for later --------------------------------------------------
    @property
    def pending_file(self) -> Path:
        return self.run.dir / PENDING

    def _send(self, entry: dict[str, Any]) -> None:
        op = entry["op"]
        if op == "metrics":
            from mlflow.entities import Metric

            items = [
                Metric(k.replace("/", "."), float(v), int(entry["ts"]), int(step)) for k, v, step in entry["points"]
            ]
            for i in range(0, len(items), 500):
                self.client.log_batch(self.id, metrics=items[i : i + 500])
        elif op == "artifacts":
            path = Path(entry["path"])
            if path.is_dir():
                self.client.log_artifacts(self.id, str(path), entry.get("artifact_path"))
            elif path.exists():
                self.client.log_artifact(self.id, str(path), entry.get("artifact_path"))
        elif op == "terminate":
            self.client.set_terminated(self.id, status=entry["status"])
        else:
            raise ValueError(f"unknown MLflow call {op!r} in {self.pending_file}")

    def _keep(self, entries: list[dict[str, Any]]) -> None:
        with self.run.locked():
            with open(self.pending_file, "a") as f:
                for e in entries:
                    f.write(json.dumps(e) + "\n")

    def _safely(self, what: str, entry: dict[str, Any]) -> None:
        if self.uri in self._down:
            self._keep([entry])
            return
        try:
            self._send(entry)
        except Exception as e:
            why = f"{type(e).__name__}: {str(e)[:300]}"
            if not passing_failure(e):
                self.run.warn(f"MLflow ({self.uri}): {what} failed: {why}")
                return
            self._down[self.uri] = why
            self._keep([entry])
            self.run.warn(
                f"MLflow ({self.uri}) unreachable while {what}: {why}. The stage goes on; this and later MLflow "
                f"calls of this process are kept in {self.pending_file} and sent when a stage finishes, "
                f"or by `helical-workflow mlflow-sync {self.run.dir}`."
            )

    def pending(self) -> int:
        """How many MLflow calls wait in the run folder."""
        try:
            return sum(1 for line in self.pending_file.read_text().splitlines() if line.strip())
        except FileNotFoundError:
            return 0

    def flush(self) -> int | None:
        """Send the kept calls, in order. Returns how many were sent, or None if the server still fails
        (what is left stays kept). Concurrent shards each take the whole file or nothing."""
        if not self.pending_file.exists():
            return 0
        taking = self.pending_file.with_name(f"{PENDING}.{os.getpid()}")
        with self.run.locked():
            if not self.pending_file.exists():
                return 0
            self.pending_file.rename(taking)
        entries = [json.loads(line) for line in taking.read_text().splitlines() if line.strip()]
        sent = 0
        try:
            for entry in entries:
                self._send(entry)
                sent += 1
        except Exception as e:
            left = entries[sent:] if passing_failure(e) else entries[sent + 1 :]
            if not passing_failure(e):
                self.run.warn(f"MLflow ({self.uri}): a kept {entries[sent]['op']} call failed and is dropped: {e}")
            else:
                self._down[self.uri] = f"{type(e).__name__}: {str(e)[:300]}"
            self._keep(left)
            taking.unlink()
            return None if passing_failure(e) else sent
        taking.unlink()
        self._down.pop(self.uri, None)
        if sent:
            self.run.warn(f"MLflow ({self.uri}) reachable again: {sent} kept call(s) sent")
        return sent

    # --- what stages log -----------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """The numeric values of ``metrics`` at one step."""
        self.log_points(
            [(k, v, step) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        )

    def log_series(self, key: str, points: list[tuple[int, float]]) -> None:
        """One metric at several steps (e.g. the training loss per optimizer step)."""
        self.log_points([(key, v, step) for step, v in points])

    def log_points(self, points: list[tuple[str, float, int]]) -> None:
        """(key, value, step) triples, in batches."""
        if points:
            entry = {
                "op": "metrics",
                "ts": int(time.time() * 1000),
                "points": [[k, float(v), int(s)] for k, v, s in points],
            }
            self._safely("logging metrics", entry)

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        self._safely(
            f"logging {Path(path).name}", {"op": "artifacts", "path": str(path), "artifact_path": artifact_path}
        )

    def terminate(self, status: str) -> None:
        """FINISHED or FAILED on the workflow's MLflow run."""
        self._safely(f"marking the run {status}", {"op": "terminate", "status": status})
