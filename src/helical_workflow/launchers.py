"""Launchers: where and how a stage runs, for Airflow and for ``helical-workflow run`` alike.

A stage's resource profile names its launcher:

* ``local``: papermill executes the stage's notebook here, in the ``helical-workflow`` kernel;
* ``docker``: the kernel image runs ``helical-workflow stage ...`` through the Docker API
  (Docker Engine, a socket proxy, or Podman's compatible service);
* ``kubernetes``: the same command in a pod (Airflow's KubernetesPodOperator).

A run is created once, by its first stage task (:func:`task_run`), which validates the params file
and the trigger's overrides and pins them in the run folder (``params/``). Every later stage,
wherever it runs, loads the run from its folder: a container gets only the run id and the
experiment on its command line, and ``$HELICAL_PATH_MAP`` (where the host's data and outputs
folders are mounted). A container launcher ends in :func:`run_stage` inside the image, so a
stage attempt is recorded the same way wherever it runs.

Light (papermill, pydantic, prometheus-client, docker SDK on demand): the Airflow worker
imports it; the heavy work happens in the kernel that papermill starts.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import stages
from .params import Params
from .runs import (
    PATH_MAP_ENV,
    PERMANENT_ERRORS,
    Attempt,
    Run,
    StageFailed,
    StageNotReady,
    pinned,
    run_dir_for,
    safe_run_id,
    shared_storage_hint,
)
from .stages import Shard

log = logging.getLogger(__name__)

KERNEL_NAME = "helical-workflow"
KERNEL_IMAGE_ENV = "HELICAL_KERNEL_IMAGE"
OUTPUTS_ENV = "HELICAL_WORKFLOW_OUTPUTS"
IN_IMAGE_ROOT = "/opt/helical-workflow"


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
    return project_root() / "notebooks" / stages.get(stage).notebook


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


# ------------------------------------------------------------------ local ----------


def task_run(
    params_path: str | os.PathLike,
    stage: str,
    run_id: str,
    *,
    overrides: dict[str, Any] | None = None,
    run_root: str | os.PathLike | None = None,
) -> Run:
    """The run a stage task works in. The first stage (no upstream) creates it from the params file and the
    trigger's ``overrides``, validated once and pinned in the run folder; every later stage loads the run from
    ``run_root/<run id>`` (``outputs/<experiment>``) and never reads the params file again."""
    st = stages.get(stage)
    if not st.upstream:
        return Run.create(params_path, run_id, overrides=overrides, workflow=st.workflow)
    if run_root is None:
        raise ValueError(f"stage '{stage}' loads its run: it needs run_root (outputs/<experiment>)")
    run_dir = Path(run_root) / safe_run_id(run_id)
    if pinned(run_dir) is None:  # the first task created it elsewhere, or has not run
        first = stages.table(st.workflow)[0].name
        raise StageNotReady(
            f"stage '{stage}' needs '{first}' to have succeeded in {run_dir}, which created the run; this machine "
            f"sees no run there. {shared_storage_hint(run_dir, first)}"
        )
    return Run.load(run_dir)


def run_task(
    params_path: str | os.PathLike,
    stage: str,
    run_id: str,
    *,
    shard: Shard | str | None = None,
    overrides: dict[str, Any] | None = None,
    run_root: str | os.PathLike | None = None,
    kernel_name: str = KERNEL_NAME,
    log_output: bool = True,
) -> Attempt:
    """What a local stage task runs: its run (:func:`task_run`), then the stage here (:func:`run_stage`)."""
    run = task_run(params_path, stage, run_id, overrides=overrides, run_root=run_root)
    return run_stage(run, stage, shard=shard, kernel_name=kernel_name, log_output=log_output)


def run_stage(
    run: Run,
    stage: str,
    *,
    shard: Shard | str | None = None,
    kernel_name: str = KERNEL_NAME,
    log_output: bool = True,
) -> Attempt:
    """One attempt of a stage (or one shard of it) of a created run, here: papermill in the kernel, inside
    ``Run.attempt``."""
    finalize = None if _has_kernel_libraries() else _finalize_in_kernel(run, kernel_name)
    with run.attempt(stage, shard, finalize=finalize) as a:
        _papermill(run, a, kernel_name=kernel_name, log_output=log_output)
    return a


def kernel_over_ipc() -> dict[str, Any]:
    """papermill's kernel talks to it over local IPC sockets instead of TCP on localhost: nothing is reachable
    from the network, and the kernel has no "running over TCP without encryption" warning to print (which
    Airflow logs at ERROR level in every successful task)."""
    from traitlets.config import Config

    return {"config": Config({"KernelManager": {"transport": "ipc"}})}


def _papermill(run: Run, a: Attempt, *, kernel_name: str, log_output: bool) -> None:
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    kernels = project_root() / ".venv" / "jupyter" / "share" / "jupyter"
    if not os.environ.get("JUPYTER_PATH") and kernels.is_dir():  # the project's kernel, from a bare shell
        os.environ["JUPYTER_PATH"] = str(kernels)

    parameters: dict[str, Any] = {"params_path": str(run.params_file), "run_dir": str(run.dir)}
    if a.shard is not None:
        parameters[a.shard.kind] = str(a.shard)  # the notebook's `shard` or `trial` parameter
    try:
        pm.execute_notebook(
            str(notebook_path(a.stage.name)),
            str(a.notebook),
            parameters=parameters,
            kernel_name=kernel_name,
            log_output=log_output,
            progress_bar=False,
            report_mode=False,
            cwd=str(run.dir),  # nothing a notebook writes by default (MLflow's ./mlruns, ...) lands in notebooks/
            execution_timeout=run.params.profile_for(a.stage.name).cell_timeout_s,
            **kernel_over_ipc(),
        )
    except PapermillExecutionError as e:
        raise StageFailed(
            f"stage '{a.key}' failed in cell {e.exec_count}: {e.ename}: {e.evalue}\n"
            f"The executed notebook with the full error is {a.notebook}",
            permanent=e.ename in PERMANENT_ERRORS,
        ) from None


def _has_kernel_libraries() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("mlflow", "nbconvert"))


def kernel_cli(args: list[str], *, cwd: Path, kernel_name: str = KERNEL_NAME) -> subprocess.CompletedProcess:
    """``helical-workflow ARGS`` in the kernel environment (torch, MLflow, helical), from the Airflow worker,
    which has none of them; output captured."""
    cmd = [kernel_python(kernel_name), "-m", "helical_workflow.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=str(cwd))


def _finalize_in_kernel(run: Run, kernel_name: str):
    """The Airflow worker has no MLflow: finalising (report, MLflow) runs in the kernel environment."""

    def finalize(a: Attempt) -> None:
        args = ["finalize-stage", str(run.dir), a.stage.name]
        args += ["--status", a.status, "--seconds", f"{a.seconds:.3f}"]
        if a.shard is not None:
            args += ["--shard", str(a.shard)]
        proc = kernel_cli(args, cwd=run.dir, kernel_name=kernel_name)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        sys.stdout.write(proc.stdout)

    return finalize


# ------------------------------------------------------------- containers ----------


def kernel_image() -> str:
    return os.environ.get(KERNEL_IMAGE_ENV, "helical-workflow-kernels:latest")


def path_map(params: Params) -> list[tuple[str, str]]:
    """Where a container sees the host's folders (``$HELICAL_PATH_MAP``): the dataset's folder and the outputs
    folder, as recorded in the run's params, under IN_IMAGE_ROOT."""
    return [
        (str(params.data_path.parent), f"{IN_IMAGE_ROOT}/data"),
        (str(params.outputs_path), f"{IN_IMAGE_ROOT}/outputs"),
    ]


