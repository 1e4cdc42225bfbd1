"""Build one Airflow DAG per params file that has a ``dag:`` section, and ``helical_annotate``, from the stage
tables (:data:`helical_workflow.stages.STAGES` and :data:`~helical_workflow.stages.ANNOTATE_STAGES`).

Parse time stays cheap: read YAML, validate the schema (pydantic), create one task per
stage of :data:`helical_workflow.stages.STAGES` (mapped over shards for a sharded stage),
wired by the stages' ``upstream``. No torch, no helical, no dataset access. The operator of
each task follows the launcher of the stage's resource profile (:mod:`helical_workflow.launchers`):

* ``local``: :class:`StageOperator` (papermill here, through :func:`launchers.run_stage`);
* ``docker``: :class:`DockerStageOperator`, the kernel image through the Docker API;
* ``kubernetes``: :class:`KubernetesStageOperator` (a ``KubernetesPodOperator``), the same image,
  command and resources.

Every stage task has the extra links "Report" and "MLflow run" (:mod:`helical_workflow.links`),
computed from the run folder (its pinned params), the stage and the run id whatever the launcher.

The first stage task of a DAG run creates the run (:meth:`Run.create`: the params file and the
trigger's form and ``conf``, validated once and pinned in the run folder); every later task,
whatever its launcher, loads the run from ``outputs/<experiment>/<run id>`` and never reads the
params file again.

An invalid params file still gets its DAG, so the problem is visible in the UI (in the
DAG's docs); a run of it fails in the first task, at validation, before any compute.

``helical_annotate`` is built the same way from the annotation stages and the ``annotate:`` and
``watch:`` sections of ``$HELICAL_ANNOTATE_PARAMS`` (default: ``demo.yaml`` in the params folder).
It is scheduled on the watched folder's asset (:mod:`helical_workflow.watch`): a complete new
``.h5ad`` there starts a run whose ``annotate.inputs`` are the new files. It can be triggered by
hand with ``annotate.inputs`` in its Trigger form (or ``conf``). Its last task sends an event on
the asset ``helical_annotated`` (``extra``: the run folder and each input's outputs) for
downstream DAGs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from airflow.sdk import DAG, Asset, BaseOperator, BaseOperatorLink

try:
    from airflow.providers.docker.operators.docker import DockerOperator
except ImportError:  # the docker provider is optional for local-only installs
    DockerOperator = None

from . import launchers, links, stages
from .params import (
    ANNOTATE_TRIGGER_FIELDS,
    ON_NEW_DATA,
    TRIGGER_FIELDS,
    Params,
    ParamsError,
    flatten_overrides,
    load_params,
    trigger_form,
)
from .runs import runs_root
from .stages import Shard, Stage

PARAMS_DIR_ENV = "HELICAL_WORKFLOW_PARAMS_DIR"
DAG_ID_PREFIX = "helical_"  # DAG id: the prefix and the params file's stem
ANNOTATE_PARAMS_ENV = "HELICAL_ANNOTATE_PARAMS"
ANNOTATE_DAG_ID = "helical_annotate"


def asset(name: str) -> Asset:
    """The asset a stage sends events on (``Stage.emits``): ``helical_annotated`` is ``helical://annotated``."""
    return Asset(name=name, uri=f"helical://{name.removeprefix(DAG_ID_PREFIX)}")


class _StageLink(BaseOperatorLink):
    """An extra link of a stage task, computed in the worker when the task ends (:mod:`helical_workflow.links`).

    The operator carries ``run_root``, ``params_path`` and ``stage``; ``ti_key`` the run id and map index (shard
    or trial). The run's own params come from its folder; the params file only when the folder is out of reach.
    """

    url: Callable[[Params, str, str, int, str], str]  # params, stage, run id, map index, DAG id -> URL ("" for none)

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        stage = getattr(operator, "stage", None)
        if not stage:
            return ""
        params = _run_params(getattr(operator, "run_root", None), getattr(operator, "params_path", None), ti_key.run_id)
        if params is None:
            return ""
        return self.url(params, stage, ti_key.run_id, getattr(ti_key, "map_index", -1), ti_key.dag_id)


