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

try:
    from airflow.providers.docker.operators.docker import DockerOperator
except ImportError:  # the docker provider is optional for local-only installs
    DockerOperator = None

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


KERNEL_IMAGE_ENV = "HELICAL_KERNEL_IMAGE"
IN_IMAGE_ROOT = "/opt/helical-workflow"


def kernel_image() -> str:
    return os.environ.get(KERNEL_IMAGE_ENV, "helical-workflow-kernels:latest")


def _stage_command(params_path: Path, stage: str, shard: str | None) -> list[str]:
    """The kernel image's entry point runs the same launch code as the local launcher."""
    cmd = ["stage", f"{IN_IMAGE_ROOT}/params/{params_path.name}", stage, "{{ run_id }}"]
    return cmd + (["--shard", shard] if shard else [])


def _memory_bytes(text: str) -> str:
    """Profile memory ('8g', '64Gi') as Docker wants it ('8g')."""
    return text.lower().replace("i", "")


def _k8s_quantity(text: str) -> str:
    """'64g' -> '64Gi' (binary units, as Docker reads 'g')."""
    t = text.strip()
    if t[-1:].lower() in ("k", "m", "g"):
        return t[:-1] + t[-1].upper() + "i"
    return t


class DockerStageOperator(DockerOperator if DockerOperator is not None else object):  # type: ignore[misc]
    """A stage in the kernel image through the Docker API (Docker Engine, a socket proxy, or Podman).

    Data folder read-only, run folders read-write, GPUs by device request, memory and CPUs from the
    profile, a unique container name per run, task, map index and try, removed whatever the outcome.
    """

    def execute(self, context: Any) -> Any:
        from docker.errors import APIError, DockerException

        try:
            return super().execute(context)
        except (APIError, DockerException) as e:
            raise RuntimeError(_explain_docker_error(e, self.image, self.docker_url)) from None
        except Exception as e:  # the hook's "Failed to establish connection to any given Docker hosts."
            if "establish connection" in str(e):
                raise RuntimeError(_explain_docker_error(ConnectionError(f"connection failed: {e}"), self.image,
                                                         self.docker_url)) from None
            raise


def _explain_docker_error(e: Exception, image: str, url: str | None) -> str:
    text = str(e)
    low = text.lower()
    if "could not select device driver" in low or "nvidia" in low and "gpu" in low:
        return (f"the stage asks for a GPU but the Docker host has none usable ({text}). Fix: run on a GPU host "
                "with the NVIDIA container toolkit, or give this stage a CPU profile.")
    if "not found" in low or "no such image" in low or "pull access denied" in low or "manifest unknown" in low:
        return f"image {image!r} is not on the Docker host and could not be pulled ({text}). Fix: `make image` there."
    if "connection" in low or "no such file" in low or "refused" in low:
        return (f"cannot reach the Docker API at {url or 'DOCKER_HOST'} ({text}). Fix: start the engine (or "
                "`podman system service`) and point DOCKER_HOST at it.")
    return f"container run failed: {text}"


def _docker_task(params: Params, profile: Any) -> tuple[type, dict[str, Any], str]:
    from docker.types import DeviceRequest, Mount

    # host paths as the Docker engine sees them (they differ when Airflow itself runs in a container)
    data_dir = os.environ.get("HELICAL_HOST_DATA", str(params.data_path.parent))
    outputs = os.environ.get("HELICAL_HOST_OUTPUTS", str(params.outputs_path))
    params_dir = os.environ.get("HELICAL_HOST_PARAMS", str(Path(params.source_path).parent))
    mounts = [
        Mount(target=f"{IN_IMAGE_ROOT}/data", source=data_dir, type="bind", read_only=True),
        Mount(target=f"{IN_IMAGE_ROOT}/outputs", source=outputs, type="bind", read_only=False),
        Mount(target=f"{IN_IMAGE_ROOT}/params", source=params_dir, type="bind", read_only=True),
    ]
    env = {"HELICAL_WORKFLOW_OUTPUTS": f"{IN_IMAGE_ROOT}/outputs", "HELICAL_WORKFLOW_HOME": IN_IMAGE_ROOT}
    for k in ("HELICAL_PUSHGATEWAY", "MLFLOW_TRACKING_URI"):
        if os.environ.get(k):
            env[k] = os.environ[k]
    requests = [DeviceRequest(count=profile.gpus, capabilities=[["gpu"]])] if profile.gpus else None
    name = ("hw-{{ dag.dag_id }}-{{ task.task_id }}-{{ ti.map_index }}-{{ run_id | replace(':', '') | replace('+', '') "
            "| replace('.', '') }}-{{ ti.try_number }}").replace(" ", "")
    return DockerStageOperator, dict(
        image=kernel_image(), container_name=name,
        docker_url=os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"), mounts=mounts,
        environment=env, mem_limit=_memory_bytes(profile.memory), cpus=float(profile.cpus),
        device_requests=requests, auto_remove="force", mount_tmp_dir=False,
        user=os.environ.get("HELICAL_CONTAINER_USER", "1000"),
    ), "command"