def _memory_docker(text: str) -> str:
    """Profile memory ('8g', '64Gi') as Docker wants it ('8g')."""
    return text.lower().replace("i", "")


def _memory_k8s(text: str) -> str:
    """'64g' -> '64Gi' (binary units, as Docker reads 'g')."""
    t = text.strip()
    return t[:-1] + t[-1].upper() + "i" if t[-1:].lower() in ("k", "m", "g") else t


@dataclass
class ContainerSpec:
    """One stage in the kernel image: what the docker and kubernetes launchers both run."""

    image: str
    command: list[str]
    env: dict[str, str]
    data_dir: str  # host folder of the dataset (mounted read-only)
    outputs_dir: str  # host outputs folder (mounted read-write)
    memory: str
    cpus: float
    gpus: int
    user: str = field(default_factory=lambda: os.environ.get("HELICAL_CONTAINER_USER", "1000"))

    @classmethod
    def for_stage(cls, params: Params, stage: str, shard: Shard | str | None, run_id: str) -> "ContainerSpec":
        """The container of one stage task of a run of ``params``: it loads the run from the outputs folder."""
        profile = params.profile_for(stage)
        command = ["stage", stage, run_id, "--experiment", params.experiment]
        command += ["--shard", str(shard)] if shard is not None else []
        env = {OUTPUTS_ENV: f"{IN_IMAGE_ROOT}/outputs", PATH_MAP_ENV: json.dumps(path_map(params))}
        for k in ("HELICAL_PUSHGATEWAY", "MLFLOW_TRACKING_URI", "OMP_NUM_THREADS"):
            if os.environ.get(k):
                env[k] = os.environ[k]
        return cls(
            image=kernel_image(),
            command=command,
            env=env,
            # host paths as the engine sees them (they differ when Airflow itself runs in a container)
            data_dir=os.environ.get("HELICAL_HOST_DATA", str(params.data_path.parent)),
            outputs_dir=os.environ.get("HELICAL_HOST_OUTPUTS", str(params.outputs_path)),
            memory=profile.memory,
            cpus=float(profile.cpus),
            gpus=profile.gpus,
        )

    # --- Docker API ------------------------------------------------------------
    def docker_mounts(self) -> list:
        from docker.types import Mount

        return [
            Mount(target=f"{IN_IMAGE_ROOT}/data", source=self.data_dir, type="bind", read_only=True),
            Mount(target=f"{IN_IMAGE_ROOT}/outputs", source=self.outputs_dir, type="bind", read_only=False),
        ]

    def docker_device_requests(self) -> list | None:
        from docker.types import DeviceRequest

        return [DeviceRequest(count=self.gpus, capabilities=[["gpu"]])] if self.gpus else None

    def docker_kwargs(self) -> dict[str, Any]:
        """The arguments both DockerOperator and the Docker SDK's ``containers.run`` take alike."""
        return dict(
            image=self.image,
            command=self.command,
            environment=self.env,
            mounts=self.docker_mounts(),
            mem_limit=_memory_docker(self.memory),
            device_requests=self.docker_device_requests(),
            user=self.user,
        )

    # --- Kubernetes --------------------------------------------------------------
    def pod_kwargs(self) -> dict[str, Any]:
        """KubernetesPodOperator arguments: the same image, command and resources, PVCs for data and outputs."""
        from kubernetes.client import models as k8s

        uid, gid = self.uid_gid()
        cpus = int(self.cpus) if float(self.cpus).is_integer() else self.cpus
        limits = {"memory": _memory_k8s(self.memory), "cpu": str(cpus)}
        if self.gpus:
            limits["nvidia.com/gpu"] = str(self.gpus)
        pvc = k8s.V1PersistentVolumeClaimVolumeSource
        volumes = [
            k8s.V1Volume(
                name="data",
                persistent_volume_claim=pvc(
                    claim_name=os.environ.get("HELICAL_DATA_PVC", "helical-data"), read_only=True
                ),
            ),
            k8s.V1Volume(
                name="outputs",
                persistent_volume_claim=pvc(claim_name=os.environ.get("HELICAL_OUTPUTS_PVC", "helical-outputs")),
            ),
        ]
        mounts = [
            k8s.V1VolumeMount(name="data", mount_path=f"{IN_IMAGE_ROOT}/data", read_only=True),
            k8s.V1VolumeMount(name="outputs", mount_path=f"{IN_IMAGE_ROOT}/outputs"),
        ]
        return dict(
            image=self.image,
            cmds=["helical-workflow"],
            arguments=self.command,
            env_vars=dict(self.env),
            container_resources=k8s.V1ResourceRequirements(limits=limits, requests=dict(limits)),
            volumes=volumes,
            volume_mounts=mounts,
            security_context=k8s.V1PodSecurityContext(
                run_as_user=uid,
                run_as_group=gid,
                run_as_non_root=True,
                # a fresh PVC is root's: the group gets write access to outputs (not re-chowned every start)
                fs_group=gid if gid is not None else uid,
                fs_group_change_policy="OnRootMismatch",
                seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
            ),
            # with the pod's settings, what Pod Security Standards "restricted" asks of a container
            container_security_context=k8s.V1SecurityContext(
                allow_privilege_escalation=False, capabilities=k8s.V1Capabilities(drop=["ALL"])
            ),
        )

    def uid_gid(self) -> tuple[int, int | None]:
        """``user`` as numbers: ``'1000'`` or ``'1000:1000'`` (Docker's forms; a pod needs numeric ids).

        Without a group, the image's user group is the uid's (``useradd`` in kernels_image/Dockerfile).
        """
        uid, _, gid = self.user.partition(":")
        try:
            return int(uid), int(gid) if gid else None
        except ValueError:
            raise ValueError(
                f"HELICAL_CONTAINER_USER={self.user!r}: a pod needs a numeric user, UID or UID:GID (e.g. 1000)"
            ) from None


