"""The run folder and its ``run.json`` manifest.

``outputs/<experiment>/<run_id>/`` holds everything one workflow run produced. Stages
hand over files in it. Each stage writes into a hidden temporary folder and renames it
into place only when it is complete (:func:`stage_output`), so a crashed or killed stage
never leaves output that looks finished. ``run.json`` is updated under a file lock,
because mapped tasks of one run may write it at the same time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import stages
from .files import atomic, file_lock, now_iso, out_of_space, write_json, write_text
from .stages import Shard, Stage

if TYPE_CHECKING:
    from .params import Params
    from .tracking import MlflowRun, StageMetrics

log = logging.getLogger(__name__)

MANIFEST = "run.json"
PARAMS_DIR = "params"  # the run's own params: pinned when the run is created
SUBDIRS = ("notebooks", "reports", "metrics")


def safe_run_id(run_id: str) -> str:
    """Airflow run ids contain ':' and '+': make a folder name from one."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("._")
    if not safe:
        raise ValueError(f"run id {run_id!r} has no usable characters")
    return safe


def runs_root(outputs: Path, experiment: str, workflow: str = "train") -> Path:
    """Where the runs of an experiment's workflow live: ``outputs/<experiment>/`` (training), or
    ``outputs/annotate/runs/<experiment>/`` (annotation: each input's results are content-addressed beside it)."""
    if workflow == "train":
        return Path(outputs) / experiment
    return Path(outputs) / workflow / "runs" / experiment


def run_dir_for(outputs: Path, experiment: str, run_id: str, workflow: str = "train") -> Path:
    return runs_root(outputs, experiment, workflow) / safe_run_id(run_id)


def mlflow_experiment(experiment: str, workflow: str = "train") -> str:
    """The MLflow experiment of a workflow's runs: the params' experiment; ``<experiment>-annotate`` for
    annotations (so that they never mix with the training runs 05_compare lists)."""
    return experiment if workflow == "train" else f"{experiment}-{workflow}"


def _locked(run_dir: Path):
    return file_lock(Path(run_dir) / ".run.lock")


def _read_pinned(run_dir: Path) -> "Params":
    """The params a run (or trial) folder was created with, as this process sees their paths."""
    from .params import load_params

    path = pinned(run_dir)
    if path is None:
        raise FileNotFoundError(
            f"{run_dir} is not a created run: it has no {PARAMS_DIR}/<experiment>.yaml. Fix: start the run from its "
            "first stage (Airflow's first task, `helical-workflow run`, or notebook 01 with params_path), which "
            "creates it."
        )
    params = load_params(path, check_files=False)
    overrides = read_manifest(run_dir).get("overrides") or {}
    if isinstance(overrides, dict):
        params = params.model_copy(update={"overrides": overrides})
    return _mapped(params)


def _share_with_containers(run_dir: Path, outputs: Path) -> None:
    """Container stages run as another user (the image's, uid 1000): let them write the run folder's parts, and
    the folders between it and the outputs folder (an annotation's results go beside its run)."""
    above = [p for p in run_dir.parents if outputs in p.parents]
    for p in [*above, run_dir, *run_dir.rglob("*")]:
        try:
            os.chmod(p, 0o777 if p.is_dir() else 0o666)
        except OSError:
            pass


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        return {}
    with open(path) as f:
        return json.load(f)