def _run_params(run_root: str | None, params_path: str | None, run_id: str) -> Params | None:
    from .runs import Run, pinned, safe_run_id

    if run_root and pinned(Path(run_root) / safe_run_id(run_id)):
        return Run.load(Path(run_root) / safe_run_id(run_id)).params
    return load_params(params_path, check_files=False) if params_path else None


class ReportLink(_StageLink):
    name = "Report"
    url = staticmethod(links.report_url)


class MlflowRunLink(_StageLink):
    name = "MLflow run"
    url = staticmethod(links.mlflow_url)


STAGE_LINKS: tuple[BaseOperatorLink, ...] = (ReportLink(), MlflowRunLink())


class _RunTask:
    """What every stage operator knows: its stage, the params file its DAG was built from, and where its runs
    live (``run_root``: ``outputs/<experiment>``). The first stage's task creates the run."""

    def _stage_fields(self, params_path: str, stage: str, run_root: str) -> None:
        self.params_path, self.stage, self.run_root = params_path, stage, run_root

    def overrides(self, context: Any) -> dict[str, Any]:
        """What this DAG run changes (:func:`run_overrides`); for an annotation, the files that started it."""
        out = run_overrides(context)
        if stages.get(self.stage).workflow == "annotate":
            files = _triggering_files(context)
            if files:
                out["annotate.inputs"] = files
        return out

    def create_run(self, context: Any) -> None:
        """The first stage of a container launcher: create the run here, in the worker, before the container (which
        only loads it) starts."""
        if not stages.get(self.stage).upstream:
            with _fail_once_when_invalid():
                launchers.task_run(
                    self.params_path, self.stage, str(context["run_id"]), overrides=self.overrides(context)
                )
        self.name_map_index(context)

    def emit(self, context: Any) -> None:
        """A stage that sends an asset event (``Stage.emits``): its extra is the ``event.json`` its output holds."""
        st = stages.get(self.stage)
        if not st.emits:
            return
        from .runs import safe_run_id

        event = Path(self.run_root) / safe_run_id(str(context["run_id"])) / st.output / "event.json"
        context["outlet_events"][asset(st.emits)].extra = json.loads(event.read_text())

    def name_map_index(self, context: Any) -> None:
        """A mapped task's readable name (its ``map_index_template``): the trial's settings, or the shard's rows."""
        ti = context.get("ti")
        index = getattr(ti, "map_index", -1)
        if index is None or index < 0:
            return
        try:
            from .runs import Run, safe_run_id

            run = Run.load(Path(self.run_root) / safe_run_id(str(context["run_id"])))
            context[MAP_INDEX_LABEL] = shard_label(run, stages.get(self.stage).shards(run.params)[index])
        except (OSError, ValueError, IndexError, KeyError):  # the run folder is out of reach here
            context[MAP_INDEX_LABEL] = f"{self.stage} {index}"


MAP_INDEX_LABEL = "helical_map_index_label"


def shard_label(run: Any, shard: Shard | None) -> str:
    """``trial 2: learning_rate=0.003, freeze_layers=1`` or ``shard 1/4``: what a mapped task shows in Airflow."""
    if shard is None:
        return ""
    if shard.kind == "trial":
        overrides = run.for_trial(shard).manifest.get("overrides") or {}
        settings = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items())
        return f"trial {shard.i}" + (f": {settings}" if settings else "")
    return f"shard {shard}"


@contextlib.contextmanager
def _fail_once_when_invalid():
    """An invalid params file or override, or a stage failed by its input (a broken file), fails the task at once,
    without retries: a retry cannot fix it."""
    from airflow.sdk.exceptions import AirflowFailException

    from .runs import StageFailed

    try:
        yield
    except ParamsError as e:
        raise AirflowFailException(str(e)) from None
    except StageFailed as e:
        if e.permanent:
            raise AirflowFailException(str(e)) from None
        raise