def _k8s_task(params: Params, profile: Any) -> tuple[type, dict[str, Any], str]:
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    cpus = int(profile.cpus) if float(profile.cpus).is_integer() else profile.cpus
    limits = {"memory": _k8s_quantity(profile.memory), "cpu": str(cpus)}
    if profile.gpus:
        limits["nvidia.com/gpu"] = str(profile.gpus)
    volumes = [
        k8s.V1Volume(name="data", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
            claim_name=os.environ.get("HELICAL_DATA_PVC", "helical-data"), read_only=True)),
        k8s.V1Volume(name="outputs", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
            claim_name=os.environ.get("HELICAL_OUTPUTS_PVC", "helical-outputs"))),
    ]
    mounts = [k8s.V1VolumeMount(name="data", mount_path=f"{IN_IMAGE_ROOT}/data", read_only=True),
              k8s.V1VolumeMount(name="outputs", mount_path=f"{IN_IMAGE_ROOT}/outputs")]
    return KubernetesPodOperator, dict(
        image=kernel_image(), cmds=["python", "/usr/local/bin/helical-kernel"], name="hw-stage",
        namespace=os.environ.get("HELICAL_K8S_NAMESPACE", "default"),
        container_resources=k8s.V1ResourceRequirements(limits=limits, requests=dict(limits)),
        node_selector=dict(profile.node_selector) or None,
        tolerations=[k8s.V1Toleration(**t) for t in profile.tolerations] or None,
        volumes=volumes, volume_mounts=mounts,
        env_vars={"HELICAL_WORKFLOW_OUTPUTS": f"{IN_IMAGE_ROOT}/outputs"},
        security_context=k8s.V1PodSecurityContext(run_as_user=1000, run_as_non_root=True),
        on_finish_action="delete_pod", get_logs=True,
    ), "arguments"


def make_task(params: Params | None, path: Path, stage: str, common: dict[str, Any], shards: list[str] | None):
    """The task (or mapped tasks, one per shard) for a stage, by the launcher of its resource profile."""
    profile = params.profile_for(stage) if params else None
    launcher = profile.launcher if profile else "local"
    if launcher == "local":  # papermill here; the shard goes to the notebook's parameters
        cls, kw, field = StageOperator, {"params_path": str(path), "stage": stage}, "shard"
        per_shard = list(shards or [None])
    else:  # the kernel image's entry point; the shard goes on its command line
        cls, kw, field = (_docker_task if launcher == "docker" else _k8s_task)(params, profile)
        per_shard = [_stage_command(path, stage, s) for s in (shards or [None])]
    if shards:  # dynamic task mapping: one task instance per row shard, whatever the launcher
        return cls.partial(**kw, **common).expand(**{field: per_shard})
    return cls(**kw, **common, **{field: per_shard[0]})


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
        common = dict(task_id=stage, dag=dag, retries=profile.retries if profile else 0,
                      retry_delay=timedelta(seconds=30), **kw)
        n = params.tokenize.shards if params else 1
        # dynamic task mapping: one task instance per row shard
        shards = [f"{i}/{n}" for i in range(n)] if stage == "tokenize" and n > 1 else None
        task = make_task(params, path, stage, common, shards)
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