def explain_docker_error(e: Exception, image: str, url: str | None) -> str:
    text = str(e)
    low = text.lower()
    if "could not select device driver" in low or "nvidia" in low and "gpu" in low:
        return (
            f"the stage asks for a GPU but the Docker host has none usable ({text}). Fix: run on a GPU host "
            "with the NVIDIA container toolkit, or give this stage a CPU profile."
        )
    if "not found" in low or "no such image" in low or "pull access denied" in low or "manifest unknown" in low:
        return f"image {image!r} is not on the Docker host and could not be pulled ({text}). Fix: `make image` there."
    if "connection" in low or "no such file" in low or "refused" in low:
        return (
            f"cannot reach the Docker API at {url or 'DOCKER_HOST'} ({text}). Fix: start the engine (or "
            "`podman system service`) and point DOCKER_HOST at it."
        )
    return f"container run failed: {text}"


def docker_url() -> str:
    return os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")


def container_name(params: Params, stage: str, shard: Shard | None, run_id: str) -> str:
    part = f"-{shard.i}" if shard is not None else ""
    return f"hw-{params.experiment}-{stage}{part}-{safe_run_id(run_id)}-{os.getpid()}".replace(".", "")[:250]


def run_in_docker(run: Run, stage: str, *, shard: Shard | str | None = None) -> None:
    """A stage of a created run in the kernel image through the Docker SDK, without Airflow; the container is
    always removed."""
    import docker
    from docker.errors import DockerException

    params, run_id = run.params, run.run_id
    shard = Shard.parse(shard, stages.get(stage).shard_kind)
    spec = ContainerSpec.for_stage(params, stage, shard, run_id)
    name = container_name(params, stage, shard, run_id)
    container = None
    try:
        client = docker.DockerClient(base_url=docker_url())
        container = client.containers.run(
            **spec.docker_kwargs(), name=name, detach=True, nano_cpus=int(spec.cpus * 1e9)
        )
        for chunk in container.logs(stream=True, follow=True):
            sys.stdout.write(chunk.decode(errors="replace"))
        code = container.wait()["StatusCode"]
    except DockerException as e:
        raise StageFailed(explain_docker_error(e, spec.image, docker_url())) from None
    finally:
        if container is not None:
            try:
                container.remove(force=True)
            except DockerException as e:
                log.warning("could not remove container %s: %s", name, e)
    if code != 0:
        raise StageFailed(
            f"stage '{stage}' failed in container {name} (exit {code}); see its notebook and run.json in the run folder"
        )