class StageOperator(_RunTask, BaseOperator):
    """One workflow stage's notebook, executed here by papermill in the ``helical-workflow`` kernel (the ``local``
    launcher), as one attempt of the run's stage."""

    template_fields = ("shard",)
    ui_color = "#d7ecff"
    operator_extra_links = STAGE_LINKS

    def __init__(
        self,
        *,
        params_path: str,
        stage: str,
        run_root: str,
        shard: str | None = None,
        kernel_name: str = launchers.KERNEL_NAME,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._stage_fields(params_path, stage, run_root)
        self.shard = shard
        self.kernel_name = kernel_name

    def execute(self, context: Any) -> str:
        self.name_map_index(context)  # before the work, so that a failed trial is named too
        with _fail_once_when_invalid():
            a = self._run(context)
        self.emit(context)
        return str(a.run_dir)  # only a path goes to XCom: stages hand over files

    def _run(self, context: Any):
        return launchers.run_task(
            self.params_path,
            self.stage,
            str(context["run_id"]),
            shard=self.shard,
            overrides=self.overrides(context),
            run_root=self.run_root,
            kernel_name=self.kernel_name,
        )


def run_overrides(context: Any) -> dict[str, Any]:
    """What a run changes: the Trigger form's fields and every key of its ``conf`` (nested or dotted).

    Nothing is ignored: a key that is not a params field fails the task at validation, with the fix.
    """
    fields = (*TRIGGER_FIELDS, *ANNOTATE_TRIGGER_FIELDS)
    form = {k: v for k, v in (context.get("params") or {}).items() if k in fields}
    dag_run = context.get("dag_run")
    return {**form, **flatten_overrides(getattr(dag_run, "conf", None) or {})}


def _triggering_files(context: Any) -> list[str]:
    """The files of the watched folder's events that started this DAG run (none for a hand-triggered run)."""
    files: list[str] = []
    for events in (context.get("triggering_asset_events") or {}).values():
        for ev in events:
            payload = (ev.extra or {}).get("payload") or {}
            if payload.get("path") and payload["path"] not in files:
                files.append(payload["path"])
    return files


class DockerStageOperator(_RunTask, DockerOperator if DockerOperator is not None else object):  # type: ignore[misc]
    """A stage in the kernel image through the Docker API (Docker Engine, a socket proxy, or Podman).

    A unique container name per run, task, map index and try; removed whatever the outcome. The container
    loads its run from the outputs folder (the first stage's task creates the run first, here).
    """

    operator_extra_links = STAGE_LINKS

    def __init__(self, *, params_path: str, stage: str, run_root: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._stage_fields(params_path, stage, run_root)

    def execute(self, context: Any) -> Any:
        from docker.errors import APIError, DockerException

        self.create_run(context)

        try:
            self.labels = self._remove_earlier_tries(context)
            out = super().execute(context)
            self.emit(context)
            return out
        except (APIError, DockerException) as e:
            raise RuntimeError(launchers.explain_docker_error(e, self.image, self.docker_url)) from None
        except Exception as e:  # the hook's "Failed to establish connection to any given Docker hosts."
            if "establish connection" in str(e):
                raise RuntimeError(
                    launchers.explain_docker_error(
                        ConnectionError(f"connection failed: {e}"), self.image, self.docker_url
                    )
                ) from None
            raise

    def _remove_earlier_tries(self, context: Any) -> dict[str, str]:
        """This task instance's labels; first, remove its containers from earlier tries.

        A try whose task process was killed (SIGKILL, a lost worker) never removed its container, which
        may still be running and writing to the run folder: the retry removes it before starting its own.
        Returns the labels the new container gets (how the next try, or an operator, finds it).
        """
        ti = context["ti"]
        mine = {
            "helical-workflow.dag": ti.dag_id,
            "helical-workflow.run": str(context["run_id"]),
            "helical-workflow.task": ti.task_id,
            "helical-workflow.map-index": str(ti.map_index),
        }
        for c in self.cli.containers(all=True, filters={"label": [f"{k}={v}" for k, v in mine.items()]}):
            name = (c.get("Names") or [c["Id"][:12]])[0].lstrip("/")
            self.log.warning("removing container %s (%s), left by an earlier try of this task", name, c.get("State"))
            self.cli.remove_container(c["Id"], force=True)
        return {**mine, "helical-workflow.try": str(ti.try_number)}


@functools.cache
def _kubernetes_stage_operator() -> type:
    """:class:`KubernetesStageOperator`, built on first use (the cncf-kubernetes provider takes seconds to import)."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    class KubernetesStageOperator(_RunTask, KubernetesPodOperator):
        """A stage in the kernel image in a Kubernetes pod, which loads its run from the outputs volume (the first
        stage's task creates the run first, in the worker, which mounts the same volume)."""

        operator_extra_links = STAGE_LINKS

        def __init__(self, *, params_path: str, stage: str, run_root: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._stage_fields(params_path, stage, run_root)

        def execute(self, context: Any) -> Any:
            self.create_run(context)
            out = super().execute(context)
            self.emit(context)
            return out

    KubernetesStageOperator.__module__ = __name__
    KubernetesStageOperator.__qualname__ = "KubernetesStageOperator"
    return KubernetesStageOperator


def __getattr__(name: str) -> Any:  # `from helical_workflow.dag_factory import KubernetesStageOperator`
    if name == "KubernetesStageOperator":
        return _kubernetes_stage_operator()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


CONTAINER_NAME = (
    "hw-{{ dag.dag_id }}-{{ task.task_id }}-{{ ti.map_index }}-{{ run_id | replace(':', '') "
    "| replace('+', '') | replace('.', '') }}-{{ ti.try_number }}"
).replace(" ", "")


def make_task(params: Params | None, path: Path, stage: Stage, common: dict[str, Any]):
    """The task of a stage (mapped over its shards), built as the launcher table says for the launcher of the
    stage's resource profile (:data:`helical_workflow.launchers.LAUNCHERS`)."""
    shards: list[Shard | None] = stage.shards(params)
    launcher = launchers.LAUNCHERS[params.profile_for(stage.name).launcher if params else "local"]
    run_root = str(runs_root(params.outputs_path, params.experiment, stage.workflow)) if params else ""
    fields = {"params_path": str(path), "stage": stage.name, "run_root": run_root}
    cls, kw, field, per_task = globals()[launcher.airflow_task](params, stage, shards)
    kw.update(fields)
    if stage.emits:
        common = {**common, "outlets": [asset(stage.emits)]}
    if len(shards) > 1:  # dynamic task mapping: one task instance per row shard, whatever the launcher
        # each mapped task is named by its trial's settings or its shard (set in the context by the operator)
        common = {**common, "map_index_template": "{{ " + MAP_INDEX_LABEL + " }}"}
        return cls.partial(**kw, **common).expand(**{field: per_task})
    return cls(**kw, **common, **{field: per_task[0]})


def local_task(params: Params | None, stage: Stage, shards: list[Shard | None]):
    """papermill here; the shard goes to the notebook's parameters."""
    return StageOperator, {}, "shard", [None if s is None else str(s) for s in shards]


def _specs(params: Params, stage: Stage, shards: list[Shard | None]) -> list[launchers.ContainerSpec]:
    """The kernel image's ``helical-workflow stage``, one per shard (the shard goes on its command line)."""
    return [launchers.ContainerSpec.for_stage(params, stage.name, s, "{{ run_id }}") for s in shards]


def docker_task(params: Params, stage: Stage, shards: list[Shard | None]):
    specs = _specs(params, stage, shards)
    kw = {k: v for k, v in specs[0].docker_kwargs().items() if k != "command"}
    kw.update(
        container_name=CONTAINER_NAME,
        docker_url=launchers.docker_url(),
        cpus=specs[0].cpus,
        auto_remove="force",
        mount_tmp_dir=False,
    )
    return DockerStageOperator, kw, "command", [s.command for s in specs]


def kubernetes_task(params: Params, stage: Stage, shards: list[Shard | None]):
    specs = _specs(params, stage, shards)
    kw = {k: v for k, v in specs[0].pod_kwargs().items() if k != "arguments"}
    profile = params.profile_for(stage.name)
    kw.update(
        name=f"hw-{stage.name.replace('_', '-')}",
        namespace=os.environ.get("HELICAL_K8S_NAMESPACE", "default"),
        node_selector=dict(profile.node_selector) or None,
        tolerations=[_toleration(t) for t in profile.tolerations] or None,
        on_finish_action="delete_pod",
        get_logs=True,
        # the provider's 120 s are too short to scale up a GPU node or pull the kernel image (GBs)
        schedule_timeout_seconds=1800,
        startup_timeout_seconds=1800,
    )
    return _kubernetes_stage_operator(), kw, "arguments", [s.command for s in specs]


def _toleration(t: dict[str, Any]):
    """A profile's toleration, as in a pod spec (``tolerationSeconds``) or in Python (``toleration_seconds``)."""
    from kubernetes.client import models as k8s

    by_json = {v: k for k, v in k8s.V1Toleration.attribute_map.items()}
    return k8s.V1Toleration(**{by_json.get(k, k): v for k, v in t.items()})


def _dag_section(path: Path) -> tuple[dict[str, Any] | None, bool]:
    """(raw dag section, looks like a workflow params file)."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None, True
    if not isinstance(raw, dict) or "dag" not in raw:
        return None, False
    return (raw.get("dag") or {}), True


def _form(params: Params | None, fields: tuple[str, ...] = TRIGGER_FIELDS) -> dict[str, Any]:
    """The Trigger form: Airflow Params derived from the schema (type, bounds, help; defaults from the file)."""
    from airflow.sdk import Param

    if params is None:
        return {}
    return {name: Param(spec.pop("default"), **spec) for name, spec in trigger_form(params, fields).items()}


def _form_fields(params: Params | None) -> tuple[str, ...]:
    """The training form's fields, less those a sweep sets per trial (a value there would be overridden)."""
    if params is None or params.sweep is None:
        return TRIGGER_FIELDS
    varied = set(params.sweep.varied())
    return tuple(f for f in TRIGGER_FIELDS if f not in varied)


def _doc(path: Path, params: Params | None) -> str:
    chain = " → ".join(s.name for s in stages.STAGES)
    doc = f"Workflow for `{path.name}`: {chain}, each a papermill notebook (the executed notebook is the report)."
    if params is None:
        return doc
    ft = params.fine_tune
    rows = [
        ("data", f"`{params.data.path}` (label `{params.data.label_key}`)"),
        ("model", f"`{params.model.name}` ({params.model.source})"),
        ("fine-tune", f"{ft.epochs} epochs, learning rate {ft.learning_rate:g}, freeze {ft.freeze_layers} layers"),
        ("profile", f"`{params.profile}`" + (f", per stage {params.stage_profiles}" if params.stage_profiles else "")),
        ("outputs", f"`{params.outputs_path / params.experiment}/<run id>/`"),
    ]
    champion = params.champion_file
    if champion.is_file():  # written by the compare stage when the champion alias moves
        c = json.loads(champion.read_text())
        rows.append(
            (
                "champion",
                f"`{c.get('name')}` v{c.get('version')}: {c.get('metric')} {c.get('value', 0):.3f}, "
                f"test macro-F1 {(c.get('test') or {}).get('macro_f1') or 0:.3f} (run `{c.get('run')}`)",
            )
        )
    if params.sweep is not None:
        from .sweep import trial_count, varied

        rows.append(
            (
                "sweep",
                f"{trial_count(params)} trials ({params.sweep.method}) over {', '.join(varied(params))} (set per "
                "trial: not in the Trigger form; each trial's settings name its mapped tasks)",
            )
        )
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (
        f"{doc}\n\n| setting | value |\n| --- | --- |\n{table}\n\n"
        'Change a setting for one run in the Trigger form, or with `conf` (`{"fine_tune.epochs": 2}` or '
        '`{"fine_tune": {"epochs": 2}}`): every key is validated before compute, recorded in `run.json` '
        "(`overrides`) and in MLflow; an unknown key fails the run with the fix."
    )


def build_dag(path: Path) -> DAG | None:
    _, is_params = _dag_section(path)
    if not is_params:
        return None
    params: Params | None = None
    problems: list[str] = []
    try:
        params = load_params(path, check_files=False)
    except ParamsError as e:
        problems = e.problems
    doc = _doc(path, params)
    if problems:
        doc += "\n\n**This params file is invalid; runs fail at validation:**\n\n" + "\n".join(
            f"- {p}" for p in problems
        )
    d = params.dag if params and params.dag else None
    start = d.start_date if d else datetime(2026, 1, 1).date()
    dag = DAG(
        dag_id=f"{DAG_ID_PREFIX}{path.stem}",
        description=(params.description if params else "invalid params file")[:200] or None,
        schedule=_schedule(params),
        start_date=datetime(start.year, start.month, start.day),
        catchup=d.catchup if d else False,
        max_active_runs=d.max_active_runs if d else 1,
        tags=(list(d.tags) if d else []) + (["invalid-params"] if problems else []),
        doc_md=doc,
        params=_form(params, _form_fields(params)),
        # strings stay strings: command lines, pod args and env values (a run id "2026_11_30" is not an int)
        render_template_as_native_obj=False,
        default_args={"owner": "helical-workflow"},
    )
    _stage_tasks(dag, params, path, stages.STAGES)
    return dag


def _stage_tasks(dag: DAG, params: Params | None, path: Path, table: tuple[Stage, ...]) -> None:
    """One task per stage of ``table`` (mapped over its shards or trials), by its profile's launcher, wired by the
    stages' upstream."""
    tasks: dict[str, Any] = {}
    for stage in table:
        profile = params.profile_for(stage.name) if params else None
        common: dict[str, Any] = dict(
            task_id=stage.name,
            dag=dag,
            retries=profile.retries if profile else 0,
            retry_delay=timedelta(seconds=30),
            doc_md=stage.description or None,
        )
        if profile and profile.pool:
            common["pool"] = profile.pool  # GPU trials queue on the pool instead of fighting over memory
        if profile:
            common["queue"] = profile.queue  # CeleryExecutor: only workers on that queue take it
        if params is not None and params.sweep is not None and _after_trials(stage):
            common["trigger_rule"] = "all_done"  # a failed trial does not stop the others (its own check does)
        if params is None:  # invalid file: local tasks whose first run explains the problem
            common["retries"] = 0
        tasks[stage.name] = make_task(params, path, stage, common)
        for up in stage.upstream:
            tasks[up] >> tasks[stage.name]


def _schedule(params: Params | None) -> Any:
    """The DAG's schedule: the file's ``dag.schedule``; ``on_new_data`` is the dataset file as an asset whose
    watcher (in the triggerer) fires when its content changes, so the model retrains on new labelled data."""
    d = params.dag if params else None
    if d is None or d.schedule != ON_NEW_DATA:
        return d.schedule if d else None
    from airflow.sdk import Asset, AssetWatcher

    from .watch import FileChangedTrigger

    return [
        Asset(
            name=f"helical_data_{params.experiment}",
            uri=params.data_path.as_uri(),
            watchers=[AssetWatcher(name="data_changed", trigger=FileChangedTrigger(str(params.data_path)))],
        )
    ]


def _after_trials(stage: Stage) -> bool:
    """A stage downstream of a sweep's trials (evaluate of each trial, compare)."""
    return any(stages.get(u).sharding == "trials" for u in stage.upstream)


def params_dir_default() -> Path:
    env = os.environ.get(PARAMS_DIR_ENV)
    return Path(env) if env else launchers.project_root() / "params"


def params_file(dag_id: str) -> Path | None:
    """The params file a workflow DAG was built from (None for another DAG)."""
    if dag_id == ANNOTATE_DAG_ID:
        path = annotate_params_file()
        return path if path.is_file() else None
    if not dag_id.startswith(DAG_ID_PREFIX):
        return None
    path = params_dir_default() / f"{dag_id.removeprefix(DAG_ID_PREFIX)}.yaml"
    return path if path.is_file() and path.name != "profiles.yaml" else None


def build_dags(params_dir: Path | None = None) -> dict[str, DAG]:
    """Every workflow DAG of the params folder, and ``helical_annotate``."""
    params_dir = Path(params_dir) if params_dir else params_dir_default()
    dags = {}
    for path in sorted(params_dir.glob("*.yaml")):
        if path.name == "profiles.yaml":
            continue
        dag = build_dag(path)
        if dag is not None:
            dags[dag.dag_id] = dag
    path = annotate_params_file(params_dir)
    annotate = build_annotate_dag(path) if path.is_file() else None
    if annotate is not None:
        dags[annotate.dag_id] = annotate
    return dags


def annotate_params_file(params_dir: Path | None = None) -> Path:
    env = os.environ.get(ANNOTATE_PARAMS_ENV)
    return Path(env) if env else Path(params_dir or params_dir_default()) / "demo.yaml"


def build_annotate_dag(path: Path) -> DAG | None:
    """``helical_annotate``: the annotation stages, scheduled on the watched folder's asset."""
    from airflow.sdk import AssetWatcher

    from .watch import IncomingH5adTrigger

    try:
        params = load_params(path, check_files=False)
    except ParamsError:
        return None  # the training DAG of the same file shows the problem
    incoming = params.resolve(params.watch.incoming)
    w = params.watch
    watched = Asset(
        name="helical_incoming",
        uri=incoming.as_uri(),
        watchers=[
            AssetWatcher(
                name="incoming_h5ad",
                trigger=IncomingH5adTrigger(
                    directory=str(incoming), stable_seconds=w.stable_seconds, poll_seconds=w.poll_seconds
                ),
            )
        ],
    )
    model = params.annotate.model or f"models:/{params.registered_model}@champion"
    chain = " → ".join(s.name for s in stages.ANNOTATE_STAGES)
    dag = DAG(
        dag_id=ANNOTATE_DAG_ID,
        description=f"Annotate new .h5ad files in {w.incoming} with {model}",
        schedule=[watched],
        start_date=datetime(2026, 1, 1),
        catchup=False,
        max_active_runs=4,
        # watching is what this DAG is for: it starts unpaused, so a file dropped in the folder is annotated
        is_paused_upon_creation=False,
        tags=["annotate", params.experiment],
        params=_form(params, ANNOTATE_TRIGGER_FIELDS),
        render_template_as_native_obj=False,
        doc_md=(
            f"Annotation of new data with `{model}`: {chain}, each a papermill notebook (the executed notebook is "
            f"the report). Watched folder: `{incoming}` (a file stable for {w.stable_seconds:g} s starts a run). "
            f"By hand: trigger with `annotate.inputs` (one path per line). Run folders: "
            f"`{runs_root(params.outputs_path, params.experiment, 'annotate')}/<run id>/`; each input's outputs: "
            f"`{params.outputs_path / 'annotate'}/<sha256>-<name>/<model version>/`."
        ),
        default_args={"owner": "helical-workflow"},
    )
    _stage_tasks(dag, params, path, stages.ANNOTATE_STAGES)
    return dag
