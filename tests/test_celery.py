"""The workflow on the CeleryExecutor, and what a worker without the shared outputs storage says.

The slow test runs Airflow as it runs on several machines, on this one: Debian's ``redis-server`` as the
broker (a free port, no persistence), the SQLite metadata DB (Airflow 3.3 accepts it with the CeleryExecutor:
workers never open it, they talk to the API server's execution API), ``airflow scheduler``,
``airflow dag-processor``, ``airflow api-server`` and two ``airflow celery worker`` processes (concurrency 1
each). Each worker reports its own name as the task instances' hostname (``[core] hostname_callable``), as
two machines would. The demo runs with 4 tokenize shards on one worker, then on two; its tokens must equal
those of the same params tokenized in-process (the LocalExecutor's code path without a scheduler).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from helical_workflow import launchers, runs
from helical_workflow.params import load_params

from .conftest import AIRFLOW_BIN, airflow_home, demo_params, free_port, stop_group

STORAGE_FIX = ("shared storage", "volume", "nfs", "persistentvolumeclaim")  # lower case


# ------------------------------------------------------------------ shared storage (fast) ----------


# HELICAL_CELERY_ONE_WORKER=1 also runs the demo on one worker first, for the one-vs-two wall times
TIME_ONE_WORKER = os.environ.get("HELICAL_CELERY_ONE_WORKER") == "1"


def test_a_worker_that_does_not_see_the_run_folder_fails_naming_the_shared_storage_fix(
    tmp_path, model_cache, workflow_env, monkeypatch
):
    """load ran on worker A; tokenize lands on worker B, whose outputs folder is not A's: the task fails
    before any compute, saying the workers need shared storage for outputs/ and how to provide it."""
    pp = demo_params(tmp_path, model_cache=model_cache, tokenize__shards=2)
    monkeypatch.setenv("HELICAL_WORKFLOW_OUTPUTS", str(tmp_path / "worker-a"))
    run = runs.Run.create(load_params(pp), "r1")
    with run.attempt("load", finalize=lambda a: None):
        pass  # the load stage succeeded on worker A (its outputs are not needed to show the failure)

    monkeypatch.setenv("HELICAL_WORKFLOW_OUTPUTS", str(tmp_path / "worker-b"))
    with pytest.raises(runs.StageNotReady) as e:  # what the Airflow task (StageOperator) runs
        launchers.run_task(pp, "tokenize", "r1", shard="0/2", run_root=tmp_path / "worker-b" / "demo", log_output=False)
    msg = str(e.value)
    assert "needs 'load' to have succeeded" in msg and "does not share the outputs storage" in msg
    assert all(word in msg.lower() for word in STORAGE_FIX), msg
    assert not (tmp_path / "worker-b" / "demo" / "r1" / "notebooks" / "02_tokenize.shard-00000-of-00002.ipynb").exists()

    # a library reader (annotate, a notebook pointed at another run) that sees no run folder at all
    with pytest.raises(FileNotFoundError) as e:
        runs.require_stage_output(tmp_path / "worker-b" / "demo" / "r0", "load")
    assert "'load' stage has not completed" in str(e.value) and all(w in str(e.value).lower() for w in STORAGE_FIX)


def test_a_stage_run_too_early_on_shared_storage_just_says_run_the_upstream_first(tmp_path, model_cache, workflow_env):
    """Where the run folder is visible and a stage has run, a missing upstream is not a storage problem."""
    run = runs.Run.create(load_params(demo_params(tmp_path, model_cache=model_cache, tokenize__shards=2)), "r1")
    with run.attempt("load", finalize=lambda a: None):
        pass
    with pytest.raises(runs.StageNotReady) as e:
        with run.attempt("fine_tune", finalize=lambda a: None):
            pass
    assert "Fix: run 'tokenize' first" in str(e.value) and "storage" not in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        runs.require_stage_output(run.dir, "tokenized")
    assert "Fix: run the 'tokenize' stage" in str(e.value) and "storage" not in str(e.value)


# ------------------------------------------------------------------ the Celery stack (slow) ----------

HOSTNAME_SHIM = '''import os, socket


def hostname():
    """The Celery worker's name as the task instance's hostname: two workers on one machine tell apart."""
    return f"{os.environ['HW_CELERY_WORKER']}@{socket.gethostname()}"
'''


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    children: dict[int, list[int]] = {}
    for p, pp in zip(out[::2], out[1::2]):
        children.setdefault(int(pp), []).append(int(p))
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


class Stack:
    """Processes started in their own process groups, logged to files, all stopped by :meth:`stop`
    (the group, then any descendant that left it, such as a notebook kernel in its own session)."""

    def __init__(self, logs: Path):
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list, env: dict[str, str]) -> subprocess.Popen:
        proc = subprocess.Popen(
            [str(c) for c in cmd],
            env=env,
            cwd=self.logs,
            stdout=open(self.logs / f"{name}.log", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        assert not dead, f"exited: {dead}\n" + "\n".join(f"--- {n}\n{self.log(n)[-3000:]}" for n in dead)

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        left = _descendants(proc.pid)  # children that may leave the group (notebook kernels)
        stop_group(proc, signals=(signal.SIGTERM, signal.SIGKILL))
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)


def _wait(pred, seconds: float, what: str, stack: Stack, every: float = 2.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        got = pred()
        if got:
            return got
        stack.check_alive()
        time.sleep(every)
    raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            h = json.load(r)
    except (OSError, ValueError):
        return False
    return h.get("scheduler", {}).get("status") == "healthy" and h.get("metadatabase", {}).get("status") == "healthy"


def _query(db: Path, sql: str, *args) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def _run_demo(stack: Stack, env: dict[str, str], db: Path, run_id: str, timeout: float) -> dict:
    """Trigger the demo DAG, wait for its end, return its state, wall time and tokenize task instances."""
    r = subprocess.run(
        [AIRFLOW_BIN / "airflow", "dags", "trigger", "helical_demo", "--run-id", run_id],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]

    def ended():
        rows = _query(db, "SELECT state FROM dag_run WHERE dag_id='helical_demo' AND run_id=?", run_id)
        return rows and rows[0][0] in ("success", "failed") and rows[0][0]

    state = _wait(ended, timeout, f"DAG run {run_id}", stack, every=3)
    tis = _query(
        db,
        "SELECT task_id, map_index, state, hostname, start_date, end_date FROM task_instance "
        "WHERE dag_id='helical_demo' AND run_id=? ORDER BY task_id, map_index",
        run_id,
    )
    if state != "success":
        logs = "\n".join(
            f"--- {p}\n{p.read_text(errors='replace')[-3000:]}"
            for p in (Path(env["AIRFLOW_HOME"]) / "logs").rglob("*.log")
            if f"run_id={run_id}" in str(p)
        )
        raise AssertionError(f"run {run_id} ended {state}: {tis}\n{logs[-12000:]}")
    ((start, end),) = _query(db, "SELECT start_date, end_date FROM dag_run WHERE run_id=?", run_id)
    tok = [t for t in tis if t[0] == "tokenize"]
    return {
        "wall_s": _ts(end) - _ts(start),
        "tokenize_s": max(_ts(t[5]) for t in tok) - min(_ts(t[4]) for t in tok),
        "hosts": {t[1]: t[3] for t in tok},
        "tis": tis,
    }


def _start_worker(stack: Stack, env: dict[str, str], shim: Path, name: str) -> None:
    wenv = {
        **env,
        "HW_CELERY_WORKER": name,
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "hw_worker_name.hostname",
        "PYTHONPATH": str(shim),
    }
    cmd = [AIRFLOW_BIN / "airflow", "celery", "worker", "--celery-hostname", f"{name}@%h", "--concurrency", "1"]
    stack.start(name, [*cmd, "--skip-serve-logs"], wenv)
    _wait(lambda: " ready." in stack.log(name), 120, f"celery worker {name}", stack)


@pytest.mark.slow
def test_the_demo_runs_on_two_celery_workers_with_the_tokens_of_a_local_run(tmp_path, model_cache, workflow_env):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is missing. Fix: make system-deps (Debian package redis-server)")
    pdir = demo_params(
        tmp_path,
        model_cache=tmp_path / "models-celery",  # built by the shards themselves, concurrently, on both workers
        fine_tune__epochs=1,
        tokenize__shards=4,
        evaluate__umap=False,
    ).parent
    redis_port, api_port = free_port(), free_port()
    env = airflow_home(
        tmp_path,
        {**workflow_env, "HELICAL_WORKFLOW_OUTPUTS": str(tmp_path / "outputs")},
        pdir,
        AIRFLOW__CORE__EXECUTOR="CeleryExecutor",
        AIRFLOW__CELERY__BROKER_URL=f"redis://127.0.0.1:{redis_port}/0",
        AIRFLOW__CELERY__RESULT_BACKEND=f"db+sqlite:///{tmp_path / 'celery-results.db'}",
        AIRFLOW__API__PORT=str(api_port),
        AIRFLOW__API__WORKERS="1",
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://localhost:{api_port}/execution/",
        AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_hex(32),
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
        AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="5",
        AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC="2",
    )
    db = tmp_path / "airflow" / "airflow.db"
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "hw_worker_name.py").write_text(HOSTNAME_SHIM)
    airflow = AIRFLOW_BIN / "airflow"
    stack = Stack(tmp_path / "logs")
    try:
        stack.start(
            "redis",
            [
                "redis-server",
                "--port",
                redis_port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                tmp_path,
            ],
            env,
        )
        _wait(lambda: _redis_ping(redis_port), 30, "redis-server", stack, every=0.5)
        stack.start("api-server", [airflow, "api-server"], env)
        stack.start("scheduler", [airflow, "scheduler"], env)
        stack.start("dag-processor", [airflow, "dag-processor"], env)
        _wait(lambda: _healthy(f"http://127.0.0.1:{api_port}/api/v2/monitor/health"), 180, "the API server", stack)
        _wait(lambda: _query(db, "SELECT 1 FROM dag WHERE dag_id='helical_demo'"), 180, "the demo DAG", stack)

        _start_worker(stack, env, shim, "w1")
        one = None
        if TIME_ONE_WORKER:  # the one-worker reference run doubles the test's time: on demand only
            one = _run_demo(stack, env, db, "celery_one_worker", 900)
            assert set(one["hosts"].values()) == {f"w1@{socket.gethostname()}"}, one["hosts"]

        _start_worker(stack, env, shim, "w2")
        two = _run_demo(stack, env, db, "celery_two_workers", 900)
        workers = {h.split("@")[0] for h in two["hosts"].values()}
        assert workers == {"w1", "w2"}, f"tokenize shards by worker: {two['hosts']}"
        # and the workers' own logs agree: each ran workloads of the demo's tokenize task
        for name in ("w1", "w2"):
            assert "task_id='tokenize'" in stack.log(name) and "run_id='celery_two_workers'" in stack.log(name)
    finally:
        stack.stop_all()

    alone = f"one worker {one['wall_s']:.1f} s (tokenize {one['tokenize_s']:.1f} s), " if one else ""
    print(
        f"\n4-shard demo on the CeleryExecutor: {alone}"
        f"two workers {two['wall_s']:.1f} s (tokenize {two['tokenize_s']:.1f} s); shards: {two['hosts']}"
    )

    # tokens: both Celery runs equal the same params tokenized in-process, shard by shard (no scheduler)
    from helical_workflow import data
    from helical_workflow import tokenize as tok
    from helical_workflow.stages import Shard

    ref_params = load_params(demo_params(tmp_path / "ref", model_cache=model_cache, tokenize__shards=4))
    ref = tmp_path / "ref" / "run"
    data.load_stage(ref_params, ref)
    for i in range(4):
        tok.tokenize_stage(ref_params, ref, Shard(i, 4))
    want = tok.load_tokenized(ref, 4)
    for run_id in ("celery_one_worker", "celery_two_workers")[0 if one else 1 :]:
        got = tok.load_tokenized(tmp_path / "outputs" / "demo" / run_id, 4)
        assert got["cell_id"] == want["cell_id"]
        assert len(got) == len(want) and all(
            np.array_equal(a, b) for a, b in zip(got["input_ids"], want["input_ids"])
        ), run_id
