"""The compose stack, the images and the launchers, checked without starting them."""

from __future__ import annotations

import json
import re

import yaml

from .conftest import AIRFLOW_BIN, DEMO_DATA, ROOT, demo_params, run

TOOLS = ROOT / ".venv" / "tools" / "bin"
COMPOSE = ROOT / "compose" / "docker-compose.yml"


def test_compose_file_matches_the_compose_specification():
    r = run([TOOLS / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", COMPOSE])
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_has_every_service_and_no_secret_defaults():
    spec = yaml.safe_load(COMPOSE.read_text())
    services = set(spec["services"])
    assert services >= {
        "postgres",
        "airflow-init",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "mlflow",
        "jupyterlab",
        "prometheus",
        "pushgateway",
        "statsd-exporter",
        "cadvisor",
        "node-exporter",
        "dcgm-exporter",
        "grafana",
        "docker-socket-proxy",
    }
    text = COMPOSE.read_text()
    used = set(re.findall(r"\$\{([A-Z_]+)", text))
    documented = set(re.findall(r"^([A-Z_]+)=", (ROOT / "compose" / ".env.example").read_text(), re.M))
    assert used <= documented, used - documented
    for var in used:
        if re.search(r"PASSWORD|SECRET|TOKEN", var):
            assert re.search(r"\$\{" + var + r":\?", text), f"{var} must be required (:?), never defaulted"
    # only the proxy sees the Docker socket
    for name, svc in spec["services"].items():
        mounts = " ".join(str(v) for v in svc.get("volumes", []))
        if "docker.sock" in mounts:
            assert name == "docker-socket-proxy"


def test_the_celery_profile_has_redis_and_workers_for_every_queue_of_the_profiles():
    """``COMPOSE_PROFILES=celery`` with ``AIRFLOW_EXECUTOR=CeleryExecutor``: Redis, and Celery workers in the image,
    environment and mounts of the scheduler (same code, params, data and outputs folder) serving every queue a
    resource profile names; the `gpu` queue's worker reserves the GPUs."""
    from helical_workflow.params import load_profiles

    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    celery = {name for name, svc in services.items() if "celery" in svc.get("profiles", [])}
    assert celery == {"redis", "airflow-worker", "airflow-worker-gpu"}
    assert not any(
        svc.get("profiles") for name, svc in services.items() if name.startswith("airflow-") and name not in celery
    )
    env = services["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "${AIRFLOW_EXECUTOR:-LocalExecutor}"  # LocalExecutor without the profile
    assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://redis:6379/0"
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]

    sched = services["airflow-scheduler"]
    queues: dict[str, str] = {}
    for name in ("airflow-worker", "airflow-worker-gpu"):
        w = services[name]
        assert w["image"] == sched["image"] and w["build"] == sched["build"]
        assert w["volumes"] == sched["volumes"]  # the outputs folder the other workers and the scheduler see
        assert {k: v for k, v in w["environment"].items() if k != "DUMB_INIT_SETSID"} == sched["environment"]
        assert w["depends_on"]["redis"] == {"condition": "service_healthy"}
        cmd = " ".join(w["command"])
        assert "airflow celery worker" in cmd
        queues[name] = re.search(r"--queues (\S+)", cmd).group(1)
    assert queues == {"airflow-worker": "default", "airflow-worker-gpu": "gpu"}
    gpu = services["airflow-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert "deploy" not in services["airflow-worker"]
    # every queue a resource profile sends tasks to has a worker
    profiles = load_profiles(ROOT / "params" / "profiles.yaml")
    assert {p.queue for p in profiles.values()} <= set(queues.values())
    assert profiles["gpu"].queue == profiles["gpu-k8s"].queue == "gpu" and profiles["cpu"].queue == "default"


def test_dockerfiles_pass_hadolint():
    files = [
        ROOT / "kernels_image" / "Dockerfile",
        ROOT / "compose" / "airflow.Dockerfile",
        ROOT / "compose" / "mlflow.Dockerfile",
    ]
    r = run([TOOLS / "hadolint", *files])
    assert r.returncode == 0, r.stdout + r.stderr
    kernel = files[0].read_text()
    assert "USER 1000" in kernel and "HF_HUB_OFFLINE=1" in kernel and "ARG BASE_IMAGE=" in kernel


def test_dashboard_is_valid_and_provisioned():
    dash = json.loads((ROOT / "compose" / "grafana" / "dashboards" / "helical-workflow.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    for needed in (
        "airflow_ti_finish",
        "airflow_dagrun_duration_seconds",
        "container_cpu_usage_seconds_total",
        "container_memory_working_set_bytes",
        "DCGM_FI_DEV_GPU_UTIL",
        "helical_stage_duration_seconds",
        "helical_model_macro_f1",
    ):
        assert any(needed in e for e in exprs), needed
    prov = yaml.safe_load((ROOT / "compose" / "grafana" / "provisioning" / "dashboards" / "dashboards.yml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


RENDER = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(sys.argv[1])
assert not bag.import_errors, bag.import_errors
dag = bag.dags["helical_gpu"]
out = {}
for t in dag.tasks:
    kind = type(t).__name__
    d = {"kind": kind, "links": [link.name for link in t.operator_extra_links], "queue": t.queue}
    if kind == "DockerStageOperator":
        d.update(image=t.image, command=t.command, mem_limit=t.mem_limit, cpus=t.cpus, auto_remove=t.auto_remove,
                 name=t.container_name, user=t.user, env=t.environment,
                 mounts=[(m["Target"], m["ReadOnly"]) for m in t.mounts],
                 gpus=[r["Count"] for r in (t.device_requests or [])], pool=t.pool)
    elif kind == "KubernetesStageOperator":
        pod = t.build_pod_request_obj()
        c = pod.spec.containers[0]
        d.update(limits=c.resources.limits, node_selector=pod.spec.node_selector,
                 tolerations=[x.to_dict() for x in pod.spec.tolerations or []],
                 volumes=[(v.name, v.persistent_volume_claim.read_only) for v in pod.spec.volumes],
                 run_as_user=pod.spec.security_context.run_as_user, args=c.args, cmds=c.command, pool=t.pool,
                 image=c.image, env={e.name: e.value for e in c.env or []})
    out[t.task_id] = d
print(json.dumps(out, default=str))
"""


def test_docker_and_kubernetes_launchers_from_profiles(tmp_path, model_cache, workflow_env):
    p = demo_params(
        tmp_path, model_cache=model_cache, experiment="gpu", stage_profiles={"fine_tune": "gpu", "evaluate": "gpu-k8s"}
    )
    p.rename(p.with_name("gpu.yaml"))
    kubeconfig = tmp_path / "kubeconfig"  # rendering a pod needs a config, not a cluster
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "t",
                "clusters": [{"name": "t", "cluster": {"server": "https://127.0.0.1:1"}}],
                "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t", "namespace": "ml"}}],
                "users": [{"name": "t", "user": {"token": "x"}}],
            }
        )
    )
    env = {
        **workflow_env,
        "HELICAL_WORKFLOW_PARAMS_DIR": str(p.parent),
        "AIRFLOW_HOME": str(tmp_path / "af"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "HELICAL_KERNEL_IMAGE": "example/kernels:1",
        "KUBECONFIG": str(kubeconfig),
    }
    r = run([AIRFLOW_BIN / "python", "-c", RENDER, ROOT / "dags"], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    tasks = json.loads(r.stdout.strip().splitlines()[-1])
    assert tasks["load"]["kind"] == "StageOperator"
    # the resource profile picks the Celery queue: GPU stages go to the workers serving `gpu`
    assert {k: t["queue"] for k, t in tasks.items()} == {
        "load": "default",
        "tokenize": "default",
        "fine_tune": "gpu",
        "evaluate": "gpu",
        "compare": "default",
    }
    ft = tasks["fine_tune"]
    assert ft["kind"] == "DockerStageOperator" and ft["image"] == "example/kernels:1"
    assert ft["command"] == ["stage", "fine_tune", "{{ run_id }}", "--experiment", "gpu"]
    assert ft["mounts"] == [["/opt/helical-workflow/data", True], ["/opt/helical-workflow/outputs", False]]
    # no params in the container's environment: it loads its run's own params from the run folder, and learns
    # where the host's folders are mounted
    assert "HELICAL_PARAMS" not in ft["env"]
    assert json.loads(ft["env"]["HELICAL_PATH_MAP"]) == [
        [str(DEMO_DATA.parent), "/opt/helical-workflow/data"],
        [workflow_env["HELICAL_WORKFLOW_OUTPUTS"], "/opt/helical-workflow/outputs"],
    ]
    assert ft["gpus"] == [1] and ft["mem_limit"] == "64g" and ft["cpus"] == 8.0 and ft["pool"] == "gpu"
    assert ft["auto_remove"] == "force" and ft["user"] == "1000"
    assert "ti.try_number" in ft["name"] and "ti.map_index" in ft["name"]
    ev = tasks["evaluate"]
    assert ev["kind"] == "KubernetesStageOperator" and ev["pool"] == "gpu"
    assert ev["limits"] == {"memory": "64Gi", "cpu": "8", "nvidia.com/gpu": "1"}
    assert ev["node_selector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert ev["tolerations"][0]["key"] == "nvidia.com/gpu" and ev["tolerations"][0]["effect"] == "NoSchedule"
    assert ev["tolerations"][1]["toleration_seconds"] == 300  # written `tolerationSeconds` in the profile
    assert ev["volumes"] == [["data", True], ["outputs", None]] and ev["run_as_user"] == 1000
    # the same image, command and params as the docker launcher
    assert ev["cmds"] == ["helical-workflow"] and ev["args"] == [
        "stage",
        "evaluate",
        "{{ run_id }}",
        "--experiment",
        "gpu",
    ]
    assert ev["image"] == ft["image"] and ev["env"] == ft["env"]
    # every launcher's task has the stage links (tests/test_links.py follows them)
    assert all(t["links"] == ["Report", "MLflow run"] for t in tasks.values())