def update_manifest(run_dir: Path, change: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """Apply ``change`` to run.json under the run folder's lock and write it atomically."""
    run_dir = Path(run_dir)
    with _locked(run_dir):
        data = read_manifest(run_dir)
        change(data)
        write_json(run_dir / MANIFEST, data)
        return data


KERNEL_PACKAGES = (
    "helical",
    "torch",
    "transformers",
    "datasets",
    "anndata",
    "scanpy",
    "numpy",
    "mlflow",
    "papermill",
    "helical-workflow",
)


def package_versions(names: tuple[str, ...] = KERNEL_PACKAGES) -> dict[str, str]:
    from importlib import metadata

    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


def stage_output(run_dir: Path, name: str) -> contextlib.AbstractContextManager[Path]:
    """A stage's output folder ``run_dir/name``, written atomically (see :func:`atomic`)."""
    return atomic(Path(run_dir) / name, directory=True)


def _nothing_ran_here(run_dir: Path) -> bool:
    """No stage of this run is recorded in the run folder as this machine sees it (the folder is missing, or
    only this worker's ``Run.open`` made it): the sign of a worker that does not share the outputs storage."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return True
    m = read_manifest(run_dir)
    if m.get("parent"):  # a sweep trial's folder: its stages are recorded in the run's manifest
        m = read_manifest(Path(m["parent"]))
    return not m.get("stages")


def shared_storage_hint(run_dir: Path, upstream: str) -> str:
    """What to say when a stage cannot see what its upstream stage wrote and nothing of the run is here."""
    return (
        f"This machine ({platform.node()}) sees no stage of this run in {run_dir}: if '{upstream}' ran on "
        "another worker, this worker does not share the outputs storage. Shared storage is required with more "
        "than one worker (CeleryExecutor workers, Kubernetes pods, containers on several hosts): every worker "
        "must see the outputs folder at the same path. Fix: mount the same storage at that path on every "
        "worker: one outputs volume for all airflow-worker services in compose, an NFS export, or a "
        "ReadWriteMany PersistentVolumeClaim on Kubernetes. On a single machine, run the "
        f"'{upstream}' stage for this run first."
    )


def require_stage_output(run_dir: Path, name: str, produced_by: str | None = None) -> Path:
    """The folder a previous stage wrote, or a clear error saying which stage to run first (or, when nothing
    of the run is visible here, that the workers need shared storage for the outputs folder)."""
    from . import stages

    produced_by = produced_by or stages.producer(name).name
    path = Path(run_dir) / name
    if not path.is_dir():
        if _nothing_ran_here(run_dir):
            raise FileNotFoundError(
                f"{path} does not exist: the '{produced_by}' stage has not completed for this run as this machine "
                f"sees it. {shared_storage_hint(run_dir, produced_by)}"
            )
        raise FileNotFoundError(
            f"{path} does not exist: the '{produced_by}' stage has not completed for this run. "
            f"Fix: run the '{produced_by}' stage (notebook or Airflow task) for run folder {run_dir} first."
        )
    return path


class StageFailed(RuntimeError):
    """A stage failed or could not start. The executed notebook (with the error) is in the run folder.

    ``permanent``: the cause is in the input (a broken or unusable file, invalid params), so a retry would fail
    the same way: Airflow fails the task at once."""

    def __init__(self, message: str, *, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


# Errors raised in a notebook that no retry can fix: the input must change.
PERMANENT_ERRORS = ("DatasetError", "AnnotateError", "ParamsError", "TokenizeError")


class StageNotReady(StageFailed):
    """A stage was started before its upstream stages succeeded in this run folder."""


@dataclass
class Attempt:
    """One attempt of one stage (or one shard of it) in a run: what ``run.json`` records."""

    stage: Stage
    shard: Shard | None
    run_dir: Path
    status: str = "running"
    error: str | None = None
    seconds: float = 0.0

    @property
    def key(self) -> str:
        return self.stage.key(self.shard)

    @property
    def notebook(self) -> Path:
        """The executed notebook: this attempt's report."""
        return self.run_dir / "notebooks" / self.stage.notebook_name(self.shard)


PATH_MAP_ENV = "HELICAL_PATH_MAP"  # JSON [[host prefix, prefix here], ...]: a container's view of the run's paths


def pinned(run_dir: Path) -> Path | None:
    """The run's own params file (``params/<experiment>.yaml``), if the run was created; else None."""
    found = [p for p in sorted((Path(run_dir) / PARAMS_DIR).glob("*.yaml")) if p.name != "profiles.yaml"]
    return found[0] if found else None


def _path_map() -> list[tuple[str, str]]:
    text = os.environ.get(PATH_MAP_ENV, "").strip()
    return [(str(a), str(b)) for a, b in json.loads(text)] if text else []


def host_path(path: "str | os.PathLike") -> str:
    """A path as the host sees it (what a container stage writes for the Airflow side: an asset event, ...): the
    reverse of ``$HELICAL_PATH_MAP``; unchanged outside a container."""
    text = str(path)
    for host, local in _path_map():
        if text == local or text.startswith(local.rstrip("/") + "/"):
            return host.rstrip("/") + text[len(local.rstrip("/")) :]
    return text


def _mapped(params: "Params") -> "Params":
    """Params as this process sees their paths: inside a container, the host's data, outputs and model cache
    folders are mounted elsewhere (``$HELICAL_PATH_MAP``, set by the container launchers). A model cache outside
    the mounts is not visible: the image's baked models are used."""
    mapping = _path_map()
    if not mapping:
        return params

    def here(path: str | None) -> str | None:
        if not path:
            return path
        for host, local in mapping:
            if path == host or path.startswith(host.rstrip("/") + "/"):
                return local + path[len(host.rstrip("/")) :]
        return None

    data = params.data.model_copy(update={"path": here(str(params.data_path)) or params.data.path})
    model = params.model.model_copy(update={"cache_dir": here(params.model.cache_dir)})
    outputs = here(str(params.outputs_path)) or params.outputs_dir
    a = params.annotate  # an annotation's inputs, and its model when it is a folder
    inputs = [here(str(params.resolve(p))) or p for p in a.inputs]
    ref = a.model if not a.model or a.model.startswith("models:/") else here(str(params.resolve(a.model))) or a.model
    annotate = a.model_copy(update={"inputs": inputs, "model": ref})
    return params.model_copy(update={"data": data, "model": model, "outputs_dir": outputs, "annotate": annotate})


class Run:
    """One workflow run: its folder, its ``run.json`` manifest, its params and its MLflow run.

    A run is **created once** (:meth:`create`: by the first stage task of a DAG run, or by
    ``helical-workflow run``), which validates the params file and the run's overrides once and pins the
    result in the run folder: ``params/`` (and ``trials/<k>/params/`` for each sweep trial). Everything
    after that **loads** the run (:meth:`load`): later tasks, notebooks, containers, DDP workers,
    finalisation and the Airflow links. Nothing re-reads the experiment file, so editing it while a run is
    under way changes nothing in that run.

    Stages go through :meth:`attempt` (launcher side: status, timings, errors, status metrics, report,
    MLflow) and :meth:`work` (notebook side: the stage's own metrics).
    """

    def __init__(
        self,
        params: "Params",
        run_dir: Path,
        run_id: str | None = None,
        *,
        root: "Run | None" = None,
        trial: Shard | None = None,
        workflow: str = "train",
    ):
        self.params = params
        self.dir = Path(run_dir).resolve()
        self.run_id = run_id or self.dir.name
        self.root = root or self  # a sweep trial's run folder lives inside the run's: trials/<k>/
        self.trial = trial
        self.workflow = workflow  # "train" or "annotate": the stage table its stages come from
        self.stages = stages.table(workflow)

    # --- created once, then loaded -------------------------------------------------
    @classmethod
    def create(
        cls,
        params: "Params | str | os.PathLike",
        run_id: str | None = None,
        *,
        run_dir: Path | str | None = None,
        overrides: dict[str, Any] | None = None,
        workflow: str = "train",
    ) -> "Run":
        """Create the run of a params file (or object) with ``overrides`` merged, validated once, and pinned in
        its folder. A run folder that already has its params (the first task's retry) is loaded as created.

        An annotation run (``workflow="annotate"``) does not need the training data file to exist."""
        from .params import Params, apply_overrides, load_params

        if run_dir is not None and pinned(run_dir):
            return cls.load(run_dir)
        if not isinstance(params, Params):
            params = load_params(params, check_files=workflow == "train")
        params = apply_overrides(params, overrides)
        if run_dir is None:
            if run_id is None:
                raise ValueError("Run.create needs a run_id or a run_dir")
            run_dir = run_dir_for(params.outputs_path, params.experiment, run_id, workflow)
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        # two first tasks at once (a retry racing a zombie): one creates, one loads (a lock of its own: pinning
        # takes the manifest's lock)
        with file_lock(run_dir / ".create.lock"):
            if pinned(run_dir):
                return cls.load(run_dir)
            run = cls(params, run_dir, run_id, workflow=workflow)
            run._pin()
        return run

    @classmethod
    def load(cls, run_dir: Path | str, trial: "Shard | str | int | None" = None) -> "Run":
        """A created run (or one sweep trial of it), from the run folder's own params."""
        run_dir = Path(run_dir)
        params = _read_pinned(run_dir)
        m = read_manifest(run_dir)
        run = cls(params, run_dir, m.get("run_id"), workflow=m.get("workflow", "train"))
        if trial is None:
            return run
        if isinstance(trial, int):
            trial = Shard(trial, run.trial_count(), "trial")
        return run.for_trial(trial)

    def trial_count(self) -> int:
        from .sweep import trial_count

        return trial_count(self.params)

    def _pin(self) -> None:
        """Write the run's params, each trial's params and the manifest (called once, by :meth:`create`)."""
        from .sweep import trials

        for sub in SUBDIRS:
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.params.save(self.dir / PARAMS_DIR)
        if self.params.sweep is not None:
            from .params import apply_overrides

            for k, overrides in enumerate(trials(self.params)):
                d = self.dir / "trials" / str(k)
                trial_params = apply_overrides(self.params, overrides)
                trial_params.save(d / PARAMS_DIR)

                def trial_manifest(m: dict[str, Any], k: int = k, overrides=overrides, tp=trial_params) -> None:
                    m.update(parent=str(self.dir), trial=k, run_id=self.run_id, experiment=tp.experiment)
                    m["overrides"] = overrides
                    m["params"] = tp.snapshot()

                update_manifest(d, trial_manifest)

        def change(m: dict[str, Any]) -> None:
            m.update(experiment=self.params.experiment, run_id=self.run_id, created=now_iso(), host=platform.node())
            if self.workflow != "train":
                m["workflow"] = self.workflow
            m["params"] = self.params.snapshot()
            if self.params.overrides:  # what the trigger changed (the run's own params already carry it)
                m["overrides"] = dict(self.params.overrides)
            m.setdefault("stages", {})

        self.update(change)
        if any(self.params.profile_for(s.name).launcher != "local" for s in self.stages):
            _share_with_containers(self.dir, self.params.outputs_path)

    def for_trial(self, trial: "Shard | str") -> "Run":
        """A sweep trial: its folder ``trials/<k>/`` (``model/``, ``checkpoints/``, ``evaluate/``), its pinned
        params (the trial's overrides merged), an MLflow child run; the run's ``load/`` and ``tokenized/`` are
        linked."""
        trial = Shard.parse(trial, "trial")
        assert trial is not None
        d = self.dir / "trials" / str(trial.i)
        if not pinned(d):  # a run made in memory (tests, benchmarks): pin the trial now, once
            from .params import apply_overrides
            from .sweep import trials

            overrides = trials(self.params)[trial.i]
            apply_overrides(self.params, overrides).save(d / PARAMS_DIR)
            update_manifest(
                d,
                lambda m: m.update(
                    parent=str(self.dir),
                    trial=trial.i,
                    run_id=self.run_id,
                    experiment=self.params.experiment,
                    overrides=overrides,
                ),
            )
        for st in stages.STAGES:  # what the trials share: outputs of the stages before them
            link = d / st.output
            if st.sharding != "trials" and (self.dir / st.output).is_dir() and not link.exists():
                link.symlink_to(Path("..") / ".." / st.output)
        params = _read_pinned(d)
        params = params.model_copy(update={"overrides": {**self.params.overrides, **params.overrides}})
        return Run(params, d, self.run_id, root=self, trial=trial)

    def __repr__(self) -> str:
        return f"Run({self.params.experiment!r}, {str(self.dir)!r})"

    # --- the manifest ------------------------------------------------------------
    @property
    def params_file(self) -> Path:
        """The run's own copy of its params (what notebooks and containers read)."""
        return self.dir / "params" / f"{self.params.experiment}.yaml"

    @property
    def manifest_file(self) -> Path:
        return self.dir / MANIFEST

    @property
    def manifest(self) -> dict[str, Any]:
        return read_manifest(self.dir)

    def locked(self) -> contextlib.AbstractContextManager[None]:
        return _locked(self.dir)

    def update(self, change: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
        return update_manifest(self.dir, change)

    def record(self, key: str) -> dict[str, Any]:
        """What run.json holds for one stage key (``{}`` if it never ran)."""
        return self.manifest.get("stages", {}).get(key, {})

    def set_stage(self, key: str, **fields: Any) -> dict[str, Any]:
        return self.update(lambda m: m.setdefault("stages", {}).setdefault(key, {}).update(fields))

    def warn(self, message: str) -> None:
        """A problem that must not fail the stage (MLflow or Pushgateway down): kept in run.json."""
        log.warning("%s", message)
        self.update(lambda m: m.setdefault("warnings", []).append(f"{now_iso()} {message}"))

    # --- stage inputs and outputs ---------------------------------------------
    def require_upstream(self, stage: Stage, shard: Shard | None = None) -> None:
        """A trial needs its own trial upstream; ``needs: any`` (compare) needs one upstream success."""
        bad, good = {}, 0
        for up in stage.upstream:
            ust = stages.get(up)
            same_trial = shard is not None and shard.kind == "trial" and ust.sharding == "trials"
            for key in [ust.key(shard)] if same_trial else ust.keys(self.params):
                status = self.record(key).get("status")
                if status != "success":
                    bad[key] = status or "not run"
                else:
                    good += 1
        if bad and not (stage.needs == "any" and good):
            detail = ", ".join(f"{k}: {v}" for k, v in bad.items())
            ups = ", ".join(f"'{u}'" for u in stage.upstream)
            if _nothing_ran_here(self.dir):  # a worker without the shared outputs storage sees a fresh folder
                raise StageNotReady(
                    f"stage '{stage.name}' needs {ups} to have succeeded in {self.dir} ({detail}). "
                    + shared_storage_hint(self.root.dir, ", ".join(stage.upstream))
                )
            raise StageNotReady(
                f"stage '{stage.name}' needs {ups} to have succeeded in {self.dir} ({detail}). Fix: run {ups} first."
            )

    @property
    def mlflow_experiment(self) -> str:
        return mlflow_experiment(self.params.experiment, self.workflow)

    def input(self, stage: str) -> Path:
        """The output folder of an upstream stage, or a clear error naming the stage to run first."""
        return require_stage_output(self.dir, stages.get(stage).output, stage)

    def output(self, stage: str) -> contextlib.AbstractContextManager[Path]:
        """A stage's output folder, written atomically."""
        return stage_output(self.dir, stages.get(stage).output)

    # --- tracking ----------------------------------------------------------------
    @property
    def mlflow(self) -> "MlflowRun":
        from .tracking import MlflowRun

        return MlflowRun.of(self)

    @contextlib.contextmanager
    def work(self, stage: str, shard: "Shard | str | None" = None) -> Iterator["StageMetrics"]:
        """What a notebook wraps a stage's work in: its metrics file, the Pushgateway and MLflow.

        The metrics are written whether the work succeeds or fails, so a failed stage still
        reports how far it got. Marking the stage finished is the launcher's :meth:`attempt`.
        """
        from .tracking import PUSH_JOB_STAGE, StageMetrics

        st = stages.get(stage)
        m = StageMetrics(self.params.experiment, st, Shard.parse(shard, st.shard_kind) or self.trial)
        if "versions" not in self.root.manifest:  # once per run, not a manifest write per stage
            self.root.update(
                lambda man: man.setdefault("versions", {"python": platform.python_version(), **package_versions()})
            )
        t0 = time.perf_counter()
        ok = False
        try:
            yield m
            ok = True
        finally:
            m.set("helical_stage_work_seconds", time.perf_counter() - t0)
            m.write(self.root.dir / "metrics" / f"{m.key}.prom")
            if m.push(self.params.pushgateway, PUSH_JOB_STAGE) is False:
                self.warn(f"metrics of {m.key} not pushed to the Pushgateway at {self.params.pushgateway}")
            if ok:
                self.mlflow.log_metrics({f"{m.key}.{k}": v for k, v in m.values.items()})

    @contextlib.contextmanager
    def attempt(
        self, stage: str, shard: "Shard | str | None" = None, *, finalize: Callable[[Attempt], None] | None = None
    ) -> Iterator[Attempt]:
        """One stage attempt: marks it running, records status, timings and errors, writes the
        status metrics and finalises (HTML report, MLflow), whatever the outcome.

        ``finalize`` replaces the in-process :meth:`finalize` (the Airflow worker hands it to the
        kernel environment, which has nbconvert and MLflow).
        """
        st = stages.get(stage)
        shard = Shard.parse(shard, st.shard_kind)
        self.require_upstream(st, shard)
        a = Attempt(st, shard, self.dir)
        tries = int(self.record(a.key).get("attempt", 0)) + 1
        self.set_stage(
            a.key,
            status="running",
            started=now_iso(),
            ended=None,
            error=None,
            attempt=tries,
            notebook=str(a.notebook.relative_to(self.dir)),
        )
        t0 = time.perf_counter()
        try:
            yield a
            a.status = "success"
        except BaseException as e:  # recorded, then re-raised
            a.status, a.error = "failed", f"{type(e).__name__}: {str(e)[-2000:]}"
            full = out_of_space(e, self.dir)
            if full and "No space left on the disk" not in str(
                e
            ):  # e.g. papermill could not save the notebook: say which disk, and the fix
                a.error = f"{a.error}\n{full}"
                raise StageFailed(f"stage '{a.key}' failed: {full}") from e
            raise
        finally:
            a.seconds = time.perf_counter() - t0
            self.set_stage(a.key, status=a.status, ended=now_iso(), seconds=round(a.seconds, 3), error=a.error)
            self._status_metrics(a)
            try:
                (finalize or self.finalize)(a)
            except Exception as e:  # a report or MLflow problem never masks the stage's own result
                self.warn(f"finalising {a.key} failed: {type(e).__name__}: {e}")

    def _status_metrics(self, a: Attempt) -> None:
        from .tracking import write_status_metrics

        workflow_s = None
        if a.stage.name == stages.last(self.workflow).name and a.status == "success":
            created = self.manifest.get("created")
            if created:
                workflow_s = (datetime.now(UTC) - datetime.fromisoformat(created)).total_seconds()
        if not write_status_metrics(self, a, workflow_s=workflow_s):
            self.warn(f"status metrics of {a.key} not pushed to the Pushgateway at {self.params.pushgateway}")

    def finalize(self, a: Attempt) -> Path | None:
        """Render the executed notebook to HTML and log notebook, report and metrics to MLflow."""
        html = None
        if a.notebook.exists():
            import nbformat
            from nbconvert import HTMLExporter

            body, _ = HTMLExporter().from_notebook_node(nbformat.read(a.notebook, as_version=4))
            html = write_text(self.dir / "reports" / a.notebook.with_suffix(".html").name, body)
        ml = self.mlflow
        trial = self.for_trial(a.shard) if a.shard is not None and a.shard.kind == "trial" else None
        for kept in (ml, trial.mlflow) if trial else (ml,):  # what failed earlier (server down), in order
            kept.flush()
        ml.log_metrics({f"{a.key}.duration_seconds": a.seconds, f"{a.key}.success": float(a.status == "success")})
        for path, where in (
            (a.notebook, "notebooks"),
            (html, "reports"),
            (self.dir / "metrics", "metrics"),
            (self.dir / MANIFEST, None),
        ):
            if path is not None:
                ml.log_artifacts(path, where)
        if a.status == "success" and a.stage.artifacts:  # plots, predictions.csv, metrics.json: first-class
            ml_of_output = trial.mlflow if trial else ml
            ml_of_output.log_artifacts((trial or self).dir / a.stage.output, a.stage.output)
        if trial is not None:  # the trial's own child run: report and outcome
            child = trial.mlflow
            for path, where in ((a.notebook, "notebooks"), (html, "reports")):
                if path is not None:
                    child.log_artifacts(path, where)
            last_trial_stage = [s for s in stages.STAGES if s.sharding == "trials"][-1].name
            if a.status != "success" or a.stage.name == last_trial_stage:
                child.terminate("FINISHED" if a.status == "success" else "FAILED")
        elif a.status != "success":
            ml.terminate("FAILED")
        if a.status == "success" and a.stage.name == stages.last(self.workflow).name:
            ml.terminate("FINISHED")
            from .tracking import PENDING

            kept = [self.dir / PENDING, *self.dir.glob(f"trials/*/{PENDING}")]
            left = sum(len(f.read_text().splitlines()) for f in kept if f.exists())
            if left:
                self.warn(
                    f"{left} MLflow call(s) of this run could not be sent to {ml.uri} (kept in {PENDING}). "
                    f"Fix: when the server is back, `helical-workflow mlflow-sync {self.dir}`."
                )
        if html is not None:
            print(f"report: {html}")
        return html


def notes_to_stdout() -> None:
    """In a notebook: this project's log messages are plain lines and other libraries' warnings (Python's
    ``warnings``, MLflow's) short ``note:`` lines on stdout, not red stderr boxes in the report; chatty INFO
    loggers of other libraries are quietened."""
    import sys

    if getattr(notes_to_stdout, "done", False):
        return
    handler = logging.StreamHandler(sys.stdout)  # other libraries' warnings: a short "note: ..."
    handler.setFormatter(logging.Formatter("note: %(message)s"))
    ours = logging.StreamHandler(sys.stdout)  # this project's own messages, as plain lines
    ours.setFormatter(logging.Formatter("%(message)s"))
    logging.captureWarnings(True)
    for name in ("helical_workflow", "py.warnings"):
        lg = logging.getLogger(name)
        lg.addHandler(ours if name == "helical_workflow" else handler)
        lg.setLevel(logging.INFO if name == "helical_workflow" else logging.WARNING)
        lg.propagate = False
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    import mlflow  # noqa: F401 - it installs its own stderr handler on import: replace it with the notes

    for name in ("mlflow", "alembic", "helical", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    mlflow_logger = logging.getLogger("mlflow")
    mlflow_logger.handlers = [handler]
    mlflow_logger.propagate = False
    notes_to_stdout.done = True  # type: ignore[attr-defined]


def open_run(
    params_path: "str | os.PathLike | None",
    run_dir: "str | os.PathLike",
    overrides: dict[str, Any] | None = None,
    trial: "Shard | str | None" = None,
) -> Run:
    """The notebooks' setup: the run in ``run_dir``; with ``trial`` (``"K/N"``), that sweep trial's own run.

    A launched stage finds its run created (papermill passes the run's own params file). Run interactively
    on a new ``run_dir``, the params file ``params_path`` with ``overrides`` (``{"fine_tune.epochs": 2}``)
    creates it, as a trigger would; on an existing one, the run's pinned params are used, whatever the file
    says now (a note says so when they differ)."""
    notes_to_stdout()
    run_dir = Path(run_dir)
    if pinned(run_dir) is None:
        if not params_path:
            raise FileNotFoundError(f"{run_dir} is not a created run. Fix: give params_path to create it.")
        run = Run.create(params_path, run_dir=run_dir, overrides=overrides)
    else:
        run = Run.load(run_dir)
        _note_if_changed(run, params_path, overrides)
    if trial is not None:
        run = run.for_trial(trial)
        print(
            f"trial {run.trial.i} of {run.trial.n}: "
            + ", ".join(f"{k}={v!r}" for k, v in run.manifest["overrides"].items())
        )
    print(f"experiment {run.params.experiment!r}, run folder {run.dir}")
    if run.params.overrides:
        print("overrides: " + ", ".join(f"{k}={v!r}" for k, v in run.params.overrides.items()))
    return run


def _note_if_changed(run: Run, params_path: "str | os.PathLike | None", overrides: dict[str, Any] | None) -> None:
    """Say so when a notebook is pointed at a params file (or overrides) that differ from what its run pinned."""
    from .params import ParamsError, apply_overrides, load_params

    if not params_path or Path(params_path).resolve() == run.params_file.resolve():
        return
    try:
        wanted = apply_overrides(load_params(params_path, check_files=False), overrides)
    except (ParamsError, OSError):
        return
    if wanted.resolved() != run.params.resolved():
        print(
            f"note: {run.dir} was created with its own params ({run.params_file}); {params_path} differs and is not "
            "used. Fix: point run_dir at a new folder to start a run from the edited file."
        )
