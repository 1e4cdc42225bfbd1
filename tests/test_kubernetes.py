"""The kubernetes launcher's pods, rendered without a cluster and validated against the Kubernetes schema.

The DAG of a params file whose stages use the ``gpu-k8s`` profile is built as Airflow builds it. Each task
(each map index of a sharded stage and of a sweep's trials) is rendered as Airflow renders it before it runs
(the run id, the run's conf), and the cncf-kubernetes provider builds the pod it would create
(``build_pod_request_obj``). Every pod is validated with kubernetes-validate (strict schema) and compared
with what the docker launcher runs for the same stage. The example manifests and Helm values in
``deploy/kubernetes/`` are checked in the same subprocess (the orchestration environment, where Airflow,
the provider and kubernetes-validate live).
"""

from __future__ import annotations

import json
import os
import re

import pytest
import yaml

from helical_workflow import launchers
from helical_workflow.params import load_params

from .conftest import AIRFLOW_BIN, ROOT, demo_params, run

K8S_VERSION = "1.30"  # the schema version the pods must satisfy (kubernetes-validate ships 1.x up to 1.37)
DEPLOY = ROOT / "deploy" / "kubernetes"
IN_IMAGE = launchers.IN_IMAGE_ROOT
RUNS = {  # run id -> the run's conf; a run id of digits must stay a string in the pod's args
    "manual__2026-05-01T10:00:00+00:00": {"fine_tune.epochs": 2},
    "20260501": {},
}
SWEEP = {"method": "grid", "grid": {"fine_tune.learning_rate": [0.001, 0.003]}}
STAGE_KEYS = {
    "load",
    "tokenize.shard-00000-of-00002",
    "tokenize.shard-00001-of-00002",
    "fine_tune.trial-00000-of-00002",
    "fine_tune.trial-00001-of-00002",
    "evaluate.trial-00000-of-00002",
    "evaluate.trial-00001-of-00002",
    "compare",
}