def run_stage_in_image(stage: str, run_id: str, experiment: str, *, shard: str | None = None) -> Attempt:
    """The kernel image's ``stage`` command: load the run from the mounted outputs folder, then :func:`run_stage`."""
    outputs = os.environ.get(OUTPUTS_ENV)
    if not outputs:
        raise StageFailed(
            f"${OUTPUTS_ENV} is not set: the container does not know where the run folders are mounted. Fix: start "
            "stages through a launcher (Airflow, or `helical-workflow run`)."
        )
    try:
        run = Run.load(run_dir_for(Path(outputs), experiment, run_id, stages.get(stage).workflow))
    except FileNotFoundError as e:
        raise StageFailed(str(e)) from None
    return run_stage(run, stage, shard=shard)


# --------------------------------------------------------------- workflow ----------


@dataclass(frozen=True)
class Launcher:
    """How the stages of a resource profile run: from a shell (``helical-workflow run``) and as Airflow tasks.

    ``shell`` runs one stage attempt of a created run (None: only Airflow can start it; ``why_not_shell`` says
    so, with the fix); ``airflow_task`` names the function of :mod:`helical_workflow.dag_factory` that builds
    the stage's task (the operator class, its arguments, and the field its shards are mapped over).
    """

    name: str
    airflow_task: str
    shell: Any = None  # Callable[[Run, str, Shard | None, dict], None]
    why_not_shell: str = ""


