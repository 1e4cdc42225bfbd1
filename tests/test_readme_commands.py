"""The README's long-running commands, started exactly as written (through make), then stopped:
`make lab` offers the helical-workflow kernel and the notebooks; `make airflow` serves the API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .conftest import KERNEL_PY, ROOT, free_port, start_group, stop_group

pytestmark = pytest.mark.slow


def _make(target: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    # its own process group: the servers' children (scheduler, workers, kernels) go down with it
    return start_group(["make", "-s", target], env, log, cwd=ROOT)


def _get_json(url: str, deadline: float) -> dict | None:
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.load(r)
        except (OSError, ValueError):
            time.sleep(1)
    return None


def test_make_lab_lists_the_kernel_and_the_notebooks(tmp_path):
    port, token = free_port(), "test-token-123"
    env = {
        **os.environ,
        "LAB_PORT": str(port),
        "JUPYTER_TOKEN": token,
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
        "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"),
    }
    proc = _make("lab", env, tmp_path / "lab.log")
    try:
        url = f"http://127.0.0.1:{port}"
        specs = _get_json(f"{url}/api/kernelspecs?token={token}", time.time() + 120)
        assert specs is not None, "JupyterLab did not answer: " + (tmp_path / "lab.log").read_text()[-3000:]
        assert "helical-workflow" in specs["kernelspecs"]
        assert specs["kernelspecs"]["helical-workflow"]["spec"]["argv"][0] == str(KERNEL_PY)
        with urllib.request.urlopen(f"{url}/api/contents/notebooks?token={token}", timeout=10) as r:
            names = {c["name"] for c in json.load(r)["content"]}
        assert names >= {"01_load.ipynb", "02_tokenize.ipynb", "03_fine_tune.ipynb", "04_evaluate.ipynb"}
        with urllib.request.urlopen(f"{url}/lab?token={token}", timeout=10) as r:
            assert r.status == 200
        with pytest.raises(urllib.error.HTTPError):  # without the token the server refuses
            urllib.request.urlopen(f"{url}/api/kernelspecs", timeout=10)
    finally:
        stop_group(proc)


def test_make_airflow_starts_the_api_and_stops(tmp_path):
    """`make airflow PORT=N` as the README writes it: one setting moves the API, the workers' execution API and
    the links; the LocalExecutor's workers are sized to the machine, not Airflow's 32."""
    port = free_port()
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    env = {k: v for k, v in env.items() if not k.startswith(("AIRFLOW__API__", "AIRFLOW__CORE__EXECUTION"))}
    env["PATH"] = ":".join(p for p in env["PATH"].split(":") if ".venv/airflow" not in p)  # as a user's shell
    assert "`make airflow PORT=18090`" in (ROOT / "README.md").read_text()
    proc = start_group(["make", "-s", "airflow", f"PORT={port}"], env, tmp_path / "airflow.log", cwd=ROOT)
    try:
        health = _get_json(f"http://127.0.0.1:{port}/api/v2/monitor/health", time.time() + 180)
        log = (tmp_path / "airflow.log").read_text()
        assert health is not None, "make airflow did not serve the API:\n" + log[-4000:]
        assert health["metadatabase"]["status"] == "healthy"
        assert "FileNotFoundError" not in log
        assert (tmp_path / "airflow" / "simple_auth_manager_passwords.json.generated").exists()
        deadline = time.time() + 120  # standalone starts the scheduler beside the API server
        while not (scheduler := _group_processes(proc.pid, "airflow scheduler")) and time.time() < deadline:
            time.sleep(2)
        assert scheduler, "no scheduler under make airflow:\n" + (tmp_path / "airflow.log").read_text()[-3000:]
        environ = dict(
            kv.split("=", 1) for kv in Path(f"/proc/{scheduler[0]}/environ").read_text().split("\0") if "=" in kv
        )
        assert environ["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == f"http://localhost:{port}/execution/"
        assert environ["AIRFLOW__API__BASE_URL"] == f"http://localhost:{port}"
        slots = 2 * os.cpu_count()
        assert environ["AIRFLOW__CORE__PARALLELISM"] == str(slots)
        deadline = time.time() + 60
        while len(_group_processes(proc.pid, "LocalExecutor")) < min(slots, 2) and time.time() < deadline:
            time.sleep(1)
        assert 0 < len(_group_processes(proc.pid, "LocalExecutor")) <= slots
    finally:
        stop_group(proc)


def _group_processes(root: int, needle: str) -> list[int]:
    """Pids of ``root``'s descendants whose command line contains ``needle``."""
    out = subprocess.run(["ps", "-ww", "-o", "pid=,ppid=,args=", "-e"], capture_output=True, text=True).stdout
    rows = [ln.split(None, 2) for ln in out.splitlines() if len(ln.split(None, 2)) == 3]
    children: dict[int, list[int]] = {}
    for pid, ppid, _ in rows:
        children.setdefault(int(ppid), []).append(int(pid))
    mine, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in mine:
                mine.add(c)
                todo.append(c)
    return [int(pid) for pid, _, args in rows if int(pid) in mine and needle in args]


