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
    try:
        assert sock.exists(), (d / "service.log").read_text()
        # the README's command, as written: the CPU base made with debootstrap, the image tagged by its inputs' hash
        image = "make image BASE_IMAGE=localhost/bookworm-base"
        assert f"`{image}`" in (ROOT / "README.md").read_text()
        built = run(image.split(), cwd=ROOT, timeout=3000)
        assert built.returncode == 0, (built.stdout + built.stderr)[-4000:]
        assert "helical-workflow-kernels:latest = helical-workflow-kernels:" in built.stdout
        again = run(image.split(), cwd=ROOT, timeout=300)  # same inputs: nothing to build
        assert again.returncode == 0, again.stdout[-2000:]
        assert "is up to date (same inputs): not rebuilt" in again.stdout, again.stdout[-2000:]
        yield sock
    finally:  # the service goes down even when the build failed
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
    _ran_inside(run_dir, m)
    ps = _containers()
    assert ps == "", f"containers left behind: {ps}"
    (tmp_path / "wall.txt").write_text(f"{wall:.0f}")
    print(f"podman DAG run: {wall:.0f} s")


def test_cli_run_honours_the_docker_launcher(podman_socket, tmp_path, workflow_env):
    """`helical-workflow run` with a cpu-docker profile runs every stage in the kernel image, as the DAG does; then
    the annotation DAG, with the same profile, annotates the data with the model that run trained."""
    root, env = _docker_project(tmp_path, workflow_env, f"unix://{podman_socket}")
    r = cli("run", root / "params" / "demo_docker.yaml", "--run-id", "cli-docker", "--quiet", env=env, timeout=1800)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    run_dir = root / "outputs" / "demo_docker" / "cli-docker"
    m = json.loads((run_dir / "run.json").read_text())
    assert all(m["stages"][s]["status"] == "success" for s in ("load", "tokenize", "fine_tune", "evaluate", "compare"))
    _ran_inside(run_dir, m)
    assert (run_dir / "reports" / "04_evaluate.html").exists()
    ps = _containers()
    assert ps == "", f"containers left behind: {ps}"

    # annotation runs on the same engine: helical_annotate's three stages in the image through the DockerOperator,
    # with the model this run trained (host paths mapped into the container), an asset event at the end
    data = root / "data" / DEMO_DATA.name
    conf = {"annotate.inputs": [str(data)], "annotate.model": str(run_dir), "annotate.min_confidence": 0.2}
    env = {**env, "HELICAL_ANNOTATE_PARAMS": str(root / "params" / "demo_docker.yaml")}
    r = run([AIRFLOW_BIN / "airflow", "dags", "test", "helical_annotate", "-c", json.dumps(conf)], env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    (ann_run,) = (root / "outputs" / "annotate" / "runs" / "demo_docker").iterdir()
    am = json.loads((ann_run / "run.json").read_text())
    assert am["workflow"] == "annotate" and am["params"]["annotate"]["inputs"] == [str(data)]
    assert {k: v["status"] for k, v in am["stages"].items()} == dict.fromkeys(
        ("annotate_prepare", "annotate", "annotate_finish"), "success"
    )
    nb = (ann_run / "notebooks" / "07_annotate.ipynb").read_text()
    assert "run folder /opt/helical-workflow/outputs/annotate/runs/demo_docker/" in nb  # inference ran in the image
    (folder,) = (root / "outputs" / "annotate").glob("*-pbmc68k_reduced_counts/run-*")
    assert json.loads((folder / "annotation.json").read_text())["status"] == "success"
    assert (folder / "annotated.h5ad").is_file() and (ann_run / "reports" / "08_annotate_report.html").is_file()
    import sqlite3

    with sqlite3.connect(tmp_path / "airflow" / "airflow.db") as con:
        (extra,) = con.execute(
            "SELECT e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id WHERE a.name = 'helical_annotated'"
        ).fetchone()
    event = json.loads(extra)
    assert event["run"] == str(ann_run) and event["annotations"][0]["cells"] == 700
    ps = _containers()
    assert ps == "", f"containers left behind: {ps}"


def _ran_inside(run_dir, m) -> None:
    """The stages ran in the image (they saw the run folder at the mounted path), and the run's pinned params
    are the host's (the run was created once, on the host; containers map the paths)."""
    nb = (run_dir / "notebooks" / "03_fine_tune.ipynb").read_text()
    assert "run folder /opt/helical-workflow/outputs/demo_docker/" in nb
    assert m["params"]["data"]["path"] == str(run_dir.parents[2] / "data" / "pbmc68k_reduced_counts.h5ad")


def _containers(filter: str = "name=hw-") -> str:
    """The names of the workflow's containers (``hw-*``) Podman still has, running or not."""
    env = {**os.environ, "CONTAINERS_CONF": str(ROOT / ".venv" / "podman" / "containers.conf")}
    return run(["podman", "ps", "-a", "--filter", filter, "--format", "{{.Names}}"], env=env).stdout.strip()


def _docker_project(tmp_path, workflow_env, socket_url: str, image: str | None = None, **extra_env: str):
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
    extra = {"HELICAL_WORKFLOW_OUTPUTS": str(root / "outputs"), "DOCKER_HOST": socket_url, **extra_env}
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


def test_a_container_stage_whose_task_is_killed_is_retried_cleanly_under_the_scheduler(
    podman_socket, tmp_path, workflow_env
):
    """`airflow standalone` (scheduler, LocalExecutor) runs the demo in containers. The task process of
    fine_tune is SIGKILLed while its container trains: nothing removes that container then. The retry removes
    it before starting its own, resumes from the checkpoint, and the run ends with no container left. The run
    id reads as a number to Python (a native-rendering DAG must still hand the container the string)."""
    import signal
    import sqlite3

    from helical_workflow.runs import safe_run_id

    from .conftest import free_port, standalone_settings, start_group, stop_group, wait_for

    port = free_port()
    root, env = _docker_project(
        tmp_path,
        workflow_env,
        f"unix://{podman_socket}",
        **standalone_settings(port),
    )
    pfile = root / "params" / "demo_docker.yaml"
    raw = yaml.safe_load(pfile.read_text())
    raw["fine_tune"].update(epochs=2, checkpoint_every_steps=4)
    raw["evaluate"] = {**raw.get("evaluate", {}), "umap": False}
    raw["stage_profiles"] = {"fine_tune": "cpu-docker-retry"}
    pfile.write_text(yaml.safe_dump(raw))
    profiles = yaml.safe_load((root / "params" / "profiles.yaml").read_text())
    profiles["profiles"]["cpu-docker-retry"] = {**profiles["profiles"]["cpu-docker"], "retries": 1}
    (root / "params" / "profiles.yaml").write_text(yaml.safe_dump(profiles))

    airflow = AIRFLOW_BIN / "airflow"
    run_id = "2026_11_30"  # Python reads it as the int 20261130: a native-rendering DAG must not
    run_dir = root / "outputs" / "demo_docker" / safe_run_id(run_id)
    db = tmp_path / "airflow" / "airflow.db"
    log = tmp_path / "standalone.log"
    proc = start_group([airflow, "standalone"], env, log)

    def fine_tune_ti():
        with sqlite3.connect(db) as c:
            q = "select pid, try_number, state from task_instance where dag_id = ? and run_id = ? and task_id = ?"
            return c.execute(q, ("helical_demo_docker", run_id, "fine_tune")).fetchone()

    try:
        trigger = [airflow, "dags", "trigger", "helical_demo_docker", "--run-id", run_id]
        wait_for("DAG to trigger", lambda: run(trigger, env=env).returncode == 0, 240, proc, log, 5)
        wait_for("fine_tune checkpoint", lambda: (run_dir / "checkpoints" / "last.pt").exists(), 900, proc, log)
        label = f"label=helical-workflow.run={run_id}"
        assert _containers(label).startswith("hw-helical_demo_docker-fine_tune-"), _containers(label)
        pid, tries, state = fine_tune_ti()
        assert state == "running" and tries == 1, (pid, tries, state)
        os.kill(pid, signal.SIGKILL)  # the task process: DockerOperator's cleanup never runs

        def final():
            r = run([airflow, "dags", "state", "helical_demo_docker", run_id], env=env)
            s = (r.stdout.strip().splitlines() or [""])[-1]
            return s if s in ("success", "failed") else None

        assert wait_for("end of the run", final, 1200, proc, log, 5) == "success", log.read_text()[-4000:]
        assert fine_tune_ti()[1:] == (2, "success")
        try2 = next((tmp_path / "airflow" / "logs").rglob("task_id=fine_tune/attempt=2.log")).read_text()
        assert "left by an earlier try of this task" in try2, try2[-3000:]
        nb = (run_dir / "notebooks" / "03_fine_tune.ipynb").read_text()
        assert "resuming from" in nb
        m = json.loads((run_dir / "run.json").read_text())
        assert m["run_id"] == run_id and m["stages"]["evaluate"]["status"] == "success"
        assert _containers(label) == "", f"containers left behind: {_containers(label)}"
    finally:
        stop_group(proc)