def _shell_local(run: Run, stage: str, shard: Shard | None, kw: dict[str, Any]) -> None:
    run_stage(run, stage, shard=shard, **kw)


def _shell_docker(run: Run, stage: str, shard: Shard | None, kw: dict[str, Any]) -> None:
    run_in_docker(run, stage, shard=shard)


# The one launcher table: the keys are the values of a profile's ``launcher`` field.
LAUNCHERS: dict[str, Launcher] = {
    "local": Launcher("local", "local_task", _shell_local),
    "docker": Launcher("docker", "docker_task", _shell_docker),
    "kubernetes": Launcher(
        "kubernetes",
        "kubernetes_task",
        None,
        "pods are started by Airflow's KubernetesPodOperator, not from a shell. Fix: trigger the DAG, or give the "
        "stage a local or docker profile for `helical-workflow run`.",
    ),
}


def launch(
    run: Run,
    stage: str,
    *,
    shard: Shard | None = None,
    kernel_name: str = KERNEL_NAME,
    log_output: bool = True,
) -> None:
    """One stage attempt of a created run by the launcher of the stage's resource profile (``helical-workflow
    run``)."""
    params = run.params
    launcher = LAUNCHERS[params.profile_for(stage).launcher]
    if launcher.shell is None:
        profile = params.stage_profiles.get(stage, params.profile)
        raise StageFailed(
            f"stage '{stage}' uses profile '{profile}' with the {launcher.name} launcher: {launcher.why_not_shell}"
        )
    launcher.shell(run, stage, shard, {"kernel_name": kernel_name, "log_output": log_output})


def run_workflow(
    params_path: str | os.PathLike,
    run_id: str,
    only: tuple[str, ...] | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    workflow: str = "train",
    **kw: Any,
) -> Run:
    """Every stage of the workflow's table in order (shards one after another), each by its profile's launcher.

    The run is created first: the params file and ``overrides`` are validated once, before any stage starts,
    and pinned in the run folder, which every stage then reads.
    """
    run = Run.create(params_path, run_id, overrides=overrides, workflow=workflow)
    failed: dict[int, str] = {}  # trial -> why; its later stages are skipped, the other trials go on
    for st in run.stages:
        if only and st.name not in only:
            continue
        for shard in st.shards(run.params):
            if shard is not None and shard.kind == "trial" and shard.i in failed:
                continue
            try:
                launch(run, st.name, shard=shard, **kw)
            except StageFailed as e:
                if shard is None or shard.kind != "trial":
                    raise
                failed[shard.i] = f"{st.key(shard)}: {str(e).splitlines()[0]}"
    if failed:
        raise StageFailed(f"{len(failed)} trial(s) failed (the others ran): " + "; ".join(failed.values()))
    return run