def test_make_demo_runs_the_workflow_and_reports(tmp_path):
    """`make demo` as written: validate, `airflow dags test helical_demo`, then the report's summary."""
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow"), "HELICAL_WORKFLOW_OUTPUTS": str(tmp_path / "out")}
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run(["make", "-s", "demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "OK params/demo.yaml" in r.stdout and "Run folder:" in r.stdout
    assert "Test accuracy" in r.stdout and "wins with validation_macro_f1" in r.stdout
    # the kernel talks to papermill over IPC: no "running over TCP without encryption" line, which Airflow
    # logged at ERROR level in every successful task
    tcp = [ln for ln in (r.stdout + r.stderr).splitlines() if "without encryption" in ln]
    assert not tcp, tcp[:3]
    (run_dir,) = (tmp_path / "out" / "demo").glob("manual__*")
    assert (run_dir / "reports" / "05_compare.html").exists()
    _clean_reports(run_dir, 5)

    # the README's annotate command, with the champion the demo registered
    cmd = ".venv/kernel/bin/helical-workflow annotate data/pbmc68k_reduced_counts.h5ad --model models:/demo@champion"
    assert cmd in (ROOT / "README.md").read_text()
    env.pop("JUPYTER_PATH", None)  # as typed in a fresh shell
    r = subprocess.run(cmd.split(), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "700 cells annotated with demo-v1" in r.stdout
    assert (tmp_path / "out" / "annotate").is_dir() and "reports/08_annotate_report.html" in r.stdout
    (annotation_run,) = (tmp_path / "out" / "annotate" / "runs" / "demo").iterdir()
    _clean_reports(annotation_run, 3)


def _clean_reports(run_dir, n: int) -> None:
    """Each stage's report has no stderr box and no library note (``note: ...`` lines on stdout)."""
    import re

    reports = sorted((run_dir / "reports").glob("*.html"))
    assert len(reports) == n, reports
    for html in reports:
        text = html.read_text()
        assert 'data-mime-type="application/vnd.jupyter.stderr"' not in text, html.name
        assert not re.search(r"(^|\n|<pre>)note: ", text), (html.name, re.findall(r"note: [^\n<]*", text)[:3])


@pytest.mark.parametrize(
    "command,expect",
    [
        ("make env", ""),  # idempotent: both environments, the kernel, the Airflow DB, the git filter
        ("make data", ""),  # idempotent: the demo dataset and the watched folder
        ("make lint", "Contracts: 4 kept, 0 broken."),
        ("make test-fast PYTEST_ARGS=tests/test_stages.py", "passed"),
    ],
)
def test_make_targets_in_the_readme_run_as_written(command, expect):
    make, target, *args = command.split()
    assert f"`{make} {target}`" in (ROOT / "README.md").read_text()
    r = subprocess.run([make, "-s", target, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert expect in r.stdout
    if target == "data":
        assert (ROOT / "data" / "pbmc68k_reduced_counts.h5ad").is_file() and (ROOT / "data" / "incoming").is_dir()
    if target == "env":
        assert (
            "nbstripout"
            in subprocess.run(
                ["git", "config", "--get", "filter.nbstripout.clean"], cwd=ROOT, capture_output=True, text=True
            ).stdout
        )


@pytest.mark.parametrize("target", ["up", "down"])
def test_make_up_without_its_env_file_says_what_to_copy(tmp_path, target):
    """`make up` / `make down` as written, where compose/.env has not been made yet (a fresh clone): each stops
    before any engine call and names the file to copy. (The stack itself needs Docker Engine, which this machine
    lacks.)"""
    assert "`make up` / `make down`" in (ROOT / "README.md").read_text()
    shutil.copytree(ROOT / "compose", tmp_path / "compose", ignore=shutil.ignore_patterns(".env"))
    r = subprocess.run(
        ["make", "-s", "-f", ROOT / "Makefile", target], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0
    assert "copy compose/.env.example to compose/.env" in r.stdout + r.stderr
    assert "docker compose" not in r.stdout + r.stderr  # stopped before the engine


def test_make_bench_quick_runs_every_benchmark_with_its_ratios():
    """`make bench QUICK=1`, as the README writes it: each benchmark runs on small inputs and prints its ratio
    against the reference measured in the same run."""
    assert "`make bench QUICK=1`" in (ROOT / "README.md").read_text()
    r = subprocess.run(["make", "-s", "bench", "QUICK=1"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    for script in ("tokenize_bench.py", "train_bench.py", "annotate_bench.py"):
        assert f"=== {script}" in r.stdout, script
    assert r.stdout.count("vs helical") >= 3 and "failed" not in r.stdout
    assert "quick mode" in r.stdout