RENDER = r"""
import json, sys
from pathlib import Path
from types import SimpleNamespace

import kubernetes_validate
import yaml
from airflow.configuration import conf as airflow_conf
from airflow.sdk.definitions.param import process_params
from kubernetes.client import ApiClient

from helical_workflow import launchers
from helical_workflow.dag_factory import build_dag
from helical_workflow.params import load_params
from helical_workflow.stages import STAGES

job = json.loads(Path(sys.argv[1]).read_text())
api = ApiClient()


def check(manifest):
    try:
        kubernetes_validate.validate(manifest, job["version"], strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{'.'.join(str(p) for p in e.path)}: {e.message}"
    return None


def render(path, run_id, conf):
    dag = build_dag(Path(path))  # a fresh DAG per run: rendering changes a task in place
    params = load_params(path, check_files=False)
    pods = {}
    for stage in STAGES:
        task = dag.get_task(stage.name)
        shards = stage.shards(params)
        for i, shard in enumerate(shards):
            ti = SimpleNamespace(dag_id=dag.dag_id, task_id=task.task_id, map_index=i if len(shards) > 1 else -1,
                                 try_number=1, task=task)
            context = {"dag": dag, "task": task, "ti": ti, "run_id": run_id,
                       "dag_run": SimpleNamespace(run_id=run_id, conf=conf),
                       "params": process_params(dag, task, conf, suppress_exception=False)}
            task.render_template_fields(context)  # as the task runner does; a mapped task unmaps into context
            op = context["task"]
            op.name = op._set_name(op.name)  # what execute() does before building the pod
            pod = op.build_pod_request_obj(context, dry_run=True)  # dry run: no kube config, no API server
            manifest = api.sanitize_for_serialization(pod)
            spec = launchers.ContainerSpec.for_stage(params, stage.name, shard, run_id)
            docker = spec.docker_kwargs()
            pods[stage.key(shard)] = {
                "operator": type(op).__name__,
                "manifest": manifest,
                "error": check(manifest),
                "timeouts": [op.schedule_timeout_seconds, op.startup_timeout_seconds],
                "docker": {
                    **{k: docker[k] for k in ("image", "command", "environment", "user", "mem_limit")},
                    "mounts": [dict(m) for m in docker["mounts"]],
                    "gpus": sum(d["Count"] for d in docker["device_requests"] or []),
                },
            }
    return pods


out = {"runs": {run_id: render(job["params"], run_id, conf) for run_id, conf in job["runs"].items()}}
out["manifests"] = [
    {"file": Path(f).name, "kind": doc["kind"], "name": doc["metadata"]["name"], "error": check(doc), "doc": doc}
    for f in job["manifests"] for doc in yaml.safe_load_all(Path(f).read_text()) if doc
]
values = yaml.safe_load(Path(job["values"]).read_text())
probe = {  # the values' env and volume entries, in the places the chart puts them
    "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "values-probe"},
    "spec": {"containers": [{"name": "base", "image": "airflow", "env": values.get("env", []),
                             "volumeMounts": values.get("volumeMounts", [])}],
             "volumes": values.get("volumes", [])},
}
out["values"] = {
    "error": check(probe),
    "config": {f"{s}.{k}": airflow_conf.has_option(s, k) for s, opts in values.get("config", {}).items() for k in opts},
}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, model_cache) -> dict:
    tmp = tmp_path_factory.mktemp("k8s")
    path = demo_params(tmp, model_cache=model_cache, profile="gpu-k8s", tokenize__shards=2, sweep=SWEEP)
    job = {
        "params": str(path),
        "runs": RUNS,
        "version": K8S_VERSION,
        "manifests": [str(DEPLOY / "pvc-data.yaml"), str(DEPLOY / "pvc-outputs.yaml")],
        "values": str(DEPLOY / "values.yaml"),
    }
    (tmp / "job.json").write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HELICAL_", "MLFLOW_", "AIRFLOW"))}
    env.update(helm_env())  # the Airflow side as deploy/kubernetes/values.yaml sets it up ...
    env.update(HELICAL_WORKFLOW_HOME=str(ROOT), AIRFLOW_HOME=str(tmp / "airflow"))  # ... from this checkout
    r = run([AIRFLOW_BIN / "python", "-c", RENDER, tmp / "job.json"], env=env, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out.update(params_path=path, env=env)
    return out


def helm_values() -> dict:
    return yaml.safe_load((DEPLOY / "values.yaml").read_text())


def helm_env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in helm_values()["env"]}


def pods(rendered: dict):
    """(run id, stage key, pod manifest, rendered entry) for every pod of every run."""
    for run_id, by_key in rendered["runs"].items():
        for key, entry in by_key.items():
            yield run_id, key, entry["manifest"], entry


def container(manifest: dict) -> dict:
    (c,) = manifest["spec"]["containers"]  # one container: no xcom sidecar, no init containers
    return c


def profile(name: str = "gpu-k8s") -> dict:
    return yaml.safe_load((ROOT / "params" / "profiles.yaml").read_text())["profiles"][name]


# What the JSON schema does not check: names, label values and quantities in the API server's formats.
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i|[numkMGTPE])?$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


def format_problems(manifest: dict) -> list[str]:
    meta, spec = manifest["metadata"], manifest["spec"]
    problems = [] if DNS_SUBDOMAIN.match(meta["name"]) and len(meta["name"]) <= 63 else [f"name {meta['name']!r}"]
    problems += [f"label {k}={v!r}" for k, v in meta["labels"].items() if len(v) > 63 or not LABEL_VALUE.match(v)]
    for c in spec["containers"]:
        for kind in ("limits", "requests"):
            problems += [
                f"{kind} {k}={v!r}"
                for k, v in c["resources"][kind].items()
                if not isinstance(v, str) or not QUANTITY.match(v)
            ]
        problems += [f"env {e['name']!r}" for e in c["env"] if not ENV_NAME.match(e["name"])]
        problems += [f"env {e['name']} is not a string" for e in c["env"] if not isinstance(e.get("value", ""), str)]
        problems += [f"arg {a!r} is not a string" for a in c["args"] if not isinstance(a, str)]
    return problems


def memory_bytes(text: str) -> int:
    """'64g' (Docker: binary units) or '64Gi' (Kubernetes) -> bytes."""
    m = re.fullmatch(r"(\d+)([kmg])i?", text.strip().lower())
    assert m, text
    return int(m.group(1)) * 1024 ** "kmg".index(m.group(2)) * 1024


# ---------------------------------------------------------------------------- pods ---------------


def test_every_stage_renders_a_pod_that_validates(rendered):
    for run_id, by_key in rendered["runs"].items():
        assert set(by_key) == STAGE_KEYS, run_id  # one pod per task and map index (shards, trials)
    for run_id, key, manifest, entry in pods(rendered):
        assert entry["operator"] == "KubernetesStageOperator"
        assert manifest["apiVersion"] == "v1" and manifest["kind"] == "Pod"
        assert entry["error"] is None, f"{run_id} {key}: invalid in Kubernetes {K8S_VERSION}: {entry['error']}"
        assert format_problems(manifest) == [], f"{run_id} {key}"
        assert manifest["spec"]["restartPolicy"] == "Never"  # Airflow retries, not the kubelet


def test_resources_node_selector_and_tolerations_come_from_the_profile(rendered):
    p = profile()
    expected = {"cpu": str(p["cpus"]), "memory": "64Gi", "nvidia.com/gpu": str(p["gpus"])}
    for _, key, manifest, entry in pods(rendered):
        c, spec = container(manifest), manifest["spec"]
        assert c["resources"]["limits"] == expected, key
        assert c["resources"]["requests"] == expected, key  # a GPU's request must equal its limit
        assert spec["nodeSelector"] == p["node_selector"]
        assert spec["tolerations"] == p["tolerations"]
        assert manifest["metadata"]["namespace"] == helm_env()["HELICAL_K8S_NAMESPACE"]
        assert min(entry["timeouts"]) >= 600  # time to scale up a GPU node and pull the kernel image


def test_the_pod_runs_as_the_images_non_root_user(rendered):
    for _, key, manifest, entry in pods(rendered):
        pod_ctx, c = manifest["spec"]["securityContext"], container(manifest)
        assert pod_ctx["runAsNonRoot"] is True and pod_ctx["runAsUser"] == int(entry["docker"]["user"]) == 1000, key
        assert pod_ctx["fsGroup"] == 1000  # the outputs PVC is writable by the stage
        assert pod_ctx["seccompProfile"] == {"type": "RuntimeDefault"}
        assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
        assert not manifest["spec"].get("hostNetwork")


def test_data_is_mounted_read_only_and_outputs_read_write_from_the_pvcs(rendered):
    env = helm_env()
    for _, key, manifest, entry in pods(rendered):
        volumes = {v["name"]: v for v in manifest["spec"]["volumes"]}
        assert volumes["data"]["persistentVolumeClaim"] == {"claimName": env["HELICAL_DATA_PVC"], "readOnly": True}
        assert volumes["outputs"]["persistentVolumeClaim"] == {"claimName": env["HELICAL_OUTPUTS_PVC"]}
        mounts = {m["mountPath"]: m for m in container(manifest)["volumeMounts"]}
        assert mounts[f"{IN_IMAGE}/data"] == {"name": "data", "mountPath": f"{IN_IMAGE}/data", "readOnly": True}
        assert mounts[f"{IN_IMAGE}/outputs"]["name"] == "outputs" and not mounts[f"{IN_IMAGE}/outputs"].get("readOnly")
        # the same places, with the same access, as the docker launcher's bind mounts
        assert {m: bool(v.get("readOnly")) for m, v in mounts.items()} == {
            m["Target"]: m["ReadOnly"] for m in entry["docker"]["mounts"]
        }, key


def test_the_pod_carries_the_run_id_and_where_its_run_folder_is(rendered, monkeypatch):
    """A pod gets no params: it loads its run (created by the first task, with the run's conf, in the worker) from
    the outputs volume, by the run id and the experiment on its command line; HELICAL_PATH_MAP says where the
    host's data and outputs folders are mounted."""
    monkeypatch.setenv("HELICAL_WORKFLOW_OUTPUTS", rendered["env"]["HELICAL_WORKFLOW_OUTPUTS"])
    params = load_params(rendered["params_path"], check_files=False)
    for run_id, key, manifest, _ in pods(rendered):
        stage, _, shard = key.partition(".")
        c = container(manifest)
        tail = ["--shard", f"{int(shard.split('-')[1])}/2"] if shard else []
        # the real run id, a string even if all digits
        assert c["args"] == ["stage", stage, run_id, "--experiment", "demo", *tail], key
        env = {e["name"]: e["value"] for e in c["env"]}
        assert "HELICAL_PARAMS" not in env and "HELICAL_CONF" not in env  # nothing frozen at parse time
        assert json.loads(env["HELICAL_PATH_MAP"]) == [
            [str(params.data_path.parent), f"{IN_IMAGE}/data"],
            [rendered["env"]["HELICAL_WORKFLOW_OUTPUTS"], f"{IN_IMAGE}/outputs"],
        ]
        assert env["HELICAL_WORKFLOW_OUTPUTS"] == f"{IN_IMAGE}/outputs"
        for k in ("MLFLOW_TRACKING_URI", "HELICAL_PUSHGATEWAY"):  # passed on from the Airflow side
            assert env[k] == helm_env()[k]
        labels = manifest["metadata"]["labels"]
        assert labels["task_id"] == stage and labels["dag_id"] == "helical_demo"
        assert ("map_index" in labels) == bool(shard)


def test_the_pod_runs_what_the_docker_launcher_runs(rendered):
    dockerfile = (ROOT / "kernels_image" / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", dockerfile, re.M).group(1))
    for _, key, manifest, entry in pods(rendered):
        c, docker = container(manifest), entry["docker"]
        assert c["image"] == docker["image"] == helm_env()["HELICAL_KERNEL_IMAGE"], key
        assert c["command"] + c["args"] == entrypoint + docker["command"], key  # the image's CLI, same arguments
        assert {e["name"]: e["value"] for e in c["env"]} == docker["environment"], key
        assert memory_bytes(c["resources"]["limits"]["memory"]) == memory_bytes(docker["mem_limit"])
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == docker["gpus"]


def test_container_user_forms():
    spec = launchers.ContainerSpec("img", [], {}, "/d", "/o", "8g", 2.0, 0, user="1000")
    assert spec.uid_gid() == (1000, None)
    spec.user = "1000:2000"
    assert spec.uid_gid() == (1000, 2000)
    spec.user = "helical"
    with pytest.raises(ValueError, match="numeric user"):
        spec.uid_gid()


# ------------------------------------------------------------------- deploy/kubernetes -----------


def test_example_pvcs_validate_and_match_what_the_launcher_mounts(rendered):
    docs = {(m["kind"], m["name"]): m for m in rendered["manifests"]}
    for m in rendered["manifests"]:
        assert m["error"] is None, f"{m['file']} {m['kind']} {m['name']}: {m['error']}"
    env = helm_env()
    data = docs[("PersistentVolumeClaim", env["HELICAL_DATA_PVC"])]["doc"]
    outputs = docs[("PersistentVolumeClaim", env["HELICAL_OUTPUTS_PVC"])]["doc"]
    assert data["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert outputs["spec"]["accessModes"] == ["ReadWriteMany"]  # every worker node writes the run folders
    pv = docs[("PersistentVolume", data["spec"]["volumeName"])]["doc"]
    assert pv["spec"]["accessModes"] == ["ReadOnlyMany"] and pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"


# Keys of the official chart's values this file relies on, as documented in the chart's values.yaml
# (apache/airflow chart/values.yaml, releases for Airflow 3). The chart cannot be fetched here (no network,
# no helm), so its structure is written down: a key that is not in it fails this test.
CHART_KEYS = {
    "airflowVersion",
    "defaultAirflowRepository",
    "defaultAirflowTag",
    "images.airflow.repository",
    "images.airflow.tag",
    "images.airflow.digest",
    "images.airflow.pullPolicy",
    "executor",
    "allowPodLaunching",
    "env",  # lists of Kubernetes objects, for every Airflow container (the worker pod template included)
    "volumes",
    "volumeMounts",
    "dags.gitSync.enabled",
    "dags.gitSync.repo",
    "dags.gitSync.branch",
    "dags.gitSync.rev",
    "dags.gitSync.ref",
    "dags.gitSync.depth",
    "dags.gitSync.subPath",
    "dags.gitSync.credentialsSecret",
    "dags.gitSync.period",
}
CHART_EXECUTORS = {"LocalExecutor", "CeleryExecutor", "KubernetesExecutor"}  # Airflow 3: one, or a list
AIRFLOW_SIDE_ENV = {  # what the workflow reads where Airflow parses the DAG and runs its tasks
    "HELICAL_WORKFLOW_HOME",
    "HELICAL_WORKFLOW_OUTPUTS",
    "HELICAL_KERNEL_IMAGE",
    "HELICAL_K8S_NAMESPACE",
    "HELICAL_DATA_PVC",
    "HELICAL_OUTPUTS_PVC",
    "MLFLOW_TRACKING_URI",
    "HELICAL_PUSHGATEWAY",
    "HELICAL_MLFLOW_UI_URL",
    "HELICAL_REPORT_BASE_URL",
}


def _paths(d: dict, prefix: str = ""):
    for k, v in d.items():
        p = f"{prefix}{k}"
        if p == "config":  # airflow.cfg: checked against Airflow's own options
            continue
        if isinstance(v, dict) and p not in CHART_KEYS:
            yield from _paths(v, p + ".")
        else:
            yield p


def test_helm_values_use_the_charts_keys_and_the_workflows_settings(rendered):
    values = helm_values()
    unknown = sorted(set(_paths(values)) - CHART_KEYS)
    assert unknown == [], f"not keys of the official chart: {unknown}"
    assert rendered["values"]["error"] is None, rendered["values"]["error"]  # env and volumes are valid objects
    assert rendered["values"]["config"] and all(rendered["values"]["config"].values()), rendered["values"]["config"]
    assert all(e.strip() in CHART_EXECUTORS for e in values["executor"].split(","))
    assert "KubernetesExecutor" in values["executor"] and values["allowPodLaunching"] is True
    assert values["dags"]["gitSync"]["enabled"] is True
    env = helm_env()
    assert AIRFLOW_SIDE_ENV <= set(env), sorted(AIRFLOW_SIDE_ENV - set(env))
    # the outputs PVC is where the Airflow side looks for outputs, and the claim the stage pods mount
    (mount,) = values["volumeMounts"]
    (volume,) = values["volumes"]
    assert mount["name"] == volume["name"] and mount["mountPath"] == env["HELICAL_WORKFLOW_OUTPUTS"]
    assert volume["persistentVolumeClaim"]["claimName"] == env["HELICAL_OUTPUTS_PVC"]
    assert env["HELICAL_WORKFLOW_HOME"] == "/opt/airflow/dags/repo"  # git-sync's checkout (dags_folder: its subPath)
    assert values["dags"]["gitSync"]["subPath"] == "dags" and values["config"]["core"]["plugins_folder"].startswith(
        env["HELICAL_WORKFLOW_HOME"]
    )
