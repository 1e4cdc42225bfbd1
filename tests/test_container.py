"""The GPU-container path, for real: Podman serves the Docker API, the kernel image is built from a
debootstrapped Debian base, and the demo DAG runs every stage in it through Airflow's DockerOperator."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest
import yaml

from .conftest import AIRFLOW_BIN, DEMO_DATA, ROOT, airflow_home, cli, run

pytestmark = pytest.mark.slow
PODMAN = ["bash", str(ROOT / "scripts" / "podman.sh")]


@pytest.fixture(scope="module")
def podman_socket(tmp_path_factory):
    d = tmp_path_factory.mktemp("podman")
    sock = d / "podman.sock"
    log = open(d / "service.log", "w")
    proc = subprocess.Popen([*PODMAN, "service", str(sock)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while not sock.exists() and time.time() < deadline:
        time.sleep(0.5)
    assert sock.exists(), (d / "service.log").read_text()
    built = run([*PODMAN, "build"], timeout=3000)
    assert built.returncode == 0, (built.stdout + built.stderr)[-4000:]
    yield sock
    proc.terminate()
    proc.wait(timeout=30)


def test_image_describes_itself(podman_socket):
    env = {**os.environ, "CONTAINERS_CONF": str(ROOT / ".venv" / "podman" / "containers.conf")}
    r = run(["podman", "run", "--rm", "helical-workflow-kernels:latest"], env=env)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["versions"]["helical"] == "2.2.0" and info["versions"]["torch"] == "2.7.0"
    assert info["user"] == 1000 and info["hf_hub_offline"] == "1" and info["cuda_available"] is False


def test_demo_dag_runs_in_containers(podman_socket, tmp_path, workflow_env):
    root, env = _docker_project(tmp_path, workflow_env, f"unix://{podman_socket}")
    t0 = time.time()
    r = run([AIRFLOW_BIN / "airflow", "dags", "test", "helical_demo_docker"], env=env)
    wall = time.time() - t0
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    (run_dir,) = list((root / "outputs" / "demo_docker").iterdir())
    m = json.loads((run_dir / "run.json").read_text())
    assert all(m["stages"][s]["status"] == "success" for s in ("load", "tokenize", "fine_tune", "evaluate", "compare"))
    for nb in ("01_load", "02_tokenize", "03_fine_tune", "04_evaluate"):
        assert (run_dir / "notebooks" / f"{nb}.ipynb").exists() and (run_dir / "reports" / f"{nb}.html").exists()
    assert json.loads((run_dir / "evaluate" / "metrics.json").read_text())["n_cells"] > 0
    assert m["params"]["data"]["path"] == "/opt/helical-workflow/data/pbmc68k_reduced_counts.h5ad"  # ran inside
    ps = _containers()
    assert ps == "", f"containers left behind: {ps.stdout}"
    (tmp_path / "wall.txt").write_text(f"{wall:.0f}")
    print(f"podman DAG run: {wall:.0f} s")


def test_cli_run_honours_the_docker_launcher(podman_socket, tmp_path, workflow_env):
    """`helical-workflow run` with a cpu-docker profile runs every stage in the kernel image, as the DAG does."""
    root, env = _docker_project(tmp_path, workflow_env, f"unix://{podman_socket}")
    r = cli("run", root / "params" / "demo_docker.yaml", "--run-id", "cli-docker", "--quiet", env=env, timeout=1800)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    run_dir = root / "outputs" / "demo_docker" / "cli-docker"
    m = json.loads((run_dir / "run.json").read_text())
    assert all(m["stages"][s]["status"] == "success" for s in ("load", "tokenize", "fine_tune", "evaluate", "compare"))
    assert m["params"]["data"]["path"] == "/opt/helical-workflow/data/pbmc68k_reduced_counts.h5ad"  # ran inside
    assert (run_dir / "reports" / "04_evaluate.html").exists()
    ps = _containers()
    assert ps == "", f"containers left behind: {ps.stdout}"


def _containers() -> str:
    """The names of the workflow's containers (``hw-*``) Podman still has, running or not."""
    env = {**os.environ, "CONTAINERS_CONF": str(ROOT / ".venv" / "podman" / "containers.conf")}
    return run(["podman", "ps", "-a", "--filter", "name=hw-", "--format", "{{.Names}}"], env=env).stdout.strip()


def _docker_project(tmp_path, workflow_env, socket_url: str, image: str | None = None):
    root = tmp_path / "project"
    (root / "params").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "outputs").mkdir()
    os.chmod(root / "outputs", 0o777)  # the image runs as uid 1000
    shutil.copy(DEMO_DATA, root / "data" / DEMO_DATA.name)
    shutil.copy(ROOT / "params" / "profiles.yaml", root / "params" / "profiles.yaml")
    raw = yaml.safe_load((ROOT / "params" / "demo.yaml").read_text())
    raw.update(experiment="demo_docker", profile="cpu-docker")
    raw["fine_tune"]["epochs"] = 1
    (root / "params" / "demo_docker.yaml").write_text(yaml.safe_dump(raw))
    extra = {"HELICAL_WORKFLOW_OUTPUTS": str(root / "outputs"), "DOCKER_HOST": socket_url}
    if image:
        extra["HELICAL_KERNEL_IMAGE"] = image
    env = airflow_home(tmp_path, workflow_env, root / "params", **extra)
    return root, env


def test_unreachable_engine_fails_clearly(tmp_path, workflow_env):
    _, env = _docker_project(tmp_path, workflow_env, f"unix://{tmp_path}/no-engine.sock")
    r = run([AIRFLOW_BIN / "airflow", "dags", "test", "helical_demo_docker"], env=env)
    assert r.returncode != 0
    assert "cannot reach the Docker API at unix://" in r.stdout + r.stderr


def test_missing_image_fails_clearly_and_leaves_no_container(podman_socket, tmp_path, workflow_env):
    _, env = _docker_project(tmp_path, workflow_env, f"unix://{podman_socket}", image="localhost/no-such-image:1")
    r = run([AIRFLOW_BIN / "airflow", "dags", "test", "helical_demo_docker"], env=env)
    assert r.returncode != 0
    assert "image 'localhost/no-such-image:1' is not on the Docker host" in r.stdout + r.stderr
    ps = _containers()
    assert ps == ""
