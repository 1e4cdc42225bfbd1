"""Shared fixtures. pytest runs in the kernel environment; Airflow runs as a subprocess
from the orchestration environment (.venv/airflow), as it does in production."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"
KERNEL_PY = VENV / "kernel" / "bin" / "python"
AIRFLOW_BIN = VENV / "airflow" / "bin"
DEMO_DATA = ROOT / "data" / "pbmc68k_reduced_counts.h5ad"
JUPYTER_PATH = str(VENV / "jupyter" / "share" / "jupyter")

# Under `make test` several pytest workers share the machine's cores: each of their processes (kernels, Airflow
# tasks, containers) runs torch, BLAS and numba on one thread. Two processes at two threads each on two cores
# oversubscribe them, and OpenMP's spinning threads make a pair of demo runs 1.5x slower (108 s against 74 s,
# measured with two `helical-workflow run` at once).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def demo_params(tmp: Path, *, model_cache: Path, **overrides) -> Path:
    """A params folder in tmp with the demo experiment (absolute paths) and the real profiles."""
    pdir = tmp / "params"
    pdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "params" / "profiles.yaml", pdir / "profiles.yaml")
    raw = yaml.safe_load((ROOT / "params" / "demo.yaml").read_text())
    raw["data"]["path"] = str(DEMO_DATA)
    # no UMAP unless a test asks (`evaluate__umap=True`): its numba compile costs every evaluate kernel ~20 s
    raw.setdefault("evaluate", {})["umap"] = False
    raw["model"]["cache_dir"] = str(model_cache)
    for dotted, value in overrides.items():
        cur = raw
        keys = dotted.split("__")
        for k in keys[:-1]:
            cur = cur.setdefault(k, {})
        cur[keys[-1]] = value
    path = pdir / f"{raw['experiment']}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# Seconds each slow file took on the 2-core machine (`make test`'s --durations). With several workers (`make
# test`: pytest-xdist, whole files per worker), the longest files start first, so that the last file to finish is
# a short one.
FILE_SECONDS = {  # measured with two workers at one thread each (2026-12-08, `make test --durations=0`), rounded
    "test_container.py": 810,
    "test_faults_concurrent.py": 550,
    "test_readme_commands.py": 430,
    "test_sweep.py": 400,
    "test_annotate.py": 390,
    "test_dag.py": 320,
    "test_faults.py": 280,
    "test_train.py": 250,
    "test_celery.py": 180,
    "test_notebooks.py": 130,
    "test_monitoring.py": 130,
    "test_registry.py": 90,
    "test_links.py": 65,
    "test_new_stage.py": 60,
    "test_runs.py": 45,
    "test_tokenize.py": 15,
}


def pytest_collection_modifyitems(config, items):
    """Longest files first (stable within a file), so that xdist's whole-file scheduling packs the workers."""
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One local tiny model cache for the session (built by the first tokenize stage)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture
def workflow_env(tmp_path, monkeypatch) -> dict[str, str]:
    """Environment for subprocesses and the launcher: isolated outputs, the project kernel."""
    outputs = tmp_path / "outputs"
    env = {
        "HELICAL_WORKFLOW_OUTPUTS": str(outputs),
        "HELICAL_WORKFLOW_HOME": str(ROOT),
        "JUPYTER_PATH": JUPYTER_PATH,
        "MLFLOW_TRACKING_URI": "",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv("HELICAL_PUSHGATEWAY", raising=False)
    env.pop("MLFLOW_TRACKING_URI")
    return {**os.environ, **env}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run([str(c) for c in cmd], **kw)


@pytest.fixture(scope="session", autouse=True)
def _demo_data_exists():
    if not DEMO_DATA.exists():
        subprocess.run([sys.executable, "-m", "helical_workflow.cli", "demo-data", "--out", str(DEMO_DATA)], check=True)


def cli(*args, **kw) -> subprocess.CompletedProcess:
    """`helical-workflow ARGS` in the kernel environment (what the README's commands run)."""
    return run([KERNEL_PY, "-m", "helical_workflow.cli", *args], **kw)


def airflow_home(tmp_path: Path, workflow_env: dict[str, str], params_dir: Path, **extra: str) -> dict[str, str]:
    """An environment with its own Airflow home (migrated SQLite DB) whose DAGs come from ``params_dir``."""
    env = {
        **workflow_env,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "HELICAL_WORKFLOW_PARAMS_DIR": str(params_dir),
        "PATH": f"{AIRFLOW_BIN}:{os.environ['PATH']}",
        **extra,
    }
    r = run([AIRFLOW_BIN / "airflow", "db", "migrate"], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return env


def standalone_settings(port: int) -> dict[str, str]:
    """``airflow standalone`` on ``port`` (API server and execution API), a quick dag-processor, DAGs unpaused:
    what the tests that run the real scheduler add to :func:`airflow_home`."""
    return {
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{port}/execution/",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
    }


def wait_for(what: str, cond, timeout: float, proc: subprocess.Popen, log: Path, every: float = 1.0):
    """``cond()``'s first truthy value, polling; fails naming ``what`` (with the server's log) if ``proc`` exits
    or ``timeout`` seconds pass."""
    import time

    deadline = time.time() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert proc.poll() is None, (
            f"server exited {proc.returncode} while waiting for {what}: {log.read_text()[-4000:]}"
        )
        assert time.time() < deadline, f"no {what} after {timeout:.0f} s: {log.read_text()[-4000:]}"
        time.sleep(every)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Until ``url`` answers 200."""
    import urllib.request

    def ok() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.status == 200
        except OSError:
            return False

    wait_for(f"{url} healthy", ok, timeout, proc, log)


def start_group(cmd, env: dict[str, str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """A server (Airflow, MLflow, ...) in its own process group, output to ``log``: whatever it starts
    (scheduler, workers, kernels) goes down with it in :func:`stop_group`."""
    return subprocess.Popen(
        [str(c) for c in cmd], cwd=cwd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def stop_group(proc: subprocess.Popen, signals=(signal.SIGINT, signal.SIGTERM, signal.SIGKILL)) -> None:
    """Stop a process group started by :func:`start_group` (or ``start_new_session=True``), gently first,
    and kill whatever of the group outlived its leader."""
    for sig in signals:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=20)
            break
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            break
    left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    for pid in left:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def compose_mlflow_command() -> list[str]:
    """The compose stack's ``mlflow server`` command line (compose/docker-compose.yml)."""
    compose = yaml.safe_load((ROOT / "compose" / "docker-compose.yml").read_text())
    return [str(a) for a in compose["services"]["mlflow"]["command"]]


@contextmanager
def mlflow_server_at(root: Path, port: int | None = None):
    """``mlflow server`` started with the compose service's command line: a SQLite backend store under ``root``
    instead of Postgres, artifacts served from ``root/mlartifacts``, on ``port`` (a free one by default).
    Started again on the same root and port, it is the same server (the test of an MLflow outage does that)."""
    from types import SimpleNamespace

    port = port or free_port()
    replace = {
        "--host": "127.0.0.1",
        "--port": str(port),
        "--backend-store-uri": f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination": str(root / "mlartifacts"),
    }
    cmd = compose_mlflow_command()
    for i, arg in enumerate(cmd):
        flag = arg.partition("=")[0]
        if flag in replace:
            cmd[i] = f"{flag}={replace.pop(flag)}"
    assert not replace, f"the compose mlflow command lacks {sorted(replace)}"
    cmd[0] = str(KERNEL_PY.parent / "mlflow")  # the kernel environment's
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    root.mkdir(parents=True, exist_ok=True)
    log = root / f"server-{port}.log"
    proc = start_group(cmd, env, log, cwd=root)  # its workers and job runners go down with it
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{url}/health", proc, log, 180)
        yield SimpleNamespace(url=url, port=port, root=root, artifacts=root / "mlartifacts", log=log, proc=proc)
    finally:
        stop_group(proc, signals=(signal.SIGTERM, signal.SIGKILL))


@contextmanager
def trained_demo(root: Path):
    """A demo run trained for one epoch and evaluated in-process, tracked in a SQLite store under ``root``
    (outputs under ``root/outputs`` for the duration): a run folder with params/, model/ and evaluate/."""
    import json
    from types import SimpleNamespace

    from helical_workflow import data, evaluate, runs, train
    from helical_workflow import tokenize as tok
    from helical_workflow.params import load_params

    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HELICAL_WORKFLOW_OUTPUTS", str(root / "outputs"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        pp = demo_params(
            root,
            model_cache=root / "models",
            fine_tune__epochs=1,
            evaluate__umap=False,
            tracking__mlflow_tracking_uri=uri,
        )
        params = load_params(pp)
        rd = root / "run"
        data.load_stage(params, rd)
        tok.tokenize_stage(params, rd)
        train.fine_tune_stage(params, rd)
        metrics = evaluate.evaluate_stage(params, rd)
        params.save(rd / "params")  # as a launched run has them: the run folder is a model reference
        yield SimpleNamespace(
            root=root,
            params=params,
            params_file=pp,
            run_dir=rd,
            uri=uri,
            metrics=metrics,
            run_id=runs.read_manifest(rd)["mlflow"]["run_id"],
            info=json.loads((rd / "model" / "model_info.json").read_text()),
        )
